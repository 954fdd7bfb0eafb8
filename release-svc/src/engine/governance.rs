//! Release planning and governance on the engine: environment policies, the policy check
//! (dry run and real transitions alike), approvals, emergency overrides, and the scheduler
//! step that advances planned releases on their own.
//!
//! The change calendar (freeze windows) and the `protected` flag are deploy-svc's, on its
//! environments: one calendar for both practices. The engine reads them through
//! [`Calendar`] before taking its lock; when deploy-svc cannot be asked, the check fails
//! closed with a `CALENDAR_UNAVAILABLE` violation.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use calendar::FreezeWindow;

use super::{release_summary, AuditBy, Caller, Engine, State};
use crate::domain::evaluate::Scope;
use crate::domain::model::{
    Approval, EmergencyOverride, Millis, Release, ReleaseState, Transition,
};
use crate::domain::policy::{self, Facts, Policy};
use crate::domain::{Error, PreconditionViolation, Result};
use crate::store::AuditEntry;

/// deploy-svc's side of an environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnvironmentFacts {
    /// Changes there need a change reference.
    pub protected: bool,
    /// The change calendar's freeze windows.
    pub freeze_windows: Vec<FreezeWindow>,
}

/// Where freeze windows and protection come from (deploy-svc in production).
#[async_trait]
pub trait Calendar: Send + Sync + 'static {
    /// The environment's calendar facts, or why they cannot be read.
    async fn environment(&self, environment: &str)
        -> std::result::Result<EnvironmentFacts, String>;
}

/// What a check knows about one environment from the calendar.
pub(super) type CalendarRead = std::result::Result<EnvironmentFacts, String>;

impl Engine {
    /// The stored policy of `environment` (an empty one, revision 0, if none was set).
    pub async fn policy(&self, environment: &str) -> Policy {
        self.state.lock().await.policy(environment)
    }

    /// Writes an environment's policy; `etag`, if given, must be the stored revision
    /// (ABORTED otherwise).
    pub async fn set_policy(
        &self,
        mut policy: Policy,
        etag: Option<i64>,
        actor: &Caller,
    ) -> Result<Policy> {
        let mut state = self.state.lock().await;
        let current = state.policies.get(&policy.environment).cloned();
        let stored = current.as_ref().map_or(0, |p| p.revision);
        if etag.is_some_and(|e| e != stored) {
            return Err(Error::Aborted(format!(
                "policies/{} is at etag {stored}; read it again and retry",
                policy.environment
            )));
        }
        let now = self.clock.now_ms();
        policy.revision = stored + 1;
        policy.update_ms = now;
        let mut audit = actor.audit(now, "SetPolicy", format!("policies/{}", policy.environment));
        audit.before = current.as_ref().map(policy_summary).unwrap_or_default();
        audit.after = policy_summary(&policy);
        self.store.put_policy(policy.clone(), stored, audit).await?;
        state
            .policies
            .insert(policy.environment.clone(), policy.clone());
        Ok(policy)
    }

    /// Reads the calendar of every environment of release `id` (outside the state lock).
    async fn calendars(&self, id: i64) -> Result<Vec<(String, CalendarRead)>> {
        let envs: Vec<String> = {
            let state = self.state.lock().await;
            state
                .releases
                .get(&id)
                .ok_or_else(|| Error::NotFound(format!("releases/{id}")))?
                .environments
                .iter()
                .map(|e| e.environment.clone())
                .collect()
        };
        let mut out = Vec::new();
        for env in envs {
            let read = self.calendar.environment(&env).await;
            out.push((env, read));
        }
        Ok(out)
    }

