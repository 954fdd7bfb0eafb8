//! The PostgreSQL backend (a `postgres://` database URL), for several replicas of deploy-svc
//! on one database. The application layer is the shared one ([`crate::app`]); this file owns
//! connections, transactions and the placement log's tail.
//!
//! # Writes
//!
//! A pool of connections, each on its own thread (the synchronous `postgres` client). Each
//! write is one SERIALIZABLE transaction, retried on a serialization failure, a deadlock
//! or a unique violation from a concurrent insert; PostgreSQL's group commit batches
//! concurrent commits. A placement report (the hot path) is the exception ([`reports`]):
//! reports are queued and committed in groups, one READ COMMITTED transaction per group
//! after `SELECT ... FOR UPDATE` of the group's deployments' rows, which every write
//! touching a deployment updates, so reports of one deployment queue instead of aborting
//! each other (and a SERIALIZABLE write meeting a locked row fails and runs again). The
//! trigger that draws an event's sequence first forces the transaction's id
//! (`pg_current_xact_id()`), which the log's hole rule below relies on.
//!
//! # The log and the late commit
//!
//! `placement_events.seq` is drawn from a sequence inside the writing transaction, so a
//! transaction can commit a lower sequence after another committed a higher one. Nothing
//! serialises commits (that would cost PostgreSQL's group commit). Instead every replica
//! runs a tailer that delivers events in sequence order and stops at a hole. A hole at `k`
//! seen while a higher sequence is visible belongs to a transaction that drew `k` before
//! that higher one, so before the snapshot, and took its transaction id before drawing
//! (the trigger that draws forces the id first). Right after seeing the hole the tailer takes a fresh
//! transaction id `X` (above every id assigned so far, the filler's included); once the
//! oldest running transaction id (`pg_snapshot_xmin`) is above `X`, the filler has ended:
//! the hole is filled or never will be (a rollback), and the tailer moves past it. (The
//! snapshot's own `xmax` would not do: it is the newest *completed* id plus one, and a
//! transaction with a higher id may already be running: a first version used it and the
//! benchmark's cross-replica check caught a skipped event.) Every replica applies the same rule to the
//! same rows, so every replica delivers the same events in the same order: in commit order
//! for writes that touch the same rows (they serialise), and with no gaps other than
//! rolled-back sequences.
//!
//! # Wake-ups without a NOTIFY per write
//!
//! NOTIFY takes a database-wide lock at commit. Writes do not NOTIFY: after its commits a
//! replica sends one coalesced `NOTIFY` from a separate connection (at most one every 2 ms,
//! with `synchronous_commit = off`: it is only a wake-up), and every replica
//! LISTENs and then reads the table (catch-up read). A replica's own writes wake its
//! tailer directly; a lost notification costs at most the poll interval.

mod reports;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use postgres::types::{IsNull, ToSql, Type};
use postgres::{Client, IsolationLevel, Statement};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::backend::{internal, to_i64, to_u64, Backend, ReadJob, ReportLock, WriteJob};
use super::db::{Db, Dialect, SqlRow, V};
use super::log;
use crate::app::SqlStore;
use crate::domain::clock::Clock;
use crate::domain::model::{LogBounds, Placement, PlacementEvent};
use crate::domain::{Error, Result};
use crate::placement_log::Feed;

const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/postgres/0001_init.sql"),
    include_str!("../migrations/postgres/0002_audit_truncate.sql"),
    include_str!("../migrations/postgres/0003_trace_parent.sql"),
];

/// The notification channel.
const CHANNEL: &str = "deploy_svc_log";

/// How replicas learn about each other's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NotifyMode {
    /// One coalesced NOTIFY from a separate connection after local commits (the default).
    Coalesced,
    /// A NOTIFY inside every write transaction (the classic outbox; for comparison).
    PerTransaction,
    /// No notification: other replicas see writes at their next poll (for comparison).
    Off,
}

/// Options of the PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The `postgres://` URL.
    pub url: String,
    /// Connections (and threads) for reads and writes.
    pub pool_size: usize,
    /// Groups of placement reports committing at once, each on its own connection.
    pub report_groups: usize,
    /// Events kept in the log.
    pub retention: u64,
    /// How other replicas are woken.
    pub notify: NotifyMode,
    /// How often the tailer reads even without a wake-up.
    pub poll_interval: Duration,
}

