//! The OpenFeature Remote Evaluation Protocol (OFREP): release decisions over HTTP/1.1 and
//! HTTP/2 with JSON, for the stock `ofrep` providers of every OpenFeature SDK.
//!
//! - `POST /ofrep/v1/evaluate/flags/{key}` with `{"context": {...}}`: one decision
//!   (`{key, value, reason, variant, metadata}`; no `value` when the caller should use its
//!   code default), 404 `FLAG_NOT_FOUND`, 400 `INVALID_CONTEXT` / `PARSE_ERROR`.
//! - `POST /ofrep/v1/evaluate/flags`: every flag for one context (`{flags: [...],
//!   metadata: {flagSetId}}`) with an `ETag`; `If-None-Match` with the same tag answers 304.
//!
//! The environment is chosen as for the flagd protocols: the `Flagd-Selector` header
//! (`flagSetId=<env>`), else the context attribute `environment`, else the default
//! environment. Authentication and authorization are those of the gRPC faces: a bearer token
//! (or `X-API-Key`, taken as the bearer token), or a client certificate, checked as a flagd
//! ResolveAll call; the caller must be allowed to evaluate in the chosen environment
//! (401 and 403 otherwise). Bodies are limited to the service's message size, calls to its
//! deadline, connections to its connection cap. Browsers on the origins given with
//! `--cors-origin` may call it from pages of another origin (CORS preflight answered,
//! `ETag` exposed for the web providers' polling).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Map, Value};
use service_kit::auth::{Auth, Caller};
use service_kit::cors::Origins;
use service_kit::tls::{AcceptLimits, ConnInfo};
use service_kit::Serving;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::{Code, Status};

use crate::domain::evaluate::{Context, Decision, Reason, Snapshot};
use crate::grpc::flagd::{cacheable, code_default, Flagd};

const SINGLE: &str = "/ofrep/v1/evaluate/flags/";
const BULK: &str = "/ofrep/v1/evaluate/flags";
/// OFREP calls are authorized as this flagd call (the same permission and scope).
const AUTHORIZED_AS: &str = "/flagd.evaluation.v2.Service/ResolveAll";
/// The largest OFREP request body: a context is at most 64 KiB of attributes, so this
/// leaves room for JSON's escapes and keys.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// OFREP calls in progress at once at most (the lower of this and `--max-in-flight`): with
/// [`MAX_BODY_BYTES`] it bounds the memory bodies can hold to 64 MiB; past it a call is
/// answered 429 at once.
pub const MAX_IN_FLIGHT: usize = 256;
/// A connection with no call in progress for this long is closed (silent sockets, idle
/// keep-alive and HTTP/2 connections included), so they cannot hold the connection cap.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The OFREP face of release-svc.
pub struct Ofrep {
    flagd: Flagd,
    auth: Arc<Auth>,
    max_body: usize,
    timeout: Duration,
    cors_origins: Origins,
    in_flight: Arc<tokio::sync::Semaphore>,
}

type Answer = Response<Full<Bytes>>;

