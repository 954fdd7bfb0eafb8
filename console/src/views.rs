//! The pages and their fragments. A page is the shell (navigation, live stream, flash area)
//! around one view; the view's fragment is fetched again when the live stream says that
//! what it shows changed, or after an action. Service errors are shown in place of the
//! view, with their code and message.
//!
//! - inventory (`/`): the environment x artifact matrix (deploy-svc `ListInventory`):
//!   versions with coverage bars, in-flight deployments with their strategy step, freezes;
//! - visibility (`/visibility`): the feature x environment matrix (release-svc
//!   `ListVisibility`), coloured by decision class, with the reason of each cell, and the
//!   stale flags (the same answer everywhere: ready to leave the code);
//! - release (`/releases/{id}`): state, rollout, timeline (`GetReleaseTimeline`) and the
//!   policy check of its next step (`CheckRelease`), with the kill switch and the other
//!   actions a person expects there;
//! - calendar (`/calendar`): each environment's freeze windows over the next two weeks;
//! - audit (`/audit`): the last week's audit records of both services, newest first;
//! - stale flags (`/stale?days=N`): release-svc `ListStaleFeatures`, features at 100% or
//!   not evaluated for N days (30 by default), with their last evaluation.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use proto::deploy::v1 as dpb;
use proto::release::v1 as rpb;
use serde::Serialize;

use crate::backend::{Failure, User};
use crate::AppState;

/// Pages fetched at most for one listing (a page is the service's largest).
const MAX_PAGES: usize = 20;

/// The templates, compiled in.
pub fn templates() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    for (name, source) in [
        ("page.html", include_str!("../templates/page.html")),
        (
            "inventory.html",
            include_str!("../templates/inventory.html"),
        ),
        (
            "visibility.html",
            include_str!("../templates/visibility.html"),
        ),
        ("release.html", include_str!("../templates/release.html")),
        ("failure.html", include_str!("../templates/failure.html")),
        ("flash.html", include_str!("../templates/flash.html")),
        ("audit.html", include_str!("../templates/audit.html")),
        ("calendar.html", include_str!("../templates/calendar.html")),
        ("stale.html", include_str!("../templates/stale.html")),
    ] {
        // The sources are compiled in: a syntax error fails the unit test `templates_compile`.
        if let Err(e) = env.add_template(name, source) {
            tracing::error!(template = name, error = %e, "bad template");
        }
    }
    env
}

/// Renders `name` with `context`, answering `status`.
pub fn render(
    state: &AppState,
    status: StatusCode,
    name: &str,
    context: minijinja::Value,
) -> Response {
    match state
        .templates
        .get_template(name)
        .and_then(|t| t.render(context))
    {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(template = name, error = %e, "cannot render");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render the page").into_response()
        }
    }
}

/// A page: the shell around `view`, whose data is `data` (or the failure to get it).
fn page<T: Serialize>(
    state: &AppState,
    view: &str,
    title: &str,
    data: Result<T, Failure>,
) -> Response {
    let (status, data, failure) = split(data);
    render(
        state,
        status,
        "page.html",
        minijinja::context! { view, title, data, failure },
    )
}

/// A fragment: `template` with `data`, or the failure.
fn fragment<T: Serialize>(state: &AppState, template: &str, data: Result<T, Failure>) -> Response {
    match data {
        Ok(data) => render(
            state,
            StatusCode::OK,
            template,
            minijinja::context! { data },
        ),
        Err(failure) => render(
            state,
            failure.http,
            "failure.html",
            minijinja::context! { failure },
        ),
    }
}

fn split<T>(data: Result<T, Failure>) -> (StatusCode, Option<T>, Option<Failure>) {
    match data {
        Ok(d) => (StatusCode::OK, Some(d), None),
        Err(f) => (f.http, None, Some(f)),
    }
}

/// `GET /`.
pub async fn inventory_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let data = inventory(&state, &User::from_headers(&headers)).await;
    page(&state, "inventory", "Inventory", data)
}

/// `GET /fragments/inventory`.
pub async fn inventory_fragment(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let data = inventory(&state, &User::from_headers(&headers)).await;
    fragment(&state, "inventory.html", data)
}

/// `GET /visibility`.
pub async fn visibility_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let data = visibility(&state, &User::from_headers(&headers)).await;
    page(&state, "visibility", "Visibility", data)
}

