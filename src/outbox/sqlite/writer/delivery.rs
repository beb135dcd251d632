//! Claims and settlements: handing due heads to delivery under a lease and
//! recording each attempt's outcome, with the next head of its key promoted.

use super::*;

/// Claims up to `max` due events. Every statement runs as a direct call
/// under one lock of the connection (see direct.rs): a claim of events that
/// each have a user of their own looks up the followers of every head, and
/// through sqlx each of those lookups was a hand-off to the connection's
/// thread, most of the claim's time.
pub(super) async fn claim(
    conn: &mut SqliteConnection,
    statements: &mut StatementCache,
    max: usize,
    lease: Duration,
    now: i64,
) -> Result<Vec<ClaimedEvent>, StoreError> {
    let mut handle = conn.lock_handle().await.map_err(db)?;
    // SAFETY: the handle stays locked until `handle` drops at the end of
    // this function, and `d` does not outlive it.
    let d = unsafe { Db::new(handle.as_raw_handle()) };
    claim_locked(&d, statements, max, lease, now)
}

fn claim_locked(
    d: &Db,
    statements: &mut StatementCache,
    max: usize,
    lease: Duration,
    now: i64,
) -> Result<Vec<ClaimedEvent>, StoreError> {
    let lease_until = now + lease.as_millis() as i64;
    // Both statements return whole rows, in the column order this reads, so
    // an event's row is read once: a claim used to read a head's row three
    // times (for its key, to test the first entry of its queue, and for the
    // claimed columns).
    let claimed_event = |q: &Statement| ClaimedEvent {
        id: q.column_int(0),
        order_key: q.column_text(1),
        kind: q.column_text(2),
        payload: q.column_text(3),
        // This attempt counts from now; the row records it at settle.
        attempts: q.column_int(4) + 1,
        accepted_at: q.column_int(5),
        first_attempt_at: q.column_opt_int(6).unwrap_or(now),
        lease: lease_until,
        claimed_at: now,
        actions: q.column_opt_text(7),
    };
    // Leased heads stay in events_due (a claim writes only to `leases`), so
    // the scan steps over at most the pool's in-flight heads. Every head's
    // row is read here, also those that will not fit behind the queues of
    // earlier heads: at most `max` rows, where the common claim uses them
    // all.
    let mut heads: Vec<ClaimedEvent> = Vec::new();
    {
        let mut q = d.statement(
            statements,
            "SELECT e.id, e.order_key, e.kind, e.payload, e.attempts, e.accepted_at, \
             e.first_attempt_at, e.actions \
             FROM (SELECT id FROM events INDEXED BY events_due \
             WHERE state = 0 AND next_attempt_at <= ?1 AND id NOT IN (SELECT id FROM leases) \
             ORDER BY next_attempt_at, id LIMIT ?2) h JOIN events e ON e.id = h.id",
        )?;
        q.int(1, now)?;
        q.int(2, max as i64)?;
        while q.step()? == Step::Row {
            heads.push(claimed_event(&q));
        }
    }
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    // Each head brings the events queued behind it, in order, before the
    // next head is taken: a backlogged user drains in full batches with one
    // head to promote per batch, and heads that do not fit stay pending for
    // the next claim. A key's head is its lowest active id, so its queue
    // starts after it in events_key: the probe of a user with nothing
    // queued reads no row.
    let mut claimed: Vec<ClaimedEvent> = Vec::with_capacity(max);
    for head in heads {
        if claimed.len() >= max {
            break;
        }
        let (id, key) = (head.id, head.order_key.clone());
        claimed.push(head);
        let room = max - claimed.len();
        if room == 0 {
            break;
        }
        let mut q = d.statement(
            statements,
            "SELECT id, order_key, kind, payload, attempts, accepted_at, first_attempt_at, actions \
             FROM events INDEXED BY events_key \
             WHERE order_key = ?1 AND id > ?3 AND state NOT IN (2, 3) AND state = 5 \
             AND id NOT IN (SELECT id FROM leases) ORDER BY id LIMIT ?2",
        )?;
        q.text(1, &key)?;
        q.int(2, room as i64)?;
        q.int(3, id)?;
        while q.step()? == Step::Row {
            claimed.push(claimed_event(&q));
        }
    }
    claimed.sort_unstable_by_key(|e| e.id);
    // The in-flight count moves once per claim (0010_lease_counts.sql).
    add_to_state_count(d, statements, LEASES_ROW, claimed.len() as i64)?;
    for e in &claimed {
        let mut q = d.statement(
            statements,
            "INSERT INTO leases (id, lease_until) VALUES (?1, ?2)",
        )?;
        q.int(1, e.id)?;
        q.int(2, lease_until)?;
        q.run()?;
    }
    Ok(claimed)
}

