//! OFREP (the OpenFeature Remote Evaluation Protocol) against the real release-svc binary:
//! status codes and error shapes over raw HTTP/1.1, ETags on the bulk endpoint, the
//! authentication of the gRPC faces, and the stock OFREP providers (Python
//! `openfeature-provider-ofrep`; Node `@openfeature/ofrep-provider` and
//! `@openfeature/ofrep-web-provider`, whose polling sees a kill switch).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use proto::release::v1 as rpb;
use serde_json::{json, Value};
use tests::release;
use tests::{pki, Binary};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// release-svc on `database` with OFREP on a port of its own choosing, plus `args`; its
/// OFREP address.
async fn release_svc(database: &Path, args: &[&str]) -> (Binary, SocketAddr) {
    let mut all = vec!["--ofrep-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut r = Binary::release_alone(database, &all).await;
    let ofrep = r.address_of("OFREP").await;
    (r, ofrep)
}

struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Value,
}

/// One HTTP/1.1 request on a fresh connection.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
    };
    Reply {
        status,
        headers,
        body,
    }
}

async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    http(addr, "POST", path, &all, body).await
}

const SINGLE: &str = "/ofrep/v1/evaluate/flags";

#[tokio::test]
async fn ofrep_answers_with_the_specifications_shapes_and_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (r, ofrep) = release_svc(&dir.path().join("r.db"), &[]).await;
    let mut rc = release::connect(r.addr).await;
    let cart = release::openfeature_flags(&mut rc).await;
    let user = r#"{"context": {"targetingKey": "u1"}}"#;

    let one = post(ofrep, &format!("{SINGLE}/new-cart"), &[], user).await;
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.body["key"], "new-cart");
    assert_eq!(one.body["value"], true);
    assert_eq!(one.body["variant"], "on");
    assert_eq!(one.headers["content-type"], "application/json");
    // Where it is not released: the off variant, decided by targeting.
    let staging = post(
        ofrep,
        &format!("{SINGLE}/new-cart"),
        &[],
        r#"{"context": {"targetingKey": "u1", "environment": "staging"}}"#,
    )
    .await;
    assert_eq!(
        (staging.status, &staging.body["value"]),
        (200, &json!(false))
    );
    assert_eq!(staging.body["reason"], "TARGETING_MATCH");
    // The selector header fixes the environment.
    let fixed = post(
        ofrep,
        &format!("{SINGLE}/banner-text"),
        &[("flagd-selector", "flagSetId=prod")],
        user,
    )
    .await;
    assert_eq!(fixed.body["value"], "hello", "{}", fixed.body);
    // The feature's metadata comes with its evaluations.
    assert_eq!(
        fixed.body["metadata"],
        json!({"team": "growth", "tier": 2.0})
    );
    assert_eq!(one.body["metadata"], json!({}));
    // Disabled: the caller's code default (no value).
    let disabled = post(ofrep, &format!("{SINGLE}/old-thing"), &[], user).await;
    assert_eq!(disabled.status, 200);
    assert_eq!(disabled.body["reason"], "DISABLED");
    assert!(disabled.body.get("value").is_none(), "{}", disabled.body);

    let missing = post(ofrep, &format!("{SINGLE}/nope"), &[], user).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["errorCode"], "FLAG_NOT_FOUND");
    assert_eq!(missing.body["key"], "nope");
    let unparsable = post(ofrep, &format!("{SINGLE}/new-cart"), &[], "{").await;
    assert_eq!(
        (unparsable.status, &unparsable.body["errorCode"]),
        (400, &json!("PARSE_ERROR"))
    );
    let not_an_object = post(
        ofrep,
        &format!("{SINGLE}/new-cart"),
        &[],
        r#"{"context": 3}"#,
    )
    .await;
    assert_eq!(not_an_object.body["errorCode"], "INVALID_CONTEXT");
    // Contexts obey the limits of every other face.
    let attributes: serde_json::Map<String, Value> =
        (0..300).map(|i| (format!("a{i}"), json!(i))).collect();
    let huge = json!({"context": attributes}).to_string();
    let over = post(ofrep, &format!("{SINGLE}/new-cart"), &[], &huge).await;
    assert_eq!(
        (over.status, &over.body["errorCode"]),
        (400, &json!("INVALID_CONTEXT"))
    );
    assert!(
        over.body["errorDetails"]
            .as_str()
            .unwrap()
            .contains("context"),
        "{}",
        over.body
    );
    let text = http(
        ofrep,
        "POST",
        &format!("{SINGLE}/new-cart"),
        &[("content-type", "text/plain")],
        user,
    )
    .await;
    assert_eq!(text.status, 415);
    let get = http(ofrep, "GET", &format!("{SINGLE}/new-cart"), &[], "").await;
    assert_eq!((get.status, get.headers["allow"].as_str()), (405, "POST"));
    let elsewhere = post(ofrep, "/ofrep/v2/evaluate", &[], user).await;
    assert_eq!(elsewhere.status, 404);
    // No origin is allowed unless configured: a cross-origin page gets no CORS headers.
    let preflight = http(
        ofrep,
        "OPTIONS",
        SINGLE,
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    assert!(!preflight
        .headers
        .contains_key("access-control-allow-origin"));

    // Bulk: every flag, an ETag, 304 while nothing changes, 200 with a new tag after.
    let bulk = post(ofrep, SINGLE, &[], user).await;
    assert_eq!(bulk.status, 200);
    let by_key: BTreeMap<&str, &Value> = bulk.body["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["key"].as_str().unwrap(), f))
        .collect();
    assert_eq!(by_key.len(), 3, "{}", bulk.body);
    assert_eq!(by_key["new-cart"]["value"], true);
    assert_eq!(by_key["banner-text"]["value"], "hello");
    assert_eq!(by_key["banner-text"]["metadata"]["team"], "growth");
    assert!(by_key["old-thing"].get("value").is_none());
    assert_eq!(bulk.body["metadata"]["flagSetId"], "prod");
    let tag = bulk.headers["etag"].clone();
    let same = post(ofrep, SINGLE, &[("if-none-match", &tag)], user).await;
    assert_eq!(same.status, 304);
    assert_eq!(same.headers["etag"], tag);
    let other_user = post(
        ofrep,
        SINGLE,
        &[("if-none-match", &tag)],
        r#"{"context": {"targetingKey": "u2", "environment": "staging"}}"#,
    )
    .await;
    assert_eq!(other_user.status, 200, "another context, another answer");
    rc.pause_release(rpb::PauseReleaseRequest {
        name: cart,
        reason: "kill switch".into(),
    })
    .await
    .unwrap();
    let after = post(ofrep, SINGLE, &[("if-none-match", &tag)], user).await;
    assert_eq!(after.status, 200, "the flags changed: a full answer");
    assert_ne!(after.headers["etag"], tag);
    let paused = after.body["flags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == "new-cart")
        .unwrap()
        .clone();
    assert_eq!(paused["value"], false, "{paused}");
    r.kill().await;
}

/// With authentication on, OFREP takes the credentials of the gRPC faces: no or a bad
/// token is 401, a token bound to `evaluator` in prod evaluates in prod (as a bearer token
/// or as `X-API-Key`) and is 403 elsewhere.
#[tokio::test]
async fn ofrep_authenticates_and_scopes_callers_like_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    // The data, written with authentication off; then release-svc on the same file with it on.
    let r = Binary::release_alone(&db, &[]).await;
    release::openfeature_flags(&mut release::connect(r.addr).await).await;
    r.kill().await;
    let (token, tokens, policy) = pki::evaluator_in_prod(dir.path()).unwrap();
    let (r, ofrep) = release_svc(
        &db,
        &[
            "--auth-tokens",
            &tokens.to_string_lossy(),
            "--auth-policy",
            &policy.to_string_lossy(),
        ],
    )
    .await;
    let user = r#"{"context": {"targetingKey": "u1"}}"#;
    let path = format!("{SINGLE}/new-cart");
    let anonymous = post(ofrep, &path, &[], user).await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.headers["www-authenticate"], "Bearer");
    let bad = post(
        ofrep,
        &path,
        &[("authorization", "Bearer not-a-token")],
        user,
    )
    .await;
    assert_eq!(bad.status, 401);
    assert!(
        !bad.body.to_string().contains("not-a-token"),
        "{}",
        bad.body
    );
    let bearer = format!("Bearer {token}");
    let ok = post(ofrep, &path, &[("authorization", &bearer)], user).await;
    assert_eq!(
        (ok.status, &ok.body["value"]),
        (200, &json!(true)),
        "{}",
        ok.body
    );
    let api_key = post(ofrep, &path, &[("x-api-key", &token)], user).await;
    assert_eq!(api_key.status, 200, "{}", api_key.body);
    let staging = post(
        ofrep,
        &path,
        &[("authorization", &bearer)],
        r#"{"context": {"targetingKey": "u1", "environment": "staging"}}"#,
    )
    .await;
    assert_eq!(staging.status, 403, "{}", staging.body);

    // The stock Python provider, with the token.
    let seen = python_provider(ofrep, Some(&token)).await;
    assert_eq!(seen["new_cart"]["value"], true, "{seen}");
    assert_eq!(seen["new_cart"]["error"], Value::Null, "{seen}");
    assert_eq!(
        seen["new_cart_staging"]["error"], "GENERAL",
        "403 for staging: {seen}"
    );
    assert_eq!(
        seen["new_cart_staging"]["value"], true,
        "the code default: {seen}"
    );
    r.kill().await;
}

