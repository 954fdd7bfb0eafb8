//! The rules a new deployment must satisfy before it is created. Every violated rule is
//! reported, not just the first.

use super::clock::Millis;
use super::error::PreconditionViolation;
use super::freeze;
use super::model::{Environment, NewDeployment};
use super::names::{artifact_version_name, environment_name};

/// The version has not succeeded in the upstream environment of the path.
pub const PROMOTION_ORDER: &str = "PROMOTION_ORDER";
/// A protected environment needs a change reference.
pub const CHANGE_REFERENCE_REQUIRED: &str = "CHANGE_REFERENCE_REQUIRED";

/// Checks a new deployment against its environment at `now`. `upstream_succeeded` tells
/// whether the same artifact version has a SUCCEEDED deployment in the environment's
/// upstream (ignored when there is no upstream). Active freeze windows are violations
/// unless the deployment carries an emergency override, which overrides nothing else.
pub fn check_new_deployment(
    deployment: &NewDeployment,
    environment: &Environment,
    upstream_succeeded: bool,
    now: Millis,
) -> Vec<PreconditionViolation> {
    let mut violations = Vec::new();
    let version = artifact_version_name(&deployment.artifact, &deployment.version);
    if let Some(upstream) = &environment.upstream {
        if !upstream_succeeded {
            violations.push(PreconditionViolation::new(
                PROMOTION_ORDER,
                environment_name(&environment.id),
                format!(
                    "{version} must have SUCCEEDED in {} before it is deployed to {}",
                    environment_name(upstream),
                    environment_name(&environment.id)
                ),
            ));
        }
    }
    if environment.protected && deployment.change_reference.is_empty() {
        violations.push(PreconditionViolation::new(
            CHANGE_REFERENCE_REQUIRED,
            environment_name(&environment.id),
            format!(
                "{} is protected: set deployment.change_reference to an approved change",
                environment_name(&environment.id)
            ),
        ));
    }
    if deployment.emergency.is_none() {
        violations.extend(freeze::violations(environment, now));
    }
    violations
}

/// Checks that making `upstream` the upstream of `id` keeps the path acyclic, given the
/// current path of `upstream` (its ids, first first, ending with `upstream` itself).
pub fn check_upstream(id: &str, upstream_path: &[String]) -> Option<PreconditionViolation> {
    upstream_path.iter().any(|e| e == id).then(|| {
        PreconditionViolation::new(
            "PROMOTION_PATH_CYCLE",
            environment_name(id),
            format!(
                "making {} upstream of {} would create a cycle: {}",
                upstream_path
                    .last()
                    .map(|u| environment_name(u))
                    .unwrap_or_default(),
                environment_name(id),
                upstream_path.join(" -> ")
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: &str, upstream: Option<&str>, protected: bool) -> Environment {
        Environment {
            id: id.into(),
            description: String::new(),
            protected,
            upstream: upstream.map(Into::into),
            promotion_path: vec![],
            freeze_windows: vec![],
            revision: 1,
            create_ms: 0,
            update_ms: 0,
        }
    }

    fn new(change: &str) -> NewDeployment {
        NewDeployment {
            artifact: "web".into(),
            version: "1.0.0".into(),
            environment: "prod".into(),
            change_reference: change.into(),
            emergency: None,
            strategy: Default::default(),
            auto_rollback: false,
            targets: None,
            rollback_of: None,
        }
    }

    #[test]
    fn first_environment_of_a_path_needs_nothing() {
        assert!(check_new_deployment(&new(""), &env("dev", None, false), false, 0).is_empty());
    }

    #[test]
    fn upstream_must_have_succeeded() {
        let v = check_new_deployment(&new(""), &env("staging", Some("dev"), false), false, 0);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].kind, PROMOTION_ORDER);
        assert!(
            check_new_deployment(&new(""), &env("staging", Some("dev"), false), true, 0).is_empty()
        );
    }

    #[test]
    fn protected_needs_change_reference_and_all_rules_are_listed() {
        let v = check_new_deployment(&new(""), &env("prod", Some("staging"), true), false, 0);
        let kinds: Vec<_> = v.iter().map(|v| v.kind.as_str()).collect();
        assert_eq!(kinds, [PROMOTION_ORDER, CHANGE_REFERENCE_REQUIRED]);
        assert!(
            check_new_deployment(&new("CHG-1"), &env("prod", Some("staging"), true), true, 0)
                .is_empty()
        );
    }

    #[test]
    fn a_freeze_window_is_listed_with_the_other_rules_and_only_it_is_overridden() {
        let mut prod = env("prod", Some("staging"), true);
        prod.freeze_windows = vec![calendar::FreezeWindow {
            name: "year-end".into(),
            schedule: calendar::Schedule::Absolute {
                start_ms: 0,
                end_ms: 100,
            },
        }];
        let kinds = |v: Vec<PreconditionViolation>| -> Vec<String> {
            v.into_iter().map(|v| v.kind).collect()
        };
        assert_eq!(
            kinds(check_new_deployment(&new(""), &prod, false, 50)),
            [
                PROMOTION_ORDER,
                CHANGE_REFERENCE_REQUIRED,
                freeze::FREEZE_WINDOW
            ]
        );
        assert!(check_new_deployment(&new("CHG-1"), &prod, true, 100).is_empty());
        let mut urgent = new("");
        urgent.emergency = Some(super::super::model::EmergencyOverride {
            reason: "outage".into(),
            approver: "bob".into(),
        });
        assert_eq!(
            kinds(check_new_deployment(&urgent, &prod, false, 50)),
            [PROMOTION_ORDER, CHANGE_REFERENCE_REQUIRED]
        );
    }

    #[test]
    fn cycles_are_refused() {
        let path = vec!["dev".to_owned(), "staging".to_owned()];
        assert!(check_upstream("dev", &path).is_some());
        assert!(check_upstream("prod", &path).is_none());
    }
}
