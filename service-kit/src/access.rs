//! The layer in front of every call: one access-log line per call and the per-RPC metrics.
//!
//! A call is recorded when it ends: a unary call when its response (and its trailers) has
//! been sent, a stream when it ends or the client goes away. The line (tracing target
//! `access`, level info) carries `method`, `code`, `latency_ms`, `principal`, `request_id`
//! and `peer`; `--log-format json` makes it one JSON object. Turn it off with
//! `RUST_LOG=info,access=off`.
//!
//! The request id is the caller's `x-request-id` metadata when it is a plain token (1-128
//! visible ASCII characters without quotes or backslashes:
//! [`crate::principal::plain_token`]), otherwise one made up here; either way it is
//! returned in the `x-request-id` response header so a caller can quote it. Nothing else of
//! the request is logged: no payload, no credentials.
//!
//! Metrics (all labels bounded: the method comes from the authorization table, anything
//! else is `unknown`):
//! - `grpc_server_handled_total{grpc_service, grpc_method, grpc_code}`: calls ended.
//! - `grpc_server_handling_seconds{grpc_service, grpc_method}`: call duration (for streams,
//!   how long the stream was open).
//! - `grpc_server_open_streams{kind}`: server streams open now, by kind.
//!
//! With trace export on ([`otel`]), each call also runs in one server span, which ends with
//! the call (for a stream, when it ends) and records its status code.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::Frame;
use tonic::body::Body;
use tracing::Instrument;

use crate::auth::table;
use crate::otel;
use crate::tls::ConnInfo;

/// The server streams counted in `grpc_server_open_streams`, by path, with their kind.
pub const STREAMS: &[(&str, &str)] = &[
    (
        "/deploy.v1.DeployService/WatchPlacements",
        "WatchPlacements",
    ),
    ("/deploy.v1.DeployService/WatchOrders", "WatchOrders"),
    (
        "/release.v1.ReleaseService/WatchVisibility",
        "WatchVisibility",
    ),
    (
        "/flagd.evaluation.v1.Service/EventStream",
        "flagd.v1.EventStream",
    ),
    (
        "/flagd.evaluation.v2.Service/EventStream",
        "flagd.v2.EventStream",
    ),
    ("/grpc.health.v1.Health/Watch", "health.Watch"),
];

const REQUEST_ID: &str = "x-request-id";

/// Registers the HELP text of the metrics above.
pub fn describe() {
    metrics::describe_counter!(
        "grpc_server_handled_total",
        "gRPC calls ended, by method and status code"
    );
    metrics::describe_histogram!(
        "grpc_server_handling_seconds",
        metrics::Unit::Seconds,
        "gRPC call duration (streams: how long they were open)"
    );
    metrics::describe_gauge!(
        "grpc_server_open_streams",
        "server streams open now, by kind"
    );
}

/// Where the authentication layer leaves the caller's principal for the access log.
#[derive(Debug, Clone, Default)]
pub struct PrincipalSlot(Arc<OnceLock<String>>);

impl PrincipalSlot {
    /// Records the principal (the first call wins).
    pub fn set(&self, principal: &str) {
        let _ = self.0.set(principal.to_owned());
    }
}

/// Adds [`CallService`] in front of a server's routes (outside authentication, so refused
/// calls are logged too).
#[derive(Debug, Clone, Default)]
pub struct CallLayer;

impl<S> tower::Layer<S> for CallLayer {
    type Service = CallService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallService { inner }
    }
}

