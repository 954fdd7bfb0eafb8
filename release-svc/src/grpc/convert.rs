//! Proto <-> domain conversions and request validation, in one place. A bad field becomes a
//! `BadRequest` field violation naming it; all of a request's bad fields are reported at once.

use std::collections::BTreeMap;

use prost_types::value::Kind;
use proto::release::v1 as pb;
use serde_json::{Map, Value};

use crate::domain::evaluate::{Context, Decision, Reason};
use crate::domain::model::{
    Carrier, Feature, Governance, Millis, Release, ReleaseEnvironment, ReleaseState, Step, Variants,
};
use crate::domain::names;
use crate::domain::policy::Policy;
use crate::domain::rules::Rule;
use crate::domain::PreconditionViolation;
use crate::domain::{Result, Violations};
use crate::engine::{EnvironmentUsage, Stale};
use crate::store::AuditEntry;
use crate::store::Withdrawal;

/// A timestamp from milliseconds since the epoch.
pub fn timestamp(ms: Millis) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    })
}

/// Milliseconds since the epoch from a timestamp.
pub fn millis(t: &prost_types::Timestamp) -> Millis {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

/// Milliseconds from a duration (negative durations are refused by the callers).
pub fn duration_ms(d: &prost_types::Duration) -> Millis {
    d.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(d.nanos) / 1_000_000)
}

/// A duration from milliseconds.
pub fn duration(ms: Millis) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    })
}

/// A protobuf Value as JSON.
pub fn to_json(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(to_json).collect()),
    }
}

/// A protobuf Struct as a JSON object.
pub fn struct_to_json(s: &prost_types::Struct) -> Map<String, Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), to_json(v)))
        .collect()
}

