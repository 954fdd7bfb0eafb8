//! Deployment strategies: which of a deployment's targets are ordered to place now.
//!
//! - all-at-once: every target at once; any failure fails the deployment;
//! - rolling: batches of `batch_size` targets (or `batch_percent` of them, rounded up); the
//!   next batch is ordered when every ordered target has finished (PLACED, FAILED or
//!   REMOVED); more than `max_failures` failures fail the deployment and stop it;
//! - canary: `canary_targets` first; once they are all PLACED, the rest after an explicit
//!   ContinueDeployment or, if `bake_ms` is set, once the canaries have been placed that
//!   long; any failure fails the deployment.
//!
//! Targets are taken in a stable order (their ordinal in the deployment).

use super::clock::Millis;
use super::model::PlacementState;

/// How a deployment paces its targets.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Strategy {
    /// Every target at once.
    #[default]
    AllAtOnce,
    /// Batch by batch.
    Rolling {
        /// Targets per batch (0: use `batch_percent`).
        batch_size: u32,
        /// Percentage of the targets per batch, (0, 100] (when `batch_size` is 0).
        batch_percent: f64,
        /// Failures tolerated; one more fails the deployment.
        max_failures: u32,
    },
    /// A few first, then the rest.
    Canary {
        /// Targets placed first.
        canary_targets: u32,
        /// Place the rest this long after the canaries are placed (0: wait for
        /// ContinueDeployment).
        bake_ms: Millis,
    },
}

impl Strategy {
    /// Failures tolerated before the deployment fails.
    pub fn max_failures(&self) -> u64 {
        match self {
            Self::Rolling { max_failures, .. } => u64::from(*max_failures),
            _ => 0,
        }
    }

    /// Every problem with the strategy, as `(field, description)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match self {
            Self::AllAtOnce => {}
            Self::Rolling {
                batch_size,
                batch_percent,
                ..
            } => {
                if *batch_size == 0 && !(*batch_percent > 0.0 && *batch_percent <= 100.0) {
                    out.push((
                        "rolling",
                        "needs batch_size > 0 or batch_percent in (0, 100]".to_owned(),
                    ));
                }
            }
            Self::Canary {
                canary_targets,
                bake_ms,
            } => {
                if *canary_targets == 0 {
                    out.push(("canary.canary_targets", "must be at least 1".to_owned()));
                }
                if *bake_ms < 0 {
                    out.push(("canary.bake_time", "must not be negative".to_owned()));
                }
            }
        }
        out
    }
}

/// What pacing needs to know of one placement, in ordinal order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot {
    /// Its state.
    pub state: PlacementState,
    /// Ordered to place already.
    pub ordered: bool,
    /// Last change.
    pub update_ms: Millis,
}

fn finished(s: PlacementState) -> bool {
    matches!(
        s,
        PlacementState::Placed | PlacementState::Failed | PlacementState::Removed
    )
}

/// Targets per batch of a rolling deployment over `targets` targets (at least 1).
fn batch_len(batch_size: u32, batch_percent: f64, targets: usize) -> usize {
    if batch_size > 0 {
        batch_size as usize
    } else {
        ((targets as f64) * batch_percent / 100.0).ceil().max(1.0) as usize
    }
}

/// Where a deployment stands in its strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// All at once: every target is ordered.
    AllAtOnce,
    /// Rolling: a batch is ordered (the last one ordered is `Step::step`).
    RollingBatch,
    /// Canary: the canaries are ordered and not all PLACED yet.
    CanaryPlacing,
    /// Canary: the canaries are PLACED; the rest is ordered at `Step::continue_ms`.
    CanaryBaking,
    /// Canary: the canaries are PLACED; the rest waits for ContinueDeployment.
    CanaryWaiting,
    /// Canary: the rest of the targets is ordered.
    CanaryRest,
}

/// A deployment's position in its strategy, from its placements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The phase.
    pub phase: Phase,
    /// The step reached, from 1: the batch of a rolling deployment, 1 (canaries) or 2 (the
    /// rest) of a canary one, 1 for all at once.
    pub step: u32,
    /// How many steps the deployment has in all.
    pub step_count: u32,
    /// Targets ordered to place so far.
    pub ordered: u32,
    /// Targets PLACED.
    pub placed: u32,
    /// Targets FAILED.
    pub failed: u32,
    /// Targets of the deployment.
    pub targets: u32,
    /// A baking canary: when the rest is ordered.
    pub continue_ms: Option<Millis>,
}

