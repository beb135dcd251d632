//! What Segment accepts, the forwarder accepts: the example payloads of
//! Segment's own spec pages (segment-docs `src/connections/spec/` and the
//! HTTP API page), sent as written there, and the date forms Segment's
//! libraries write. Also `context.groupId`, the account of any call in
//! Segment's common fields, with the B2B SaaS spec's own examples.

mod clients_support;
mod common;

use churnzero_forwarder::secret::Secret;
use clients_support::stored_events;
use common::*;
use serde_json::{Value, json};
use std::time::Duration;

async fn post_as(base: &str, key: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .basic_auth(key, Some(""))
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The "complete example" of each call's spec page, verbatim. Each is sent
/// with its own write key: they share one messageId, which would otherwise
/// make all but the first duplicates.
fn spec_examples() -> Vec<(&'static str, Value)> {
    vec![
        (
            "identify",
            json!({
              "anonymousId": "507f191e810c19729de860ea",
              "channel": "browser",
              "context": {
                "ip": "8.8.8.8",
                "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_5) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/40.0.2214.115 Safari/537.36"
              },
              "integrations": {"All": false, "Mixpanel": true, "Salesforce": true},
              "messageId": "022bb90c-bbac-11e4-8dfc-aa07a5b093db",
              "receivedAt": "2015-02-23T22:28:55.387Z",
              "sentAt": "2015-02-23T22:28:55.111Z",
              "timestamp": "2015-02-23T22:28:55.111Z",
              "traits": {
                "name": "Peter Gibbons", "email": "peter@example.com", "plan": "premium", "logins": 5,
                "address": {"street": "6th St", "city": "San Francisco", "state": "CA", "postalCode": "94103", "country": "USA"}
              },
              "type": "identify",
              "userId": "97980cfea0067",
              "version": "1.1"
            }),
        ),
        (
            "track",
            json!({
              "anonymousId": "23adfd82-aa0f-45a7-a756-24f2a7a4c895",
              "context": {
                "library": {"name": "analytics.js", "version": "2.11.1"},
                "page": {"path": "/academy/", "referrer": "", "search": "", "title": "Analytics Academy", "url": "https://segment.com/academy/"},
                "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_11_0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/46.0.2490.86 Safari/537.36",
                "ip": "108.0.78.21"
              },
              "event": "Course Clicked",
              "integrations": {},
              "messageId": "ajs-f8ca1e4de5024d9430b3928bd8ac6b96",
              "properties": {"title": "Intro to Analytics"},
              "receivedAt": "2015-12-12T19:11:01.266Z",
              "sentAt": "2015-12-12T19:11:01.169Z",
              "timestamp": "2015-12-12T19:11:01.249Z",
              "type": "track",
              "userId": "AiUGstSDIg",
              "originalTimestamp": "2015-12-12T19:11:01.152Z"
            }),
        ),
        (
            "page",
            json!({
              "anonymousId": "507f191e810c19729de860ea",
              "channel": "browser",
              "context": {
                "ip": "8.8.8.8",
                "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_5) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/40.0.2214.115 Safari/537.36"
              },
              "integrations": {"All": true, "Mixpanel": false, "Salesforce": false},
              "messageId": "022bb90c-bbac-11e4-8dfc-aa07a5b093db",
              "name": "Home",
              "properties": {"title": "Welcome | Initech", "url": "http://www.example.com"},
              "receivedAt": "2015-02-23T22:28:55.387Z",
              "sentAt": "2015-02-23T22:28:55.111Z",
              "timestamp": "2015-02-23T22:28:55.111Z",
              "type": "page",
              "userId": "97980cfea0067",
              "version": "1.1"
            }),
        ),
        (
            "screen",
            json!({
              "anonymousId": "3a12eab0-bca7-11e4-8dfc-aa07a5b093db",
              "channel": "mobile",
              "context": {"ip": "8.8.8.8"},
              "integrations": {"All": true, "Mixpanel": false, "Salesforce": false},
              "messageId": "022bb90c-bbac-11e4-8dfc-aa07a5b093db",
              "name": "Home",
              "properties": {"variation": "blue signup button"},
              "receivedAt": "2015-02-23T22:28:55.387Z",
              "sentAt": "2015-02-23T22:28:55.111Z",
              "timestamp": "2015-02-23T22:28:55.111Z",
              "type": "screen",
              "userId": "97980cfea0067",
              "version": "1.1"
            }),
        ),
        (
            "group",
            json!({
              "anonymousId": "507f191e810c19729de860ea",
              "channel": "browser",
              "context": {
                "ip": "8.8.8.8",
                "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_5) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/40.0.2214.115 Safari/537.36"
              },
              "integrations": {"All": true, "Mixpanel": false, "Salesforce": false},
              "messageId": "022bb90c-bbac-11e4-8dfc-aa07a5b093db",
              "receivedAt": "2015-02-23T22:28:55.387Z",
              "sentAt": "2015-02-23T22:28:55.111Z",
              "timestamp": "2015-02-23T22:28:55.111Z",
              "traits": {"name": "Initech", "industry": "Technology", "employees": 329, "plan": "enterprise", "total billed": 830},
              "type": "group",
              "userId": "97980cfea0067",
              "groupId": "0e8c78ea9d97a7b8185e8632",
              "version": "1.1"
            }),
        ),
        (
            "alias",
            json!({
              "anonymousId": "507f191e810c19729de860ea",
              "channel": "browser",
              "context": {
                "ip": "8.8.8.8",
                "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_5) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/40.0.2214.115 Safari/537.36"
              },
              "integrations": {"All": true, "Mixpanel": false, "Salesforce": false},
              "messageId": "022bb90c-bbac-11e4-8dfc-aa07a5b093db",
              "previousId": "39239-239239-239239-23923",
              "receivedAt": "2015-02-23T22:28:55.387Z",
              "sentAt": "2015-02-23T22:28:55.111Z",
              "timestamp": "2015-02-23T22:28:55.111Z",
              "type": "alias",
              "userId": "507f191e81",
              "version": "1.1"
            }),
        ),
    ]
}

/// The sample batch of the HTTP API page, as written there (its one-digit
/// month included), authenticated by its own body `writeKey`.
fn sample_batch() -> Value {
    json!({
      "batch": [
        {"type": "identify", "userId": "019mr8mf4r",
         "traits": {"email": "jake@yahoo.com", "name": "Jake Peterson", "age": 26},
         "timestamp": "2012-12-02T00:30:08.276Z"},
        {"type": "track", "userId": "019mr8mf4r", "event": "Song Played",
         "properties": {"name": "Fallin for You", "artist": "Dierks Bentley"},
         "timestamp": "2012-12-02T00:30:12.984Z"},
        {"type": "identify", "userId": "971mj8mk7p",
         "traits": {"email": "cindy@example.com", "name": "Cindy Gonzalez", "age": 23},
         "timestamp": "2015-2-02T00:30:08.276Z"},
        {"type": "track", "userId": "971mj8mk7p", "event": "Song Played",
         "properties": {"name": "Get Right", "artist": "Jennifer Lopez"},
         "timestamp": "2015-2-02T00:30:12.984Z"}
      ],
      "writeKey": "YOUR_WRITE_KEY",
      "context": {"device": {"type": "phone", "name": "Apple iPhone 6"}}
    })
}

#[tokio::test]
async fn spec_examples_and_the_sample_batch_are_accepted_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let mut s = settings(&db, &mock.url());
    let examples = spec_examples();
    s.write_keys = examples
        .iter()
        .map(|(call, _)| Secret::new(format!("key-{call}")))
        .chain([Secret::new("YOUR_WRITE_KEY")])
        .collect();
    let server = start(s).await;
    let base = format!("http://{}", server.addr);

    for (call, body) in &examples {
        let (code, answer) =
            post_as(&base, &format!("key-{call}"), &format!("/v1/{call}"), body).await;
        assert_eq!((code, &answer), (200, &json!({"success": true})), "{call}");
    }
    // The batch carries its key in the body only.
    let r = client()
        .post(format!("{base}/v1/batch"))
        .json(&sample_batch())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"success": true}),
        "no event rejected"
    );

    // identify says {"All": false}: acknowledged, filtered, not stored.
    let st = wait_status(&base, "accepted", 9).await;
    assert_eq!(st["filtered"], 1, "{st}");
    let stored = stored_events(&db).await;
    let stamps: Vec<(&str, &str)> = stored
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["timestamp"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        stamps,
        [
            ("track", "2015-12-12T19:11:01.249Z"),
            ("page", "2015-02-23T22:28:55.111Z"),
            ("screen", "2015-02-23T22:28:55.111Z"),
            ("group", "2015-02-23T22:28:55.111Z"),
            ("alias", "2015-02-23T22:28:55.111Z"),
            ("identify", "2012-12-02T00:30:08.276Z"),
            ("track", "2012-12-02T00:30:12.984Z"),
            ("identify", "2015-02-02T00:30:08.276Z"),
            ("track", "2015-02-02T00:30:12.984Z"),
        ]
    );
    // The batch's context reached each of its events.
    assert!(
        stored[5..]
            .iter()
            .all(|e| e["context"]["device"]["name"] == "Apple iPhone 6")
    );
    server.shutdown().await;
    mock.shutdown().await;
}

