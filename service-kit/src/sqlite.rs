//! SQLite plumbing both embedded stores share: the error mapping and the migration runner.

use crate::error::Error;

/// Maps a SQLite error: conditions a retry can outlive (busy, locked, disk full, I/O) are
/// UNAVAILABLE, anything else INTERNAL (logged, not shown to callers).
pub fn error(e: rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::SystemIoFailure
            ) =>
        {
            Error::Unavailable(format!("storage unavailable: {e}"))
        }
        e => Error::Internal(format!("sqlite: {}", crate::error::chain(&e))),
    }
}

/// Applies the embedded migrations the database has not seen (tracked in `user_version`),
/// each in its own transaction.
pub fn migrate(conn: &rusqlite::Connection, migrations: &[&str]) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in migrations.iter().enumerate() {
        let target = i64::try_from(i).unwrap_or(i64::MAX) + 1;
        if version < target {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.execute_batch(&format!("PRAGMA user_version = {target}"))?;
            tx.commit()?;
        }
    }
    Ok(())
}
