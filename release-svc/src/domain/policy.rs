//! Release policy: what an environment demands before a release may start or take a step
//! there, checked all at once so a dry run and the real transition report the same list.
//!
//! The rules, each a [`PreconditionViolation`] kind:
//! - `FREEZE_WINDOW`: a window of the change calendar (deploy-svc's, on the environment)
//!   covers now, and the release carries no emergency override;
//! - `CADENCE_DAY` / `CADENCE_WEEK`: at most N releases started in the environment per rolling
//!   24 hours / 7 days (checked when the release starts there);
//! - `SOAK_TIME`: the previous environment of the release's scope has been at 100% for at
//!   least the environment's minimum soak time;
//! - `APPROVALS`: N distinct approvals by principals holding the environment's approver role
//!   (the requester can never approve their own release: refused when approving);
//! - `CHANGE_REFERENCE`: required for protected environments and where the policy says so;
//! - `DEPLOYMENT_COVERAGE`: where the policy asks, every carried feature is deployed there
//!   at its required coverage before a step (without it, releasing ahead of deployment is
//!   allowed and visibility waits for the placement gate at evaluation time).

use calendar::FreezeWindow;

use super::model::Millis;
use super::PreconditionViolation;

/// One day in milliseconds.
pub const DAY_MS: Millis = 24 * 60 * 60 * 1000;

/// The stored policy of one environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// The environment.
    pub environment: String,
    /// Releases that may start per rolling 24 hours (0: no limit).
    pub max_releases_per_day: u32,
    /// Releases that may start per rolling 7 days (0: no limit).
    pub max_releases_per_week: u32,
    /// How long the previous environment must have been at 100%.
    pub min_soak_ms: Millis,
    /// Distinct approvals needed.
    pub required_approvals: u32,
    /// Principals holding the approver role here.
    pub approvers: Vec<String>,
    /// A change reference is needed (also when deploy-svc marks the environment protected).
    pub require_change_reference: bool,
    /// Steps wait until every carried feature is deployed at its required coverage.
    pub require_deployment_coverage: bool,
    /// Optimistic concurrency revision (the etag); 0 before the first write.
    pub revision: i64,
    /// Last update.
    pub update_ms: Millis,
}

/// What the environment's side of the world looks like when checking.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    /// Now.
    pub now_ms: Millis,
    /// The environment's freeze windows (deploy-svc's change calendar).
    pub freeze_windows: &'a [FreezeWindow],
    /// deploy-svc marks the environment protected.
    pub protected: bool,
    /// Whether this step starts the release in the environment (cadence applies).
    pub starting: bool,
    /// When other releases started in the environment.
    pub starts_ms: Vec<Millis>,
    /// The previous environment of the scope and since when it has been at 100% (`None`
    /// when it is not at 100%); `None` for the first environment.
    pub previous: Option<(&'a str, Option<Millis>)>,
    /// Distinct approving principals.
    pub approvals: Vec<&'a str>,
    /// The release's change reference.
    pub change_reference: &'a str,
    /// The release carries an emergency override.
    pub emergency: bool,
    /// Features not deployed at their required coverage, with why.
    pub undeployed: Vec<(String, String)>,
}

fn minutes(ms: Millis) -> String {
    let m = ms / 60_000;
    if m >= 60 {
        format!("{}h{:02}m", m / 60, m % 60)
    } else {
        format!("{m}m")
    }
}

/// Every rule of `policy` that `facts` violate, in a stable order.
pub fn check(policy: &Policy, facts: &Facts<'_>) -> Vec<PreconditionViolation> {
    let env = format!("environments/{}", policy.environment);
    let mut out = Vec::new();
    freeze_windows(facts, &env, &mut out);
    cadence(policy, facts, &env, &mut out);
    soak_time(policy, facts, &mut out);
    approvals(policy, facts, &env, &mut out);
    if (policy.require_change_reference || facts.protected) && facts.change_reference.is_empty() {
        out.push(PreconditionViolation::new(
            "CHANGE_REFERENCE",
            env,
            "releases here need a change reference",
        ));
    }
    for (feature, why) in facts
        .undeployed
        .iter()
        .filter(|_| policy.require_deployment_coverage)
    {
        out.push(PreconditionViolation::new(
            "DEPLOYMENT_COVERAGE",
            format!("features/{feature}"),
            why.clone(),
        ));
    }
    out
}

