//! Placement reports (one read and the writes they need, with their events) and the orders
//! an agent reads.

use std::sync::Arc;

use serde_json::json;

mod group;
pub(crate) use group::apply_group;

use super::audit::append_audit;
use super::deployments::{
    counts_row, deployment_row, pace_deployment, COUNT_COLUMNS, DEPLOYMENT_COLUMNS,
};
use super::SqlStore;
use crate::domain::audit::{self, action, AuditEntry, Caller};
use crate::domain::clock::Millis;
use crate::domain::deployment::{check_transition, derive_state, PlacementCounts};
use crate::domain::model::{
    Deployment, DeploymentState, Placement, PlacementEvent, PlacementReport, PlacementState,
    ReportOutcome,
};
use crate::domain::names::{artifact_version_name, deployment_name, environment_name, target_name};
use crate::domain::strategy::Strategy;
use crate::domain::{Error, Result};
use crate::store::backend::{to_i64, to_u64, Backend, ReportInput, ReportLock};
use crate::store::db::{p, Db, Dialect, SqlRow, V};
use crate::store::log::placement_state;

/// A report's read, every column by its own name: [`DEPLOYMENT_COLUMNS`], [`COUNT_COLUMNS`],
/// `registered` (1 if the target is registered), the placement's `placement_state`,
/// `placement_message`, `placement_seq` and `placement_update_ms` (NULL before its first
/// report), the artifact's `digest`; `from` and the three expressions name the report's
/// deployment, environment and target.
fn report_read(from: &str, deployment: &str, environment: &str, target: &str) -> String {
    let qualified = |columns: &str| {
        columns
            .split(", ")
            .map(|c| format!("d.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "SELECT {}, {},
           (SELECT 1 FROM targets t WHERE t.environment = {environment} AND t.id = {target}) AS registered,
           p.state AS placement_state, p.message AS placement_message, p.seq AS placement_seq,
           p.update_ms AS placement_update_ms,
           (SELECT a.digest FROM artifacts a WHERE a.name = d.artifact AND a.version = d.version) AS digest
         FROM {from} JOIN deployments d ON d.id = {deployment}
         LEFT JOIN placements p ON p.deployment = d.id AND p.target = {target}",
        qualified(DEPLOYMENT_COLUMNS),
        qualified(COUNT_COLUMNS)
    )
}

/// One report's read ([`report_read`]). Parameters: deployment, environment, target.
pub(super) static REPORT_READ: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| report_read("(SELECT 1) AS one", "?1", "?2", "?3"));

/// Appends the event of `placement` (already in its new state) to the outbox, with the
/// trace context of the call that caused it, and sets the placement's sequence; returns the
/// event, to publish after commit.
pub(super) fn append_event(
    conn: &dyn Db,
    now: Millis,
    placement: &mut Placement,
    previous: PlacementState,
    caller: &Caller,
) -> Result<PlacementEvent> {
    let seq: i64 = conn.row("INSERT INTO placement_events (commit_ms, deployment, environment, target, artifact, version, digest, state, previous_state, message, trace_parent)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING seq",
        &event_values(now, placement, previous, caller), |r| r.get(0))?;
    conn.execute("INSERT INTO placements (deployment, target, state, message, seq, update_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (deployment, target) DO UPDATE SET state = excluded.state, message = excluded.message, seq = excluded.seq, update_ms = excluded.update_ms", p![
        placement.deployment,
        placement.target,
        placement.state.code(),
        placement.message,
        seq,
        now
    ])?;
    Ok(stored_event(placement, seq, now, previous, caller))
}

/// The values of an event's columns, `?1` to `?11` of its insert (in both forms of a
/// report's writes): commit time, deployment, environment, target, artifact, version,
/// digest, state, previous state, message, trace context.
fn event_values(
    now: Millis,
    placement: &Placement,
    previous: PlacementState,
    caller: &Caller,
) -> Vec<V> {
    p![
        now,
        placement.deployment,
        placement.environment,
        placement.target,
        placement.artifact,
        placement.version,
        placement.digest,
        placement.state.code(),
        previous.code(),
        placement.message,
        caller.trace_parent
    ]
    .to_vec()
}

/// `placement` stored with sequence `seq` at `now`, and its event, to publish after commit.
fn stored_event(
    placement: &mut Placement,
    seq: i64,
    now: Millis,
    previous: PlacementState,
    caller: &Caller,
) -> PlacementEvent {
    placement.sequence = to_u64(seq);
    placement.update_ms = now;
    PlacementEvent {
        sequence: placement.sequence,
        commit_ms: now,
        placement: placement.clone(),
        previous_state: previous,
        trace_parent: caller.trace_parent.clone(),
    }
}

/// Applies one placement report in the report's transaction (see
/// [`crate::store::Store::report_placement`]): the transition checked, the placement, its
/// event, the deployment's counts and state, the audit record, the target's heartbeat when
/// the report is the target's own (`heartbeat`), and the next targets ordered when the
/// strategy allows.
///
/// Everything that can refuse the report (NOT_FOUND, FAILED_PRECONDITION) is checked before
/// its first write, so a refused report has written nothing: the PostgreSQL backend commits
/// reports in groups without a savepoint each, relying on it, and runs a group again without
/// a report that failed in any other way.
pub(super) fn apply_report(
    conn: &dyn Db,
    now: Millis,
    events: &mut Vec<PlacementEvent>,
    report: PlacementReport,
    caller: &Caller,
    heartbeat: bool,
) -> Result<ReportOutcome> {
    let accepted = match decide(read_report(conn, &report)?, report, now)? {
        Decision::Unchanged(outcome) => {
            if heartbeat {
                record_heartbeat(conn, now, &outcome.placement)?;
            }
            return Ok(outcome);
        }
        Decision::Changed(accepted) => accepted,
    };
    let change = accepted.change(now, caller, heartbeat);
    let mut placement = accepted.placement.clone();
    events.push(match conn.dialect() {
        Dialect::Sqlite => record_in_statements(conn, &change, &mut placement)?,
        Dialect::Postgres => record_in_one_statement(conn, &change, &mut placement)?,
    });
    if accepted.orders_more() {
        // A finished target may let the strategy order the next ones.
        let d = Deployment {
            state: accepted.state,
            ..accepted.deployment
        };
        pace_deployment(conn, &d, now)?;
    }
    Ok(ReportOutcome {
        placement,
        deployment_state: accepted.state,
        changed: true,
    })
}

/// What the rules make of a report, before any write.
enum Decision {
    /// Accepted without a change (a repeated state): its outcome.
    Unchanged(ReportOutcome),
    /// Accepted with a change.
    Changed(Box<Accepted>),
}

/// An accepted report that changes its placement.
struct Accepted {
    /// The deployment before the report.
    deployment: Deployment,
    /// The placement's state before the report.
    from: PlacementState,
    /// The deployment's counts after the report, and the state they derive.
    counts: PlacementCounts,
    state: DeploymentState,
    /// The placement in its new state (its sequence and update time as before).
    placement: Placement,
}

impl Accepted {
    /// The change to write.
    fn change<'a>(&'a self, now: Millis, caller: &'a Caller, heartbeat: bool) -> Change<'a> {
        Change {
            now,
            caller,
            deployment: &self.deployment,
            from: self.from,
            counts: self.counts,
            state: self.state,
            heartbeat,
        }
    }

    /// Whether the report lets the deployment's strategy order more targets.
    fn orders_more(&self) -> bool {
        may_order_more(&self.deployment, self.placement.state, self.state)
    }

    /// The deployment after the report, at `now`, and its counts.
    fn deployment_after(&self, now: Millis) -> (Deployment, PlacementCounts) {
        let d = Deployment {
            state: self.state,
            update_ms: now,
            ..self.deployment.clone()
        };
        (d, self.counts)
    }
}

/// The rules over what a report read (`read`): refuses it (NOT_FOUND, FAILED_PRECONDITION),
/// or accepts it with or without a change.
fn decide(read: ReportRead, report: PlacementReport, now: Millis) -> Result<Decision> {
    let (d, mut counts, registered, current, digest) = read;
    let target = target_name(&report.environment, &report.target);
    check_target(&d, &report, registered, &target)?;
    let from = previous_state(&d, &report, current.as_ref())?;
    let digest = digest.ok_or_else(|| missing_artifact(&d))?;
    let changed = check_transition(d.state, from, report.state)
        .map_err(|why| Error::precondition("PLACEMENT_TRANSITION", target.clone(), why))?;
    let mut placement = placement_so_far(&d, &report, current.as_ref(), digest, from, now);
    if !changed {
        return Ok(Decision::Unchanged(ReportOutcome {
            placement,
            deployment_state: d.state,
            changed: false,
        }));
    }
    placement.state = report.state;
    placement.message = report.message;
    if current.is_some() {
        counts.remove(from);
    }
    counts.add(report.state, 1);
    let state = derive_state(d.state, counts, d.strategy.max_failures());
    Ok(Decision::Changed(Box::new(Accepted {
        deployment: d,
        from,
        counts,
        state,
        placement,
    })))
}

/// An accepted report's change, for its writes.
struct Change<'a> {
    now: Millis,
    caller: &'a Caller,
    /// The deployment before the report.
    deployment: &'a Deployment,
    /// The placement's state before the report.
    from: PlacementState,
    /// The deployment's counts after the report, and the state they derive.
    counts: PlacementCounts,
    state: DeploymentState,
    /// Whether the target's heartbeat is written too.
    heartbeat: bool,
}