impl PostgresOptions {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 8,
            report_groups: 2,
            retention: 1_000_000,
            notify: NotifyMode::Coalesced,
            poll_interval: Duration::from_millis(100),
        }
    }
}

/// The PostgreSQL store: the shared logic over the PostgreSQL backend.
pub type PostgresStore = SqlStore<PostgresBackend>;

/// The PostgreSQL backend.
pub struct PostgresBackend {
    pool: Arc<Pool>,
    /// Placement reports, committed in groups on their own connections ([`reports`]).
    reports: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Box<dyn reports::Queued>>>>,
    /// The task that groups them (awaited on close, so queued reports are committed).
    grouper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The tailer's own connection, so reading the log never queues behind writes.
    tail_pool: Arc<Pool>,
    feed: Arc<Feed>,
    clock: Arc<dyn Clock>,
    notify: NotifyMode,
    /// Rung after every local commit: the tailer reads, the notifier notifies.
    local_commit: Arc<Notify>,
    tail_wake: Arc<Notify>,
    /// Rung when another replica wrote (the agents' order streams re-read).
    remote: Arc<Notify>,
    stop: CancellationToken,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("notify", &self.notify)
            .finish_non_exhaustive()
    }
}

// ---- errors ----

/// What a PostgreSQL error means for the caller.
fn pg_error(e: &postgres::Error) -> Error {
    // The server shutting down or out of resources (57, 53), the connection (08), a
    // read-only server after a failover (25006), or the socket itself: retryable.
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
fn is_conflict(e: &postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| matches!(c.code(), "40001" | "40P01" | "23505"))
}

// ---- Db over a PostgreSQL transaction ----

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
fn dollar_placeholders(sql: &str) -> String {
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
struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
}

/// A transaction on a pooled connection, as the logic sees it.
struct PgDb<'a> {
    tx: std::cell::RefCell<postgres::Transaction<'a>>,
    statements: std::cell::RefCell<&'a mut HashMap<String, Statement>>,
    /// The last PostgreSQL error, so the runner can tell a conflict (retry) from a failure.
    last_error: std::cell::RefCell<Option<postgres::Error>>,
}

impl PgDb<'_> {
    fn statement(&self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok(s.clone());
        }
        let prepared = self
            .tx
            .borrow_mut()
            .prepare(&dollar_placeholders(sql))
            .map_err(|e| self.fail(e))?;
        self.statements
            .borrow_mut()
            .insert(sql.to_owned(), prepared.clone());
        Ok(prepared)
    }

    fn fail(&self, e: postgres::Error) -> Error {
        let mapped = pg_error(&e);
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
            }
        })
        .collect()
}

fn pg_row(row: &postgres::Row) -> Result<SqlRow> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let ty = column.type_();
        let bad = |e: postgres::Error| Error::Internal(format!("column {i}: {e}"));
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
    Ok(SqlRow(values))
}

impl Db for PgDb<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&self, sql: &str, params: &[V]) -> Result<u64> {
        let values = pg_params(params);
        let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(AsRef::as_ref).collect();
        if params.is_empty() && !sql.contains('?') {
            // SAVEPOINT and friends: no statement to prepare.
            return self
                .tx
                .borrow_mut()
                .batch_execute(sql)
                .map(|()| 0)
                .map_err(|e| self.fail(e));
        }
        let statement = self.statement(sql)?;
        self.tx
            .borrow_mut()
            .execute(&statement, &refs)
            .map_err(|e| self.fail(e))
    }

    fn query(&self, sql: &str, params: &[V]) -> Result<Vec<SqlRow>> {
        let values = pg_params(params);
        let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(AsRef::as_ref).collect();
        let statement = self.statement(sql)?;
        let rows = self
            .tx
            .borrow_mut()
            .query(&statement, &refs)
            .map_err(|e| self.fail(e))?;
        rows.iter().map(pg_row).collect()
    }
}

// ---- the connection pool ----

