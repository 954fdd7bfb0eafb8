//! Features and releases as plain data, with the release state machine.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::{Arc, LazyLock};

use serde_json::Value;

use super::rules::Rule;

pub use service_kit::time::Millis;

/// An artifact that must be placed for a feature to be visible.
#[derive(Debug, Clone, PartialEq)]
pub struct Carrier {
    /// deploy-svc artifact name.
    pub artifact: String,
    /// The lowest carrying version.
    pub min_version: semver::Version,
    /// Fraction of the environment's targets of the artifact that must carry it, (0, 1].
    pub required_coverage: f64,
}

/// A feature.
#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    /// The key.
    pub key: String,
    /// Free text.
    pub description: String,
    /// Owner.
    pub owner: String,
    /// Variants by name.
    pub variants: Variants,
    /// Served when visible and no rule picks a variant.
    pub default_variant: String,
    /// Served when not visible.
    pub off_variant: String,
    /// Targeting rule.
    pub targeting: Option<Rule>,
    /// Always see it (once released and deployed).
    pub allow: Vec<String>,
    /// Never see it.
    pub deny: Vec<String>,
    /// Deployment gate.
    pub carriers: Vec<Carrier>,
    /// Never visible.
    pub disabled: bool,
    /// Flag metadata (strings, numbers, booleans), returned with its evaluations.
    pub metadata: BTreeMap<String, Value>,
    /// Optimistic concurrency revision.
    pub revision: i64,
    /// Creation time.
    pub create_ms: Millis,
    /// Last update.
    pub update_ms: Millis,
    /// When it was archived: hidden from lists and evaluations (None: live).
    pub archived_ms: Option<Millis>,
}

impl Feature {
    /// The boolean variants used when a feature names none.
    pub fn boolean_variants() -> Variants {
        Variants(BOOLEAN.clone())
    }
}

/// A feature's variants by name, immutable and shared: every feature with the boolean
/// variants (most of them) points at one map instead of holding a copy (a map of two
/// entries costs over 600 bytes).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Variants(Arc<BTreeMap<String, Value>>);

static BOOLEAN: LazyLock<Arc<BTreeMap<String, Value>>> = LazyLock::new(|| {
    Arc::new(BTreeMap::from([
        ("on".to_owned(), Value::Bool(true)),
        ("off".to_owned(), Value::Bool(false)),
    ]))
});

impl From<BTreeMap<String, Value>> for Variants {
    fn from(map: BTreeMap<String, Value>) -> Self {
        if map == **BOOLEAN {
            Self(BOOLEAN.clone())
        } else {
            Self(Arc::new(map))
        }
    }
}

impl Variants {
    /// The map to change: this feature's own copy (copied on the first change if shared).
    pub fn make_mut(&mut self) -> &mut BTreeMap<String, Value> {
        Arc::make_mut(&mut self.0)
    }

    /// The variants as a JSON object (name -> value).
    pub fn to_json(&self) -> Value {
        Value::Object(self.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

impl Deref for Variants {
    type Target = BTreeMap<String, Value>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<'a> IntoIterator for &'a Variants {
    type Item = (&'a String, &'a Value);
    type IntoIter = std::collections::btree_map::Iter<'a, String, Value>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The lifecycle of a release: DRAFT -> PLANNED -> APPROVED -> RELEASING -> RELEASED, plus
/// PAUSED (kill switch), ROLLED_BACK and CANCELLED (final). A release without a plan may go
/// from DRAFT to RELEASING directly with a rollout (policies still apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReleaseState {
    /// Created; nothing visible.
    Draft,
    /// Plan submitted; waiting for approvals.
    Planned,
    /// Approved; starts at its planned start time when the policies allow.
    Approved,
    /// Withdrawn before it started; final.
    Cancelled,
    /// Visible to part of the audience.
    Releasing,
    /// Every environment at 100%.
    Released,
    /// Kill switch.
    Paused,
    /// Rolled back; final.
    RolledBack,
}

impl ReleaseState {
    /// The stable integer stored (equal to the proto enum number).
    pub fn code(self) -> i64 {
        match self {
            Self::Draft => 1,
            Self::Releasing => 2,
            Self::Released => 3,
            Self::Paused => 4,
            Self::RolledBack => 5,
            Self::Planned => 6,
            Self::Approved => 7,
            Self::Cancelled => 8,
        }
    }

    /// The state stored as `code`.
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => Self::Draft,
            2 => Self::Releasing,
            3 => Self::Released,
            4 => Self::Paused,
            5 => Self::RolledBack,
            6 => Self::Planned,
            7 => Self::Approved,
            8 => Self::Cancelled,
            _ => return None,
        })
    }

    /// Whether features of a release in this state may be visible.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Releasing | Self::Released)
    }

