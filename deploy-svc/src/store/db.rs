//! The little SQL surface the store's logic needs, so one implementation of every read and
//! write runs on SQLite and on PostgreSQL.
//!
//! Statements are written once with SQLite's numbered placeholders (`?1`, `?2`, ...), which
//! the PostgreSQL side rewrites to `$1`, `$2`, ... Values are integers, text or NULL (both
//! schemas store booleans and enums as integers); rows come back as owned values read by
//! position. The few statements that differ by dialect ask [`Db::dialect`].

use crate::domain::{Error, Result};

/// Which SQL dialect a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A statement parameter or a column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V {
    /// An integer (booleans are 0 and 1).
    I(i64),
    /// Text.
    T(String),
    /// NULL.
    N,
}

impl From<i64> for V {
    fn from(v: i64) -> Self {
        V::I(v)
    }
}
impl From<String> for V {
    fn from(v: String) -> Self {
        V::T(v)
    }
}

/// Values a parameter is made from (by reference, so `p!` never moves its arguments).
pub trait ToV {
    /// The parameter.
    fn to_v(&self) -> V;
}
impl ToV for i64 {
    fn to_v(&self) -> V {
        V::I(*self)
    }
}
impl ToV for bool {
    fn to_v(&self) -> V {
        V::I(i64::from(*self))
    }
}
impl ToV for str {
    fn to_v(&self) -> V {
        V::T(self.to_owned())
    }
}
impl ToV for String {
    fn to_v(&self) -> V {
        V::T(self.clone())
    }
}
impl<T: ToV> ToV for Option<T> {
    fn to_v(&self) -> V {
        self.as_ref().map_or(V::N, ToV::to_v)
    }
}
impl<T: ToV + ?Sized> ToV for &T {
    fn to_v(&self) -> V {
        (**self).to_v()
    }
}

/// Parameters: `p![a, b, c]` is `&[a.to_v(), b.to_v(), c.to_v()]`.
macro_rules! p {
    ($($v:expr),* $(,)?) => { &[$($crate::store::db::ToV::to_v(&$v)),*] };
}
pub(crate) use p;

/// One result row.
#[derive(Debug, Clone)]
pub struct SqlRow(pub Vec<V>);

impl SqlRow {
    /// Column `i` as `T`.
    pub fn get<T: FromV>(&self, i: usize) -> Result<T> {
        let v = self
            .0
            .get(i)
            .ok_or_else(|| Error::Internal(format!("no column {i}")))?;
        T::from_v(v)
            .ok_or_else(|| Error::Internal(format!("column {i} has an unexpected type: {v:?}")))
    }
}

/// Column types a row converts to.
pub trait FromV: Sized {
    /// The value, or `None` when the column holds another type.
    fn from_v(v: &V) -> Option<Self>;
}
impl FromV for i64 {
    fn from_v(v: &V) -> Option<Self> {
        match v {
            V::I(i) => Some(*i),
            _ => None,
        }
    }
}
impl FromV for bool {
    fn from_v(v: &V) -> Option<Self> {
        i64::from_v(v).map(|i| i != 0)
    }
}
impl FromV for String {
    fn from_v(v: &V) -> Option<Self> {
        match v {
            V::T(s) => Some(s.clone()),
            _ => None,
        }
    }
}
impl<T: FromV> FromV for Option<T> {
    fn from_v(v: &V) -> Option<Self> {
        match v {
            V::N => Some(None),
            v => T::from_v(v).map(Some),
        }
    }
}

/// A connection inside a transaction.
pub trait Db {
    /// The dialect, for the few statements that differ.
    fn dialect(&self) -> Dialect;
    /// Runs a statement; returns the rows it changed.
    fn execute(&self, sql: &str, params: &[V]) -> Result<u64>;
    /// Runs a query; returns every row.
    fn query(&self, sql: &str, params: &[V]) -> Result<Vec<SqlRow>>;
}

impl dyn Db + '_ {
    /// The first row mapped by `f`, if any.
    pub fn one<T>(
        &self,
        sql: &str,
        params: &[V],
        f: impl FnOnce(&SqlRow) -> Result<T>,
    ) -> Result<Option<T>> {
        self.query(sql, params)?.first().map(f).transpose()
    }

    /// Every row mapped by `f`.
    pub fn all<T>(
        &self,
        sql: &str,
        params: &[V],
        f: impl FnMut(&SqlRow) -> Result<T>,
    ) -> Result<Vec<T>> {
        self.query(sql, params)?.iter().map(f).collect()
    }

    /// The first row mapped by `f`; INTERNAL when there is none.
    pub fn row<T>(
        &self,
        sql: &str,
        params: &[V],
        f: impl FnOnce(&SqlRow) -> Result<T>,
    ) -> Result<T> {
        self.one(sql, params, f)?
            .ok_or_else(|| Error::Internal(format!("no row for: {sql}")))
    }

    /// The first column of the first row, if any.
    pub fn value<T: FromV>(&self, sql: &str, params: &[V]) -> Result<Option<T>> {
        self.one(sql, params, |r| r.get(0))
    }
}

// ---- SQLite ----

fn sqlite_error(e: rusqlite::Error) -> Error {
    service_kit::sqlite::error(e)
}

impl rusqlite::ToSql for V {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            V::I(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            V::T(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            V::N => ToSqlOutput::Borrowed(ValueRef::Null),
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
            .map_err(sqlite_error)?
            .execute(rusqlite::params_from_iter(params))
            .map_err(sqlite_error)?;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }

    fn query(&self, sql: &str, params: &[V]) -> Result<Vec<SqlRow>> {
        use rusqlite::types::ValueRef;
        let mut stmt = self.prepare_cached(sql).map_err(sqlite_error)?;
        let columns = stmt.column_count();
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params))
            .map_err(sqlite_error)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sqlite_error)? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                values.push(match row.get_ref(i).map_err(sqlite_error)? {
                    ValueRef::Null => V::N,
                    ValueRef::Integer(v) => V::I(v),
                    ValueRef::Text(t) => V::T(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Real(f) => V::T(f.to_string()),
                    ValueRef::Blob(b) => V::T(String::from_utf8_lossy(b).into_owned()),
                });
            }
            out.push(SqlRow(values));
        }
        Ok(out)
    }
}