type Task = Box<dyn FnOnce(&mut Option<Conn>) + Send>;

/// Connections, each owned by a thread that runs one task at a time.
struct Pool {
    /// `write` or `tail`: the `pool` label of the wait metric.
    name: &'static str,
    tasks: Mutex<Option<std_mpsc::Sender<Task>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// A pooled connection. No wait is unbounded: a lock held elsewhere for 10 s (a stuck
/// client, a long maintenance transaction) fails the call as UNAVAILABLE instead of hanging
/// it, and so does a statement running for 60 s.
fn connect(url: &str, init: &str) -> Result<Client> {
    let (url, tls) = tls(url)?;
    let mut config: postgres::Config = url.parse().map_err(|e| pg_error(&e))?;
    // A server that stops answering (a network partition) is noticed, not waited on.
    config
        .connect_timeout(Duration::from_secs(5))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .tcp_user_timeout(Duration::from_secs(30));
    let mut client = config.connect(tls).map_err(|e| pg_error(&e))?;
    client
        .batch_execute("SET lock_timeout = '10s'; SET statement_timeout = '60s'")
        .map_err(|e| pg_error(&e))?;
    client.batch_execute(init).map_err(|e| pg_error(&e))?;
    Ok(client)
}

/// The URL the client understands and the TLS its `sslmode` asks for (see
/// [`service_kit::pg`]).
fn tls(url: &str) -> Result<(String, service_kit::pg::MakeRustlsConnect)> {
    service_kit::pg::connector(url).map_err(|e| Error::Unavailable(format!("PostgreSQL: {e:#}")))
}

impl Pool {
    /// `size` connections named `name`, each set up with `init` (SQL) after connecting.
    fn start(name: &'static str, url: &str, size: usize, init: &'static str) -> Result<Self> {
        let (tx, rx) = std_mpsc::channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..size.max(1) {
            let (rx, url) = (rx.clone(), url.to_owned());
            let handle = std::thread::Builder::new()
                .name(format!("pg-{i}"))
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
                            match connect(&url, init) {
                                Ok(client) => {
                                    conn = Some(Conn {
                                        client,
                                        statements: HashMap::new(),
                                    })
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot connect to PostgreSQL")
                                }
                            }
                        }
                        task(&mut conn);
                    }
                })
                .map_err(internal)?;
            threads.push(handle);
        }
        Ok(Self {
            name,
            tasks: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    /// Runs `f` on a connection thread; UNAVAILABLE when no connection can be made.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let (queued, pool) = (std::time::Instant::now(), self.name);
        let task: Task = Box::new(move |conn| {
            metrics::histogram!(crate::telemetry::POOL_WAIT_SECONDS, "pool" => pool)
                .record(queued.elapsed().as_secs_f64());
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

    async fn close(&self) {
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

/// How many times a conflicting write runs before ABORTED.
const MAX_ATTEMPTS: u32 = 30;

/// Runs one write transaction with retries.
fn run_write<T>(
    conn: &mut Conn,
    clock: &dyn Clock,
    notify: NotifyMode,
    job: &WriteJob<T>,
) -> Result<(T, u64)> {
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = write_once(conn, clock, notify, job);
            match outcome {
                Err((e, true)) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "write conflicted; running it again");
                    metrics::counter!(crate::telemetry::STORE_RETRIES).increment(1);
                    // Jittered backoff, growing with the attempts.
                    let micros = 200 * u64::from(attempt) + u64::from(rand_u16()) % 500;
                    std::thread::sleep(Duration::from_micros(micros));
                }
                Err((e, _)) => return Err(e),
                Ok(v) => return Ok(v),
            }
        }
    }
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    (h.finish() & 0xffff) as u16
}

/// One attempt: the error and whether running again may succeed.
fn write_once<T>(
    conn: &mut Conn,
    clock: &dyn Clock,
    notify: NotifyMode,
    job: &WriteJob<T>,
) -> std::result::Result<(T, u64), (Error, bool)> {
    let plain = |e: postgres::Error| {
        let retry = is_conflict(&e);
        (pg_error(&e), retry)
    };
    let started = std::time::Instant::now();
    let record = |outcome: &'static str| {
        metrics::histogram!(crate::telemetry::COMMIT_SECONDS, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
    };
    let tx = conn
        .client
        .build_transaction()
        .isolation_level(IsolationLevel::Serializable)
        .start()
        .map_err(plain)?;
    let db = PgDb {
        tx: std::cell::RefCell::new(tx),
        statements: std::cell::RefCell::new(&mut conn.statements),
        last_error: std::cell::RefCell::new(None),
    };
    let mut events = Vec::new();
    let result = job(&db, clock.now_ms(), &mut events);
    let PgDb { tx, last_error, .. } = db;
    let tx = tx.into_inner();
    match result {
        Ok(v) => {
            commit(tx, notify, started).map_err(plain)?;
            Ok((v, events.last().map_or(0, |e| e.sequence)))
        }
        Err(e) => {
            let retry = last_error.into_inner().is_some_and(|pe| is_conflict(&pe));
            let _ = tx.rollback();
            record("failed");
            Err((e, retry))
        }
    }
}

/// Commits `tx` (after its NOTIFY in [`NotifyMode::PerTransaction`]) and records the time
/// since `started` (its BEGIN) by outcome.
fn commit(
    mut tx: postgres::Transaction<'_>,
    notify: NotifyMode,
    started: std::time::Instant,
) -> std::result::Result<(), postgres::Error> {
    let committed = match notify {
        NotifyMode::PerTransaction => tx.batch_execute(&format!("NOTIFY {CHANNEL}")),
        _ => Ok(()),
    }
    .and_then(|()| tx.commit());
    let outcome = if committed.is_ok() {
        "committed"
    } else {
        "failed"
    };
    metrics::histogram!(crate::telemetry::COMMIT_SECONDS, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    committed
}

// ---- the tail of the log ----

/// A hole in the sequence: where it starts and a transaction id assigned after the
/// snapshot that saw it (so above the id of any transaction that could fill it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hole {
    start: u64,
    xid: i64,
}

/// The tailer's position.
#[derive(Debug, Clone, Copy)]
struct Tail {
    cursor: u64,
    hole: Option<Hole>,
}

/// A transaction id newer than every id assigned so far (a transaction of its own that
/// writes nothing).
fn fresh_xid(conn: &mut Conn) -> Result<i64> {
    let row = conn
        .client
        .query_one(
            "SELECT CAST(CAST(pg_current_xact_id() AS text) AS bigint)",
            &[],
        )
        .map_err(|e| pg_error(&e))?;
    Ok(row.get(0))
}

/// The tailer's one statement (one snapshot, one round trip): the snapshot's oldest
/// running transaction id, where retention pruned the log through, and up to `$2` events
/// after `$1` (none: one row with NULL event columns).
const TAIL_READ: &str = "SELECT m.xmin, m.pruned, e.seq, e.commit_ms, e.deployment, e.environment, e.target, e.artifact, e.version, e.digest, e.state, e.previous_state, e.message, e.trace_parent
     FROM (SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS text) AS bigint) AS xmin,
                  (SELECT pruned_through FROM log_meta WHERE id = 1) AS pruned) m
     LEFT JOIN LATERAL (SELECT * FROM placement_events WHERE seq > $1 ORDER BY seq LIMIT $2) e ON true
     ORDER BY e.seq";

