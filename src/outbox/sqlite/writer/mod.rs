//! The single writer task. Every change to the outbox goes through it:
//! ingest inserts, delivery claims and settlements, maintenance and operator
//! actions. It drains whatever is queued into one `BEGIN IMMEDIATE`
//! transaction (group commit) and answers each request only after the
//! commit, so an acknowledgement always means "on disk".
//!
//! This file is the handle the rest of the outbox calls (one request type
//! per operation); the task's loop is in task.rs, and what each operation
//! does inside the transaction in ingest.rs, delivery.rs (claim and
//! settle), maintenance.rs and dead.rs, with the status counters they all
//! keep in counters.rs.

use super::audience;
use super::direct::{Db, Statement, StatementCache, Step};
use super::reserve::Reserve;
use super::{EventState, LEASES_ROW, StoreError, now_ms, set_meta};
use crate::identity;
use crate::outbox::{
    AudienceOp, ClaimedEvent, DEAD_CHUNK, DeadListFilter, DeadSelection, IdentityUpdate,
    IngestReceipt, MaintenanceReport, NewEvent, SettleOutcome, Settlement, WriterConfig,
};
use sqlx::SqliteConnection;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};

mod counters;
mod dead;
mod delivery;
mod ingest;
mod maintenance;
mod task;

use counters::*;
use dead::*;
use delivery::*;
use ingest::*;
use maintenance::*;
use task::*;

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
