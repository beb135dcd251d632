//! The operator HTTP surface over real sockets: `/status` figures after a
//! known scenario, the dead-letter admin API with and without the token
//! (and with none configured), and replay end to end through the normal
//! delivery path once ChurnZero recovers.

mod common;

use churnzero_forwarder::config::Settings;
use churnzero_forwarder::mock_churnzero::{Faults, MockChurnZero};
use churnzero_forwarder::server::Server;
use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

struct Env {
    _dir: Option<tempfile::TempDir>,
    mock: MockChurnZero,
    server: Option<Server>,
    base: String,
}

async fn env_with(tune: impl FnOnce(&mut Settings)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut env = env_on(&dir.path().join("o.db"), tune).await;
    env._dir = Some(dir);
    env
}

/// A server on the outbox `db` names, its settings tuned by `tune`.
async fn env_on(db: &Path, tune: impl FnOnce(&mut Settings)) -> Env {
    let mock = mock().await;
    let mut s = settings(db, &mock.url());
    tune(&mut s);
    let server = start(s).await;
    let base = format!("http://{}", server.addr);
    Env {
        _dir: None,
        mock,
        server: Some(server),
        base,
    }
}

impl Env {
    async fn stop(mut self) {
        self.server.take().unwrap().shutdown().await;
        self.mock.shutdown().await;
    }
}

/// GETs an admin read with the admin token.
async fn get(base: &str, path: &str) -> (u16, Value) {
    let (code, body, _) = get_as(base, path, Some(&bearer())).await;
    (code, body)
}

/// GETs with the given Authorization header (or none): status, JSON body
/// and WWW-Authenticate.
async fn get_as(base: &str, path: &str, auth: Option<&str>) -> (u16, Value, Option<String>) {
    let mut req = client().get(format!("{base}{path}"));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let v = r.json().await.unwrap_or(Value::Null);
    assert!(
        ct.starts_with("application/json"),
        "GET {path} answered {code} with {ct}, not JSON"
    );
    (code, v, www)
}

/// POSTs a raw body to an admin endpoint: (status, JSON body, WWW-Authenticate).
async fn admin(
    base: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, Value, Option<String>) {
    let mut req = client()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (code, r.json().await.unwrap_or(Value::Null), www)
}

fn bearer() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

