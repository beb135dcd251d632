//! The Segment HTTP API surface over real sockets: auth in all its forms,
//! limits, gzip, validation, mixed batches, integrations and deduplication.
//! Every refusal must store nothing; checked through `/status`.

mod common;

use base64::Engine;
use common::*;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;

struct Env {
    _dir: Option<tempfile::TempDir>,
    _mock: churnzero_forwarder::mock_churnzero::MockChurnZero,
    server: Option<churnzero_forwarder::server::Server>,
    base: String,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut env = env_on(&dir.path().join("o.db")).await;
    env._dir = Some(dir);
    env
}

/// A forwarder on the outbox `db` names.
async fn env_on(db: &Path) -> Env {
    let mock = mock().await;
    let server = start(settings(db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    Env {
        _dir: None,
        _mock: mock,
        server: Some(server),
        base,
    }
}

impl Env {
    async fn accepted(&self) -> i64 {
        status(&self.base).await["accepted"].as_i64().unwrap()
    }
    async fn stop(mut self) {
        self.server.take().unwrap().shutdown().await;
    }
}

async fn raw(
    base: &str,
    path: &str,
    auth: Option<&str>,
    body: Vec<u8>,
    gzip: bool,
) -> (u16, Value) {
    let mut req = client()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if gzip {
        req = req.header("content-encoding", "gzip");
    }
    let r = req.body(body).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn basic(user_pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_pass)
    )
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test]
async fn write_key_auth_forms() {
    let env = env().await;
    let body = serde_json::to_vec(&json!({"userId": "u1", "event": "E"})).unwrap();
    let (s, v) = raw(&env.base, "/v1/track", None, body.clone(), false).await;
    assert_eq!(s, 401, "no key: {v}");
    assert_eq!(v["success"], json!(false));
    assert!(v["error"].as_str().unwrap().contains("write key"));
    let (s, _) = raw(
        &env.base,
        "/v1/track",
        Some(&basic("wrong:")),
        body.clone(),
        false,
    )
    .await;
    assert_eq!(s, 401, "wrong key");
    let (s, _) = raw(
        &env.base,
        "/v1/track",
        Some("Bearer test-write-key"),
        body.clone(),
        false,
    )
    .await;
    assert_eq!(s, 401, "wrong scheme");
    assert_eq!(env.accepted().await, 0, "refusals store nothing");

    let (s, v) = raw(
        &env.base,
        "/v1/track",
        Some(&basic(&format!("{WRITE_KEY}:"))),
        body.clone(),
        false,
    )
    .await;
    assert_eq!((s, v), (200, json!({"success": true})), "Basic with colon");
    let (s, _) = raw(
        &env.base,
        "/v1/track",
        Some(&basic(WRITE_KEY)),
        body.clone(),
        false,
    )
    .await;
    assert_eq!(s, 200, "Basic without colon");
    let with_key =
        serde_json::to_vec(&json!({"userId": "u1", "event": "E", "writeKey": WRITE_KEY})).unwrap();
    let (s, _) = raw(&env.base, "/v1/track", None, with_key, false).await;
    assert_eq!(s, 200, "writeKey in the body");
    let wrong_in_body =
        serde_json::to_vec(&json!({"userId": "u1", "event": "E", "writeKey": "nope"})).unwrap();
    let (s, _) = raw(&env.base, "/v1/track", None, wrong_in_body, false).await;
    assert_eq!(s, 401, "wrong writeKey in the body");
    assert_eq!(env.accepted().await, 3);
    env.stop().await;
}

#[tokio::test]
async fn every_endpoint_accepts_its_call() {
    let env = env().await;
    let calls = [
        (
            "/v1/identify",
            json!({"userId": "u1", "traits": {"email": "a@b.c"}}),
        ),
        ("/v1/track", json!({"userId": "u1", "event": "E"})),
        ("/v1/page", json!({"userId": "u1", "name": "Home"})),
        ("/v1/screen", json!({"anonymousId": "a1", "name": "Home"})),
        ("/v1/group", json!({"userId": "u1", "groupId": "g1"})),
        ("/v1/alias", json!({"userId": "u1", "previousId": "a1"})),
        (
            "/v1/batch",
            json!({"batch": [{"type": "track", "userId": "u1", "event": "E"}]}),
        ),
        (
            "/v1/import",
            json!({"batch": [{"type": "track", "userId": "u1", "event": "E"}]}),
        ),
    ];
    for (path, body) in calls {
        let (s, v) = post(&env.base, path, &body).await;
        assert_eq!(s, 200, "{path}: {v}");
    }
    assert_eq!(env.accepted().await, 8);
    let (s, v) = post(&env.base, "/v1/nonsense", &json!({"userId": "u"})).await;
    assert_eq!(s, 404);
    assert!(
        v["error"].as_str().unwrap().contains("unknown endpoint"),
        "{v}"
    );
    let r = client()
        .get(format!("{}/v1/track", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("GET is not allowed"),
        "{v}"
    );
    let r = client()
        .get(format!("{}/nowhere", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["success"], json!(false), "{v}");
    env.stop().await;
}

#[tokio::test]
async fn validation_refuses_with_reasons_and_stores_nothing() {
    let env = env().await;
    let cases = [
        ("/v1/track", json!({"userId": "u1"}), "event"),
        ("/v1/track", json!({"event": "E"}), "userId"),
        ("/v1/group", json!({"userId": "u1"}), "groupId"),
        ("/v1/alias", json!({"userId": "u1"}), "previousId"),
        (
            "/v1/batch",
            json!({"batch": [{"type": "bogus", "userId": "u"}]}),
            "unknown event type",
        ),
        ("/v1/batch", json!({"batch": {"type": "track"}}), "array"),
        (
            "/v1/track",
            json!([{"userId": "u1", "event": "E"}]),
            "object",
        ),
        // A timestamp that is no date does not refuse the event (kept with
        // receivedAt): tests/segment_spec.rs.
    ];
    for (path, body, reason) in cases {
        let (s, v) = post(&env.base, path, &body).await;
        assert_eq!(s, 400, "{path} {body}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains(reason) || v.to_string().contains(reason),
            "{v} should name {reason}"
        );
    }
    let (s, v) = raw(
        &env.base,
        "/v1/track",
        Some(&basic(WRITE_KEY)),
        b"{not json".to_vec(),
        false,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("JSON"));
    assert_eq!(env.accepted().await, 0);
    env.stop().await;
}

on_both_backends! {
#[tokio::test]
async fn mixed_batch_stores_the_valid_events_and_lists_the_rest(db: &Path) {
    let env = env_on(db).await;
    let batch = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "ok 0"},
        {"type": "track", "userId": "u1"},
        {"type": "identify", "userId": "u1"},
        {"type": "nope", "userId": "u1"},
        {"type": "group", "userId": "u1", "groupId": "g"},
    ]});
    let (s, v) = post(&env.base, "/v1/batch", &batch).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["success"], json!(true));
    let rejected = v["rejected"].as_array().unwrap();
    let indexes: Vec<i64> = rejected
        .iter()
        .map(|r| r["index"].as_i64().unwrap())
        .collect();
    assert_eq!(indexes, vec![1, 3]);
    assert!(rejected[0]["error"].as_str().unwrap().contains("event"));
    assert_eq!(env.accepted().await, 3);
    env.stop().await;
}
}

