//! What release-svc knows of deploy-svc's placements, and the coverage gate computed from it.
//!
//! The index mirrors deploy-svc's placements (one per deployment and target) as learned
//! from WatchPlacements. For an environment and an artifact, the targets that count are the
//! targets that appear in any placement of that artifact there (deploy-svc announces every
//! target of a new deployment with a PENDING event); a target carries version V when its
//! newest PLACED placement of the artifact (highest sequence) is V. A rollback to an older
//! version, a REMOVED or a FAILED placement therefore lowers coverage at once.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

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

/// One (environment, artifact)'s placements, by (deployment, target).
type Group = HashMap<(i64, String), Placement>;

/// Every placement, grouped by environment and artifact (what a coverage question asks
/// about), then by (deployment, target). A deployment places one artifact in one
/// environment, so a (deployment, target) is always in the same group.
#[derive(Debug, Clone, Default)]
pub struct PlacementIndex {
    groups: HashMap<String, HashMap<String, Group>>,
    len: usize,
    /// The highest sequence applied.
    max_sequence: u64,
}

/// What [`PlacementIndex::apply_all`] replaced, to put back with [`PlacementIndex::undo`].
#[derive(Debug, Default)]
pub struct Undo {
    replaced: Vec<(Placement, Option<Placement>)>,
    max_sequence: u64,
}

/// Coverage of one carrier in one environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// Targets whose current version carries the feature.
    pub carrying: usize,
    /// Targets of the artifact in the environment.
    pub targets: usize,
}

impl PlacementIndex {
    /// Applies one placement (a newer event replaces the stored state); returns what it
    /// replaced: `None` when nothing changed, `Some(None)` when the placement is new.
    fn put(&mut self, p: Placement) -> Option<Option<Placement>> {
        let group = match self
            .groups
            .get_mut(&p.environment)
            .and_then(|g| g.get_mut(&p.artifact))
        {
            Some(group) => group,
            None => self
                .groups
                .entry(p.environment.clone())
                .or_default()
                .entry(p.artifact.clone())
                .or_default(),
        };
        let key = (p.deployment, p.target.clone());
        match group.get(&key) {
            Some(existing) if existing.sequence > p.sequence => None,
            _ => {
                self.max_sequence = self.max_sequence.max(p.sequence);
                let before = group.insert(key, p);
                if before.is_none() {
                    self.len += 1;
                }
                Some(before)
            }
        }
    }

    /// Applies one placement (a newer event replaces the stored state).
    pub fn apply(&mut self, p: Placement) {
        self.put(p);
    }

    /// Applies placements in order; what they replaced comes back for [`Self::undo`].
    pub fn apply_all(&mut self, placements: &[Placement]) -> Undo {
        let mut undo = Undo {
            replaced: Vec::new(),
            max_sequence: self.max_sequence,
        };
        for p in placements {
            if let Some(before) = self.put(p.clone()) {
                undo.replaced.push((p.clone(), before));
            }
        }
        undo
    }

    /// Puts back what [`Self::apply_all`] replaced (latest first).
    pub fn undo(&mut self, undo: Undo) {
        self.max_sequence = undo.max_sequence;
        for (applied, before) in undo.replaced.into_iter().rev() {
            let Some(group) = self
                .groups
                .get_mut(&applied.environment)
                .and_then(|g| g.get_mut(&applied.artifact))
            else {
                continue;
            };
            let key = (applied.deployment, applied.target);
            match before {
                Some(before) => {
                    group.insert(key, before);
                }
                None => {
                    if group.remove(&key).is_some() {
                        self.len -= 1;
                    }
                }
            }
        }
    }

    /// Replaces everything (a resync from a snapshot).
    pub fn replace(&mut self, placements: impl IntoIterator<Item = Placement>) {
        *self = Self::default();
        for p in placements {
            self.apply(p);
        }
    }

    /// Every placement.
    pub fn iter(&self) -> impl Iterator<Item = &Placement> {
        self.groups
            .values()
            .flat_map(|g| g.values())
            .flat_map(|g| g.values())
    }

