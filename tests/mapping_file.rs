//! The `--mapping` file through the real binary: a bad file stops `serve`
//! with a message naming the line; a good one changes what ChurnZero gets.

mod common;

use common::*;
use serde_json::{Value, json};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn bad_mapping_file_stops_serve_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(
        &mapping,
        "page_events = true\n\n[traits]\nplan = { feild = \"PlanName\" }\n",
    )
    .unwrap();
    let mut child = Command::new(binary_path())
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--database")
        .arg(dir.path().join("o.db"))
        .args(["--write-key", WRITE_KEY])
        .args(["--churnzero-url", "http://127.0.0.1:9"])
        .args(["--churnzero-app-key", APP_KEY])
        .arg("--mapping")
        .arg(&mapping)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("serve kept running with a bad mapping file");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("mapping.toml"), "{stderr}");
    assert!(stderr.contains("line 4"), "{stderr}");
    assert!(stderr.contains("feild"), "{stderr}");
    assert!(!stderr.contains(APP_KEY), "{stderr}");
}

#[tokio::test]
async fn mapping_file_renames_routes_and_adds_custom_fields_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(
        &mapping,
        r#"
page_events = true
event_custom_fields = ["plan"]

[traits]
plan = { field = "PlanName", entity = "account" }
company_name = { field = "Name", entity = "account" }
internal_score = { skip = true }

[properties]
revenue = { field = "Revenue" }
"#,
    )
    .unwrap();
    let mock = mock().await;
    let state = mock.state();
    let db = dir.path().join("o.db");
    let bin = Binary::serve(&db, &mock.url(), &["--mapping", mapping.to_str().unwrap()]).await;

    let events = vec![
        json!({"type": "identify", "userId": "u1",
               "traits": {"accountExternalId": "acct-1", "email": "u1@example.com",
                          "plan": "pro", "company": {"name": "Acme"},
                          "internal_score": 7, "seats": 5}}),
        json!({"type": "track", "userId": "u1", "event": "Upgraded",
               "timestamp": "2026-01-02T03:04:05.678901Z",
               "properties": {"plan": "pro", "revenue": 12.5, "coupon": "X",
                              "description": "upgrade", "quantity": "3"}}),
        json!({"type": "page", "userId": "u1", "name": "Pricing",
               "properties": {"url": "https://example.com/pricing"}}),
    ];
    let (code, body) = post(&bin.base, "/v1/batch", &json!({ "batch": events })).await;
    assert_eq!(code, 200, "{body}");
    wait_status(&bin.base, "delivered", 3).await;

    let actions = state.actions();
    assert_eq!(actions.len(), 4, "{actions:#?}");
    let common = |action: &str| {
        json!({"appKey": APP_KEY, "action": action,
               "accountExternalId": "acct-1", "contactExternalId": "u1"})
    };
    let with = |mut base: Value, extra: Value| {
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        base
    };
    assert_eq!(
        actions[0],
        with(
            common("setAttribute"),
            json!({"entity": "account", "attr_PlanName": "pro", "attr_Name": "Acme"})
        ),
        "routed to the account and renamed"
    );
    assert_eq!(
        actions[1],
        with(
            common("setAttribute"),
            json!({"entity": "contact", "attr_Email": "u1@example.com", "attr_seats": 5})
        ),
        "skipped trait left out"
    );
    assert_eq!(
        actions[2],
        with(
            common("trackEvent"),
            json!({"eventName": "Upgraded", "eventDate": "2026-01-02T03:04:05.678Z",
                   "description": "upgrade", "quantity": 3,
                   "cf_plan": "pro", "cf_Revenue": 12.5})
        ),
        "custom event fields, nothing else"
    );
    assert_eq!(actions[3]["action"], "trackEvent");
    assert_eq!(actions[3]["eventName"], "Viewed Pricing Page");
    assert_eq!(actions[3]["accountExternalId"], "acct-1");
    drop(bin);
    mock.shutdown().await;
}
