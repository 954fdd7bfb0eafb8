//! What release-svc knows of deploy-svc's placements, and the coverage gate computed from it.
//!
//! The index mirrors deploy-svc's placements (one per deployment and target) as learned
//! from WatchPlacements. For an environment and an artifact, the targets that count are the
//! targets that appear in any placement of that artifact there (deploy-svc announces every
//! target of a new deployment with a PENDING event); a target carries version V when its
//! newest PLACED placement of the artifact (highest sequence) is V. A rollback to an older
//! version, a REMOVED or a FAILED placement therefore lowers coverage at once.

use std::collections::{BTreeMap, HashMap};

use super::model::Carrier;

/// The placement states, as deploy-svc numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementState {
    /// Included, not reported.
    Pending,
    /// Being placed.
    Placing,
    /// In place.
    Placed,
    /// Failed.
    Failed,
    /// Removed.
    Removed,
}

impl PlacementState {
    /// From deploy-svc's enum number.
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => Self::Pending,
            2 => Self::Placing,
            3 => Self::Placed,
            4 => Self::Failed,
            5 => Self::Removed,
            _ => return None,
        })
    }

    /// deploy-svc's enum number.
    pub fn code(self) -> i64 {
        match self {
            Self::Pending => 1,
            Self::Placing => 2,
            Self::Placed => 3,
            Self::Failed => 4,
            Self::Removed => 5,
        }
    }
}

/// One placement as known here.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// deploy-svc deployment id.
    pub deployment: i64,
    /// Environment id.
    pub environment: String,
    /// Target id.
    pub target: String,
    /// Artifact name.
    pub artifact: String,
    /// Version.
    pub version: String,
    /// State.
    pub state: PlacementState,
    /// Sequence of the event that set the state.
    pub sequence: u64,
}

/// Every placement, by (deployment, target).
#[derive(Debug, Clone, Default)]
pub struct PlacementIndex {
    placements: HashMap<(i64, String), Placement>,
}

/// Coverage of one carrier in one environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// Targets whose current version carries the feature.
    pub carrying: usize,
    /// Targets of the artifact in the environment.
    pub targets: usize,
}

/// Per environment, artifact and target: the newest PLACED (sequence, version), if any.
type Current<'a> = HashMap<(&'a str, &'a str), BTreeMap<&'a str, Option<(u64, &'a str)>>>;

impl PlacementIndex {
    /// Applies one placement (a newer event replaces the stored state).
    pub fn apply(&mut self, p: Placement) {
        let key = (p.deployment, p.target.clone());
        match self.placements.get(&key) {
            Some(existing) if existing.sequence > p.sequence => {}
            _ => {
                self.placements.insert(key, p);
            }
        }
    }

    /// Replaces everything (a resync from a snapshot).
    pub fn replace(&mut self, placements: impl IntoIterator<Item = Placement>) {
        self.placements.clear();
        for p in placements {
            self.apply(p);
        }
    }

    /// Every placement.
    pub fn iter(&self) -> impl Iterator<Item = &Placement> {
        self.placements.values()
    }

    /// Number of placements.
    pub fn len(&self) -> usize {
        self.placements.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.placements.is_empty()
    }

    /// A view that answers coverage questions quickly.
    pub fn coverage_view(&self) -> CoverageView<'_> {
        let mut current: Current<'_> = HashMap::new();
        for p in self.placements.values() {
            let targets = current
                .entry((p.environment.as_str(), p.artifact.as_str()))
                .or_default();
            let slot = targets.entry(p.target.as_str()).or_insert(None);
            if p.state == PlacementState::Placed && slot.is_none_or(|(seq, _)| seq < p.sequence) {
                *slot = Some((p.sequence, p.version.as_str()));
            }
        }
        CoverageView { current }
    }
}

/// Coverage answers over a [`PlacementIndex`].
#[derive(Debug)]
pub struct CoverageView<'a> {
    current: Current<'a>,
}

