//! The embedded SQLite backend.
//!
//! One writer thread owns the only write connection and commits in groups: it drains up
//! to `max_batch` queued writes, runs each inside its own SAVEPOINT (a failing write rolls
//! back alone), commits once, publishes the batch's placement events to the [`Feed`] and
//! only then acknowledges every caller. With `synchronous=FULL` one fsync covers the whole
//! group, which is what makes durable acknowledgements fast. Because a single writer
//! assigns sequences and commits in order, sequences follow commit order with no gaps.
//!
//! A queued write whose caller has gone (deadline passed, call cancelled) is skipped, not
//! run for nobody.
//!
//! Every write job also appends its audit record (if it changed anything) inside its own
//! SAVEPOINT, so a record commits exactly when its change does.
//!
//! Reads use a small pool of WAL reader connections on the blocking thread pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use rusqlite::Connection;
use store_kit::sqlite::error as sql;
use tokio::sync::{mpsc, oneshot, watch};

use super::backend::{internal, to_i64, Backend, ReadJob, ReportInput, ReportLock, WriteJob};
use super::db::Db;
use super::log;
use crate::app::SqlStore;
use crate::domain::clock::{Clock, Millis};
use crate::domain::model::{LogBounds, Placement, PlacementEvent, ReportOutcome};
use crate::domain::{Error, Result};
use crate::placement_log::Feed;

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/sqlite/0001_init.sql"),
    include_str!("migrations/sqlite/0002_calendar_audit.sql"),
    include_str!("migrations/sqlite/0003_strategies.sql"),
    include_str!("migrations/sqlite/0004_trace_parent.sql"),
];

/// Options of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The database file.
    pub path: PathBuf,
    /// `FULL` survives power loss; `NORMAL` only process crashes.
    pub synchronous_full: bool,
    /// Most writes committed together (1 disables group commit).
    pub max_batch: usize,
    /// Events kept in the log; older ones are pruned.
    pub retention: u64,
    /// Writes that may wait for the writer before callers are held back.
    pub queue: usize,
}

impl SqliteOptions {
    /// Defaults for a database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            synchronous_full: true,
            max_batch: 1024,
            retention: 1_000_000,
            queue: 8192,
        }
    }
}

type Completion = Box<dyn FnOnce(Result<()>) + Send>;
type Job =
    Box<dyn FnOnce(&Connection, Millis, &mut Vec<PlacementEvent>) -> (bool, Completion) + Send>;

/// The SQLite store: the shared logic over the SQLite backend.
pub type SqliteStore = SqlStore<SqliteBackend>;

enum Msg {
    Write(Job),
    Stop(oneshot::Sender<()>),
}

/// The SQLite backend.
pub struct SqliteBackend {
    writes: mpsc::Sender<Msg>,
    readers: Arc<ReadPool>,
    writer: Mutex<Option<JoinHandle<()>>>,
    alive: watch::Receiver<bool>,
}

/// Held by the writer thread: when the thread ends (a panic included), the store reports
/// that it can no longer write.
struct WriterAlive(watch::Sender<bool>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the sqlite writer thread panicked; writes fail until a restart");
        }
        self.0.send_replace(false);
    }
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.readers.path)
            .finish()
    }
}

fn open_connection(path: &Path, synchronous_full: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {}; PRAGMA foreign_keys = ON;",
        if synchronous_full { "FULL" } else { "NORMAL" }
    ))?;
    Ok(conn)
}

