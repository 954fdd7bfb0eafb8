//! Every read and write of release-svc, written once against [`Db`] and run by either
//! backend: [`SqlStore`] implements [`Store`] over a [`Backend`], which only provides
//! transactions (and, for PostgreSQL, what replicas tell each other). The few statements
//! that differ by dialect ask [`Db::dialect`]: PostgreSQL locks the consumer row and a
//! release's request id against other replicas, flushes usage counts as arrays, and
//! matches an audit prefix with `starts_with`.

use std::sync::Arc;

use async_trait::async_trait;
use store_kit::{p, Db, Dialect, SqlRow, V};
use tokio_util::sync::CancellationToken;

use super::forms::{
    corrupt, feature_body, feature_from, placement_state, policy_body, policy_from,
    release_columns, release_from, withdrawal_entries,
};
use super::{
    AuditEntry, AuditFilter, Changes, LastEvaluated, Loaded, PlacementsAfter, Store, UsageCount,
    Withdrawal,
};
use crate::domain::model::{Feature, Millis, Release};
use crate::domain::placements::Placement;
use crate::domain::policy::Policy;
use crate::domain::{Error, Result};
use service_kit::time::{locks, to_i64, to_u64};

/// A transaction's work.
pub type Job<T> = Box<dyn FnOnce(&dyn Db) -> Result<T> + Send>;

/// Whom a committed write concerns besides this process (PostgreSQL replicas listening).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Told {
    /// Nobody: nothing Evaluate decides changed (usage counts).
    Nobody,
    /// Only placement events were applied: replicas read the placements since their last
    /// read.
    Placements,
    /// Anything else: replicas reload.
    Everything,
}

/// Transactions on one database.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Runs `job` in a write transaction and commits (rolled back if it fails); replicas
    /// are told as `told` says once it commits.
    async fn write<T: Send + 'static>(&self, told: Told, job: Job<T>) -> Result<T>;
    /// Runs `job` on one consistent snapshot, beside the writer.
    async fn read<T: Send + 'static>(&self, job: Job<T>) -> Result<T>;
    /// See [`Store::changes`].
    async fn changes(&self) -> Option<Changes> {
        None
    }
    /// See [`Store::applier_lease`].
    async fn applier_lease(&self, stop: &CancellationToken) -> Result<CancellationToken> {
        Ok(stop.child_token())
    }
    /// See [`Store::writer_alive`].
    fn writer_alive(&self) -> tokio::sync::watch::Receiver<bool> {
        tokio::sync::watch::channel(true).1
    }
}

/// The store: the one implementation of release-svc's SQL over a backend.
#[derive(Debug)]
pub struct SqlStore<B> {
    pub(crate) backend: B,
}

impl<B: Backend> SqlStore<B> {
    /// The store over `backend`.
    pub fn new(backend: B) -> Self {
        Self { backend }
    }

    async fn write<T: Send + 'static>(
        &self,
        told: Told,
        job: impl FnOnce(&dyn Db) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.backend.write(told, Box::new(job)).await
    }

    async fn read<T: Send + 'static>(
        &self,
        job: impl FnOnce(&dyn Db) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.backend.read(Box::new(job)).await
    }
}

/// Adds one hour's count.
const ADD_USAGE: &str = "INSERT INTO evaluation_usage (feature, environment, variant, hour_ms, count) VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT (feature, environment, variant, hour_ms) DO UPDATE SET count = evaluation_usage.count + excluded.count";
/// Records a feature as evaluated in an environment at a time (never moving back).
const SEEN: &str = "INSERT INTO evaluation_seen (feature, environment, last_ms) VALUES (?1, ?2, ?3) \
     ON CONFLICT (feature, environment) DO UPDATE SET last_ms = \
     CASE WHEN excluded.last_ms > evaluation_seen.last_ms THEN excluded.last_ms ELSE evaluation_seen.last_ms END";