pub(super) fn history_entry(now: i64, error: &str) -> String {
    serde_json::json!({ "at": crate::segment::format_timestamp(
        chrono::DateTime::from_timestamp_millis(now).unwrap_or_default()), "error": error })
    .to_string()
}

/// The settled ids grouped by the lease they were claimed under: a lease
/// (its expiry) is checked once for all of its events.
fn ids_by_lease(items: &[Settlement]) -> HashMap<i64, Vec<i64>> {
    let mut by_lease: HashMap<i64, Vec<i64>> = HashMap::new();
    for s in items {
        by_lease.entry(s.lease).or_default().push(s.id);
    }
    by_lease
}

/// Gives back the leases these outcomes were claimed under and returns
/// the ids whose lease was still held: only their outcomes count. A worker
/// whose lease expired (and whose events may have been claimed again) is
/// ignored. One set-based statement per lease: a statement per event would
/// pay SQLite's per-statement journal setup for each.
fn fence(
    d: &Db,
    statements: &mut StatementCache,
    items: &[Settlement],
) -> Result<HashSet<i64>, StoreError> {
    let mut held_lease: HashSet<i64> = HashSet::with_capacity(items.len());
    for (lease, ids) in &ids_by_lease(items) {
        let json = serde_json::to_string(ids).expect("ids serialise");
        let mut q = d.statement(
            statements,
            "DELETE FROM leases WHERE lease_until = ?1 AND id IN (SELECT value FROM json_each(?2)) \
             RETURNING id",
        )?;
        q.int(1, *lease)?;
        q.text(2, &json)?;
        while q.step()? == Step::Row {
            held_lease.insert(q.column_int(0));
        }
    }
    add_to_state_count(d, statements, LEASES_ROW, -(held_lease.len() as i64))?;
    Ok(held_lease)
}

/// Runs `f` as direct calls under one lock of the writer's connection (see
/// direct.rs): a few statements between sqlx calls.
async fn with_locked<T>(
    conn: &mut SqliteConnection,
    f: impl FnOnce(&Db) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut handle = conn.lock_handle().await.map_err(db)?;
    // SAFETY: the handle stays locked until `handle` drops at the end of
    // this function, and `d` does not outlive it.
    let d = unsafe { Db::new(handle.as_raw_handle()) };
    f(&d)
}

