//! Features and releases as plain data, with the release state machine.

use std::collections::BTreeMap;

use serde_json::Value;

use super::rules::Rule;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

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
    pub variants: BTreeMap<String, Value>,
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
    /// Optimistic concurrency revision.
    pub revision: i64,
    /// Creation time.
    pub create_ms: Millis,
    /// Last update.
    pub update_ms: Millis,
}

impl Feature {
    /// The boolean variants used when a feature names none.
    pub fn boolean_variants() -> BTreeMap<String, Value> {
        BTreeMap::from([
            ("on".to_owned(), Value::Bool(true)),
            ("off".to_owned(), Value::Bool(false)),
        ])
    }
}

/// The lifecycle of a release. Planning, approval and policy states (PLANNED, APPROVED,
/// CANCELLED) slot in ahead of RELEASING when the policy engine arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReleaseState {
    /// Created; nothing visible.
    Draft,
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
            _ => return None,
        })
    }

    /// Whether features of a release in this state may be visible.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Releasing | Self::Released)
    }
}

/// One environment of a release.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseEnvironment {
    /// deploy-svc environment id.
    pub environment: String,
    /// 0-100.
    pub rollout_percent: f64,
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
}

impl Release {
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
            (
                _,
                Transition::SetRollout {
                    environment,
                    percent,
                },
            ) => {
                let env = self
                    .environments
                    .iter_mut()
                    .find(|e| &e.environment == environment)
                    .ok_or_else(|| {
                        format!("{environment:?} is not an environment of this release")
                    })?;
                env.rollout_percent = *percent;
                self.state = self.active_state();
                Ok(())
            }
            (Releasing | Released, Transition::Pause) => {
                self.state = Paused;
                Ok(())
            }
            (state, Transition::Pause) => Err(format!(
                "only a RELEASING or RELEASED release can be paused; it is {state:?}"
            )),
            (Paused, Transition::Resume) => {
                self.state = self.active_state();
                Ok(())
            }
            (state, Transition::Resume) => Err(format!(
                "only a PAUSED release can be resumed; it is {state:?}"
            )),
            (_, Transition::Rollback) => {
                self.state = RolledBack;
                Ok(())
            }
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
                },
                ReleaseEnvironment {
                    environment: "prod".into(),
                    rollout_percent: 0.0,
                },
            ],
            state: ReleaseState::Draft,
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
}
