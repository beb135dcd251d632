//! Group commit per instance: one task takes whatever ingest requests are
//! queued into one transaction and answers each only after the commit.
//! Every statement covers the whole group (arrays through `unnest`), so a
//! group costs the same few round trips however many events it holds.

use super::{
    PING_WHEN_IDLE_FOR, PgConfig, check_synchronous_commit, lock_keys, pause_before_retry, pg_error,
};
use crate::outbox::{IdentityUpdate, IngestReceipt, NewEvent, StoreError, now_ms};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{Notify, mpsc, oneshot};

/// Longest wait for one group's transaction before its requests are
/// answered 503.
const COMMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many queued requests one transaction takes at most.
const GROUP_CAP: usize = 256;

/// Keys one group locks at most, unless a single request has more. Key
/// locks are advisory locks, and the server's lock table is bounded
/// (`max_locks_per_transaction` times the sessions, about 7,700 with
/// the defaults): four committers per instance, several instances, must
/// stay well inside it. Past 512 keys a transaction locks the whole key
/// space instead (see `lock_order_keys`), which every other committer and
/// claim then waits for, so a group stops growing here first.
const GROUP_KEYS: usize = 256;

pub(super) struct Request {
    pub events: Vec<NewEvent>,
    pub reply: oneshot::Sender<Result<IngestReceipt, StoreError>>,
    /// How many keys the request's events lock (see `GROUP_KEYS`).
    keys: usize,
}

impl Request {
    pub fn new(
        events: Vec<NewEvent>,
        reply: oneshot::Sender<Result<IngestReceipt, StoreError>>,
    ) -> Self {
        let keys = keys_to_lock(events.iter()).len();
        Request {
            events,
            reply,
            keys,
        }
    }
}

