//! The inventory reads, written once over [`Db`] like the rest of the store: an
//! environment x artifact page of what is placed and what is in flight, and the current
//! versions of a page of targets. Each runs inside one read transaction.

use std::collections::BTreeMap;

use super::deployments::{deployment_row, slots, DEPLOYMENT_COLUMNS};
use super::environments::{env_row, ENV_COLUMNS};
use super::limit;
use crate::domain::inventory::{
    ArtifactInventory, EnvironmentInventory, InFlight, InventoryKey, InventoryQuery, PlacedVersion,
    TargetVersion, MAX_IN_FLIGHT,
};
use crate::domain::model::{DeploymentState, Environment, Page, PlacementState};
use crate::domain::strategy;
use crate::domain::Result;
use crate::store::db::{p, Db, V};

/// Environments read at a time while looking for the ones the caller may view.
const ENVIRONMENT_BATCH: i64 = 100;

/// One page of the inventory (see [`InventoryQuery`]); the page position is an
/// [`InventoryKey`] in its encoded form.
pub(super) fn inventory(
    conn: &dyn Db,
    query: &InventoryQuery,
) -> Result<Page<EnvironmentInventory>> {
    let mut page = Filling::default();
    // Environments from the one the page continues in (included: it may have artifacts
    // left), or the first.
    let mut from = query
        .after
        .as_ref()
        .map(|k| k.environment.clone())
        .unwrap_or_default();
    let mut inclusive = true;
    loop {
        let batch = environment_batch(conn, query, &from, inclusive)?;
        let Some(tail) = batch.last() else {
            return Ok(page.finish(false));
        };
        from = tail.id.clone();
        inclusive = false;
        for env in batch {
            if !(query.may_view)(&env.id) {
                continue;
            }
            if let Some(full) = page.add(conn, query, env)? {
                return Ok(full);
            }
        }
    }
}

/// The next environments to look at, from `from` (itself included when `inclusive`): the
/// one the query names, or a batch of all in order.
fn environment_batch(
    conn: &dyn Db,
    query: &InventoryQuery,
    from: &str,
    inclusive: bool,
) -> Result<Vec<Environment>> {
    match &query.environment {
        Some(id) if inclusive => conn.all(
            &format!("SELECT {ENV_COLUMNS} FROM environments WHERE id = ?1 AND id >= ?2"),
            p![id, from],
            env_row,
        ),
        Some(_) => Ok(Vec::new()),
        None => {
            let op = if inclusive { ">=" } else { ">" };
            conn.all(
                &format!(
                    "SELECT {ENV_COLUMNS} FROM environments WHERE id {op} ?1 ORDER BY id LIMIT ?2"
                ),
                p![from, ENVIRONMENT_BATCH],
                env_row,
            )
        }
    }
}

/// An inventory page being filled: its environments, how many entries they count (one per
/// artifact, or one for an environment without any) and the position of the last.
#[derive(Default)]
struct Filling {
    out: Vec<EnvironmentInventory>,
    entries: usize,
    last: Option<InventoryKey>,
}

impl Filling {
    /// The page as filled; when `more`, it continues after its last entry.
    fn finish(self, more: bool) -> Page<EnvironmentInventory> {
        Page {
            items: self.out,
            next: if more {
                self.last.map(|k| k.encode())
            } else {
                None
            },
        }
    }

