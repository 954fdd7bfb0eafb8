//! Placement reports committed in groups.
//!
//! Reports are the hot write path: one per target per state change. Each replica queues
//! them and commits whatever arrived meanwhile in one READ COMMITTED transaction: `BEGIN`
//! sent with the statement locking every deployment the group names (in id order), one
//! read statement for all the group's reports, the rules applied to each in turn, one
//! write statement for all ([`apply_group`]), one `COMMIT` (one WAL flush for the group):
//! four round trips whatever the group's size. A group with two reports of one placement, or
//! with a report that lets a gradual strategy order more targets, is applied one report at
//! a time instead (each report's job: its read, its write, the pacing: see
//! [`crate::app`]). No savepoint per report: a report is refused before its first write, so
//! a refused report (NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT with no failed
//! statement and no event) leaves the transaction as it was and gets its own error. A
//! group whose read or write statement fails other than by a conflict runs again one
//! report at a time; there, any other failure of a report (a failed statement aborts the
//! whole transaction) drops the report with its error and the group runs again without
//! it. A group runs its reports ordered by target (stably: reports of one target keep
//! their arrival order and draw their sequences in it), and its write statement locks
//! their target rows in target order too, so the target rows heartbeats write are locked
//! in one order: two groups never wait for each other in a cycle, whether on deployments
//! or on targets.
//! Groups of at most [`MAX_GROUP`] reports. A conflict (a deadlock with
//! another replica's group, a unique key taken) runs the whole group again. Up to
//! `--pg-report-groups` groups (1 by default) commit at once per replica, each on its own
//! connection (with more than one, the next group fills while one commits).
//!
//! Each report is still acknowledged only after its replica's stream holds its event
//! (read-your-writes, see [`super::PostgresBackend::write`]); the log's hole rule is
//! unchanged: a group is one transaction whose id is taken before it draws a sequence.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{NotifyMode, ReportStatements};
use crate::app::apply_group;
use crate::domain::clock::{Clock, Millis};
use crate::domain::model::{PlacementEvent, ReportOutcome};
use crate::domain::{Error, Result};
use crate::store::backend::{ReportInput, ReportLock, WriteJob};
use crate::store::db::Db;
use store_kit::postgres::{retrying, Conn, Failed, PgDb, Pool};

/// The most reports committed in one transaction (a bound on the transaction's length and on
/// the work a conflict repeats).
pub(super) const MAX_GROUP: usize = 64;

/// A report and the caller waiting for it.
pub(super) struct Report {
    pub(super) lock: ReportLock,
    /// What the report is, for applying it with the rest of its group; without it (tests)
    /// the group runs each job in turn.
    pub(super) input: Option<Arc<ReportInput>>,
    /// Applies the report alone. A job that fails with no failed statement and no event
    /// appended has written nothing.
    pub(super) job: WriteJob<ReportOutcome>,
    pub(super) value: Option<ReportOutcome>,
    pub(super) reply: oneshot::Sender<Result<(ReportOutcome, u64)>>,
}

impl Report {
    /// Runs the report's job; keeps its value for [`Report::finish`].
    fn run(&mut self, db: &dyn Db, now: Millis, events: &mut Vec<PlacementEvent>) -> Result<()> {
        self.value = Some((self.job)(db, now, events)?);
        Ok(())
    }

    /// Answers the caller: the report's outcome and its newest sequence, or why it failed.
    fn finish(self, outcome: Result<u64>) {
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
    mut queue: mpsc::UnboundedReceiver<Report>,
    statements: ReportStatements,
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
            let (a, b) = (&a.lock, &b.lock);
            (&a.environment, &a.target).cmp(&(&b.environment, &b.target))
        });
        let (pool, clock) = (pool.clone(), clock.clone());
        tokio::spawn(async move {
            let _slot = slot;
            // If the pool is closed the group is dropped unanswered: its callers see the
            // store closing.
            let _ = pool
                .run(move |conn| {
                    commit_group(conn, &*clock, notify, statements, group);
                    Ok(())
                })
                .await;
        });
    }
}