/// The report's writes as one statement each (SQLite, in process: a statement costs no
/// round trip). Returns the event.
fn record_in_statements(
    conn: &dyn Db,
    change: &Change,
    placement: &mut Placement,
) -> Result<PlacementEvent> {
    let event = append_event(conn, change.now, placement, change.from, change.caller)?;
    record_counts(
        conn,
        change.deployment.id,
        change.counts,
        change.state,
        change.now,
    )?;
    let (before, after) = report_audit(change, placement);
    append_audit(
        conn,
        change.now,
        change.caller,
        report_entry(change, before, &after),
    )?;
    if change.heartbeat {
        record_heartbeat(conn, change.now, placement)?;
    }
    Ok(event)
}

/// A report's writes in one statement (PostgreSQL): the event (its insert draws the
/// sequence), the placement, the deployment's counts and state, the audit record (its
/// `after` is ?22, the sequence, ?23) and, when ?26 is 1, the target's heartbeat.
const REPORT_WRITES: &str = "WITH event AS (
           INSERT INTO placement_events (commit_ms, deployment, environment, target, artifact, version, digest, state, previous_state, message, trace_parent)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING seq),
         placement AS (
           INSERT INTO placements (deployment, target, state, message, seq, update_ms)
           SELECT ?2::BIGINT, ?4::TEXT, ?8::BIGINT, ?10::TEXT, seq, ?1::BIGINT FROM event
           ON CONFLICT (deployment, target) DO UPDATE SET state = excluded.state, message = excluded.message, seq = excluded.seq, update_ms = excluded.update_ms),
         deployment AS (
           UPDATE deployments SET state = ?12, update_ms = ?1, n_pending = ?13, n_placing = ?14, n_placed = ?15, n_failed = ?16, n_removed = ?17
           WHERE id = ?2),
         audit AS (
           INSERT INTO audit_records (time_ms, principal, action, resource, before_summary, after_summary, request_id, reason)
           SELECT ?1::BIGINT, ?18::TEXT, ?19::TEXT, ?20::TEXT, ?21::TEXT, ?22::TEXT || seq::TEXT || ?23::TEXT, ?24::TEXT, ?25::TEXT FROM event),
         heartbeat AS (
           UPDATE targets SET heartbeat_ms = ?1 WHERE ?26::BIGINT = 1 AND environment = ?3 AND id = ?4)
         SELECT seq FROM event";

