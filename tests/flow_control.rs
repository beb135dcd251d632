//! Flow control toward ChurnZero, through the real binary and the mock's
//! capacity model: adaptive concurrency against a service that serves a
//! few requests at once and refuses the rest, the hard rate cap, and the
//! sync lane sharing the one gate with real time, which goes first.
//!
//! The figures asserted are properties of flow control (how much of the
//! service's capacity is used, how many requests it refuses, how close the
//! drain stays to the cap), with bounds wide enough for a loaded 2-core
//! machine; each run prints what it measured.

mod common;

use churnzero_forwarder::mock_churnzero::{MockArgs, MockChurnZero, RecordedRequest};
use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);

/// These tests measure rates and latencies of the flow control itself; run
/// side by side on a small machine they would measure each other instead.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn capacity_mock(capacity: usize, queue: usize, service_time: Duration) -> MockChurnZero {
    MockChurnZero::start(MockArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        quiet: true,
        capacity,
        queue,
        service_time,
        ..MockArgs::default()
    })
    .await
    .expect("mock starts")
}

/// Stops a binary with SIGTERM and waits for it to exit.
async fn stop(b: &mut Binary) {
    b.sigterm();
    let started = Instant::now();
    while b.alive() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "binary did not stop: {}",
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stores `events` in a fresh outbox at `db` without delivering any, so a
/// later start drains a backlog that is all there from its first claim.
async fn store_backlog(db: &Path, url: &str, events: Vec<Value>) {
    let mut b = Binary::serve(db, url, &["--no-delivery"]).await;
    let n = events.len() as i64;
    for chunk in events.chunks(100) {
        let (code, body) = post(&b.base, "/v1/batch", &json!({ "batch": chunk })).await;
        assert_eq!(code, 200, "{body}");
    }
    wait_status(&b.base, "accepted", n).await;
    stop(&mut b).await;
}

/// `n` tracks spread over `users` users (per-user order keeps each user's
/// events one request at a time, so many users keep batches full).
fn tracks(n: usize, users: usize) -> Vec<Value> {
    (0..n)
        .map(|i| track(&format!("user-{}", i % users), "Backlog", i))
        .collect()
}

/// Requests answered 2xx, first and last arrival: the drain as the
/// destination saw it, without the forwarder's start-up.
fn drain_span(requests: &[RecordedRequest]) -> (chrono::Duration, usize) {
    let ok: Vec<&RecordedRequest> = requests
        .iter()
        .filter(|r| (200..300).contains(&r.status))
        .collect();
    let first = ok.first().expect("some request delivered");
    let last = ok.last().unwrap();
    let actions: usize = ok.iter().map(|r| r.actions.len()).sum();
    // The first request's actions went at the start of the span.
    (last.at - first.at, actions - first.actions.len())
}

/// One sample of the flow figures while a backlog drains.
struct Sample {
    at_ms: u128,
    limit: i64,
    in_flight: i64,
    delivered: i64,
}

/// What one drain measured.
struct Drain {
    actions_per_second: f64,
    requests: usize,
    refused: u64,
    trace: Vec<Sample>,
}

impl Drain {
    fn refused_share(&self) -> f64 {
        self.refused as f64 / self.requests.max(1) as f64
    }
}

/// Drains a backlog of `n` events through a fresh capacity mock with
/// `flags`, polling `/status` every 150 ms for the flow figures.
async fn drain_against_capacity(
    dir: &Path,
    name: &str,
    n: usize,
    flags: &[&str],
    mock: MockChurnZero,
) -> Drain {
    let db = dir.join(format!("{name}.db"));
    store_backlog(&db, &mock.url(), tracks(n, 1000)).await;
    let state = mock.state();
    state.reset();
    let mut b = Binary::serve(&db, &mock.url(), flags).await;
    let started = Instant::now();
    let mut trace = Vec::new();
    loop {
        let s = status(&b.base).await;
        let delivered = s["delivered"].as_i64().unwrap_or(0);
        trace.push(Sample {
            at_ms: started.elapsed().as_millis(),
            limit: s["flow"]["concurrency_limit"].as_i64().unwrap_or(-1),
            in_flight: s["flow"]["in_flight"].as_i64().unwrap_or(-1),
            delivered,
        });
        if delivered >= n as i64 {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "{name}: drain not done; last status {s}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let requests = state.requests();
    let refused = state.refused_count();
    stop(&mut b).await;
    mock.shutdown().await;
    let (span, actions) = drain_span(&requests);
    Drain {
        actions_per_second: actions as f64 / (span.num_milliseconds().max(1) as f64 / 1000.0),
        requests: requests.len(),
        refused,
        trace,
    }
}

fn print_trace(name: &str, d: &Drain) {
    say(&format!(
        "{name}: concurrency limit over time (ms: limit / in flight / delivered)"
    ));
    let line: Vec<String> = d
        .trace
        .iter()
        .map(|s| format!("{}:{}/{}/{}", s.at_ms, s.limit, s.in_flight, s.delivered))
        .collect();
    for chunk in line.chunks(10) {
        say(&format!("  {}", chunk.join("  ")));
    }
}

/// ChurnZero modelled as serving 4 requests at once (50 ms each), queueing
/// 4 more and refusing the rest with 503 at once. At 25 actions a request
/// that is 4 x 25 / 0.05 s = 2,000 actions/s. 32 workers at fixed
/// concurrency overrun it; adaptive concurrency must find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_concurrency_uses_a_limited_service_without_overrunning_it() {
    let _one_at_a_time = SERIAL.lock().await;
    const EVENTS: usize = 20_000;
    const BATCH: usize = 25;
    let service = Duration::from_millis(50);
    let capacity = 4.0 * BATCH as f64 / service.as_secs_f64();
    let dir = tempfile::tempdir().unwrap();
    let common = ["--workers", "32", "--batch-size", "25"];

    let adaptive = drain_against_capacity(
        dir.path(),
        "adaptive",
        EVENTS,
        &common,
        capacity_mock(4, 4, service).await,
    )
    .await;
    let mut flags = common.to_vec();
    flags.extend(["--adaptive-concurrency", "false"]);
    let fixed = drain_against_capacity(
        dir.path(),
        "fixed",
        EVENTS,
        &flags,
        capacity_mock(4, 4, service).await,
    )
    .await;

    print_trace("adaptive", &adaptive);
    for (name, d) in [("adaptive", &adaptive), ("fixed 32", &fixed)] {
        say(&format!(
            "{name}: {:.0} actions/s = {:.2}x of the {capacity:.0}/s capacity; \
             {} of {} requests refused ({:.1}%)",
            d.actions_per_second,
            d.actions_per_second / capacity,
            d.refused,
            d.requests,
            100.0 * d.refused_share()
        ));
    }
    assert!(
        adaptive.actions_per_second >= 0.8 * capacity,
        "adaptive drain {:.0}/s is below 0.8x of {capacity:.0}/s",
        adaptive.actions_per_second
    );
    assert!(
        adaptive.refused_share() <= 0.10,
        "adaptive concurrency overran the service: {:.1}% refused",
        100.0 * adaptive.refused_share()
    );
    assert!(
        adaptive.refused_share() < fixed.refused_share(),
        "adaptive refused {:.1}%, fixed {:.1}%",
        100.0 * adaptive.refused_share(),
        100.0 * fixed.refused_share()
    );
    // The limit found the service's size: never at the ceiling of 32 once
    // the drain was under way (the samples from the last half).
    let late = &adaptive.trace[adaptive.trace.len() / 2..];
    assert!(
        late.iter().all(|s| (1..=16).contains(&s.limit)),
        "limit far from the service's 4 + 4"
    );
    // Fixed concurrency stays at --workers.
    assert!(fixed.trace.iter().all(|s| s.limit == 32));
}

/// `--max-actions-per-second 1500` against a mock with no limit of its
/// own: a 15,000-event backlog drains at the cap (within 15%).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_cap_holds_the_drain_to_its_rate() {
    let _one_at_a_time = SERIAL.lock().await;
    const EVENTS: usize = 15_000;
    const CAP: f64 = 1500.0;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cap.db");
    let mock = capacity_mock(0, 0, Duration::ZERO).await;
    store_backlog(&db, &mock.url(), tracks(EVENTS, 1000)).await;
    let state = mock.state();
    state.reset();
    let mut b = Binary::serve(
        &db,
        &mock.url(),
        &["--workers", "8", "--max-actions-per-second", "1500"],
    )
    .await;
    let s = status(&b.base).await;
    assert_eq!(s["flow"]["max_actions_per_second"], 1500, "{s}");
    assert_eq!(s["flow"]["instance_actions_per_second"], 1500, "{s}");
    wait_for("the drain", WAIT, || async {
        (status(&b.base).await["delivered"].as_i64() == Some(EVENTS as i64)).then_some(())
    })
    .await;
    let s = status(&b.base).await;
    let throttled = s["flow"]["throttled_seconds_total"].as_f64().unwrap();
    let metrics = metrics_text(&b.base).await;
    for line in [
        "churnzero_forwarder_flow_rate_cap_actions_per_second 1500",
        "churnzero_forwarder_flow_concurrency_limit ",
        "churnzero_forwarder_flow_in_flight ",
        "churnzero_forwarder_flow_rtt_baseline_seconds ",
        "churnzero_forwarder_flow_rate_wait_seconds_sum ",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
    stop(&mut b).await;
    let (span, actions) = drain_span(&state.requests());
    let rate = actions as f64 / (span.num_milliseconds() as f64 / 1000.0);
    say(&format!(
        "rate cap {CAP}/s: drained {actions} actions in {:.2} s = {rate:.0}/s ({:+.1}%); \
         senders waited {throttled:.1} s for tokens",
        span.num_milliseconds() as f64 / 1000.0,
        100.0 * (rate / CAP - 1.0)
    ));
    assert!(
        (rate / CAP - 1.0).abs() <= 0.15,
        "drain at {rate:.0}/s, cap {CAP}/s"
    );
    assert!(throttled > 1.0, "the cap never made anyone wait: {s}");
    mock.shutdown().await;
}

/// An identify as Segment Engage sends it when `user` joins an audience.
fn audience(user: &str) -> Value {
    json!({"type": "identify", "userId": user, "traits": {"power_users": true},
           "context": {"personas": {"computation_class": "audience", "computation_key": "power_users",
                                    "computation_id": "aud_power_users", "space_id": "spa_1"}}})
}

fn is_audience(r: &RecordedRequest) -> bool {
    r.actions
        .iter()
        .any(|a| a.get("attr_power_users").is_some())
}

/// A sync window of 5,000 contacts runs while real-time tracks arrive,
/// against a ChurnZero that serves one request at a time (100 ms) and
/// refuses any other at once. With one gate for both lanes (`--workers 1`)
/// the two never collide, and each track reaches ChurnZero within
/// flush interval (50 ms) + one sync request (100 ms) + its own request
/// (100 ms) + 750 ms of slack for a loaded machine: 1 s. A sync lane that
/// could hold real time back would make a track wait for the window, 50
/// requests or 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_sync_window_never_holds_real_time_back() {
    let _one_at_a_time = SERIAL.lock().await;
    const CONTACTS: usize = 5000;
    let bound = chrono::Duration::milliseconds(1000);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sync.db");
    let mock = capacity_mock(1, 0, Duration::from_millis(100)).await;
    let state = mock.state();
    let mut events: Vec<Value> = (0..CONTACTS)
        .map(|i| identify(&format!("c{i}"), "acct-1"))
        .collect();
    events.extend((0..CONTACTS).map(|i| audience(&format!("c{i}"))));
    store_backlog(&db, &mock.url(), events).await;

    // Deliver the identifies; the sync window is an hour away.
    let flags = [
        "--workers",
        "1",
        "--sync-max-per-minute",
        "600000",
        "--sync-interval",
    ];
    let mut args = flags.to_vec();
    args.push("1h");
    let mut b = Binary::serve(&db, &mock.url(), &args).await;
    wait_status(&b.base, "delivered", 2 * CONTACTS as i64).await;
    stop(&mut b).await;
    assert!(state.requests().iter().all(|r| !is_audience(r)));

    // Restart with a 1 s interval: the window runs a second from now.
    state.reset();
    let mut args = flags.to_vec();
    args.push("1s");
    let mut b = Binary::serve(&db, &mock.url(), &args).await;
    wait_for("the window's first request", WAIT, || async {
        state.requests().iter().any(is_audience).then_some(())
    })
    .await;
    let mut sent = Vec::new();
    let mut seq = 0;
    loop {
        let s = status(&b.base).await;
        if s["sync"]["pending_contacts"] == 0 {
            break;
        }
        assert!(sent.len() < 1000, "the window never ends: {s}");
        seq += 1;
        let at = chrono::Utc::now();
        let (code, body) = post(&b.base, "/v1/track", &track("rt-user", "Realtime", seq)).await;
        assert_eq!(code, 200, "{body}");
        sent.push((seq, at));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_status(
        &b.base,
        "delivered",
        2 * CONTACTS as i64 + sent.len() as i64,
    )
    .await;
    let st = status(&b.base).await;
    stop(&mut b).await;

    let requests = state.requests();
    let arrival = |seq: usize| {
        requests
            .iter()
            .find(|r| {
                (200..300).contains(&r.status)
                    && r.actions
                        .iter()
                        .any(|a| a["description"] == format!("Realtime #{seq}"))
            })
            .map(|r| r.at)
    };
    let mut worst = chrono::Duration::zero();
    for (seq, at) in &sent {
        let arrived = arrival(*seq).unwrap_or_else(|| panic!("track {seq} never arrived"));
        worst = worst.max(arrived - *at);
    }
    let sync_requests: Vec<&RecordedRequest> = requests.iter().filter(|r| is_audience(r)).collect();
    let last_track = arrival(sent.last().unwrap().0).unwrap();
    let first_track = arrival(sent[0].0).unwrap();
    let refused = requests.iter().filter(|r| r.status == 503).count();
    say(&format!(
        "sync window: {} sync requests, {} real-time tracks during it, worst track latency {} ms \
         (bound {} ms), {refused} requests refused; last_run_sent {}",
        sync_requests.len(),
        sent.len(),
        worst.num_milliseconds(),
        bound.num_milliseconds(),
        st["sync"]["last_run_sent"]
    ));
    assert!(
        sent.len() >= 5,
        "only {} tracks during the window",
        sent.len()
    );
    assert!(
        sync_requests.iter().any(|r| r.at > last_track)
            || sync_requests.iter().filter(|r| r.at > first_track).count() >= 5,
        "the tracks did not overlap the window"
    );
    assert!(
        worst <= bound,
        "a real-time track waited {} ms (bound {} ms)",
        worst.num_milliseconds(),
        bound.num_milliseconds()
    );
    // One gate: the lanes together never sent two requests at once.
    assert_eq!(refused, 0, "requests refused: both lanes sent at once");
    assert_eq!(st["sync"]["last_run_sent"], CONTACTS as i64, "{st}");
    mock.shutdown().await;
}

/// Actions ChurnZero accepted per second between `from` and `to`.
fn rate_between(
    requests: &[RecordedRequest],
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) -> f64 {
    let actions: usize = requests
        .iter()
        .filter(|r| (200..300).contains(&r.status) && r.at > from && r.at <= to)
        .map(|r| r.actions.len())
        .sum();
    actions as f64 / ((to - from).num_milliseconds() as f64 / 1000.0)
}

/// The cap is the tenant's: three instances on one PostgreSQL database,
/// each with `--max-actions-per-second 1500`, send 1,500 actions a second
/// together (within 15%), each taking its share from the heartbeats. When
/// one of them stops, the other two take over its share and the total
/// stays at the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_cap_holds_for_three_instances_on_one_postgres_database() {
    let _one_at_a_time = SERIAL.lock().await;
    const EVENTS: usize = 30_000;
    const CAP: f64 = 1500.0;
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let url = pg.url();
    let db = Path::new(&url);
    let mock = capacity_mock(0, 0, Duration::ZERO).await;
    store_backlog(db, &mock.url(), tracks(EVENTS, 3000)).await;
    let state = mock.state();
    state.reset();
    let args = ["--workers", "8", "--max-actions-per-second", "1500"];
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Binary::serve(db, &mock.url(), &args).await);
    }
    // Every instance has counted the three.
    for b in &instances {
        wait_for("each instance's share of the cap", WAIT, || async {
            let s = status(&b.base).await;
            (s["flow"]["share_instances"] == 3 && s["flow"]["instance_actions_per_second"] == 500)
                .then_some(())
        })
        .await;
    }
    let three_from = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let three_to = chrono::Utc::now();
    let mut leaving = instances.pop().unwrap();
    stop(&mut leaving).await;
    for b in &instances {
        wait_for("the two instances' larger share", WAIT, || async {
            let s = status(&b.base).await;
            (s["flow"]["share_instances"] == 2).then_some(())
        })
        .await;
    }
    let two_from = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let two_to = chrono::Utc::now();
    let delivered = status(&instances[0].base).await["delivered"]
        .as_i64()
        .unwrap();
    assert!(
        delivered < EVENTS as i64,
        "the backlog ran out before the measurement ended ({delivered} delivered)"
    );
    let requests = state.requests();
    let three = rate_between(&requests, three_from, three_to);
    let two = rate_between(&requests, two_from, two_to);
    say(&format!(
        "rate cap {CAP}/s on PostgreSQL: three instances together {three:.0}/s ({:+.1}%), \
         two after one stopped {two:.0}/s ({:+.1}%)",
        100.0 * (three / CAP - 1.0),
        100.0 * (two / CAP - 1.0)
    ));
    for b in &mut instances {
        stop(b).await;
    }
    assert!(
        (three / CAP - 1.0).abs() <= 0.15,
        "three instances sent {three:.0}/s against a cap of {CAP}/s"
    );
    assert!(
        (two / CAP - 1.0).abs() <= 0.15,
        "two instances sent {two:.0}/s against a cap of {CAP}/s"
    );
    mock.shutdown().await;
}
