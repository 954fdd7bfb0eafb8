//! PostgreSQL: the [`Db`] executor over a pooled synchronous connection, the pool, the
//! error mapping, the migration runner and async connections (LISTEN, session locks).
//!
//! # Connections
//!
//! A [`Pool`] owns a few connections, each on its own thread (the synchronous `postgres`
//! client): a task runs on whichever is free, a broken connection is replaced on the next
//! task, and a task finding no server fails as UNAVAILABLE. No wait is unbounded: a lock
//! held elsewhere for 10 s (a stuck client, a long maintenance transaction) fails the
//! statement as UNAVAILABLE, so does a statement running for 60 s, and a server that stops
//! answering (a network partition) is noticed through TCP keepalives, not waited on.
//!
//! # Transactions
//!
//! [`PgDb::begin`] opens a transaction on a [`Conn`] and is the [`Db`] the SQL runs
//! against; statements are prepared once per connection. The caller commits
//! ([`PgDb::commit`]) or drops it (a rollback). [`Failed::retry`] tells a conflict (a
//! serialization failure, a deadlock, a unique key taken by a concurrent insert: running
//! the transaction again resolves it) from a failure; [`retrying`] runs an attempt again
//! after a conflict, with a jittered backoff, and gives up as ABORTED.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Duration;

use postgres::types::{IsNull, ToSql, Type};
pub use postgres::{Client, IsolationLevel, Statement, Transaction};
use service_kit::error::{Error, Result};
use service_kit::pg::MakeRustlsConnect;
use tokio::sync::oneshot;

use crate::{Db, Dialect, SqlRow, V};

// ---- errors ----

/// What a PostgreSQL error means for the caller: the server shutting down or out of
/// resources (classes 57, 53), the connection (08), a read-only server after a failover
/// (25006), the socket itself or a lock wait timing out: UNAVAILABLE (retryable); a conflict
/// ([`is_conflict`]) ABORTED; anything else INTERNAL with its whole chain (for the log;
/// callers see a fixed text).
pub fn error(e: &postgres::Error) -> Error {
    let transient = match e.as_db_error() {
        Some(d) => {
            let code = d.code().code();
            matches!(&code[..2], "57" | "53" | "08") || code == "25006"
        }
        None => std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
    };
    let lock_wait = e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE);
    if e.is_closed() || transient || lock_wait {
        Error::Unavailable(format!("PostgreSQL: {e}; retry"))
    } else if is_conflict(e) {
        Error::Aborted(format!("concurrent changes kept conflicting ({e}); retry"))
    } else {
        Error::Internal(format!("PostgreSQL: {}", service_kit::error::chain(e)))
    }
}

/// Serialization failure, deadlock, or a unique key taken by a concurrent insert: running
/// the transaction again resolves it.
pub fn is_conflict(e: &postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| matches!(c.code(), "40001" | "40P01" | "23505"))
}

/// A failed transaction attempt: the error, and whether running it again may succeed.
#[derive(Debug)]
pub struct Failed {
    /// The error for the caller.
    pub error: Error,
    /// A conflict: the attempt may succeed when run again.
    pub retry: bool,
}

impl From<postgres::Error> for Failed {
    fn from(e: postgres::Error) -> Self {
        Self {
            retry: is_conflict(&e),
            error: error(&e),
        }
    }
}

impl From<Error> for Failed {
    fn from(error: Error) -> Self {
        Self {
            error,
            retry: false,
        }
    }
}

/// How many times a conflicting transaction runs before ABORTED.
pub const MAX_ATTEMPTS: u32 = 30;

/// Runs `attempt` until it succeeds, fails without a conflict, or has conflicted
/// [`MAX_ATTEMPTS`] times; `conflicted` is told of each conflict before the next attempt.
pub fn retrying<T>(
    mut attempt: impl FnMut() -> std::result::Result<T, Failed>,
    mut conflicted: impl FnMut(&Error, u32),
) -> Result<T> {
    let mut n = 0;
    loop {
        n += 1;
        match attempt() {
            Ok(v) => return Ok(v),
            Err(f) if f.retry && n < MAX_ATTEMPTS => {
                conflicted(&f.error, n);
                backoff(n);
            }
            Err(f) => return Err(f.error),
        }
    }
}

