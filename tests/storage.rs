//! Bounded storage: under constant load, delivered events are pruned after
//! `--retention`, their pages go back to the file system, and the database
//! file settles at a steady size instead of growing with the traffic.

mod common;

use common::*;
use serde_json::{Value, json};
use sqlx::Connection;
use std::time::Duration;

fn file_size(db: &std::path::Path) -> u64 {
    let wal = db.with_extension("db-wal");
    std::fs::metadata(db).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

#[tokio::test]
async fn database_reaches_a_steady_size_under_constant_load() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("o.db");
    let mock = mock().await;
    mock.state().set_count_only(true);
    let mut cfg = settings(&db, &mock.url());
    cfg.retention = Duration::from_millis(200);
    cfg.dedup_window = Duration::from_millis(200);
    cfg.maintenance_interval = Duration::from_millis(100);
    let server = start(cfg).await;
    let base = format!("http://{}", server.addr);
    let url = format!("sqlite://{}?mode=ro", db.display());
    let padding = "p".repeat(1000);
    let rounds = 10;
    let per_round = 1000;
    let mut sizes = Vec::new();
    for round in 0..rounds {
        for b in 0..per_round / 100 {
            let batch: Vec<Value> = (0..100)
                .map(|i| {
                    let mut e = track(
                        &format!("user-{i}"),
                        "Load",
                        round * per_round + b * 100 + i,
                    );
                    e["properties"]["padding"] = json!(padding);
                    e
                })
                .collect();
            let (s, v) = post(&base, "/v1/batch", &json!({ "batch": batch })).await;
            assert_eq!(s, 200, "{v}");
        }
        wait_status(&base, "delivered", ((round + 1) * per_round) as i64).await;
        // Observable: retention has pruned this round's delivered events.
        wait_for("delivered events pruned", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                let mut conn = sqlx::SqliteConnection::connect(&url).await.ok()?;
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
                    .fetch_one(&mut conn)
                    .await
                    .ok()?;
                (n == 0).then_some(())
            }
        })
        .await;
        // One more pass gives the freed pages back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        sizes.push(file_size(&db));
    }
    let written = (rounds * per_round * 1000) as u64;
    let early = sizes[2];
    let late = *sizes[rounds - 4..].iter().max().unwrap();
    eprintln!("database + WAL size per round (bytes): {sizes:?}; payload written {written}");
    assert!(late <= early + early / 2, "size keeps growing: {sizes:?}");
    assert!(
        late < written,
        "pruned space is reused or returned: {late} vs {written} written"
    );
    server.shutdown().await;
}
