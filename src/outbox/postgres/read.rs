//! Reads: status from sharded counters and index probes (never a scan of
//! the backlog), identity look-ups, dead letters.

use super::pg_error;
use crate::outbox::PER_MINUTE_WINDOW;
use crate::outbox::recent_errors::{self, RecentError};
use crate::outbox::status::ms_to_rfc3339 as rfc3339;
use crate::outbox::{DeadLetter, DeadListFilter, OutboxStatus, StoreError, SyncStatus, now_ms};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use std::collections::HashMap;

pub(super) async fn status(pool: &PgPool) -> Result<OutboxStatus, StoreError> {
    let names = [
        "s0",
        "s3",
        "s4",
        "s5",
        "leased",
        "delivered",
        "accepted",
        "duplicates",
        "filtered",
        "retries",
        "sync_contacts",
        "held_queued",
    ];
    let sums: Vec<String> = names
        .iter()
        .map(|n| format!("COALESCE(sum({n}), 0)::bigint"))
        .collect();
    let now = now_ms();
    let this_minute = now.div_euclid(60_000);
    let since = this_minute - (PER_MINUTE_WINDOW - 1);
    // Every figure in one statement: one snapshot without a transaction,
    // and one round trip (a status read under load waited for nine).
    //
    // Ids grow with commit order per key, and a key's head is its lowest
    // active id: the first head not held is the oldest event that can be
    // sent. Events queued behind a held head cannot be, and count with the
    // held (as on SQLite); triggers keep their number in `held_queued`
    // (migration 0009).
    let row = sqlx::query(&format!(
        "SELECT {sums}, \
            (SELECT json_object_agg(name, value) FROM meta WHERE value IS NOT NULL)::text, \
            (SELECT max(last_delivery_at) FROM instances), \
            e.last_error, e.last_error_at, \
            (SELECT array_agg(recent_errors) FROM instances WHERE recent_errors IS NOT NULL), \
            (SELECT accepted_at FROM events WHERE state = 0 ORDER BY id LIMIT 1), \
            (SELECT accepted_at FROM events WHERE state = 4 ORDER BY id LIMIT 1), \
            (SELECT json_agg(json_build_array(minute, a, d, f))::text FROM \
                (SELECT minute, sum(accepted)::bigint AS a, sum(delivered)::bigint AS d, \
                        sum(failed)::bigint AS f \
                 FROM minute_stats WHERE minute >= $1 GROUP BY minute) m) \
         FROM counters \
         LEFT JOIN LATERAL (SELECT last_error, last_error_at FROM instances \
             WHERE last_error_at IS NOT NULL ORDER BY last_error_at DESC LIMIT 1) e ON true \
         GROUP BY e.last_error, e.last_error_at",
        sums = sums.join(", ")
    ))
    .bind(since)
    .fetch_one(pool)
    .await
    .map_err(pg_error)?;
    let counts: HashMap<&str, i64> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, row.get::<i64, _>(i)))
        .collect();
    let at = names.len();
    let meta: HashMap<String, Option<String>> = row
        .get::<Option<String>, _>(at)
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default();
    let meta: HashMap<String, String> = meta
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    let last_delivery: Option<i64> = row.get(at + 1);
    let last_error: Option<String> = row.get(at + 2);
    let last_error_at: Option<i64> = row.get(at + 3);
    let rings: Vec<String> = row
        .get::<Option<Vec<String>>, _>(at + 4)
        .unwrap_or_default();
    let (oldest, oldest_held): (Option<i64>, Option<i64>) = (row.get(at + 5), row.get(at + 6));
    let minutes: Vec<(i64, i64, i64, i64)> = row
        .get::<Option<String>, _>(at + 7)
        .map(|j| {
            serde_json::from_str(&j)
                .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
        })
        .transpose()?
        .unwrap_or_default();
    let rows: HashMap<i64, (i64, i64, i64)> = minutes
        .into_iter()
        .map(|(m, a, d, f)| (m, (a, d, f)))
        .collect();
    // Newest first across instances (RFC 3339 in UTC sorts as text).
    let mut recent: Vec<RecentError> = rings
        .iter()
        .flat_map(|r| recent_errors::parse(Some(r.as_str())))
        .collect();
    recent.sort_by(|a, b| b.at.cmp(&a.at));
    recent.truncate(recent_errors::KEEP);
    let per_minute = crate::outbox::status::per_minute_series(since, this_minute, &rows);
    let age = |t: Option<i64>| t.map(|o| ((now - o).max(0) as f64) / 1000.0).unwrap_or(0.0);
    let c = |n: &str| counts.get(n).copied().unwrap_or(0);
    let held_queued = c("held_queued");
    let m = |n: &str| meta.get(n).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    let meta_time = |n: &str| meta.get(n).and_then(|v| v.parse::<i64>().ok()).map(rfc3339);
    Ok(OutboxStatus {
        generated_at: rfc3339(now),
        // Leased events keep their state (0 or 5); `leased` counts them.
        pending: c("s0") + c("s5") - c("leased") - held_queued,
        in_flight: c("leased"),
        delivered: c("delivered"),
        dead: c("s3"),
        held: c("s4") + held_queued,
        held_queued,
        oldest_pending_age_seconds: age(oldest),
        oldest_held_age_seconds: age(oldest_held),
        last_delivery_at: last_delivery.map(rfc3339),
        last_error,
        last_error_at: last_error_at.map(rfc3339),
        recent_errors: recent,
        accepted: c("accepted"),
        filtered: c("filtered"),
        duplicates: c("duplicates"),
        retries: c("retries"),
        sync: SyncStatus {
            last_run_at: meta_time("sync_last_run_at"),
            next_run_at: meta_time("sync_next_run_at"),
            pending_contacts: c("sync_contacts"),
            last_run_sent: m("sync_last_run_sent"),
            last_run_skipped: m("sync_last_run_skipped"),
        },
        per_minute,
    })
}

