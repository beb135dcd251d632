//! A database written by the previous schema (claims as state 1 on the
//! event rows) is upgraded by `serve` without losing what was in flight,
//! and the read-only `status` command says plainly that it must be upgraded
//! first instead of failing on a missing index.

mod common;

use common::*;
use sqlx::Connection;
use sqlx::migrate::Migrator;
use std::path::Path;

/// Builds a database at schema version 3 with events as the previous version
/// left them when it was killed: user u1 with two events in flight and one
/// queued, user u2 with one in flight, user u3 with one pending.
async fn previous_version_database(db: &Path) {
    let migrations = tempfile::tempdir().unwrap();
    for name in ["0001_outbox.sql", "0002_sync_lane.sql", "0003_aliases.sql"] {
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(name),
            migrations.path().join(name),
        )
        .unwrap();
    }
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    Migrator::new(migrations.path())
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    for (n, user, state) in [
        (1, "u1", 1),
        (2, "u1", 1),
        (3, "u1", 5),
        (4, "u2", 1),
        (5, "u3", 0),
    ] {
        let payload = serde_json::json!({
            "type": "track", "userId": user, "event": format!("Old {n}"),
            "messageId": format!("old-{n}"), "timestamp": "2026-11-28T23:00:00.000Z",
            "context": {"traits": {"accountExternalId": "acct", "contactExternalId": user}}
        });
        sqlx::query(
            "INSERT INTO events (source, message_id, kind, order_key, payload, state, attempts, \
             accepted_at, next_attempt_at, first_attempt_at, lease_until) \
             VALUES ('s', ?, 'track', ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(format!("old-{n}"))
        .bind(user)
        .bind(payload.to_string())
        .bind(state)
        .bind(if state == 1 { 1 } else { 0 })
        .bind(now)
        .bind(now)
        .bind((state == 1).then_some(now))
        .bind((state == 1).then_some(now + 3_600_000))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    conn.close().await.unwrap();
}

#[tokio::test]
async fn serve_upgrades_a_previous_database_and_delivers_what_was_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    previous_version_database(&db).await;

    let (code, _, err) = run_binary(&["status", "--database", db.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("schema is at version 3") && err.contains("start `serve`"),
        "{err}"
    );

    let mock = mock().await;
    let server = Binary::serve(&db, &mock.url(), &[]).await;
    let s = wait_status(&server.base, "delivered", 5).await;
    assert_eq!(
        (s["pending"].clone(), s["in_flight"].clone()),
        (0.into(), 0.into())
    );
    let names: Vec<String> = mock
        .state()
        .actions()
        .iter()
        .map(|a| a["eventName"].as_str().unwrap().to_string())
        .collect();
    let u1: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| ["Old 1", "Old 2", "Old 3"].contains(n))
        .collect();
    assert_eq!(u1, ["Old 1", "Old 2", "Old 3"], "u1 in order: {names:?}");
    assert_eq!(names.len(), 5, "{names:?}");
    drop(server);

    let (code, out, err) = run_binary(&["status", "--database", db.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("delivered"), "{out}");
}
