//! Group commit per instance: one task takes whatever ingest requests are
//! queued into one transaction and answers each only after the commit.
//! Every statement covers the whole group (arrays through `unnest`), so a
//! group costs the same few round trips however many events it holds.

use super::{PgConfig, lock_keys, pg_error, retryable};
use crate::outbox::{IdentityUpdate, IngestReceipt, NewEvent, StoreError, now_ms};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{Notify, mpsc, oneshot};

/// Longest wait for one group's transaction before its requests are
/// answered 503.
const COMMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many queued requests one transaction takes at most.
const GROUP_CAP: usize = 256;

pub(super) struct Request {
    pub events: Vec<NewEvent>,
    pub reply: oneshot::Sender<Result<IngestReceipt, StoreError>>,
}

/// Groups in flight at once. A group's commit waits for its WAL flush;
/// meanwhile a second group runs its statements, so the round trips of one
/// overlap the disk wait of the other, and the server flushes both commits
/// together when they meet. The key locks order the two groups exactly as
/// they order two instances.
const COMMITTERS: usize = 4;

pub(super) async fn run(
    pool: PgPool,
    config: PgConfig,
    stored: Arc<Notify>,
    rx: mpsc::Receiver<Request>,
) {
    let rx = tokio::sync::Mutex::new(rx);
    let committers = (0..COMMITTERS).map(|_| committer(&pool, &config, &stored, &rx));
    futures_util::future::join_all(committers).await;
}

/// Takes whatever is queued (after waiting for the first request) as one
/// group, commits it, answers, and goes again, until the queue closes.
async fn committer(
    pool: &PgPool,
    config: &PgConfig,
    stored: &Notify,
    rx: &tokio::sync::Mutex<mpsc::Receiver<Request>>,
) {
    let mut group: Vec<Request> = Vec::with_capacity(GROUP_CAP);
    loop {
        {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            group.push(first);
            while group.len() < GROUP_CAP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
        }
        let requests: Vec<&[NewEvent]> = group.iter().map(|r| r.events.as_slice()).collect();
        let started = std::time::Instant::now();
        let result = commit_with_retry(pool, config, &requests).await;
        tracing::trace!(
            requests = requests.len(),
            events = requests.iter().map(|r| r.len()).sum::<usize>(),
            micros = started.elapsed().as_micros() as u64,
            ok = result.is_ok(),
            "ingest group"
        );
        match result {
            Ok(receipts) => {
                for (r, receipt) in group.drain(..).zip(receipts) {
                    let _ = r.reply.send(Ok(receipt));
                }
                stored.notify_waiters();
            }
            Err(e) if group.len() == 1 || e.is_transient() => {
                // An unreachable server fails every request alike: answer
                // them all now (503) instead of trying each alone, which
                // would keep the last one waiting a timeout per request.
                let text = e.to_string();
                let mut first = Some(e);
                for r in group.drain(..) {
                    let e = first
                        .take()
                        .unwrap_or_else(|| StoreError::Busy(text.clone()));
                    let _ = r.reply.send(Err(e));
                }
            }
            Err(_) => {
                // One request's failure must not fail its neighbours.
                for r in group.drain(..) {
                    let single = [r.events.as_slice()];
                    let result = commit_with_retry(pool, config, &single)
                        .await
                        .map(|mut v| v.pop().unwrap_or_default());
                    let _ = r.reply.send(result);
                }
                stored.notify_waiters();
            }
        }
    }
}

async fn commit_with_retry(
    pool: &PgPool,
    config: &PgConfig,
    requests: &[&[NewEvent]],
) -> Result<Vec<IngestReceipt>, StoreError> {
    let mut attempt = 0;
    loop {
        // A server that stopped answering without closing the connection
        // (a network partition) must not hold ingest up: the outcome is
        // then unknown, the clients get 503 and retry, and the dedup by
        // message id makes the retry safe whichever way it went.
        let attempt_result =
            tokio::time::timeout(COMMIT_TIMEOUT, commit_group(pool, config, requests))
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Busy(format!(
                        "PostgreSQL did not complete a commit within {}s",
                        COMMIT_TIMEOUT.as_secs()
                    )))
                });
        match attempt_result {
            Err(e) if retryable(&e) && attempt < 5 => attempt += 1,
            r => return r,
        }
    }
}

