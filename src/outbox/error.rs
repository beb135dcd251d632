//! The failures every backend reports in the same terms, so that ingest,
//! delivery and the operator tools answer them alike whatever stores the
//! outbox.

/// Failures of the outbox. `Full` is kept apart so that ingest can answer
/// 503 and let clients retry instead of treating it as a bug.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("storage is full or failing: {0}")]
    Full(String),
    #[error("outbox backlog is at its limit of {0} undelivered events")]
    Backlog(u64),
    #[error("the outbox writer has stopped")]
    WriterGone,
    /// SQLITE_BUSY: another process (an offline CLI command) held the
    /// database longer than the busy timeout. Kept apart from `Full` so that
    /// a lock is not mistaken for a full disk.
    #[error("the database is busy: {0}")]
    Busy(String),
    /// Another `serve` owns the file (see lock.rs).
    #[error(
        "another churnzero-forwarder process{} holds this database (lock file {lock}); \
         one server per database file: stop it first or use another --database",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { lock: String, pid: Option<u32> },
    /// An offline command found the schema outdated while a server holds
    /// the file: upgrading beside it is not safe.
    #[error(
        "{database}'s schema is at version {found} and this version needs {wanted}, \
         and a serve{} holds it: stop it and start `serve` of this version to upgrade",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    OutdatedBesideServer {
        database: String,
        found: i64,
        wanted: i64,
        pid: Option<u32>,
    },
    /// The lock file beside the database cannot be opened or locked (a
    /// read-only directory, a file system without locks).
    #[error("the lock file {path}: {error}")]
    LockFile { path: String, error: String },
    /// The file exists but holds no outbox (empty, or another program's).
    #[error("{0}")]
    NotAnOutbox(String),
    /// The file was written by an older version and not yet upgraded.
    #[error(
        "the database's schema is at version {found} and this version needs {wanted}: \
         start `serve` of this version once to upgrade it"
    )]
    Outdated { found: i64, wanted: i64 },
}

impl StoreError {
    /// Errors that a later attempt may not hit: the disk filled up, an I/O
    /// hiccup, or the backlog limit. Ingest answers them with 503.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Full(_)
                | StoreError::Backlog(_)
                | StoreError::WriterGone
                | StoreError::Busy(_)
        )
    }
}
