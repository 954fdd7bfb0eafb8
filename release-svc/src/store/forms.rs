//! The stored forms of features, releases and policies (JSON bodies beside their
//! columns), one for both backends, decoded strictly: a row that does not decode is
//! INTERNAL naming its table and row (see [`Error::corrupt`]), never a default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{AuditEntry, Withdrawal};
use crate::domain::model::{
    Approval, Carrier, EmergencyOverride, Feature, Governance, Release, ReleaseEnvironment,
    ReleaseState, Step,
};
use crate::domain::placements::PlacementState;
use crate::domain::policy::Policy;
use crate::domain::rules::Rule;
use crate::domain::PreconditionViolation;
use crate::domain::{Error, Result};

pub(super) fn internal(e: impl std::error::Error) -> Error {
    Error::internal(e)
}

/// A stored row that cannot be decoded: see [`Error::corrupt`].
pub(super) fn corrupt(
    table: &str,
    row: &dyn std::fmt::Display,
    e: impl std::fmt::Display,
) -> Error {
    Error::corrupt(table, row, e)
}

/// A placement's stored state, strictly.
pub(super) fn placement_state(code: i64, deployment: i64, target: &str) -> Result<PlacementState> {
    PlacementState::from_code(code).ok_or_else(|| {
        corrupt(
            "placements",
            &format!("{deployment}/{target}"),
            format!("unknown state {code}"),
        )
    })
}

/// The stored form of a feature's mutable fields.
#[derive(Serialize, Deserialize)]
struct FeatureBody {
    description: String,
    owner: String,
    variants: BTreeMap<String, serde_json::Value>,
    default_variant: String,
    off_variant: String,
    targeting: Option<serde_json::Value>,
    allow: Vec<String>,
    deny: Vec<String>,
    carriers: Vec<CarrierBody>,
    disabled: bool,
    /// Absent in rows written before features had metadata.
    #[serde(default)]
    metadata: BTreeMap<String, serde_json::Value>,
    /// When the feature was archived; absent while it is live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    archived_ms: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct CarrierBody {
    artifact: String,
    min_version: String,
    required_coverage: f64,
}

#[derive(Serialize, Deserialize)]
struct EnvBody {
    environment: String,
    rollout_percent: f64,
    #[serde(default)]
    steps: Vec<(f64, i64)>,
    #[serde(default)]
    step: Option<usize>,
    #[serde(default)]
    step_since_ms: i64,
    #[serde(default)]
    started_ms: Option<i64>,
    #[serde(default)]
    full_since_ms: Option<i64>,
}

impl EnvBody {
    fn from(e: &ReleaseEnvironment) -> Self {
        Self {
            environment: e.environment.clone(),
            rollout_percent: e.rollout_percent,
            steps: e
                .steps
                .iter()
                .map(|s| (s.percent, s.min_duration_ms))
                .collect(),
            step: e.step,
            step_since_ms: e.step_since_ms,
            started_ms: e.started_ms,
            full_since_ms: e.full_since_ms,
        }
    }

    fn into_model(self) -> ReleaseEnvironment {
        ReleaseEnvironment {
            environment: self.environment,
            rollout_percent: self.rollout_percent,
            steps: self
                .steps
                .into_iter()
                .map(|(percent, min_duration_ms)| Step {
                    percent,
                    min_duration_ms,
                })
                .collect(),
            step: self.step,
            step_since_ms: self.step_since_ms,
            started_ms: self.started_ms,
            full_since_ms: self.full_since_ms,
        }
    }
}

/// The stored form of [`Governance`].
#[derive(Serialize, Deserialize, Default)]
struct GovernanceBody {
    #[serde(default)]
    requester: String,
    #[serde(default)]
    change_reference: String,
    #[serde(default)]
    planned_start_ms: i64,
    #[serde(default)]
    approvals: Vec<(String, i64)>,
    #[serde(default)]
    emergency: Option<(String, String)>,
    #[serde(default)]
    waiting: Vec<(String, String, String)>,
}

fn governance_body(g: &Governance) -> Result<String> {
    serde_json::to_string(&GovernanceBody {
        requester: g.requester.clone(),
        change_reference: g.change_reference.clone(),
        planned_start_ms: g.planned_start_ms,
        approvals: g
            .approvals
            .iter()
            .map(|a| (a.principal.clone(), a.time_ms))
            .collect(),
        emergency: g
            .emergency
            .as_ref()
            .map(|e| (e.reason.clone(), e.approver.clone())),
        waiting: g
            .waiting
            .iter()
            .map(|v| (v.kind.clone(), v.subject.clone(), v.description.clone()))
            .collect(),
    })
    .map_err(internal)
}

pub(super) fn governance_from(text: &str) -> Result<Governance> {
    let b: GovernanceBody = serde_json::from_str(text).map_err(internal)?;
    Ok(Governance {
        requester: b.requester,
        change_reference: b.change_reference,
        planned_start_ms: b.planned_start_ms,
        approvals: b
            .approvals
            .into_iter()
            .map(|(principal, time_ms)| Approval { principal, time_ms })
            .collect(),
        emergency: b
            .emergency
            .map(|(reason, approver)| EmergencyOverride { reason, approver }),
        waiting: b
            .waiting
            .into_iter()
            .map(|(k, s, d)| PreconditionViolation::new(k, s, d))
            .collect(),
    })
}

