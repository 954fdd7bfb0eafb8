//! The engine: the authoritative in-memory state (features, releases, placements), the
//! store writes that make it durable, and the evaluation snapshot rebuilt after every change.
//!
//! Writers serialize on one async mutex: validate, write the store, update the state,
//! rebuild and swap the snapshot, announce the change. Readers (`evaluate`) load the current
//! snapshot from an `ArcSwap`: no lock, no database.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{broadcast, Mutex};

use std::collections::{BTreeSet, HashSet};

use crate::domain::evaluate::{Context, Decision, Scope, Snapshot};
use crate::domain::model::{Feature, Millis, Release, ReleaseState, Transition};
use crate::domain::placements::{Placement, PlacementIndex};
use crate::domain::rules::Bucketing;
use crate::domain::{Error, Result};
use crate::store::{Store, Withdrawal};

/// A change that may alter decisions, announced on WatchVisibility.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The snapshot version after the change.
    pub version: u64,
    /// Affected (feature, environment) pairs; empty with `all`.
    pub pairs: Vec<(String, String)>,
    /// Every feature may be affected.
    pub all: bool,
    /// What happened.
    pub cause: String,
}

struct State {
    features: BTreeMap<String, Arc<Feature>>,
    releases: BTreeMap<i64, Release>,
    placements: PlacementIndex,
    cursor: u64,
    events_applied: u64,
}

/// The engine.
pub struct Engine {
    store: Arc<dyn Store>,
    state: Mutex<State>,
    snapshot: ArcSwap<Snapshot>,
    changes: broadcast::Sender<Change>,
    clock: fn() -> Millis,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.snapshot.load().version)
            .finish()
    }
}

