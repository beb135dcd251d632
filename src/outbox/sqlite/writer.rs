//! The single writer task. Every change to the outbox goes through it:
//! ingest inserts, delivery claims and settlements, maintenance and operator
//! actions. It drains whatever is queued into one `BEGIN IMMEDIATE`
//! transaction (group commit) and answers each request only after the
//! commit, so an acknowledgement always means "on disk".

use super::audience;
use super::direct::{Db, StatementCache, Step};
use super::reserve::Reserve;
use super::{EventState, StoreError, now_ms, set_meta};
use crate::identity;
use crate::outbox::{
    AudienceOp, ClaimedEvent, DEAD_CHUNK, DeadListFilter, DeadSelection, IdentityUpdate,
    IngestReceipt, MaintenanceReport, NewEvent, SettleOutcome, Settlement, WriterConfig,
};
use sqlx::{Row, SqliteConnection};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};

/// How many queued requests one transaction takes at most.
const GROUP_CAP: usize = 512;
/// Failed attempts remembered per event for dead-letter inspection.
const HISTORY_KEEP: i64 = 20;

enum Op {
    Ingest {
        events: Vec<NewEvent>,
        reply: oneshot::Sender<Result<IngestReceipt, StoreError>>,
    },
    Claim {
        max: usize,
        lease: Duration,
        reply: oneshot::Sender<Result<Vec<ClaimedEvent>, StoreError>>,
    },
    Settle {
        items: Vec<Settlement>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Maintain {
        retention: Duration,
        held_budget: Duration,
        reply: oneshot::Sender<Result<MaintenanceReport, StoreError>>,
    },
    Replay {
        chunk: DeadChunk,
        reply: oneshot::Sender<Result<(u64, Option<i64>), StoreError>>,
    },
    Purge {
        chunk: DeadChunk,
        reply: oneshot::Sender<Result<(u64, Option<i64>), StoreError>>,
    },
    SetMeta {
        name: String,
        value: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Reports for the operators' `recent_errors` from outside delivery.
    NoteErrors {
        reports: Vec<(String, &'static str, i64)>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Copy the whole WAL into the database file and truncate it; runs
    /// between groups, outside any transaction.
    Checkpoint {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A sync lane write (see `audience.rs`).
    Audience {
        op: AudienceOp,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// Results computed inside a transaction, released only after COMMIT.
enum Done {
    Ingest(IngestReceipt),
    Claim(Vec<ClaimedEvent>),
    Unit,
    Maintain(MaintenanceReport),
    /// Dead letters changed, and the id to continue after (more may match).
    Dead(u64, Option<i64>),
}

/// One transaction's share of a replay or purge.
#[derive(Debug, Clone)]
enum DeadChunk {
    /// At most [`DEAD_CHUNK`] explicit ids.
    Ids(Vec<i64>),
    /// The next [`DEAD_CHUNK`] dead letters matching the filter, after `after`.
    Next { filter: DeadListFilter, after: i64 },
}

/// Handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Op>,
    /// Woken after a commit that stored new events, so idle delivery wakes.
    pub stored: std::sync::Arc<Notify>,
    /// Pause between the chunks of a replay or purge (see
    /// [`OFFLINE_CHUNK_PAUSE`]); zero for the server's own writer, whose
    /// queue already interleaves other requests with the chunks.
    chunk_pause: Duration,
}

/// Pause of an offline writer (`dead replay|purge` beside a running
/// server) between its chunks. The server's writer then waits in SQLite's
/// busy handler, which sleeps up to 100 ms between tries; a writer that
/// began its next chunk at once would win the lock every time, and ingest
/// would wait for the whole replay after all. A gap longer than that sleep
/// lets the waiting server in.
pub const OFFLINE_CHUNK_PAUSE: Duration = Duration::from_millis(120);

/// Tells background helpers when the writer (and so the outbox) is gone.
pub(super) struct WeakWriter(mpsc::WeakSender<Op>);

impl WeakWriter {
    pub(super) fn alive(&self) -> bool {
        self.0.upgrade().is_some()
    }
}

impl Writer {
    pub(super) async fn start(
        mut conn: SqliteConnection,
        config: WriterConfig,
        reserve: Reserve,
    ) -> Result<Writer, StoreError> {
        if config.release_leases_at_start {
            // A previous process is gone: whatever it had in flight comes back now.
            release_leases(&mut conn, i64::MAX).await?;
        }
        let (tx, rx) = mpsc::channel(4096);
        let stored = std::sync::Arc::new(Notify::new());
        let task = WriterTask {
            conn,
            config,
            stored: stored.clone(),
            reserve,
            statements: StatementCache::default(),
            held_cursor: 0,
        };
        // The writer gets a thread and a runtime of its own. Each statement
        // is a round trip to SQLite's thread; on the shared runtime every
        // round trip could wait behind request tasks parsing large bodies,
        // and the writer (the one path every event takes) spent most of a
        // group's time waiting to be polled rather than writing.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || runtime.block_on(task.run(rx)))
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        Ok(Writer {
            tx,
            stored,
            chunk_pause: Duration::ZERO,
        })
    }

    /// This writer pauses between replay and purge chunks, so that another
    /// process's writer gets its turn (the offline commands).
    pub(super) fn pace_chunks(mut self, pause: Duration) -> Writer {
        self.chunk_pause = pause;
        self
    }

    async fn between_chunks(&self) {
        if !self.chunk_pause.is_zero() {
            tokio::time::sleep(self.chunk_pause).await;
        }
    }

    /// Folds the WAL into the database file and truncates it. Called at
    /// shutdown, after the last write, so that the next start has no WAL to
    /// read back (startup time stays flat whatever the last load was).
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Checkpoint { reply }, rx).await
    }

    /// A handle that does not keep the writer alive.
    pub(super) fn downgrade(&self) -> WeakWriter {
        WeakWriter(self.tx.downgrade())
    }

    async fn call<T>(
        &self,
        op: Op,
        rx: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.tx.send(op).await.map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Stores events durably; returns after the commit that holds them.
    pub async fn ingest(&self, events: Vec<NewEvent>) -> Result<IngestReceipt, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Ingest { events, reply }, rx).await
    }

    /// Claims up to `max` due events (heads of their ordering keys, then
    /// the events queued behind them) under a lease.
    pub async fn claim(
        &self,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedEvent>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Claim { max, lease, reply }, rx).await
    }

    /// Records the outcome of a delivery attempt, atomically for the batch.
    pub async fn settle(&self, items: Vec<Settlement>) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.call(Op::Settle { items, reply }, rx).await
    }

    /// Expired leases back, held events past their budget dead, delivered
    /// events past retention and old message ids pruned.
    pub async fn maintain(
        &self,
        retention: Duration,
        held_budget: Duration,
    ) -> Result<MaintenanceReport, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.call(
            Op::Maintain {
                retention,
                held_budget,
                reply,
            },
            rx,
        )
        .await
    }

