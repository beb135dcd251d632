//! Claims, settlements and lease recovery (see the module doc of
//! `postgres` for the ordering design they keep).

use super::{lock_keys, pg_error};
use crate::outbox::recent_errors;
use crate::outbox::{ClaimedEvent, SettleOutcome, Settlement, StoreError, now_ms};
use sqlx::{PgConnection, PgPool, Row};
use std::collections::HashSet;
use std::time::Duration;

/// Failed attempts remembered per event for dead-letter inspection.
const HISTORY_KEEP: i32 = 20;
/// Keys whose leases one recovery pass brings back at most: under the 512
/// keys past which a transaction locks the whole key space (see
/// `lock_order_keys`), so a recovery never stops ingest on every instance.
const RECOVER_PAGE: i64 = 500;

/// Claims up to `max` events under the lease `until` (its expiry in ms,
/// and the token that names this claim).
///
/// Reads the due index from `floor` (`i64::MIN` for all of it) and returns,
/// with the claimed events, the earliest due time among the candidates it
/// read and did not take (`i64::MAX` if it took them all; `None` if it took
/// nothing): where the next claim may start (see migration 0010).
pub(super) async fn claim(
    pool: &PgPool,
    me: i64,
    max: usize,
    until: i64,
    now: i64,
    floor: i64,
) -> Result<(Vec<ClaimedEvent>, Option<i64>), StoreError> {
    // One statement, outside an explicit transaction (see `claim_due` in
    // the migrations): the keys of the oldest due, unleased heads locked
    // without waiting (a key another instance or worker is changing right
    // now is skipped this round), then under the locks the heads read
    // again, each followed by the events queued behind it, the first `max`
    // leased and returned. The key is not leased, so none of its events is;
    // the events' own rows are not written.
    let rows = sqlx::query(
        "SELECT id, order_key, kind, payload, attempts, accepted_at, first_attempt_at, actions, \
         scan_floor FROM claim_due($1, $2, $3, $4, $5)",
    )
    .bind(me)
    .bind(i32::try_from(max).unwrap_or(i32::MAX))
    .bind(until)
    .bind(now)
    .bind(floor)
    .fetch_all(pool)
    .await
    .map_err(pg_error)?;
    // NULL: the claim took every candidate it read, and read fewer than it
    // could: nothing else was due from the floor.
    let seen = rows
        .first()
        .map(|r| r.get::<Option<i64>, _>(8).unwrap_or(i64::MAX));
    // The token handed to the worker is the lease's expiry (ms), as in the
    // SQLite outbox: delivery reads it as the time its requests must end
    // by. With the owner it still fences: a later claim of the same event,
    // by anyone, ends later.
    let mut claimed: Vec<ClaimedEvent> = rows
        .into_iter()
        .map(|r| ClaimedEvent {
            id: r.get(0),
            order_key: r.get(1),
            kind: r.get(2),
            payload: r.get(3),
            attempts: r.get::<i32, _>(4) as i64 + 1,
            accepted_at: r.get(5),
            first_attempt_at: r.get::<Option<i64>, _>(6).unwrap_or(now),
            lease: until,
            claimed_at: now,
            actions: r.get(7),
        })
        .collect();
    claimed.sort_by_key(|c| c.id);
    Ok((claimed, seen))
}

fn history_entry(now: i64, error: &str) -> String {
    serde_json::json!({ "at": crate::segment::format_timestamp(
        chrono::DateTime::from_timestamp_millis(now).unwrap_or_default()), "error": error })
    .to_string()
}

/// Failed attempts of one kind (retry or dead), as columns for `unnest`.
#[derive(Default)]
struct Failures<'a> {
    ids: Vec<i64>,
    at: Vec<i64>,
    first: Vec<i64>,
    error: Vec<&'a str>,
    entry: Vec<String>,
    actions: Vec<Option<&'a str>>,
}

impl<'a> Failures<'a> {
    fn push(&mut self, s: &'a Settlement, at: Option<i64>, error: &'a str, now: i64) {
        self.ids.push(s.id);
        self.at.extend(at);
        self.first.push(s.first_attempt_at);
        self.error.push(error);
        self.entry.push(history_entry(now, error));
        self.actions.push(s.actions.as_deref());
    }
}

