//! Domain of Deployment Management: resources, validation, the deployment state machine and
//! the promotion rule. No tonic and no SQL here.
//!
//! # Layout
//!
//! - [`error`]: the request error type (shared with release-svc through service-kit).
//! - [`names`]: resource ids and names, parsed and validated.
//! - [`model`]: environments, targets, artifacts, deployments, placements, events.
//! - [`deployment`]: placement transitions and the derived deployment state.
//! - [`promotion`]: the rules a new deployment must satisfy.
//! - [`freeze`]: the change calendar's freeze windows as they refuse a deployment, and an
//!   environment's freeze state.
//! - [`audit`]: audit records, who made a change, and the before/after summaries.
//! - [`clock`]: the injectable clock.
//! - [`strategy`]: all-at-once, rolling and canary pacing of a deployment's targets, and
//!   the step a deployment has reached.
//! - [`inventory`]: what is placed where and what is in flight, per environment.

pub mod audit;
pub mod clock;
pub mod deployment;
pub mod freeze;
pub mod inventory;
pub mod model;
pub mod names;
pub mod promotion;
pub mod strategy;

pub use service_kit::error;
pub use service_kit::error::{Error, FieldViolation, PreconditionViolation, Result};