/// Sleeps before attempt `n + 1`: longer the more attempts, jittered so two conflicting
/// writers do not meet again.
pub fn backoff(n: u32) {
    let micros = 200 * u64::from(n) + u64::from(jitter()) % 500;
    std::thread::sleep(Duration::from_micros(micros));
}

fn jitter() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    (h.finish() & 0xffff) as u16
}

// ---- Db over a transaction ----

/// A NULL of whatever type the statement expects.
#[derive(Debug)]
struct Null;

impl ToSql for Null {
    fn to_sql(
        &self,
        _: &Type,
        _: &mut postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(IsNull::Yes)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    postgres::types::to_sql_checked!();
}

/// SQLite's `?N` placeholders as PostgreSQL's `$N` (outside string literals).
pub fn dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

/// One pooled connection: the client and its prepared statements.
pub struct Conn {
    /// The client, for what the [`Db`] surface does not cover (the log's tail, for one).
    pub client: Client,
    statements: Statements,
}

/// Prepared statements by their text, with their column names.
type Statements = HashMap<String, (Statement, Arc<[String]>)>;

impl Conn {
    /// A connection with an empty statement cache.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            statements: HashMap::new(),
        }
    }

    /// Runs one query outside a transaction (its own snapshot, one round trip).
    pub fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<SqlRow>> {
        let (statement, columns) = match self.statements.get(sql) {
            Some(s) => s.clone(),
            None => {
                let s = self
                    .client
                    .prepare(&dollar_placeholders(sql))
                    .map_err(|e| error(&e))?;
                let prepared = (s.clone(), column_names(&s));
                self.statements.insert(sql.to_owned(), prepared.clone());
                prepared
            }
        };
        let values = pg_params(params);
        let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(AsRef::as_ref).collect();
        let rows = self
            .client
            .query(&statement, &refs)
            .map_err(|e| error(&e))?;
        rows.iter().map(|r| pg_row(r, &columns)).collect()
    }

    /// Runs `f` in a read-only REPEATABLE READ transaction (one snapshot).
    pub fn read<T>(&mut self, f: impl FnOnce(&dyn Db) -> Result<T>) -> Result<T> {
        let db = PgDb::begin(self, IsolationLevel::RepeatableRead, true).map_err(|e| error(&e))?;
        let result = f(&db);
        let _ = db.commit();
        result
    }
}

/// A transaction begun by a batch of ours (`START TRANSACTION ...`, alone or with the
/// statements that travel with it): committed by [`PgDb::commit`], rolled back when dropped
/// otherwise (as the library's own transactions are).
struct OwnTx<'a> {
    client: &'a mut Client,
    open: bool,
}

impl Drop for OwnTx<'_> {
    fn drop(&mut self) {
        if self.open {
            // A broken connection is dropped by its pool anyway.
            let _ = self.client.batch_execute("ROLLBACK");
        }
    }
}

impl OwnTx<'_> {
    fn commit(mut self) -> std::result::Result<(), postgres::Error> {
        self.open = false;
        self.client.batch_execute("COMMIT")
    }
}

/// The statement that begins a transaction of `isolation`, read-only or not (what the
/// client library sends for its own transactions).
fn start_transaction(isolation: IsolationLevel, read_only: bool) -> String {
    let level = match isolation {
        IsolationLevel::ReadUncommitted => "READ UNCOMMITTED",
        IsolationLevel::ReadCommitted => "READ COMMITTED",
        IsolationLevel::RepeatableRead => "REPEATABLE READ",
        _ => "SERIALIZABLE",
    };
    let access = if read_only { "READ ONLY" } else { "READ WRITE" };
    format!("START TRANSACTION ISOLATION LEVEL {level}, {access}")
}

/// A transaction on a pooled connection, as SQL written against [`Db`] sees it.
pub struct PgDb<'a> {
    tx: RefCell<OwnTx<'a>>,
    statements: RefCell<&'a mut Statements>,
    /// The last PostgreSQL error, so a runner can tell a conflict (retry) from a failure.
    last_error: RefCell<Option<postgres::Error>>,
}

