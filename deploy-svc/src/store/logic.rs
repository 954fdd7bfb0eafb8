//! The store's logic, written once for every backend: each read and write as SQL over a
//! [`Db`] inside one transaction, each write with its placement events (transactional
//! outbox) and its audit record. A [`Backend`] owns connections and transactions: the
//! SQLite one commits in groups from one writer thread; the PostgreSQL one runs each write
//! as a serializable transaction on a connection pool, retried on serialization failure.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use calendar::{FreezeWindow, Schedule, WeekTime};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::db::{p, Db, Dialect, SqlRow, V};
use super::inventory;
use super::Store;
use crate::domain::audit::{self, action, AuditEntry, AuditFilter, AuditRecord, Caller};
use crate::domain::clock::Millis;
use crate::domain::deployment::{check_transition, derive_state, PlacementCounts};
use crate::domain::freeze;
use crate::domain::inventory::{EnvironmentInventory, InventoryQuery, TargetVersion};
use crate::domain::model::{
    Artifact, Deployment, DeploymentFilter, DeploymentState, EmergencyOverride, Environment,
    EnvironmentUpdate, LogBounds, NewDeployment, NewEnvironment, Page, PageRequest, Placement,
    PlacementEvent, PlacementReport, PlacementState, ReportOutcome, Target,
};
use crate::domain::names::{artifact_version_name, deployment_name, environment_name, target_name};
use crate::domain::promotion::{check_new_deployment, check_upstream};
use crate::domain::strategy::{self, Slot, Strategy};
use crate::domain::{Error, FieldViolation, Result};

/// A write: runs inside the backend's transaction, may be run again when the backend
/// retries the transaction, pushes the events it appends.
pub type WriteJob<T> =
    Arc<dyn Fn(&dyn Db, Millis, &mut Vec<PlacementEvent>) -> Result<T> + Send + Sync>;
/// A read: runs inside one consistent snapshot.
pub type ReadJob<T> = Box<dyn FnOnce(&dyn Db) -> Result<T> + Send>;

/// Connections and transactions of one database.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Runs `job` in a write transaction and commits; the result is returned only once the
    /// commit is durable. A write naming a `lock` (a placement report) runs with its
    /// deployment locked against every other writer (the backend takes the lock before the
    /// job starts); such writes may be committed together.
    async fn write<T: Send + 'static>(
        &self,
        lock: Option<ReportLock>,
        job: WriteJob<T>,
    ) -> Result<T>;
    /// Runs `job` on a consistent snapshot.
    async fn read<T: Send + 'static>(&self, job: ReadJob<T>) -> Result<T>;
    /// Up to `max` events after `after` that watchers may see, in order.
    async fn read_events(&self, after: u64, max: usize) -> Result<Vec<PlacementEvent>>;
    /// Every placement and the sequence the set reflects.
    async fn snapshot(&self) -> Result<(Vec<Placement>, u64)>;
    /// The bounds of the retained log.
    async fn log_bounds(&self) -> Result<LogBounds>;
    /// Rung when another replica committed (see [`Store::remote_changes`]).
    fn remote_changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
    /// See [`Store::writer_alive`].
    fn writer_alive(&self) -> tokio::sync::watch::Receiver<bool> {
        tokio::sync::watch::channel(true).1
    }
    /// Finishes queued writes and stops.
    async fn close(&self);
}

/// What a placement report locks: its deployment's row (taken by the backend before the job
/// runs) and its target's row (the heartbeat it writes). Ordered by target, so a backend
/// that commits reports together can take the target rows in one order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReportLock {
    /// The target's environment.
    pub environment: String,
    /// The target.
    pub target: String,
    /// The deployment.
    pub deployment: i64,
}

/// A [`Store`] over a [`Backend`].
#[derive(Debug)]
pub struct SqlStore<B> {
    pub(crate) backend: B,
}

impl<B: Backend> SqlStore<B> {
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&dyn Db, Millis, &mut Vec<PlacementEvent>) -> Result<T> + Send + Sync + 'static,
    {
        self.backend.write(None, Arc::new(f)).await
    }

    /// A write with deployment `lock` locked before `f` runs (see [`Backend::write`]).
    async fn write_locked<T, F>(&self, lock: ReportLock, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&dyn Db, Millis, &mut Vec<PlacementEvent>) -> Result<T> + Send + Sync + 'static,
    {
        self.backend.write(Some(lock), Arc::new(f)).await
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Db) -> Result<T> + Send + 'static,
    {
        self.backend.read(Box::new(f)).await
    }
}

pub(crate) fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

pub(crate) use service_kit::time::{to_i64, to_u64};

fn map_json(map: &BTreeMap<String, String>) -> Result<String> {
    serde_json::to_string(map).map_err(internal)
}

/// A stored JSON map column (`table`.`column` of `row`), strictly.
fn json_map(
    table: &str,
    column: &str,
    row: &dyn std::fmt::Display,
    s: &str,
) -> Result<BTreeMap<String, String>> {
    serde_json::from_str(s).map_err(|e| Error::corrupt(table, row, format!("{column}: {e}")))
}

/// A freeze window as stored in `environments.freeze_windows` (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct StoredWindow {
    name: String,
    #[serde(flatten)]
    schedule: StoredSchedule,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoredSchedule {
    Absolute {
        start_ms: i64,
        end_ms: i64,
    },
    Weekly {
        time_zone: String,
        start_day: u32,
        start_minute: u32,
        end_day: u32,
        end_minute: u32,
    },
}