/// Where a deployment with `slots` (in ordinal order) stands in `strategy`.
pub fn step(strategy: &Strategy, slots: &[Slot], continued: bool) -> Step {
    let count = |f: &dyn Fn(&Slot) -> bool| {
        u32::try_from(slots.iter().filter(|s| f(s)).count()).unwrap_or(u32::MAX)
    };
    let targets = u32::try_from(slots.len()).unwrap_or(u32::MAX);
    let ordered = count(&|s| s.ordered);
    let mut step = Step {
        phase: Phase::AllAtOnce,
        step: 1,
        step_count: 1,
        ordered,
        placed: count(&|s| s.state == PlacementState::Placed),
        failed: count(&|s| s.state == PlacementState::Failed),
        targets,
        continue_ms: None,
    };
    let steps = |n: u32, per: u32| n.div_ceil(per.max(1)).max(1);
    match strategy {
        Strategy::AllAtOnce => {}
        Strategy::Rolling {
            batch_size,
            batch_percent,
            ..
        } => {
            let per = u32::try_from(batch_len(*batch_size, *batch_percent, slots.len()))
                .unwrap_or(u32::MAX);
            step.phase = Phase::RollingBatch;
            step.step_count = steps(targets, per);
            step.step = steps(ordered, per).min(step.step_count);
        }
        Strategy::Canary {
            canary_targets,
            bake_ms,
        } => {
            let canaries = (*canary_targets).min(targets);
            step.step_count = if targets > canaries { 2 } else { 1 };
            let first: Vec<&Slot> = slots.iter().filter(|s| s.ordered).collect();
            if ordered > canaries {
                step.phase = Phase::CanaryRest;
                step.step = 2;
            } else if first.is_empty()
                || !first.iter().all(|s| s.state == PlacementState::Placed)
                || step.step_count == 1
            {
                step.phase = Phase::CanaryPlacing;
            } else if continued {
                // Continued, the rest about to be ordered.
                step.phase = Phase::CanaryRest;
                step.step = 2;
            } else if *bake_ms > 0 {
                step.phase = Phase::CanaryBaking;
                step.continue_ms = first
                    .iter()
                    .map(|s| s.update_ms)
                    .max()
                    .map(|placed| placed.saturating_add(*bake_ms));
            } else {
                step.phase = Phase::CanaryWaiting;
            }
        }
    }
    step
}