/// Reads what follows `tail` and returns the events safe to deliver, in order, the new
/// position, and whether a newly seen hole still needs its transaction id (see the module
/// documentation for the hole rule).
fn tail_read(conn: &mut Conn, tail: Tail, max: usize) -> Result<(Vec<PlacementEvent>, Tail, bool)> {
    let statement = match conn.statements.get(TAIL_READ) {
        Some(s) => s.clone(),
        None => {
            let s = conn.client.prepare(TAIL_READ).map_err(|e| pg_error(&e))?;
            conn.statements.insert(TAIL_READ.to_owned(), s.clone());
            s
        }
    };
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let rows = conn
        .client
        .query(&statement, &[&to_i64(tail.cursor), &limit])
        .map_err(|e| pg_error(&e))?;
    let mut xmin = 0;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let SqlRow(mut values) = pg_row(row)?;
        let head = SqlRow(values.drain(..2).collect());
        xmin = head.get(0)?;
        let pruned = to_u64(head.get(1)?);
        if tail.cursor < pruned {
            return Err(crate::placement_log::retention_error(tail.cursor, pruned));
        }
        if values.first().is_some_and(|v| *v != V::N) {
            events.push(log::event_row(&SqlRow(values))?);
        }
    }
    let mut out = Vec::with_capacity(events.len());
    let mut next = tail;
    let mut new_hole = false;
    for event in events {
        let expected = next.cursor + 1;
        if event.sequence != expected {
            match next.hole {
                // Every transaction that could fill it has ended: it stays empty.
                Some(h) if h.start == expected && xmin > h.xid => {}
                Some(h) if h.start == expected => break,
                _ => {
                    // Seen now; its transaction id is taken right after this snapshot.
                    next.hole = Some(Hole {
                        start: expected,
                        xid: i64::MAX,
                    });
                    new_hole = true;
                    break;
                }
            }
        }
        next.hole = None;
        next.cursor = event.sequence;
        out.push(event);
    }
    Ok((out, next, new_hole))
}