fn windows_json(windows: &[FreezeWindow]) -> Result<String> {
    let stored: Vec<StoredWindow> = windows
        .iter()
        .map(|w| StoredWindow {
            name: w.name.clone(),
            schedule: match &w.schedule {
                Schedule::Absolute { start_ms, end_ms } => StoredSchedule::Absolute {
                    start_ms: *start_ms,
                    end_ms: *end_ms,
                },
                Schedule::Weekly {
                    time_zone,
                    start,
                    end,
                } => StoredSchedule::Weekly {
                    time_zone: time_zone.clone(),
                    start_day: start.day,
                    start_minute: start.minute,
                    end_day: end.day,
                    end_minute: end.minute,
                },
            },
        })
        .collect();
    serde_json::to_string(&stored).map_err(internal)
}

/// The stored windows; a column that does not parse fails the read (never an empty
/// calendar, which would silently lift every freeze).
fn json_windows(text: &str) -> Result<Vec<FreezeWindow>> {
    let stored: Vec<StoredWindow> = serde_json::from_str(text)
        .map_err(|e| internal(format!("stored freeze windows do not parse: {e}")))?;
    Ok(stored
        .into_iter()
        .map(|w| FreezeWindow {
            name: w.name,
            schedule: match w.schedule {
                StoredSchedule::Absolute { start_ms, end_ms } => {
                    Schedule::Absolute { start_ms, end_ms }
                }
                StoredSchedule::Weekly {
                    time_zone,
                    start_day,
                    start_minute,
                    end_day,
                    end_minute,
                } => Schedule::Weekly {
                    time_zone,
                    start: WeekTime {
                        day: start_day,
                        minute: start_minute,
                    },
                    end: WeekTime {
                        day: end_day,
                        minute: end_minute,
                    },
                },
            },
        })
        .collect())
}

// ---- audit trail ----

/// Appends the audit record of a change, in the change's transaction.
fn append_audit(conn: &dyn Db, now: Millis, caller: &Caller, entry: AuditEntry) -> Result<()> {
    conn.execute("INSERT INTO audit_records (time_ms, principal, action, resource, before_summary, after_summary, request_id, reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)", p![
        now,
        caller.principal,
        entry.action,
        entry.resource,
        entry.before,
        entry.after,
        caller.request_id,
        entry.reason
    ])?;
    Ok(())
}

fn audit_row(r: &SqlRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        id: r.get(0)?,
        time_ms: r.get(1)?,
        principal: r.get(2)?,
        action: r.get(3)?,
        resource: r.get(4)?,
        before: r.get(5)?,
        after: r.get(6)?,
        request_id: r.get(7)?,
        reason: r.get(8)?,
    })
}

/// The records after `after` matching `filter`, by id, at most `limit`. The WHERE clause
/// names only the filters given, so SQLite can use the resource, principal or time index.
fn query_audit(
    conn: &dyn Db,
    filter: &AuditFilter,
    after: i64,
    limit: i64,
) -> Result<Vec<AuditRecord>> {
    let mut clauses = vec!["id > ?".to_owned()];
    let mut values: Vec<V> = vec![after.into()];
    if let Some(resource) = &filter.resource {
        let (exact, lo, hi) = audit::resource_range(resource);
        clauses.push("(resource = ? OR (resource >= ? AND resource < ?))".into());
        values.extend([exact.into(), lo.into(), hi.into()]);
    }
    if let Some(principal) = &filter.principal {
        clauses.push("principal = ?".into());
        values.push(principal.clone().into());
    }
    if let Some(start) = filter.start_ms {
        clauses.push("time_ms >= ?".into());
        values.push(start.into());
    }
    if let Some(end) = filter.end_ms {
        clauses.push("time_ms < ?".into());
        values.push(end.into());
    }
    values.push(limit.into());
    // Number the placeholders, so PostgreSQL reads them too.
    let mut n = 0;
    let clauses: Vec<String> = clauses
        .iter()
        .map(|c| {
            c.split('?')
                .enumerate()
                .map(|(i, part)| {
                    if i == 0 {
                        part.to_owned()
                    } else {
                        n += 1;
                        format!("?{n}{part}")
                    }
                })
                .collect()
        })
        .collect();
    conn.all(
        &format!(
            "SELECT id, time_ms, principal, action, resource, before_summary, after_summary, request_id, reason
             FROM audit_records WHERE {} ORDER BY id LIMIT ?{}",
            clauses.join(" AND "),
            n + 1
        ),
        &values,
        audit_row,
    )
}

// ---- requests ids (AIP-155) ----