/// JSON as a protobuf Value.
pub fn from_json(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(from_json).collect(),
        }),
        Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), from_json(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Most features in one release (and flags in one import).
pub const MAX_RELEASE_FEATURES: usize = 1000;
/// Most environments in one release.
pub const MAX_RELEASE_ENVIRONMENTS: usize = 32;
/// Most rollout steps in one environment of a release.
pub const MAX_STEPS: usize = 100;
/// Most carriers of one feature.
pub const MAX_CARRIERS: usize = 16;
/// Most variants of one feature.
pub const MAX_VARIANTS: usize = 64;
/// Most approvers a policy names.
pub const MAX_APPROVERS: usize = 64;
/// Longest principal name (approvers, emergency approvers, filters).
pub const MAX_PRINCIPAL: usize = 256;

fn text(v: &mut Violations, field: &str, s: &str, max: usize) {
    v.check(field, service_kit::validate::validate_text(s, max));
}

/// Checks a free-text reason (kill switch, rollback, cancel, override): at most
/// [`service_kit::validate::MAX_TEXT`] bytes.
pub fn reason_text(v: &mut Violations, field: &str, s: &str) {
    text(v, field, s, service_kit::validate::MAX_TEXT);
}

/// Checks a principal name given in a request (an emergency approver, a filter).
pub fn principal_text(v: &mut Violations, field: &str, s: &str) {
    text(v, field, s, MAX_PRINCIPAL);
}

/// An etag sent back (quoted or not; empty for none), checked into `v` as `field`.
pub(crate) fn etag(v: &mut Violations, field: &str, etag: &str) -> Option<i64> {
    match etag.trim_matches('"') {
        "" => None,
        e => v.check(
            field,
            e.parse::<i64>()
                .map_err(|_| "is not an etag this service returned".to_owned()),
        ),
    }
}

fn at_most(v: &mut Violations, field: &str, len: usize, max: usize, what: &str) {
    if len > max {
        v.push(field, format!("must have at most {max} {what}, got {len}"));
    }
}

fn keys(v: &mut Violations, field: &str, list: &[String]) {
    if list.len() > 10_000 {
        v.push(field, "must have at most 10000 entries");
    }
    if list.iter().any(|k| k.is_empty() || k.len() > 256) {
        v.push(field, "entries must be 1-256 characters");
    }
}

/// Validates a feature from a create or update request: on create (`create`) the key comes
/// from `feature.key`, on update from `feature.name`; the etag, if any, is returned parsed.
pub fn feature(f: pb::Feature, create: bool) -> Result<(Feature, Option<i64>)> {
    let mut v = Violations::default();
    let key = feature_key(&mut v, &f, create);
    text(
        &mut v,
        "feature.description",
        &f.description,
        service_kit::validate::MAX_TEXT,
    );
    text(&mut v, "feature.owner", &f.owner, 256);
    let (variants, default_variant, off_variant) = feature_variants(&mut v, &f);
    let targeting = if f.targeting.trim().is_empty() {
        None
    } else {
        // Size and depth limits are the rule language's own (imports obey them too).
        v.check("feature.targeting", Rule::parse(&f.targeting))
    };
    let metadata: BTreeMap<String, Value> = f
        .metadata
        .iter()
        .map(|(k, val)| (k.clone(), to_json(val)))
        .collect();
    v.check(
        "feature.metadata",
        crate::domain::values::check_metadata(metadata.iter()),
    );
    keys(&mut v, "feature.allow", &f.allow);
    keys(&mut v, "feature.deny", &f.deny);
    let carriers = feature_carriers(&mut v, &f.carriers);
    let expected = if f.etag.is_empty() {
        None
    } else {
        v.check(
            "feature.etag",
            f.etag
                .trim_matches('"')
                .parse::<i64>()
                .map_err(|_| "is not an etag returned by this service".to_owned()),
        )
    };
    v.finish()?;
    Ok((
        Feature {
            key,
            description: f.description,
            owner: f.owner,
            variants,
            default_variant,
            off_variant,
            targeting,
            allow: f.allow,
            deny: f.deny,
            carriers,
            disabled: f.disabled,
            metadata,
            revision: 0,
            create_ms: 0,
            update_ms: 0,
            archived_ms: None,
        },
        expected,
    ))
}

/// The key of a feature being created (`feature.key`) or updated (`feature.name`).
fn feature_key(v: &mut Violations, f: &pb::Feature, create: bool) -> String {
    if create {
        v.check("feature.key", names::validate_feature_key(&f.key));
        f.key.clone()
    } else {
        v.check("feature.name", names::parse_feature(&f.name))
            .unwrap_or_default()
    }
}

/// A feature's variants (on/off when none are given) and its default and off variants
/// (`on` and `off` when unset), each of which must be one of the variants.
fn feature_variants(v: &mut Violations, f: &pb::Feature) -> (Variants, String, String) {
    let variants: Variants = if f.variants.is_empty() {
        Feature::boolean_variants()
    } else {
        f.variants
            .iter()
            .map(|(k, val)| (k.clone(), to_json(val)))
            .collect::<BTreeMap<String, Value>>()
            .into()
    };
    if variants.len() > MAX_VARIANTS || variants.keys().any(|k| k.is_empty() || k.len() > 128) {
        v.push(
            "feature.variants",
            format!("must have at most {MAX_VARIANTS} variants named by 1-128 characters"),
        );
    }
    v.check(
        "feature.variants",
        crate::domain::values::check_variants(&variants),
    );
    let default_variant = if f.default_variant.is_empty() {
        "on".to_owned()
    } else {
        f.default_variant.clone()
    };
    let off_variant = if f.off_variant.is_empty() {
        "off".to_owned()
    } else {
        f.off_variant.clone()
    };
    if !variants.contains_key(&default_variant) {
        v.push(
            "feature.default_variant",
            format!("{default_variant:?} is not one of the variants"),
        );
    }
    if !variants.contains_key(&off_variant) {
        v.push(
            "feature.off_variant",
            format!("{off_variant:?} is not one of the variants"),
        );
    }
    (variants, default_variant, off_variant)
}

/// A feature's carriers: at most [`MAX_CARRIERS`], each a deploy-svc artifact with a
/// semantic minimum version and a coverage in (0, 1] (0 means 1.0).
fn feature_carriers(v: &mut Violations, list: &[pb::Carrier]) -> Vec<Carrier> {
    at_most(v, "feature.carriers", list.len(), MAX_CARRIERS, "carriers");
    // Exact capacity: the feature keeps this vector for its lifetime (a vector grown by
    // pushes holds room for four carriers, 288 bytes, per feature).
    let mut carriers = Vec::with_capacity(list.len().min(MAX_CARRIERS));
    for (i, c) in list.iter().enumerate() {
        let field = format!("feature.carriers[{i}]");
        if c.artifact.is_empty() || c.artifact.len() > 63 {
            v.push(
                &format!("{field}.artifact"),
                "must be a deploy-svc artifact name",
            );
        }
        let min = v.check(
            &format!("{field}.min_version"),
            semver::Version::parse(&c.min_version)
                .map_err(|e| format!("{:?} is not a semantic version: {e}", c.min_version)),
        );
        let coverage = if c.required_coverage == 0.0 {
            1.0
        } else {
            c.required_coverage
        };
        if !(coverage > 0.0 && coverage <= 1.0) {
            v.push(
                &format!("{field}.required_coverage"),
                "must be in (0, 1] (0 means 1.0)",
            );
        }
        if let Some(min_version) = min {
            carriers.push(Carrier {
                artifact: c.artifact.clone(),
                min_version,
                required_coverage: coverage,
            });
        }
    }
    carriers
}

/// The proto form of a feature.
pub fn feature_pb(f: &Feature) -> pb::Feature {
    pb::Feature {
        name: format!("features/{}", f.key),
        key: f.key.clone(),
        description: f.description.clone(),
        owner: f.owner.clone(),
        variants: f
            .variants
            .iter()
            .map(|(k, v)| (k.clone(), from_json(v)))
            .collect(),
        default_variant: f.default_variant.clone(),
        off_variant: f.off_variant.clone(),
        archive_time: f.archived_ms.and_then(timestamp),
        metadata: f
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), from_json(v)))
            .collect(),
        targeting: f
            .targeting
            .as_ref()
            .map(|r| r.to_json().to_string())
            .unwrap_or_default(),
        allow: f.allow.clone(),
        deny: f.deny.clone(),
        carriers: f
            .carriers
            .iter()
            .map(|c| pb::Carrier {
                artifact: c.artifact.clone(),
                min_version: c.min_version.to_string(),
                required_coverage: c.required_coverage,
            })
            .collect(),
        disabled: f.disabled,
        etag: format!("\"{}\"", f.revision),
        create_time: timestamp(f.create_ms),
        update_time: timestamp(f.update_ms),
    }
}

