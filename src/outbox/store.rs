//! The storage contract: everything ingest, delivery, the sync lane, the
//! operator endpoints and the CLI ask of the outbox, in terms that name no
//! engine. Each backend implements these traits on its own types; the
//! [`Outbox`](super::Outbox) and [`OutboxReader`](super::OutboxReader)
//! enums pick the backend with a `match`, so the hot paths pay no boxed
//! future and no virtual call for the boundary.

use super::{
    AudienceOp, ClaimedEvent, DeadLetter, DeadListFilter, DeadSelection, IngestReceipt,
    MaintenanceReport, NewEvent, OutboxStatus, PendingUpdate, Settlement, StoreError,
};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

pub use crate::identity::KnownIds;

/// An (account, contact, attribute) key of the audience store.
pub type AudienceKey = (String, String, String);

/// The reads, which never wait for writes: what `status` and the `dead`
/// commands need offline, and what delivery and the sync lane look up.
pub trait OutboxReads: Send + Sync {
    /// Whether the database answers at all (for `/readyz`).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// All status figures from one snapshot, at a cost that does not grow
    /// with the backlog.
    fn status(&self) -> impl Future<Output = Result<OutboxStatus, StoreError>> + Send;

    /// The identity map's entries for these users (absent when unknown).
    fn identities(
        &self,
        users: &[&str],
    ) -> impl Future<Output = Result<HashMap<String, KnownIds>, StoreError>> + Send;

    /// Dead letters, oldest first, filtered, from `after_id` on.
    fn dead_list(
        &self,
        filter: &DeadListFilter,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, StoreError>> + Send;

    /// A page of dead letters and the id to continue after (`None` on the
    /// last page). One row more than the page is read to know whether
    /// another follows, so a client never asks for an empty page; the same
    /// on every backend, so written once here over [`OutboxReads::dead_list`].
    fn dead_page(
        &self,
        filter: &DeadListFilter,
    ) -> impl Future<Output = Result<(Vec<DeadLetter>, Option<i64>), StoreError>> + Send {
        async move {
            let limit = if filter.limit <= 0 { 100 } else { filter.limit };
            let mut items = self
                .dead_list(&DeadListFilter {
                    limit: limit + 1,
                    ..filter.clone()
                })
                .await?;
            let next = if items.len() as i64 > limit {
                items.truncate(limit as usize);
                items.last().map(|d| d.id)
            } else {
                None
            };
            Ok((items, next))
        }
    }

    /// One dead letter with its history and payload.
    fn dead_show(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Option<DeadLetter>, StoreError>> + Send;

    /// Checks an explicit replay or purge selection, all or nothing:
    /// `Ok(ids)` when every id is a dead letter now, else `Err(reason)`.
    fn dead_selection(
        &self,
        ids: &[i64],
    ) -> impl Future<Output = Result<Result<Vec<i64>, String>, StoreError>> + Send;

    /// When the sync lane's next window is due (ms), as last planned.
    fn sync_next_run_at(&self) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// The next `limit` users with pending audience updates after `after`,
    /// in key order (a window walks them in pages).
    fn audience_users_after(
        &self,
        after: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// The pending audience updates of these users written at or before `cut`.
    fn audience_pending_for(
        &self,
        users: &[String],
        cut: i64,
    ) -> impl Future<Output = Result<Vec<PendingUpdate>, StoreError>> + Send;

    /// The values ChurnZero last accepted for these keys; absent when never.
    fn audience_delivered_values(
        &self,
        keys: &[AudienceKey],
    ) -> impl Future<Output = Result<HashMap<AudienceKey, String>, StoreError>> + Send;
}

/// The writes. Every one returns only after its transaction committed, so
/// an answer always means "durable".
pub trait OutboxStore: OutboxReads {
    /// Woken after a commit that stored new events, so idle delivery wakes
    /// without polling.
    fn stored_signal(&self) -> Arc<Notify>;

    /// Stores a request's events (deduplicated per source, identity and
    /// audience updates applied) in one transaction.
    fn ingest(
        &self,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<IngestReceipt, StoreError>> + Send;

    /// Claims up to `max` due events under a lease: heads of their keys,
    /// at most one in flight per key.
    fn claim(
        &self,
        max: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<ClaimedEvent>, StoreError>> + Send;

    /// Records attempts' outcomes, atomically for the batch; an outcome
    /// whose lease is no longer held changes nothing.
    fn settle(&self, items: Vec<Settlement>)
    -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Expired leases back, held events past their budget dead, delivered
    /// events past retention and old message ids pruned.
    fn maintain(
        &self,
        retention: Duration,
        held_budget: Duration,
    ) -> impl Future<Output = Result<MaintenanceReport, StoreError>> + Send;

    /// Dead events back into delivery (all of them with `None`).
    fn replay(&self, ids: Option<Vec<i64>>)
    -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Deletes dead events (all of them with `None`).
    fn purge(&self, ids: Option<Vec<i64>>) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Replays what an operator selected.
    fn replay_selected(
        &self,
        which: DeadSelection,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Purges what an operator selected.
    fn purge_selected(
        &self,
        which: DeadSelection,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Records a step of the audience sync lane in one transaction.
    fn audience(&self, op: AudienceOp) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Adds `(error, outcome, events)` reports to the recent-errors ring.
    fn note_errors(
        &self,
        reports: Vec<(String, &'static str, i64)>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Called at shutdown after the last write, so that the next start has
    /// nothing to read back; a backend with nothing to fold does nothing.
    fn checkpoint(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
