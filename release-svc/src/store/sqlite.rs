//! The embedded SQLite backend: one connection (release-svc writes rarely; placement events
//! arrive in batches), used on the blocking thread pool.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use service_kit::sqlite::error as sql;

use super::{
    AuditEntry, AuditFilter, LastEvaluated, Loaded, PlacementsAfter, Store, UsageCount, Withdrawal,
    ADD_USAGE, LAST_EVALUATED, PRUNE_USAGE, SEEN, SEEN_OF, USAGE_OF,
};
use crate::domain::model::{
    Approval, Carrier, EmergencyOverride, Feature, Governance, Millis, Release, ReleaseEnvironment,
    ReleaseState, Step,
};
use crate::domain::placements::{Placement, PlacementState};
use crate::domain::policy::Policy;
use crate::domain::rules::Rule;
use crate::domain::PreconditionViolation;
use crate::domain::{Error, Result};

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/sqlite/0001_init.sql"),
    include_str!("migrations/sqlite/0002_governance.sql"),
    include_str!("migrations/sqlite/0003_audit_append_only.sql"),
    include_str!("migrations/sqlite/0004_usage.sql"),
    include_str!("migrations/sqlite/0005_placements_seq.sql"),
];

/// The SQLite store.
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    /// A read-only connection for audit queries: a long scan never holds the writer (WAL
    /// lets it read beside the writer).
    reader: Arc<Mutex<Connection>>,
    alive: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

pub(super) fn internal(e: impl std::error::Error) -> Error {
    Error::internal(e)
}

/// A stored row that cannot be decoded: see [`Error::corrupt`].
pub(super) fn corrupt(
    table: &str,
    row: &dyn std::fmt::Display,
    e: impl std::fmt::Display,
) -> Error {
    Error::corrupt(table, row, e)
}

/// A placement's stored state, strictly.
pub(super) fn placement_state(code: i64, deployment: i64, target: &str) -> Result<PlacementState> {
    PlacementState::from_code(code).ok_or_else(|| {
        corrupt(
            "placements",
            &format!("{deployment}/{target}"),
            format!("unknown state {code}"),
        )
    })
}

use service_kit::time::{to_i64, to_u64};

/// The stored form of a feature's mutable fields.
#[derive(Serialize, Deserialize)]
struct FeatureBody {
    description: String,
    owner: String,
    variants: BTreeMap<String, serde_json::Value>,
    default_variant: String,
    off_variant: String,
    targeting: Option<serde_json::Value>,
    allow: Vec<String>,
    deny: Vec<String>,
    carriers: Vec<CarrierBody>,
    disabled: bool,
    /// Absent in rows written before features had metadata.
    #[serde(default)]
    metadata: BTreeMap<String, serde_json::Value>,
    /// When the feature was archived; absent while it is live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    archived_ms: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct CarrierBody {
    artifact: String,
    min_version: String,
    required_coverage: f64,
}

#[derive(Serialize, Deserialize)]
struct EnvBody {
    environment: String,
    rollout_percent: f64,
    #[serde(default)]
    steps: Vec<(f64, i64)>,
    #[serde(default)]
    step: Option<usize>,
    #[serde(default)]
    step_since_ms: i64,
    #[serde(default)]
    started_ms: Option<i64>,
    #[serde(default)]
    full_since_ms: Option<i64>,
}

impl EnvBody {
    fn from(e: &ReleaseEnvironment) -> Self {
        Self {
            environment: e.environment.clone(),
            rollout_percent: e.rollout_percent,
            steps: e
                .steps
                .iter()
                .map(|s| (s.percent, s.min_duration_ms))
                .collect(),
            step: e.step,
            step_since_ms: e.step_since_ms,
            started_ms: e.started_ms,
            full_since_ms: e.full_since_ms,
        }
    }

    fn into_model(self) -> ReleaseEnvironment {
        ReleaseEnvironment {
            environment: self.environment,
            rollout_percent: self.rollout_percent,
            steps: self
                .steps
                .into_iter()
                .map(|(percent, min_duration_ms)| Step {
                    percent,
                    min_duration_ms,
                })
                .collect(),
            step: self.step,
            step_since_ms: self.step_since_ms,
            started_ms: self.started_ms,
            full_since_ms: self.full_since_ms,
        }
    }
}

