//! The SQLite status read (`Outbox::status`) reads all its figures in one read transaction. A client
//! that disconnects, a request or scrape timeout, drops the status future
//! wherever it is; the pooled connection must not go back to the pool
//! inside that transaction (a stale snapshot for the identity look-ups that
//! use it next, checkpoints that cannot pass it, every later status on it
//! failing). The test drops the future at every point it can stop at.

use churnzero_forwarder::outbox::{IdentityUpdate, NewEvent, Outbox, WriterConfig};
use sqlx::{ConnectOptions, Connection};
use std::future::Future;
use std::task::Context;
use std::time::Duration;

fn event(n: u32, user: &str, identity: Option<IdentityUpdate>) -> NewEvent {
    NewEvent {
        source: "source-hash".into(),
        message_id: format!("m-{user}-{n}"),
        kind: if identity.is_some() {
            "identify"
        } else {
            "track"
        },
        order_key: user.into(),
        payload: format!(r#"{{"type":"track","userId":"{user}","event":"e{n}"}}"#),
        forward: true,
        identity,
        audience: Vec::new(),
    }
}

/// Polls `fut` at most `polls` times, letting SQLite's worker thread run
/// between polls, then drops it. True when it finished before that.
async fn poll_then_drop<F: Future>(fut: F, polls: usize) -> bool {
    let mut fut = std::pin::pin!(fut);
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    for _ in 0..polls {
        if fut.as_mut().poll(&mut cx).is_ready() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

#[tokio::test]
async fn a_status_dropped_midway_leaves_no_read_transaction_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let outbox = Outbox::open(&path, WriterConfig::default()).await.unwrap();
    let events: Vec<NewEvent> = (1..=20).map(|n| event(n, &format!("u{n}"), None)).collect();
    outbox.ingest(events).await.unwrap();

    // Drop it after 1 poll, after 2, ... until it completes within the
    // budget: every await point of the status read is a drop point once.
    // On a loaded machine SQLite's worker may run several steps between two
    // polls, so the sweep is repeated (each round drops more futures) until
    // one round stopped it at three points or more.
    let mut dropped = 0;
    for _round in 0..10 {
        let mut this_round = 0;
        for polls in 1..400 {
            if poll_then_drop(outbox.status(), polls).await {
                break;
            }
            this_round += 1;
        }
        dropped = dropped.max(this_round);
        if dropped >= 3 {
            break;
        }
    }
    assert!(
        dropped >= 3,
        "the status read stopped at only {dropped} points"
    );

    // Every pooled connection at once (the pool holds at most 4): none is
    // inside a transaction, and each sees a write made now.
    outbox
        .ingest(vec![event(
            1,
            "late-user",
            Some(IdentityUpdate {
                user_id: "late-user".into(),
                account: Some("acc-late".into()),
                contact: Some("con-late".into()),
                previous_id: None,
            }),
        )])
        .await
        .unwrap();
    let pool = outbox.as_sqlite().expect("an SQLite outbox").reader.pool();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(pool.acquire().await.unwrap());
    }
    for conn in &mut held {
        let account: Option<String> =
            sqlx::query_scalar("SELECT account_id FROM identities WHERE user_id = 'late-user'")
                .fetch_optional(&mut **conn)
                .await
                .unwrap();
        assert_eq!(
            account.as_deref(),
            Some("acc-late"),
            "a pooled connection reads an old snapshot"
        );
        // A connection left inside a transaction refuses a new one.
        sqlx::query("BEGIN").execute(&mut **conn).await.unwrap();
        sqlx::query("ROLLBACK").execute(&mut **conn).await.unwrap();
    }
    drop(held);
    for _ in 0..8 {
        let s = outbox.status().await.unwrap();
        assert_eq!(s.pending, 21);
    }
    let ids = outbox.identities(&["late-user"]).await.unwrap();
    assert_eq!(ids["late-user"].0.as_deref(), Some("acc-late"));

    // No reader pins the WAL: a full checkpoint gets through.
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        busy, 0,
        "a reader still holds a snapshot: the checkpoint cannot pass"
    );
    conn.close().await.unwrap();
}