/// The wall clock in milliseconds.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Engine {
    /// Loads the stored state and builds the first snapshot; `fractional` rules bucket with
    /// `bucketing`.
    pub async fn load(store: Arc<dyn Store>, bucketing: Bucketing) -> Result<Self> {
        let loaded = store.load().await?;
        let mut placements = PlacementIndex::default();
        placements.replace(loaded.placements);
        let snapshot = Snapshot {
            bucketing,
            ..Snapshot::default()
        }
        .update(
            1,
            &Scope::All,
            &loaded.features,
            &loaded.releases,
            &placements,
        );
        let (changes, _) = broadcast::channel(1024);
        Ok(Self {
            store,
            state: Mutex::new(State {
                features: loaded.features,
                releases: loaded.releases,
                placements,
                cursor: loaded.cursor,
                events_applied: loaded.events_applied,
            }),
            snapshot: ArcSwap::from_pointee(snapshot),
            changes,
            clock: now_ms,
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Decides one feature for one context from the current snapshot.
    pub fn evaluate(&self, key: &str, ctx: &Context) -> Result<(Decision, u64)> {
        let snapshot = self.snapshot.load();
        snapshot
            .evaluate(key, ctx)
            .map(|d| (d, snapshot.version))
            .ok_or_else(|| Error::NotFound(format!("features/{key}")))
    }

    /// Subscribes to changes.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// The consumer cursor and the events applied so far.
    pub async fn cursor(&self) -> (u64, u64) {
        let s = self.state.lock().await;
        (s.cursor, s.events_applied)
    }

    /// A feature by key.
    pub async fn feature(&self, key: &str) -> Result<Arc<Feature>> {
        self.state
            .lock()
            .await
            .features
            .get(key)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("features/{key}")))
    }

    /// Features after `after` in key order, at most `limit + 1` (to tell if more follow).
    pub async fn features(&self, after: Option<&str>, limit: usize) -> Vec<Arc<Feature>> {
        let s = self.state.lock().await;
        s.features
            .values()
            .filter(|f| after.is_none_or(|a| f.key.as_str() > a))
            .take(limit + 1)
            .cloned()
            .collect()
    }

    /// A release by id.
    pub async fn release(&self, id: i64) -> Result<Release> {
        self.state
            .lock()
            .await
            .releases
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("releases/{id}")))
    }

    /// Releases before id `before`, newest first, at most `limit + 1`.
    pub async fn releases(&self, before: Option<i64>, limit: usize) -> Vec<Release> {
        let s = self.state.lock().await;
        s.releases
            .values()
            .rev()
            .filter(|r| before.is_none_or(|b| r.id < b))
            .take(limit + 1)
            .cloned()
            .collect()
    }

    /// The store, for reads the engine does not cache (withdrawals).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Recomputes the snapshot entries in `scope` from `state`, swaps the result in and
    /// announces what changed.
    fn publish(&self, state: &State, scope: Scope, cause: String) {
        let before = self.snapshot.load_full();
        let next = before.update(
            before.version + 1,
            &scope,
            &state.features,
            &state.releases,
            &state.placements,
        );
        self.swap(&before, next, &scope, cause);
    }

    /// Swaps `next` in and announces the pairs of `scope` that differ from `before`.
    fn swap(&self, before: &Snapshot, next: Snapshot, scope: &Scope, cause: String) {
        let pairs = before.changed_in(&next, scope);
        let version = next.version;
        self.snapshot.store(Arc::new(next));
        let _ = self.changes.send(Change {
            version,
            pairs,
            all: false,
            cause,
        });
    }

    /// The features whose carriers include one of `artifacts`.
    fn carried_by(state: &State, artifacts: &HashSet<&str>) -> Scope {
        Scope::Keys(
            state
                .features
                .values()
                .filter(|f| {
                    f.carriers
                        .iter()
                        .any(|c| artifacts.contains(c.artifact.as_str()))
                })
                .map(|f| f.key.clone())
                .collect(),
        )
    }

    /// Creates a feature.
    pub async fn create_feature(&self, mut feature: Feature) -> Result<Arc<Feature>> {
        let mut state = self.state.lock().await;
        let now = (self.clock)();
        feature.revision = 1;
        feature.create_ms = now;
        feature.update_ms = now;
        self.store.insert_feature(feature.clone()).await?;
        let feature = Arc::new(feature);
        state.features.insert(feature.key.clone(), feature.clone());
        let scope = Scope::Keys(BTreeSet::from([feature.key.clone()]));
        self.publish(
            &state,
            scope,
            format!("feature features/{} created", feature.key),
        );
        Ok(feature)
    }

    /// Replaces a feature's mutable fields; `expected` is the caller's revision, if any.
    pub async fn update_feature(
        &self,
        mut feature: Feature,
        expected: Option<i64>,
    ) -> Result<Arc<Feature>> {
        let mut state = self.state.lock().await;
        let current = state
            .features
            .get(&feature.key)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("features/{}", feature.key)))?;
        if expected.is_some_and(|e| e != current.revision) {
            return Err(Error::Aborted(format!(
                "etag is stale: features/{} is at etag \"{}\"; read it again and retry",
                feature.key, current.revision
            )));
        }
        feature.revision = current.revision + 1;
        feature.create_ms = current.create_ms;
        feature.update_ms = (self.clock)();
        self.store
            .update_feature(feature.clone(), current.revision)
            .await?;
        let feature = Arc::new(feature);
        state.features.insert(feature.key.clone(), feature.clone());
        let scope = Scope::Keys(BTreeSet::from([feature.key.clone()]));
        self.publish(
            &state,
            scope,
            format!("feature features/{} updated", feature.key),
        );
        Ok(feature)
    }

    /// Creates a release in DRAFT (idempotent per request id).
    pub async fn create_release(
        &self,
        mut release: Release,
        request_id: Option<String>,
    ) -> Result<Release> {
        let mut state = self.state.lock().await;
        let unknown: Vec<_> = release
            .features
            .iter()
            .filter(|k| !state.features.contains_key(*k))
            .map(|k| {
                crate::domain::PreconditionViolation::new(
                    "FEATURE_EXISTS",
                    format!("features/{k}"),
                    "the release names a feature that does not exist; create it first",
                )
            })
            .collect();
        if !unknown.is_empty() {
            return Err(Error::FailedPrecondition(unknown));
        }
        let now = (self.clock)();
        release.state = ReleaseState::Draft;
        release.revision = 1;
        release.create_ms = now;
        release.update_ms = now;
        let (id, created) = self
            .store
            .insert_release(release.clone(), request_id)
            .await?;
        if !created {
            return state
                .releases
                .get(&id)
                .cloned()
                .ok_or_else(|| Error::Internal(format!("releases/{id} is stored but not loaded")));
        }
        release.id = id;
        state.releases.insert(id, release.clone());
        let scope = Scope::Keys(release.features.iter().cloned().collect());
        self.publish(&state, scope, format!("release releases/{id} created"));
        Ok(release)
    }

    /// Applies a release transition (the kill switch is `Pause` or `Rollback`).
    pub async fn transition(&self, id: i64, t: Transition) -> Result<Release> {
        let mut state = self.state.lock().await;
        let current = state
            .releases
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("releases/{id}")))?;
        let mut next = current.clone();
        next.apply(&t)
            .map_err(|why| Error::precondition("RELEASE_STATE", format!("releases/{id}"), why))?;
        next.revision = current.revision + 1;
        next.update_ms = (self.clock)();
        self.store
            .update_release(next.clone(), current.revision)
            .await?;
        state.releases.insert(id, next.clone());
        let scope = Scope::Keys(next.features.iter().cloned().collect());
        self.publish(
            &state,
            scope,
            format!("release releases/{id} {:?}", next.state),
        );
        Ok(next)
    }

    /// Imports flagd flags as features released (100%) in `environment`: returns the keys
    /// created, updated and unchanged, and the release created (if any flag needed one).
    pub async fn import_flagd(
        &self,
        environment: &str,
        flags: Vec<crate::domain::flagd_doc::ImportedFlag>,
    ) -> Result<(Vec<String>, Vec<String>, Vec<String>, Option<Release>)> {
        let mut state = self.state.lock().await;
        let now = (self.clock)();
        let (mut created, mut updated, mut unchanged) = (Vec::new(), Vec::new(), Vec::new());
        for flag in &flags {
            let existing = state.features.get(&flag.key).cloned();
            let mut next = flag.to_feature(existing.as_deref());
            match existing {
                Some(current)
                    if *current
                        == Feature {
                            revision: current.revision,
                            create_ms: current.create_ms,
                            update_ms: current.update_ms,
                            ..next.clone()
                        } =>
                {
                    unchanged.push(flag.key.clone());
                    continue;
                }
                Some(current) => {
                    next.revision = current.revision + 1;
                    next.create_ms = current.create_ms;
                    next.update_ms = now;
                    self.store
                        .update_feature(next.clone(), current.revision)
                        .await?;
                    updated.push(flag.key.clone());
                }
                None => {
                    next.revision = 1;
                    next.create_ms = now;
                    next.update_ms = now;
                    self.store.insert_feature(next.clone()).await?;
                    created.push(flag.key.clone());
                }
            }
            state.features.insert(next.key.clone(), Arc::new(next));
        }
        // Flags not yet fully released in the environment get one release at 100%.
        let snapshot = self.snapshot.load();
        let unreleased: Vec<String> = flags
            .iter()
            .map(|f| f.key.clone())
            .filter(|k| {
                snapshot
                    .features
                    .get(k.as_str())
                    .and_then(|e| e.governing(environment))
                    .is_none_or(|g| g.rollout_percent < 100.0)
            })
            .collect();
        let release = if unreleased.is_empty() {
            None
        } else {
            let mut release = Release {
                id: 0,
                description: format!("imported from a flagd flag definition into {environment}"),
                features: unreleased,
                environments: vec![crate::domain::model::ReleaseEnvironment {
                    environment: environment.to_owned(),
                    rollout_percent: 0.0,
                }],
                state: ReleaseState::Draft,
                revision: 1,
                create_ms: now,
                update_ms: now,
            };
            release
                .apply(&Transition::SetRollout {
                    environment: environment.to_owned(),
                    percent: 100.0,
                })
                .map_err(Error::Internal)?;
            let (id, _) = self.store.insert_release(release.clone(), None).await?;
            release.id = id;
            state.releases.insert(id, release.clone());
            Some(release)
        };
        let scope = Scope::Keys(flags.iter().map(|f| f.key.clone()).collect());
        self.publish(
            &state,
            scope,
            format!("flagd flags imported into {environment}"),
        );
        Ok((created, updated, unchanged, release))
    }

    /// Applies placement events received after `cursor` (ordered), advancing the cursor to
    /// `cursor_after` and recording any automatic withdrawal, in one store transaction. Only
    /// the features carried by the touched artifacts are recomputed.
    pub async fn apply_placements(&self, events: Vec<Placement>, cursor_after: u64) -> Result<()> {
        let mut state = self.state.lock().await;
        let fresh: Vec<Placement> = events
            .into_iter()
            .filter(|e| e.sequence > state.cursor)
            .collect();
        if fresh.is_empty() && cursor_after <= state.cursor {
            return Ok(());
        }
        let mut next_placements = state.placements.clone();
        for e in &fresh {
            next_placements.apply(e.clone());
        }
        let artifacts: HashSet<&str> = fresh.iter().map(|e| e.artifact.as_str()).collect();
        let scope = Self::carried_by(&state, &artifacts);
        let before = self.snapshot.load_full();
        let next = before.update(
            before.version + 1,
            &scope,
            &state.features,
            &state.releases,
            &next_placements,
        );
        let withdrawals = self.withdrawals(
            &state,
            &before,
            &next,
            &scope,
            &next_placements,
            cursor_after,
        );
        let applied = self
            .store
            .apply_placements(fresh.clone(), cursor_after, withdrawals.clone())
            .await?;
        state.placements = next_placements;
        state.cursor = state.cursor.max(cursor_after);
        state.events_applied = applied;
        for w in &withdrawals {
            tracing::info!(feature = %w.feature, environment = %w.environment, reason = %w.reason, sequence = w.sequence, "visibility withdrawn automatically");
        }
        if !fresh.is_empty() {
            self.swap(&before, next, &scope, placement_cause(&fresh, &withdrawals));
        }
        Ok(())
    }

    /// Replaces every placement with a snapshot from deploy-svc (a resync).
    pub async fn resync(&self, placements: Vec<Placement>, cursor: u64) -> Result<()> {
        let mut state = self.state.lock().await;
        let mut next_placements = PlacementIndex::default();
        next_placements.replace(placements.clone());
        let before = self.snapshot.load_full();
        let next = before.update(
            before.version + 1,
            &Scope::All,
            &state.features,
            &state.releases,
            &next_placements,
        );
        let withdrawals = self.withdrawals(
            &state,
            &before,
            &next,
            &Scope::All,
            &next_placements,
            cursor,
        );
        self.store
            .replace_placements(placements, cursor, withdrawals.clone())
            .await?;
        state.placements = next_placements;
        state.cursor = cursor;
        let version = next.version;
        self.swap(
            &before,
            next,
            &Scope::All,
            format!("resynced placements at sequence {cursor}"),
        );
        let _ = self.changes.send(Change {
            version,
            pairs: Vec::new(),
            all: true,
            cause: "placement resync".into(),
        });
        Ok(())
    }

    fn withdrawals(
        &self,
        state: &State,
        before: &Snapshot,
        next: &Snapshot,
        scope: &Scope,
        placements: &PlacementIndex,
        sequence: u64,
    ) -> Vec<Withdrawal> {
        let withdrawn = before.withdrawn_in(next, scope);
        if withdrawn.is_empty() {
            return Vec::new();
        }
        let view = placements.coverage_view();
        let now = (self.clock)();
        withdrawn
            .into_iter()
            .map(|(feature, environment)| {
                let reason = state
                    .features
                    .get(&feature)
                    .and_then(|f| view.gate(&environment, &f.carriers).err())
                    .unwrap_or_else(|| "carrier below the required coverage".into());
                Withdrawal {
                    feature,
                    environment,
                    reason,
                    sequence,
                    time_ms: now,
                }
            })
            .collect()
    }
}

fn placement_cause(events: &[Placement], withdrawals: &[Withdrawal]) -> String {
    let last = events.last().map(|e| e.sequence).unwrap_or_default();
    if withdrawals.is_empty() {
        format!(
            "{} placement event(s) through sequence {last}",
            events.len()
        )
    } else {
        let w: Vec<_> = withdrawals
            .iter()
            .map(|w| format!("{} in {}", w.feature, w.environment))
            .collect();
        format!("withdrawn through sequence {last}: {}", w.join(", "))
    }
}
