//! Visibility decisions from an immutable snapshot.
//!
//! The snapshot is rebuilt whenever a feature, a release or the placement gate changes, and
//! swapped atomically; `evaluate` reads only the snapshot (no database, no lock).
//!
//! Decision order: unknown feature -> error; DISABLED; NOT_RELEASED (no RELEASING or
//! RELEASED release puts the feature in the environment); NOT_DEPLOYED (a carrier is below
//! its required coverage there); deny list, allow list (TARGETING_MATCH); percentage rollout
//! (SPLIT); targeting rule (TARGETING_MATCH); DEFAULT; STATIC (released at 100% with no rule
//! and no lists: the same answer for every context).
//!
//! A targeting rule that runs out of its evaluation budget (see [`super::rules`]) picks no
//! variant: the feature serves its default, and [`Snapshot::over_budget`] counts it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};

use super::hash::{basis_points, in_rollout_points};
use super::model::{Feature, Release};
use super::placements::{CoverageView, PlacementIndex};
use super::rules::{Bucketing, Data};
use super::text::same;
use super::usage::{FeatureUsage, UsageBook};

/// Why a decision came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Feature disabled.
    Disabled,
    /// No active release here.
    NotReleased,
    /// Carrier below coverage here.
    NotDeployed,
    /// A list or the rule decided.
    TargetingMatch,
    /// The percentage decided.
    Split,
    /// Default variant.
    Default,
    /// Context-free answer.
    Static,
}

impl Reason {
    /// Every reason, in declaration order (`reason as usize` indexes it).
    pub const ALL: [Reason; 7] = [
        Self::Disabled,
        Self::NotReleased,
        Self::NotDeployed,
        Self::TargetingMatch,
        Self::Split,
        Self::Default,
        Self::Static,
    ];

    /// The name in metrics and logs (as in the API's enum, without its prefix).
    pub fn name(self) -> &'static str {
        match self {
            Self::Disabled => "DISABLED",
            Self::NotReleased => "NOT_RELEASED",
            Self::NotDeployed => "NOT_DEPLOYED",
            Self::TargetingMatch => "TARGETING_MATCH",
            Self::Split => "SPLIT",
            Self::Default => "DEFAULT",
            Self::Static => "STATIC",
        }
    }
}

// `Reason::ALL` is in declaration order (checked when compiling): the metric handles are
// indexed by `reason as usize`.
const _: () = {
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!(Reason::ALL[i] as usize == i);
        i += 1;
    }
};

/// The release that governs a feature in an environment, and the gate there: 24 bytes
/// (the environment is an index into the snapshot's [`Environments`], not a name).
#[derive(Debug, Clone, PartialEq)]
pub struct Governing {
    /// Release id.
    pub release: i64,
    /// Rollout percentage.
    pub rollout_percent: f64,
    /// The same in basis points, as the rollout compares it (in the struct's padding).
    pub rollout_points: u16,
    /// The environment.
    pub environment: EnvId,
    /// Whether the carriers are placed at coverage (the reason when not is computed on
    /// demand from the placements, never stored per pair).
    pub deployed: bool,
}

/// An environment's index in [`Environments`]: stable across snapshot updates (names are
/// only ever added), so an entry shared between versions keeps meaning the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnvId(u32);

/// The environment names some active release has named, each once, indexed by [`EnvId`].
/// Their number is bounded by the releases operators create.
#[derive(Debug, Clone, Default)]
pub struct Environments {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, EnvId, foldhash::fast::RandomState>,
}

impl Environments {
    /// The id of `name`, if a release has named it.
    pub fn id(&self, name: &str) -> Option<EnvId> {
        self.ids.get(name).copied()
    }

    /// The name of `id` (empty for an id this table never gave out).
    pub fn name(&self, id: EnvId) -> &str {
        self.names.get(id.0 as usize).map_or("", AsRef::as_ref)
    }

    /// The id of `name`, added when new.
    fn intern(&mut self, name: &str) -> EnvId {
        if let Some(id) = self.id(name) {
            return id;
        }
        let id = EnvId(u32::try_from(self.names.len()).unwrap_or(u32::MAX));
        let name: Arc<str> = Arc::from(name);
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }
}

/// One feature in the snapshot.
#[derive(Debug, Clone)]
pub struct FeatureEntry {
    /// The feature.
    pub feature: Arc<Feature>,
    /// Per environment where an active release includes it (a handful: searched linearly).
    pub environments: Box<[Governing]>,
    /// Its evaluation counters (kept across snapshot versions).
    pub usage: Arc<FeatureUsage>,
}

impl FeatureEntry {
    /// The governing release in `environment`, if any.
    pub fn governing(&self, environment: EnvId) -> Option<&Governing> {
        self.environments
            .iter()
            .find(|g| g.environment == environment)
    }
}

/// The features that are not archived (an archived feature has no snapshot entry: it
/// evaluates as unknown everywhere).
fn live(
    features: &BTreeMap<String, Arc<Feature>>,
) -> impl Iterator<Item = (&String, &Arc<Feature>)> {
    features.iter().filter(|(_, f)| f.archived_ms.is_none())
}

