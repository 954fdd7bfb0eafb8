//! Evaluation usage and stale features: the counters of [`crate::domain::usage`] flushed
//! to the store by the hour, read back per feature (last 24 hours, last 7 days, last
//! evaluation per environment), and the stale view built on them.
//!
//! What a read sees: the flushed counts of every replica plus this replica's counts since
//! its last flush (another replica's unflushed counts arrive with its next flush).

use std::collections::{BTreeMap, HashMap};

use super::Engine;
use crate::domain::model::Millis;
use crate::domain::usage::Pending;
use crate::domain::Result;
use crate::store::UsageCount;

/// An hour, the unit counts are kept in.
pub const HOUR_MS: Millis = 3_600_000;
/// A day.
pub const DAY_MS: Millis = 24 * HOUR_MS;
/// Counts are kept this long (the longest window, 7 days, and a day of margin).
pub const KEPT_MS: Millis = 8 * DAY_MS;

/// One variant's evaluations in one environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VariantCount {
    /// The variant.
    pub variant: String,
    /// Over the last 24 hours (in whole hours: the current hour and the 23 before it).
    pub last_day: u64,
    /// Over the last 7 days (the current hour and the 167 before it).
    pub last_week: u64,
}

/// A feature's evaluations in one environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvironmentUsage {
    /// The environment (`*`: environments no release names).
    pub environment: String,
    /// When it was last evaluated here (to the flush interval; None: not since usage is
    /// kept).
    pub last_ms: Option<Millis>,
    /// Per variant, by name.
    pub variants: Vec<VariantCount>,
}

/// Why a feature is stale.
#[derive(Debug, Clone, PartialEq)]
pub struct Stale {
    /// The feature key.
    pub feature: String,
    /// When it was created.
    pub create_ms: Millis,
    /// When it was last evaluated anywhere (None: never since usage is kept).
    pub last_evaluated_ms: Option<Millis>,
    /// It has not been evaluated anywhere for the asked time.
    pub not_evaluated: bool,
    /// Environments where it has been at 100% for the asked time: (environment, release,
    /// since when).
    pub fully_released: Vec<(String, i64, Millis)>,
}

impl Engine {
    /// Writes the counts since the last flush to the store (put back if the write fails,
    /// to go with the next flush). Returns how many (feature, environment, variant) counts
    /// were written.
    pub async fn flush_usage(&self) -> Result<usize> {
        let book = self.snapshot.load().usage.clone();
        let pending = book.take();
        if pending.is_empty() {
            return Ok(0);
        }
        let now = self.clock.now_ms();
        let hour_ms = now - now.rem_euclid(HOUR_MS);
        let counts: Vec<UsageCount> = pending
            .iter()
            .map(|p| UsageCount {
                feature: p.feature.clone(),
                environment: p.environment.clone(),
                variant: p.variant.clone(),
                hour_ms,
                count: p.count,
            })
            .collect();
        let n = counts.len();
        match self.store.add_usage(counts, now, now - KEPT_MS).await {
            Ok(()) => {
                metrics::counter!(crate::telemetry::USAGE_FLUSHES, "outcome" => "ok").increment(1);
                Ok(n)
            }
            Err(e) => {
                metrics::counter!(crate::telemetry::USAGE_FLUSHES, "outcome" => "error")
                    .increment(1);
                book.restore(pending);
                Err(e)
            }
        }
    }

    /// `feature`'s evaluations per environment (NOT_FOUND for an unknown feature; an
    /// archived one keeps its history).
    pub async fn feature_usage(&self, feature: &str) -> Result<Vec<EnvironmentUsage>> {
        self.feature(feature).await?;
        let now = self.clock.now_ms();
        let hour_ms = now - now.rem_euclid(HOUR_MS);
        let day_from = hour_ms - 23 * HOUR_MS;
        let week_from = hour_ms - (7 * 24 - 1) * HOUR_MS;
        let (counts, seen) = self.store.usage(feature.to_owned(), week_from).await?;
        let pending = self.snapshot.load().usage.peek(Some(feature));
        let mut by_env: BTreeMap<String, (Option<Millis>, BTreeMap<String, VariantCount>)> =
            BTreeMap::new();
        let mut add = |environment: &str, variant: &str, hour: Millis, n: u64| {
            let (_, variants) = by_env.entry(environment.to_owned()).or_default();
            let v = variants
                .entry(variant.to_owned())
                .or_insert_with(|| VariantCount {
                    variant: variant.to_owned(),
                    ..VariantCount::default()
                });
            v.last_week += n;
            if hour >= day_from {
                v.last_day += n;
            }
        };
        for c in &counts {
            add(&c.environment, &c.variant, c.hour_ms, c.count);
        }
        for p in &pending {
            add(&p.environment, &p.variant, hour_ms, p.count);
        }
        for s in seen {
            let (last, _) = by_env.entry(s.environment).or_default();
            *last = (*last).max(Some(s.time_ms));
        }
        for p in &pending {
            if let Some((last, _)) = by_env.get_mut(&p.environment) {
                *last = Some(now);
            }
        }
        Ok(by_env
            .into_iter()
            .map(|(environment, (last_ms, variants))| EnvironmentUsage {
                environment,
                last_ms,
                variants: variants.into_values().collect(),
            })
            .collect())
    }

    /// The live features that are stale: at 100% somewhere for at least `released_for_ms`,
    /// or not evaluated anywhere for at least `unevaluated_for_ms` (a feature never
    /// evaluated counts from its creation). By key, after `after`, at most `limit + 1`.
    pub async fn stale_features(
        &self,
        released_for_ms: Millis,
        unevaluated_for_ms: Millis,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Stale>> {
        let mut last: HashMap<String, Millis> =
            self.store.last_evaluated().await?.into_iter().collect();
        let now = self.clock.now_ms();
        for Pending { feature, .. } in self.snapshot.load().usage.peek(None) {
            last.insert(feature, now);
        }
        let state = self.state.lock().await;
        let mut fully: HashMap<&str, Vec<(String, i64, Millis)>> = HashMap::new();
        for r in state.releases.values().filter(|r| r.state.is_active()) {
            for e in &r.environments {
                let Some(since) = e.full_since_ms.filter(|_| e.rollout_percent >= 100.0) else {
                    continue;
                };
                if now - since < released_for_ms {
                    continue;
                }
                for key in &r.features {
                    fully.entry(key.as_str()).or_default().push((
                        e.environment.clone(),
                        r.id,
                        since,
                    ));
                }
            }
        }
        Ok(state
            .features
            .values()
            .filter(|f| f.archived_ms.is_none())
            .filter(|f| after.is_none_or(|a| f.key.as_str() > a))
            .filter_map(|f| {
                let last_evaluated_ms = last.get(&f.key).copied();
                let not_evaluated =
                    now - last_evaluated_ms.unwrap_or(f.create_ms) >= unevaluated_for_ms;
                let mut fully_released = fully.remove(f.key.as_str()).unwrap_or_default();
                fully_released.sort();
                (not_evaluated || !fully_released.is_empty()).then(|| Stale {
                    feature: f.key.clone(),
                    create_ms: f.create_ms,
                    last_evaluated_ms,
                    not_evaluated,
                    fully_released,
                })
            })
            .take(limit + 1)
            .collect())
    }
}