/// What a request id maps to: `Some(resource)` to return, `None` to proceed.
fn check_request_id(
    conn: &dyn Db,
    request_id: Option<&str>,
    method: &str,
    fingerprint: &str,
) -> Result<Option<String>> {
    let Some(request_id) = request_id else {
        return Ok(None);
    };
    let row: Option<(String, String, String)> = conn.one(
        "SELECT method, fingerprint, resource FROM request_ids WHERE request_id = ?1",
        p![request_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    match row {
        None => Ok(None),
        Some((m, f, resource)) if m == method && f == fingerprint => Ok(Some(resource)),
        Some(_) => Err(Error::InvalidArgument(vec![FieldViolation::new(
            "request_id",
            "was already used for a different request; use a new request_id",
        )])),
    }
}

fn record_request_id(
    conn: &dyn Db,
    request_id: Option<&str>,
    method: &str,
    fingerprint: &str,
    resource: &str,
    now: Millis,
) -> Result<()> {
    if let Some(request_id) = request_id {
        conn.execute("INSERT INTO request_ids (request_id, method, fingerprint, resource, create_ms) VALUES (?1, ?2, ?3, ?4, ?5)", p![request_id, method, fingerprint, resource, now])?;
    }
    Ok(())
}

// ---- environments ----

pub(super) const ENV_COLUMNS: &str =
    "id, description, protected, upstream, revision, create_ms, update_ms, freeze_windows";

pub(super) fn env_row(r: &SqlRow) -> Result<Environment> {
    let windows: String = r.get(7)?;
    Ok(Environment {
        id: r.get(0)?,
        description: r.get(1)?,
        protected: r.get(2)?,
        upstream: r.get(3)?,
        revision: r.get(4)?,
        create_ms: r.get(5)?,
        update_ms: r.get(6)?,
        promotion_path: Vec::new(),
        freeze_windows: json_windows(&windows)?,
    })
}

fn promotion_path(conn: &dyn Db, id: &str) -> Result<Vec<String>> {
    let mut path = vec![id.to_owned()];
    let mut current = id.to_owned();
    while path.len() <= 64 {
        let upstream: Option<String> = conn
            .value::<Option<String>>(
                "SELECT upstream FROM environments WHERE id = ?1",
                p![&current],
            )?
            .flatten();
        match upstream {
            Some(u) if !path.contains(&u) => {
                path.push(u.clone());
                current = u;
            }
            _ => break,
        }
    }
    path.reverse();
    Ok(path)
}

fn load_environment(conn: &dyn Db, id: &str) -> Result<Environment> {
    let mut env = conn
        .one(
            &format!("SELECT {ENV_COLUMNS} FROM environments WHERE id = ?1"),
            p![id],
            env_row,
        )?
        .ok_or_else(|| Error::NotFound(environment_name(id)))?;
    env.promotion_path = promotion_path(conn, id)?;
    Ok(env)
}

pub(super) fn require_environment(conn: &dyn Db, id: &str) -> Result<()> {
    let exists: Option<i64> =
        conn.one("SELECT 1 FROM environments WHERE id = ?1", p![id], |r| {
            r.get(0)
        })?;
    exists
        .map(|_| ())
        .ok_or_else(|| Error::NotFound(environment_name(id)))
}

// ---- targets ----

const TARGET_COLUMNS: &str = "environment, id, labels, register_ms, heartbeat_ms";

fn target_row(r: &SqlRow) -> Result<Target> {
    let (environment, id, labels): (String, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
    let labels = json_map(
        "targets",
        "labels",
        &target_name(&environment, &id),
        &labels,
    )?;
    Ok(Target {
        environment,
        id,
        labels,
        register_ms: r.get(3)?,
        heartbeat_ms: r.get(4)?,
    })
}

fn load_target(conn: &dyn Db, env: &str, id: &str) -> Result<Target> {
    conn.one(
        &format!("SELECT {TARGET_COLUMNS} FROM targets WHERE environment = ?1 AND id = ?2"),
        p![env, id],
        target_row,
    )?
    .ok_or_else(|| Error::NotFound(target_name(env, id)))
}

// ---- artifacts ----

const ARTIFACT_COLUMNS: &str = "name, version, digest, metadata, create_ms, source_uri";

fn artifact_row(r: &SqlRow) -> Result<Artifact> {
    let (name, version, metadata): (String, String, String) = (r.get(0)?, r.get(1)?, r.get(3)?);
    let metadata = json_map(
        "artifacts",
        "metadata",
        &artifact_version_name(&name, &version),
        &metadata,
    )?;
    Ok(Artifact {
        name,
        version,
        digest: r.get(2)?,
        metadata,
        create_ms: r.get(4)?,
        source_uri: r.get(5)?,
    })
}

fn find_artifact(conn: &dyn Db, name: &str, version: &str) -> Result<Option<Artifact>> {
    conn.one(
        &format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE name = ?1 AND version = ?2"),
        p![name, version],
        artifact_row,
    )
}

// ---- deployments and placements ----

pub(super) const DEPLOYMENT_COLUMNS: &str = "id, artifact, version, environment, change_reference, state, create_ms, update_ms, emergency_reason, emergency_approver, strategy, continued, rollback_of";

pub(super) fn deployment_row(r: &SqlRow) -> Result<Deployment> {
    let id: i64 = r.get(0)?;
    let state: i64 = r.get(5)?;
    let (reason, approver): (String, String) = (r.get(8)?, r.get(9)?);
    let corrupt = |e: String| Error::corrupt("deployments", &deployment_name(id), e);
    let stored_strategy: String = r.get(10)?;
    let (strategy, auto_rollback) = strategy_from(&stored_strategy).map_err(corrupt)?;
    let state = DeploymentState::from_code(state)
        .ok_or_else(|| corrupt(format!("state: unknown state {state}")))?;
    Ok(Deployment {
        id,
        artifact: r.get(1)?,
        version: r.get(2)?,
        environment: r.get(3)?,
        change_reference: r.get(4)?,
        emergency: (!approver.is_empty()).then_some(EmergencyOverride { reason, approver }),
        strategy,
        auto_rollback,
        continued: r.get::<i64>(11)? != 0,
        rollback_of: r.get(12)?,
        state,
        placements: Vec::new(),
        create_ms: r.get(6)?,
        update_ms: r.get(7)?,
    })
}

/// The stored form of a strategy and the auto-rollback flag.
fn strategy_with(s: &Strategy, auto_rollback: bool) -> String {
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
fn strategy_from(text: &str) -> std::result::Result<(Strategy, bool), String> {
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
fn lock_deployment(conn: &dyn Db, id: i64) -> Result<()> {
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
            let target: String = r.get(0)?;
            let state =
                placement_state("placements", "state", &format!("{id}/{target}"), r.get(1)?)?;
            Ok((
                target,
                Slot {
                    state,
                    ordered: r.get::<i64>(2)? != 0,
                    update_ms: r.get(3)?,
                },
            ))
        },
    )
}

fn pace_deployment(conn: &dyn Db, d: &Deployment, now: Millis) -> Result<usize> {
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

/// A stored placement state (`column` of `table`'s `row`), strictly.
pub(crate) fn placement_state(
    table: &str,
    column: &str,
    row: &dyn std::fmt::Display,
    code: i64,
) -> Result<PlacementState> {
    PlacementState::from_code(code)
        .ok_or_else(|| Error::corrupt(table, row, format!("{column}: unknown state {code}")))
}

fn load_deployment(conn: &dyn Db, id: i64, with_placements: bool) -> Result<Deployment> {
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
                let target: String = r.get(0)?;
                let state =
                    placement_state("placements", "state", &format!("{id}/{target}"), r.get(1)?)?;
                Ok(Placement {
                    deployment: id,
                    environment: d.environment.clone(),
                    target,
                    artifact: d.artifact.clone(),
                    version: d.version.clone(),
                    digest: digest.clone(),
                    state,
                    message: r.get(2)?,
                    sequence: to_u64(r.get(3)?),
                    update_ms: r.get(4)?,
                })
            },
        )?;
    }
    Ok(d)
}

const COUNT_COLUMNS: &str = "n_pending, n_placing, n_placed, n_failed, n_removed";

/// The placement counts stored in a row's columns `at..at + 5` ([`COUNT_COLUMNS`]).
fn counts_at(r: &SqlRow, at: usize) -> Result<PlacementCounts> {
    Ok(PlacementCounts {
        pending: to_u64(r.get(at)?),
        placing: to_u64(r.get(at + 1)?),
        placed: to_u64(r.get(at + 2)?),
        failed: to_u64(r.get(at + 3)?),
        removed: to_u64(r.get(at + 4)?),
    })
}

/// How many columns [`DEPLOYMENT_COLUMNS`] names.
const DEPLOYMENT_COLUMN_COUNT: usize = {
    let (bytes, mut i, mut n) = (DEPLOYMENT_COLUMNS.as_bytes(), 0, 1);
    while i < bytes.len() {
        if bytes[i] == b',' {
            n += 1;
        }
        i += 1;
    }
    n
};
/// Where [`REPORT_READ`]'s columns after the deployment's and its counts start.
const REPORT_READ_TARGET: usize = DEPLOYMENT_COLUMN_COUNT + 5;

/// A report's one read: [`DEPLOYMENT_COLUMNS`], [`COUNT_COLUMNS`], 1 if the target is
/// registered, the placement's state, message, seq and update_ms (NULL before its first
/// report), the artifact's digest. Parameters: deployment, environment, target.
static REPORT_READ: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let qualified = |columns: &str| {
        columns
            .split(", ")
            .map(|c| format!("d.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "SELECT {}, {},
           (SELECT 1 FROM targets t WHERE t.environment = ?2 AND t.id = ?3),
           p.state, p.message, p.seq, p.update_ms,
           (SELECT a.digest FROM artifacts a WHERE a.name = d.artifact AND a.version = d.version)
         FROM deployments d LEFT JOIN placements p ON p.deployment = d.id AND p.target = ?3
         WHERE d.id = ?1",
        qualified(DEPLOYMENT_COLUMNS),
        qualified(COUNT_COLUMNS)
    )
});

pub(crate) fn event_row(r: &SqlRow) -> Result<PlacementEvent> {
    let stored: i64 = r.get(0)?;
    let seq = u64::try_from(stored)
        .map_err(|e| Error::corrupt("placement_events", &stored, format!("seq: {e}")))?;
    let state =
        |i: usize, column: &str| placement_state("placement_events", column, &seq, r.get(i)?);
    Ok(PlacementEvent {
        sequence: seq,
        commit_ms: r.get(1)?,
        previous_state: state(9, "previous_state")?,
        placement: Placement {
            deployment: r.get(2)?,
            environment: r.get(3)?,
            target: r.get(4)?,
            artifact: r.get(5)?,
            version: r.get(6)?,
            digest: r.get(7)?,
            state: state(8, "state")?,
            message: r.get(10)?,
            sequence: seq,
            update_ms: r.get(1)?,
        },
        trace_parent: r.get(11)?,
    })
}

/// Appends the event of `placement` (already in its new state) to the outbox, with the
/// trace context of the call that caused it, and sets the placement's sequence; returns the
/// event, to publish after commit.
fn append_event(
    conn: &dyn Db,
    now: Millis,
    placement: &mut Placement,
    previous: PlacementState,
    caller: &Caller,
) -> Result<PlacementEvent> {
    let seq: i64 = conn.row("INSERT INTO placement_events (commit_ms, deployment, environment, target, artifact, version, digest, state, previous_state, message, trace_parent)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING seq", p![
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
    ], |r| r.get(0))?;
    conn.execute("INSERT INTO placements (deployment, target, state, message, seq, update_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (deployment, target) DO UPDATE SET state = excluded.state, message = excluded.message, seq = excluded.seq, update_ms = excluded.update_ms", p![
        placement.deployment,
        placement.target,
        placement.state.code(),
        placement.message,
        seq,
        now
    ])?;
    placement.sequence = to_u64(seq);
    placement.update_ms = now;
    Ok(PlacementEvent {
        sequence: placement.sequence,
        commit_ms: now,
        placement: placement.clone(),
        previous_state: previous,
        trace_parent: caller.trace_parent.clone(),
    })
}

fn apply_report(
    conn: &dyn Db,
    now: Millis,
    events: &mut Vec<PlacementEvent>,
    report: PlacementReport,
    caller: &Caller,
) -> Result<ReportOutcome> {
    // One statement reads everything the report needs: the deployment (locked by the
    // backend before the job runs: see `SqlStore::write_locked`), its counts, whether the
    // target is registered, the placement so far and the artifact's digest.
    let Some(read) = conn.one(
        &REPORT_READ,
        p![report.deployment, &report.environment, &report.target],
        |r| {
            Ok((
                deployment_row(r)?,
                counts_at(r, DEPLOYMENT_COLUMN_COUNT)?,
                r.get::<Option<i64>>(REPORT_READ_TARGET)?.is_some(),
                r.get::<Option<i64>>(REPORT_READ_TARGET + 1)?
                    .map(|state| -> Result<(i64, String, i64, i64)> {
                        Ok((
                            state,
                            r.get(REPORT_READ_TARGET + 2)?,
                            r.get(REPORT_READ_TARGET + 3)?,
                            r.get(REPORT_READ_TARGET + 4)?,
                        ))
                    })
                    .transpose()?,
                r.get::<Option<String>>(REPORT_READ_TARGET + 5)?,
            ))
        },
    )?
    else {
        return Err(Error::NotFound(deployment_name(report.deployment)));
    };
    let (d, mut counts, registered, current, digest) = read;
    let target = target_name(&report.environment, &report.target);
    if d.environment != report.environment {
        return Err(Error::precondition(
            "TARGET_NOT_IN_ENVIRONMENT",
            target,
            format!(
                "{} deploys to {}, not to the target's environment",
                deployment_name(d.id),
                environment_name(&d.environment)
            ),
        ));
    }
    if !registered {
        return Err(Error::NotFound(target));
    }
    let from = match &current {
        Some(c) => placement_state(
            "placements",
            "state",
            &format!("{}/{}", d.id, report.target),
            c.0,
        )?,
        None => PlacementState::Pending,
    };
    let digest = digest.ok_or_else(|| {
        Error::corrupt(
            "deployments",
            &deployment_name(d.id),
            format!(
                "artifact {} is missing",
                artifact_version_name(&d.artifact, &d.version)
            ),
        )
    })?;
    let changed = check_transition(d.state, from, report.state)
        .map_err(|why| Error::precondition("PLACEMENT_TRANSITION", target.clone(), why))?;
    let mut placement = Placement {
        deployment: d.id,
        environment: d.environment.clone(),
        target: report.target.clone(),
        artifact: d.artifact.clone(),
        version: d.version.clone(),
        digest,
        state: from,
        message: current.as_ref().map(|c| c.1.clone()).unwrap_or_default(),
        sequence: current.as_ref().map(|c| to_u64(c.2)).unwrap_or(0),
        update_ms: current.as_ref().map(|c| c.3).unwrap_or(now),
    };
    if !changed {
        return Ok(ReportOutcome {
            placement,
            deployment_state: d.state,
            changed: false,
        });
    }
    placement.state = report.state;
    placement.message = report.message;
    events.push(append_event(conn, now, &mut placement, from, caller)?);
    if current.is_some() {
        counts.remove(from);
    }
    counts.add(report.state, 1);
    let state = derive_state(d.state, counts, d.strategy.max_failures());
    conn.execute("UPDATE deployments SET state = ?1, update_ms = ?2, n_pending = ?3, n_placing = ?4, n_placed = ?5, n_failed = ?6, n_removed = ?7 WHERE id = ?8", p![
        state.code(),
        now,
        to_i64(counts.pending),
        to_i64(counts.placing),
        to_i64(counts.placed),
        to_i64(counts.failed),
        to_i64(counts.removed),
        d.id
    ])?;
    let mut before = json!({"target": target, "state": from.name()});
    let mut after =
        json!({"target": target, "state": placement.state.name(), "sequence": placement.sequence});
    if !placement.message.is_empty() {
        after["message"] = placement.message.clone().into();
    }
    if state != d.state {
        before["deployment_state"] = d.state.name().into();
        after["deployment_state"] = state.name().into();
    }
    append_audit(
        conn,
        now,
        caller,
        AuditEntry {
            action: action::REPORT_PLACEMENT,
            resource: deployment_name(d.id),
            before: audit::text(&before),
            after: audit::text(&after),
            reason: String::new(),
        },
    )?;
    if !state.is_final()
        // An all-at-once deployment ordered every target when it was created: a report never
        // lets it order more, and pacing reads every placement of the deployment (a cost
        // that grows with the fleet, paid by every report).
        && !matches!(d.strategy, Strategy::AllAtOnce)
        && matches!(
            report.state,
            PlacementState::Placed | PlacementState::Failed | PlacementState::Removed
        )
    {
        // A finished target may let the strategy order the next ones.
        let d = Deployment { state, ..d };
        pace_deployment(conn, &d, now)?;
    }
    Ok(ReportOutcome {
        placement,
        deployment_state: state,
        changed: true,
    })
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

/// The caller automatic actions are recorded with.
fn system() -> Caller {
    Caller {
        principal: "system".into(),
        request_id: String::new(),
        trace_parent: None,
    }
}

/// Rolls deployment `id` back (see [`Store::rollback_deployment`]).
fn rollback(
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
fn insert_deployment(
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
        let id = crate::domain::names::parse_deployment(&resource).map_err(internal)?;
        return load_deployment(conn, id, true);
    }
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
    let violations = check_new_deployment(&new, &env, upstream_succeeded, now);
    if !violations.is_empty() {
        return Err(Error::FailedPrecondition(violations));
    }
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
                "overrode_freeze_windows": freeze::active_names(&env, now),
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
    )?;
    Ok(deployment)
}

fn page<T>(mut items: Vec<T>, size: usize, key: impl Fn(&T) -> String) -> Page<T> {
    let next = if items.len() > size {
        items.truncate(size);
        items.last().map(key)
    } else {
        None
    };
    Page { items, next }
}

pub(super) fn limit(size: usize) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX).saturating_add(1)
}

