//! The audience sync lane over real sockets: a real server on a real SQLite
//! file, Engage audience identifies in, the mock ChurnZero out, with a short
//! `--sync-interval`.

mod common;

use churnzero_forwarder::mock_churnzero::{MockState, RecordedRequest, ScriptedAnswer};
use common::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// An identify as Segment Engage sends it when `user` enters (`true`) or
/// leaves (`false`) the audience `key`.
fn audience(user: &str, key: &str, member: bool) -> Value {
    json!({"type": "identify", "userId": user,
           "traits": {key: member},
           "context": {"personas": {"computation_class": "audience", "computation_key": key,
                                    "computation_id": format!("aud_{key}"), "space_id": "spa_1"}}})
}

async fn batch(base: &str, events: Vec<Value>) {
    let (code, body) = post(base, "/v1/batch", &json!({ "batch": events })).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.get("rejected").is_none(), "{body}");
}

/// Whether an action carries an audience attribute (anything the tests use
/// as a computation key).
fn is_audience_action(a: &Value) -> bool {
    a.as_object().is_some_and(|m| {
        m.keys()
            .any(|k| k == "attr_power_users" || k == "attr_churn_risk")
    })
}

fn audience_actions(mock: &MockState) -> Vec<Value> {
    mock.actions()
        .into_iter()
        .filter(is_audience_action)
        .collect()
}

fn audience_requests(mock: &MockState) -> Vec<RecordedRequest> {
    mock.requests()
        .into_iter()
        .filter(|r| r.actions.iter().any(is_audience_action))
        .collect()
}

/// Waits until the `/status` sync block satisfies `check`.
async fn wait_sync(base: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, WAIT, || async {
        let s = status(base).await;
        check(&s["sync"]).then_some(s)
    })
    .await
}

fn contact_action<'a>(actions: &'a [Value], contact: &str) -> Vec<&'a Value> {
    actions
        .iter()
        .filter(|a| a["contactExternalId"] == contact)
        .collect()
}

