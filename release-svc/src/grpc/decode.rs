//! Requests the protobuf decoder refuses (a value nested deeper than its recursion limit,
//! invalid UTF-8, a truncated message) are the caller's fault: tonic reports them as
//! INTERNAL (`failed to decode Protobuf message: ...`). [`DecodeErrors`] wraps a generated
//! server and turns that answer into INVALID_ARGUMENT with a field violation naming the
//! field the decoder was in (`context.attributes`, `feature.variants`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::domain::Error;

/// The prefix of every prost decode error's message.
const DECODE_ERROR: &str = "failed to decode Protobuf message: ";

/// A generated server whose decode failures answer INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct DecodeErrors<S>(pub S);

impl<S: NamedService> NamedService for DecodeErrors<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for DecodeErrors<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = self.0.call(req);
        Box::pin(async move { call.await.map(rewrite) })
    }
}

/// The response, with a decode failure turned into INVALID_ARGUMENT.
fn rewrite(response: http::Response<Body>) -> http::Response<Body> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() != Code::Internal {
        return response;
    }
    let Some(detail) = status.message().strip_prefix(DECODE_ERROR) else {
        return response;
    };
    let (field, description) = field_of(detail);
    Status::from(Error::invalid(field, description)).into_http()
}

/// The request field a decode error is about, and what went wrong. prost lists the
/// messages it was in innermost first (`Value.kind: Struct.fields: ...:
/// EvaluationContext.attributes: EvaluateRequest.context: recursion limit reached`); the
/// field path is read from the outside in, stopping at the well-known value types.
fn field_of(detail: &str) -> (String, String) {
    let is_step = |s: &str| {
        s.split_once('.').is_some_and(|(m, f)| {
            !m.is_empty()
                && !f.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        })
    };
    let (mut steps, mut cause) = (Vec::new(), detail);
    while let Some((step, rest)) = cause.split_once(": ").filter(|(s, _)| is_step(s)) {
        steps.push(step);
        cause = rest;
    }
    let mut path = Vec::new();
    for step in steps.iter().rev() {
        let Some((message, field)) = step.split_once('.') else {
            break;
        };
        if matches!(message, "Value" | "Struct" | "ListValue") {
            break;
        }
        path.push(field);
    }
    let field = if path.is_empty() {
        "request".to_owned()
    } else {
        path.join(".")
    };
    let description = if cause == "recursion limit reached" {
        "nests deeper than the protobuf decoder allows (its recursion limit is 100 messages)"
            .to_owned()
    } else {
        format!("cannot be decoded: {cause}")
    };
    (field, description)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_is_read_from_the_outside_in() {
        let (field, description) = field_of(
            "Value.kind: Struct.fields: Value.kind: EvaluationContext.attributes: EvaluateRequest.context: recursion limit reached",
        );
        assert_eq!(field, "context.attributes");
        assert!(description.contains("recursion limit"), "{description}");
        let (field, _) =
            field_of("Feature.variants: CreateFeatureRequest.feature: recursion limit reached");
        assert_eq!(field, "feature.variants");
        let (field, description) = field_of("invalid wire type value: 7");
        assert_eq!(field, "request");
        assert!(description.contains("invalid wire type"), "{description}");
    }
}