/// The stored form of [`Governance`].
#[derive(Serialize, Deserialize, Default)]
struct GovernanceBody {
    #[serde(default)]
    requester: String,
    #[serde(default)]
    change_reference: String,
    #[serde(default)]
    planned_start_ms: i64,
    #[serde(default)]
    approvals: Vec<(String, i64)>,
    #[serde(default)]
    emergency: Option<(String, String)>,
    #[serde(default)]
    waiting: Vec<(String, String, String)>,
}

fn governance_body(g: &Governance) -> Result<String> {
    serde_json::to_string(&GovernanceBody {
        requester: g.requester.clone(),
        change_reference: g.change_reference.clone(),
        planned_start_ms: g.planned_start_ms,
        approvals: g
            .approvals
            .iter()
            .map(|a| (a.principal.clone(), a.time_ms))
            .collect(),
        emergency: g
            .emergency
            .as_ref()
            .map(|e| (e.reason.clone(), e.approver.clone())),
        waiting: g
            .waiting
            .iter()
            .map(|v| (v.kind.clone(), v.subject.clone(), v.description.clone()))
            .collect(),
    })
    .map_err(internal)
}

pub(super) fn governance_from(text: &str) -> Result<Governance> {
    let b: GovernanceBody = serde_json::from_str(text).map_err(internal)?;
    Ok(Governance {
        requester: b.requester,
        change_reference: b.change_reference,
        planned_start_ms: b.planned_start_ms,
        approvals: b
            .approvals
            .into_iter()
            .map(|(principal, time_ms)| Approval { principal, time_ms })
            .collect(),
        emergency: b
            .emergency
            .map(|(reason, approver)| EmergencyOverride { reason, approver }),
        waiting: b
            .waiting
            .into_iter()
            .map(|(k, s, d)| PreconditionViolation::new(k, s, d))
            .collect(),
    })
}

/// A release from its stored columns.
#[allow(clippy::too_many_arguments)]
pub(super) fn release_from(
    id: i64,
    description: String,
    features: &str,
    envs: String,
    state: i64,
    revision: i64,
    create_ms: i64,
    update_ms: i64,
    governance: &str,
) -> Result<Release> {
    let envs: Vec<EnvBody> = serde_json::from_str(&envs).map_err(internal)?;
    Ok(Release {
        id,
        description,
        features: serde_json::from_str(features).map_err(internal)?,
        environments: envs.into_iter().map(EnvBody::into_model).collect(),
        state: ReleaseState::from_code(state)
            .ok_or_else(|| Error::internal_message("bad release state"))?,
        governance: governance_from(governance)?,
        revision,
        create_ms,
        update_ms,
    })
}

/// The stored form of a policy's rules.
pub(super) fn policy_body(policy: &Policy) -> Result<String> {
    serde_json::to_string(&PolicyBody {
        max_releases_per_day: policy.max_releases_per_day,
        max_releases_per_week: policy.max_releases_per_week,
        min_soak_ms: policy.min_soak_ms,
        required_approvals: policy.required_approvals,
        approvers: policy.approvers.clone(),
        require_change_reference: policy.require_change_reference,
        require_deployment_coverage: policy.require_deployment_coverage,
    })
    .map_err(internal)
}

/// A policy from its stored columns.
pub(super) fn policy_from(
    environment: String,
    body: &str,
    revision: i64,
    update_ms: i64,
) -> Result<Policy> {
    let b: PolicyBody = serde_json::from_str(body).map_err(internal)?;
    Ok(Policy {
        environment,
        max_releases_per_day: b.max_releases_per_day,
        max_releases_per_week: b.max_releases_per_week,
        min_soak_ms: b.min_soak_ms,
        required_approvals: b.required_approvals,
        approvers: b.approvers,
        require_change_reference: b.require_change_reference,
        require_deployment_coverage: b.require_deployment_coverage,
        revision,
        update_ms,
    })
}