/// Per feature key, the release governing it in each environment an active release
/// names: (environment, release id, rollout percentage).
type Candidates<'a> = HashMap<&'a str, Vec<(&'a str, i64, f64)>>;

/// Every live feature's entry, and the keys in order (one shared copy of each key for the
/// map and the list).
fn all_entries(
    features: &BTreeMap<String, Arc<Feature>>,
    entry_for: &mut impl FnMut(&Arc<Feature>) -> Arc<FeatureEntry>,
) -> (FeatureMap, Arc<Vec<Arc<str>>>) {
    let keys: Vec<Arc<str>> = live(features).map(|(k, _)| Arc::from(k.as_str())).collect();
    let entries: FeatureMap = keys
        .iter()
        .cloned()
        .zip(live(features).map(|(_, f)| entry_for(f)))
        .collect();
    (entries, Arc::new(keys))
}

/// The snapshot's features by key, hashed with foldhash (per-process random seed): a
/// third of SipHash's cost on the hot path. Only the server's own writes insert keys;
/// callers only look keys up, so they cannot build collision chains.
pub type FeatureMap = HashMap<Arc<str>, Arc<FeatureEntry>, foldhash::fast::RandomState>;

/// An immutable view of everything a decision needs.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increases with every rebuild.
    pub version: u64,
    /// Features by key (hashed: the hot path is one lookup). Entries are shared between
    /// snapshot versions: an update replaces only the entries it recomputes.
    pub features: FeatureMap,
    /// The feature keys in order (for batch evaluation and listings).
    pub keys: Arc<Vec<Arc<str>>>,
    /// The environments the entries name (only ever added to: shared by later snapshots).
    pub environments: Arc<Environments>,
    /// How `fractional` buckets (kept across updates).
    pub bucketing: Bucketing,
    /// Evaluations whose rule ran out of budget (shared by every later snapshot).
    pub over_budget: Arc<AtomicU64>,
    /// Evaluation counters of every feature (shared by every later snapshot).
    pub usage: Arc<UsageBook>,
    /// The evaluations metric's handles (shared by every later snapshot).
    pub counters: Arc<EvaluationCounters>,
}

/// The evaluations metric, one handle per reason, registered at the first decision (after
/// the process has installed its metrics recorder, whenever the snapshot was built): a
/// decision increments a handle (no metric key built, no registry lookup, no allocation).
#[derive(Debug, Default)]
pub struct EvaluationCounters(OnceLock<CounterHandles>);

#[derive(Debug)]
struct CounterHandles {
    by_reason: [metrics::Counter; Reason::ALL.len()],
    not_found: metrics::Counter,
}

impl EvaluationCounters {
    fn handles(&self) -> &CounterHandles {
        self.0.get_or_init(|| {
            use crate::telemetry::EVALUATIONS;
            CounterHandles {
                by_reason: Reason::ALL
                    .map(|r| metrics::counter!(EVALUATIONS, "reason" => r.name())),
                not_found: metrics::counter!(EVALUATIONS, "reason" => "FEATURE_NOT_FOUND"),
            }
        })
    }
}

/// Which features a change may affect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every feature (start, resync).
    All,
    /// These feature keys.
    Keys(BTreeSet<String>),
}

impl Scope {
    fn contains(&self, key: &str) -> bool {
        match self {
            Self::All => true,
            Self::Keys(keys) => keys.contains(key),
        }
    }
}

/// A decision borrowing its variant and value from the snapshot: deciding allocates
/// nothing (a test counts the allocations).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecisionRef<'a> {
    /// Whether the feature is visible.
    pub visible: bool,
    /// The variant served.
    pub variant: &'a str,
    /// Its value.
    pub value: &'a Value,
    /// Why.
    pub reason: Reason,
    /// The deciding release.
    pub release: Option<i64>,
}

impl DecisionRef<'_> {
    /// The decision with its own copies of the variant and the value.
    pub fn to_decision(&self) -> Decision {
        Decision {
            visible: self.visible,
            variant: self.variant.to_owned(),
            value: self.value.clone(),
            reason: self.reason,
            release: self.release,
        }
    }
}

/// A decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Whether the feature is visible.
    pub visible: bool,
    /// The variant served.
    pub variant: String,
    /// Its value.
    pub value: Value,
    /// Why.
    pub reason: Reason,
    /// The deciding release.
    pub release: Option<i64>,
}

/// Who and where.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Environment id.
    pub environment: String,
    /// Targeting key.
    pub targeting_key: String,
    /// Attributes.
    pub attributes: Map<String, Value>,
}

impl Snapshot {
    /// Builds a snapshot from the features, the releases and the placements.
    pub fn build(
        version: u64,
        features: &BTreeMap<String, Arc<Feature>>,
        releases: &BTreeMap<i64, Release>,
        placements: &PlacementIndex,
    ) -> Self {
        Self::default().update(version, &Scope::All, features, releases, placements)
    }