    /// Dead events back into delivery (all of them with `None`), in
    /// transactions of at most [`DEAD_CHUNK`] events.
    pub async fn replay(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        match ids {
            Some(ids) => self.dead_by_ids(DeadAction::Replay, ids).await,
            None => self.replay_matching(DeadListFilter::default()).await,
        }
    }

    /// Deletes dead events (all of them with `None`), in transactions of at
    /// most [`DEAD_CHUNK`] events.
    pub async fn purge(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        match ids {
            Some(ids) => self.dead_by_ids(DeadAction::Purge, ids).await,
            None => self.purge_matching(DeadListFilter::default()).await,
        }
    }

    /// Replays what an operator selected; see [`DeadSelection`].
    pub async fn replay_selected(&self, which: DeadSelection) -> Result<u64, StoreError> {
        match which {
            DeadSelection::Ids(ids) => self.dead_by_ids(DeadAction::Replay, ids).await,
            DeadSelection::Matching(f) => self.replay_matching(f).await,
        }
    }

    /// Purges what an operator selected; see [`DeadSelection`].
    pub async fn purge_selected(&self, which: DeadSelection) -> Result<u64, StoreError> {
        match which {
            DeadSelection::Ids(ids) => self.dead_by_ids(DeadAction::Purge, ids).await,
            DeadSelection::Matching(f) => self.purge_matching(f).await,
        }
    }

    /// Replays every dead letter matching the filter (its paging fields
    /// are ignored), a chunk per transaction, without reading all their ids
    /// first.
    pub async fn replay_matching(&self, filter: DeadListFilter) -> Result<u64, StoreError> {
        self.dead_matching(DeadAction::Replay, filter).await
    }

    /// Purges every dead letter matching the filter, as [`Writer::replay_matching`].
    pub async fn purge_matching(&self, filter: DeadListFilter) -> Result<u64, StoreError> {
        self.dead_matching(DeadAction::Purge, filter).await
    }

    async fn dead_chunk(
        &self,
        action: DeadAction,
        chunk: DeadChunk,
    ) -> Result<(u64, Option<i64>), StoreError> {
        let (reply, rx) = oneshot::channel();
        let op = match action {
            DeadAction::Replay => Op::Replay { chunk, reply },
            DeadAction::Purge => Op::Purge { chunk, reply },
        };
        self.call(op, rx).await
    }

    async fn dead_by_ids(&self, action: DeadAction, ids: Vec<i64>) -> Result<u64, StoreError> {
        let mut total = 0;
        for (i, chunk) in ids.chunks(DEAD_CHUNK).enumerate() {
            if i > 0 {
                self.between_chunks().await;
            }
            total += self
                .dead_chunk(action, DeadChunk::Ids(chunk.to_vec()))
                .await?
                .0;
        }
        Ok(total)
    }

    async fn dead_matching(
        &self,
        action: DeadAction,
        filter: DeadListFilter,
    ) -> Result<u64, StoreError> {
        let (mut total, mut after) = (0, 0);
        loop {
            let chunk = DeadChunk::Next {
                filter: filter.clone(),
                after,
            };
            let (n, next) = self.dead_chunk(action, chunk).await?;
            total += n;
            match next {
                Some(id) => after = id,
                None => return Ok(total),
            }
            self.between_chunks().await;
        }
    }