    /// Adds as many artifacts of `env` (which the caller may view) as the page has room
    /// for, from where the query's position says. Returns the finished page once it is
    /// full and something remains after it.
    fn add(
        &mut self,
        conn: &dyn Db,
        query: &InventoryQuery,
        env: Environment,
    ) -> Result<Option<Page<EnvironmentInventory>>> {
        // Continuing inside this environment: after the last artifact returned; an
        // environment returned whole (no artifacts) is done.
        let after_artifact = match &query.after {
            Some(k) if k.environment == env.id => {
                if k.artifact.is_empty() {
                    return Ok(None);
                }
                Some(k.artifact.clone())
            }
            _ => None,
        };
        let left = query.size - self.entries;
        let after = after_artifact.as_deref().unwrap_or_default();
        let names = artifact_names(conn, &env.id, after, left)?;
        if after_artifact.is_some() && names.is_empty() {
            return Ok(None);
        }
        if left == 0 {
            // Something remains after a full page.
            return Ok(Some(std::mem::take(self).finish(true)));
        }
        let more = names.len() > left;
        let mut names = names;
        names.truncate(left);
        let artifacts = artifacts_inventory(conn, &env.id, after, names)?;
        let targets = target_count(conn, &env.id)?;
        self.entries += artifacts.len().max(1);
        self.last = Some(InventoryKey {
            environment: env.id.clone(),
            artifact: artifacts
                .last()
                .map(|a: &ArtifactInventory| a.artifact.clone())
                .unwrap_or_default(),
        });
        self.out.push(EnvironmentInventory {
            environment: env,
            targets,
            artifacts,
        });
        Ok(more.then(|| std::mem::take(self).finish(true)))
    }
}

/// The artifacts of `env` after `after` that are in flight or placed somewhere, in order:
/// at most `left` and one more (which says that more remain).
fn artifact_names(conn: &dyn Db, env: &str, after: &str, left: usize) -> Result<Vec<String>> {
    conn.all(
        "SELECT DISTINCT artifact FROM deployments WHERE environment = ?1 AND artifact > ?2 AND (state IN (?3, ?4) OR n_placed > 0) ORDER BY artifact LIMIT ?5",
        p![
            env,
            after,
            DeploymentState::Pending.code(),
            DeploymentState::InProgress.code(),
            limit(left)
        ],
        |r| r.get(0),
    )
}

/// How many targets `env` has.
fn target_count(conn: &dyn Db, env: &str) -> Result<u64> {
    let targets: i64 = conn
        .value(
            "SELECT COUNT(*) FROM targets WHERE environment = ?1",
            p![env],
        )?
        .unwrap_or(0);
    Ok(u64::try_from(targets).unwrap_or(0))
}

/// What is placed and in flight of the artifacts `names` (in order, every artifact of
/// environment `env` after `after` up to the last of them) in `env`: a few queries for
/// them all, whatever their number.
fn artifacts_inventory(
    conn: &dyn Db,
    env: &str,
    after: &str,
    names: Vec<String>,
) -> Result<Vec<ArtifactInventory>> {
    let Some(upto) = names.last().cloned() else {
        return Ok(Vec::new());
    };
    let mut by_name: BTreeMap<String, ArtifactInventory> = names
        .into_iter()
        .map(|artifact| {
            let a = ArtifactInventory {
                artifact: artifact.clone(),
                versions: Vec::new(),
                in_flight: Vec::new(),
                in_flight_total: 0,
            };
            (artifact, a)
        })
        .collect();
    add_placed_versions(
        conn,
        &mut by_name,
        p![env, after, upto, PlacementState::Placed.code()],
    )?;
    let unfinished = p![
        env,
        after,
        upto,
        DeploymentState::Pending.code(),
        DeploymentState::InProgress.code()
    ];
    add_in_flight(conn, &mut by_name, unfinished)?;
    Ok(by_name.into_values().collect())
}

/// Adds to `by_name` the versions placed of its artifacts. `range`: the environment, the
/// artifacts after and up to, the PLACED state.
fn add_placed_versions(
    conn: &dyn Db,
    by_name: &mut BTreeMap<String, ArtifactInventory>,
    range: &[V],
) -> Result<()> {
    // The current version of an artifact on a target is its newest PLACED placement (as
    // release-svc's coverage gate counts it).
    let versions = conn.all(
        "SELECT c.artifact, c.version, a.digest, COUNT(*), MAX(c.update_ms) FROM (
             SELECT d.artifact AS artifact, d.version AS version, p.update_ms AS update_ms,
                    p.seq AS seq,
                    ROW_NUMBER() OVER (PARTITION BY p.target, d.artifact ORDER BY p.seq DESC) AS newest
             FROM placements p JOIN deployments d ON d.id = p.deployment
             WHERE d.environment = ?1 AND d.artifact > ?2 AND d.artifact <= ?3 AND p.state = ?4
         ) c JOIN artifacts a ON a.name = c.artifact AND a.version = c.version
         WHERE c.newest = 1
         GROUP BY c.artifact, c.version, a.digest
         ORDER BY c.artifact, MAX(c.seq) DESC",
        range,
        |r| {
            Ok((
                r.get::<String>(0)?,
                PlacedVersion {
                    version: r.get(1)?,
                    digest: r.get(2)?,
                    targets: u64::try_from(r.get::<i64>(3)?).unwrap_or(0),
                    last_place_ms: r.get(4)?,
                },
            ))
        },
    )?;
    for (artifact, v) in versions {
        if let Some(a) = by_name.get_mut(&artifact) {
            a.versions.push(v);
        }
    }
    Ok(())
}

