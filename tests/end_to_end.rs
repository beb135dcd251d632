//! The whole path over real sockets: Segment calls in, mapped ChurnZero
//! actions out with the app key and both ids; acknowledged events survive a
//! restart of the real binary; the demo runs to completion.

mod common;

use common::*;
use serde_json::{Value, json};

on_both_backends! {
#[tokio::test]
async fn identify_group_and_track_reach_churnzero_as_mapped_actions(db: &Path) {
    let mock = mock().await;
    let server = start(settings(db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let batch = json!({"batch": [
        {"type": "identify", "userId": "u-7", "traits": {
            "firstName": "Grace", "lastName": "Hopper", "email": "grace@navy.mil",
            "accountExternalId": "acct-42", "vip": true}},
        {"type": "group", "userId": "u-7", "groupId": "acct-42", "traits": {"name": "Navy"}},
        {"type": "track", "userId": "u-7", "event": "Compiled",
         "timestamp": "2026-11-28T10:00:00.123456Z",
         "properties": {"quantity": 3, "description": "COBOL"}}
    ]});
    let (s, v) = post(&base, "/v1/batch", &batch).await;
    assert_eq!(s, 200, "{v}");
    wait_status(&base, "delivered", 3).await;
    let actions = mock.state().actions();
    assert_eq!(actions.len(), 3, "{actions:#?}");
    assert_eq!(
        actions[0],
        json!({"appKey": APP_KEY, "action": "setAttribute", "accountExternalId": "acct-42",
               "contactExternalId": "u-7", "entity": "contact", "attr_FirstName": "Grace",
               "attr_LastName": "Hopper", "attr_Email": "grace@navy.mil", "attr_vip": true})
    );
    assert_eq!(
        actions[1],
        json!({"appKey": APP_KEY, "action": "setAttribute", "accountExternalId": "acct-42",
               "contactExternalId": "u-7", "entity": "account", "attr_Name": "Navy"})
    );
    assert_eq!(
        actions[2],
        json!({"appKey": APP_KEY, "action": "trackEvent", "accountExternalId": "acct-42",
               "contactExternalId": "u-7", "eventName": "Compiled",
               "eventDate": "2026-11-28T10:00:00.123Z", "description": "COBOL", "quantity": 3})
    );
    let st = status(&base).await;
    assert_eq!(
        (
            st["pending"].as_i64(),
            st["dead"].as_i64(),
            st["in_flight"].as_i64()
        ),
        (Some(0), Some(0), Some(0))
    );
    assert!(st["last_delivery_at"].is_string());
    server.shutdown().await;
}

#[tokio::test]
async fn acknowledged_events_survive_a_restart_while_churnzero_is_down(db: &Path) {
    // Nothing listens on this port: every delivery attempt fails to connect.
    let dead_url = format!("http://127.0.0.1:{}", free_port());
    let mut first = Binary::serve(db, &dead_url, &[]).await;
    let events: Vec<Value> = (0..25).map(|i| track("u-1", "Kept", i)).collect();
    let (s, v) = post(&first.base, "/v1/batch", &json!({ "batch": events })).await;
    assert_eq!(s, 200, "{v}");
    let st = status(&first.base).await;
    assert_eq!(st["accepted"], json!(25));
    assert_eq!(st["delivered"], json!(0));
    first.sigterm();
    let code = tokio::task::spawn_blocking(move || first.child.wait().unwrap())
        .await
        .unwrap();
    assert!(code.success(), "graceful stop exits 0: {code}");

    let mock = mock().await;
    let second = Binary::serve(db, &mock.url(), &[]).await;
    wait_status(&second.base, "delivered", 25).await;
    let seqs: Vec<i64> = mock
        .state()
        .actions()
        .iter()
        .map(|a| {
            a["description"]
                .as_str()
                .unwrap()
                .rsplit('#')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let mut sorted = seqs.clone();
    sorted.dedup();
    assert_eq!(
        sorted,
        (0..25).collect::<Vec<i64>>(),
        "all 25 arrive once each, in order"
    );
}
}

#[tokio::test]
async fn demo_runs_to_completion() {
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(binary_path())
            .args([
                "demo",
                "--users",
                "2",
                "--events-per-user",
                "3",
                "--timeout",
                "60s",
            ])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 2 identifies + 2 groups + 6 tracks + the closing track.
    assert!(stdout.contains("delivered 11 of 11 events"), "{stdout}");
    assert!(stdout.contains("\"trackEvent\""), "{stdout}");
    assert!(
        !stdout.contains("demo-app-key"),
        "the app key is never printed"
    );
}
