//! A replay or purge of every dead letter runs in bounded chunks, each its
//! own transaction, so ingest commits between them instead of waiting for
//! the whole set: through the server's writer (what `/admin/` uses) and
//! through the offline CLI beside a running server (the real binary).
//!
//! The race is structural: the test sends its ingest after the first chunk
//! has committed, and there are dozens of chunks left, so with one big
//! transaction the ingest could only commit after all of it.

mod common;

use churnzero_forwarder::outbox::{NewEvent, Outbox, WriterConfig};
use common::*;
use sqlx::{ConnectOptions, Connection};
use std::path::Path;
use std::time::Duration;

/// Dozens of chunks of the outbox's `DEAD_CHUNK` (500).
const DEAD: i64 = 30_000;
/// The CLI pauses between chunks (beside a server): fewer, still many.
const CLI_DEAD: i64 = 5_000;

/// Writes `n` dead letters (one user each) straight into the database, as
/// a long outage would have left them. The state counters are kept by the
/// code that inserts (no insert trigger: SQLite's migration 0007,
/// PostgreSQL's 0013), so the seed counts its rows itself, in the same
/// transaction (on PostgreSQL, the same statement).
async fn seed_dead(db: &Path, n: i64) {
    let columns = "INSERT INTO events (source, message_id, kind, order_key, payload, state, \
                   attempts, accepted_at, next_attempt_at, finished_at, reason, last_error) \
                   SELECT 'seed', 'dead-' || i, 'track', 'user-' || i, \
                   '{\"type\":\"track\",\"userId\":\"user-' || i || '\",\"event\":\"Old\"}', \
                   3, 1, 1700000000000 + i, 1700000000000 + i, 1700000001000 + i, \
                   'retry budget exhausted: HTTP 503', 'HTTP 503'";
    execute(
        db,
        &format!(
            "BEGIN; \
             WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < {n}) \
             {columns} FROM seq; \
             UPDATE state_counts SET n = n + {n} WHERE state = 3; \
             COMMIT"
        ),
        &format!(
            "WITH ins AS ({columns} FROM generate_series(1, {n}) AS i RETURNING 1) \
             UPDATE counters SET s3 = s3 + (SELECT count(*) FROM ins) WHERE shard = 0"
        ),
    )
    .await;
}

/// Runs one statement straight on the database: `sqlite` on a file, `pg`
/// on a PostgreSQL URL.
async fn execute(db: &Path, sqlite: &str, pg: &str) {
    if let Some(url) = churnzero_forwarder::outbox::postgres_url(db) {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(pg).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        return;
    }
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    sqlx::query(sqlite).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

fn event(user: &str) -> NewEvent {
    NewEvent {
        source: "source-hash".into(),
        message_id: format!("m-{user}"),
        kind: "track",
        order_key: user.into(),
        payload: format!(r#"{{"type":"track","userId":"{user}","event":"New"}}"#),
        forward: true,
        identity: None,
        audience: Vec::new(),
    }
}

/// Waits until the first chunk has committed (or the whole operation is
/// over, which the caller then reports).
async fn first_chunk_done(outbox: &Outbox, task: &tokio::task::JoinHandle<u64>) {
    wait_for("the first chunk", Duration::from_secs(60), || async {
        let dead = outbox.status().await.unwrap().dead;
        (dead < DEAD || task.is_finished()).then_some(())
    })
    .await;
}

on_both_backends! {
#[tokio::test]
async fn ingest_commits_between_the_chunks_of_a_replay_and_a_purge_of_everything(db: &Path) {
    drop(Outbox::open(db, WriterConfig::default()).await.unwrap());
    seed_dead(db, DEAD).await;
    let outbox = Outbox::open(db, WriterConfig::default()).await.unwrap();
    assert_eq!(outbox.status().await.unwrap().dead, DEAD);

    let writer = outbox.clone();
    let replay = tokio::spawn(async move { writer.replay(None).await.unwrap() });
    first_chunk_done(&outbox, &replay).await;
    outbox.ingest(vec![event("during-replay")]).await.unwrap();
    assert!(
        !replay.is_finished(),
        "the ingest waited for the whole replay"
    );
    assert_eq!(replay.await.unwrap(), DEAD as u64);
    let s = outbox.status().await.unwrap();
    assert_eq!((s.dead, s.pending), (0, DEAD + 1));

    // Dead again (straight in the database), then purged the same way.
    drop(outbox);
    let again = "UPDATE events SET state = 3 WHERE message_id LIKE 'dead-%'";
    execute(db, again, again).await;
    let outbox = Outbox::open(db, WriterConfig::default()).await.unwrap();
    assert_eq!(outbox.status().await.unwrap().dead, DEAD);
    let writer = outbox.clone();
    let purge = tokio::spawn(async move { writer.purge(None).await.unwrap() });
    first_chunk_done(&outbox, &purge).await;
    outbox.ingest(vec![event("during-purge")]).await.unwrap();
    assert!(
        !purge.is_finished(),
        "the ingest waited for the whole purge"
    );
    assert_eq!(purge.await.unwrap(), DEAD as u64);
    assert_eq!(outbox.status().await.unwrap().dead, 0);
}
}

on_both_backends! {
#[tokio::test]
async fn the_cli_replay_of_everything_lets_the_servers_ingest_through(db: &Path) {
    let mock = mock().await;
    // Store only: the replayed events stay put, so the counts tell the chunks.
    let server = Binary::serve(db, &mock.url(), &["--no-delivery"]).await;
    seed_dead(db, CLI_DEAD).await;
    wait_status(&server.base, "dead", CLI_DEAD).await;

    let mut cli = tokio::process::Command::new(binary_path())
        .args(["dead", "replay", "--all", "--database"])
        .arg(db)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let dead = status(&server.base).await["dead"].as_i64().unwrap();
        if dead < CLI_DEAD || cli.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no chunk committed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (code, body) = post(&server.base, "/v1/track", &track("u-live", "Live", 1)).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        cli.try_wait().unwrap().is_none(),
        "ingest got its answer only after the CLI's whole replay"
    );
    let out = cli.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(&server.base).await;
    assert_eq!(
        (s["dead"].as_i64(), s["accepted"].as_i64()),
        (Some(0), Some(1))
    );
}
}

on_both_backends! {
#[tokio::test]
async fn ingest_is_answered_while_an_admin_replay_of_everything_runs(db: &Path) {
    let mock = mock().await;
    let mut s = settings(db, &mock.url());
    s.deliver = false;
    let server = start(s).await;
    let base = format!("http://{}", server.addr);
    seed_dead(db, DEAD).await;
    wait_status(&base, "dead", DEAD).await;

    let url = format!("{base}/admin/dead/replay");
    let replay = tokio::spawn(async move {
        let r = client()
            .post(url)
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({ "all": true }))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    wait_for("the first chunk", Duration::from_secs(60), || async {
        let dead = status(&base).await["dead"].as_i64().unwrap();
        (dead < DEAD || replay.is_finished()).then_some(())
    })
    .await;
    let (code, body) = post(&base, "/v1/track", &track("u-live", "Live", 1)).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        !replay.is_finished(),
        "ingest got its answer only after the whole replay"
    );
    let (code, body) = replay.await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&format!("\"replayed\":{DEAD}")), "{body}");
    server.shutdown().await;
}
}