/// The stored form of a [`Policy`]'s rules.
#[derive(Serialize, Deserialize)]
struct PolicyBody {
    max_releases_per_day: u32,
    max_releases_per_week: u32,
    min_soak_ms: i64,
    required_approvals: u32,
    approvers: Vec<String>,
    require_change_reference: bool,
    #[serde(default)]
    require_deployment_coverage: bool,
}

fn insert_audit(conn: &Connection, a: &AuditEntry) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO audit_records (time_ms, principal, action, resource, before, after, request_id, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .map_err(sql)?
    .execute(params![a.time_ms, a.principal, a.action, a.resource, a.before, a.after, a.request_id, a.reason])
    .map_err(sql)?;
    Ok(())
}

/// The `auto.withdraw` audit records of withdrawals.
pub(super) fn withdrawal_entries(withdrawals: &[Withdrawal]) -> Vec<AuditEntry> {
    withdrawals
        .iter()
        .map(|w| AuditEntry {
            time_ms: w.time_ms,
            principal: "system".into(),
            action: "auto.withdraw".into(),
            resource: format!("features/{}", w.feature),
            before: format!("visible in {}", w.environment),
            after: format!("withdrawn from {}", w.environment),
            request_id: String::new(),
            reason: format!("{} (placement sequence {})", w.reason, w.sequence),
        })
        .collect()
}

fn withdrawal_audit(conn: &Connection, withdrawals: &[Withdrawal]) -> Result<()> {
    for a in withdrawal_entries(withdrawals) {
        insert_audit(conn, &a)?;
    }
    Ok(())
}

pub(super) fn feature_body(f: &Feature) -> Result<String> {
    serde_json::to_string(&FeatureBody {
        description: f.description.clone(),
        owner: f.owner.clone(),
        variants: (*f.variants).clone(),
        default_variant: f.default_variant.clone(),
        off_variant: f.off_variant.clone(),
        targeting: f.targeting.as_ref().map(|r| r.to_json()),
        allow: f.allow.clone(),
        deny: f.deny.clone(),
        carriers: f
            .carriers
            .iter()
            .map(|c| CarrierBody {
                artifact: c.artifact.clone(),
                min_version: c.min_version.to_string(),
                required_coverage: c.required_coverage,
            })
            .collect(),
        disabled: f.disabled,
        metadata: f.metadata.clone(),
        archived_ms: f.archived_ms,
    })
    .map_err(internal)
}

