//! One `serve` per SQLite file, with the real binary: a second one refuses
//! at once and names the file and the holder; the offline writers still
//! work beside the owner; a `kill -9` leaves nothing that blocks a restart.
//! Also: the offline commands on a file that is no outbox say so in one
//! sentence and create nothing.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Runs a second `serve` on `db` and waits for it to exit (it must, at once).
fn second_serve(db: &Path, churnzero_url: &str) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let mut child = std::process::Command::new(binary_path())
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--database")
        .arg(db)
        .args(["--write-key", WRITE_KEY, "--churnzero-url", churnzero_url])
        .args(["--churnzero-app-key", APP_KEY])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A server that started would run forever: give it ten seconds, then
    // report what it did.
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err, started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            return (None, err, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_second_serve_on_one_file_refuses_and_the_first_keeps_its_leases() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    // ChurnZero answers slowly: the first server has events in flight (under
    // lease) when the second one starts; a second owner would release them
    // and send them again beside the first.
    mock.state()
        .set_faults(churnzero_forwarder::mock_churnzero::Faults {
            latency: Duration::from_millis(1500),
            ..Default::default()
        });
    let mut first = Binary::serve(&db, &mock.url(), &[]).await;
    let (code, body) = post(&first.base, "/v1/track", &track("u-owner", "Leased", 1)).await;
    assert_eq!(code, 200, "{body}");
    wait_status(&first.base, "in_flight", 1).await;

    let (code, err, took) = second_serve(&db, &mock.url());
    assert_eq!(
        code,
        Some(1),
        "the second serve must exit non-zero at once: {err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    let pid = first.child.id().to_string();
    assert!(err.contains(db.to_str().unwrap()), "names the file: {err}");
    assert!(
        err.contains(&format!("pid {pid}")),
        "names the holder: {err}"
    );
    // The first one's lease was not touched: the event is sent once.
    wait_status(&first.base, "delivered", 1).await;
    assert_eq!(mock.state().request_count(), 1, "sent once, by its owner");
    assert!(first.alive());

    // kill -9: the kernel drops the lock with the process; the next start
    // is not blocked by anything left behind.
    first.kill9();
    assert!(
        dir.path().join("o.db.lock").exists(),
        "the lock file stays; its lock does not"
    );
    let again = Binary::serve(&db, &mock.url(), &[]).await;
    assert_eq!(status(&again.base).await["delivered"], 1);
}

#[tokio::test]
async fn dead_replay_and_purge_work_beside_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    poison_mock(&mock);
    let server = Binary::serve(&db, &mock.url(), &[]).await;
    let batch: Vec<Value> = (1..=2).map(|n| track("u-poison", POISON, n)).collect();
    let (code, body) = post(&server.base, "/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(code, 200, "{body}");
    wait_status(&server.base, "dead", 2).await;
    let dbs = db.to_str().unwrap();
    let before = mock.state().request_count();

    let (code, out, err) =
        run_binary(&["dead", "replay", "--all", "--json", "--database", dbs]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["replayed"], 2);
    // The server picks the replayed events up (and the mock refuses them again).
    wait_for(
        "the replayed events to be sent",
        Duration::from_secs(30),
        || async { (mock.state().request_count() > before).then_some(()) },
    )
    .await;
    wait_status(&server.base, "dead", 2).await;

    let (code, out, err) =
        run_binary(&["dead", "purge", "--all", "--json", "--database", dbs]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["purged"], 2);
    wait_status(&server.base, "dead", 0).await;
}

#[tokio::test]
async fn status_on_a_file_that_is_no_outbox_says_so_once_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(
        &text,
        "not a database, just some text that is long enough\n".repeat(20),
    )
    .unwrap();
    // Another program's SQLite file.
    let foreign = dir.path().join("foreign.db");
    {
        use sqlx::{ConnectOptions, Connection};
        let mut c = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&foreign)
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        sqlx::query("CREATE TABLE notes (body TEXT)")
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
    }
    for (path, says) in [
        (&empty, "has no outbox yet"),
        (&text, "is not a churnzero-forwarder database"),
        (&foreign, "is not a churnzero-forwarder database"),
    ] {
        for args in [
            vec!["status"],
            vec!["status", "--json"],
            vec!["dead", "list"],
            vec!["dead", "purge", "--all"],
        ] {
            let mut all = args.clone();
            all.extend(["--database", path.to_str().unwrap()]);
            let (code, out, err) = run_binary(&all).await;
            assert_eq!(code, 1, "{all:?}: {out}{err}");
            assert!(err.contains(says), "{all:?}: {err}");
            assert!(err.contains(path.to_str().unwrap()), "{all:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
            assert!(!err.contains("_sqlx_migrations"), "{err}");
        }
    }
    let missing = dir.path().join("missing.db");
    let (code, _, err) = run_binary(&["status", "--database", missing.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no database at"), "{err}");
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["empty.db", "foreign.db", "notes.txt"],
        "nothing created"
    );
}

/// The highest migration applied to a file.
async fn schema_version(db: &Path) -> i64 {
    use sqlx::{ConnectOptions, Connection};
    let mut c = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .connect()
        .await
        .unwrap();
    let v: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    v
}

#[tokio::test]
async fn offline_writers_never_migrate_beside_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    // A file of an older schema (the first three migrations only).
    let migrations = tempfile::tempdir().unwrap();
    for name in ["0001_outbox.sql", "0002_sync_lane.sql", "0003_aliases.sql"] {
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations/sqlite")
                .join(name),
            migrations.path().join(name),
        )
        .unwrap();
    }
    {
        use sqlx::Connection;
        let url = format!("sqlite://{}?mode=rwc", db.display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::migrate::Migrator::new(migrations.path())
            .await
            .unwrap()
            .run(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    let dbs = db.to_str().unwrap();

    // An older server holds the file (its lock is what tells).
    let held = churnzero_forwarder::outbox::DatabaseLock::acquire(&db).unwrap();
    for command in ["replay", "purge"] {
        let (code, _, err) = run_binary(&["dead", command, "--all", "--database", dbs]).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("schema is at version 3"), "{err}");
        assert!(
            err.contains(&format!("serve (pid {}) holds it", std::process::id())),
            "{err}"
        );
    }
    assert_eq!(
        schema_version(&db).await,
        3,
        "nothing migrated beside the server"
    );

    // Once no server holds it, the offline command may bring it up to date.
    drop(held);
    let (code, out, err) = run_binary(&["dead", "purge", "--all", "--database", dbs]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("purged 0 dead events"), "{out}");
    assert!(schema_version(&db).await > 3);
}