/// `GET /fragments/visibility`.
pub async fn visibility_fragment(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let data = visibility(&state, &User::from_headers(&headers)).await;
    fragment(&state, "visibility.html", data)
}

/// `GET /releases/{id}`.
pub async fn release_page(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let data = release(&state, &User::from_headers(&headers), &id).await;
    page(&state, "release", &format!("releases/{id}"), data)
}

/// `GET /fragments/releases/{id}`.
pub async fn release_fragment(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let data = release(&state, &User::from_headers(&headers), &id).await;
    fragment(&state, "release.html", data)
}

/// `GET /audit`.
pub async fn audit_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let data = audit(&state, &User::from_headers(&headers)).await;
    page(&state, "audit", "Audit", data)
}

/// `GET /fragments/audit`.
pub async fn audit_fragment(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let data = audit(&state, &User::from_headers(&headers)).await;
    fragment(&state, "audit.html", data)
}

// --- inventory ---

/// The environment x artifact matrix.
#[derive(Debug, Serialize)]
pub struct Inventory {
    /// The columns.
    pub environments: Vec<EnvironmentHead>,
    /// One row per artifact, one cell per environment (`None`: never deployed there).
    pub rows: Vec<ArtifactRow>,
}

/// A column head.
#[derive(Debug, Serialize)]
pub struct EnvironmentHead {
    /// The environment id.
    pub name: String,
    /// Its targets.
    pub targets: u32,
    /// Inside a freeze window now.
    pub frozen: bool,
    /// The freeze now or the next one, for people.
    pub freeze: String,
}

/// A row.
#[derive(Debug, Serialize)]
pub struct ArtifactRow {
    /// The artifact.
    pub artifact: String,
    /// Per environment, in column order.
    pub cells: Vec<Option<ArtifactCell>>,
}

/// An artifact in an environment.
#[derive(Debug, Serialize)]
pub struct ArtifactCell {
    /// The versions placed, most targets first.
    pub versions: Vec<PlacedVersion>,
    /// The deployments under way.
    pub in_flight: Vec<Flight>,
    /// Under way but not listed.
    pub more_in_flight: u32,
}

/// A version and its coverage.
#[derive(Debug, Serialize)]
pub struct PlacedVersion {
    /// The version.
    pub version: String,
    /// On how many targets.
    pub targets: u32,
    /// Coverage in percent, rounded.
    pub percent: u32,
}

/// A deployment under way.
#[derive(Debug, Serialize)]
pub struct Flight {
    /// `deployments/{id}`'s id.
    pub id: String,
    /// The version it places.
    pub version: String,
    /// Its strategy phase, for people.
    pub phase: String,
    /// Where it is, for people.
    pub progress: String,
    /// A canary waiting for a person to continue it.
    pub can_continue: bool,
}

async fn inventory(state: &AppState, user: &User) -> Result<Inventory, Failure> {
    let b = &state.backends;
    let environments = pages(|page_token| {
        let request = b.request(
            dpb::ListInventoryRequest {
                page_token,
                ..Default::default()
            },
            user,
        );
        let mut client = b.deploy.clone();
        async move {
            let r = client.list_inventory(request?).await?.into_inner();
            Ok((r.environments, r.next_page_token))
        }
    })
    .await?;
    Ok(inventory_matrix(environments))
}

/// The matrix of `environments` (pure, for tests).
pub fn inventory_matrix(environments: Vec<dpb::EnvironmentInventory>) -> Inventory {
    let mut artifacts: Vec<String> = environments
        .iter()
        .flat_map(|e| e.artifacts.iter().map(|a| a.artifact.clone()))
        .collect();
    artifacts.sort();
    artifacts.dedup();
    let rows = artifacts
        .iter()
        .map(|artifact| ArtifactRow {
            artifact: artifact.clone(),
            cells: environments
                .iter()
                .map(|e| {
                    e.artifacts
                        .iter()
                        .find(|a| &a.artifact == artifact)
                        .map(artifact_cell)
                })
                .collect(),
        })
        .collect();
    let environments = environments
        .iter()
        .map(|e| {
            let freeze = e.freeze.clone().unwrap_or_default();
            let text = if freeze.frozen {
                let names: Vec<&str> = freeze
                    .active_windows
                    .iter()
                    .map(|w| w.name.as_str())
                    .collect();
                format!(
                    "frozen ({}) until {}",
                    names.join(", "),
                    time(freeze.frozen_until.as_ref())
                )
            } else if let Some(next) = &freeze.next_window {
                format!(
                    "next freeze {} at {}",
                    next.name,
                    time(next.start_time.as_ref())
                )
            } else {
                String::new()
            };
            EnvironmentHead {
                name: id(&e.environment, "environments/"),
                targets: e.target_count,
                frozen: freeze.frozen,
                freeze: text,
            }
        })
        .collect();
    Inventory { environments, rows }
}