/// Adds to `by_name` how many deployments of its artifacts are in flight and the oldest
/// [`MAX_IN_FLIGHT`] of each with their strategy step. `unfinished`: the environment, the
/// artifacts after and up to, the PENDING and IN_PROGRESS states.
fn add_in_flight(
    conn: &dyn Db,
    by_name: &mut BTreeMap<String, ArtifactInventory>,
    unfinished: &[V],
) -> Result<()> {
    let totals: Vec<(String, i64)> = conn.all(
        "SELECT artifact, COUNT(*) FROM deployments WHERE environment = ?1 AND artifact > ?2 AND artifact <= ?3 AND state IN (?4, ?5) GROUP BY artifact",
        unfinished,
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    for (artifact, total) in totals {
        if let Some(a) = by_name.get_mut(&artifact) {
            a.in_flight_total = u64::try_from(total).unwrap_or(0);
        }
    }
    // The oldest MAX_IN_FLIGHT of each artifact.
    let deployments = conn.all(
        &format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM (
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY artifact ORDER BY id) AS age
                 FROM deployments
                 WHERE environment = ?1 AND artifact > ?2 AND artifact <= ?3 AND state IN (?4, ?5)
             ) f WHERE f.age <= {MAX_IN_FLIGHT} ORDER BY f.artifact, f.id"
        ),
        unfinished,
        deployment_row,
    )?;
    for deployment in deployments {
        let slots: Vec<strategy::Slot> = slots(conn, deployment.id)?
            .into_iter()
            .map(|s| s.1)
            .collect();
        let step = strategy::step(&deployment.strategy, &slots, deployment.continued);
        if let Some(a) = by_name.get_mut(&deployment.artifact) {
            a.in_flight.push(InFlight { deployment, step });
        }
    }
    Ok(())
}

/// The current version of every artifact on the targets `first..=last` of `env`, by
/// target then artifact.
pub(super) fn target_versions(
    conn: &dyn Db,
    env: &str,
    first: &str,
    last: &str,
) -> Result<BTreeMap<String, Vec<TargetVersion>>> {
    let rows = conn.all(
        "SELECT c.target, c.artifact, c.version, c.deployment, c.update_ms FROM (
             SELECT p.target AS target, d.artifact AS artifact, d.version AS version,
                    p.deployment AS deployment, p.update_ms AS update_ms,
                    ROW_NUMBER() OVER (PARTITION BY p.target, d.artifact ORDER BY p.seq DESC) AS newest
             FROM placements p JOIN deployments d ON d.id = p.deployment
             WHERE d.environment = ?1 AND p.target >= ?2 AND p.target <= ?3 AND p.state = ?4
         ) c WHERE c.newest = 1 ORDER BY c.target, c.artifact",
        p![env, first, last, PlacementState::Placed.code()],
        |r| {
            Ok(TargetVersion {
                target: r.get(0)?,
                artifact: r.get(1)?,
                version: r.get(2)?,
                deployment: r.get(3)?,
                place_ms: r.get(4)?,
            })
        },
    )?;
    let mut out: BTreeMap<String, Vec<TargetVersion>> = BTreeMap::new();
    for v in rows {
        out.entry(v.target.clone()).or_default().push(v);
    }
    Ok(out)
}