#[tokio::test]
async fn every_date_form_is_read_and_a_non_date_costs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let server = start(settings(&db, &mock.url())).await;
    let base = format!("http://{}", server.addr);
    let ids = json!({"accountExternalId": "acct-d", "contactExternalId": "c-d"});
    let forms = [
        ("2026-11-28", "2026-11-28T00:00:00.000Z"),
        ("2026-11-28T19:36:24.1+0530", "2026-11-28T14:06:24.100Z"),
        ("2015-2-02T00:30:08.276Z", "2015-02-02T00:30:08.276Z"),
        ("2026-11-28 19:36:24", "2026-11-28T19:36:24.000Z"),
        ("2026-11-28T19:36:24-08:00", "2026-11-29T03:36:24.000Z"),
    ];
    let mut batch: Vec<Value> = forms
        .iter()
        .enumerate()
        .map(|(n, (text, _))| {
            json!({"type": "track", "userId": "u-d", "event": format!("Dated {n}"),
                   "timestamp": text, "properties": ids})
        })
        .collect();
    // originalTimestamp and sentAt in those forms too (the clock-skew rule
    // then applies, so only acceptance is checked for this one).
    batch.push(
        json!({"type": "track", "userId": "u-d", "event": "Skewed", "properties": ids,
        "originalTimestamp": "2026-11-28T19:36:24.1+0530"}),
    );
    let body = json!({"batch": batch, "sentAt": "2026-11-28T19:36:25.1+0530"});
    let (code, answer) = post(&base, "/v1/batch", &body).await;
    assert_eq!((code, answer), (200, json!({"success": true})));

    // Not a date: the event is kept, with receivedAt, its value kept.
    let (code, answer) = post(
        &base,
        "/v1/track",
        &json!({"userId": "u-d", "event": "Undated",
        "timestamp": "yesterday", "properties": ids}),
    )
    .await;
    assert_eq!((code, answer), (200, json!({"success": true})));

    // Six-digit years are no dates either (they once overflowed the
    // clock-skew rule): kept, with receivedAt.
    let (code, answer) = post(
        &base,
        "/v1/track",
        &json!({"userId": "u-d", "event": "Far Apart",
        "originalTimestamp": "-262000-01-01T00:00:00", "sentAt": "+262000-01-01T00:00:00",
        "properties": ids}),
    )
    .await;
    assert_eq!((code, answer), (200, json!({"success": true})));

    let st = wait_status(&base, "delivered", 8).await;
    let undated = st["recent_errors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["error"]
                .as_str()
                .unwrap_or("")
                .contains("`timestamp` is not a date")
        })
        .unwrap_or_else(|| panic!("noted in recent_errors: {st}"));
    assert_eq!(undated["outcome"], "kept");
    assert_eq!(undated["events"], 1);
    assert!(
        !undated["error"].as_str().unwrap().contains("yesterday"),
        "the value is not shown"
    );
    let metrics = metrics_text(&base).await;
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("churnzero_forwarder_events_undated_total{field=\"timestamp\"} 1")),
        "{metrics}"
    );

    let actions = mock.state().actions();
    for (n, (_, expected)) in forms.iter().enumerate() {
        let a = actions
            .iter()
            .find(|a| a["eventName"] == format!("Dated {n}"))
            .unwrap();
        assert_eq!(a["eventDate"], *expected, "{a}");
    }
    let stored = stored_events(&db).await;
    let undated = stored.iter().find(|e| e["event"] == "Undated").unwrap();
    assert_eq!(undated["invalidTimestamp"], "yesterday");
    assert_eq!(undated["timestamp"], undated["receivedAt"]);
    let sent = actions
        .iter()
        .find(|a| a["eventName"] == "Undated")
        .unwrap();
    assert_eq!(sent["eventDate"], undated["receivedAt"]);
    let far = stored.iter().find(|e| e["event"] == "Far Apart").unwrap();
    assert_eq!(far["timestamp"], far["receivedAt"]);
    assert_eq!(far["originalTimestamp"], "-262000-01-01T00:00:00");
    server.shutdown().await;
    mock.shutdown().await;
}