    /// Whether nothing can happen to the release any more (cancelled, rolled back).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Cancelled | Self::RolledBack)
    }
}

/// One environment of a release.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReleaseEnvironment {
    /// deploy-svc environment id.
    pub environment: String,
    /// 0-100.
    pub rollout_percent: f64,
    /// The planned rollout steps here (empty: no plan, rollouts are set by hand).
    pub steps: Vec<Step>,
    /// The index of the step taken last, if any.
    pub step: Option<usize>,
    /// When the last step was taken.
    pub step_since_ms: Millis,
    /// When the release first became visible here (cadence counts it).
    pub started_ms: Option<Millis>,
    /// Since when it has been at 100% here (soak time counts from it).
    pub full_since_ms: Option<Millis>,
}

/// One planned rollout step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The rollout percentage of the step, (0, 100].
    pub percent: f64,
    /// How long the step lasts at least before the next one.
    pub min_duration_ms: Millis,
}

/// An approval of a release.
#[derive(Debug, Clone, PartialEq)]
pub struct Approval {
    /// Who approved.
    pub principal: String,
    /// When.
    pub time_ms: Millis,
}

/// An emergency override: passes freeze windows, recorded as such.
#[derive(Debug, Clone, PartialEq)]
pub struct EmergencyOverride {
    /// Why.
    pub reason: String,
    /// Who approved the override (never the requester).
    pub approver: String,
}

/// The planning and governance side of a release.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Governance {
    /// Who created the release (never one of its approvers).
    pub requester: String,
    /// The change record this release implements.
    pub change_reference: String,
    /// Not before this time (0: as soon as approved).
    pub planned_start_ms: Millis,
    /// Approvals, one per principal.
    pub approvals: Vec<Approval>,
    /// An emergency override, if any.
    pub emergency: Option<EmergencyOverride>,
    /// Why the plan is waiting (the violations of the last automatic check), empty when it
    /// is not waiting.
    pub waiting: Vec<super::PreconditionViolation>,
}

/// A release.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    /// Numeric id.
    pub id: i64,
    /// Free text.
    pub description: String,
    /// Feature keys.
    pub features: Vec<String>,
    /// Environments with rollouts.
    pub environments: Vec<ReleaseEnvironment>,
    /// State.
    pub state: ReleaseState,
    /// Plan, approvals, change reference, override.
    pub governance: Governance,
    /// Optimistic concurrency revision.
    pub revision: i64,
    /// Creation time.
    pub create_ms: Millis,
    /// Last update.
    pub update_ms: Millis,
}

/// A requested release transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Set one environment's rollout.
    SetRollout {
        /// Environment id.
        environment: String,
        /// 0-100.
        percent: f64,
    },
    /// Kill switch.
    Pause,
    /// Back to the stored rollouts.
    Resume,
    /// Final withdrawal.
    Rollback,
    /// DRAFT -> PLANNED: every environment has steps.
    Submit,
    /// PLANNED -> APPROVED (the engine decides when the approvals satisfy the policies).
    Approve,
    /// Withdraw before it started.
    Cancel,
    /// Take step `step` of environment `environment` (index into the scope) at `now_ms`.
    Step {
        /// Index of the environment in the scope.
        environment: usize,
        /// Index of the step.
        step: usize,
        /// Now.
        now_ms: Millis,
    },
}

impl Release {
    /// Whether the release follows a plan (steps in its environments).
    pub fn planned(&self) -> bool {
        self.environments.iter().any(|e| !e.steps.is_empty())
    }