fn percent(v: &mut Violations, field: &str, p: f64) {
    if !(0.0..=100.0).contains(&p) {
        v.push(field, format!("must be between 0 and 100, got {p}"));
    }
}

/// Validates a CreateRelease request.
pub fn new_release(req: pb::CreateReleaseRequest) -> Result<(Release, Option<String>)> {
    let mut v = Violations::default();
    let r = req.release.unwrap_or_default();
    text(
        &mut v,
        "release.description",
        &r.description,
        service_kit::validate::MAX_TEXT,
    );
    release_lists(&mut v, &r);
    let mut seen = std::collections::HashSet::new();
    for (i, e) in r.environments.iter().enumerate() {
        let twice = !seen.insert(e.environment.clone());
        release_environment(&mut v, i, e, twice);
    }
    text(
        &mut v,
        "release.change_reference",
        &r.change_reference,
        service_kit::validate::MAX_TEXT,
    );
    let planned = r.environments.iter().any(|e| !e.steps.is_empty());
    if planned && r.environments.iter().any(|e| e.steps.is_empty()) {
        v.push(
            "release.environments",
            "a plan needs steps in every environment (or in none)",
        );
    }
    v.check(
        "request_id",
        service_kit::validate::validate_key(&req.request_id),
    );
    v.finish()?;
    Ok((
        draft_release(r),
        (!req.request_id.is_empty()).then_some(req.request_id),
    ))
}

