//! The SQLite outbox: one file owned by one process. One writer task owns
//! every write (group commit); reads (status, identity look-ups, dead
//! letters) use their own pool. The writer actor, the direct statements on
//! the ingest path, the disk reserve, checkpoints and `INDEXED BY` hints are
//! SQLite's answers to SQLite's limits and stay below this module.

mod audience;
mod direct;
mod error;
mod lock;
mod read;
mod recent_errors;
mod reserve;
mod store;
mod writer;

pub use lock::{DatabaseLock, lock_path};
pub use read::Reader;
pub use reserve::RESERVE_BYTES;
pub use writer::Writer;

use super::{EventState, StoreError, WriterConfig, now_ms};
use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Writes one operator fact into `meta` (last delivery, last error, the
/// recent-errors ring, the sync schedule), inside the caller's transaction.
pub(crate) async fn set_meta(
    conn: &mut sqlx::SqliteConnection,
    name: &str,
    value: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO meta (name, value) VALUES (?, ?) \
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )
    .bind(name)
    .bind(value)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(())
}

/// `state_counts` rows that count no event state: the leases (claims in
/// flight, 0004_leases.sql; kept by the writer since 0010_lease_counts.sql)
/// and the events queued behind held heads (0006_held_queue.sql). Their
/// numbers are kept out of [`EventState`]'s.
pub(crate) const LEASES_ROW: i64 = 1;
pub(crate) const HELD_QUEUED_ROW: i64 = 6;

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

fn connect_options(path: &Path, read_only: bool) -> Result<SqliteConnectOptions, StoreError> {
    let url = format!("sqlite://{}", path.display());
    let opts = SqliteConnectOptions::from_str(&url)?
        .create_if_missing(!read_only)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(false)
        .pragma("temp_store", "memory")
        .pragma("cache_size", "-16000")
        .statement_cache_capacity(256)
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    if read_only {
        return Ok(opts);
    }
    // Pruned pages go back to the file system in maintenance
    // (incremental_vacuum), and a checkpointed WAL is cut back to 64 MB, so
    // the files reach a steady size under constant load.
    // The writer reads whole result sets (RETURNING of a group's message
    // ids, a claim's payloads): with sqlx's default 50-row buffer its
    // database thread stalled every 50 rows until the writer task was
    // scheduled again.
    let opts = opts
        .row_buffer_size(4096)
        .auto_vacuum(sqlx::sqlite::SqliteAutoVacuum::Incremental)
        .pragma("journal_size_limit", "67108864");
    Ok(match max_page_count() {
        Some(pages) => opts.pragma("max_page_count", pages.to_string()),
        None => opts,
    })
}

/// Caps the database at this many pages (SQLite's `max_page_count`; 4 KiB
/// each). Undocumented on purpose: it exists so that the disk-full path
/// (SQLITE_FULL on commit) can be exercised for real on any machine, without
/// a small filesystem; it is read from `FORWARDER_SQLITE_MAX_PAGE_COUNT`.
fn max_page_count() -> Option<u64> {
    std::env::var("FORWARDER_SQLITE_MAX_PAGE_COUNT")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
}

/// An opened SQLite outbox: the writer handle and the reader pool.
#[derive(Clone)]
pub struct SqliteOutbox {
    pub writer: Writer,
    pub reader: Reader,
    /// The file's owner lock, held while any clone lives (`serve`'s
    /// outbox); `None` for the offline commands that work beside a server.
    _lock: Option<std::sync::Arc<DatabaseLock>>,
}

impl SqliteOutbox {
    /// Opens (creating and migrating) the database as its one owner: takes
    /// the file's lock first (a second server is refused before it touches
    /// anything), then releases the leases a previous process left behind
    /// and starts the writer task.
    pub async fn open(path: &Path, config: WriterConfig) -> Result<SqliteOutbox, StoreError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Full(e.to_string()))?;
            }
        }
        let lock = DatabaseLock::acquire(path)?;
        let mut conn = connect_options(path, false)?.connect().await?;
        MIGRATOR.run(&mut conn).await?;
        // The writer checkpoints only as a safety net (every 40 MB of WAL);
        // the checkpointer below does it beside the writer.
        sqlx::query("PRAGMA wal_autocheckpoint = 10000")
            .execute(&mut conn)
            .await?;
        let reserve = reserve::Reserve::beside(path, &mut conn, max_page_count()).await?;
        let writer = Writer::start(conn, config, reserve).await?;
        let reader = Reader::open(path).await?;
        let checkpointer = connect_options(path, false)?.connect().await?;
        tokio::spawn(checkpoint_loop(checkpointer, writer.downgrade()));
        Ok(SqliteOutbox {
            writer,
            reader,
            _lock: Some(std::sync::Arc::new(lock)),
        })
    }
}

/// Copies committed WAL pages into the database file from a connection of
/// its own, a few times a second. Left to SQLite's automatic checkpoint,
/// the writer itself would copy and fsync the database file inside the
/// commit that crossed the threshold, and every request waiting on that
/// commit would wait for it too. Passive: it never blocks the writer or
/// readers, and simply leaves what it cannot copy yet for the next round.
async fn checkpoint_loop(mut conn: sqlx::SqliteConnection, writer: writer::WeakWriter) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !writer.alive() {
            break;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed; the writer's own checkpoint takes over");
        }
    }
    use sqlx::Connection;
    let _ = conn.close().await;
}

