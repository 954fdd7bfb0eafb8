//! Placement on a target: the part of a deploy agent (the program that runs on a target,
//! like an Octopus tentacle) that carries out "place artifact X version V (digest D) from
//! source U" and "remove X V" on the local disk, safely. Synchronous and free of gRPC: the
//! agent calls it from `tokio::task::spawn_blocking`, one order at a time per root.
//!
//! # On disk
//!
//! ```text
//! <root>/current                   symlink -> versions/<artifact>-<version> (relative)
//! <root>/versions/<a>-<v>/         one complete version: its files and .agent-version.json
//! <root>/versions/<a>-<v>.partial  an unpack in progress (deleted at the next place)
//! <root>/tmp/                      downloads and command output (emptied at the next place)
//! ```
//!
//! A version directory is complete only once it holds `.agent-version.json`
//! (`{artifact, version, digest}`); it is written before the directory gets its final name.
//!
//! # Layout
//!
//! - [`place`]: [`Placer`], the order of the steps (fetch, verify, unpack, pre-switch,
//!   switch, health check, prune) and the rollback when a step fails.
//! - `fetch`: `file://`, `http://` and `https://` sources, streamed to a temp file while
//!   hashing.
//! - `unpack`: tar.gz detection and extraction that refuses entries escaping the directory.
//! - `command`: `sh -c` hooks with the agent's environment, a timeout and captured output.

mod command;
mod fetch;
pub mod place;
mod unpack;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use place::Placer;

/// An order to place one artifact version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Artifact name; a single path component (no `/`, not `.` or `..`, no leading `.`).
    pub artifact: String,
    /// Version; a single path component, like `artifact`.
    pub version: String,
    /// `sha256:<64 hex>` of the payload at `source_uri`.
    pub digest: String,
    /// `file:///abs/path`, `http://…` or `https://…`.
    pub source_uri: String,
}

/// The outcome of a successful [`Placer::place`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The version directory that `current` now points at.
    pub path: PathBuf,
    /// The version was already current and complete: nothing was fetched, no hook ran.
    pub reused: bool,
}

/// The complete version that `current` points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDisk {
    /// Artifact name, from the version's metadata file.
    pub artifact: String,
    /// Version, from the version's metadata file.
    pub version: String,
    /// `sha256:<64 hex>` of the payload it was unpacked from.
    pub digest: String,
    /// The version directory (`<root>/versions/<artifact>-<version>`).
    pub path: PathBuf,
}

/// Why an order failed. `Display` is one readable sentence: it becomes the FAILED reason
/// reported to deploy-svc.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    /// The order itself cannot be carried out (bad name, digest or URI syntax).
    #[error("invalid order: {0}")]
    InvalidOrder(String),
    /// The source could not be read or downloaded.
    #[error("could not fetch the artifact: {0}")]
    Fetch(String),
    /// The payload's digest is not the ordered one; nothing was unpacked.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    Digest {
        /// The ordered digest.
        expected: String,
        /// The digest of what was fetched.
        actual: String,
    },
    /// The payload could not be unpacked (or holds an entry that escapes its directory).
    #[error("could not unpack the artifact: {0}")]
    Unpack(String),
    /// The pre-switch command failed; `current` was not touched.
    #[error("pre-switch command failed: {0}")]
    PreSwitch(String),
    /// The health check failed or timed out; the text says what `current` was restored to.
    #[error("health check failed: {0}")]
    HealthCheck(String),
    /// A local disk operation failed.
    #[error("local disk error: {0}")]
    Io(String),
}