impl SqlStore<SqliteBackend> {
    /// Opens (creating and migrating if needed) the database and starts the writer. Returns
    /// the store and the log head, for the feed the caller creates.
    pub fn open(options: SqliteOptions, clock: Arc<dyn Clock>) -> Result<(Self, Arc<Feed>)> {
        if let Some(dir) = options.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = open_connection(&options.path, options.synchronous_full).map_err(sql)?;
        store_kit::sqlite::migrate(&conn, MIGRATIONS)?;
        let head = head_sequence(&conn)?;
        let feed = Arc::new(Feed::new(head, 65_536));
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let writer_feed = feed.clone();
        let max_batch = options.max_batch.max(1);
        let retention = options.retention.max(1);
        let (alive_tx, alive) = watch::channel(true);
        let writer = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let _alive = WriterAlive(alive_tx);
                writer_loop(conn, rx, writer_feed, clock, max_batch, retention);
            })
            .map_err(internal)?;
        let readers = Arc::new(ReadPool {
            path: options.path.clone(),
            synchronous_full: options.synchronous_full,
            idle: Mutex::new(Vec::new()),
        });
        Ok((
            Self::new(SqliteBackend {
                writes: tx,
                readers,
                writer: Mutex::new(Some(writer)),
                alive,
            }),
            feed,
        ))
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn report(
        &self,
        _lock: ReportLock,
        _input: Arc<ReportInput>,
        job: WriteJob<ReportOutcome>,
    ) -> Result<ReportOutcome> {
        // One writer: reports are serialised with every other write, so no lock is needed,
        // and a statement costs no round trip, so the job runs as it is.
        self.write(job).await
    }

    async fn write<T: Send + 'static>(&self, f: WriteJob<T>) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn, now, events| {
            // The caller has gone (its deadline passed, or it cancelled): its write is not
            // done for nobody. Under overload, queued writes of callers that gave up would
            // otherwise keep the writer busy while every live caller times out too.
            if tx.is_closed() {
                return (false, Box::new(|_| {}) as Completion);
            }
            let result = f(conn, now, events);
            let ok = result.is_ok();
            let done: Completion = Box::new(move |commit| {
                let _ = tx.send(commit.and(result));
            });
            (ok, done)
        });
        self.writes
            .send(Msg::Write(job))
            .await
            .map_err(|_| Error::Unavailable("the store is closed".into()))?;
        rx.await.map_err(|_| {
            Error::Unavailable("write not committed: storage unavailable; retry".into())
        })?
    }

    async fn read<T: Send + 'static>(&self, f: ReadJob<T>) -> Result<T> {
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.take()?;
            // One snapshot for the whole read.
            let result = match conn.unchecked_transaction() {
                Ok(tx) => f(&*tx),
                Err(e) => Err(sql(e)),
            };
            pool.put(conn);
            result
        })
        .await
        .map_err(internal)?
    }

    async fn read_events(&self, after: u64, max: usize) -> Result<Vec<PlacementEvent>> {
        self.read(Box::new(move |conn: &dyn Db| {
            log::read_log(conn, after, u64::MAX >> 1, max)
        }))
        .await
    }

    async fn snapshot(&self) -> Result<(Vec<Placement>, u64)> {
        self.read(Box::new(|conn: &dyn Db| {
            let head = head_sequence(conn)?;
            Ok((log::all_placements(conn)?, head))
        }))
        .await
    }

    async fn log_bounds(&self) -> Result<LogBounds> {
        self.read(Box::new(|conn: &dyn Db| {
            Ok(LogBounds {
                pruned_through: log::pruned_through(conn)?,
                head: head_sequence(conn)?,
            })
        }))
        .await
    }

    fn writer_alive(&self) -> watch::Receiver<bool> {
        self.alive.clone()
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(Msg::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

struct ReadPool {
    path: PathBuf,
    synchronous_full: bool,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    fn take(&self) -> Result<Connection> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => open_connection(&self.path, self.synchronous_full).map_err(sql),
        }
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < 16 {
            idle.push(conn);
        }
    }
}

fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<Msg>,
    feed: Arc<Feed>,
    clock: Arc<dyn Clock>,
    max_batch: usize,
    retention: u64,
) {
    let mut stop = None;
    while stop.is_none() {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut jobs = Vec::new();
        match first {
            Msg::Write(job) => jobs.push(job),
            Msg::Stop(done) => stop = Some(done),
        }
        while stop.is_none() && jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(Msg::Write(job)) => jobs.push(job),
                Ok(Msg::Stop(done)) => stop = Some(done),
                Err(_) => break,
            }
        }
        if !jobs.is_empty() {
            run_batch(&conn, jobs, &feed, clock.now_ms(), retention);
        }
    }
    // Refuse whatever is still queued: the callers get UNAVAILABLE, never a false ack.
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        if let Msg::Stop(done) = msg {
            let _ = done.send(());
        }
    }
    drop(conn);
    if let Some(done) = stop {
        let _ = done.send(());
    }
}

