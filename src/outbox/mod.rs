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

/// Event states as stored in `events.state`. In flight is not a state: a
/// claimed event keeps its state and has a row in `leases` (the counters'
/// row 1 counts those), so that a claim does not rewrite event rows.
pub mod state {
    pub const PENDING: i64 = 0;
    pub const DELIVERED: i64 = 2;
    pub const DEAD: i64 = 3;
    pub const HELD: i64 = 4;
    pub const QUEUED: i64 = 5;
}

/// Milliseconds since the Unix epoch: the outbox's clock unit.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