#[async_trait]
impl<B: Backend> Store for SqlStore<B> {
    async fn create_environment(
        &self,
        env: NewEnvironment,
        request_id: Option<String>,
        caller: Caller,
    ) -> Result<Environment> {
        self.write(move |conn, now, _| {
            let windows = windows_json(&env.freeze_windows)?;
            let mut fingerprint = format!(
                "{}|{}|{}|{:?}",
                env.id, env.description, env.protected, env.upstream
            );
            // Appended only when present, so request ids recorded before calendars existed
            // keep matching their retries.
            if !env.freeze_windows.is_empty() {
                fingerprint = format!("{fingerprint}|{windows}");
            }
            if let Some(resource) = check_request_id(
                conn,
                request_id.as_deref(),
                "CreateEnvironment",
                &fingerprint,
            )? {
                let id = resource.trim_start_matches("environments/");
                return load_environment(conn, id);
            }
            let exists: Option<i64> = conn.one("SELECT 1 FROM environments WHERE id = ?1", p![&env.id], |r| {
                    r.get(0)
                })?;
            if exists.is_some() {
                return Err(Error::AlreadyExists {
                    resource: environment_name(&env.id),
                    detail: "choose another environment_id".into(),
                });
            }
            if let Some(upstream) = &env.upstream {
                require_environment(conn, upstream)?;
            }
            conn.execute(&format!(
                    "INSERT INTO environments ({ENV_COLUMNS}) VALUES (?1, ?2, ?3, ?4, 1, ?5, ?5, ?6)"
                ), p![env.id, env.description, env.protected, env.upstream, now, windows])?;
            record_request_id(
                conn,
                request_id.as_deref(),
                "CreateEnvironment",
                &fingerprint,
                &environment_name(&env.id),
                now,
            )?;
            let created = load_environment(conn, &env.id)?;
            append_audit(
                conn,
                now,
                &caller,
                AuditEntry {
                    action: action::CREATE_ENVIRONMENT,
                    resource: environment_name(&env.id),
                    before: String::new(),
                    after: audit::text(&audit::environment_fields(&created)),
                    reason: String::new(),
                },
            )?;
            Ok(created)
        })
        .await
    }