    /// Records a step of the audience sync lane (schedule, delivered and
    /// skipped values, counters) in one transaction.
    pub async fn audience(&self, op: AudienceOp) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Audience { op, reply }, rx).await
    }

    /// Adds `(error, outcome, events)` reports to `recent_errors`: ingest
    /// notes there the events it kept despite a field it could not read.
    pub async fn note_errors(
        &self,
        reports: Vec<(String, &'static str, i64)>,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::NoteErrors { reports, reply }, rx).await
    }

    /// Records an operator-visible fact (last error, sync schedule).
    pub async fn set_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.call(
            Op::SetMeta {
                name: name.into(),
                value: value.into(),
                reply,
            },
            rx,
        )
        .await
    }
}

struct WriterTask {
    conn: SqliteConnection,
    config: WriterConfig,
    stored: std::sync::Arc<Notify>,
    /// Disk space kept for delivery when the disk fills up (see reserve.rs).
    reserve: Reserve,
    /// The ingest path's prepared statements (see direct.rs).
    statements: StatementCache,
    /// Where maintenance's walk over held heads resumes (an event id).
    held_cursor: i64,
}

impl WriterTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut ops = Vec::with_capacity(GROUP_CAP);
        while let Some(first) = rx.recv().await {
            ops.push(first);
            while ops.len() < GROUP_CAP {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let (checkpoints, group): (Vec<Op>, Vec<Op>) = std::mem::take(&mut ops)
                .into_iter()
                .partition(|o| matches!(o, Op::Checkpoint { .. }));
            self.commit_group(group).await;
            for op in checkpoints {
                if let Op::Checkpoint { reply } = op {
                    let result = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                        .execute(&mut self.conn)
                        .await
                        .map(|_| ())
                        .map_err(db);
                    let _ = reply.send(result);
                }
            }
        }
        // Prepared statements must be finalized before the connection closes.
        if let Ok(_handle) = self.conn.lock_handle().await {
            self.statements.clear();
        }
        use sqlx::Connection;
        let _ = self.conn.close().await;
    }

    async fn commit_group(&mut self, ops: Vec<Op>) {
        let ops = self.refuse_ingest_while_full(ops).await;
        if ops.is_empty() {
            return;
        }
        let any_ingest = ops.iter().any(|o| matches!(o, Op::Ingest { .. }));
        let started = std::time::Instant::now();
        let result = self.transaction(&ops).await;
        let took = started.elapsed();
        metrics::histogram!("outbox_commit_duration_seconds").record(took.as_secs_f64());
        tracing::trace!(
            ops = ops.len(),
            us = took.as_micros() as u64,
            ok = result.is_ok(),
            "outbox commit"
        );
        match result {
            Ok(done) => {
                for (op, d) in ops.into_iter().zip(done) {
                    reply(op, Ok(d));
                }
                if any_ingest {
                    self.stored.notify_waiters();
                }
            }
            Err(e) if ops.len() == 1 => {
                self.release_reserve_if_full(&e);
                if let Some(op) = ops.into_iter().next() {
                    reply(op, Err(e));
                }
            }
            Err(e) => {
                self.release_reserve_if_full(&e);
                // One request's failure must not fail its neighbours: commit
                // each alone so only the culprit gets the error.
                for op in self.refuse_ingest_while_full(ops).await {
                    let single = [op];
                    let result = self.transaction(&single).await;
                    let [op] = single;
                    match result {
                        Ok(mut done) => reply(op, Ok(done.pop().expect("one result"))),
                        Err(e) => reply(op, Err(e)),
                    }
                }
                self.stored.notify_waiters();
            }
        }
    }

    /// While the disk reserve is released (the disk filled up), ingest is
    /// answered `Full` without touching the database, so that the room left
    /// goes to delivery; everything else goes ahead.
    async fn refuse_ingest_while_full(&mut self, ops: Vec<Op>) -> Vec<Op> {
        if !ops.iter().any(|o| matches!(o, Op::Ingest { .. })) || self.reserve.ready().await {
            return ops;
        }
        let mut rest = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Ingest { reply, .. } => drop(reply.send(Err(StoreError::Full(
                    "the disk is full; ingest resumes when space returns".into(),
                )))),
                other => rest.push(other),
            }
        }
        rest
    }

    fn release_reserve_if_full(&mut self, e: &StoreError) {
        if matches!(e, StoreError::Full(_)) {
            self.reserve.release();
        }
    }

    async fn transaction(&mut self, ops: &[Op]) -> Result<Vec<Done>, StoreError> {
        if let Some(done) = self.plain_ingest_transaction(ops).await {
            return done;
        }
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut self.conn)
            .await
            .map_err(StoreError::classify)?;
        let t0 = std::time::Instant::now();
        let applied = self.apply_all(ops).await;
        let t1 = t0.elapsed();
        match applied {
            Ok(done) => match sqlx::query("COMMIT").execute(&mut self.conn).await {
                Ok(_) => {
                    tracing::trace!(
                        apply_us = t1.as_micros() as u64,
                        commit_us = (t0.elapsed() - t1).as_micros() as u64,
                        "outbox transaction"
                    );
                    Ok(done)
                }
                Err(e) => {
                    let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
                    Err(StoreError::classify(e))
                }
            },
            Err(e) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
                Err(e)
            }
        }
    }

    /// The common group: only ingest, no identity or audience updates.
    /// BEGIN, the inserts and COMMIT then run under a single lock of the
    /// connection (one hand-off for the whole transaction). `None` when the
    /// group needs the general path.
    async fn plain_ingest_transaction(
        &mut self,
        ops: &[Op],
    ) -> Option<Result<Vec<Done>, StoreError>> {
        let mut requests: Vec<&[NewEvent]> = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Ingest { events, .. }
                    if events
                        .iter()
                        .all(|e| e.identity.is_none() && e.audience.is_empty()) =>
                {
                    requests.push(events.as_slice())
                }
                _ => return None,
            }
        }
        let now = now_ms();
        let mut handle = match self.conn.lock_handle().await {
            Ok(h) => h,
            Err(e) => return Some(Err(db(e))),
        };
        // SAFETY: the handle stays locked while `d` is used (to the end of
        // this function).
        let d = unsafe { Db::new(handle.as_raw_handle()) };
        let t0 = std::time::Instant::now();
        if let Err(e) = d.exec("BEGIN IMMEDIATE") {
            return Some(Err(e));
        }
        let (mut identities, mut audience) = (Vec::new(), Vec::new());
        let result = insert_locked(
            &d,
            &mut self.statements,
            &self.config,
            &requests,
            now,
            &mut identities,
            &mut audience,
        );
        debug_assert!(identities.is_empty() && audience.is_empty());
        let t1 = t0.elapsed();
        let result = result.and_then(|receipts| {
            d.exec("COMMIT")?;
            Ok(receipts)
        });
        match result {
            Ok(receipts) => {
                tracing::trace!(
                    apply_us = t1.as_micros() as u64,
                    commit_us = (t0.elapsed() - t1).as_micros() as u64,
                    "outbox transaction"
                );
                Some(Ok(receipts.into_iter().map(Done::Ingest).collect()))
            }
            Err(e) => {
                let _ = d.exec("ROLLBACK");
                Some(Err(e))
            }
        }
    }

    async fn apply_all(&mut self, ops: &[Op]) -> Result<Vec<Done>, StoreError> {
        let now = now_ms();
        let mut done = Vec::with_capacity(ops.len());
        // All ingest requests of the group share one insert pass.
        let ingest: Vec<&[NewEvent]> = ops
            .iter()
            .filter_map(|o| match o {
                Op::Ingest { events, .. } => Some(events.as_slice()),
                _ => None,
            })
            .collect();
        let mut receipts = if ingest.is_empty() {
            Vec::new()
        } else {
            insert_events(
                &mut self.conn,
                &mut self.statements,
                &self.config,
                &ingest,
                now,
            )
            .await?
        }
        .into_iter();
        for op in ops {
            let d = match op {
                Op::Ingest { .. } => Done::Ingest(receipts.next().expect("receipt per request")),
                Op::Claim { max, lease, .. } => {
                    let t = std::time::Instant::now();
                    let c = claim(&mut self.conn, *max, *lease, now).await?;
                    tracing::trace!(us = t.elapsed().as_micros() as u64, n = c.len(), "op claim");
                    Done::Claim(c)
                }
                Op::Settle { items, .. } => {
                    let t = std::time::Instant::now();
                    settle(&mut self.conn, items, now).await?;
                    tracing::trace!(
                        us = t.elapsed().as_micros() as u64,
                        n = items.len(),
                        "op settle"
                    );
                    Done::Unit
                }
                Op::Maintain {
                    retention,
                    held_budget,
                    ..
                } => Done::Maintain(
                    maintain(
                        &mut self.conn,
                        &self.config,
                        *retention,
                        *held_budget,
                        now,
                        &mut self.held_cursor,
                    )
                    .await?,
                ),
                Op::Replay { chunk, .. } => {
                    let (targets, next) = dead_targets(&mut self.conn, chunk).await?;
                    Done::Dead(replay(&mut self.conn, &targets, now).await?, next)
                }
                Op::Purge { chunk, .. } => {
                    let (targets, next) = dead_targets(&mut self.conn, chunk).await?;
                    Done::Dead(purge(&mut self.conn, &targets).await?, next)
                }
                Op::SetMeta { name, value, .. } => {
                    set_meta(&mut self.conn, name, value).await?;
                    Done::Unit
                }
                Op::NoteErrors { reports, .. } => {
                    super::recent_errors::record(&mut self.conn, reports, now).await?;
                    Done::Unit
                }
                Op::Audience { op, .. } => {
                    audience::apply(&mut self.conn, op).await?;
                    Done::Unit
                }
                // Taken out of every group before it commits (see run).
                Op::Checkpoint { .. } => Done::Unit,
            };
            done.push(d);
        }
        Ok(done)
    }
}

