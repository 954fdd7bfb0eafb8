//! The error type both services' domains return. It names no tonic type; [`crate::status`]
//! maps it exhaustively to a gRPC status with rich details.

/// A request field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field path, for example `deployment.environment`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// A rule that refuses the operation in the current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreconditionViolation {
    /// Machine-readable rule, for example `PROMOTION_ORDER`.
    pub kind: String,
    /// The resource the rule is about, for example `environments/staging`.
    pub subject: String,
    /// Human-readable explanation.
    pub description: String,
}

impl PreconditionViolation {
    /// A violation of rule `kind` about `subject`.
    pub fn new(
        kind: impl Into<String>,
        subject: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        Self {
            kind: kind.into(),
            subject: subject.into(),
            description: description.into(),
        }
    }
}

/// Everything that can go wrong in a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One or more request fields are invalid.
    #[error("invalid argument: {}", describe_fields(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The named resource does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The resource exists already (and differs from the request).
    #[error("{resource} already exists: {detail}")]
    AlreadyExists {
        /// The resource name.
        resource: String,
        /// Why the request conflicts with it.
        detail: String,
    },
    /// Rules refuse the operation; every violated rule is listed.
    #[error("failed precondition: {}", describe_rules(.0))]
    FailedPrecondition(Vec<PreconditionViolation>),
    /// A concurrent change won (stale etag).
    #[error("aborted: {0}")]
    Aborted(String),
    /// A position outside the valid range (a sequence ahead of the log head).
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// The caller is too slow or asks too much.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The service cannot serve now (shutting down, storage unreachable); retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or a storage failure; details are logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a caller sees of an internal error.
pub const INTERNAL_FOR_CALLERS: &str = "internal error; see the server log";

/// The result type of both services.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// One invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// One violated rule.
    pub fn precondition(
        kind: impl Into<String>,
        subject: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        Self::FailedPrecondition(vec![PreconditionViolation::new(kind, subject, description)])
    }

    /// An internal error from `e`, keeping its whole source chain in the message (logged
    /// once, when the error becomes a status; never returned to the caller).
    pub fn internal(e: impl std::error::Error) -> Self {
        Self::Internal(chain(&e))
    }

    /// What a caller may see of this error: its text, except for an internal error, whose
    /// details stay in the server log ([`INTERNAL_FOR_CALLERS`]).
    pub fn for_caller(&self) -> String {
        match self {
            Self::Internal(_) => INTERNAL_FOR_CALLERS.to_owned(),
            other => other.to_string(),
        }
    }

    /// An internal error from a message of ours.
    pub fn internal_message(message: impl std::fmt::Display) -> Self {
        Self::Internal(message.to_string())
    }

    /// A stored row that cannot be decoded: logged as an error naming its table and row,
    /// INTERNAL to the caller. Stored forms are never decoded into a default instead (an
    /// empty label map or a PENDING state would hide the corruption and act on it).
    pub fn corrupt(table: &str, row: &dyn std::fmt::Display, e: impl std::fmt::Display) -> Self {
        tracing::error!(table, row = %row, error = %e, "corrupt stored row");
        Self::Internal(format!("corrupt stored row {row} in {table}: {e}"))
    }
}

/// `e` and every error under it, outermost first (`a: b: c`). A source whose text its
/// wrapper already shows is not repeated. A PostgreSQL error, for one, says only
/// "db error" itself: the server's message is its source.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        let more = source.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = source.source();
    }
    text
}

fn describe_fields(v: &[FieldViolation]) -> String {
    v.iter()
        .map(|f| format!("{}: {}", f.field, f.description))
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe_rules(v: &[PreconditionViolation]) -> String {
    v.iter()
        .map(|r| format!("{} ({}): {}", r.kind, r.subject, r.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Collects field violations so a request reports all of them at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Records the error of `check` (if any) against `field`.
    pub fn check<T>(&mut self, field: &str, check: Result<T, String>) -> Option<T> {
        match check {
            Ok(v) => Some(v),
            Err(description) => {
                self.0.push(FieldViolation::new(field, description));
                None
            }
        }
    }

    /// Records a violation.
    pub fn push(&mut self, field: &str, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// The violations recorded so far.
    pub fn recorded(&self) -> &[FieldViolation] {
        &self.0
    }

    /// Moves every violation of `other` into this collection.
    pub fn append(&mut self, other: Violations) {
        self.0.extend(other.0);
    }

    /// `Ok` when nothing was recorded, else `InvalidArgument` with every violation.
    pub fn finish(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("db error")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("relation \"deployments\" does not exist")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: db error")]
    struct Repeats(#[source] Outer);

    #[test]
    fn an_internal_error_keeps_its_source_chain() {
        let e = Error::internal(Outer(Inner));
        assert_eq!(
            e.to_string(),
            "internal error: db error: relation \"deployments\" does not exist"
        );
        // A source already shown by its wrapper is not repeated.
        assert_eq!(
            chain(&Repeats(Outer(Inner))),
            "wrapped: db error: relation \"deployments\" does not exist"
        );
    }
}
