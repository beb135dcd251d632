//! Storage of the audience sync lane: the reads it plans a window with (on
//! the reader pool) and the writes it records progress with (applied by the
//! writer task, inside its group-commit transaction, never across a network
//! call).
//!
//! Tables: `audience_pending` (one row per user and attribute, last value
//! wins, written by ingest) and `audience_delivered` (the value ChurnZero last
//! accepted per account, contact and attribute). The `meta` rows
//! `sync_last_run_at`, `sync_next_run_at`, `sync_last_run_sent` and
//! `sync_last_run_skipped` are written here in the same transactions as the
//! rows they describe; `sync_pending_contacts` is kept by triggers
//! (migrations/sqlite/0002_sync_lane.sql).
//!
//! "Last run" means the last window that had something to do (sent, skipped
//! or dropped an update); its counters grow while it is in progress. A window
//! that found nothing (or only users whose ids are still unknown) moves
//! `sync_next_run_at` and leaves the last run's figures alone, so `/status`
//! keeps showing the last real sync instead of a stream of empty ones.

use super::read::Reader;
use super::{StoreError, now_ms, set_meta};
use crate::outbox::{AudienceOp, AudienceSettlement, PendingUpdate};
use sqlx::SqliteConnection;
use std::collections::HashMap;

/// Applies one [`AudienceOp`] inside the writer's open transaction.
pub(super) async fn apply(conn: &mut SqliteConnection, op: &AudienceOp) -> Result<(), StoreError> {
    match op {
        AudienceOp::Schedule { next_run_at } => {
            set_meta(conn, "sync_next_run_at", &next_run_at.to_string()).await
        }
        AudienceOp::Settle(s) => settle(conn, s).await,
    }
}

async fn settle(conn: &mut SqliteConnection, s: &AudienceSettlement) -> Result<(), StoreError> {
    let now = now_ms();
    if let Some(started_at) = s.run_started_at {
        set_meta(conn, "sync_last_run_at", &started_at.to_string()).await?;
        set_meta(conn, "sync_last_run_sent", "0").await?;
        set_meta(conn, "sync_last_run_skipped", "0").await?;
    }
    for d in &s.delivered {
        sqlx::query(
            "INSERT INTO audience_delivered (account_id, contact_id, attribute, value, delivered_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id, contact_id, attribute) DO UPDATE SET \
             value = excluded.value, delivered_at = excluded.delivered_at",
        )
        .bind(&d.account)
        .bind(&d.contact)
        .bind(&d.attribute)
        .bind(&d.value)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::classify)?;
    }
    for p in &s.consumed {
        sqlx::query(
            "DELETE FROM audience_pending WHERE user_id = ? AND attribute = ? AND value = ?",
        )
        .bind(&p.user_id)
        .bind(&p.attribute)
        .bind(&p.value)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::classify)?;
    }
    bump_meta(conn, "sync_last_run_sent", s.sent).await?;
    bump_meta(conn, "sync_last_run_skipped", s.skipped).await?;
    if let Some(e) = &s.error {
        set_meta(conn, "last_error", e).await?;
        set_meta(conn, "last_error_at", &now.to_string()).await?;
    }
    Ok(())
}

async fn bump_meta(conn: &mut SqliteConnection, name: &str, by: i64) -> Result<(), StoreError> {
    if by == 0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO meta (name, value) VALUES (?, CAST(? AS TEXT)) ON CONFLICT (name) DO UPDATE \
         SET value = CAST(CAST(meta.value AS INTEGER) + CAST(excluded.value AS INTEGER) AS TEXT)",
    )
    .bind(name)
    .bind(by)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(())
}

/// Reads for planning a window. They run on the reader pool, so a window
/// never holds the write lock while it looks things up or waits on
/// ChurnZero.
impl Reader {
    /// When the next sync run is due (ms), if a previous process planned one.
    pub async fn sync_next_run_at(&self) -> Result<Option<i64>, StoreError> {
        let v: Option<Option<String>> =
            sqlx::query_scalar("SELECT value FROM meta WHERE name = 'sync_next_run_at'")
                .fetch_optional(self.pool())
                .await?;
        Ok(v.flatten().and_then(|v| v.parse().ok()))
    }

    /// The next `limit` users with pending audience updates after `after`
    /// in key order: a window walks the table in pages, so memory stays
    /// bounded however large the first sync is.
    pub async fn audience_users_after(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT user_id FROM audience_pending WHERE user_id > ? ORDER BY user_id LIMIT ?",
        )
        .bind(after)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?)
    }

    /// The pending updates of these users written at or before `cut` (ms):
    /// later ones belong to the next window.
    pub async fn audience_pending_for(
        &self,
        users: &[String],
        cut: i64,
    ) -> Result<Vec<PendingUpdate>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let json = serde_json::to_string(users).expect("strings serialise");
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT p.user_id, p.attribute, p.value, p.updated_at FROM json_each(?) j \
             JOIN audience_pending p ON p.user_id = j.value \
             WHERE p.updated_at <= ? ORDER BY p.user_id, p.attribute",
        )
        .bind(json)
        .bind(cut)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user_id, attribute, value, updated_at)| PendingUpdate {
                user_id,
                attribute,
                value,
                updated_at,
            })
            .collect())
    }

    /// The values last delivered for these (account, contact, attribute)
    /// keys; keys never delivered are absent.
    pub async fn audience_delivered_values(
        &self,
        keys: &[(String, String, String)],
    ) -> Result<HashMap<(String, String, String), String>, StoreError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let json = serde_json::to_string(keys).expect("strings serialise");
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT d.account_id, d.contact_id, d.attribute, d.value FROM json_each(?) j \
             JOIN audience_delivered d ON d.account_id = json_extract(j.value, '$[0]') \
             AND d.contact_id = json_extract(j.value, '$[1]') \
             AND d.attribute = json_extract(j.value, '$[2]')",
        )
        .bind(json)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(a, c, attr, v)| ((a, c, attr), v))
            .collect())
    }
}