    /// The next snapshot: equal to a full [`Snapshot::build`], but recomputing only the
    /// features in `scope` (the rest are shared with `self`).
    pub fn update(
        &self,
        version: u64,
        scope: &Scope,
        features: &BTreeMap<String, Arc<Feature>>,
        releases: &BTreeMap<i64, Release>,
        placements: &PlacementIndex,
    ) -> Self {
        let governing = self.governing_releases(scope, releases);
        let view = placements.coverage_view();
        let mut environments = self.environments.clone();
        let mut entry_for = |f: &Arc<Feature>| {
            let candidates = governing.get(f.key.as_str()).map(Vec::as_slice);
            self.entry(f, candidates, &view, &mut environments)
        };
        let (entries, keys) = match scope {
            Scope::All => all_entries(features, &mut entry_for),
            Scope::Keys(changed) => self.changed_entries(changed, features, &mut entry_for),
        };
        Self {
            version,
            features: entries,
            keys,
            environments,
            bucketing: self.bucketing,
            over_budget: self.over_budget.clone(),
            usage: self.usage.clone(),
            counters: self.counters.clone(),
        }
    }

    /// The governing release of (feature, environment) for features in `scope`: the active
    /// release with the highest rollout there (the newest on a tie). The usage book learns
    /// every environment an active release names.
    fn governing_releases<'a>(
        &self,
        scope: &Scope,
        releases: &'a BTreeMap<i64, Release>,
    ) -> Candidates<'a> {
        let mut governing: Candidates<'a> = HashMap::new();
        for r in releases.values().filter(|r| r.state.is_active()) {
            for env in &r.environments {
                self.usage.learn_environment(&env.environment);
            }
            for key in r.features.iter().filter(|k| scope.contains(k)) {
                let envs = governing.entry(key.as_str()).or_default();
                for env in &r.environments {
                    let candidate = (env.environment.as_str(), r.id, env.rollout_percent);
                    match envs.iter_mut().find(|(e, _, _)| *e == candidate.0) {
                        None => envs.push(candidate),
                        Some(slot) => {
                            if candidate.2 > slot.2
                                || (candidate.2 == slot.2 && candidate.1 > slot.1)
                            {
                                *slot = candidate;
                            }
                        }
                    }
                }
            }
        }
        governing
    }

    /// The entry of feature `f`, governed by `candidates` (environment, release, rollout),
    /// with its gate in each of those environments (`environments` learns the new names).
    fn entry(
        &self,
        f: &Arc<Feature>,
        candidates: Option<&[(&str, i64, f64)]>,
        view: &CoverageView<'_>,
        environments: &mut Arc<Environments>,
    ) -> Arc<FeatureEntry> {
        let governing: Box<[Governing]> = candidates
            .map(|envs| {
                envs.iter()
                    .map(|(env, release, rollout_percent)| Governing {
                        release: *release,
                        rollout_percent: *rollout_percent,
                        rollout_points: basis_points(*rollout_percent) as u16,
                        environment: match environments.id(env) {
                            Some(id) => id,
                            None => Arc::make_mut(environments).intern(env),
                        },
                        deployed: view.gate(env, &f.carriers).is_ok(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Arc::new(FeatureEntry {
            feature: f.clone(),
            environments: governing,
            usage: self.usage.feature(&f.key),
        })
    }

    /// `self`'s entries with those of the `changed` keys recomputed (or taken out, for a
    /// feature gone or archived), and the key list to match.
    fn changed_entries(
        &self,
        changed: &BTreeSet<String>,
        features: &BTreeMap<String, Arc<Feature>>,
        entry_for: &mut impl FnMut(&Arc<Feature>) -> Arc<FeatureEntry>,
    ) -> (FeatureMap, Arc<Vec<Arc<str>>>) {
        let mut entries = self.features.clone();
        let mut key_set_changed = false;
        for key in changed {
            match features.get(key).filter(|f| f.archived_ms.is_none()) {
                Some(f) => {
                    key_set_changed |= !entries.contains_key(key.as_str());
                    entries.insert(Arc::from(key.as_str()), entry_for(f));
                }
                None => key_set_changed |= entries.remove(key.as_str()).is_some(),
            }
        }
        let keys = if key_set_changed {
            Arc::new(self.keys_after(changed, &entries))
        } else {
            self.keys.clone()
        };
        (entries, keys)
    }

    /// The previous key list with the `changed` keys put in or taken out as `entries` has
    /// them, sharing the map's copies of the keys (not a new copy of every key per write).
    fn keys_after(&self, changed: &BTreeSet<String>, entries: &FeatureMap) -> Vec<Arc<str>> {
        let mut keys: Vec<Arc<str>> = self.keys.as_ref().clone();
        for key in changed {
            let live = entries.get_key_value(key.as_str()).map(|(k, _)| k.clone());
            match (
                keys.binary_search_by(|k| k.as_ref().cmp(key.as_str())),
                live,
            ) {
                (Err(i), Some(k)) => keys.insert(i, k),
                (Ok(i), None) => {
                    keys.remove(i);
                }
                _ => {}
            }
        }
        keys
    }

    /// The keys a comparison with `next` must look at.
    fn keys_in<'a>(&'a self, next: &'a Snapshot, scope: &'a Scope) -> Vec<&'a str> {
        match scope {
            Scope::All => {
                let mut keys: BTreeSet<&str> = self.features.keys().map(AsRef::as_ref).collect();
                keys.extend(next.features.keys().map(AsRef::as_ref));
                keys.into_iter().collect()
            }
            Scope::Keys(keys) => keys.iter().map(String::as_str).collect(),
        }
    }

    /// The (feature, environment) pairs in `scope` whose gate is open here and closed in
    /// `next`.
    pub fn withdrawn_in(&self, next: &Snapshot, scope: &Scope) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for key in self.keys_in(next, scope) {
            let Some(entry) = self.features.get(key) else {
                continue;
            };
            for g in &entry.environments {
                let env = self.environments.name(g.environment);
                let closed = g.deployed && next.governing(key, env).is_some_and(|g| !g.deployed);
                if closed {
                    out.push((key.to_owned(), env.to_owned()));
                }
            }
        }
        out
    }

    /// The (feature, environment) pairs in `scope` whose governing state differs between
    /// the two snapshots (feature definition, release, rollout or gate).
    pub fn changed_in<'a>(&'a self, next: &'a Snapshot, scope: &'a Scope) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for key in self.keys_in(next, scope) {
            let before = self.features.get(key);
            let after = next.features.get(key);
            let feature_changed = match (before, after) {
                (Some(a), Some(b)) => !Arc::ptr_eq(&a.feature, &b.feature),
                _ => true,
            };
            let names = |snapshot: &'a Snapshot, entry: Option<&'a Arc<FeatureEntry>>| {
                entry
                    .into_iter()
                    .flat_map(|e| e.environments.iter())
                    .map(move |g| snapshot.environments.name(g.environment))
            };
            let mut envs: Vec<&str> = names(self, before).chain(names(next, after)).collect();
            envs.sort_unstable();
            envs.dedup();
            for env in envs {
                // Compared without the environment's id (two snapshots built apart may
                // number the same name differently).
                let state = |g: &Governing| (g.release, g.rollout_percent, g.deployed);
                let was = self.governing(key, env).map(state);
                let is = next.governing(key, env).map(state);
                if feature_changed || was != is {
                    out.push((key.to_owned(), env.to_owned()));
                }
            }
        }
        out
    }

    /// The release governing `key` in `environment`, if any.
    pub fn governing(&self, key: &str, environment: &str) -> Option<&Governing> {
        let id = self.environments.id(environment)?;
        self.features.get(key)?.governing(id)
    }

    /// Decides one feature for one context; `None` for an unknown feature.
    pub fn evaluate(&self, key: &str, ctx: &Context) -> Option<Decision> {
        self.decide(key, ctx).map(|d| d.to_decision())
    }

    /// The decision for `key` in `ctx`, borrowed from the snapshot, counted in the
    /// evaluations metric and the feature's usage; `None` when the feature is unknown.
    pub fn decide<'a>(&'a self, key: &str, ctx: &Context) -> Option<DecisionRef<'a>> {
        let Some(entry) = self.features.get(key) else {
            self.counters.handles().not_found.increment(1);
            return None;
        };
        let decision = decide(entry, key, ctx, self);
        self.counters.handles().by_reason[decision.reason as usize].increment(1);
        // Counted under its environment where a release governs the feature (or has named
        // the environment), else under OTHER_ENVIRONMENT: callers choose the name.
        let environment = match decision.reason {
            Reason::NotReleased | Reason::Disabled => self.usage.environment_name(&ctx.environment),
            _ => &ctx.environment,
        };
        entry.usage.record(environment, decision.variant, 1);
        Some(decision)
    }
}

