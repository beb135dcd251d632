//! Delivery under races, through the real binary and a slow or scripted mock
//! ChurnZero: an identify that lands while a claim is in flight still
//! releases the user's track; an event sends the same bytes on every attempt
//! (retry, restart with another mapping, replay) whatever the identity map
//! learns meanwhile; and a worker never outlives its lease waiting at a
//! closed gate. Each race is forced (latency, scripted answers, a pause
//! longer than the lease), never left to luck.

mod common;

use churnzero_forwarder::mock_churnzero::{Faults, MockState, ScriptedAnswer};
use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `serve` with exactly these flags (on top of the required ones), so
/// a test can pick retry and timeout settings the shared helper fixes.
async fn serve(db: &Path, churnzero_url: &str, flags: &[&str], env: &[(&str, &str)]) -> Binary {
    let port = free_port();
    let log = log_path(db, port.into());
    let logfile = std::fs::File::create(&log).unwrap();
    let child = Command::new(binary_path())
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--database")
        .arg(db)
        .args(["--write-key", WRITE_KEY])
        .args(["--churnzero-url", churnzero_url])
        .args(["--churnzero-app-key", APP_KEY])
        .args(["--admin-token", ADMIN_TOKEN])
        .args(flags)
        .env_remove("RUST_LOG")
        .env("FORWARDER_MAINTENANCE_INTERVAL", "200ms")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(logfile)
        .spawn()
        .expect("binary starts");
    let mut b = Binary {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    };
    b.wait_ready().await;
    b
}