/// The log head every replica can agree on at start: the newest sequence of a snapshot,
/// once every transaction running at that snapshot has ended (so nothing at or below it
/// can still commit).
fn settled_head(conn: &mut Conn) -> Result<u64> {
    let max_seq: i64 = conn
        .client
        .query_one("SELECT COALESCE(MAX(seq), 0) FROM placement_events", &[])
        .map_err(|e| pg_error(&e))?
        .get(0);
    let xid = fresh_xid(conn)?;
    for _ in 0..6000 {
        let xmin: i64 = conn
            .client
            .query_one(
                "SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS text) AS bigint)",
                &[],
            )
            .map_err(|e| pg_error(&e))?
            .get(0);
        if xmin > xid {
            return Ok(to_u64(max_seq));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(Error::Unavailable(
        "a transaction older than this start is still running; retry".into(),
    ))
}

fn migrate(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction().map_err(|e| pg_error(&e))?;
    // A runtime role without CREATE on the schema opens an up-to-date database: no DDL
    // runs unless a migration is due.
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&service_kit::time::locks::DEPLOY_MIGRATIONS],
    )
    .map_err(|e| pg_error(&e))?;
    let tracked: bool = tx
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .map_err(|e| pg_error(&e))?
        .get(0);
    if !tracked {
        tx.batch_execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
            .map_err(|e| pg_error(&e))?;
    }
    let applied: i64 = tx
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .map_err(|e| pg_error(&e))?
        .get(0);
    for (i, m) in MIGRATIONS.iter().enumerate().skip(to_u64(applied) as usize) {
        tx.batch_execute(m).map_err(|e| pg_error(&e))?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .map_err(|e| pg_error(&e))?;
    }
    tx.commit().map_err(|e| pg_error(&e))
}

impl SqlStore<PostgresBackend> {
    /// Connects, migrates, settles the log head and starts the tailer, the notifier and the
    /// listener (call inside a Tokio runtime). Returns the store and the feed.
    pub fn open(options: PostgresOptions, clock: Arc<dyn Clock>) -> Result<(Self, Arc<Feed>)> {
        let url = options.url.clone();
        let head = std::thread::spawn(move || -> Result<u64> {
            let client = connect(&url, "")?;
            let mut conn = Conn {
                client,
                statements: HashMap::new(),
            };
            migrate(&mut conn.client)?;
            settled_head(&mut conn)
        })
        .join()
        .map_err(|_| Error::Internal("the PostgreSQL open thread panicked".into()))??;
        let feed = Arc::new(Feed::new(head, 65_536));
        let (report_queue, queued) = tokio::sync::mpsc::unbounded_channel();
        let groups = options.report_groups.clamp(1, 64);
        let grouper = tokio::spawn(reports::run_groups(
            queued,
            groups,
            Arc::new(Pool::start("report", &options.url, groups, "")?),
            clock.clone(),
            options.notify,
        ));
        let backend = PostgresBackend {
            pool: Arc::new(Pool::start("write", &options.url, options.pool_size, "")?),
            reports: Mutex::new(Some(report_queue)),
            grouper: Mutex::new(Some(grouper)),
            // The tailer's transaction ids for holes commit nothing worth waiting for.
            tail_pool: Arc::new(Pool::start(
                "tail",
                &options.url,
                1,
                "SET synchronous_commit = off",
            )?),
            feed: feed.clone(),
            clock,
            notify: options.notify,
            local_commit: Arc::new(Notify::new()),
            tail_wake: Arc::new(Notify::new()),
            remote: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
        };
        let store = Self::new(backend);
        store.backend.start(&options, head);
        Ok((store, feed))
    }
}

