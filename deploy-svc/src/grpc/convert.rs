//! Proto <-> domain conversions, in one place. Every request is validated here, all
//! fields at once; a bad field becomes a `BadRequest` field violation naming it.

use std::collections::BTreeMap;

use prost_types::Timestamp;
use proto::deploy::v1 as pb;

use crate::domain::clock::Millis;
use crate::domain::error::Violations;
use crate::domain::model::{
    Artifact, Deployment, DeploymentState, Environment, EnvironmentUpdate, HealthWindows,
    NewDeployment, NewEnvironment, PageRequest, Placement, PlacementEvent, PlacementReport,
    PlacementState, Target, TargetHealth,
};
use crate::domain::names::{
    self, artifact_version_name, decode_page_token, deployment_name, environment_name, target_name,
    MAX_TEXT,
};
use crate::domain::Result;

/// A timestamp from milliseconds since the epoch.
pub fn timestamp(ms: Millis) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    })
}

/// A page request from a page size and token, reporting bad values against `page_size` and
/// `page_token`.
pub fn page_request(v: &mut Violations, size: i32, token: &str) -> PageRequest {
    let size = v
        .check("page_size", names::page_size(size))
        .unwrap_or_default();
    let after = v.check("page_token", decode_page_token(token)).flatten();
    PageRequest { size, after }
}

fn optional_request_id(v: &mut Violations, request_id: &str) -> Option<String> {
    v.check("request_id", names::validate_key(request_id));
    (!request_id.is_empty()).then(|| request_id.to_owned())
}

fn optional_environment(v: &mut Violations, field: &str, name: &str) -> Option<String> {
    if name.is_empty() {
        None
    } else {
        v.check(field, names::parse_environment(name))
    }
}

fn labels(
    v: &mut Violations,
    field: &str,
    map: &std::collections::HashMap<String, String>,
    max: usize,
) -> BTreeMap<String, String> {
    let map: BTreeMap<_, _> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.check(field, names::validate_map(&map, max));
    map
}

/// Validates a CreateEnvironment request.
pub fn new_environment(
    req: pb::CreateEnvironmentRequest,
) -> Result<(NewEnvironment, Option<String>)> {
    let mut v = Violations::default();
    v.check("environment_id", names::validate_id(&req.environment_id));
    let env = req.environment.unwrap_or_default();
    v.check(
        "environment.description",
        names::validate_text(&env.description, MAX_TEXT),
    );
    let upstream = optional_environment(&mut v, "environment.upstream", &env.upstream);
    if upstream.as_deref() == Some(req.environment_id.as_str()) {
        v.push(
            "environment.upstream",
            "an environment cannot be its own upstream",
        );
    }
    let request_id = optional_request_id(&mut v, &req.request_id);
    v.finish()?;
    Ok((
        NewEnvironment {
            id: req.environment_id,
            description: env.description,
            protected: env.protected,
            upstream,
        },
        request_id,
    ))
}

/// Validates an UpdateEnvironment request.
pub fn environment_update(req: pb::UpdateEnvironmentRequest) -> Result<EnvironmentUpdate> {
    let mut v = Violations::default();
    let env = req.environment.unwrap_or_default();
    let id = v
        .check("environment.name", names::parse_environment(&env.name))
        .unwrap_or_default();
    let mut update = EnvironmentUpdate {
        id,
        ..Default::default()
    };
    if !env.etag.is_empty() {
        update.expected_revision = v.check(
            "environment.etag",
            env.etag
                .trim_matches('"')
                .parse::<i64>()
                .map_err(|_| "is not an etag returned by this service".to_owned()),
        );
    }
    let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        v.push(
            "update_mask",
            "must name at least one of description, protected, upstream",
        );
    }
    for path in paths {
        match path.as_str() {
            "description" => {
                v.check(
                    "environment.description",
                    names::validate_text(&env.description, MAX_TEXT),
                );
                update.description = Some(env.description.clone());
            }
            "protected" => update.protected = Some(env.protected),
            "upstream" => {
                let upstream = optional_environment(&mut v, "environment.upstream", &env.upstream);
                if upstream.as_deref() == Some(update.id.as_str()) {
                    v.push(
                        "environment.upstream",
                        "an environment cannot be its own upstream",
                    );
                }
                update.upstream = Some(upstream);
            }
            other => v.push(
                "update_mask",
                format!("{other:?} cannot be updated; use description, protected or upstream"),
            ),
        }
    }
    v.finish()?;
    Ok(update)
}

