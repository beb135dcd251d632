//! The real binary, several instances on one PostgreSQL database: load
//! spread over three of them (one killed and restarted mid-load) loses no
//! acknowledged event and keeps every user's order at ChurnZero; one
//! message id posted to all of them at once is stored and delivered once;
//! they agree on the outbox figures; and an instance frozen past the
//! instance expiry, whose leases another instance took, cannot settle them
//! when it wakes. Each test makes its own database; without a server they
//! skip with one line, under `CI=true` they fail.

mod common;

use churnzero_forwarder::mock_churnzero::{Faults, ScriptedAnswer};
use common::*;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an instance's heartbeat may be silent before its leases come
/// back (the outbox's default, which `serve` uses).
const INSTANCE_EXPIRY: Duration = Duration::from_secs(10);
/// How often a live instance renews its heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// A track event of `user-<user>` whose message id and description name the
/// user and its per-user sequence number (also in `properties.seq`).
fn event(tag: &str, user: usize, seq: u64) -> Value {
    let user_id = format!("user-{user}");
    let id = format!("{tag}-u{user}-s{seq}");
    json!({"type": "track", "userId": user_id, "event": "Instances Test", "messageId": id,
           "properties": {"description": id, "seq": seq},
           "context": {"traits": {"accountExternalId": "acct", "contactExternalId": user_id}}})
}

/// The (user, sequence number) an action's description carries, for
/// events made by [`event`] with this tag.
fn parse(tag: &str, action: &Value) -> Option<(String, u64)> {
    let d = action["description"].as_str()?;
    let rest = d.strip_prefix(tag)?.strip_prefix("-u")?;
    let (user, seq) = rest.split_once("-s")?;
    Some((user.to_string(), seq.parse().ok()?))
}

/// What the mock received of one tag's events.
struct Arrivals {
    /// Message ids that arrived at least once.
    distinct: HashSet<String>,
    /// Arrivals beyond the first of a message id (at-least-once re-sends).
    resends: usize,
    /// First arrivals of a user's event after a later one of the same user.
    inversions: Vec<String>,
}

fn arrivals(tag: &str, actions: &[Value]) -> Arrivals {
    let mut distinct = HashSet::new();
    let mut resends = 0;
    let mut inversions = Vec::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    for a in actions {
        let Some((user, seq)) = parse(tag, a) else {
            continue;
        };
        let id = a["description"].as_str().unwrap().to_string();
        if !distinct.insert(id) {
            resends += 1;
            continue;
        }
        let prev = last.entry(user.clone()).or_insert(0);
        if seq < *prev {
            inversions.push(format!("user {user}: {seq} first arrived after {prev}"));
        } else {
            *prev = seq;
        }
    }
    Arrivals {
        distinct,
        resends,
        inversions,
    }
}

