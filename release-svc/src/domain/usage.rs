//! Evaluation usage: how often each feature was evaluated, per environment and variant, so
//! stale flags can be found (released everywhere for months, or no longer evaluated).
//!
//! # Cost on the hot path
//!
//! Every decision adds one to a counter: a search of the feature's first eight
//! (environment, variant) slots, each set once and read without a lock, and a relaxed
//! atomic add. A slot is set under a lock only the first time a pair is seen; a feature
//! with more pairs keeps the rest behind that lock. Counters live here until the flusher takes them (swapping each to zero)
//! and writes them to the store by the hour.
//!
//! # Bounds
//!
//! Environment names come from callers, so they are counted under their own name only
//! where a release names the feature's environment (the decision was not NOT_RELEASED) or
//! where any release has named that environment ([`UsageBook::learn_environment`]); every
//! other environment is counted under [`OTHER_ENVIRONMENT`]. A feature keeps at most
//! [`MAX_SLOTS`] slots; evaluations past them are counted only in
//! `release_svc_usage_untracked_total`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;

use super::text::same;

/// The environment evaluations are counted under when no release names theirs.
pub const OTHER_ENVIRONMENT: &str = "*";

/// The most (environment, variant) slots one feature keeps.
pub const MAX_SLOTS: usize = 256;

/// Counts read from a feature's slots: (environment, variant, count).
type Counts = Vec<(Arc<str>, Arc<str>, u64)>;

/// The slots a feature holds inline (searched without a lock): a feature evaluated in a
/// few environments with two or three variants fits.
const INLINE: usize = 8;

/// One (environment, variant) counter.
#[derive(Debug)]
struct Slot {
    environment: Arc<str>,
    variant: Arc<str>,
    count: AtomicU64,
}

impl Slot {
    fn new(environment: &str, variant: &str, n: u64) -> Self {
        Self {
            environment: Arc::from(environment),
            variant: Arc::from(variant),
            count: AtomicU64::new(n),
        }
    }

    #[inline]
    fn is(&self, environment: &str, variant: &str) -> bool {
        same(&self.environment, environment) && same(&self.variant, variant)
    }
}

/// One feature's counters since the last flush, allocated at its first evaluation (a
/// feature never evaluated costs one pointer, not the 400 bytes of its slots).
#[derive(Debug, Default)]
pub struct FeatureUsage {
    block: OnceLock<Box<Block>>,
}

/// [`INLINE`] slots set once each and read without a lock, then more (up to
/// [`MAX_SLOTS`]) behind a lock.
#[derive(Debug, Default)]
struct Block {
    inline: [OnceLock<Slot>; INLINE],
    more: Mutex<Vec<Slot>>,
}

impl FeatureUsage {
    /// Counts `n` evaluations that served `variant` in `environment`.
    #[inline]
    pub fn record(&self, environment: &str, variant: &str, n: u64) {
        self.block
            .get_or_init(Box::default)
            .record(environment, variant, n);
    }

    /// The counts since the last flush, each reset to zero.
    fn take(&self) -> Counts {
        self.block
            .get()
            .map_or_else(Vec::new, |b| b.read(|c| c.swap(0, Ordering::Relaxed)))
    }

    /// The counts since the last flush, left in place.
    fn peek(&self) -> Counts {
        self.block
            .get()
            .map_or_else(Vec::new, |b| b.read(|c| c.load(Ordering::Relaxed)))
    }
}

impl Block {
    #[inline]
    fn record(&self, environment: &str, variant: &str, n: u64) {
        for slot in &self.inline {
            match slot.get() {
                Some(s) if s.is(environment, variant) => {
                    s.count.fetch_add(n, Ordering::Relaxed);
                    return;
                }
                Some(_) => {}
                None => break,
            }
        }
        self.add(environment, variant, n);
    }

    #[cold]
    fn add(&self, environment: &str, variant: &str, n: u64) {
        let mut more = self.more.lock().unwrap_or_else(|p| p.into_inner());
        // Under the lock: a slot set meanwhile is found, an empty one is taken once.
        for slot in &self.inline {
            let s = slot.get_or_init(|| Slot::new(environment, variant, 0));
            if s.is(environment, variant) {
                s.count.fetch_add(n, Ordering::Relaxed);
                return;
            }
        }
        if let Some(s) = more.iter().find(|s| s.is(environment, variant)) {
            s.count.fetch_add(n, Ordering::Relaxed);
        } else if INLINE + more.len() < MAX_SLOTS {
            more.push(Slot::new(environment, variant, n));
        } else {
            metrics::counter!(crate::telemetry::USAGE_UNTRACKED).increment(n);
        }
    }

    /// The counts since the last flush, read by `read` (which may reset them).
    fn read(&self, read: impl Fn(&AtomicU64) -> u64) -> Counts {
        let more = self.more.lock().unwrap_or_else(|p| p.into_inner());
        self.inline
            .iter()
            .filter_map(OnceLock::get)
            .chain(more.iter())
            .filter_map(|s| {
                let n = read(&s.count);
                (n > 0).then(|| (s.environment.clone(), s.variant.clone(), n))
            })
            .collect()
    }
}