/// Validates a RegisterTarget request: (environment, target id, labels).
pub fn register_target(
    req: pb::RegisterTargetRequest,
) -> Result<(String, String, BTreeMap<String, String>)> {
    let mut v = Violations::default();
    let env = v
        .check("parent", names::parse_environment(&req.parent))
        .unwrap_or_default();
    v.check("target_id", names::validate_id(&req.target_id));
    let labels = labels(&mut v, "labels", &req.labels, 256);
    v.finish()?;
    Ok((env, req.target_id, labels))
}

/// Validates a RegisterArtifact request.
pub fn new_artifact(req: pb::RegisterArtifactRequest) -> Result<Artifact> {
    let mut v = Violations::default();
    v.check("artifact", names::validate_id(&req.artifact));
    v.check("version", names::validate_version(&req.version));
    v.check("digest", names::validate_digest(&req.digest));
    let metadata = labels(&mut v, "metadata", &req.metadata, MAX_TEXT);
    v.finish()?;
    Ok(Artifact {
        name: req.artifact,
        version: req.version,
        digest: req.digest,
        metadata,
        create_ms: 0,
    })
}

/// Validates a CreateDeployment request.
pub fn new_deployment(req: pb::CreateDeploymentRequest) -> Result<(NewDeployment, Option<String>)> {
    let mut v = Violations::default();
    let d = req.deployment.unwrap_or_default();
    let version = v.check(
        "deployment.artifact_version",
        names::parse_artifact_version(&d.artifact_version),
    );
    let environment = v.check(
        "deployment.environment",
        names::parse_environment(&d.environment),
    );
    v.check(
        "deployment.change_reference",
        names::validate_key(&d.change_reference),
    );
    let request_id = optional_request_id(&mut v, &req.request_id);
    v.finish()?;
    let (artifact, version) = version.unwrap_or_default();
    Ok((
        NewDeployment {
            artifact,
            version,
            environment: environment.unwrap_or_default(),
            change_reference: d.change_reference,
        },
        request_id,
    ))
}

