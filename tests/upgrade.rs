//! A database written by the previous schema (claims as state 1 on the
//! event rows) is upgraded by `serve` without losing what was in flight,
//! and the read-only `status` command says plainly that it must be upgraded
//! first instead of failing on a missing index.

mod common;

use common::*;
use sqlx::Connection;
use sqlx::migrate::Migrator;
use std::path::Path;

/// A database at schema version `last`, made by the released migrations
/// 1 to `last` (as an older build would have made it), and a connection.
async fn database_at_version(db: &Path, last: u32) -> sqlx::SqliteConnection {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    let migrations = tempfile::tempdir().unwrap();
    for n in 1..=last {
        let name = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|f| f.starts_with(&format!("{n:04}_")))
            .unwrap();
        std::fs::copy(dir.join(&name), migrations.path().join(&name)).unwrap();
    }
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    Migrator::new(migrations.path())
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    conn
}

/// Builds a database at schema version 3 with events as the previous version
/// left them when it was killed: user u1 with two events in flight and one
/// queued, user u2 with one in flight, user u3 with one pending.
async fn previous_version_database(db: &Path) {
    let mut conn = database_at_version(db, 3).await;
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

/// A database migrated by any earlier release recorded each migration's
/// version and the SHA-384 of its SQL; the migrator refuses to start on a
/// file whose recorded checksum differs from the embedded one. These are
/// the checksums released databases hold, so the embedded migrations (where
/// ever they live in the source tree) must keep producing exactly them.
#[tokio::test]
async fn released_migrations_keep_their_versions_and_checksums() {
    const RELEASED: [(i64, &str); 9] = [
        (
            1,
            "5d364fb6dbd0a5dd7ab9787262203b2aef2d93239129437c834de2dbfe2400eb86575493c45eb221827126633cbc4a0d",
        ),
        (
            2,
            "fa17ba804d3740629c69f56373f8bbc92d0313be3ee470cfa06905361f4d36937470fff7a33ebdf5f8aafba3e7a81a18",
        ),
        (
            3,
            "c14a90a0bbed2916944aac2e987f765b2c660a2b71f6865851eafc4f1788192b5adf58fab836bb9b9a87d6d155ec02a0",
        ),
        (
            4,
            "499a9d92a1e58b951ddd9968829709660cb349cd7bc99da57a056116e82f692c1681d1c2511eed3116f79110ebc8705f",
        ),
        (
            5,
            "6b7a1258efcd8a08fa2529f4387dd8d9d365e8809eb8d1ff85ff2c3cb3305ee0714421fb303685587689c53b35ec7b91",
        ),
        (
            6,
            "9d0a89580d64276f68fff4fa9ddb0ed978106a0d5bbd7b980562bba0d5f1d006d1844f34b4e8cd05330f9bf6ac16970b",
        ),
        (
            7,
            "9138e271513b78e5a996314a2c294bbcd19084f503fe566106cb195229eab22c88ba7a2eb8979f34419de47678adb45e",
        ),
        (
            8,
            "b4caa3d3bd9eb773db00cd805b1ad41199bf5a370aa2b85a8b4c249b06b812d478a70daf5431a3bded79aa57d46594e6",
        ),
        (
            9,
            "b30dcd11872ff513405bb7a5b4f1518aac1c1e0f0aa7eb8b3b055e661317acd18e68071501646d99b54164d2b9df528c",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    drop(
        churnzero_forwarder::outbox::Outbox::open(&db, Default::default())
            .await
            .unwrap(),
    );
    let url = format!("sqlite://{}", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    conn.close().await.unwrap();
    let recorded: Vec<(i64, String)> = rows
        .into_iter()
        .map(|(v, sum)| (v, sum.iter().map(|b| format!("{b:02x}")).collect()))
        .collect();
    let released: Vec<(i64, String)> = RELEASED
        .iter()
        .map(|(v, sum)| (*v, sum.to_string()))
        .collect();
    assert_eq!(recorded[..released.len()], released[..]);
}

/// A database that an earlier release created and fully migrated starts
/// as it is: no migration is re-run or refused, and its events are served.
#[tokio::test]
async fn serve_starts_on_a_database_of_the_current_schema_made_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    // Migrated from the SQL files as an earlier build embedded them.
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    Migrator::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite"))
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let mock = mock().await;
    let server = Binary::serve(&db, &mock.url(), &[]).await;
    let s = wait_status(&server.base, "pending", 0).await;
    assert_eq!(s["dead"], 0);
    drop(server);
}

/// The insert triggers kept SQLite's counters up to schema version 6;
/// from 0007 on ingest keeps them itself, and from 0009 on delivery does. A database of version 6 with
/// pending, queued, held (with a queue behind it) and dead events keeps
/// its counts through the upgrade, and ingest after it counts right, held
/// queues included.
#[tokio::test]
async fn counters_stay_right_across_the_upgrade_from_insert_triggers() {
    use churnzero_forwarder::outbox::{IdentityUpdate, NewEvent, Outbox, WriterConfig};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v6.db");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let mut conn = database_at_version(&db, 6).await;
    // u1: a held head and one event queued behind it; u2: a head and one
    // queued; u3: a dead letter. Version 6's triggers count them.
    for (n, user, state) in [
        (1, "u1", 4),
        (2, "u1", 5),
        (3, "u2", 0),
        (4, "u2", 5),
        (5, "u3", 3),
        (6, "u5", 2),
    ] {
        sqlx::query(
            "INSERT INTO events (source, message_id, kind, order_key, payload, state, \
             accepted_at, next_attempt_at) VALUES ('s', ?, 'track', ?, '{}', ?, 1, 1)",
        )
        .bind(format!("old-{n}"))
        .bind(user)
        .bind(state)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    conn.close().await.unwrap();

    let outbox = Outbox::open(&db, WriterConfig::default()).await.unwrap();
    let figures =
        |s: &churnzero_forwarder::outbox::OutboxStatus| (s.pending, s.held, s.held_queued, s.dead);
    assert_eq!(figures(&outbox.status().await.unwrap()), (2, 2, 1, 1));

    let event = |n: u32, user: &str| NewEvent {
        source: "s".into(),
        message_id: format!("new-{n}"),
        kind: "track",
        order_key: user.into(),
        payload: "{}".into(),
        forward: true,
        identity: None,
        audience: Vec::new(),
    };
    // Behind u1's held head, behind u2's head, and a new user's head.
    outbox
        .ingest(vec![event(1, "u1"), event(2, "u2"), event(3, "u4")])
        .await
        .unwrap();
    assert_eq!(figures(&outbox.status().await.unwrap()), (4, 3, 2, 1));
    // u1's ids arrive: its head and queue are pending again.
    outbox
        .ingest(vec![NewEvent {
            kind: "identify",
            identity: Some(IdentityUpdate {
                user_id: "u1".into(),
                account: Some("acc".into()),
                contact: Some("u1".into()),
                previous_id: None,
            }),
            ..event(4, "u1")
        }])
        .await
        .unwrap();
    assert_eq!(figures(&outbox.status().await.unwrap()), (8, 0, 0, 1));

    // Delivery keeps its counts itself from 0009 on: everything pending is
    // delivered, and the delivered row of version 6 still counts.
    loop {
        let claimed = outbox
            .claim(100, std::time::Duration::from_secs(60))
            .await
            .unwrap();
        if claimed.is_empty() {
            break;
        }
        let settlements = claimed
            .iter()
            .map(|e| settlement(e, churnzero_forwarder::outbox::SettleOutcome::Delivered))
            .collect();
        outbox.settle(settlements).await.unwrap();
    }
    let s = outbox.status().await.unwrap();
    assert_eq!((figures(&s), s.delivered), ((0, 0, 0, 1), 8), "{s:?}");

    // And the counters equal a count of the rows.
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let drift: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT c.state, c.n, CASE c.state WHEN 1 THEN (SELECT COUNT(*) FROM leases) \
           WHEN 6 THEN (SELECT COALESCE(SUM(queued), 0) FROM held_keys) \
           ELSE (SELECT COUNT(*) FROM events e WHERE e.state = c.state) END AS actual \
         FROM state_counts c WHERE c.n <> actual",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    assert!(drift.is_empty(), "(state, counter, rows): {drift:?}");
}
