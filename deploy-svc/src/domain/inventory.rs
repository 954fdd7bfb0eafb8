//! The inventory: what is placed where, what is moving, and what every target runs. The
//! store reads it in one transaction; the gRPC layer adds what depends on the clock (the
//! freeze state, target health).

use super::clock::Millis;
use super::model::{Deployment, Environment};
use super::strategy::Step;

/// Most in-flight deployments listed per environment and artifact (oldest first); the
/// total is always given.
pub const MAX_IN_FLIGHT: usize = 20;

/// An inventory page position: the environment and artifact of the last entry returned
/// (an empty artifact for an environment that had none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryKey {
    /// Environment id.
    pub environment: String,
    /// Artifact name, or empty.
    pub artifact: String,
}

impl InventoryKey {
    /// The keyset form (`{environment}/{artifact}`; neither contains a `/`).
    pub fn encode(&self) -> String {
        format!("{}/{}", self.environment, self.artifact)
    }

    /// The key of [`encode`](Self::encode), if `text` is one.
    pub fn decode(text: &str) -> Option<Self> {
        let (environment, artifact) = text.split_once('/')?;
        let label = |s: &str| super::names::validate_id(s).is_ok();
        (label(environment) && (artifact.is_empty() || label(artifact))).then(|| Self {
            environment: environment.to_owned(),
            artifact: artifact.to_owned(),
        })
    }
}

/// Which environments an inventory page covers.
pub struct InventoryQuery {
    /// One environment, or `None` for every one `may_view` accepts.
    pub environment: Option<String>,
    /// Entries (environment x artifact; an environment without artifacts is one entry).
    pub size: usize,
    /// Continue after this entry.
    pub after: Option<InventoryKey>,
    /// Whether the caller may view an environment (by id).
    pub may_view: Box<dyn Fn(&str) -> bool + Send>,
}

/// One environment of an inventory page.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentInventory {
    /// The environment, with its change calendar.
    pub environment: Environment,
    /// Targets registered in it.
    pub targets: u64,
    /// Its artifacts on this page, by name.
    pub artifacts: Vec<ArtifactInventory>,
}

/// One artifact in one environment.
#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactInventory {
    /// The artifact name.
    pub artifact: String,
    /// The versions current on at least one target, most recently placed first.
    pub versions: Vec<PlacedVersion>,
    /// Unfinished deployments of the artifact, oldest first, at most [`MAX_IN_FLIGHT`].
    pub in_flight: Vec<InFlight>,
    /// Unfinished deployments in all.
    pub in_flight_total: u64,
}

/// A version and the targets it is current on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedVersion {
    /// The version.
    pub version: String,
    /// Its digest.
    pub digest: String,
    /// Targets whose current version of the artifact (newest PLACED placement) it is.
    pub targets: u64,
    /// When it was last placed on one of them.
    pub last_place_ms: Millis,
}

/// An unfinished deployment and its position in its strategy.
#[derive(Debug, Clone, PartialEq)]
pub struct InFlight {
    /// The deployment (no placements).
    pub deployment: Deployment,
    /// Its step.
    pub step: Step,
}

/// The current version of one artifact on one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetVersion {
    /// The target id.
    pub target: String,
    /// The artifact name.
    pub artifact: String,
    /// The version.
    pub version: String,
    /// The deployment that placed it.
    pub deployment: i64,
    /// When it was placed.
    pub place_ms: Millis,
}