impl PostgresBackend {
    fn start(&self, options: &PostgresOptions, head: u64) {
        // The notifier: one NOTIFY at a time, however many commits rang meanwhile.
        let own_pid = Arc::new(AtomicI32::new(0));
        if options.notify == NotifyMode::Coalesced {
            let (url, bell, stop, pid) = (
                options.url.clone(),
                self.local_commit.clone(),
                self.stop.clone(),
                own_pid.clone(),
            );
            tokio::spawn(async move { notifier(url, bell, stop, pid).await });
        }
        // The listener: other replicas' writes wake the tailer and the order streams.
        if options.notify != NotifyMode::Off {
            let (url, tail, remote, stop, pid) = (
                options.url.clone(),
                self.tail_wake.clone(),
                self.remote.clone(),
                self.stop.clone(),
                own_pid,
            );
            tokio::spawn(async move { listener(url, tail, remote, stop, pid).await });
        }
        // The tailer.
        let backend = TailerParts {
            pool: self.tail_pool.clone(),
            feed: self.feed.clone(),
            wake: self.tail_wake.clone(),
            stop: self.stop.clone(),
            poll: options.poll_interval,
            retention: options.retention,
            remote: self.remote.clone(),
            notify: options.notify,
        };
        tokio::spawn(async move { backend.run(head).await });
    }
}

/// What the tailer task needs (it outlives no one: it stops with the store).
struct TailerParts {
    pool: Arc<Pool>,
    feed: Arc<Feed>,
    wake: Arc<Notify>,
    stop: CancellationToken,
    poll: Duration,
    retention: u64,
    remote: Arc<Notify>,
    notify: NotifyMode,
}

impl TailerParts {
    async fn run(self, head: u64) {
        let mut tail = Tail {
            cursor: head,
            hole: None,
        };
        let mut pruned = 0u64;
        let mut hole_wait = Duration::ZERO;
        loop {
            // At a hole, look again soon, less often the longer it stays open.
            let wait = if tail.hole.is_some() {
                hole_wait =
                    (hole_wait * 2).clamp(Duration::from_millis(1), Duration::from_millis(50));
                hole_wait
            } else {
                hole_wait = Duration::ZERO;
                self.poll
            };
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {
                    if self.notify == NotifyMode::Off {
                        // Without notifications, a poll that finds events stands for them.
                        self.remote.notify_one();
                    }
                }
            }
            loop {
                let read = self
                    .pool
                    .run(move |conn| {
                        let (events, mut next, new_hole) = tail_read(conn, tail, 4096)?;
                        if new_hole {
                            if let Some(h) = next.hole.as_mut() {
                                h.xid = fresh_xid(conn)?;
                            }
                        }
                        Ok((events, next))
                    })
                    .await;
                match read {
                    Ok((events, next)) => {
                        let more = events.len() == 4096;
                        tail = next;
                        self.feed.publish(events);
                        if !more {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the placement log; retrying");
                        break;
                    }
                }
            }
            {
                // Prune in steps of a tenth of the retention (any replica may; they agree).
                let (head, retention) = (self.feed.head(), self.retention);
                if head.saturating_sub(pruned) > retention + retention / 10 {
                    let through = to_i64(head - retention);
                    let outcome = self
                        .pool.run(move |conn| {
                            let mut tx = conn.client.transaction().map_err(|e| pg_error(&e))?;
                            tx.execute("DELETE FROM placement_events WHERE seq <= $1", &[&through])
                                .map_err(|e| pg_error(&e))?;
                            tx.execute(
                                "UPDATE log_meta SET pruned_through = GREATEST(pruned_through, $1) WHERE id = 1",
                                &[&through],
                            )
                            .map_err(|e| pg_error(&e))?;
                            tx.commit().map_err(|e| pg_error(&e))
                        })
                        .await;
                    match outcome {
                        Ok(()) => pruned = to_u64(through),
                        Err(e) => tracing::warn!(error = %e, "cannot prune the placement log"),
                    }
                }
            }
        }
    }
}