fn artifact_cell(a: &dpb::ArtifactInventory) -> ArtifactCell {
    let in_flight: Vec<Flight> = a.in_flight.iter().map(flight).collect();
    ArtifactCell {
        versions: a
            .versions
            .iter()
            .map(|v| PlacedVersion {
                version: v.version.clone(),
                targets: v.target_count,
                percent: (v.coverage.clamp(0.0, 1.0) * 100.0).round() as u32,
            })
            .collect(),
        more_in_flight: a.in_flight_count.saturating_sub(in_flight.len() as u32),
        in_flight,
    }
}

fn flight(f: &dpb::InFlightDeployment) -> Flight {
    let d = f.deployment.clone().unwrap_or_default();
    let step = f.step.unwrap_or_default();
    let phase = step.phase();
    let mut progress = format!("{}/{} placed", step.placed_targets, step.target_count);
    if step.step_count > 1 {
        progress = format!("step {}/{}, {progress}", step.step, step.step_count);
    }
    if step.failed_targets > 0 {
        progress.push_str(&format!(", {} failed", step.failed_targets));
    }
    if step.continue_time.is_some() {
        progress.push_str(&format!(
            ", continues at {}",
            time(step.continue_time.as_ref())
        ));
    }
    Flight {
        id: id(&d.name, "deployments/"),
        version: d
            .artifact_version
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned(),
        phase: enum_name(phase.as_str_name(), "STRATEGY_PHASE_"),
        progress,
        can_continue: phase == dpb::StrategyPhase::CanaryWaiting,
    }
}

// --- visibility ---

/// The feature x environment matrix.
#[derive(Debug, Serialize)]
pub struct Visibility {
    /// The columns.
    pub environments: Vec<String>,
    /// One row per feature.
    pub features: Vec<FeatureRow>,
    /// Flags whose answer no longer depends on anything.
    pub stale: Vec<StaleFlag>,
}

/// A stale flag: the same answer everywhere, so the flag can leave the code.
#[derive(Debug, Serialize)]
pub struct StaleFlag {
    /// The feature key.
    pub feature: String,
    /// Why, for people.
    pub why: &'static str,
}

/// The stale flags of `features` (pure, for tests): shown to everyone in every environment
/// of the matrix, or disabled.
pub fn stale(features: &[FeatureRow]) -> Vec<StaleFlag> {
    features
        .iter()
        .filter_map(|f| {
            let why = if f.disabled {
                "disabled: hidden for everyone"
            } else if !f.cells.is_empty() && f.cells.iter().all(|c| c.class == "static") {
                "released to everyone in every environment"
            } else {
                return None;
            };
            Some(StaleFlag {
                feature: f.feature.clone(),
                why,
            })
        })
        .collect()
}

/// A row.
#[derive(Debug, Serialize)]
pub struct FeatureRow {
    /// The feature key.
    pub feature: String,
    /// Disabled everywhere.
    pub disabled: bool,
    /// Has targeting rules or lists.
    pub targeted: bool,
    /// In column order.
    pub cells: Vec<VisibilityCell>,
}

/// A cell: the decision class (its CSS class), a short label and the reason.
#[derive(Debug, Serialize)]
pub struct VisibilityCell {
    /// `disabled`, `not-released`, `not-deployed`, `paused`, `rollout`, `targeted`, `static`.
    pub class: &'static str,
    /// What the cell says.
    pub label: String,
    /// Why, for people.
    pub reason: String,
    /// The release's id (for the link), if any.
    pub release: String,
}

