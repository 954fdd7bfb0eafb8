//! Proto <-> domain conversions, in one place. Every request is validated here, all
//! fields at once; a bad field becomes a `BadRequest` field violation naming it.

use std::collections::{BTreeMap, HashSet};

use calendar::{FreezeWindow, Schedule, WeekTime};
use prost_types::Timestamp;
use proto::deploy::v1 as pb;

use crate::domain::audit::{AuditFilter, AuditRecord};
use crate::domain::clock::Millis;
use crate::domain::error::Violations;
use crate::domain::freeze;
use crate::domain::freeze::MAX_WINDOWS;
use crate::domain::inventory::{EnvironmentInventory, InventoryKey, TargetVersion};
use crate::domain::model::{
    Artifact, Deployment, DeploymentFilter, DeploymentState, EmergencyOverride, Environment,
    EnvironmentUpdate, HealthWindows, NewDeployment, NewEnvironment, Page, PageRequest, Placement,
    PlacementEvent, PlacementReport, PlacementState, Target, TargetHealth,
};
use crate::domain::names::{
    self, artifact_version_name, decode_page_token, deployment_name, environment_name, target_name,
    MAX_KEY, MAX_PAGE_SIZE, MAX_TEXT,
};
use crate::domain::strategy::{Phase, Step, Strategy};
use crate::domain::Result;

/// Default page size of ListAuditRecords (larger than other Lists: records are small and
/// usually read in bulk).
pub const AUDIT_PAGE_SIZE: usize = 100;
/// Longest resource filter of ListAuditRecords.
const MAX_RESOURCE_FILTER: usize = 512;
/// Longest IANA time zone name accepted (the longest real one has 32 characters).
const MAX_TIME_ZONE: usize = 64;

/// A timestamp from milliseconds since the epoch.
pub fn timestamp(ms: Millis) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    })
}

/// Milliseconds since the epoch from a timestamp (sub-millisecond digits are dropped).
pub fn millis(ts: &Timestamp) -> Result<Millis, String> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(format!("nanos must be 0-999999999, got {}", ts.nanos));
    }
    ts.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(ts.nanos / 1_000_000)))
        .filter(|ms| chrono::DateTime::<chrono::Utc>::from_timestamp_millis(*ms).is_some())
        .ok_or_else(|| format!("{} seconds is out of range", ts.seconds))
}

fn required_millis(v: &mut Violations, field: &str, ts: Option<&Timestamp>) -> Option<Millis> {
    match ts {
        None => {
            v.push(field, "is required");
            None
        }
        Some(ts) => v.check(field, millis(ts)),
    }
}

fn day(v: &mut Violations, field: &str, day: i32) -> Option<u32> {
    match pb::DayOfWeek::try_from(day) {
        Ok(pb::DayOfWeek::Unspecified) => {
            v.push(
                field,
                "must be set: DAY_OF_WEEK_MONDAY .. DAY_OF_WEEK_SUNDAY",
            );
            None
        }
        // Calendar days count from 0 = Monday; the proto's from 1 = Monday.
        Ok(d) => u32::try_from(i32::from(d) - 1).ok(),
        Err(_) => {
            v.push(field, format!("unknown day of week {day}"));
            None
        }
    }
}

fn minute(v: &mut Violations, field: &str, text: &str) -> Option<u32> {
    if text.len() > "HH:MM".len() {
        v.push(field, "must be a time of day as HH:MM, for example 18:00");
        return None;
    }
    v.check(field, calendar::parse_minute(text))
}

/// The proto field path of a problem the calendar crate reports.
fn calendar_field(problem: &str) -> &str {
    match problem {
        "absolute.end" => "absolute.end_time",
        "weekly.start" => "weekly.start_time",
        "weekly.end" => "weekly.end_time",
        other => other,
    }
}

