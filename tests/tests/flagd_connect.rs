//! The Connect protocol for flagd's evaluation services (v1 and v2) beside gRPC on the same
//! ports of the real release-svc binary: unary calls in JSON and protobuf over HTTP/1.1 and
//! HTTP/2 answering what gRPC answers, errors with Connect's codes and HTTP statuses, 415
//! for other content types, the server-streaming EventStream (a kill switch arrives as a
//! configuration change, a refused stream ends with an error), authentication and CORS like
//! the other faces, and the stock `@openfeature/flagd-web-provider` under Node.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use proto::flagd::evaluation::{v1, v2};
use proto::release::v1 as rpb;
use serde_json::{json, Value};
use tests::release::{self, Client};
use tests::{pki, Binary};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// release-svc on `database` with flagd's own port too, plus `args`: (process, flagd port).
async fn release_svc(database: &Path, args: &[&str]) -> (Binary, SocketAddr) {
    let mut all = vec!["--flagd-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut r = Binary::release_alone(database, &all).await;
    let flagd = r.address_of("flagd protocols").await;
    (r, flagd)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    Http1,
    Http2,
}

type Pending =
    std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Result<Response<Incoming>>> + Send>>;

/// Sends one request on a fresh connection of `version` (plaintext; HTTP/2 with prior
/// knowledge) and returns the answer with its body still streaming.
async fn open(
    addr: SocketAddr,
    version: Version,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Response<Incoming> {
    let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let mut request = Request::builder().method(method);
    request = match version {
        Version::Http1 => request.uri(path).header("host", addr.to_string()),
        Version::Http2 => request.uri(format!("http://{addr}{path}")),
    };
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Full::new(body)).unwrap();
    let answer = match version {
        Version::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Box::pin(sender.send_request(request)) as Pending
        }
        Version::Http2 => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Box::pin(sender.send_request(request))
        }
    };
    tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .expect("an answer within 30 s")
        .unwrap()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .map(|v| v.to_str().unwrap())
            .unwrap_or_default()
    }
}

