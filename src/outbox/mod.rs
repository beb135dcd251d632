//! The outbox: the only place an accepted event lives until it is
//! delivered or dead. This module holds what the rest of the service sees
//! of it: the storage contract (store.rs), its data types and errors, and
//! the [`Outbox`] handle that callers hold. The storage engines live below
//! it, each with its own SQL and its own migrations.
//!
//! [`Outbox`] is an enum over the backends rather than an `Arc<dyn ..>`:
//! every ingest request, claim and settlement crosses this boundary, and a
//! `match` costs neither a boxed future per call nor a virtual call, and
//! lets the compiler inline the backend's method. The traits in store.rs
//! are the contract each backend implements.

mod audience;
mod error;
mod event;
pub(crate) mod recent_errors;
pub mod sqlite;
mod status;
pub mod store;

pub mod postgres;

pub use crate::identity::IdentityUpdate;
pub use audience::{AudienceOp, AudienceSettlement, DeliveredValue, PendingUpdate};
pub use error::StoreError;
pub use event::{
    ClaimedEvent, DEAD_CHUNK, DeadSelection, IngestReceipt, MaintenanceReport, NewEvent,
    SettleOutcome, Settlement, WriterConfig,
};
pub use recent_errors::RecentError;
pub use sqlite::{DatabaseLock, RESERVE_BYTES, lock_path};
pub use status::{
    DeadLetter, DeadListFilter, MinuteStat, OutboxStatus, PER_MINUTE_WINDOW, SyncStatus,
};
pub use store::{AudienceKey, KnownIds, OutboxReads, OutboxStore};

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The outbox as callers hold it: cheap to clone, one variant per storage
/// engine. All reads and writes go through its methods (see
/// [`OutboxStore`] for what each promises).
#[derive(Clone)]
pub enum Outbox {
    Sqlite(sqlite::SqliteOutbox),
    Postgres(postgres::PgOutbox),
}

/// The read side alone, for the offline commands (`status`, `dead list`,
/// `dead show`) that work beside a running server and never write.
#[derive(Clone)]
pub enum OutboxReader {
    Sqlite(sqlite::Reader),
    Postgres(postgres::PgReader),
}