fn dead_ids(list: &Value) -> Vec<i64> {
    list["dead"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect()
}

on_both_backends! {
#[tokio::test]
async fn status_reports_a_known_scenario(db: &Path) {
    let env = env_on(db, |_| {}).await;
    poison_mock(&env.mock);
    let sc = operator_scenario(&env.base).await;
    let s = status(&env.base).await;

    for (field, want) in [
        ("accepted", sc.accepted),
        ("delivered", sc.delivered),
        ("dead", sc.dead),
        ("held", sc.held),
        ("pending", sc.pending),
        ("in_flight", 0),
        ("filtered", sc.filtered),
        ("duplicates", sc.duplicates),
        ("retries", 0),
    ] {
        assert_eq!(s[field].as_i64(), Some(want), "{field} in {s}");
    }
    // The two queued behind the held event wait for it: held, not
    // pending, and no pending age grows for them.
    assert_eq!(s["held_queued"], 2, "{s}");
    assert_eq!(s["oldest_pending_age_seconds"], 0.0, "{s}");
    assert!(s["oldest_held_age_seconds"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["last_delivery_at"].as_str().is_some(), "{s}");
    assert!(
        s["last_error"]
            .as_str()
            .unwrap()
            .starts_with("rejected by ChurnZero"),
        "{s}"
    );
    assert!(s["last_error_at"].as_str().is_some(), "{s}");

    // The last hour: 60 minutes, oldest first, ending with the current one.
    let minutes = s["per_minute"].as_array().unwrap();
    assert_eq!(minutes.len(), 60);
    let first =
        chrono::DateTime::parse_from_rfc3339(minutes[0]["minute"].as_str().unwrap()).unwrap();
    let last =
        chrono::DateTime::parse_from_rfc3339(minutes[59]["minute"].as_str().unwrap()).unwrap();
    assert_eq!((last - first).num_minutes(), 59);
    let sum = |k: &str| minutes.iter().map(|m| m[k].as_i64().unwrap()).sum::<i64>();
    assert_eq!(sum("accepted"), sc.accepted);
    assert_eq!(sum("delivered"), sc.delivered);
    assert_eq!(sum("failed"), sc.dead);

    // Both poison events died of the same error: one merged entry.
    let errors = s["recent_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{s}");
    assert_eq!(errors[0]["outcome"], "dead");
    assert_eq!(errors[0]["events"], 2);
    assert!(errors[0]["error"].as_str().unwrap().contains("400"), "{s}");
    assert!(errors[0]["at"].as_str().is_some() && errors[0]["first_at"].as_str().is_some());

    // The sync block is always there.
    assert!(s["sync"]["pending_contacts"].is_i64(), "{s}");
    assert!(s.to_string().find(APP_KEY).is_none());
    env.stop().await;
}
}

on_both_backends! {
#[tokio::test]
async fn recent_errors_record_retries_and_merge_runs(db: &Path) {
    let env = env_on(db, |_| {}).await;
    env.mock.state().set_faults(Faults {
        fail_rate: 1.0,
        fail_status: 503,
        ..Default::default()
    });
    let (code, _) = post(&env.base, "/v1/track", &track("u1", "Retried", 1)).await;
    assert_eq!(code, 200);
    let s = wait_for("two failed attempts", Duration::from_secs(30), || async {
        let s = status(&env.base).await;
        (s["retries"].as_i64().unwrap_or(0) >= 2).then_some(s)
    })
    .await;
    let errors = s["recent_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "a run of one error is one entry: {s}");
    assert_eq!(errors[0]["outcome"], "retry");
    assert!(errors[0]["events"].as_i64().unwrap() >= 2, "{s}");
    assert!(errors[0]["error"].as_str().unwrap().contains("503"), "{s}");

    env.mock.state().set_faults(Faults::default());
    wait_status(&env.base, "delivered", 1).await;
    let s = status(&env.base).await;
    assert!(
        s["per_minute"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["failed"].as_i64().unwrap())
            .sum::<i64>()
            >= 2
    );
    env.stop().await;
}
}

on_both_backends! {
#[tokio::test]
async fn admin_reads_need_the_token_and_answer_json_errors(db: &Path) {
    let env = env_on(db, |_| {}).await;
    poison_mock(&env.mock);
    operator_scenario(&env.base).await;

    // Dead letters are personal data: no token, another scheme or a wrong
    // token is a 401, and the answer carries none of it.
    for path in ["/admin/dead", "/admin/dead?limit=1", "/admin/dead/1"] {
        for auth in [
            None,
            Some("Bearer wrong-token".to_string()),
            Some(format!("Basic {ADMIN_TOKEN}")),
            Some(format!("Bearer {ADMIN_TOKEN}x")),
        ] {
            let (code, body, www) = get_as(&env.base, path, auth.as_deref()).await;
            assert_eq!(code, 401, "{path} with {auth:?}: {body}");
            assert!(www.unwrap().starts_with("Bearer"), "{path}");
            let text = body.to_string();
            assert!(
                !text.contains("u-poison") && !text.contains(POISON),
                "{text}"
            );
        }
    }

    let (code, list) = get(&env.base, "/admin/dead").await;
    assert_eq!(code, 200);
    let ids = dead_ids(&list);
    assert_eq!(ids.len(), 2);
    assert!(list["next_after"].is_null());
    let d = &list["dead"][0];
    assert_eq!(d["kind"], "track");
    assert_eq!(d["order_key"], "u-poison");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .starts_with("rejected by ChurnZero")
    );
    assert_eq!(d["event"]["event"], POISON);
    assert_eq!(d["attempts"], 1);

    // Paging and filters. The last page says there is no next one, also
    // when it is exactly full.
    let (_, page) = get(&env.base, "/admin/dead?limit=1").await;
    assert_eq!(dead_ids(&page), vec![ids[0]]);
    assert_eq!(page["next_after"], ids[0]);
    let (_, page) = get(&env.base, &format!("/admin/dead?limit=1&after={}", ids[0])).await;
    assert_eq!(dead_ids(&page), vec![ids[1]]);
    assert!(page["next_after"].is_null(), "last page: {page}");
    let (_, page) = get(&env.base, "/admin/dead?limit=2").await;
    assert_eq!(dead_ids(&page), ids);
    assert!(
        page["next_after"].is_null(),
        "exactly full last page: {page}"
    );
    let (_, none) = get(&env.base, "/admin/dead?reason=no-such-reason").await;
    assert!(dead_ids(&none).is_empty());
    let (_, some) = get(&env.base, "/admin/dead?reason=REJECTED").await;
    assert_eq!(dead_ids(&some).len(), 2);
    let (_, future) = get(&env.base, "/admin/dead?since=2999-01-01T00:00:00Z").await;
    assert!(dead_ids(&future).is_empty());

    let (code, one) = get(&env.base, &format!("/admin/dead/{}", ids[1])).await;
    assert_eq!(code, 200);
    assert_eq!(one["id"], ids[1]);
    assert!(one["history"].as_array().unwrap().len() == 1, "{one}");

    for (path, want) in [
        ("/admin/dead/999999", 404),
        ("/admin/dead/abc", 400),
        ("/admin/dead?limit=0", 400),
        ("/admin/dead?since=yesterday", 400),
        ("/admin/dead?bogus=1", 400),
    ] {
        let (code, body) = get(&env.base, path).await;
        assert_eq!(code, want, "{path}: {body}");
        assert!(body["error"].as_str().is_some(), "{path}: {body}");
    }
    env.stop().await;
}
}

on_both_backends! {
#[tokio::test]
async fn admin_mutations_need_the_bearer_token(db: &Path) {
    let env = env_on(db, |_| {}).await;
    poison_mock(&env.mock);
    operator_scenario(&env.base).await;
    let (_, list) = get(&env.base, "/admin/dead").await;
    let ids = dead_ids(&list);
    let one = json!({ "ids": [ids[0]] }).to_string();

    for path in ["/admin/dead/replay", "/admin/dead/purge"] {
        let (code, body, www) = admin(&env.base, path, None, &one).await;
        assert_eq!(code, 401, "{path}: {body}");
        assert!(body["error"].as_str().unwrap().contains("missing"));
        assert!(www.unwrap().starts_with("Bearer"));
        for wrong in [
            "Bearer wrong-token".to_string(),
            format!("Bearer {ADMIN_TOKEN}x"),
            format!("Basic {ADMIN_TOKEN}"),
            ADMIN_TOKEN.to_string(),
        ] {
            let (code, body, _) = admin(&env.base, path, Some(&wrong), &one).await;
            assert_eq!(code, 401, "{path} with {wrong}: {body}");
            assert!(!body.to_string().contains(ADMIN_TOKEN));
        }
    }
    // Nothing changed.
    assert_eq!(status(&env.base).await["dead"], 2);

    // With the token: bad selections are 400/404 and change nothing.
    for (body, want) in [
        ("", 400),
        ("{not json", 400),
        ("{}", 400),
        (r#"{"ids": [1], "all": true}"#, 400),
        (r#"{"all": true, "since": "2020-01-01T00:00:00Z"}"#, 400),
        (r#"{"since": "not a time"}"#, 400),
        (r#"{"idz": [1]}"#, 400),
        (r#"{"ids": [999999]}"#, 404),
    ] {
        let (code, resp, _) = admin(&env.base, "/admin/dead/replay", Some(&bearer()), body).await;
        assert_eq!(code, want, "{body}: {resp}");
        assert!(resp["error"].as_str().is_some(), "{body}: {resp}");
    }
    let mixed = json!({ "ids": [ids[0], 999999] }).to_string();
    let (code, resp, _) = admin(&env.base, "/admin/dead/purge", Some(&bearer()), &mixed).await;
    assert_eq!(code, 404, "{resp}");
    assert!(resp["error"].as_str().unwrap().contains("999999"));
    assert_eq!(status(&env.base).await["dead"], 2);

    // Purge one by id (scheme is case-insensitive), then the rest by range.
    let (code, resp, _) = admin(
        &env.base,
        "/admin/dead/purge",
        Some(&format!("bearer {ADMIN_TOKEN}")),
        &one,
    )
    .await;
    assert_eq!((code, resp["purged"].as_i64()), (200, Some(1)), "{resp}");
    assert_eq!(status(&env.base).await["dead"], 1);
    let (_, left) = get(&env.base, "/admin/dead").await;
    assert_eq!(dead_ids(&left), vec![ids[1]]);
    let range = json!({ "since": "2000-01-01T00:00:00Z", "until": "2999-01-01T00:00:00Z" });
    let (code, resp, _) = admin(
        &env.base,
        "/admin/dead/purge",
        Some(&bearer()),
        &range.to_string(),
    )
    .await;
    assert_eq!((code, resp["purged"].as_i64()), (200, Some(1)), "{resp}");
    let s = status(&env.base).await;
    assert_eq!(s["dead"], 0);
    // Purging dead letters does not touch what was delivered or waits.
    assert_eq!(s["delivered"], 6);
    assert_eq!(s["held"], 3);
    env.stop().await;
}
}

#[tokio::test]
async fn admin_mutations_are_refused_without_a_configured_token() {
    let env = env_with(|s| s.admin_token = None).await;
    poison_mock(&env.mock);
    operator_scenario(&env.base).await;
    for path in ["/admin/dead/replay", "/admin/dead/purge"] {
        for auth in [None, Some(bearer()), Some("Bearer ".to_string())] {
            let (code, body, _) = admin(&env.base, path, auth.as_deref(), r#"{"all": true}"#).await;
            assert_eq!(code, 403, "{path}: {body}");
            assert!(body["error"].as_str().unwrap().contains("--admin-token"));
        }
    }
    // Reads of dead letters are off too (they are personal data); the
    // counts stay open.
    for path in ["/admin/dead", "/admin/dead/1"] {
        for auth in [None, Some(bearer())] {
            let (code, body, _) = get_as(&env.base, path, auth.as_deref()).await;
            assert_eq!(code, 403, "{path}: {body}");
            assert!(body["error"].as_str().unwrap().contains("--admin-token"));
            assert!(!body.to_string().contains("u-poison"));
        }
    }
    assert_eq!(status(&env.base).await["dead"], 2);
    env.stop().await;
}

on_both_backends! {
#[tokio::test]
async fn replayed_events_are_delivered_after_churnzero_recovers(db: &Path) {
    // ChurnZero is down long enough for two events of one user to exhaust
    // their retry budget; once it is back, a replay delivers them through the
    // normal path, in order, with the payload they were accepted with.
    let env = env_on(db, |s| s.retry_budget = Duration::from_millis(300)).await;
    env.mock.state().set_faults(Faults {
        fail_rate: 1.0,
        fail_status: 503,
        ..Default::default()
    });
    for n in 1..=2 {
        let (code, _) = post(&env.base, "/v1/track", &track("u-replay", "Outage", n)).await;
        assert_eq!(code, 200);
    }
    let s = wait_status(&env.base, "dead", 2).await;
    assert_eq!(s["delivered"], 0);
    let (_, list) = get(&env.base, "/admin/dead").await;
    let ids = dead_ids(&list);
    for d in list["dead"].as_array().unwrap() {
        assert!(
            d["reason"]
                .as_str()
                .unwrap()
                .starts_with("retry budget exhausted"),
            "{d}"
        );
        assert_eq!(d["order_key"], "u-replay");
    }
    let stored_events: Vec<Value> = list["dead"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["event"].clone())
        .collect();
    let attempts_before = env.mock.state().request_count();
    assert!(attempts_before >= 2);

    env.mock.state().set_faults(Faults::default());
    env.mock.state().reset();
    let (code, resp, _) = admin(
        &env.base,
        "/admin/dead/replay",
        Some(&bearer()),
        &json!({ "ids": ids }).to_string(),
    )
    .await;
    assert_eq!((code, resp["replayed"].as_i64()), (200, Some(2)), "{resp}");
    let s = wait_status(&env.base, "delivered", 2).await;
    assert_eq!(s["dead"], 0);
    assert_eq!(s["pending"], 0);
    assert_eq!(s["accepted"], 2, "a replay is not a new acceptance: {s}");

    let actions = env.mock.state().actions();
    assert_eq!(actions.len(), 2, "{actions:?}");
    for (n, (action, event)) in actions.iter().zip(&stored_events).enumerate() {
        assert_eq!(action["eventName"], "Outage");
        assert_eq!(
            action["description"],
            format!("Outage #{}", n + 1),
            "order kept"
        );
        assert_eq!(action["contactExternalId"], "u-replay");
        // The payload is the one accepted: same eventDate as stored.
        assert_eq!(
            action["eventDate"], event["timestamp"],
            "{action} vs {event}"
        );
    }
    // Replaying again finds nothing dead.
    let (code, _, _) = admin(
        &env.base,
        "/admin/dead/replay",
        Some(&bearer()),
        &json!({ "ids": ids }).to_string(),
    )
    .await;
    assert_eq!(code, 404);
    env.stop().await;
}
}

on_both_backends! {
#[tokio::test]
async fn held_events_that_expire_are_dead_and_listed_among_recent_errors(db: &Path) {
    // Ids never arrive: after the budget the maintenance pass (every 5 s)
    // makes the held event dead, and operators see why.
    let env = env_on(db, |s| s.retry_budget = Duration::from_millis(200)).await;
    let (code, _) = post(
        &env.base,
        "/v1/track",
        &json!({"type": "track", "userId": "stranger", "event": "Unknown"}),
    )
    .await;
    assert_eq!(code, 200);
    // The hold itself can last less than a poll (a maintenance pass may
    // come right after it), so it is proved by the dead letter's reason
    // below, not by catching `held == 1` in between.
    let s = wait_status(&env.base, "dead", 1).await;
    assert_eq!(s["held"], 0);
    assert_eq!(s["oldest_held_age_seconds"], 0.0);
    let errors = s["recent_errors"].as_array().unwrap();
    assert_eq!(errors[0]["error"], "unresolved identity", "{s}");
    assert_eq!(errors[0]["outcome"], "dead");
    assert_eq!(errors[0]["events"], 1);
    let (_, list) = get(&env.base, "/admin/dead?reason=unresolved").await;
    assert_eq!(list["dead"][0]["order_key"], "stranger");
    env.stop().await;
}
}
