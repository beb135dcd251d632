//! The storage contract on SQLite: reads go to the reader pool, writes to
//! the writer task.

use super::{Reader, SqliteOutbox};
use crate::outbox::store::{AudienceKey, KnownIds, OutboxReads, OutboxStore};
use crate::outbox::{
    AudienceOp, ClaimedEvent, DeadLetter, DeadListFilter, DeadSelection, IngestReceipt,
    MaintenanceReport, NewEvent, OutboxStatus, PendingUpdate, Settlement, StoreError,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

impl OutboxReads for Reader {
    async fn ping(&self) -> Result<(), StoreError> {
        Reader::ping(self).await
    }
    async fn status(&self) -> Result<OutboxStatus, StoreError> {
        Reader::status(self).await
    }
    async fn identities(&self, users: &[&str]) -> Result<HashMap<String, KnownIds>, StoreError> {
        Reader::identities(self, users).await
    }
    async fn dead_list(&self, filter: &DeadListFilter) -> Result<Vec<DeadLetter>, StoreError> {
        Reader::dead_list(self, filter).await
    }
    async fn dead_show(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        Reader::dead_show(self, id).await
    }
    async fn dead_selection(&self, ids: &[i64]) -> Result<Result<Vec<i64>, String>, StoreError> {
        Reader::dead_selection(self, ids).await
    }
    async fn sync_next_run_at(&self) -> Result<Option<i64>, StoreError> {
        Reader::sync_next_run_at(self).await
    }
    async fn audience_users_after(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        Reader::audience_users_after(self, after, limit).await
    }
    async fn audience_pending_for(
        &self,
        users: &[String],
        cut: i64,
    ) -> Result<Vec<PendingUpdate>, StoreError> {
        Reader::audience_pending_for(self, users, cut).await
    }
    async fn audience_delivered_values(
        &self,
        keys: &[AudienceKey],
    ) -> Result<HashMap<AudienceKey, String>, StoreError> {
        Reader::audience_delivered_values(self, keys).await
    }
}

impl OutboxReads for SqliteOutbox {
    async fn ping(&self) -> Result<(), StoreError> {
        self.reader.ping().await
    }
    async fn status(&self) -> Result<OutboxStatus, StoreError> {
        self.reader.status().await
    }
    async fn identities(&self, users: &[&str]) -> Result<HashMap<String, KnownIds>, StoreError> {
        self.reader.identities(users).await
    }
    async fn dead_list(&self, filter: &DeadListFilter) -> Result<Vec<DeadLetter>, StoreError> {
        self.reader.dead_list(filter).await
    }
    async fn dead_show(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        self.reader.dead_show(id).await
    }
    async fn dead_selection(&self, ids: &[i64]) -> Result<Result<Vec<i64>, String>, StoreError> {
        self.reader.dead_selection(ids).await
    }
    async fn sync_next_run_at(&self) -> Result<Option<i64>, StoreError> {
        self.reader.sync_next_run_at().await
    }
    async fn audience_users_after(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.reader.audience_users_after(after, limit).await
    }
    async fn audience_pending_for(
        &self,
        users: &[String],
        cut: i64,
    ) -> Result<Vec<PendingUpdate>, StoreError> {
        self.reader.audience_pending_for(users, cut).await
    }
    async fn audience_delivered_values(
        &self,
        keys: &[AudienceKey],
    ) -> Result<HashMap<AudienceKey, String>, StoreError> {
        self.reader.audience_delivered_values(keys).await
    }
}

impl OutboxStore for SqliteOutbox {
    fn stored_signal(&self) -> Arc<Notify> {
        self.writer.stored.clone()
    }
    async fn ingest(&self, events: Vec<NewEvent>) -> Result<IngestReceipt, StoreError> {
        self.writer.ingest(events).await
    }
    async fn claim(&self, max: usize, lease: Duration) -> Result<Vec<ClaimedEvent>, StoreError> {
        self.writer.claim(max, lease).await
    }
    async fn settle(&self, items: Vec<Settlement>) -> Result<(), StoreError> {
        self.writer.settle(items).await
    }
    async fn maintain(
        &self,
        retention: Duration,
        held_budget: Duration,
    ) -> Result<MaintenanceReport, StoreError> {
        self.writer.maintain(retention, held_budget).await
    }
    async fn replay(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        self.writer.replay(ids).await
    }
    async fn purge(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        self.writer.purge(ids).await
    }
    async fn replay_selected(&self, which: DeadSelection) -> Result<u64, StoreError> {
        self.writer.replay_selected(which).await
    }
    async fn purge_selected(&self, which: DeadSelection) -> Result<u64, StoreError> {
        self.writer.purge_selected(which).await
    }
    async fn audience(&self, op: AudienceOp) -> Result<(), StoreError> {
        self.writer.audience(op).await
    }
    async fn note_errors(
        &self,
        reports: Vec<(String, &'static str, i64)>,
    ) -> Result<(), StoreError> {
        self.writer.note_errors(reports).await
    }
    async fn checkpoint(&self) -> Result<(), StoreError> {
        self.writer.checkpoint().await
    }
}