/// `FREEZE_WINDOW`: each freeze window covering now, unless an emergency override holds.
fn freeze_windows(facts: &Facts<'_>, env: &str, out: &mut Vec<PreconditionViolation>) {
    if facts.emergency {
        return;
    }
    for w in calendar::active(facts.freeze_windows, facts.now_ms) {
        out.push(PreconditionViolation::new(
            "FREEZE_WINDOW",
            env,
            format!(
                "the freeze window {:?} covers now; wait for it to end or give an emergency override (reason and approver)",
                w.name
            ),
        ));
    }
}

/// `CADENCE_DAY` / `CADENCE_WEEK`: the releases started here in the last 24 hours / 7 days,
/// when this step starts the release here.
fn cadence(policy: &Policy, facts: &Facts<'_>, env: &str, out: &mut Vec<PreconditionViolation>) {
    if !facts.starting {
        return;
    }
    for (kind, limit, span, label) in [
        (
            "CADENCE_DAY",
            policy.max_releases_per_day,
            DAY_MS,
            "24 hours",
        ),
        (
            "CADENCE_WEEK",
            policy.max_releases_per_week,
            7 * DAY_MS,
            "7 days",
        ),
    ] {
        let started = facts
            .starts_ms
            .iter()
            .filter(|t| **t > facts.now_ms - span && **t <= facts.now_ms)
            .count();
        if limit > 0 && started >= limit as usize {
            out.push(PreconditionViolation::new(
                kind,
                env,
                format!("{started} releases started here in the last {label}; the policy allows {limit}"),
            ));
        }
    }
}

/// `SOAK_TIME`: how long the previous environment has been at 100%.
fn soak_time(policy: &Policy, facts: &Facts<'_>, out: &mut Vec<PreconditionViolation>) {
    if policy.min_soak_ms <= 0 {
        return;
    }
    let Some((previous, full_since)) = facts.previous else {
        return;
    };
    let soaked = full_since.map(|t| facts.now_ms - t);
    if soaked.is_some_and(|s| s >= policy.min_soak_ms) {
        return;
    }
    out.push(PreconditionViolation::new(
        "SOAK_TIME",
        format!("environments/{previous}"),
        match soaked {
            None => format!(
                "the release must be at 100% in {previous} for {} before {}; it is not at 100% there",
                minutes(policy.min_soak_ms),
                policy.environment
            ),
            Some(s) => format!(
                "the release has been at 100% in {previous} for {}; {} needs {}",
                minutes(s),
                policy.environment,
                minutes(policy.min_soak_ms)
            ),
        },
    ));
}