async fn visibility(state: &AppState, user: &User) -> Result<Visibility, Failure> {
    let mut matrix = Visibility {
        environments: Vec::new(),
        features: Vec::new(),
        stale: Vec::new(),
    };
    let mut columns = std::collections::HashSet::new();
    let mut rows: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut page_token = String::new();
    for _ in 0..MAX_PAGES {
        let request = state.backends.request(
            rpb::ListVisibilityRequest {
                page_token: page_token.clone(),
                ..Default::default()
            },
            user,
        )?;
        let response = state
            .backends
            .release
            .clone()
            .list_visibility(request)
            .await?
            .into_inner();
        // With many environments a page brings a chunk of the columns: the same features
        // come again with the next chunk, their cells appended in column order.
        for e in response.environments {
            if columns.insert(e.clone()) {
                matrix.environments.push(e);
            }
        }
        for f in &response.features {
            match rows.get(&f.feature) {
                Some(&i) => matrix.features[i]
                    .cells
                    .extend(f.cells.iter().map(visibility_cell)),
                None => {
                    rows.insert(f.feature.clone(), matrix.features.len());
                    matrix.features.push(feature_row(f));
                }
            }
        }
        page_token = response.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    matrix.stale = stale(&matrix.features);
    Ok(matrix)
}

fn feature_row(f: &rpb::FeatureVisibility) -> FeatureRow {
    FeatureRow {
        feature: f.feature.clone(),
        disabled: f.disabled,
        targeted: f.targeted,
        cells: f.cells.iter().map(visibility_cell).collect(),
    }
}

/// One cell, for people (pure, for tests).
pub fn visibility_cell(c: &rpb::VisibilityCell) -> VisibilityCell {
    use rpb::VisibilityClass as Class;
    let (class, label) = match c.class() {
        Class::Unspecified | Class::NotReleased => ("not-released", "not released".to_owned()),
        Class::Disabled => ("disabled", "disabled".to_owned()),
        Class::NotDeployed => ("not-deployed", "not deployed".to_owned()),
        Class::Paused => ("paused", "paused".to_owned()),
        Class::Rollout => ("rollout", format!("{}%", c.rollout_percent)),
        Class::Targeted => ("targeted", "targeted".to_owned()),
        Class::Static => ("static", "100%".to_owned()),
    };
    let mut reason = Vec::new();
    if !c.release.is_empty() {
        let mut r = format!(
            "{} ({})",
            c.release,
            enum_name(c.release_state().as_str_name(), "RELEASE_STATE_")
        );
        if c.steps > 0 {
            r.push_str(&format!(", step {}/{}", c.step, c.steps));
        }
        reason.push(r);
    }
    if !c.not_deployed.is_empty() {
        reason.push(format!("waits for {}", c.not_deployed));
    }
    reason.extend(c.waiting.iter().map(violation));
    VisibilityCell {
        class,
        label,
        reason: reason.join("; "),
        release: id(&c.release, "releases/"),
    }
}

// --- release ---

/// A release: state, rollout, timeline, next step and its check.
#[derive(Debug, Serialize)]
pub struct ReleaseView {
    /// `releases/{id}`'s id.
    pub id: String,
    /// The state, for people.
    pub state: String,
    /// Free text.
    pub description: String,
    /// Its features.
    pub features: Vec<String>,
    /// Who created it.
    pub requester: String,
    /// Its change record.
    pub change_reference: String,
    /// The rollout per environment.
    pub environments: Vec<ReleaseEnvironment>,
    /// Who approved it.
    pub approvals: Vec<String>,
    /// The rules its plan waits on.
    pub waiting: Vec<String>,
    /// What happened, oldest first.
    pub events: Vec<TimelineEvent>,
    /// The plan steps to come.
    pub upcoming: Vec<Upcoming>,
    /// `CheckRelease` of the next step.
    pub check: Option<Check>,
    /// The kill switch applies.
    pub can_pause: bool,
    /// Resume applies.
    pub can_resume: bool,
    /// Approve applies.
    pub can_approve: bool,
}

/// The rollout in an environment.
#[derive(Debug, Serialize)]
pub struct ReleaseEnvironment {
    /// The environment.
    pub environment: String,
    /// Its rollout percentage.
    pub percent: f64,
    /// The plan step taken last, for people.
    pub step: String,
}

/// A timeline event.
#[derive(Debug, Serialize)]
pub struct TimelineEvent {
    /// When.
    pub time: String,
    /// What.
    pub kind: String,
    /// Who.
    pub principal: String,
    /// The release after it.
    pub summary: String,
    /// Why.
    pub reason: String,
    /// Where (withdrawals).
    pub environment: String,
}

/// A plan step to come.
#[derive(Debug, Serialize)]
pub struct Upcoming {
    /// Where.
    pub environment: String,
    /// The step, 1-based.
    pub step: i32,
    /// Its percentage.
    pub percent: f64,
    /// When it became due (next step only).
    pub due: String,
    /// What it waits on (next step only).
    pub waiting: Vec<String>,
}

/// The policy check of the next step.
#[derive(Debug, Serialize)]
pub struct Check {
    /// Where.
    pub environment: String,
    /// The step, 1-based.
    pub step: i32,
    /// Allowed now.
    pub allowed: bool,
    /// The rules it breaks now.
    pub violations: Vec<String>,
    /// The check itself failed (for example, not allowed to this person).
    pub failure: Option<Failure>,
}

async fn release(state: &AppState, user: &User, id: &str) -> Result<ReleaseView, Failure> {
    let name = format!("releases/{id}");
    let request = state
        .backends
        .request(rpb::GetReleaseTimelineRequest { name: name.clone() }, user)?;
    let timeline = state
        .backends
        .release
        .clone()
        .get_release_timeline(request)
        .await?
        .into_inner();
    let mut view = release_view(&timeline);
    if let Some(next) = timeline.upcoming.first() {
        let request = state.backends.request(
            rpb::CheckReleaseRequest {
                name,
                environment: next.environment.clone(),
                step: u32::try_from(next.step - 1).unwrap_or_default(),
            },
            user,
        )?;
        let checked = state.backends.release.clone().check_release(request).await;
        view.check = Some(match checked {
            Ok(r) => {
                let r = r.into_inner();
                Check {
                    environment: next.environment.clone(),
                    step: next.step,
                    allowed: r.allowed,
                    violations: r.violations.iter().map(violation).collect(),
                    failure: None,
                }
            }
            Err(status) => Check {
                environment: next.environment.clone(),
                step: next.step,
                allowed: false,
                violations: Vec::new(),
                failure: Some(status.into()),
            },
        });
    }
    Ok(view)
}

/// The release page's data without the check (pure, for tests).
pub fn release_view(timeline: &rpb::ReleaseTimeline) -> ReleaseView {
    use rpb::ReleaseState as S;
    let r = timeline.release.clone().unwrap_or_default();
    let state = r.state();
    ReleaseView {
        id: id(&r.name, "releases/"),
        state: enum_name(state.as_str_name(), "RELEASE_STATE_"),
        description: r.description.clone(),
        features: r.features.clone(),
        requester: r.requester.clone(),
        change_reference: r.change_reference.clone(),
        environments: r
            .environments
            .iter()
            .map(|e| ReleaseEnvironment {
                environment: e.environment.clone(),
                percent: e.rollout_percent,
                step: match e.current_step {
                    Some(s) if !e.steps.is_empty() => format!("step {}/{}", s + 1, e.steps.len()),
                    None if !e.steps.is_empty() => format!("0/{} steps", e.steps.len()),
                    _ => String::new(),
                },
            })
            .collect(),
        approvals: r
            .approvals
            .iter()
            .map(|a| format!("{} at {}", a.principal, time(a.time.as_ref())))
            .collect(),
        waiting: r.waiting.iter().map(violation).collect(),
        events: timeline
            .events
            .iter()
            .map(|e| TimelineEvent {
                time: time(e.time.as_ref()),
                kind: e.kind.clone(),
                principal: e.principal.clone(),
                summary: e.summary.clone(),
                reason: e.reason.clone(),
                environment: e.environment.clone(),
            })
            .collect(),
        upcoming: timeline
            .upcoming
            .iter()
            .map(|u| Upcoming {
                environment: u.environment.clone(),
                step: u.step,
                percent: u.percent,
                due: u
                    .due_time
                    .as_ref()
                    .map(|t| time(Some(t)))
                    .unwrap_or_default(),
                waiting: u.waiting.iter().map(violation).collect(),
            })
            .collect(),
        check: None,
        can_pause: matches!(state, S::Releasing | S::Released | S::Approved),
        can_resume: state == S::Paused,
        can_approve: state == S::Planned,
    }
}

// --- calendar ---

/// How many days the calendar shows.
const CALENDAR_DAYS: i64 = 14;
/// The calendar's resolution.
const SLOT_MS: i64 = 15 * 60 * 1000;
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Freeze windows, environment x day.
#[derive(Debug, Serialize)]
pub struct FreezeCalendar {
    /// The columns: days, for people.
    pub days: Vec<String>,
    /// One row per environment.
    pub rows: Vec<CalendarRow>,
}

/// An environment's freezes.
#[derive(Debug, Serialize)]
pub struct CalendarRow {
    /// The environment id.
    pub environment: String,
    /// Its windows' names.
    pub windows: Vec<String>,
    /// Per day, in column order.
    pub days: Vec<CalendarDay>,
}

/// A day of an environment.
#[derive(Debug, Serialize)]
pub struct CalendarDay {
    /// How much of the day (UTC) is frozen, in percent.
    pub percent: u32,
    /// The windows that freeze part of it.
    pub names: String,
}

/// `GET /calendar`.
pub async fn calendar_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let data = freeze_calendar(&state, &User::from_headers(&headers)).await;
    page(&state, "calendar", "Freeze calendar", data)
}