/// A release from its stored columns.
#[allow(clippy::too_many_arguments)]
pub(super) fn release_from(
    id: i64,
    description: String,
    features: &str,
    envs: String,
    state: i64,
    revision: i64,
    create_ms: i64,
    update_ms: i64,
    governance: &str,
) -> Result<Release> {
    let envs: Vec<EnvBody> = serde_json::from_str(&envs).map_err(internal)?;
    Ok(Release {
        id,
        description,
        features: serde_json::from_str(features).map_err(internal)?,
        environments: envs.into_iter().map(EnvBody::into_model).collect(),
        state: ReleaseState::from_code(state)
            .ok_or_else(|| Error::internal_message("bad release state"))?,
        governance: governance_from(governance)?,
        revision,
        create_ms,
        update_ms,
    })
}

/// The stored form of a policy's rules.
pub(super) fn policy_body(policy: &Policy) -> Result<String> {
    serde_json::to_string(&PolicyBody {
        max_releases_per_day: policy.max_releases_per_day,
        max_releases_per_week: policy.max_releases_per_week,
        min_soak_ms: policy.min_soak_ms,
        required_approvals: policy.required_approvals,
        approvers: policy.approvers.clone(),
        require_change_reference: policy.require_change_reference,
        require_deployment_coverage: policy.require_deployment_coverage,
    })
    .map_err(internal)
}

/// A policy from its stored columns.
pub(super) fn policy_from(
    environment: String,
    body: &str,
    revision: i64,
    update_ms: i64,
) -> Result<Policy> {
    let b: PolicyBody = serde_json::from_str(body).map_err(internal)?;
    Ok(Policy {
        environment,
        max_releases_per_day: b.max_releases_per_day,
        max_releases_per_week: b.max_releases_per_week,
        min_soak_ms: b.min_soak_ms,
        required_approvals: b.required_approvals,
        approvers: b.approvers,
        require_change_reference: b.require_change_reference,
        require_deployment_coverage: b.require_deployment_coverage,
        revision,
        update_ms,
    })
}

/// The stored form of a [`Policy`]'s rules.
#[derive(Serialize, Deserialize)]
struct PolicyBody {
    max_releases_per_day: u32,
    max_releases_per_week: u32,
    min_soak_ms: i64,
    required_approvals: u32,
    approvers: Vec<String>,
    require_change_reference: bool,
    #[serde(default)]
    require_deployment_coverage: bool,
}

/// The `auto.withdraw` audit records of withdrawals.
pub(super) fn withdrawal_entries(withdrawals: &[Withdrawal]) -> Vec<AuditEntry> {
    withdrawals
        .iter()
        .map(|w| AuditEntry {
            time_ms: w.time_ms,
            principal: "system".into(),
            action: "auto.withdraw".into(),
            resource: format!("features/{}", w.feature),
            before: format!("visible in {}", w.environment),
            after: format!("withdrawn from {}", w.environment),
            request_id: String::new(),
            reason: format!("{} (placement sequence {})", w.reason, w.sequence),
        })
        .collect()
}

pub(super) fn feature_body(f: &Feature) -> Result<String> {
    serde_json::to_string(&FeatureBody {
        description: f.description.clone(),
        owner: f.owner.clone(),
        variants: (*f.variants).clone(),
        default_variant: f.default_variant.clone(),
        off_variant: f.off_variant.clone(),
        targeting: f.targeting.as_ref().map(|r| r.to_json()),
        allow: f.allow.clone(),
        deny: f.deny.clone(),
        carriers: f
            .carriers
            .iter()
            .map(|c| CarrierBody {
                artifact: c.artifact.clone(),
                min_version: c.min_version.to_string(),
                required_coverage: c.required_coverage,
            })
            .collect(),
        disabled: f.disabled,
        metadata: f.metadata.clone(),
        archived_ms: f.archived_ms,
    })
    .map_err(internal)
}

pub(super) fn feature_from(
    key: String,
    body: &str,
    revision: i64,
    create_ms: i64,
    update_ms: i64,
) -> Result<Feature> {
    let b: FeatureBody = serde_json::from_str(body).map_err(internal)?;
    let targeting = match b.targeting {
        Some(v) => Some(Rule::parse(&v.to_string()).map_err(Error::internal_message)?),
        None => None,
    };
    let carriers = b
        .carriers
        .into_iter()
        .map(|c| {
            Ok(Carrier {
                artifact: c.artifact,
                min_version: semver::Version::parse(&c.min_version).map_err(internal)?,
                required_coverage: c.required_coverage,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Feature {
        key,
        description: b.description,
        owner: b.owner,
        variants: b.variants.into(),
        default_variant: b.default_variant,
        off_variant: b.off_variant,
        targeting,
        allow: b.allow,
        deny: b.deny,
        carriers,
        disabled: b.disabled,
        metadata: b.metadata,
        revision,
        create_ms,
        update_ms,
        archived_ms: b.archived_ms,
    })
}

pub(super) fn release_columns(r: &Release) -> Result<(String, String, String)> {
    let features = serde_json::to_string(&r.features).map_err(internal)?;
    let envs: Vec<EnvBody> = r.environments.iter().map(EnvBody::from).collect();
    Ok((
        features,
        serde_json::to_string(&envs).map_err(internal)?,
        governance_body(&r.governance)?,
    ))
}
