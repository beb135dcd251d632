//! Backpressure and a full disk, against the real binary: beyond
//! `--max-backlog`, or when SQLite cannot grow the database (SQLITE_FULL, an
//! I/O error), ingest answers 503 with `Retry-After`, keeps no part of the
//! refused batch, the process stays up, delivery goes on, and ingest works
//! again by itself once there is room.

mod common;

use churnzero_forwarder::mock_churnzero::{Faults, MockChurnZero};
use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// A batch of `n` track events with explicit message ids `{tag}-{i}`, each
/// padded to about `pad` bytes so that the database grows quickly.
fn batch(tag: &str, n: usize, pad: usize) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|i| {
            let mut e = track(&format!("user-{tag}-{}", i % 7), "Filled", i);
            e["messageId"] = json!(format!("{tag}-{i}"));
            e["properties"]["padding"] = json!("p".repeat(pad));
            e
        })
        .collect();
    json!({ "batch": events })
}

/// POSTs a batch and returns status, `Retry-After` and the JSON answer.
async fn send(base: &str, body: &Value) -> (u16, Option<String>, Value) {
    let r = client()
        .post(format!("{base}/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry_after, r.json().await.unwrap_or(Value::Null))
}

fn assert_503(what: &str, answer: &(u16, Option<String>, Value), reason: &str) {
    let (status, retry_after, body) = answer;
    assert_eq!(*status, 503, "{what}: {body}");
    let secs: u64 = retry_after
        .as_deref()
        .unwrap_or_else(|| panic!("{what}: 503 without Retry-After"))
        .parse()
        .expect("Retry-After in seconds");
    assert!(secs > 0, "{what}: Retry-After {secs}");
    assert_eq!(body["success"], json!(false), "{what}: {body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains(reason), "{what}: `{error}` lacks `{reason}`");
}

async fn accepted(base: &str) -> i64 {
    status(base).await["accepted"].as_i64().expect("accepted")
}

fn set_fail_rate(mock: &MockChurnZero, rate: f64) {
    mock.state().set_faults(Faults {
        fail_rate: rate,
        fail_status: 503,
        ..Faults::default()
    });
}

/// Message ids of tracked events the mock accepted (answered 200).
fn delivered_ids(mock: &MockChurnZero, tag: &str) -> usize {
    mock.state()
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .flat_map(|r| r.actions.iter())
        .filter(|a| {
            a["description"]
                .as_str()
                .is_some_and(|d| d.starts_with("Filled"))
                && a["contactExternalId"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&format!("user-{tag}-")))
        })
        .count()
}

/// Counts the rows of the database that belong to message ids `{tag}-*`,
/// read straight from the file: events and remembered message ids.
async fn rows_with_tag(db: &Path, tag: &str) -> (i64, i64) {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await
        .expect("open the outbox read-only");
    let pattern = format!("{tag}-%");
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE message_id LIKE ?")
        .bind(&pattern)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let ids: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM message_ids WHERE message_id LIKE ?")
        .bind(&pattern)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    (events, ids)
}

#[tokio::test(flavor = "multi_thread")]
async fn backlog_limit_answers_503_with_retry_after_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    set_fail_rate(&mock, 1.0); // ChurnZero down: the backlog builds up
    let bin = Binary::serve(&db, &mock.url(), &["--max-backlog", "5"]).await;

    let (s, _, v) = send(&bin.base, &batch("first", 5, 10)).await;
    assert_eq!(s, 200, "{v}");
    let over = batch("over", 2, 10);
    let answer = send(&bin.base, &over).await;
    assert_503("backlog full", &answer, "backlog");
    let (s, _, v) = post_one(&bin.base).await;
    assert_eq!(s, 503, "a single event over the backlog: {v}");
    assert_eq!(accepted(&bin.base).await, 5, "refusals store nothing");
    assert_eq!(rows_with_tag(&db, "over").await, (0, 0));
    let health = client()
        .get(format!("{}/healthz", bin.base))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());

    // ChurnZero recovers: the backlog drains and ingest takes events again,
    // the refused batch included (nothing of it was remembered).
    set_fail_rate(&mock, 0.0);
    wait_status(&bin.base, "delivered", 5).await;
    let (s, _, v) = send(&bin.base, &over).await;
    assert_eq!((s, v), (200, json!({"success": true})));
    wait_status(&bin.base, "delivered", 7).await;
    assert_eq!(delivered_ids(&mock, "over"), 2);
}

