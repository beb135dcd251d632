//! Direct SQLite calls on the writer's connection, for the ingest path.
//!
//! Through sqlx every statement is a round trip to the connection's own
//! thread; measured under load, each cost 0.2 ms of hand-offs, and one
//! group's ingest took eight of them, more than the SQL itself. The writer
//! instead locks the connection's handle once per group and runs the
//! group's ingest statements on its own thread. Statements are prepared
//! with `sqlite3_prepare_v3(SQLITE_PREPARE_PERSISTENT)` and kept for the
//! life of the connection.

use super::StoreError;
use libsqlite3_sys as ffi;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::hash::{BuildHasherDefault, Hasher};
use std::ptr::NonNull;

/// A raw connection borrowed from a locked sqlx handle. Valid only while the
/// lock is held, which the borrow of `Db` by its users enforces.
pub(super) struct Db {
    handle: NonNull<ffi::sqlite3>,
}

/// Prepared statements kept across groups, finalized before the connection
/// closes.
#[derive(Default)]
pub(super) struct StatementCache {
    statements: HashMap<SqlKey, NonNull<ffi::sqlite3_stmt>, BuildHasherDefault<SqlKeyHasher>>,
}

/// A statement's SQL named by where its text lives: the statements are
/// string literals, so the address and length pick one out without hashing
/// its text (hashing the SQL of every statement run, a few hundred bytes
/// each, was a visible share of the writer's time per event). Two literals
/// of the same text at different addresses only cost one more prepare.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct SqlKey(usize, usize);

impl SqlKey {
    fn of(sql: &'static str) -> SqlKey {
        SqlKey(sql.as_ptr() as usize, sql.len())
    }
}

/// Mixes the two words of a [`SqlKey`]; a cache of a few dozen entries
/// needs no protection against chosen keys.
#[derive(Default)]
struct SqlKeyHasher(u64);

impl Hasher for SqlKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

// SAFETY: the statements belong to the writer's connection and are used only
// by the writer task, one at a time, while it holds the connection's lock.
unsafe impl Send for StatementCache {}

impl StatementCache {
    /// Finalizes every statement; call with the connection's lock held,
    /// before the connection closes.
    pub(super) fn clear(&mut self) {
        for (_, stmt) in self.statements.drain() {
            // SAFETY: each pointer came from a successful prepare and is
            // finalized exactly once (it leaves the map here).
            unsafe { ffi::sqlite3_finalize(stmt.as_ptr()) };
        }
    }
}

fn error(db: NonNull<ffi::sqlite3>, code: i32) -> StoreError {
    // SAFETY: sqlite3_errmsg returns a NUL-terminated string owned by the
    // connection, valid until the next call on it; it is copied at once.
    let message = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db.as_ptr())) }
        .to_string_lossy()
        .into_owned();
    StoreError::from_sqlite_code(code, message)
}

impl Db {
    /// # Safety
    /// `handle` must be an open connection whose lock the caller holds for
    /// as long as this `Db` is used.
    pub(super) unsafe fn new(handle: NonNull<ffi::sqlite3>) -> Db {
        Db { handle }
    }

    /// Runs SQL without parameters or results (BEGIN, COMMIT).
    pub(super) fn exec(&self, sql: &str) -> Result<(), StoreError> {
        let c = CString::new(sql).expect("no NUL in SQL");
        // SAFETY: the handle is open and locked (see `new`); the SQL string
        // outlives the call.
        let code = unsafe {
            ffi::sqlite3_exec(
                self.handle.as_ptr(),
                c.as_ptr(),
                None,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        if code == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(error(self.handle, code))
        }
    }

    /// Rows the last finished INSERT, UPDATE or DELETE changed (an upsert's
    /// update counts; a `DO UPDATE ... WHERE` that matched nothing does
    /// not). It lets an upsert report whether it won without RETURNING,
    /// which makes SQLite build a temporary table for every execution.
    pub(super) fn changes(&self) -> i64 {
        // SAFETY: the handle is open and locked (see `new`).
        unsafe { ffi::sqlite3_changes64(self.handle.as_ptr()) }
    }

    /// A cached statement, reset and with its bindings cleared.
    pub(super) fn statement<'a>(
        &'a self,
        cache: &'a mut StatementCache,
        sql: &'static str,
    ) -> Result<Statement<'a>, StoreError> {
        let stmt = match cache.statements.get(&SqlKey::of(sql)) {
            Some(s) => *s,
            None => {
                let mut raw: *mut ffi::sqlite3_stmt = std::ptr::null_mut();
                // SAFETY: the handle is open and locked; the SQL pointer and
                // length describe a live &str.
                let code = unsafe {
                    ffi::sqlite3_prepare_v3(
                        self.handle.as_ptr(),
                        sql.as_ptr().cast(),
                        sql.len() as i32,
                        ffi::SQLITE_PREPARE_PERSISTENT,
                        &mut raw,
                        std::ptr::null_mut(),
                    )
                };
                if code != ffi::SQLITE_OK {
                    return Err(error(self.handle, code));
                }
                let stmt = NonNull::new(raw).expect("a statement for non-empty SQL");
                cache.statements.insert(SqlKey::of(sql), stmt);
                stmt
            }
        };
        Ok(Statement {
            db: self,
            stmt,
            _cache: std::marker::PhantomData,
        })
    }
}