/// Runs `f` in a read-only REPEATABLE READ transaction (one snapshot).
fn read_tx<T>(conn: &mut Conn, f: impl FnOnce(&dyn Db) -> Result<T>) -> Result<T> {
    let tx = conn
        .client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(|e| pg_error(&e))?;
    let db = PgDb {
        tx: std::cell::RefCell::new(tx),
        statements: std::cell::RefCell::new(&mut conn.statements),
        last_error: std::cell::RefCell::new(None),
    };
    let result = f(&db);
    let tx = db.tx.into_inner();
    let _ = tx.commit();
    result
}

async fn connect_async(url: &str) -> Result<tokio_postgres::Client> {
    let (url, tls) = tls(url)?;
    let (client, connection) = tokio_postgres::connect(&url, tls)
        .await
        .map_err(|e| pg_error(&e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL notification connection ended");
        }
    });
    Ok(client)
}

async fn notifier(
    url: String,
    bell: Arc<Notify>,
    stop: CancellationToken,
    own_pid: Arc<AtomicI32>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = bell.notified() => {}
        }
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            client = match connect_async(&url).await {
                Ok(c) => {
                    let ok = c
                        .batch_execute("SET synchronous_commit = off")
                        .await
                        .is_ok();
                    if let Ok(row) = c.query_one("SELECT pg_backend_pid()", &[]).await {
                        own_pid.store(row.get(0), Ordering::Relaxed);
                    }
                    ok.then_some(c)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to notify other replicas");
                    None
                }
            };
        }
        if let Some(c) = &client {
            if let Err(e) = c.batch_execute(&format!("NOTIFY {CHANNEL}")).await {
                tracing::warn!(error = %e, "cannot notify other replicas");
            }
        }
        // At most one notification per window: commits meanwhile ride on the next one, so
        // under load the other replicas read the log in batches rather than per commit.
        tokio::time::sleep(NOTIFY_WINDOW).await;
    }
}

/// The shortest time between two notifications of one replica.
const NOTIFY_WINDOW: Duration = Duration::from_millis(2);

async fn listener(
    url: String,
    tail: Arc<Notify>,
    remote: Arc<Notify>,
    stop: CancellationToken,
    own_pid: Arc<AtomicI32>,
) {
    use futures::StreamExt;
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = match tls(&url) {
            Ok((url, tls)) => tokio_postgres::connect(&url, tls)
                .await
                .map_err(|e| pg_error(&e)),
            Err(e) => Err(e),
        };
        let (client, mut connection) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to listen for other replicas");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let listen_sql = format!("LISTEN {CHANNEL}");
        let listen = client.batch_execute(&listen_sql);
        let mut listen = std::pin::pin!(listen);
        let mut listening = false;
        backoff = Duration::from_millis(100);
        // Catch up on whatever committed while we were not listening.
        tail.notify_one();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                r = &mut listen, if !listening => {
                    if r.is_err() { break; }
                    listening = true;
                }
                m = messages.next() => match m {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        if n.process_id() != own_pid.load(Ordering::Relaxed) {
                            tail.notify_one();
                            remote.notify_one();
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
            }
        }
        tracing::warn!("lost the PostgreSQL notification connection; reconnecting");
    }
}