/// See [`CallLayer`].
#[derive(Debug, Clone)]
pub struct CallService<S> {
    inner: S,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for CallService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path();
        let (name, service, method) = labels(path);
        let stream = STREAMS
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, kind)| *kind);
        let request_id = req
            .headers()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| crate::principal::plain_token(v))
            .map_or_else(new_request_id, str::to_owned);
        let peer = req.extensions().get::<ConnInfo>().and_then(|c| c.remote);
        let principal = PrincipalSlot::default();
        req.extensions_mut().insert(principal.clone());
        let span = otel::server_span(name, service, method, req.headers());
        let mut record = Record {
            start: Instant::now(),
            service,
            method,
            stream: None,
            request_id,
            peer,
            principal,
            code: None,
            done: false,
            span: span.clone(),
        };
        // The service that was polled ready handles this call; its clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = span.in_scope(|| inner.call(req));
        let work = async move {
            let response = match call.await {
                Ok(response) => response,
                // Load shedding and the like: answer with the status tonic would have sent.
                Err(e) => match tonic::Status::try_from_error(e.into()) {
                    Ok(status) => status.into_http(),
                    Err(e) => {
                        record.code = Some(tonic::Code::Unknown as i32);
                        record.finish();
                        return Err(e);
                    }
                },
            };
            let (mut parts, body) = response.into_parts();
            // A trailers-only response (every error) carries its status in the headers.
            record.code = grpc_status(&parts.headers);
            if let Ok(value) = http::HeaderValue::from_str(&record.request_id) {
                parts.headers.insert(REQUEST_ID, value);
            }
            if record.code.is_none() {
                if let Some(kind) = stream {
                    metrics::gauge!("grpc_server_open_streams", "kind" => kind).increment(1.0);
                    record.stream = Some(kind);
                }
            }
            Ok(http::Response::from_parts(
                parts,
                Body::new(Recorded {
                    inner: body,
                    record,
                }),
            ))
        };
        Box::pin(work.instrument(span))
    }
}

/// The full method name (`service/method`) and the `grpc_service` and `grpc_method`
/// labels of a path: from the authorization table, so their values are bounded.
fn labels(path: &str) -> (&'static str, &'static str, &'static str) {
    table::TABLE
        .iter()
        .find(|r| r.path == path)
        .map(|r| r.path.trim_start_matches('/'))
        .and_then(|name| name.split_once('/').map(|(s, m)| (name, s, m)))
        .unwrap_or(("unknown", "unknown", "unknown"))
}

fn new_request_id() -> String {
    // RandomState is seeded from the OS once per thread and stepped per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", h.finish())
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The canonical name of a gRPC status code.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

struct Record {
    start: Instant,
    service: &'static str,
    method: &'static str,
    stream: Option<&'static str>,
    request_id: String,
    peer: Option<SocketAddr>,
    principal: PrincipalSlot,
    code: Option<i32>,
    done: bool,
    /// The call's server span (disabled while tracing is off); it ends when this drops.
    span: tracing::Span,
}

impl Record {
    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // A call that ends without a status was cut short: the client left or the
        // deadline passed.
        let code = self.code.unwrap_or(tonic::Code::Cancelled as i32);
        otel::record_status(&self.span, code);
        let code = code_name(code);
        let elapsed = self.start.elapsed();
        metrics::counter!(
            "grpc_server_handled_total",
            "grpc_service" => self.service,
            "grpc_method" => self.method,
            "grpc_code" => code
        )
        .increment(1);
        metrics::histogram!(
            "grpc_server_handling_seconds",
            "grpc_service" => self.service,
            "grpc_method" => self.method
        )
        .record(elapsed.as_secs_f64());
        if let Some(kind) = self.stream {
            metrics::gauge!("grpc_server_open_streams", "kind" => kind).decrement(1.0);
        }
        let peer = self.peer.map_or_else(|| "-".to_owned(), |p| p.to_string());
        tracing::info!(
            target: "access",
            method = %format_args!("/{}/{}", self.service, self.method),
            code,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            principal = self.principal.0.get().map_or("-", String::as_str),
            request_id = %self.request_id,
            peer = %peer,
            "call"
        );
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A response body that records the call when its trailers pass or it is dropped.
struct Recorded {
    inner: Body,
    record: Record,
}

impl http_body::Body for Recorded {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        // What produces a stream's messages runs in the call's span.
        let polled = this
            .record
            .span
            .in_scope(|| Pin::new(&mut this.inner).poll_frame(cx));
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(code) = grpc_status(trailers) {
                        this.record.code = Some(code);
                    }
                    this.record.finish();
                }
            }
            Poll::Ready(None) => this.record.finish(),
            Poll::Ready(Some(Err(_))) => {
                this.record.code.get_or_insert(tonic::Code::Internal as i32);
                this.record.finish();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
