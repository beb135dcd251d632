//! Identity resolution end to end: events whose ChurnZero ids are not known
//! yet are held, released by the identify (or alias) that teaches the ids,
//! and dead with reason `unresolved identity` once the retry budget is spent.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;

fn tracks(actions: &[Value]) -> Vec<&Value> {
    actions
        .iter()
        .filter(|a| a["action"] == "trackEvent")
        .collect()
}

/// A track that carries no ids of its own.
fn bare_track(key: &str, value: &str, event: &str) -> Value {
    json!({"type": "track", key: value, "event": event,
           "properties": {"description": event}})
}

on_both_backends! {
#[tokio::test]
async fn held_track_is_released_by_a_later_identify(db: &Path) {
    let mock = mock().await;
    let server = start(settings(db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let state = mock.state();

    let (code, _) = post(
        &base,
        "/v1/track",
        &bare_track("userId", "u9", "Opened App"),
    )
    .await;
    assert_eq!(code, 200);
    let st = wait_status(&base, "held", 1).await;
    assert_eq!(st["pending"], 0, "{st}");
    assert_eq!(state.request_count(), 0, "nothing can be sent without ids");

    let (code, _) = post(&base, "/v1/identify", &identify("u9", "acct-9")).await;
    assert_eq!(code, 200);
    let st = wait_status(&base, "delivered", 2).await;
    assert_eq!(st["held"], 0, "{st}");
    let actions = state.actions();
    // The held track goes first: it was accepted before the identify.
    assert_eq!(actions[0]["action"], "trackEvent", "{actions:?}");
    assert_eq!(actions[0]["eventName"], "Opened App");
    assert_eq!(actions[0]["accountExternalId"], "acct-9");
    assert_eq!(actions[0]["contactExternalId"], "u9");
    assert_eq!(actions[1]["action"], "setAttribute");
    assert_eq!(actions[1]["attr_Email"], "u9@example.com");
    server.shutdown().await;
    mock.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn alias_gives_anonymous_events_the_known_users_ids(db: &Path) {
    let mock = mock().await;
    let server = start(settings(db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let state = mock.state();

    // u7 is known; anon-7 browses before signing in.
    post(&base, "/v1/identify", &identify("u7", "acct-7")).await;
    wait_status(&base, "delivered", 1).await;
    for event in ["Viewed Pricing", "Started Trial"] {
        let (code, _) = post(
            &base,
            "/v1/track",
            &bare_track("anonymousId", "anon-7", event),
        )
        .await;
        assert_eq!(code, 200);
    }
    // The first waits for ids, the second queues behind it (order): both
    // wait for the identity.
    let st = wait_status(&base, "held", 2).await;
    assert_eq!(
        (&st["pending"], &st["held_queued"]),
        (&json!(0), &json!(1)),
        "{st}"
    );

    let alias = json!({"type": "alias", "userId": "u7", "previousId": "anon-7"});
    let (code, _) = post(&base, "/v1/alias", &alias).await;
    assert_eq!(code, 200);
    let st = wait_status(&base, "delivered", 4).await;
    assert_eq!(st["held"], 0, "{st}");
    let actions = state.actions();
    let t = tracks(&actions);
    let names: Vec<&str> = t.iter().map(|a| a["eventName"].as_str().unwrap()).collect();
    assert_eq!(names, ["Viewed Pricing", "Started Trial"]);
    for a in t {
        assert_eq!(a["accountExternalId"], "acct-7");
        assert_eq!(a["contactExternalId"], "u7");
    }
    server.shutdown().await;
    mock.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn unresolved_identity_goes_dead_after_the_retry_budget(db: &Path) {
    let mock = mock().await;
    let mut s = settings(db, &mock.url());
    s.retry_budget = Duration::from_millis(500);
    let server = start(s).await;
    let base = format!("http://{}", server.addr);

    let (code, _) = post(
        &base,
        "/v1/track",
        &bare_track("userId", "stranger", "Clicked"),
    )
    .await;
    assert_eq!(code, 200);
    wait_status(&base, "held", 1).await;
    // Maintenance (every few seconds) expires held events past the budget.
    let st = wait_status(&base, "dead", 1).await;
    assert_eq!(st["held"], 0, "{st}");
    let dead: Value = client()
        .get(format!("{base}/admin/dead"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = dead["dead"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{dead}");
    assert_eq!(items[0]["reason"], "unresolved identity");
    assert_eq!(items[0]["order_key"], "stranger");
    assert_eq!(items[0]["event"]["event"], "Clicked");
    assert_eq!(mock.state().request_count(), 0);
    server.shutdown().await;
    mock.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn alias_before_identify_links_the_ids_once_they_are_known(db: &Path) {
    let mock = mock().await;
    let server = start(settings(db, &mock.url())).await;
    let base = format!("http://{}", server.addr);

    // Segment's signup order: anonymous events, alias, and only then the
    // identify that carries the account.
    let (code, _) = post(
        &base,
        "/v1/track",
        &bare_track("anonymousId", "anon-9", "Viewed Pricing"),
    )
    .await;
    assert_eq!(code, 200);
    wait_status(&base, "held", 1).await;
    let alias = json!({"type": "alias", "userId": "u9", "previousId": "anon-9"});
    assert_eq!(post(&base, "/v1/alias", &alias).await.0, 200);
    // Neither side has ids yet: the track keeps waiting.
    let st = wait_status(&base, "delivered", 1).await;
    assert_eq!(st["held"], 1, "{st}");

    post(&base, "/v1/identify", &identify("u9", "acct-9")).await;
    let st = wait_status(&base, "delivered", 3).await;
    assert_eq!(st["held"], 0, "{st}");
    let actions = mock.state().actions();
    let t = tracks(&actions);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0]["eventName"], "Viewed Pricing");
    assert_eq!(t[0]["accountExternalId"], "acct-9");
    assert_eq!(t[0]["contactExternalId"], "u9");
    server.shutdown().await;
    mock.shutdown().await;
}
}

on_both_backends! {
/// A resent identify is a duplicate, and a duplicate teaches the identity
/// map nothing, whatever ids it carries: not when its first copy was
/// stored by an earlier request, and not when the first copy is earlier in
/// the same batch. (The store must match each event with its own first
/// occurrence; a repeat taken for fresh would move the user to another
/// account here.)
#[tokio::test]
async fn a_repeated_identify_teaches_the_identity_map_nothing(db: &Path) {
    let mock = mock().await;
    let server = start(settings(db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let with_id = |user: &str, account: &str, id: &str| {
        let mut e = identify(user, account);
        e["messageId"] = json!(id);
        e
    };

    let (code, _) = post(&base, "/v1/identify", &with_id("u9", "acct-9", "id-9")).await;
    assert_eq!(code, 200);
    wait_status(&base, "delivered", 1).await;

    let batch = json!({"batch": [
        with_id("u9", "acct-moved", "id-9"),
        with_id("u8", "acct-8", "id-8"),
        with_id("u8", "acct-moved", "id-8"),
        bare_track("userId", "u9", "Nine"),
        bare_track("userId", "u8", "Eight"),
    ]});
    let (code, _) = post(&base, "/v1/batch", &batch).await;
    assert_eq!(code, 200);
    let st = wait_status(&base, "delivered", 4).await;
    assert_eq!((&st["duplicates"], &st["held"]), (&json!(2), &json!(0)), "{st}");
    let actions = mock.state().actions();
    let account_of = |name: &str| {
        tracks(&actions)
            .iter()
            .find(|a| a["eventName"] == name)
            .map(|a| a["accountExternalId"].clone())
    };
    assert_eq!(account_of("Nine"), Some(json!("acct-9")), "{actions:?}");
    assert_eq!(account_of("Eight"), Some(json!("acct-8")), "{actions:?}");
    server.shutdown().await;
    mock.shutdown().await;
}
}