fn reply(op: Op, result: Result<Done, StoreError>) {
    match (op, result) {
        (Op::Ingest { reply, .. }, Ok(Done::Ingest(r))) => drop(reply.send(Ok(r))),
        (Op::Ingest { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
        (Op::Claim { reply, .. }, Ok(Done::Claim(c))) => drop(reply.send(Ok(c))),
        (Op::Claim { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
        (
            Op::Settle { reply, .. } | Op::SetMeta { reply, .. } | Op::NoteErrors { reply, .. },
            Ok(Done::Unit),
        ) => drop(reply.send(Ok(()))),
        (
            Op::Settle { reply, .. } | Op::SetMeta { reply, .. } | Op::NoteErrors { reply, .. },
            Err(e),
        ) => drop(reply.send(Err(e))),
        (Op::Audience { reply, .. } | Op::Checkpoint { reply }, Ok(Done::Unit)) => {
            drop(reply.send(Ok(())))
        }
        (Op::Audience { reply, .. } | Op::Checkpoint { reply }, Err(e)) => drop(reply.send(Err(e))),
        (Op::Maintain { reply, .. }, Ok(Done::Maintain(m))) => drop(reply.send(Ok(m))),
        (Op::Maintain { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
        (Op::Replay { reply, .. } | Op::Purge { reply, .. }, Ok(Done::Dead(n, next))) => {
            drop(reply.send(Ok((n, next))))
        }
        (Op::Replay { reply, .. } | Op::Purge { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
        _ => unreachable!("operation and result kinds always match"),
    }
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::classify(e)
}

fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(60_000)
}

async fn bump_total(conn: &mut SqliteConnection, name: &str, by: i64) -> Result<(), StoreError> {
    if by != 0 {
        sqlx::query("UPDATE totals SET value = value + ? WHERE name = ?")
            .bind(by)
            .bind(name)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}

async fn bump_minute(
    conn: &mut SqliteConnection,
    column: &str,
    now: i64,
    by: i64,
) -> Result<(), StoreError> {
    if by != 0 {
        let sql = format!(
            "INSERT INTO minute_stats (minute, {column}) VALUES (?, ?) \
             ON CONFLICT (minute) DO UPDATE SET {column} = {column} + excluded.{column}"
        );
        sqlx::query(&sql)
            .bind(minute_of(now))
            .bind(by)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}

/// Inserts the events of several requests in one pass: deduplicate by
/// (source, messageId), decide head or queued per ordering key, insert,
/// count; then update the identity map and the audience store. The first
/// part runs as direct SQLite calls under one lock of the connection (see
/// direct.rs): one hand-off per group instead of one per statement.
async fn insert_events(
    conn: &mut SqliteConnection,
    statements: &mut StatementCache,
    config: &WriterConfig,
    requests: &[&[NewEvent]],
    now: i64,
) -> Result<Vec<IngestReceipt>, StoreError> {
    let mut identities: Vec<&IdentityUpdate> = Vec::new();
    let mut audience: Vec<&NewEvent> = Vec::new();
    let receipts = {
        let mut handle = conn.lock_handle().await.map_err(db)?;
        // SAFETY: the handle stays locked until `handle` drops at the end of
        // this block, and `d` does not outlive it.
        let d = unsafe { Db::new(handle.as_raw_handle()) };
        insert_locked(
            &d,
            statements,
            config,
            requests,
            now,
            &mut identities,
            &mut audience,
        )?
    };
    for id in identities {
        apply_identity(conn, id, now).await?;
    }
    for e in audience {
        for (attr, value) in &e.audience {
            sqlx::query(
                "INSERT INTO audience_pending (user_id, attribute, value, updated_at) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (user_id, attribute) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            )
            .bind(&e.order_key)
            .bind(attr)
            .bind(value)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        }
    }
    Ok(receipts)
}

/// The SQL part of `insert_events`, with the connection locked.
fn insert_locked<'e>(
    d: &Db,
    statements: &mut StatementCache,
    config: &WriterConfig,
    requests: &[&'e [NewEvent]],
    now: i64,
    identities: &mut Vec<&'e IdentityUpdate>,
    audience: &mut Vec<&'e NewEvent>,
) -> Result<Vec<IngestReceipt>, StoreError> {
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
    // Ordering keys seen in this group: true when the key has an active
    // event (in the outbox before, or inserted just now).
    let mut active: HashMap<&str, bool> = HashMap::new();
    let mut receipts = Vec::with_capacity(requests.len());
    let (mut accepted, mut duplicates, mut filtered) = (0i64, 0i64, 0i64);
    for request in requests {
        let mut receipt = IngestReceipt::default();
        for e in request.iter() {
            // Deduplicate: the upsert "wins" (returns a row) for a new id or
            // one older than the window.
            let fresh = {
                let mut q = d.statement(
                    statements,
                    "INSERT INTO message_ids (source, message_id, seen_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (source, message_id) DO UPDATE SET seen_at = excluded.seen_at \
                     WHERE message_ids.seen_at < ?4 RETURNING 1",
                )?;
                q.text(1, &e.source)?;
                q.text(2, &e.message_id)?;
                q.int(3, now)?;
                q.int(4, cutoff)?;
                let won = q.step()? == Step::Row;
                if won {
                    q.run()?;
                }
                won
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
                         WHERE order_key = ?1 AND state IN (0, 1, 4, 5) LIMIT 1",
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
            receipt.stored += 1;
        }
        accepted += receipt.stored as i64;
        duplicates += receipt.duplicates as i64;
        filtered += receipt.filtered as i64;
        receipts.push(receipt);
    }
    for (name, by) in [
        ("accepted", accepted),
        ("duplicates", duplicates),
        ("filtered", filtered),
    ] {
        if by != 0 {
            let mut q = d.statement(
                statements,
                "UPDATE totals SET value = value + ?1 WHERE name = ?2",
            )?;
            q.int(1, by)?;
            q.text(2, name)?;
            q.run()?;
        }
    }
    if accepted != 0 {
        let mut q = d.statement(
            statements,
            "INSERT INTO minute_stats (minute, accepted) VALUES (?1, ?2) \
             ON CONFLICT (minute) DO UPDATE SET accepted = accepted + excluded.accepted",
        )?;
        q.int(1, minute_of(now))?;
        q.int(2, accepted)?;
        q.run()?;
    }
    Ok(receipts)
}

/// Updates the identity map and releases events held for the ids it now
/// knows; the release uses the ordering-key index, never a scan of held
/// events.
async fn apply_identity(
    conn: &mut SqliteConnection,
    id: &IdentityUpdate,
    now: i64,
) -> Result<(), StoreError> {
    let upsert = "INSERT INTO identities (user_id, account_id, contact_id, updated_at) VALUES (?, ?, ?, ?) \
                  ON CONFLICT (user_id) DO UPDATE SET \
                  account_id = COALESCE(excluded.account_id, identities.account_id), \
                  contact_id = COALESCE(excluded.contact_id, identities.contact_id), \
                  updated_at = excluded.updated_at";
    if id.teaches_ids() {
        sqlx::query(upsert)
            .bind(&id.user_id)
            .bind(&id.account)
            .bind(&id.contact)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    let mut aliased = Vec::new();
    if id.teaches_ids() {
        // Earlier ids aliased to this user learn what it now knows.
        aliased = sqlx::query_scalar(
            "INSERT INTO identities (user_id, account_id, contact_id, updated_at) \
             SELECT a.previous_id, i.account_id, i.contact_id, ? FROM aliases a \
             JOIN identities i ON i.user_id = a.user_id WHERE a.user_id = ? AND a.previous_id <> a.user_id \
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
        .map_err(db)?;
    }
    if let Some(prev) = &id.previous_id {
        sqlx::query(
            "INSERT INTO aliases (previous_id, user_id, created_at) VALUES (?, ?, ?) \
             ON CONFLICT (previous_id) DO UPDATE SET user_id = excluded.user_id",
        )
        .bind(prev)
        .bind(&id.user_id)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        // Alias: whichever side is known teaches the other.
        let known: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT account_id, contact_id FROM identities WHERE user_id = ?")
                .bind(&id.user_id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?;
        let (from, to) = identity::alias_teacher(&id.user_id, prev, known.is_some());
        sqlx::query(
            "INSERT INTO identities (user_id, account_id, contact_id, updated_at) \
             SELECT ?, account_id, contact_id, ? FROM identities WHERE user_id = ? \
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
        .map_err(db)?;
    }
    for key in identity::released_by(id, aliased) {
        sqlx::query(
            "UPDATE events INDEXED BY events_key SET state = 0, next_attempt_at = ? \
             WHERE order_key = ? AND state IN (0, 1, 4, 5) AND state = 4",
        )
        .bind(now)
        .bind(&key)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    Ok(())
}

async fn claim(
    conn: &mut SqliteConnection,
    max: usize,
    lease: Duration,
    now: i64,
) -> Result<Vec<ClaimedEvent>, StoreError> {
    // Leased heads stay in events_due (a claim writes only to `leases`), so
    // the scan steps over at most the pool's in-flight heads. Ids only: the
    // index covers them, and a head's row is read only if the head is used.
    let heads: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM events INDEXED BY events_due WHERE state = 0 AND next_attempt_at <= ? \
         AND id NOT IN (SELECT id FROM leases) ORDER BY next_attempt_at, id LIMIT ?",
    )
    .bind(now)
    .bind(max as i64)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    // Each head brings the events queued behind it, in order, before the
    // next head is taken: a backlogged user drains in full batches with one
    // head to promote per batch, and heads that do not fit stay pending for
    // the next claim.
    let mut ids: Vec<i64> = Vec::with_capacity(max);
    for head in heads {
        if ids.len() >= max {
            break;
        }
        ids.push(head);
        let room = max - ids.len();
        if room == 0 {
            break;
        }
        let followers: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM events INDEXED BY events_key \
             WHERE order_key = (SELECT order_key FROM events WHERE id = ?) \
             AND state IN (0, 1, 4, 5) AND state = 5 \
             AND id NOT IN (SELECT id FROM leases) ORDER BY id LIMIT ?",
        )
        .bind(head)
        .bind(room as i64)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        ids.extend(followers);
    }
    let lease_until = now + lease.as_millis() as i64;
    let json = serde_json::to_string(&ids).expect("ids serialise");
    sqlx::query("INSERT INTO leases (id, lease_until) SELECT value, ? FROM json_each(?)")
        .bind(lease_until)
        .bind(&json)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    let rows = sqlx::query(
        "SELECT id, order_key, kind, payload, attempts, accepted_at, first_attempt_at, actions \
         FROM events WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
    )
    .bind(json)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    Ok(rows
        .into_iter()
        .map(|r| ClaimedEvent {
            id: r.get(0),
            order_key: r.get(1),
            kind: r.get(2),
            payload: r.get(3),
            // This attempt counts from now; the row records it at settle.
            attempts: r.get::<i64, _>(4) + 1,
            accepted_at: r.get(5),
            first_attempt_at: r.get::<Option<i64>, _>(6).unwrap_or(now),
            lease: lease_until,
            claimed_at: now,
            actions: r.get(7),
        })
        .collect())
}

fn history_entry(now: i64, error: &str) -> String {
    serde_json::json!({ "at": crate::segment::format_timestamp(
        chrono::DateTime::from_timestamp_millis(now).unwrap_or_default()), "error": error })
    .to_string()
}

async fn settle(
    conn: &mut SqliteConnection,
    items: &[Settlement],
    now: i64,
) -> Result<(), StoreError> {
    // Only outcomes whose lease is still held count: a worker whose lease
    // expired (and whose events may have been claimed again) is ignored.
    let mut by_lease: HashMap<i64, Vec<i64>> = HashMap::new();
    for s in items {
        by_lease.entry(s.lease).or_default().push(s.id);
    }
    let mut held_lease: HashSet<i64> = HashSet::with_capacity(items.len());
    for (lease, ids) in &by_lease {
        let json = serde_json::to_string(ids).expect("ids serialise");
        let released: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM leases WHERE lease_until = ? AND id IN (SELECT value FROM json_each(?)) RETURNING id",
        )
        .bind(lease)
        .bind(json)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        held_lease.extend(released);
    }
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
    let mut delivered = 0i64;
    for chunk in delivered_ids.chunks(5000) {
        let json = serde_json::to_string(chunk).expect("pairs serialise");
        let r = sqlx::query(
            "UPDATE events SET state = 2, finished_at = ?, attempts = attempts + 1, first_attempt_at = t.first \
             FROM (SELECT value ->> 0 AS id, value ->> 1 AS first FROM json_each(?)) AS t \
             WHERE events.id = t.id",
        )
        .bind(now)
        .bind(json)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        delivered += r.rows_affected() as i64;
    }
    let keys: HashSet<&str> = items.iter().map(|s| s.order_key.as_str()).collect();
    promote(conn, keys.into_iter(), now).await?;
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
    super::recent_errors::record(conn, &reports, now).await?;
    Ok(())
}

/// Counts one event under its (error, outcome) for the recent-errors ring.
fn note_error(reports: &mut Vec<(String, &'static str, i64)>, error: &str, outcome: &'static str) {
    match reports
        .iter_mut()
        .find(|(e, o, _)| e == error && *o == outcome)
    {
        Some(r) => r.2 += 1,
        None => reports.push((error.to_string(), outcome, 1)),
    }
}

/// Makes the earliest queued event of each key the head when the key has
/// no head left (its events were delivered or died).
async fn promote<'a>(
    conn: &mut SqliteConnection,
    keys: impl Iterator<Item = &'a str>,
    now: i64,
) -> Result<(), StoreError> {
    let keys: Vec<&str> = keys.collect();
    for chunk in keys.chunks(2000) {
        let json = serde_json::to_string(chunk).expect("strings serialise");
        // Both probes go through the partial index events_key: O(keys),
        // whatever the backlog.
        sqlx::query(
            "UPDATE events SET state = 0, next_attempt_at = ? WHERE id IN ( \
               SELECT (SELECT e.id FROM events e INDEXED BY events_key \
                       WHERE e.order_key = j.value AND e.state IN (0, 1, 4, 5) AND e.state = 5 ORDER BY e.id LIMIT 1) \
               FROM json_each(?) j \
               WHERE NOT EXISTS (SELECT 1 FROM events x INDEXED BY events_key \
                 WHERE x.order_key = j.value AND x.state IN (0, 1, 4, 5) AND x.state IN (0, 1, 4)))",
        )
        .bind(now)
        .bind(json)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    Ok(())
}

/// Returns in-flight events whose lease ended before `before` to the queue:
/// the earliest of each key as head, the rest queued behind it.
async fn release_leases(conn: &mut SqliteConnection, before: i64) -> Result<u64, StoreError> {
    // A leased event kept its state (head or queued), so dropping the lease
    // is all it takes to make it claimable again.
    let r = sqlx::query("DELETE FROM leases WHERE lease_until < ?")
        .bind(before)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(r.rows_affected())
}

/// Held heads looked at per maintenance pass.
const HELD_PAGE: i64 = 500;

/// The safety net under the identify's release and the settle's re-check:
/// held heads whose user now has both ids in the identity map (so they
/// resolve for certain) are made due again. Walks the held index a page per
/// pass from `cursor`, wrapping at the end, so a pass costs the same however
/// many events are held.
async fn release_resolvable_held(
    conn: &mut SqliteConnection,
    cursor: &mut i64,
    now: i64,
) -> Result<u64, StoreError> {
    let page: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM events INDEXED BY events_held WHERE state = 4 AND id > ? ORDER BY id LIMIT ?",
    )
    .bind(*cursor)
    .bind(HELD_PAGE)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    *cursor = match page.last() {
        Some(last) if page.len() as i64 == HELD_PAGE => *last,
        _ => 0,
    };
    if page.is_empty() {
        return Ok(0);
    }
    let r = sqlx::query(
        "UPDATE events SET state = 0, next_attempt_at = ? \
         WHERE id IN (SELECT value FROM json_each(?)) AND state = 4 \
         AND EXISTS (SELECT 1 FROM identities i WHERE i.user_id = events.order_key \
                     AND i.account_id IS NOT NULL AND i.contact_id IS NOT NULL)",
    )
    .bind(now)
    .bind(serde_json::to_string(&page).expect("ids serialise"))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(r.rows_affected())
}

async fn maintain(
    conn: &mut SqliteConnection,
    config: &WriterConfig,
    retention: Duration,
    held_budget: Duration,
    now: i64,
    held_cursor: &mut i64,
) -> Result<MaintenanceReport, StoreError> {
    let mut report = MaintenanceReport {
        leases_released: release_leases(conn, now).await?,
        held_released: release_resolvable_held(conn, held_cursor, now).await?,
        ..Default::default()
    };
    let expired: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, order_key FROM events INDEXED BY events_held WHERE state = 4 AND COALESCE(first_attempt_at, accepted_at) < ? LIMIT 1000",
    )
    .bind(now - held_budget.as_millis() as i64)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    for (id, _) in &expired {
        sqlx::query(
            "UPDATE events SET state = 3, finished_at = ?, reason = 'unresolved identity', \
             last_error = 'unresolved identity' WHERE id = ? AND state = 4",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    report.held_expired = expired.len() as u64;
    if !expired.is_empty() {
        let reports = [(
            "unresolved identity".to_string(),
            "dead",
            expired.len() as i64,
        )];
        super::recent_errors::record(conn, &reports, now).await?;
    }
    promote(conn, expired.iter().map(|(_, k)| k.as_str()), now).await?;

    let r = sqlx::query(
        "DELETE FROM events WHERE id IN (SELECT id FROM events INDEXED BY events_finished \
         WHERE state = 2 AND finished_at < ? LIMIT 10000)",
    )
    .bind(now - retention.as_millis() as i64)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    report.pruned_events = r.rows_affected();
    let pruned = sqlx::query(
        "DELETE FROM message_ids WHERE (source, message_id) IN \
         (SELECT source, message_id FROM message_ids WHERE seen_at < ? LIMIT 10000)",
    )
    .bind(now - config.dedup_window.as_millis() as i64)
    .execute(&mut *conn)
    .await
    .map_err(db)?
    .rows_affected();
    report.pruned_message_ids = pruned;
    sqlx::query("DELETE FROM minute_stats WHERE minute < ?")
        .bind(minute_of(now) - 180)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    // Give free pages back once there are enough to matter; a few stay for
    // the next inserts.
    let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    if free > 256 {
        sqlx::query("PRAGMA incremental_vacuum(4096)")
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        let left: i64 = sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
        report.pages_vacuumed = (free - left).max(0) as u64;
    }
    Ok(report)
}

/// Which dead-letter operation a chunk belongs to.
#[derive(Debug, Clone, Copy)]
enum DeadAction {
    Replay,
    Purge,
}

/// The dead letters (id, ordering key) one chunk acts on, and the id to
/// continue after when the chunk was full (more may match).
async fn dead_targets(
    conn: &mut SqliteConnection,
    chunk: &DeadChunk,
) -> Result<(Vec<(i64, String)>, Option<i64>), StoreError> {
    match chunk {
        DeadChunk::Ids(ids) => {
            let json = serde_json::to_string(ids).expect("ids serialise");
            let targets = sqlx::query_as(
                "SELECT id, order_key FROM events WHERE state = 3 AND id IN (SELECT value FROM json_each(?)) ORDER BY id",
            )
            .bind(json)
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
            Ok((targets, None))
        }
        DeadChunk::Next { filter, after } => {
            let sql = format!("SELECT id, order_key {}", super::read::DEAD_FILTER);
            let targets: Vec<(i64, String)> = sqlx::query_as_with(
                &sql,
                super::read::filter_args(filter, *after, DEAD_CHUNK as i64),
            )
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
            let next = (targets.len() == DEAD_CHUNK)
                .then(|| targets.last().map(|t| t.0))
                .flatten();
            Ok((targets, next))
        }
    }
}

async fn replay(
    conn: &mut SqliteConnection,
    targets: &[(i64, String)],
    now: i64,
) -> Result<u64, StoreError> {
    // Replayed events go back as queued with a fresh budget and a fresh
    // backoff (their history keeps the earlier attempts); promotion then
    // makes the earliest of each idle key its head, so order holds.
    for (id, _) in targets {
        sqlx::query(
            "UPDATE events SET state = 5, next_attempt_at = ?, first_attempt_at = NULL, reason = NULL, \
             finished_at = NULL, attempts = 0 WHERE id = ? AND state = 3",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    promote(conn, targets.iter().map(|(_, k)| k.as_str()), now).await?;
    Ok(targets.len() as u64)
}

async fn purge(conn: &mut SqliteConnection, targets: &[(i64, String)]) -> Result<u64, StoreError> {
    let ids: Vec<i64> = targets.iter().map(|t| t.0).collect();
    let json = serde_json::to_string(&ids).expect("ids serialise");
    let r = sqlx::query(
        "DELETE FROM events WHERE state = 3 AND id IN (SELECT value FROM json_each(?))",
    )
    .bind(json)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(r.rows_affected())
}