pub(super) async fn settle(pool: &PgPool, me: i64, items: &[Settlement]) -> Result<(), StoreError> {
    if items
        .iter()
        .all(|s| matches!(s.outcome, SettleOutcome::Delivered))
    {
        return settle_delivered(pool, me, items).await;
    }
    let now = now_ms();
    let mut tx = pool.begin().await.map_err(pg_error)?;
    let keys: Vec<&str> = items.iter().map(|s| s.order_key.as_str()).collect();
    // The keys' locks order this settle against ingest and other settles of
    // the same keys for the statements after them; the fence (the same one
    // as an all-delivered settle's) keeps only the outcomes whose lease
    // still carries this instance's token.
    lock_keys(&mut tx, &keys).await?;
    let ids: Vec<i64> = items.iter().map(|s| s.id).collect();
    let tokens: Vec<i64> = items.iter().map(|s| s.lease).collect();
    let held: Vec<i64> = sqlx::query_scalar("SELECT fence_leases($1, $2, $3)")
        .bind(me)
        .bind(&ids)
        .bind(&tokens)
        .fetch_one(&mut *tx)
        .await
        .map_err(pg_error)?;
    let held: HashSet<i64> = held.into_iter().collect();
    let ignored = items.len() - held.len();
    if ignored > 0 {
        tracing::info!(
            events = ignored,
            "outcomes ignored: their lease is no longer held"
        );
    }
    let items: Vec<&Settlement> = items.iter().filter(|s| held.contains(&s.id)).collect();

    let (mut delivered, mut del_first) = (Vec::new(), Vec::new());
    let (mut retry, mut dead) = (Failures::default(), Failures::default());
    let (mut rel_ids, mut rel_actions): (Vec<i64>, Vec<Option<&str>>) = Default::default();
    let mut held_items: Vec<(&Settlement, &str, i64)> = Vec::new();
    let mut last_error: Option<&str> = None;
    let mut reports: Vec<(&str, &'static str, i64)> = Vec::new();
    for s in &items {
        match &s.outcome {
            SettleOutcome::Delivered => {
                delivered.push(s.id);
                del_first.push(s.first_attempt_at);
            }
            SettleOutcome::Retry { at, error } => {
                retry.push(s, Some(*at), error, now);
                last_error = Some(error);
                note_error(&mut reports, error, "retry");
            }
            SettleOutcome::Dead { reason } => {
                dead.push(s, None, reason, now);
                last_error = Some(reason);
                note_error(&mut reports, reason, "dead");
            }
            SettleOutcome::Release => {
                rel_ids.push(s.id);
                rel_actions.push(s.actions.as_deref());
            }
            SettleOutcome::Held { error, map_as_of } => held_items.push((s, error, *map_as_of)),
        }
    }
    // The delivered events and the settle's bookkeeping (retries counted,
    // this minute's activity, the instance's last delivery and error) in one
    // round trip.
    let failed = (retry.ids.len() + dead.ids.len()) as i64;
    sqlx::query(
        "WITH d AS (UPDATE events e SET state = 2, finished_at = $3, attempts = e.attempts + 1, \
             first_attempt_at = t.first FROM unnest($1::int8[], $2::int8[]) AS t(id, first) \
             WHERE e.id = t.id), \
         c AS (UPDATE counters SET retries = retries + $4 \
             WHERE shard = txid_current() % 16 AND $4 > 0), \
         i AS (UPDATE instances SET \
             last_delivery_at = CASE WHEN $5 > 0 THEN $3 ELSE last_delivery_at END, \
             last_error = COALESCE($7, last_error), \
             last_error_at = CASE WHEN $7 IS NULL THEN last_error_at ELSE $3 END \
             WHERE id = $8 AND ($5 > 0 OR $7 IS NOT NULL)) \
         INSERT INTO minute_stats (minute, shard, accepted, delivered, failed) \
         SELECT $9, (txid_current() % 16)::smallint, 0, $5, $6 WHERE $5 + $6 > 0 \
         ON CONFLICT (minute, shard) DO UPDATE SET \
             delivered = minute_stats.delivered + excluded.delivered, \
             failed = minute_stats.failed + excluded.failed",
    )
    .bind(&delivered)
    .bind(&del_first)
    .bind(now)
    .bind(retry.ids.len() as i64)
    .bind(delivered.len() as i64)
    .bind(failed)
    .bind(last_error)
    .bind(me)
    .bind(now.div_euclid(60_000))
    .execute(&mut *tx)
    .await
    .map_err(pg_error)?;
    // Retried and released events are queued; the normalisation below makes
    // the earliest of each key its head again, keeping its retry time.
    if !retry.ids.is_empty() {
        sqlx::query(
            "UPDATE events e SET state = 5, next_attempt_at = t.at, attempts = e.attempts + 1, \
             first_attempt_at = t.first, last_error = t.err, \
             history = (CASE WHEN jsonb_array_length(COALESCE(e.history, '[]'::jsonb)) >= $7 \
                 THEN COALESCE(e.history, '[]'::jsonb) - 0 ELSE COALESCE(e.history, '[]'::jsonb) END) \
                 || jsonb_build_array(t.entry::jsonb), \
             actions = COALESCE(e.actions, t.actions) \
             FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[]) \
                  AS t(id, at, first, err, entry, actions) \
             WHERE e.id = t.id",
        )
        .bind(&retry.ids)
        .bind(&retry.at)
        .bind(&retry.first)
        .bind(&retry.error)
        .bind(&retry.entry)
        .bind(&retry.actions)
        .bind(HISTORY_KEEP)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
    }
    if !rel_ids.is_empty() {
        sqlx::query(
            "UPDATE events e SET state = 5, next_attempt_at = $3, actions = COALESCE(e.actions, t.actions) \
             FROM unnest($1::int8[], $2::text[]) AS t(id, actions) WHERE e.id = t.id",
        )
        .bind(&rel_ids)
        .bind(&rel_actions)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
    }
    if !dead.ids.is_empty() {
        sqlx::query(
            "UPDATE events e SET state = 3, finished_at = $6, attempts = e.attempts + 1, \
             first_attempt_at = t.first, reason = t.reason, last_error = t.reason, \
             history = COALESCE(e.history, '[]'::jsonb) || jsonb_build_array(t.entry::jsonb), \
             actions = COALESCE(e.actions, t.actions) \
             FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[]) \
                  AS t(id, first, reason, entry, actions) \
             WHERE e.id = t.id",
        )
        .bind(&dead.ids)
        .bind(&dead.first)
        .bind(&dead.error)
        .bind(&dead.entry)
        .bind(&dead.actions)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
    }
    // Held outcomes, in one statement: a claim of 448 heads of unknown
    // users is 448 holds, and each head is written once. Every held event
    // is held here, or made due now when the identity map has learned the
    // user's ids since the worker read it (the identify's release may have
    // run before this hold: the key lock orders the two, and this read sees
    // the identify if it committed first). Which of them is its key's head
    // is the normalisation's to decide, as for every other outcome: it
    // queues the ones behind an earlier active event of their key.
    if !held_items.is_empty() {
        let held_ids: Vec<i64> = held_items.iter().map(|(s, _, _)| s.id).collect();
        let held_keys: Vec<&str> = held_items
            .iter()
            .map(|(s, _, _)| s.order_key.as_str())
            .collect();
        let held_as_of: Vec<i64> = held_items.iter().map(|(_, _, at)| *at).collect();
        let firsts: Vec<i64> = held_items
            .iter()
            .map(|(s, _, _)| s.first_attempt_at)
            .collect();
        let errors: Vec<&str> = held_items.iter().map(|(_, e, _)| *e).collect();
        let actions: Vec<Option<&str>> = held_items
            .iter()
            .map(|(s, _, _)| s.actions.as_deref())
            .collect();
        sqlx::query(
            "UPDATE events e SET state = CASE WHEN t.known THEN 0 ELSE 4 END, \
                 next_attempt_at = $7, attempts = e.attempts + 1, first_attempt_at = t.first, \
                 last_error = t.err, actions = COALESCE(e.actions, t.actions) \
             FROM (SELECT u.id, u.first, u.err, u.actions, \
                       EXISTS (SELECT 1 FROM identities i \
                               WHERE i.user_id = u.key AND i.updated_at >= u.at) AS known \
                   FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::text[], $5::text[], \
                               $6::text[]) AS u(id, at, first, err, actions, key)) t \
             WHERE e.id = t.id",
        )
        .bind(&held_ids)
        .bind(&held_as_of)
        .bind(&firsts)
        .bind(&errors)
        .bind(&actions)
        .bind(&held_keys)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
    }
    normalize(&mut tx, &keys, now).await?;
    record_errors(&mut tx, me, &reports, now).await?;
    tx.commit().await.map_err(pg_error)?;
    Ok(())
}

/// The common settle, every outcome delivered, as one statement outside an
/// explicit transaction (`settle_delivered` in the migrations): the same
/// key locks, fence, updates and normalisation as the general path below.
async fn settle_delivered(pool: &PgPool, me: i64, items: &[Settlement]) -> Result<(), StoreError> {
    let mut keys: Vec<&str> = items.iter().map(|s| s.order_key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let ids: Vec<i64> = items.iter().map(|s| s.id).collect();
    let tokens: Vec<i64> = items.iter().map(|s| s.lease).collect();
    let firsts: Vec<i64> = items.iter().map(|s| s.first_attempt_at).collect();
    let counted: i32 = sqlx::query_scalar("SELECT settle_delivered($1, $2, $3, $4, $5, $6)")
        .bind(me)
        .bind(&ids)
        .bind(&tokens)
        .bind(&firsts)
        .bind(&keys)
        .bind(now_ms())
        .fetch_one(pool)
        .await
        .map_err(pg_error)?;
    let ignored = items.len().saturating_sub(counted.max(0) as usize);
    if ignored > 0 {
        tracing::info!(
            events = ignored,
            "outcomes ignored: their lease is no longer held"
        );
    }
    Ok(())
}

/// Counts one event under its (error, outcome) for the recent-errors ring.
fn note_error<'a>(
    reports: &mut Vec<(&'a str, &'static str, i64)>,
    error: &'a str,
    outcome: &'static str,
) {
    match reports
        .iter_mut()
        .find(|(e, o, _)| *e == error && *o == outcome)
    {
        Some(r) => r.2 += 1,
        None => reports.push((error, outcome, 1)),
    }
}

/// Adds reports to this instance's ring of recent errors (its own row, so
/// no other instance waits on it); status merges the instances' rings.
/// Runs of the same error with the same outcome merge into one entry.
pub(super) async fn record_errors(
    conn: &mut PgConnection,
    me: i64,
    reports: &[(&str, &'static str, i64)],
    now: i64,
) -> Result<(), StoreError> {
    if reports.is_empty() {
        return Ok(());
    }
    let current: Option<String> =
        sqlx::query_scalar("SELECT recent_errors FROM instances WHERE id = $1")
            .bind(me)
            .fetch_optional(&mut *conn)
            .await
            .map_err(pg_error)?
            .flatten();
    let mut ring = recent_errors::parse(current.as_deref());
    recent_errors::merge(&mut ring, reports, now);
    sqlx::query("UPDATE instances SET recent_errors = $2 WHERE id = $1")
        .bind(me)
        .bind(serde_json::to_string(&ring).expect("entries serialise"))
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// Restores the per-key invariant for keys the caller has locked: the
/// lowest active id is the head (state 0, or 4 if it was held), every other
/// active event is queued. Keys with an event in flight are left alone:
/// their settle normalises them. A head that is not waiting for a retry
/// (promoted, or left unleased by a lease that came back) is due at `now`
/// at the earliest, so that no claim's floor passes it over (migration
/// 0012).
pub(super) async fn normalize(
    conn: &mut PgConnection,
    keys: &[&str],
    now: i64,
) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT normalize_keys($1, $2)")
        .bind(keys)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// Gives back, under the keys' locks, the leases this instance took under
/// `tokens`: claims whose answer never arrived, so that no worker holds
/// their events. Their keys are normalised as after any settle.
pub(super) async fn release_tokens(
    conn: &mut PgConnection,
    me: i64,
    tokens: &[i64],
) -> Result<u64, StoreError> {
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT order_key FROM leases WHERE owner = $1 AND token = ANY($2)",
    )
    .bind(me)
    .bind(tokens)
    .fetch_all(&mut *conn)
    .await
    .map_err(pg_error)?;
    if keys.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    lock_keys(conn, &keys).await?;
    let r = sqlx::query("DELETE FROM leases WHERE owner = $1 AND token = ANY($2)")
        .bind(me)
        .bind(tokens)
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
    normalize(conn, &keys, now_ms()).await?;
    Ok(r.rows_affected())
}

/// Brings back leases that expired or whose owner's heartbeat is older
/// than `expiry`, under the keys' locks, and normalises those keys. A live
/// instance's unexpired lease is never taken.
pub(super) async fn recover_leases(
    conn: &mut PgConnection,
    now: i64,
    expiry: Duration,
) -> Result<u64, StoreError> {
    let dead_before = now - expiry.as_millis() as i64;
    let stale = "(until < $2 OR owner IN (SELECT id FROM instances WHERE heartbeat_at < $3))";
    let keys: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT DISTINCT order_key FROM leases WHERE {stale} AND $1::int8 IS NULL LIMIT {RECOVER_PAGE}"
    ))
    .bind(None::<i64>)
    .bind(now)
    .bind(dead_before)
    .fetch_all(&mut *conn)
    .await
    .map_err(pg_error)?;
    if keys.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    lock_keys(conn, &keys).await?;
    let r = sqlx::query(&format!(
        "DELETE FROM leases WHERE order_key = ANY($1) AND {stale}"
    ))
    .bind(&keys)
    .bind(now)
    .bind(dead_before)
    .execute(&mut *conn)
    .await
    .map_err(pg_error)?;
    normalize(conn, &keys, now).await?;
    Ok(r.rows_affected())
}