async fn freeze_calendar(state: &AppState, user: &User) -> Result<FreezeCalendar, Failure> {
    let b = &state.backends;
    let environments = pages(|page_token| {
        let request = b.request(
            dpb::ListEnvironmentsRequest {
                page_token,
                ..Default::default()
            },
            user,
        );
        let mut client = b.deploy.clone();
        async move {
            let r = client.list_environments(request?).await?.into_inner();
            Ok((r.environments, r.next_page_token))
        }
    })
    .await?;
    let now = chrono::Utc::now().timestamp_millis();
    Ok(calendar_of(&environments, now - now.rem_euclid(DAY_MS)))
}

/// The calendar of `environments` for the days from `start_ms` (pure, for tests).
pub fn calendar_of(environments: &[dpb::Environment], start_ms: i64) -> FreezeCalendar {
    let days = (0..CALENDAR_DAYS)
        .filter_map(|d| chrono::DateTime::from_timestamp_millis(start_ms + d * DAY_MS))
        .map(|t| t.format("%a %d").to_string())
        .collect();
    let rows = environments
        .iter()
        .map(|e| {
            let windows: Vec<calendar::FreezeWindow> = e
                .freeze_windows
                .iter()
                .filter_map(calendar::from_proto::window)
                .collect();
            let days = (0..CALENDAR_DAYS)
                .map(|d| {
                    let mut names = std::collections::BTreeSet::new();
                    let mut frozen = 0;
                    let slots = DAY_MS / SLOT_MS;
                    for slot in 0..slots {
                        let active =
                            calendar::active(&windows, start_ms + d * DAY_MS + slot * SLOT_MS);
                        if !active.is_empty() {
                            frozen += 1;
                            names.extend(active.iter().map(|w| w.name.clone()));
                        }
                    }
                    CalendarDay {
                        percent: u32::try_from(frozen * 100 / slots).unwrap_or(100),
                        names: names.into_iter().collect::<Vec<_>>().join(", "),
                    }
                })
                .collect();
            CalendarRow {
                environment: id(&e.name, "environments/"),
                windows: windows.iter().map(|w| w.name.clone()).collect(),
                days,
            }
        })
        .collect();
    FreezeCalendar { days, rows }
}