/// Validates a resource name field with `parse`.
pub fn name<T>(field: &str, value: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<T> {
    parse(value).map_err(|d| crate::domain::Error::invalid(field, d))
}

/// A placement state from its proto number, refusing UNSPECIFIED and PENDING.
fn reported_state(v: &mut Violations, state: i32) -> Option<PlacementState> {
    match pb::PlacementState::try_from(state) {
        Ok(pb::PlacementState::Placing) => Some(PlacementState::Placing),
        Ok(pb::PlacementState::Placed) => Some(PlacementState::Placed),
        Ok(pb::PlacementState::Failed) => Some(PlacementState::Failed),
        Ok(pb::PlacementState::Removed) => Some(PlacementState::Removed),
        Ok(pb::PlacementState::Unspecified) => {
            v.push("state", "must be set: PLACING, PLACED, FAILED or REMOVED");
            None
        }
        Ok(pb::PlacementState::Pending) => {
            v.push(
                "state",
                "PENDING is not reportable: use PLACING, PLACED, FAILED or REMOVED",
            );
            None
        }
        Err(_) => {
            v.push("state", format!("unknown placement state {state}"));
            None
        }
    }
}

/// Validates a ReportPlacement request.
pub fn placement_report(req: pb::ReportPlacementRequest) -> Result<PlacementReport> {
    let mut v = Violations::default();
    let deployment = v.check("deployment", names::parse_deployment(&req.deployment));
    let target = v.check("target", names::parse_target(&req.target));
    let state = reported_state(&mut v, req.state);
    v.check("message", names::validate_text(&req.message, MAX_TEXT));
    v.finish()?;
    let (environment, target) = target.unwrap_or_default();
    Ok(PlacementReport {
        deployment: deployment.unwrap_or_default(),
        environment,
        target,
        state: state.unwrap_or(PlacementState::Pending),
        message: req.message,
    })
}

/// Validates a WatchPlacements request.
pub fn watch_request(
    req: pb::WatchPlacementsRequest,
) -> Result<crate::placement_log::WatchRequest> {
    use crate::placement_log::{Start, WatchRequest};
    let mut v = Violations::default();
    let start = match req.start {
        Some(pb::watch_placements_request::Start::AfterSequence(seq)) => Start::After(seq),
        Some(pb::watch_placements_request::Start::Snapshot(true)) => Start::Snapshot,
        Some(pb::watch_placements_request::Start::Snapshot(false)) | None => {
            v.push(
                "start",
                "set after_sequence (resume) or snapshot=true (start from current placements)",
            );
            Start::Snapshot
        }
    };
    let environment = optional_environment(&mut v, "environment", &req.environment);
    let artifact = if req.artifact.is_empty() {
        None
    } else {
        v.check("artifact", names::validate_id(&req.artifact))
            .map(|()| req.artifact.clone())
    };
    let heartbeat = match req.heartbeat_interval_seconds {
        0 => 5,
        s @ 1..=300 => s,
        s => {
            v.push(
                "heartbeat_interval_seconds",
                format!("must be between 1 and 300, got {s}"),
            );
            5
        }
    };
    v.finish()?;
    Ok(WatchRequest {
        start,
        environment,
        artifact,
        heartbeat: std::time::Duration::from_secs(heartbeat.into()),
    })
}

/// The proto form of an environment.
pub fn environment(env: Environment) -> pb::Environment {
    pb::Environment {
        name: environment_name(&env.id),
        description: env.description,
        protected: env.protected,
        upstream: env
            .upstream
            .map(|u| environment_name(&u))
            .unwrap_or_default(),
        promotion_path: env
            .promotion_path
            .iter()
            .map(|e| environment_name(e))
            .collect(),
        etag: format!("\"{}\"", env.revision),
        create_time: timestamp(env.create_ms),
        update_time: timestamp(env.update_ms),
    }
}

/// The proto form of a target, with health computed at `now`.
pub fn target(t: Target, windows: &HealthWindows, now: Millis) -> pb::Target {
    let health = match windows.health(t.heartbeat_ms, now) {
        TargetHealth::Healthy => pb::TargetHealth::Healthy,
        TargetHealth::Stale => pb::TargetHealth::Stale,
        TargetHealth::Lost => pb::TargetHealth::Lost,
    };
    pb::Target {
        name: target_name(&t.environment, &t.id),
        labels: t.labels.into_iter().collect(),
        register_time: timestamp(t.register_ms),
        last_heartbeat_time: timestamp(t.heartbeat_ms),
        health: health.into(),
    }
}

/// The proto form of an artifact version.
pub fn artifact(a: Artifact) -> pb::Artifact {
    pb::Artifact {
        name: artifact_version_name(&a.name, &a.version),
        artifact: a.name,
        version: a.version,
        digest: a.digest,
        metadata: a.metadata.into_iter().collect(),
        create_time: timestamp(a.create_ms),
    }
}

/// The proto number of a deployment state.
pub fn deployment_state(s: DeploymentState) -> i32 {
    match s {
        DeploymentState::Pending => pb::DeploymentState::Pending,
        DeploymentState::InProgress => pb::DeploymentState::InProgress,
        DeploymentState::Succeeded => pb::DeploymentState::Succeeded,
        DeploymentState::Failed => pb::DeploymentState::Failed,
        DeploymentState::Cancelled => pb::DeploymentState::Cancelled,
    }
    .into()
}

/// The proto number of a placement state.
pub fn placement_state(s: PlacementState) -> i32 {
    match s {
        PlacementState::Pending => pb::PlacementState::Pending,
        PlacementState::Placing => pb::PlacementState::Placing,
        PlacementState::Placed => pb::PlacementState::Placed,
        PlacementState::Failed => pb::PlacementState::Failed,
        PlacementState::Removed => pb::PlacementState::Removed,
    }
    .into()
}

/// The proto form of a placement.
pub fn placement(p: &Placement) -> pb::Placement {
    pb::Placement {
        deployment: deployment_name(p.deployment),
        target: target_name(&p.environment, &p.target),
        environment: environment_name(&p.environment),
        artifact: p.artifact.clone(),
        version: p.version.clone(),
        digest: p.digest.clone(),
        state: placement_state(p.state),
        message: p.message.clone(),
        sequence: p.sequence,
        update_time: timestamp(p.update_ms),
    }
}

/// The proto form of a deployment.
pub fn deployment(d: Deployment) -> pb::Deployment {
    pb::Deployment {
        name: deployment_name(d.id),
        artifact_version: artifact_version_name(&d.artifact, &d.version),
        environment: environment_name(&d.environment),
        change_reference: d.change_reference,
        state: deployment_state(d.state),
        placements: d.placements.iter().map(placement).collect(),
        create_time: timestamp(d.create_ms),
        update_time: timestamp(d.update_ms),
    }
}

/// The proto form of a placement event.
pub fn event(e: &PlacementEvent) -> pb::PlacementEvent {
    pb::PlacementEvent {
        sequence: e.sequence,
        commit_time: timestamp(e.commit_ms),
        placement: Some(placement(&e.placement)),
        previous_state: placement_state(e.previous_state),
    }
}