impl<'a> PgDb<'a> {
    /// Begins a transaction on `conn`.
    pub fn begin(
        conn: &'a mut Conn,
        isolation: IsolationLevel,
        read_only: bool,
    ) -> std::result::Result<Self, postgres::Error> {
        Self::begin_with(conn, &start_transaction(isolation, read_only))
    }

    /// Begins a transaction on `conn` with `batch`: statements without parameters, the
    /// first of them `START TRANSACTION ...`, sent together in one round trip (say, the
    /// transaction and the locks it takes first). If the batch fails, the transaction is
    /// rolled back.
    pub fn begin_with(
        conn: &'a mut Conn,
        batch: &str,
    ) -> std::result::Result<Self, postgres::Error> {
        let Conn { client, statements } = conn;
        let own = OwnTx { client, open: true };
        own.client.batch_execute(batch)?;
        Ok(Self {
            tx: RefCell::new(own),
            statements: RefCell::new(statements),
            last_error: RefCell::new(None),
        })
    }

    /// Runs statements without parameters (`SAVEPOINT`, `NOTIFY`, several at once).
    pub fn batch(&self, sql: &str) -> Result<()> {
        self.tx
            .borrow_mut()
            .client
            .batch_execute(sql)
            .map_err(|e| self.fail(e))
    }

    /// `error` as a failed attempt: a retry when the statement that failed last conflicted
    /// (clears the record of it).
    pub fn failed(&self, error: Error) -> Failed {
        let retry = self
            .last_error
            .borrow_mut()
            .take()
            .is_some_and(|e| is_conflict(&e));
        Failed { error, retry }
    }

    /// Whether a statement failed since the last [`PgDb::failed`] or [`PgDb::clear_error`]
    /// (the transaction is then aborted: PostgreSQL takes no more statements in it).
    pub fn statement_failed(&self) -> bool {
        self.last_error.borrow().is_some()
    }

    /// Forgets the last statement's error (a savepoint rolled back past it).
    pub fn clear_error(&self) {
        self.last_error.borrow_mut().take();
    }

    /// Commits.
    pub fn commit(self) -> std::result::Result<(), Failed> {
        self.tx.into_inner().commit().map_err(Failed::from)
    }

    /// The prepared statement of `sql` and its column names.
    fn statement(&self, sql: &str) -> Result<(Statement, Arc<[String]>)> {
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok(s.clone());
        }
        let statement = self
            .tx
            .borrow_mut()
            .client
            .prepare(&dollar_placeholders(sql))
            .map_err(|e| self.fail(e))?;
        let prepared = (statement.clone(), column_names(&statement));
        self.statements
            .borrow_mut()
            .insert(sql.to_owned(), prepared.clone());
        Ok(prepared)
    }

    fn fail(&self, e: postgres::Error) -> Error {
        let mapped = error(&e);
        *self.last_error.borrow_mut() = Some(e);
        mapped
    }
}

fn pg_params(params: &[V]) -> Vec<Box<dyn ToSql + Sync>> {
    params
        .iter()
        .map(|v| -> Box<dyn ToSql + Sync> {
            match v {
                V::I(i) => Box::new(*i),
                V::T(s) => Box::new(s.clone()),
                V::N => Box::new(Null),
                V::Is(a) => Box::new(a.clone()),
                V::Ts(a) => Box::new(a.clone()),
            }
        })
        .collect()
}

fn column_names(statement: &Statement) -> Arc<[String]> {
    statement
        .columns()
        .iter()
        .map(|c| c.name().to_owned())
        .collect()
}