    /// Every policy `next` violates in environment `index`, `current` being the release
    /// before the change.
    pub(super) fn violations(
        &self,
        state: &State,
        current: &Release,
        next: &Release,
        index: usize,
        calendar: Option<&CalendarRead>,
        now: Millis,
    ) -> Vec<PreconditionViolation> {
        let Some(env) = next.environments.get(index) else {
            return Vec::new();
        };
        let name = env.environment.as_str();
        let mut out = Vec::new();
        let facts_env = match calendar {
            Some(Ok(f)) => f.clone(),
            Some(Err(why)) => {
                out.push(PreconditionViolation::new(
                    "CALENDAR_UNAVAILABLE",
                    format!("environments/{name}"),
                    format!("deploy-svc's change calendar cannot be read ({why}); retry when it is reachable"),
                ));
                EnvironmentFacts::default()
            }
            None => EnvironmentFacts::default(),
        };
        let policy = state.policy(name);
        let previous = index.checked_sub(1).and_then(|i| {
            next.environments
                .get(i)
                .map(|p| (p.environment.as_str(), p.full_since_ms))
        });
        let approvals: BTreeSet<&str> = next
            .governance
            .approvals
            .iter()
            .map(|a| a.principal.as_str())
            .collect();
        let facts = Facts {
            now_ms: now,
            freeze_windows: &facts_env.freeze_windows,
            protected: facts_env.protected,
            starting: current
                .environments
                .get(index)
                .is_none_or(|e| e.started_ms.is_none()),
            starts_ms: starts_ms(state, next.id, name),
            previous,
            approvals: approvals.into_iter().collect(),
            change_reference: &next.governance.change_reference,
            emergency: next.governance.emergency.is_some(),
            undeployed: undeployed(state, next, name),
        };
        out.extend(policy::check(&policy, &facts));
        out
    }

    /// Applies a release transition by `actor`. A change that makes a release more visible
    /// in an environment (a higher rollout, a plan step) must satisfy that environment's
    /// policies: otherwise FAILED_PRECONDITION listing every violation, as CheckRelease
    /// reports them. `reason` is recorded (the kill switch's why, for example).
    pub async fn transition(
        &self,
        id: i64,
        t: Transition,
        actor: &Caller,
        action: &str,
        reason: &str,
    ) -> Result<Release> {
        // Only a change that may make the release more visible reads the calendar: the kill
        // switch (Pause, Rollback) and Cancel never wait on deploy-svc.
        let widening = matches!(
            t,
            Transition::SetRollout { .. } | Transition::Step { .. } | Transition::Resume
        );
        let calendars = if widening {
            self.calendars(id).await?
        } else {
            Vec::new()
        };
        let mut state = self.state.lock().await;
        let current = state.release(id)?;
        let now = self.clock.now_ms();
        let mut next = current.clone();
        next.apply(&t)
            .map_err(|why| Error::precondition("RELEASE_STATE", format!("releases/{id}"), why))?;
        let mut violations = Vec::new();
        let mut frozen = false;
        // Becoming active again (resume, or a rollout on a paused release) widens every
        // environment with a rollout; otherwise those whose rollout goes up.
        let reactivated = !current.state.is_active() && next.state.is_active();
        if widening {
            for (i, (e, before)) in next
                .environments
                .iter()
                .zip(&current.environments)
                .enumerate()
            {
                let widens = e.rollout_percent > before.rollout_percent
                    || (reactivated && e.rollout_percent > 0.0);
                if widens {
                    let cal = calendar_of(&calendars, &e.environment);
                    frozen |= frozen_now(cal, now);
                    violations.extend(self.violations(&state, &current, &next, i, cal, now));
                }
            }
        }
        if !violations.is_empty() {
            return Err(Error::FailedPrecondition(violations));
        }
        next.stamp(&current, now);
        next.governance.waiting.clear();
        let mut audit = release_audit(actor, now, action, &current, &next);
        audit.reason = reason.to_owned();
        let mut records = vec![audit];
        if frozen {
            records.push(override_record(actor, now, id, &next));
        }
        self.commit(&mut state, &current, next, records).await
    }

    /// Writes `next` (replacing `current`) with its audit records and announces it.
    async fn commit(
        &self,
        state: &mut State,
        current: &Release,
        mut next: Release,
        audit: Vec<AuditEntry>,
    ) -> Result<Release> {
        next.revision = current.revision + 1;
        next.update_ms = self.clock.now_ms();
        self.store
            .update_release(next.clone(), current.revision, audit)
            .await?;
        state.releases.insert(next.id, next.clone());
        let scope = Scope::Keys(next.features.iter().cloned().collect());
        self.publish(
            state,
            scope,
            format!("release releases/{} {:?}", next.id, next.state),
        );
        Ok(next)
    }

