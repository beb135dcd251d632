//! The PostgreSQL outbox: the same operations as the SQLite writer and
//! reader, for any number of forwarder instances sharing one database.
//!
//! Per-key ordering across instances. Every change to a key's queue
//! (ingest appending to it, a settle, a lease recovery, a replay or a held
//! event dying) first takes the key's lock, all keys of a transaction at
//! once and in one global order (`lock_order_keys`): an advisory
//! transaction lock per key (on the key's 32-bit hash), under a shared lock
//! of the whole key space; a transaction changing more than 512 keys takes
//! the key space exclusively instead, so no transaction fills the server's
//! bounded lock table. Ingest allocates its event ids (an identity
//! column) only after it holds the key's lock and commits before releasing
//! it, so within a key the id order is the commit order whichever instance
//! accepted the event. A key's lowest active id is its head (state 0, or 4
//! while held), the rest are queued (5); after a change the key is
//! normalised under its lock (the lowest active id becomes the head, any
//! other head is queued again), except while any of its events is leased.
//! Claims never wait: they pick due, unleased heads and try their keys'
//! locks (a key another instance is changing is skipped this round),
//! re-read the heads under the lock and lease each head together with the
//! queued events behind it, in id order, under one lease token. So
//! a key is in flight under at most one lease anywhere, its events go out in
//! commit order, and a retried, released or held head stays the head, with
//! everything behind it waiting. A lease is a row of `leases` (event, key,
//! owner instance, token, expiry), so a claim and its settle write a small
//! row, not the event's: a settle counts only for leases that still carry
//! its owner and token, and leases come back (under the key lock, then
//! normalised) when they expire or when their owner's heartbeat is older
//! than the instance expiry.

mod audience;
mod delivery;
mod ingest;
mod maintain;
mod read;
mod store;

pub use store::PgReader;

pub use super::MaintenanceReport;
use super::{
    ClaimedEvent, DeadLetter, DeadListFilter, IngestReceipt, NewEvent, OutboxStatus, Settlement,
    StoreError, now_ms,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};
use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

/// The PostgreSQL schema, separate from the SQLite one.
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The advisory lock (`pg_try_advisory_xact_lock`) that lets one instance
/// at a time run maintenance.
pub const MAINTENANCE_LOCK: i64 = 0x6366_775f_6d61_696e;

/// Unanswered claims remembered at most. While the database is down every
/// claim fails, about two a second, but only those under way when the
/// connection broke can have committed, and they are among the first
/// remembered: past this many (over an hour of outage) remembering more
/// would only grow memory with the outage.
const MAX_UNANSWERED: usize = 10_000;

/// Settings of a PostgreSQL outbox.
#[derive(Debug, Clone)]
pub struct PgConfig {
    pub dedup_window: Duration,
    pub max_backlog: u64,
    /// How often this instance proves it is alive (and looks for leases of
    /// instances that are not).
    pub heartbeat: Duration,
    /// An instance whose heartbeat is older than this is dead: its leases
    /// come back however long they were taken for.
    pub instance_expiry: Duration,
    /// Connections the instance opens at most: one per ingest committer,
    /// the rest pooled (two at least), so that N instances can be sized
    /// against the server's `max_connections`.
    pub max_connections: u32,
    /// How long a request waits for a connection before the outbox is
    /// called unavailable (ingest answers 503 instead of hanging).
    pub acquire_timeout: Duration,
    /// How often maintenance vacuums and analyses the outbox's tables when
    /// the server has autovacuum off. The first pass waits one interval: an
    /// outbox analysed at start, while still empty, leads the planner to
    /// treat `events` as empty until the next analysis, and a replay or a
    /// burst in that window ran at a fraction of its speed.
    pub own_vacuum_every: Duration,
    /// How often a claim reads the due index from its beginning instead of
    /// from the floor the previous claim left (see [`ClaimFloor`]): the
    /// longest an event the floor passed over waits.
    pub claim_full_scan_every: Duration,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            dedup_window: Duration::from_secs(24 * 3600),
            max_backlog: 10_000_000,
            heartbeat: Duration::from_secs(2),
            instance_expiry: Duration::from_secs(10),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
            own_vacuum_every: Duration::from_secs(30),
            claim_full_scan_every: Duration::from_secs(1),
        }
    }
}

