//! The engine: the authoritative in-memory state (features, releases, placements), the
//! store writes that make it durable, and the evaluation snapshot rebuilt after every change.
//!
//! Writers serialize on one async mutex: validate, write the store, update the state,
//! rebuild and swap the snapshot, announce the change. Readers (`evaluate`) load the current
//! snapshot from an `ArcSwap`: no lock, no database.
//!
//! Submodules: `governance` (policies, approvals, the plan scheduler) and `visibility`
//! (the feature x environment matrix) and `timeline` (a release's story and its steps to come).

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{broadcast, Mutex};

use std::collections::{BTreeSet, HashSet};

use crate::domain::evaluate::{Context, Decision, Scope, Snapshot};
use crate::domain::flagd_doc::ImportedFlag;
use crate::domain::model::{Feature, Millis, Release, ReleaseState, Transition};
use crate::domain::placements::{Placement, PlacementIndex};
use crate::domain::policy::Policy;
use crate::domain::rules::Bucketing;
use crate::domain::{Error, Result};
use crate::store::{AuditEntry, Loaded, Store, Withdrawal};

mod governance;
mod timeline;
mod usage;
mod visibility;

use governance::CalendarRead;
pub use governance::{Calendar, EnvironmentFacts};
pub use timeline::{Event, Timeline, Upcoming};
pub use usage::{EnvironmentUsage, Stale, VariantCount, DAY_MS};
pub use visibility::{Cell, Class, Cursor, Matrix, Row};

pub use service_kit::time::{now_ms, Clock, ManualClock, SystemClock};

/// Who asks for a change (shared with deploy-svc: the principal, the request id).
pub use service_kit::principal::Caller;

/// An audit entry by an actor.
pub trait AuditBy {
    /// The entry of `action` on `resource` at `now_ms`, by this actor.
    fn audit(&self, now_ms: Millis, action: &str, resource: String) -> AuditEntry;
}

impl AuditBy for Caller {
    fn audit(&self, now_ms: Millis, action: &str, resource: String) -> AuditEntry {
        AuditEntry {
            time_ms: now_ms,
            principal: self.principal.clone(),
            action: action.to_owned(),
            resource,
            request_id: self.request_id.clone(),
            ..AuditEntry::default()
        }
    }
}

/// Feature `key` as it stands, if its revision is `expected` (when given): NOT_FOUND or
/// ABORTED otherwise.
fn current_feature(state: &State, key: &str, expected: Option<i64>) -> Result<Arc<Feature>> {
    let current = state
        .features
        .get(key)
        .cloned()
        .ok_or_else(|| Error::NotFound(format!("features/{key}")))?;
    if expected.is_some_and(|e| e != current.revision) {
        return Err(Error::Aborted(format!(
            "etag is stale: features/{key} is at etag \"{}\"; read it again and retry",
            current.revision
        )));
    }
    Ok(current)
}

/// The violation of naming an archived feature.
fn archived(key: &str) -> crate::domain::PreconditionViolation {
    crate::domain::PreconditionViolation::new(
        "FEATURE_ARCHIVED",
        format!("features/{key}"),
        "the feature is archived; unarchive it first",
    )
}

/// What an import did with one flag.
enum Imported {
    Created,
    Updated,
    Unchanged,
}

/// An archived feature is not brought back by an import: FAILED_PRECONDITION naming every
/// archived feature among `flags` (unarchive them first).
fn refuse_archived(state: &State, flags: &[ImportedFlag]) -> Result<()> {
    let archived_keys: Vec<_> = flags
        .iter()
        .filter(|f| {
            state
                .features
                .get(&f.key)
                .is_some_and(|f| f.archived_ms.is_some())
        })
        .map(|f| archived(&f.key))
        .collect();
    if !archived_keys.is_empty() {
        return Err(Error::FailedPrecondition(archived_keys));
    }
    Ok(())
}

