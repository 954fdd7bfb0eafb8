//! The one mapping from [`Error`] to a gRPC status, with rich details.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidArgument(fields) => {
                let mut details = ErrorDetails::new();
                for f in fields {
                    details.add_bad_request_violation(f.field, f.description);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::NotFound(resource) => {
                let mut details = ErrorDetails::new();
                details.set_resource_info("", resource, "", "not found");
                Status::with_error_details(Code::NotFound, message, details)
            }
            Error::AlreadyExists { resource, detail } => {
                let mut details = ErrorDetails::new();
                details.set_resource_info("", resource, "", detail);
                Status::with_error_details(Code::AlreadyExists, message, details)
            }
            Error::FailedPrecondition(rules) => {
                let mut details = ErrorDetails::new();
                for r in rules {
                    details.add_precondition_failure_violation(r.kind, r.subject, r.description);
                }
                Status::with_error_details(Code::FailedPrecondition, message, details)
            }
            Error::Aborted(_) => Status::aborted(message),
            Error::OutOfRange(_) => Status::out_of_range(message),
            Error::ResourceExhausted(_) => Status::resource_exhausted(message),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::Internal(source) => {
                tracing::error!(error = %source, "internal error");
                Status::internal(crate::error::INTERNAL_FOR_CALLERS)
            }
        }
    }
}
