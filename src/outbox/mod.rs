//! The outbox: the only place an accepted event lives until it is
//! delivered or dead. This module holds what the rest of the service sees
//! of it (the data types, the errors); the storage engines live below it,
//! each with its own SQL.

mod audience;
mod error;
mod event;
pub(crate) mod recent_errors;
pub mod sqlite;
mod status;

pub use audience::{AudienceOp, AudienceSettlement, DeliveredValue, PendingUpdate};
pub use error::StoreError;
pub use event::{
    ClaimedEvent, DEAD_CHUNK, DeadSelection, IdentityUpdate, IngestReceipt, MaintenanceReport,
    NewEvent, SettleOutcome, Settlement, WriterConfig,
};
pub use recent_errors::RecentError;
pub use sqlite::{
    DatabaseLock, Outbox, RESERVE_BYTES, Reader, Writer, lock_path, open_cli_writer, open_reader,
};
pub use status::{
    DeadLetter, DeadListFilter, MinuteStat, OutboxStatus, PER_MINUTE_WINDOW, SyncStatus,
};

/// The states an event row is in, and the one place in the code where
/// their stored numbers are written down: SQL keeps the numbers (partial
/// indexes and triggers are defined on them), Rust speaks of the variants
/// and converts at the storage edge. In flight is not a state: a claimed
/// event keeps its state and the claim is a lease beside it, so that a
/// claim does not rewrite event rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventState {
    /// Due for delivery (now or at its retry time): its key's head.
    Pending,
    Delivered,
    Dead,
    /// A head waiting for its user's ids (identify).
    Held,
    /// Behind its key's head, waiting its turn.
    Queued,
}

impl EventState {
    /// Every state, for exhaustive checks.
    pub const ALL: [EventState; 5] = [
        EventState::Pending,
        EventState::Delivered,
        EventState::Dead,
        EventState::Held,
        EventState::Queued,
    ];

    /// The number stored for this state. 1 is not used: it was the state of
    /// claimed events before claims became leases (databases of that schema
    /// are upgraded by the migrations).
    pub const fn code(self) -> i64 {
        match self {
            EventState::Pending => 0,
            EventState::Delivered => 2,
            EventState::Dead => 3,
            EventState::Held => 4,
            EventState::Queued => 5,
        }
    }

    /// The state a stored number stands for; `None` for a number no state has.
    pub fn from_code(code: i64) -> Option<EventState> {
        EventState::ALL.into_iter().find(|s| s.code() == code)
    }
}

/// Milliseconds since the Unix epoch: the outbox's clock unit.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::EventState;

    #[test]
    fn each_state_has_its_own_number_and_reads_back_as_itself() {
        for s in EventState::ALL {
            assert_eq!(EventState::from_code(s.code()), Some(s));
        }
        let mut codes: Vec<i64> = EventState::ALL.iter().map(|s| s.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), EventState::ALL.len());
        assert_eq!(EventState::from_code(1), None);
    }
}