impl From<&super::WriterConfig> for PgConfig {
    /// The settings `serve` gives every backend; the rest keep their
    /// defaults.
    fn from(w: &super::WriterConfig) -> PgConfig {
        PgConfig {
            dedup_window: w.dedup_window,
            max_backlog: w.max_backlog,
            ..PgConfig::default()
        }
    }
}

/// Handle to the shared outbox, registered as one instance. Cheap to clone;
/// the instance stops its heartbeat when the last clone is dropped.
#[derive(Clone)]
pub struct PgOutbox {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    instance: i64,
    config: PgConfig,
    ingest: mpsc::Sender<ingest::Request>,
    stored: Arc<Notify>,
    held_cursor: Mutex<i64>,
    /// The last lease token handed out: every claim gets a larger one, so
    /// that a token names one claim.
    last_token: Mutex<i64>,
    /// Tokens of claims whose answer never came (the connection broke): the
    /// claim may have committed, and then holds leases no worker knows of.
    /// They are given back as soon as the database answers again, instead
    /// of when the lease runs out.
    unanswered: Arc<Mutex<Vec<i64>>>,
    tasks: Vec<JoinHandle<()>>,
    /// The server runs no autovacuum: maintenance vacuums the outbox's
    /// tables itself (see [`maintain::vacuum_if_due`]).
    autovacuum_off: bool,
    last_vacuum: Mutex<std::time::Instant>,
    claim_floor: Mutex<ClaimFloor>,
}

/// How far before a claim's clock reading the next claim starts at the
/// latest: an event written due "now" by an ingest, a settle or a promotion
/// whose clock read came before the claim but whose commit came after it,
/// or by an instance whose clock is a little behind, still falls inside.
/// A claim steps over every entry in the margin that is leased (an index
/// probe each) or delivered (about 30 ns each), so it stays short.
const CLAIM_FLOOR_MARGIN_MS: i64 = 250;

/// Where this instance's next claim starts reading the due index. Every
/// delivery leaves a dead entry at the index's front until a vacuum, and a
/// claim from the front stepped over all of them (migration 0010); from the
/// floor it steps over those of the last `CLAIM_FLOOR_MARGIN_MS` only.
/// Whatever becomes claimable is written due at its writer's "now" (an
/// ingest; a normalisation, which every promotion and every lease that came
/// back goes through), so the floor stays below it. A full read at least
/// every `PgConfig::claim_full_scan_every` takes what the floor passed over
/// anyway: a commit later than the margin, a clock behind, an older
/// forwarder's promotion.
struct ClaimFloor {
    floor: Option<i64>,
    full_scan_at: std::time::Instant,
    /// Counts full reads, so that the result of a claim from an older floor
    /// does not replace what a full read found since.
    generation: u64,
}

impl ClaimFloor {
    fn new() -> Self {
        ClaimFloor {
            floor: None,
            full_scan_at: std::time::Instant::now(),
            generation: 0,
        }
    }

    /// The floor for the next claim (`i64::MIN`: a full read), and its
    /// generation.
    fn start(&mut self, full_scan_every: Duration) -> (i64, u64) {
        match self.floor {
            Some(floor) if self.full_scan_at.elapsed() < full_scan_every => {
                (floor, self.generation)
            }
            _ => {
                self.full_scan_at = std::time::Instant::now();
                self.generation += 1;
                (i64::MIN, self.generation)
            }
        }
    }

