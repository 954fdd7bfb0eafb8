//! A group of placement reports applied together (PostgreSQL): one read statement for all,
//! the rules for each in turn in Rust, one write statement for all. A group committed by
//! the PostgreSQL backend is then four round trips (`BEGIN` sent with the lock of its
//! deployments, these two statements, `COMMIT`) whatever its size.

use std::collections::{HashMap, HashSet};

use super::{
    audit_around_sequence, decide, report_read, report_row, stored_event, Accepted, Decision,
    ReportRead,
};
use crate::domain::audit::action;
use crate::domain::clock::Millis;
use crate::domain::deployment::PlacementCounts;
use crate::domain::model::{Deployment, PlacementEvent, ReportOutcome};
use crate::domain::names::deployment_name;
use crate::domain::{Error, Result};
use crate::store::backend::{to_i64, ReportInput};
use crate::store::db::{Db, V};

/// A group's reads in one statement ([`report_read`], and `i`, the report's position from
/// 1). Parameters: the deployments, environments and targets as arrays.
static GROUP_READ: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let read = report_read(
        "unnest(?1::BIGINT[], ?2::TEXT[], ?3::TEXT[]) WITH ORDINALITY AS r(deployment, environment, target, i)",
        "r.deployment",
        "r.environment",
        "r.target",
    );
    read.replacen("SELECT ", "SELECT r.i, ", 1)
});

/// A group's writes in one statement, the same rows as a report's own writes
/// ([`super::record_in_one_statement`]) for each report that changes its placement, in
/// order: the events (their inserts draw the sequences in the reports' order), the
/// placements, the audit records (`after` is the head, the sequence and the tail), then each
/// changed deployment's counts and state as the group leaves them, and the heartbeat of
/// every accepted report's target (their rows locked in target order first, as one report
/// at a time locks them, so two groups never wait for each other in a cycle on targets). `?1` is the time, `?18` the audit action; the rest are
/// arrays (see [`write_group`]). An event's trace context is NULL when its text is empty
/// (a W3C `traceparent` never is). Returns each event's sequence, deployment and target.
const GROUP_WRITES: &str = "WITH input AS (
           SELECT * FROM unnest(?2::BIGINT[], ?3::TEXT[], ?4::TEXT[], ?5::TEXT[], ?6::TEXT[], ?7::TEXT[], ?8::BIGINT[], ?9::BIGINT[],
                                ?10::TEXT[], ?11::TEXT[], ?12::TEXT[], ?13::TEXT[], ?14::TEXT[], ?15::TEXT[], ?16::TEXT[], ?17::TEXT[])
             WITH ORDINALITY AS r(deployment, environment, target, artifact, version, digest, state, previous_state,
                                  message, trace_parent, principal, resource, before_summary, after_head, after_tail, request_id, i)),
         event AS (
           INSERT INTO placement_events (commit_ms, deployment, environment, target, artifact, version, digest, state, previous_state, message, trace_parent)
           SELECT ?1::BIGINT, deployment, environment, target, artifact, version, digest, state, previous_state, message, NULLIF(trace_parent, '')
           FROM input ORDER BY i
           RETURNING seq, deployment, target),
         placement AS (
           INSERT INTO placements (deployment, target, state, message, seq, update_ms)
           SELECT n.deployment, n.target, n.state, n.message, e.seq, ?1::BIGINT
           FROM input n JOIN event e ON e.deployment = n.deployment AND e.target = n.target
           ON CONFLICT (deployment, target) DO UPDATE SET state = excluded.state, message = excluded.message, seq = excluded.seq, update_ms = excluded.update_ms),
         audit AS (
           INSERT INTO audit_records (time_ms, principal, action, resource, before_summary, after_summary, request_id, reason)
           SELECT ?1::BIGINT, n.principal, ?18::TEXT, n.resource, n.before_summary, n.after_head || e.seq::TEXT || n.after_tail, n.request_id, ''
           FROM input n JOIN event e ON e.deployment = n.deployment AND e.target = n.target ORDER BY e.seq),
         deployment AS (
           UPDATE deployments d SET state = c.state, update_ms = ?1::BIGINT, n_pending = c.n_pending, n_placing = c.n_placing,
             n_placed = c.n_placed, n_failed = c.n_failed, n_removed = c.n_removed
           FROM unnest(?19::BIGINT[], ?20::BIGINT[], ?21::BIGINT[], ?22::BIGINT[], ?23::BIGINT[], ?24::BIGINT[], ?25::BIGINT[])
             AS c(id, state, n_pending, n_placing, n_placed, n_failed, n_removed)
           WHERE d.id = c.id),
         beating AS MATERIALIZED (
           SELECT t.environment, t.id FROM targets t JOIN unnest(?26::TEXT[], ?27::TEXT[]) AS h(environment, id)
             ON t.environment = h.environment AND t.id = h.id
           ORDER BY t.environment, t.id FOR UPDATE OF t),
         heartbeat AS (
           UPDATE targets t SET heartbeat_ms = ?1::BIGINT FROM beating b
           WHERE t.environment = b.environment AND t.id = b.id)
         SELECT seq, deployment, target FROM event";