pub(super) async fn identities(
    pool: &PgPool,
    users: &[&str],
) -> Result<HashMap<String, (Option<String>, Option<String>)>, StoreError> {
    if users.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT user_id, account_id, contact_id FROM identities WHERE user_id = ANY($1)",
    )
    .bind(users)
    .fetch_all(pool)
    .await
    .map_err(pg_error)?;
    Ok(rows.into_iter().map(|(u, a, c)| (u, (a, c))).collect())
}

const DEAD_COLUMNS: &str = "id, message_id, kind, order_key, reason, attempts, accepted_at, \
     finished_at, history::text AS history, payload";

/// Parameters: $1 after id, $2 since, $3 until, $4 reason substring, $5
/// limit (NULL: all).
const DEAD_FILTER: &str = "FROM events WHERE state = 3 AND id > $1 \
     AND ($2::int8 IS NULL OR finished_at >= $2) AND ($3::int8 IS NULL OR finished_at < $3) \
     AND ($4::text IS NULL OR strpos(lower(reason), lower($4)) > 0) \
     ORDER BY id LIMIT $5";

fn dead_from_row(r: &PgRow) -> DeadLetter {
    let payload: String = r.get("payload");
    let history: Option<String> = r.get("history");
    DeadLetter {
        id: r.get("id"),
        message_id: r.get("message_id"),
        kind: r.get("kind"),
        order_key: r.get("order_key"),
        reason: r.get::<Option<String>, _>("reason").unwrap_or_default(),
        attempts: r.get::<i32, _>("attempts") as i64,
        accepted_at: rfc3339(r.get("accepted_at")),
        died_at: r.get::<Option<i64>, _>("finished_at").map(rfc3339),
        history: history
            .and_then(|h| serde_json::from_str(&h).ok())
            .unwrap_or(Value::Array(vec![])),
        event: serde_json::from_str(&payload).unwrap_or(Value::Null),
    }
}

pub(super) async fn dead_list(
    pool: &PgPool,
    f: &DeadListFilter,
) -> Result<Vec<DeadLetter>, StoreError> {
    let limit = if f.limit <= 0 { 100 } else { f.limit };
    let rows = sqlx::query(&format!("SELECT {DEAD_COLUMNS} {DEAD_FILTER}"))
        .bind(f.after_id.unwrap_or(0))
        .bind(f.since_ms)
        .bind(f.until_ms)
        .bind(f.reason_contains.as_deref())
        .bind(Some(limit))
        .fetch_all(pool)
        .await
        .map_err(pg_error)?;
    Ok(rows.iter().map(dead_from_row).collect())
}

pub(super) async fn dead_show(pool: &PgPool, id: i64) -> Result<Option<DeadLetter>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {DEAD_COLUMNS} FROM events WHERE state = 3 AND id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(pg_error)?;
    Ok(row.as_ref().map(dead_from_row))
}

pub(super) async fn dead_selection(
    pool: &PgPool,
    ids: &[i64],
) -> Result<Result<Vec<i64>, String>, StoreError> {
    let mut wanted = ids.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    let found: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM events WHERE state = 3 AND id = ANY($1) ORDER BY id")
            .bind(&wanted)
            .fetch_all(pool)
            .await
            .map_err(pg_error)?;
    let missing: Vec<String> = wanted
        .iter()
        .filter(|id| found.binary_search(id).is_err())
        .map(i64::to_string)
        .collect();
    Ok(if missing.is_empty() {
        Ok(wanted)
    } else {
        Err(format!(
            "not dead events: {}; nothing was changed",
            missing.join(", ")
        ))
    })
}

pub(super) async fn dead_ids(pool: &PgPool, f: &DeadListFilter) -> Result<Vec<i64>, StoreError> {
    sqlx::query_scalar(&format!("SELECT id {DEAD_FILTER}"))
        .bind(0i64)
        .bind(f.since_ms)
        .bind(f.until_ms)
        .bind(f.reason_contains.as_deref())
        .bind(None::<i64>)
        .fetch_all(pool)
        .await
        .map_err(pg_error)
}

/// Up to `limit` ids of dead letters matching a filter, after `after` (its
/// own paging fields are ignored): one chunk of a replay or purge.
pub(super) async fn dead_ids_after(
    pool: &PgPool,
    f: &DeadListFilter,
    after: i64,
    limit: i64,
) -> Result<Vec<i64>, StoreError> {
    sqlx::query_scalar(&format!("SELECT id {DEAD_FILTER}"))
        .bind(after)
        .bind(f.since_ms)
        .bind(f.until_ms)
        .bind(f.reason_contains.as_deref())
        .bind(Some(limit))
        .fetch_all(pool)
        .await
        .map_err(pg_error)
}
