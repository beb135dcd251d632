//! `/metrics` and the logs of the real binary (its own process, so the
//! process-wide metrics start at zero and the values are exact): the
//! metrics after the known operator scenario, JSON logs that parse line by
//! line with one line per ChurnZero request and no secret, and `RUST_LOG`
//! filtering of text logs.

mod common;

use churnzero_forwarder::mock_churnzero::ScriptedAnswer;
use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

const PREFIX: &str = "churnzero_forwarder_";

/// Samples of a Prometheus text exposition: `name{labels}` -> value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_string(), value.parse::<f64>().unwrap())
        })
        .collect()
}

fn value(s: &HashMap<String, f64>, key: &str) -> f64 {
    *s.get(&format!("{PREFIX}{key}"))
        .unwrap_or_else(|| panic!("no sample {PREFIX}{key}"))
}

async fn wait_exit(server: &mut Binary) {
    wait_for("the server to exit", Duration::from_secs(30), || {
        let exited = server.child.try_wait().unwrap().is_some();
        async move { exited.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn metrics_after_a_known_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    poison_mock(&mock);
    let server = Binary::serve(&dir.path().join("o.db"), &mock.url(), &[]).await;
    let sc = operator_scenario(&server.base).await;

    let r = client()
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.text().await.unwrap();
    let s = samples(&text);

    // One namespace, and every series is typed and described.
    for key in s.keys() {
        assert!(key.starts_with(PREFIX), "unprefixed metric {key}");
        let name = key.split('{').next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|b| text.contains(&format!("# TYPE {b} histogram")))
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {base} ")),
            "no TYPE for {base}"
        );
        assert!(
            text.contains(&format!("# HELP {base} ")),
            "no HELP for {base}"
        );
    }

    // Ingest.
    assert_eq!(
        value(&s, "ingest_requests_total{status=\"200\"}"),
        sc.ok_requests as f64
    );
    assert_eq!(
        value(&s, "ingest_requests_total{status=\"400\"}"),
        sc.bad_requests as f64
    );
    assert_eq!(
        value(&s, "ingest_requests_total{status=\"401\"}"),
        sc.unauthorized_requests as f64
    );
    assert_eq!(value(&s, "events_accepted_total"), sc.accepted as f64);
    assert_eq!(value(&s, "events_rejected_total"), sc.rejected as f64);
    assert_eq!(value(&s, "events_filtered_total"), sc.filtered as f64);
    assert_eq!(value(&s, "events_duplicate_total"), sc.duplicates as f64);

    // Outbox depth, from the status counters at scrape time.
    assert_eq!(
        value(&s, "outbox_events{state=\"pending\"}"),
        sc.pending as f64
    );
    assert_eq!(value(&s, "outbox_events{state=\"in_flight\"}"), 0.0);
    assert_eq!(value(&s, "outbox_events{state=\"held\"}"), sc.held as f64);
    assert_eq!(value(&s, "outbox_events{state=\"dead\"}"), sc.dead as f64);
    // Only events queued behind the held one wait: no pending age.
    assert_eq!(value(&s, "outbox_oldest_pending_age_seconds"), 0.0);
    assert!(value(&s, "outbox_oldest_held_age_seconds") > 0.0);
    let last = value(&s, "last_delivery_timestamp_seconds");
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((now - 600.0..=now + 5.0).contains(&last), "{last} vs {now}");

    // Delivery.
    assert_eq!(value(&s, "events_delivered_total"), sc.delivered as f64);
    assert_eq!(value(&s, "events_dead_total"), sc.dead as f64);
    assert_eq!(value(&s, "events_retried_total"), 0.0);
    assert!(value(&s, "events_held_total") >= 1.0);
    let requests: f64 = ["delivered", "retry", "rejected"]
        .iter()
        .map(|o| value(&s, &format!("churnzero_requests_total{{outcome=\"{o}\"}}")))
        .sum();
    assert!(value(&s, "churnzero_requests_total{outcome=\"delivered\"}") >= 1.0);
    // Each poison event is rejected alone in the end.
    assert!(value(&s, "churnzero_requests_total{outcome=\"rejected\"}") >= sc.dead as f64);
    assert_eq!(
        value(&s, "churnzero_requests_total{outcome=\"retry\"}"),
        0.0
    );
    assert_eq!(
        value(&s, "churnzero_request_duration_seconds_count"),
        requests
    );
    assert_eq!(requests, mock.state().request_count() as f64);
    assert_eq!(
        value(&s, "delivery_latency_seconds_count"),
        sc.delivered as f64
    );
    assert_eq!(
        value(&s, "delivery_latency_seconds_bucket{le=\"+Inf\"}"),
        sc.delivered as f64
    );
    assert!(value(&s, "delivery_latency_seconds_sum") > 0.0);

    // The sync lane's gauges exist even before its first run.
    for g in [
        "sync_pending_contacts",
        "sync_last_run_sent",
        "sync_last_run_skipped",
        "sync_last_run_timestamp_seconds",
        "sync_next_run_timestamp_seconds",
    ] {
        assert!(s.contains_key(&format!("{PREFIX}{g}")), "no {g}");
    }
    assert!(!text.contains(APP_KEY) && !text.contains(WRITE_KEY));
}

#[tokio::test]
async fn json_logs_parse_line_by_line_and_hold_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    poison_mock(&mock);
    mock.state().push_script([ScriptedAnswer::Status(503)]);
    let mut server = Binary::serve_with_env(
        &dir.path().join("o.db"),
        &mock.url(),
        &["--log-format", "json", "--admin-token", ADMIN_TOKEN],
        &[("RUST_LOG", "info,churnzero_forwarder=debug")],
    )
    .await;
    operator_scenario(&server.base).await;
    // A refused admin request and a replay leave their own lines.
    for token in ["wrong-token-value", ADMIN_TOKEN] {
        let r = client()
            .post(format!("{}/admin/dead/replay", server.base))
            .bearer_auth(token)
            .json(&serde_json::json!({"all": true}))
            .send()
            .await
            .unwrap();
        assert!(r.status().as_u16() == 401 || r.status().is_success());
    }
    wait_status(&server.base, "dead", 2).await;
    server.sigterm();
    wait_exit(&mut server).await;

    let log = server.logs();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 5, "{log}");
    for (line, raw) in lines.iter().zip(log.lines()) {
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{raw}"
        );
        for secret in [APP_KEY, WRITE_KEY, ADMIN_TOKEN, "wrong-token-value"] {
            assert!(!raw.contains(secret), "a secret in the log: {raw}");
        }
    }
    let with = |message: &str, outcome: &str| {
        lines
            .iter()
            .find(|l| l["message"] == message && l["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no `{message}` line with outcome {outcome}:\n{log}"))
    };
    let delivered = with("churnzero request delivered", "delivered");
    assert_eq!(delivered["status"], 200);
    assert!(delivered["duration_ms"].is_u64() && delivered["actions"].is_u64());
    let retry = with("churnzero request failed, will retry", "retry");
    assert_eq!(retry["status"], 503);
    assert!(retry["duration_ms"].is_u64());
    let rejected = with("churnzero refused the request", "rejected");
    assert_eq!(rejected["status"], 400);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "admin request refused: wrong bearer token")
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "dead events replayed by an operator")
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "churnzero-forwarder stopped")
    );
}

