//! How a backlog drains: each claim leases up to eight requests' worth of
//! due events (`8 x --batch-size`), which one worker sends as consecutive
//! requests of at most `--batch-size` actions. Fewer, larger claims share
//! the outbox's per-claim and per-settle costs (statements, a commit and
//! its fsync each) between more events; `--workers` still bounds the
//! requests in flight. Proved on the real binary (its own process, so its
//! claim counters start at zero) on both backends.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

on_both_backends! {
/// 2,000 events of 10 users (200 each), ingested with delivery off and then
/// drained. A claim takes a user's waiting events together, so each claim
/// takes whole users: at four requests' worth a claim (the rule before, 400
/// events) at most two, and the backlog took at least five claims. At eight
/// (800) a claim takes up to four users: three claims (800 + 800 + 400)
/// when they follow one another, four when two claim loops (PostgreSQL)
/// race for the same users' locks and one of them wins only a few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_in_claims_of_eight_requests_worth(db: &Path) {
    let mock = mock().await;
    let mut ingest = Binary::serve(db, &mock.url(), &["--no-delivery"]).await;
    let mut order: HashMap<String, Vec<usize>> = HashMap::new();
    for round in 0..20 {
        let events: Vec<Value> = (0..100)
            .map(|i| {
                let n = round * 100 + i;
                track(&format!("u-{}", n % 10), "Exported", n)
            })
            .collect();
        let (s, body) = post(&ingest.base, "/v1/batch", &json!({ "batch": events })).await;
        assert_eq!(s, 200, "{body}");
    }
    wait_status(&ingest.base, "pending", 2000).await;
    ingest.sigterm();
    wait_for("the ingest-only server to exit", Duration::from_secs(30), || {
        let exited = ingest.child.try_wait().unwrap().is_some();
        async move { exited.then_some(()) }
    })
    .await;

    let server = Binary::serve(db, &mock.url(), &["--batch-size", "100"]).await;
    wait_status(&server.base, "delivered", 2000).await;
    let claims = metric(&server.base, "delivery_claims_total").await;
    let claimed = metric(&server.base, "delivery_claimed_events_total").await;
    assert_eq!(claimed, 2000.0, "every event leased once");
    assert!(
        (3.0..=4.0).contains(&claims),
        "{claims} claims for 2,000 due events of 10 users: a claim takes up to 800 (8 x 100)"
    );

    // What ChurnZero saw: requests of at most --batch-size actions, each
    // user's events in the order they were accepted.
    let requests = mock.state().requests();
    assert!(requests.iter().all(|r| r.actions.len() <= 100));
    let actions = mock.state().actions();
    assert_eq!(actions.len(), 2000);
    for a in &actions {
        let user = a["contactExternalId"].as_str().unwrap().to_string();
        let n: usize = a["description"]
            .as_str()
            .and_then(|d| d.rsplit_once(" #"))
            .and_then(|(_, n)| n.parse().ok())
            .unwrap_or_else(|| panic!("an action with its number: {a}"));
        order.entry(user).or_default().push(n);
    }
    for (user, seen) in &order {
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(seen, &sorted, "{user}'s events out of order");
    }
}
}