    async fn get_environment(&self, id: &str) -> Result<Environment> {
        let id = id.to_owned();
        self.read(move |conn| load_environment(conn, &id)).await
    }

    async fn list_environments(&self, req: PageRequest) -> Result<Page<Environment>> {
        self.read(move |conn| {
            let mut items: Vec<Environment> = conn.all(
                &format!(
                    "SELECT {ENV_COLUMNS} FROM environments WHERE id > ?1 ORDER BY id LIMIT ?2"
                ),
                p![req.after.unwrap_or_default(), limit(req.size)],
                env_row,
            )?;
            for env in &mut items {
                env.promotion_path = promotion_path(conn, &env.id)?;
            }
            Ok(page(items, req.size, |e| e.id.clone()))
        })
        .await
    }

    async fn update_environment(
        &self,
        update: EnvironmentUpdate,
        caller: Caller,
    ) -> Result<Environment> {
        self.write(move |conn, now, _| {
            let mut env = load_environment(conn, &update.id)?;
            let before = env.clone();
            if let Some(expected) = update.expected_revision {
                if expected != env.revision {
                    return Err(Error::Aborted(format!(
                        "etag {expected:?} is stale: {} is at etag \"{}\"; read it again and retry",
                        environment_name(&env.id),
                        env.revision
                    )));
                }
            }
            if let Some(description) = &update.description {
                env.description.clone_from(description);
            }
            if let Some(protected) = update.protected {
                env.protected = protected;
            }
            if let Some(windows) = &update.freeze_windows {
                env.freeze_windows.clone_from(windows);
            }
            if let Some(upstream) = update.upstream.clone() {
                if let Some(u) = &upstream {
                    require_environment(conn, u)?;
                    if let Some(v) = check_upstream(&env.id, &promotion_path(conn, u)?) {
                        return Err(Error::FailedPrecondition(vec![v]));
                    }
                }
                env.upstream = upstream;
            }
            conn.execute("UPDATE environments SET description = ?1, protected = ?2, upstream = ?3, freeze_windows = ?4, revision = revision + 1, update_ms = ?5 WHERE id = ?6", p![
                    env.description,
                    env.protected,
                    env.upstream,
                    windows_json(&env.freeze_windows)?,
                    now,
                    env.id
                ])?;
            let updated = load_environment(conn, &env.id)?;
            let (b, a) = audit::environment_change(&before, &updated, &update);
            append_audit(
                conn,
                now,
                &caller,
                AuditEntry {
                    action: action::UPDATE_ENVIRONMENT,
                    resource: environment_name(&env.id),
                    before: audit::text(&b),
                    after: audit::text(&a),
                    reason: String::new(),
                },
            )?;
            Ok(updated)
        })
        .await
    }