#[tokio::test]
async fn rust_log_filters_text_logs() {
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    mock.state().push_script([ScriptedAnswer::Status(503)]);
    let mut server = Binary::serve_with_env(
        &dir.path().join("o.db"),
        &mock.url(),
        &[],
        &[("RUST_LOG", "warn")],
    )
    .await;
    let (code, _) = post(&server.base, "/v1/track", &track("u1", "E", 1)).await;
    assert_eq!(code, 200);
    wait_status(&server.base, "delivered", 1).await;
    server.sigterm();
    wait_exit(&mut server).await;
    let log = server.logs();
    assert!(
        log.contains("churnzero request failed, will retry"),
        "{log}"
    );
    assert!(
        !log.contains("INFO"),
        "info lines despite RUST_LOG=warn:\n{log}"
    );
    assert!(!log.contains("churnzero request delivered"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
    assert!(!log.contains(APP_KEY));
}

/// The metrics table of docs/operator.md: (name, type) for every metric it
/// lists (a row may name several).
fn documented_metrics() -> Vec<(String, String)> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operator.md")).unwrap();
    let section = doc
        .split("\n## Metrics")
        .nth(1)
        .expect("docs/operator.md has a Metrics section");
    let section = section.split("\n## ").next().unwrap();
    let mut out = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let kind = cells[2].to_string();
        for name in cells[1].split('`').skip(1).step_by(2) {
            out.push((name.to_string(), kind.clone()));
        }
    }
    out
}

#[tokio::test]
async fn every_documented_metric_is_exported_from_the_first_scrape() {
    let documented = documented_metrics();
    assert!(documented.len() >= 30, "{documented:?}");
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    let server = Binary::serve(&dir.path().join("o.db"), &mock.url(), &[]).await;
    // Right after start: nothing was ingested, sent or synced yet.
    let text = metrics_text(&server.base).await;
    let s = samples(&text);
    let mut exported: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            l.split(' ')
                .next()
                .unwrap()
                .trim_start_matches(PREFIX)
                .to_string()
        })
        .collect();
    exported.sort();
    let mut names: Vec<String> = documented.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(
        names, exported,
        "docs/operator.md and /metrics list different metrics"
    );
    for (name, kind) in &documented {
        assert!(
            text.contains(&format!("# TYPE {PREFIX}{name} {kind}\n")),
            "{name} is documented as a {kind}"
        );
        let sample = if kind == "histogram" {
            format!("{name}_count")
        } else {
            name.clone()
        };
        let full = format!("{PREFIX}{sample}");
        assert!(
            s.keys()
                .any(|k| k == &full || k.starts_with(&format!("{full}{{"))),
            "no sample of {name} at start (an absent() alert would fire): {text}"
        );
    }
}