fn variant_value<'a>(f: &'a Feature, variant: &str) -> &'a Value {
    named_variant(f, variant).map_or(&super::rules::NULL, |(_, v)| v)
}

/// The variant `name` of `f` and its value: a feature's few variants scanned in place.
#[inline]
fn named_variant<'a>(f: &'a Feature, name: &str) -> Option<(&'a str, &'a Value)> {
    if f.variants.len() > 8 {
        return f.variants.get_key_value(name).map(|(k, v)| (k.as_str(), v));
    }
    f.variants
        .iter()
        .find(|(k, _)| same(k, name))
        .map(|(k, v)| (k.as_str(), v))
}

fn hidden(f: &Feature, reason: Reason, release: Option<i64>) -> DecisionRef<'_> {
    DecisionRef {
        visible: false,
        variant: &f.off_variant,
        value: variant_value(f, &f.off_variant),
        reason,
        release,
    }
}

fn served<'a>(f: &'a Feature, variant: &'a str, reason: Reason, release: i64) -> DecisionRef<'a> {
    picked(f, (variant, variant_value(f, variant)), reason, release)
}

/// A variant the rule picked, with its value (found together, one lookup).
fn picked<'a>(
    f: &'a Feature,
    (variant, value): (&'a str, &'a Value),
    reason: Reason,
    release: i64,
) -> DecisionRef<'a> {
    DecisionRef {
        visible: !same(variant, &f.off_variant),
        value,
        variant,
        reason,
        release: Some(release),
    }
}