pub(super) fn feature_from(
    key: String,
    body: &str,
    revision: i64,
    create_ms: i64,
    update_ms: i64,
) -> Result<Feature> {
    let b: FeatureBody = serde_json::from_str(body).map_err(internal)?;
    let targeting = match b.targeting {
        Some(v) => Some(Rule::parse(&v.to_string()).map_err(Error::internal_message)?),
        None => None,
    };
    let carriers = b
        .carriers
        .into_iter()
        .map(|c| {
            Ok(Carrier {
                artifact: c.artifact,
                min_version: semver::Version::parse(&c.min_version).map_err(internal)?,
                required_coverage: c.required_coverage,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Feature {
        key,
        description: b.description,
        owner: b.owner,
        variants: b.variants.into(),
        default_variant: b.default_variant,
        off_variant: b.off_variant,
        targeting,
        allow: b.allow,
        deny: b.deny,
        carriers,
        disabled: b.disabled,
        metadata: b.metadata,
        revision,
        create_ms,
        update_ms,
        archived_ms: b.archived_ms,
    })
}

pub(super) fn release_columns(r: &Release) -> Result<(String, String, String)> {
    let features = serde_json::to_string(&r.features).map_err(internal)?;
    let envs: Vec<EnvBody> = r.environments.iter().map(EnvBody::from).collect();
    Ok((
        features,
        serde_json::to_string(&envs).map_err(internal)?,
        governance_body(&r.governance)?,
    ))
}

fn insert_placement(conn: &Connection, p: &Placement) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO placements (deployment, target, environment, artifact, version, state, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (deployment, target) DO UPDATE SET state = excluded.state, seq = excluded.seq
         WHERE excluded.seq > placements.seq",
    )
    .map_err(sql)?
    .execute(params![
        p.deployment,
        p.target,
        p.environment,
        p.artifact,
        p.version,
        p.state.code(),
        to_i64(p.sequence)
    ])
    .map_err(sql)?;
    Ok(())
}

fn insert_withdrawals(conn: &Connection, withdrawals: &[Withdrawal]) -> Result<()> {
    for w in withdrawals {
        conn.prepare_cached(
            "INSERT INTO withdrawals (feature, environment, reason, seq, time_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(sql)?
        .execute(params![w.feature, w.environment, w.reason, to_i64(w.sequence), w.time_ms])
        .map_err(sql)?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating) the database.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;
             PRAGMA cache_size = -1024;",
        )
        .map_err(sql)?;
        service_kit::sqlite::migrate(&conn, MIGRATIONS).map_err(sql)?;
        let reader = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        reader
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        // Decisions are served from memory and the store is read in full only at start:
        // 1 MiB of page cache per connection (SQLite's default is 2 MiB) is plenty.
        reader
            .execute_batch("PRAGMA cache_size = -1024;")
            .map_err(sql)?;
        Ok(Self {
            path: path.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
            reader: Arc::new(Mutex::new(reader)),
            alive: tokio::sync::watch::channel(true).0,
        })
    }

    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.on(&self.conn, f).await
    }

    /// Runs `f` on the read-only connection.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.on(&self.reader, f).await
    }

    async fn on<T, F>(&self, conn: &Arc<Mutex<Connection>>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        if !*self.alive.borrow() {
            return Err(Error::Unavailable(
                "the store failed and no longer writes; restart the service".into(),
            ));
        }
        let conn = conn.clone();
        match tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        {
            Ok(result) => result,
            Err(e) => {
                // A panic while holding the connection: what it left behind is unknown, so
                // the store stops serving and health turns NOT_SERVING.
                tracing::error!(error = %e, "the sqlite store panicked; writes fail until a restart");
                self.alive.send_replace(false);
                Err(internal(e))
            }
        }
    }

    /// Runs `f` in a transaction: committed if it succeeds, rolled back otherwise.
    async fn transaction<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.run(move |conn| {
            let tx = conn.unchecked_transaction().map_err(sql)?;
            let out = f(&tx)?;
            tx.commit().map_err(sql)?;
            Ok(out)
        })
        .await
    }
}

/// The placements stored with a sequence above `after`, by sequence.
fn placements_from(conn: &Connection, after: u64) -> Result<Vec<Placement>> {
    let mut stmt = conn
        .prepare_cached("SELECT deployment, target, environment, artifact, version, state, seq FROM placements WHERE seq > ?1 ORDER BY seq")
        .map_err(sql)?;
    let rows = stmt
        .query_map([to_i64(after)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })
        .map_err(sql)?;
    let mut out = Vec::new();
    for row in rows {
        let (deployment, target, environment, artifact, version, state, seq) = row.map_err(sql)?;
        out.push(Placement {
            state: placement_state(state, deployment, &target)?,
            deployment,
            target,
            environment,
            artifact,
            version,
            sequence: to_u64(seq),
        });
    }
    Ok(out)
}

