//! The deployment state machine: which placement transitions a report may make, and the
//! deployment state derived from the placements.
//!
//! A deployment is PENDING until a target reports, IN_PROGRESS while targets place,
//! SUCCEEDED once every (not removed) target is PLACED, FAILED as soon as a target fails
//! before that, and CANCELLED on request. The three final states are sticky: a SUCCEEDED
//! deployment stays SUCCEEDED when a placement is later removed, because the promotion
//! rule relies on the fact that the version once succeeded there.

use super::model::{DeploymentState, PlacementState};

/// How many placements of a deployment are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlacementCounts {
    /// Not reported yet.
    pub pending: u64,
    /// Placing.
    pub placing: u64,
    /// Placed.
    pub placed: u64,
    /// Failed.
    pub failed: u64,
    /// Removed.
    pub removed: u64,
}

impl PlacementCounts {
    /// Removes one placement in `state` (saturating).
    pub fn remove(&mut self, state: PlacementState) {
        let n = match state {
            PlacementState::Pending => &mut self.pending,
            PlacementState::Placing => &mut self.placing,
            PlacementState::Placed => &mut self.placed,
            PlacementState::Failed => &mut self.failed,
            PlacementState::Removed => &mut self.removed,
        };
        *n = n.saturating_sub(1);
    }

    /// Adds `n` placements in `state`.
    pub fn add(&mut self, state: PlacementState, n: u64) {
        match state {
            PlacementState::Pending => self.pending += n,
            PlacementState::Placing => self.placing += n,
            PlacementState::Placed => self.placed += n,
            PlacementState::Failed => self.failed += n,
            PlacementState::Removed => self.removed += n,
        }
    }
}

/// The state a deployment moves to, given its current state, its placements and the
/// failures its strategy tolerates: FAILED beyond them, SUCCEEDED when every active target
/// has finished and some placed.
pub fn derive_state(
    current: DeploymentState,
    counts: PlacementCounts,
    max_failures: u64,
) -> DeploymentState {
    if current.is_final() {
        return current;
    }
    let active = counts.pending + counts.placing + counts.placed + counts.failed;
    if counts.failed > max_failures {
        DeploymentState::Failed
    } else if active > 0 && counts.placed > 0 && counts.placed + counts.failed == active {
        DeploymentState::Succeeded
    } else if counts.placing + counts.placed + counts.removed > 0 {
        DeploymentState::InProgress
    } else {
        DeploymentState::Pending
    }
}

/// Whether a report may move a placement from `from` to `to` while the deployment is in
/// `deployment`. `Ok(false)` means the report repeats the current state (a no-op).
pub fn check_transition(
    deployment: DeploymentState,
    from: PlacementState,
    to: PlacementState,
) -> Result<bool, String> {
    use PlacementState::*;
    if to == Pending {
        return Err("PENDING is not a reportable state".into());
    }
    if from == to {
        return Ok(false);
    }
    if deployment.is_final() {
        // A finished deployment only learns that what it placed went away or broke.
        return match (from, to) {
            (Placed | Placing, Removed | Failed) => Ok(true),
            _ => Err(format!(
                "deployment is {deployment:?}; only PLACED placements may still become REMOVED or FAILED (create a new deployment to place again)"
            )),
        };
    }
    match (from, to) {
        (Pending | Placing | Failed | Removed, Placing) => Ok(true),
        (Pending | Placing, Placed | Failed) => Ok(true),
        (Pending | Placing | Placed | Failed, Removed) => Ok(true),
        (Placed, Failed) => Ok(true),
        _ => Err(format!("a placement cannot go from {from:?} to {to:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeploymentState as D;
    use PlacementState as P;

    fn counts(states: &[P]) -> PlacementCounts {
        let mut c = PlacementCounts::default();
        for s in states {
            c.add(*s, 1);
        }
        c
    }

    #[test]
    fn derived_state_table() {
        let cases: &[(D, &[P], D)] = &[
            (D::Pending, &[], D::Pending),
            (D::Pending, &[P::Pending, P::Pending], D::Pending),
            (D::Pending, &[P::Placing, P::Pending], D::InProgress),
            (D::InProgress, &[P::Placed, P::Pending], D::InProgress),
            (D::InProgress, &[P::Placed, P::Placed], D::Succeeded),
            (D::InProgress, &[P::Placed, P::Failed], D::Failed),
            (D::InProgress, &[P::Placing, P::Failed], D::Failed),
            (D::InProgress, &[P::Placed, P::Removed], D::Succeeded),
            (D::InProgress, &[P::Removed], D::InProgress),
            (D::Pending, &[P::Placed], D::Succeeded),
            // Final states are sticky.
            (D::Succeeded, &[P::Removed, P::Removed], D::Succeeded),
            (D::Succeeded, &[P::Failed], D::Succeeded),
            (D::Failed, &[P::Placed, P::Placed], D::Failed),
            (D::Cancelled, &[P::Placed], D::Cancelled),
        ];
        for (current, states, want) in cases {
            assert_eq!(
                derive_state(*current, counts(states), 0),
                *want,
                "{current:?} {states:?}"
            );
        }
    }

    #[test]
    fn transitions() {
        assert_eq!(
            check_transition(D::Pending, P::Pending, P::Placing),
            Ok(true)
        );
        assert_eq!(
            check_transition(D::InProgress, P::Placing, P::Placed),
            Ok(true)
        );
        assert_eq!(
            check_transition(D::InProgress, P::Placed, P::Placed),
            Ok(false)
        );
        assert_eq!(
            check_transition(D::InProgress, P::Failed, P::Placing),
            Ok(true)
        );
        assert!(check_transition(D::InProgress, P::Placed, P::Placing).is_err());
        assert!(check_transition(D::InProgress, P::Placing, P::Pending).is_err());
        assert!(check_transition(D::InProgress, P::Removed, P::Placed).is_err());
        // After success, a placement can still be removed or fail, but not be placed again.
        assert_eq!(
            check_transition(D::Succeeded, P::Placed, P::Removed),
            Ok(true)
        );
        assert_eq!(
            check_transition(D::Succeeded, P::Placed, P::Failed),
            Ok(true)
        );
        assert!(check_transition(D::Succeeded, P::Removed, P::Placing).is_err());
        assert!(check_transition(D::Cancelled, P::Pending, P::Placing).is_err());
        assert!(check_transition(D::Failed, P::Failed, P::Placing).is_err());
    }
}
