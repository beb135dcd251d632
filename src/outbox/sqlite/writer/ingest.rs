//! Ingest inside the writer's transaction: deduplication, head or queued
//! per ordering key, the inserts, and the identity map and audience store
//! updates the events carry.

use super::*;

/// Inserts the events of several requests in one pass: deduplicate by
/// (source, messageId), decide head or queued per ordering key, insert,
/// count; then update the identity map and the audience store. All of it
/// runs as direct SQLite calls under one lock of the connection (see
/// direct.rs): one hand-off per group instead of one per statement, which
/// for a batch of identifies was three statements per event.
pub(super) async fn insert_events(
    conn: &mut SqliteConnection,
    statements: &mut StatementCache,
    config: &WriterConfig,
    requests: &[&[NewEvent]],
    now: i64,
) -> Result<Vec<IngestReceipt>, StoreError> {
    let mut handle = conn.lock_handle().await.map_err(db)?;
    // SAFETY: the handle stays locked until `handle` drops at the end of
    // this function, and `d` does not outlive it.
    let d = unsafe { Db::new(handle.as_raw_handle()) };
    insert_locked(&d, statements, config, requests, now)
}

/// The SQL part of `insert_events`, with the connection locked.
pub(super) fn insert_locked(
    d: &Db,
    statements: &mut StatementCache,
    config: &WriterConfig,
    requests: &[&[NewEvent]],
    now: i64,
) -> Result<Vec<IngestReceipt>, StoreError> {
    let mut identities: Vec<&IdentityUpdate> = Vec::new();
    let mut audience: Vec<&NewEvent> = Vec::new();
    let total: usize = requests.iter().map(|r| r.len()).sum();
    let current = {
        // Row 1 counts leases of events already counted under 0 or 5.
        let mut q = d.statement(
            statements,
            "SELECT COALESCE(SUM(n), 0) FROM state_counts WHERE state IN (0, 4, 5)",
        )?;
        q.step()?;
        q.column_int(0).max(0) as u64
    };
    if current + total as u64 > config.max_backlog {
        return Err(StoreError::Backlog(config.max_backlog));
    }
    let cutoff = now - config.dedup_window.as_millis() as i64;
    // A queued row whose key has a held head counts as held (held_keys).
    // Nothing in the insert loop holds a head, so one look decides for the
    // whole group whether any queued row can need that.
    let any_held_key = {
        let mut q = d.statement(statements, "SELECT 1 FROM held_keys LIMIT 1")?;
        q.step()? == Step::Row
    };
    // Rows inserted per state, added to state_counts once per group.
    let (mut new_pending, mut new_queued) = (0i64, 0i64);
    // Ordering keys seen in this group: true when the key has an active
    // event (in the outbox before, or inserted just now).
    let mut active: HashMap<&str, bool> = HashMap::new();
    let mut receipts = Vec::with_capacity(requests.len());
    let (mut accepted, mut duplicates, mut filtered) = (0i64, 0i64, 0i64);
    for request in requests {
        let mut receipt = IngestReceipt::default();
        for e in request.iter() {
            // Deduplicate: the upsert "wins" (changes a row) for a new id or
            // one older than the window.
            let fresh = {
                let mut q = d.statement(
                    statements,
                    "INSERT INTO message_ids (source, message_id, seen_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (source, message_id) DO UPDATE SET seen_at = excluded.seen_at \
                     WHERE message_ids.seen_at < ?4",
                )?;
                q.text(1, &e.source)?;
                q.text(2, &e.message_id)?;
                q.int(3, now)?;
                q.int(4, cutoff)?;
                q.run()?;
                d.changes() == 1
            };
            if !fresh {
                receipt.duplicates += 1;
                continue;
            }
            if let Some(id) = &e.identity {
                identities.push(id);
            }
            if !e.audience.is_empty() {
                audience.push(e);
            }
            if !e.forward {
                receipt.filtered += 1;
                continue;
            }
            let busy = match active.get(e.order_key.as_str()) {
                Some(b) => *b,
                None => {
                    let mut q = d.statement(
                        statements,
                        "SELECT 1 FROM events INDEXED BY events_key \
                         WHERE order_key = ?1 AND state NOT IN (2, 3) LIMIT 1",
                    )?;
                    q.text(1, &e.order_key)?;
                    q.step()? == Step::Row
                }
            };
            active.insert(e.order_key.as_str(), true);
            let mut q = d.statement(
                statements,
                "INSERT INTO events (source, message_id, kind, order_key, payload, state, accepted_at, next_attempt_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            )?;
            q.text(1, &e.source)?;
            q.text(2, &e.message_id)?;
            q.text(3, e.kind)?;
            q.text(4, &e.order_key)?;
            q.text(5, &e.payload)?;
            q.int(
                6,
                if busy {
                    EventState::Queued.code()
                } else {
                    EventState::Pending.code()
                },
            )?;
            q.int(7, now)?;
            q.run()?;
            drop(q);
            if busy {
                new_queued += 1;
                if any_held_key {
                    let mut q = d.statement(
                        statements,
                        "UPDATE held_keys SET queued = queued + 1 WHERE order_key = ?1",
                    )?;
                    q.text(1, &e.order_key)?;
                    q.run()?;
                }
            } else {
                new_pending += 1;
            }
            receipt.stored += 1;
        }
        accepted += receipt.stored as i64;
        duplicates += receipt.duplicates as i64;
        filtered += receipt.filtered as i64;
        receipts.push(receipt);
    }
    add_to_state_count(d, statements, EventState::Pending.code(), new_pending)?;
    add_to_state_count(d, statements, EventState::Queued.code(), new_queued)?;
    add_to_total(d, statements, "accepted", accepted)?;
    add_to_total(d, statements, "duplicates", duplicates)?;
    add_to_total(d, statements, "filtered", filtered)?;
    add_to_minute(d, statements, MinuteColumn::Accepted, now, accepted)?;
    if !identities.is_empty() {
        // Ingest never holds an event, so what is held now is all that this
        // group's identities can release.
        let any_held = {
            let mut q = d.statement(statements, "SELECT n FROM state_counts WHERE state = 4")?;
            q.step()? == Step::Row && q.column_int(0) > 0
        };
        for id in identities {
            apply_identity(d, statements, id, now, any_held)?;
        }
    }
    for e in audience {
        for (attr, value) in &e.audience {
            let mut q = d.statement(
                statements,
                "INSERT INTO audience_pending (user_id, attribute, value, updated_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (user_id, attribute) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            )?;
            q.text(1, &e.order_key)?;
            q.text(2, attr)?;
            q.text(3, value)?;
            q.int(4, now)?;
            q.run()?;
        }
    }
    Ok(receipts)
}

/// Updates the identity map and releases events held for the ids it now
/// knows; the release uses the ordering-key index, never a scan of held
/// events. `any_held` false (no event is held) skips the release, which
/// then could not change a row.
pub(super) fn apply_identity(
    d: &Db,
    statements: &mut StatementCache,
    id: &IdentityUpdate,
    now: i64,
    any_held: bool,
) -> Result<(), StoreError> {
    let mut aliased = Vec::new();
    if id.teaches_ids() {
        let mut q = d.statement(
            statements,
            "INSERT INTO identities (user_id, account_id, contact_id, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (user_id) DO UPDATE SET \
             account_id = COALESCE(excluded.account_id, identities.account_id), \
             contact_id = COALESCE(excluded.contact_id, identities.contact_id), \
             updated_at = excluded.updated_at",
        )?;
        q.text(1, &id.user_id)?;
        q.opt_text(2, id.account.as_deref())?;
        q.opt_text(3, id.contact.as_deref())?;
        q.int(4, now)?;
        q.run()?;
        drop(q);
        // Earlier ids aliased to this user learn what it now knows. Most
        // users have no alias: a probe of the alias index is far cheaper
        // than the copy, which SQLite runs through a temporary table (it
        // reads the table it writes, and returns rows).
        let has_alias = {
            let mut q = d.statement(
                statements,
                "SELECT 1 FROM aliases INDEXED BY aliases_user \
                 WHERE user_id = ?1 AND previous_id <> user_id LIMIT 1",
            )?;
            q.text(1, &id.user_id)?;
            q.step()? == Step::Row
        };
        if has_alias {
            let mut q = d.statement(
                statements,
                "INSERT INTO identities (user_id, account_id, contact_id, updated_at) \
                 SELECT a.previous_id, i.account_id, i.contact_id, ?1 FROM aliases a \
                 JOIN identities i ON i.user_id = a.user_id WHERE a.user_id = ?2 AND a.previous_id <> a.user_id \
                 ON CONFLICT (user_id) DO UPDATE SET \
                 account_id = COALESCE(identities.account_id, excluded.account_id), \
                 contact_id = COALESCE(identities.contact_id, excluded.contact_id), \
                 updated_at = excluded.updated_at \
                 RETURNING user_id",
            )?;
            q.int(1, now)?;
            q.text(2, &id.user_id)?;
            while q.step()? == Step::Row {
                aliased.push(q.column_text(0));
            }
        }
    }
    if let Some(prev) = &id.previous_id {
        let mut q = d.statement(
            statements,
            "INSERT INTO aliases (previous_id, user_id, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (previous_id) DO UPDATE SET user_id = excluded.user_id",
        )?;
        q.text(1, prev)?;
        q.text(2, &id.user_id)?;
        q.int(3, now)?;
        q.run()?;
        drop(q);
        // Alias: whichever side is known teaches the other.
        let known = {
            let mut q = d.statement(statements, "SELECT 1 FROM identities WHERE user_id = ?1")?;
            q.text(1, &id.user_id)?;
            q.step()? == Step::Row
        };
        let (from, to) = identity::alias_teacher(&id.user_id, prev, known);
        let mut q = d.statement(
            statements,
            "INSERT INTO identities (user_id, account_id, contact_id, updated_at) \
             SELECT ?1, account_id, contact_id, ?2 FROM identities WHERE user_id = ?3 \
             ON CONFLICT (user_id) DO UPDATE SET \
             account_id = COALESCE(identities.account_id, excluded.account_id), \
             contact_id = COALESCE(identities.contact_id, excluded.contact_id), \
             updated_at = excluded.updated_at",
        )?;
        q.text(1, to)?;
        q.int(2, now)?;
        q.text(3, from)?;
        q.run()?;
    }
    if !any_held {
        return Ok(());
    }
    for key in identity::released_by(id, aliased) {
        let mut q = d.statement(
            statements,
            "UPDATE events INDEXED BY events_key SET state = 0, next_attempt_at = ?1 \
             WHERE order_key = ?2 AND state NOT IN (2, 3) AND state = 4",
        )?;
        q.int(1, now)?;
        q.text(2, &key)?;
        q.run()?;
    }
    Ok(())
}