/// The indices of `slots` to order now (empty when nothing more may start).
pub fn pace(strategy: &Strategy, slots: &[Slot], continued: bool, now: Millis) -> Vec<usize> {
    let failed = slots
        .iter()
        .filter(|s| s.state == PlacementState::Failed)
        .count() as u64;
    if failed > strategy.max_failures() {
        return Vec::new();
    }
    let waiting: Vec<usize> = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.ordered)
        .map(|(i, _)| i)
        .collect();
    if waiting.is_empty() {
        return Vec::new();
    }
    let ordered: Vec<&Slot> = slots.iter().filter(|s| s.ordered).collect();
    match strategy {
        Strategy::AllAtOnce => waiting,
        Strategy::Rolling {
            batch_size,
            batch_percent,
            ..
        } => {
            if !ordered.iter().all(|s| finished(s.state)) {
                return Vec::new();
            }
            let n = batch_len(*batch_size, *batch_percent, slots.len());
            waiting.into_iter().take(n).collect()
        }
        Strategy::Canary {
            canary_targets,
            bake_ms,
        } => {
            if ordered.is_empty() {
                return waiting.into_iter().take(*canary_targets as usize).collect();
            }
            if !ordered.iter().all(|s| s.state == PlacementState::Placed) {
                return Vec::new();
            }
            let placed_at = ordered.iter().map(|s| s.update_ms).max().unwrap_or(now);
            if continued || (*bake_ms > 0 && now - placed_at >= *bake_ms) {
                waiting
            } else {
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PlacementState as P;

    fn slots(states: &[(P, bool)]) -> Vec<Slot> {
        states
            .iter()
            .map(|(state, ordered)| Slot {
                state: *state,
                ordered: *ordered,
                update_ms: 100,
            })
            .collect()
    }

    #[test]
    fn all_at_once_orders_everything() {
        let s = slots(&[(P::Pending, false); 4]);
        assert_eq!(pace(&Strategy::AllAtOnce, &s, false, 0), [0, 1, 2, 3]);
    }

    #[test]
    fn rolling_orders_batch_after_batch_and_stops_on_failures() {
        let r = Strategy::Rolling {
            batch_size: 2,
            batch_percent: 0.0,
            max_failures: 1,
        };
        let s = slots(&[(P::Pending, false); 5]);
        assert_eq!(pace(&r, &s, false, 0), [0, 1]);
        let s = slots(&[
            (P::Placed, true),
            (P::Placing, true),
            (P::Pending, false),
            (P::Pending, false),
            (P::Pending, false),
        ]);
        assert!(pace(&r, &s, false, 0).is_empty(), "batch 1 still placing");
        let s = slots(&[
            (P::Placed, true),
            (P::Failed, true),
            (P::Pending, false),
            (P::Pending, false),
            (P::Pending, false),
        ]);
        assert_eq!(pace(&r, &s, false, 0), [2, 3], "one failure is tolerated");
        let s = slots(&[
            (P::Failed, true),
            (P::Failed, true),
            (P::Pending, false),
            (P::Pending, false),
        ]);
        assert!(pace(&r, &s, false, 0).is_empty(), "two failures stop it");
        let pct = Strategy::Rolling {
            batch_size: 0,
            batch_percent: 30.0,
            max_failures: 0,
        };
        assert_eq!(
            pace(&pct, &slots(&[(P::Pending, false); 5]), false, 0),
            [0, 1],
            "30% of 5 rounds up to 2"
        );
    }

    #[test]
    fn steps_follow_the_strategy() {
        let all = step(
            &Strategy::AllAtOnce,
            &slots(&[(P::Placing, true); 3]),
            false,
        );
        assert_eq!(
            (all.phase, all.step, all.step_count),
            (Phase::AllAtOnce, 1, 1)
        );
        assert_eq!((all.ordered, all.placed, all.targets), (3, 0, 3));

        let r = Strategy::Rolling {
            batch_size: 2,
            batch_percent: 0.0,
            max_failures: 1,
        };
        let s = slots(&[
            (P::Placed, true),
            (P::Failed, true),
            (P::Placing, true),
            (P::Pending, false),
            (P::Pending, false),
        ]);
        let st = step(&r, &s, false);
        assert_eq!(
            (
                st.phase,
                st.step,
                st.step_count,
                st.ordered,
                st.placed,
                st.failed
            ),
            (Phase::RollingBatch, 2, 3, 3, 1, 1)
        );

        let c = Strategy::Canary {
            canary_targets: 1,
            bake_ms: 0,
        };
        let placing = slots(&[(P::Placing, true), (P::Pending, false), (P::Pending, false)]);
        assert_eq!(step(&c, &placing, false).phase, Phase::CanaryPlacing);
        let placed = slots(&[(P::Placed, true), (P::Pending, false), (P::Pending, false)]);
        let st = step(&c, &placed, false);
        assert_eq!(
            (st.phase, st.step, st.step_count),
            (Phase::CanaryWaiting, 1, 2)
        );
        assert_eq!(step(&c, &placed, true).phase, Phase::CanaryRest);
        let baked = Strategy::Canary {
            canary_targets: 1,
            bake_ms: 1_000,
        };
        let st = step(&baked, &placed, false);
        assert_eq!(
            (st.phase, st.continue_ms),
            (Phase::CanaryBaking, Some(1_100))
        );
        let rest = slots(&[(P::Placed, true), (P::Placing, true), (P::Placing, true)]);
        let st = step(&c, &rest, true);
        assert_eq!((st.phase, st.step, st.ordered), (Phase::CanaryRest, 2, 3));
    }

    #[test]
    fn canary_waits_for_continue_or_bake_time() {
        let c = Strategy::Canary {
            canary_targets: 1,
            bake_ms: 0,
        };
        let s = slots(&[(P::Pending, false); 4]);
        assert_eq!(pace(&c, &s, false, 0), [0]);
        let s = slots(&[
            (P::Placed, true),
            (P::Pending, false),
            (P::Pending, false),
            (P::Pending, false),
        ]);
        assert!(pace(&c, &s, false, 10_000).is_empty(), "waits for continue");
        assert_eq!(pace(&c, &s, true, 0), [1, 2, 3]);
        let baked = Strategy::Canary {
            canary_targets: 1,
            bake_ms: 1_000,
        };
        assert!(pace(&baked, &s, false, 1_099).is_empty());
        assert_eq!(pace(&baked, &s, false, 1_100), [1, 2, 3]);
        let failed = slots(&[(P::Failed, true), (P::Pending, false)]);
        assert!(
            pace(&c, &failed, true, 0).is_empty(),
            "a failed canary stops it"
        );
    }
}