/// One use of a prepared statement: bind, step, read columns. Reset when
/// dropped so that it never holds a read or write cursor open.
pub(super) struct Statement<'a> {
    db: &'a Db,
    stmt: NonNull<ffi::sqlite3_stmt>,
    _cache: std::marker::PhantomData<&'a mut StatementCache>,
}

/// What a step produced.
#[derive(PartialEq, Eq)]
pub(super) enum Step {
    Row,
    Done,
}

impl Statement<'_> {
    fn check(&self, code: i32) -> Result<(), StoreError> {
        if code == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(error(self.db.handle, code))
        }
    }

    /// Binds text at 1-based `index`; SQLite copies it.
    pub(super) fn text(&mut self, index: i32, value: &str) -> Result<(), StoreError> {
        // SAFETY: a live statement; SQLITE_TRANSIENT makes SQLite copy the
        // bytes before the call returns.
        let code = unsafe {
            ffi::sqlite3_bind_text(
                self.stmt.as_ptr(),
                index,
                value.as_ptr().cast(),
                value.len() as i32,
                ffi::SQLITE_TRANSIENT(),
            )
        };
        self.check(code)
    }

    /// Binds text, or NULL for `None`.
    pub(super) fn opt_text(&mut self, index: i32, value: Option<&str>) -> Result<(), StoreError> {
        match value {
            Some(v) => self.text(index, v),
            // SAFETY: a live statement.
            None => self.check(unsafe { ffi::sqlite3_bind_null(self.stmt.as_ptr(), index) }),
        }
    }

    pub(super) fn int(&mut self, index: i32, value: i64) -> Result<(), StoreError> {
        // SAFETY: a live statement.
        let code = unsafe { ffi::sqlite3_bind_int64(self.stmt.as_ptr(), index, value) };
        self.check(code)
    }

    pub(super) fn step(&mut self) -> Result<Step, StoreError> {
        // SAFETY: a live statement of a locked connection.
        match unsafe { ffi::sqlite3_step(self.stmt.as_ptr()) } {
            ffi::SQLITE_ROW => Ok(Step::Row),
            ffi::SQLITE_DONE => Ok(Step::Done),
            code => Err(error(self.db.handle, code)),
        }
    }

    /// Runs to completion, for statements without results.
    pub(super) fn run(&mut self) -> Result<(), StoreError> {
        while self.step()? == Step::Row {}
        Ok(())
    }

    pub(super) fn column_int(&self, index: i32) -> i64 {
        // SAFETY: called after step() returned Row.
        unsafe { ffi::sqlite3_column_int64(self.stmt.as_ptr(), index) }
    }

    /// Whether a column of the current row is NULL.
    pub(super) fn column_is_null(&self, index: i32) -> bool {
        // SAFETY: called after step() returned Row.
        unsafe { ffi::sqlite3_column_type(self.stmt.as_ptr(), index) == ffi::SQLITE_NULL }
    }

    /// An integer column of the current row, `None` for NULL.
    pub(super) fn column_opt_int(&self, index: i32) -> Option<i64> {
        (!self.column_is_null(index)).then(|| self.column_int(index))
    }

    /// A text column of the current row, `None` for NULL.
    pub(super) fn column_opt_text(&self, index: i32) -> Option<String> {
        (!self.column_is_null(index)).then(|| self.column_text(index))
    }

    /// A text column of the current row (empty for NULL).
    pub(super) fn column_text(&self, index: i32) -> String {
        // SAFETY: called after step() returned Row; the pointer and length
        // describe the column's bytes until the next step or reset, and are
        // copied at once.
        unsafe {
            let p = ffi::sqlite3_column_text(self.stmt.as_ptr(), index);
            let n = ffi::sqlite3_column_bytes(self.stmt.as_ptr(), index);
            if p.is_null() {
                return String::new();
            }
            String::from_utf8_lossy(std::slice::from_raw_parts(p, n as usize)).into_owned()
        }
    }

    /// Ends this use: the statement is reset and its bindings cleared, so
    /// the next use starts clean.
    pub(super) fn reset(&mut self) {
        // SAFETY: a live statement.
        unsafe {
            ffi::sqlite3_reset(self.stmt.as_ptr());
            ffi::sqlite3_clear_bindings(self.stmt.as_ptr());
        }
    }
}

impl Drop for Statement<'_> {
    fn drop(&mut self) {
        self.reset();
    }
}
