//! The storage contract on PostgreSQL: reads straight from the pool (any
//! instance may read while others write), writes through [`PgOutbox`].
//! Replays and purges of many dead letters run a chunk per transaction,
//! like the SQLite writer, so no transaction grows with the dead-letter
//! queue and ingest never waits behind one.

use super::{PgOutbox, audience, maintain, pg_error, read};
use crate::outbox::store::{AudienceKey, KnownIds, OutboxReads, OutboxStore};
use crate::outbox::{
    AudienceOp, ClaimedEvent, DEAD_CHUNK, DeadLetter, DeadListFilter, DeadSelection, IngestReceipt,
    MaintenanceReport, NewEvent, OutboxStatus, PendingUpdate, Settlement, StoreError, now_ms,
};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The read side alone, for the offline commands: a small pool, no
/// instance registered, no migration run (a server of another version may
/// be serving this database).
#[derive(Clone)]
pub struct PgReader {
    pool: PgPool,
}

impl PgReader {
    /// Connects for reading; refuses a database that has no outbox schema
    /// yet instead of creating one.
    pub async fn connect(url: &str) -> Result<PgReader, StoreError> {
        let opts = PgConnectOptions::from_str(url).map_err(StoreError::Database)?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts)
            .await
            .map_err(pg_error)?;
        let has_schema: bool = sqlx::query_scalar("SELECT to_regclass('events') IS NOT NULL")
            .fetch_one(&pool)
            .await
            .map_err(pg_error)?;
        if !has_schema {
            return Err(StoreError::NotAnOutbox(
                "this PostgreSQL database holds no outbox yet (start `serve` on it first)".into(),
            ));
        }
        Ok(PgReader { pool })
    }

    pub(super) fn from_pool(pool: PgPool) -> PgReader {
        PgReader { pool }
    }
}

impl OutboxReads for PgReader {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(pg_error)?;
        Ok(())
    }
    async fn status(&self) -> Result<OutboxStatus, StoreError> {
        read::status(&self.pool).await
    }
    async fn identities(&self, users: &[&str]) -> Result<HashMap<String, KnownIds>, StoreError> {
        read::identities(&self.pool, users).await
    }
    async fn dead_list(&self, filter: &DeadListFilter) -> Result<Vec<DeadLetter>, StoreError> {
        read::dead_list(&self.pool, filter).await
    }
    async fn dead_show(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        read::dead_show(&self.pool, id).await
    }
    async fn dead_selection(&self, ids: &[i64]) -> Result<Result<Vec<i64>, String>, StoreError> {
        read::dead_selection(&self.pool, ids).await
    }
    async fn sync_next_run_at(&self) -> Result<Option<i64>, StoreError> {
        audience::sync_next_run_at(&self.pool).await
    }
    async fn audience_users_after(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        audience::users_after(&self.pool, after, limit).await
    }
    async fn audience_pending_for(
        &self,
        users: &[String],
        cut: i64,
    ) -> Result<Vec<PendingUpdate>, StoreError> {
        audience::pending_for(&self.pool, users, cut).await
    }
    async fn audience_delivered_values(
        &self,
        keys: &[AudienceKey],
    ) -> Result<HashMap<AudienceKey, String>, StoreError> {
        audience::delivered_values(&self.pool, keys).await
    }
}

impl OutboxReads for PgOutbox {
    async fn ping(&self) -> Result<(), StoreError> {
        PgOutbox::ping(self).await
    }
    async fn status(&self) -> Result<OutboxStatus, StoreError> {
        PgOutbox::status(self).await
    }
    async fn identities(&self, users: &[&str]) -> Result<HashMap<String, KnownIds>, StoreError> {
        read::identities(self.pool(), users).await
    }
    async fn dead_list(&self, filter: &DeadListFilter) -> Result<Vec<DeadLetter>, StoreError> {
        read::dead_list(self.pool(), filter).await
    }
    async fn dead_show(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        read::dead_show(self.pool(), id).await
    }
    async fn dead_selection(&self, ids: &[i64]) -> Result<Result<Vec<i64>, String>, StoreError> {
        read::dead_selection(self.pool(), ids).await
    }
    async fn sync_next_run_at(&self) -> Result<Option<i64>, StoreError> {
        audience::sync_next_run_at(self.pool()).await
    }
    async fn audience_users_after(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        audience::users_after(self.pool(), after, limit).await
    }
    async fn audience_pending_for(
        &self,
        users: &[String],
        cut: i64,
    ) -> Result<Vec<PendingUpdate>, StoreError> {
        audience::pending_for(self.pool(), users, cut).await
    }
    async fn audience_delivered_values(
        &self,
        keys: &[AudienceKey],
    ) -> Result<HashMap<AudienceKey, String>, StoreError> {
        audience::delivered_values(self.pool(), keys).await
    }
}