async fn commit_group(
    pool: &PgPool,
    config: &PgConfig,
    requests: &[&[NewEvent]],
) -> Result<Vec<IngestReceipt>, StoreError> {
    let now = now_ms();
    let all = || requests.iter().flat_map(|r| r.iter());

    // Every key whose queue or held events this group may change.
    let mut lock_keys: Vec<&str> = Vec::new();
    for e in all() {
        if e.forward {
            lock_keys.push(&e.order_key);
        }
        if let Some(id) = &e.identity {
            lock_keys.push(&id.user_id);
            if let Some(p) = &id.previous_id {
                lock_keys.push(p);
            }
        }
    }
    lock_keys.sort_unstable();
    lock_keys.dedup();
    let forward_total = all().filter(|e| e.forward).count() as i64;
    let total = all().count() as i64;

    // Within the group the first occurrence of a message id counts; the
    // database decides which of those are fresh against the table.
    let mut first: HashSet<(&str, &str)> = HashSet::new();
    let candidates: Vec<&NewEvent> = all()
        .filter(|e| first.insert((&e.source, &e.message_id)))
        .collect();
    let col = |f: fn(&NewEvent) -> &str| candidates.iter().map(|e| f(e)).collect::<Vec<&str>>();
    let (sources, ids) = (col(|e| &e.source), col(|e| &e.message_id));
    let (kinds, keys, payloads) = (col(|e| e.kind), col(|e| &e.order_key), col(|e| &e.payload));
    let forward: Vec<bool> = candidates.iter().map(|e| e.forward).collect();
    let max_backlog = i64::try_from(config.max_backlog).unwrap_or(i64::MAX);
    let cutoff = now - config.dedup_window.as_millis() as i64;

    // A group that touches neither the identity map nor the audience store
    // (tracks, pages, screens: most traffic) is one statement that commits
    // by itself: one round trip. The others run its two halves (locks and
    // message ids; then the events) in one transaction with their own
    // statements between them, as they always ran.
    let side_effects = all().any(|e| e.identity.is_some() || !e.audience.is_empty());
    let mut tx = None;
    let fresh_mask: Option<Vec<bool>> = if side_effects {
        let mut t = pool.begin().await.map_err(pg_error)?;
        let r = sqlx::query_scalar("SELECT ingest_begin($1, $2, $3, $4, $5, $6, $7)")
            .bind(&lock_keys)
            .bind(forward_total)
            .bind(max_backlog)
            .bind(&sources)
            .bind(&ids)
            .bind(now)
            .bind(cutoff)
            .fetch_one(&mut *t)
            .await
            .map_err(pg_error)?;
        tx = Some(t);
        r
    } else {
        sqlx::query_scalar("SELECT ingest_group($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)")
            .bind(&lock_keys)
            .bind(forward_total)
            .bind(max_backlog)
            .bind(&sources)
            .bind(&ids)
            .bind(&forward)
            .bind(&kinds)
            .bind(&keys)
            .bind(&payloads)
            .bind(total)
            .bind(now)
            .bind(cutoff)
            .fetch_one(pool)
            .await
            .map_err(pg_error)?
    };
    let Some(fresh_mask) = fresh_mask else {
        return Err(StoreError::Backlog(config.max_backlog));
    };
    let fresh: HashSet<(&str, &str)> = candidates
        .iter()
        .zip(&fresh_mask)
        .filter(|(_, fresh)| **fresh)
        .map(|(e, _)| (e.source.as_str(), e.message_id.as_str()))
        .collect();

    let mut receipts = Vec::with_capacity(requests.len());
    let mut taken: HashSet<(&str, &str)> = HashSet::new();
    let mut identities: Vec<&IdentityUpdate> = Vec::new();
    let mut audience: HashMap<(&str, &str), &str> = HashMap::new();
    for request in requests {
        let mut receipt = IngestReceipt::default();
        for e in request.iter() {
            let k = (e.source.as_str(), e.message_id.as_str());
            if !fresh.contains(&k) || !taken.insert(k) {
                receipt.duplicates += 1;
                continue;
            }
            if let Some(id) = &e.identity {
                identities.push(id);
            }
            for (attr, value) in &e.audience {
                audience.insert((&e.order_key, attr), value);
            }
            if !e.forward {
                receipt.filtered += 1;
                continue;
            }
            receipt.stored += 1;
        }
        receipts.push(receipt);
    }
    let Some(mut tx) = tx else {
        return Ok(receipts);
    };

    // Identifies and groups (ids, no alias) share a few statements for the
    // whole group; aliases, rarer, go one by one after them.
    let (aliases, plain): (Vec<&IdentityUpdate>, Vec<&IdentityUpdate>) = identities
        .into_iter()
        .partition(|id| id.previous_id.is_some());
    apply_identities(&mut tx, &plain, now).await?;
    for id in aliases {
        apply_identity(&mut tx, id, now).await?;
    }
    if !audience.is_empty() {
        let (mut users, mut attrs, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for ((u, a), v) in &audience {
            users.push(*u);
            attrs.push(*a);
            values.push(*v);
        }
        sqlx::query(
            "INSERT INTO audience_pending (user_id, attribute, value, updated_at) \
             SELECT u, a, v, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS t(u, a, v) \
             ON CONFLICT (user_id, attribute) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        )
        .bind(&users)
        .bind(&attrs)
        .bind(&values)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
    }
    sqlx::query("SELECT ingest_store($1, $2, $3, $4, $5, $6, $7, $8, $9)")
        .bind(&fresh_mask)
        .bind(&sources)
        .bind(&ids)
        .bind(&forward)
        .bind(&kinds)
        .bind(&keys)
        .bind(&payloads)
        .bind(total)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
    tx.commit().await.map_err(pg_error)?;
    Ok(receipts)
}

/// The identity updates without an alias, in one pass: the map's upsert
/// (later ids of a user in the group win, as they would one by one), the
/// aliased ids that learn from them, and the release of held events.
async fn apply_identities(
    conn: &mut sqlx::PgConnection,
    ids: &[&IdentityUpdate],
    now: i64,
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut order: Vec<&str> = Vec::new();
    let mut merged: HashMap<&str, (Option<&str>, Option<&str>)> = HashMap::new();
    for id in ids {
        let entry = merged.entry(id.user_id.as_str()).or_insert_with(|| {
            order.push(id.user_id.as_str());
            (None, None)
        });
        if let Some(a) = &id.account {
            entry.0 = Some(a);
        }
        if let Some(c) = &id.contact {
            entry.1 = Some(c);
        }
    }
    let mut users: Vec<&str> = Vec::new();
    let (mut accounts, mut contacts): (Vec<Option<&str>>, Vec<Option<&str>>) = Default::default();
    for u in &order {
        let (a, c) = merged[u];
        if a.is_some() || c.is_some() {
            users.push(u);
            accounts.push(a);
            contacts.push(c);
        }
    }
    let mut released: Vec<String> = order.iter().map(|u| u.to_string()).collect();
    if !users.is_empty() {
        sqlx::query(
            "INSERT INTO identities (user_id, account_id, contact_id, updated_at) \
             SELECT u, a, c, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS t(u, a, c) \
             ON CONFLICT (user_id) DO UPDATE SET \
             account_id = COALESCE(excluded.account_id, identities.account_id), \
             contact_id = COALESCE(excluded.contact_id, identities.contact_id), \
             updated_at = excluded.updated_at",
        )
        .bind(&users)
        .bind(&accounts)
        .bind(&contacts)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
        // Earlier ids aliased to these users learn what they now know.
        let aliased: Vec<String> = sqlx::query_scalar(
            "INSERT INTO identities (user_id, account_id, contact_id, updated_at) \
             SELECT a.previous_id, i.account_id, i.contact_id, $1 FROM aliases a \
             JOIN identities i ON i.user_id = a.user_id \
             WHERE a.user_id = ANY($2) AND a.previous_id <> a.user_id \
             ON CONFLICT (user_id) DO UPDATE SET \
             account_id = COALESCE(identities.account_id, excluded.account_id), \
             contact_id = COALESCE(identities.contact_id, excluded.contact_id), \
             updated_at = excluded.updated_at \
             RETURNING user_id",
        )
        .bind(now)
        .bind(&users)
        .fetch_all(&mut *conn)
        .await
        .map_err(pg_error)?;
        if !aliased.is_empty() {
            let keys: Vec<&str> = aliased.iter().map(String::as_str).collect();
            lock_keys(conn, &keys).await?;
        }
        released.extend(aliased);
    }
    sqlx::query(
        "UPDATE events SET state = 0, next_attempt_at = $1 WHERE order_key = ANY($2) AND state = 4",
    )
    .bind(now)
    .bind(&released)
    .execute(&mut *conn)
    .await
    .map_err(pg_error)?;
    Ok(())
}

/// Updates the identity map and releases the events held for the users it
/// now knows (by their key, never a scan of held events). The same rules as
/// the SQLite writer: aliases teach in both directions.
async fn apply_identity(
    conn: &mut sqlx::PgConnection,
    id: &IdentityUpdate,
    now: i64,
) -> Result<(), StoreError> {
    if id.teaches_ids() {
        sqlx::query(
            "INSERT INTO identities (user_id, account_id, contact_id, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (user_id) DO UPDATE SET \
             account_id = COALESCE(excluded.account_id, identities.account_id), \
             contact_id = COALESCE(excluded.contact_id, identities.contact_id), \
             updated_at = excluded.updated_at",
        )
        .bind(&id.user_id)
        .bind(&id.account)
        .bind(&id.contact)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
    }
    let mut aliased = Vec::new();
    if id.teaches_ids() {
        aliased = sqlx::query_scalar(
            "INSERT INTO identities (user_id, account_id, contact_id, updated_at) \
             SELECT a.previous_id, i.account_id, i.contact_id, $1 FROM aliases a \
             JOIN identities i ON i.user_id = a.user_id WHERE a.user_id = $2 AND a.previous_id <> a.user_id \
             ON CONFLICT (user_id) DO UPDATE SET \
             account_id = COALESCE(identities.account_id, excluded.account_id), \
             contact_id = COALESCE(identities.contact_id, excluded.contact_id), \
             updated_at = excluded.updated_at \
             RETURNING user_id",
        )
        .bind(now)
        .bind(&id.user_id)
        .fetch_all(&mut *conn)
        .await
        .map_err(pg_error)?;
        if !aliased.is_empty() {
            let keys: Vec<&str> = aliased.iter().map(String::as_str).collect();
            lock_keys(conn, &keys).await?;
        }
    }
    if let Some(prev) = &id.previous_id {
        sqlx::query(
            "INSERT INTO aliases (previous_id, user_id, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (previous_id) DO UPDATE SET user_id = excluded.user_id",
        )
        .bind(prev)
        .bind(&id.user_id)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
        let known: Option<i32> = sqlx::query_scalar("SELECT 1 FROM identities WHERE user_id = $1")
            .bind(&id.user_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(pg_error)?;
        let (from, to) = crate::identity::alias_teacher(&id.user_id, prev, known.is_some());
        sqlx::query(
            "INSERT INTO identities (user_id, account_id, contact_id, updated_at) \
             SELECT $1, account_id, contact_id, $2 FROM identities WHERE user_id = $3 \
             ON CONFLICT (user_id) DO UPDATE SET \
             account_id = COALESCE(identities.account_id, excluded.account_id), \
             contact_id = COALESCE(identities.contact_id, excluded.contact_id), \
             updated_at = excluded.updated_at",
        )
        .bind(to)
        .bind(now)
        .bind(from)
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
    }
    let released = crate::identity::released_by(id, aliased);
    // A held event is its key's head: releasing it changes no order.
    sqlx::query(
        "UPDATE events SET state = 0, next_attempt_at = $1 WHERE order_key = ANY($2) AND state = 4",
    )
    .bind(now)
    .bind(&released)
    .execute(&mut *conn)
    .await
    .map_err(pg_error)?;
    Ok(())
}