pub(super) async fn settle(
    conn: &mut SqliteConnection,
    statements: &mut StatementCache,
    items: &[Settlement],
    now: i64,
) -> Result<(), StoreError> {
    let held_lease = with_locked(conn, |d| fence(d, statements, items)).await?;
    let items: Vec<&Settlement> = items
        .iter()
        .filter(|s| held_lease.contains(&s.id))
        .collect();
    // The earliest unsettled-or-retried event of a key becomes its head again.
    let mut head_of: HashMap<&str, i64> = HashMap::new();
    for s in &items {
        if matches!(
            s.outcome,
            SettleOutcome::Retry { .. } | SettleOutcome::Held { .. } | SettleOutcome::Release
        ) {
            let h = head_of.entry(s.order_key.as_str()).or_insert(s.id);
            *h = (*h).min(s.id);
        }
    }
    let (mut failed, mut retries) = (0i64, 0i64);
    let mut delivered_ids: Vec<(i64, i64)> = Vec::new();
    let mut last_error: Option<&str> = None;
    let mut reports: Vec<(String, &'static str, i64)> = Vec::new();
    for s in &items {
        match &s.outcome {
            SettleOutcome::Delivered => {
                // Collected and marked in one statement below.
                delivered_ids.push((s.id, s.first_attempt_at));
            }
            SettleOutcome::Retry { at, error } => {
                let head = head_of.get(s.order_key.as_str()) == Some(&s.id);
                sqlx::query(
                    "UPDATE events SET state = ?, next_attempt_at = ?, attempts = attempts + 1, \
                     first_attempt_at = ?, last_error = ?, \
                     history = json_insert(CASE WHEN json_array_length(COALESCE(history, '[]')) >= ? \
                       THEN json_remove(history, '$[0]') ELSE COALESCE(history, '[]') END, '$[#]', json(?)), \
                     actions = COALESCE(actions, ?) \
                     WHERE id = ?",
                )
                .bind(if head { EventState::Pending.code() } else { EventState::Queued.code() })
                .bind(*at)
                .bind(s.first_attempt_at)
                .bind(error)
                .bind(HISTORY_KEEP)
                .bind(history_entry(now, error))
                .bind(&s.actions)
                .bind(s.id)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
                failed += 1;
                retries += 1;
                last_error = Some(error);
                note_error(&mut reports, error, "retry");
            }
            SettleOutcome::Release => {
                // Never sent: neither the attempt nor its time is recorded.
                let head = head_of.get(s.order_key.as_str()) == Some(&s.id);
                sqlx::query(
                    "UPDATE events SET state = ?, next_attempt_at = ?, \
                     actions = COALESCE(actions, ?) WHERE id = ?",
                )
                .bind(if head {
                    EventState::Pending.code()
                } else {
                    EventState::Queued.code()
                })
                .bind(now)
                .bind(&s.actions)
                .bind(s.id)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
            }
            SettleOutcome::Held { error, map_as_of } => {
                let head = head_of.get(s.order_key.as_str()) == Some(&s.id);
                // The identify that teaches this user's ids may have been
                // committed after the worker read the map, its release
                // finding nothing held yet: then the event is due again now
                // rather than held until the budget runs out.
                let learned = head
                    && sqlx::query_scalar::<_, i64>(
                        "SELECT 1 FROM identities WHERE user_id = ? AND updated_at >= ?",
                    )
                    .bind(&s.order_key)
                    .bind(*map_as_of)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db)?
                    .is_some();
                let state = match (head, learned) {
                    (false, _) => EventState::Queued.code(),
                    (true, true) => EventState::Pending.code(),
                    (true, false) => EventState::Held.code(),
                };
                // A held event's next_attempt_at records when the map was
                // read for it, so maintenance can tell later changes apart.
                sqlx::query(
                    "UPDATE events SET state = ?, next_attempt_at = ?, attempts = attempts + 1, \
                     first_attempt_at = ?, last_error = ? WHERE id = ?",
                )
                .bind(state)
                .bind(if learned { now } else { *map_as_of })
                .bind(s.first_attempt_at)
                .bind(error)
                .bind(s.id)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
            }
            SettleOutcome::Dead { reason } => {
                sqlx::query(
                    "UPDATE events SET state = 3, finished_at = ?, attempts = attempts + 1, \
                     first_attempt_at = ?, reason = ?, last_error = ?, \
                     history = json_insert(COALESCE(history, '[]'), '$[#]', json(?)), \
                     actions = COALESCE(actions, ?) \
                     WHERE id = ?",
                )
                .bind(now)
                .bind(s.first_attempt_at)
                .bind(reason)
                .bind(reason)
                .bind(history_entry(now, reason))
                .bind(&s.actions)
                .bind(s.id)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
                failed += 1;
                last_error = Some(reason);
                note_error(&mut reports, reason, "dead");
            }
        }
    }
    let keys: HashSet<&str> = items.iter().map(|s| s.order_key.as_str()).collect();
    let keys: Vec<&str> = keys.into_iter().collect();
    let delivered = with_locked(conn, |d| {
        let delivered = mark_delivered(d, statements, &delivered_ids, now)?;
        promote_locked(d, statements, &keys, now)?;
        Ok(delivered)
    })
    .await?;
    bump_total(conn, "retries", retries).await?;
    bump_minute(conn, "delivered", now, delivered).await?;
    bump_minute(conn, "failed", now, failed).await?;
    if delivered > 0 {
        set_meta(conn, "last_delivery_at", &now.to_string()).await?;
    }
    if let Some(e) = last_error {
        set_meta(conn, "last_error", e).await?;
        set_meta(conn, "last_error_at", &now.to_string()).await?;
    }
    crate::outbox::sqlite::recent_errors::record(conn, &reports, now).await?;
    Ok(())
}

