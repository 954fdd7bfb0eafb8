//! Placement reports committed in groups.
//!
//! Reports are the hot write path: one per target per state change. Each replica queues
//! them and commits whatever arrived meanwhile in one READ COMMITTED transaction: one
//! `BEGIN`, one statement locking every deployment the group names (in id order), each
//! report in its own savepoint (a report that fails rolls back alone and gets its own
//! error), one `COMMIT` (one WAL flush for the group). A group runs its reports ordered by
//! target (stably: reports of one target keep their arrival order and draw their sequences
//! in it), so the target rows their heartbeats write are locked in one order too: two
//! groups never wait for each other in a cycle, whether on deployments or on targets.
//! Groups of at most [`MAX_GROUP`] reports: each savepoint that writes takes a
//! subtransaction id, and past 64 in one transaction PostgreSQL's per-backend cache
//! overflows and every other session's snapshots get slower. A conflict (a deadlock with
//! another replica's group, a unique key taken) runs the whole group again. Up to
//! `--pg-report-groups` groups (2 by default) commit at once per replica, each on its own
//! connection, so one group fills while another commits.
//!
//! Each report is still acknowledged only after its replica's stream holds its event
//! (read-your-writes, see [`super::PostgresBackend::write`]); the log's hole rule is
//! unchanged: a group is one transaction whose id is taken before it draws a sequence.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::NotifyMode;
use crate::domain::clock::{Clock, Millis};
use crate::domain::model::PlacementEvent;
use crate::domain::{Error, Result};
use crate::store::backend::{ReportLock, WriteJob};
use crate::store::db::Db;
use store_kit::postgres::{retrying, Conn, Failed, IsolationLevel, PgDb, Pool};
use store_kit::V;

/// The most reports committed in one transaction (64 subtransactions fit PostgreSQL's
/// per-backend cache).
pub(super) const MAX_GROUP: usize = 64;

/// A queued report of any result type.
pub(super) trait Queued: Send {
    /// What the report locks.
    fn lock(&self) -> &ReportLock;
    /// Runs the report's job; keeps its value for [`Queued::finish`].
    fn run(&mut self, db: &dyn Db, now: Millis, events: &mut Vec<PlacementEvent>) -> Result<()>;
    /// Answers the caller: the job's value and its newest sequence, or why it failed.
    fn finish(self: Box<Self>, outcome: Result<u64>);
}

/// A report and the caller waiting for it.
pub(super) struct Report<T> {
    pub(super) lock: ReportLock,
    pub(super) job: WriteJob<T>,
    pub(super) value: Option<T>,
    pub(super) reply: oneshot::Sender<Result<(T, u64)>>,
}

impl<T: Send + 'static> Queued for Report<T> {
    fn lock(&self) -> &ReportLock {
        &self.lock
    }

    fn run(&mut self, db: &dyn Db, now: Millis, events: &mut Vec<PlacementEvent>) -> Result<()> {
        self.value = Some((self.job)(db, now, events)?);
        Ok(())
    }

    fn finish(self: Box<Self>, outcome: Result<u64>) {
        let answer = match (outcome, self.value) {
            (Ok(newest), Some(v)) => Ok((v, newest)),
            (Err(e), _) => Err(e),
            (Ok(_), None) => Err(Error::Internal("a committed report has no result".into())),
        };
        let _ = self.reply.send(answer);
    }
}

