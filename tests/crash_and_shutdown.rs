//! The real binary under SIGKILL and SIGTERM. Killed repeatedly under
//! concurrent load and restarted on the same database, it loses no
//! acknowledged event; stopped with SIGTERM while ChurnZero hangs, it exits 0
//! within the request timeout plus a margin, and the next start delivers
//! everything.

mod common;

use churnzero_forwarder::mock_churnzero::{Faults, ScriptedAnswer};
use common::*;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn event(id: &str, user: usize) -> Value {
    json!({"type": "track", "userId": format!("user-{user}"), "event": "Crash Test", "messageId": id,
           "properties": {"description": id},
           "context": {"traits": {"accountExternalId": "acct", "contactExternalId": format!("user-{user}")}}})
}

on_both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_acknowledged_event(db: &Path) {
    let mock = mock().await;
    // A little latency keeps batches in flight when the kill lands.
    mock.state().set_faults(Faults {
        latency: Duration::from_millis(15),
        ..Faults::default()
    });
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let rounds = 6;
    for round in 0..rounds {
        let mut server = Binary::serve(db, &mock.url(), &["--batch-size", "50"]).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut senders = Vec::new();
        for sender in 0..8 {
            let base = server.base.clone();
            let acked = acked.clone();
            let stop = stop.clone();
            senders.push(tokio::spawn(async move {
                let http = client();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 10_000 {
                    let ids: Vec<String> = (0..20)
                        .map(|i| format!("r{round}-s{sender}-b{n}-e{i}"))
                        .collect();
                    let batch: Vec<Value> = ids
                        .iter()
                        .enumerate()
                        .map(|(i, id)| event(id, (sender * 3 + i) % 16))
                        .collect();
                    let r = http
                        .post(format!("{base}/v1/batch"))
                        .basic_auth(WRITE_KEY, Some(""))
                        .json(&json!({ "batch": batch }))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => acked.lock().unwrap().extend(ids),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                    n += 1;
                }
            }));
        }
        // Let load build, then kill at a different point each round.
        let target = acked.lock().unwrap().len() + 400 + round * 150;
        let started = Instant::now();
        while acked.lock().unwrap().len() < target && started.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in senders {
            let _ = s.await;
        }
    }
    let acked = acked.lock().unwrap().clone();
    let last = Binary::serve(db, &mock.url(), &[]).await;
    common::wait_all_acked_at_mock(&mock.state(), &acked, Duration::from_secs(120)).await;
    let st = wait_status(&last.base, "pending", 0).await;
    let actions = mock.state().actions();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for a in &actions {
        *counts
            .entry(a["description"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let delivered_acked = acked.iter().filter(|id| counts.contains_key(*id)).count();
    let lost = acked.len() - delivered_acked;
    let duplicate_sends: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "crash test: rounds={rounds} acked={} delivered={} (distinct events at the mock {}) lost={lost} duplicate_sends={duplicate_sends} status={st}",
        acked.len(),
        delivered_acked,
        counts.len()
    );
    assert_eq!(lost, 0, "no acknowledged event is lost");
    assert!(acked.len() > 2000, "the load was real: {}", acked.len());
    assert_eq!(st["dead"], json!(0));
}
}

#[tokio::test]
async fn sigterm_while_churnzero_hangs_exits_zero_and_the_next_start_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    mock.state()
        .push_script(std::iter::repeat_n(ScriptedAnswer::Hang, 50));
    let mut server = Binary::serve(&db, &mock.url(), &["--request-timeout", "2s"]).await;
    let events: Vec<Value> = (0..30).map(|i| event(&format!("sd-{i}"), i % 3)).collect();
    let (s, _) = post(&server.base, "/v1/batch", &json!({ "batch": events })).await;
    assert_eq!(s, 200);
    // Wait until a request is hanging at the mock.
    let st = mock.state();
    wait_for("a hanging request", Duration::from_secs(30), || {
        let st = st.clone();
        async move { (st.request_count() > 0).then_some(()) }
    })
    .await;
    let started = Instant::now();
    server.sigterm();
    // /readyz turns 503 (or the listener closes) once the signal is handled.
    let base = server.base.clone();
    wait_for(
        "/readyz to stop answering 200",
        Duration::from_secs(10),
        || {
            let base = base.clone();
            async move {
                match client().get(format!("{base}/readyz")).send().await {
                    Ok(r) if r.status().is_success() => None,
                    _ => Some(()),
                }
            }
        },
    )
    .await;
    let mut child = std::mem::replace(
        &mut server.child,
        std::process::Command::new("true").spawn().unwrap(),
    );
    let code = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        code.success(),
        "exit 0 after SIGTERM: {code}; logs: {}",
        server.logs()
    );
    assert!(
        took < Duration::from_secs(2 + 8),
        "stopped within the request timeout plus a margin: {took:?}"
    );
    let logs = server.logs();
    assert!(logs.contains("shutdown requested"), "{logs}");
    // The last act of a clean stop folds the WAL into the database file:
    // the next start has nothing to read back.
    let wal = std::fs::metadata(db.with_extension("db-wal"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(wal, 0, "WAL left after a clean stop: {wal} bytes");

    mock.state().reset();
    let next = Binary::serve(&db, &mock.url(), &[]).await;
    wait_status(&next.base, "delivered", 30).await;
    let got: HashSet<String> = mock
        .state()
        .actions()
        .iter()
        .map(|a| a["description"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got.len(), 30);
}

/// Waits for the child to exit, off the runtime.
async fn wait_exit(server: &mut Binary) -> std::process::ExitStatus {
    let mut child = std::mem::replace(
        &mut server.child,
        std::process::Command::new("true").spawn().unwrap(),
    );
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn shutdown_delay_keeps_ingest_serving_while_readyz_answers_503() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    // The delay leaves room for a loaded machine: the checks below must all
    // land inside it (a 3 s delay was missed once with the suite running).
    let mut server = Binary::serve(&db, &mock.url(), &["--shutdown-delay", "6s"]).await;
    let started = Instant::now();
    server.sigterm();
    let base = server.base.clone();
    wait_for("/readyz to answer 503", Duration::from_secs(10), || {
        let base = base.clone();
        async move {
            let r = client().get(format!("{base}/readyz")).send().await.ok()?;
            (r.status().as_u16() == 503).then_some(())
        }
    })
    .await;
    // A load balancer still sending during the delay is served and acked.
    let (code, body) = post(&server.base, "/v1/track", &event("during-delay", 1)).await;
    assert_eq!(code, 200, "{body}");
    let r = client()
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the checks above ran inside the delay: {:?}",
        started.elapsed()
    );
    let code = wait_exit(&mut server).await;
    assert!(code.success(), "exit 0: {code}; logs: {}", server.logs());
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "the listener stayed open for the whole delay"
    );
    // What was acknowledged during the delay is in the outbox.
    let next = Binary::serve(&db, &mock.url(), &[]).await;
    wait_status(&next.base, "delivered", 1).await;
}