/// Commits `group`, running it again after a conflict, one report at a time when applying
/// it together failed, or without a report that failed after writing; answers every report.
fn commit_group(
    conn: &mut Conn,
    clock: &dyn Clock,
    notify: NotifyMode,
    statements: ReportStatements,
    mut group: Vec<Report>,
) {
    metrics::histogram!(crate::telemetry::GROUP_COMMIT_WRITES).record(group.len() as f64);
    let reports = group.len();
    let mut answers: Vec<Option<Result<u64>>> = (0..reports).map(|_| None).collect();
    let mut live: Vec<usize> = (0..reports).collect();
    let mut together = statements == ReportStatements::Group;
    while !live.is_empty() {
        let outcome = retrying(
            || group_once(conn, clock, notify, together, &mut group, &live),
            |e, attempt| {
                tracing::debug!(error = %e, attempt, reports, "report group conflicted; running it again");
                metrics::counter!(crate::telemetry::STORE_RETRIES).increment(1);
            },
        );
        match outcome {
            Ok(Attempt::Committed(outcomes)) => {
                for (&i, outcome) in live.iter().zip(outcomes) {
                    answers[i] = Some(outcome);
                }
                break;
            }
            Ok(Attempt::Without(i, error)) => {
                answers[i] = Some(Err(error));
                live.retain(|&j| j != i);
            }
            Ok(Attempt::OneByOne(error)) => {
                tracing::warn!(error = %error, reports, "a report group's statements failed; applying its reports one at a time");
                together = false;
            }
            Err(e) => {
                for &i in &live {
                    answers[i] = Some(Err(for_each(&e)));
                }
                break;
            }
        }
    }
    for (report, answer) in group.into_iter().zip(answers) {
        report.finish(answer.unwrap_or_else(|| {
            Err(Error::Internal(
                "a report of a group was not answered".into(),
            ))
        }));
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

/// Whether `e` is the rules refusing a report, which happens before its first write; any
/// other failure drops the report and runs its group again, whether it wrote or not.
fn refusal(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidArgument(_) | Error::NotFound(_) | Error::FailedPrecondition(_)
    )
}

/// How an attempt at a group ended.
enum Attempt {
    /// Committed: the outcome of each report run, in order.
    Committed(Vec<Result<u64>>),
    /// Rolled back: the report at this index failed after writing (its error); the group
    /// runs again without it.
    Without(usize, Error),
    /// Rolled back: the group's reports applied together failed (the error, logged); the
    /// group runs again one report at a time, which tells whose report it was.
    OneByOne(Error),
}

/// One attempt at the reports of `group` at the indices `live`: together (one read and
/// one write statement for all, [`apply_group`]) when `together` and the group allows it,
/// else one report at a time.
fn group_once(
    conn: &mut Conn,
    clock: &dyn Clock,
    notify: NotifyMode,
    together: bool,
    group: &mut [Report],
    live: &[usize],
) -> std::result::Result<Attempt, Failed> {
    let started = std::time::Instant::now();
    let mut locks: Vec<i64> = live.iter().map(|&i| group[i].lock.deployment).collect();
    locks.sort_unstable();
    locks.dedup();
    // The lock travels with `BEGIN` (one round trip); the ids are numbers, written out.
    let ids: Vec<String> = locks.iter().map(i64::to_string).collect();
    let db = PgDb::begin_with(
        conn,
        &format!(
            "START TRANSACTION ISOLATION LEVEL READ COMMITTED;
             SELECT 1 FROM deployments WHERE id IN ({}) ORDER BY id FOR UPDATE",
            ids.join(", ")
        ),
    )?;
    let now = clock.now_ms();
    let inputs: Option<Vec<&ReportInput>> =
        live.iter().map(|&i| group[i].input.as_deref()).collect();
    if let Some(inputs) = inputs.filter(|_| together) {
        let mut events = Vec::new();
        match apply_group(&db, now, &inputs, &mut events) {
            Ok(Some(applied)) => {
                let mut outcomes = Vec::with_capacity(live.len());
                for (&i, applied) in live.iter().zip(applied) {
                    outcomes.push(applied.map(|(outcome, newest)| {
                        group[i].value = Some(outcome);
                        newest
                    }));
                }
                super::commit(db, notify, started)?;
                metrics::counter!(crate::telemetry::REPORT_GROUPS, "applied" => "together")
                    .increment(1);
                return Ok(Attempt::Committed(outcomes));
            }
            // Nothing written: one report at a time in this transaction.
            Ok(None) => {}
            Err(e) => {
                let failed = db.failed(e);
                if failed.retry {
                    return Err(failed);
                }
                // Dropping the transaction rolls it back.
                return Ok(Attempt::OneByOne(failed.error));
            }
        }
    }
    one_by_one(db, notify, group, live, started, now)
}

/// The rest of [`group_once`] one report at a time: each report's job in turn, in the
/// transaction `db` (the group's deployments locked), then the commit.
fn one_by_one(
    db: PgDb<'_>,
    notify: NotifyMode,
    group: &mut [Report],
    live: &[usize],
    started: std::time::Instant,
    now: Millis,
) -> std::result::Result<Attempt, Failed> {
    let mut events = Vec::new();
    let mut outcomes = Vec::with_capacity(live.len());
    for &i in live {
        let mark = events.len();
        db.clear_error();
        match group[i].run(&db, now, &mut events) {
            // A job that went on after a failed statement: the transaction is aborted (its
            // COMMIT would roll everything back), and the report cannot be trusted.
            Ok(()) if db.statement_failed() => {
                return Ok(Attempt::Without(
                    i,
                    Error::Internal("a report went on after a failed statement".into()),
                ))
            }
            Ok(()) => outcomes.push(Ok(events[mark..].last().map_or(0, |e| e.sequence))),
            Err(e) => {
                let wrote = db.statement_failed() || events.len() > mark || !refusal(&e);
                let failed = db.failed(e);
                if failed.retry {
                    return Err(failed);
                }
                if wrote {
                    // Dropping the transaction rolls it back.
                    return Ok(Attempt::Without(i, failed.error));
                }
                outcomes.push(Err(failed.error));
            }
        }
    }
    super::commit(db, notify, started)?;
    metrics::counter!(crate::telemetry::REPORT_GROUPS, "applied" => "one_by_one").increment(1);
    Ok(Attempt::Committed(outcomes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::domain::clock::SystemClock;
    use crate::store::db::p;
    use store_kit::postgres::connect;

    /// The answer a queued report of the test gets.
    type Answer = oneshot::Receiver<Result<(ReportOutcome, u64)>>;

    /// The outcome the test's jobs return (its contents do not matter here).
    fn outcome() -> ReportOutcome {
        use crate::domain::model::{DeploymentState, Placement, PlacementState};
        ReportOutcome {
            placement: Placement {
                deployment: 1,
                environment: "dev".into(),
                target: "a".into(),
                artifact: "web".into(),
                version: "1".into(),
                digest: String::new(),
                state: PlacementState::Placed,
                message: String::new(),
                sequence: 0,
                update_ms: 0,
            },
            deployment_state: DeploymentState::InProgress,
            changed: false,
        }
    }

    /// A queued report whose job is `job`, and the receiver of its answer.
    fn report(
        deployment: i64,
        target: &str,
        job: impl Fn(&dyn Db) -> Result<()> + Send + Sync + 'static,
    ) -> (Report, Answer) {
        let (reply, answer) = oneshot::channel();
        let queued = Report {
            lock: ReportLock {
                environment: "dev".into(),
                target: target.into(),
                deployment,
            },
            input: None,
            job: Arc::new(move |db: &dyn Db, _, _: &mut Vec<PlacementEvent>| {
                job(db).map(|()| outcome())
            }),
            value: None,
            reply,
        };
        (queued, answer)
    }

    /// A group without savepoints: a report refused before writing fails alone and the
    /// group commits; a report whose statement fails after it wrote takes the transaction
    /// down with it, and one that fails otherwise may have written, so the group runs again
    /// without each: their writes are gone, the others' are stored once.
    #[test]
    fn a_report_failing_after_its_write_is_dropped_and_the_group_runs_again() {
        let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
            eprintln!("TEST_DATABASE_URL is not set: skipped");
            return;
        };
        let schema = format!("deploy_groups_{}", std::process::id());
        let mut conn = Conn::new(
            connect(
                &url,
                &format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path TO {schema};
                     CREATE TABLE deployments (id BIGINT PRIMARY KEY); INSERT INTO deployments VALUES (1), (2);
                     CREATE TABLE written (v BIGINT NOT NULL)"
                ),
            )
            .unwrap(),
        );
        let write = |v: i64| {
            move |db: &dyn Db| {
                db.execute("INSERT INTO written (v) VALUES (?1)", p![v])
                    .map(drop)
            }
        };
        let (a, a_answer) = report(1, "a", write(1));
        let (refused, refused_answer) = report(1, "b", |_: &dyn Db| {
            Err(Error::NotFound("targets/dev/b".into()))
        });
        let (broken, broken_answer) = report(2, "c", move |db: &dyn Db| {
            write(3)(db)?;
            db.execute("SELECT 1 / (?1 - 1)", p![1]).map(drop)
        });
        let (d, d_answer) = report(2, "d", write(4));
        // Fails after writing, with no failed statement and no event: not a refusal, so it
        // is dropped too.
        let (undecoded, undecoded_answer) = report(2, "e", move |db: &dyn Db| {
            write(5)(db)?;
            Err(Error::Internal("a row that does not decode".into()))
        });
        commit_group(
            &mut conn,
            &SystemClock,
            NotifyMode::Off,
            ReportStatements::Group,
            vec![a, refused, broken, d, undecoded],
        );
        assert!(a_answer.blocking_recv().unwrap().is_ok());
        assert!(matches!(
            refused_answer.blocking_recv().unwrap(),
            Err(Error::NotFound(_))
        ));
        let broken = broken_answer.blocking_recv().unwrap().unwrap_err();
        assert!(!matches!(broken, Error::Aborted(_)), "{broken:?}");
        assert!(d_answer.blocking_recv().unwrap().is_ok());
        assert!(matches!(
            undecoded_answer.blocking_recv().unwrap(),
            Err(Error::Internal(_))
        ));
        let written: Vec<i64> = conn
            .client
            .query("SELECT v FROM written ORDER BY v", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            written,
            [1, 4],
            "the dropped report's write was rolled back"
        );
        conn.client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
    }
}