    async fn register_target(
        &self,
        environment: &str,
        id: &str,
        labels: BTreeMap<String, String>,
        caller: Caller,
    ) -> Result<Target> {
        let (environment, id) = (environment.to_owned(), id.to_owned());
        self.write(move |conn, now, _| {
            require_environment(conn, &environment)?;
            let previous: Option<String> = conn.one("SELECT labels FROM targets WHERE environment = ?1 AND id = ?2", p![&environment, &id], |r| r.get(0))?;
            let previous = previous
                .map(|l| json_map("targets", "labels", &target_name(&environment, &id), &l))
                .transpose()?;
            conn.execute(&format!(
                    "INSERT INTO targets ({TARGET_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?4)
                     ON CONFLICT (environment, id) DO UPDATE SET labels = excluded.labels, heartbeat_ms = excluded.heartbeat_ms"
                ), p![environment, id, map_json(&labels)?, now])?;
            // A re-registration with the same labels only refreshes the heartbeat: no
            // change, no record.
            if previous.as_ref() != Some(&labels) {
                append_audit(
                    conn,
                    now,
                    &caller,
                    AuditEntry {
                        action: action::REGISTER_TARGET,
                        resource: target_name(&environment, &id),
                        before: previous
                            .map(|l| audit::text(&json!({ "labels": l })))
                            .unwrap_or_default(),
                        after: audit::text(&json!({ "labels": labels })),
                        reason: String::new(),
                    },
                )?;
            }
            load_target(conn, &environment, &id)
        })
        .await
    }