/// tests/python/ofrep_provider.py against `http://{addr}`.
async fn python_provider(addr: SocketAddr, token: Option<&str>) -> Value {
    python_provider_at(&format!("http://{addr}"), token, &[]).await
}

/// tests/python/ofrep_provider.py against `url`, with `env` set.
async fn python_provider_at(url: &str, token: Option<&str>, env: &[(&str, &str)]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/ofrep_provider.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script)
        .env("OFREP_URL", url)
        .envs(env.iter().copied());
    if let Some(token) = token {
        cmd.env("OFREP_TOKEN", token);
    }
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("python3: {e} (scripts/test installs the provider)"));
    assert!(
        out.status.success(),
        "the OFREP provider failed (scripts/test installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Browser pages of the origins given with `--ofrep-cors-origin` may call OFREP from
/// another origin: the preflight allows POST and OFREP's headers, answers carry the origin
/// and expose the ETag (what the web providers poll with); other origins get nothing.
#[tokio::test]
async fn ofrep_answers_cors_for_the_allowed_origins_only() {
    let dir = tempfile::tempdir().unwrap();
    let (r, ofrep) = release_svc(
        &dir.path().join("r.db"),
        &["--ofrep-cors-origin", "https://app.example.com"],
    )
    .await;
    release::openfeature_flags(&mut release::connect(r.addr).await).await;
    let preflight = http(
        ofrep,
        "OPTIONS",
        SINGLE,
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "content-type, if-none-match",
            ),
        ],
        "",
    )
    .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(preflight.headers["access-control-allow-methods"], "POST");
    assert!(preflight.headers["access-control-allow-headers"].contains("if-none-match"));
    let user = r#"{"context": {"targetingKey": "u1"}}"#;
    let bulk = post(
        ofrep,
        SINGLE,
        &[("origin", "https://app.example.com")],
        user,
    )
    .await;
    assert_eq!(bulk.status, 200);
    assert_eq!(
        bulk.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(bulk.headers["access-control-expose-headers"].contains("etag"));
    let other = post(
        ofrep,
        SINGLE,
        &[("origin", "https://evil.example.com")],
        user,
    )
    .await;
    assert!(!other.headers.contains_key("access-control-allow-origin"));
    let other = http(
        ofrep,
        "OPTIONS",
        SINGLE,
        &[
            ("origin", "https://evil.example.com"),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    assert!(!other.headers.contains_key("access-control-allow-origin"));
    r.kill().await;
}

/// Over TLS the OFREP listener offers HTTP/1.1 as well as HTTP/2 (ALPN): the stock Python
/// provider (requests, HTTP/1.1) evaluates over HTTPS, verifying the server certificate.
#[tokio::test]
async fn ofrep_serves_http1_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new(dir.path(), "ca").unwrap();
    let server = ca.server(dir.path(), "release-svc").unwrap();
    let db = dir.path().join("r.db");
    // The data, written over plaintext; then the same file served over TLS.
    let r = Binary::release_alone(&db, &[]).await;
    release::openfeature_flags(&mut release::connect(r.addr).await).await;
    r.kill().await;
    let (cert, key) = (
        server.cert.to_string_lossy().into_owned(),
        server.key.to_string_lossy().into_owned(),
    );
    let (r, ofrep) = release_svc(&db, &["--tls-cert", &cert, "--tls-key", &key]).await;
    let bundle = dir.path().join("ca.pem").to_string_lossy().into_owned();
    let seen = python_provider_at(
        &format!("https://localhost:{}", ofrep.port()),
        None,
        &[("REQUESTS_CA_BUNDLE", &bundle)],
    )
    .await;
    assert_eq!(seen["new_cart"]["value"], true, "{seen}");
    assert_eq!(seen["new_cart"]["error"], Value::Null, "{seen}");
    assert_eq!(seen["banner_text"]["value"], "hello", "{seen}");
    r.kill().await;
}

/// The stock Python and Node providers see what Evaluate decides; the Node web provider's
/// polling (ETag) picks up a kill switch.
#[tokio::test]
async fn stock_ofrep_providers_evaluate_and_follow_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (r, ofrep) = release_svc(&dir.path().join("r.db"), &[]).await;
    let mut rc = release::connect(r.addr).await;
    let cart = release::openfeature_flags(&mut rc).await;

    let seen = python_provider(ofrep, None).await;
    assert_eq!(seen["new_cart"]["value"], true, "{seen}");
    assert_eq!(seen["new_cart"]["variant"], "on", "{seen}");
    assert_eq!(seen["new_cart_staging"]["value"], false, "{seen}");
    assert_eq!(seen["banner_text"]["value"], "hello", "{seen}");
    assert_eq!(seen["old_thing"]["value"], true, "the code default: {seen}");
    assert_eq!(seen["old_thing"]["reason"], "DISABLED", "{seen}");
    assert_eq!(seen["missing"]["error"], "FLAG_NOT_FOUND", "{seen}");
    assert_eq!(seen["mismatch"]["error"], "TYPE_MISMATCH", "{seen}");
    assert_eq!(seen["mismatch"]["value"], 7, "{seen}");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/node/ofrep_providers.cjs");
    let mut node = tokio::process::Command::new("node")
        .arg(script)
        .env("OFREP_URL", format!("http://{ofrep}"))
        .env("NODE_PATH", tests::node_modules())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("node: {e} (scripts/test installs the providers)"));
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the Node providers answered within 60 s")
        .unwrap()
        .expect("the Node providers printed their first answers (scripts/test installs them)");
    let before: Value = serde_json::from_str(&line).unwrap();
    for side in ["server", "web"] {
        let s = &before[side];
        assert_eq!(s["new_cart"]["value"], true, "{side}: {before}");
        assert_eq!(s["banner_text"]["value"], "hello", "{side}: {before}");
        assert_eq!(s["old_thing"]["value"], true, "{side}: {before}");
        assert_eq!(s["missing"]["error"], "FLAG_NOT_FOUND", "{side}: {before}");
    }
    assert_eq!(
        before["server"]["mismatch"]["error"], "TYPE_MISMATCH",
        "{before}"
    );
    // A code-default answer (no value): the web provider reports DISABLED; the server
    // provider (0.1.x predates value-less answers) serves the code default as an error.
    assert_eq!(before["web"]["old_thing"]["reason"], "DISABLED", "{before}");
    assert_eq!(before["server"]["old_thing"]["reason"], "ERROR", "{before}");

    rc.pause_release(rpb::PauseReleaseRequest {
        name: cart,
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
        .expect("the Node providers answered after the change")
        .unwrap()
        .unwrap();
    let after: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        after["changed"], true,
        "the web provider reported the change: {after}"
    );
    assert_eq!(after["web"]["new_cart"]["value"], false, "{after}");
    assert_eq!(after["server"]["new_cart"]["value"], false, "{after}");
    assert!(node.wait().await.unwrap().success());
    r.kill().await;
}