/// Opens the reader side only, for the offline CLI commands (`status`,
/// `dead ...`) that run beside a server or without one. It never creates a
/// file and never migrates (a server of an older version may be running).
pub async fn open_reader(path: &Path) -> Result<Reader, StoreError> {
    require_outbox_file(path)?;
    schema_check(path).await?;
    Reader::open(path).await
}

/// A path that is not there is not created, and an empty file is not an
/// outbox yet: both said in one sentence rather than as an SQL error.
fn require_outbox_file(path: &Path) -> Result<(), StoreError> {
    match std::fs::metadata(path) {
        Err(_) => Err(StoreError::NotAnOutbox(format!(
            "no database at {} (set --database or FORWARDER_DATABASE)",
            path.display()
        ))),
        Ok(m) if m.is_dir() => Err(StoreError::NotAnOutbox(format!(
            "{} is a directory, not a churnzero-forwarder database",
            path.display()
        ))),
        Ok(m) if m.len() == 0 => Err(StoreError::NotAnOutbox(format!(
            "{} has no outbox yet: start `serve` on it once",
            path.display()
        ))),
        Ok(_) => Ok(()),
    }
}

fn not_an_outbox(path: &Path) -> StoreError {
    StoreError::NotAnOutbox(format!(
        "{} is not a churnzero-forwarder database",
        path.display()
    ))
}

/// The schema version a file is at, read through one plain connection that
/// changes nothing (no journal mode is set, so another program's file is
/// left as it was): `Ok(None)` when it has no migrations table at all
/// (another program's SQLite file, or not SQLite).
async fn schema_version(path: &Path) -> Result<Option<i64>, sqlx::Error> {
    use sqlx::Connection;
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .pragma("query_only", "1")
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let found = async {
        let has_table: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_optional(&mut conn)
        .await?;
        if has_table.is_none() {
            return Ok(None);
        }
        let found: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&mut conn)
            .await?;
        Ok(Some(found.unwrap_or(0)))
    }
    .await;
    let _ = conn.close().await;
    found
}

fn wanted_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Checks that `path` is an outbox of this version's schema, for the
/// commands that never migrate beside a server.
async fn schema_check(path: &Path) -> Result<(), StoreError> {
    let found = match schema_version(path).await {
        Ok(Some(v)) => v,
        Ok(None) => return Err(not_an_outbox(path)),
        // SQLITE_NOTADB (26): not an SQLite file at all.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("26") => {
            return Err(not_an_outbox(path));
        }
        Err(e) => return Err(e.into()),
    };
    let wanted = wanted_version();
    if found < wanted {
        return Err(StoreError::Outdated { found, wanted });
    }
    Ok(())
}

/// Opens a write connection for the offline CLI commands (`dead replay`,
/// `dead purge`), beside a running server or without one. It never runs
/// migrations beside a server: a file of the current schema is used as is;
/// an outdated one is upgraded only when no server holds it (the command
/// then holds the file's lock while it works).
pub async fn open_cli_writer(
    path: &Path,
    config: WriterConfig,
) -> Result<SqliteOutbox, StoreError> {
    require_outbox_file(path)?;
    let lock = match schema_check(path).await {
        Ok(()) => None,
        Err(StoreError::Outdated { found, wanted }) => match DatabaseLock::acquire(path) {
            Ok(lock) => Some(lock),
            Err(StoreError::Locked { pid, .. }) => {
                return Err(StoreError::OutdatedBesideServer {
                    database: path.display().to_string(),
                    found,
                    wanted,
                    pid,
                });
            }
            Err(e) => return Err(e),
        },
        Err(e) => return Err(e),
    };
    SqliteOutbox::open_without_recovery(path, config, lock).await
}

impl SqliteOutbox {
    async fn open_without_recovery(
        path: &Path,
        mut config: WriterConfig,
        lock: Option<DatabaseLock>,
    ) -> Result<SqliteOutbox, StoreError> {
        config.release_leases_at_start = false;
        let mut conn = connect_options(path, false)?.connect().await?;
        if lock.is_some() {
            // No server holds the file (we do): upgrading it is safe.
            MIGRATOR.run(&mut conn).await?;
        }
        let mut writer = Writer::start(conn, config, reserve::Reserve::none()).await?;
        if lock.is_none() && DatabaseLock::likely_holder(path).is_some() {
            // A server writes beside this command: let it in between chunks.
            writer = writer.pace_chunks(writer::OFFLINE_CHUNK_PAUSE);
        }
        let reader = Reader::open(path).await?;
        Ok(SqliteOutbox {
            writer,
            reader,
            _lock: lock.map(std::sync::Arc::new),
        })
    }
}

async fn reader_pool(path: &Path) -> Result<sqlx::SqlitePool, StoreError> {
    // query_only rather than SQLITE_OPEN_READONLY: a read-only open cannot
    // create the WAL index when no writer has the database open.
    let opts = connect_options(path, true)?.pragma("query_only", "1");
    Ok(SqlitePoolOptions::new()
        .max_connections(4)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await?)
}
