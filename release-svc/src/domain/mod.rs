//! Domain of Release Management: features, releases and their state machine, the rule
//! language, stable hashing, the placement coverage gate and the evaluator. No tonic, no SQL.
//!
//! # Layout
//!
//! - [`model`]: features, carriers, releases, the release state machine.
//! - [`rules`]: JSON Logic with flagd's operators.
//! - [`hash`]: MurmurHash3 buckets for rollouts and `fractional`.
//! - [`placements`]: the mirror of deploy-svc's placements and the coverage gate.
//! - [`evaluate`]: the immutable snapshot and the decision order.
//! - [`flagd_doc`]: flagd flag-definition documents <-> features (import, export).
//! - [`policy`]: environment policies and the release checks (freeze, cadence, soak, approvals, change reference, coverage).
//! - [`names`]: resource names (release.v1, and the deploy.v1 names the consumer reads).
//! - [`usage`]: evaluation counters per feature, environment and variant (stale flags).
//! - [`text`]: short texts compared in place (the evaluator's hot comparisons).
//! - [`values`]: limits on variant values and evaluation contexts (depth, size, count).

pub mod evaluate;
pub mod flagd_doc;
pub mod hash;
pub mod model;
pub mod names;
pub mod placements;
pub mod policy;
pub mod rules;
pub mod text;
pub mod usage;
pub mod values;

pub use service_kit::error::{Error, FieldViolation, PreconditionViolation, Result, Violations};