    /// Records what a claim started at `(floor, generation)` at `now` saw:
    /// the earliest due time among its candidates. Everything before that
    /// was delivered or is leased; whatever becomes due later is written
    /// due at its writer's "now", so the next claim starts at the earlier of
    /// the two: a backlog's next candidate, or the margin before `now`.
    fn advance(&mut self, started: (i64, u64), seen: i64, now: i64) {
        if started.1 != self.generation {
            return;
        }
        let next = seen.min(now.saturating_sub(CLAIM_FLOOR_MARGIN_MS));
        self.floor = Some(if started.0 == i64::MIN {
            next
        } else {
            self.floor.map_or(next, |f| f.max(next))
        });
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Maps a driver error onto the outbox's classes: an unreachable or
/// restarting server is transient (ingest answers 503 and retries are
/// welcome), a full disk is `Full`, anything else is a bug or a schema
/// problem.
pub(crate) fn pg_error(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => StoreError::Busy(format!("PostgreSQL is unreachable: {e}")),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // 08: connection lost; 57P: the server is shutting down or
            // restarting; 25006: a standby that is read-only (mid-failover).
            if code.starts_with("08") || code.starts_with("57P") || code == "25006" {
                StoreError::Busy(format!("PostgreSQL is unavailable: {}", db.message()))
            } else if code == "53200" {
                // The shared lock table (key locks are advisory locks in
                // it) full for the moment: transient, and retried.
                StoreError::Busy(format!(
                    "{LOCK_TABLE_FULL}: {} (raise max_locks_per_transaction)",
                    db.message()
                ))
            } else if code.starts_with("53") {
                StoreError::Full(db.message().to_string())
            } else {
                StoreError::Database(e)
            }
        }
        _ => StoreError::Database(e),
    }
}

/// How an error from a full lock table starts (see `pg_error`).
const LOCK_TABLE_FULL: &str = "PostgreSQL's lock table is full";

/// Deadlocks, serialization failures and a momentarily full lock table:
/// the transaction is run again.
fn retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40P01") | Some("40001"))
        }
        StoreError::Busy(m) => m.starts_with(LOCK_TABLE_FULL),
        _ => false,
    }
}

/// The pause before retry `attempt` (from 1): a full lock table empties as
/// the transactions holding it commit, within milliseconds.
fn retry_pause(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_millis(20 * u64::from(attempt))
}

/// Runs a transaction again after a deadlock or serialization failure (a
/// few times; PostgreSQL picked it as the victim, the other side went on)
/// or a momentarily full lock table, pausing a little longer each time.
/// Ingest's group commit and every other transaction share it.
async fn with_retry<T, F, Fut>(mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        let r = f().await;
        if let Err(e) = &r
            && pause_before_retry(e, &mut attempt).await
        {
            continue;
        }
        return r;
    }
}

/// The retry policy of `with_retry`, for a loop that cannot hand its
/// transaction over as a closure (ingest's committers, which lend their own
/// connection to each attempt): whether `e` after `attempt` earlier retries
/// is worth another; if so, pauses and counts it.
async fn pause_before_retry(e: &StoreError, attempt: &mut u32) -> bool {
    if !retryable(e) || *attempt >= 5 {
        return false;
    }
    *attempt += 1;
    tracing::debug!(error = %e, attempt = *attempt, "outbox transaction retried");
    tokio::time::sleep(retry_pause(*attempt)).await;
    true
}

/// How long a pooled connection may sit idle and still be handed out
/// without a ping first.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// Refuses a session that would acknowledge before the commit is durable.
async fn check_synchronous_commit(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    let value: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut *conn)
        .await?;
    if value.eq_ignore_ascii_case("off") {
        return Err(sqlx::Error::Configuration(
            "synchronous_commit is off for this server, database or role: a commit could be \
             acknowledged before it is durable, and an acknowledged event lost in a crash; \
             set synchronous_commit to on (or local, remote_write, remote_apply)"
                .into(),
        ));
    }
    Ok(())
}