/// Takes queued reports in groups and commits each group on `pool`, `in_flight` at a
/// time, until the queue closes.
pub(super) async fn run_groups(
    mut queue: mpsc::UnboundedReceiver<Box<dyn Queued>>,
    in_flight: usize,
    pool: Arc<Pool>,
    clock: Arc<dyn Clock>,
    notify: NotifyMode,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            // Closed: wait for the groups still committing, then stop.
            drop(slot);
            let _ = slots
                .acquire_many(u32::try_from(in_flight).unwrap_or(u32::MAX))
                .await;
            return;
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        // By target, stably (see the module documentation).
        group.sort_by(|a, b| {
            let (a, b) = (a.lock(), b.lock());
            (&a.environment, &a.target).cmp(&(&b.environment, &b.target))
        });
        let (pool, clock) = (pool.clone(), clock.clone());
        tokio::spawn(async move {
            let _slot = slot;
            // If the pool is closed the group is dropped unanswered: its callers see the
            // store closing.
            let _ = pool
                .run(move |conn| {
                    commit_group(conn, &*clock, notify, group);
                    Ok(())
                })
                .await;
        });
    }
}

/// Commits `group`, running it again after a conflict; answers every report.
fn commit_group(
    conn: &mut Conn,
    clock: &dyn Clock,
    notify: NotifyMode,
    mut group: Vec<Box<dyn Queued>>,
) {
    metrics::histogram!(crate::telemetry::GROUP_COMMIT_WRITES).record(group.len() as f64);
    let reports = group.len();
    let outcome = retrying(
        || group_once(conn, clock, notify, &mut group),
        |e, attempt| {
            tracing::debug!(error = %e, attempt, reports, "report group conflicted; running it again");
            metrics::counter!(crate::telemetry::STORE_RETRIES).increment(1);
        },
    );
    match outcome {
        Ok(outcomes) => {
            for (report, outcome) in group.into_iter().zip(outcomes) {
                report.finish(outcome);
            }
        }
        Err(e) => {
            for report in group {
                report.finish(Err(for_each(&e)));
            }
        }
    }
}

/// The error of a group that failed as a whole, for each of its reports.
fn for_each(e: &Error) -> Error {
    match e {
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        Error::Aborted(m) => Error::Aborted(m.clone()),
        other => Error::internal(other),
    }
}

/// One attempt at a group: each report's outcome, or the failure of the whole group.
fn group_once(
    conn: &mut Conn,
    clock: &dyn Clock,
    notify: NotifyMode,
    group: &mut [Box<dyn Queued>],
) -> std::result::Result<Vec<Result<u64>>, Failed> {
    let started = std::time::Instant::now();
    let db = PgDb::begin(conn, IsolationLevel::ReadCommitted, false)?;
    let mut locks: Vec<i64> = group.iter().map(|r| r.lock().deployment).collect();
    locks.sort_unstable();
    locks.dedup();
    (&db as &dyn Db)
        .execute(
            "SELECT 1 FROM deployments WHERE id = ANY(?1) ORDER BY id FOR UPDATE",
            &[V::Is(locks)],
        )
        .map_err(|e| db.failed(e))?;
    let now = clock.now_ms();
    let mut events = Vec::new();
    let mut outcomes = Vec::with_capacity(group.len());
    // A group of one needs no savepoint: if its report fails, the transaction rolls back.
    let alone = group.len() == 1;
    for (i, report) in group.iter_mut().enumerate() {
        if !alone {
            let savepoint = if i == 0 {
                "SAVEPOINT report"
            } else {
                "RELEASE SAVEPOINT report; SAVEPOINT report"
            };
            db.batch(savepoint).map_err(|e| db.failed(e))?;
        }
        let mark = events.len();
        db.clear_error();
        match report.run(&db, now, &mut events) {
            Ok(()) => outcomes.push(Ok(events[mark..].last().map_or(0, |e| e.sequence))),
            Err(e) => {
                let failed = db.failed(e);
                if failed.retry {
                    return Err(failed);
                }
                if alone {
                    // Dropping the transaction rolls it back.
                    return Ok(vec![Err(failed.error)]);
                }
                events.truncate(mark);
                db.batch("ROLLBACK TO SAVEPOINT report")
                    .map_err(|e| db.failed(e))?;
                outcomes.push(Err(failed.error));
            }
        }
    }
    super::commit(db, notify, started)?;
    Ok(outcomes)
}
