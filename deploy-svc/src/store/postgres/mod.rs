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

mod notify;
mod reports;
mod tail;

use notify::{listener, notifier};
use tail::{settled_head, TailerParts};

use std::sync::atomic::AtomicI32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use store_kit::postgres::{
    connect, retrying, Conn, Failed, IsolationLevel, PgDb, Pool, PoolConfig,
};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::backend::{to_i64, to_u64, Backend, ReadJob, ReportInput, ReportLock, WriteJob};
use super::db::{p, Db};
use super::log;
use crate::app::SqlStore;
use crate::domain::clock::Clock;
use crate::domain::model::{LogBounds, Placement, PlacementEvent, ReportOutcome};
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

/// How a group of placement reports is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportStatements {
    /// One read and one write statement for the whole group (the default; a group with two
    /// reports of one placement, or one that lets a strategy order more targets, is applied
    /// one report at a time).
    Group,
    /// One read and one write statement for each report (for comparison).
    Each,
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
    /// How a group of placement reports is written.
    pub report_statements: ReportStatements,
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
            report_groups: 1,
            report_statements: ReportStatements::Group,
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
    reports: Mutex<Option<tokio::sync::mpsc::UnboundedSender<reports::Report>>>,
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

/// The error a PostgreSQL failure means for the caller (see [`store_kit::postgres::error`]).
fn pg_error(e: &postgres::Error) -> Error {
    store_kit::postgres::error(e)
}

/// A connection of `url` for a pool named `name`, set up with `init`.
fn pool(name: &'static str, url: &str, size: usize, init: &str) -> Result<Pool> {
    Pool::start(PoolConfig {
        name,
        url: url.to_owned(),
        size,
        init: init.to_owned(),
        wait_metric: Some(crate::telemetry::POOL_WAIT_SECONDS),
    })
}

/// Runs one write transaction, running it again after a conflict.
fn run_write<T>(
    conn: &mut Conn,
    clock: &dyn Clock,
    notify: NotifyMode,
    job: &WriteJob<T>,
) -> Result<(T, u64)> {
    retrying(
        || write_once(conn, clock, notify, job),
        |e, attempt| {
            tracing::debug!(error = %e, attempt, "write conflicted; running it again");
            metrics::counter!(crate::telemetry::STORE_RETRIES).increment(1);
        },
    )
}

/// One attempt: the result and the sequence of its last event, or the failure.
fn write_once<T>(
    conn: &mut Conn,
    clock: &dyn Clock,
    notify: NotifyMode,
    job: &WriteJob<T>,
) -> std::result::Result<(T, u64), Failed> {
    let started = std::time::Instant::now();
    let db = PgDb::begin(conn, IsolationLevel::Serializable, false)?;
    let mut events = Vec::new();
    match job(&db, clock.now_ms(), &mut events) {
        Ok(v) => {
            commit(db, notify, started)?;
            Ok((v, events.last().map_or(0, |e| e.sequence)))
        }
        Err(e) => {
            let failed = db.failed(e);
            drop(db);
            metrics::histogram!(crate::telemetry::COMMIT_SECONDS, "outcome" => "failed")
                .record(started.elapsed().as_secs_f64());
            Err(failed)
        }
    }
}

