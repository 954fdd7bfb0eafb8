//! The Connect protocol (connectrpc.com) beside gRPC on a gRPC listener, for browsers and
//! other HTTP/1.1 clients (such as `@openfeature/flagd-web-provider`).
//!
//! [`ConnectLayer`] sits in front of a server's routes and sorts requests by their
//! `Content-Type`:
//!
//! - `application/grpc` and `application/grpc+<codec>`: gRPC, passed on untouched.
//! - `application/json` and `application/proto` (Connect unary), and
//!   `application/connect+json` and `application/connect+proto` (Connect server streaming),
//!   `POST`ed to a method of a service named in [`Connect::new`]: translated to a gRPC call
//!   of the same method and passed on, so the call meets the same authentication,
//!   authorization, in-flight cap, access log, metrics and handler as a gRPC call; the
//!   answer is translated back (proto3's JSON mapping for the JSON codec, the descriptors
//!   being the contracts' own). gRPC status codes become Connect codes with the HTTP status
//!   of the Connect specification (`unauthenticated` 401, `permission_denied` 403,
//!   `not_found` 404, ...); a stream ends with an end-of-stream message carrying the error
//!   and the trailers.
//! - a CORS preflight (`OPTIONS` with `Origin`) of a Connect method: answered for the
//!   allowed origins ([`crate::cors`]).
//! - anything else: HTTP 415 Unsupported Media Type, with the accepted types in
//!   `Accept-Post` (what the gRPC and Connect specifications ask of a server).
//!
//! A request body is read only once the call has passed authentication and holds an
//! in-flight slot (the gRPC handler reads it), at most the message size limit plus the
//! envelope. Compressed requests are refused (`unimplemented`); answers are never
//! compressed. `Connect-Timeout-Ms` bounds a unary call.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor};
use serde_json::{json, Map, Value};
use tonic::body::Body;
use tonic::{Code, Status};

use crate::cors::Origins;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// Request headers a page of an allowed origin may send (CORS preflight).
const ALLOW_HEADERS: &str = "authorization, content-type, connect-protocol-version, \
     connect-timeout-ms, flagd-selector, x-request-id, x-user-agent";
/// Response headers a page of an allowed origin may read.
const EXPOSE_HEADERS: &str = "grpc-status, grpc-message, grpc-status-details-bin, x-request-id";
/// The content types of gRPC, accepted on every path.
const GRPC_TYPES: &str = "application/grpc, application/grpc+proto";
/// The content types of Connect, accepted on the methods of the Connect services.
const CONNECT_TYPES: &str =
    "application/json, application/proto, application/connect+json, application/connect+proto";
/// Envelope flag of the end-of-stream message of a Connect stream.
const END_STREAM: u8 = 0x02;

/// Which services also speak Connect, with their message types.
#[derive(Debug)]
pub struct Connect {
    pool: DescriptorPool,
    services: Vec<String>,
    max_message_bytes: usize,
    origins: Origins,
}

impl Connect {
    /// Connect for `services` (full names, `flagd.evaluation.v1.Service`), whose contracts
    /// are in the workspace's descriptor set; request messages of at most
    /// `max_message_bytes` (proto or JSON); pages of `origins` may call cross-origin.
    pub fn new(
        services: &[&str],
        max_message_bytes: usize,
        origins: Origins,
    ) -> anyhow::Result<Self> {
        let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)?;
        for service in services {
            anyhow::ensure!(
                pool.get_service_by_name(service).is_some(),
                "no contract defines the service {service}"
            );
        }
        Ok(Self {
            pool,
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            max_message_bytes,
            origins,
        })
    }

    /// The method at `path` (`/package.Service/Method`) when its service speaks Connect.
    fn method(&self, path: &str) -> Option<prost_reflect::MethodDescriptor> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        if !self.services.iter().any(|s| s == service) {
            return None;
        }
        let found = self
            .pool
            .get_service_by_name(service)?
            .methods()
            .find(|m| m.name() == method);
        found
    }
}