/// The same writes as [`record_in_statements`] in one statement (PostgreSQL: one round trip
/// instead of five; the event's sequence, drawn by its insert, is handed to the placement and
/// written into the audit record by the statement itself). Returns the event.
fn record_in_one_statement(
    conn: &dyn Db,
    change: &Change,
    placement: &mut Placement,
) -> Result<PlacementEvent> {
    let (entry, after_head, after_tail) = audit_around_sequence(change, placement)?;
    let counts = change.counts;
    let mut values = event_values(change.now, placement, change.from, change.caller);
    values.extend_from_slice(p![
        change.state.code(),
        to_i64(counts.pending),
        to_i64(counts.placing),
        to_i64(counts.placed),
        to_i64(counts.failed),
        to_i64(counts.removed),
        change.caller.principal,
        entry.action,
        entry.resource,
        entry.before,
        after_head,
        after_tail,
        change.caller.request_id,
        entry.reason,
        i64::from(change.heartbeat)
    ]);
    let seq: i64 = conn.row(REPORT_WRITES, &values, |r| r.get(0))?;
    Ok(stored_event(
        placement,
        seq,
        change.now,
        change.from,
        change.caller,
    ))
}

/// The audit record of an accepted report (`placement` in its new state) for a statement
/// that draws the sequence itself: the record and its `after` split around the sequence.
fn audit_around_sequence(
    change: &Change,
    placement: &mut Placement,
) -> Result<(AuditEntry, String, String)> {
    // Rendered with a stand-in number, and split around it. (A key's quotes are never
    // escaped and a string's always are, so the stand-in is found only as the value of
    // the key.)
    placement.sequence = u64::MAX;
    let (before, after) = report_audit(change, placement);
    let number = u64::MAX.to_string();
    let key = format!("\"sequence\":{number}");
    let at = after
        .find(&key)
        .map(|at| at + key.len() - number.len())
        .ok_or_else(|| Error::Internal("a report's audit record names no sequence".into()))?;
    let (head, tail) = (
        after[..at].to_owned(),
        after[at + number.len()..].to_owned(),
    );
    Ok((report_entry(change, before, ""), head, tail))
}

