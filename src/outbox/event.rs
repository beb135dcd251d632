//! What flows through the outbox on the hot paths: events going in, claims
//! going out to delivery, and the outcomes coming back. Shared by every
//! backend.

use super::DeadListFilter;
use crate::identity::IdentityUpdate;
use std::time::Duration;

/// Dead letters one replay or purge transaction touches at most. A replay
/// or purge of every dead letter is a series of such transactions, each its
/// own turn of the writer, so ingest commits between them instead of
/// waiting for the whole set (and memory holds one chunk of ids, not all).
pub const DEAD_CHUNK: usize = 500;

/// Settings the writer needs that come from `serve`.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub dedup_window: Duration,
    pub max_backlog: u64,
    pub release_leases_at_start: bool,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            dedup_window: Duration::from_secs(24 * 3600),
            max_backlog: 10_000_000,
            release_leases_at_start: true,
        }
    }
}

/// One validated event on its way into the outbox.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Hash of the write key: deduplication is per source.
    pub source: String,
    pub message_id: String,
    pub kind: &'static str,
    pub order_key: String,
    pub payload: String,
    /// False: acknowledged and counted as filtered, not stored for delivery.
    pub forward: bool,
    pub identity: Option<IdentityUpdate>,
    /// Audience trait updates for the sync lane: (attribute, JSON value).
    pub audience: Vec<(String, String)>,
}

/// What happened to a request's events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReceipt {
    pub stored: usize,
    pub duplicates: usize,
    pub filtered: usize,
}

/// An event handed to a delivery worker under a lease.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    pub id: i64,
    pub order_key: String,
    pub kind: String,
    pub payload: String,
    pub attempts: i64,
    pub accepted_at: i64,
    pub first_attempt_at: i64,
    /// The lease this claim holds; settling checks it, so a worker whose
    /// lease expired and was re-claimed cannot overwrite the new owner.
    pub lease: i64,
    /// When the claim was made (ms): identity-map changes from this moment
    /// on may have been missed by the worker, so a hold is re-checked
    /// against them when it is written.
    pub claimed_at: i64,
    /// The actions of an earlier attempt (JSON array): sent again as they
    /// are, so every attempt carries the same ids and mapping.
    pub actions: Option<String>,
}

/// The end of one delivery attempt for one event.
#[derive(Debug, Clone)]
pub enum SettleOutcome {
    Delivered,
    /// Try again at `at` (ms). The writer makes the earliest event of each
    /// ordering key the head again and queues the rest behind it.
    Retry {
        at: i64,
        error: String,
    },
    Dead {
        reason: String,
    },
    /// Ids unknown: wait for an identify. `map_as_of` is when the worker's
    /// view of the identity map was taken (its claim's `claimed_at`): if the
    /// user's ids changed since, the event is due again at once instead of
    /// held, as the identify's own release may have run before this hold.
    Held {
        error: String,
        map_as_of: i64,
    },
    /// Claimed but never sent (shutdown): due again at once, and neither the
    /// attempt nor a failure is counted.
    Release,
}

#[derive(Debug, Clone)]
pub struct Settlement {
    pub id: i64,
    pub lease: i64,
    pub order_key: String,
    /// From the claim: recorded with the attempt's outcome, so that a claim
    /// itself writes nothing to the event's row.
    pub first_attempt_at: i64,
    pub outcome: SettleOutcome,
    /// The actions this attempt resolved the event to, when it had none
    /// stored: kept with a retry, a release or a dead letter (never
    /// overwriting earlier ones), so later attempts send the same bytes.
    pub actions: Option<String>,
}

/// Figures reported by a maintenance pass.
#[derive(Debug, Clone, Default)]
pub struct MaintenanceReport {
    pub pages_vacuumed: u64,
    pub leases_released: u64,
    pub held_expired: u64,
    /// Held heads whose user's ids are both in the identity map now.
    pub held_released: u64,
    pub pruned_events: u64,
    pub pruned_message_ids: u64,
    /// A prune stopped at its batch size: more is due now, and the next
    /// pass should not wait a whole interval (so pruning keeps up with any
    /// delivery rate).
    pub more_to_prune: bool,
}

/// The dead letters a replay or purge acts on: explicit ids (checked
/// beforehand), or whatever matches a filter when each chunk runs (the
/// default filter: every dead letter).
#[derive(Debug, Clone)]
pub enum DeadSelection {
    Ids(Vec<i64>),
    Matching(DeadListFilter),
}