    /// The next step of the plan after the last one taken, as (environment index, step
    /// index): the next step of the current environment, else the first of the next one.
    pub fn next_step(&self) -> Option<(usize, usize)> {
        let current = self.environments.iter().rposition(|e| e.step.is_some());
        match current {
            None => (!self.environments.is_empty()).then_some((0, 0)),
            Some(i) => {
                let e = &self.environments[i];
                let s = e.step.unwrap_or(0);
                if s + 1 < e.steps.len() {
                    Some((i, s + 1))
                } else if i + 1 < self.environments.len() {
                    Some((i + 1, 0))
                } else {
                    None
                }
            }
        }
    }

    /// When the next plan step became due: the end of the current step's minimum duration,
    /// or, before the first step, the planned start or the last approval, whichever is
    /// later.
    pub fn step_due_ms(&self) -> Millis {
        match self.environments.iter().rev().find(|e| e.step.is_some()) {
            Some(e) => {
                let min = e
                    .step
                    .and_then(|s| e.steps.get(s))
                    .map_or(0, |s| s.min_duration_ms);
                e.step_since_ms.saturating_add(min)
            }
            None => self
                .governance
                .approvals
                .iter()
                .map(|a| a.time_ms)
                .fold(self.governance.planned_start_ms, Millis::max),
        }
    }

    /// The minimum duration of the next plan step (0 when there is none).
    pub fn next_step_min_duration_ms(&self) -> Millis {
        self.next_step()
            .and_then(|(e, s)| self.environments.get(e)?.steps.get(s))
            .map_or(0, |s| s.min_duration_ms)
    }

    /// Whether the last step taken has lasted its minimum duration at `now_ms` (true when
    /// none was taken).
    pub fn step_elapsed(&self, now_ms: Millis) -> bool {
        let Some(e) = self.environments.iter().rev().find(|e| e.step.is_some()) else {
            return true;
        };
        let min = e
            .step
            .and_then(|s| e.steps.get(s))
            .map_or(0, |s| s.min_duration_ms);
        now_ms - e.step_since_ms >= min
    }

    /// Records when each environment started and reached 100%, comparing with `before`.
    pub fn stamp(&mut self, before: &Release, now_ms: Millis) {
        for (e, b) in self.environments.iter_mut().zip(&before.environments) {
            if e.rollout_percent > 0.0 && e.started_ms.is_none() {
                e.started_ms = Some(now_ms);
            }
            if e.rollout_percent >= 100.0 {
                if b.rollout_percent < 100.0 || e.full_since_ms.is_none() {
                    e.full_since_ms = Some(now_ms);
                }
            } else {
                e.full_since_ms = None;
            }
        }
    }

    /// The state every environment's rollout implies for an active release.
    fn active_state(&self) -> ReleaseState {
        if !self.environments.is_empty()
            && self.environments.iter().all(|e| e.rollout_percent >= 100.0)
        {
            ReleaseState::Released
        } else {
            ReleaseState::Releasing
        }
    }

    /// Applies a transition, or explains why the state machine refuses it.
    pub fn apply(&mut self, t: &Transition) -> Result<(), String> {
        use ReleaseState::*;
        match (self.state, t) {
            (RolledBack, _) => Err("the release was rolled back; create a new release".into()),
            (Cancelled, _) => Err("the release was cancelled; create a new release".into()),
            (Draft, Transition::Submit) => self.submit(),
            (state, Transition::Submit) => Err(format!(
                "only a DRAFT release can be submitted; it is {state:?}"
            )),
            (Planned, Transition::Approve) => self.enter(Approved),
            (state, Transition::Approve) => Err(format!(
                "only a PLANNED release becomes APPROVED; it is {state:?}"
            )),
            (Draft | Planned | Approved, Transition::Cancel) => self.enter(Cancelled),
            (state, Transition::Cancel) => Err(format!(
                "only a release that has not started can be cancelled (roll it back instead); it is {state:?}"
            )),
            (Approved | Releasing, Transition::Step { environment, step, now_ms }) => {
                self.take_step(*environment, *step, *now_ms)
            }
            (state, Transition::Step { .. }) => Err(format!(
                "a plan advances only when APPROVED or RELEASING; it is {state:?}"
            )),
            (_, Transition::SetRollout { .. }) if self.planned() => Err(
                "a planned release advances by its plan; cancel it and release by hand".into(),
            ),
            (
                _,
                Transition::SetRollout {
                    environment,
                    percent,
                },
            ) => self.set_rollout(environment, *percent),
            (Releasing | Released | Approved, Transition::Pause) => self.enter(Paused),
            (state, Transition::Pause) => Err(format!(
                "only an APPROVED, RELEASING or RELEASED release can be paused; it is {state:?}"
            )),
            (Paused, Transition::Resume) => self.enter(self.resumed_state()),
            (state, Transition::Resume) => Err(format!(
                "only a PAUSED release can be resumed; it is {state:?}"
            )),
            (_, Transition::Rollback) => self.enter(RolledBack),
        }
    }