    async fn list_targets(
        &self,
        environment: &str,
        req: PageRequest,
    ) -> Result<Page<(Target, Vec<TargetVersion>)>> {
        let environment = environment.to_owned();
        self.read(move |conn| {
            require_environment(conn, &environment)?;
            let items = conn.all(&format!(
                    "SELECT {TARGET_COLUMNS} FROM targets WHERE environment = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
                ), p![environment, req.after.unwrap_or_default(), limit(req.size)], target_row)?;
            let targets = page(items, req.size, |t: &Target| t.id.clone());
            let mut versions = match (targets.items.first(), targets.items.last()) {
                (Some(first), Some(last)) => {
                    inventory::target_versions(conn, &environment, &first.id, &last.id)?
                }
                _ => BTreeMap::new(),
            };
            Ok(Page {
                items: targets
                    .items
                    .into_iter()
                    .map(|t| {
                        let v = versions.remove(&t.id).unwrap_or_default();
                        (t, v)
                    })
                    .collect(),
                next: targets.next,
            })
        })
        .await
    }

    async fn inventory(&self, query: InventoryQuery) -> Result<Page<EnvironmentInventory>> {
        self.read(move |conn| {
            if let Some(id) = &query.environment {
                require_environment(conn, id)?;
            }
            inventory::inventory(conn, &query)
        })
        .await
    }

    async fn audit_event(&self, caller: Caller, entry: AuditEntry) -> Result<()> {
        self.write(move |conn, now, _| append_audit(conn, now, &caller, entry.clone()))
            .await
    }

    async fn heartbeat_target(&self, environment: &str, id: &str) -> Result<Target> {
        let (environment, id) = (environment.to_owned(), id.to_owned());
        self.write(move |conn, now, _| {
            let n = conn.execute(
                "UPDATE targets SET heartbeat_ms = ?1 WHERE environment = ?2 AND id = ?3",
                p![now, environment, id],
            )?;
            if n == 0 {
                return Err(Error::NotFound(target_name(&environment, &id)));
            }
            load_target(conn, &environment, &id)
        })
        .await
    }

    async fn register_artifact(&self, artifact: Artifact, caller: Caller) -> Result<Artifact> {
        self.write(move |conn, now, _| {
            if let Some(existing) = find_artifact(conn, &artifact.name, &artifact.version)? {
                if existing.digest == artifact.digest {
                    return Ok(existing);
                }
                return Err(Error::AlreadyExists {
                    resource: artifact_version_name(&artifact.name, &artifact.version),
                    detail: format!(
                        "registered with digest {}; versions are immutable, register a new version",
                        existing.digest
                    ),
                });
            }
            conn.execute(&format!("INSERT INTO artifacts ({ARTIFACT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"), p![
                    artifact.name,
                    artifact.version,
                    artifact.digest,
                    map_json(&artifact.metadata)?,
                    now,
                    artifact.source_uri
                ])?;
            append_audit(
                conn,
                now,
                &caller,
                AuditEntry {
                    action: action::REGISTER_ARTIFACT,
                    resource: artifact_version_name(&artifact.name, &artifact.version),
                    before: String::new(),
                    after: audit::text(
                        &json!({"digest": artifact.digest, "metadata": artifact.metadata, "source_uri": artifact.source_uri}),
                    ),
                    reason: String::new(),
                },
            )?;
            Ok(Artifact {
                create_ms: now,
                ..artifact.clone()
            })
        })
        .await
    }

    async fn get_artifact(&self, name: &str, version: &str) -> Result<Artifact> {
        let (name, version) = (name.to_owned(), version.to_owned());
        self.read(move |conn| {
            find_artifact(conn, &name, &version)?
                .ok_or_else(|| Error::NotFound(artifact_version_name(&name, &version)))
        })
        .await
    }

    async fn list_artifacts(
        &self,
        name: Option<String>,
        req: PageRequest,
    ) -> Result<Page<Artifact>> {
        self.read(move |conn| {
            let (after_name, after_version) = req
                .after
                .as_deref()
                .and_then(|k| k.split_once('\n'))
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .unwrap_or_default();
            let items = conn.all(&format!(
                    "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE (CAST(?1 AS TEXT) IS NULL OR name = ?1) AND (name, version) > (?2, ?3)
                     ORDER BY name, version LIMIT ?4"
                ), p![name, after_name, after_version, limit(req.size)], artifact_row)?;
            Ok(page(items, req.size, |a: &Artifact| format!("{}\n{}", a.name, a.version)))
        })
        .await
    }

    async fn create_deployment(
        &self,
        new: NewDeployment,
        request_id: Option<String>,
        caller: Caller,
    ) -> Result<Deployment> {
        self.write(move |conn, now, events| {
            insert_deployment(conn, now, events, new.clone(), request_id.clone(), &caller)
        })
        .await
    }

    async fn get_deployment(&self, id: i64) -> Result<Deployment> {
        self.read(move |conn| load_deployment(conn, id, true)).await
    }