/// Validates freeze windows, naming each bad field (`{field}[2].weekly.time_zone`).
pub fn freeze_windows(
    v: &mut Violations,
    field: &str,
    windows: &[pb::FreezeWindow],
) -> Vec<FreezeWindow> {
    if windows.len() > MAX_WINDOWS {
        v.push(
            field,
            format!(
                "must have at most {MAX_WINDOWS} windows, got {}",
                windows.len()
            ),
        );
    }
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(windows.len());
    for (i, w) in windows.iter().enumerate() {
        let at = format!("{field}[{i}]");
        window_name(v, &at, &w.name, &mut names);
        // Fields that fail to parse get a placeholder, and the calendar's own checks of
        // them are skipped, so every field is reported once.
        let (schedule, parsed) = match &w.schedule {
            None => {
                v.push(&format!("{at}.schedule"), "must set absolute or weekly");
                continue;
            }
            Some(pb::freeze_window::Schedule::Absolute(a)) => absolute_schedule(v, &at, a),
            Some(pb::freeze_window::Schedule::Weekly(wk)) => weekly_schedule(v, &at, wk),
        };
        let window = FreezeWindow {
            name: w.name.clone(),
            schedule,
        };
        calendar_problems(v, &at, &window, parsed);
        out.push(window);
    }
    out
}

/// Checks the name of the window at `at`: not empty, valid text, and not one of `seen`
/// (the names of the windows before it, which it joins).
fn window_name<'a>(v: &mut Violations, at: &str, name: &'a str, seen: &mut HashSet<&'a str>) {
    if name.trim().is_empty() {
        v.push(&format!("{at}.name"), "must not be empty");
    } else if v
        .check(&format!("{at}.name"), names::validate_text(name, MAX_KEY))
        .is_some()
        && !seen.insert(name)
    {
        v.push(
            &format!("{at}.name"),
            format!("{name:?} names another window too; window names must be unique"),
        );
    }
}

/// The absolute schedule of the window at `at`, and whether both its times parsed (a
/// time that did not is a placeholder).
fn absolute_schedule(v: &mut Violations, at: &str, a: &pb::AbsoluteWindow) -> (Schedule, bool) {
    let start = required_millis(
        v,
        &format!("{at}.absolute.start_time"),
        a.start_time.as_ref(),
    );
    let end = required_millis(v, &format!("{at}.absolute.end_time"), a.end_time.as_ref());
    (
        Schedule::Absolute {
            start_ms: start.unwrap_or_default(),
            end_ms: end.unwrap_or_default(),
        },
        start.is_some() && end.is_some(),
    )
}

/// The weekly schedule of the window at `at`, and whether its days and times all parsed
/// (one that did not is a placeholder). A time zone that is too long is reported here.
fn weekly_schedule(v: &mut Violations, at: &str, wk: &pb::WeeklyWindow) -> (Schedule, bool) {
    if wk.time_zone.len() > MAX_TIME_ZONE {
        v.push(
            &format!("{at}.weekly.time_zone"),
            format!("must be at most {MAX_TIME_ZONE} characters"),
        );
    }
    let start_day = day(v, &format!("{at}.weekly.start_day"), wk.start_day);
    let start_minute = minute(v, &format!("{at}.weekly.start_time"), &wk.start_time);
    let end_day = day(v, &format!("{at}.weekly.end_day"), wk.end_day);
    let end_minute = minute(v, &format!("{at}.weekly.end_time"), &wk.end_time);
    let parsed =
        start_day.is_some() && start_minute.is_some() && end_day.is_some() && end_minute.is_some();
    (
        Schedule::Weekly {
            time_zone: wk.time_zone.clone(),
            start: WeekTime {
                day: start_day.unwrap_or_default(),
                minute: start_minute.unwrap_or_default(),
            },
            end: WeekTime {
                day: end_day.unwrap_or_default(),
                minute: end_minute.unwrap_or_default(),
            },
        },
        parsed,
    )
}