impl Ofrep {
    /// OFREP over the flagd face's decisions, with `serving`'s authentication and limits.
    pub fn new(flagd: Flagd, serving: &Serving, max_body: usize) -> Self {
        Self {
            flagd,
            auth: serving.auth.clone(),
            max_body: max_body.min(MAX_BODY_BYTES),
            timeout: Duration::from_millis(serving.limits.rpc_timeout_ms.max(1)),
            cors_origins: Origins::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                serving.limits.max_in_flight.clamp(1, MAX_IN_FLIGHT),
            )),
        }
    }

    /// Lets pages of these origins call OFREP (CORS).
    pub fn with_cors_origins(mut self, origins: Origins) -> Self {
        self.cors_origins = origins;
        self
    }

    /// Answers one HTTP request.
    pub async fn handle(&self, req: Request<Incoming>, conn: Option<&ConnInfo>) -> Answer {
        let origin = self.cors_origins.allowed(req.headers());
        let ofrep_path = req.uri().path() == BULK || req.uri().path().starts_with(SINGLE);
        if ofrep_path
            && req.method() == Method::OPTIONS
            && req.headers().contains_key(header::ORIGIN)
        {
            // A CORS preflight: allowed origins get the methods and headers OFREP uses.
            let mut answer = Response::new(Full::new(Bytes::new()));
            *answer.status_mut() = StatusCode::NO_CONTENT;
            *answer.headers_mut() = self.cors_origins.preflight(
                req.headers(),
                "POST",
                "authorization, content-type, if-none-match, x-api-key, flagd-selector",
            );
            return answer;
        }
        let mut answer = match tokio::time::timeout(self.timeout, self.route(req, conn)).await {
            Ok(answer) => answer,
            Err(_) => general(StatusCode::SERVICE_UNAVAILABLE, "the call took too long"),
        };
        self.cors_origins
            .mark(origin, answer.headers_mut(), "etag, retry-after");
        answer
    }

    /// Answers an OFREP call: the flag it names (none for the bulk path), the caller and its
    /// context, then the decision or decisions.
    async fn route(&self, req: Request<Incoming>, conn: Option<&ConnInfo>) -> Answer {
        let key = match flag_key(req.uri().path()) {
            Ok(key) => key,
            Err(answer) => return *answer,
        };
        if req.method() != Method::POST {
            let mut answer = general(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            answer
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return answer;
        }
        let caller = match self.authenticate(&req, conn) {
            Ok(caller) => caller,
            Err(answer) => return *answer,
        };
        // Bounded work in progress: refused at once, before the body is read.
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            let mut answer = general(
                StatusCode::TOO_MANY_REQUESTS,
                "too many OFREP calls in progress; retry",
            );
            answer
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return answer;
        };
        if !json_body(&req) {
            return general(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the request as Content-Type: application/json",
            );
        }
        let selector = header_text(&req, "flagd-selector");
        let if_none_match = header_text(&req, header::IF_NONE_MATCH);
        let body = match self.read_body(req).await {
            Ok(body) => body,
            Err(answer) => return *answer,
        };
        let attributes = match parse_context(&body) {
            Ok(a) => a,
            Err((code, details)) => return failure(key.as_deref(), code, &details),
        };
        let (ctx, fixed) =
            match self
                .flagd
                .context_of(selector.as_deref(), Some(&caller), attributes)
            {
                Ok(c) => c,
                Err(status) => return refused(key.as_deref(), &status),
            };
        let snapshot = self.flagd.engine().snapshot();
        match key {
            Some(key) => single(&snapshot, &key, &ctx, fixed),
            None => self.bulk(&snapshot, &ctx, fixed, if_none_match.as_deref()),
        }
    }

    /// The request body, at most `max_body` bytes (413 above, 400 when unreadable).
    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, Box<Answer>> {
        match Limited::new(req.into_body(), self.max_body).collect().await {
            Ok(body) => Ok(body.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Box::new(general(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body is above {} bytes", self.max_body),
            ))),
            Err(e) => Err(Box::new(general(
                StatusCode::BAD_REQUEST,
                &format!("unreadable body: {e}"),
            ))),
        }
    }

    /// Every flag's decision for one context with its `ETag` (304 when `if_none_match`
    /// names it); a general failure when the answer would be above the response limit.
    fn bulk(
        &self,
        snapshot: &Snapshot,
        ctx: &Context,
        fixed: bool,
        if_none_match: Option<&str>,
    ) -> Answer {
        let flags: Vec<Value> = snapshot
            .keys
            .iter()
            .filter_map(|key| {
                snapshot
                    .evaluate(key, ctx)
                    .map(|d| evaluation(snapshot, key, &cacheable(d, fixed)))
            })
            .collect();
        let body = json!({
            "flags": flags,
            "metadata": {"flagSetId": ctx.environment},
        })
        .to_string();
        let limit = self.flagd.max_response_bytes();
        if body.len() > limit {
            return failure(
                None,
                "GENERAL",
                &format!(
                    "the evaluated flags would be {} bytes, above the {limit} byte response limit; evaluate flags one by one",
                    body.len()
                ),
            );
        }
        tagged_answer(body, if_none_match)
    }

    /// The caller, checked as a flagd ResolveAll call; `X-API-Key` stands for a bearer
    /// token when no `Authorization` header is sent.
    fn authenticate(
        &self,
        req: &Request<Incoming>,
        conn: Option<&ConnInfo>,
    ) -> Result<Caller, Box<Answer>> {
        let mut headers = req.headers().clone();
        if !headers.contains_key(header::AUTHORIZATION) {
            if let Some(v) = headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .and_then(|k| HeaderValue::from_str(&format!("Bearer {}", k.trim())).ok())
            {
                headers.insert(header::AUTHORIZATION, v);
            }
        }
        self.auth
            .check(AUTHORIZED_AS, &headers, conn)
            .map_err(|status| Box::new(refused(None, &status)))
    }
}

/// `{"context": {...}}` (the context may be omitted or null: an empty one).
fn parse_context(body: &[u8]) -> Result<Map<String, Value>, (&'static str, String)> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ("PARSE_ERROR", format!("the body is not JSON: {e}")))?;
    let Value::Object(mut request) = value else {
        return Err((
            "PARSE_ERROR",
            "the body must be a JSON object with a `context`".into(),
        ));
    };
    match request.remove("context") {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(context)) => Ok(context),
        Some(_) => Err(("INVALID_CONTEXT", "`context` must be a JSON object".into())),
    }
}