/// Puts [`ConnectService`] in front of a server's routes; without [`Connect`], only gRPC
/// passes (anything else is 415).
#[derive(Debug, Clone, Default)]
pub struct ConnectLayer {
    connect: Option<Arc<Connect>>,
}

impl ConnectLayer {
    /// The layer for a listener (`None`: gRPC only).
    pub fn new(connect: Option<Arc<Connect>>) -> Self {
        Self { connect }
    }
}

impl<S> tower::Layer<S> for ConnectLayer {
    type Service = ConnectService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectService {
            inner,
            connect: self.connect.clone(),
        }
    }
}

/// See [`ConnectLayer`].
#[derive(Debug, Clone)]
pub struct ConnectService<S> {
    inner: S,
    connect: Option<Arc<Connect>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Codec {
    Json,
    Proto,
}

/// What a request is.
enum Kind {
    Grpc,
    Connect(Call),
    Preflight,
    /// 405 with `Allow: POST`.
    NotPost,
    /// 415; whether the path is a Connect method (it then accepts Connect types too).
    Unsupported(bool),
}

/// A Connect call to translate.
#[derive(Clone)]
struct Call {
    connect: Arc<Connect>,
    codec: Codec,
    streaming: bool,
    input: MessageDescriptor,
    output: MessageDescriptor,
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

fn classify<B>(req: &Request<B>, connect: Option<&Arc<Connect>>) -> Kind {
    let content_type = content_type(req.headers());
    if content_type == "application/grpc" || content_type.starts_with("application/grpc+") {
        return Kind::Grpc;
    }
    let Some((connect, method)) = connect.and_then(|c| Some((c, c.method(req.uri().path())?)))
    else {
        return Kind::Unsupported(false);
    };
    if req.method() == Method::OPTIONS && req.headers().contains_key(header::ORIGIN) {
        return Kind::Preflight;
    }
    let (codec, streaming) = match content_type.as_str() {
        "application/json" => (Codec::Json, false),
        "application/proto" => (Codec::Proto, false),
        "application/connect+json" => (Codec::Json, true),
        "application/connect+proto" => (Codec::Proto, true),
        _ => return Kind::Unsupported(true),
    };
    if method.is_client_streaming() || method.is_server_streaming() != streaming {
        return Kind::Unsupported(true);
    }
    if req.method() != Method::POST {
        return Kind::NotPost;
    }
    Kind::Connect(Call {
        connect: connect.clone(),
        codec,
        streaming,
        input: method.input(),
        output: method.output(),
    })
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut answer = Response::new(Body::new(Full::new(Bytes::from(text))));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    answer
}

fn unsupported(content_type: &str, connect_method: bool) -> Response<Body> {
    let accepted = if connect_method {
        format!("{GRPC_TYPES}, {CONNECT_TYPES}")
    } else {
        GRPC_TYPES.to_owned()
    };
    let shown = if content_type.is_empty() {
        "no content-type".to_owned()
    } else {
        format!("content-type {content_type}")
    };
    let mut answer = plain(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!("{shown} is not supported here; send one of: {accepted}\n"),
    );
    if let Ok(v) = HeaderValue::from_str(&accepted) {
        answer
            .headers_mut()
            .insert(HeaderName::from_static("accept-post"), v);
    }
    answer
}

impl<S> tower::Service<Request<Body>> for ConnectService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let answer = |r: Response<Body>| -> Self::Future { Box::pin(std::future::ready(Ok(r))) };
        match classify(&req, self.connect.as_ref()) {
            Kind::Grpc => {
                let call = self.inner.call(req);
                Box::pin(async move { call.await.map_err(Into::into) })
            }
            Kind::Unsupported(connect_method) => {
                answer(unsupported(&content_type(req.headers()), connect_method))
            }
            Kind::NotPost => {
                let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".to_owned());
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
                answer(r)
            }
            Kind::Preflight => {
                let origins = self
                    .connect
                    .as_ref()
                    .map(|c| c.origins.clone())
                    .unwrap_or_default();
                let mut r = Response::new(Body::empty());
                *r.status_mut() = StatusCode::NO_CONTENT;
                *r.headers_mut() = origins.preflight(req.headers(), "POST", ALLOW_HEADERS);
                answer(r)
            }
            Kind::Connect(call) => {
                // The inner service was made ready for this request: use that one.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(call.run(inner, req))
            }
        }
    }
}