/// SIGTERM, then wait for the process to exit (a clean stop).
async fn stop(mut bin: Binary) {
    bin.sigterm();
    let started = Instant::now();
    while bin.child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "serve did not stop: {}",
            bin.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn set_latency(state: &MockState, latency: Duration) {
    state.set_faults(Faults {
        latency,
        ..state.faults()
    });
}

/// A track with no ids of its own: only the identity map can resolve it.
fn bare_track(user: &str, event: &str) -> Value {
    json!({"type": "track", "userId": user, "event": event,
           "properties": {"description": event}})
}

fn is_event(action: &Value, user: &str, name: &str) -> bool {
    action["action"] == "trackEvent"
        && action["contactExternalId"] == user
        && action["eventName"] == name
}

/// The actions for `user`'s `name` event in each request, with the status
/// the mock answered.
fn attempts(state: &MockState, user: &str, name: &str) -> Vec<(u16, Value)> {
    state
        .requests()
        .into_iter()
        .flat_map(|r| {
            r.actions
                .into_iter()
                .filter(|a| is_event(a, user, name))
                .map(move |a| (r.status, a))
        })
        .collect()
}

async fn wait_attempts(state: &MockState, user: &str, name: &str, n: usize) -> Vec<(u16, Value)> {
    wait_for(
        &format!("{n} attempts of {user}'s {name}"),
        Duration::from_secs(15),
        || async {
            let a = attempts(state, user, name);
            (a.len() >= n).then_some(a)
        },
    )
    .await
}

on_both_backends! {
#[tokio::test]
async fn an_identify_acknowledged_while_its_users_track_is_in_flight_releases_it(db: &Path) {
    let mock = mock().await;
    let state = mock.state();
    let bin = serve(db, &mock.url(), &["--flush-interval", "50ms"], &[]).await;

    // ChurnZero is slow: the claim holding u4's unresolved track stays in
    // flight for 1.5 s after it read the identity map.
    set_latency(&state, Duration::from_millis(1500));
    let batch = json!({"batch": [
        track("u1", "Opened App", 1),
        track("u2", "Opened App", 1),
        track("u3", "Opened App", 1),
        bare_track("u4", "Opened App"),
    ]});
    let (code, body) = post(&bin.base, "/v1/batch", &batch).await;
    assert_eq!(code, 200, "{body}");
    wait_for(
        "the first request in flight",
        Duration::from_secs(10),
        || async { (state.request_count() >= 1).then_some(()) },
    )
    .await;
    let admitted = Instant::now();
    set_latency(&state, Duration::ZERO);
    // The identify is acknowledged (committed) while that request is still
    // unanswered: the claim cannot have seen it.
    let identify = json!({"type": "identify", "userId": "u4",
        "traits": {"accountExternalId": "acct-4", "contactExternalId": "u4",
                   "email": "u4@example.com"}});
    let (code, body) = post(&bin.base, "/v1/identify", &identify).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        admitted.elapsed() < Duration::from_millis(1400),
        "the identify must be acknowledged while the slow request is unanswered"
    );
    assert_eq!(state.request_count(), 1, "nothing else was sent meanwhile");

    // Both of u4's events go out soon after the slow request ends, in
    // order, instead of waiting hours for the held budget.
    let actions = wait_for(
        "u4's track and identify",
        Duration::from_secs(6),
        || async {
            let a = state.actions();
            let track = a.iter().position(|a| is_event(a, "u4", "Opened App"))?;
            let identify = a
                .iter()
                .position(|a| a["action"] == "setAttribute" && a["contactExternalId"] == "u4")?;
            Some((track, identify))
        },
    )
    .await;
    assert!(
        actions.0 < actions.1,
        "the track was accepted first: {actions:?}"
    );
    let track = &state.actions()[actions.0];
    assert_eq!(track["accountExternalId"], "acct-4");
    let st = wait_status(&bin.base, "delivered", 5).await;
    assert_eq!(st["held"], 0, "{st}");
    stop(bin).await;
    mock.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn a_retry_carries_the_ids_of_the_first_attempt_after_the_map_moves(db: &Path) {
    let mock = mock().await;
    let state = mock.state();
    let bin = serve(
        db,
        &mock.url(),
        &[
            "--flush-interval",
            "50ms",
            "--retry-initial",
            "50ms",
            "--retry-max",
            "5s",
        ],
        &[],
    )
    .await;
    let (code, _) = post(&bin.base, "/v1/identify", &identify("u5", "acc-first")).await;
    assert_eq!(code, 200);
    wait_status(&bin.base, "delivered", 1).await;

    // The first attempt fails; Retry-After keeps the retry back until the
    // group call below has moved the user.
    state.push_script([ScriptedAnswer::StatusWithRetryAfter(503, "2".into())]);
    let (code, _) = post(&bin.base, "/v1/track", &bare_track("u5", "Ran Report")).await;
    assert_eq!(code, 200);
    let first = wait_attempts(&state, "u5", "Ran Report", 1).await;
    assert_eq!(first[0].0, 503);
    assert_eq!(first[0].1["accountExternalId"], "acc-first");
    let group = json!({"type": "group", "userId": "u5", "groupId": "acc-second",
                       "traits": {"name": "Second Inc"}});
    let (code, _) = post(&bin.base, "/v1/group", &group).await;
    assert_eq!(code, 200);

    let both = wait_attempts(&state, "u5", "Ran Report", 2).await;
    assert_eq!(both[1].0, 200, "{both:?}");
    assert_eq!(
        both[0].1, both[1].1,
        "a retry sends the same action as the first attempt"
    );
    // The group itself was sent after the track and names the new account.
    wait_status(&bin.base, "delivered", 3).await;
    let actions = state.actions();
    assert!(
        actions
            .iter()
            .any(|a| a["entity"] == "account" && a["accountExternalId"] == "acc-second"),
        "{actions:?}"
    );

    // A dead event replayed after the map moved sends its first bytes too.
    let (code, _) = post(&bin.base, "/v1/identify", &identify("u6", "acc-first")).await;
    assert_eq!(code, 200);
    wait_status(&bin.base, "delivered", 4).await;
    state.push_script([ScriptedAnswer::Status(400)]);
    let (code, _) = post(&bin.base, "/v1/track", &bare_track("u6", "Exported")).await;
    assert_eq!(code, 200);
    wait_status(&bin.base, "dead", 1).await;
    let group = json!({"type": "group", "userId": "u6", "groupId": "acc-second"});
    let (code, _) = post(&bin.base, "/v1/group", &group).await;
    assert_eq!(code, 200);
    wait_status(&bin.base, "delivered", 5).await;
    let r = client()
        .post(format!("{}/admin/dead/replay", bin.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let both = wait_attempts(&state, "u6", "Exported", 2).await;
    assert_eq!((both[0].0, both[1].0), (400, 200), "{both:?}");
    assert_eq!(both[0].1["accountExternalId"], "acc-first");
    assert_eq!(
        both[0].1, both[1].1,
        "a replay sends the first attempt's action"
    );
    stop(bin).await;
    mock.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn a_retry_after_a_restart_with_another_mapping_sends_the_first_bytes(db: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.toml");
    let second = dir.path().join("second.toml");
    std::fs::write(&first, "event_custom_fields = [\"plan\"]\n").unwrap();
    std::fs::write(
        &second,
        "event_custom_fields = [\"seats\"]\ndescription_property = \"note\"\n",
    )
    .unwrap();
    let mock = mock().await;
    let state = mock.state();
    let flags = |mapping: &Path| {
        vec![
            "--flush-interval".to_string(),
            "50ms".into(),
            "--retry-max".into(),
            "10s".into(),
            "--mapping".into(),
            mapping.to_str().unwrap().to_string(),
        ]
    };
    let args = flags(&first);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bin = serve(db, &mock.url(), &args, &[]).await;
    state.push_script([ScriptedAnswer::StatusWithRetryAfter(503, "3".into())]);
    let event = json!({"type": "track", "userId": "u7", "event": "Upgraded",
        "properties": {"plan": "pro", "seats": 4, "description": "d1", "note": "n1"},
        "context": {"traits": {"accountExternalId": "acct-7", "contactExternalId": "u7"}}});
    let (code, _) = post(&bin.base, "/v1/track", &event).await;
    assert_eq!(code, 200);
    let once = wait_attempts(&state, "u7", "Upgraded", 1).await;
    assert_eq!(once[0].0, 503);
    wait_status(&bin.base, "pending", 1).await;
    wait_status(&bin.base, "in_flight", 0).await;
    stop(bin).await;

    let args = flags(&second);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bin = serve(db, &mock.url(), &args, &[]).await;
    let both = wait_attempts(&state, "u7", "Upgraded", 2).await;
    assert_eq!(both[1].0, 200, "{both:?}");
    assert_eq!(
        both[0].1, both[1].1,
        "the retry keeps the mapping of its first attempt"
    );
    // A new event follows the new mapping.
    let mut later = event.clone();
    later["event"] = json!("Downgraded");
    post(&bin.base, "/v1/track", &later).await;
    let new = wait_attempts(&state, "u7", "Downgraded", 1).await;
    assert_eq!(new[0].1["description"], "n1", "{new:?}");
    stop(bin).await;
    mock.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn a_gate_pause_longer_than_the_lease_sends_nothing_twice(db: &Path) {
    let mock = mock().await;
    let state = mock.state();
    // The lease is 4 s; the pause a 429 imposes is 5 s.
    let bin = serve(
        db,
        &mock.url(),
        &[
            "--workers",
            "2",
            "--batch-size",
            "4",
            "--flush-interval",
            "1500ms",
            "--request-timeout",
            "1200ms",
            "--retry-initial",
            "50ms",
            "--retry-max",
            "10s",
        ],
        &[("FORWARDER_LEASE", "4s")],
    )
    .await;
    // User b's full batch goes out at once and ChurnZero takes 1 s to
    // refuse it with a 429 and Retry-After: 5.
    set_latency(&state, Duration::from_secs(1));
    state.push_script([ScriptedAnswer::StatusWithRetryAfter(429, "5".into())]);
    let b: Vec<Value> = (1..=4).map(|n| track("b", &format!("b{n}"), n)).collect();
    let (code, body) = post(&bin.base, "/v1/batch", &json!({ "batch": b })).await;
    assert_eq!(code, 200, "{body}");
    wait_for("b's request in flight", Duration::from_secs(10), || async {
        (state.request_count() >= 1).then_some(())
    })
    .await;
    set_latency(&state, Duration::ZERO);
    // User a's three events are claimed while the gate is still open; the
    // claim waits for company (a partial batch, the flush interval), and the 429 closes the gate
    // meanwhile, for longer than a's lease.
    let a: Vec<Value> = (1..=3).map(|n| track("a", &format!("a{n}"), n)).collect();
    let (code, body) = post(&bin.base, "/v1/batch", &json!({ "batch": a })).await;
    assert_eq!(code, 200, "{body}");
    // Seven in flight: a's three were claimed before b's answer was
    // settled, so a's worker meets the closed gate holding its lease.
    wait_for("a's events claimed", Duration::from_secs(5), || async {
        let st = status(&bin.base).await;
        (st["in_flight"] == 7).then_some(())
    })
    .await;

    let st = wait_status(&bin.base, "delivered", 7).await;
    assert_eq!(st["in_flight"], 0, "{st}");
    let sent: Vec<(u16, String)> = state
        .requests()
        .into_iter()
        .flat_map(|r| {
            r.actions
                .into_iter()
                .map(move |a| (r.status, a["eventName"].as_str().unwrap().to_string()))
        })
        .collect();
    let a_sent: Vec<&(u16, String)> = sent.iter().filter(|(_, n)| n.starts_with('a')).collect();
    let expected: Vec<(u16, String)> = (1..=3).map(|n| (200, format!("a{n}"))).collect();
    assert_eq!(
        a_sent,
        expected.iter().collect::<Vec<_>>(),
        "each of a's events sent once, in order: {sent:?}"
    );
    stop(bin).await;
    mock.shutdown().await;
}
}

on_both_backends! {
#[tokio::test]
async fn a_claim_whose_requests_would_outlast_its_lease_gives_the_rest_back(db: &Path) {
    let mock = mock().await;
    let state = mock.state();
    // Four requests of 1 s each would need 4 s; the lease is 3.2 s.
    let bin = serve(
        db,
        &mock.url(),
        &[
            "--batch-size",
            "1",
            "--flush-interval",
            "50ms",
            "--request-timeout",
            "1500ms",
        ],
        &[("FORWARDER_LEASE", "3200ms")],
    )
    .await;
    set_latency(&state, Duration::from_secs(1));
    let a: Vec<Value> = (1..=4).map(|n| track("a", &format!("a{n}"), n)).collect();
    let (code, body) = post(&bin.base, "/v1/batch", &json!({ "batch": a })).await;
    assert_eq!(code, 200, "{body}");
    let st = wait_status(&bin.base, "delivered", 4).await;
    assert_eq!(st["in_flight"], 0, "{st}");
    let sent: Vec<String> = state
        .requests()
        .into_iter()
        .flat_map(|r| r.actions)
        .map(|a| a["eventName"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (1..=4).map(|n| format!("a{n}")).collect();
    assert_eq!(sent, expected, "each event sent once, in order");
    stop(bin).await;
    mock.shutdown().await;
}
}

mod outbox_level {
    //! The same guarantees at the outbox's own API, where the interleaving
    //! is chosen step by step.

    use crate::on_both_backends;
    use churnzero_forwarder::outbox::{
        ClaimedEvent, IdentityUpdate, NewEvent, Outbox, SettleOutcome, Settlement, WriterConfig,
    };
    use std::time::Duration;

    fn track(user: &str, n: u32) -> NewEvent {
        NewEvent {
            source: "source-hash".into(),
            message_id: format!("t-{user}-{n}"),
            kind: "track",
            order_key: user.into(),
            payload: format!(r#"{{"type":"track","userId":"{user}","event":"e{n}"}}"#),
            forward: true,
            identity: None,
            audience: Vec::new(),
        }
    }

    fn identify(user: &str, account: Option<&str>, contact: Option<&str>) -> NewEvent {
        NewEvent {
            source: "source-hash".into(),
            message_id: format!("i-{user}-{account:?}-{contact:?}"),
            kind: "identify",
            order_key: user.into(),
            payload: format!(r#"{{"type":"identify","userId":"{user}"}}"#),
            forward: true,
            identity: Some(IdentityUpdate {
                user_id: user.into(),
                account: account.map(str::to_string),
                contact: contact.map(str::to_string),
                previous_id: None,
            }),
            audience: Vec::new(),
        }
    }

    fn held(e: &ClaimedEvent, map_as_of: i64) -> Settlement {
        Settlement {
            id: e.id,
            lease: e.lease,
            order_key: e.order_key.clone(),
            first_attempt_at: e.first_attempt_at,
            outcome: SettleOutcome::Held {
                error: "unresolved identity".into(),
                map_as_of,
            },
            actions: None,
        }
    }

    async fn counts(outbox: &Outbox) -> (i64, i64, i64) {
        let s = outbox.status().await.unwrap();
        (s.pending, s.held, s.in_flight)
    }

    on_both_backends! {
    #[tokio::test]
    async fn a_hold_written_after_the_users_identify_makes_the_event_due_instead(db: &Path) {
        let outbox = Outbox::open(db, WriterConfig::default())
            .await
            .unwrap();
        outbox.ingest(vec![track("x", 1)]).await.unwrap();
        let claimed = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
        // The identify commits while the track is in flight: its release
        // finds nothing held. The worker, which read the map before, holds.
        outbox
            .ingest(vec![identify("x", Some("acc-x"), Some("x"))])
            .await
            .unwrap();
        outbox
            .settle(vec![held(&claimed[0], claimed[0].claimed_at)])
            .await
            .unwrap();
        // Due again at once, with the identify queued behind it.
        assert_eq!(counts(&outbox).await.1, 0, "nothing held");
        let again = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
        let ids: Vec<i64> = again.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![claimed[0].id, claimed[0].id + 1]);
    }
    }

    on_both_backends! {
    #[tokio::test]
    async fn holds_settled_together_each_check_their_own_users_map_read(db: &Path) {
        let outbox = Outbox::open(db, WriterConfig::default())
            .await
            .unwrap();
        outbox
            .ingest(vec![track("x", 1), track("y", 1), track("z", 1)])
            .await
            .unwrap();
        let claimed = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
        assert_eq!(claimed.len(), 3);
        let of = |user: &str| claimed.iter().find(|e| e.order_key == user).unwrap();
        // x's and z's identifies commit while their tracks are in flight.
        outbox
            .ingest(vec![
                identify("x", Some("acc-x"), Some("x")),
                identify("z", Some("acc-z"), Some("z")),
            ])
            .await
            .unwrap();
        // One settle of three holds. x's worker read the map before x's
        // identify: due at once. y is unknown. z's worker read the map
        // after z's identify (a hold that saw it anyway): held.
        outbox
            .settle(vec![
                held(of("z"), i64::MAX),
                held(of("x"), of("x").claimed_at),
                held(of("y"), of("y").claimed_at),
            ])
            .await
            .unwrap();
        let s = outbox.status().await.unwrap();
        // Held: y's track, z's track and z's identify queued behind it.
        assert_eq!((s.held, s.held_queued, s.in_flight), (3, 1, 0));
        let due = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
        let due: Vec<(&str, &str)> = due
            .iter()
            .map(|e| (e.order_key.as_str(), e.kind.as_str()))
            .collect();
        assert_eq!(due, vec![("x", "track"), ("x", "identify")]);
    }
    }

    on_both_backends! {
    #[tokio::test]
    async fn maintenance_releases_held_heads_whose_ids_are_known_and_keeps_the_rest(db: &Path) {
        let outbox = Outbox::open(db, WriterConfig::default())
            .await
            .unwrap();
        // y's map knows only the account: y's track stays held, no loop.
        outbox
            .ingest(vec![identify("y", Some("acc-y"), None)])
            .await
            .unwrap();
        let first = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
        outbox
            .settle(
                first
                    .iter()
                    .map(|e| Settlement {
                        outcome: SettleOutcome::Delivered,
                        ..held(e, 0)
                    })
                    .collect(),
            )
            .await
            .unwrap();
        outbox
            .ingest(vec![track("x", 1), track("y", 1)])
            .await
            .unwrap();
        let claimed = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
        assert_eq!(claimed.len(), 2);
        outbox
            .ingest(vec![identify("x", Some("acc-x"), Some("x"))])
            .await
            .unwrap();
        // A hold that missed the identify anyway (as a worker from before
        // the settle's re-check could write): held, with the ids known.
        outbox
            .settle(claimed.iter().map(|e| held(e, i64::MAX)).collect())
            .await
            .unwrap();
        // Both tracks held, and x's identify queued behind x's: held too.
        assert_eq!(counts(&outbox).await.1, 3);
        let report = outbox
            .maintain(Duration::from_secs(3600), Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(report.held_released, 1);
        // x's track (and its identify behind it) due; y's still held.
        assert_eq!(counts(&outbox).await.1, 1);
        let due = outbox.claim(10, Duration::from_secs(60)).await.unwrap();
        let due: Vec<(&str, &str)> = due
            .iter()
            .map(|e| (e.order_key.as_str(), e.kind.as_str()))
            .collect();
        assert_eq!(due, vec![("x", "track"), ("x", "identify")]);
        let report = outbox
            .maintain(Duration::from_secs(3600), Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(report.held_released, 0, "y is not released again and again");
    }
    }
}