fn pg_row(row: &postgres::Row, columns: &Arc<[String]>) -> Result<SqlRow> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let ty = column.type_();
        let bad = |e: postgres::Error| Error::Internal(format!("column {}: {e}", column.name()));
        let v = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)
                .map_err(bad)?
                .map_or(V::N, V::I)
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)
                .map_err(bad)?
                .map_or(V::N, |v| V::I(v.into()))
        } else if *ty == Type::INT2 {
            row.try_get::<_, Option<i16>>(i)
                .map_err(bad)?
                .map_or(V::N, |v| V::I(v.into()))
        } else if *ty == Type::BOOL {
            row.try_get::<_, Option<bool>>(i)
                .map_err(bad)?
                .map_or(V::N, |v| V::I(v.into()))
        } else {
            row.try_get::<_, Option<String>>(i)
                .map_err(bad)?
                .map_or(V::N, V::T)
        };
        values.push(v);
    }
    Ok(SqlRow::new(columns.clone(), values))
}

impl Db for PgDb<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&self, sql: &str, params: &[V]) -> Result<u64> {
        if params.is_empty() && !sql.contains('?') {
            // SAVEPOINT and friends: no statement to prepare.
            return self.batch(sql).map(|()| 0);
        }
        let values = pg_params(params);
        let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(AsRef::as_ref).collect();
        let (statement, _) = self.statement(sql)?;
        self.tx
            .borrow_mut()
            .client
            .execute(&statement, &refs)
            .map_err(|e| self.fail(e))
    }

    fn query(&self, sql: &str, params: &[V]) -> Result<Vec<SqlRow>> {
        let values = pg_params(params);
        let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(AsRef::as_ref).collect();
        let (statement, columns) = self.statement(sql)?;
        let rows = self
            .tx
            .borrow_mut()
            .client
            .query(&statement, &refs)
            .map_err(|e| self.fail(e))?;
        rows.iter().map(|r| pg_row(r, &columns)).collect()
    }

    fn each(
        &self,
        sql: &str,
        params: &[V],
        f: &mut dyn FnMut(&SqlRow) -> Result<()>,
    ) -> Result<()> {
        use postgres::fallible_iterator::FallibleIterator;
        let values = pg_params(params);
        let (statement, columns) = self.statement(sql)?;
        let mut tx = self.tx.borrow_mut();
        let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(AsRef::as_ref).collect();
        let mut rows = tx
            .client
            .query_raw(&statement, refs)
            .map_err(|e| self.fail(e))?;
        while let Some(row) = rows.next().map_err(|e| self.fail(e))? {
            f(&pg_row(&row, &columns)?)?;
        }
        Ok(())
    }
}

// ---- connecting ----

/// The URL the client understands and the TLS its `sslmode` asks for (see
/// [`service_kit::pg`]).
fn tls(url: &str) -> Result<(String, MakeRustlsConnect)> {
    service_kit::pg::connector(url).map_err(|e| Error::Unavailable(format!("PostgreSQL: {e:#}")))
}

/// Timeouts every connection gets (see the module's documentation).
const SESSION: &str = "SET lock_timeout = '10s'; SET statement_timeout = '60s'";

/// A synchronous connection to `url`, set up with `init` (SQL) after connecting.
pub fn connect(url: &str, init: &str) -> Result<Client> {
    let (url, tls) = tls(url)?;
    let mut config: postgres::Config = url.parse().map_err(|e| error(&e))?;
    config
        .connect_timeout(Duration::from_secs(5))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .tcp_user_timeout(Duration::from_secs(30));
    let mut client = config.connect(tls).map_err(|e| error(&e))?;
    client.batch_execute(SESSION).map_err(|e| error(&e))?;
    if !init.is_empty() {
        client.batch_execute(init).map_err(|e| error(&e))?;
    }
    Ok(client)
}

/// The connection half of an async client: whoever holds it drives it (and reads its
/// notifications with `poll_message`).
pub type AsyncConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// An async connection to `url` (for LISTEN and session-level locks), with the same
/// timeouts and keepalives as the pool's; the caller drives the connection half.
pub async fn connect_async(url: &str) -> Result<(tokio_postgres::Client, AsyncConnection)> {
    let (url, tls) = tls(url)?;
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| error(&e))?;
    config
        .connect_timeout(Duration::from_secs(5))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .tcp_user_timeout(Duration::from_secs(30));
    config.connect(tls).await.map_err(|e| error(&e))
}