    /// The highest sequence applied (0: none).
    pub fn max_sequence(&self) -> u64 {
        self.max_sequence
    }

    /// Number of placements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A view that answers coverage questions, computing each (environment, artifact)'s
    /// coverage from that group alone, once per view.
    pub fn coverage_view(&self) -> CoverageView<'_> {
        CoverageView {
            index: self,
            current: RefCell::new(HashMap::new()),
        }
    }
}

/// The current version of each target of one (environment, artifact): its newest PLACED
/// placement's, `None` when it carries none.
type Versions = Rc<[Option<semver::Version>]>;

/// Coverage answers over a [`PlacementIndex`].
#[derive(Debug)]
pub struct CoverageView<'a> {
    index: &'a PlacementIndex,
    /// Per (environment, artifact) asked so far.
    current: RefCell<HashMap<(&'a str, &'a str), Versions>>,
}

impl<'a> CoverageView<'a> {
    /// The current versions of the targets of `artifact` in `environment`.
    fn current(&self, environment: &str, artifact: &str) -> Versions {
        let Some((env, (art, group))) = self
            .index
            .groups
            .get_key_value(environment)
            .and_then(|(e, g)| g.get_key_value(artifact).map(|a| (e, a)))
        else {
            return Rc::from([]);
        };
        let key = (env.as_str(), art.as_str());
        if let Some(found) = self.current.borrow().get(&key) {
            return found.clone();
        }
        let mut newest: BTreeMap<&str, Option<(u64, &str)>> = BTreeMap::new();
        for p in group.values() {
            let slot = newest.entry(p.target.as_str()).or_insert(None);
            if p.state == PlacementState::Placed && slot.is_none_or(|(seq, _)| seq < p.sequence) {
                *slot = Some((p.sequence, p.version.as_str()));
            }
        }
        let versions: Versions = newest
            .into_values()
            .map(|v| v.and_then(|(_, version)| semver::Version::parse(version).ok()))
            .collect();
        self.current.borrow_mut().insert(key, versions.clone());
        versions
    }

    /// How many of the environment's targets of the carrier's artifact carry it.
    pub fn coverage(&self, environment: &str, carrier: &Carrier) -> Coverage {
        let current = self.current(environment, &carrier.artifact);
        let carrying = current
            .iter()
            .filter(|v| v.as_ref().is_some_and(|v| *v >= carrier.min_version))
            .count();
        Coverage {
            carrying,
            targets: current.len(),
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

    #[test]
    fn undo_puts_back_what_a_batch_replaced() {
        use PlacementState::*;
        let mut idx = PlacementIndex::default();
        idx.apply(p(1, "a", "2.0.0", Placed, 1));
        idx.apply(p(1, "b", "2.0.0", Pending, 2));
        let before: Vec<_> = {
            let mut v: Vec<_> = idx
                .iter()
                .cloned()
                .map(|p| (p.target, p.state, p.sequence))
                .collect();
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v
        };
        let undo = idx.apply_all(&[
            p(1, "a", "2.0.0", Removed, 3),
            p(1, "b", "2.0.0", Placed, 4),
            p(1, "c", "2.0.0", Placed, 5),
            // Older than what is stored: ignored, and nothing to undo.
            p(1, "a", "2.0.0", Placing, 1),
        ]);
        assert_eq!((idx.len(), idx.max_sequence()), (3, 5));
        assert_eq!(
            idx.coverage_view().coverage("prod", &carrier("2.0.0", 1.0)),
            Coverage {
                carrying: 2,
                targets: 3
            }
        );
        idx.undo(undo);
        let mut after: Vec<_> = idx
            .iter()
            .cloned()
            .map(|p| (p.target, p.state, p.sequence))
            .collect();
        after.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(after, before);
        assert_eq!((idx.len(), idx.max_sequence()), (2, 2));
        assert_eq!(
            idx.coverage_view().coverage("prod", &carrier("2.0.0", 1.0)),
            Coverage {
                carrying: 1,
                targets: 2
            }
        );
    }
}