/// Every key whose queue or held events these events may change, sorted
/// and distinct.
fn keys_to_lock<'a>(events: impl Iterator<Item = &'a NewEvent>) -> Vec<&'a str> {
    let mut keys: Vec<&str> = Vec::new();
    for e in events {
        if e.forward {
            keys.push(&e.order_key);
        }
        if let Some(id) = &e.identity {
            keys.push(&id.user_id);
            if let Some(p) = &id.previous_id {
                keys.push(p);
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Groups in flight at once. A group's commit waits for its WAL flush;
/// meanwhile a second group runs its statements, so the round trips of one
/// overlap the disk wait of the other, and the server flushes both commits
/// together when they meet. The key locks order the two groups exactly as
/// they order two instances.
pub(super) const COMMITTERS: usize = 4;

/// Events a group must hold before it starts while another group is still
/// in flight. Every group pays a fixed cost on the server (the function
/// call, its key locks, the counter row, the commit) that single-event
/// requests cannot spread: four committers splitting 64 waiting tracks into
/// groups of 16 spent about twice the server CPU per track of one or two
/// committers taking groups of 32 to 64. Batch requests (100 events each)
/// clear the bar at once and keep every committer busy, which their
/// per-event cost needs.
const PARALLEL_MIN_EVENTS: usize = 32;

/// Longest a small group waits for the one in flight. A commit normally
/// takes milliseconds; one stuck on a server that stopped answering can
/// take `COMMIT_TIMEOUT`, and the requests queued behind it must not wait
/// for that twice.
const SMALL_GROUP_MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// The queue of ingest requests, and the one request that did not fit in
/// the last group taken (it starts the next).
struct Queue {
    rx: mpsc::Receiver<Request>,
    carry: Option<Request>,
}

/// The queue of ingest requests that the committers share, and how many of
/// them are committing a group right now.
struct Intake {
    queue: tokio::sync::Mutex<Queue>,
    in_flight: AtomicUsize,
    finished: Notify,
}

/// Counts a group in flight for as long as it lives, so that a committer
/// that ends early (a cancelled future) cannot leave a small group waiting
/// for a finish that never comes.
struct InFlight<'a>(&'a Intake);

impl<'a> InFlight<'a> {
    fn start(intake: &'a Intake) -> Self {
        intake.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(intake)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.finished.notify_waiters();
    }
}

pub(super) async fn run(
    opts: PgConnectOptions,
    config: PgConfig,
    stored: Arc<Notify>,
    rx: mpsc::Receiver<Request>,
) {
    let intake = Intake {
        queue: tokio::sync::Mutex::new(Queue { rx, carry: None }),
        in_flight: AtomicUsize::new(0),
        finished: Notify::new(),
    };
    let committers = (0..COMMITTERS).map(|_| committer(&opts, &config, &stored, &intake));
    futures_util::future::join_all(committers).await;
}

/// A committer's own connection, kept from one group to the next.
///
/// A pooled connection costs two extra round trips a group: sqlx tests
/// every connection on its way back to the pool with a ping, whatever the
/// pool's settings, and groups of tracks come hundreds of times a second.
/// The connection is opened when the first group needs it, and dropped
/// whenever its state is in doubt: after a commit that timed out, or an
/// error after which it does not answer a ping; the next group opens a new
/// one. Like the pool's connections, one left idle for a while is pinged
/// before use, so that a session the server ended meanwhile (a restart,
/// `idle_session_timeout`, a firewall's idle cut) costs a new connection,
/// not a failed group.
struct Committer<'a> {
    opts: &'a PgConnectOptions,
    config: &'a PgConfig,
    conn: Option<PgConnection>,
    last_used: std::time::Instant,
}

impl Committer<'_> {
    /// The kept connection, or a new one (with `synchronous_commit`
    /// checked, as the pool checks its own); an unreachable server fails
    /// within the pool's acquire timeout, as an acquire would.
    async fn connection(&mut self) -> Result<&mut PgConnection, StoreError> {
        if self.last_used.elapsed() >= PING_WHEN_IDLE_FOR
            && let Some(mut c) = self.conn.take()
            && matches!(
                tokio::time::timeout(PING_AFTER_ERROR, c.ping()).await,
                Ok(Ok(()))
            )
        {
            self.conn = Some(c);
        }
        if self.conn.is_none() {
            let wait = self.config.acquire_timeout;
            let open = async {
                let mut c = self.opts.connect().await.map_err(pg_error)?;
                check_synchronous_commit(&mut c).await.map_err(pg_error)?;
                Ok::<_, StoreError>(c)
            };
            let c = tokio::time::timeout(wait, open).await.unwrap_or_else(|_| {
                Err(StoreError::Busy(format!(
                    "PostgreSQL is unreachable: no connection within {}s",
                    wait.as_secs()
                )))
            })?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("opened above"))
    }

    /// Commits a group, again after a deadlock or a momentarily full lock
    /// table, by the policy `with_retry` keeps for the pool's transactions.
    async fn commit_with_retry(
        &mut self,
        requests: &[&[NewEvent]],
    ) -> Result<Vec<IngestReceipt>, StoreError> {
        let mut attempt = 0;
        loop {
            let r = self.commit(requests).await;
            if let Err(e) = &r
                && pause_before_retry(e, &mut attempt).await
            {
                continue;
            }
            return r;
        }
    }

    async fn commit(&mut self, requests: &[&[NewEvent]]) -> Result<Vec<IngestReceipt>, StoreError> {
        let config = self.config;
        // A server that stopped answering without closing the connection
        // (a network partition) must not hold ingest up: the outcome is
        // then unknown, the clients get 503 and retry, and the dedup by
        // message id makes the retry safe whichever way it went.
        let attempt = async {
            let conn = self.connection().await?;
            commit_group(conn, config, requests).await
        };
        let outcome = tokio::time::timeout(COMMIT_TIMEOUT, attempt).await;
        self.last_used = std::time::Instant::now();
        let result = match outcome {
            Ok(r) => r,
            Err(_) => {
                // Cut off mid-statement: nothing more may be sent on it.
                self.conn = None;
                return Err(StoreError::Busy(format!(
                    "PostgreSQL did not complete a commit within {}s",
                    COMMIT_TIMEOUT.as_secs()
                )));
            }
        };
        if result.is_err() {
            // A statement the server refused leaves the connection usable
            // (a transaction left open is rolled back before the ping
            // returns); a broken or stuck one is let go.
            if let Some(mut c) = self.conn.take() {
                let ping = tokio::time::timeout(PING_AFTER_ERROR, c.ping()).await;
                if matches!(ping, Ok(Ok(()))) {
                    self.conn = Some(c);
                }
            }
        }
        result
    }
}

