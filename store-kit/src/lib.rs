//! The storage layer both services write their SQL against, so every read and write is
//! written once and runs on SQLite (the embedded default) and on PostgreSQL (replicas).
//!
//! # Layout
//!
//! - [`Db`]: a connection inside a transaction. Statements are written once with SQLite's
//!   numbered placeholders (`?1`, `?2`, ...), which the PostgreSQL executor rewrites to `$1`,
//!   `$2`, ... Parameters are [`V`] values (made with [`p!`]); rows come back as [`SqlRow`]s
//!   of owned values, read by position (`get`) or by column name (`col`), strictly: a
//!   column of another type is an internal error, never a default. The few statements that
//!   differ by dialect ask the connection's [`Dialect`].
//! - [`sqlite`]: the executor over a `rusqlite` connection, the SQLite error mapping and
//!   the migration runner (`user_version`).
//! - [`postgres`]: the executor over a pooled synchronous PostgreSQL connection with its
//!   prepared-statement cache, the connection pool (a thread per connection), the error
//!   mapping (transient: UNAVAILABLE; conflicts: retried, then ABORTED), the migration
//!   runner (under an advisory lock) and an async connection for LISTEN and session locks.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use service_kit::error::{Error, Result};

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
    /// An array of integers (PostgreSQL only: `unnest(?1::bigint[])`).
    Is(Vec<i64>),
    /// An array of text (PostgreSQL only: `unnest(?1::text[])`).
    Ts(Vec<String>),
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

/// Values a parameter is made from (by reference, so [`p!`] never moves its arguments).
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
impl ToV for V {
    fn to_v(&self) -> V {
        self.clone()
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
#[macro_export]
macro_rules! p {
    ($($v:expr),* $(,)?) => { &[$($crate::ToV::to_v(&$v)),*] };
}

/// One result row: its values and the names of its columns (shared by the rows of one
/// result).
#[derive(Debug, Clone)]
pub struct SqlRow {
    columns: Arc<[String]>,
    values: Vec<V>,
}

impl SqlRow {
    /// A row of `values` named by `columns`.
    pub fn new(columns: Arc<[String]>, values: Vec<V>) -> Self {
        Self { columns, values }
    }

    /// Column `i` as `T` (INTERNAL when it is missing or holds another type).
    pub fn get<T: FromV>(&self, i: usize) -> Result<T> {
        let v = self
            .values
            .get(i)
            .ok_or_else(|| Error::Internal(format!("no column {i}")))?;
        T::from_v(v)
            .ok_or_else(|| Error::Internal(format!("column {i} has an unexpected type: {v:?}")))
    }

    /// The column named `name` as `T` (INTERNAL when there is none or it holds another
    /// type).
    pub fn col<T: FromV>(&self, name: &str) -> Result<T> {
        let i = self
            .columns
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| Error::Internal(format!("no column {name:?}")))?;
        let v = &self.values[i];
        T::from_v(v).ok_or_else(|| {
            Error::Internal(format!("column {name:?} has an unexpected type: {v:?}"))
        })
    }

    /// The values, by position.
    pub fn values(&self) -> &[V] {
        &self.values
    }

    /// The row without its first `n` columns (a statement that reads a header beside the
    /// rows a reader of their own decodes).
    pub fn skip(&self, n: usize) -> SqlRow {
        let n = n.min(self.values.len());
        SqlRow {
            columns: self.columns.iter().skip(n).cloned().collect(),
            values: self.values[n..].to_vec(),
        }
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
    /// Runs a query and hands each row to `f` as it is read, keeping none (a large table
    /// read at start costs one row of memory, not the table).
    fn each(&self, sql: &str, params: &[V], f: &mut dyn FnMut(&SqlRow) -> Result<()>)
        -> Result<()>;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_read_strictly_by_position_and_by_name() {
        let row = SqlRow::new(
            Arc::from(vec!["id".to_owned(), "name".to_owned(), "gone".to_owned()]),
            vec![V::I(7), V::T("web".into()), V::N],
        );
        assert_eq!(row.get::<i64>(0).unwrap(), 7);
        assert_eq!(row.col::<String>("name").unwrap(), "web");
        assert_eq!(row.col::<Option<i64>>("gone").unwrap(), None);
        assert!(matches!(row.col::<i64>("name"), Err(Error::Internal(_))));
        assert!(matches!(row.col::<i64>("missing"), Err(Error::Internal(_))));
        assert!(matches!(row.get::<String>(3), Err(Error::Internal(_))));
        assert!(matches!(row.col::<i64>("gone"), Err(Error::Internal(_))));
    }
}