/// The Connect code of a gRPC code, and the HTTP status of a unary error with it.
fn connect_code(code: Code) -> (&'static str, StatusCode) {
    match code {
        Code::Ok => ("ok", StatusCode::OK),
        Code::Cancelled => (
            "canceled",
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        ),
        Code::Unknown => ("unknown", StatusCode::INTERNAL_SERVER_ERROR),
        Code::InvalidArgument => ("invalid_argument", StatusCode::BAD_REQUEST),
        Code::DeadlineExceeded => ("deadline_exceeded", StatusCode::GATEWAY_TIMEOUT),
        Code::NotFound => ("not_found", StatusCode::NOT_FOUND),
        Code::AlreadyExists => ("already_exists", StatusCode::CONFLICT),
        Code::PermissionDenied => ("permission_denied", StatusCode::FORBIDDEN),
        Code::ResourceExhausted => ("resource_exhausted", StatusCode::TOO_MANY_REQUESTS),
        Code::FailedPrecondition => ("failed_precondition", StatusCode::BAD_REQUEST),
        Code::Aborted => ("aborted", StatusCode::CONFLICT),
        Code::OutOfRange => ("out_of_range", StatusCode::BAD_REQUEST),
        Code::Unimplemented => ("unimplemented", StatusCode::NOT_IMPLEMENTED),
        Code::Internal => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
        Code::Unavailable => ("unavailable", StatusCode::SERVICE_UNAVAILABLE),
        Code::DataLoss => ("data_loss", StatusCode::INTERNAL_SERVER_ERROR),
        Code::Unauthenticated => ("unauthenticated", StatusCode::UNAUTHORIZED),
    }
}

/// A Connect error object: code, message and the rich details (`google.rpc` messages,
/// base64 of their protobuf encoding).
fn error_json(status: &Status) -> Value {
    let mut error = Map::new();
    error.insert("code".into(), connect_code(status.code()).0.into());
    if !status.message().is_empty() {
        error.insert("message".into(), status.message().into());
    }
    if let Ok(rich) = tonic_types::pb::Status::decode(status.details()) {
        let details: Vec<Value> = rich
            .details
            .iter()
            .map(|any| {
                json!({
                    "type": any.type_url.rsplit('/').next().unwrap_or_default(),
                    "value": base64::engine::general_purpose::STANDARD_NO_PAD.encode(&any.value),
                })
            })
            .collect();
        if !details.is_empty() {
            error.insert("details".into(), details.into());
        }
    }
    Value::Object(error)
}

/// Headers worth passing from the gRPC answer to the Connect one (custom metadata and
/// `x-request-id`; not gRPC's own).
fn passed(headers: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    headers.iter().filter(|(name, _)| {
        let n = name.as_str();
        !n.starts_with("grpc-")
            && *name != header::CONTENT_TYPE
            && *name != header::CONTENT_LENGTH
            && *name != header::TE
            && *name != header::TRAILER
    })
}

