//! Maintenance passes: expired leases back, held events released or past
//! their budget dead, delivered events and old message ids pruned.

use super::*;

/// Returns in-flight events whose lease ended before `before` to the queue:
/// the earliest of each key as head, the rest queued behind it.
pub(super) async fn release_leases(
    conn: &mut SqliteConnection,
    before: i64,
) -> Result<u64, StoreError> {
    // A leased event kept its state (head or queued), so dropping the lease
    // is all it takes to make it claimable again.
    let r = sqlx::query("DELETE FROM leases WHERE lease_until < ?")
        .bind(before)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    // Counted again rather than moved by the rows deleted: at start this
    // runs outside a transaction, and a start cut short between the two
    // statements is mended by the next one. The table holds only what is
    // in flight, so the count is short.
    sqlx::query("UPDATE state_counts SET n = (SELECT count(*) FROM leases) WHERE state = ?")
        .bind(LEASES_ROW)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(r.rows_affected())
}

/// Held heads looked at per maintenance pass.
pub(super) const HELD_PAGE: i64 = 500;

/// The safety net under the identify's release and the settle's re-check:
/// held heads whose user now has both ids in the identity map (so they
/// resolve for certain) are made due again. Walks the held index a page per
/// pass from `cursor`, wrapping at the end, so a pass costs the same however
/// many events are held.
pub(super) async fn release_resolvable_held(
    conn: &mut SqliteConnection,
    cursor: &mut i64,
    now: i64,
) -> Result<u64, StoreError> {
    let page: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM events INDEXED BY events_held WHERE state = 4 AND id > ? ORDER BY id LIMIT ?",
    )
    .bind(*cursor)
    .bind(HELD_PAGE)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    *cursor = match page.last() {
        Some(last) if page.len() as i64 == HELD_PAGE => *last,
        _ => 0,
    };
    if page.is_empty() {
        return Ok(0);
    }
    let r = sqlx::query(
        "UPDATE events SET state = 0, next_attempt_at = ? \
         WHERE id IN (SELECT value FROM json_each(?)) AND state = 4 \
         AND EXISTS (SELECT 1 FROM identities i WHERE i.user_id = events.order_key \
                     AND i.account_id IS NOT NULL AND i.contact_id IS NOT NULL)",
    )
    .bind(now)
    .bind(serde_json::to_string(&page).expect("ids serialise"))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(r.rows_affected())
}

pub(super) async fn maintain(
    conn: &mut SqliteConnection,
    config: &WriterConfig,
    retention: Duration,
    held_budget: Duration,
    now: i64,
    held_cursor: &mut i64,
) -> Result<MaintenanceReport, StoreError> {
    let mut report = MaintenanceReport {
        leases_released: release_leases(conn, now).await?,
        held_released: release_resolvable_held(conn, held_cursor, now).await?,
        ..Default::default()
    };
    let expired: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, order_key FROM events INDEXED BY events_held WHERE state = 4 AND COALESCE(first_attempt_at, accepted_at) < ? LIMIT 1000",
    )
    .bind(now - held_budget.as_millis() as i64)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    for (id, _) in &expired {
        sqlx::query(
            "UPDATE events SET state = 3, finished_at = ?, reason = 'unresolved identity', \
             last_error = 'unresolved identity' WHERE id = ? AND state = 4",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    report.held_expired = expired.len() as u64;
    if !expired.is_empty() {
        let reports = [(
            "unresolved identity".to_string(),
            "dead",
            expired.len() as i64,
        )];
        crate::outbox::sqlite::recent_errors::record(conn, &reports, now).await?;
    }
    promote(conn, expired.iter().map(|(_, k)| k.as_str()), now).await?;

    let r = sqlx::query(
        "DELETE FROM events WHERE id IN (SELECT id FROM events INDEXED BY events_finished \
         WHERE state = 2 AND finished_at < ? LIMIT 10000)",
    )
    .bind(now - retention.as_millis() as i64)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    report.pruned_events = r.rows_affected();
    let pruned = sqlx::query(
        "DELETE FROM message_ids WHERE (source, message_id) IN \
         (SELECT source, message_id FROM message_ids WHERE seen_at < ? LIMIT 10000)",
    )
    .bind(now - config.dedup_window.as_millis() as i64)
    .execute(&mut *conn)
    .await
    .map_err(db)?
    .rows_affected();
    report.pruned_message_ids = pruned;
    report.more_to_prune = report.pruned_events >= 10_000 || pruned >= 10_000;
    sqlx::query("DELETE FROM minute_stats WHERE minute < ?")
        .bind(minute_of(now) - 180)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    // Give free pages back once there are enough to matter; a few stay for
    // the next inserts.
    let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    if free > 256 {
        sqlx::query("PRAGMA incremental_vacuum(4096)")
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        let left: i64 = sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
        report.pages_vacuumed = (free - left).max(0) as u64;
    }
    Ok(report)
}
