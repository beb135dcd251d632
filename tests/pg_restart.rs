//! The real binary on PostgreSQL while the server restarts under load: the
//! server is stopped in immediate mode (as a crash would), kept down a few
//! seconds and started again, and the forwarder answers every ingest
//! request quickly (a 503 with `Retry-After` while the server is away, or a
//! 200 that was committed), says so on `/readyz`, recovers without a
//! restart and loses no acknowledged event.
//!
//! Stopping a server would break every other test using it, so this test
//! runs a PostgreSQL cluster of its own: `initdb` into a directory under the
//! target directory, on a port of its own, removed at the end. It needs the
//! server binaries (`initdb`, `pg_ctl`: `$PG_BIN`, else the newest
//! `/usr/lib/postgresql/<version>/bin`, else `pg_config --bindir`); without
//! them it skips with one line, under `CI=true` it fails. initdb refuses to
//! run as root: as root the cluster is made and run as the `postgres` user.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bound of every request the test makes: an answer that takes this long
/// is a hang, and fails the test.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the server stays down.
const OUTAGE: Duration = Duration::from_secs(4);
/// Longer than the old outcome retries lasted.
const LONG_OUTAGE: Duration = Duration::from_secs(26);

/// The directory holding `initdb` and `pg_ctl`.
fn server_binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    Some(PathBuf::from(String::from_utf8(out.stdout).ok()?.trim())).filter(|_| out.status.success())
}

/// The uid and gid of the `postgres` OS user, read from /etc/passwd.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
    let f: Vec<&str> = line.split(':').collect();
    let uid: u32 = f.get(2)?.parse().ok()?;
    let gid: u32 = f.get(3)?.parse().ok()?;
    Some((uid, gid))
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A throwaway PostgreSQL cluster: stopped and deleted when dropped.
struct Cluster {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    /// Run the server programs as `postgres` (the test runs as root).
    as_postgres: bool,
}

impl Cluster {
    /// Makes the cluster (not started), or `None` after the skip line when
    /// this machine has no server binaries; panics under `CI=true` instead.
    fn create() -> Option<Cluster> {
        let bin =
            server_binaries().filter(|b| b.join("initdb").is_file() && b.join("pg_ctl").is_file());
        let Some(bin) = bin else {
            skip_outside_ci(
                "the PostgreSQL server binaries (initdb, pg_ctl) are not installed",
                "install them with `apt-get install postgresql` or point $PG_BIN at their directory",
            );
            return None;
        };
        let as_postgres = running_as_root();
        let owner = if as_postgres {
            match postgres_user() {
                Some(ids) => Some(ids),
                None => {
                    skip_outside_ci(
                        "initdb refuses to run as root and there is no `postgres` user to run it as",
                        "run the tests as another user or create the `postgres` user",
                    );
                    return None;
                }
            }
        } else {
            None
        };
        let parent = test_deps_dir().with_file_name("test-pg");
        std::fs::create_dir_all(&parent).unwrap();
        remove_abandoned(&parent, &bin, as_postgres);
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let root = parent.join(format!("cluster-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("socket")).unwrap();
        if let Some((uid, gid)) = owner {
            for dir in [&root, &root.join("socket")] {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
            }
        }
        let cluster = Cluster {
            bin,
            root,
            port: free_port(),
            as_postgres,
        };
        // Trust authentication for the role the forwarder connects as, on
        // loopback only; no fsync at initdb (the files are throwaway), the
        // server itself runs with its defaults (fsync and synchronous
        // commit on), as in production.
        cluster.run(
            "initdb",
            &[
                "-D",
                cluster.data().to_str().unwrap(),
                "-U",
                "root",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        Some(cluster)
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} could not be started: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}): {}{}\nserver log: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
        );
    }