/// A report is a sign of life too: a target reporting without heartbeats (a pipeline, say)
/// is not taken for a lost agent.
fn record_heartbeat(conn: &dyn Db, now: Millis, placement: &Placement) -> Result<()> {
    conn.execute(
        "UPDATE targets SET heartbeat_ms = ?1 WHERE environment = ?2 AND id = ?3",
        p![now, placement.environment, placement.target],
    )?;
    Ok(())
}

/// Refuses a report for a target (named `target`) outside the deployment's environment,
/// or one not `registered`.
fn check_target(
    d: &Deployment,
    report: &PlacementReport,
    registered: bool,
    target: &str,
) -> Result<()> {
    if d.environment != report.environment {
        return Err(Error::precondition(
            "TARGET_NOT_IN_ENVIRONMENT",
            target.to_owned(),
            format!(
                "{} deploys to {}, not to the target's environment",
                deployment_name(d.id),
                environment_name(&d.environment)
            ),
        ));
    }
    if !registered {
        return Err(Error::NotFound(target.to_owned()));
    }
    Ok(())
}

/// The state of the placement before the report: its stored state, PENDING before its
/// first report.
fn previous_state(
    d: &Deployment,
    report: &PlacementReport,
    current: Option<&StoredPlacement>,
) -> Result<PlacementState> {
    match current {
        Some(c) => placement_state(
            "placements",
            "state",
            &format!("{}/{}", d.id, report.target),
            c.0,
        ),
        None => Ok(PlacementState::Pending),
    }
}

/// The error of a deployment whose artifact version is gone (the store is corrupt).
fn missing_artifact(d: &Deployment) -> Error {
    Error::corrupt(
        "deployments",
        &deployment_name(d.id),
        format!(
            "artifact {} is missing",
            artifact_version_name(&d.artifact, &d.version)
        ),
    )
}

/// The placement as it stands before the report (state `from`; sequence 0 and update
/// time `now` before its first report).
fn placement_so_far(
    d: &Deployment,
    report: &PlacementReport,
    current: Option<&StoredPlacement>,
    digest: String,
    from: PlacementState,
    now: Millis,
) -> Placement {
    Placement {
        deployment: d.id,
        environment: d.environment.clone(),
        target: report.target.clone(),
        artifact: d.artifact.clone(),
        version: d.version.clone(),
        digest,
        state: from,
        message: current.map(|c| c.1.clone()).unwrap_or_default(),
        sequence: current.map(|c| to_u64(c.2)).unwrap_or(0),
        update_ms: current.map(|c| c.3).unwrap_or(now),
    }
}

/// Whether an accepted report moving a placement to `reported` (the deployment now in
/// `state`) lets deployment `d`'s strategy order more targets.
fn may_order_more(d: &Deployment, reported: PlacementState, state: DeploymentState) -> bool {
    !state.is_final()
        // An all-at-once deployment ordered every target when it was created: a report never
        // lets it order more, and pacing reads every placement of the deployment (a cost
        // that grows with the fleet, paid by every report).
        && !matches!(d.strategy, Strategy::AllAtOnce)
        && matches!(
            reported,
            PlacementState::Placed | PlacementState::Failed | PlacementState::Removed
        )
}

/// A placement as stored: state, message, sequence, update time.
type StoredPlacement = (i64, String, i64, i64);

/// What a report reads: the deployment, its counts, whether the target is registered, the
/// placement so far (state, message, sequence, update time) and the artifact's digest.
type ReportRead = (
    Deployment,
    PlacementCounts,
    bool,
    Option<StoredPlacement>,
    Option<String>,
);

/// The report's one read ([`REPORT_READ`]).
fn read_report(conn: &dyn Db, report: &PlacementReport) -> Result<ReportRead> {
    // One statement reads everything the report needs: the deployment (locked by the
    // backend before the job runs: see `Backend::report`), its counts, whether the target
    // is registered, the placement so far and the artifact's digest.
    let read = conn.one(
        &REPORT_READ,
        p![report.deployment, &report.environment, &report.target],
        report_row,
    )?;
    read.ok_or_else(|| Error::NotFound(deployment_name(report.deployment)))
}

