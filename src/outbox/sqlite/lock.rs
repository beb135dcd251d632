//! One `serve` per SQLite file. Two servers on one file would each release
//! the other's leases at start and deliver the same events side by side:
//! duplicates and per-user order inversions. So `serve` holds an exclusive
//! `flock` on `<db>.lock` for as long as its outbox is open, and a second
//! one refuses to start.
//!
//! `flock` rather than an `fcntl` lock on the database itself: SQLite takes
//! POSIX locks on the database file, and a POSIX lock is dropped when any
//! descriptor of that file in the process is closed, so a lock of ours there
//! could be lost (or lose SQLite's) behind either's back. A `flock` on a file
//! of its own is independent, is released by the kernel when the process
//! dies (a `kill -9` leaves nothing that blocks the next start), and
//! conflicts between two opens in one process too. The holder writes its pid
//! into the file so the refusal can name it.

use super::StoreError;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// An exclusive hold on a database; released when dropped (or when the
/// process ends, however it ends).
#[derive(Debug)]
pub struct DatabaseLock {
    _file: File,
    path: PathBuf,
}

/// The lock file of a database: `<db>.lock` beside it.
pub fn lock_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

impl DatabaseLock {
    /// Takes the lock without waiting: `Err(StoreError::Locked)` when
    /// another process (or another outbox in this one) holds it.
    pub fn acquire(database: &Path) -> Result<DatabaseLock, StoreError> {
        let path = lock_path(database);
        let io = |e: std::io::Error| StoreError::LockFile {
            path: path.display().to_string(),
            error: e.to_string(),
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(StoreError::Locked {
                    lock: path.display().to_string(),
                    pid: text.trim().parse().ok(),
                });
            }
            return Err(io(e));
        }
        // Ours now: say who holds it. A failure here costs only the pid in
        // a later refusal, not the lock.
        let _ = file
            .set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .and_then(|_| file.flush());
        Ok(DatabaseLock { _file: file, path })
    }

    /// The pid written by the last holder, when that process is still
    /// alive: most likely a server on this file right now. A hint only
    /// (a pid may have been reused; nothing is locked or unlocked here),
    /// for choices that are harmless when it is wrong.
    pub fn likely_holder(database: &Path) -> Option<u32> {
        let text = std::fs::read_to_string(lock_path(database)).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        if pid <= 0 {
            return None;
        }
        // SAFETY: signal 0 only checks that the process exists.
        let rc = unsafe { libc::kill(pid, 0) };
        let alive = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        alive.then_some(pid as u32)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