#[tokio::test]
async fn a_clean_start_does_not_claim_disk_space_came_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let mut server = Binary::serve(&db, &mock.url(), &[]).await;
    server.sigterm();
    let code = wait_exit(&mut server).await;
    let logs = server.logs();
    assert!(code.success(), "exit 0: {code}; logs: {logs}");
    assert!(logs.contains("churnzero-forwarder serving"), "{logs}");
    assert!(!logs.contains("disk space is back"), "{logs}");
}

/// A SIGTERM that arrives while the forwarder is still starting (the port
/// already listens, `/readyz` not yet 200) stops it cleanly, not by death
/// from the signal: a supervisor that stops a replica during a rollout gets
/// exit 0 however early it asks, and the outbox opens again as before.
#[tokio::test]
async fn a_sigterm_while_starting_is_a_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    let mut server = Binary::serve_listening(&db, &mock.url()).await;
    server.sigterm();
    let code = wait_exit(&mut server).await;
    let logs = server.logs();
    assert!(code.success(), "exit 0: {code}; logs: {logs}");
    assert!(logs.contains("shutdown requested"), "{logs}");
    let mut next = Binary::serve(&db, &mock.url(), &[]).await;
    let (code, body) = post(&next.base, "/v1/track", &event("after-early-stop", 1)).await;
    assert_eq!(code, 200, "{body}");
    next.sigterm();
    assert!(wait_exit(&mut next).await.success());
}

/// Each cause is printed once at the binary's edge, however the error
/// types nest their sources.
#[tokio::test]
async fn start_errors_print_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let db_arg = db.to_str().unwrap();
    let base = [
        "serve",
        "--database",
        db_arg,
        "--write-key",
        WRITE_KEY,
        "--churnzero-url",
        "http://127.0.0.1:9",
        "--churnzero-app-key",
        APP_KEY,
    ];
    let mut args = base.to_vec();
    args.extend(["--listen", addr.as_str()]);
    let (code, _, stderr) = run_binary(&args).await;
    assert_ne!(code, 0);
    assert!(stderr.contains(&addr), "{stderr}");
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );

    let missing = dir.path().join("missing.toml");
    let mut args = base.to_vec();
    args.extend([
        "--listen",
        "127.0.0.1:0",
        "--mapping",
        missing.to_str().unwrap(),
    ]);
    let (code, _, stderr) = run_binary(&args).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("missing.toml"), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}