/// What a chunked dead-letter operation does to one chunk of ids.
#[derive(Clone, Copy)]
enum DeadAction {
    Replay,
    Purge,
}

impl PgOutbox {
    async fn dead_chunk(&self, action: DeadAction, ids: &[i64]) -> Result<u64, StoreError> {
        match action {
            DeadAction::Replay => {
                let pool = self.pool();
                super::with_retry(|| maintain::replay(pool, Some(ids))).await
            }
            DeadAction::Purge => maintain::purge(self.pool(), Some(ids)).await,
        }
    }

    /// Explicit ids, a chunk per transaction.
    async fn dead_by_ids(&self, action: DeadAction, ids: &[i64]) -> Result<u64, StoreError> {
        let mut done = 0;
        for chunk in ids.chunks(DEAD_CHUNK) {
            done += self.dead_chunk(action, chunk).await?;
        }
        Ok(done)
    }

    /// Whatever matches the filter when each chunk is read, walking ids
    /// upwards so a chunk never sees the same dead letter twice.
    async fn dead_matching(
        &self,
        action: DeadAction,
        filter: &DeadListFilter,
    ) -> Result<u64, StoreError> {
        let mut after = 0i64;
        let mut done = 0;
        loop {
            let ids = read::dead_ids_after(self.pool(), filter, after, DEAD_CHUNK as i64).await?;
            let Some(&last) = ids.last() else {
                return Ok(done);
            };
            done += self.dead_chunk(action, &ids).await?;
            if ids.len() < DEAD_CHUNK {
                return Ok(done);
            }
            after = last;
        }
    }
}

impl OutboxStore for PgOutbox {
    fn stored_signal(&self) -> Arc<Notify> {
        self.stored()
    }
    async fn ingest(&self, events: Vec<NewEvent>) -> Result<IngestReceipt, StoreError> {
        PgOutbox::ingest(self, events).await
    }
    async fn claim(&self, max: usize, lease: Duration) -> Result<Vec<ClaimedEvent>, StoreError> {
        PgOutbox::claim(self, max, lease).await
    }
    async fn settle(&self, items: Vec<Settlement>) -> Result<(), StoreError> {
        PgOutbox::settle(self, items).await
    }
    async fn maintain(
        &self,
        retention: Duration,
        held_budget: Duration,
    ) -> Result<MaintenanceReport, StoreError> {
        // Another instance holding the maintenance lock did this round.
        Ok(PgOutbox::maintain(self, retention, held_budget)
            .await?
            .unwrap_or_default())
    }
    async fn replay(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        match ids {
            Some(ids) => self.dead_by_ids(DeadAction::Replay, &ids).await,
            None => {
                self.dead_matching(DeadAction::Replay, &DeadListFilter::default())
                    .await
            }
        }
    }
    async fn purge(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        match ids {
            Some(ids) => self.dead_by_ids(DeadAction::Purge, &ids).await,
            None => {
                self.dead_matching(DeadAction::Purge, &DeadListFilter::default())
                    .await
            }
        }
    }
    async fn replay_selected(&self, which: DeadSelection) -> Result<u64, StoreError> {
        match which {
            DeadSelection::Ids(ids) => self.dead_by_ids(DeadAction::Replay, &ids).await,
            DeadSelection::Matching(f) => self.dead_matching(DeadAction::Replay, &f).await,
        }
    }
    async fn purge_selected(&self, which: DeadSelection) -> Result<u64, StoreError> {
        match which {
            DeadSelection::Ids(ids) => self.dead_by_ids(DeadAction::Purge, &ids).await,
            DeadSelection::Matching(f) => self.dead_matching(DeadAction::Purge, &f).await,
        }
    }
    async fn audience(&self, op: AudienceOp) -> Result<(), StoreError> {
        PgOutbox::audience(self, op).await
    }
    async fn note_errors(
        &self,
        reports: Vec<(String, &'static str, i64)>,
    ) -> Result<(), StoreError> {
        if reports.is_empty() {
            return Ok(());
        }
        let borrowed: Vec<(&str, &'static str, i64)> = reports
            .iter()
            .map(|(e, o, n)| (e.as_str(), *o, *n))
            .collect();
        let mut tx = self.pool().begin().await.map_err(pg_error)?;
        super::delivery::record_errors(&mut tx, self.instance_id(), &borrowed, now_ms()).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(())
    }
    async fn checkpoint(&self) -> Result<(), StoreError> {
        // Nothing to fold on PostgreSQL; leaving the cluster instead hands
        // anything still leased to the other instances at once.
        self.leave().await
    }
}
