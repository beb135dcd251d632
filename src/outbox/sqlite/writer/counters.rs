//! The status counters the writer keeps inside its transactions (totals
//! and per-minute figures), so that status never scans the backlog.

use super::*;

pub(super) fn db(e: sqlx::Error) -> StoreError {
    StoreError::classify(e)
}

pub(super) fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(60_000)
}

pub(super) async fn bump_total(
    conn: &mut SqliteConnection,
    name: &str,
    by: i64,
) -> Result<(), StoreError> {
    if by != 0 {
        sqlx::query("UPDATE totals SET value = value + ? WHERE name = ?")
            .bind(by)
            .bind(name)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}

pub(super) async fn bump_minute(
    conn: &mut SqliteConnection,
    column: &str,
    now: i64,
    by: i64,
) -> Result<(), StoreError> {
    if by != 0 {
        let sql = format!(
            "INSERT INTO minute_stats (minute, {column}) VALUES (?, ?) \
             ON CONFLICT (minute) DO UPDATE SET {column} = {column} + excluded.{column}"
        );
        sqlx::query(&sql)
            .bind(minute_of(now))
            .bind(by)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}

// The same counters as direct calls, for the passes that run under one
// lock of the connection (see direct.rs): ingest and the delivered mark.
// Each statement is a literal, so the statement cache (keyed by the
// literal's address) prepares it once.

/// Adds `by` to the count of events in `state`.
pub(super) fn add_to_state_count(
    d: &Db,
    statements: &mut StatementCache,
    state: i64,
    by: i64,
) -> Result<(), StoreError> {
    if by != 0 {
        let mut q = d.statement(
            statements,
            "UPDATE state_counts SET n = n + ?1 WHERE state = ?2",
        )?;
        q.int(1, by)?;
        q.int(2, state)?;
        q.run()?;
    }
    Ok(())
}

/// Adds `by` to the running total `name` (accepted, delivered, ...).
pub(super) fn add_to_total(
    d: &Db,
    statements: &mut StatementCache,
    name: &str,
    by: i64,
) -> Result<(), StoreError> {
    if by != 0 {
        let mut q = d.statement(
            statements,
            "UPDATE totals SET value = value + ?1 WHERE name = ?2",
        )?;
        q.int(1, by)?;
        q.text(2, name)?;
        q.run()?;
    }
    Ok(())
}

/// A column of `minute_stats` that the direct passes add to.
#[derive(Clone, Copy)]
pub(super) enum MinuteColumn {
    Accepted,
    Delivered,
}

/// Adds `by` to this minute's figure in `column`.
pub(super) fn add_to_minute(
    d: &Db,
    statements: &mut StatementCache,
    column: MinuteColumn,
    now: i64,
    by: i64,
) -> Result<(), StoreError> {
    if by == 0 {
        return Ok(());
    }
    let sql = match column {
        MinuteColumn::Accepted => {
            "INSERT INTO minute_stats (minute, accepted) VALUES (?1, ?2) \
             ON CONFLICT (minute) DO UPDATE SET accepted = accepted + excluded.accepted"
        }
        MinuteColumn::Delivered => {
            "INSERT INTO minute_stats (minute, delivered) VALUES (?1, ?2) \
             ON CONFLICT (minute) DO UPDATE SET delivered = delivered + excluded.delivered"
        }
    };
    let mut q = d.statement(statements, sql)?;
    q.int(1, minute_of(now))?;
    q.int(2, by)?;
    q.run()
}
