//! Deployments: creation under the environment's promotion and freeze rules, strategies
//! and pacing, cancel, continue and rollback.

use serde_json::json;

use super::artifacts::find_artifact;
use super::audit::{append_audit, check_request_id, record_request_id};
use super::environments::load_environment;
use super::reports::append_event;
use super::{limit, page, SqlStore};
use crate::domain::audit::{self, action, AuditEntry, Caller};
use crate::domain::clock::Millis;
use crate::domain::deployment::PlacementCounts;
use crate::domain::freeze;
use crate::domain::model::{
    Deployment, DeploymentFilter, DeploymentState, EmergencyOverride, Environment, NewDeployment,
    Page, PageRequest, Placement, PlacementEvent, PlacementState,
};
use crate::domain::names::{artifact_version_name, deployment_name, environment_name};
use crate::domain::promotion::check_new_deployment;
use crate::domain::strategy::{self, Slot, Strategy};
use crate::domain::{Error, Result};
use crate::store::backend::{internal, to_u64, Backend};
use crate::store::db::{p, Db, Dialect, SqlRow};
use crate::store::log::placement_state;

pub(super) const DEPLOYMENT_COLUMNS: &str = "id, artifact, version, environment, change_reference, state, create_ms, update_ms, emergency_reason, emergency_approver, strategy, continued, rollback_of";

pub(super) fn deployment_row(r: &SqlRow) -> Result<Deployment> {
    let id: i64 = r.col("id")?;
    let state: i64 = r.col("state")?;
    let (reason, approver): (String, String) =
        (r.col("emergency_reason")?, r.col("emergency_approver")?);
    let corrupt = |e: String| Error::corrupt("deployments", &deployment_name(id), e);
    let stored_strategy: String = r.col("strategy")?;
    let (strategy, auto_rollback) = strategy_from(&stored_strategy).map_err(corrupt)?;
    let state = DeploymentState::from_code(state)
        .ok_or_else(|| corrupt(format!("state: unknown state {state}")))?;
    Ok(Deployment {
        id,
        artifact: r.col("artifact")?,
        version: r.col("version")?,
        environment: r.col("environment")?,
        change_reference: r.col("change_reference")?,
        emergency: (!approver.is_empty()).then_some(EmergencyOverride { reason, approver }),
        strategy,
        auto_rollback,
        continued: r.col::<i64>("continued")? != 0,
        rollback_of: r.col("rollback_of")?,
        state,
        placements: Vec::new(),
        create_ms: r.col("create_ms")?,
        update_ms: r.col("update_ms")?,
    })
}

/// The stored form of a strategy and the auto-rollback flag.
pub(super) fn strategy_with(s: &Strategy, auto_rollback: bool) -> String {
    let mut v = match s {
        Strategy::AllAtOnce => json!({}),
        Strategy::Rolling {
            batch_size,
            batch_percent,
            max_failures,
        } => {
            json!({"rolling": {"batch_size": batch_size, "batch_percent": batch_percent, "max_failures": max_failures}})
        }
        Strategy::Canary {
            canary_targets,
            bake_ms,
        } => json!({"canary": {"canary_targets": canary_targets, "bake_ms": bake_ms}}),
    };
    if auto_rollback {
        v["auto_rollback"] = true.into();
    }
    v.to_string()
}

/// The strategy and auto-rollback flag stored by [`strategy_with`], strictly: JSON that does
/// not parse, an unknown key or a missing or mistyped number is an error (never silently
/// all-at-once, which would order every target at once).
pub(super) fn strategy_from(text: &str) -> std::result::Result<(Strategy, bool), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("strategy: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("strategy: not an object: {text}"))?;
    if let Some(k) = obj
        .keys()
        .find(|k| !["rolling", "canary", "auto_rollback"].contains(&k.as_str()))
    {
        return Err(format!("strategy: unknown key `{k}`"));
    }
    let auto_rollback = match obj.get("auto_rollback") {
        None => false,
        Some(b) => b
            .as_bool()
            .ok_or_else(|| format!("strategy: auto_rollback is not a boolean: {b}"))?,
    };
    let num = |o: &serde_json::Value, k: &str| {
        o.get(k)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| format!("strategy: `{k}` missing or not a number"))
    };
    let whole = |o: &serde_json::Value, k: &str| {
        o.get(k)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("strategy: `{k}` missing or not a whole number"))
    };
    let strategy = match (obj.get("rolling"), obj.get("canary")) {
        (Some(_), Some(_)) => return Err("strategy: both rolling and canary".into()),
        (Some(r), None) => Strategy::Rolling {
            batch_size: u32::try_from(whole(r, "batch_size")?)
                .map_err(|e| format!("strategy: batch_size: {e}"))?,
            batch_percent: num(r, "batch_percent")?,
            max_failures: u32::try_from(whole(r, "max_failures")?)
                .map_err(|e| format!("strategy: max_failures: {e}"))?,
        },
        (None, Some(c)) => Strategy::Canary {
            canary_targets: u32::try_from(whole(c, "canary_targets")?)
                .map_err(|e| format!("strategy: canary_targets: {e}"))?,
            bake_ms: i64::try_from(whole(c, "bake_ms")?)
                .map_err(|e| format!("strategy: bake_ms: {e}"))?,
        },
        (None, None) => Strategy::AllAtOnce,
    };
    Ok((strategy, auto_rollback))
}