    async fn list_deployments(
        &self,
        filter: DeploymentFilter,
        req: PageRequest,
    ) -> Result<Page<Deployment>> {
        self.read(move |conn| {
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

    async fn cancel_deployment(
        &self,
        id: i64,
        reason: String,
        caller: Caller,
    ) -> Result<Deployment> {
        self.write(move |conn, now, _| {
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

    async fn continue_deployment(&self, id: i64, caller: Caller) -> Result<Deployment> {
        self.write(move |conn, now, _| {
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

    async fn rollback_deployment(
        &self,
        id: i64,
        reason: String,
        emergency: Option<EmergencyOverride>,
        caller: Caller,
    ) -> Result<Deployment> {
        self.write(move |conn, now, events| {
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

    async fn orders(&self, environment: &str, target: &str) -> Result<Vec<OrderRow>> {
        let (environment, target) = (environment.to_owned(), target.to_owned());
        self.read(move |conn| {
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

    async fn tick(&self, agent_timeout_ms: i64) -> Result<bool> {
        self.write(move |conn, now, events| {
            let mut changed = false;
            // Agents gone quiet: their unfinished ordered placements fail.
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
                        message: format!("agent lost: no heartbeat for {} s", (now - heartbeat) / 1000),
                    },
                    &system(),
                )?;
                changed = true;
            }
            // Canaries whose bake time has passed.
            let running: Vec<Deployment> = conn.all(&format!(
                    "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE state IN (?1, ?2) AND strategy LIKE '%canary%'"
                ), p![DeploymentState::Pending.code(), DeploymentState::InProgress.code()], deployment_row)?;
            for d in running {
                changed |= pace_deployment(conn, &d, now)? > 0;
            }
            // Failed deployments that asked to be rolled back automatically.
            let failed: Vec<i64> = conn.all("SELECT id FROM deployments d WHERE state = ?1 AND strategy LIKE '%\"auto_rollback\":true%'
                     AND NOT EXISTS (SELECT 1 FROM deployments r WHERE r.rollback_of = d.id)", p![DeploymentState::Failed.code()], |r| r.get(0))?;
            for id in failed {
                // A refused automatic rollback (no earlier version, a freeze) is recorded
                // once and not retried: the flag is turned off with the record.
                conn.execute("SAVEPOINT auto_rollback", &[])?;
                let outcome = rollback(conn, now, events, id, "automatic rollback after failure", None, &system());
                // A conflict or an outage is not a refusal: the whole pass runs again.
                let outcome = match outcome {
                    Err(e @ (Error::Aborted(_) | Error::Unavailable(_) | Error::Internal(_))) => {
                        return Err(e)
                    }
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
                append_audit(conn, now, &system(), AuditEntry {
                    action: "auto.rollback",
                    resource: deployment_name(id),
                    before: String::new(),
                    after,
                    reason,
                })?;
                changed = true;
            }
            Ok(changed)
        })
        .await
    }

    async fn report_placement(
        &self,
        report: PlacementReport,
        caller: Caller,
    ) -> Result<ReportOutcome> {
        let lock = ReportLock {
            environment: report.environment.clone(),
            target: report.target.clone(),
            deployment: report.deployment,
        };
        self.write_locked(lock, move |conn, now, events| {
            let (environment, target) = (report.environment.clone(), report.target.clone());
            let outcome = apply_report(conn, now, events, report.clone(), &caller)?;
            // A report is a sign of life too: a target reporting without heartbeats (a
            // pipeline, say) is not taken for a lost agent.
            conn.execute(
                "UPDATE targets SET heartbeat_ms = ?1 WHERE environment = ?2 AND id = ?3",
                p![now, environment, target],
            )?;
            Ok(outcome)
        })
        .await
    }

    async fn list_audit_records(
        &self,
        filter: AuditFilter,
        req: PageRequest,
    ) -> Result<Page<AuditRecord>> {
        self.read(move |conn| {
            let after: i64 = req
                .after
                .as_deref()
                .and_then(|k| k.parse().ok())
                .unwrap_or(0);
            let items = query_audit(conn, &filter, after, limit(req.size))?;
            Ok(page(items, req.size, |r: &AuditRecord| r.id.to_string()))
        })
        .await
    }

    async fn read_events(&self, after: u64, max: usize) -> Result<Vec<PlacementEvent>> {
        self.backend.read_events(after, max).await
    }

    async fn snapshot(&self) -> Result<(Vec<Placement>, u64)> {
        self.backend.snapshot().await
    }

    async fn log_bounds(&self) -> Result<LogBounds> {
        self.backend.log_bounds().await
    }

    fn remote_changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.backend.remote_changes()
    }

    fn writer_alive(&self) -> tokio::sync::watch::Receiver<bool> {
        self.backend.writer_alive()
    }

    async fn close(&self) {
        self.backend.close().await;
    }
}

// ---- the log, for the backends ----

/// Where event retention has pruned the log through.
pub(crate) fn pruned_through(conn: &dyn Db) -> Result<u64> {
    let pruned: i64 = conn.row(
        "SELECT pruned_through FROM log_meta WHERE id = 1",
        &[],
        |r| r.get(0),
    )?;
    Ok(to_u64(pruned))
}

/// Up to `max` retained events after `after` and at most `through`, in order; the
/// retention error when events after `after` were pruned.
pub(crate) fn read_log(
    conn: &dyn Db,
    after: u64,
    through: u64,
    max: usize,
) -> Result<Vec<PlacementEvent>> {
    let pruned = pruned_through(conn)?;
    if after < pruned {
        return Err(crate::placement_log::retention_error(after, pruned));
    }
    conn.all(
        "SELECT seq, commit_ms, deployment, environment, target, artifact, version, digest, state, previous_state, message, trace_parent
         FROM placement_events WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
        p![to_i64(after), to_i64(through), i64::try_from(max).unwrap_or(i64::MAX)],
        event_row,
    )
}

/// Every placement in its current state, by sequence.
pub(crate) fn all_placements(conn: &dyn Db) -> Result<Vec<Placement>> {
    conn.all(
        "SELECT p.deployment, d.environment, p.target, d.artifact, d.version, a.digest, p.state, p.message, p.seq, p.update_ms
         FROM placements p JOIN deployments d ON d.id = p.deployment
         JOIN artifacts a ON a.name = d.artifact AND a.version = d.version
         ORDER BY p.seq",
        &[],
        placement_row,
    )
}

/// A placement read with [`all_placements`]' columns.
pub(crate) fn placement_row(r: &SqlRow) -> Result<Placement> {
    let (deployment, target): (i64, String) = (r.get(0)?, r.get(2)?);
    let state = placement_state(
        "placements",
        "state",
        &format!("{deployment}/{target}"),
        r.get(6)?,
    )?;
    Ok(Placement {
        deployment,
        environment: r.get(1)?,
        target,
        artifact: r.get(3)?,
        version: r.get(4)?,
        digest: r.get(5)?,
        state,
        message: r.get(7)?,
        sequence: to_u64(r.get(8)?),
        update_ms: r.get(9)?,
    })
}