/// Opens a connection and sends an OFREP call's headers and half its body, then stalls.
async fn stalled_call(ofrep: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(ofrep).await.unwrap();
    s.write_all(
        format!(
            "POST {SINGLE}/new-cart HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"context\""
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s
}

/// Whether the server has answered (or closed) a stalled call: it was refused instead of
/// holding a place, because its handler ran while another call held one.
fn answered(s: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 64];
    !matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Found by attacking the listener: calls whose bodies never finish held memory without
/// bound (`--max-in-flight` did not apply to OFREP), and silent connections held the
/// connection cap for ever. Now a call past the in-flight cap is 429 at once (before its body
/// is read), and a connection without a call in progress is closed after 30 s.
#[tokio::test]
async fn stalled_calls_and_silent_connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (r, ofrep) = release_svc(
        &dir.path().join("r.db"),
        // The stalled calls keep their places until they are dropped (not until the call
        // timeout answers them), however slowly this machine runs the loop below.
        &[
            "--max-in-flight",
            "2",
            "--max-connections",
            "4",
            "--rpc-timeout-ms",
            "600000",
        ],
    )
    .await;
    release::openfeature_flags(&mut release::connect(r.addr).await).await;
    // Two calls that send their headers and half a body, then stall.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(stalled_call(ofrep).await);
    }
    // Each holds its place once its handler runs: a third call is refused at once. On a
    // loaded machine a stalled call's handler may run only after one of the calls below has
    // taken a place; that stalled call is then refused itself, and is stalled again.
    let user = r#"{"context": {"targetingKey": "u1"}}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let (mut served, mut restalled) = (0, 0);
    loop {
        let third = post(ofrep, &format!("{SINGLE}/new-cart"), &[], user).await;
        if third.status == 429 {
            assert_eq!(third.headers["retry-after"], "1");
            break;
        }
        assert_eq!(third.status, 200, "{}", third.body);
        served += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refused ({served} calls served, {restalled} stalled calls refused and stalled again)"
        );
        for s in &mut stalled {
            if answered(s) {
                *s = stalled_call(ofrep).await;
                restalled += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stalled);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while post(ofrep, &format!("{SINGLE}/new-cart"), &[], user)
        .await
        .status
        != 200
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "places never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Four silent connections fill the cap; the server closes them once idle, and a call
    // gets through again.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tokio::net::TcpStream::connect(ofrep).await.unwrap());
    }
    for s in &mut silent {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(90), s.read(&mut buf))
            .await
            .expect("a silent connection was never closed");
        assert_eq!(read.unwrap(), 0, "closed without an answer");
    }
    let after = post(ofrep, &format!("{SINGLE}/new-cart"), &[], user).await;
    assert_eq!(after.status, 200);
    r.kill().await;
}