/// Generates the inherent methods of [`Outbox`] and [`OutboxReader`] that
/// forward to the backend's trait implementation.
macro_rules! forward {
    ($tr:ident; $( $(#[$m:meta])* fn $name:ident(&self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
        $(
            $(#[$m])*
            pub async fn $name(&self $(, $arg: $ty)*) -> Result<$ret, StoreError> {
                match self {
                    Self::Sqlite(b) => $tr::$name(b, $($arg),*).await,
                    Self::Postgres(b) => $tr::$name(b, $($arg),*).await,
                }
            }
        )*
    };
}

macro_rules! forward_reads {
    () => {
        forward! { OutboxReads;
            /// Whether the database answers at all (for `/readyz`).
            fn ping(&self) -> ();
            /// All status figures from one snapshot.
            fn status(&self) -> OutboxStatus;
            /// The identity map's entries for these users.
            fn identities(&self, users: &[&str]) -> HashMap<String, KnownIds>;
            /// Dead letters, oldest first, filtered.
            fn dead_list(&self, filter: &DeadListFilter) -> Vec<DeadLetter>;
            /// A page of dead letters and the id to continue after.
            fn dead_page(&self, filter: &DeadListFilter) -> (Vec<DeadLetter>, Option<i64>);
            /// One dead letter with its history and payload.
            fn dead_show(&self, id: i64) -> Option<DeadLetter>;
            /// Checks an explicit selection, all or nothing.
            fn dead_selection(&self, ids: &[i64]) -> Result<Vec<i64>, String>;
            /// When the sync lane's next window is due (ms).
            fn sync_next_run_at(&self) -> Option<i64>;
            /// A page of users with pending audience updates.
            fn audience_users_after(&self, after: &str, limit: usize) -> Vec<String>;
            /// Pending audience updates of these users up to `cut`.
            fn audience_pending_for(&self, users: &[String], cut: i64) -> Vec<PendingUpdate>;
            /// Values ChurnZero last accepted for these keys.
            fn audience_delivered_values(&self, keys: &[AudienceKey]) -> HashMap<AudienceKey, String>;
        }
    };
}

impl Outbox {
    /// Opens the outbox `--database` names: a `postgres://` or
    /// `postgresql://` URL connects to a shared PostgreSQL outbox as one
    /// more instance (see [`postgres::PgOutbox::connect`]); anything else is
    /// a SQLite file, created and migrated, that this process then owns
    /// alone (see [`sqlite::SqliteOutbox::open`]).
    pub async fn open(path: &Path, config: WriterConfig) -> Result<Outbox, StoreError> {
        if let Some(url) = postgres_url(path) {
            return Ok(Outbox::Postgres(
                postgres::PgOutbox::connect(url, postgres::PgConfig::from(&config)).await?,
            ));
        }
        Ok(Outbox::Sqlite(
            sqlite::SqliteOutbox::open(path, config).await?,
        ))
    }

    /// The SQLite handle, for the SQLite-only tools and tests (pool access,
    /// file checks); `None` on another backend.
    pub fn as_sqlite(&self) -> Option<&sqlite::SqliteOutbox> {
        match self {
            Outbox::Sqlite(s) => Some(s),
            Outbox::Postgres(_) => None,
        }
    }

    /// The read side of this outbox, for code written against reads only.
    pub fn reader(&self) -> OutboxReader {
        match self {
            Outbox::Sqlite(s) => OutboxReader::Sqlite(s.reader.clone()),
            Outbox::Postgres(p) => OutboxReader::Postgres(p.reader()),
        }
    }

    /// Woken after a commit that stored new events.
    pub fn stored_signal(&self) -> Arc<Notify> {
        match self {
            Outbox::Sqlite(b) => b.stored_signal(),
            Outbox::Postgres(b) => b.stored(),
        }
    }

    /// How many instances share this outbox now (1 on SQLite, which has one
    /// owner): a tenant-wide rate cap is divided by it.
    pub async fn live_instances(&self) -> Result<u32, StoreError> {
        match self {
            Outbox::Sqlite(_) => Ok(1),
            Outbox::Postgres(p) => p.live_instances().await,
        }
    }

    /// Whether this instance may run a one-at-a-time role (the sync lane's
    /// window) for the next `ttl`: always on SQLite (one owner); on
    /// PostgreSQL the holder of the role's lease row, renewed by asking
    /// again before `ttl` runs out.
    pub async fn lead(&self, role: &str, ttl: Duration) -> Result<bool, StoreError> {
        match self {
            Outbox::Sqlite(_) => Ok(true),
            Outbox::Postgres(p) => p.lead(role, ttl).await,
        }
    }

    /// Whether other instances may share this outbox (and so a tenant-wide
    /// limit must be divided among them): false for a SQLite file, which
    /// one process owns.
    pub fn is_shared(&self) -> bool {
        matches!(self, Outbox::Postgres(_))
    }

    /// How many claims delivery may have under way at once. SQLite's claims
    /// are calls into its one writer, so a second one would only queue
    /// there. A PostgreSQL claim is a round trip whose locks pass over keys
    /// another claim holds (see `claim_due` in its migrations), so a
    /// second claim runs beside the first on other keys while the first's
    /// answer travels, and a drain of many users is no longer paced by one
    /// claim at a time.
    pub fn claim_loops(&self) -> usize {
        match self {
            Outbox::Sqlite(_) => 1,
            Outbox::Postgres(_) => 2,
        }
    }

    /// Short names of the backend for logs and status (`sqlite`, `postgres`).
    pub fn backend(&self) -> &'static str {
        match self {
            Outbox::Sqlite(_) => "sqlite",
            Outbox::Postgres(_) => "postgres",
        }
    }

    forward_reads!();

    forward! { OutboxStore;
        /// Stores a request's events; returns after the commit that holds them.
        fn ingest(&self, events: Vec<NewEvent>) -> IngestReceipt;
        /// Claims up to `max` due events under a lease.
        fn claim(&self, max: usize, lease: Duration) -> Vec<ClaimedEvent>;
        /// Records attempts' outcomes, atomically for the batch.
        fn settle(&self, items: Vec<Settlement>) -> ();
        /// Leases, held budget, retention and dedup pruning.
        fn maintain(&self, retention: Duration, held_budget: Duration) -> MaintenanceReport;
        /// Dead events back into delivery (all with `None`).
        fn replay(&self, ids: Option<Vec<i64>>) -> u64;
        /// Deletes dead events (all with `None`).
        fn purge(&self, ids: Option<Vec<i64>>) -> u64;
        /// Replays what an operator selected.
        fn replay_selected(&self, which: DeadSelection) -> u64;
        /// Purges what an operator selected.
        fn purge_selected(&self, which: DeadSelection) -> u64;
        /// Records a step of the audience sync lane.
        fn audience(&self, op: AudienceOp) -> ();
        /// Adds reports to the recent-errors ring.
        fn note_errors(&self, reports: Vec<(String, &'static str, i64)>) -> ();
        /// Leaves nothing for the next start to read back (shutdown).
        fn checkpoint(&self) -> ();
    }
}

impl OutboxReader {
    forward_reads!();
}

/// Opens the read side only, for the offline commands: never creates and
/// never migrates (a server of another version may be running).
pub async fn open_reader(path: &Path) -> Result<OutboxReader, StoreError> {
    if let Some(url) = postgres_url(path) {
        return Ok(OutboxReader::Postgres(
            postgres::PgReader::connect(url).await?,
        ));
    }
    Ok(OutboxReader::Sqlite(sqlite::open_reader(path).await?))
}

/// Opens a writing handle for the offline commands (`dead replay`, `dead
/// purge`), beside a running server or without one.
pub async fn open_cli_writer(path: &Path, config: WriterConfig) -> Result<Outbox, StoreError> {
    if postgres_url(path).is_some() {
        // Many writers share a PostgreSQL outbox by design: the command is
        // one more, short-lived instance.
        return Outbox::open(path, config).await;
    }
    Ok(Outbox::Sqlite(sqlite::open_cli_writer(path, config).await?))
}

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

/// The PostgreSQL URL a `--database` value is, if it is one (scheme
/// `postgres://` or `postgresql://`, any case); `None` for a file path.
pub fn postgres_url(path: &Path) -> Option<&str> {
    let text = path.to_str()?;
    let lower = text.get(..13).unwrap_or(text).to_ascii_lowercase();
    (lower.starts_with("postgres://") || lower.starts_with("postgresql://")).then_some(text)
}

/// The database as it may be shown in logs and errors: a URL's password
/// (`scheme://user:password@host`) is replaced by `***`; a file path is
/// shown as it is.
pub fn display_database(path: &Path) -> String {
    let text = path.to_string_lossy();
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.into_owned();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{user}:***@{host}")
        }
        _ => authority.to_string(),
    };
    // `?password=...` (libpq's query parameter form) is hidden too.
    let tail = match tail.split_once('?') {
        Some((path_part, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path_part}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod display_tests {
    use super::display_database;
    use std::path::Path;

    #[test]
    fn a_urls_password_is_hidden_and_paths_are_kept() {
        assert_eq!(
            display_database(Path::new("postgres://u:pw@h:5432/db")),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            display_database(Path::new("postgresql://u@h/db?sslmode=require&password=pw")),
            "postgresql://u@h/db?sslmode=require&password=***"
        );
        assert_eq!(
            display_database(Path::new("postgres://u@h/db")),
            "postgres://u@h/db"
        );
        assert_eq!(
            display_database(Path::new("./data/outbox.db")),
            "./data/outbox.db"
        );
    }
}