fn audit_word(archive: bool) -> &'static str {
    if archive {
        "archived"
    } else {
        "unarchived"
    }
}

/// A one-line summary of a feature for the audit trail.
pub fn feature_summary(f: &Feature) -> String {
    format!(
        "variants {:?}, default {:?}, off {:?}, rule {}, carriers {}, allow {}, deny {}, disabled {}",
        f.variants.keys().collect::<Vec<_>>(),
        f.default_variant,
        f.off_variant,
        if f.targeting.is_some() { "yes" } else { "no" },
        f.carriers.len(),
        f.allow.len(),
        f.deny.len(),
        f.disabled
    )
}

/// A one-line summary of a release for the audit trail.
pub fn release_summary(r: &Release) -> String {
    let envs: Vec<String> = r
        .environments
        .iter()
        .map(|e| format!("{} {}%", e.environment, e.rollout_percent))
        .collect();
    format!("{:?}: {}", r.state, envs.join(", "))
}

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
    policies: BTreeMap<String, Policy>,
}

impl State {
    /// The state as stored.
    fn loaded(loaded: Loaded) -> Self {
        let mut placements = PlacementIndex::default();
        placements.replace(loaded.placements);
        Self {
            features: loaded.features,
            releases: loaded.releases,
            placements,
            cursor: loaded.cursor,
            events_applied: loaded.events_applied,
            policies: loaded.policies,
        }
    }

    /// The snapshot after `before` with the entries in `scope` recomputed from this state.
    fn next_snapshot(&self, before: &Snapshot, scope: &Scope) -> Snapshot {
        before.update(
            before.version + 1,
            scope,
            &self.features,
            &self.releases,
            &self.placements,
        )
    }

    /// Release `id` as it stands (NOT_FOUND when there is none).
    fn release(&self, id: i64) -> Result<Release> {
        self.releases
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("releases/{id}")))
    }

    /// The stored policy of `environment` (an empty one, revision 0, if none was set).
    fn policy(&self, environment: &str) -> Policy {
        self.policies
            .get(environment)
            .cloned()
            .unwrap_or_else(|| Policy {
                environment: environment.to_owned(),
                ..Policy::default()
            })
    }
}

/// The engine.
pub struct Engine {
    store: Arc<dyn Store>,
    state: Mutex<State>,
    snapshot: ArcSwap<Snapshot>,
    changes: broadcast::Sender<Change>,
    clock: Arc<dyn Clock>,
    calendar: Arc<dyn Calendar>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.snapshot.load().version)
            .finish()
    }
}

impl Engine {
    /// Loads the stored state and builds the first snapshot; `fractional` rules bucket with
    /// `bucketing`; time comes from `clock` and freeze windows from `calendar`.
    pub async fn load(
        store: Arc<dyn Store>,
        bucketing: Bucketing,
        clock: Arc<dyn Clock>,
        calendar: Arc<dyn Calendar>,
    ) -> Result<Self> {
        let state = State::loaded(store.load().await?);
        // Version 1, the first after the empty snapshot.
        let empty = Snapshot {
            bucketing,
            ..Snapshot::default()
        };
        let snapshot = state.next_snapshot(&empty, &Scope::All);
        let (changes, _) = broadcast::channel(1024);
        Ok(Self {
            store,
            state: Mutex::new(state),
            snapshot: ArcSwap::from_pointee(snapshot),
            changes,
            clock,
            calendar,
        })
    }

    /// Reloads everything from the store and rebuilds the snapshot: another replica
    /// sharing the database committed a change.
    pub async fn reload(&self) -> Result<()> {
        // Under the writers' lock: a load that started before one of this replica's own
        // commits must not overwrite it with older data.
        let mut state = self.state.lock().await;
        *state = State::loaded(self.store.load().await?);
        let before = self.snapshot.load_full();
        let next = state.next_snapshot(&before, &Scope::All);
        // Announce only the decisions that changed (a reload after this replica's own
        // commit changes none).
        self.swap(
            &before,
            next,
            &Scope::All,
            "reloaded: a replica committed a change".into(),
        );
        Ok(())
    }