/// The variant the targeting rule picks and its value, if it names one of the feature's
/// variants (none when the rule runs out of budget: counted, and the feature serves its
/// default).
fn rule_variant<'a>(
    f: &'a Feature,
    key: &str,
    ctx: &Context,
    snapshot: &Snapshot,
) -> Option<(&'a str, &'a Value)> {
    let rule = f.targeting.as_ref()?;
    let data = Data {
        attributes: &ctx.attributes,
        targeting_key: &ctx.targeting_key,
        flag_key: key,
        bucketing: snapshot.bucketing,
    };
    let Ok(picked) = rule.evaluate(&data) else {
        snapshot.over_budget.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::RULE_BUDGET_EXCEEDED).increment(1);
        tracing::debug!(feature = %key, "targeting rule over its evaluation budget; serving the default");
        return None;
    };
    match picked.as_ref() {
        Value::String(v) => named_variant(f, v),
        // flagd names the variant by the result's text ("true"); "on"/"off" are ours.
        Value::Bool(b) => {
            let named = if *b { ["true", "on"] } else { ["false", "off"] };
            named.into_iter().find_map(|n| named_variant(f, n))
        }
        _ => None,
    }
}

fn decide<'a>(
    entry: &'a FeatureEntry,
    key: &str,
    ctx: &Context,
    snapshot: &Snapshot,
) -> DecisionRef<'a> {
    let f = &entry.feature;
    if f.disabled {
        return hidden(f, Reason::Disabled, None);
    }
    // By name through the entry's few environments: cheaper than hashing the name first.
    let names = &snapshot.environments;
    let Some(g) = entry
        .environments
        .iter()
        .find(|g| same(names.name(g.environment), &ctx.environment))
    else {
        return hidden(f, Reason::NotReleased, None);
    };
    if !g.deployed {
        return hidden(f, Reason::NotDeployed, Some(g.release));
    }
    let tk = ctx.targeting_key.as_str();
    if !tk.is_empty() && f.deny.iter().any(|d| d == tk) {
        return hidden(f, Reason::TargetingMatch, Some(g.release));
    }
    if !tk.is_empty() && f.allow.iter().any(|a| a == tk) {
        return match rule_variant(f, key, ctx, snapshot) {
            Some(v) => picked(f, v, Reason::TargetingMatch, g.release),
            None => served(f, &f.default_variant, Reason::TargetingMatch, g.release),
        };
    }
    if g.rollout_percent < 100.0 {
        let points = u32::from(g.rollout_points);
        if !in_rollout_points(snapshot.bucketing, key, tk, points) {
            return hidden(f, Reason::Split, Some(g.release));
        }
        return match rule_variant(f, key, ctx, snapshot) {
            Some(v) => picked(f, v, Reason::TargetingMatch, g.release),
            None => served(f, &f.default_variant, Reason::Split, g.release),
        };
    }
    match rule_variant(f, key, ctx, snapshot) {
        Some(v) => picked(f, v, Reason::TargetingMatch, g.release),
        None if f.targeting.is_some()
            || !f.allow.is_empty()
            || !f.deny.is_empty()
            || f.default_variant.is_empty() =>
        {
            served(f, &f.default_variant, Reason::Default, g.release)
        }
        None => served(f, &f.default_variant, Reason::Static, g.release),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::{Carrier, ReleaseEnvironment, ReleaseState};
    use crate::domain::placements::{Placement, PlacementState};
    use crate::domain::rules::Bucketing;
    use crate::domain::rules::Rule;
    use std::collections::BTreeSet;

    fn feature(key: &str) -> Feature {
        Feature {
            key: key.into(),
            description: String::new(),
            owner: String::new(),
            variants: Feature::boolean_variants(),
            default_variant: "on".into(),
            off_variant: "off".into(),
            targeting: None,
            allow: vec![],
            deny: vec![],
            carriers: vec![],
            disabled: false,
            metadata: Default::default(),
            revision: 1,
            create_ms: 0,
            update_ms: 0,
            archived_ms: None,
        }
    }

    fn release(id: i64, key: &str, env: &str, percent: f64, state: ReleaseState) -> Release {
        Release {
            id,
            description: String::new(),
            features: vec![key.into()],
            environments: vec![ReleaseEnvironment {
                environment: env.into(),
                rollout_percent: percent,
                ..ReleaseEnvironment::default()
            }],
            state,
            governance: Default::default(),
            revision: 1,
            create_ms: 0,
            update_ms: 0,
        }
    }

    fn ctx(env: &str, key: &str) -> Context {
        Context {
            environment: env.into(),
            targeting_key: key.into(),
            attributes: Map::new(),
        }
    }

    fn snapshot(
        features: Vec<Feature>,
        releases: Vec<Release>,
        placements: &PlacementIndex,
    ) -> Snapshot {
        let features = features
            .into_iter()
            .map(|f| (f.key.clone(), Arc::new(f)))
            .collect();
        let releases = releases.into_iter().map(|r| (r.id, r)).collect();
        Snapshot::build(1, &features, &releases, placements)
    }

    fn placed(idx: &mut PlacementIndex, env: &str, target: &str, version: &str, seq: u64) {
        idx.apply(Placement {
            deployment: 1,
            environment: env.into(),
            target: target.into(),
            artifact: "web".into(),
            version: version.into(),
            state: PlacementState::Placed,
            sequence: seq,
        });
    }

    #[test]
    fn decision_table() {
        let mut gated = feature("gated");
        gated.carriers = vec![Carrier {
            artifact: "web".into(),
            min_version: semver::Version::new(2, 0, 0),
            required_coverage: 1.0,
        }];
        let mut disabled = feature("disabled");
        disabled.disabled = true;
        let mut listed = feature("listed");
        listed.allow = vec!["vip".into()];
        listed.deny = vec!["blocked".into()];
        let mut ruled = feature("ruled");
        ruled.targeting =
            Rule::parse(r#"{"if": [{"ends_with": [{"var": "email"}, "@corp.com"]}, "on", null]}"#)
                .ok();
        let mut idx = PlacementIndex::default();
        placed(&mut idx, "staging", "s1", "2.1.0", 1);
        placed(&mut idx, "prod", "p1", "1.9.0", 2);
        let s = snapshot(
            vec![
                feature("plain"),
                gated,
                disabled,
                listed,
                ruled,
                feature("unreleased"),
                feature("paused"),
            ],
            vec![
                release(1, "plain", "prod", 100.0, ReleaseState::Released),
                release(2, "gated", "staging", 100.0, ReleaseState::Released),
                release(3, "gated", "prod", 100.0, ReleaseState::Released),
                release(4, "disabled", "prod", 100.0, ReleaseState::Released),
                release(5, "listed", "prod", 0.0, ReleaseState::Releasing),
                release(6, "ruled", "prod", 100.0, ReleaseState::Released),
                release(7, "paused", "prod", 100.0, ReleaseState::Paused),
                release(8, "unreleased", "prod", 100.0, ReleaseState::Draft),
            ],
            &idx,
        );
        let d = |key: &str, c: Context| {
            s.evaluate(key, &c)
                .unwrap_or_else(|| panic!("{key} unknown"))
        };
        assert!(s.evaluate("nope", &ctx("prod", "u")).is_none());
        assert_eq!(d("plain", ctx("prod", "u")).reason, Reason::Static);
        assert!(d("plain", ctx("prod", "u")).visible);
        assert_eq!(d("plain", ctx("staging", "u")).reason, Reason::NotReleased);
        assert_eq!(d("disabled", ctx("prod", "u")).reason, Reason::Disabled);
        assert_eq!(
            d("unreleased", ctx("prod", "u")).reason,
            Reason::NotReleased
        );
        assert_eq!(d("paused", ctx("prod", "u")).reason, Reason::NotReleased);
        // Deployed to staging at 2.1.0, prod still on 1.9.0.
        let g = d("gated", ctx("staging", "u"));
        assert!(g.visible && g.reason == Reason::Static && g.release == Some(2));
        let g = d("gated", ctx("prod", "u"));
        assert!(!g.visible && g.reason == Reason::NotDeployed && g.release == Some(3));
        assert_eq!(g.variant, "off");
        assert_eq!(g.value, Value::Bool(false));
        // At 0% only the allow list sees it; the deny list never does.
        let l = d("listed", ctx("prod", "vip"));
        assert!(l.visible && l.reason == Reason::TargetingMatch);
        let l = d("listed", ctx("prod", "someone"));
        assert!(!l.visible && l.reason == Reason::Split);
        let l = d("listed", ctx("prod", "blocked"));
        assert!(!l.visible && l.reason == Reason::TargetingMatch);
        // Rules.
        let mut corp = ctx("prod", "u1");
        corp.attributes
            .insert("email".into(), Value::String("ada@corp.com".into()));
        let r = d("ruled", corp);
        assert!(r.visible && r.reason == Reason::TargetingMatch);
        let r = d("ruled", ctx("prod", "u2"));
        assert!(r.visible && r.reason == Reason::Default);
    }

    #[test]
    fn an_over_budget_rule_serves_the_default_and_is_counted() {
        let mut f = feature("heavy");
        f.default_variant = "off".into();
        f.targeting = Rule::parse(&format!(
            r#"{{"if": [{{"cat": [{}]}}, "on", "off"]}}"#,
            vec![r#"{"var": "a"}"#; 1000].join(",")
        ))
        .ok();
        let s = snapshot(
            vec![f],
            vec![release(1, "heavy", "prod", 100.0, ReleaseState::Released)],
            &PlacementIndex::default(),
        );
        let mut c = ctx("prod", "u1");
        c.attributes.insert("a".into(), Value::String("x".into()));
        let d = s.evaluate("heavy", &c).unwrap();
        assert_eq!(
            (d.variant.as_str(), d.reason),
            ("on", Reason::TargetingMatch)
        );
        assert_eq!(s.over_budget.load(Ordering::Relaxed), 0);
        c.attributes
            .insert("a".into(), Value::String("x".repeat(50_000)));
        let d = s.evaluate("heavy", &c).unwrap();
        assert_eq!((d.variant.as_str(), d.reason), ("off", Reason::Default));
        assert_eq!(s.over_budget.load(Ordering::Relaxed), 1);
        // Later snapshots share the counter.
        let next = s.update(
            2,
            &Scope::All,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &PlacementIndex::default(),
        );
        assert_eq!(next.over_budget.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn rollout_percentages_are_monotone_per_key() {
        let idx = PlacementIndex::default();
        let mut seen_in = std::collections::HashSet::new();
        for p in [1.0, 10.0, 50.0, 100.0] {
            let s = snapshot(
                vec![feature("f")],
                vec![release(1, "f", "prod", p, ReleaseState::Releasing)],
                &idx,
            );
            let now: std::collections::HashSet<_> = (0..1000)
                .filter(|i| {
                    s.evaluate("f", &ctx("prod", &format!("user-{i}")))
                        .is_some_and(|d| d.visible)
                })
                .collect();
            assert!(seen_in.is_subset(&now), "a key left the rollout at {p}%");
            seen_in = now;
        }
        assert_eq!(seen_in.len(), 1000);
    }

    #[test]
    fn withdrawals_are_detected_between_snapshots() {
        let mut gated = feature("gated");
        gated.carriers = vec![Carrier {
            artifact: "web".into(),
            min_version: semver::Version::new(2, 0, 0),
            required_coverage: 1.0,
        }];
        let mut idx = PlacementIndex::default();
        placed(&mut idx, "prod", "p1", "2.0.0", 1);
        let rel = vec![release(1, "gated", "prod", 100.0, ReleaseState::Released)];
        let before = snapshot(vec![gated.clone()], rel.clone(), &idx);
        idx.apply(Placement {
            deployment: 1,
            environment: "prod".into(),
            target: "p1".into(),
            artifact: "web".into(),
            version: "2.0.0".into(),
            state: PlacementState::Removed,
            sequence: 2,
        });
        let after = snapshot(vec![gated], rel, &idx);
        let w = before.withdrawn_in(&after, &Scope::All);
        assert_eq!(w, [("gated".to_owned(), "prod".to_owned())]);
        assert!(after.withdrawn_in(&before, &Scope::All).is_empty());
    }

    // Long by design: one story of updates (a feature, a release, a placement removed),
    // each step compared with a full rebuild on the state the step left.
    #[test]
    fn incremental_updates_equal_a_full_rebuild() {
        let carrier = |artifact: &str| Carrier {
            artifact: artifact.into(),
            min_version: semver::Version::new(2, 0, 0),
            required_coverage: 1.0,
        };
        let mut features: BTreeMap<String, Arc<Feature>> = BTreeMap::new();
        for (key, artifact) in [("a", "web"), ("b", "api"), ("c", "web")] {
            let mut f = feature(key);
            f.carriers = vec![carrier(artifact)];
            features.insert(key.into(), Arc::new(f));
        }
        let mut releases: BTreeMap<i64, Release> = BTreeMap::new();
        releases.insert(1, release(1, "a", "prod", 100.0, ReleaseState::Released));
        releases.insert(2, release(2, "b", "prod", 20.0, ReleaseState::Releasing));
        let mut idx = PlacementIndex::default();
        placed(&mut idx, "prod", "p1", "2.0.0", 1);
        let mut snap = Snapshot::build(1, &features, &releases, &idx);
        let same = |s: &Snapshot,
                    features: &BTreeMap<String, Arc<Feature>>,
                    releases: &BTreeMap<i64, Release>,
                    idx: &PlacementIndex| {
            let full = Snapshot::build(0, features, releases, idx);
            assert_eq!(s.keys, full.keys);
            for key in features.keys() {
                for user in ["u1", "u2", "u3", "u4"] {
                    assert_eq!(
                        s.evaluate(key, &ctx("prod", user)),
                        full.evaluate(key, &ctx("prod", user)),
                        "{key} {user}"
                    );
                }
            }
        };
        // A new feature.
        let mut d = feature("d");
        d.carriers = vec![carrier("api")];
        features.insert("d".into(), Arc::new(d));
        snap = snap.update(
            2,
            &Scope::Keys(BTreeSet::from(["d".to_owned()])),
            &features,
            &releases,
            &idx,
        );
        same(&snap, &features, &releases, &idx);
        // A release of c and d.
        let mut r = release(3, "c", "prod", 100.0, ReleaseState::Released);
        r.features.push("d".into());
        let scope = Scope::Keys(r.features.iter().cloned().collect());
        releases.insert(3, r);
        snap = snap.update(3, &scope, &features, &releases, &idx);
        same(&snap, &features, &releases, &idx);
        // The web artifact is removed: only web-carried features are recomputed.
        let before = snap.clone();
        idx.apply(Placement {
            deployment: 1,
            environment: "prod".into(),
            target: "p1".into(),
            artifact: "web".into(),
            version: "2.0.0".into(),
            state: PlacementState::Removed,
            sequence: 2,
        });
        let scope = Scope::Keys(BTreeSet::from(["a".to_owned(), "c".to_owned()]));
        snap = snap.update(4, &scope, &features, &releases, &idx);
        same(&snap, &features, &releases, &idx);
        let mut withdrawn = before.withdrawn_in(&snap, &scope);
        withdrawn.sort();
        assert_eq!(
            withdrawn,
            [
                ("a".to_owned(), "prod".to_owned()),
                ("c".to_owned(), "prod".to_owned())
            ]
        );
        assert!(
            Arc::ptr_eq(&before.features["b"], &snap.features["b"]),
            "untouched entries are shared"
        );
    }

    /// What an in-process flagd provider does with a flag of a rendered document: the
    /// targeting's result names the variant (`null`: the default variant).
    fn in_process(flag: &Value, key: &str, c: &Context, bucketing: Bucketing) -> (String, Value) {
        let mut variant = flag["defaultVariant"].clone();
        if let Some(t) = flag.get("targeting") {
            let rule = crate::domain::rules::Rule::parse(&t.to_string()).unwrap();
            let data = Data {
                attributes: &c.attributes,
                targeting_key: &c.targeting_key,
                flag_key: key,
                bucketing,
            };
            let picked = rule.evaluate(&data).unwrap().into_owned();
            if !picked.is_null() {
                variant = picked;
            }
        }
        let name = variant.as_str().unwrap_or_default().to_owned();
        let value = flag["variants"].get(&name).cloned().unwrap_or(Value::Null);
        (name, value)
    }

    // Long by design: one table of feature shapes, each rendered and decided both ways.
    #[test]
    fn rendered_decisions_decide_as_evaluate() {
        use crate::domain::rules::Rule;
        let gate = Carrier {
            artifact: "web".into(),
            min_version: semver::Version::new(2, 0, 0),
            required_coverage: 1.0,
        };
        let mut features = Vec::new();
        let mut releases = Vec::new();
        let percents = [0.0, 0.01, 1.0, 33.33, 50.0, 99.99, 100.0];
        for (i, percent) in percents.iter().enumerate() {
            for shape in 0..6 {
                let key = format!("f{i}-{shape}");
                let mut f = feature(&key);
                f.variants
                    .make_mut()
                    .insert("blue".into(), Value::String("blue".into()));
                match shape {
                    1 => f.allow = vec!["u1".into(), "u7".into()],
                    2 => f.deny = vec!["u2".into(), "u3".into()],
                    3 => {
                        f.targeting = Some(
                            Rule::parse(r#"{"if": [{"ends_with": [{"var": "email"}, "@corp.com"]}, "blue", null]}"#)
                                .unwrap(),
                        );
                        f.allow = vec!["u5".into()];
                    }
                    4 => {
                        f.targeting = Some(Rule::parse(r#"{">": [{"var": "age"}, 30]}"#).unwrap());
                    }
                    5 => {
                        f.targeting = Some(
                            Rule::parse(r#"{"fractional": [["blue", 1], ["on", 1], ["nope", 1]]}"#)
                                .unwrap(),
                        );
                        f.default_variant = "blue".into();
                    }
                    _ => {}
                }
                features.push(f);
                releases.push(release(
                    (i * 10 + shape) as i64 + 1,
                    &key,
                    "prod",
                    *percent,
                    ReleaseState::Releasing,
                ));
            }
        }
        let mut gated = feature("gated");
        gated.carriers = vec![gate];
        let mut disabled = feature("disabled");
        disabled.disabled = true;
        features.extend([gated, disabled, feature("unreleased")]);
        releases.push(release(900, "gated", "prod", 100.0, ReleaseState::Released));
        releases.push(release(
            901,
            "disabled",
            "prod",
            100.0,
            ReleaseState::Released,
        ));
        let mut idx = PlacementIndex::default();
        placed(&mut idx, "prod", "t1", "1.0.0", 1);
        let mut snap = snapshot(features, releases, &idx);
        for bucketing in [Bucketing::V1, Bucketing::V2, Bucketing::V3] {
            snap.bucketing = bucketing;
            let doc = crate::domain::flagd_doc::render_decisions(&snap, "prod");
            let mut outcomes = BTreeSet::new();
            for key in snap.keys.iter() {
                let flag = &doc["flags"][key.as_ref()];
                for u in 0..300 {
                    let mut c = ctx("prod", &format!("u{u}"));
                    if u % 50 == 0 {
                        c.targeting_key.clear();
                    }
                    c.attributes.insert("age".into(), Value::from(u % 60));
                    if u % 3 == 0 {
                        c.attributes
                            .insert("email".into(), Value::from(format!("u{u}@corp.com")));
                    }
                    let want = snap.evaluate(key, &c).unwrap();
                    let got = in_process(flag, key, &c, bucketing);
                    assert_eq!(
                        got,
                        (want.variant.clone(), want.value.clone()),
                        "{bucketing:?} {key} for {c:?}: {flag}"
                    );
                    outcomes.insert((key.to_string(), want.variant));
                }
            }
            // The data set reaches both answers of every partial rollout.
            assert!(outcomes.contains(&("f3-0".into(), "on".into())));
            assert!(outcomes.contains(&("f3-0".into(), "off".into())));
            assert_eq!(doc["flags"]["gated"]["defaultVariant"], "off");
            assert!(
                doc["flags"]["f6-0"].get("targeting").is_none(),
                "100% is static"
            );
        }
    }
}