/// A release's features and environments: one to [`MAX_RELEASE_FEATURES`] feature keys and
/// one to [`MAX_RELEASE_ENVIRONMENTS`] environments.
fn release_lists(v: &mut Violations, r: &pb::Release) {
    if r.features.is_empty() {
        v.push("release.features", "must name at least one feature key");
    }
    at_most(
        v,
        "release.features",
        r.features.len(),
        MAX_RELEASE_FEATURES,
        "features",
    );
    at_most(
        v,
        "release.environments",
        r.environments.len(),
        MAX_RELEASE_ENVIRONMENTS,
        "environments",
    );
    for (i, k) in r.features.iter().enumerate() {
        v.check(
            &format!("release.features[{i}]"),
            names::validate_feature_key(k),
        );
    }
    if r.environments.is_empty() {
        v.push("release.environments", "must name at least one environment");
    }
}

/// The `i`th environment of a release (`twice` when an earlier one has the same name): its
/// name, its rollout percentage (0 when it has steps) and its steps.
fn release_environment(v: &mut Violations, i: usize, e: &pb::ReleaseEnvironment, twice: bool) {
    let field = format!("release.environments[{i}]");
    v.check(
        &format!("{field}.environment"),
        names::validate_environment(&e.environment),
    );
    if twice {
        v.push(&format!("{field}.environment"), "is listed twice");
    }
    percent(v, &format!("{field}.rollout_percent"), e.rollout_percent);
    if !e.steps.is_empty() && e.rollout_percent != 0.0 {
        v.push(
            &format!("{field}.rollout_percent"),
            "must be 0 in a planned environment (its steps set it)",
        );
    }
    at_most(
        v,
        &format!("{field}.steps"),
        e.steps.len(),
        MAX_STEPS,
        "steps",
    );
    let mut last = 0.0;
    for (j, step) in e.steps.iter().enumerate() {
        let field = format!("{field}.steps[{j}]");
        if !(step.percent > last && step.percent <= 100.0) {
            v.push(
                &format!("{field}.percent"),
                "must be above the previous step's and at most 100",
            );
        }
        last = step.percent;
        if step
            .min_duration
            .as_ref()
            .is_some_and(|d| duration_ms(d) < 0)
        {
            v.push(&format!("{field}.min_duration"), "must not be negative");
        }
    }
    if !e.steps.is_empty() && last < 100.0 {
        v.push(&format!("{field}.steps"), "must end at 100%");
    }
}

/// The draft a validated CreateRelease request describes.
fn draft_release(r: pb::Release) -> Release {
    Release {
        id: 0,
        description: r.description,
        features: r.features,
        environments: r
            .environments
            .into_iter()
            .map(|e| ReleaseEnvironment {
                environment: e.environment,
                rollout_percent: e.rollout_percent,
                steps: e
                    .steps
                    .iter()
                    .map(|s| Step {
                        percent: s.percent,
                        min_duration_ms: s.min_duration.as_ref().map_or(0, duration_ms),
                    })
                    .collect(),
                ..ReleaseEnvironment::default()
            })
            .collect(),
        state: ReleaseState::Draft,
        governance: Governance {
            change_reference: r.change_reference,
            planned_start_ms: r.planned_start_time.as_ref().map_or(0, millis),
            ..Governance::default()
        },
        revision: 0,
        create_ms: 0,
        update_ms: 0,
    }
}

/// Validates a rollout percentage field.
pub fn rollout(p: f64) -> Result<f64> {
    let mut v = Violations::default();
    percent(&mut v, "rollout_percent", p);
    v.finish()?;
    Ok(p)
}