/// Reports the calendar's own problems with the window at `at`, those not reported
/// already: the name was checked by [`window_name`], a time zone that is too long is not
/// looked up, and times only when they all `parsed`.
fn calendar_problems(v: &mut Violations, at: &str, window: &FreezeWindow, parsed: bool) {
    let long_time_zone = matches!(
        &window.schedule,
        Schedule::Weekly { time_zone, .. } if time_zone.len() > MAX_TIME_ZONE
    );
    for (problem, description) in window.problems() {
        let report = match problem {
            "name" => false,
            "weekly.time_zone" => !long_time_zone,
            _ => parsed,
        };
        if report {
            v.push(&format!("{at}.{}", calendar_field(problem)), description);
        }
    }
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

/// A page in its proto form: the items converted with `item`, and the token of the next
/// page (empty after the last).
pub fn list_page<T, U>(page: Page<T>, item: impl FnMut(T) -> U) -> (Vec<U>, String) {
    let next_page_token = page
        .next
        .map(|k| names::encode_page_token(&k))
        .unwrap_or_default();
    (page.items.into_iter().map(item).collect(), next_page_token)
}

fn optional_request_id(v: &mut Violations, request_id: &str) -> Option<String> {
    v.check("request_id", names::validate_key(request_id));
    (!request_id.is_empty()).then(|| request_id.to_owned())
}

/// An optional environment filter: none when empty, else the environment's name parsed.
fn optional_environment(v: &mut Violations, field: &str, name: &str) -> Option<String> {
    if name.is_empty() {
        None
    } else {
        v.check(field, names::parse_environment(name))
    }
}

/// An optional artifact filter: none when empty, else an artifact id checked as such.
fn optional_artifact(v: &mut Violations, field: &str, artifact: &str) -> Option<String> {
    if artifact.is_empty() {
        None
    } else {
        v.check(field, names::validate_id(artifact))
            .map(|()| artifact.to_owned())
    }
}

/// Validates a ListEnvironments request: its page.
pub fn environments_query(req: &pb::ListEnvironmentsRequest) -> Result<PageRequest> {
    let mut v = Violations::default();
    let page = page_request(&mut v, req.page_size, &req.page_token);
    v.finish()?;
    Ok(page)
}

/// Validates a ListTargets request: the environment and the page.
pub fn targets_query(req: &pb::ListTargetsRequest) -> Result<(String, PageRequest)> {
    let mut v = Violations::default();
    let env = v
        .check("parent", names::parse_environment(&req.parent))
        .unwrap_or_default();
    let page = page_request(&mut v, req.page_size, &req.page_token);
    v.finish()?;
    Ok((env, page))
}

/// Validates a ListArtifacts request: the artifact filter and the page.
pub fn artifacts_query(req: &pb::ListArtifactsRequest) -> Result<(Option<String>, PageRequest)> {
    let mut v = Violations::default();
    let artifact = optional_artifact(&mut v, "artifact", &req.artifact);
    let page = page_request(&mut v, req.page_size, &req.page_token);
    v.finish()?;
    Ok((artifact, page))
}

/// Validates a ListDeployments request: the filter and the page.
pub fn deployments_query(
    req: &pb::ListDeploymentsRequest,
) -> Result<(DeploymentFilter, PageRequest)> {
    let mut v = Violations::default();
    let environment = optional_environment(&mut v, "environment", &req.environment);
    let artifact = optional_artifact(&mut v, "artifact", &req.artifact);
    let page = page_request(&mut v, req.page_size, &req.page_token);
    v.finish()?;
    Ok((
        DeploymentFilter {
            environment,
            artifact,
        },
        page,
    ))
}

/// Validates a GrantEmergencyOverride request made by `approver` (who may not grant an
/// override to itself); returns the environment id.
pub fn emergency_grant(req: &pb::GrantEmergencyOverrideRequest, approver: &str) -> Result<String> {
    let mut v = Violations::default();
    let environment = v
        .check("environment", names::parse_environment(&req.environment))
        .unwrap_or_default();
    if v.check("requester", names::validate_key(&req.requester))
        .is_some()
        && req.requester.eq_ignore_ascii_case(approver)
    {
        v.push(
            "requester",
            "an approver cannot grant an override to itself",
        );
    }
    if req.reason.trim().is_empty() {
        v.push("reason", "must say why the change cannot wait");
    } else {
        v.check("reason", names::validate_text(&req.reason, names::MAX_TEXT));
    }
    v.finish()?;
    Ok(environment)
}

/// Validates a deployment name and a free-text reason together (every bad field at once).
pub fn deployment_and_reason(name: &str, reason: &str) -> Result<i64> {
    let mut v = Violations::default();
    let id = v
        .check("name", names::parse_deployment(name))
        .unwrap_or_default();
    v.check("reason", names::validate_text(reason, names::MAX_TEXT));
    v.finish()?;
    Ok(id)
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
    let freeze_windows = freeze_windows(&mut v, "environment.freeze_windows", &env.freeze_windows);
    let request_id = optional_request_id(&mut v, &req.request_id);
    v.finish()?;
    Ok((
        NewEnvironment {
            id: req.environment_id,
            description: env.description,
            protected: env.protected,
            upstream,
            freeze_windows,
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
            "must name at least one of description, protected, upstream, freeze_windows",
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
            "freeze_windows" => {
                update.freeze_windows = Some(freeze_windows(
                    &mut v,
                    "environment.freeze_windows",
                    &env.freeze_windows,
                ));
            }
            other => v.push(
                "update_mask",
                format!(
                    "{other:?} cannot be updated; use description, protected, upstream or freeze_windows"
                ),
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
    if !req.source_uri.is_empty() {
        let ok = ["file:///", "http://", "https://"]
            .iter()
            .any(|p| req.source_uri.starts_with(p));
        if !ok || req.source_uri.len() > 2048 || req.source_uri.chars().any(char::is_whitespace) {
            v.push(
                "source_uri",
                "must be a file:///, http:// or https:// URI of at most 2048 characters",
            );
        }
    }
    v.finish()?;
    Ok(Artifact {
        name: req.artifact,
        version: req.version,
        digest: req.digest,
        metadata,
        source_uri: req.source_uri,
        create_ms: 0,
    })
}

fn emergency(
    v: &mut Violations,
    given: Option<pb::EmergencyOverride>,
    principal: &str,
) -> Option<EmergencyOverride> {
    let e = given?;
    if e.reason.trim().is_empty() {
        v.push(
            "deployment.emergency.reason",
            "must say why the change cannot wait for the freeze window to end",
        );
    } else {
        v.check(
            "deployment.emergency.reason",
            names::validate_text(&e.reason, MAX_TEXT),
        );
    }
    if e.approver.is_empty() {
        v.push(
            "deployment.emergency.approver",
            "must name the principal who approved the override",
        );
    } else if v
        .check(
            "deployment.emergency.approver",
            names::validate_key(&e.approver),
        )
        .is_some()
        && e.approver.eq_ignore_ascii_case(principal)
    {
        v.push(
            "deployment.emergency.approver",
            format!(
                "{:?} is the principal requesting the deployment; an emergency override needs the approval of someone else",
                e.approver
            ),
        );
    }
    Some(EmergencyOverride {
        reason: e.reason,
        approver: e.approver,
    })
}

/// Validates a CreateDeployment request made by `principal` (who may not approve their own
/// emergency override).
pub fn new_deployment(
    req: pb::CreateDeploymentRequest,
    principal: &str,
) -> Result<(NewDeployment, Option<String>)> {
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
    let emergency = emergency(&mut v, d.emergency, principal);
    let strategy = strategy(&mut v, d.strategy);
    let request_id = optional_request_id(&mut v, &req.request_id);
    v.finish()?;
    let (artifact, version) = version.unwrap_or_default();
    Ok((
        NewDeployment {
            artifact,
            version,
            environment: environment.unwrap_or_default(),
            change_reference: d.change_reference,
            emergency,
            strategy,
            auto_rollback: d.auto_rollback,
            targets: None,
            rollback_of: None,
        },
        request_id,
    ))
}

/// Validates an emergency override given outside a deployment (RollbackDeployment).
pub fn override_of(
    given: Option<pb::EmergencyOverride>,
    principal: &str,
) -> Result<Option<EmergencyOverride>> {
    let mut v = Violations::default();
    let e = emergency(&mut v, given, principal);
    v.finish()?;
    Ok(e)
}

fn strategy(v: &mut Violations, s: Option<pb::Strategy>) -> Strategy {
    use pb::strategy::Kind;
    let strategy = match s.and_then(|s| s.kind) {
        None | Some(Kind::AllAtOnce(_)) => Strategy::AllAtOnce,
        Some(Kind::Rolling(r)) => Strategy::Rolling {
            batch_size: r.batch_size,
            batch_percent: r.batch_percent,
            max_failures: r.max_failures,
        },
        Some(Kind::Canary(c)) => Strategy::Canary {
            canary_targets: c.canary_targets,
            bake_ms: c.bake_time.map_or(0, |d| {
                d.seconds.saturating_mul(1000) + i64::from(d.nanos / 1_000_000)
            }),
        },
    };
    for (field, problem) in strategy.problems() {
        v.push(&format!("deployment.strategy.{field}"), problem);
    }
    strategy
}

/// The proto form of a strategy.
fn strategy_pb(s: &Strategy) -> pb::Strategy {
    use pb::strategy::Kind;
    pb::Strategy {
        kind: Some(match s {
            Strategy::AllAtOnce => Kind::AllAtOnce(pb::AllAtOnce {}),
            Strategy::Rolling {
                batch_size,
                batch_percent,
                max_failures,
            } => Kind::Rolling(pb::Rolling {
                batch_size: *batch_size,
                batch_percent: *batch_percent,
                max_failures: *max_failures,
            }),
            Strategy::Canary {
                canary_targets,
                bake_ms,
            } => Kind::Canary(pb::Canary {
                canary_targets: *canary_targets,
                bake_time: (*bake_ms > 0).then_some(prost_types::Duration {
                    seconds: bake_ms / 1000,
                    nanos: i32::try_from((bake_ms % 1000) * 1_000_000).unwrap_or(0),
                }),
            }),
        }),
    }
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
    let artifact = optional_artifact(&mut v, "artifact", &req.artifact);
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

/// Validates a ListAuditRecords request.
pub fn audit_query(req: pb::ListAuditRecordsRequest) -> Result<(AuditFilter, PageRequest)> {
    let mut v = Violations::default();
    let resource = (!req.resource.is_empty()).then(|| req.resource.clone());
    if let Some(r) = &resource {
        let known = ["environments/", "artifacts/", "deployments/"]
            .iter()
            .any(|p| r.starts_with(p));
        if r.len() > MAX_RESOURCE_FILTER {
            v.push(
                "resource",
                format!("must be at most {MAX_RESOURCE_FILTER} characters"),
            );
        } else if !known || r.chars().any(|c| c.is_control() || c.is_whitespace()) {
            v.push(
                "resource",
                format!("{r:?} must be a resource name or a prefix starting with 'environments/', 'artifacts/' or 'deployments/'"),
            );
        }
    }
    let principal = (!req.principal.is_empty()).then(|| req.principal.clone());
    if principal.is_some() {
        v.check("principal", names::validate_key(&req.principal));
    }
    let start_ms = req
        .start_time
        .as_ref()
        .and_then(|t| v.check("start_time", millis(t)));
    let end_ms = req
        .end_time
        .as_ref()
        .and_then(|t| v.check("end_time", millis(t)));
    if let (Some(s), Some(e)) = (start_ms, end_ms) {
        if e <= s {
            v.push("end_time", "must be after start_time");
        }
    }
    let size = match req.page_size {
        0 => AUDIT_PAGE_SIZE,
        n if n < 0 => {
            v.push("page_size", format!("must not be negative, got {n}"));
            AUDIT_PAGE_SIZE
        }
        n => usize::try_from(n)
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE),
    };
    let after = v
        .check("page_token", decode_page_token(&req.page_token))
        .flatten();
    if let Some(after) = &after {
        if after.parse::<i64>().is_err() {
            v.push(
                "page_token",
                "is not a page token returned by ListAuditRecords",
            );
        }
    }
    v.finish()?;
    Ok((
        AuditFilter {
            resource,
            principal,
            start_ms,
            end_ms,
        },
        PageRequest { size, after },
    ))
}

/// The proto form of an audit record.
pub fn audit_record(AuditRecord { id, record: r }: AuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        id,
        time: timestamp(r.time_ms),
        principal: r.principal,
        action: r.action,
        resource: r.resource,
        before: r.before,
        after: r.after,
        request_id: r.request_id,
        reason: r.reason,
    }
}

/// The proto form of a freeze window.
pub fn freeze_window(w: &FreezeWindow) -> pb::FreezeWindow {
    use pb::freeze_window::Schedule as S;
    // Calendar days count from 0 = Monday; the proto's from 1 = Monday.
    let day = |d: u32| i32::try_from(d + 1).unwrap_or_default();
    let schedule = match &w.schedule {
        Schedule::Absolute { start_ms, end_ms } => S::Absolute(pb::AbsoluteWindow {
            start_time: timestamp(*start_ms),
            end_time: timestamp(*end_ms),
        }),
        Schedule::Weekly {
            time_zone,
            start,
            end,
        } => S::Weekly(pb::WeeklyWindow {
            time_zone: time_zone.clone(),
            start_day: day(start.day),
            start_time: calendar::format_minute(start.minute),
            end_day: day(end.day),
            end_time: calendar::format_minute(end.minute),
        }),
    };
    pb::FreezeWindow {
        name: w.name.clone(),
        schedule: Some(schedule),
    }
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
        freeze_windows: env.freeze_windows.iter().map(freeze_window).collect(),
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
        versions: Vec::new(),
    }
}

/// The proto form of a target with the current versions on it (ListTargets).
pub fn target_with_versions(
    t: Target,
    versions: Vec<TargetVersion>,
    windows: &HealthWindows,
    now: Millis,
) -> pb::Target {
    pb::Target {
        versions: versions
            .into_iter()
            .map(|v| pb::TargetVersion {
                artifact: v.artifact,
                version: v.version,
                deployment: deployment_name(v.deployment),
                place_time: timestamp(v.place_ms),
            })
            .collect(),
        ..target(t, windows, now)
    }
}

/// A validated ListInventory request: the environment, the page size and position.
pub fn inventory_request(
    req: &pb::ListInventoryRequest,
) -> Result<(Option<String>, usize, Option<InventoryKey>)> {
    let mut v = Violations::default();
    let environment = optional_environment(&mut v, "environment", &req.environment);
    let page = page_request(&mut v, req.page_size, &req.page_token);
    let after = page.after.as_deref().and_then(|text| {
        let key = InventoryKey::decode(text);
        if key.is_none() {
            v.push(
                "page_token",
                "is not a page token returned by ListInventory",
            );
        }
        key
    });
    if let (Some(env), Some(key)) = (&environment, &after) {
        if &key.environment != env {
            v.push(
                "page_token",
                format!(
                    "was returned for another environment than {}",
                    environment_name(env)
                ),
            );
        }
    }
    v.finish()?;
    Ok((environment, page.size, after))
}

/// The proto form of an inventory environment, with its freeze state at `now`.
pub fn environment_inventory(e: EnvironmentInventory, now: Millis) -> pb::EnvironmentInventory {
    let freeze = freeze::status(&e.environment, now);
    let targets = e.targets;
    pb::EnvironmentInventory {
        environment: environment_name(&e.environment.id),
        target_count: u32::try_from(targets).unwrap_or(u32::MAX),
        freeze: Some(pb::FreezeState {
            frozen: !freeze.active.is_empty(),
            active_windows: freeze
                .active
                .into_iter()
                .map(|(name, end)| pb::ActiveFreezeWindow {
                    name,
                    end_time: timestamp(end),
                })
                .collect(),
            frozen_until: freeze.until.and_then(timestamp),
            next_window: freeze
                .next
                .map(|(name, start, end)| pb::FreezeWindowOccurrence {
                    name,
                    start_time: timestamp(start),
                    end_time: timestamp(end),
                }),
        }),
        artifacts: e
            .artifacts
            .into_iter()
            .map(|a| pb::ArtifactInventory {
                artifact: a.artifact,
                versions: a
                    .versions
                    .into_iter()
                    .map(|v| pb::PlacedVersion {
                        coverage: if targets == 0 {
                            0.0
                        } else {
                            v.targets as f64 / targets as f64
                        },
                        version: v.version,
                        digest: v.digest,
                        target_count: u32::try_from(v.targets).unwrap_or(u32::MAX),
                        last_place_time: timestamp(v.last_place_ms),
                    })
                    .collect(),
                in_flight: a
                    .in_flight
                    .into_iter()
                    .map(|f| pb::InFlightDeployment {
                        deployment: Some(deployment(f.deployment)),
                        step: Some(strategy_step(&f.step)),
                    })
                    .collect(),
                in_flight_count: u32::try_from(a.in_flight_total).unwrap_or(u32::MAX),
            })
            .collect(),
    }
}

fn strategy_step(s: &Step) -> pb::StrategyStep {
    let phase = match s.phase {
        Phase::AllAtOnce => pb::StrategyPhase::AllAtOnce,
        Phase::RollingBatch => pb::StrategyPhase::RollingBatch,
        Phase::CanaryPlacing => pb::StrategyPhase::CanaryPlacing,
        Phase::CanaryBaking => pb::StrategyPhase::CanaryBaking,
        Phase::CanaryWaiting => pb::StrategyPhase::CanaryWaiting,
        Phase::CanaryRest => pb::StrategyPhase::CanaryRest,
    };
    pb::StrategyStep {
        phase: phase.into(),
        step: s.step,
        step_count: s.step_count,
        ordered_targets: s.ordered,
        placed_targets: s.placed,
        failed_targets: s.failed,
        target_count: s.targets,
        continue_time: s.continue_ms.and_then(timestamp),
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
        // Credentials and signed parameters stay with deploy-svc and the agents' orders.
        source_uri: service_kit::redact::url(&a.source_uri),
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
        emergency: d.emergency.map(|e| pb::EmergencyOverride {
            reason: e.reason,
            approver: e.approver,
        }),
        strategy: Some(strategy_pb(&d.strategy)),
        auto_rollback: d.auto_rollback,
        rollback_of: d.rollback_of.map(deployment_name).unwrap_or_default(),
        continued: d.continued,
    }
}

/// The proto form of a placement event.
pub fn event(e: &PlacementEvent) -> pb::PlacementEvent {
    pb::PlacementEvent {
        sequence: e.sequence,
        commit_time: timestamp(e.commit_ms),
        placement: Some(placement(&e.placement)),
        previous_state: placement_state(e.previous_state),
        trace_parent: e.trace_parent.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weekly(name: &str, time_zone: &str, start: &str) -> pb::FreezeWindow {
        pb::FreezeWindow {
            name: name.into(),
            schedule: Some(pb::freeze_window::Schedule::Weekly(pb::WeeklyWindow {
                time_zone: time_zone.into(),
                start_day: pb::DayOfWeek::Friday.into(),
                start_time: start.into(),
                end_day: pb::DayOfWeek::Monday.into(),
                end_time: "08:00".into(),
            })),
        }
    }

    fn fields(v: &Violations) -> Vec<&str> {
        v.recorded().iter().map(|f| f.field.as_str()).collect()
    }

    #[test]
    fn windows_convert_with_calendar_days_from_monday_and_round_trip() {
        let mut v = Violations::default();
        let given = [weekly("weekend", "Europe/Berlin", "18:00")];
        let windows = freeze_windows(&mut v, "w", &given);
        assert!(v.recorded().is_empty());
        assert_eq!(
            windows[0].schedule,
            Schedule::Weekly {
                time_zone: "Europe/Berlin".into(),
                start: WeekTime {
                    day: 4,
                    minute: 18 * 60
                },
                end: WeekTime {
                    day: 0,
                    minute: 8 * 60
                },
            }
        );
        assert_eq!(freeze_window(&windows[0]), given[0]);
    }

    #[test]
    fn each_bad_window_field_is_reported_once() {
        let mut v = Violations::default();
        freeze_windows(
            &mut v,
            "w",
            &[
                weekly("a", &"X".repeat(65), "18:00"),
                weekly("a", "UTC", "6pm and some more"),
            ],
        );
        assert_eq!(
            fields(&v),
            [
                "w[0].weekly.time_zone",
                "w[1].name",
                "w[1].weekly.start_time"
            ]
        );
        let mut v = Violations::default();
        let many: Vec<_> = (0..=MAX_WINDOWS)
            .map(|i| weekly(&format!("w{i}"), "UTC", "18:00"))
            .collect();
        freeze_windows(&mut v, "w", &many);
        assert_eq!(fields(&v), ["w"]);
    }

    #[test]
    fn an_override_needs_a_reason_and_another_approver() {
        let urgent = |reason: &str, approver: &str| pb::CreateDeploymentRequest {
            deployment: Some(pb::Deployment {
                artifact_version: "artifacts/web/versions/1.0.0".into(),
                environment: "environments/prod".into(),
                emergency: Some(pb::EmergencyOverride {
                    reason: reason.into(),
                    approver: approver.into(),
                }),
                ..Default::default()
            }),
            request_id: String::new(),
        };
        let (d, _) = new_deployment(urgent("outage", "bob"), "alice").unwrap();
        assert_eq!(d.emergency.map(|e| e.approver).as_deref(), Some("bob"));
        let refused = |r: Result<(NewDeployment, Option<String>)>| match r {
            Err(crate::domain::Error::InvalidArgument(f)) => {
                f.into_iter().map(|f| f.field).collect::<Vec<_>>()
            }
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        };
        assert_eq!(
            refused(new_deployment(urgent("outage", "Alice"), "alice")),
            ["deployment.emergency.approver"]
        );
        assert_eq!(
            refused(new_deployment(urgent("", "bob smith"), "alice")),
            [
                "deployment.emergency.reason",
                "deployment.emergency.approver"
            ]
        );
    }

    #[test]
    fn audit_queries_default_to_100_and_check_their_token() {
        let (filter, page) = audit_query(pb::ListAuditRecordsRequest::default()).unwrap();
        assert_eq!(filter, AuditFilter::default());
        assert_eq!(page.size, AUDIT_PAGE_SIZE);
        let (_, page) = audit_query(pb::ListAuditRecordsRequest {
            page_size: 5000,
            page_token: names::encode_page_token("42"),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (page.size, page.after.as_deref()),
            (MAX_PAGE_SIZE, Some("42"))
        );
        assert!(audit_query(pb::ListAuditRecordsRequest {
            page_token: names::encode_page_token("prod"),
            ..Default::default()
        })
        .is_err());
    }
}