fn run_batch(conn: &Connection, jobs: Vec<Job>, feed: &Feed, now: Millis, retention: u64) {
    let started = std::time::Instant::now();
    metrics::histogram!(crate::telemetry::GROUP_COMMIT_WRITES).record(jobs.len() as f64);
    let mut completions = Vec::with_capacity(jobs.len());
    let mut events = Vec::new();
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        // Dropping the jobs unrun tells every caller the write was not committed.
        tracing::error!(error = %sql(e), "cannot begin a write transaction");
        drop(jobs);
        return;
    }
    let mut broken = None;
    for job in jobs {
        if broken.is_some() {
            // Run nothing more in a transaction we cannot trust; the caller sees the error.
            completions.push(Box::new(|_: Result<()>| {}) as Completion);
            continue;
        }
        let mark = events.len();
        if let Err(e) = exec_cached(conn, "SAVEPOINT job") {
            broken = Some(sql(e));
        }
        let (ok, done) = job(conn, now, &mut events);
        let end = if ok {
            exec_cached(conn, "RELEASE job")
        } else {
            events.truncate(mark);
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        if let Err(e) = end {
            broken = Some(sql(e));
        }
        completions.push(done);
    }
    if broken.is_none() {
        if let Err(e) = prune(conn, retention) {
            broken = Some(e);
        }
    }
    let outcome = match broken {
        Some(e) => Err(e),
        None => conn.execute_batch("COMMIT").map_err(sql),
    };
    metrics::histogram!(crate::telemetry::COMMIT_SECONDS, "outcome" => if outcome.is_ok() { "committed" } else { "failed" })
        .record(started.elapsed().as_secs_f64());
    match outcome {
        Ok(()) => {
            feed.publish(events);
            for done in completions {
                done(Ok(()));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "write transaction failed; rolled back");
            let _ = conn.execute_batch("ROLLBACK");
            for done in completions {
                done(Err(Error::Unavailable(format!(
                    "write not committed: {e}; retry"
                ))));
            }
        }
    }
}

fn exec_cached(conn: &Connection, statement: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(statement)?.execute([]).map(|_| ())
}

fn prune(conn: &Connection, retention: u64) -> Result<()> {
    let head = head_sequence(conn)?;
    let pruned: i64 = conn
        .prepare_cached("SELECT pruned_through FROM log_meta WHERE id = 1")
        .map_err(sql)?
        .query_row([], |r| r.get(0))
        .map_err(sql)?;
    let pruned = u64::try_from(pruned).unwrap_or(0);
    // Prune in steps of a tenth of the retention, so the delete cost is amortised.
    if head.saturating_sub(pruned) > retention + retention / 10 {
        let through = to_i64(head - retention);
        conn.execute("DELETE FROM placement_events WHERE seq <= ?1", [through])
            .map_err(sql)?;
        conn.execute(
            "UPDATE log_meta SET pruned_through = ?1 WHERE id = 1",
            [through],
        )
        .map_err(sql)?;
    }
    Ok(())
}

fn head_sequence(conn: &dyn Db) -> Result<u64> {
    let seq: Option<i64> = conn.value(
        "SELECT seq FROM sqlite_sequence WHERE name = 'placement_events'",
        &[],
    )?;
    Ok(seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::clock::SystemClock;
    use crate::store::Store;

    /// A panic in the writer thread (a bug in a write job) leaves a store that cannot
    /// write: it says so, and later writes fail as UNAVAILABLE instead of hanging.
    #[tokio::test]
    async fn a_dead_writer_thread_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _feed) = SqliteStore::open(
            SqliteOptions::new(dir.path().join("d.db")),
            Arc::new(SystemClock),
        )
        .unwrap();
        let mut alive = store.writer_alive();
        assert!(*alive.borrow_and_update());
        let died = store
            .backend
            .write::<()>(Arc::new(|_, _, _| panic!("a bug in a write job")))
            .await;
        assert!(died.is_err());
        alive.changed().await.unwrap();
        assert!(!*alive.borrow());
        let after = store.backend.write::<()>(Arc::new(|_, _, _| Ok(()))).await;
        assert!(matches!(after, Err(Error::Unavailable(_))), "{after:?}");
    }
}