impl CoverageView<'_> {
    /// How many of the environment's targets of the carrier's artifact carry it.
    pub fn coverage(&self, environment: &str, carrier: &Carrier) -> Coverage {
        let Some(targets) = self.current.get(&(environment, carrier.artifact.as_str())) else {
            return Coverage {
                carrying: 0,
                targets: 0,
            };
        };
        let carrying = targets
            .values()
            .filter(|v| {
                v.and_then(|(_, version)| semver::Version::parse(version).ok())
                    .is_some_and(|v| v >= carrier.min_version)
            })
            .count();
        Coverage {
            carrying,
            targets: targets.len(),
        }
    }

    /// `Ok` when every carrier is placed at its required coverage in `environment`, else
    /// the reason it is not.
    pub fn gate(&self, environment: &str, carriers: &[Carrier]) -> Result<(), String> {
        let mut missing = Vec::new();
        for c in carriers {
            let cov = self.coverage(environment, c);
            let met = cov.targets > 0
                && (cov.carrying as f64) >= c.required_coverage * cov.targets as f64 - 1e-9;
            if !met {
                missing.push(format!(
                    "{}: {}/{} targets at >= {} in {environment}, {}% required",
                    c.artifact,
                    cov.carrying,
                    cov.targets,
                    c.min_version,
                    c.required_coverage * 100.0
                ));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(
        deployment: i64,
        target: &str,
        version: &str,
        state: PlacementState,
        sequence: u64,
    ) -> Placement {
        Placement {
            deployment,
            environment: "prod".into(),
            target: target.into(),
            artifact: "web".into(),
            version: version.into(),
            state,
            sequence,
        }
    }

    fn carrier(min: &str, coverage: f64) -> Carrier {
        Carrier {
            artifact: "web".into(),
            min_version: semver::Version::parse(min).unwrap_or_else(|e| panic!("{e}")),
            required_coverage: coverage,
        }
    }

    #[test]
    fn canary_does_not_open_a_full_coverage_gate() {
        use PlacementState::*;
        let mut idx = PlacementIndex::default();
        for (i, t) in ["a", "b", "c", "d"].iter().enumerate() {
            idx.apply(p(1, t, "2.0.0", Pending, i as u64 + 1));
        }
        idx.apply(p(1, "a", "2.0.0", Placed, 5));
        let view = idx.coverage_view();
        assert_eq!(
            view.coverage("prod", &carrier("2.0.0", 1.0)),
            Coverage {
                carrying: 1,
                targets: 4
            }
        );
        assert!(view.gate("prod", &[carrier("2.0.0", 1.0)]).is_err());
        assert!(view.gate("prod", &[carrier("2.0.0", 0.25)]).is_ok());
        assert!(
            view.gate("staging", &[carrier("2.0.0", 0.25)]).is_err(),
            "nothing placed in staging"
        );
        for (i, t) in ["b", "c", "d"].iter().enumerate() {
            idx.apply(p(1, t, "2.0.0", Placed, 6 + i as u64));
        }
        assert!(idx
            .coverage_view()
            .gate("prod", &[carrier("2.0.0", 1.0)])
            .is_ok());
        // A removal closes it again.
        idx.apply(p(1, "d", "2.0.0", Removed, 10));
        assert!(idx
            .coverage_view()
            .gate("prod", &[carrier("2.0.0", 1.0)])
            .is_err());
    }

    #[test]
    fn rollback_to_an_older_version_lowers_coverage() {
        use PlacementState::*;
        let mut idx = PlacementIndex::default();
        idx.apply(p(1, "a", "1.0.0", Placed, 1));
        idx.apply(p(2, "a", "2.0.0", Placed, 2));
        assert!(idx
            .coverage_view()
            .gate("prod", &[carrier("2.0.0", 1.0)])
            .is_ok());
        // The rollback deployment places 1.0.0 again, later.
        idx.apply(p(3, "a", "1.0.0", Placed, 3));
        assert!(idx
            .coverage_view()
            .gate("prod", &[carrier("2.0.0", 1.0)])
            .is_err());
        // An older event never overwrites a newer one.
        idx.apply(p(3, "a", "1.0.0", Placing, 2));
        assert_eq!(
            idx.iter().find(|x| x.deployment == 3).map(|x| x.state),
            Some(Placed)
        );
    }
}
