//! Dead letters: the replay and purge chunks an operator's selection is
//! split into, one writer transaction each.

use super::*;

/// Which dead-letter operation a chunk belongs to.
#[derive(Debug, Clone, Copy)]
pub(super) enum DeadAction {
    Replay,
    Purge,
}

/// The dead letters (id, ordering key) one chunk acts on, and the id to
/// continue after when the chunk was full (more may match).
pub(super) async fn dead_targets(
    conn: &mut SqliteConnection,
    chunk: &DeadChunk,
) -> Result<(Vec<(i64, String)>, Option<i64>), StoreError> {
    match chunk {
        DeadChunk::Ids(ids) => {
            let json = serde_json::to_string(ids).expect("ids serialise");
            let targets = sqlx::query_as(
                "SELECT id, order_key FROM events WHERE state = 3 AND id IN (SELECT value FROM json_each(?)) ORDER BY id",
            )
            .bind(json)
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
            Ok((targets, None))
        }
        DeadChunk::Next { filter, after } => {
            let sql = format!(
                "SELECT id, order_key {}",
                crate::outbox::sqlite::read::DEAD_FILTER
            );
            let targets: Vec<(i64, String)> = sqlx::query_as_with(
                &sql,
                crate::outbox::sqlite::read::filter_args(filter, *after, DEAD_CHUNK as i64),
            )
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
            let next = (targets.len() == DEAD_CHUNK)
                .then(|| targets.last().map(|t| t.0))
                .flatten();
            Ok((targets, next))
        }
    }
}

pub(super) async fn replay(
    conn: &mut SqliteConnection,
    targets: &[(i64, String)],
    now: i64,
) -> Result<u64, StoreError> {
    // Replayed events go back as queued with a fresh budget and a fresh
    // backoff (their history keeps the earlier attempts); promotion then
    // makes the earliest of each idle key its head, so order holds.
    for (id, _) in targets {
        sqlx::query(
            "UPDATE events SET state = 5, next_attempt_at = ?, first_attempt_at = NULL, reason = NULL, \
             finished_at = NULL, attempts = 0 WHERE id = ? AND state = 3",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    promote(conn, targets.iter().map(|(_, k)| k.as_str()), now).await?;
    Ok(targets.len() as u64)
}

pub(super) async fn purge(
    conn: &mut SqliteConnection,
    targets: &[(i64, String)],
) -> Result<u64, StoreError> {
    let ids: Vec<i64> = targets.iter().map(|t| t.0).collect();
    let json = serde_json::to_string(&ids).expect("ids serialise");
    let r = sqlx::query(
        "DELETE FROM events WHERE state = 3 AND id IN (SELECT value FROM json_each(?))",
    )
    .bind(json)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(r.rows_affected())
}