/// PostgreSQL: a whole flush's counts in one statement (each (feature, environment,
/// variant, hour) appears once per flush: the counters are unique).
const ADD_USAGE_ARRAYS: &str =
    "INSERT INTO evaluation_usage (feature, environment, variant, hour_ms, count) \
     SELECT * FROM unnest(?1::text[], ?2::text[], ?3::text[], ?4::bigint[], ?5::bigint[]) \
     ON CONFLICT (feature, environment, variant, hour_ms) \
     DO UPDATE SET count = evaluation_usage.count + excluded.count";
/// PostgreSQL: a whole flush's features as evaluated, in one statement.
const SEEN_ARRAYS: &str = "INSERT INTO evaluation_seen (feature, environment, last_ms) \
     SELECT DISTINCT f, e, ?3::bigint FROM unnest(?1::text[], ?2::text[]) AS u(f, e) \
     ON CONFLICT (feature, environment) DO UPDATE SET last_ms = \
     GREATEST(evaluation_seen.last_ms, excluded.last_ms)";
/// Drops counts older than the longest window.
const PRUNE_USAGE: &str = "DELETE FROM evaluation_usage WHERE hour_ms < ?1";
/// One feature's counts from a time on.
const USAGE_OF: &str = "SELECT feature, environment, variant, hour_ms, count FROM evaluation_usage WHERE feature = ?1 AND hour_ms >= ?2";
/// One feature's last evaluations per environment.
const SEEN_OF: &str =
    "SELECT feature, environment, last_ms FROM evaluation_seen WHERE feature = ?1";
/// Every feature's last evaluation.
const LAST_EVALUATED: &str =
    "SELECT feature, max(last_ms) AS last_ms FROM evaluation_seen GROUP BY feature";

/// The audit listing. SQLite: the prefix is also a range (`?2 <= resource < ?2 || 0xFF`: no
/// UTF-8 text holds the byte 0xFF), so the (resource, id) index bounds the scan; substr
/// keeps the test exact.
const LIST_AUDIT_SQLITE: &str = "SELECT id, time_ms, principal, action, resource, before, after, request_id, reason FROM audit_records
     WHERE id > ?1 AND resource >= ?2 AND resource < CAST(CAST(?2 AS BLOB) || x'FF' AS TEXT)
       AND substr(resource, 1, length(?2)) = ?2 AND (?3 = '' OR principal = ?3)
       AND (?7 = 0 OR resource = ?2)
       AND time_ms >= ?4 AND time_ms < ?5
     ORDER BY id LIMIT ?6";
/// The audit listing, PostgreSQL.
const LIST_AUDIT_POSTGRES: &str = "SELECT id, time_ms, principal, action, resource, before, after, request_id, reason FROM audit_records
     WHERE id > ?1 AND starts_with(resource, ?2) AND (?3 = '' OR principal = ?3)
       AND time_ms >= ?4 AND time_ms < ?5 AND (CAST(?7 AS BIGINT) = 0 OR resource = ?2)
     ORDER BY id LIMIT ?6";

/// The columns [`placement_row`] reads.
const PLACEMENTS_AFTER: &str = "SELECT deployment, target, environment, artifact, version, state, seq FROM placements WHERE seq > ?1 ORDER BY seq";

/// A placement read with [`PLACEMENTS_AFTER`].
fn placement_row(r: &SqlRow) -> Result<Placement> {
    let deployment: i64 = r.col("deployment")?;
    let target: String = r.col("target")?;
    Ok(Placement {
        state: placement_state(r.col("state")?, deployment, &target)?,
        deployment,
        target,
        environment: r.col("environment")?,
        artifact: r.col("artifact")?,
        version: r.col("version")?,
        sequence: to_u64(r.col("seq")?),
    })
}

/// The placements stored with a sequence above `after`, by sequence.
fn placements_from(db: &dyn Db, after: u64) -> Result<Vec<Placement>> {
    db.all(PLACEMENTS_AFTER, p![to_i64(after)], placement_row)
}

/// The consumer's cursor and events-applied counter.
fn consumer_position(db: &dyn Db) -> Result<(u64, u64)> {
    db.row(
        "SELECT cursor, events_applied FROM consumer WHERE id = 1",
        &[],
        |r| Ok((to_u64(r.col("cursor")?), to_u64(r.col("events_applied")?))),
    )
}