    /// The dry run: every violation taking step `step` of the plan in `environment` would
    /// meet now (with no plan, `step` is ignored and a rollout increase is assumed).
    pub async fn check_release(
        &self,
        id: i64,
        environment: &str,
        step: usize,
    ) -> Result<Vec<PreconditionViolation>> {
        let calendars = self.calendars(id).await?;
        let state = self.state.lock().await;
        let current = state.release(id)?;
        let index = current
            .environments
            .iter()
            .position(|e| e.environment == environment)
            .ok_or_else(|| {
                Error::invalid(
                    "environment",
                    format!("{environment:?} is not an environment of releases/{id}"),
                )
            })?;
        let now = self.clock.now_ms();
        let mut next = current.clone();
        let t = if current.planned() {
            Transition::Step {
                environment: index,
                step,
                now_ms: now,
            }
        } else {
            Transition::SetRollout {
                environment: environment.to_owned(),
                percent: 100.0,
            }
        };
        let mut out = Vec::new();
        if let Err(why) = next.apply(&t) {
            // As an APPROVED release would: the policies are still worth listing.
            out.push(PreconditionViolation::new(
                "RELEASE_STATE",
                format!("releases/{id}"),
                why,
            ));
        }
        let cal = calendar_of(&calendars, environment);
        out.extend(self.violations(&state, &current, &next, index, cal, now));
        Ok(out)
    }

    /// Records `actor`'s approval of release `id`. The requester cannot approve their own
    /// release, and only a principal holding the approver role of one of the release's
    /// environments can approve. A PLANNED release whose approvals satisfy every
    /// environment's policy becomes APPROVED.
    pub async fn approve(&self, id: i64, actor: &Caller) -> Result<Release> {
        let mut state = self.state.lock().await;
        let current = state.release(id)?;
        let subject = format!("releases/{id}");
        if !matches!(
            current.state,
            ReleaseState::Draft
                | ReleaseState::Planned
                | ReleaseState::Approved
                | ReleaseState::Releasing
        ) {
            return Err(Error::precondition(
                "RELEASE_STATE",
                subject,
                format!(
                    "a {:?} release takes no approvals (only DRAFT, PLANNED, APPROVED and RELEASING do)",
                    current.state
                ),
            ));
        }
        if actor.principal == current.governance.requester {
            return Err(Error::precondition(
                "SEPARATION_OF_DUTIES",
                subject,
                format!(
                    "{} requested this release and cannot approve it",
                    actor.principal
                ),
            ));
        }
        let holds_role = current.environments.iter().any(|e| {
            state
                .policies
                .get(&e.environment)
                .is_some_and(|p| p.approvers.contains(&actor.principal))
        });
        if !holds_role {
            return Err(Error::precondition(
                "APPROVER_ROLE",
                subject,
                format!(
                    "{} holds the approver role of none of the release's environments",
                    actor.principal
                ),
            ));
        }
        if current
            .governance
            .approvals
            .iter()
            .any(|a| a.principal == actor.principal)
        {
            return Ok(current);
        }
        let now = self.clock.now_ms();
        let mut next = current.clone();
        next.governance.approvals.push(Approval {
            principal: actor.principal.clone(),
            time_ms: now,
        });
        promote_if_approved(&state, &mut next);
        let audit = release_audit(actor, now, "ApproveRelease", &current, &next);
        self.commit(&mut state, &current, next, vec![audit]).await
    }

    /// DRAFT -> PLANNED (-> APPROVED at once when no policy asks for approvals).
    pub async fn submit(&self, id: i64, actor: &Caller) -> Result<Release> {
        let mut state = self.state.lock().await;
        let current = state.release(id)?;
        let mut next = current.clone();
        next.apply(&Transition::Submit)
            .map_err(|why| Error::precondition("RELEASE_STATE", format!("releases/{id}"), why))?;
        promote_if_approved(&state, &mut next);
        let now = self.clock.now_ms();
        let audit = release_audit(actor, now, "SubmitRelease", &current, &next);
        self.commit(&mut state, &current, next, vec![audit]).await
    }

    /// Records an emergency override on release `id`: it may then pass freeze windows. The
    /// approver must differ from the requester.
    pub async fn emergency_override(
        &self,
        id: i64,
        reason: String,
        approver: String,
        caller_is_approver: bool,
        actor: &Caller,
    ) -> Result<Release> {
        let mut state = self.state.lock().await;
        let current = state.release(id)?;
        if approver == current.governance.requester
            || (approver == actor.principal && !caller_is_approver)
        {
            return Err(Error::precondition(
                "SEPARATION_OF_DUTIES",
                format!("releases/{id}"),
                "the override's approver must be someone other than the requester and the caller",
            ));
        }
        let mut next = current.clone();
        next.governance.emergency = Some(EmergencyOverride {
            reason: reason.clone(),
            approver: approver.clone(),
        });
        let mut audit = actor.audit(
            self.clock.now_ms(),
            "SetEmergencyOverride",
            format!("releases/{id}"),
        );
        audit.after = format!("emergency override approved by {approver}");
        audit.reason = reason;
        self.commit(&mut state, &current, next, vec![audit]).await
    }

