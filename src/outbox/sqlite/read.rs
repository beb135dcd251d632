//! Reads that never block the writer: status from counters (never a scan of
//! the backlog), identity look-ups for delivery, dead letters for operators.

use super::{StoreError, now_ms, reader_pool};
use crate::outbox::EventState;
use crate::outbox::recent_errors;
use crate::outbox::status::ms_to_rfc3339;
use crate::outbox::{DeadLetter, DeadListFilter, OutboxStatus, PER_MINUTE_WINDOW, SyncStatus};
use serde_json::Value;
use sqlx::sqlite::SqliteArguments;
use sqlx::{Arguments, Row, SqlitePool};
use std::collections::HashMap;
use std::path::Path;

use super::{HELD_QUEUED_ROW, LEASES_ROW};

/// Handle to the reader pool. Cheap to clone.
#[derive(Clone)]
pub struct Reader {
    pool: SqlitePool,
}

fn meta_time(meta: &HashMap<String, String>, name: &str) -> Option<String> {
    meta.get(name)
        .and_then(|v| v.parse::<i64>().ok())
        .map(ms_to_rfc3339)
}

impl Reader {
    pub(super) async fn open(path: &Path) -> Result<Reader, StoreError> {
        Ok(Reader {
            pool: reader_pool(path).await?,
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Whether the database answers at all (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Status from counters and single index probes: constant cost whatever
    /// the backlog.
    pub async fn status(&self) -> Result<OutboxStatus, StoreError> {
        // One read transaction: all figures from the same snapshot. A
        // guard, not a raw BEGIN: when this future is dropped part-way (a
        // client that goes away, a request or scrape timeout) the guard
        // rolls back before the connection returns to the pool, instead of
        // leaving it inside the transaction with an old snapshot.
        let mut tx = self.pool.begin().await?;
        let result = self.status_in(&mut tx).await;
        let ended = tx.rollback().await;
        let status = result?;
        ended?;
        Ok(status)
    }

    async fn status_in(
        &self,
        conn: &mut sqlx::SqliteConnection,
    ) -> Result<OutboxStatus, StoreError> {
        let counts: HashMap<i64, i64> = sqlx::query_as("SELECT state, n FROM state_counts")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
        let totals: HashMap<String, i64> = sqlx::query_as("SELECT name, value FROM totals")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
        let meta: HashMap<String, String> =
            sqlx::query_as("SELECT name, value FROM meta WHERE value IS NOT NULL")
                .fetch_all(&mut *conn)
                .await?
                .into_iter()
                .collect();
        // Ids grow with acceptance time, and a key's head is its earliest
        // waiting event: the first head not held (state 0, in flight or
        // not) is the oldest event that can be sent. Events queued behind a
        // held head cannot be and do not count here. Index probes only,
        // whatever the backlog.
        let (oldest, oldest_held): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT accepted_at FROM events INDEXED BY events_heads WHERE state = 0 ORDER BY id LIMIT 1), \
               (SELECT accepted_at FROM events INDEXED BY events_held WHERE state = 4 ORDER BY id LIMIT 1)",
        )
        .fetch_one(&mut *conn)
        .await?;
        let now = now_ms();
        let this_minute = now.div_euclid(60_000);
        let since = this_minute - (PER_MINUTE_WINDOW - 1);
        let rows: HashMap<i64, (i64, i64, i64)> = sqlx::query(
            "SELECT minute, accepted, delivered, failed FROM minute_stats WHERE minute >= ? ORDER BY minute",
        )
        .bind(since)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| (r.get::<i64, _>(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
        let per_minute = crate::outbox::status::per_minute_series(since, this_minute, &rows);
        use EventState::{Dead, Held, Pending, Queued};
        let age = |t: Option<i64>| t.map(|o| ((now - o).max(0) as f64) / 1000.0).unwrap_or(0.0);
        let c = |s: i64| counts.get(&s).copied().unwrap_or(0);
        let t = |n: &str| totals.get(n).copied().unwrap_or(0);
        let m = |n: &str| meta.get(n).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        Ok(OutboxStatus {
            generated_at: ms_to_rfc3339(now),
            // Leased events keep their state; state_counts row 1 counts the
            // leases (see migrations/sqlite/0004_leases.sql), row 6 the events
            // queued behind held heads (0006_held_queue.sql).
            pending: c(Pending.code()) + c(Queued.code()) - c(LEASES_ROW) - c(HELD_QUEUED_ROW),
            in_flight: c(LEASES_ROW),
            delivered: t("delivered"),
            dead: c(Dead.code()),
            held: c(Held.code()) + c(HELD_QUEUED_ROW),
            held_queued: c(HELD_QUEUED_ROW),
            oldest_pending_age_seconds: age(oldest),
            oldest_held_age_seconds: age(oldest_held),
            last_delivery_at: meta_time(&meta, "last_delivery_at"),
            last_error: meta.get("last_error").cloned(),
            last_error_at: meta_time(&meta, "last_error_at"),
            recent_errors: recent_errors::parse(
                meta.get(recent_errors::META_NAME).map(String::as_str),
            ),
            accepted: t("accepted"),
            filtered: t("filtered"),
            duplicates: t("duplicates"),
            retries: t("retries"),
            sync: SyncStatus {
                last_run_at: meta_time(&meta, "sync_last_run_at"),
                next_run_at: meta_time(&meta, "sync_next_run_at"),
                pending_contacts: m("sync_pending_contacts"),
                last_run_sent: m("sync_last_run_sent"),
                last_run_skipped: m("sync_last_run_skipped"),
            },
            per_minute,
        })
    }

    /// Known ids for these users: `user -> (account, contact)`.
    pub async fn identities(
        &self,
        users: &[&str],
    ) -> Result<HashMap<String, (Option<String>, Option<String>)>, StoreError> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let json = serde_json::to_string(users).expect("strings serialise");
        let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT user_id, account_id, contact_id FROM identities WHERE user_id IN (SELECT value FROM json_each(?))",
        )
        .bind(json)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(u, a, c)| (u, (a, c))).collect())
    }

