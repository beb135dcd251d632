//! Disk space kept in reserve for delivery. When the disk fills up, ingest
//! must stop (503) but delivery must go on: recording an outcome rewrites
//! rows, and SQLite needs a little room for that (WAL frames, a page split).
//! On a disk that is full to the last byte even that fails, and the outbox
//! would be stuck with every event in flight.
//!
//! So `serve` keeps a reserve file beside the database (`<db>-reserve`, a
//! few MiB of zeros). The first time SQLite reports the disk full, the writer
//! deletes it: delivery, settling and maintenance go on in the space it
//! frees, while ingest is refused until the reserve can be written again
//! with as much room to spare (twice its size must be free), so that ingest
//! does not fill the disk straight back up the moment a little space returns.
//!
//! Under the page cap that exercises a full database on any machine
//! (`FORWARDER_SQLITE_MAX_PAGE_COUNT`, see `max_page_count`), the disk never
//! fills: the cap is the disk. There the reserve is a slice of the cap that
//! the writer's connection is kept below, and releasing it raises the
//! connection's limit to the whole cap, so the full-disk path behaves as it
//! does on a real disk.

use sqlx::SqliteConnection;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Size of the reserve file.
pub const RESERVE_BYTES: u64 = 8 * 1024 * 1024;

/// How often a released reserve is tried again while ingest waits for room.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The reserve file and whether it is held.
#[derive(Debug)]
pub(super) struct Reserve {
    /// `None`: no reserve (offline CLI commands, or a filesystem where the
    /// file cannot be written for another reason than space).
    path: Option<PathBuf>,
    held: bool,
    /// Set when the reserve was lost to a full disk (released, or could
    /// not be written for lack of space): only then is getting it back news
    /// worth a log line.
    short_of_space: bool,
    last_try: Option<Instant>,
    /// Set under a page cap: the reserve is pages, not a file.
    pages: Option<PageReserve>,
}

/// The reserve under a page cap: the writer's connection may use
/// `cap - reserve` pages while the reserve is held, `cap` once released.
#[derive(Debug, Clone, Copy)]
struct PageReserve {
    cap: u64,
    reserve: u64,
}

impl Reserve {
    /// No reserve: the offline CLI commands write too little to need one.
    pub(super) fn none() -> Reserve {
        Reserve {
            path: None,
            held: true,
            short_of_space: false,
            last_try: None,
            pages: None,
        }
    }

    /// The reserve beside `database`, written now if there is room; under
    /// a page cap (`page_cap`), the writer's connection `conn` is kept
    /// below the cap instead.
    pub(super) async fn beside(
        database: &std::path::Path,
        conn: &mut SqliteConnection,
        page_cap: Option<u64>,
    ) -> Result<Reserve, sqlx::Error> {
        if let Some(cap) = page_cap {
            // An eighth of the cap stands in for the few MiB of a disk.
            let pages = PageReserve {
                cap,
                reserve: (cap / 8).max(1),
            };
            set_max_page_count(conn, pages.cap - pages.reserve).await?;
            return Ok(Reserve {
                path: None,
                held: true,
                short_of_space: false,
                last_try: None,
                pages: Some(pages),
            });
        }
        let mut name = database.as_os_str().to_owned();
        name.push("-reserve");
        let mut reserve = Reserve {
            path: Some(PathBuf::from(name)),
            held: false,
            short_of_space: false,
            last_try: None,
            pages: None,
        };
        reserve.try_acquire(RESERVE_BYTES).await;
        Ok(reserve)
    }

    /// Whether ingest may write: the reserve is held, or it could be
    /// written again just now.
    pub(super) async fn ready(&mut self, conn: &mut SqliteConnection) -> bool {
        if self.held {
            return true;
        }
        if self.last_try.is_some_and(|t| t.elapsed() < RETRY_EVERY) {
            return false;
        }
        if let Some(pages) = self.pages {
            self.last_try = Some(Instant::now());
            return self.try_acquire_pages(conn, pages).await;
        }
        // Twice the reserve must be free before ingest may use the rest.
        self.try_acquire(2 * RESERVE_BYTES).await
    }

    /// Under a page cap: held again once the pages in use leave twice the
    /// reserve free, as on a disk.
    async fn try_acquire_pages(&mut self, conn: &mut SqliteConnection, pages: PageReserve) -> bool {
        let used = async {
            let total: i64 = sqlx::query_scalar("PRAGMA page_count")
                .fetch_one(&mut *conn)
                .await?;
            let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
                .fetch_one(&mut *conn)
                .await?;
            Ok::<u64, sqlx::Error>((total - free).max(0) as u64)
        }
        .await;
        let room = match used {
            Ok(used) => used + 2 * pages.reserve <= pages.cap,
            Err(e) => {
                tracing::warn!(error = %e, "reading the database's size failed");
                false
            }
        };
        if room
            && set_max_page_count(conn, pages.cap - pages.reserve)
                .await
                .is_ok()
        {
            tracing::info!("database space is back: the reserve is held, ingest resumes");
            self.held = true;
            self.short_of_space = false;
        }
        self.held
    }