    /// One scheduler pass: every APPROVED or RELEASING plan whose start time has come and
    /// whose current step has lasted its minimum takes its next step if the policies allow,
    /// and otherwise records why it waits. Returns the releases that advanced.
    pub async fn tick(&self) -> Result<Vec<i64>> {
        let now = self.clock.now_ms();
        let due: Vec<i64> = {
            let state = self.state.lock().await;
            state
                .releases
                .values()
                .filter(|r| {
                    matches!(r.state, ReleaseState::Approved | ReleaseState::Releasing)
                        && r.planned()
                        && now >= r.governance.planned_start_ms
                        && r.step_elapsed(now)
                        && r.next_step().is_some()
                })
                .map(|r| r.id)
                .collect()
        };
        let mut advanced = Vec::new();
        for id in due {
            // One release that cannot advance now (a concurrent edit, the store) does not
            // hold back the others.
            match self.advance(id, now).await {
                Ok(true) => advanced.push(id),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(release = %format!("releases/{id}"), error = %e, "plan step not taken; retrying at the next pass")
                }
            }
        }
        self.report_waits(now).await;
        Ok(advanced)
    }

    /// Sets the waiting gauges from the releases as they stand after a pass: how many wait
    /// on each rule, the longest wait past a step's due time, and how many are overdue.
    async fn report_waits(&self, now: Millis) {
        use crate::telemetry::{self, RULES};
        let state = self.state.lock().await;
        let mut by_rule: BTreeMap<&'static str, usize> = BTreeMap::new();
        let (mut longest, mut overdue) = (0, 0);
        for r in state.releases.values() {
            if r.governance.waiting.is_empty() {
                continue;
            }
            let rules: BTreeSet<_> = r
                .governance
                .waiting
                .iter()
                .map(|v| telemetry::rule_label(&v.kind))
                .collect();
            for rule in rules {
                *by_rule.entry(rule).or_default() += 1;
            }
            let waited = now.saturating_sub(r.step_due_ms());
            longest = longest.max(waited);
            let step = r.next_step_min_duration_ms();
            if waited > step.max(telemetry::OVERDUE_FLOOR_MS) {
                overdue += 1;
            }
        }
        for rule in RULES.iter().copied().chain(["OTHER"]) {
            let n = by_rule.get(rule).copied().unwrap_or(0);
            metrics::gauge!(telemetry::RELEASES_WAITING, "rule" => rule).set(n as f64);
        }
        metrics::gauge!(telemetry::LONGEST_WAIT).set(longest as f64 / 1000.0);
        metrics::gauge!(telemetry::RELEASES_OVERDUE).set(f64::from(overdue));
    }

    /// Takes the next step of release `id` if the policies allow; else records why not.
    async fn advance(&self, id: i64, now: Millis) -> Result<bool> {
        let calendars = self.calendars(id).await?;
        let mut state = self.state.lock().await;
        let Some(current) = state.releases.get(&id).cloned() else {
            return Ok(false);
        };
        let Some((index, step)) = current.next_step() else {
            return Ok(false);
        };
        if !matches!(
            current.state,
            ReleaseState::Approved | ReleaseState::Releasing
        ) {
            return Ok(false);
        }
        let mut next = current.clone();
        next.apply(&Transition::Step {
            environment: index,
            step,
            now_ms: now,
        })
        .map_err(Error::Internal)?;
        let env = next.environments[index].environment.clone();
        let cal = calendar_of(&calendars, &env);
        let violations = self.violations(&state, &current, &next, index, cal, now);
        let system = Caller::system();
        if !violations.is_empty() {
            // The same rules still block: nothing new to record (descriptions such as the
            // soak time elapsed change every minute and are not a new reason).
            let rules = |v: &[PreconditionViolation]| {
                v.iter()
                    .map(|v| (v.kind.clone(), v.subject.clone()))
                    .collect::<Vec<_>>()
            };
            if rules(&current.governance.waiting) == rules(&violations) {
                return Ok(false);
            }
            let started: BTreeSet<_> = violations
                .iter()
                .map(|v| crate::telemetry::rule_label(&v.kind))
                .collect();
            for rule in started {
                metrics::counter!(crate::telemetry::SCHEDULER_WAITS, "rule" => rule).increment(1);
            }
            let mut waiting = current.clone();
            waiting.governance.waiting = violations.clone();
            let mut audit = system.audit(now, "auto.wait", format!("releases/{id}"));
            audit.after = format!("waiting before step {} in {env}", step + 1);
            audit.reason = violations
                .iter()
                .map(|v| v.kind.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            self.commit(&mut state, &current, waiting, vec![audit])
                .await?;
            return Ok(false);
        }
        let frozen = frozen_now(cal, now);
        next.stamp(&current, now);
        next.governance.waiting.clear();
        let mut audit = release_audit(&system, now, "auto.advance", &current, &next);
        audit.reason = format!("step {} of {env}", step + 1);
        let mut records = vec![audit];
        if frozen {
            records.push(override_record(&system, now, id, &next));
        }
        self.commit(&mut state, &current, next, records).await?;
        Ok(true)
    }
}

