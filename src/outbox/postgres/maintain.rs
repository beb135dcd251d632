//! Maintenance (one instance at a time, under an advisory lock) and the
//! dead-letter actions.

use super::{Inner, MAINTENANCE_LOCK, delivery, lock_keys, pg_error, with_retry};
use crate::outbox::MaintenanceReport;
use crate::outbox::{StoreError, now_ms};
use sqlx::{PgConnection, PgPool};
use std::time::Duration;

/// Rows one pass deletes at most per table: a pass stays short however
/// much is due, and the next pass continues.
const PRUNE_BATCH: i64 = 10_000;

/// How long the row of an instance that stopped stays (its recent errors
/// remain readable in status meanwhile).
const INSTANCE_RETENTION_MS: i64 = 24 * 3600 * 1000;
/// Held heads looked at per pass.
const HELD_PAGE: i64 = 500;

/// A session advisory lock: one instance vacuums at a time.
const VACUUM_LOCK: i64 = 0x6366_775f_7661_6375;

/// Vacuums the outbox's tables when the server has autovacuum off and the
/// last vacuum (or the start) is older than `PgConfig::own_vacuum_every`: every delivery, prune
/// and counter update leaves a dead row version, and without a vacuum the
/// tables, their indexes and every status read grow without limit. VACUUM
/// cannot run in a transaction, so it takes a session lock on a pooled
/// connection instead of the transaction lock each maintenance step takes. Failures are
/// logged; the next pass tries again.
pub(super) async fn vacuum_if_due(inner: &Inner) {
    {
        let mut last = inner.last_vacuum.lock().expect("vacuum clock");
        if last.elapsed() < inner.config.own_vacuum_every {
            return;
        }
        *last = std::time::Instant::now();
    }
    let result = vacuum_tables(&inner.pool).await;
    match result {
        Ok(true) => tracing::debug!("outbox tables vacuumed (autovacuum is off)"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "vacuuming the outbox tables failed"),
    }
}

async fn vacuum_tables(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(VACUUM_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if !ours {
        return Ok(false);
    }
    let vacuumed = sqlx::query(
        "VACUUM (ANALYZE) counters, instances, leaders, leases, held_keys, minute_stats, meta, \
             message_ids, events",
    )
    .execute(&mut *conn)
    .await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(VACUUM_LOCK)
        .execute(&mut *conn)
        .await?;
    vacuumed.map(|_| true)
}

/// One step of a pass: `$body` in a transaction of its own under the
/// maintenance lock (`begin_exclusive`), committed, and run again after a
/// deadlock or serialization failure; `None` when another instance holds
/// the lock. A macro because the step borrows the transaction across its
/// awaits, which a closure handed to `with_retry` cannot name.
macro_rules! exclusively {
    ($inner:expr, $tx:ident => $body:expr) => {
        with_retry(|| async {
            let Some(mut $tx) = begin_exclusive($inner).await? else {
                return Ok(None);
            };
            let out = $body;
            $tx.commit().await.map_err(pg_error)?;
            Ok(Some(out))
        })
        .await?
    };
}

/// One maintenance pass, as four short transactions: expired leases back,
/// held heads whose user is known released, held heads past their budget
/// dead, then the prunes. Each takes the maintenance lock (one instance at a
/// time) and the keys it changes in one call, and commits before the next
/// begins. As one transaction, the pass asked for keys in up to three calls:
/// holding the first call's keys while it waited for the second's, it closed
/// a cycle with an ingest group holding one of those and waiting for one of
/// these, which the server broke after its deadlock timeout (a second) by
/// aborting one side. And it kept every key it had locked through the
/// prunes, which delete thousands of rows, while ingest of those keys
/// waited. Each step is safe to run again, so a step the server aborts is
/// simply retried. `None` when another instance holds the lock.
pub(super) async fn maintain(
    inner: &Inner,
    retention: Duration,
    held_budget: Duration,
) -> Result<Option<MaintenanceReport>, StoreError> {
    let now = now_ms();
    let expiry = inner.config.instance_expiry;
    let Some(leases_released) =
        exclusively!(inner, tx => delivery::recover_leases(&mut tx, now, expiry).await?)
    else {
        return Ok(None);
    };
    let mut report = MaintenanceReport {
        leases_released,
        ..Default::default()
    };
    let Some((released, next_cursor)) =
        exclusively!(inner, tx => release_known_held(inner, &mut tx, now).await?)
    else {
        return Ok(Some(report));
    };
    report.held_released = released;
    *inner.held_cursor.lock().expect("cursor lock") = next_cursor;
    let Some(expired) =
        exclusively!(inner, tx => expire_held(inner, &mut tx, now, held_budget).await?)
    else {
        return Ok(Some(report));
    };
    report.held_expired = expired;
    if let Some((events, message_ids)) =
        exclusively!(inner, tx => prune(inner, &mut tx, now, retention).await?)
    {
        report.pruned_events = events;
        report.pruned_message_ids = message_ids;
        report.more_to_prune = events as i64 >= PRUNE_BATCH || message_ids as i64 >= PRUNE_BATCH;
    }
    Ok(Some(report))
}

/// A transaction under the maintenance lock, or `None` when another
/// instance holds it. Each step runs in one (again after a deadlock or
/// serialization failure, see `with_retry`).
async fn begin_exclusive(
    inner: &Inner,
) -> Result<Option<sqlx::Transaction<'static, sqlx::Postgres>>, StoreError> {
    let mut tx = inner.pool.begin().await.map_err(pg_error)?;
    let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(MAINTENANCE_LOCK)
        .fetch_one(&mut *tx)
        .await
        .map_err(pg_error)?;
    if !ours {
        tx.rollback().await.map_err(pg_error)?;
        return Ok(None);
    }
    Ok(Some(tx))
}