/// A unary Connect error answer.
fn unary_error(status: &Status, headers: Option<&HeaderMap>) -> Response<Body> {
    let mut answer = Response::new(Body::new(Full::new(Bytes::from(
        error_json(status).to_string(),
    ))));
    *answer.status_mut() = connect_code(status.code()).1;
    if let Some(headers) = headers {
        for (name, value) in passed(headers) {
            answer.headers_mut().append(name.clone(), value.clone());
        }
    }
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

/// One length-prefixed message (gRPC's and Connect's envelope).
fn envelope(flags: u8, message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// Takes the first complete envelope off `buf`: its flags and message.
fn take_envelope(buf: &mut BytesMut) -> Option<(u8, Bytes)> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    let flags = buf[0];
    buf.advance(5);
    Some((flags, buf.split_to(len).freeze()))
}

/// Makes a Connect request's headers a gRPC call's: Connect's and gRPC's protocol
/// headers and the body's length and encodings removed, the gRPC content type and
/// `te: trailers` set.
fn to_grpc_headers(headers: &mut HeaderMap) {
    for name in [
        "connect-protocol-version",
        "connect-timeout-ms",
        "connect-content-encoding",
        "connect-accept-encoding",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-timeout",
    ] {
        headers.remove(name);
    }
    for name in [
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::ACCEPT_ENCODING,
    ] {
        headers.remove(name);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
}

impl Call {
    fn max(&self) -> usize {
        self.connect.max_message_bytes
    }

    /// The gRPC request body: the Connect body read (bounded) and turned into one gRPC
    /// message when the handler first reads it; a bad body is its error status.
    fn request_body(&self, body: Body) -> Body {
        let call = self.clone();
        let message = futures::stream::once(async move {
            let limit = call.max() + if call.streaming { 5 } else { 0 };
            let bytes = match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(Status::resource_exhausted(format!(
                        "request: larger than the limit of {} bytes",
                        call.max()
                    )))
                }
                Err(e) => return Err(Status::from_error(e)),
            };
            let payload = if call.streaming {
                let mut buf = BytesMut::from(bytes);
                match take_envelope(&mut buf) {
                    Some((0, message)) if buf.is_empty() => message,
                    Some((flags, _)) if flags & 0x01 != 0 => return Err(Status::unimplemented(
                        "request: compressed messages are not supported; send them uncompressed",
                    )),
                    _ => {
                        return Err(Status::invalid_argument(
                            "request: a server-streaming call takes exactly one enveloped message",
                        ))
                    }
                }
            } else {
                bytes
            };
            let proto = match call.codec {
                Codec::Proto => payload,
                Codec::Json => Bytes::from(json_to_proto(&call.input, &payload)?),
            };
            if proto.len() > call.max() {
                return Err(Status::resource_exhausted(format!(
                    "request: larger than the limit of {} bytes",
                    call.max()
                )));
            }
            Ok(Frame::data(envelope(0, &proto)))
        });
        Body::new(StreamBody::new(message))
    }

    /// An answer message in the call's codec.
    fn encode(&self, proto: Bytes) -> Result<Bytes, Status> {
        match self.codec {
            Codec::Proto => Ok(proto),
            Codec::Json => {
                let message = DynamicMessage::decode(self.output.clone(), proto)
                    .map_err(|e| Status::internal(format!("the answer does not decode: {e}")))?;
                serde_json::to_vec(&message)
                    .map(Bytes::from)
                    .map_err(|e| Status::internal(format!("the answer does not encode: {e}")))
            }
        }
    }

    /// Answers a Connect request: checks its headers, makes it a gRPC call to `inner` and
    /// turns the answer back into Connect's form, allowed origins marked.
    async fn run<S>(self, mut inner: S, req: Request<Body>) -> Result<Response<Body>, BoxError>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>>,
        S::Error: Into<BoxError>,
    {
        let origin = self.connect.origins.allowed(req.headers());
        let (mut parts, body) = req.into_parts();
        let mut answer = match self.check_headers(&parts.headers) {
            Err(status) => self.error(&status, None),
            Ok(timeout) => {
                to_grpc_headers(&mut parts.headers);
                let grpc = Request::from_parts(parts, self.request_body(body));
                self.forward(&mut inner, grpc, timeout).await
            }
        };
        self.connect
            .origins
            .mark(origin, answer.headers_mut(), EXPOSE_HEADERS);
        Ok(answer)
    }

    /// Checks a request's headers: a content encoding other than identity is UNIMPLEMENTED,
    /// then a bad `connect-timeout-ms` INVALID_ARGUMENT. Returns the call's timeout, if any.
    fn check_headers(&self, headers: &HeaderMap) -> Result<Option<Duration>, Status> {
        let encoding = if self.streaming {
            "connect-content-encoding"
        } else {
            "content-encoding"
        };
        match headers.get(encoding).map(|v| v.as_bytes()) {
            None | Some(b"identity") => {}
            Some(other) => {
                return Err(Status::unimplemented(format!(
                    "{encoding} {} is not supported; send identity",
                    String::from_utf8_lossy(other)
                )))
            }
        }
        match headers.get("connect-timeout-ms") {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .ok()
                .filter(|t| !t.is_empty() && t.len() <= 10)
                .and_then(|t| t.parse::<u64>().ok())
                .map(|ms| Some(Duration::from_millis(ms)))
                .ok_or_else(|| {
                    Status::invalid_argument(
                        "connect-timeout-ms: not a positive integer of at most 10 digits",
                    )
                }),
        }
    }

    /// Makes the gRPC call `grpc` to `inner` and answers in Connect's form; a unary call
    /// still running after `timeout` is DEADLINE_EXCEEDED.
    async fn forward<S>(
        &self,
        inner: &mut S,
        grpc: Request<Body>,
        timeout: Option<Duration>,
    ) -> Response<Body>
    where
        S: tower::Service<Request<Body>, Response = Response<Body>>,
        S::Error: Into<BoxError>,
    {
        if self.streaming {
            let response = inner.call(grpc).await.map_err(Into::into);
            return self.stream(response);
        }
        let unary = async {
            let response = inner.call(grpc).await.map_err(Into::into);
            self.unary(response).await
        };
        match timeout {
            None => unary.await,
            Some(t) => tokio::time::timeout(t, unary).await.unwrap_or_else(|_| {
                unary_error(
                    &Status::deadline_exceeded("the call's connect-timeout-ms passed"),
                    None,
                )
            }),
        }
    }

    /// An error answer in the call's protocol (unary: status and JSON body; streaming:
    /// HTTP 200 and an end-of-stream message).
    fn error(&self, status: &Status, headers: Option<&HeaderMap>) -> Response<Body> {
        if self.streaming {
            self.answer(
                headers,
                Body::new(Full::new(end_stream(Some(status), None))),
            )
        } else {
            unary_error(status, headers)
        }
    }

    async fn unary(&self, response: Result<Response<Body>, BoxError>) -> Response<Body> {
        let (parts, body) = match response {
            Ok(response) => response.into_parts(),
            Err(e) => return unary_error(&Status::from_error(e), None),
        };
        // A trailers-only answer: the call failed before any message.
        if let Some(status) = Status::from_header_map(&parts.headers) {
            if status.code() != Code::Ok {
                return unary_error(&status, Some(&parts.headers));
            }
        }
        let collected = match Limited::new(body, self.max() + 5).collect().await {
            Ok(collected) => collected,
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return unary_error(
                    &Status::resource_exhausted(format!(
                        "the answer is larger than the limit of {} bytes",
                        self.max()
                    )),
                    Some(&parts.headers),
                )
            }
            Err(e) => return unary_error(&Status::from_error(e), Some(&parts.headers)),
        };
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let mut data = BytesMut::from(collected.to_bytes());
        let status = Status::from_header_map(&trailers)
            .unwrap_or_else(|| Status::internal("the call ended without a status"));
        if status.code() != Code::Ok {
            let mut headers = parts.headers.clone();
            headers.extend(trailers);
            return unary_error(&status, Some(&headers));
        }
        let message = match take_envelope(&mut data) {
            Some((0, message)) if data.is_empty() => self.encode(message),
            _ => Err(Status::internal(
                "the answer is not exactly one uncompressed message",
            )),
        };
        let message = match message {
            Ok(message) => message,
            Err(status) => return unary_error(&status, Some(&parts.headers)),
        };
        let mut answer = self.answer(Some(&parts.headers), Body::new(Full::new(message)));
        for (name, value) in passed(&trailers) {
            if let Ok(name) = HeaderName::from_bytes(format!("trailer-{name}").as_bytes()) {
                answer.headers_mut().append(name, value.clone());
            }
        }
        answer
    }

    /// An HTTP 200 answer in the call's content type, with `headers` passed on (see
    /// [`passed`]).
    fn answer(&self, headers: Option<&HeaderMap>, body: Body) -> Response<Body> {
        let mut answer = Response::new(body);
        for (name, value) in headers.into_iter().flat_map(passed) {
            answer.headers_mut().append(name.clone(), value.clone());
        }
        let content_type = match (self.streaming, self.codec) {
            (false, Codec::Json) => "application/json",
            (false, Codec::Proto) => "application/proto",
            (true, Codec::Json) => "application/connect+json",
            (true, Codec::Proto) => "application/connect+proto",
        };
        answer
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        answer
    }

    /// A streaming answer: each gRPC message re-enveloped in the call's codec as it comes,
    /// then the end-of-stream message with the call's status and trailers.
    fn stream(&self, response: Result<Response<Body>, BoxError>) -> Response<Body> {
        let (parts, body) = match response {
            Ok(response) => response.into_parts(),
            Err(e) => return self.error(&Status::from_error(e), None),
        };
        if let Some(status) = Status::from_header_map(&parts.headers) {
            if status.code() != Code::Ok {
                return self.error(&status, Some(&parts.headers));
            }
        }
        let relay = Relay {
            call: self.clone(),
            body: Some(body),
            buf: BytesMut::new(),
        };
        let frames = futures::stream::unfold(relay, |mut relay| async move {
            let out = relay.next().await?;
            Some((Ok::<_, Infallible>(Frame::data(out)), relay))
        });
        self.answer(Some(&parts.headers), Body::new(StreamBody::new(frames)))
    }
}

