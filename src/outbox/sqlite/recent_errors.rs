//! Stores the recent-errors ring (see `outbox::recent_errors`) in the
//! `meta` table, in the same transaction as the settlement that saw the
//! errors.

use crate::outbox::StoreError;
use crate::outbox::recent_errors::{META_NAME, merge, parse};
use sqlx::SqliteConnection;

/// Adds `(error, outcome, events)` reports seen at `now` to the ring.
/// Called by the writer inside the settling transaction.
pub(super) async fn record(
    conn: &mut SqliteConnection,
    reports: &[(String, &'static str, i64)],
    now: i64,
) -> Result<(), StoreError> {
    if reports.is_empty() {
        return Ok(());
    }
    let current: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE name = ?")
        .bind(META_NAME)
        .fetch_optional(&mut *conn)
        .await
        .map_err(StoreError::classify)?
        .flatten();
    let mut ring = parse(current.as_deref());
    merge(&mut ring, reports, now);
    let json = serde_json::to_string(&ring).expect("entries serialise");
    super::set_meta(conn, META_NAME, &json).await
}