on_both_backends! {
#[tokio::test]
async fn window_merges_per_contact_and_sends_only_changes(db: &Path) {
    let mock = mock().await;
    let mut s = settings(db, &mock.url());
    s.sync_interval = Duration::from_millis(300);
    let server = start(s).await;
    let base = format!("http://{}", server.addr);
    let state = mock.state();

    // Window 1: three updates for u1 (power_users flips back), one for u2,
    // all in one commit so they land in the same window.
    batch(
        &base,
        vec![
            identify("u1", "acct-1"),
            identify("u2", "acct-1"),
            audience("u1", "power_users", true),
            audience("u1", "churn_risk", true),
            audience("u1", "power_users", false),
            audience("u2", "power_users", true),
        ],
    )
    .await;
    let st = wait_sync(&base, "first window", |s| {
        s["last_run_sent"] == 3 && s["pending_contacts"] == 0
    })
    .await;
    assert_eq!(st["sync"]["last_run_skipped"], 0, "{st}");
    let sent = audience_actions(&state);
    assert_eq!(sent.len(), 2, "one setAttribute per contact: {sent:?}");
    let u1 = contact_action(&sent, "u1");
    assert_eq!(
        *u1[0],
        json!({"appKey": APP_KEY, "action": "setAttribute", "accountExternalId": "acct-1",
               "contactExternalId": "u1", "entity": "contact",
               "attr_churn_risk": true, "attr_power_users": false})
    );
    let u2 = contact_action(&sent, "u2");
    assert_eq!(u2[0]["attr_power_users"], true);
    assert_eq!(u2[0]["accountExternalId"], "acct-1");
    assert!(u2[0].get("attr_churn_risk").is_none());

    // Window 2: Engage repeats the same memberships: nothing is sent.
    batch(
        &base,
        vec![
            audience("u1", "power_users", false),
            audience("u1", "churn_risk", true),
            audience("u2", "power_users", true),
        ],
    )
    .await;
    let st = wait_sync(&base, "the repeat window", |s| {
        s["last_run_skipped"] == 3 && s["pending_contacts"] == 0
    })
    .await;
    assert_eq!(st["sync"]["last_run_sent"], 0, "{st}");
    assert_eq!(
        audience_actions(&state).len(),
        2,
        "unchanged values re-sent"
    );

    // Window 3: u1 joins power_users again; the rest is unchanged.
    batch(
        &base,
        vec![
            audience("u1", "power_users", true),
            audience("u1", "churn_risk", true),
            audience("u2", "power_users", true),
        ],
    )
    .await;
    let st = wait_sync(&base, "the change window", |s| {
        s["last_run_sent"] == 1 && s["last_run_skipped"] == 2 && s["pending_contacts"] == 0
    })
    .await;
    let sent = audience_actions(&state);
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(
        sent[2],
        json!({"appKey": APP_KEY, "action": "setAttribute", "accountExternalId": "acct-1",
               "contactExternalId": "u1", "entity": "contact", "attr_power_users": true}),
        "only the changed attribute is sent"
    );

    // The status block: times are RFC 3339, the next run one interval on.
    let sync = &st["sync"];
    let last = chrono::DateTime::parse_from_rfc3339(sync["last_run_at"].as_str().unwrap()).unwrap();
    let next = chrono::DateTime::parse_from_rfc3339(sync["next_run_at"].as_str().unwrap()).unwrap();
    assert!(next > last, "{sync}");

    let metrics = metrics_text(&base).await;
    for name in [
        "sync_actions_sent_total",
        "sync_values_sent_total",
        "sync_values_skipped_total",
        "sync_runs_total",
        "sync_pending_contacts",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    server.shutdown().await;
    mock.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn realtime_track_is_delivered_while_audience_updates_wait(db: &Path) {
    let mock = mock().await;
    let mut s = settings(db, &mock.url());
    s.sync_interval = Duration::from_secs(3600);
    let server = start(s).await;
    let base = format!("http://{}", server.addr);
    let state = mock.state();

    batch(
        &base,
        vec![
            identify("u1", "acct-1"),
            audience("u1", "power_users", true),
            track("u1", "Logged In", 1),
        ],
    )
    .await;
    wait_status(&base, "delivered", 3).await;
    let tracks: Vec<Value> = state
        .actions()
        .into_iter()
        .filter(|a| a["action"] == "trackEvent")
        .collect();
    assert_eq!(tracks.len(), 1);
    assert_eq!(tracks[0]["eventName"], "Logged In");
    assert!(audience_actions(&state).is_empty(), "audience sent early");

    let st = status(&base).await;
    let sync = &st["sync"];
    assert_eq!(sync["pending_contacts"], 1, "{st}");
    assert!(sync["last_run_at"].is_null(), "{st}");
    let next = chrono::DateTime::parse_from_rfc3339(sync["next_run_at"].as_str().unwrap()).unwrap();
    let ahead = next.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(
        ahead > chrono::Duration::minutes(50),
        "first window one interval after start: {sync}"
    );
    server.shutdown().await;

    // A restart keeps the planned time instead of postponing it.
    let mut s = settings(db, &mock.url());
    s.sync_interval = Duration::from_secs(3600);
    let server = start(s).await;
    let base = format!("http://{}", server.addr);
    let again = status(&base).await;
    assert_eq!(again["sync"]["next_run_at"], sync["next_run_at"]);
    assert_eq!(again["sync"]["pending_contacts"], 1);
    server.shutdown().await;
    mock.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn pacing_spreads_a_large_window_and_late_updates_wait_for_the_next(db: &Path) {
    let mock = mock().await;
    let mut s = settings(db, &mock.url());
    s.sync_interval = Duration::from_millis(300);
    // 120 a minute: requests of 2 actions, one action per 500 ms.
    s.sync_max_per_minute = 120;
    let per_action = chrono::Duration::milliseconds(500);
    let server = start(s).await;
    let base = format!("http://{}", server.addr);
    let state = mock.state();

    let users: Vec<String> = (1..=7).map(|i| format!("a{i}")).collect();
    let mut events: Vec<Value> = users.iter().map(|u| identify(u, "acct-9")).collect();
    events.extend(users[..5].iter().map(|u| audience(u, "power_users", true)));
    batch(&base, events).await;

    // While the first window is still sending, a1 (already sent) changes
    // and a6, a7 join: all of that belongs to the next window.
    wait_for("the first sync request", WAIT, || async {
        (!audience_requests(&state).is_empty()).then_some(())
    })
    .await;
    batch(
        &base,
        vec![
            audience("a1", "power_users", false),
            audience("a6", "power_users", true),
            audience("a7", "power_users", true),
        ],
    )
    .await;
    let st = wait_sync(&base, "both windows", |s| {
        s["pending_contacts"] == 0 && s["last_run_sent"] == 3
    })
    .await;
    assert_eq!(st["sync"]["last_run_skipped"], 0);

    let sent = audience_actions(&state);
    let order: Vec<(String, bool)> = sent
        .iter()
        .map(|a| {
            (
                a["contactExternalId"].as_str().unwrap().to_string(),
                a["attr_power_users"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(order.len(), 8, "{order:?}");
    let first: Vec<&str> = order[..5].iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(first, ["a1", "a2", "a3", "a4", "a5"]);
    assert!(order[..5].iter().all(|(_, v)| *v));
    let mut second = order[5..].to_vec();
    second.sort();
    assert_eq!(
        second,
        [
            ("a1".to_string(), false),
            ("a6".to_string(), true),
            ("a7".to_string(), true)
        ]
    );

    // Pacing, from the mock's own receive times: no request above one
    // second's share of the rate, and each request waits for the actions of
    // the one before it (a little slack for network jitter).
    let requests = audience_requests(&state);
    assert!(requests.len() >= 5, "{} requests", requests.len());
    for r in &requests {
        assert!(
            r.actions.len() <= 2,
            "{} actions in one request",
            r.actions.len()
        );
    }
    let slack = chrono::Duration::milliseconds(100);
    for pair in requests.windows(2) {
        let gap = pair[1].at - pair[0].at;
        let owed = per_action * pair[0].actions.len() as i32;
        assert!(
            gap >= owed - slack,
            "requests {gap:?} apart after {} actions",
            pair[0].actions.len()
        );
    }
    let span = requests.last().unwrap().at - requests[0].at;
    let before_last: i32 = requests[..requests.len() - 1]
        .iter()
        .map(|r| r.actions.len() as i32)
        .sum();
    assert!(span >= per_action * before_last - slack, "span {span:?}");
    server.shutdown().await;
    mock.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn failed_sync_request_is_retried_and_unresolved_users_stay_pending(db: &Path) {
    let mock = mock().await;
    let mut s = settings(db, &mock.url());
    s.sync_interval = Duration::from_millis(300);
    let server = start(s).await;
    let base = format!("http://{}", server.addr);
    let state = mock.state();

    batch(&base, vec![identify("u1", "acct-1")]).await;
    wait_status(&base, "delivered", 1).await;
    state.push_script([ScriptedAnswer::Status(503)]);
    // u1 is known; ghost has never been identified with an account.
    batch(
        &base,
        vec![
            audience("u1", "power_users", true),
            json!({"type": "identify", "anonymousId": "ghost", "traits": {"churn_risk": true},
                   "context": {"personas": {"computation_class": "audience",
                                            "computation_key": "churn_risk"}}}),
        ],
    )
    .await;
    let st = wait_sync(&base, "the retried window", |s| s["last_run_sent"] == 1).await;
    let tries = audience_requests(&state);
    assert_eq!(tries.len(), 2, "{tries:?}");
    assert_eq!(tries[0].status, 503);
    assert_eq!(tries[1].status, 200);
    assert_eq!(tries[0].actions, tries[1].actions);
    assert!(
        st["last_error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("sync lane: HTTP 503"),
        "{st}"
    );
    // The unresolved user waits, counted, through later windows.
    let before = status(&base).await["sync"]["next_run_at"].clone();
    wait_sync(&base, "a later window", |s| s["next_run_at"] != before).await;
    let st = status(&base).await;
    assert_eq!(st["sync"]["pending_contacts"], 1, "{st}");
    assert_eq!(audience_actions(&state).len(), 1);

    // Once ghost's account is known (an identify with its ids), it goes out.
    batch(
        &base,
        vec![json!({"type": "identify", "anonymousId": "ghost",
                    "traits": {"accountExternalId": "acct-2", "contactExternalId": "c-ghost"}})],
    )
    .await;
    wait_sync(&base, "ghost synced", |s| s["pending_contacts"] == 0).await;
    let sent = audience_actions(&state);
    let ghost = contact_action(&sent, "c-ghost");
    assert_eq!(ghost.len(), 1, "{sent:?}");
    assert_eq!(ghost[0]["accountExternalId"], "acct-2");
    assert_eq!(ghost[0]["attr_churn_risk"], true);
    server.shutdown().await;
    mock.shutdown().await;
}
}
