//! A release's timeline: what happened to it, in time order, and the plan steps still to
//! come, the next one with the time it is due and what it waits on.
//!
//! Composed from the release itself, its audit records (every call and automatic action
//! on `releases/{id}`) and the automatic withdrawals of its features in its environments.
//! Bounded: at most [`MAX_EVENTS`] audit records and the newest [`WITHDRAWALS_SCANNED`]
//! withdrawals are read.

use super::Engine;
use crate::domain::model::{Millis, Release, ReleaseState};
use crate::domain::{PreconditionViolation, Result};
use crate::store::AuditFilter;

/// The most audit records a timeline reads.
pub const MAX_EVENTS: usize = 2000;
/// How many of the newest withdrawals are looked at.
pub const WITHDRAWALS_SCANNED: usize = 1000;

/// One thing that happened to the release.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When.
    pub time_ms: Millis,
    /// The audit action (`CreateRelease`, `ApproveRelease`, `auto.advance`, `auto.wait`,
    /// `freeze.override`, `PauseRelease`, ...), or `auto.withdraw`.
    pub kind: String,
    /// Who (`system` for automatic actions).
    pub principal: String,
    /// The release (or the feature) after it.
    pub summary: String,
    /// Why: the change reference, the kill switch's reason, the rules waited on, the
    /// withdrawal's cause.
    pub reason: String,
    /// The environment, for withdrawals.
    pub environment: String,
}

/// A plan step not taken yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Upcoming {
    /// The environment.
    pub environment: String,
    /// The step, 1-based.
    pub step: usize,
    /// Its rollout percentage.
    pub percent: f64,
    /// How long it lasts at least.
    pub min_duration_ms: Millis,
    /// The next step only: when it became (or becomes) due.
    pub due_ms: Option<Millis>,
    /// The next step only: the rules it waits on.
    pub waiting: Vec<PreconditionViolation>,
}

/// A release, its events oldest first, and its steps to come.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// The release now.
    pub release: Release,
    /// What happened, oldest first.
    pub events: Vec<Event>,
    /// The plan steps not taken yet, in plan order.
    pub upcoming: Vec<Upcoming>,
}

impl Engine {
    /// The timeline of release `id` (NOT_FOUND when there is none).
    pub async fn timeline(&self, id: i64) -> Result<Timeline> {
        let release = self.release(id).await?;
        let mut events = self.audit_events(&format!("releases/{id}")).await?;
        // Its creation, from the release itself when the records read hold none (a
        // release created by ImportFlagd is recorded under that call's name).
        if !events.iter().any(|e| e.kind == "CreateRelease") {
            events.insert(
                0,
                Event {
                    time_ms: release.create_ms,
                    kind: "CreateRelease".into(),
                    principal: release.governance.requester.clone(),
                    summary: release.description.clone(),
                    reason: release.governance.change_reference.clone(),
                    environment: String::new(),
                },
            );
        }
        events.extend(self.withdrawal_events(&release).await?);
        // Stable: records of one instant keep the order they were written in.
        events.sort_by_key(|e| e.time_ms);
        let upcoming = upcoming(&release);
        Ok(Timeline {
            release,
            events,
            upcoming,
        })
    }

    /// The audit records of `resource` itself, oldest first: at most [`MAX_EVENTS`] read,
    /// in pages of 500.
    async fn audit_events(&self, resource: &str) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let mut after_id = 0;
        let mut read = 0;
        while read < MAX_EVENTS {
            let page = self
                .store
                .list_audit(AuditFilter {
                    resource_prefix: resource.to_owned(),
                    exact: true,
                    after_id,
                    limit: 500,
                    ..AuditFilter::default()
                })
                .await?;
            let full = page.len() == 500;
            read += page.len();
            after_id = page.last().map_or(after_id, |(id, _)| *id);
            events.extend(
                page.into_iter()
                    .filter(|(_, a)| a.resource == resource)
                    .map(|(_, a)| Event {
                        time_ms: a.time_ms,
                        kind: a.action,
                        principal: a.principal,
                        summary: a.after,
                        reason: a.reason,
                        environment: String::new(),
                    }),
            );
            if !full {
                break;
            }
        }
        Ok(events)
    }

    /// The automatic withdrawals of `release`'s features in its environments since it was
    /// created, among the newest [`WITHDRAWALS_SCANNED`].
    async fn withdrawal_events(&self, release: &Release) -> Result<Vec<Event>> {
        let withdrawals = self
            .store
            .list_withdrawals(None, WITHDRAWALS_SCANNED)
            .await?;
        Ok(withdrawals
            .into_iter()
            .map(|(_, w)| w)
            .filter(|w| {
                w.time_ms >= release.create_ms
                    && release.features.contains(&w.feature)
                    && release
                        .environments
                        .iter()
                        .any(|e| e.environment == w.environment)
            })
            .map(|w| Event {
                time_ms: w.time_ms,
                kind: "auto.withdraw".into(),
                principal: "system".into(),
                summary: format!("{} hidden in {}", w.feature, w.environment),
                reason: w.reason,
                environment: w.environment,
            })
            .collect())
    }
}

/// The steps after the one each environment is at, in plan order; the first of them (the
/// next step) with its due time and what it waits on.
fn upcoming(release: &Release) -> Vec<Upcoming> {
    let mut out: Vec<Upcoming> = Vec::new();
    if matches!(
        release.state,
        ReleaseState::Cancelled | ReleaseState::RolledBack
    ) {
        return out;
    }
    let next = release.next_step();
    for (i, env) in release.environments.iter().enumerate() {
        let from = match next {
            Some((n, s)) if n == i => s,
            Some((n, _)) if n < i => 0,
            _ => continue,
        };
        for (s, step) in env.steps.iter().enumerate().skip(from) {
            let is_next = next == Some((i, s));
            out.push(Upcoming {
                environment: env.environment.clone(),
                step: s + 1,
                percent: step.percent,
                min_duration_ms: step.min_duration_ms,
                due_ms: is_next.then(|| release.step_due_ms()),
                waiting: if is_next {
                    release.governance.waiting.clone()
                } else {
                    Vec::new()
                },
            });
        }
    }
    out
}