/// One report's outcome in a group, and its event's sequence (0: none).
pub(crate) type Applied = Result<(ReportOutcome, u64)>;

/// Applies `inputs` together, in order, in the transaction of `db` (PostgreSQL, the group's
/// deployments locked), each as the report's target's own report (with its heartbeat): the
/// same outcomes and the same rows as [`super::apply_report`] on each in turn, in two
/// statements. A refused report writes nothing and gets its error. Returns `None`, having
/// written nothing, when the group must be applied one report at a time: two reports of one
/// placement (the later one's outcome would name a sequence the statement has not drawn
/// yet), or a report that lets its strategy order more targets (pacing reads the
/// deployment's placements).
pub(crate) fn apply_group(
    db: &dyn Db,
    now: Millis,
    inputs: &[&ReportInput],
    events: &mut Vec<PlacementEvent>,
) -> Result<Option<Vec<Applied>>> {
    let mut placements = HashSet::new();
    if !inputs
        .iter()
        .all(|i| placements.insert((i.report.deployment, i.report.target.as_str())))
    {
        return Ok(None);
    }
    // Each deployment as the group's earlier reports left it.
    let mut after: HashMap<i64, (Deployment, PlacementCounts)> = HashMap::new();
    let mut decided = Vec::with_capacity(inputs.len());
    for (input, read) in inputs.iter().zip(read_group(db, inputs)?) {
        let decision = read.and_then(|mut read| {
            if let Some((d, counts)) = after.get(&input.report.deployment) {
                (read.0, read.1) = (d.clone(), *counts);
            }
            decide(read, input.report.clone(), now)
        });
        if let Ok(Decision::Changed(accepted)) = &decision {
            if accepted.orders_more() {
                return Ok(None);
            }
            after.insert(accepted.deployment.id, accepted.deployment_after(now));
        }
        decided.push(decision);
    }
    let sequences = write_group(db, now, inputs, &decided, &after)?;
    let mut applied = Vec::with_capacity(inputs.len());
    for (input, decision) in inputs.iter().zip(decided) {
        applied.push(match decision {
            Err(e) => Err(e),
            Ok(Decision::Unchanged(outcome)) => Ok((outcome, 0)),
            Ok(Decision::Changed(accepted)) => {
                let Accepted {
                    mut placement,
                    from,
                    state,
                    ..
                } = *accepted;
                let seq = sequences
                    .get(&(placement.deployment, placement.target.clone()))
                    .copied()
                    .ok_or_else(|| {
                        Error::Internal("a report of a group was given no sequence".into())
                    })?;
                let event = stored_event(&mut placement, seq, now, from, &input.caller);
                let sequence = event.sequence;
                events.push(event);
                let outcome = ReportOutcome {
                    placement,
                    deployment_state: state,
                    changed: true,
                };
                Ok((outcome, sequence))
            }
        });
    }
    Ok(Some(applied))
}

/// The group's one read ([`GROUP_READ`]): each report's read, or NOT_FOUND when its
/// deployment does not exist, or why its row does not decode.
fn read_group(db: &dyn Db, inputs: &[&ReportInput]) -> Result<Vec<Result<ReportRead>>> {
    let mut reads: Vec<Result<ReportRead>> = inputs
        .iter()
        .map(|i| Err(Error::NotFound(deployment_name(i.report.deployment))))
        .collect();
    let column =
        |f: fn(&ReportInput) -> &String| V::Ts(inputs.iter().map(|i| f(i).clone()).collect());
    let params = [
        V::Is(inputs.iter().map(|i| i.report.deployment).collect()),
        column(|i| &i.report.environment),
        column(|i| &i.report.target),
    ];
    db.each(&GROUP_READ, &params, &mut |r| {
        let i: i64 = r.col("i")?;
        let read = usize::try_from(i - 1)
            .ok()
            .and_then(|i| reads.get_mut(i))
            .ok_or_else(|| Error::Internal(format!("a group's read returned report {i}")))?;
        *read = report_row(r);
        Ok(())
    })?;
    Ok(reads)
}