// --- audit ---

/// How many records the feed shows.
const AUDIT_RECORDS: usize = 200;
/// How far back the feed reads.
const AUDIT_DAYS: i64 = 7;
/// The page size asked for.
const AUDIT_PAGE: i32 = 500;

/// One audit record of either service.
#[derive(Debug, Serialize)]
pub struct AuditEntry {
    /// `deploy-svc` or `release-svc`.
    pub service: &'static str,
    /// When, for people.
    pub time: String,
    /// For ordering (seconds, nanoseconds).
    #[serde(skip)]
    pub at: (i64, i32),
    /// Who.
    pub principal: String,
    /// The call.
    pub action: String,
    /// On what.
    pub resource: String,
    /// Why.
    pub reason: String,
}

/// The feed: the latest records of both services, newest first.
#[derive(Debug, Serialize)]
pub struct Audit {
    /// The records.
    pub entries: Vec<AuditEntry>,
}

async fn audit(state: &AppState, user: &User) -> Result<Audit, Failure> {
    let b = &state.backends;
    // The trail is listed oldest first: the last week's, keeping the newest records.
    let since = chrono::Utc::now() - chrono::Duration::days(AUDIT_DAYS);
    let start_time = Some(prost_types::Timestamp {
        seconds: since.timestamp(),
        nanos: 0,
    });
    // The two services' audit calls differ only in their types.
    macro_rules! trail {
        ($client:ident, $pb:ident, $service:literal) => {
            pages(|page_token| {
                let request = b.request(
                    $pb::ListAuditRecordsRequest {
                        start_time,
                        page_size: AUDIT_PAGE,
                        page_token,
                        ..Default::default()
                    },
                    user,
                );
                let mut client = b.$client.clone();
                async move {
                    let r = client.list_audit_records(request?).await?.into_inner();
                    let entries = r.records.iter().map(|r| AuditEntry {
                        service: $service,
                        time: time(r.time.as_ref()),
                        at: r.time.map_or((0, 0), |t| (t.seconds, t.nanos)),
                        principal: r.principal.clone(),
                        action: r.action.clone(),
                        resource: r.resource.clone(),
                        reason: r.reason.clone(),
                    });
                    Ok((entries.collect(), r.next_page_token))
                }
            })
        };
    }
    let deploy = trail!(deploy, dpb, "deploy-svc");
    let release = trail!(release, rpb, "release-svc");
    let (deploy, release) = tokio::join!(deploy, release);
    let mut entries = deploy?;
    entries.extend(release?);
    entries.sort_by_key(|e| std::cmp::Reverse(e.at));
    entries.truncate(AUDIT_RECORDS);
    Ok(Audit { entries })
}