/// The safety net under the identify's release: held heads whose user has
/// both ids now are due again. A page per pass, resuming where the last
/// pass stopped (the cursor moves once the page is committed: it comes
/// back with the number released). Their keys
/// are locked first, as every change to a key's queue is (the count of
/// events queued behind held heads is kept per key and relies on it); a
/// page of 500 stays under the 512 keys past which the key locks become
/// one lock of the whole key space.
async fn release_known_held(
    inner: &Inner,
    tx: &mut PgConnection,
    now: i64,
) -> Result<(u64, i64), StoreError> {
    let cursor = *inner.held_cursor.lock().expect("cursor lock");
    let page: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM events WHERE state = 4 AND id > $1 ORDER BY id LIMIT $2",
    )
    .bind(cursor)
    .bind(HELD_PAGE)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg_error)?;
    let next_cursor = match page.last() {
        Some(last) if page.len() as i64 == HELD_PAGE => *last,
        _ => 0,
    };
    let known_ids = "e.id = ANY($1) AND e.state = 4 AND EXISTS (SELECT 1 FROM identities i \
         WHERE i.user_id = e.order_key AND i.account_id IS NOT NULL AND i.contact_id IS NOT NULL)";
    let known: Vec<(i64, String)> = if page.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(&format!(
            "SELECT e.id, e.order_key FROM events e WHERE {known_ids}"
        ))
        .bind(&page)
        .fetch_all(&mut *tx)
        .await
        .map_err(pg_error)?
    };
    let mut released = 0;
    if !known.is_empty() {
        let keys: Vec<&str> = known.iter().map(|(_, k)| k.as_str()).collect();
        let ids: Vec<i64> = known.iter().map(|(id, _)| *id).collect();
        lock_keys(&mut *tx, &keys).await?;
        released = sqlx::query(&format!(
            "UPDATE events e SET state = 0, next_attempt_at = $2 WHERE {known_ids}"
        ))
        .bind(&ids)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?
        .rows_affected();
    }
    Ok((released, next_cursor))
}

/// Held past the budget: dead, and the key's next event becomes its head.
/// A page of 500 stays under the 512 keys past which the key locks become
/// one lock of the whole key space.
async fn expire_held(
    inner: &Inner,
    tx: &mut PgConnection,
    now: i64,
    held_budget: Duration,
) -> Result<u64, StoreError> {
    let expired: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, order_key FROM events WHERE state = 4 \
         AND COALESCE(first_attempt_at, accepted_at) < $1 ORDER BY id LIMIT 500",
    )
    .bind(now - held_budget.as_millis() as i64)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg_error)?;
    if expired.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&str> = expired.iter().map(|(_, k)| k.as_str()).collect();
    let ids: Vec<i64> = expired.iter().map(|(id, _)| *id).collect();
    lock_keys(&mut *tx, &keys).await?;
    let n = sqlx::query(
        "UPDATE events SET state = 3, finished_at = $2, reason = 'unresolved identity', \
         last_error = 'unresolved identity' WHERE id = ANY($1) AND state = 4",
    )
    .bind(&ids)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(pg_error)?
    .rows_affected();
    if n > 0 {
        // Operators see why they died, as with any other dead event.
        let reports = [("unresolved identity", "dead", n as i64)];
        delivery::record_errors(&mut *tx, inner.instance, &reports, now).await?;
    }
    delivery::normalize(&mut *tx, &keys, now).await?;
    Ok(n)
}