#[tokio::test]
async fn limits_hold_on_the_decompressed_size() {
    let env = env().await;
    // One event over 32 KB.
    let big = json!({"userId": "u1", "event": "E", "properties": {"blob": "x".repeat(40 * 1024)}});
    let (s, v) = post(&env.base, "/v1/track", &big).await;
    assert!(s == 413 || s == 400, "{s} {v}");
    assert!(v["error"].as_str().unwrap().contains("limit"));
    // A request over 500 KB.
    let events: Vec<Value> = (0..40)
        .map(|i| json!({"type": "track", "userId": "u1", "event": format!("E{i}"), "properties": {"p": "y".repeat(15 * 1024)}}))
        .collect();
    let (s, v) = post(&env.base, "/v1/batch", &json!({ "batch": events })).await;
    assert_eq!(s, 413, "{v}");
    // More than 2,500 events.
    let events: Vec<Value> = (0..2600)
        .map(|_| json!({"type": "track", "userId": "u", "event": "E"}))
        .collect();
    let (s, v) = post(&env.base, "/v1/batch", &json!({ "batch": events })).await;
    assert!(s == 413 || s == 400, "{s} {v}");
    assert!(v["error"].as_str().unwrap().contains("2500"));
    // A gzip body that inflates past 500 KB although it is tiny on the wire.
    let inflated = serde_json::to_vec(
        &json!({"userId": "u1", "event": "E", "properties": {"p": "z".repeat(2_000_000)}}),
    )
    .unwrap();
    let bomb = gz(&inflated);
    assert!(bomb.len() < 20_000);
    let (s, v) = raw(&env.base, "/v1/track", Some(&basic(WRITE_KEY)), bomb, true).await;
    assert_eq!(s, 413, "{v}");
    assert_eq!(env.accepted().await, 0, "nothing over a limit is stored");
    env.stop().await;
}