/// The B2B SaaS spec's events, as written there: each names its account
/// in `context.groupId`. An unrelated group call first teaches the
/// identity map another account for the same user; the events must still
/// go to their own account.
fn b2b_examples() -> Vec<Value> {
    let ctx = json!({"groupId": "acct_123"});
    let ev = |event: &str, properties: Value| {
        json!({"userId": "019mr8mf4r", "action": "track", "event": event,
               "properties": properties, "context": ctx})
    };
    vec![
        ev("Account Created", json!({"account_name": "Initech"})),
        ev("Account Deleted", json!({"account_name": "Initech"})),
        ev(
            "Signed Up",
            json!({"type": "organic", "first_name": "Peter", "last_name": "Gibbons",
            "email": "pgibbons@initech.com", "phone": "410-555-9412", "username": "pgibbons", "title": "Mr"}),
        ),
        ev("Signed In", json!({"username": "pgibbons"})),
        ev("Signed Out", json!({"username": "pgibbons"})),
        ev(
            "Invite Sent",
            json!({"invitee_email": "pgibbons@gmail.com", "invitee_first_name": "Peter",
            "invitee_last_name": "Gibbons", "invitee_role": "Owner"}),
        ),
        ev("Account Added User", json!({"role": "Owner"})),
        ev("Account Removed User", json!({})),
        ev(
            "Trial Started",
            json!({"trial_start_date": "2018-08-28T04:09:47Z",
            "trial_end_date": "2018-09-20T04:09:47Z", "trial_plan_name": "Business"}),
        ),
        ev(
            "Trial Ended",
            json!({"trial_start_date": "2018-08-28T04:09:47Z",
            "trial_end_date": "2018-09-20T04:09:47Z", "trial_plan_name": "Business"}),
        ),
    ]
}

