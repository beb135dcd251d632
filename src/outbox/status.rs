//! What operators read from the outbox: status figures and dead letters.
//! Shared by every backend.

use super::RecentError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;

/// A time in ms since the epoch as every status field writes it.
pub(crate) fn ms_to_rfc3339(ms: i64) -> String {
    crate::segment::format_timestamp(
        chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default(),
    )
}

/// The chart's series from `since` to `this_minute` (minute numbers), one
/// entry per minute, zeros where a backend stored no row.
pub(crate) fn per_minute_series(
    since: i64,
    this_minute: i64,
    rows: &HashMap<i64, (i64, i64, i64)>,
) -> Vec<MinuteStat> {
    (since..=this_minute)
        .map(|m| {
            let (accepted, delivered, failed) = rows.get(&m).copied().unwrap_or_default();
            MinuteStat {
                minute: ms_to_rfc3339(m * 60_000),
                accepted,
                delivered,
                failed,
            }
        })
        .collect()
}

/// The sync lane's schedule and backlog.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct SyncStatus {
    pub last_run_at: Option<String>,
    pub next_run_at: Option<String>,
    pub pending_contacts: i64,
    pub last_run_sent: i64,
    pub last_run_skipped: i64,
}

/// One minute of activity, for the status page's chart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MinuteStat {
    /// Start of the minute (RFC 3339).
    pub minute: String,
    /// Events stored by ingest.
    pub accepted: i64,
    /// Events settled as delivered.
    pub delivered: i64,
    /// Failed attempts: events set to retry or dead.
    pub failed: i64,
}

/// Minutes in `per_minute`: the last hour, the current minute included.
pub const PER_MINUTE_WINDOW: i64 = 60;

/// The fields of `GET /status` and `status --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutboxStatus {
    /// When these figures were read (RFC 3339), so a client can age them.
    pub generated_at: String,
    /// Waiting for delivery: due now, waiting for a retry, or queued behind
    /// their user's earlier events, but not behind a held one (those count
    /// in `held`).
    pub pending: i64,
    pub in_flight: i64,
    /// Delivered since the database was created (pruning keeps this).
    pub delivered: i64,
    pub dead: i64,
    /// Waiting for identity resolution: held events, and the events of
    /// the same users queued behind them (none can be sent before them).
    pub held: i64,
    /// How many of `held` are queued behind a held event of their user.
    pub held_queued: i64,
    /// Age of the oldest event waiting for delivery (pending or in flight;
    /// held ones, and those queued behind them, are counted apart). 0 when
    /// nothing waits.
    pub oldest_pending_age_seconds: f64,
    /// Age of the oldest event waiting for its identity. 0 when none.
    pub oldest_held_age_seconds: f64,
    pub last_delivery_at: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// The last errors, newest first; runs of the same error are merged.
    pub recent_errors: Vec<RecentError>,
    /// Events stored since the database was created.
    pub accepted: i64,
    /// Events acknowledged but not forwarded (`integrations`).
    pub filtered: i64,
    /// Repeated `messageId`s acknowledged and not stored again.
    pub duplicates: i64,
    /// Failed attempts that were scheduled for another try.
    pub retries: i64,
    pub sync: SyncStatus,
    /// The last hour, one entry per minute, oldest first (zeros included).
    pub per_minute: Vec<MinuteStat>,
}

/// A dead event as operators see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    pub id: i64,
    pub message_id: String,
    pub kind: String,
    pub order_key: String,
    pub reason: String,
    pub attempts: i64,
    pub accepted_at: String,
    pub died_at: Option<String>,
    /// Every failed attempt: time and status or error.
    pub history: Value,
    /// The stored Segment event, as it will be replayed.
    pub event: Value,
}

/// Selection for `dead list` and friends.
#[derive(Debug, Clone, Default)]
pub struct DeadListFilter {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub reason_contains: Option<String>,
    pub after_id: Option<i64>,
    pub limit: i64,
}