// --- stale flags ---

/// `?days=N` of the stale view.
#[derive(Debug, serde::Deserialize)]
pub struct StaleQuery {
    /// At 100% or not evaluated for this many days (default 30, at most 3650).
    pub days: Option<u32>,
}

/// Flags to clean up.
#[derive(Debug, Serialize)]
pub struct StaleView {
    /// The threshold, in days.
    pub days: u32,
    /// The features, by key.
    pub features: Vec<StaleFeature>,
}

/// A flag to clean up, and why.
#[derive(Debug, Serialize)]
pub struct StaleFeature {
    /// The feature key.
    pub key: String,
    /// Not evaluated anywhere for `days`.
    pub not_evaluated: bool,
    /// When it was last evaluated (empty: never).
    pub last_evaluated: String,
    /// Where it is at 100%, with since when, for people.
    pub fully_released: Vec<String>,
}

/// `GET /stale`.
pub async fn stale_page(
    State(state): State<AppState>,
    Query(q): Query<StaleQuery>,
    headers: HeaderMap,
) -> Response {
    let data = stale_view(&state, &User::from_headers(&headers), q.days).await;
    page(&state, "stale", "Stale flags", data)
}

async fn stale_view(
    state: &AppState,
    user: &User,
    days: Option<u32>,
) -> Result<StaleView, Failure> {
    let b = &state.backends;
    let days = days.unwrap_or(30).min(3650);
    let threshold = Some(prost_types::Duration {
        seconds: i64::from(days) * 86_400,
        nanos: 0,
    });
    let features = pages(|page_token| {
        let request = b.request(
            rpb::ListStaleFeaturesRequest {
                released_for: threshold,
                unevaluated_for: threshold,
                page_size: 1000,
                page_token,
            },
            user,
        );
        let mut client = b.release.clone();
        async move {
            let r = client.list_stale_features(request?).await?.into_inner();
            let flags = r.features.iter().map(|f| StaleFeature {
                key: id(&f.name, "features/"),
                not_evaluated: f.not_evaluated,
                last_evaluated: time(f.last_evaluate_time.as_ref()),
                fully_released: f
                    .fully_released
                    .iter()
                    .map(|r| format!("{} since {}", r.environment, time(r.since.as_ref())))
                    .collect(),
            });
            Ok((flags.collect(), r.next_page_token))
        }
    })
    .await?;
    Ok(StaleView { days, features })
}

/// Every page of a listing (at most [`MAX_PAGES`]): `fetch` takes a page token and answers
/// with the page's items and the next token.
async fn pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>, tonic::Status>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        let (items, next) = fetch(token).await?;
        all.extend(items);
        if next.is_empty() {
            break;
        }
        token = next;
    }
    Ok(all)
}

// --- shared ---

