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
//! - [`placer`]: [`Placer`], the order of the steps (fetch, verify, unpack, pre-switch,
//!   switch, health check, prune) and the rollback when a step fails.
//! - [`sources`]: the agent's own allow-list of sources ([`Sources`]): `file://` beneath
//!   allowed directories only, `http(s)://` under allowed URL prefixes only, https only if
//!   asked.
//! - `fetch`: streams an allowed source into a temp file while hashing, with a size limit,
//!   redirects followed by hand (each hop checked against the allow-list, never https to
//!   http) and a [`Stop`] checked between chunks.
//! - `beneath`: file operations the kernel keeps beneath one directory (`openat2` with
//!   `RESOLVE_BENEATH`), never following the last component.
//! - `unpack`: tar.gz detection and extraction through `beneath`, with [`UnpackLimits`].
//! - `command`: `sh -c` hooks with the agent's environment, a timeout and output kept
//!   locally (logged, never reported).
//! - `tests`, `extract_tests`: the placer against real directories, `sh` and an HTTP
//!   listener; extraction edge cases with archives built header by header.

mod beneath;
mod command;
mod fetch;
pub mod placer;
pub mod sources;
mod unpack;

#[cfg(test)]
mod extract_tests;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use placer::{Limits, Placer};
pub use sources::Sources;
pub use unpack::UnpackLimits;

/// Set once the agent is stopping: a fetch, an unpack or a hook in progress gives up at its
/// next check (a hook is killed) and the order fails with [`PlaceError::Cancelled`].
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    /// Asks every holder to stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`Stop::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Cancelled)` once stopped.
    pub(crate) fn check(&self) -> Result<(), PlaceError> {
        if self.stopped() {
            Err(PlaceError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// An order to place one artifact version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Artifact name; a single path component (no `/`, not `.` or `..`, no leading `.`).
    pub artifact: String,
    /// Version; a single path component, like `artifact`.
    pub version: String,
    /// `sha256:<64 hex>` of the payload at `source_uri`.
    pub digest: String,
    /// `file:///abs/path`, `http://…` or `https://…`, allowed by the placer's [`Sources`].
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
/// reported to deploy-svc, which every caller of deploy-svc can read. So it never holds
/// what the agent observed on its host: not the digest of what it fetched, not a hook's
/// output (both are logged locally instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    /// The order itself cannot be carried out (bad name, digest or URI syntax).
    #[error("invalid order: {0}")]
    InvalidOrder(String),
    /// The source is not on the agent's allow-list (or a redirect left it).
    #[error("source not allowed: {0}")]
    NotAllowed(String),
    /// The source could not be read or downloaded, or is larger than the limit.
    #[error("could not fetch the artifact: {0}")]
    Fetch(String),
    /// The payload's digest is not the ordered one; nothing was unpacked. What was fetched
    /// instead is logged by the agent, not reported.
    #[error("digest mismatch: the fetched artifact is not {expected}")]
    Digest {
        /// The ordered digest.
        expected: String,
    },
    /// The payload could not be unpacked (or holds an entry that escapes its directory).
    #[error("could not unpack the artifact: {0}")]
    Unpack(String),
    /// The pre-switch command failed or timed out; `current` was not touched. The text
    /// says how it ended (exit status, signal, timeout), never what it printed.
    #[error("pre-switch command failed: {0}")]
    PreSwitch(String),
    /// The health check failed or timed out; the text says what `current` was restored to.
    #[error("health check failed: {0}")]
    HealthCheck(String),
    /// A local disk operation failed.
    #[error("local disk error: {0}")]
    Io(String),
    /// The agent is stopping; the order was abandoned part-way (cleaned at the next place).
    #[error("cancelled: the agent is stopping")]
    Cancelled,
}