/// `APPROVALS`: the distinct approvals by the environment's approvers.
fn approvals(policy: &Policy, facts: &Facts<'_>, env: &str, out: &mut Vec<PreconditionViolation>) {
    if policy.required_approvals == 0 {
        return;
    }
    let valid = facts
        .approvals
        .iter()
        .filter(|p| policy.approvers.iter().any(|a| a == *p))
        .count();
    if valid < policy.required_approvals as usize {
        out.push(PreconditionViolation::new(
            "APPROVALS",
            env,
            format!(
                "{valid} of {} required approvals by approvers of {}",
                policy.required_approvals, policy.environment
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use calendar::Schedule;

    const H: Millis = 60 * 60 * 1000;

    fn strict() -> Policy {
        Policy {
            environment: "prod".into(),
            max_releases_per_day: 2,
            max_releases_per_week: 5,
            min_soak_ms: 2 * H,
            required_approvals: 2,
            approvers: vec!["ann".into(), "ben".into(), "cy".into()],
            require_change_reference: true,
            require_deployment_coverage: true,
            ..Policy::default()
        }
    }

    fn freeze() -> Vec<FreezeWindow> {
        vec![FreezeWindow {
            name: "year-end".into(),
            schedule: Schedule::Absolute {
                start_ms: 100 * H,
                end_ms: 200 * H,
            },
        }]
    }

    fn kinds(v: &[PreconditionViolation]) -> Vec<&str> {
        v.iter().map(|v| v.kind.as_str()).collect()
    }

    /// Facts that satisfy `strict()` at `now`.
    fn fine<'a>(now: Millis, windows: &'a [FreezeWindow]) -> Facts<'a> {
        Facts {
            now_ms: now,
            freeze_windows: windows,
            starting: true,
            starts_ms: vec![now - 2 * DAY_MS],
            previous: Some(("staging", Some(now - 3 * H))),
            approvals: vec!["ann", "ben"],
            change_reference: "CHG-1",
            ..Facts::default()
        }
    }

    #[test]
    fn a_compliant_release_passes() {
        let w = freeze();
        assert!(check(&strict(), &fine(50 * H, &w)).is_empty());
        assert!(check(&Policy::default(), &Facts::default()).is_empty());
    }

    #[test]
    fn each_policy_alone() {
        let w = freeze();
        let p = strict();
        let mut f = fine(150 * H, &w);
        assert_eq!(kinds(&check(&p, &f)), ["FREEZE_WINDOW"]);
        assert!(check(&p, &f)[0].description.contains("year-end"));
        f.emergency = true;
        assert!(
            check(&p, &f).is_empty(),
            "an emergency override passes a freeze"
        );

        let mut f = fine(50 * H, &w);
        f.starts_ms = vec![50 * H - H, 50 * H - 2 * H];
        assert_eq!(kinds(&check(&p, &f)), ["CADENCE_DAY"]);
        f.starting = false;
        assert!(check(&p, &f).is_empty(), "cadence counts starts only");

        let mut f = fine(50 * H, &w);
        f.starts_ms = (1..=5).map(|d| 50 * H - d * DAY_MS + H).collect();
        assert_eq!(kinds(&check(&p, &f)), ["CADENCE_WEEK"]);

        let mut f = fine(50 * H, &w);
        f.previous = Some(("staging", Some(50 * H - H)));
        let v = check(&p, &f);
        assert_eq!(kinds(&v), ["SOAK_TIME"]);
        assert_eq!(v[0].subject, "environments/staging");
        assert!(v[0].description.contains("1h00m"), "{}", v[0].description);
        f.previous = Some(("staging", None));
        assert_eq!(kinds(&check(&p, &f)), ["SOAK_TIME"]);
        f.previous = None;
        assert!(
            check(&p, &f).is_empty(),
            "the first environment soaks nowhere"
        );

        let mut f = fine(50 * H, &w);
        f.approvals = vec!["ann", "mallory"];
        let v = check(&p, &f);
        assert_eq!(kinds(&v), ["APPROVALS"]);
        assert!(v[0].description.starts_with("1 of 2"));

        let mut f = fine(50 * H, &w);
        f.change_reference = "";
        assert_eq!(kinds(&check(&p, &f)), ["CHANGE_REFERENCE"]);
        let mut lax = p.clone();
        lax.require_change_reference = false;
        assert!(check(&lax, &f).is_empty());
        f.protected = true;
        assert_eq!(
            kinds(&check(&lax, &f)),
            ["CHANGE_REFERENCE"],
            "protected implies it"
        );

        let mut f = fine(50 * H, &w);
        f.undeployed = vec![("new-cart".into(), "checkout: 1/2 targets".into())];
        let v = check(&p, &f);
        assert_eq!(kinds(&v), ["DEPLOYMENT_COVERAGE"]);
        assert_eq!(v[0].subject, "features/new-cart");
        lax.require_change_reference = true;
        lax.require_deployment_coverage = false;
        assert!(
            check(&lax, &f).is_empty(),
            "coverage is checked only when asked"
        );
    }

    #[test]
    fn the_dry_run_lists_every_violation_at_once() {
        let w = freeze();
        let f = Facts {
            now_ms: 150 * H,
            freeze_windows: &w,
            starting: true,
            starts_ms: vec![
                150 * H - H,
                150 * H - 2 * H,
                150 * H - 3 * DAY_MS,
                150 * H - 4 * DAY_MS,
                150 * H - 5 * DAY_MS,
            ],
            previous: Some(("staging", None)),
            approvals: vec![],
            change_reference: "",
            emergency: false,
            protected: false,
            undeployed: vec![("new-cart".into(), "not deployed".into())],
        };
        assert_eq!(
            kinds(&check(&strict(), &f)),
            [
                "FREEZE_WINDOW",
                "CADENCE_DAY",
                "CADENCE_WEEK",
                "SOAK_TIME",
                "APPROVALS",
                "CHANGE_REFERENCE",
                "DEPLOYMENT_COVERAGE"
            ]
        );
    }
}