/// The proto number of a release state.
pub fn release_state(s: ReleaseState) -> i32 {
    match s {
        ReleaseState::Draft => pb::ReleaseState::Draft,
        ReleaseState::Releasing => pb::ReleaseState::Releasing,
        ReleaseState::Released => pb::ReleaseState::Released,
        ReleaseState::Paused => pb::ReleaseState::Paused,
        ReleaseState::RolledBack => pb::ReleaseState::RolledBack,
        ReleaseState::Planned => pb::ReleaseState::Planned,
        ReleaseState::Approved => pb::ReleaseState::Approved,
        ReleaseState::Cancelled => pb::ReleaseState::Cancelled,
    }
    .into()
}

/// The proto form of a release.
pub fn release_pb(r: &Release) -> pb::Release {
    pb::Release {
        name: format!("releases/{}", r.id),
        description: r.description.clone(),
        features: r.features.clone(),
        environments: r
            .environments
            .iter()
            .map(|e| pb::ReleaseEnvironment {
                environment: e.environment.clone(),
                rollout_percent: e.rollout_percent,
                steps: e
                    .steps
                    .iter()
                    .map(|s| pb::RolloutStep {
                        percent: s.percent,
                        min_duration: duration(s.min_duration_ms),
                    })
                    .collect(),
                current_step: e.step.and_then(|s| i32::try_from(s).ok()),
                start_time: e.started_ms.and_then(timestamp),
                full_time: e.full_since_ms.and_then(timestamp),
            })
            .collect(),
        state: release_state(r.state),
        etag: format!("\"{}\"", r.revision),
        create_time: timestamp(r.create_ms),
        update_time: timestamp(r.update_ms),
        requester: r.governance.requester.clone(),
        change_reference: r.governance.change_reference.clone(),
        planned_start_time: (r.governance.planned_start_ms > 0)
            .then(|| timestamp(r.governance.planned_start_ms))
            .flatten(),
        approvals: r
            .governance
            .approvals
            .iter()
            .map(|a| pb::Approval {
                principal: a.principal.clone(),
                time: timestamp(a.time_ms),
            })
            .collect(),
        emergency: r
            .governance
            .emergency
            .as_ref()
            .map(|e| pb::EmergencyOverride {
                reason: e.reason.clone(),
                approver: e.approver.clone(),
            }),
        waiting: violations_pb(&r.governance.waiting),
    }
}

/// The proto form of a release's timeline.
pub fn timeline_pb(t: &crate::engine::Timeline) -> pb::ReleaseTimeline {
    pb::ReleaseTimeline {
        release: Some(release_pb(&t.release)),
        events: t
            .events
            .iter()
            .map(|e| pb::TimelineEvent {
                time: timestamp(e.time_ms),
                kind: e.kind.clone(),
                principal: e.principal.clone(),
                summary: e.summary.clone(),
                reason: e.reason.clone(),
                environment: e.environment.clone(),
            })
            .collect(),
        upcoming: t
            .upcoming
            .iter()
            .map(|u| pb::UpcomingStep {
                environment: u.environment.clone(),
                step: i32::try_from(u.step).unwrap_or(i32::MAX),
                percent: u.percent,
                min_duration: duration(u.min_duration_ms),
                due_time: u.due_ms.and_then(timestamp),
                waiting: violations_pb(&u.waiting),
            })
            .collect(),
    }
}