/// Locks the consumer row (PostgreSQL: one applier at a time, whatever replica) and
/// returns the stored cursor.
fn lock_consumer(db: &dyn Db) -> Result<u64> {
    let sql = match db.dialect() {
        Dialect::Postgres => "SELECT cursor FROM consumer WHERE id = 1 FOR UPDATE",
        Dialect::Sqlite => "SELECT cursor FROM consumer WHERE id = 1",
    };
    db.row(sql, &[], |r| r.col("cursor")).map(to_u64)
}

fn insert_audit(db: &dyn Db, a: &AuditEntry) -> Result<()> {
    db.execute(
        "INSERT INTO audit_records (time_ms, principal, action, resource, before, after, request_id, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        p![a.time_ms, a.principal, a.action, a.resource, a.before, a.after, a.request_id, a.reason],
    )?;
    Ok(())
}

fn insert_placement(db: &dyn Db, p: &Placement) -> Result<()> {
    db.execute(
        "INSERT INTO placements (deployment, target, environment, artifact, version, state, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (deployment, target) DO UPDATE SET state = excluded.state, seq = excluded.seq
         WHERE excluded.seq > placements.seq",
        p![p.deployment, p.target, p.environment, p.artifact, p.version, p.state.code(), to_i64(p.sequence)],
    )?;
    Ok(())
}

/// Records withdrawals, each with its `auto.withdraw` audit record.
fn insert_withdrawals(db: &dyn Db, withdrawals: &[Withdrawal]) -> Result<()> {
    for w in withdrawals {
        db.execute(
            "INSERT INTO withdrawals (feature, environment, reason, seq, time_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            p![w.feature, w.environment, w.reason, to_i64(w.sequence), w.time_ms],
        )?;
    }
    for a in withdrawal_entries(withdrawals) {
        insert_audit(db, &a)?;
    }
    Ok(())
}

/// A release from its row.
fn release_row(r: &SqlRow) -> Result<Release> {
    release_from(
        r.col("id")?,
        r.col("description")?,
        &r.col::<String>("features")?,
        r.col("environments")?,
        r.col("state")?,
        r.col("revision")?,
        r.col("create_ms")?,
        r.col("update_ms")?,
        &r.col::<String>("governance")?,
    )
}

/// A policy from its row.
fn policy_row(r: &SqlRow, environment: &str) -> Result<Policy> {
    policy_from(
        environment.to_owned(),
        &r.col::<String>("body")?,
        r.col("revision")?,
        r.col("update_ms")?,
    )
}

/// Every stored feature, release, placement and policy, and the consumer's position.
fn load(db: &dyn Db) -> Result<Loaded> {
    let mut loaded = Loaded::default();
    db.each(
        "SELECT key, body, revision, create_ms, update_ms FROM features",
        &[],
        &mut |r| {
            let key: String = r.col("key")?;
            let f = feature_from(
                key.clone(),
                &r.col::<String>("body")?,
                r.col("revision")?,
                r.col("create_ms")?,
                r.col("update_ms")?,
            )
            .map_err(|e| corrupt("features", &key, e))?;
            loaded.features.insert(key, Arc::new(f));
            Ok(())
        },
    )?;
    db.each(
        "SELECT id, description, features, environments, state, revision, create_ms, update_ms, governance FROM releases",
        &[],
        &mut |r| {
            let id: i64 = r.col("id")?;
            let release = release_row(r).map_err(|e| corrupt("releases", &id, e))?;
            loaded.releases.insert(id, release);
            Ok(())
        },
    )?;
    db.each(PLACEMENTS_AFTER, p![0i64], &mut |r| {
        loaded.placements.push(placement_row(r)?);
        Ok(())
    })?;
    (loaded.cursor, loaded.events_applied) = consumer_position(db)?;
    db.each(
        "SELECT environment, body, revision, update_ms FROM policies",
        &[],
        &mut |r| {
            let environment: String = r.col("environment")?;
            let policy =
                policy_row(r, &environment).map_err(|e| corrupt("policies", &environment, e))?;
            loaded.policies.insert(environment, policy);
            Ok(())
        },
    )?;
    Ok(loaded)
}