async fn post_one(base: &str) -> (u16, Option<String>, Value) {
    let r = client()
        .post(format!("{base}/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&track("single", "Filled", 0))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let ra = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (s, ra, r.json().await.unwrap_or(Value::Null))
}

/// Fills the outbox with batches until one is refused; returns that batch's
/// answer and tag, with how many batches were stored before it.
async fn fill_until_refused(base: &str, per_batch: usize, pad: usize) -> (usize, String) {
    for i in 0..400 {
        let tag = format!("fill{i}");
        let answer = send(base, &batch(&tag, per_batch, pad)).await;
        match answer.0 {
            200 => continue,
            _ => {
                assert_503("disk full", &answer, "storage is full");
                return (i, tag);
            }
        }
    }
    panic!("the database never filled up");
}

#[tokio::test(flavor = "multi_thread")]
async fn full_database_answers_503_keeps_draining_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    set_fail_rate(&mock, 1.0);
    // 400 pages of 4 KiB: room for a few hundred padded events. The last
    // eighth is the reserve that delivery gets once ingest has filled the
    // rest (on a real disk, the reserve file). Delivered events are pruned
    // one second after delivery, which is how room comes back.
    let mut bin = Binary::serve_with_env(
        &db,
        &mock.url(),
        &["--retention", "1s"],
        &[("FORWARDER_SQLITE_MAX_PAGE_COUNT", "400")],
    )
    .await;

    let (stored_batches, refused) = fill_until_refused(&bin.base, 20, 1500).await;
    assert!(stored_batches > 0, "some batches fit before the limit");
    let before = accepted(&bin.base).await;
    assert_eq!(before, 20 * stored_batches as i64);
    assert_eq!(
        rows_with_tag(&db, &refused).await,
        (0, 0),
        "no part of a refused batch is kept"
    );
    // Still full: refused again, and the process is up and answering.
    let again = send(&bin.base, &batch(&refused, 20, 1500)).await;
    assert_503("still full", &again, "storage is full");
    assert_eq!(accepted(&bin.base).await, before);
    assert!(bin.alive());
    let s = status(&bin.base).await;
    let waiting = s["pending"].as_i64().unwrap() + s["in_flight"].as_i64().unwrap();
    assert_eq!(waiting, before, "{s}");

    // ChurnZero comes back: delivery drains the full database, retention
    // frees the delivered rows, and the refused batch is taken on retry.
    set_fail_rate(&mock, 0.0);
    wait_status(&bin.base, "delivered", before).await;
    let answer = common::wait_for("ingest to recover", Duration::from_secs(60), || {
        let base = bin.base.clone();
        let body = batch(&refused, 20, 1500);
        async move {
            let a = send(&base, &body).await;
            (a.0 != 503).then_some(a)
        }
    })
    .await;
    assert_eq!(answer.0, 200, "{}", answer.2);
    assert_eq!(
        answer.2,
        json!({"success": true}),
        "all 20 new, none a duplicate"
    );
    wait_status(&bin.base, "pending", 0).await;
    common::wait_for(
        "the refused batch delivered",
        Duration::from_secs(30),
        || {
            let n = delivered_ids(&mock, &refused);
            async move { (n == 20).then_some(()) }
        },
    )
    .await;
    let logs = bin.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(
        logs.contains("database full: released the reserve"),
        "{logs}"
    );
    assert!(logs.contains("database space is back"), "{logs}");
}

/// A small tmpfs mounted for one test and unmounted when dropped.
struct SmallFs {
    dir: std::path::PathBuf,
}

impl SmallFs {
    /// Mounts a tmpfs of `size` (e.g. `8m`). When this machine does not let
    /// the test mount one (not root, or no mount rights), `None` after one
    /// loud line, so the caller returns; under `CI=true`, where CI runs as
    /// root, a refused mount fails the test instead of passing it unrun.
    fn mount(dir: &Path, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(dir).unwrap();
        let refused = match std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
        {
            Err(e) => Some(format!("`mount` cannot be started: {e}")),
            Ok(out) if !out.status.success() => {
                Some(String::from_utf8_lossy(&out.stderr).trim().to_string())
            }
            Ok(_) => None,
        };
        if let Some(why) = refused {
            common::skip_outside_ci(
                &format!("mounting a small tmpfs to fill up was refused ({why})"),
                "run the tests as root, as CI does,",
            );
            return None;
        }
        Some(SmallFs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// Writes zeros into `path` until the filesystem refuses (ENOSPC).
fn fill_filesystem(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 16 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
                break;
            }
        }
        if written > 1 << 30 {
            panic!("the filesystem never filled up");
        }
    }
    let _ = f.sync_all();
    written
}

#[tokio::test(flavor = "multi_thread")]
async fn full_filesystem_answers_503_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(&dir.path().join("small"), "40m") else {
        return;
    };
    let db = fs.dir.join("o.db");
    let mock = mock().await;
    set_fail_rate(&mock, 1.0);
    let mut bin = Binary::serve(&db, &mock.url(), &[]).await;

    let (s, _, v) = send(&bin.base, &batch("early", 20, 1500)).await;
    assert_eq!(s, 200, "{v}");
    // Something else fills the disk.
    let ballast = fs.dir.join("ballast");
    let written = fill_filesystem(&ballast);
    assert!(written > 0);

    let (stored, refused) = fill_until_refused(&bin.base, 20, 1500).await;
    let before = accepted(&bin.base).await;
    eprintln!("ballast {written} bytes; {stored} batches stored after it; {before} accepted");
    assert_eq!(rows_with_tag(&db, &refused).await, (0, 0));
    assert!(bin.alive());
    let health = client()
        .get(format!("{}/healthz", bin.base))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());
    // Delivery goes on with the disk still full, in the room the released
    // reserve file gave back; ingest stays refused meanwhile.
    assert!(!fs.dir.join("o.db-reserve").exists(), "reserve released");
    set_fail_rate(&mock, 0.0);
    wait_status(&bin.base, "delivered", before).await;
    assert!(fs.dir.join("ballast").exists());
    assert_503(
        "full after draining",
        &send(&bin.base, &batch(&refused, 20, 1500)).await,
        "full",
    );

    // The disk has room again: no restart, the same batch is taken whole.
    std::fs::remove_file(&ballast).unwrap();
    let answer = common::wait_for("ingest to recover", Duration::from_secs(30), || {
        let base = bin.base.clone();
        let body = batch(&refused, 20, 1500);
        async move {
            let a = send(&base, &body).await;
            (a.0 != 503).then_some(a)
        }
    })
    .await;
    assert_eq!(answer.2, json!({"success": true}), "status {}", answer.0);
    assert_eq!(accepted(&bin.base).await, before + 20);
    wait_status(&bin.base, "delivered", before + 20).await;
    assert_eq!(delivered_ids(&mock, &refused), 20);
    assert!(fs.dir.join("o.db-reserve").exists(), "reserve held again");
    drop(bin);
    drop(fs);
}