/// The consumer's cursor and events-applied counter.
fn consumer_position(conn: &Connection) -> Result<(u64, u64)> {
    let (cursor, applied): (i64, i64) = conn
        .query_row(
            "SELECT cursor, events_applied FROM consumer WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sql)?;
    Ok((to_u64(cursor), to_u64(applied)))
}

#[async_trait]
impl Store for SqliteStore {
    fn writer_alive(&self) -> tokio::sync::watch::Receiver<bool> {
        self.alive.subscribe()
    }

    async fn placements_after(&self, after: u64) -> Result<PlacementsAfter> {
        self.run(move |conn| {
            let placements = placements_from(conn, after)?;
            let (cursor, events_applied) = consumer_position(conn)?;
            Ok(PlacementsAfter {
                placements,
                cursor,
                events_applied,
            })
        })
        .await
    }

    async fn load(&self) -> Result<Loaded> {
        self.run(|conn| {
            let mut loaded = Loaded::default();
            let mut stmt = conn
                .prepare("SELECT key, body, revision, create_ms, update_ms FROM features")
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
                .map_err(sql)?;
            for row in rows {
                let (key, body, revision, create_ms, update_ms): (String, String, i64, i64, i64) = row.map_err(sql)?;
                let f = feature_from(key.clone(), &body, revision, create_ms, update_ms)
                    .map_err(|e| corrupt("features", &key, e))?;
                loaded.features.insert(key, Arc::new(f));
            }
            let mut stmt = conn
                .prepare("SELECT id, description, features, environments, state, revision, create_ms, update_ms, governance FROM releases")
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, i64>(7)?,
                        r.get::<_, String>(8)?,
                    ))
                })
                .map_err(sql)?;
            for row in rows {
                let (id, description, features, envs, state, revision, create_ms, update_ms, governance) = row.map_err(sql)?;
                loaded.releases.insert(
                    id,
                    release_from(id, description, &features, envs, state, revision, create_ms, update_ms, &governance)
                        .map_err(|e| corrupt("releases", &id, e))?,
                );
            }
            loaded.placements = placements_from(conn, 0)?;
            (loaded.cursor, loaded.events_applied) = consumer_position(conn)?;
            let mut stmt = conn
                .prepare("SELECT environment, body, revision, update_ms FROM policies")
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?)))
                .map_err(sql)?;
            for row in rows {
                let (environment, body, revision, update_ms): (String, String, i64, i64) = row.map_err(sql)?;
                loaded
                    .policies
                    .insert(
                        environment.clone(),
                        policy_from(environment.clone(), &body, revision, update_ms)
                            .map_err(|e| corrupt("policies", &environment, e))?,
                    );
            }
            Ok(loaded)
        })
        .await
    }

    async fn insert_feature(&self, feature: Feature, audit: AuditEntry) -> Result<()> {
        self.transaction(move |conn| {
            let exists: Option<i64> = conn
                .query_row("SELECT 1 FROM features WHERE key = ?1", [&feature.key], |r| r.get(0))
                .optional()
                .map_err(sql)?;
            if exists.is_some() {
                return Err(Error::AlreadyExists {
                    resource: format!("features/{}", feature.key),
                    detail: "choose another key or update the feature".into(),
                });
            }
            conn.execute(
                "INSERT INTO features (key, body, revision, create_ms, update_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![feature.key, feature_body(&feature)?, feature.revision, feature.create_ms, feature.update_ms],
            )
            .map_err(sql)?;
            insert_audit(conn, &audit)
        })
        .await
    }

    async fn update_feature(
        &self,
        feature: Feature,
        expected: i64,
        audit: AuditEntry,
    ) -> Result<()> {
        self.transaction(move |conn| {
            let n = conn
                .execute(
                    "UPDATE features SET body = ?1, revision = ?2, update_ms = ?3 WHERE key = ?4 AND revision = ?5",
                    params![feature_body(&feature)?, feature.revision, feature.update_ms, feature.key, expected],
                )
                .map_err(sql)?;
            if n == 0 {
                return Err(Error::Aborted(format!(
                    "features/{} changed concurrently; read it again and retry",
                    feature.key
                )));
            }
            insert_audit(conn, &audit)
        })
        .await
    }

    async fn insert_release(
        &self,
        release: Release,
        request_id: Option<String>,
        mut audit: AuditEntry,
    ) -> Result<(i64, bool)> {
        self.transaction(move |conn| {
            let (features, envs, governance) = release_columns(&release)?;
            let fingerprint = format!("{}|{features}|{envs}", release.description);
            if let Some(request_id) = &request_id {
                let seen: Option<(String, String)> = conn
                    .query_row(
                        "SELECT fingerprint, resource FROM request_ids WHERE request_id = ?1",
                        [request_id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(sql)?;
                if let Some((f, resource)) = seen {
                    if f != fingerprint {
                        return Err(Error::invalid(
                            "request_id",
                            "was already used for a different request; use a new request_id",
                        ));
                    }
                    let id = resource
                        .parse()
                        .map_err(|e| corrupt("request_ids", &request_id, e))?;
                    return Ok((id, false));
                }
            }
            conn.execute(
                "INSERT INTO releases (description, features, environments, state, revision, create_ms, update_ms, governance) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![release.description, features, envs, release.state.code(), release.revision, release.create_ms, release.update_ms, governance],
            )
            .map_err(sql)?;
            let id = conn.last_insert_rowid();
            if audit.resource.ends_with('/') {
                audit.resource.push_str(&id.to_string());
            }
            insert_audit(conn, &audit)?;
            if let Some(request_id) = &request_id {
                conn.execute(
                    "INSERT INTO request_ids (request_id, fingerprint, resource) VALUES (?1, ?2, ?3)",
                    params![request_id, fingerprint, id.to_string()],
                )
                .map_err(sql)?;
            }
            Ok((id, true))
        })
        .await
    }

    async fn update_release(
        &self,
        release: Release,
        expected: i64,
        audit: Vec<AuditEntry>,
    ) -> Result<()> {
        self.transaction(move |conn| {
            let (features, envs, governance) = release_columns(&release)?;
            let n = conn
                .execute(
                    "UPDATE releases SET description = ?1, features = ?2, environments = ?3, state = ?4, revision = ?5, update_ms = ?6, governance = ?9 WHERE id = ?7 AND revision = ?8",
                    params![release.description, features, envs, release.state.code(), release.revision, release.update_ms, release.id, expected, governance],
                )
                .map_err(sql)?;
            if n == 0 {
                return Err(Error::Aborted(format!(
                    "releases/{} changed concurrently; read it again and retry",
                    release.id
                )));
            }
            for a in &audit {
                insert_audit(conn, a)?;
            }
            Ok(())
        })
        .await
    }

    async fn apply_placements(
        &self,
        events: Vec<Placement>,
        cursor: u64,
        withdrawals: Vec<Withdrawal>,
    ) -> Result<u64> {
        self.transaction(move |conn| {
            let stored: i64 = conn
                .query_row("SELECT cursor FROM consumer WHERE id = 1", [], |r| r.get(0))
                .map_err(sql)?;
            // Only events after the stored cursor are applied: a replay never double-applies.
            let fresh: Vec<&Placement> = events.iter().filter(|e| e.sequence > to_u64(stored)).collect();
            for e in &fresh {
                insert_placement(conn, e)?;
            }
            insert_withdrawals(conn, &withdrawals)?;
            withdrawal_audit(conn, &withdrawals)?;
            conn.execute(
                "UPDATE consumer SET cursor = max(cursor, ?1), events_applied = events_applied + ?2 WHERE id = 1",
                params![to_i64(cursor), i64::try_from(fresh.len()).unwrap_or(i64::MAX)],
            )
            .map_err(sql)?;
            let applied: i64 = conn
                .query_row("SELECT events_applied FROM consumer WHERE id = 1", [], |r| r.get(0))
                .map_err(sql)?;
            Ok(to_u64(applied))
        })
        .await
    }

    async fn replace_placements(
        &self,
        placements: Vec<Placement>,
        cursor: u64,
        withdrawals: Vec<Withdrawal>,
    ) -> Result<()> {
        self.transaction(move |conn| {
            conn.execute("DELETE FROM placements", []).map_err(sql)?;
            for p in &placements {
                insert_placement(conn, p)?;
            }
            insert_withdrawals(conn, &withdrawals)?;
            withdrawal_audit(conn, &withdrawals)?;
            conn.execute(
                "UPDATE consumer SET cursor = ?1 WHERE id = 1",
                [to_i64(cursor)],
            )
            .map_err(sql)?;
            Ok(())
        })
        .await
    }

    async fn put_policy(&self, policy: Policy, expected: i64, audit: AuditEntry) -> Result<()> {
        self.transaction(move |conn| {
            let body = policy_body(&policy)?;
            let n = if expected == 0 {
                conn.execute(
                    "INSERT INTO policies (environment, body, revision, update_ms) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (environment) DO NOTHING",
                    params![policy.environment, body, policy.revision, policy.update_ms],
                )
            } else {
                conn.execute(
                    "UPDATE policies SET body = ?2, revision = ?3, update_ms = ?4 WHERE environment = ?1 AND revision = ?5",
                    params![policy.environment, body, policy.revision, policy.update_ms, expected],
                )
            }
            .map_err(sql)?;
            if n == 0 {
                return Err(Error::Aborted(format!(
                    "policies/{} changed concurrently; read it again and retry with its etag",
                    policy.environment
                )));
            }
            insert_audit(conn, &audit)
        })
        .await
    }

    async fn list_audit(&self, filter: AuditFilter) -> Result<Vec<(i64, AuditEntry)>> {
        // On the read-only connection, never under the writer's lock. The prefix is also a
        // range (`?2 <= resource < ?2 || 0xFF`: no UTF-8 text holds the byte 0xFF), so the
        // (resource, id) index bounds the scan; substr keeps the test exact.
        let mut upper = filter.resource_prefix.clone().into_bytes();
        upper.push(0xFF);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, time_ms, principal, action, resource, before, after, request_id, reason FROM audit_records
                     WHERE id > ?1 AND resource >= ?2 AND resource < CAST(?7 AS TEXT)
                       AND substr(resource, 1, length(?2)) = ?2 AND (?3 = '' OR principal = ?3)
                       AND (?8 = 0 OR resource = ?2)
                       AND time_ms >= ?4 AND time_ms < ?5
                     ORDER BY id LIMIT ?6",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map(
                    params![
                        filter.after_id,
                        filter.resource_prefix,
                        filter.principal,
                        filter.start_ms.unwrap_or(i64::MIN),
                        filter.end_ms.unwrap_or(i64::MAX),
                        i64::try_from(filter.limit).unwrap_or(i64::MAX),
                        upper,
                        filter.exact
                    ],
                    |r| {
                        Ok((
                            r.get(0)?,
                            AuditEntry {
                                time_ms: r.get(1)?,
                                principal: r.get(2)?,
                                action: r.get(3)?,
                                resource: r.get(4)?,
                                before: r.get(5)?,
                                after: r.get(6)?,
                                request_id: r.get(7)?,
                                reason: r.get(8)?,
                            },
                        ))
                    },
                )
                .map_err(sql)?;
            rows.collect::<rusqlite::Result<_>>().map_err(sql)
        })
        .await
    }

    async fn add_usage(
        &self,
        counts: Vec<UsageCount>,
        now_ms: Millis,
        prune_before_ms: Millis,
    ) -> Result<()> {
        self.transaction(move |conn| {
            let mut add = conn.prepare_cached(ADD_USAGE).map_err(sql)?;
            let mut seen = conn.prepare_cached(SEEN).map_err(sql)?;
            for c in &counts {
                add.execute(params![
                    c.feature,
                    c.environment,
                    c.variant,
                    c.hour_ms,
                    to_i64(c.count)
                ])
                .map_err(sql)?;
                seen.execute(params![c.feature, c.environment, now_ms])
                    .map_err(sql)?;
            }
            conn.execute(PRUNE_USAGE, params![prune_before_ms])
                .map_err(sql)?;
            Ok(())
        })
        .await
    }

    async fn usage(
        &self,
        feature: String,
        since_ms: Millis,
    ) -> Result<(Vec<UsageCount>, Vec<LastEvaluated>)> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(USAGE_OF).map_err(sql)?;
            let counts = stmt
                .query_map(params![feature, since_ms], |r| {
                    Ok(UsageCount {
                        feature: r.get("feature")?,
                        environment: r.get("environment")?,
                        variant: r.get("variant")?,
                        hour_ms: r.get("hour_ms")?,
                        count: to_u64(r.get("count")?),
                    })
                })
                .map_err(sql)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(sql)?;
            let mut stmt = conn.prepare_cached(SEEN_OF).map_err(sql)?;
            let seen = stmt
                .query_map(params![feature], |r| {
                    Ok(LastEvaluated {
                        feature: r.get("feature")?,
                        environment: r.get("environment")?,
                        time_ms: r.get("last_ms")?,
                    })
                })
                .map_err(sql)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(sql)?;
            Ok((counts, seen))
        })
        .await
    }

    async fn last_evaluated(&self) -> Result<Vec<(String, Millis)>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(LAST_EVALUATED).map_err(sql)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(sql)?;
            rows.collect::<rusqlite::Result<_>>().map_err(sql)
        })
        .await
    }

    async fn list_withdrawals(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, Withdrawal)>> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, feature, environment, reason, seq, time_ms FROM withdrawals WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map(params![before.unwrap_or(i64::MAX), i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                    Ok((
                        r.get(0)?,
                        Withdrawal {
                            feature: r.get(1)?,
                            environment: r.get(2)?,
                            reason: r.get(3)?,
                            sequence: to_u64(r.get(4)?),
                            time_ms: r.get(5)?,
                        },
                    ))
                })
                .map_err(sql)?;
            rows.collect::<rusqlite::Result<_>>().map_err(sql)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exact audit listing counts only its own resource's records toward its limit: a
    /// release's timeline is not pushed out by the records of releases whose names it
    /// prefixes (releases/1 and releases/10..19).
    #[tokio::test]
    async fn an_exact_audit_listing_skips_the_names_it_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        for (i, resource) in (10..20)
            .map(|n| format!("releases/{n}"))
            .chain(["releases/1".to_owned()])
            .enumerate()
        {
            let policy = Policy {
                environment: format!("env-{i}"),
                ..Policy::default()
            };
            let audit = AuditEntry {
                resource,
                action: "CancelRelease".into(),
                ..AuditEntry::default()
            };
            store.put_policy(policy, 0, audit).await.unwrap();
        }
        let list = |exact| {
            store.list_audit(AuditFilter {
                resource_prefix: "releases/1".into(),
                exact,
                limit: 5,
                ..AuditFilter::default()
            })
        };
        let prefixed = list(false).await.unwrap();
        assert!(prefixed.iter().all(|(_, a)| a.resource != "releases/1"));
        let exact = list(true).await.unwrap();
        let resources: Vec<&str> = exact.iter().map(|(_, a)| a.resource.as_str()).collect();
        assert_eq!(resources, ["releases/1"]);
    }

    /// A panic while the store holds its connection leaves a store that says it can no
    /// longer write; later calls fail as UNAVAILABLE.
    #[tokio::test]
    async fn a_panic_in_the_store_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        let mut alive = store.writer_alive();
        assert!(*alive.borrow_and_update());
        let died = store
            .run(|_| -> Result<()> { panic!("a bug while writing") })
            .await;
        assert!(matches!(died, Err(Error::Internal(_))), "{died:?}");
        alive.changed().await.unwrap();
        assert!(!*alive.borrow());
        let after = store.load().await;
        assert!(matches!(after, Err(Error::Unavailable(_))), "{after:?}");
    }

    /// Stored forms are decoded strictly: a row that does not decode is INTERNAL naming
    /// its table and row, never a default.
    #[tokio::test]
    async fn corrupt_rows_fail_loudly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let store = SqliteStore::open(&path).unwrap();
        store.load().await.unwrap();
        let raw = Connection::open(&path).unwrap();
        raw.execute(
            "INSERT INTO placements (deployment, target, environment, artifact, version, state, seq) VALUES (1, 't1', 'prod', 'web', '1.0.0', 99, 1)",
            [],
        )
        .unwrap();
        let err = store.load().await.unwrap_err().to_string();
        assert!(err.contains("placements") && err.contains("1/t1"), "{err}");
        raw.execute("UPDATE placements SET state = 2", []).unwrap();
        store.load().await.unwrap();
        raw.execute(
            "INSERT INTO features (key, body, revision, create_ms, update_ms) VALUES ('broken', '{\"description\": 1', 1, 0, 0)",
            [],
        )
        .unwrap();
        let err = store.load().await.unwrap_err();
        assert!(matches!(err, Error::Internal(_)), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("features") && err.contains("broken"), "{err}");
    }
}