/// How long a committer's connection has to answer a ping (after an
/// error, or an idle spell) before it is let go.
const PING_AFTER_ERROR: std::time::Duration = std::time::Duration::from_secs(1);

/// Takes what is queued (after waiting for the first request) as one group:
/// everything at once when no other group is in flight, otherwise until it
/// holds `PARALLEL_MIN_EVENTS` events or the other group finishes (or
/// `SMALL_GROUP_MAX_WAIT` has passed). A request that would take the group
/// past `GROUP_KEYS` keys waits for the next group. The group counts as in
/// flight while the returned guard lives; `None` once the queue has closed
/// and is empty.
async fn take_group<'a>(intake: &'a Intake, group: &mut Vec<Request>) -> Option<InFlight<'a>> {
    /// Adds `r` unless it would take the group past `GROUP_KEYS` keys;
    /// then it is kept for the next group and `false` returned.
    fn admit(
        q: &mut Queue,
        group: &mut Vec<Request>,
        size: &mut (usize, usize),
        r: Request,
    ) -> bool {
        if !group.is_empty() && size.1 + r.keys > GROUP_KEYS {
            q.carry = Some(r);
            return false;
        }
        size.0 += r.events.len();
        size.1 += r.keys;
        group.push(r);
        true
    }
    fn drain(q: &mut Queue, group: &mut Vec<Request>, size: &mut (usize, usize)) {
        while group.len() < GROUP_CAP {
            let next = match q.carry.take() {
                Some(r) => r,
                None => match q.rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                },
            };
            if !admit(q, group, size, next) {
                break;
            }
        }
    }
    let mut guard = intake.queue.lock().await;
    let q = &mut *guard;
    let first = match q.carry.take() {
        Some(r) => r,
        None => q.rx.recv().await?,
    };
    // (events, keys) of the group so far.
    let mut size = (0, 0);
    admit(q, group, &mut size, first);
    drain(q, group, &mut size);
    let give_up = tokio::time::Instant::now() + SMALL_GROUP_MAX_WAIT;
    while group.len() < GROUP_CAP && size.0 < PARALLEL_MIN_EVENTS && q.carry.is_none() {
        let finished = intake.finished.notified();
        tokio::pin!(finished);
        finished.as_mut().enable();
        if intake.in_flight.load(Ordering::Acquire) == 0 {
            break;
        }
        tokio::select! {
            _ = &mut finished => {}
            _ = tokio::time::sleep_until(give_up) => break,
            next = q.rx.recv() => match next {
                Some(r) => {
                    if admit(q, group, &mut size, r) {
                        drain(q, group, &mut size);
                    }
                }
                None => break,
            },
        }
    }
    // Counted before the queue is let go, so the next committer to take it
    // sees this group in flight.
    Some(InFlight::start(intake))
}

