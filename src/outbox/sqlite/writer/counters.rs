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