/// Orders the targets `d`'s strategy lets start now; returns how many were ordered.
/// On PostgreSQL, locks deployment `id`'s row before its placements are touched: every
/// writer of a deployment takes the row first, so they queue in one order (no deadlock
/// between a report and the periodic pass). SQLite has one writer and no row locks.
pub(super) fn lock_deployment(conn: &dyn Db, id: i64) -> Result<()> {
    if conn.dialect() == Dialect::Postgres {
        conn.execute("SELECT 1 FROM deployments WHERE id = ?1 FOR UPDATE", p![id])?;
    }
    Ok(())
}

/// The placements of deployment `id` as pacing sees them, by target, in ordinal order.
pub(super) fn slots(conn: &dyn Db, id: i64) -> Result<Vec<(String, Slot)>> {
    conn.all(
        "SELECT target, state, ordered, update_ms FROM placements WHERE deployment = ?1 ORDER BY ordinal, target",
        p![id],
        |r| {
            let target: String = r.col("target")?;
            let state =
                placement_state("placements", "state", &format!("{id}/{target}"), r.col("state")?)?;
            Ok((
                target,
                Slot {
                    state,
                    ordered: r.col::<i64>("ordered")? != 0,
                    update_ms: r.col("update_ms")?,
                },
            ))
        },
    )
}

pub(super) fn pace_deployment(conn: &dyn Db, d: &Deployment, now: Millis) -> Result<usize> {
    if d.state.is_final() {
        return Ok(0);
    }
    lock_deployment(conn, d.id)?;
    let rows = slots(conn, d.id)?;
    let slots: Vec<Slot> = rows.iter().map(|r| r.1).collect();
    let chosen = strategy::pace(&d.strategy, &slots, d.continued, now);
    for i in &chosen {
        conn.execute(
            "UPDATE placements SET ordered = 1 WHERE deployment = ?1 AND target = ?2",
            p![d.id, rows[*i].0],
        )?;
    }
    if !chosen.is_empty() {
        // Every change to a deployment's placements also writes its row: on PostgreSQL
        // that row is what concurrent writers of one deployment serialise on.
        conn.execute(
            "UPDATE deployments SET update_ms = ?1 WHERE id = ?2",
            p![now, d.id],
        )?;
    }
    Ok(chosen.len())
}

pub(super) fn load_deployment(conn: &dyn Db, id: i64, with_placements: bool) -> Result<Deployment> {
    let mut d = conn
        .one(
            &format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = ?1"),
            p![id],
            deployment_row,
        )?
        .ok_or_else(|| Error::NotFound(deployment_name(id)))?;
    if with_placements {
        let digest = find_artifact(conn, &d.artifact, &d.version)?
            .map(|a| a.digest)
            .unwrap_or_default();
        d.placements = conn.all(
            "SELECT target, state, message, seq, update_ms FROM placements WHERE deployment = ?1 ORDER BY target",
            p![id],
            |r| {
                let target: String = r.col("target")?;
                let state =
                    placement_state("placements", "state", &format!("{id}/{target}"), r.col("state")?)?;
                Ok(Placement {
                    deployment: id,
                    environment: d.environment.clone(),
                    target,
                    artifact: d.artifact.clone(),
                    version: d.version.clone(),
                    digest: digest.clone(),
                    state,
                    message: r.col("message")?,
                    sequence: to_u64(r.col("seq")?),
                    update_ms: r.col("update_ms")?,
                })
            },
        )?;
    }
    Ok(d)
}

pub(super) const COUNT_COLUMNS: &str = "n_pending, n_placing, n_placed, n_failed, n_removed";

