//! The audience sync lane's records: pending updates written by ingest,
//! values ChurnZero accepted, and the steps a window records. Shared by
//! every backend.

/// One pending audience update, as ingest stored it: the attribute is the
/// full `attr_<Field>` key and the value is JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpdate {
    pub user_id: String,
    pub attribute: String,
    pub value: String,
    pub updated_at: i64,
}

/// A value ChurnZero accepted for a contact, remembered so the same value
/// is not sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredValue {
    pub account: String,
    pub contact: String,
    pub attribute: String,
    pub value: String,
}

/// What the sync lane records about one step of a window.
#[derive(Debug, Clone, Default)]
pub struct AudienceSettlement {
    /// Set on a window's first step with work: this step starts a new "last
    /// run" (its time, counters reset) in the same transaction.
    pub run_started_at: Option<i64>,
    /// Pending rows this step used up. Each is deleted only if it still
    /// holds the value that was read: an update that arrived meanwhile stays
    /// pending for the next window.
    pub consumed: Vec<PendingUpdate>,
    /// Values ChurnZero accepted.
    pub delivered: Vec<DeliveredValue>,
    /// Attribute values sent (added to `sync_last_run_sent`).
    pub sent: i64,
    /// Attribute values not sent because ChurnZero already has them (added
    /// to `sync_last_run_skipped`).
    pub skipped: i64,
    /// A failure to show as the outbox's `last_error`.
    pub error: Option<String>,
}

/// The sync lane's writes; each is applied in one writer transaction.
#[derive(Debug, Clone)]
pub enum AudienceOp {
    /// Publishes when the next window is due.
    Schedule { next_run_at: i64 },
    /// Progress within a window.
    Settle(AudienceSettlement),
}