    /// Starts the server and waits until it accepts connections.
    fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.root.join("socket").display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                self.root.join("server.log").to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server the way a crash would: no checkpoint, no goodbye to
    /// the clients; the next start recovers from the WAL.
    fn stop_immediately(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://root@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self
                .command("pg_ctl")
                .args([
                    "-D",
                    self.data().to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Stops and deletes the clusters of test processes that are gone (a
/// killed run leaves its server running).
fn remove_abandoned(parent: &Path, bin: &Path, as_postgres: bool) {
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("cluster-"))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let stale = Cluster {
            bin: bin.to_path_buf(),
            root: entry.path(),
            port: 0,
            as_postgres,
        };
        drop(stale);
    }
}

/// A track event whose message id is also its description (how the mock's
/// actions are matched to what was acknowledged).
fn event(id: &str, user: usize) -> Value {
    let user_id = format!("user-{user}");
    json!({"type": "track", "userId": user_id, "event": "Restart Test", "messageId": id,
           "properties": {"description": id},
           "context": {"traits": {"accountExternalId": "acct", "contactExternalId": user_id}}})
}

/// How one ingest request ended (the failures' details are read through
/// `Debug`, in the failure message).
#[derive(Debug)]
#[allow(dead_code)]
enum Answer {
    Ok(Vec<String>),
    Unavailable { retry_after: Option<String> },
    Other(u16, String),
    TimedOut,
    Failed(String),
}

/// One `/readyz` probe: when it was sent, how long it took, its status
/// (`None`: no answer within the client's bound).
type Probe = (Instant, Duration, Option<u16>);

#[derive(Debug)]
struct Sent {
    at: Instant,
    took: Duration,
    answer: Answer,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_under_load_answers_503_quickly_and_loses_nothing() {
    restart_under_load(OUTAGE).await;
}

/// An outage longer than the outcome writes used to be retried (five
/// attempts, about 20 s): outcomes are now retried while their lease holds,
/// so the batches in flight when the server went away are recorded once it
/// is back, instead of staying leased, and their users stalled, until the
/// lease runs out (minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_longer_than_twenty_seconds_stalls_no_user_for_a_lease() {
    restart_under_load(LONG_OUTAGE).await;
}

async fn restart_under_load(outage_for: Duration) {
    let Some(cluster) = Cluster::create() else {
        return;
    };
    cluster.start();
    {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&cluster.url("postgres"))
            .await
            .expect("connect to the test cluster");
        sqlx::query("CREATE DATABASE outbox")
            .execute(&mut c)
            .await
            .unwrap();
        let _ = c.close().await;
    }
    let url = cluster.url("outbox");
    let mock = mock().await;
    let fwd = Binary::serve(Path::new(&url), &mock.url(), &["--batch-size", "50"]).await;
    let http = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .unwrap();

    // Steady ingest: four senders, batches of ten, paced.
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for s in 0..4 {
        let (http, base, sent, stop) = (http.clone(), fwd.base.clone(), sent.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let ids: Vec<String> = (0..10).map(|i| format!("pr-s{s}-b{n}-e{i}")).collect();
                let batch: Vec<Value> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| event(id, (s * 10 + i) % 24))
                    .collect();
                let at = Instant::now();
                let r = http
                    .post(format!("{base}/v1/batch"))
                    .basic_auth(WRITE_KEY, Some(""))
                    .json(&json!({ "batch": batch }))
                    .send()
                    .await;
                let answer = match r {
                    Ok(r) if r.status().as_u16() == 200 => Answer::Ok(ids),
                    Ok(r) if r.status().as_u16() == 503 => Answer::Unavailable {
                        retry_after: r
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .map(String::from),
                    },
                    Ok(r) => {
                        let code = r.status().as_u16();
                        Answer::Other(code, r.text().await.unwrap_or_default())
                    }
                    Err(e) if e.is_timeout() => Answer::TimedOut,
                    Err(e) => Answer::Failed(e.to_string()),
                };
                sent.lock().unwrap().push(Sent {
                    at,
                    took: at.elapsed(),
                    answer,
                });
                n += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }));
    }
    let acked_count = |sent: &Mutex<Vec<Sent>>| {
        sent.lock()
            .unwrap()
            .iter()
            .filter(|s| matches!(s.answer, Answer::Ok(_)))
            .count()
    };
    let state = mock.state();
    wait_for(
        "load under way and delivered",
        Duration::from_secs(30),
        || {
            let (sent, state) = (sent.clone(), state.clone());
            async move { (acked_count(&sent) >= 30 && state.actions().len() >= 100).then_some(()) }
        },
    )
    .await;

    // A readiness probe, as a load balancer would run it.
    let probes: Arc<Mutex<Vec<Probe>>> = Arc::default();
    let prober = {
        let (http, base, probes, stop) =
            (http.clone(), fwd.base.clone(), probes.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let at = Instant::now();
                let code = http
                    .get(format!("{base}/readyz"))
                    .send()
                    .await
                    .ok()
                    .map(|r| r.status().as_u16());
                probes.lock().unwrap().push((at, at.elapsed(), code));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // The outage.
    let down = Instant::now();
    tokio::task::block_in_place(|| cluster.stop_immediately());
    wait_for("/readyz to answer 503", Duration::from_secs(20), || {
        let probes = probes.clone();
        async move {
            probes
                .lock()
                .unwrap()
                .iter()
                .any(|(at, _, code)| *at >= down && *code == Some(503))
                .then_some(())
        }
    })
    .await;
    wait_for(
        "an ingest answer during the outage",
        Duration::from_secs(20),
        || {
            let sent = sent.clone();
            async move {
                sent.lock()
                    .unwrap()
                    .iter()
                    .any(|s| s.at >= down && !matches!(s.answer, Answer::Ok(_)))
                    .then_some(())
            }
        },
    )
    .await;
    if let Some(left) = outage_for.checked_sub(down.elapsed()) {
        tokio::time::sleep(left).await;
    }
    let restarting = Instant::now();
    tokio::task::block_in_place(|| cluster.start());
    let up = Instant::now();
    let outage = up - down;

    // Recovery without a restart: ingest answers 200 again, /readyz 200,
    // and delivery resumes.
    let delivered_at_up = state.actions().len();
    let recovered = wait_for(
        "an ingest 200 after the restart",
        Duration::from_secs(30),
        || {
            let sent = sent.clone();
            async move {
                sent.lock()
                    .unwrap()
                    .iter()
                    .filter(|s| s.at >= up && matches!(s.answer, Answer::Ok(_)))
                    .map(|s| s.at + s.took)
                    .min()
            }
        },
    )
    .await;
    wait_for(
        "/readyz 200 after the restart",
        Duration::from_secs(30),
        || {
            let probes = probes.clone();
            async move {
                probes
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|(at, _, code)| *at >= up && *code == Some(200))
                    .then_some(())
            }
        },
    )
    .await;
    wait_for(
        "delivery after the restart",
        Duration::from_secs(30),
        || {
            let state = state.clone();
            async move { (state.actions().len() > delivered_at_up + 100).then_some(()) }
        },
    )
    .await;
    let resumed = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        s.await.unwrap();
    }
    prober.await.unwrap();

    // Nothing acknowledged is lost.
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let acked: HashSet<String> = sent
        .iter()
        .filter_map(|s| match &s.answer {
            Answer::Ok(ids) => Some(ids.iter().cloned()),
            _ => None,
        })
        .flatten()
        .collect();
    common::wait_all_acked_at_mock(&state, &acked, Duration::from_secs(60)).await;
    let st = wait_status(&fwd.base, "pending", 0).await;
    let st = if st["in_flight"] == json!(0) {
        st
    } else {
        wait_status(&fwd.base, "in_flight", 0).await
    };

    // Every answer came within the client's bound; every refusal was a 503
    // with Retry-After.
    let during: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.at + s.took >= down && s.at <= recovered)
        .collect();
    let unavailable = during
        .iter()
        .filter(|s| matches!(s.answer, Answer::Unavailable { .. }))
        .count();
    let max_answer = during.iter().map(|s| s.took).max().unwrap_or_default();
    let probes = probes.lock().unwrap();
    let max_probe = probes.iter().map(|p| p.1).max().unwrap_or_default();
    let probe_503s = probes
        .iter()
        .filter(|(at, _, c)| *at >= down && *at < up && *c == Some(503))
        .count();
    let mut acks_at_mock = 0;
    let actions = state.actions();
    let mut counts = std::collections::HashMap::<&str, usize>::new();
    for a in &actions {
        if let Some(d) = a["description"].as_str() {
            *counts.entry(d).or_default() += 1;
        }
    }
    for id in &acked {
        if counts.contains_key(id.as_str()) {
            acks_at_mock += 1;
        }
    }
    let resends: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "postgres restart: outage {outage:?} (start took {:?}); requests {} ({} during the \
         outage, {unavailable} answered 503), max answer time during the outage {max_answer:?}, \
         ingest 200 again {:?} after the server was up, delivery resumed {:?} after; /readyz \
         503 x{probe_503s} while down, slowest probe {max_probe:?}; acked {} delivered {} \
         lost {} resends {resends}; status {}",
        up - restarting,
        sent.len(),
        during.len(),
        recovered.saturating_duration_since(up),
        resumed.saturating_duration_since(up),
        acked.len(),
        acks_at_mock,
        acked.len() - acks_at_mock,
        json!({"accepted": st["accepted"], "delivered": st["delivered"], "dead": st["dead"],
               "duplicates": st["duplicates"]}),
    );
    for s in &sent {
        match &s.answer {
            Answer::Ok(_) => {}
            Answer::Unavailable { retry_after } => {
                assert!(retry_after.is_some(), "a 503 without Retry-After: {s:?}")
            }
            other => panic!("an ingest answer that is neither 200 nor 503: {other:?} ({s:?})"),
        }
    }
    assert!(unavailable > 0, "no ingest request met the outage");
    assert!(
        probe_503s > 0,
        "/readyz never said 503 while the server was down"
    );
    assert!(
        probes.iter().all(|p| p.2.is_some()),
        "a /readyz probe got no answer within {CLIENT_TIMEOUT:?}"
    );
    assert_eq!(acks_at_mock, acked.len(), "acknowledged events lost");
    assert_eq!(st["dead"], json!(0), "{st}");
    drop(fwd);
}
