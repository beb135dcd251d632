//! Storage of the audience sync lane on PostgreSQL: the same reads and
//! writes as the SQLite side (`outbox/audience.rs`), each write in one
//! transaction.

use super::{PgOutbox, pg_error};
use crate::outbox::{AudienceOp, AudienceSettlement, PendingUpdate, StoreError, now_ms};
use sqlx::{PgConnection, PgPool};
use std::collections::HashMap;

async fn set_meta(conn: &mut PgConnection, name: &str, value: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO meta (name, value) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )
    .bind(name)
    .bind(value)
    .execute(&mut *conn)
    .await
    .map_err(pg_error)?;
    Ok(())
}

async fn bump_meta(conn: &mut PgConnection, name: &str, by: i64) -> Result<(), StoreError> {
    if by == 0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO meta (name, value) VALUES ($1, $2::text) ON CONFLICT (name) DO UPDATE \
         SET value = (COALESCE(meta.value, '0')::bigint + excluded.value::bigint)::text",
    )
    .bind(name)
    .bind(by.to_string())
    .execute(&mut *conn)
    .await
    .map_err(pg_error)?;
    Ok(())
}

async fn settle(
    conn: &mut PgConnection,
    instance: i64,
    s: &AudienceSettlement,
) -> Result<(), StoreError> {
    let now = now_ms();
    if let Some(started_at) = s.run_started_at {
        set_meta(conn, "sync_last_run_at", &started_at.to_string()).await?;
        set_meta(conn, "sync_last_run_sent", "0").await?;
        set_meta(conn, "sync_last_run_skipped", "0").await?;
    }
    if !s.delivered.is_empty() {
        // Last value wins within one settlement, as one statement may not
        // touch a row twice.
        let mut last: HashMap<(&str, &str, &str), &str> = HashMap::new();
        for d in &s.delivered {
            last.insert((&d.account, &d.contact, &d.attribute), &d.value);
        }
        let (mut acc, mut con, mut attr, mut val) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((a, c, t), v) in last {
            acc.push(a);
            con.push(c);
            attr.push(t);
            val.push(v);
        }
        sqlx::query(
            "INSERT INTO audience_delivered (account_id, contact_id, attribute, value, delivered_at) \
             SELECT a, c, t, v, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS x(a, c, t, v) \
             ON CONFLICT (account_id, contact_id, attribute) DO UPDATE SET \
             value = excluded.value, delivered_at = excluded.delivered_at",
        )
        .bind(&acc)
        .bind(&con)
        .bind(&attr)
        .bind(&val)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
    }
    if !s.consumed.is_empty() {
        // Deleted only if the row still holds the value that was read.
        let users: Vec<&str> = s.consumed.iter().map(|p| p.user_id.as_str()).collect();
        let attrs: Vec<&str> = s.consumed.iter().map(|p| p.attribute.as_str()).collect();
        let values: Vec<&str> = s.consumed.iter().map(|p| p.value.as_str()).collect();
        sqlx::query(
            "DELETE FROM audience_pending p USING unnest($1::text[], $2::text[], $3::text[]) AS x(u, a, v) \
             WHERE p.user_id = x.u AND p.attribute = x.a AND p.value = x.v",
        )
        .bind(&users)
        .bind(&attrs)
        .bind(&values)
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
    }
    bump_meta(conn, "sync_last_run_sent", s.sent).await?;
    bump_meta(conn, "sync_last_run_skipped", s.skipped).await?;
    if let Some(e) = &s.error {
        sqlx::query("UPDATE instances SET last_error = $2, last_error_at = $3 WHERE id = $1")
            .bind(instance)
            .bind(e)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(pg_error)?;
    }
    Ok(())
}

impl PgOutbox {
    /// Records a step of the audience sync lane in one transaction.
    pub async fn audience(&self, op: AudienceOp) -> Result<(), StoreError> {
        let mut tx = self.inner.pool.begin().await.map_err(pg_error)?;
        match &op {
            AudienceOp::Schedule { next_run_at } => {
                set_meta(&mut tx, "sync_next_run_at", &next_run_at.to_string()).await?
            }
            AudienceOp::Settle(s) => settle(&mut tx, self.inner.instance, s).await?,
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(())
    }

    /// When the next sync run is due (ms), if an instance planned one.
    pub async fn sync_next_run_at(&self) -> Result<Option<i64>, StoreError> {
        sync_next_run_at(&self.inner.pool).await
    }

    /// The next `limit` users with pending audience updates after `after`.
    pub async fn audience_users_after(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        users_after(&self.inner.pool, after, limit).await
    }

    /// The pending updates of these users written at or before `cut` (ms).
    pub async fn audience_pending_for(
        &self,
        users: &[String],
        cut: i64,
    ) -> Result<Vec<PendingUpdate>, StoreError> {
        pending_for(&self.inner.pool, users, cut).await
    }

    /// The values last delivered for these (account, contact, attribute)
    /// keys; keys never delivered are absent.
    pub async fn audience_delivered_values(
        &self,
        keys: &[(String, String, String)],
    ) -> Result<HashMap<(String, String, String), String>, StoreError> {
        delivered_values(&self.inner.pool, keys).await
    }
}

/// When the next sync run is due (ms), if an instance planned one.
pub(super) async fn sync_next_run_at(pool: &PgPool) -> Result<Option<i64>, StoreError> {
    let v: Option<Option<String>> =
        sqlx::query_scalar("SELECT value FROM meta WHERE name = 'sync_next_run_at'")
            .fetch_optional(pool)
            .await
            .map_err(pg_error)?;
    Ok(v.flatten().and_then(|v| v.parse().ok()))
}

/// The next `limit` users with pending audience updates after `after`.
pub(super) async fn users_after(
    pool: &PgPool,
    after: &str,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    sqlx::query_scalar(
        "SELECT DISTINCT user_id FROM audience_pending WHERE user_id > $1 ORDER BY user_id LIMIT $2",
    )
    .bind(after)
    .bind(limit as i64)
    .fetch_all(pool)
    .await
    .map_err(pg_error)
}

/// The pending updates of these users written at or before `cut` (ms).
pub(super) async fn pending_for(
    pool: &PgPool,
    users: &[String],
    cut: i64,
) -> Result<Vec<PendingUpdate>, StoreError> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT user_id, attribute, value, updated_at FROM audience_pending \
         WHERE user_id = ANY($1) AND updated_at <= $2 ORDER BY user_id, attribute",
    )
    .bind(users)
    .bind(cut)
    .fetch_all(pool)
    .await
    .map_err(pg_error)?;
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
pub(super) async fn delivered_values(
    pool: &PgPool,
    keys: &[(String, String, String)],
) -> Result<HashMap<(String, String, String), String>, StoreError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let acc: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let con: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let attr: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT d.account_id, d.contact_id, d.attribute, d.value \
         FROM unnest($1::text[], $2::text[], $3::text[]) AS x(a, c, t) \
         JOIN audience_delivered d ON d.account_id = x.a AND d.contact_id = x.c AND d.attribute = x.t",
    )
    .bind(&acc)
    .bind(&con)
    .bind(&attr)
    .fetch_all(pool)
    .await
    .map_err(pg_error)?;
    Ok(rows
        .into_iter()
        .map(|(a, c, t, v)| ((a, c, t), v))
        .collect())
}