/// Counts not yet flushed, for one feature, environment and variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Feature key.
    pub feature: String,
    /// Environment ([`OTHER_ENVIRONMENT`] for environments no release names).
    pub environment: String,
    /// Variant served.
    pub variant: String,
    /// Evaluations.
    pub count: u64,
}

/// Every feature's counters, shared by every snapshot version (a feature keeps its
/// counters when its snapshot entry is rebuilt, archived or restored).
#[derive(Debug, Default)]
pub struct UsageBook {
    features: Mutex<HashMap<Arc<str>, Arc<FeatureUsage>>>,
    environments: ArcSwap<HashSet<Arc<str>>>,
}

impl UsageBook {
    /// The counters of `feature` (created on first use).
    pub fn feature(&self, feature: &str) -> Arc<FeatureUsage> {
        let mut features = self.features.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = features.get(feature) {
            return u.clone();
        }
        let u = Arc::new(FeatureUsage::default());
        features.insert(Arc::from(feature), u.clone());
        u
    }

    /// Remembers that a release named `environment`: evaluations there are counted under
    /// its name from now on (environments are only ever added; their number is bounded by
    /// what release writers created).
    pub fn learn_environment(&self, environment: &str) {
        if self.environments.load().contains(environment) {
            return;
        }
        self.environments.rcu(|known| {
            let mut next = HashSet::clone(known);
            next.insert(Arc::from(environment));
            next
        });
    }

    /// The name evaluations in `environment` are counted under, when no release governs
    /// the feature there.
    #[inline]
    pub fn environment_name<'a>(&self, environment: &'a str) -> &'a str {
        if self.environments.load().contains(environment) {
            environment
        } else {
            OTHER_ENVIRONMENT
        }
    }

    /// Takes every count since the last flush (each counter back to zero).
    pub fn take(&self) -> Vec<Pending> {
        self.collect(None, FeatureUsage::take)
    }

    /// The counts since the last flush of `feature` (else of every feature), left in place.
    pub fn peek(&self, feature: Option<&str>) -> Vec<Pending> {
        self.collect(feature, FeatureUsage::peek)
    }

    /// Puts counts back (a flush that failed: they go with the next one).
    pub fn restore(&self, pending: Vec<Pending>) {
        for p in pending {
            self.feature(&p.feature)
                .record(&p.environment, &p.variant, p.count);
        }
    }

    fn collect(&self, feature: Option<&str>, read: fn(&FeatureUsage) -> Counts) -> Vec<Pending> {
        let features: Vec<(Arc<str>, Arc<FeatureUsage>)> = {
            let all = self.features.lock().unwrap_or_else(|p| p.into_inner());
            all.iter()
                .filter(|(k, _)| feature.is_none_or(|f| f == &***k))
                .map(|(k, u)| (k.clone(), u.clone()))
                .collect()
        };
        features
            .into_iter()
            .flat_map(|(key, usage)| {
                read(&usage)
                    .into_iter()
                    .map(move |(environment, variant, count)| Pending {
                        feature: key.to_string(),
                        environment: environment.to_string(),
                        variant: variant.to_string(),
                        count,
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_taken_once_and_restored_after_a_failed_flush() {
        let book = UsageBook::default();
        let a = book.feature("a");
        a.record("prod", "on", 1);
        a.record("prod", "on", 1);
        a.record("prod", "off", 1);
        book.feature("b").record("*", "off", 3);
        let mut taken = book.take();
        taken.sort_by(|x, y| (&x.feature, &x.variant).cmp(&(&y.feature, &y.variant)));
        let counts: Vec<(&str, &str, u64)> = taken
            .iter()
            .map(|p| (p.feature.as_str(), p.variant.as_str(), p.count))
            .collect();
        assert_eq!(counts, [("a", "off", 1), ("a", "on", 2), ("b", "off", 3)]);
        assert!(book.take().is_empty(), "taken counts are reset");
        book.restore(taken.clone());
        a.record("prod", "on", 1);
        let on: u64 = book
            .peek(Some("a"))
            .iter()
            .filter(|p| p.variant == "on")
            .map(|p| p.count)
            .sum();
        assert_eq!(on, 3);
    }

    #[test]
    fn slots_per_feature_are_bounded() {
        let usage = FeatureUsage::default();
        for i in 0..(MAX_SLOTS + 50) {
            usage.record(&format!("env-{i}"), "on", 1);
        }
        assert_eq!(usage.peek().len(), MAX_SLOTS);
    }

    #[test]
    fn unknown_environments_are_counted_together() {
        let book = UsageBook::default();
        assert_eq!(book.environment_name("prod"), OTHER_ENVIRONMENT);
        book.learn_environment("prod");
        assert_eq!(book.environment_name("prod"), "prod");
        assert_eq!(book.environment_name("made-up"), OTHER_ENVIRONMENT);
    }
}