/// The placement counts stored in a row's [`COUNT_COLUMNS`].
pub(super) fn counts_row(r: &SqlRow) -> Result<PlacementCounts> {
    Ok(PlacementCounts {
        pending: to_u64(r.col("n_pending")?),
        placing: to_u64(r.col("n_placing")?),
        placed: to_u64(r.col("n_placed")?),
        failed: to_u64(r.col("n_failed")?),
        removed: to_u64(r.col("n_removed")?),
    })
}

/// Rolls deployment `id` back (see [`Store::rollback_deployment`]).
pub(super) fn rollback(
    conn: &dyn Db,
    now: Millis,
    events: &mut Vec<PlacementEvent>,
    id: i64,
    reason: &str,
    emergency: Option<EmergencyOverride>,
    caller: &Caller,
) -> Result<Deployment> {
    let d = load_deployment(conn, id, false)?;
    // Rolled back already (a retry, or the automatic rollback came first): that rollback.
    let done: Option<i64> = conn.one(
        "SELECT id FROM deployments WHERE rollback_of = ?1 ORDER BY id LIMIT 1",
        p![id],
        |r| r.get(0),
    )?;
    if let Some(done) = done {
        return load_deployment(conn, done, true);
    }
    let previous: Option<String> = conn.one("SELECT version FROM deployments WHERE artifact = ?1 AND environment = ?2 AND state = ?3 AND id < ?4 AND version != ?5 ORDER BY id DESC LIMIT 1", p![d.artifact, d.environment, DeploymentState::Succeeded.code(), id, d.version], |r| r.get(0))?;
    let Some(previous) = previous else {
        return Err(Error::precondition(
            "NO_PREVIOUS_VERSION",
            deployment_name(id),
            format!(
                "no earlier version of {} succeeded in {}; nothing to roll back to",
                d.artifact,
                environment_name(&d.environment)
            ),
        ));
    };
    let targets: Vec<String> = conn.all("SELECT target FROM placements WHERE deployment = ?1 AND ordered = 1 AND state != ?2 ORDER BY ordinal", p![id, PlacementState::Removed.code()], |r| r.get(0))?;
    if targets.is_empty() {
        return Err(Error::precondition(
            "NOTHING_TO_ROLL_BACK",
            deployment_name(id),
            "the deployment touched no target",
        ));
    }
    if !d.state.is_final() {
        conn.execute(
            "UPDATE deployments SET state = ?1, cancel_reason = ?2, update_ms = ?3 WHERE id = ?4",
            p![
                DeploymentState::Cancelled.code(),
                format!("rolled back: {reason}"),
                now,
                id
            ],
        )?;
    }
    let new = NewDeployment {
        artifact: d.artifact.clone(),
        version: previous,
        environment: d.environment.clone(),
        change_reference: if d.change_reference.is_empty() {
            format!("rollback-of-{id}")
        } else {
            d.change_reference.clone()
        },
        emergency,
        strategy: Strategy::AllAtOnce,
        auto_rollback: false,
        targets: Some(targets),
        rollback_of: Some(id),
    };
    insert_deployment(conn, now, events, new, None, caller)
}

/// Creates a deployment (the body of CreateDeployment, also used by rollbacks).
pub(super) fn insert_deployment(
    conn: &dyn Db,
    now: Millis,
    events: &mut Vec<PlacementEvent>,
    new: NewDeployment,
    request_id: Option<String>,
    caller: &Caller,
) -> Result<Deployment> {
    let mut fingerprint = format!(
        "{}|{}|{}|{}",
        new.artifact, new.version, new.environment, new.change_reference
    );
    if let Some(e) = &new.emergency {
        fingerprint = format!("{fingerprint}|{}|{}", e.reason, e.approver);
    }
    if let Some(resource) = check_request_id(
        conn,
        request_id.as_deref(),
        "CreateDeployment",
        &fingerprint,
    )? {
        let id =
            crate::domain::names::parse_deployment(&resource).map_err(Error::internal_message)?;
        return load_deployment(conn, id, true);
    }
    let env = check_deployable(conn, &new, now)?;
    let (emergency_reason, emergency_approver) = new
        .emergency
        .as_ref()
        .map(|e| (e.reason.as_str(), e.approver.as_str()))
        .unwrap_or_default();
    let id: i64 = conn.row("INSERT INTO deployments (artifact, version, environment, change_reference, state, create_ms, update_ms, emergency_reason, emergency_approver, strategy, rollback_of)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8, ?9, ?10) RETURNING id", p![
            new.artifact,
            new.version,
            new.environment,
            new.change_reference,
            DeploymentState::Pending.code(),
            now,
            emergency_reason,
            emergency_approver,
            strategy_with(&new.strategy, new.auto_rollback),
            new.rollback_of
        ], |r| r.get(0))?;
    order_targets(conn, id, &new, now)?;
    // Announce every included target with a PENDING event: consumers learn the
    // deployment's target set (the denominator of coverage) from the stream.
    let mut deployment = load_deployment(conn, id, true)?;
    for placement in &mut deployment.placements {
        events.push(append_event(
            conn,
            now,
            placement,
            PlacementState::Pending,
            caller,
        )?);
    }
    pace_deployment(conn, &deployment, now)?;
    record_request_id(
        conn,
        request_id.as_deref(),
        "CreateDeployment",
        &fingerprint,
        &deployment_name(id),
        now,
    )?;
    audit_created(conn, now, caller, &new, &env, &deployment)?;
    Ok(deployment)
}