    /// Moves to `state`.
    fn enter(&mut self, state: ReleaseState) -> Result<(), String> {
        self.state = state;
        Ok(())
    }

    /// DRAFT -> PLANNED, when every environment has rollout steps.
    fn submit(&mut self) -> Result<(), String> {
        if let Some(e) = self.environments.iter().find(|e| e.steps.is_empty()) {
            return Err(format!(
                "{:?} has no rollout steps; a plan needs steps in every environment",
                e.environment
            ));
        }
        self.enter(ReleaseState::Planned)
    }

    /// Takes step `step` of environment `environment` (indexes into the plan) at `now_ms`.
    fn take_step(&mut self, environment: usize, step: usize, now_ms: Millis) -> Result<(), String> {
        let env = self
            .environments
            .get_mut(environment)
            .ok_or("no such environment in the plan")?;
        let percent = env
            .steps
            .get(step)
            .ok_or("no such step in the plan")?
            .percent;
        env.rollout_percent = percent;
        env.step = Some(step);
        env.step_since_ms = now_ms;
        self.enter(self.active_state())
    }

    /// Sets the rollout of `environment` by hand.
    fn set_rollout(&mut self, environment: &str, percent: f64) -> Result<(), String> {
        let env = self
            .environments
            .iter_mut()
            .find(|e| e.environment == environment)
            .ok_or_else(|| format!("{environment:?} is not an environment of this release"))?;
        env.rollout_percent = percent;
        self.enter(self.active_state())
    }