impl PgOutbox {
    /// Connects, refuses a server with `synchronous_commit` off, migrates
    /// (concurrent starts are serialised by the migrator's advisory lock),
    /// registers this instance and starts its heartbeat and group-commit
    /// tasks.
    pub async fn connect(url: &str, config: PgConfig) -> Result<PgOutbox, StoreError> {
        let opts = PgConnectOptions::from_str(url)
            .map_err(StoreError::Database)?
            // The outbox's transactions never wait between statements: one
            // left open (an instance frozen mid-transaction, SIGSTOP or a
            // paused VM) is ended by the server before it holds the other
            // instances' key locks for longer than the instance expiry.
            .options([("idle_in_transaction_session_timeout", "10s")])
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
        // One connection first, so that a refusal names its reason instead
        // of surfacing as a pool timeout.
        let mut first = opts.connect().await.map_err(pg_error)?;
        check_synchronous_commit(&mut first)
            .await
            .map_err(StoreError::Database)?;
        MIGRATOR.run(&mut first).await?;
        let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
            .fetch_one(&mut first)
            .await
            .map_err(pg_error)?;
        let autovacuum_off = autovacuum.eq_ignore_ascii_case("off");
        if autovacuum_off {
            tracing::warn!(
                "autovacuum is off on this PostgreSQL server: the forwarder vacuums its own tables \
                 every 30 s so that they do not bloat; turning autovacuum on is better"
            );
        }
        let _ = first.close().await;
        // Ingest's committers keep connections of their own (see
        // `ingest::Committer`): the pool gets the rest of the instance's
        // connections.
        let pooled = config
            .max_connections
            .saturating_sub(ingest::COMMITTERS as u32)
            .max(2);
        let pool = PgPoolOptions::new()
            .max_connections(pooled)
            .acquire_timeout(config.acquire_timeout)
            .after_connect(|conn, _| Box::pin(check_synchronous_commit(conn)))
            // By default sqlx pings every connection it hands out: a round
            // trip of its own before each transaction, which under load
            // costs both sides as much as a small statement. A connection
            // in steady use needs no such test (one that broke fails its
            // statement, and sqlx pings it again on its way back to the
            // pool, whatever the settings); one left idle long enough for
            // the server to have ended its session meanwhile is pinged, as
            // before.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for < PING_WHEN_IDLE_FOR {
                        return Ok(true);
                    }
                    Ok(conn.ping().await.is_ok())
                })
            })
            .connect_with(opts.clone())
            .await
            .map_err(pg_error)?;
        let now = now_ms();
        let instance: i64 = sqlx::query_scalar(
            "INSERT INTO instances (started_at, heartbeat_at) VALUES ($1, $1) RETURNING id",
        )
        .bind(now)
        .fetch_one(&pool)
        .await
        .map_err(pg_error)?;
        let (tx, rx) = mpsc::channel(4096);
        let stored = Arc::new(Notify::new());
        let writer = tokio::spawn(ingest::run(opts, config.clone(), stored.clone(), rx));
        let unanswered: Arc<Mutex<Vec<i64>>> = Arc::default();
        let beat = tokio::spawn(heartbeat_loop(
            pool.clone(),
            instance,
            config.clone(),
            unanswered.clone(),
        ));
        Ok(PgOutbox {
            inner: Arc::new(Inner {
                pool,
                instance,
                config,
                ingest: tx,
                stored,
                held_cursor: Mutex::new(0),
                last_token: Mutex::new(0),
                unanswered,
                tasks: vec![writer, beat],
                autovacuum_off,
                last_vacuum: Mutex::new(std::time::Instant::now()),
                claim_floor: Mutex::new(ClaimFloor::new()),
            }),
        })
    }

    /// This instance's id: the owner of the leases it takes.
    pub fn instance_id(&self) -> i64 {
        self.inner.instance
    }

    /// Woken after a commit that stored new events, so idle delivery wakes.
    pub fn stored(&self) -> Arc<Notify> {
        self.inner.stored.clone()
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The read side over this instance's pool.
    pub fn reader(&self) -> PgReader {
        PgReader::from_pool(self.inner.pool.clone())
    }

    /// Whether the database answers at all (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.inner
            .pool
            .execute("SELECT 1")
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// Stores events durably; returns after the commit that holds them.
    /// Requests queued meanwhile share the transaction (group commit).
    pub async fn ingest(&self, events: Vec<NewEvent>) -> Result<IngestReceipt, StoreError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.inner
            .ingest
            .send(ingest::Request::new(events, reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Claims up to `max` due events (heads of their keys, each with the
    /// events queued behind it) under one lease of this instance.
    pub async fn claim(
        &self,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedEvent>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let pool = &self.inner.pool;
        let me = self.inner.instance;
        let now = now_ms();
        let token = {
            let mut last = self.inner.last_token.lock().expect("token lock");
            *last = (now + lease.as_millis() as i64).max(*last + 1);
            *last
        };
        let floor = {
            let every = self.inner.config.claim_full_scan_every;
            self.inner
                .claim_floor
                .lock()
                .expect("floor lock")
                .start(every)
        };
        let started = std::time::Instant::now();
        let claimed = with_retry(|| delivery::claim(pool, me, max, token, now, floor.0))
            .await
            .map(|(claimed, seen)| {
                if let Some(seen) = seen {
                    let mut f = self.inner.claim_floor.lock().expect("floor lock");
                    f.advance(floor, seen, now);
                }
                claimed
            });
        match &claimed {
            Ok(c) => tracing::trace!(
                events = c.len(),
                micros = started.elapsed().as_micros() as u64,
                "claim"
            ),
            // The claim may have committed without its answer arriving.
            Err(e) if e.is_transient() => {
                let mut unanswered = self.inner.unanswered.lock().expect("unanswered lock");
                if unanswered.len() < MAX_UNANSWERED {
                    unanswered.push(token);
                }
            }
            Err(_) => {}
        }
        claimed
    }

    /// Records outcomes, atomically for the batch; outcomes whose lease this
    /// instance no longer holds are ignored.
    pub async fn settle(&self, items: Vec<Settlement>) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let pool = &self.inner.pool;
        let me = self.inner.instance;
        let items = &items;
        let started = std::time::Instant::now();
        let settled = with_retry(|| delivery::settle(pool, me, items)).await;
        tracing::trace!(
            events = items.len(),
            micros = started.elapsed().as_micros() as u64,
            ok = settled.is_ok(),
            "settle"
        );
        settled
    }

    /// Proves this instance alive now (the background task does it every
    /// `heartbeat`).
    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        beat(&self.inner.pool, self.inner.instance).await
    }

    /// Returns expired leases and those of dead instances to their keys.
    pub async fn recover_leases(&self) -> Result<u64, StoreError> {
        let pool = &self.inner.pool;
        let expiry = self.inner.config.instance_expiry;
        with_retry(|| async move {
            let mut tx = pool.begin().await.map_err(pg_error)?;
            let n = delivery::recover_leases(&mut tx, now_ms(), expiry).await?;
            tx.commit().await.map_err(pg_error)?;
            Ok(n)
        })
        .await
    }

    /// One bounded maintenance pass: leases back, held events released or
    /// dead past their budget, delivered events past retention and old
    /// message ids pruned. `None` when another instance is running it.
    pub async fn maintain(
        &self,
        retention: Duration,
        held_budget: Duration,
    ) -> Result<Option<MaintenanceReport>, StoreError> {
        let inner = &self.inner;
        let report = maintain::maintain(inner, retention, held_budget).await?;
        if report.is_some() && inner.autovacuum_off {
            maintain::vacuum_if_due(inner).await;
        }
        Ok(report)
    }

    /// Dead events back into delivery (all of them with `None`).
    pub async fn replay(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        let pool = &self.inner.pool;
        let ids = ids.as_deref();
        with_retry(|| maintain::replay(pool, ids)).await
    }

    /// Deletes dead events (all of them with `None`).
    pub async fn purge(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        maintain::purge(&self.inner.pool, ids.as_deref()).await
    }

    /// Records a shared operator fact (the sync schedule and the like).
    pub async fn set_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO meta (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(value)
        .execute(&self.inner.pool)
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    /// Status from sharded counters and index probes.
    pub async fn status(&self) -> Result<OutboxStatus, StoreError> {
        read::status(&self.inner.pool).await
    }

    /// Known ids for these users: `user -> (account, contact)`.
    pub async fn identities(
        &self,
        users: &[&str],
    ) -> Result<HashMap<String, (Option<String>, Option<String>)>, StoreError> {
        read::identities(&self.inner.pool, users).await
    }

    /// Dead letters, oldest first, with filters and keyset paging.
    pub async fn dead_list(&self, f: &DeadListFilter) -> Result<Vec<DeadLetter>, StoreError> {
        read::dead_list(&self.inner.pool, f).await
    }

    /// One dead letter with its history and payload.
    pub async fn dead_show(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        read::dead_show(&self.inner.pool, id).await
    }

    /// All-or-nothing check of an explicit selection (see the SQLite
    /// reader's `dead_selection`).
    pub async fn dead_selection(
        &self,
        ids: &[i64],
    ) -> Result<Result<Vec<i64>, String>, StoreError> {
        read::dead_selection(&self.inner.pool, ids).await
    }

    /// Ids of every dead letter matching a filter (paging ignored).
    pub async fn dead_ids(&self, f: &DeadListFilter) -> Result<Vec<i64>, StoreError> {
        read::dead_ids(&self.inner.pool, f).await
    }

    /// Leaves the cluster at shutdown, after the last write: the heartbeat
    /// stops and is marked stale and whatever this instance still holds goes
    /// back to its keys now, so the other instances need not wait for the
    /// instance expiry. The handle must not be used for delivery after it.
    pub async fn leave(&self) -> Result<(), StoreError> {
        for t in &self.inner.tasks {
            t.abort();
        }
        sqlx::query("UPDATE instances SET heartbeat_at = 0 WHERE id = $1")
            .bind(self.inner.instance)
            .execute(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        let n = self.recover_leases().await?;
        if n > 0 {
            tracing::info!(events = n, "leases given back at shutdown");
        }
        Ok(())
    }

    /// How many instances share this database now (heartbeats younger than
    /// the instance expiry, this one included): the divisor of a rate cap
    /// that holds for the tenant as a whole.
    pub async fn live_instances(&self) -> Result<u32, StoreError> {
        let since = now_ms() - self.inner.config.instance_expiry.as_millis() as i64;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM instances WHERE heartbeat_at >= $1")
            .bind(since)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg_error)?;
        Ok(n.max(1) as u32)
    }

    /// Takes or keeps the lease of a one-at-a-time role (the sync lane's
    /// window) for `ttl`; `true` while this instance holds it. A role whose
    /// holder stopped renewing passes to the next instance that asks once
    /// the lease ran out, so a dead leader is replaced within `ttl`.
    pub async fn lead(&self, role: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = now_ms();
        let held: Option<i64> = sqlx::query_scalar(
            "INSERT INTO leaders (role, instance, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (role) DO UPDATE SET instance = excluded.instance, expires_at = excluded.expires_at \
             WHERE leaders.instance = excluded.instance OR leaders.expires_at < $4 \
             RETURNING instance",
        )
        .bind(role)
        .bind(self.inner.instance)
        .bind(now + ttl.as_millis() as i64)
        .bind(now)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(pg_error)?;
        Ok(held == Some(self.inner.instance))
    }

    /// Leaves the cluster cleanly: the heartbeat stops and is marked stale,
    /// so whatever this instance still holds comes back to the others at
    /// once instead of after the instance expiry.
    pub async fn close(self) {
        for t in &self.inner.tasks {
            t.abort();
        }
        let _ = sqlx::query("UPDATE instances SET heartbeat_at = 0 WHERE id = $1")
            .bind(self.inner.instance)
            .execute(&self.inner.pool)
            .await;
        self.inner.pool.close().await;
    }
}

async fn beat(pool: &PgPool, instance: i64) -> Result<(), StoreError> {
    sqlx::query("UPDATE instances SET heartbeat_at = GREATEST(heartbeat_at, $2) WHERE id = $1")
        .bind(instance)
        .bind(now_ms())
        .execute(pool)
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// Keeps this instance alive in `instances` and brings back the leases of
/// instances that stopped doing so.
async fn heartbeat_loop(
    pool: PgPool,
    instance: i64,
    config: PgConfig,
    unanswered: Arc<Mutex<Vec<i64>>>,
) {
    let mut tick = tokio::time::interval(config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = beat(&pool, instance).await {
            tracing::warn!(error = %e, "outbox heartbeat failed");
            continue;
        }
        let tokens = unanswered.lock().expect("unanswered lock").clone();
        if !tokens.is_empty() {
            let released = with_retry(|| async {
                let mut tx = pool.begin().await.map_err(pg_error)?;
                let n = delivery::release_tokens(&mut tx, instance, &tokens).await?;
                tx.commit().await.map_err(pg_error)?;
                Ok(n)
            })
            .await;
            match released {
                Ok(n) => {
                    unanswered
                        .lock()
                        .expect("unanswered lock")
                        .retain(|t| !tokens.contains(t));
                    if n > 0 {
                        tracing::info!(
                            events = n,
                            "leases of claims whose answer was lost came back"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "giving back unanswered claims failed"),
            }
        }
        let recovered = with_retry(|| async {
            let mut tx = pool.begin().await.map_err(pg_error)?;
            let n = delivery::recover_leases(&mut tx, now_ms(), config.instance_expiry).await?;
            tx.commit().await.map_err(pg_error)?;
            Ok(n)
        })
        .await;
        match recovered {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "leases of expired claims came back"),
            Err(e) => tracing::warn!(error = %e, "lease recovery failed"),
        }
    }
}

/// Locks these ordering keys until the transaction ends. The server
/// function takes them in the one order every transaction uses (by hash,
/// see the module doc), so that two never wait on each other in a cycle;
/// here they are only made distinct, to send each once.
async fn lock_keys(conn: &mut sqlx::PgConnection, keys: &[&str]) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut distinct: Vec<&str> = keys.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    sqlx::query("SELECT lock_order_keys($1)")
        .bind(&distinct)
        .execute(&mut *conn)
        .await
        .map_err(pg_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full lock table is retried five times, a little longer apart each
    /// time; an error that another attempt cannot mend is not retried.
    #[tokio::test(start_paused = true)]
    async fn the_retry_policy_retries_what_may_pass_five_times() {
        let full = StoreError::Busy(format!("{LOCK_TABLE_FULL}: out of shared memory"));
        let started = tokio::time::Instant::now();
        let mut attempt = 0;
        let mut retries = 0;
        while pause_before_retry(&full, &mut attempt).await {
            retries += 1;
        }
        assert_eq!(retries, 5);
        // 20 + 40 + 60 + 80 + 100 ms of pauses.
        assert_eq!(started.elapsed(), Duration::from_millis(300));

        let unreachable = StoreError::Busy("PostgreSQL is unreachable: refused".into());
        let mut attempt = 0;
        assert!(!pause_before_retry(&unreachable, &mut attempt).await);
        assert_eq!(attempt, 0);
    }
}