    fn dead_from_row(r: &sqlx::sqlite::SqliteRow) -> DeadLetter {
        let payload: String = r.get("payload");
        let history: Option<String> = r.get("history");
        DeadLetter {
            id: r.get("id"),
            message_id: r.get("message_id"),
            kind: r.get("kind"),
            order_key: r.get("order_key"),
            reason: r.get::<Option<String>, _>("reason").unwrap_or_default(),
            attempts: r.get("attempts"),
            accepted_at: ms_to_rfc3339(r.get("accepted_at")),
            died_at: r.get::<Option<i64>, _>("finished_at").map(ms_to_rfc3339),
            history: history
                .and_then(|h| serde_json::from_str(&h).ok())
                .unwrap_or(Value::Array(vec![])),
            event: serde_json::from_str(&payload).unwrap_or(Value::Null),
        }
    }

    /// Dead letters, oldest first, with filters and keyset paging.
    pub async fn dead_list(&self, f: &DeadListFilter) -> Result<Vec<DeadLetter>, StoreError> {
        let sql = format!(
            "SELECT id, message_id, kind, order_key, reason, attempts, accepted_at, finished_at, history, payload {DEAD_FILTER}"
        );
        let limit = if f.limit <= 0 { 100 } else { f.limit };
        let rows = sqlx::query_with(&sql, filter_args(f, f.after_id.unwrap_or(0), limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(Self::dead_from_row).collect())
    }

    /// One dead letter with its history and payload.
    pub async fn dead_show(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        let row = sqlx::query(
            "SELECT id, message_id, kind, order_key, reason, attempts, accepted_at, finished_at, history, payload \
             FROM events WHERE state = 3 AND id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(Self::dead_from_row))
    }

    /// Checks an explicit selection for replay or purge, all or nothing:
    /// `Ok(ids)` (sorted, without repeats) when every id is a dead letter
    /// now, else `Err(reason)` naming the ones that are not (a typo, or
    /// replayed meanwhile), so operator tools change nothing.
    pub async fn dead_selection(
        &self,
        ids: &[i64],
    ) -> Result<Result<Vec<i64>, String>, StoreError> {
        let mut wanted = ids.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let json = serde_json::to_string(&wanted).expect("ids serialise");
        let found: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM events WHERE state = 3 AND id IN (SELECT value FROM json_each(?)) ORDER BY id",
        )
        .bind(json)
        .fetch_all(&self.pool)
        .await?;
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
}

/// The dead-letter filter shared by listing (with paging) and by the
/// writer's replay and purge over a range (a chunk of ids at a time). Parameters: ?1 after id, ?2 since, ?3
/// until, ?4 reason substring, ?5 limit; see [`filter_args`].
pub(super) const DEAD_FILTER: &str = "FROM events INDEXED BY events_dead WHERE state = 3 AND id > ?1 \
     AND (?2 IS NULL OR finished_at >= ?2) AND (?3 IS NULL OR finished_at < ?3) \
     AND (?4 IS NULL OR instr(lower(reason), lower(?4)) > 0) \
     ORDER BY id LIMIT ?5";

pub(super) fn filter_args(f: &DeadListFilter, after: i64, limit: i64) -> SqliteArguments<'static> {
    let mut args = SqliteArguments::default();
    let added = args
        .add(after)
        .and_then(|_| args.add(f.since_ms))
        .and_then(|_| args.add(f.until_ms))
        .and_then(|_| args.add(f.reason_contains.clone()))
        .and_then(|_| args.add(limit));
    added.expect("integers and text always encode");
    args
}