/// POSTs `body` to `path` of the instance at `start` (modulo their number),
/// moving on to the next one whenever an instance does not answer 200 (it
/// may be dead or restarting): the same message ids again, so a request
/// that was stored but not answered counts once. Returns once one answered
/// 200.
async fn post_until_acked(
    http: &reqwest::Client,
    bases: &Mutex<Vec<String>>,
    start: usize,
    path: &str,
    body: &Value,
) {
    let started = Instant::now();
    let mut i = start;
    loop {
        let base = {
            let b = bases.lock().unwrap();
            b[i % b.len()].clone()
        };
        let r = http
            .post(format!("{base}{path}"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(body)
            .send()
            .await;
        if let Ok(r) = &r {
            if r.status().as_u16() == 200 {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no instance took {body} for 30 s; last answer {r:?}"
        );
        i += 1;
        if (i - start) % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits until every instance reports nothing pending or in flight, then
/// returns their `/status` answers.
async fn idle_statuses(bases: &[String]) -> Vec<Value> {
    wait_for("every instance idle", Duration::from_secs(60), || async {
        let mut all = Vec::new();
        for b in bases {
            let s = status(b).await;
            if s["pending"] != json!(0) || s["in_flight"] != json!(0) {
                return None;
            }
            all.push(s);
        }
        Some(all)
    })
    .await
}

/// The figures every instance must agree on once the outbox is idle.
fn outbox_figures(s: &Value) -> Value {
    json!({
        "pending": s["pending"], "in_flight": s["in_flight"], "delivered": s["delivered"],
        "dead": s["dead"], "held": s["held"], "accepted": s["accepted"],
        "duplicates": s["duplicates"], "filtered": s["filtered"], "retries": s["retries"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_the_load_and_a_kill_loses_nothing_and_breaks_no_order() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let url = db.url();
    let mock = mock().await;
    // A little latency keeps requests in flight when the kill lands.
    mock.state().set_faults(Faults {
        latency: Duration::from_millis(100),
        ..Faults::default()
    });
    let args = ["--batch-size", "50"];
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Binary::serve(Path::new(&url), &mock.url(), &args).await);
    }
    let bases: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(
        instances.iter().map(|b| b.base.clone()).collect(),
    ));

    // Each sender owns four users. Event n of a user goes to instance
    // n % 3, as one /v1/batch of the four users' event n on even rounds and
    // as four /v1/track on odd ones, and only once event n - 1 was
    // acknowledged, so every user's order is the order of its sequence
    // numbers, whichever instance stored each event.
    const SENDERS: usize = 6;
    const USERS_PER_SENDER: usize = 4;
    const ROUNDS: u64 = 100;
    let total = SENDERS * USERS_PER_SENDER * ROUNDS as usize;
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let bases = bases.clone();
        let acked = acked.clone();
        senders.push(tokio::spawn(async move {
            let http = client();
            let users: Vec<usize> = (0..USERS_PER_SENDER)
                .map(|i| s * USERS_PER_SENDER + i)
                .collect();
            for n in 1..=ROUNDS {
                let target = n as usize % 3;
                let events: Vec<Value> = users.iter().map(|u| event("load", *u, n)).collect();
                if n % 2 == 0 {
                    post_until_acked(
                        &http,
                        &bases,
                        target,
                        "/v1/batch",
                        &json!({"batch": events}),
                    )
                    .await;
                } else {
                    for e in &events {
                        post_until_acked(&http, &bases, target, "/v1/track", e).await;
                    }
                }
                let mut a = acked.lock().unwrap();
                for e in &events {
                    a.insert(e["messageId"].as_str().unwrap().to_string());
                }
            }
        }));
    }

    // Mid-load, SIGKILL the second instance (holding leases and taking
    // ingest) and start it again with the same arguments.
    wait_for(
        "a third of the load acknowledged",
        Duration::from_secs(60),
        || {
            let acked = acked.clone();
            async move { (acked.lock().unwrap().len() >= total / 3).then_some(()) }
        },
    )
    .await;
    // The kill lands while the instance holds leases (it started second),
    // which come back only after the instance expiry.
    let leased_by_second = "SELECT count(*) FROM leases WHERE owner = \
         (SELECT id FROM instances ORDER BY id OFFSET 1 LIMIT 1)";
    let mut conn = db.conn().await;
    let mut held_at_kill: i64 = 0;
    let looking = Instant::now();
    while held_at_kill == 0 && looking.elapsed() < Duration::from_secs(20) {
        held_at_kill = sqlx::query_scalar(leased_by_second)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    }
    let at_kill = acked.lock().unwrap().len();
    instances[1].kill9();
    let held_at_kill: i64 = sqlx::query_scalar(leased_by_second)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let restarted = Binary::serve(Path::new(&url), &mock.url(), &args).await;
    bases.lock().unwrap()[1] = restarted.base.clone();
    instances[1] = restarted;
    for s in senders {
        s.await.expect("sender");
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), total);

    // Everything acknowledged arrives, the killed instance's leases
    // included once its heartbeat is older than the instance expiry.
    let state = mock.state();
    common::wait_all_acked_at_mock(&state, &acked, Duration::from_secs(60)).await;
    let bases_now: Vec<String> = bases.lock().unwrap().clone();
    let idle = idle_statuses(&bases_now).await;
    let got = arrivals("load", &state.actions());
    let lost = acked.difference(&got.distinct).count();
    eprintln!(
        "three instances: acked={} delivered={} lost={lost} inversions={} resends={} \
         (killed after {at_kill} acked, holding {held_at_kill} leases) status={}",
        acked.len(),
        got.distinct.len(),
        got.inversions.len(),
        got.resends,
        outbox_figures(&idle[0])
    );
    assert_eq!(lost, 0, "acknowledged events lost");
    assert!(
        got.inversions.is_empty(),
        "per-user order broken at the mock: {:?}",
        &got.inversions[..got.inversions.len().min(20)]
    );
    // Each acknowledged message id is stored once, whichever instances it
    // was posted to; a request stored but not answered came back as a
    // duplicate.
    assert_eq!(idle[0]["accepted"], json!(total), "{}", idle[0]);
    assert_eq!(idle[0]["delivered"], json!(total), "{}", idle[0]);
    assert_eq!(idle[0]["dead"], json!(0), "{}", idle[0]);

    // One message id posted to the three instances at once is stored once
    // and delivered once; the other two answers are duplicates.
    let before = outbox_figures(&idle[0]);
    let twins = 20;
    for k in 0..twins {
        let e = event("twin", 1000 + k, 1);
        let posts = bases_now.iter().enumerate().map(|(i, base)| {
            let (base, e) = (base.clone(), e.clone());
            async move {
                if i % 2 == 0 {
                    post(&base, "/v1/track", &e).await
                } else {
                    post(&base, "/v1/batch", &json!({"batch": [e]})).await
                }
            }
        });
        for (code, body) in futures_join_all(posts).await {
            assert_eq!(code, 200, "{body}");
        }
    }
    let idle = idle_statuses(&bases_now).await;
    let after = outbox_figures(&idle[0]);
    let delta = |f: &str| after[f].as_i64().unwrap() - before[f].as_i64().unwrap();
    assert_eq!(delta("accepted"), twins as i64, "{before} -> {after}");
    assert_eq!(delta("duplicates"), 2 * twins as i64, "{before} -> {after}");
    assert_eq!(delta("delivered"), twins as i64, "{before} -> {after}");
    let twin_arrivals = arrivals("twin", &state.actions());
    assert_eq!(twin_arrivals.distinct.len(), twins, "every twin delivered");
    assert_eq!(twin_arrivals.resends, 0, "a twin delivered more than once");

    // Every instance reads the same outbox.
    for (i, s) in idle.iter().enumerate() {
        assert_eq!(
            outbox_figures(s),
            after,
            "instance {i} disagrees with instance 0"
        );
    }
    eprintln!(
        "three instances: {twins} message ids posted to all three at once: accepted +{}, \
         duplicates +{}, delivered once each; idle status agrees on all three: {after}",
        delta("accepted"),
        delta("duplicates")
    );
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// One row count per condition, read in one statement.
async fn count(db: &PgDb, condition: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM events WHERE {condition}"))
        .fetch_one(&mut db.conn().await)
        .await
        .expect("count")
}

/// Instance A sends a batch; ChurnZero answers it slowly (with `answer`);
/// A is frozen (SIGSTOP) meanwhile, past the instance expiry, so B takes
/// A's leases and sends the same events, with more of the same users behind
/// them; A is woken (SIGCONT) while B's request is in flight and A's late
/// outcome must change nothing: it is ignored, B's settle is the one that
/// counts, every event is delivered once in the outbox's figures, and each
/// user's order holds at ChurnZero.
async fn late_outcome_of_a_frozen_instance_changes_nothing(answer: ScriptedAnswer, what: &str) {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let url = db.url();
    let mock = mock().await;
    let latency = Duration::from_secs(6);
    mock.state().set_faults(Faults {
        latency,
        ..Faults::default()
    });
    mock.state().push_script([answer]);
    let tag = "fence";
    // One user: A's events then go in one claim and one request. With
    // several, A's two claim loops may split them between two claims (each
    // passes over the keys the other holds), the adaptive limit of 1 sends
    // the second request only after the first's answer, and A would be
    // frozen with part of its batch already settled (two CI runs failed so).
    let users = 1;
    let mut a = Binary::serve(Path::new(&url), &mock.url(), &[]).await;
    let first: Vec<Value> = (1..=5)
        .flat_map(|n| (0..users).map(move |u| event(tag, u, n)))
        .collect();
    let (code, body) = post(&a.base, "/v1/batch", &json!({"batch": first})).await;
    assert_eq!(code, 200, "{body}");
    // A's request is at the mock, its answer `latency` away.
    let state = mock.state();
    let sent_by_a = first.len();
    wait_for("A's request at the mock", Duration::from_secs(30), || {
        let state = state.clone();
        async move {
            (state
                .requests()
                .iter()
                .map(|r| r.actions.len())
                .sum::<usize>()
                >= sent_by_a)
                .then_some(())
        }
    })
    .await;
    let a_pid = a.child.id() as i32;
    send_signal(a_pid, "STOP");
    let frozen = Instant::now();

    let b = Binary::serve(Path::new(&url), &mock.url(), &[]).await;
    let second: Vec<Value> = (6..=10)
        .flat_map(|n| (0..users).map(move |u| event(tag, u, n)))
        .collect();
    let (code, body) = post(&b.base, "/v1/batch", &json!({"batch": second})).await;
    assert_eq!(code, 200, "{body}");
    let total = first.len() + second.len();
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM instances ORDER BY id")
        .fetch_all(&mut db.conn().await)
        .await
        .unwrap();
    let (a_id, b_id) = (ids[0], ids[1]);

    // B takes A's leases once A's heartbeat is older than the instance
    // expiry, and sends everything: A's events and the ones behind them.
    let sent = || {
        state
            .requests()
            .iter()
            .map(|r| r.actions.len())
            .sum::<usize>()
    };
    while sent() < sent_by_a + total {
        // What B did instead, for the next run that gets here.
        assert!(
            frozen.elapsed() < Duration::from_secs(40),
            "B's request was not at the mock within 40 s of A's freeze ({} of {} actions \
             arrived); leases: {:?}\nB's log:\n{}",
            sent(),
            sent_by_a + total,
            sqlx::query_as::<_, (i64, String, i64, i64)>(
                "SELECT event_id, order_key, owner, until FROM leases ORDER BY event_id"
            )
            .fetch_all(&mut db.conn().await)
            .await
            .ok(),
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let taken_after = frozen.elapsed();
    assert!(
        taken_after >= INSTANCE_EXPIRY - HEARTBEAT - Duration::from_secs(1),
        "B took the leases of an instance that was silent for only {taken_after:?}"
    );
    assert_eq!(
        count(
            &db,
            &format!("id IN (SELECT event_id FROM leases WHERE owner = {a_id})")
        )
        .await,
        0,
        "A still holds leases"
    );

    // Wake A: its answer (long there) is read and settled, and ignored.
    send_signal(a_pid, "CONT");
    let ignored = format!("events={}", first.len());
    let woken = Instant::now();
    while !a
        .logs()
        .lines()
        .any(|l| l.contains("outcomes ignored") && l.contains(&ignored))
    {
        // What A did instead, for the next run that gets here.
        assert!(
            woken.elapsed() < Duration::from_secs(30),
            "A's late {what} was not ignored within 30 s of waking; A's log:\n{}\nB's log:\n{}",
            a.logs(),
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Right after A's settle: nothing went back to pending, nothing A
    // claimed is counted delivered by it; every event is B's in flight or
    // delivered by B.
    let mut conn = db.conn().await;
    let (pending, leased_by_b, delivered, other): (i64, i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*) FILTER (WHERE state IN (0, 4, 5) AND l.owner IS NULL), \
                count(*) FILTER (WHERE state IN (0, 5) AND l.owner = {b_id}), \
                count(*) FILTER (WHERE state = 2 AND l.owner IS NULL), \
                count(*) FILTER (WHERE NOT (state IN (0, 5) AND l.owner IS NOT DISTINCT FROM {b_id}) \
                                 AND NOT (state = 2 AND l.owner IS NULL)) \
         FROM events e LEFT JOIN leases l ON l.event_id = e.id"
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        (pending, other),
        (0, 0),
        "after A's late {what}: {leased_by_b} leased by B, {delivered} delivered"
    );
    assert_eq!(leased_by_b + delivered, total as i64);

    // B's settle counts: every event delivered once, with one attempt.
    wait_status(&b.base, "delivered", total as i64).await;
    let st = wait_status(&b.base, "in_flight", 0).await;
    assert_eq!(st["pending"], json!(0), "{st}");
    assert_eq!(st["dead"], json!(0), "{st}");
    assert_eq!(
        st["retries"],
        json!(0),
        "A's late {what} counted as a retry: {st}"
    );
    assert_eq!(st["accepted"], json!(total), "{st}");
    assert_eq!(
        count(
            &db,
            "state = 2 AND attempts = 1 AND id NOT IN (SELECT event_id FROM leases)"
        )
        .await,
        total as i64
    );
    let delivered_by: Vec<(i64, Option<i64>)> =
        sqlx::query_as("SELECT id, last_delivery_at FROM instances ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        delivered_by[0].1, None,
        "A's late outcome recorded a delivery"
    );
    assert!(delivered_by[1].1.is_some(), "B's delivery was recorded");
    assert!(
        !b.logs().contains("outcomes ignored"),
        "B's settle was ignored: {}",
        b.logs()
    );
    // A, awake again, agrees.
    let sa = status(&a.base).await;
    assert_eq!(outbox_figures(&sa), outbox_figures(&st));

    let got = arrivals(tag, &mock.state().actions());
    let requests = mock.state().requests();
    eprintln!(
        "fencing ({what}): B took A's leases {taken_after:?} after A froze; A's late outcome \
         ignored; delivered={} (distinct at the mock {}), resends at the mock={}, inversions={}, \
         mock answers {:?}",
        st["delivered"],
        got.distinct.len(),
        got.resends,
        got.inversions.len(),
        requests.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(got.inversions.is_empty(), "{:?}", got.inversions);
    assert_eq!(got.distinct.len(), total);
    // A's 200 took its events at ChurnZero once already (B's request sends
    // them again); after a 503 only B's request took them.
    let resent = if requests[0].status == 200 {
        first.len()
    } else {
        0
    };
    assert_eq!(got.resends, resent);
    a.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_cannot_settle_as_delivered_what_another_took() {
    late_outcome_of_a_frozen_instance_changes_nothing(ScriptedAnswer::Ok, "200").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_cannot_put_back_to_retry_what_another_took() {
    late_outcome_of_a_frozen_instance_changes_nothing(ScriptedAnswer::Status(503), "503").await;
}
