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
    const RELEASED: [(i64, &str); 10] = [
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
        (
            10,
            "d6ee48578f4682b1f9bc51367b9c098ad84d9a01442f3a7166ab24c7032f2c520d0e1bba58bb89837918e02b8c75c867",
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
    assert_released(rows, &RELEASED);
}

/// The recorded (version, checksum) rows begin with the released ones.
fn assert_released(rows: Vec<(i64, Vec<u8>)>, released: &[(i64, &str)]) {
    let recorded: Vec<(i64, String)> = rows
        .into_iter()
        .map(|(v, sum)| (v, sum.iter().map(|b| format!("{b:02x}")).collect()))
        .collect();
    let released: Vec<(i64, String)> = released
        .iter()
        .map(|(v, sum)| (*v, sum.to_string()))
        .collect();
    assert!(recorded.len() >= released.len(), "{recorded:?}");
    assert_eq!(recorded[..released.len()], released[..]);
}

/// The same for PostgreSQL: every instance sharing a database refuses to
/// start once a migration it recorded has changed, so the released ones
/// must keep their checksums as well.
#[tokio::test]
async fn released_postgres_migrations_keep_their_versions_and_checksums() {
    const RELEASED: [(i64, &str); 21] = [
        (
            1,
            "8be86666d45085e853077fbfeafef28ae9e5c75d110e522ae87d97d411e29b86a82dd6d8f2bb5d0b739d7255d7749462",
        ),
        (
            2,
            "09f952cc523d9c5af932486896aec6e4c4bff458df8b2bfd4a6b0800291e577de4f3ba95ae65b6a08092c0a7de66c22a",
        ),
        (
            3,
            "9b3f05b4182a0611d1c825850b365d1f67aa87f1662b4b95b6756a9b795be40407a184690801a3b79fc7d19c54dfec9c",
        ),
        (
            4,
            "df9f72baa0e92d789ada26265deabc32c450029aed6f0abc2fd3d06cf604d50aaa5a4f71e833c5d9906accd6c45163f2",
        ),
        (
            5,
            "05c5332e4b41c0f9eb72b949ba0987e7be0d16f6745f04119f9602ff35ead1cf7769869a12796db2ed7ba4970241cd2e",
        ),
        (
            6,
            "469fbd28b2554785d7222be5a3f653607b0a11b5d68fb3bbe1ca46fef8ceea437ca5fa090b71fd53673f096d27dcacf2",
        ),
        (
            7,
            "48de12a45995b74c8f7ac2f0f44efcab4b8b284706c8c8a16d8404504a9e34e49054355fd0d140d4ff70ee0f9d7dd9c0",
        ),
        (
            8,
            "baa425552406b6a831b3196e06a294b94fe89bdd6e7bb0456cfe11e4662529d9763166de8c65f0049e95c8309f463152",
        ),
        (
            9,
            "16338c2572d6037a3ad3cbe55f502cca33fb10f940d8d7ce5ba367e5c6f28e261c6d9f2b52a37750ecad19f84a0e4641",
        ),
        (
            10,
            "5285956ead3a48e3ac6a807d9e26335ac9d7a99ab03fc086ab399b85969bd2d7ef0398249fc95f586a3dfa58f4f2ed0f",
        ),
        (
            11,
            "720917ade6c0409fb3e210f14d473abd5f2ae0a13a2dbc57b22059899b2e355a7cf30313b59c64dc4355ec5149f00bf1",
        ),
        (
            12,
            "d1039109ed7362ca93d39daa58af15c198bcf4d8fa3ec788656d18ca0cad86fb58054e49764b6eccc8a6acc751e683f8",
        ),
        (
            13,
            "9f2c25d8ac3b5d5c21da79215c663e25042ffad1bdde21832a3a441ef8eef80c871cd6e29a2cb0a7f94cd929058087d4",
        ),
        (
            14,
            "b6981c6feaea2d32648070a781b598e776223ff0f8a6eeb7032649f38035a859b926e14fee218b1db44911b3e56321f2",
        ),
        (
            15,
            "c42ccde4bc435b49d2bba6a43c6f1cabcd3a0e49c4ae7b6ef16366ebdb301854f33f3e00fa702ffb263c2a90434d3083",
        ),
        (
            16,
            "c275b7db6ad34b8956b683fa37a003c78f8f1d5235c157807843c42fb96bf6c28df70f87a5b00116010db05c3b1b3e3c",
        ),
        (
            17,
            "0a0a9447fe9f275b6893d8914187afc0b0e12daff0423ee173f09001b1b54024bec542f06766b053e48b2e6871ea5f00",
        ),
        (
            18,
            "791a72147cb932e0ee1c1950e5b5dd0a1e13809e477d9b6ae4b1bb48ade6c805ab192752c3d9b1a80f86e4cdcb0226bc",
        ),
        (
            19,
            "ee77224d857d533c240dae395eccb372170f4c1273f4112c813cd3cf6be6e842544e5a1596c93478baa76fe78b97ac7d",
        ),
        (
            20,
            "01e700c0c7cb6c59518b61a233ec55d0e5b378af8e617766cc98282ec3befe77071f36ef9eab440f9b2971a6b8dff9d2",
        ),
        (
            21,
            "a6a1eb0d86fcf313ae6bd0cbba8620cb2557643a03b3a2af25ea2f950529b88ee24ae787f84a5a5d0e0aed6bc7ba967d",
        ),
    ];
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let url = pg.url();
    drop(
        churnzero_forwarder::outbox::Outbox::open(Path::new(&url), Default::default())
            .await
            .unwrap(),
    );
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    conn.close().await.unwrap();
    assert_released(rows, &RELEASED);
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