#[tokio::test]
async fn gzip_bodies_are_accepted_and_broken_gzip_refused() {
    let env = env().await;
    let body = serde_json::to_vec(&json!({"batch": [
        {"type": "track", "userId": "u1", "event": "zipped 1"},
        {"type": "track", "userId": "u1", "event": "zipped 2"}]}))
    .unwrap();
    let (s, v) = raw(
        &env.base,
        "/v1/batch",
        Some(&basic(WRITE_KEY)),
        gz(&body),
        true,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = raw(
        &env.base,
        "/v1/batch",
        Some(&basic(WRITE_KEY)),
        b"\x1f\x8bnot really".to_vec(),
        true,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("gzip"));
    assert_eq!(env.accepted().await, 2);
    env.stop().await;
}

on_both_backends! {
#[tokio::test]
async fn integrations_off_is_acknowledged_but_not_forwarded(db: &Path) {
    let mock = mock().await;
    let server = start(settings(db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let mut off = track("u1", "Hidden", 1);
    off["integrations"] = json!({"All": false});
    let mut on = track("u1", "Shown", 2);
    on["integrations"] = json!({"All": false, "ChurnZero": true});
    let (s, _) = post(&base, "/v1/batch", &json!({"batch": [off, on]})).await;
    assert_eq!(s, 200);
    let st = wait_status(&base, "delivered", 1).await;
    assert_eq!(st["filtered"], json!(1));
    let names: Vec<Value> = mock
        .state()
        .actions()
        .iter()
        .map(|a| a["eventName"].clone())
        .collect();
    assert_eq!(names, vec![json!("Shown")]);
    server.shutdown().await;
}

/// A batch's `integrations` are merged into each event key by key, the
/// event's own keys winning (Segment's rule), not applied only to events
/// without their own: an event naming another destination under a batch's
/// `{"All": false}` is still filtered.
#[tokio::test]
async fn batch_integrations_merge_key_by_key_with_the_events_own(db: &Path) {
    let mock = mock().await;
    let server = start(settings(db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let with = |name: &str, n: usize, integrations: Option<Value>| {
        let mut e = track("u1", name, n);
        if let Some(i) = integrations {
            e["integrations"] = i;
        }
        e
    };
    let batch = json!({
        "integrations": {"All": false},
        "batch": [
            with("Other Destination", 1, Some(json!({"Mixpanel": true}))),
            with("No Own", 2, None),
            with("Names ChurnZero", 3, Some(json!({"ChurnZero": true}))),
            with("All On", 4, Some(json!({"All": true}))),
            with("Empty Own", 5, Some(json!({}))),
        ],
    });
    let (s, v) = post(&base, "/v1/batch", &batch).await;
    assert_eq!(s, 200, "{v}");
    // Settled: each of the five delivered or filtered.
    let st = wait_for(
        "the batch to settle",
        std::time::Duration::from_secs(30),
        || {
            let base = base.clone();
            async move {
                let st = status(&base).await;
                let settled = st["delivered"].as_i64()? + st["filtered"].as_i64()?;
                (settled == 5).then_some(st)
            }
        },
    )
    .await;
    // Filtered events are acknowledged but not stored.
    assert_eq!(
        (&st["filtered"], &st["accepted"], &st["pending"]),
        (&json!(3), &json!(2), &json!(0))
    );
    let names: Vec<Value> = mock
        .state()
        .actions()
        .iter()
        .map(|a| a["eventName"].clone())
        .collect();
    assert_eq!(names, vec![json!("Names ChurnZero"), json!("All On")]);
    server.shutdown().await;
}

/// Repeats inside one batch, around a filtered event: each message id is
/// stored once, as its first occurrence, and the repeats and the filtered
/// event are counted as what they are. (The store matches every event of a
/// group with its first occurrence and with what the table knew of it: a
/// slip of one position would store the wrong copy or count a repeat as
/// stored.)
#[tokio::test]
async fn repeats_within_one_batch_keep_the_first_occurrence(db: &Path) {
    let mock = mock().await;
    let server = start(settings(db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let mut first = track("u1", "First", 1);
    first["messageId"] = json!("m-1");
    let mut off = track("u1", "Hidden", 2);
    off["messageId"] = json!("m-off");
    off["integrations"] = json!({"All": false});
    let mut repeat = track("u1", "Repeat", 3);
    repeat["messageId"] = json!("m-1");
    let mut second = track("u2", "Second", 4);
    second["messageId"] = json!("m-2");
    let mut off_again = track("u1", "Hidden again", 5);
    off_again["messageId"] = json!("m-off");
    let batch = json!({"batch": [first, off, repeat, second, off_again]});
    let (s, _) = post(&base, "/v1/batch", &batch).await;
    assert_eq!(s, 200);
    let st = wait_status(&base, "delivered", 2).await;
    assert_eq!(
        (&st["accepted"], &st["filtered"], &st["duplicates"]),
        (&json!(2), &json!(1), &json!(2)),
        "{st}"
    );
    // A later request repeating one of them is a duplicate as well.
    let (s, _) = post(&base, "/v1/batch", &json!({"batch": [second]})).await;
    assert_eq!(s, 200);
    assert_eq!(status(&base).await["duplicates"], json!(3));
    let mut names: Vec<String> = mock
        .state()
        .actions()
        .iter()
        .map(|a| a["eventName"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["First", "Second"]);
    server.shutdown().await;
}

#[tokio::test]
async fn repeated_message_id_is_acknowledged_once(db: &Path) {
    let env = env_on(db).await;
    let e = json!({"userId": "u1", "event": "E", "messageId": "m-1"});
    for _ in 0..3 {
        let (s, _) = post(&env.base, "/v1/track", &e).await;
        assert_eq!(s, 200);
    }
    let st = status(&env.base).await;
    assert_eq!(st["accepted"], json!(1));
    assert_eq!(st["duplicates"], json!(2));
    env.stop().await;
}
}
