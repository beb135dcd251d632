//! SQLite's result codes in the outbox's terms: a full disk and a held
//! lock are told apart from other failures, so ingest answers them with 503.

use crate::outbox::StoreError;

impl StoreError {
    /// The same classification for an error code from a direct SQLite call.
    pub(super) fn from_sqlite_code(code: i32, message: String) -> StoreError {
        match code & 0xff {
            13 | 10 => StoreError::Full(message),
            5 => StoreError::Busy(message),
            _ => StoreError::Database(sqlx::Error::Protocol(format!(
                "SQLite error {code}: {message}"
            ))),
        }
    }

    pub(super) fn classify(e: sqlx::Error) -> StoreError {
        if let sqlx::Error::Database(db) = &e {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // SQLITE_FULL (13), SQLITE_IOERR (10 and its extended codes), SQLITE_BUSY (5).
            let primary = code.parse::<i64>().map(|c| c & 0xff).unwrap_or(-1);
            if primary == 13 || primary == 10 {
                return StoreError::Full(db.message().to_string());
            }
            if primary == 5 {
                return StoreError::Busy(db.message().to_string());
            }
        }
        if let sqlx::Error::Io(io) = &e {
            return StoreError::Full(io.to_string());
        }
        StoreError::Database(e)
    }
}