/// The flag an OFREP path names: `None` for the bulk path; 404 for any other path or a key
/// that is not UTF-8 once decoded.
fn flag_key(path: &str) -> Result<Option<String>, Box<Answer>> {
    if path == BULK {
        Ok(None)
    } else if let Some(key) = path.strip_prefix(SINGLE).filter(|k| !k.is_empty()) {
        match percent_decode(key) {
            Some(key) => Ok(Some(key)),
            None => Err(Box::new(general(
                StatusCode::NOT_FOUND,
                "the flag key is not valid UTF-8",
            ))),
        }
    } else {
        Err(Box::new(general(
            StatusCode::NOT_FOUND,
            &format!("no OFREP endpoint at {path}"),
        )))
    }
}

/// Whether the request says its body is JSON (`Content-Type: application/json`, any
/// parameters).
fn json_body(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// A header's value when it is visible ASCII.
fn header_text(req: &Request<Incoming>, name: impl header::AsHeaderName) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// One flag's decision: 404 `FLAG_NOT_FOUND` when the snapshot has no such flag.
fn single(snapshot: &Snapshot, key: &str, ctx: &Context, fixed: bool) -> Answer {
    match snapshot.evaluate(key, ctx) {
        None => json_answer(
            StatusCode::NOT_FOUND,
            &json!({
                "key": key,
                "errorCode": "FLAG_NOT_FOUND",
                "errorDetails": format!("flag {key:?} was not found"),
            }),
        ),
        Some(d) => json_answer(
            StatusCode::OK,
            &evaluation(snapshot, key, &cacheable(d, fixed)),
        ),
    }
}

/// A JSON `body` with its `ETag`: 304 with no body when `if_none_match` names the tag.
fn tagged_answer(body: String, if_none_match: Option<&str>) -> Answer {
    let tag = format!(
        "\"{}\"",
        hex::encode(&Sha256::digest(body.as_bytes())[..16])
    );
    let status = if if_none_match.is_some_and(|h| matches(h, &tag)) {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let body = if status == StatusCode::NOT_MODIFIED {
        Bytes::new()
    } else {
        Bytes::from(body)
    };
    let mut answer = Response::new(Full::new(body));
    *answer.status_mut() = status;
    let headers = answer.headers_mut();
    if status == StatusCode::OK {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Ok(v) = HeaderValue::from_str(&tag) {
        headers.insert(header::ETAG, v);
    }
    answer
}

/// One flag's evaluation in OFREP's shape: no `value` means "use the code default" (then
/// `variant` is empty: the stock Python provider reads `variant` unconditionally).
fn evaluation(snapshot: &Snapshot, key: &str, d: &Decision) -> Value {
    let mut out = Map::new();
    out.insert("key".into(), Value::String(key.to_owned()));
    out.insert("reason".into(), Value::String(reason(d.reason).into()));
    if code_default(d) {
        out.insert("variant".into(), Value::String(String::new()));
    } else {
        out.insert("value".into(), d.value.clone());
        out.insert("variant".into(), Value::String(d.variant.clone()));
    }
    let metadata = snapshot
        .features
        .get(key)
        .map(|e| e.feature.metadata.clone().into_iter().collect())
        .unwrap_or_default();
    out.insert("metadata".into(), Value::Object(metadata));
    Value::Object(out)
}

/// OpenFeature's reason for a decision.
fn reason(r: Reason) -> &'static str {
    match r {
        Reason::Static => "STATIC",
        Reason::Default => "DEFAULT",
        Reason::Disabled => "DISABLED",
        Reason::Split => "SPLIT",
        Reason::NotReleased | Reason::NotDeployed | Reason::TargetingMatch => "TARGETING_MATCH",
    }
}

/// Whether an `If-None-Match` value names `tag` (a list; weak tags compare equal). `*`
/// does not: it asks about the resource's existence, not this answer.
fn matches(header: &str, tag: &str) -> bool {
    header
        .split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == tag)
}

/// `%XX`-decodes a path segment (SDKs encode flag keys); `None` when the result is not
/// UTF-8 or an escape is malformed.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A refused call: its gRPC status as OFREP's HTTP status and error shape.
fn refused(key: Option<&str>, status: &Status) -> Answer {
    match status.code() {
        Code::InvalidArgument => failure(key, "INVALID_CONTEXT", status.message()),
        Code::Unauthenticated => {
            let mut answer = general(StatusCode::UNAUTHORIZED, status.message());
            answer
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            answer
        }
        Code::PermissionDenied => general(StatusCode::FORBIDDEN, status.message()),
        Code::ResourceExhausted => {
            let mut answer = general(StatusCode::TOO_MANY_REQUESTS, status.message());
            answer
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            answer
        }
        Code::Unavailable => general(StatusCode::SERVICE_UNAVAILABLE, status.message()),
        _ => general(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

/// 400 with OFREP's evaluation failure (`key` when the call named one).
fn failure(key: Option<&str>, code: &str, details: &str) -> Answer {
    let mut body = json!({"errorCode": code, "errorDetails": details});
    if let Some(key) = key {
        body["key"] = Value::String(key.to_owned());
    }
    json_answer(StatusCode::BAD_REQUEST, &body)
}

/// OFREP's general error (`{"errorDetails"}`).
fn general(status: StatusCode, details: &str) -> Answer {
    json_answer(status, &json!({ "errorDetails": details }))
}

fn json_answer(status: StatusCode, body: &Value) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(body.to_string())));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

/// Serves OFREP on `listener` (HTTP/1.1 and HTTP/2, TLS when `serving` has it) until `stop`;
/// open connections then finish the call in progress and close.
pub async fn serve(
    listener: TcpListener,
    ofrep: Arc<Ofrep>,
    serving: &Serving,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut incoming = service_kit::tls::incoming(
        listener,
        serving.tls.clone(),
        AcceptLimits {
            max_connections: serving.limits.max_connections,
            handshake_timeout: Duration::from_secs(10),
        },
        stop.clone(),
    );
    let connections = tokio_util::task::TaskTracker::new();
    let max_streams = serving.limits.max_streams_per_connection;
    while let Some(conn) = incoming.next().await {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "OFREP connection failed");
                continue;
            }
        };
        let info = conn.connect_info();
        let (ofrep, stop) = (ofrep.clone(), stop.clone());
        connections.spawn(async move {
            // Calls in progress on this connection, and when the last one ended.
            let activity = Arc::new(Activity::default());
            let seen = activity.clone();
            let service = hyper::service::service_fn(move |req| {
                let (ofrep, info, seen) = (ofrep.clone(), info.clone(), seen.clone());
                async move {
                    let _call = seen.begin();
                    Ok::<_, Infallible>(ofrep.handle(req, Some(&info)).await)
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(max_streams);
            let served = builder.serve_connection(TokioIo::new(conn), service);
            tokio::pin!(served);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    result = served.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "OFREP connection ended");
                        }
                        return;
                    }
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {
                        if activity.idle_for() >= IDLE_TIMEOUT {
                            break;
                        }
                    }
                }
            }
            // Shutting down, or idle: finish what is in progress (nothing, when idle), close.
            served.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), served).await;
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), connections.wait()).await;
    Ok(())
}

