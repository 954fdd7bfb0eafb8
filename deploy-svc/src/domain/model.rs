//! The resources of Deployment Management as plain data.

use std::collections::BTreeMap;

pub use calendar::FreezeWindow;

use super::clock::Millis;

/// An environment (`environments/{id}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Environment {
    /// The id.
    pub id: String,
    /// Free text.
    pub description: String,
    /// Deployments here need a change reference.
    pub protected: bool,
    /// The id of the environment a version must have succeeded in first.
    pub upstream: Option<String>,
    /// The ids of the promotion path ending here, first first (filled on read).
    pub promotion_path: Vec<String>,
    /// The change calendar: deployments are refused while one of these is active.
    pub freeze_windows: Vec<FreezeWindow>,
    /// Optimistic concurrency revision; the etag is its decimal form.
    pub revision: i64,
    /// Creation time.
    pub create_ms: Millis,
    /// Last update time.
    pub update_ms: Millis,
}

/// The fields of a new environment.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEnvironment {
    /// The id.
    pub id: String,
    /// Free text.
    pub description: String,
    /// Deployments here need a change reference.
    pub protected: bool,
    /// The upstream environment id.
    pub upstream: Option<String>,
    /// The change calendar (validated).
    pub freeze_windows: Vec<FreezeWindow>,
}

/// A partial update of an environment; `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnvironmentUpdate {
    /// The environment id.
    pub id: String,
    /// The expected revision, if the caller sent an etag.
    pub expected_revision: Option<i64>,
    /// New description.
    pub description: Option<String>,
    /// New protected flag.
    pub protected: Option<bool>,
    /// New upstream (`Some(None)` clears it).
    pub upstream: Option<Option<String>>,
    /// New change calendar, replacing every window (`Some(vec![])` clears it).
    pub freeze_windows: Option<Vec<FreezeWindow>>,
}

/// Health derived from heartbeat age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetHealth {
    /// Recent heartbeat.
    Healthy,
    /// Heartbeat older than the healthy window.
    Stale,
    /// Heartbeat older than the lost window.
    Lost,
}

/// Windows that turn heartbeat age into health.
#[derive(Debug, Clone, Copy)]
pub struct HealthWindows {
    /// Up to this age a target is healthy.
    pub healthy_ms: Millis,
    /// Up to this age a target is stale; beyond, lost.
    pub lost_ms: Millis,
}

impl Default for HealthWindows {
    fn default() -> Self {
        Self {
            healthy_ms: 30_000,
            lost_ms: 300_000,
        }
    }
}

impl HealthWindows {
    /// The health of a target whose last heartbeat was at `last` when it is `now`.
    pub fn health(&self, last: Millis, now: Millis) -> TargetHealth {
        let age = now.saturating_sub(last);
        if age <= self.healthy_ms {
            TargetHealth::Healthy
        } else if age <= self.lost_ms {
            TargetHealth::Stale
        } else {
            TargetHealth::Lost
        }
    }
}

/// A target (`environments/{environment}/targets/{id}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The environment id.
    pub environment: String,
    /// The target id.
    pub id: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// First registration.
    pub register_ms: Millis,
    /// Last heartbeat.
    pub heartbeat_ms: Millis,
}

/// An immutable artifact version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// The artifact name.
    pub name: String,
    /// The version.
    pub version: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Free metadata.
    pub metadata: BTreeMap<String, String>,
    /// Where agents fetch it from (`file://`, `http://`, `https://`; empty: nowhere, the
    /// placements are reported by hand).
    pub source_uri: String,
    /// Registration time (set by the store).
    pub create_ms: Millis,
}

/// The derived state of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeploymentState {
    /// No report yet.
    Pending,
    /// Some target placing or placed, none failed.
    InProgress,
    /// Every target placed. Final.
    Succeeded,
    /// A target failed. Final.
    Failed,
    /// Cancelled. Final.
    Cancelled,
}

/// The state of one placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlacementState {
    /// Included in the deployment, not reported yet.
    Pending,
    /// Being placed.
    Placing,
    /// In place.
    Placed,
    /// Placement failed.
    Failed,
    /// Removed from the target.
    Removed,
}

macro_rules! int_codes {
    ($ty:ident { $($variant:ident = $code:expr),* $(,)? }) => {
        impl $ty {
            /// The stable integer stored in the database (equal to the proto enum number).
            pub fn code(self) -> i64 {
                match self { $(Self::$variant => $code),* }
            }

            /// The state stored as `code`, if any.
            pub fn from_code(code: i64) -> Option<Self> {
                match code { $($code => Some(Self::$variant),)* _ => None }
            }
        }
    };
}