/// Takes a group, commits it, answers, and goes again, until the queue
/// closes.
async fn committer(opts: &PgConnectOptions, config: &PgConfig, stored: &Notify, intake: &Intake) {
    let mut this = Committer {
        opts,
        config,
        conn: None,
        last_used: std::time::Instant::now(),
    };
    let mut group: Vec<Request> = Vec::with_capacity(GROUP_CAP);
    loop {
        let Some(in_flight) = take_group(intake, &mut group).await else {
            return;
        };
        let requests: Vec<&[NewEvent]> = group.iter().map(|r| r.events.as_slice()).collect();
        let started = std::time::Instant::now();
        let result = this.commit_with_retry(&requests).await;
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
                    let result = this
                        .commit_with_retry(&single)
                        .await
                        .map(|mut v| v.pop().unwrap_or_default());
                    let _ = r.reply.send(result);
                }
                stored.notify_waiters();
            }
        }
        drop(in_flight);
    }
}

async fn commit_group(
    conn: &mut PgConnection,
    config: &PgConfig,
    requests: &[&[NewEvent]],
) -> Result<Vec<IngestReceipt>, StoreError> {
    let now = now_ms();
    let all = || requests.iter().flat_map(|r| r.iter());

    let lock_keys = keys_to_lock(all());
    let forward_total = all().filter(|e| e.forward).count() as i64;
    let total = all().count() as i64;

    // Within the group the first occurrence of a message id counts; the
    // database decides which of those are fresh against the table.
    // `candidate_of` holds, for every event in the group's order, its
    // index among the candidates, or `None` for a repeat: one hash per
    // event, which is most of this function's own work on large batches.
    let mut first: HashMap<(&str, &str), usize> = HashMap::with_capacity(total as usize);
    let mut candidates: Vec<&NewEvent> = Vec::with_capacity(total as usize);
    let candidate_of: Vec<Option<usize>> = all()
        .map(|e| match first.entry((&e.source, &e.message_id)) {
            std::collections::hash_map::Entry::Occupied(_) => None,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(candidates.len());
                candidates.push(e);
                Some(candidates.len() - 1)
            }
        })
        .collect();
    drop(first);
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
        let mut t = conn.begin().await.map_err(pg_error)?;
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
            .fetch_one(&mut *conn)
            .await
            .map_err(pg_error)?
    };
    let Some(fresh_mask) = fresh_mask else {
        return Err(StoreError::Backlog(config.max_backlog));
    };
    let mut receipts = Vec::with_capacity(requests.len());
    let mut identities: Vec<&IdentityUpdate> = Vec::new();
    let mut audience: HashMap<(&str, &str), &str> = HashMap::new();
    let mut slots = candidate_of.iter();
    for request in requests {
        let mut receipt = IngestReceipt::default();
        for e in request.iter() {
            // A repeat within the group, or a first occurrence the table
            // already knew, is a duplicate.
            let fresh = matches!(slots.next(), Some(Some(i)) if fresh_mask.get(*i) == Some(&true));
            if !fresh {
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
        upsert_identities(conn, &users, &accounts, &contacts, now).await?;
        // Earlier ids aliased to these users learn what they now know.
        released.extend(teach_aliased(conn, &users, now).await?);
    }
    release_held(conn, &released, now).await
}

/// The identity map learns these users' ids. An id the update leaves out
/// keeps what the map knew.
async fn upsert_identities(
    conn: &mut sqlx::PgConnection,
    users: &[&str],
    accounts: &[Option<&str>],
    contacts: &[Option<&str>],
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO identities (user_id, account_id, contact_id, updated_at) \
         SELECT u, a, c, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS t(u, a, c) \
         ON CONFLICT (user_id) DO UPDATE SET \
         account_id = COALESCE(excluded.account_id, identities.account_id), \
         contact_id = COALESCE(excluded.contact_id, identities.contact_id), \
         updated_at = excluded.updated_at",
    )
    .bind(users)
    .bind(accounts)
    .bind(contacts)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(pg_error)?;
    Ok(())
}