/// [`connect_async`] with the connection driven by a task of its own (which ends with it).
pub async fn connect_spawned(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = connect_async(url).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Applies the embedded migrations the database has not seen (tracked in
/// `schema_migrations`), in one transaction under the advisory lock `lock`, so replicas
/// starting together apply them once. A runtime role without CREATE on the schema opens an
/// up-to-date database: no DDL runs unless a migration is due.
pub fn migrate(client: &mut Client, lock: i64, migrations: &[&str]) -> Result<()> {
    let e = |e: postgres::Error| error(&e);
    let mut tx = client.transaction().map_err(e)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
        .map_err(e)?;
    let tracked: bool = tx
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .map_err(e)?
        .get(0);
    if !tracked {
        tx.batch_execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
            .map_err(e)?;
    }
    let applied: i64 = tx
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .map_err(e)?
        .get(0);
    let applied = usize::try_from(applied).unwrap_or(0);
    for (i, m) in migrations.iter().enumerate().skip(applied) {
        tx.batch_execute(m).map_err(e)?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .map_err(e)?;
    }
    tx.commit().map_err(e)
}

// ---- the pool ----

type Task = Box<dyn FnOnce(&mut Option<Conn>) + Send>;

/// What a [`Pool`] connects to and how.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The pool's name: its threads' names and the `pool` label of the wait metric.
    pub name: &'static str,
    /// The `postgres://` URL.
    pub url: String,
    /// Connections (and threads).
    pub size: usize,
    /// SQL run on every new connection (a `search_path`, `synchronous_commit`).
    pub init: String,
    /// A histogram of how long tasks waited for a connection, in seconds.
    pub wait_metric: Option<&'static str>,
}

/// Connections, each owned by a thread that runs one task at a time.
pub struct Pool {
    name: &'static str,
    wait_metric: Option<&'static str>,
    tasks: Mutex<Option<std_mpsc::Sender<Task>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("name", &self.name).finish()
    }
}

impl Pool {
    /// Starts the pool's threads (they connect on their first task).
    pub fn start(config: PoolConfig) -> Result<Self> {
        let (tx, rx) = std_mpsc::channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..config.size.max(1) {
            let (rx, url, init) = (rx.clone(), config.url.clone(), config.init.clone());
            let handle = std::thread::Builder::new()
                .name(format!("pg-{}-{i}", config.name))
                .spawn(move || {
                    let mut conn: Option<Conn> = None;
                    loop {
                        let task = {
                            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                            rx.recv()
                        };
                        let Ok(task) = task else { return };
                        if conn.as_ref().is_some_and(|c| c.client.is_closed()) {
                            conn = None;
                        }
                        if conn.is_none() {
                            match connect(&url, &init) {
                                Ok(client) => conn = Some(Conn::new(client)),
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot connect to PostgreSQL")
                                }
                            }
                        }
                        task(&mut conn);
                    }
                })
                .map_err(Error::internal)?;
            threads.push(handle);
        }
        Ok(Self {
            name: config.name,
            wait_metric: config.wait_metric,
            tasks: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    /// Runs `f` on a connection thread; UNAVAILABLE when no connection can be made or the
    /// pool is closed.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let (queued, pool, metric) = (std::time::Instant::now(), self.name, self.wait_metric);
        let task: Task = Box::new(move |conn| {
            if let Some(metric) = metric {
                metrics::histogram!(metric, "pool" => pool).record(queued.elapsed().as_secs_f64());
            }
            let result = match conn.as_mut() {
                Some(c) => f(c),
                None => Err(Error::Unavailable(
                    "PostgreSQL is unreachable; retry".into(),
                )),
            };
            if matches!(result, Err(Error::Unavailable(_))) {
                // A broken connection is replaced on the next task.
                if conn.as_ref().is_some_and(|c| c.client.is_closed()) {
                    *conn = None;
                }
            }
            let _ = tx.send(result);
        });
        {
            let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            let sender = tasks
                .as_ref()
                .ok_or_else(|| Error::Unavailable("the store is closed".into()))?;
            sender
                .send(task)
                .map_err(|_| Error::Unavailable("the store is closed".into()))?;
        }
        rx.await
            .map_err(|_| Error::Unavailable("the store is closed".into()))?
    }

    /// Lets the queued tasks finish and stops the threads.
    pub async fn close(&self) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transaction begun for an isolation level and access mode runs at that level and
    /// refuses writes when read-only.
    #[test]
    fn a_transaction_has_the_isolation_and_access_it_was_begun_with() {
        let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
            eprintln!("TEST_DATABASE_URL is not set: skipped");
            return;
        };
        let mut conn = Conn::new(connect(&url, "").unwrap());
        for (isolation, name) in [
            (IsolationLevel::ReadCommitted, "read committed"),
            (IsolationLevel::RepeatableRead, "repeatable read"),
            (IsolationLevel::Serializable, "serializable"),
        ] {
            for read_only in [true, false] {
                let db = PgDb::begin(&mut conn, isolation, read_only).unwrap();
                let rows = (&db as &dyn Db)
                    .query("SHOW transaction_isolation", &[])
                    .unwrap();
                assert_eq!(rows[0].get::<String>(0).unwrap(), name);
                let write = db.batch("CREATE TEMP TABLE store_kit_access (v INT)");
                assert_eq!(write.is_err(), read_only, "{name} read_only={read_only}");
                drop(db);
            }
        }
    }