/// The group's one write ([`GROUP_WRITES`]), if it has anything to write; returns the
/// sequence of each changed placement's event.
fn write_group(
    db: &dyn Db,
    now: Millis,
    inputs: &[&ReportInput],
    decided: &[Result<Decision>],
    after: &HashMap<i64, (Deployment, PlacementCounts)>,
) -> Result<HashMap<(i64, String), i64>> {
    let (changes, mut heartbeats) = change_columns(now, inputs, decided)?;
    if after.is_empty() && heartbeats.is_empty() {
        return Ok(HashMap::new());
    }
    heartbeats.sort_unstable();
    heartbeats.dedup();
    let mut deployments: Vec<_> = after.values().collect();
    deployments.sort_unstable_by_key(|(d, _)| d.id);
    let counts = |f: fn(&PlacementCounts) -> u64| {
        V::Is(deployments.iter().map(|(_, c)| to_i64(f(c))).collect())
    };
    let mut params = vec![V::I(now)];
    params.extend(changes);
    params.extend([
        V::T(action::REPORT_PLACEMENT.to_owned()),
        V::Is(deployments.iter().map(|(d, _)| d.id).collect()),
        V::Is(deployments.iter().map(|(d, _)| d.state.code()).collect()),
        counts(|c| c.pending),
        counts(|c| c.placing),
        counts(|c| c.placed),
        counts(|c| c.failed),
        counts(|c| c.removed),
        V::Ts(heartbeats.iter().map(|(e, _)| (*e).clone()).collect()),
        V::Ts(heartbeats.iter().map(|(_, t)| (*t).clone()).collect()),
    ]);
    let mut sequences = HashMap::new();
    db.each(GROUP_WRITES, &params, &mut |r| {
        sequences.insert((r.col("deployment")?, r.col("target")?), r.col("seq")?);
        Ok(())
    })?;
    Ok(sequences)
}

/// A target whose heartbeat a group writes: environment and id.
type Heartbeat<'a> = (&'a String, &'a String);

/// The columns of the group's changed placements, `?2` to `?17` of [`GROUP_WRITES`] in
/// order, and the environment and target of every accepted report (their heartbeats).
fn change_columns<'a>(
    now: Millis,
    inputs: &[&'a ReportInput],
    decided: &'a [Result<Decision>],
) -> Result<(Vec<V>, Vec<Heartbeat<'a>>)> {
    let mut text: [Vec<String>; 13] = Default::default();
    let mut numbers: [Vec<i64>; 3] = Default::default();
    let mut heartbeats = Vec::new();
    for (input, decision) in inputs.iter().zip(decided) {
        let accepted = match decision {
            Err(_) => continue,
            Ok(Decision::Unchanged(outcome)) => {
                heartbeats.push((&outcome.placement.environment, &outcome.placement.target));
                continue;
            }
            Ok(Decision::Changed(accepted)) => accepted,
        };
        let caller = &input.caller;
        let mut placement = accepted.placement.clone();
        let change = accepted.change(now, caller, true);
        let (entry, after_head, after_tail) = audit_around_sequence(&change, &mut placement)?;
        for (column, value) in numbers.iter_mut().zip([
            placement.deployment,
            placement.state.code(),
            accepted.from.code(),
        ]) {
            column.push(value);
        }
        for (column, value) in text.iter_mut().zip([
            placement.environment,
            placement.target,
            placement.artifact,
            placement.version,
            placement.digest,
            placement.message,
            caller.trace_parent.clone().unwrap_or_default(),
            caller.principal.clone(),
            entry.resource,
            entry.before,
            after_head,
            after_tail,
            caller.request_id.clone(),
        ]) {
            column.push(value);
        }
        heartbeats.push((&input.report.environment, &input.report.target));
    }
    let [environment, target, artifact, version, digest, message, trace_parent, principal, resource, before, after_head, after_tail, request_id] =
        text.map(V::Ts);
    let [deployment, state, previous_state] = numbers.map(V::Is);
    let columns = vec![
        deployment,
        environment,
        target,
        artifact,
        version,
        digest,
        state,
        previous_state,
        message,
        trace_parent,
        principal,
        resource,
        before,
        after_head,
        after_tail,
        request_id,
    ];
    Ok((columns, heartbeats))
}