/// Commits `db` (after its NOTIFY in [`NotifyMode::PerTransaction`]) and records the time
/// since `started` (its BEGIN) by outcome.
fn commit(
    db: PgDb<'_>,
    notify: NotifyMode,
    started: std::time::Instant,
) -> std::result::Result<(), Failed> {
    let notified = match notify {
        NotifyMode::PerTransaction => db
            .batch(&format!("NOTIFY {CHANNEL}"))
            .map_err(|e| db.failed(e)),
        _ => Ok(()),
    };
    let committed = notified.and_then(|()| db.commit());
    let outcome = if committed.is_ok() {
        "committed"
    } else {
        "failed"
    };
    metrics::histogram!(crate::telemetry::COMMIT_SECONDS, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    committed
}

impl SqlStore<PostgresBackend> {
    /// Connects, migrates, settles the log head and starts the tailer, the notifier and the
    /// listener (call inside a Tokio runtime). Returns the store and the feed.
    pub fn open(options: PostgresOptions, clock: Arc<dyn Clock>) -> Result<(Self, Arc<Feed>)> {
        let url = options.url.clone();
        let head = std::thread::spawn(move || -> Result<u64> {
            let mut conn = Conn::new(connect(&url, "")?);
            store_kit::postgres::migrate(
                &mut conn.client,
                service_kit::time::locks::DEPLOY_MIGRATIONS,
                MIGRATIONS,
            )?;
            settled_head(&mut conn)
        })
        .join()
        .map_err(|_| Error::Internal("the PostgreSQL open thread panicked".into()))??;
        let feed = Arc::new(Feed::new(head, 65_536));
        let (report_queue, queued) = tokio::sync::mpsc::unbounded_channel();
        let groups = options.report_groups.clamp(1, 64);
        let grouper = tokio::spawn(reports::run_groups(
            queued,
            options.report_statements,
            groups,
            // Generic plans: a group's statements take arrays, whose sizes make PostgreSQL
            // plan them afresh on every run (custom plans), which costs more than running them.
            Arc::new(pool(
                "report",
                &options.url,
                groups,
                "SET plan_cache_mode = force_generic_plan",
            )?),
            clock.clone(),
            options.notify,
        ));
        let backend = PostgresBackend {
            pool: Arc::new(pool("write", &options.url, options.pool_size, "")?),
            reports: Mutex::new(Some(report_queue)),
            grouper: Mutex::new(Some(grouper)),
            // The tailer's transaction ids for holes commit nothing worth waiting for.
            tail_pool: Arc::new(pool(
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

#[async_trait]
impl Backend for PostgresBackend {
    async fn write<T: Send + 'static>(&self, job: WriteJob<T>) -> Result<T> {
        let (clock, notify) = (self.clock.clone(), self.notify);
        let (value, newest) = self
            .pool
            .run(move |conn| run_write(conn, &*clock, notify, &job))
            .await?;
        self.committed(newest).await;
        Ok(value)
    }

    async fn report(
        &self,
        lock: ReportLock,
        input: Arc<ReportInput>,
        job: WriteJob<ReportOutcome>,
    ) -> Result<ReportOutcome> {
        let (value, newest) = self.queue_report(lock, input, job).await?;
        self.committed(newest).await;
        Ok(value)
    }

    async fn read<T: Send + 'static>(&self, job: ReadJob<T>) -> Result<T> {
        self.pool.run(move |conn| conn.read(job)).await
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
                    "SELECT e.deployment, e.environment, e.target, e.artifact, e.version, e.digest, e.state, e.message, e.seq, e.commit_ms AS update_ms
                     FROM placement_events e WHERE e.deployment = ?1 AND e.target = ?2 AND e.seq <= ?3
                     ORDER BY e.seq DESC LIMIT 1",
                    p![p.deployment, p.target, to_i64(head)],
                    log::placement_row,
                )?;
                match earlier {
                    Some(e) => out.push(e),
                    None => {
                        // Created after `head` (its first event is later): not in this
                        // snapshot. Or its earlier events were pruned: retry later.
                        let first: Option<i64> = db.value(
                            "SELECT MIN(seq) FROM placement_events WHERE deployment = ?1 AND target = ?2",
                            p![p.deployment, p.target],
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
    async fn queue_report(
        &self,
        lock: ReportLock,
        input: Arc<ReportInput>,
        job: WriteJob<ReportOutcome>,
    ) -> Result<(ReportOutcome, u64)> {
        let closed = || Error::Unavailable("the store is closed".into());
        let (reply, answer) = oneshot::channel();
        let report = reports::Report {
            lock,
            input: Some(input),
            job,
            value: None,
            reply,
        };
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
