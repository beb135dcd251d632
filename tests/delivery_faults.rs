//! Delivery under a misbehaving ChurnZero: transient failures of every kind
//! end delivered with backoff (not a storm), a poison event is isolated and
//! dies alone, per-user order holds under heavy failure, and deduplication
//! survives a restart.

mod common;

use churnzero_forwarder::mock_churnzero::{Faults, ScriptedAnswer};
use common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

on_both_backends! {
#[tokio::test]
async fn transient_failures_end_delivered_with_backoff(db: &Path) {
    let mock = mock().await;
    mock.state().push_script([
        ScriptedAnswer::Status(500),
        ScriptedAnswer::Status(503),
        ScriptedAnswer::StatusWithRetryAfter(429, "1".into()),
        ScriptedAnswer::Hang,
        ScriptedAnswer::Reset,
    ]);
    let mut cfg = settings(db, &mock.url());
    cfg.request_timeout = Duration::from_millis(400);
    cfg.retry_initial = Duration::from_millis(100);
    cfg.retry_max = Duration::from_millis(800);
    let server = start(cfg).await;
    let base = format!("http://{}", server.addr);
    let events: Vec<Value> = (0..10).map(|i| track("u-1", "Flaky", i)).collect();
    let (s, _) = post(&base, "/v1/batch", &json!({ "batch": events })).await;
    assert_eq!(s, 200);
    let st = wait_status(&base, "delivered", 10).await;
    assert_eq!(st["dead"], json!(0));
    let requests = mock.state().requests();
    let outcomes: Vec<u16> = requests.iter().map(|r| r.status).collect();
    // Five scripted failures, then the batch goes through: no storm.
    assert_eq!(outcomes.len(), 6, "{outcomes:?}");
    assert_eq!(outcomes[..3], [500, 503, 429]);
    assert_eq!(outcomes[5], 200);
    // Retry-After: 1 is honoured before the next attempt.
    let gap = requests[3].at - requests[2].at;
    assert!(gap >= chrono::Duration::milliseconds(990), "429 gap {gap}");
    // Each retry waits: the attempts are spread out, not back to back.
    for pair in requests.windows(2) {
        assert!(
            pair[1].at - pair[0].at >= chrono::Duration::milliseconds(5),
            "{:?}",
            outcomes
        );
    }
    assert!(
        st["retries"].as_i64().unwrap() >= 5 * 10,
        "every failed attempt of every event counted: {st}"
    );
    assert!(st["last_error"].is_string());
    server.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn a_poison_event_dies_alone_and_the_rest_are_delivered(db: &Path) {
    let mock = mock().await;
    mock.state().set_faults(Faults {
        poison_event_name: Some("Poison".into()),
        poison_status: 400,
        ..Faults::default()
    });
    let server = start(settings(db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let mut events: Vec<Value> = (0..41)
        .map(|i| track(&format!("user-{i}"), "Fine", i))
        .collect();
    events[17] = track("user-17", "Poison", 17);
    let (s, _) = post(&base, "/v1/batch", &json!({ "batch": events })).await;
    assert_eq!(s, 200);
    let st = wait_status(&base, "delivered", 40).await;
    let st = if st["dead"] == json!(1) {
        st
    } else {
        wait_status(&base, "dead", 1).await
    };
    assert_eq!(st["delivered"], json!(40));
    let delivered: Vec<String> = mock
        .state()
        .actions()
        .iter()
        .map(|a| a["eventName"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(delivered.len(), 40);
    assert!(delivered.iter().all(|n| n == "Fine"));
    let dead: Value = client()
        .get(format!("{base}/admin/dead"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let reason = dead["dead"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("400"), "reason names the status: {reason}");
    assert_eq!(dead["dead"][0]["event"]["event"], json!("Poison"));
    // Splitting by halves: far fewer requests than one per event.
    assert!(
        mock.state().request_count() < 20,
        "{}",
        mock.state().request_count()
    );
    server.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn per_user_order_holds_with_forty_percent_failures(db: &Path) {
    let mock = mock().await;
    mock.state().set_faults(Faults {
        fail_rate: 0.4,
        fail_status: 503,
        ..Faults::default()
    });
    let mut cfg = settings(db, &mock.url());
    cfg.workers = 4;
    cfg.batch_size = 7;
    cfg.retry_initial = Duration::from_millis(20);
    cfg.retry_max = Duration::from_millis(200);
    let server = start(cfg).await;
    let base = format!("http://{}", server.addr);
    let users = ["alice", "bob", "carol", "dave"];
    let per_user = 30;
    // Interleaved identify and track calls, one request each, users mixed.
    let mut sends = Vec::new();
    for n in 0..per_user {
        for u in users {
            let call = if n % 3 == 0 {
                (
                    "/v1/identify",
                    json!({"userId": u, "traits": {"accountExternalId": "acct", "seq": n}}),
                )
            } else {
                ("/v1/track", track(u, "Step", n))
            };
            sends.push(call);
        }
    }
    for (path, body) in &sends {
        let (s, v) = post(&base, path, body).await;
        assert_eq!(s, 200, "{v}");
    }
    let total = (users.len() * per_user) as i64;
    let st = wait_status(&base, "delivered", total).await;
    assert_eq!(st["dead"], json!(0));
    let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
    for a in mock.state().actions() {
        let user = a["contactExternalId"].as_str().unwrap().to_string();
        let seq = match a["action"].as_str().unwrap() {
            "setAttribute" => a["attr_seq"].as_i64().unwrap(),
            _ => a["description"]
                .as_str()
                .unwrap()
                .rsplit('#')
                .next()
                .unwrap()
                .parse()
                .unwrap(),
        };
        seen.entry(user).or_default().push(seq);
    }
    for u in users {
        let got = &seen[u];
        assert_eq!(
            got,
            &(0..per_user as i64).collect::<Vec<_>>(),
            "{u} in acceptance order"
        );
    }
    let failed = mock
        .state()
        .requests()
        .iter()
        .filter(|r| r.status == 503)
        .count();
    assert!(failed > 0, "the fault injection really failed requests");
    server.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn message_ids_are_remembered_across_a_restart(db: &Path) {
    let mock = mock().await;
    let event = json!({"userId": "u-1", "event": "Once", "messageId": "msg-restart-1",
        "context": {"traits": {"accountExternalId": "a", "contactExternalId": "u-1"}}});
    let mut first = Binary::serve(db, &mock.url(), &[]).await;
    let (s, _) = post(&first.base, "/v1/track", &event).await;
    assert_eq!(s, 200);
    wait_status(&first.base, "delivered", 1).await;
    first.kill9();
    let second = Binary::serve(db, &mock.url(), &[]).await;
    let (s, v) = post(&second.base, "/v1/track", &event).await;
    assert_eq!(
        (s, v),
        (200, json!({"success": true})),
        "a repeat is acknowledged"
    );
    let st = status(&second.base).await;
    assert_eq!(st["accepted"], json!(1));
    assert_eq!(st["duplicates"], json!(1));
    // Give delivery a chance to (wrongly) send it again, then check.
    let other = json!({"userId": "u-1", "event": "After", "messageId": "msg-restart-2",
        "context": {"traits": {"accountExternalId": "a", "contactExternalId": "u-1"}}});
    post(&second.base, "/v1/track", &other).await;
    wait_status(&second.base, "delivered", 2).await;
    let names: Vec<Value> = mock
        .state()
        .actions()
        .iter()
        .map(|a| a["eventName"].clone())
        .collect();
    assert_eq!(names, vec![json!("Once"), json!("After")]);
}
}