#[async_trait]
impl Backend for PostgresBackend {
    async fn write<T: Send + 'static>(
        &self,
        lock: Option<ReportLock>,
        job: WriteJob<T>,
    ) -> Result<T> {
        let (value, newest) = match lock {
            Some(lock) => self.queue_report(lock, job).await?,
            None => {
                let (clock, notify) = (self.clock.clone(), self.notify);
                self.pool
                    .run(move |conn| run_write(conn, &*clock, notify, &job))
                    .await?
            }
        };
        self.committed(newest).await;
        Ok(value)
    }

    async fn read<T: Send + 'static>(&self, job: ReadJob<T>) -> Result<T> {
        self.pool.run(move |conn| read_tx(conn, job)).await
    }

    async fn read_events(&self, after: u64, max: usize) -> Result<Vec<PlacementEvent>> {
        let through = self.feed.head();
        self.read(Box::new(move |db: &dyn Db| {
            log::read_log(db, after, through, max)
        }))
        .await
    }

    async fn snapshot(&self) -> Result<(Vec<Placement>, u64)> {
        // Everything up to the tail's head is settled; a placement whose newest event is
        // beyond it is shown as of its last event at or before it.
        let head = self.feed.head();
        self.read(Box::new(move |db: &dyn Db| {
            let mut out = Vec::new();
            for p in log::all_placements(db)? {
                if p.sequence <= head {
                    out.push(p);
                    continue;
                }
                let earlier = db.one(
                    "SELECT e.deployment, e.environment, e.target, e.artifact, e.version, e.digest, e.state, e.message, e.seq, e.commit_ms
                     FROM placement_events e WHERE e.deployment = ?1 AND e.target = ?2 AND e.seq <= ?3
                     ORDER BY e.seq DESC LIMIT 1",
                    super::db::p![p.deployment, p.target, to_i64(head)],
                    log::placement_row,
                )?;
                match earlier {
                    Some(e) => out.push(e),
                    None => {
                        // Created after `head` (its first event is later): not in this
                        // snapshot. Or its earlier events were pruned: retry later.
                        let first: Option<i64> = db.value(
                            "SELECT MIN(seq) FROM placement_events WHERE deployment = ?1 AND target = ?2",
                            super::db::p![p.deployment, p.target],
                        )?;
                        if first.is_none_or(|f| to_u64(f) <= head) {
                            return Err(Error::Unavailable(
                                "the log moved while the snapshot was taken; retry".into(),
                            ));
                        }
                    }
                }
            }
            out.sort_by_key(|p| p.sequence);
            Ok((out, head))
        }))
        .await
    }

    async fn log_bounds(&self) -> Result<LogBounds> {
        let head = self.feed.head();
        self.read(Box::new(move |db: &dyn Db| {
            Ok(LogBounds {
                pruned_through: log::pruned_through(db)?,
                head,
            })
        }))
        .await
    }

    fn remote_changes(&self) -> Option<Arc<Notify>> {
        Some(self.remote.clone())
    }

    async fn close(&self) {
        // Queued reports are committed first.
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let grouper = self
            .grouper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(grouper) = grouper {
            let _ = grouper.await;
        }
        self.stop.cancel();
        self.pool.close().await;
        self.tail_pool.close().await;
    }
}

impl PostgresBackend {
    /// Queues a placement report for the next group commit ([`reports`]).
    async fn queue_report<T: Send + 'static>(
        &self,
        lock: ReportLock,
        job: WriteJob<T>,
    ) -> Result<(T, u64)> {
        let closed = || Error::Unavailable("the store is closed".into());
        let (reply, answer) = oneshot::channel();
        let report = Box::new(reports::Report {
            lock,
            job,
            value: None,
            reply,
        });
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .ok_or_else(closed)?
            .send(report)
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// After a local commit whose newest event is `newest` (0: none): wakes the tailer and
    /// the other replicas, then waits until this replica's stream holds the events.
    async fn committed(&self, newest: u64) {
        self.tail_wake.notify_one();
        self.local_commit.notify_one();
        if newest > 0 {
            // Read your writes: acknowledge once this replica's stream holds the events
            // (after any earlier sequence still committing). The write is committed either
            // way; a tailer that cannot keep up only delays the acknowledgement.
            let mut head = self.feed.subscribe();
            let caught_up =
                tokio::time::timeout(Duration::from_secs(2), head.wait_for(|h| *h >= newest)).await;
            if caught_up.is_err() {
                tracing::warn!(
                    sequence = newest,
                    "the log tail is behind a committed write"
                );
            }
        }
    }
}