    /// Frees the reserve after SQLite reported the disk full.
    pub(super) async fn release(&mut self, conn: &mut SqliteConnection) {
        if !self.held {
            return;
        }
        let (what, reserve, released) = match (self.pages, &self.path) {
            (Some(pages), _) => (
                "database",
                format!("{} pages", pages.reserve),
                set_max_page_count(conn, pages.cap)
                    .await
                    .map_err(|e| e.to_string()),
            ),
            (None, Some(path)) => (
                "disk",
                path.display().to_string(),
                std::fs::remove_file(path).map_err(|e| e.to_string()),
            ),
            (None, None) => return,
        };
        match released {
            Ok(()) => tracing::warn!(
                %reserve,
                "{what} full: released the reserve so that delivery can go on; \
                 ingest answers 503 until space returns"
            ),
            Err(e) => tracing::warn!(error = %e, "{what} full: releasing the reserve failed"),
        }
        self.held = false;
        self.short_of_space = true;
        self.last_try = Some(Instant::now());
    }

    /// Writes `proof` bytes (at least the reserve) and keeps the reserve.
    async fn try_acquire(&mut self, proof: u64) -> bool {
        let Some(path) = self.path.clone() else {
            self.held = true;
            return true;
        };
        self.last_try = Some(Instant::now());
        let result = tokio::task::spawn_blocking(move || write_reserve(&path, proof))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match result {
            Ok(()) => {
                if self.short_of_space {
                    tracing::info!("disk space is back: the reserve is held, ingest resumes");
                }
                self.held = true;
                self.short_of_space = false;
            }
            Err(e) if is_out_of_space(&e) => {
                if !self.short_of_space {
                    tracing::warn!(
                        "disk full: no room for the reserve; ingest answers 503 until space returns"
                    );
                }
                self.held = false;
                self.short_of_space = true;
            }
            Err(e) => {
                // Not a space problem (permissions, an odd filesystem): run
                // without a reserve rather than refuse ingest forever.
                tracing::warn!(error = %e, "cannot write the disk reserve file; running without one");
                self.path = None;
                self.held = true;
            }
        }
        self.held
    }
}

/// Sets the connection's page limit. SQLite never sets it below the file's
/// current size, which only means less room than asked for until
/// maintenance gives pages back.
async fn set_max_page_count(conn: &mut SqliteConnection, pages: u64) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("PRAGMA max_page_count = {pages}"))
        .execute(conn)
        .await
        .map(|_| ())
}

fn is_out_of_space(e: &std::io::Error) -> bool {
    // ENOSPC (28) and EDQUOT (122 on Linux): std maps both to these kinds.
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(28) | Some(122))
}

/// Writes `proof` bytes (proving that much room), then gives back what
/// exceeds the reserve. Real zeros, not a sparse file, so that the blocks
/// are really taken; filesystems account for them at write time, so no
/// fsync is needed to know the space is there.
fn write_reserve(path: &std::path::Path, proof: u64) -> std::io::Result<()> {
    let attempt = (|| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        while written < proof.max(RESERVE_BYTES) {
            f.write_all(&chunk)?;
            written += chunk.len() as u64;
        }
        f.set_len(RESERVE_BYTES)
    })();
    if attempt.is_err() {
        let _ = std::fs::remove_file(path);
    }
    attempt
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    async fn insert(conn: &mut SqliteConnection, n: usize) -> Result<(), sqlx::Error> {
        for _ in 0..n {
            sqlx::query("INSERT INTO t (v) VALUES (randomblob(1000))")
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// Fills the capped database until SQLite refuses a row.
    async fn fill(conn: &mut SqliteConnection) -> usize {
        for n in 0..10_000 {
            if let Err(e) = insert(conn, 1).await {
                assert!(e.to_string().contains("full"), "{e}");
                return n;
            }
        }
        panic!("the capped database never filled up");
    }

    #[tokio::test]
    async fn under_a_page_cap_the_reserve_gives_room_once_full_and_comes_back_when_freed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut conn = SqliteConnection::connect(&url).await.unwrap();
        for sql in [
            "PRAGMA auto_vacuum = INCREMENTAL",
            "CREATE TABLE t (v BLOB)",
        ] {
            sqlx::query(sql).execute(&mut conn).await.unwrap();
        }
        let mut reserve = Reserve::beside(&path, &mut conn, Some(160)).await.unwrap();
        assert!(
            !dir.path().join("o.db-reserve").exists(),
            "pages, not a file"
        );
        assert!(reserve.ready(&mut conn).await);

        let before_release = fill(&mut conn).await;
        assert!(before_release > 0);
        // Released: the reserve's 20 pages take rows that a full database
        // refused, while ingest is told to wait.
        reserve.release(&mut conn).await;
        let after_release = fill(&mut conn).await;
        assert!(after_release >= 10, "{after_release} rows in the reserve");
        assert!(!reserve.ready(&mut conn).await);

        // Room comes back (maintenance prunes): the reserve is held again
        // once twice its size is free, and the connection is capped below
        // the reserve once more.
        for sql in ["DELETE FROM t", "PRAGMA incremental_vacuum"] {
            sqlx::query(sql).execute(&mut conn).await.unwrap();
        }
        reserve.last_try = None;
        assert!(reserve.ready(&mut conn).await);
        let refilled = fill(&mut conn).await;
        assert!(
            refilled < before_release + after_release,
            "{refilled} rows, the reserve not held back"
        );
    }
}