/// The environment of `new` once every rule for a new deployment holds (the artifact
/// version exists; promotion, protection and freeze windows: every violated rule at once).
fn check_deployable(conn: &dyn Db, new: &NewDeployment, now: Millis) -> Result<Environment> {
    if find_artifact(conn, &new.artifact, &new.version)?.is_none() {
        return Err(Error::NotFound(artifact_version_name(
            &new.artifact,
            &new.version,
        )));
    }
    let env = load_environment(conn, &new.environment)?;
    let upstream_succeeded = match &env.upstream {
        None => false,
        Some(upstream) => conn.one("SELECT 1 FROM deployments WHERE artifact = ?1 AND version = ?2 AND environment = ?3 AND state = ?4 LIMIT 1", p![new.artifact, new.version, upstream, DeploymentState::Succeeded.code()], |r| r.get::<i64>(0))?.is_some(),
    };
    let violations = check_new_deployment(new, &env, upstream_succeeded, now);
    if !violations.is_empty() {
        return Err(Error::FailedPrecondition(violations));
    }
    Ok(env)
}

/// Orders the deployment's targets (every target of the environment, or the ones `new`
/// names) as PENDING placements in ordinal order, and counts them.
fn order_targets(conn: &dyn Db, id: i64, new: &NewDeployment, now: Millis) -> Result<()> {
    let only = new
        .targets
        .as_ref()
        .map(|t| serde_json::to_string(t).map_err(internal))
        .transpose()?;
    let each = match conn.dialect() {
        Dialect::Sqlite => "SELECT value FROM json_each(?5)",
        Dialect::Postgres => "SELECT json_array_elements_text(CAST(?5 AS json))",
    };
    let pending = conn.execute(&format!("INSERT INTO placements (deployment, target, state, message, seq, update_ms, ordered, ordinal)
             SELECT ?1, id, ?2, '', 0, ?3, 0, ROW_NUMBER() OVER (ORDER BY id) FROM targets
             WHERE environment = ?4 AND (CAST(?5 AS TEXT) IS NULL OR id IN ({each}))"), p![id, PlacementState::Pending.code(), now, new.environment, only])?;
    conn.execute(
        "UPDATE deployments SET n_pending = ?1 WHERE id = ?2",
        p![i64::try_from(pending).unwrap_or(i64::MAX), id],
    )?;
    Ok(())
}

/// The audit record of a created deployment (with the freeze windows an emergency
/// override overrode).
fn audit_created(
    conn: &dyn Db,
    now: Millis,
    caller: &Caller,
    new: &NewDeployment,
    env: &Environment,
    deployment: &Deployment,
) -> Result<()> {
    let id = deployment.id;
    let mut after = json!({
        "artifact_version": artifact_version_name(&new.artifact, &new.version),
        "environment": environment_name(&new.environment),
        "change_reference": new.change_reference,
        "state": deployment.state.name(),
        "targets": deployment.placements.len(),
        "strategy": strategy_with(&new.strategy, new.auto_rollback),
    });
    if let Some(of) = new.rollback_of {
        after["rollback_of"] = deployment_name(of).into();
    }
    let reason = match &new.emergency {
        Some(e) => {
            after["emergency"] = json!({
                "reason": e.reason,
                "approver": e.approver,
                // The windows it overrode; empty when none was active (the override
                // was not needed but is kept on the record).
                "overrode_freeze_windows": freeze::active_names(env, now),
            });
            audit::override_reason(e)
        }
        None => new.change_reference.clone(),
    };
    append_audit(
        conn,
        now,
        caller,
        AuditEntry {
            action: action::CREATE_DEPLOYMENT,
            resource: deployment_name(id),
            before: String::new(),
            after: audit::text(&after),
            reason,
        },
    )
}

pub(super) async fn create_deployment<B: Backend>(
    store: &SqlStore<B>,
    new: NewDeployment,
    request_id: Option<String>,
    caller: Caller,
) -> Result<Deployment> {
    store
        .write(move |conn, now, events| {
            insert_deployment(conn, now, events, new.clone(), request_id.clone(), &caller)
        })
        .await
}

pub(super) async fn get_deployment<B: Backend>(store: &SqlStore<B>, id: i64) -> Result<Deployment> {
    store
        .read(move |conn| load_deployment(conn, id, true))
        .await
}

pub(super) async fn list_deployments<B: Backend>(
    store: &SqlStore<B>,
    filter: DeploymentFilter,
    req: PageRequest,
) -> Result<Page<Deployment>> {
    store.read(move |conn| {
        let before: i64 = req
            .after
            .as_deref()
            .and_then(|k| k.parse().ok())
            .unwrap_or(i64::MAX);
        let items = conn.all(&format!(
                "SELECT {DEPLOYMENT_COLUMNS} FROM deployments
                 WHERE id < ?1 AND (CAST(?2 AS TEXT) IS NULL OR environment = ?2) AND (CAST(?3 AS TEXT) IS NULL OR artifact = ?3)
                 ORDER BY id DESC LIMIT ?4"
            ), p![before, filter.environment, filter.artifact, limit(req.size)], deployment_row)?;
        Ok(page(items, req.size, |d: &Deployment| d.id.to_string()))
    })
    .await
}

pub(super) async fn cancel_deployment<B: Backend>(
    store: &SqlStore<B>,
    id: i64,
    reason: String,
    caller: Caller,
) -> Result<Deployment> {
    store.write(move |conn, now, _| {
        let d = load_deployment(conn, id, false)?;
        if d.state.is_final() {
            return Err(Error::precondition(
                "DEPLOYMENT_FINISHED",
                deployment_name(id),
                format!("the deployment is already {:?} and cannot be cancelled", d.state),
            ));
        }
        conn.execute("UPDATE deployments SET state = ?1, cancel_reason = ?2, update_ms = ?3 WHERE id = ?4", p![DeploymentState::Cancelled.code(), reason, now, id])?;
        append_audit(
            conn,
            now,
            &caller,
            AuditEntry {
                action: action::CANCEL_DEPLOYMENT,
                resource: deployment_name(id),
                before: audit::text(&json!({ "state": d.state.name() })),
                after: audit::text(&json!({ "state": DeploymentState::Cancelled.name() })),
                reason: reason.clone(),
            },
        )?;
        load_deployment(conn, id, true)
    })
    .await
}

pub(super) async fn continue_deployment<B: Backend>(
    store: &SqlStore<B>,
    id: i64,
    caller: Caller,
) -> Result<Deployment> {
    store.write(move |conn, now, _| {
        let d = load_deployment(conn, id, false)?;
        if !matches!(d.strategy, Strategy::Canary { .. }) || d.state.is_final() {
            return Err(Error::precondition(
                "NOT_A_RUNNING_CANARY",
                deployment_name(id),
                format!("only a running canary deployment continues; this one is {:?} with strategy {:?}", d.state, d.strategy),
            ));
        }
        conn.execute("UPDATE deployments SET continued = 1, update_ms = ?1 WHERE id = ?2", p![now, id])?;
        let d = load_deployment(conn, id, false)?;
        let ordered = pace_deployment(conn, &d, now)?;
        append_audit(
            conn,
            now,
            &caller,
            AuditEntry {
                action: "ContinueDeployment",
                resource: deployment_name(id),
                before: String::new(),
                after: audit::text(&json!({"ordered_now": ordered})),
                reason: String::new(),
            },
        )?;
        load_deployment(conn, id, true)
    })
    .await
}

pub(super) async fn rollback_deployment<B: Backend>(
    store: &SqlStore<B>,
    id: i64,
    reason: String,
    emergency: Option<EmergencyOverride>,
    caller: Caller,
) -> Result<Deployment> {
    store
        .write(move |conn, now, events| {
            let new = rollback(conn, now, events, id, &reason, emergency.clone(), &caller)?;
            append_audit(
                conn,
                now,
                &caller,
                AuditEntry {
                    action: "RollbackDeployment",
                    resource: deployment_name(id),
                    before: String::new(),
                    after: audit::text(
                        &json!({"rollback": deployment_name(new.id), "version": new.version}),
                    ),
                    reason: reason.clone(),
                },
            )?;
            Ok(new)
        })
        .await
}