#[tokio::test]
async fn context_group_id_is_the_account_ahead_of_the_identity_map() {
    let dir = tempfile::tempdir().unwrap();
    let mock = mock().await;
    let server = start(settings(&dir.path().join("o.db"), &mock.url())).await;
    let base = format!("http://{}", server.addr);

    // The identity map learns contact 019mr8mf4r and an unrelated account.
    let (code, _) = post(
        &base,
        "/v1/identify",
        &json!({"userId": "019mr8mf4r",
        "traits": {"email": "pgibbons@initech.com", "accountExternalId": "acct_unrelated"}}),
    )
    .await;
    assert_eq!(code, 200);
    wait_status(&base, "delivered", 1).await;

    let examples = b2b_examples();
    for e in &examples {
        let (code, answer) = post(&base, "/v1/track", e).await;
        assert_eq!((code, answer), (200, json!({"success": true})), "{e}");
    }
    wait_status(&base, "delivered", 1 + examples.len() as i64).await;
    let tracks: Vec<(String, String, String)> = mock
        .state()
        .actions()
        .iter()
        .filter(|a| a["action"] == "trackEvent")
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap().to_string();
            (
                s("eventName"),
                s("accountExternalId"),
                s("contactExternalId"),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = examples
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                "acct_123".into(),
                "019mr8mf4r".into(),
            )
        })
        .collect();
    assert_eq!(tracks, expected);

    // The contact keeps today's rules: unknown contact, held.
    let mut stranger = examples[3].clone();
    stranger["userId"] = json!("nobody-yet");
    let (code, _) = post(&base, "/v1/track", &stranger).await;
    assert_eq!(code, 200);
    let st = wait_status(&base, "held", 1).await;
    assert_eq!(st["delivered"], 1 + examples.len() as i64);
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown().await;
    mock.shutdown().await;
}
