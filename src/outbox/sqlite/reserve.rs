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
}

impl Reserve {
    /// No reserve: the offline CLI commands write too little to need one.
    pub(super) fn none() -> Reserve {
        Reserve {
            path: None,
            held: true,
            short_of_space: false,
            last_try: None,
        }
    }

    /// The reserve beside `database`, written now if there is room.
    pub(super) async fn beside(database: &std::path::Path) -> Reserve {
        let mut name = database.as_os_str().to_owned();
        name.push("-reserve");
        let mut reserve = Reserve {
            path: Some(PathBuf::from(name)),
            held: false,
            short_of_space: false,
            last_try: None,
        };
        reserve.try_acquire(RESERVE_BYTES).await;
        reserve
    }

    /// Whether ingest may write: the reserve is held, or it could be
    /// written again just now.
    pub(super) async fn ready(&mut self) -> bool {
        if self.held {
            return true;
        }
        if self.last_try.is_some_and(|t| t.elapsed() < RETRY_EVERY) {
            return false;
        }
        // Twice the reserve must be free before ingest may use the rest.
        self.try_acquire(2 * RESERVE_BYTES).await
    }

    /// Frees the reserve after SQLite reported the disk full.
    pub(super) fn release(&mut self) {
        if let (true, Some(path)) = (self.held, &self.path) {
            match std::fs::remove_file(path) {
                Ok(()) => tracing::warn!(
                    reserve = %path.display(),
                    "disk full: released the reserve so that delivery can go on; \
                     ingest answers 503 until space returns"
                ),
                Err(e) => tracing::warn!(error = %e, "disk full: releasing the reserve failed"),
            }
            self.held = false;
            self.short_of_space = true;
            self.last_try = Some(Instant::now());
        }
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