    /// A transaction begun with a batch: its statements run in it (a row it locks stays
    /// locked for another session until it ends), it commits, and it is rolled back when
    /// dropped uncommitted or when the batch fails.
    #[test]
    fn a_transaction_begun_with_a_batch_commits_or_rolls_back() {
        let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
            eprintln!("TEST_DATABASE_URL is not set: skipped");
            return;
        };
        let table = format!("store_kit_begin_with_{}", std::process::id());
        let mut other = connect(&url, "SET lock_timeout = '100ms'").unwrap();
        other
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v BIGINT PRIMARY KEY); INSERT INTO {table} VALUES (1)"
            ))
            .unwrap();
        let mut conn = Conn::new(connect(&url, "").unwrap());
        let values = |c: &mut Client| -> Vec<i64> {
            c.query(&format!("SELECT v FROM {table} ORDER BY v"), &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        };
        let begin = format!(
            "START TRANSACTION ISOLATION LEVEL READ COMMITTED; SELECT 1 FROM {table} WHERE v = 1 FOR UPDATE"
        );

        // Locked by the batch; written and dropped: rolled back, the lock released.
        let db = PgDb::begin_with(&mut conn, &begin).unwrap();
        let locked = other.batch_execute(&format!("UPDATE {table} SET v = 1 WHERE v = 1"));
        assert!(locked.is_err(), "the batch's lock was not held");
        (&db as &dyn Db)
            .execute(&format!("INSERT INTO {table} VALUES (?1)"), &[V::I(2)])
            .unwrap();
        drop(db);
        assert_eq!(values(&mut other), [1], "dropped uncommitted: rolled back");
        other
            .batch_execute(&format!("UPDATE {table} SET v = 1 WHERE v = 1"))
            .unwrap();

        // Committed.
        let db = PgDb::begin_with(&mut conn, &begin).unwrap();
        (&db as &dyn Db)
            .execute(&format!("INSERT INTO {table} VALUES (?1)"), &[V::I(3)])
            .unwrap();
        db.commit().unwrap();
        assert_eq!(values(&mut other), [1, 3]);

        // A batch that fails leaves no transaction open on the connection.
        let failed = PgDb::begin_with(
            &mut conn,
            "START TRANSACTION; INSERT INTO no_such_table_here VALUES (1)",
        )
        .is_err();
        assert!(failed);
        conn.client
            .batch_execute(&format!("INSERT INTO {table} VALUES (4)"))
            .unwrap();
        assert_eq!(
            values(&mut other),
            [1, 3, 4],
            "autocommit again after a failed batch"
        );
        other.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    }

    #[test]
    fn placeholders_are_rewritten_outside_literals() {
        assert_eq!(
            dollar_placeholders("SELECT ?1, '?' WHERE a = ?2"),
            "SELECT $1, '?' WHERE a = $2"
        );
    }
}