/// Inserts a release (or finds the one its request id made first).
fn insert_release(
    db: &dyn Db,
    release: &Release,
    request_id: Option<&str>,
    mut audit: AuditEntry,
) -> Result<(i64, bool)> {
    let (features, envs, governance) = release_columns(release)?;
    let fingerprint = format!("{}|{features}|{envs}", release.description);
    if let Some(request_id) = request_id {
        if db.dialect() == Dialect::Postgres {
            // Replicas racing on one request id queue here; the second then finds the
            // first's release (READ COMMITTED: the next statement sees it).
            db.execute(
                "SELECT pg_advisory_xact_lock(CAST(CAST(?1 AS BIGINT) AS INTEGER), hashtext(?2))",
                p![i64::from(locks::RELEASE_REQUEST_ID), request_id],
            )?;
        }
        let seen = db.one(
            "SELECT fingerprint, resource FROM request_ids WHERE request_id = ?1",
            p![request_id],
            |r| {
                Ok((
                    r.col::<String>("fingerprint")?,
                    r.col::<String>("resource")?,
                ))
            },
        )?;
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
    let id: i64 = db.row(
        "INSERT INTO releases (description, features, environments, state, revision, create_ms, update_ms, governance) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
        p![release.description, features, envs, release.state.code(), release.revision, release.create_ms, release.update_ms, governance],
        |r| r.col("id"),
    )?;
    if audit.resource.ends_with('/') {
        audit.resource.push_str(&id.to_string());
    }
    insert_audit(db, &audit)?;
    if let Some(request_id) = request_id {
        db.execute(
            "INSERT INTO request_ids (request_id, fingerprint, resource) VALUES (?1, ?2, ?3)",
            p![request_id, fingerprint, id.to_string()],
        )?;
    }
    Ok((id, true))
}

/// Adds a flush's counts (PostgreSQL: one statement per table).
fn add_usage(
    db: &dyn Db,
    counts: &[UsageCount],
    now_ms: Millis,
    prune_before_ms: Millis,
) -> Result<()> {
    match db.dialect() {
        Dialect::Postgres => {
            let texts = |f: fn(&UsageCount) -> &str| {
                V::Ts(counts.iter().map(|c| f(c).to_owned()).collect())
            };
            let (features, environments) = (texts(|c| &c.feature), texts(|c| &c.environment));
            db.execute(
                ADD_USAGE_ARRAYS,
                &[
                    features.clone(),
                    environments.clone(),
                    texts(|c| &c.variant),
                    V::Is(counts.iter().map(|c| c.hour_ms).collect()),
                    V::Is(counts.iter().map(|c| to_i64(c.count)).collect()),
                ],
            )?;
            db.execute(SEEN_ARRAYS, &[features, environments, V::I(now_ms)])?;
        }
        Dialect::Sqlite => {
            for c in counts {
                db.execute(
                    ADD_USAGE,
                    p![
                        c.feature,
                        c.environment,
                        c.variant,
                        c.hour_ms,
                        to_i64(c.count)
                    ],
                )?;
                db.execute(SEEN, p![c.feature, c.environment, now_ms])?;
            }
        }
    }
    db.execute(PRUNE_USAGE, p![prune_before_ms])?;
    Ok(())
}

/// ABORTED when an optimistic write changed no row.
fn changed(n: u64, what: impl FnOnce() -> String) -> Result<()> {
    if n == 0 {
        return Err(Error::Aborted(what()));
    }
    Ok(())
}

#[async_trait]
impl<B: Backend> Store for SqlStore<B> {
    async fn changes(&self) -> Option<Changes> {
        self.backend.changes().await
    }

    async fn placements_after(&self, after: u64) -> Result<PlacementsAfter> {
        self.read(move |db| {
            let placements = placements_from(db, after)?;
            let (cursor, events_applied) = consumer_position(db)?;
            Ok(PlacementsAfter {
                placements,
                cursor,
                events_applied,
            })
        })
        .await
    }

    async fn applier_lease(&self, stop: &CancellationToken) -> Result<CancellationToken> {
        self.backend.applier_lease(stop).await
    }

    fn writer_alive(&self) -> tokio::sync::watch::Receiver<bool> {
        self.backend.writer_alive()
    }

    async fn load(&self) -> Result<Loaded> {
        self.read(load).await
    }

    async fn insert_feature(&self, feature: Feature, audit: AuditEntry) -> Result<()> {
        self.write(Told::Everything, move |db| {
            let n = db.execute(
                "INSERT INTO features (key, body, revision, create_ms, update_ms) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (key) DO NOTHING",
                p![feature.key, feature_body(&feature)?, feature.revision, feature.create_ms, feature.update_ms],
            )?;
            if n == 0 {
                return Err(Error::AlreadyExists {
                    resource: format!("features/{}", feature.key),
                    detail: "choose another key or update the feature".into(),
                });
            }
            insert_audit(db, &audit)
        })
        .await
    }

    async fn update_feature(
        &self,
        feature: Feature,
        expected: i64,
        audit: AuditEntry,
    ) -> Result<()> {
        self.write(Told::Everything, move |db| {
            let n = db.execute(
                "UPDATE features SET body = ?1, revision = ?2, update_ms = ?3 WHERE key = ?4 AND revision = ?5",
                p![feature_body(&feature)?, feature.revision, feature.update_ms, feature.key, expected],
            )?;
            changed(n, || {
                format!(
                    "features/{} changed concurrently; read it again and retry",
                    feature.key
                )
            })?;
            insert_audit(db, &audit)
        })
        .await
    }

    async fn insert_release(
        &self,
        release: Release,
        request_id: Option<String>,
        audit: AuditEntry,
    ) -> Result<(i64, bool)> {
        self.write(Told::Everything, move |db| {
            insert_release(db, &release, request_id.as_deref(), audit)
        })
        .await
    }

    async fn update_release(
        &self,
        release: Release,
        expected: i64,
        audit: Vec<AuditEntry>,
    ) -> Result<()> {
        self.write(Told::Everything, move |db| {
            let (features, envs, governance) = release_columns(&release)?;
            let n = db.execute(
                "UPDATE releases SET description = ?1, features = ?2, environments = ?3, state = ?4, revision = ?5, update_ms = ?6, governance = ?9 WHERE id = ?7 AND revision = ?8",
                p![release.description, features, envs, release.state.code(), release.revision, release.update_ms, release.id, expected, governance],
            )?;
            changed(n, || {
                format!(
                    "releases/{} changed concurrently; read it again and retry",
                    release.id
                )
            })?;
            audit.iter().try_for_each(|a| insert_audit(db, a))
        })
        .await
    }

    async fn put_policy(&self, policy: Policy, expected: i64, audit: AuditEntry) -> Result<()> {
        self.write(Told::Everything, move |db| {
            let body = policy_body(&policy)?;
            let n = if expected == 0 {
                db.execute(
                    "INSERT INTO policies (environment, body, revision, update_ms) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (environment) DO NOTHING",
                    p![policy.environment, body, policy.revision, policy.update_ms],
                )?
            } else {
                db.execute(
                    "UPDATE policies SET body = ?2, revision = ?3, update_ms = ?4 WHERE environment = ?1 AND revision = ?5",
                    p![policy.environment, body, policy.revision, policy.update_ms, expected],
                )?
            };
            changed(n, || {
                format!(
                    "policies/{} changed concurrently; read it again and retry with its etag",
                    policy.environment
                )
            })?;
            insert_audit(db, &audit)
        })
        .await
    }

    async fn list_audit(&self, filter: AuditFilter) -> Result<Vec<(i64, AuditEntry)>> {
        self.read(move |db| {
            let sql = match db.dialect() {
                Dialect::Sqlite => LIST_AUDIT_SQLITE,
                Dialect::Postgres => LIST_AUDIT_POSTGRES,
            };
            db.all(
                sql,
                p![
                    filter.after_id,
                    filter.resource_prefix,
                    filter.principal,
                    filter.start_ms.unwrap_or(i64::MIN),
                    filter.end_ms.unwrap_or(i64::MAX),
                    i64::try_from(filter.limit).unwrap_or(i64::MAX),
                    filter.exact
                ],
                |r| {
                    Ok((
                        r.col("id")?,
                        AuditEntry {
                            time_ms: r.col("time_ms")?,
                            principal: r.col("principal")?,
                            action: r.col("action")?,
                            resource: r.col("resource")?,
                            before: r.col("before")?,
                            after: r.col("after")?,
                            request_id: r.col("request_id")?,
                            reason: r.col("reason")?,
                        },
                    ))
                },
            )
        })
        .await
    }

    async fn apply_placements(
        &self,
        events: Vec<Placement>,
        cursor: u64,
        withdrawals: Vec<Withdrawal>,
    ) -> Result<u64> {
        self.write(Told::Placements, move |db| {
            // Only events after the stored cursor are applied: a replay never double-applies.
            let stored = lock_consumer(db)?;
            let fresh: Vec<&Placement> = events.iter().filter(|e| e.sequence > stored).collect();
            for e in &fresh {
                insert_placement(db, e)?;
            }
            insert_withdrawals(db, &withdrawals)?;
            let applied: i64 = db.row(
                "UPDATE consumer SET cursor = CASE WHEN cursor > ?1 THEN cursor ELSE ?1 END, \
                 events_applied = events_applied + ?2 WHERE id = 1 RETURNING events_applied",
                p![
                    to_i64(cursor),
                    i64::try_from(fresh.len()).unwrap_or(i64::MAX)
                ],
                |r| r.col("events_applied"),
            )?;
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
        self.write(Told::Everything, move |db| {
            lock_consumer(db)?;
            db.execute("DELETE FROM placements", &[])?;
            for p in &placements {
                insert_placement(db, p)?;
            }
            insert_withdrawals(db, &withdrawals)?;
            db.execute(
                "UPDATE consumer SET cursor = ?1 WHERE id = 1",
                p![to_i64(cursor)],
            )?;
            Ok(())
        })
        .await
    }

    async fn add_usage(
        &self,
        counts: Vec<UsageCount>,
        now_ms: Millis,
        prune_before_ms: Millis,
    ) -> Result<()> {
        self.write(Told::Nobody, move |db| {
            add_usage(db, &counts, now_ms, prune_before_ms)
        })
        .await
    }

    async fn usage(
        &self,
        feature: String,
        since_ms: Millis,
    ) -> Result<(Vec<UsageCount>, Vec<LastEvaluated>)> {
        self.read(move |db| {
            let counts = db.all(USAGE_OF, p![feature, since_ms], |r| {
                Ok(UsageCount {
                    feature: r.col("feature")?,
                    environment: r.col("environment")?,
                    variant: r.col("variant")?,
                    hour_ms: r.col("hour_ms")?,
                    count: to_u64(r.col("count")?),
                })
            })?;
            let seen = db.all(SEEN_OF, p![feature], |r| {
                Ok(LastEvaluated {
                    feature: r.col("feature")?,
                    environment: r.col("environment")?,
                    time_ms: r.col("last_ms")?,
                })
            })?;
            Ok((counts, seen))
        })
        .await
    }

    async fn last_evaluated(&self) -> Result<Vec<(String, Millis)>> {
        self.read(|db| {
            db.all(LAST_EVALUATED, &[], |r| {
                Ok((r.col("feature")?, r.col("last_ms")?))
            })
        })
        .await
    }

    async fn list_withdrawals(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, Withdrawal)>> {
        self.read(move |db| {
            db.all(
                "SELECT id, feature, environment, reason, seq, time_ms FROM withdrawals WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
                p![before.unwrap_or(i64::MAX), i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    Ok((
                        r.col("id")?,
                        Withdrawal {
                            feature: r.col("feature")?,
                            environment: r.col("environment")?,
                            reason: r.col("reason")?,
                            sequence: to_u64(r.col("seq")?),
                            time_ms: r.col("time_ms")?,
                        },
                    ))
                },
            )
        })
        .await
    }
}