/// When the releases other than `id` started in environment `name`.
fn starts_ms(state: &State, id: i64, name: &str) -> Vec<Millis> {
    state
        .releases
        .values()
        .filter(|r| r.id != id)
        .filter_map(|r| {
            r.environments
                .iter()
                .find(|e| e.environment == name)
                .and_then(|e| e.started_ms)
        })
        .collect()
}

/// The features of `release` not deployed at their required coverage in environment
/// `name`, with why.
fn undeployed(state: &State, release: &Release, name: &str) -> Vec<(String, String)> {
    let view = state.placements.coverage_view();
    release
        .features
        .iter()
        .filter_map(|k| state.features.get(k))
        .filter_map(|f| {
            view.gate(name, &f.carriers)
                .err()
                .map(|why| (f.key.clone(), why))
        })
        .collect()
}

/// A PLANNED release becomes APPROVED when its approvals satisfy every environment.
fn promote_if_approved(state: &State, release: &mut Release) {
    if release.state != ReleaseState::Planned {
        return;
    }
    let approved = release.environments.iter().all(|e| {
        state.policies.get(&e.environment).is_none_or(|p| {
            let valid = release
                .governance
                .approvals
                .iter()
                .filter(|a| p.approvers.contains(&a.principal))
                .count();
            valid >= p.required_approvals as usize
        })
    });
    if approved {
        let _ = release.apply(&Transition::Approve);
    }
}

/// The audit record of `actor`'s `action` changing `current` into `next`.
fn release_audit(
    actor: &Caller,
    now: Millis,
    action: &str,
    current: &Release,
    next: &Release,
) -> AuditEntry {
    let mut audit = actor.audit(now, action, format!("releases/{}", current.id));
    audit.before = release_summary(current);
    audit.after = release_summary(next);
    audit
}

/// What the calendar read says about `environment`, if it was read.
fn calendar_of<'a>(
    calendars: &'a [(String, CalendarRead)],
    environment: &str,
) -> Option<&'a CalendarRead> {
    calendars
        .iter()
        .find(|(n, _)| n == environment)
        .map(|c| &c.1)
}

/// Whether a freeze window of a calendar that could be read covers `now`.
fn frozen_now(calendar: Option<&CalendarRead>, now: Millis) -> bool {
    calendar.is_some_and(|c| {
        c.as_ref()
            .is_ok_and(|f| !calendar::active(&f.freeze_windows, now).is_empty())
    })
}

/// The record of a change that passed a freeze window on an emergency override.
fn override_record(actor: &Caller, now: Millis, id: i64, release: &Release) -> AuditEntry {
    let mut audit = actor.audit(now, "freeze.override", format!("releases/{id}"));
    if let Some(e) = &release.governance.emergency {
        audit.after = format!("passed a freeze window, approved by {}", e.approver);
        audit.reason = format!("EMERGENCY OVERRIDE: {}", e.reason);
    }
    audit
}

/// A one-line summary of a policy for the audit trail.
pub fn policy_summary(p: &Policy) -> String {
    format!(
        "per day {}, per week {}, soak {} ms, approvals {} of {:?}, change reference {}",
        p.max_releases_per_day,
        p.max_releases_per_week,
        p.min_soak_ms,
        p.required_approvals,
        p.approvers,
        if p.require_change_reference {
            "required"
        } else {
            "optional"
        }
    )
}