fn violation(v: &rpb::PolicyViolation) -> String {
    format!("{} {}: {}", v.r#type, v.subject, v.description)
}

/// `name` without `prefix`.
fn id(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

/// A proto enum value's name for people: `RELEASE_STATE_ROLLED_BACK` -> `rolled back`.
fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_lowercase()
        .replace('_', " ")
}

/// A time for people, in UTC to the second.
fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_compile() {
        let env = templates();
        for name in [
            "page.html",
            "inventory.html",
            "visibility.html",
            "release.html",
            "failure.html",
            "flash.html",
            "audit.html",
            "calendar.html",
        ] {
            assert!(env.get_template(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn stale_flags_give_the_same_answer_everywhere() {
        let row = |feature: &str, disabled: bool, classes: &[&str]| FeatureRow {
            feature: feature.into(),
            disabled,
            targeted: false,
            cells: classes
                .iter()
                .map(|c| {
                    visibility_cell(&rpb::VisibilityCell {
                        class: match *c {
                            "static" => rpb::VisibilityClass::Static,
                            _ => rpb::VisibilityClass::Rollout,
                        }
                        .into(),
                        ..Default::default()
                    })
                })
                .collect(),
        };
        let found = stale(&[
            row("done", false, &["static", "static"]),
            row("half", false, &["static", "rollout"]),
            row("off", true, &["rollout"]),
        ]);
        let keys: Vec<&str> = found.iter().map(|s| s.feature.as_str()).collect();
        assert_eq!(keys, ["done", "off"]);
    }

    #[test]
    fn the_calendar_marks_the_frozen_days() {
        let day = |d: i64| prost_types::Timestamp {
            seconds: d * 86_400,
            nanos: 0,
        };
        let prod = dpb::Environment {
            name: "environments/prod".into(),
            freeze_windows: vec![dpb::FreezeWindow {
                name: "launch".into(),
                schedule: Some(dpb::freeze_window::Schedule::Absolute(
                    dpb::AbsoluteWindow {
                        start_time: Some(day(1)),
                        end_time: Some(prost_types::Timestamp {
                            seconds: 2 * 86_400 + 43_200,
                            nanos: 0,
                        }),
                    },
                )),
            }],
            ..Default::default()
        };
        let c = calendar_of(&[prod], 0);
        assert_eq!(c.days.len(), 14);
        let percents: Vec<u32> = c.rows[0].days.iter().take(4).map(|d| d.percent).collect();
        assert_eq!(percents, [0, 100, 50, 0]);
        assert_eq!(c.rows[0].days[1].names, "launch");
        assert_eq!(c.rows[0].environment, "prod");
    }

    #[test]
    fn the_audit_feed_renders() {
        let data = Audit {
            entries: vec![AuditEntry {
                service: "release-svc",
                time: String::new(),
                at: (0, 0),
                principal: "ann".into(),
                action: "PauseRelease".into(),
                resource: "releases/1".into(),
                reason: "why".into(),
            }],
        };
        let html = templates()
            .get_template("audit.html")
            .unwrap()
            .render(minijinja::context! { data })
            .unwrap();
        assert!(
            html.contains("<a href=") && html.contains("PauseRelease"),
            "{html}"
        );
    }

    #[test]
    fn cells_say_their_class_and_reason() {
        let cell = visibility_cell(&rpb::VisibilityCell {
            environment: "prod".into(),
            class: rpb::VisibilityClass::NotDeployed.into(),
            release: "releases/r1".into(),
            release_state: rpb::ReleaseState::Releasing.into(),
            not_deployed: "checkout 2.0.0 at 100%".into(),
            ..Default::default()
        });
        assert_eq!(cell.class, "not-deployed");
        assert_eq!(cell.release, "r1");
        assert_eq!(
            cell.reason,
            "releases/r1 (releasing); waits for checkout 2.0.0 at 100%"
        );
        let cell = visibility_cell(&rpb::VisibilityCell {
            class: rpb::VisibilityClass::Rollout.into(),
            rollout_percent: 25.0,
            ..Default::default()
        });
        assert_eq!((cell.class, cell.label.as_str()), ("rollout", "25%"));
    }

    #[test]
    fn the_matrix_has_a_cell_per_environment_and_artifact() {
        let env = |name: &str, artifacts: &[&str]| dpb::EnvironmentInventory {
            environment: name.into(),
            target_count: 2,
            artifacts: artifacts
                .iter()
                .map(|a| dpb::ArtifactInventory {
                    artifact: (*a).into(),
                    versions: vec![dpb::PlacedVersion {
                        version: "1.0.0".into(),
                        target_count: 1,
                        coverage: 0.5,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let m = inventory_matrix(vec![env("dev", &["api", "web"]), env("prod", &["web"])]);
        assert_eq!(m.rows.len(), 2);
        assert_eq!(m.rows[0].artifact, "api");
        assert!(m.rows[0].cells[1].is_none());
        let web = m.rows[1].cells[1].as_ref().unwrap();
        assert_eq!(web.versions[0].percent, 50);
    }
}
