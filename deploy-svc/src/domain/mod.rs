//! Domain of Deployment Management: resources, validation, the deployment state machine and
//! the promotion rule. No tonic and no SQL here.
//!
//! # Layout
//!
//! - [`error`]: the one error type of the service.
//! - [`names`]: resource ids and names, parsed and validated.
//! - [`model`]: environments, targets, artifacts, deployments, placements, events.
//! - [`deployment`]: placement transitions and the derived deployment state.
//! - [`promotion`]: the rules a new deployment must satisfy.
//! - [`clock`]: the injectable clock.

pub mod clock;
pub mod deployment;
pub mod error;
pub mod model;
pub mod names;
pub mod promotion;

pub use error::{Error, FieldViolation, PreconditionViolation, Result};