/// The earlier ids aliased to these users learn the ids the map has for
/// them (an id they knew already stays). Returns those earlier ids, with
/// their keys locked: their held events may now be released.
async fn teach_aliased(
    conn: &mut sqlx::PgConnection,
    users: &[&str],
    now: i64,
) -> Result<Vec<String>, StoreError> {
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
    .bind(users)
    .fetch_all(&mut *conn)
    .await
    .map_err(pg_error)?;
    if !aliased.is_empty() {
        let keys: Vec<&str> = aliased.iter().map(String::as_str).collect();
        lock_keys(conn, &keys).await?;
    }
    Ok(aliased)
}

/// Releases the events held for these keys. A held event is its key's
/// head: releasing it changes no order.
async fn release_held(
    conn: &mut sqlx::PgConnection,
    keys: &[String],
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE events SET state = 0, next_attempt_at = $1 WHERE order_key = ANY($2) AND state = 4",
    )
    .bind(now)
    .bind(keys)
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
    let mut aliased = Vec::new();
    if id.teaches_ids() {
        let user = [id.user_id.as_str()];
        upsert_identities(
            conn,
            &user,
            &[id.account.as_deref()],
            &[id.contact.as_deref()],
            now,
        )
        .await?;
        aliased = teach_aliased(conn, &user, now).await?;
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
    release_held(conn, &crate::identity::released_by(id, aliased), now).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::task::Poll;

    fn request(events: usize) -> Request {
        let event = NewEvent {
            source: "s".into(),
            message_id: "m".into(),
            kind: "track",
            order_key: "u".into(),
            payload: "{}".into(),
            forward: true,
            identity: None,
            audience: Vec::new(),
        };
        let (reply, _) = oneshot::channel();
        Request::new(vec![event; events], reply)
    }

    /// A batch of `users` events, each of its own user.
    fn users_request(users: usize) -> Request {
        let (reply, _) = oneshot::channel();
        let mut events = request(users).events;
        for (i, e) in events.iter_mut().enumerate() {
            e.order_key = format!("u{i}");
        }
        Request::new(events, reply)
    }

    fn intake() -> (mpsc::Sender<Request>, Intake) {
        let (tx, rx) = mpsc::channel(1024);
        let intake = Intake {
            queue: tokio::sync::Mutex::new(Queue { rx, carry: None }),
            in_flight: AtomicUsize::new(0),
            finished: Notify::new(),
        };
        (tx, intake)
    }

    /// Polls once without waiting: what a committer has decided by now.
    async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx))).await
    }

    #[tokio::test]
    async fn with_nothing_in_flight_a_small_group_goes_at_once() {
        let (tx, intake) = intake();
        for _ in 0..3 {
            tx.send(request(1)).await.unwrap();
        }
        let mut group = Vec::new();
        let guard = take_group(&intake, &mut group).await.expect("a group");
        assert_eq!(group.len(), 3);
        assert_eq!(intake.in_flight.load(Ordering::Acquire), 1);
        drop(guard);
        assert_eq!(intake.in_flight.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_small_group_waits_for_the_one_in_flight_and_grows_meanwhile() {
        let (tx, intake) = intake();
        let running = InFlight::start(&intake);
        for _ in 0..5 {
            tx.send(request(1)).await.unwrap();
        }
        let mut group = Vec::new();
        {
            let mut next = pin!(take_group(&intake, &mut group));
            assert!(
                poll_once(&mut next).await.is_pending(),
                "5 tracks must wait"
            );
            for _ in 0..5 {
                tx.send(request(1)).await.unwrap();
            }
            assert!(
                poll_once(&mut next).await.is_pending(),
                "10 tracks must wait"
            );
            drop(running);
            match poll_once(&mut next).await {
                Poll::Ready(g) => assert!(g.is_some(), "a group"),
                Poll::Pending => panic!("the group in flight finished: the waiting one must go"),
            }
        }
        assert_eq!(
            group.len(),
            10,
            "everything queued meanwhile joins the group"
        );
    }

    #[tokio::test]
    async fn a_group_large_enough_runs_beside_the_one_in_flight() {
        let (tx, intake) = intake();
        let _running = InFlight::start(&intake);
        for _ in 0..PARALLEL_MIN_EVENTS {
            tx.send(request(1)).await.unwrap();
        }
        let mut group = Vec::new();
        let guard = take_group(&intake, &mut group).await.expect("a group");
        assert_eq!(group.len(), PARALLEL_MIN_EVENTS);
        assert_eq!(intake.in_flight.load(Ordering::Acquire), 2);
        drop(guard);

        // One batch request clears the bar by itself.
        tx.send(request(100)).await.unwrap();
        let mut batch = Vec::new();
        let _second = take_group(&intake, &mut batch).await.expect("a group");
        assert_eq!(batch.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_group_waits_no_longer_than_the_cap_behind_a_stuck_commit() {
        let (tx, intake) = intake();
        let _stuck = InFlight::start(&intake);
        tx.send(request(1)).await.unwrap();
        let started = tokio::time::Instant::now();
        let mut group = Vec::new();
        let guard = take_group(&intake, &mut group).await.expect("a group");
        assert_eq!(started.elapsed(), SMALL_GROUP_MAX_WAIT);
        assert_eq!(group.len(), 1);
        assert_eq!(intake.in_flight.load(Ordering::Acquire), 2);
        drop(guard);
    }

    #[tokio::test]
    async fn a_closed_queue_ends_the_committer_after_its_last_group() {
        let (tx, intake) = intake();
        let running = InFlight::start(&intake);
        tx.send(request(1)).await.unwrap();
        drop(tx);
        let mut group = Vec::new();
        let guard = take_group(&intake, &mut group).await;
        assert!(guard.is_some(), "the queued request is still committed");
        assert_eq!(group.len(), 1);
        drop((guard, running));
        let mut rest = Vec::new();
        assert!(take_group(&intake, &mut rest).await.is_none());
    }

    #[tokio::test]
    async fn a_group_stops_before_it_locks_more_than_its_key_budget() {
        let (tx, intake) = intake();
        for _ in 0..3 {
            tx.send(users_request(100)).await.unwrap();
        }
        // One request alone may lock more than the budget: it goes alone.
        tx.send(users_request(GROUP_KEYS + 1)).await.unwrap();
        tx.send(users_request(10)).await.unwrap();
        let sizes = |g: &[Request]| g.iter().map(|r| r.keys).collect::<Vec<_>>();
        let mut group = Vec::new();
        let guard = take_group(&intake, &mut group).await.expect("a group");
        assert_eq!(
            sizes(&group),
            [100, 100],
            "a third batch of 100 users would pass 256 keys"
        );
        drop(guard);
        let mut next = Vec::new();
        let guard = take_group(&intake, &mut next).await.expect("a group");
        assert_eq!(
            sizes(&next),
            [100],
            "the request kept back starts the next group"
        );
        drop(guard);
        let mut big = Vec::new();
        let guard = take_group(&intake, &mut big).await.expect("a group");
        assert_eq!(sizes(&big), [GROUP_KEYS + 1]);
        drop(guard);
        drop(tx);
        let mut last = Vec::new();
        let guard = take_group(&intake, &mut last).await;
        assert!(
            guard.is_some(),
            "the request kept back is committed after the queue closed"
        );
        assert_eq!(sizes(&last), [10]);
        drop(guard);
        assert!(take_group(&intake, &mut Vec::new()).await.is_none());
    }

    #[test]
    fn a_request_counts_each_key_it_locks_once() {
        let mut r = users_request(3);
        r.events.push(r.events[0].clone());
        r.events[1].identity = Some(IdentityUpdate {
            user_id: "u1".into(),
            account: None,
            contact: None,
            previous_id: Some("anon".into()),
        });
        let (reply, _) = oneshot::channel();
        assert_eq!(Request::new(r.events, reply).keys, 4, "u0, u1, u2 and anon");
    }
}