/// What a row of [`report_read`] holds.
fn report_row(r: &SqlRow) -> Result<ReportRead> {
    Ok((
        deployment_row(r)?,
        counts_row(r)?,
        r.col::<Option<i64>>("registered")?.is_some(),
        r.col::<Option<i64>>("placement_state")?
            .map(|state| -> Result<StoredPlacement> {
                Ok((
                    state,
                    r.col("placement_message")?,
                    r.col("placement_seq")?,
                    r.col("placement_update_ms")?,
                ))
            })
            .transpose()?,
        r.col::<Option<String>>("digest")?,
    ))
}

/// Stores the deployment's new counts and the state they derive.
fn record_counts(
    conn: &dyn Db,
    deployment: i64,
    counts: PlacementCounts,
    state: DeploymentState,
    now: Millis,
) -> Result<()> {
    conn.execute("UPDATE deployments SET state = ?1, update_ms = ?2, n_pending = ?3, n_placing = ?4, n_placed = ?5, n_failed = ?6, n_removed = ?7 WHERE id = ?8", p![
        state.code(),
        now,
        to_i64(counts.pending),
        to_i64(counts.placing),
        to_i64(counts.placed),
        to_i64(counts.failed),
        to_i64(counts.removed),
        deployment
    ])?;
    Ok(())
}

/// The audit summaries of an accepted report (`placement` in its new state, with its
/// sequence): the placement's state before and after, and the deployment's when the report
/// moved it.
fn report_audit(change: &Change, placement: &Placement) -> (String, String) {
    let target = target_name(&placement.environment, &placement.target);
    let mut before = json!({"target": target, "state": change.from.name()});
    let mut after =
        json!({"target": target, "state": placement.state.name(), "sequence": placement.sequence});
    if !placement.message.is_empty() {
        after["message"] = placement.message.clone().into();
    }
    if change.state != change.deployment.state {
        before["deployment_state"] = change.deployment.state.name().into();
        after["deployment_state"] = change.state.name().into();
    }
    (audit::text(&before), audit::text(&after))
}

/// The audit record of an accepted report.
fn report_entry(change: &Change, before: String, after: &str) -> AuditEntry {
    AuditEntry {
        action: action::REPORT_PLACEMENT,
        resource: deployment_name(change.deployment.id),
        before,
        after: after.to_owned(),
        reason: String::new(),
    }
}

/// An order as the store reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRow {
    /// Deployment id.
    pub deployment: i64,
    /// Artifact name.
    pub artifact: String,
    /// Version.
    pub version: String,
    /// Digest.
    pub digest: String,
    /// Source URI.
    pub source_uri: String,
}

pub(super) async fn orders<B: Backend>(
    store: &SqlStore<B>,
    environment: &str,
    target: &str,
) -> Result<Vec<OrderRow>> {
    let (environment, target) = (environment.to_owned(), target.to_owned());
    store
        .read(move |conn| {
            conn.all(
                "SELECT p.deployment, d.artifact, d.version, a.digest, a.source_uri
                 FROM placements p
                 JOIN deployments d ON d.id = p.deployment
                 JOIN artifacts a ON a.name = d.artifact AND a.version = d.version
                 WHERE p.target = ?2 AND d.environment = ?1 AND p.ordered = 1
                   AND p.state IN (?3, ?4) AND d.state IN (?5, ?6)
                 ORDER BY p.deployment",
                p![
                    environment,
                    target,
                    PlacementState::Pending.code(),
                    PlacementState::Placing.code(),
                    DeploymentState::Pending.code(),
                    DeploymentState::InProgress.code()
                ],
                |r| {
                    Ok(OrderRow {
                        deployment: r.get(0)?,
                        artifact: r.get(1)?,
                        version: r.get(2)?,
                        digest: r.get(3)?,
                        source_uri: r.get(4)?,
                    })
                },
            )
        })
        .await
}

pub(super) async fn report_placement<B: Backend>(
    store: &SqlStore<B>,
    report: PlacementReport,
    caller: Caller,
) -> Result<ReportOutcome> {
    let lock = ReportLock {
        environment: report.environment.clone(),
        target: report.target.clone(),
        deployment: report.deployment,
    };
    let input = Arc::new(ReportInput { report, caller });
    let job = {
        let input = input.clone();
        Arc::new(
            move |conn: &dyn Db, now, events: &mut Vec<PlacementEvent>| {
                apply_report(conn, now, events, input.report.clone(), &input.caller, true)
            },
        )
    };
    store.backend.report(lock, input, job).await
}