async fn call(
    addr: SocketAddr,
    version: Version,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let answer = open(addr, version, "POST", path, headers, body.into()).await;
    let (parts, body) = answer.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A Connect unary call with the JSON codec.
async fn json_call(
    addr: SocketAddr,
    version: Version,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Reply {
    let mut all = vec![
        ("content-type", "application/json"),
        ("connect-protocol-version", "1"),
    ];
    all.extend_from_slice(headers);
    call(addr, version, path, &all, body.to_string()).await
}

/// One enveloped message (Connect streaming).
fn envelope(flags: u8, message: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(flags);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// Reads the next enveloped message of a Connect stream: (flags, message).
async fn next_envelope(body: &mut Incoming, buf: &mut BytesMut) -> (u8, Bytes) {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() >= 5 + len {
                let flags = buf[0];
                buf.advance(5);
                return (flags, buf.split_to(len).freeze());
            }
        }
        let frame = tokio::time::timeout(Duration::from_secs(30), body.frame())
            .await
            .expect("a stream message within 30 s")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
}

const V1: &str = "/flagd.evaluation.v1.Service";
const V2: &str = "/flagd.evaluation.v2.Service";

/// Unary Connect calls, JSON and protobuf, HTTP/1.1 and HTTP/2, on both gRPC ports, answer
/// what the same gRPC calls answer on the same ports; errors carry Connect's codes and
/// statuses; other content types are 415.
#[tokio::test]
async fn connect_unary_calls_answer_like_grpc_on_the_same_ports() {
    let dir = tempfile::tempdir().unwrap();
    let (r, flagd) = release_svc(&dir.path().join("r.db"), &[]).await;
    let mut rc = release::connect(r.addr).await;
    release::openfeature_flags(&mut rc).await;
    let user = release::context(&[("targetingKey", "u1")]);

    for addr in [r.addr, flagd] {
        // gRPC on this port, for reference (and to show it still works beside Connect).
        let channel = tests::channel(addr).await;
        let mut g1 = v1::service_client::ServiceClient::new(channel.clone());
        let mut g2 = v2::service_client::ServiceClient::new(channel);
        let grpc_bool = g2
            .resolve_boolean(v2::ResolveBooleanRequest {
                flag_key: "new-cart".into(),
                context: Some(user.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(grpc_bool.value, Some(true));
        let grpc_all = g1
            .resolve_all(v1::ResolveAllRequest {
                context: Some(user.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        let grpc_all_v2 = g2
            .resolve_all(v2::ResolveAllRequest {
                context: Some(user.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            grpc_all_v2.flags.len(),
            3,
            "disabled flags too: {grpc_all_v2:?}"
        );
        let grpc_banner = g1
            .resolve_string(v1::ResolveStringRequest {
                flag_key: "banner-text".into(),
                context: Some(user.clone()),
            })
            .await
            .unwrap()
            .into_inner();

        for version in [Version::Http1, Version::Http2] {
            let at = format!("{addr} over {version:?}");
            // JSON, v1 ResolveBoolean.
            let one = json_call(
                addr,
                version,
                &format!("{V1}/ResolveBoolean"),
                &[],
                &json!({"flagKey": "new-cart", "context": {"targetingKey": "u1"}}),
            )
            .await;
            assert_eq!(one.status, StatusCode::OK, "{at}: {:?}", one.body);
            assert_eq!(one.content_type(), "application/json", "{at}");
            let body = one.json();
            assert_eq!(body["value"], true, "{at}: {body}");
            assert_eq!(body["reason"], grpc_bool.reason, "{at}: {body}");
            assert_eq!(
                body["variant"].as_str(),
                grpc_bool.variant.as_deref(),
                "{at}: {body}"
            );
            // JSON, v2 ResolveBoolean: the documented shape.
            let v2_json = json_call(
                addr,
                version,
                &format!("{V2}/ResolveBoolean"),
                &[],
                &json!({"flagKey": "new-cart", "context": {"targetingKey": "u1"}}),
            )
            .await
            .json();
            assert_eq!(
                v2_json,
                json!({"value": true, "reason": grpc_bool.reason, "variant": "on"}),
                "{at}"
            );
            // JSON, v1 ResolveString: the same answer as gRPC's, field by field.
            let banner = json_call(
                addr,
                version,
                &format!("{V1}/ResolveString"),
                &[],
                &json!({"flagKey": "banner-text", "context": {"targetingKey": "u1"}}),
            )
            .await
            .json();
            let metadata = &grpc_banner.metadata.as_ref().unwrap().fields;
            assert_eq!(metadata["team"], release::string("growth"));
            assert_eq!(
                banner,
                json!({
                    "value": grpc_banner.value,
                    "reason": grpc_banner.reason,
                    "variant": grpc_banner.variant,
                    "metadata": {"team": "growth", "tier": 2.0},
                }),
                "{at}"
            );
            assert_eq!(metadata.len(), 2);
            // JSON, v1 ResolveAll: every flag as gRPC answers it.
            let all = json_call(
                addr,
                version,
                &format!("{V1}/ResolveAll"),
                &[],
                &json!({"context": {"targetingKey": "u1"}}),
            )
            .await;
            assert_eq!(all.status, StatusCode::OK, "{at}");
            let all = all.json();
            let cart = &all["flags"]["new-cart"];
            assert_eq!(cart["boolValue"], true, "{at}: {all}");
            assert_eq!(all["flags"]["banner-text"]["stringValue"], "hello", "{at}");
            assert_eq!(
                all["flags"].as_object().unwrap().len(),
                grpc_all.flags.len(),
                "{at}: {all}"
            );
            for (key, flag) in &grpc_all.flags {
                assert_eq!(all["flags"][key]["reason"], flag.reason, "{at}: {key}");
            }
            // Protobuf, v2 ResolveBoolean and ResolveAll: byte-for-byte the messages of gRPC.
            let request = v2::ResolveBooleanRequest {
                flag_key: "new-cart".into(),
                context: Some(user.clone()),
            };
            let proto = call(
                addr,
                version,
                &format!("{V2}/ResolveBoolean"),
                &[("content-type", "application/proto")],
                request.encode_to_vec(),
            )
            .await;
            assert_eq!(proto.status, StatusCode::OK, "{at}");
            assert_eq!(proto.content_type(), "application/proto", "{at}");
            assert_eq!(
                v2::ResolveBooleanResponse::decode(proto.body.clone()).unwrap(),
                grpc_bool,
                "{at}"
            );
            let proto_all = call(
                addr,
                version,
                &format!("{V2}/ResolveAll"),
                &[("content-type", "application/proto")],
                v2::ResolveAllRequest {
                    context: Some(user.clone()),
                }
                .encode_to_vec(),
            )
            .await;
            let proto_all = v2::ResolveAllResponse::decode(proto_all.body).unwrap();
            assert_eq!(proto_all, grpc_all_v2, "{at}");

            // Errors: Connect's code and HTTP status, the handler's message.
            let missing = json_call(
                addr,
                version,
                &format!("{V2}/ResolveBoolean"),
                &[],
                &json!({"flagKey": "nope"}),
            )
            .await;
            assert_eq!(missing.status, StatusCode::NOT_FOUND, "{at}");
            assert_eq!(missing.content_type(), "application/json", "{at}");
            let error = missing.json();
            assert_eq!(error["code"], "not_found", "{at}: {error}");
            assert!(
                error["message"].as_str().unwrap().contains("nope"),
                "{at}: {error}"
            );
            let mismatch = json_call(
                addr,
                version,
                &format!("{V1}/ResolveBoolean"),
                &[],
                &json!({"flagKey": "banner-text"}),
            )
            .await;
            assert_eq!(mismatch.status, StatusCode::BAD_REQUEST, "{at}");
            assert_eq!(mismatch.json()["code"], "invalid_argument", "{at}");
            // Not the request's JSON mapping: invalid_argument naming the request.
            let bad = call(
                addr,
                version,
                &format!("{V1}/ResolveBoolean"),
                &[("content-type", "application/json")],
                r#"{"flagKey": 3}"#,
            )
            .await;
            assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{at}");
            let bad = bad.json();
            assert_eq!(bad["code"], "invalid_argument", "{at}: {bad}");
            assert!(
                bad["message"]
                    .as_str()
                    .unwrap()
                    .contains("flagd.evaluation.v1.ResolveBooleanRequest"),
                "{at}: {bad}"
            );

            // Other content types: 415 with what is accepted, never a gRPC answer.
            for (path, content_type) in [
                (format!("{V1}/ResolveBoolean"), "text/plain"),
                (format!("{V2}/ResolveAll"), "application/grpc-web+proto"),
                (
                    "/release.v1.ReleaseService/ListFeatures".to_owned(),
                    "application/json",
                ),
                (
                    "/flagd.sync.v1.FlagSyncService/FetchAllFlags".to_owned(),
                    "application/json",
                ),
                // A unary content type for a streaming method.
                (format!("{V1}/EventStream"), "application/json"),
            ] {
                let wrong = call(
                    addr,
                    version,
                    &path,
                    &[("content-type", content_type)],
                    "{}",
                )
                .await;
                assert_eq!(
                    wrong.status,
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "{at}: {content_type} to {path}"
                );
                assert!(
                    wrong.headers.get("grpc-status").is_none(),
                    "{at}: {content_type} to {path}"
                );
                let accepted = wrong.headers["accept-post"].to_str().unwrap();
                assert!(accepted.contains("application/grpc"), "{accepted}");
                assert_eq!(
                    accepted.contains("application/json"),
                    path.starts_with("/flagd.evaluation."),
                    "{at}: {path}: {accepted}"
                );
            }
            let none = call(addr, version, &format!("{V1}/ResolveBoolean"), &[], "{}").await;
            assert_eq!(none.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{at}");
            // Connect by POST only.
            let get = open(
                addr,
                version,
                "GET",
                &format!("{V1}/ResolveBoolean"),
                &[("content-type", "application/json")],
                Bytes::new(),
            )
            .await;
            assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED, "{at}");
            assert_eq!(get.headers()["allow"], "POST", "{at}");
        }
    }
    r.kill().await;
}

/// EventStream over Connect (JSON and protobuf, HTTP/1.1 and HTTP/2): provider_ready at
/// once, a kill switch as configuration_change naming the flag; past the change-stream cap
/// the stream ends with Connect's end-of-stream message carrying resource_exhausted.
#[tokio::test]
async fn connect_event_streams_carry_changes_and_end_with_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (r, flagd) = release_svc(
        &dir.path().join("r.db"),
        &["--max-watchers", "4", "--max-message-bytes", "65536"],
    )
    .await;
    let mut rc = release::connect(r.addr).await;
    let cart = release::openfeature_flags(&mut rc).await;

    // Four streams: JSON v1 on HTTP/1.1, JSON v2 on HTTP/2, protobuf v2 on both.
    let kinds = [
        (V1, "json", Version::Http1),
        (V2, "json", Version::Http2),
        (V2, "proto", Version::Http1),
        (V2, "proto", Version::Http2),
    ];
    let mut streams = Vec::new();
    for (service, codec, version) in kinds {
        let body = if codec == "json" {
            envelope(0, b"{}")
        } else {
            envelope(0, &v2::EventStreamRequest {}.encode_to_vec())
        };
        let content_type = format!("application/connect+{codec}");
        let answer = open(
            flagd,
            version,
            "POST",
            &format!("{service}/EventStream"),
            &[
                ("content-type", &content_type),
                ("connect-protocol-version", "1"),
            ],
            body,
        )
        .await;
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.headers()["content-type"], content_type.as_str());
        let mut body = answer.into_body();
        let mut buf = BytesMut::new();
        let (flags, first) = next_envelope(&mut body, &mut buf).await;
        assert_eq!(flags, 0, "{service} {codec} {version:?}");
        let kind = event_type(codec, &first);
        assert_eq!(kind, "provider_ready", "{service} {codec} {version:?}");
        streams.push((codec, body, buf));
    }

    // A fifth stream is past the cap: HTTP 200 and an end-of-stream message with the error.
    let refused = call(
        flagd,
        Version::Http1,
        &format!("{V1}/EventStream"),
        &[("content-type", "application/connect+json")],
        envelope(0, b"{}"),
    )
    .await;
    assert_eq!(refused.status, StatusCode::OK);
    let mut buf = BytesMut::from(refused.body);
    assert_eq!(buf[0], 0x02, "an end-of-stream message only");
    buf.advance(5);
    let end: Value = serde_json::from_slice(&buf).unwrap();
    assert_eq!(end["error"]["code"], "resource_exhausted", "{end}");

    // Bodies over --max-message-bytes: resource_exhausted, unary (429) and streaming.
    let attributes: serde_json::Map<String, Value> = (0..2000)
        .map(|i| (format!("attribute-{i}"), json!("x".repeat(40))))
        .collect();
    let huge = json!({"context": attributes});
    let over = json_call(
        flagd,
        Version::Http2,
        &format!("{V2}/ResolveAll"),
        &[],
        &huge,
    )
    .await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    let error = over.json();
    assert_eq!(error["code"], "resource_exhausted", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("65536 bytes"),
        "{error}"
    );
    let over = call(
        flagd,
        Version::Http1,
        &format!("{V1}/EventStream"),
        &[("content-type", "application/connect+json")],
        envelope(0, huge.to_string().as_bytes()),
    )
    .await;
    assert_eq!(over.status, StatusCode::OK);
    let end: Value = serde_json::from_slice(&over.body[5..]).unwrap();
    assert_eq!(end["error"]["code"], "resource_exhausted", "{end}");
    assert!(
        end["error"]["message"]
            .as_str()
            .unwrap()
            .contains("65536 bytes"),
        "{end}"
    );

    // The kill switch reaches every stream as a configuration change naming the flag.
    rc.pause_release(rpb::PauseReleaseRequest {
        name: cart,
        reason: "kill switch".into(),
    })
    .await
    .unwrap();
    for (codec, body, buf) in &mut streams {
        loop {
            let (flags, message) = next_envelope(body, buf).await;
            assert_eq!(flags, 0);
            match event_type(codec, &message).as_str() {
                "keep_alive" => continue,
                "configuration_change" => {
                    let data = if *codec == "json" {
                        serde_json::from_slice::<Value>(&message).unwrap()["data"].clone()
                    } else {
                        let event = v2::EventStreamResponse::decode(message).unwrap();
                        let flags = event.data.unwrap().fields["flags"].clone();
                        json!({ "flags": struct_keys(&flags) })
                    };
                    assert!(data["flags"].get("new-cart").is_some(), "{codec}: {data}");
                    break;
                }
                other => panic!("unexpected event {other}"),
            }
        }
    }
    r.kill().await;
}

fn event_type(codec: &str, message: &[u8]) -> String {
    if codec == "json" {
        let v: Value = serde_json::from_slice(message).unwrap();
        v["type"].as_str().unwrap().to_owned()
    } else {
        v2::EventStreamResponse::decode(message).unwrap().r#type
    }
}

fn struct_keys(value: &prost_types::Value) -> Value {
    match &value.kind {
        Some(prost_types::value::Kind::StructValue(s)) => {
            s.fields.keys().map(|k| (k.clone(), json!({}))).collect()
        }
        _ => Value::Null,
    }
}

/// With authentication on, a Connect call needs the credentials of a gRPC call: none or a
/// bad token is 401 `unauthenticated`, an environment outside the caller's scope is 403
/// `permission_denied`, a good token evaluates; browsers of the allowed origin get CORS.
#[tokio::test]
async fn connect_calls_are_authenticated_and_cors_checked_like_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let r = Binary::release_alone(&db, &[]).await;
    release::openfeature_flags(&mut release::connect(r.addr).await).await;
    r.kill().await;
    let (token, tokens, policy) = pki::evaluator_in_prod(dir.path()).unwrap();
    let (r, flagd) = release_svc(
        &db,
        &[
            "--auth-tokens",
            &tokens.to_string_lossy(),
            "--auth-policy",
            &policy.to_string_lossy(),
            "--cors-origin",
            "https://app.example.com",
        ],
    )
    .await;
    let path = format!("{V1}/ResolveBoolean");
    let request = json!({"flagKey": "new-cart", "context": {"targetingKey": "u1"}});
    let bearer = format!("Bearer {token}");
    for version in [Version::Http1, Version::Http2] {
        let anonymous = json_call(flagd, version, &path, &[], &request).await;
        assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED, "{version:?}");
        assert_eq!(anonymous.content_type(), "application/json");
        assert_eq!(anonymous.json()["code"], "unauthenticated");
        let bad = json_call(
            flagd,
            version,
            &path,
            &[("authorization", "Bearer not-a-token")],
            &request,
        )
        .await;
        assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
        assert!(!String::from_utf8_lossy(&bad.body).contains("not-a-token"));
        let ok = json_call(
            flagd,
            version,
            &path,
            &[("authorization", &bearer)],
            &request,
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
        assert_eq!(ok.json()["value"], true);
        let staging = json_call(
            flagd,
            version,
            &path,
            &[
                ("authorization", &bearer),
                ("flagd-selector", "flagSetId=staging"),
            ],
            &request,
        )
        .await;
        assert_eq!(staging.status, StatusCode::FORBIDDEN, "{:?}", staging.body);
        assert_eq!(staging.json()["code"], "permission_denied");
        // A stream without credentials ends at once with unauthenticated.
        let stream = call(
            flagd,
            version,
            &format!("{V1}/EventStream"),
            &[("content-type", "application/connect+json")],
            envelope(0, b"{}"),
        )
        .await;
        assert_eq!(stream.status, StatusCode::OK);
        assert_eq!(stream.body[0], 0x02);
        let end: Value = serde_json::from_slice(&stream.body[5..]).unwrap();
        assert_eq!(end["error"]["code"], "unauthenticated", "{end}");
    }

    // CORS: the preflight is answered for the allowed origin only (no credentials needed),
    // and answers to that origin carry it.
    let preflight = open(
        flagd,
        Version::Http1,
        "OPTIONS",
        &path,
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type, connect-protocol-version",
            ),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "POST");
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    for header in ["authorization", "content-type", "connect-protocol-version"] {
        assert!(allowed.contains(header), "{allowed}");
    }
    let other = open(
        flagd,
        Version::Http1,
        "OPTIONS",
        &path,
        &[
            ("origin", "https://evil.example.com"),
            ("access-control-request-method", "POST"),
        ],
        Bytes::new(),
    )
    .await;
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let ok = json_call(
        flagd,
        Version::Http1,
        &path,
        &[
            ("authorization", &bearer),
            ("origin", "https://app.example.com"),
        ],
        &request,
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        ok.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(ok.headers["vary"], "origin");
    let evil = json_call(
        flagd,
        Version::Http1,
        &path,
        &[
            ("authorization", &bearer),
            ("origin", "https://evil.example.com"),
        ],
        &request,
    )
    .await;
    assert!(evil.headers.get("access-control-allow-origin").is_none());

    // The stock web provider with the token (an interceptor sets the header).
    let (before, _) = web_provider(&r, flagd, Some(&token), None).await;
    assert_eq!(before["web"]["new_cart"]["value"], true, "{before}");
    assert_eq!(before["web"]["new_cart"]["error"], Value::Null, "{before}");
    r.kill().await;
}

/// Runs tests/node/flagd_web_provider.cjs against `addr`; after its first answers, pauses
/// `kill` (when given) and returns (before, after).
async fn web_provider(
    r: &Binary,
    addr: SocketAddr,
    token: Option<&str>,
    kill: Option<String>,
) -> (Value, Value) {
    let kill = match kill {
        Some(release) => Some((release::connect(r.addr).await, release)),
        None => None,
    };
    web_provider_at(&addr.ip().to_string(), addr.port(), token, kill, &[]).await
}

/// [`web_provider`] against `host:port`, with `env` set; `kill` pauses a release with a
/// client of the caller's (without it, only the first answers: (before, null)).
async fn web_provider_at(
    host: &str,
    port: u16,
    token: Option<&str>,
    kill: Option<(Client, String)>,
    env: &[(&str, &str)],
) -> (Value, Value) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/node/flagd_web_provider.cjs");
    let mut command = tokio::process::Command::new("node");
    command
        .arg(script)
        .env("FLAGD_HOST", host)
        .env("FLAGD_PORT", port.to_string())
        .envs(env.iter().copied())
        .env("NODE_PATH", tests::node_modules())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    if let Some(token) = token {
        command.env("FLAGD_TOKEN", token);
    }
    if kill.is_none() {
        command.env("FLAGD_ONCE", "1");
    }
    let mut node = command
        .spawn()
        .unwrap_or_else(|e| panic!("node: {e} (scripts/test installs the provider)"));
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the web provider answered within 60 s")
        .unwrap()
        .expect("the web provider printed its first answers (scripts/test installs it)");
    let before: Value = serde_json::from_str(&line).unwrap();
    let Some((mut rc, release)) = kill else {
        assert!(node.wait().await.unwrap().success());
        return (before, Value::Null);
    };
    rc.pause_release(rpb::PauseReleaseRequest {
        name: release,
        reason: "kill switch".into(),
    })
    .await
    .unwrap();
    node.stdin
        .as_mut()
        .unwrap()
        .write_all(b"changed\n")
        .await
        .unwrap();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the web provider answered after the change")
        .unwrap()
        .unwrap();
    let after: Value = serde_json::from_str(&line).unwrap();
    assert!(node.wait().await.unwrap().success());
    (before, after)
}

/// The stock `@openfeature/flagd-web-provider` (Connect JSON over Node's fetch, HTTP/1.1),
/// unmodified, on both gRPC ports: it resolves what gRPC decides, and its EventStream
/// reports a kill switch as a configuration change, after which it serves the new value.
#[tokio::test]
async fn stock_flagd_web_provider_resolves_and_follows_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (r, flagd) = release_svc(&dir.path().join("r.db"), &[]).await;
    let mut rc = release::connect(r.addr).await;
    let cart = release::openfeature_flags(&mut rc).await;
    // On the main port, without a change.
    let (before, _) = web_provider(&r, r.addr, None, None).await;
    assert_eq!(before["web"]["new_cart"]["value"], true, "{before}");
    // On flagd's port, through a kill switch.
    let (before, after) = web_provider(&r, flagd, None, Some(cart)).await;
    let web = &before["web"];
    assert_eq!(web["new_cart"]["value"], true, "{before}");
    assert_eq!(web["new_cart"]["variant"], "on", "{before}");
    assert_eq!(web["new_cart"]["error"], Value::Null, "{before}");
    assert_eq!(web["banner_text"]["value"], "hello", "{before}");
    assert_eq!(web["missing"]["error"], "FLAG_NOT_FOUND", "{before}");
    assert_eq!(
        after["changed"], true,
        "the provider reported the change: {after}"
    );
    assert_eq!(after["web"]["new_cart"]["value"], false, "{after}");
    r.kill().await;
}

/// Over TLS the gRPC ports offer http/1.1 beside h2 (ALPN): the web provider (Node's fetch,
/// HTTP/1.1) follows a kill switch over HTTPS, verifying the certificate, while gRPC (h2)
/// works on the same port.
#[tokio::test]
async fn stock_flagd_web_provider_works_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new(dir.path(), "ca").unwrap();
    let server = ca.server(dir.path(), "release-svc").unwrap();
    let db = dir.path().join("r.db");
    // The data, written over plaintext; then the same file served over TLS.
    let r = Binary::release_alone(&db, &[]).await;
    let cart = release::openfeature_flags(&mut release::connect(r.addr).await).await;
    r.kill().await;
    let (cert, key) = (
        server.cert.to_string_lossy().into_owned(),
        server.key.to_string_lossy().into_owned(),
    );
    let (r, flagd) = release_svc(&db, &["--tls-cert", &cert, "--tls-key", &key]).await;
    let bundle = ca.pem.to_string_lossy().into_owned();
    let pem = std::fs::read(&ca.pem).unwrap();
    let grpc = v1::service_client::ServiceClient::new(tls_channel(&pem, flagd).await)
        .resolve_boolean(v1::ResolveBooleanRequest {
            flag_key: "new-cart".into(),
            context: Some(release::context(&[("targetingKey", "u1")])),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(grpc.value);
    let rc =
        rpb::release_service_client::ReleaseServiceClient::new(tls_channel(&pem, r.addr).await);
    let (before, after) = web_provider_at(
        "localhost",
        flagd.port(),
        None,
        Some((rc, cart)),
        &[("FLAGD_TLS", "1"), ("NODE_EXTRA_CA_CERTS", &bundle)],
    )
    .await;
    assert_eq!(before["web"]["new_cart"]["value"], true, "{before}");
    assert_eq!(before["web"]["new_cart"]["error"], Value::Null, "{before}");
    assert_eq!(after["changed"], true, "{after}");
    assert_eq!(after["web"]["new_cart"]["value"], false, "{after}");
    r.kill().await;
}

/// A gRPC channel to `addr` over TLS, trusting the CA `pem`, for the name localhost.
async fn tls_channel(pem: &[u8], addr: SocketAddr) -> tonic::transport::Channel {
    let config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
        .domain_name("localhost");
    tonic::transport::Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(config)
        .unwrap()
        .connect()
        .await
        .unwrap()
}