    /// The state a paused release resumes in: APPROVED for a plan that has taken no step,
    /// else the state its rollouts imply.
    fn resumed_state(&self) -> ReleaseState {
        if self.environments.iter().all(|e| e.rollout_percent <= 0.0)
            && !self.environments.iter().all(|e| e.steps.is_empty())
        {
            ReleaseState::Approved
        } else {
            self.active_state()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> Release {
        Release {
            id: 1,
            description: String::new(),
            features: vec!["f".into()],
            environments: vec![
                ReleaseEnvironment {
                    environment: "staging".into(),
                    rollout_percent: 0.0,
                    ..ReleaseEnvironment::default()
                },
                ReleaseEnvironment {
                    environment: "prod".into(),
                    rollout_percent: 0.0,
                    ..ReleaseEnvironment::default()
                },
            ],
            state: ReleaseState::Draft,
            governance: Default::default(),
            revision: 1,
            create_ms: 0,
            update_ms: 0,
        }
    }

    fn rollout(env: &str, percent: f64) -> Transition {
        Transition::SetRollout {
            environment: env.into(),
            percent,
        }
    }

    #[test]
    fn release_lifecycle() {
        let mut r = release();
        assert!(
            r.apply(&Transition::Pause).is_err(),
            "a draft cannot be paused"
        );
        r.apply(&rollout("staging", 100.0)).unwrap();
        assert_eq!(r.state, ReleaseState::Releasing);
        r.apply(&rollout("prod", 10.0)).unwrap();
        assert_eq!(r.state, ReleaseState::Releasing);
        r.apply(&Transition::Pause).unwrap();
        assert_eq!(r.state, ReleaseState::Paused);
        assert!(!r.state.is_active());
        r.apply(&Transition::Resume).unwrap();
        assert_eq!(r.state, ReleaseState::Releasing);
        r.apply(&rollout("prod", 100.0)).unwrap();
        assert_eq!(r.state, ReleaseState::Released);
        assert!(r.apply(&rollout("qa", 5.0)).is_err());
        r.apply(&Transition::Rollback).unwrap();
        assert_eq!(r.state, ReleaseState::RolledBack);
        assert!(
            r.apply(&rollout("prod", 100.0)).is_err(),
            "rolled back is final"
        );
        assert!(r.apply(&Transition::Resume).is_err());
    }

    #[test]
    fn a_plan_walks_its_steps_and_stamps_its_times() {
        let mut r = release();
        r.environments[0].steps = vec![Step {
            percent: 100.0,
            min_duration_ms: 0,
        }];
        r.environments[1].steps = vec![
            Step {
                percent: 10.0,
                min_duration_ms: 600,
            },
            Step {
                percent: 100.0,
                min_duration_ms: 0,
            },
        ];
        assert!(r.planned());
        assert!(
            r.apply(&Transition::Approve).is_err(),
            "a draft is not approved"
        );
        r.apply(&Transition::Submit).unwrap();
        assert_eq!(r.state, ReleaseState::Planned);
        assert!(
            r.apply(&rollout("prod", 50.0)).is_err(),
            "a plan is not rolled out by hand"
        );
        r.apply(&Transition::Approve).unwrap();
        let mut at = 1_000;
        let mut seen = Vec::new();
        while let Some((e, s)) = r.next_step() {
            assert!(r.step_elapsed(at), "step {e}/{s} at {at}");
            let before = r.clone();
            r.apply(&Transition::Step {
                environment: e,
                step: s,
                now_ms: at,
            })
            .unwrap();
            r.stamp(&before, at);
            seen.push((e, s, r.state));
            assert!(!r.step_elapsed(at + 599) || r.environments[e].steps[s].min_duration_ms == 0);
            at += 1_000;
        }
        assert_eq!(
            seen,
            [
                (0, 0, ReleaseState::Releasing),
                (1, 0, ReleaseState::Releasing),
                (1, 1, ReleaseState::Released)
            ]
        );
        assert_eq!(r.environments[0].started_ms, Some(1_000));
        assert_eq!(r.environments[0].full_since_ms, Some(1_000));
        assert_eq!(r.environments[1].started_ms, Some(2_000));
        assert_eq!(r.environments[1].full_since_ms, Some(3_000));
        assert!(
            r.apply(&Transition::Cancel).is_err(),
            "started: roll back instead"
        );

        let mut c = release();
        c.apply(&Transition::Cancel).unwrap();
        assert_eq!(c.state, ReleaseState::Cancelled);
        assert!(
            c.apply(&rollout("prod", 10.0)).is_err(),
            "cancelled is final"
        );
        let mut unplanned = release();
        assert!(
            unplanned.apply(&Transition::Submit).is_err(),
            "a plan needs steps everywhere"
        );
    }

    #[test]
    fn a_step_is_due_after_the_current_one_lasted_its_minimum_or_after_approval() {
        let mut r = release();
        let steps = |mins: &[i64]| {
            mins.iter()
                .map(|m| Step {
                    percent: 50.0,
                    min_duration_ms: *m,
                })
                .collect::<Vec<_>>()
        };
        r.environments[0].steps = steps(&[1_000, 0]);
        r.environments[1].steps = steps(&[7_000]);
        // Before the first step: the planned start or the last approval, the later one.
        r.governance.planned_start_ms = 500;
        assert_eq!(r.step_due_ms(), 500);
        r.governance.approvals = vec![
            Approval {
                principal: "ann".into(),
                time_ms: 900,
            },
            Approval {
                principal: "ben".into(),
                time_ms: 700,
            },
        ];
        assert_eq!(r.step_due_ms(), 900);
        assert_eq!(r.next_step_min_duration_ms(), 1_000);
        // In staging's first step since 2,000: the next is due at 3,000.
        r.environments[0].step = Some(0);
        r.environments[0].step_since_ms = 2_000;
        assert_eq!(r.step_due_ms(), 3_000);
        assert_eq!(r.next_step_min_duration_ms(), 0);
        // In staging's last step: prod's first is next, with its 7 s.
        r.environments[0].step = Some(1);
        r.environments[0].step_since_ms = 4_000;
        assert_eq!(r.step_due_ms(), 4_000);
        assert_eq!(r.next_step_min_duration_ms(), 7_000);
    }
}