/// One connection's calls in progress and the moment it last had none.
struct Activity {
    calls: std::sync::atomic::AtomicUsize,
    since: std::sync::Mutex<tokio::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            calls: std::sync::atomic::AtomicUsize::new(0),
            since: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }
}

/// A call in progress; its end restarts the idle clock.
struct Call(Arc<Activity>);

impl Drop for Call {
    fn drop(&mut self) {
        if self
            .0
            .calls
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            *self.0.since.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
        }
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> Call {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Call(self.clone())
    }

    /// How long the connection has had no call in progress (zero while one runs).
    fn idle_for(&self) -> Duration {
        if self.calls.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_parse_or_name_the_error() {
        assert_eq!(
            parse_context(br#"{"context": {"a": 1}}"#).unwrap()["a"],
            json!(1)
        );
        assert!(parse_context(b"{}").unwrap().is_empty());
        assert_eq!(parse_context(b"{").unwrap_err().0, "PARSE_ERROR");
        assert_eq!(parse_context(b"[]").unwrap_err().0, "PARSE_ERROR");
        assert_eq!(
            parse_context(br#"{"context": 7}"#).unwrap_err().0,
            "INVALID_CONTEXT"
        );
    }

    #[test]
    fn if_none_match_lists_and_weak_tags() {
        assert!(matches("\"abc\"", "\"abc\""));
        assert!(matches("W/\"abc\"", "\"abc\""));
        assert!(matches("\"x\", \"abc\"", "\"abc\""));
        assert!(!matches("*", "\"abc\""));
        assert_eq!(percent_decode("new%2Dcart").as_deref(), Some("new-cart"));
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("%ff"), None);
        assert!(!matches("\"abd\"", "\"abc\""));
    }
}
