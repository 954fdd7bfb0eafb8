//! The background pass: paces deployments and marks the placements of lost agents.

use serde_json::json;

use super::audit::append_audit;
use super::deployments::{
    deployment_row, load_deployment, lock_deployment, pace_deployment, rollback, DEPLOYMENT_COLUMNS,
};
use super::reports::apply_report;
use super::SqlStore;
use crate::domain::audit::{self, AuditEntry, Caller};
use crate::domain::clock::Millis;
use crate::domain::model::{
    Deployment, DeploymentState, PlacementEvent, PlacementReport, PlacementState,
};
use crate::domain::names::deployment_name;
use crate::domain::{Error, Result};
use crate::store::backend::Backend;
use crate::store::db::{p, Db};

/// One background pass, in one write transaction: lost agents' placements failed, baked
/// canaries paced, failed deployments rolled back when they asked to be. Returns whether it
/// changed anything.
pub(super) async fn tick<B: Backend>(store: &SqlStore<B>, agent_timeout_ms: i64) -> Result<bool> {
    store
        .write(move |conn, now, events| {
            let mut changed = fail_lost_placements(conn, now, events, agent_timeout_ms)?;
            changed |= pace_canaries(conn, now)?;
            changed |= roll_back_failed(conn, now, events)?;
            Ok(changed)
        })
        .await
}

/// Agents gone quiet (no heartbeat for `agent_timeout_ms`): their unfinished ordered
/// placements fail. Returns whether it failed any.
fn fail_lost_placements(
    conn: &dyn Db,
    now: Millis,
    events: &mut Vec<PlacementEvent>,
    agent_timeout_ms: i64,
) -> Result<bool> {
    let mut changed = false;
    let lost: Vec<(i64, String, String, i64)> = conn.all("SELECT p.deployment, d.environment, p.target, t.heartbeat_ms
             FROM placements p
             JOIN deployments d ON d.id = p.deployment
             JOIN targets t ON t.environment = d.environment AND t.id = p.target
             WHERE p.ordered = 1 AND p.state IN (?1, ?2) AND d.state IN (?3, ?4) AND t.heartbeat_ms < ?5
             ORDER BY p.deployment, p.target", p![
                PlacementState::Pending.code(),
                PlacementState::Placing.code(),
                DeploymentState::Pending.code(),
                DeploymentState::InProgress.code(),
                now - agent_timeout_ms
            ], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    for (deployment, environment, target, heartbeat) in lost {
        // An earlier lost target may have failed the deployment already: a final
        // deployment takes no new FAILED report (and must not fail the whole pass).
        // Locked first, as a report locks it (its row before its placements).
        lock_deployment(conn, deployment)?;
        if load_deployment(conn, deployment, false)?.state.is_final() {
            continue;
        }
        apply_report(
            conn,
            now,
            events,
            PlacementReport {
                deployment,
                environment,
                target,
                state: PlacementState::Failed,
                message: format!(
                    "agent lost: no heartbeat for {} s",
                    (now - heartbeat) / 1000
                ),
            },
            &Caller::system(),
            // Not the target's own report: its heartbeat stays as it was.
            false,
        )?;
        changed = true;
    }
    Ok(changed)
}

/// Canaries whose bake time has passed order their next targets. Returns whether any
/// ordered one.
fn pace_canaries(conn: &dyn Db, now: Millis) -> Result<bool> {
    let mut changed = false;
    let running: Vec<Deployment> = conn.all(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE state IN (?1, ?2) AND strategy LIKE '%canary%'"
        ), p![DeploymentState::Pending.code(), DeploymentState::InProgress.code()], deployment_row)?;
    for d in running {
        changed |= pace_deployment(conn, &d, now)? > 0;
    }
    Ok(changed)
}

/// Failed deployments that asked to be rolled back automatically are rolled back (or
/// the refusal recorded). Returns whether there was one.
fn roll_back_failed(conn: &dyn Db, now: Millis, events: &mut Vec<PlacementEvent>) -> Result<bool> {
    let mut changed = false;
    let failed: Vec<i64> = conn.all(
        "SELECT id FROM deployments d WHERE state = ?1 AND strategy LIKE '%\"auto_rollback\":true%'
             AND NOT EXISTS (SELECT 1 FROM deployments r WHERE r.rollback_of = d.id)",
        p![DeploymentState::Failed.code()],
        |r| r.get(0),
    )?;
    for id in failed {
        auto_rollback(conn, now, events, id)?;
        changed = true;
    }
    Ok(changed)
}

/// Rolls failed deployment `id` back. A refused automatic rollback (no earlier version, a
/// freeze) is recorded once and not retried: the flag is turned off with the record.
fn auto_rollback(
    conn: &dyn Db,
    now: Millis,
    events: &mut Vec<PlacementEvent>,
    id: i64,
) -> Result<()> {
    conn.execute("SAVEPOINT auto_rollback", &[])?;
    let outcome = rollback(
        conn,
        now,
        events,
        id,
        "automatic rollback after failure",
        None,
        &Caller::system(),
    );
    // A conflict or an outage is not a refusal: the whole pass runs again.
    let outcome = match outcome {
        Err(e @ (Error::Aborted(_) | Error::Unavailable(_) | Error::Internal(_))) => return Err(e),
        other => other,
    };
    let (after, reason) = match &outcome {
        Ok(new) => {
            conn.execute("RELEASE auto_rollback", &[])?;
            (
                audit::text(&json!({"rollback": deployment_name(new.id), "version": new.version})),
                "the deployment failed and asked for automatic rollback".to_owned(),
            )
        }
        Err(e) => {
            conn.execute("ROLLBACK TO auto_rollback", &[])?;
            conn.execute("RELEASE auto_rollback", &[])?;
            (String::new(), format!("automatic rollback refused: {e}"))
        }
    };
    conn.execute("UPDATE deployments SET strategy = replace(strategy, '\"auto_rollback\":true', '\"auto_rollback\":false') WHERE id = ?1", p![id])?;
    append_audit(
        conn,
        now,
        &Caller::system(),
        AuditEntry {
            action: "auto.rollback",
            resource: deployment_name(id),
            before: String::new(),
            after,
            reason,
        },
    )
}