/// Relays a gRPC answer body as a Connect stream.
struct Relay {
    call: Call,
    /// `None` once the end-of-stream message is out.
    body: Option<Body>,
    buf: BytesMut,
}

impl Relay {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            let body = self.body.as_mut()?;
            if let Some((flags, message)) = take_envelope(&mut self.buf) {
                let encoded = if flags == 0 {
                    self.call.encode(message)
                } else {
                    Err(Status::internal("a compressed answer message"))
                };
                return Some(match encoded {
                    Ok(message) => envelope(0, &message),
                    Err(status) => self.end(Some(&status), None),
                });
            }
            if self.buf.len() > self.call.max() + 5 {
                let status = Status::resource_exhausted(format!(
                    "an answer message is larger than the limit of {} bytes",
                    self.call.max()
                ));
                return Some(self.end(Some(&status), None));
            }
            return Some(match body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.buf.extend_from_slice(&data);
                        continue;
                    }
                    Err(frame) => {
                        let trailers = frame.into_trailers().unwrap_or_default();
                        let status = Status::from_header_map(&trailers).unwrap_or_else(|| {
                            Status::internal("the stream ended without a status")
                        });
                        self.end(Some(&status), Some(&trailers))
                    }
                },
                Some(Err(status)) => self.end(Some(&status), None),
                None => self.end(
                    Some(&Status::internal("the stream ended without a status")),
                    None,
                ),
            });
        }
    }

    fn end(&mut self, status: Option<&Status>, trailers: Option<&HeaderMap>) -> Bytes {
        self.body = None;
        end_stream(status.filter(|s| s.code() != Code::Ok), trailers)
    }
}