/// The common settlement, every item delivered, as direct calls under one
/// lock of the connection (see direct.rs). It runs the statements `settle`
/// runs for such a batch; through sqlx each was a hand-off to the
/// connection's thread. Batches with any other outcome go through `settle`.
pub(super) async fn settle_delivered(
    conn: &mut SqliteConnection,
    statements: &mut StatementCache,
    items: &[Settlement],
    now: i64,
) -> Result<(), StoreError> {
    debug_assert!(
        items
            .iter()
            .all(|s| matches!(s.outcome, SettleOutcome::Delivered))
    );
    let mut handle = conn.lock_handle().await.map_err(db)?;
    // SAFETY: the handle stays locked until `handle` drops at the end of
    // this function, and `d` does not outlive it.
    let d = unsafe { Db::new(handle.as_raw_handle()) };
    let held_lease = fence(&d, statements, items)?;
    let items: Vec<&Settlement> = items
        .iter()
        .filter(|s| held_lease.contains(&s.id))
        .collect();
    let pairs: Vec<(i64, i64)> = items.iter().map(|s| (s.id, s.first_attempt_at)).collect();
    let delivered = mark_delivered(&d, statements, &pairs, now)?;
    let keys: HashSet<&str> = items.iter().map(|s| s.order_key.as_str()).collect();
    let keys: Vec<&str> = keys.into_iter().collect();
    promote_locked(&d, statements, &keys, now)?;
    add_to_minute(&d, statements, MinuteColumn::Delivered, now, delivered)?;
    if delivered > 0 {
        let mut q = d.statement(
            statements,
            "INSERT INTO meta (name, value) VALUES ('last_delivery_at', ?1) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )?;
        q.text(1, &now.to_string())?;
        q.run()?;
    }
    Ok(())
}

/// Counts one event under its (error, outcome) for the recent-errors ring.
pub(super) fn note_error(
    reports: &mut Vec<(String, &'static str, i64)>,
    error: &str,
    outcome: &'static str,
) {
    match reports
        .iter_mut()
        .find(|(e, o, _)| e == error && *o == outcome)
    {
        Some(r) => r.2 += 1,
        None => reports.push((error.to_string(), outcome, 1)),
    }
}

/// Marks events delivered: ?1 the time, ?2 a JSON array of
/// `[id, first_attempt_at]` pairs. The only statement that sets state 2;
/// the update triggers leave that transition to [`mark_delivered`]
/// (migration 0009).
const MARK_DELIVERED: &str = "UPDATE events SET state = 2, finished_at = ?1, attempts = attempts + 1, \
     first_attempt_at = t.first \
     FROM (SELECT value ->> 0 AS id, value ->> 1 AS first FROM json_each(?2)) AS t \
     WHERE events.id = t.id AND events.state <> 2";

/// The states the rows of MARK_DELIVERED leave, read just before it with
/// the same ?2: one rowid probe per event.
const DELIVERED_FROM: &str = "SELECT e.state, e.order_key FROM events e \
     WHERE e.id IN (SELECT value ->> 0 FROM json_each(?1)) AND e.state <> 2";

/// Marks `[id, first_attempt_at]` pairs delivered and moves the counters
/// by what left which state, in the caller's transaction: the events'
/// states in `state_counts`, `totals.delivered`, and `held_keys.queued`
/// for queued events of a key whose head is held. The per-row triggers
/// did this at three statements an event (migration 0009 says why they
/// no longer do). Returns the events marked.
fn mark_delivered(
    d: &Db,
    statements: &mut StatementCache,
    pairs: &[(i64, i64)],
    now: i64,
) -> Result<i64, StoreError> {
    let mut left: HashMap<i64, i64> = HashMap::new();
    let mut queued_keys: HashMap<String, i64> = HashMap::new();
    let mut delivered = 0i64;
    for chunk in pairs.chunks(5000) {
        let json = serde_json::to_string(chunk).expect("pairs serialise");
        {
            let mut q = d.statement(statements, DELIVERED_FROM)?;
            q.text(1, &json)?;
            while q.step()? == Step::Row {
                let state = q.column_int(0);
                *left.entry(state).or_default() += 1;
                if state == EventState::Queued.code() {
                    *queued_keys.entry(q.column_text(1)).or_default() += 1;
                }
            }
        }
        let mut q = d.statement(statements, MARK_DELIVERED)?;
        q.int(1, now)?;
        q.text(2, &json)?;
        q.run()?;
        drop(q);
        delivered += d.changes();
    }
    debug_assert_eq!(delivered, left.values().sum::<i64>());
    for (state, n) in left {
        add_to_state_count(d, statements, state, -n)?;
    }
    add_to_state_count(d, statements, EventState::Delivered.code(), delivered)?;
    add_to_total(d, statements, "delivered", delivered)?;
    // A key without a held head has no row here: the update changes nothing.
    for (key, n) in &queued_keys {
        let mut q = d.statement(
            statements,
            "UPDATE held_keys SET queued = queued - ?1 WHERE order_key = ?2",
        )?;
        q.int(1, *n)?;
        q.text(2, key)?;
        q.run()?;
    }
    Ok(delivered)
}

/// The promotion of `promote`: ?1 the time, ?2 a JSON array of keys. Both
/// probes go through the partial index events_key: O(keys), whatever the
/// backlog.
const PROMOTE: &str = "UPDATE events SET state = 0, next_attempt_at = ?1 WHERE id IN ( \
     SELECT (SELECT e.id FROM events e INDEXED BY events_key \
             WHERE e.order_key = j.value AND e.state NOT IN (2, 3) AND e.state = 5 ORDER BY e.id LIMIT 1) \
     FROM json_each(?2) j \
     WHERE NOT EXISTS (SELECT 1 FROM events x INDEXED BY events_key \
       WHERE x.order_key = j.value AND x.state NOT IN (2, 3) AND x.state <> 5))";

/// `promote` as direct calls, for the settles that hold the connection's
/// lock (see direct.rs).
fn promote_locked(
    d: &Db,
    statements: &mut StatementCache,
    keys: &[&str],
    now: i64,
) -> Result<(), StoreError> {
    for chunk in keys.chunks(2000) {
        let json = serde_json::to_string(chunk).expect("strings serialise");
        let mut q = d.statement(statements, PROMOTE)?;
        q.int(1, now)?;
        q.text(2, &json)?;
        q.run()?;
    }
    Ok(())
}

/// Makes the earliest queued event of each key the head when the key has
/// no head left (its events were delivered or died).
pub(super) async fn promote<'a>(
    conn: &mut SqliteConnection,
    keys: impl Iterator<Item = &'a str>,
    now: i64,
) -> Result<(), StoreError> {
    let keys: Vec<&str> = keys.collect();
    for chunk in keys.chunks(2000) {
        let json = serde_json::to_string(chunk).expect("strings serialise");
        sqlx::query(PROMOTE)
            .bind(now)
            .bind(json)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}