int_codes!(DeploymentState { Pending = 1, InProgress = 2, Succeeded = 3, Failed = 4, Cancelled = 5 });
int_codes!(PlacementState { Pending = 1, Placing = 2, Placed = 3, Failed = 4, Removed = 5 });

impl DeploymentState {
    /// The name the API uses, without the enum prefix (`IN_PROGRESS`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::InProgress => "IN_PROGRESS",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Whether the state is final.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl PlacementState {
    /// The name the API uses, without the enum prefix (`PLACED`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Placing => "PLACING",
            Self::Placed => "PLACED",
            Self::Failed => "FAILED",
            Self::Removed => "REMOVED",
        }
    }
}

/// An emergency override of an environment's freeze windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmergencyOverride {
    /// Why the change cannot wait.
    pub reason: String,
    /// Who approved it (never the requester).
    pub approver: String,
}

/// A new deployment, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeployment {
    /// Artifact name.
    pub artifact: String,
    /// Artifact version.
    pub version: String,
    /// Environment id.
    pub environment: String,
    /// Change reference (empty if none).
    pub change_reference: String,
    /// The emergency override of freeze windows, if given.
    pub emergency: Option<EmergencyOverride>,
    /// How the targets are paced.
    pub strategy: super::strategy::Strategy,
    /// Roll back automatically if the deployment fails.
    pub auto_rollback: bool,
    /// Only these targets of the environment (a rollback); `None`: all of them.
    pub targets: Option<Vec<String>>,
    /// The deployment this one rolls back.
    pub rollback_of: Option<i64>,
}

/// A deployment with its placements.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    /// Numeric id.
    pub id: i64,
    /// Artifact name.
    pub artifact: String,
    /// Artifact version.
    pub version: String,
    /// Environment id.
    pub environment: String,
    /// Change reference.
    pub change_reference: String,
    /// The emergency override given at creation, if any.
    pub emergency: Option<EmergencyOverride>,
    /// How the targets are paced.
    pub strategy: super::strategy::Strategy,
    /// Roll back automatically if the deployment fails.
    pub auto_rollback: bool,
    /// A canary deployment was told to continue.
    pub continued: bool,
    /// The deployment this one rolls back.
    pub rollback_of: Option<i64>,
    /// Derived state.
    pub state: DeploymentState,
    /// Per-target placements (empty in list results).
    pub placements: Vec<Placement>,
    /// Creation time.
    pub create_ms: Millis,
    /// Last change.
    pub update_ms: Millis,
}

/// One target's placement within a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Deployment id.
    pub deployment: i64,
    /// Environment id.
    pub environment: String,
    /// Target id.
    pub target: String,
    /// Artifact name.
    pub artifact: String,
    /// Artifact version.
    pub version: String,
    /// Artifact digest.
    pub digest: String,
    /// Current state.
    pub state: PlacementState,
    /// Last reported message.
    pub message: String,
    /// Sequence of the event that set the state (0 while pending).
    pub sequence: u64,
    /// Last change.
    pub update_ms: Millis,
}

/// A committed placement change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementEvent {
    /// Gap-free sequence in commit order.
    pub sequence: u64,
    /// Commit time.
    pub commit_ms: Millis,
    /// The placement after the change.
    pub placement: Placement,
    /// The state before.
    pub previous_state: PlacementState,
    /// The W3C `traceparent` of the call that caused the change (while traces are
    /// exported; `None` for automatic changes and older events).
    pub trace_parent: Option<String>,
}

/// A placement report, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementReport {
    /// Deployment id.
    pub deployment: i64,
    /// Environment id of the target.
    pub environment: String,
    /// Target id.
    pub target: String,
    /// New state (never `Pending`).
    pub state: PlacementState,
    /// Detail.
    pub message: String,
}

/// What a report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportOutcome {
    /// The placement as committed.
    pub placement: Placement,
    /// The deployment state after the report.
    pub deployment_state: DeploymentState,
    /// Whether an event was written.
    pub changed: bool,
}

/// One page of a List.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The keyset position to continue after, if there may be more.
    pub next: Option<String>,
}

/// A List request's paging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Maximum items.
    pub size: usize,
    /// Continue after this keyset position.
    pub after: Option<String>,
}

/// Filters of ListDeployments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeploymentFilter {
    /// Environment id.
    pub environment: Option<String>,
    /// Artifact name.
    pub artifact: Option<String>,
}

/// Bounds of the retained event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// Every event with a sequence at or below this one has been pruned.
    pub pruned_through: u64,
    /// The newest committed sequence (0 when nothing was ever written).
    pub head: u64,
}