/// The end-of-stream message of a Connect stream: the error (if the call failed) and the
/// trailers as metadata.
fn end_stream(status: Option<&Status>, trailers: Option<&HeaderMap>) -> Bytes {
    let mut end = Map::new();
    if let Some(status) = status {
        end.insert("error".into(), error_json(status));
    }
    let mut metadata = Map::new();
    for (name, value) in trailers.into_iter().flat_map(passed) {
        if let Ok(value) = value.to_str() {
            let values = metadata
                .entry(name.as_str().to_owned())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(values) = values {
                values.push(value.into());
            }
        }
    }
    if !metadata.is_empty() {
        end.insert("metadata".into(), Value::Object(metadata));
    }
    envelope(END_STREAM, Value::Object(end).to_string().as_bytes())
}

/// A request message from proto3's JSON mapping (unknown fields ignored, as Connect's own
/// servers do, so newer clients keep working).
fn json_to_proto(input: &MessageDescriptor, json: &[u8]) -> Result<Vec<u8>, Status> {
    let json: &[u8] = if json.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        json
    };
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let message = DynamicMessage::deserialize_with_options(
        input.clone(),
        &mut deserializer,
        &DeserializeOptions::new().deny_unknown_fields(false),
    )
    .and_then(|m| deserializer.end().map(|()| m))
    .map_err(|e| {
        Status::invalid_argument(format!(
            "request: not a {} in proto3 JSON: {e}",
            input.full_name()
        ))
    })?;
    Ok(message.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect() -> Connect {
        Connect::new(
            &["flagd.evaluation.v1.Service", "flagd.evaluation.v2.Service"],
            1024,
            Origins::default(),
        )
        .expect("the flagd contracts are in the descriptor set")
    }

    #[test]
    fn json_requests_become_the_same_protobuf_as_the_generated_types() {
        use proto::flagd::evaluation::v1::ResolveBooleanRequest;
        let c = connect();
        let method = c
            .method("/flagd.evaluation.v1.Service/ResolveBoolean")
            .expect("a Connect method");
        let proto = json_to_proto(
            &method.input(),
            br#"{"flagKey": "new-cart", "context": {"targetingKey": "u1", "n": 2}, "future": 1}"#,
        )
        .expect("valid JSON");
        let decoded = ResolveBooleanRequest::decode(proto.as_slice()).expect("decodes");
        assert_eq!(decoded.flag_key, "new-cart");
        let context = decoded.context.expect("a context");
        assert!(context.fields.contains_key("targetingKey"));
        let bad = json_to_proto(&method.input(), br#"{"flagKey": 3}"#).expect_err("a number");
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert!(bad.message().starts_with("request: "), "{}", bad.message());
    }

    #[test]
    fn only_the_named_services_speak_connect() {
        let c = connect();
        assert!(c
            .method("/flagd.evaluation.v2.Service/EventStream")
            .is_some());
        assert!(c.method("/flagd.evaluation.v2.Service/Nope").is_none());
        assert!(c.method("/release.v1.ReleaseService/Evaluate").is_none());
        assert!(Connect::new(&["no.Such"], 1, Origins::default()).is_err());
    }

    #[test]
    fn errors_carry_the_connect_code_and_http_status() {
        let status = Status::not_found("flag x not found");
        assert_eq!(
            error_json(&status),
            json!({"code": "not_found", "message": "flag x not found"})
        );
        assert_eq!(
            connect_code(Code::Unauthenticated).1,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            connect_code(Code::PermissionDenied).1,
            StatusCode::FORBIDDEN
        );
        let mut end = BytesMut::from(end_stream(Some(&status), None));
        let (flags, message) = take_envelope(&mut end).expect("one envelope");
        assert_eq!(flags, END_STREAM);
        let parsed: Value = serde_json::from_slice(&message).expect("JSON");
        assert_eq!(parsed["error"]["code"], "not_found");
    }
}