/// The proto form of one row of the visibility matrix.
pub fn visibility_row_pb(row: &crate::engine::Row) -> pb::FeatureVisibility {
    use crate::engine::Class;
    let class = |c: Class| {
        match c {
            Class::Disabled => pb::VisibilityClass::Disabled,
            Class::NotReleased => pb::VisibilityClass::NotReleased,
            Class::NotDeployed => pb::VisibilityClass::NotDeployed,
            Class::Paused => pb::VisibilityClass::Paused,
            Class::Rollout => pb::VisibilityClass::Rollout,
            Class::Targeted => pb::VisibilityClass::Targeted,
            Class::Static => pb::VisibilityClass::Static,
        }
        .into()
    };
    pb::FeatureVisibility {
        feature: row.feature.key.clone(),
        disabled: row.feature.disabled,
        targeted: row.targeted,
        cells: row
            .cells
            .iter()
            .map(|c| pb::VisibilityCell {
                environment: c.environment.clone(),
                class: class(c.class),
                rollout_percent: c.rollout_percent,
                release: c
                    .release
                    .map(|(id, _)| format!("releases/{id}"))
                    .unwrap_or_default(),
                release_state: c.release.map_or(0, |(_, s)| release_state(s)),
                step: i32::try_from(c.step).unwrap_or(i32::MAX),
                steps: i32::try_from(c.steps).unwrap_or(i32::MAX),
                not_deployed: c.not_deployed.clone(),
                waiting: violations_pb(&c.waiting),
            })
            .collect(),
    }
}

/// The proto form of policy violations.
pub fn violations_pb(v: &[PreconditionViolation]) -> Vec<pb::PolicyViolation> {
    v.iter()
        .map(|v| pb::PolicyViolation {
            r#type: v.kind.clone(),
            subject: v.subject.clone(),
            description: v.description.clone(),
        })
        .collect()
}

/// Validates a SetPolicy request: the policy and the etag it carries.
pub fn policy(p: pb::Policy) -> Result<(Policy, Option<i64>)> {
    let mut v = Violations::default();
    v.check(
        "policy.environment",
        names::validate_environment(&p.environment),
    );
    let min_soak_ms = p.min_soak.as_ref().map_or(0, duration_ms);
    if min_soak_ms < 0 {
        v.push("policy.min_soak", "must not be negative");
    }
    at_most(
        &mut v,
        "policy.approvers",
        p.approvers.len(),
        MAX_APPROVERS,
        "approvers",
    );
    for (i, a) in p.approvers.iter().enumerate() {
        if a.trim().is_empty() || a.len() > MAX_PRINCIPAL {
            v.push(
                &format!("policy.approvers[{i}]"),
                "must be a principal name of 1-256 characters",
            );
        }
    }
    if (p.required_approvals as usize) > p.approvers.len() {
        v.push(
            "policy.required_approvals",
            format!(
                "needs {} approvals but names {} approvers",
                p.required_approvals,
                p.approvers.len()
            ),
        );
    }
    let etag = etag(&mut v, "policy.etag", &p.etag);
    v.finish()?;
    Ok((
        Policy {
            environment: p.environment,
            max_releases_per_day: p.max_releases_per_day,
            max_releases_per_week: p.max_releases_per_week,
            min_soak_ms,
            required_approvals: p.required_approvals,
            approvers: p.approvers,
            require_change_reference: p.require_change_reference,
            require_deployment_coverage: p.require_deployment_coverage,
            revision: 0,
            update_ms: 0,
        },
        etag,
    ))
}

/// The proto form of a policy.
pub fn policy_pb(p: &Policy) -> pb::Policy {
    pb::Policy {
        environment: p.environment.clone(),
        max_releases_per_day: p.max_releases_per_day,
        max_releases_per_week: p.max_releases_per_week,
        min_soak: duration(p.min_soak_ms),
        required_approvals: p.required_approvals,
        approvers: p.approvers.clone(),
        require_change_reference: p.require_change_reference,
        require_deployment_coverage: p.require_deployment_coverage,
        etag: format!("\"{}\"", p.revision),
        update_time: (p.update_ms > 0).then(|| timestamp(p.update_ms)).flatten(),
    }
}

