//! The deploy agent: runs on (or for) a target, like an Octopus tentacle, and places there
//! the artifact versions deploy-svc orders. It often runs as root on the hosts it serves,
//! so it trusts nothing an order carries: sources come only from its own allow-list, sizes
//! are bounded, an archive cannot write outside its version directory, and what it observes
//! on its host (digests of what it fetched, hook output) stays in its own log. It links no
//! database and no server code: only the contracts and the shared plumbing.
//!
//! # Layout
//!
//! - [`place`]: placement on the local disk, synchronous and free of gRPC: the allow-list
//!   of sources, fetch, verify, unpack beneath the version directory, hooks, the atomic
//!   switch of `current`, health check and rollback, pruning.
//! - [`runner`]: the agent's loop over gRPC: [`runner::connect`] (the one place the channel
//!   to deploy-svc is set up), register, heartbeat, follow orders, report.
//! - [`telemetry`]: the agent's Prometheus metrics (names, labels, HELP text).
//! - `src/main.rs`: the `deploy-agent` binary: flags, logs, signals.

pub mod place;
pub mod runner;
pub mod telemetry;