    /// Reads the placements another replica (the applier) committed since this one last
    /// read them, and updates the snapshot for the features they carry: what a replica
    /// that does not apply placement events does when the applier commits a batch (instead
    /// of reloading everything). Returns how many placements it read.
    pub async fn catch_up_placements(&self) -> Result<usize> {
        let mut state = self.state.lock().await;
        let after = self
            .store
            .placements_after(state.placements.max_sequence())
            .await?;
        state.cursor = state.cursor.max(after.cursor);
        state.events_applied = state.events_applied.max(after.events_applied);
        if after.placements.is_empty() {
            return Ok(0);
        }
        state.placements.apply_all(&after.placements);
        let before = self.snapshot.load_full();
        let (scope, next) = Self::after_placements(&state, &after.placements, &before);
        self.swap(
            &before,
            next,
            &scope,
            "placements applied by another replica".into(),
        );
        Ok(after.placements.len())
    }

    /// The snapshot after `placements` (already in `state.placements`): only the features
    /// their artifacts carry are recomputed; the scope says which.
    fn after_placements(
        state: &State,
        placements: &[Placement],
        before: &Snapshot,
    ) -> (Scope, Snapshot) {
        let artifacts: HashSet<&str> = placements.iter().map(|p| p.artifact.as_str()).collect();
        let scope = Self::carried_by(state, &artifacts);
        let next = state.next_snapshot(before, &scope);
        (scope, next)
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

    /// How many evaluations so far had a targeting rule run out of its budget (they served
    /// the feature's default).
    pub fn over_budget_evaluations(&self) -> u64 {
        self.snapshot
            .load()
            .over_budget
            .load(std::sync::atomic::Ordering::Relaxed)
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
        current_feature(&*self.state.lock().await, key, None)
    }

    /// Features after `after` in key order, at most `limit + 1` (to tell if more follow);
    /// archived ones only with `archived`.
    pub async fn features(
        &self,
        after: Option<&str>,
        limit: usize,
        archived: bool,
    ) -> Vec<Arc<Feature>> {
        let s = self.state.lock().await;
        s.features
            .values()
            .filter(|f| archived || f.archived_ms.is_none())
            .filter(|f| after.is_none_or(|a| f.key.as_str() > a))
            .take(limit + 1)
            .cloned()
            .collect()
    }

    /// A release by id.
    pub async fn release(&self, id: i64) -> Result<Release> {
        self.state.lock().await.release(id)
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
        let next = state.next_snapshot(&before, &scope);
        self.swap(&before, next, &scope, cause);
    }

    /// Puts `feature` in `state` and publishes its decisions ("feature features/{key}
    /// {done}").
    fn publish_feature(&self, state: &mut State, feature: Feature, done: &str) -> Arc<Feature> {
        let feature = Arc::new(feature);
        state.features.insert(feature.key.clone(), feature.clone());
        let scope = Scope::Keys(BTreeSet::from([feature.key.clone()]));
        self.publish(
            state,
            scope,
            format!("feature features/{} {done}", feature.key),
        );
        feature
    }

    /// Swaps `next` in and announces the pairs of `scope` that differ from `before`.
    fn swap(&self, before: &Snapshot, next: Snapshot, scope: &Scope, cause: String) {
        let pairs = before.changed_in(&next, scope);
        let version = next.version;
        self.snapshot.store(Arc::new(next));
        metrics::gauge!(crate::telemetry::SNAPSHOT_VERSION).set(version as f64);
        metrics::gauge!(crate::telemetry::SNAPSHOT_UPDATED).set(now_ms() as f64 / 1000.0);
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
    pub async fn create_feature(
        &self,
        mut feature: Feature,
        actor: &Caller,
    ) -> Result<Arc<Feature>> {
        let mut state = self.state.lock().await;
        let now = self.clock.now_ms();
        feature.revision = 1;
        feature.create_ms = now;
        feature.update_ms = now;
        let mut audit = actor.audit(now, "CreateFeature", format!("features/{}", feature.key));
        audit.after = feature_summary(&feature);
        self.store.insert_feature(feature.clone(), audit).await?;
        Ok(self.publish_feature(&mut state, feature, "created"))
    }

    /// Replaces a feature's mutable fields; `expected` is the caller's revision, if any.
    pub async fn update_feature(
        &self,
        mut feature: Feature,
        expected: Option<i64>,
        actor: &Caller,
    ) -> Result<Arc<Feature>> {
        let mut state = self.state.lock().await;
        let current = current_feature(&state, &feature.key, expected)?;
        if current.archived_ms.is_some() {
            return Err(Error::FailedPrecondition(vec![archived(&feature.key)]));
        }
        feature.revision = current.revision + 1;
        feature.create_ms = current.create_ms;
        feature.update_ms = self.clock.now_ms();
        let mut audit = actor.audit(
            feature.update_ms,
            "UpdateFeature",
            format!("features/{}", feature.key),
        );
        audit.before = feature_summary(&current);
        audit.after = feature_summary(&feature);
        self.store
            .update_feature(feature.clone(), current.revision, audit)
            .await?;
        Ok(self.publish_feature(&mut state, feature, "updated"))
    }

    /// Archives feature `key` (`archive`) or brings it back: an archived feature is hidden
    /// from lists and evaluates as unknown everywhere. Refused while a release that is not
    /// final (draft, planned, approved, releasing, released, paused) includes it: each such
    /// release is a violation. Archiving an archived feature (or restoring a live one)
    /// changes nothing.
    pub async fn archive_feature(
        &self,
        key: &str,
        archive: bool,
        expected: Option<i64>,
        actor: &Caller,
    ) -> Result<Arc<Feature>> {
        let mut state = self.state.lock().await;
        let current = current_feature(&state, key, expected)?;
        if current.archived_ms.is_some() == archive {
            return Ok(current);
        }
        if archive {
            let holding: Vec<_> = state
                .releases
                .values()
                .filter(|r| !r.state.is_final() && r.features.iter().any(|k| k == key))
                .map(|r| {
                    crate::domain::PreconditionViolation::new(
                        "FEATURE_IN_RELEASE",
                        format!("releases/{}", r.id),
                        format!(
                            "releases/{} includes the feature ({:?}); roll it back or cancel it first",
                            r.id, r.state
                        ),
                    )
                })
                .collect();
            if !holding.is_empty() {
                return Err(Error::FailedPrecondition(holding));
            }
        }
        let now = self.clock.now_ms();
        let mut next = (*current).clone();
        next.revision = current.revision + 1;
        next.update_ms = now;
        next.archived_ms = archive.then_some(now);
        let action = if archive {
            "ArchiveFeature"
        } else {
            "UnarchiveFeature"
        };
        let mut audit = actor.audit(now, action, format!("features/{key}"));
        audit.before = if archive { "live" } else { "archived" }.into();
        audit.after = if archive { "archived" } else { "live" }.into();
        self.store
            .update_feature(next.clone(), current.revision, audit)
            .await?;
        Ok(self.publish_feature(&mut state, next, audit_word(archive)))
    }

    /// Creates a release in DRAFT (idempotent per request id).
    pub async fn create_release(
        &self,
        mut release: Release,
        request_id: Option<String>,
        actor: &Caller,
    ) -> Result<Release> {
        let mut state = self.state.lock().await;
        let unknown: Vec<_> = release
            .features
            .iter()
            .filter_map(|k| match state.features.get(k) {
                None => Some(crate::domain::PreconditionViolation::new(
                    "FEATURE_EXISTS",
                    format!("features/{k}"),
                    "the release names a feature that does not exist; create it first",
                )),
                Some(f) if f.archived_ms.is_some() => Some(archived(k)),
                Some(_) => None,
            })
            .collect();
        if !unknown.is_empty() {
            return Err(Error::FailedPrecondition(unknown));
        }
        let now = self.clock.now_ms();
        release.state = ReleaseState::Draft;
        release.revision = 1;
        release.create_ms = now;
        release.update_ms = now;
        release.governance.requester = actor.principal.clone();
        let mut audit = actor.audit(now, "CreateRelease", "releases/".into());
        audit.after = release_summary(&release);
        audit.reason = release.governance.change_reference.clone();
        let (id, created) = self
            .store
            .insert_release(release.clone(), request_id, audit)
            .await?;
        if !created {
            if let Some(existing) = state.releases.get(&id) {
                return Ok(existing.clone());
            }
            // Another replica created it a moment ago (the same request id sent to both):
            // read it from the database; this replica's own reload follows its notification.
            let loaded = self.store.load().await?;
            return loaded
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

    /// Imports flagd flags as features released (100%) in `environment`: returns the keys
    /// created, updated and unchanged, and the release created (if any flag needed one).
    pub async fn import_flagd(
        &self,
        environment: &str,
        flags: Vec<ImportedFlag>,
        actor: &Caller,
    ) -> Result<(Vec<String>, Vec<String>, Vec<String>, Option<Release>)> {
        let calendar = self.calendar.environment(environment).await;
        let mut state = self.state.lock().await;
        let now = self.clock.now_ms();
        refuse_archived(&state, &flags)?;
        let planned = self.import_release(&state, environment, &flags, actor, &calendar, now)?;
        let (mut created, mut updated, mut unchanged) = (Vec::new(), Vec::new(), Vec::new());
        for flag in &flags {
            let list = match self.import_flag(&mut state, flag, actor, now).await? {
                Imported::Created => &mut created,
                Imported::Updated => &mut updated,
                Imported::Unchanged => &mut unchanged,
            };
            list.push(flag.key.clone());
        }
        let release = match planned {
            None => None,
            Some(mut release) => {
                let mut audit = actor.audit(now, "ImportFlagd", "releases/".into());
                audit.after = release_summary(&release);
                let (id, _) = self
                    .store
                    .insert_release(release.clone(), None, audit)
                    .await?;
                release.id = id;
                state.releases.insert(id, release.clone());
                Some(release)
            }
        };
        let scope = Scope::Keys(flags.iter().map(|f| f.key.clone()).collect());
        self.publish(
            &state,
            scope,
            format!("flagd flags imported into {environment}"),
        );
        Ok((created, updated, unchanged, release))
    }

    /// The release an import creates for its flags not yet fully released in `environment`
    /// (`None` when all are): at 100% there, governed by the environment's policies like
    /// any other and checked before anything is written.
    fn import_release(
        &self,
        state: &State,
        environment: &str,
        flags: &[ImportedFlag],
        actor: &Caller,
        calendar: &CalendarRead,
        now: Millis,
    ) -> Result<Option<Release>> {
        let snapshot = self.snapshot.load();
        let unreleased: Vec<String> = flags
            .iter()
            .map(|f| f.key.clone())
            .filter(|k| {
                snapshot
                    .governing(k, environment)
                    .is_none_or(|g| g.rollout_percent < 100.0)
            })
            .collect();
        if unreleased.is_empty() {
            return Ok(None);
        }
        let draft = Release {
            id: 0,
            description: format!("imported from a flagd flag definition into {environment}"),
            features: unreleased,
            environments: vec![crate::domain::model::ReleaseEnvironment {
                environment: environment.to_owned(),
                ..Default::default()
            }],
            state: ReleaseState::Draft,
            governance: crate::domain::model::Governance {
                requester: actor.principal.clone(),
                ..Default::default()
            },
            revision: 1,
            create_ms: now,
            update_ms: now,
        };
        let mut full = draft.clone();
        full.apply(&Transition::SetRollout {
            environment: environment.to_owned(),
            percent: 100.0,
        })
        .map_err(Error::Internal)?;
        let violations = self.violations(state, &draft, &full, 0, Some(calendar), now);
        if !violations.is_empty() {
            return Err(Error::FailedPrecondition(violations));
        }
        full.stamp(&draft, now);
        Ok(Some(full))
    }

    /// Writes one imported flag as a feature (created, or updated when it differs from the
    /// stored one) and puts it in `state`.
    async fn import_flag(
        &self,
        state: &mut State,
        flag: &ImportedFlag,
        actor: &Caller,
        now: Millis,
    ) -> Result<Imported> {
        let existing = state.features.get(&flag.key).cloned();
        let mut next = flag.to_feature(existing.as_deref());
        let imported = match existing {
            Some(current)
                if *current
                    == Feature {
                        revision: current.revision,
                        create_ms: current.create_ms,
                        update_ms: current.update_ms,
                        ..next.clone()
                    } =>
            {
                return Ok(Imported::Unchanged);
            }
            Some(current) => {
                next.revision = current.revision + 1;
                next.create_ms = current.create_ms;
                next.update_ms = now;
                let mut audit = actor.audit(now, "ImportFlagd", format!("features/{}", next.key));
                audit.before = feature_summary(&current);
                audit.after = feature_summary(&next);
                self.store
                    .update_feature(next.clone(), current.revision, audit)
                    .await?;
                Imported::Updated
            }
            None => {
                next.revision = 1;
                next.create_ms = now;
                next.update_ms = now;
                let mut audit = actor.audit(now, "ImportFlagd", format!("features/{}", next.key));
                audit.after = feature_summary(&next);
                self.store.insert_feature(next.clone(), audit).await?;
                Imported::Created
            }
        };
        state.features.insert(next.key.clone(), Arc::new(next));
        Ok(imported)
    }

    /// Applies placement events received after `cursor` (ordered), advancing the cursor to
    /// `cursor_after` and recording any automatic withdrawal, in one store transaction. Only
    /// the features carried by the touched artifacts are recomputed. Returns the
    /// withdrawals.
    pub async fn apply_placements(
        &self,
        events: Vec<Placement>,
        cursor_after: u64,
    ) -> Result<Vec<Withdrawal>> {
        let mut state = self.state.lock().await;
        let fresh: Vec<Placement> = events
            .into_iter()
            .filter(|e| e.sequence > state.cursor)
            .collect();
        if fresh.is_empty() && cursor_after <= state.cursor {
            return Ok(Vec::new());
        }
        // Applied in place (not to a copy of every placement): undone if the store refuses.
        let undo = state.placements.apply_all(&fresh);
        let before = self.snapshot.load_full();
        let (scope, next) = Self::after_placements(&state, &fresh, &before);
        let withdrawals = self.withdrawals(
            &state,
            &before,
            &next,
            &scope,
            &state.placements,
            cursor_after,
        );
        let applied = match self
            .store
            .apply_placements(fresh.clone(), cursor_after, withdrawals.clone())
            .await
        {
            Ok(applied) => applied,
            Err(e) => {
                state.placements.undo(undo);
                return Err(e);
            }
        };
        state.cursor = state.cursor.max(cursor_after);
        state.events_applied = applied;
        metrics::counter!(crate::telemetry::WITHDRAWALS).increment(withdrawals.len() as u64);
        for w in &withdrawals {
            tracing::info!(feature = %w.feature, environment = %w.environment, reason = %w.reason, sequence = w.sequence, "visibility withdrawn automatically");
        }
        if !fresh.is_empty() {
            self.swap(&before, next, &scope, placement_cause(&fresh, &withdrawals));
        }
        Ok(withdrawals)
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
        metrics::counter!(crate::telemetry::WITHDRAWALS).increment(withdrawals.len() as u64);
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
        let now = self.clock.now_ms();
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