/// The proto form of an audit record.
pub fn audit_pb(id: i64, a: &AuditEntry) -> pb::AuditRecord {
    pb::AuditRecord {
        id,
        time: timestamp(a.time_ms),
        principal: a.principal.clone(),
        action: a.action.clone(),
        resource: a.resource.clone(),
        before: a.before.clone(),
        after: a.after.clone(),
        request_id: a.request_id.clone(),
        reason: a.reason.clone(),
    }
}

/// Longest targeting key.
pub const MAX_TARGETING_KEY: usize = 1024;

/// Validates an evaluation context: environment, targeting key, and the attributes' count,
/// depth and size ([`crate::domain::values`]).
pub fn context(v: &mut Violations, c: Option<pb::EvaluationContext>) -> Context {
    let c = c.unwrap_or_default();
    v.check(
        "context.environment",
        names::validate_environment(&c.environment),
    );
    if c.targeting_key.len() > MAX_TARGETING_KEY {
        v.push(
            "context.targeting_key",
            format!("must be at most {MAX_TARGETING_KEY} bytes"),
        );
    }
    let attributes = c
        .attributes
        .as_ref()
        .map(struct_to_json)
        .unwrap_or_default();
    v.check(
        "context.attributes",
        crate::domain::values::check_context(&attributes),
    );
    Context {
        environment: c.environment,
        targeting_key: c.targeting_key,
        attributes,
    }
}

/// The proto number of a reason.
pub fn reason(r: Reason) -> i32 {
    match r {
        Reason::Disabled => pb::Reason::Disabled,
        Reason::NotReleased => pb::Reason::NotReleased,
        Reason::NotDeployed => pb::Reason::NotDeployed,
        Reason::TargetingMatch => pb::Reason::TargetingMatch,
        Reason::Split => pb::Reason::Split,
        Reason::Default => pb::Reason::Default,
        Reason::Static => pb::Reason::Static,
    }
    .into()
}

/// The proto form of a decision.
pub fn decision(feature: &str, d: Decision, version: u64) -> pb::EvaluateResponse {
    pb::EvaluateResponse {
        feature: feature.to_owned(),
        visible: d.visible,
        variant: d.variant,
        value: Some(from_json(&d.value)),
        reason: reason(d.reason),
        release: d
            .release
            .map(|id| format!("releases/{id}"))
            .unwrap_or_default(),
        snapshot_version: version,
    }
}

/// The proto form of a withdrawal.
pub fn withdrawal(w: &Withdrawal) -> pb::Withdrawal {
    pb::Withdrawal {
        feature: w.feature.clone(),
        environment: w.environment.clone(),
        reason: w.reason.clone(),
        sequence: w.sequence,
        time: timestamp(w.time_ms),
    }
}

/// A feature's usage.
pub fn usage_pb(name: String, environments: &[EnvironmentUsage]) -> pb::FeatureUsage {
    pb::FeatureUsage {
        name,
        last_evaluate_time: environments
            .iter()
            .filter_map(|e| e.last_ms)
            .max()
            .and_then(timestamp),
        environments: environments
            .iter()
            .map(|e| pb::EnvironmentUsage {
                environment: e.environment.clone(),
                last_evaluate_time: e.last_ms.and_then(timestamp),
                variants: e
                    .variants
                    .iter()
                    .map(|v| pb::VariantCount {
                        variant: v.variant.clone(),
                        last_day: v.last_day,
                        last_week: v.last_week,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// A stale feature.
pub fn stale_pb(s: &Stale) -> pb::StaleFeature {
    pb::StaleFeature {
        name: format!("features/{}", s.feature),
        create_time: timestamp(s.create_ms),
        last_evaluate_time: s.last_evaluated_ms.and_then(timestamp),
        not_evaluated: s.not_evaluated,
        fully_released: s
            .fully_released
            .iter()
            .map(|(environment, release, since)| pb::FullyReleased {
                environment: environment.clone(),
                release: format!("releases/{release}"),
                since: timestamp(*since),
            })
            .collect(),
    }
}
