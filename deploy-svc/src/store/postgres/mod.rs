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

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use store_kit::postgres::{
    connect, connect_async, connect_spawned, retrying, Conn, Failed, IsolationLevel, PgDb, Pool,
    PoolConfig,
};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::backend::{to_i64, to_u64, Backend, ReadJob, ReportLock, WriteJob};
use super::db::{p, Db, V};
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
     LEFT JOIN LATERAL (SELECT * FROM placement_events WHERE seq > ?1 ORDER BY seq LIMIT ?2) e ON true
     ORDER BY e.seq";

/// Reads what follows `tail` and returns the events safe to deliver, in order, the new
/// position, and whether a newly seen hole still needs its transaction id (see the module
/// documentation for the hole rule).
fn tail_read(conn: &mut Conn, tail: Tail, max: usize) -> Result<(Vec<PlacementEvent>, Tail, bool)> {
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let rows = conn.query(TAIL_READ, p![to_i64(tail.cursor), limit])?;
    let mut xmin = 0;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        xmin = row.get(0)?;
        let pruned = to_u64(row.get(1)?);
        if tail.cursor < pruned {
            return Err(crate::placement_log::retention_error(tail.cursor, pruned));
        }
        if row.values().get(2).is_some_and(|v| *v != V::N) {
            events.push(log::event_row(&row.skip(2))?);
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
            groups,
            Arc::new(pool("report", &options.url, groups, "")?),
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
    /// Follows the placement log from `head` until the store stops: reads and publishes
    /// what was committed whenever woken (or polled), then prunes.
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
            tail = self.read_log(tail).await;
            pruned = self.prune(pruned).await;
        }
    }

    /// Reads the log after `tail` and publishes it, 4096 events at a time until a read
    /// returns fewer; a failed read is logged and left for the next round. Returns the
    /// position reached.
    async fn read_log(&self, mut tail: Tail) -> Tail {
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
        tail
    }

    /// Prunes the log, in steps of a tenth of the retention (any replica may; they agree).
    /// `pruned`: the sequence the log was last pruned through; returns it, moved on when
    /// this prune happened.
    async fn prune(&self, pruned: u64) -> u64 {
        let (head, retention) = (self.feed.head(), self.retention);
        if head.saturating_sub(pruned) <= retention + retention / 10 {
            return pruned;
        }
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
            Ok(()) => to_u64(through),
            Err(e) => {
                tracing::warn!(error = %e, "cannot prune the placement log");
                pruned
            }
        }
    }
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
            client = match connect_spawned(&url).await {
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
        let connected = connect_async(&url).await;
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
                    "SELECT e.deployment, e.environment, e.target, e.artifact, e.version, e.digest, e.state, e.message, e.seq, e.commit_ms
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
