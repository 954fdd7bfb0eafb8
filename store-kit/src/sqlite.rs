//! SQLite: the [`Db`] executor over a `rusqlite` connection (statements cached per
//! connection), the error mapping and the migration runner.

use std::sync::Arc;

use service_kit::error::{Error, Result};

use crate::{Db, Dialect, SqlRow, V};

/// Maps a SQLite error: conditions a retry can outlive (busy, locked, disk full, I/O) are
/// UNAVAILABLE, anything else INTERNAL (logged with its cause, not shown to callers).
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
        e => Error::Internal(format!("sqlite: {}", service_kit::error::chain(&e))),
    }
}

/// Applies the embedded migrations the database has not seen (tracked in `user_version`),
/// each in its own transaction.
pub fn migrate(conn: &rusqlite::Connection, migrations: &[&str]) -> Result<()> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(error)?;
    for (i, sql) in migrations.iter().enumerate() {
        let target = i64::try_from(i).unwrap_or(i64::MAX) + 1;
        if version < target {
            let tx = conn.unchecked_transaction().map_err(error)?;
            tx.execute_batch(sql).map_err(error)?;
            tx.execute_batch(&format!("PRAGMA user_version = {target}"))
                .map_err(error)?;
            tx.commit().map_err(error)?;
        }
    }
    Ok(())
}

impl rusqlite::ToSql for V {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            V::I(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            V::T(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            V::N => ToSqlOutput::Borrowed(ValueRef::Null),
            V::Is(_) | V::Ts(_) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    "SQLite has no array parameters".into(),
                ))
            }
        })
    }
}

impl Db for rusqlite::Connection {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&self, sql: &str, params: &[V]) -> Result<u64> {
        let n = self
            .prepare_cached(sql)
            .map_err(error)?
            .execute(rusqlite::params_from_iter(params))
            .map_err(error)?;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }

    fn query(&self, sql: &str, params: &[V]) -> Result<Vec<SqlRow>> {
        let mut out = Vec::new();
        read_rows(self, sql, params, &mut |row| {
            out.push(row);
            Ok(())
        })?;
        Ok(out)
    }

    fn each(
        &self,
        sql: &str,
        params: &[V],
        f: &mut dyn FnMut(&SqlRow) -> Result<()>,
    ) -> Result<()> {
        read_rows(self, sql, params, &mut |row| f(&row))
    }
}

thread_local! {
    /// Column names by statement text, so a query does not allocate them again.
    static COLUMNS: std::cell::RefCell<std::collections::HashMap<String, Arc<[String]>>> =
        std::cell::RefCell::default();
}

/// The statement's column names, shared by every query of the same text (at most 512
/// texts kept per thread; statements built at run time do not grow it without bound).
fn column_names(sql: &str, stmt: &rusqlite::Statement<'_>) -> Arc<[String]> {
    COLUMNS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(names) = cache.get(sql) {
            if names.len() == stmt.column_count() {
                return names.clone();
            }
        }
        if cache.len() >= 512 {
            cache.clear();
        }
        let names: Arc<[String]> = stmt.column_names().into_iter().map(str::to_owned).collect();
        cache.insert(sql.to_owned(), names.clone());
        names
    })
}

/// Runs a query and hands each row over as it is read.
fn read_rows(
    conn: &rusqlite::Connection,
    sql: &str,
    params: &[V],
    f: &mut dyn FnMut(SqlRow) -> Result<()>,
) -> Result<()> {
    use rusqlite::types::ValueRef;
    let mut stmt = conn.prepare_cached(sql).map_err(error)?;
    let columns = column_names(sql, &stmt);
    let mut rows = stmt
        .query(rusqlite::params_from_iter(params))
        .map_err(error)?;
    while let Some(row) = rows.next().map_err(error)? {
        let mut values = Vec::with_capacity(columns.len());
        for i in 0..columns.len() {
            values.push(match row.get_ref(i).map_err(error)? {
                ValueRef::Null => V::N,
                ValueRef::Integer(v) => V::I(v),
                ValueRef::Text(t) => V::T(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Real(f) => V::T(f.to_string()),
                ValueRef::Blob(b) => V::T(String::from_utf8_lossy(b).into_owned()),
            });
        }
        f(SqlRow::new(columns.clone(), values))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p;

    #[test]
    fn a_statement_runs_and_its_rows_read_by_name() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        migrate(
            &conn,
            &["CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)"],
        )
        .unwrap();
        // A second run applies nothing (the table would already exist).
        migrate(
            &conn,
            &["CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)"],
        )
        .unwrap();
        let db: &dyn Db = &conn;
        assert_eq!(
            db.execute("INSERT INTO t (id, name) VALUES (?1, ?2)", p![1i64, "a"])
                .unwrap(),
            1
        );
        let name: String = db
            .row("SELECT id, name FROM t WHERE id = ?1", p![1i64], |r| {
                r.col("name")
            })
            .unwrap();
        assert_eq!(name, "a");
        let mut seen = Vec::new();
        db.each("SELECT name FROM t", &[], &mut |r| {
            seen.push(r.col::<String>("name")?);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, ["a"]);
        let arrays = db.execute("SELECT ?1", &[V::Is(vec![1])]);
        assert!(matches!(arrays, Err(Error::Internal(_))), "{arrays:?}");
    }
}