/// Delivered events past retention and message ids past the dedup window,
/// in bounded batches; instances long gone; old per-minute figures. No key
/// is locked: nothing here changes a key's queue. Returns the events and
/// message ids deleted.
async fn prune(
    inner: &Inner,
    tx: &mut PgConnection,
    now: i64,
    retention: Duration,
) -> Result<(u64, u64), StoreError> {
    // Both prunes are planned afresh on every pass (not prepared once per
    // session): a pass runs every few seconds, and a plan kept from when
    // the tables were empty (a fresh install, before their first analysis)
    // read the whole of `events` and of `message_ids` on every pass to find
    // the batch's rows, instead of looking them up by id. Planned for the
    // tables as they are, the lookups take the primary key and the TIDs.
    let events = sqlx::query(
        // ARRAY(...): the batch's ids are looked up one by one, never a
        // join against the whole table.
        "DELETE FROM events WHERE id = ANY(ARRAY(SELECT id FROM events WHERE state = 2 \
         AND finished_at < $1 ORDER BY finished_at LIMIT $2))",
    )
    .persistent(false)
    .bind(now - retention.as_millis() as i64)
    .bind(PRUNE_BATCH)
    .execute(&mut *tx)
    .await
    .map_err(pg_error)?
    .rows_affected();
    let message_ids = sqlx::query(
        "DELETE FROM message_ids WHERE ctid = ANY(ARRAY(SELECT ctid FROM message_ids \
         WHERE seen_at < $1 ORDER BY seen_at LIMIT $2))",
    )
    .persistent(false)
    .bind(now - inner.config.dedup_window.as_millis() as i64)
    .bind(PRUNE_BATCH)
    .execute(&mut *tx)
    .await
    .map_err(pg_error)?
    .rows_affected();
    // Instances gone for a day that hold no lease: every start registers
    // one, and status reads each one's recent errors.
    sqlx::query(
        "DELETE FROM instances i WHERE i.heartbeat_at < $1 \
         AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.owner = i.id)",
    )
    .bind(now - INSTANCE_RETENTION_MS)
    .execute(&mut *tx)
    .await
    .map_err(pg_error)?;
    sqlx::query("DELETE FROM minute_stats WHERE minute < $1")
        .bind(now.div_euclid(60_000) - 180)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
    Ok((events, message_ids))
}

/// Dead events go back as queued with a fresh budget; the normalisation
/// puts each key's queue back in id (commit) order.
pub(super) async fn replay(pool: &PgPool, ids: Option<&[i64]>) -> Result<u64, StoreError> {
    let now = now_ms();
    let mut tx = pool.begin().await.map_err(pg_error)?;
    let targets: Vec<(i64, String)> = match ids {
        Some(ids) => {
            sqlx::query_as(
                "SELECT id, order_key FROM events WHERE state = 3 AND id = ANY($1) ORDER BY id",
            )
            .bind(ids)
            .fetch_all(&mut *tx)
            .await
        }
        None => {
            sqlx::query_as("SELECT id, order_key FROM events WHERE state = 3 ORDER BY id")
                .fetch_all(&mut *tx)
                .await
        }
    }
    .map_err(pg_error)?;
    if targets.is_empty() {
        tx.commit().await.map_err(pg_error)?;
        return Ok(0);
    }
    let keys: Vec<&str> = targets.iter().map(|(_, k)| k.as_str()).collect();
    let ids: Vec<i64> = targets.iter().map(|(id, _)| *id).collect();
    lock_keys(&mut tx, &keys).await?;
    let r = sqlx::query(
        "UPDATE events SET state = 5, next_attempt_at = $2, first_attempt_at = NULL, reason = NULL, \
         finished_at = NULL, attempts = 0 WHERE id = ANY($1) AND state = 3",
    )
    .bind(&ids)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(pg_error)?;
    delivery::normalize(&mut tx, &keys, now).await?;
    tx.commit().await.map_err(pg_error)?;
    Ok(r.rows_affected())
}

pub(super) async fn purge(pool: &PgPool, ids: Option<&[i64]>) -> Result<u64, StoreError> {
    let r = match ids {
        Some(ids) => {
            sqlx::query("DELETE FROM events WHERE state = 3 AND id = ANY($1)")
                .bind(ids)
                .execute(pool)
                .await
        }
        None => {
            sqlx::query("DELETE FROM events WHERE state = 3")
                .execute(pool)
                .await
        }
    }
    .map_err(pg_error)?;
    Ok(r.rows_affected())
}
