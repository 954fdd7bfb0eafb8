//! release-svc's flagd evaluation protocol (v2) over real gRPC with a client generated from
//! the wire-compatible protos: mapping, reasons, errors, events.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proto::deploy::v1::PlacementState as P;
use proto::flagd::evaluation::v2 as fpb;
use proto::flagd::evaluation::v2::service_client::ServiceClient;
use proto::release::v1 as rpb;
use tests::release::{self, eventually};
use tests::{Gated, InProcess};
use tonic::transport::Channel;
use tonic::{Code, Request};

fn context(pairs: &[(&str, &str)]) -> Option<prost_types::Struct> {
    Some(release::context(pairs))
}

fn with_selector<T>(msg: T, env: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "flagd-selector",
        format!("flagSetId={env}").parse().unwrap(),
    );
    req
}

async fn boolean(
    c: &mut ServiceClient<Channel>,
    key: &str,
    env: Option<&str>,
    ctx: &[(&str, &str)],
) -> Result<fpb::ResolveBooleanResponse, tonic::Status> {
    let msg = fpb::ResolveBooleanRequest {
        flag_key: key.into(),
        context: context(ctx),
    };
    let req = match env {
        Some(env) => with_selector(msg, env),
        None => Request::new(msg),
    };
    c.resolve_boolean(req)
        .await
        .map(tonic::Response::into_inner)
}

/// The interpreter of the virtualenv holding the v1-protocol provider
/// (`openfeature-provider-flagd==0.2.7`), which `scripts/test` creates.
fn v1_python() -> String {
    std::env::var("FLAGD_V1_PYTHON").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/flagd-v1-venv/bin/python"
        )
        .to_owned()
    })
}

/// Runs tests/python/flagd_provider_smoke.py with `python` against release-svc at `addr`.
async fn stock_provider(python: &str, addr: std::net::SocketAddr) -> serde_json::Value {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/flagd_provider_smoke.py"
    );
    let out = tokio::process::Command::new(python)
        .arg(script)
        .env("FLAGD_HOST", addr.ip().to_string())
        .env("FLAGD_PORT", addr.port().to_string())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{python}: {e} (scripts/test installs the providers)"));
    assert!(
        out.status.success(),
        "{python}: the flagd provider failed (scripts/test installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What both providers must see; the v1 one (0.2.7) sends no selector header in RPC mode,
/// so its environment comes from the context or the default and nothing is STATIC, and a
/// disabled flag reaches it as FLAG_NOT_FOUND (the code default either way).
fn check_stock_provider(python: &str, seen: &serde_json::Value) {
    let v1 = python != "python3";
    let seen = &(python, seen);
    let (_, s) = seen;
    assert_eq!(s["new_cart"]["value"], true, "{seen:?}");
    let fixed = if v1 { "TARGETING_MATCH" } else { "STATIC" };
    assert_eq!(s["new_cart"]["reason"], fixed, "{seen:?}");
    // Without the selector the environment is context-dependent: never STATIC (a provider
    // would cache it for every context).
    assert_eq!(s["new_cart_default_env"]["value"], true, "{seen:?}");
    assert_eq!(
        s["new_cart_default_env"]["reason"], "TARGETING_MATCH",
        "{seen:?}"
    );
    assert_eq!(s["new_cart_staging"]["value"], false, "{seen:?}");
    assert_eq!(
        s["new_cart_staging"]["reason"], "TARGETING_MATCH",
        "{seen:?}"
    );
    assert_eq!(s["banner_text"]["value"], "hello", "{seen:?}");
    assert_eq!(s["banner_text"]["variant"], "a", "{seen:?}");
    assert_eq!(
        s["old_thing"]["value"], true,
        "disabled: the code default: {seen:?}"
    );
    let disabled = if v1 { "ERROR" } else { "DISABLED" };
    assert_eq!(s["old_thing"]["reason"], disabled, "{seen:?}");
    assert_eq!(s["missing"]["error"], "FLAG_NOT_FOUND", "{seen:?}");
    assert_eq!(s["mismatch"]["value"], 7, "{seen:?}");
    assert_eq!(s["mismatch"]["error"], "TYPE_MISMATCH", "{seen:?}");
}

#[tokio::test]
async fn flagd_v2_serves_release_decisions() {
    let d = InProcess::start().await;
    let r = release::InProcess::start(d.addr).await;
    let (mut dc, mut rc) = (d.client().await, r.client().await);
    let g = Gated::setup(&mut dc, &mut rc, 2, 1.0, 100.0).await;
    rc.create_feature(rpb::CreateFeatureRequest {
        feature: Some(rpb::Feature {
            key: "banner-text".into(),
            variants: [
                (
                    "a".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue("hello".into())),
                    },
                ),
                (
                    "b".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue("bye".into())),
                    },
                ),
            ]
            .into(),
            default_variant: "a".into(),
            off_variant: "b".into(),
            metadata: [(
                "team".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("growth".into())),
                },
            )]
            .into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    release::plain_feature(&mut rc, "old-thing", true).await;
    let banner = release::release(&mut rc, &["banner-text"], &["prod"]).await;
    release::rollout(&mut rc, &banner, "prod", 100.0).await;

    let channel = tests::channel(r.addr).await;
    let mut fc = ServiceClient::new(channel);
    let mut events = fc
        .event_stream(fpb::EventStreamRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = events.message().await.unwrap().unwrap();
    assert_eq!(first.r#type, "provider_ready");

    // Released but not deployed: the off variant, as a targeting decision.
    let b = boolean(&mut fc, "new-cart", Some("prod"), &[("targetingKey", "u1")])
        .await
        .unwrap();
    assert_eq!(
        (b.value, b.reason.as_str(), b.variant.as_deref()),
        (Some(false), "TARGETING_MATCH", Some("off"))
    );
    g.report(&mut dc, &g.targets, P::Placed).await;
    eventually(
        &mut rc,
        "new-cart",
        "prod",
        "u1",
        rpb::Reason::Static,
        Duration::from_secs(10),
    )
    .await;
    let b = boolean(&mut fc, "new-cart", Some("prod"), &[("targetingKey", "u1")])
        .await
        .unwrap();
    assert_eq!((b.value, b.reason.as_str()), (Some(true), "STATIC"));
    // The placement gate opening is announced to flagd providers.
    let change = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.message().await.unwrap().unwrap();
            if e.r#type == "configuration_change" {
                let flags = e.data.unwrap().fields["flags"].clone();
                if let Some(prost_types::value::Kind::StructValue(s)) = flags.kind {
                    if s.fields.contains_key("new-cart") {
                        return s;
                    }
                }
            }
        }
    })
    .await
    .unwrap();
    assert!(change.fields.contains_key("new-cart"));

    // The environment from a context attribute (staging: not released there), and the default.
    let b = boolean(
        &mut fc,
        "new-cart",
        None,
        &[("targetingKey", "u1"), ("environment", "staging")],
    )
    .await
    .unwrap();
    assert_eq!(
        (b.value, b.reason.as_str()),
        (Some(false), "TARGETING_MATCH")
    );
    let b = boolean(&mut fc, "new-cart", None, &[("targetingKey", "u1")])
        .await
        .unwrap();
    assert_eq!(b.value, Some(true), "the default environment is prod");

    // Strings, disabled flags (code default), type mismatches, unknown flags.
    let s = fc
        .resolve_string(with_selector(
            fpb::ResolveStringRequest {
                flag_key: "banner-text".into(),
                context: context(&[]),
            },
            "prod",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s.value.as_deref(), s.reason.as_str(), s.variant.as_deref()),
        (Some("hello"), "STATIC", Some("a"))
    );
    // Flag metadata comes with the answer.
    let team = s
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("team"))
        .and_then(|v| v.kind.clone());
    assert_eq!(
        team,
        Some(prost_types::value::Kind::StringValue("growth".into()))
    );
    let off = boolean(&mut fc, "old-thing", Some("prod"), &[])
        .await
        .unwrap();
    assert_eq!(
        (off.value, off.reason.as_str(), off.variant),
        (None, "DISABLED", None)
    );
    let wrong = boolean(&mut fc, "banner-text", Some("prod"), &[])
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    assert!(wrong.message().contains("TYPE_MISMATCH"), "{wrong:?}");
    let missing = boolean(&mut fc, "nope", Some("prod"), &[])
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let all = fc
        .resolve_all(with_selector(
            fpb::ResolveAllRequest {
                context: context(&[("targetingKey", "u1")]),
            },
            "prod",
        ))
        .await
        .unwrap()
        .into_inner();
    let mut keys: Vec<_> = all.flags.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["banner-text", "new-cart", "old-thing"]);
    assert_eq!(
        all.flags["new-cart"].value,
        Some(fpb::any_flag::Value::BoolValue(true))
    );
    assert_eq!(all.flags["old-thing"].reason, "DISABLED");

    // The stock OpenFeature Python SDK and flagd provider see the same: the current one
    // (0.6.1, protocol v2) and an older one speaking the v1 protocol (0.2.7).
    for python in ["python3".to_owned(), v1_python()] {
        let seen = stock_provider(&python, r.addr).await;
        check_stock_provider(&python, &seen);
    }
    r.shutdown().await.unwrap();
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn flagd_v1_answers_with_plain_fields() {
    use proto::flagd::evaluation::v1;
    use proto::flagd::evaluation::v1::service_client::ServiceClient as V1Client;

    let d = InProcess::start().await;
    let r = release::InProcess::start(d.addr).await;
    let mut rc = r.client().await;
    release::plain_feature(&mut rc, "banner", false).await;
    release::plain_feature(&mut rc, "old-thing", true).await;
    let rel = release::release(&mut rc, &["banner"], &["prod"]).await;
    release::rollout(&mut rc, &rel, "prod", 100.0).await;

    let channel = tests::channel(r.addr).await;
    let mut c = V1Client::new(channel);
    let mut events = c
        .event_stream(v1::EventStreamRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        events.message().await.unwrap().unwrap().r#type,
        "provider_ready"
    );
    let b = c
        .resolve_boolean(with_selector(
            v1::ResolveBooleanRequest {
                flag_key: "banner".into(),
                context: context(&[("targetingKey", "u")]),
            },
            "prod",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (b.value, b.reason.as_str(), b.variant.as_str()),
        (true, "STATIC", "on")
    );
    // v1 fields cannot be unset: a disabled flag is NOT_FOUND (FLAG_DISABLED), as in
    // flagd's v1, so providers fall back to the code default instead of a zero value.
    let off = c
        .resolve_boolean(with_selector(
            v1::ResolveBooleanRequest {
                flag_key: "old-thing".into(),
                context: None,
            },
            "prod",
        ))
        .await;
    let off = tests::status::expect_code(off, Code::NotFound);
    assert!(off.message().contains("FLAG_DISABLED"), "{off:?}");
    let all = c
        .resolve_all(with_selector(
            v1::ResolveAllRequest { context: None },
            "prod",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        all.flags["banner"].value,
        Some(v1::any_flag::Value::BoolValue(true))
    );
    // A rollout change reaches v1 streams too.
    release::rollout(&mut rc, &rel, "prod", 50.0).await;
    let change = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(change.r#type, "configuration_change");
    r.shutdown().await.unwrap();
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn flagd_protocols_can_have_their_own_port() {
    let d = InProcess::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config =
        release_svc::Config::new(dir.path().join("release.db"), format!("http://{}", d.addr));
    let main = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flagd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (main_addr, flagd_addr) = (main.local_addr().unwrap(), flagd.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = release_svc::Server::open(config).await.unwrap();
    let task = tokio::spawn(server.run_with_flagd_port(main, Some(flagd), async move {
        let _ = stopped.await;
    }));
    let mut rc = release::connect(main_addr).await;
    release::plain_feature(&mut rc, "banner", false).await;
    let channel = tests::channel(flagd_addr).await;
    let mut fc = ServiceClient::new(channel.clone());
    let b = boolean(&mut fc, "banner", Some("prod"), &[]).await.unwrap();
    assert_eq!(
        (b.value, b.reason.as_str()),
        (Some(false), "TARGETING_MATCH"),
        "not released yet"
    );
    // Only the flagd protocols live on that port.
    let mut release_on_flagd_port =
        proto::release::v1::release_service_client::ReleaseServiceClient::new(channel);
    let refused = release_on_flagd_port
        .get_consumer_status(rpb::GetConsumerStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn flagd_documents_import_and_export() {
    let d = InProcess::start().await;
    let r = release::InProcess::start(d.addr).await;
    let mut rc = r.client().await;
    let document = r#"{
        "$evaluators": {"is-corp": {"ends_with": [{"var": "email"}, "@corp.com"]}},
        "flags": {
            "dark-mode": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                          "targeting": {"if": [{"$ref": "is-corp"}, "on", null]}},
            "headline": {"state": "ENABLED", "variants": {"a": "Hello", "b": "Hi"}, "defaultVariant": "a",
                         "targeting": {"fractional": [["a", 50], ["b", 50]]}},
            "retired": {"state": "DISABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}
        }
    }"#;
    let imported = rc
        .import_flagd(rpb::ImportFlagdRequest {
            environment: "prod".into(),
            document: document.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut created = imported.created.clone();
    created.sort();
    assert_eq!(created, ["dark-mode", "headline", "retired"]);
    assert!(!imported.release.is_empty());

    // Flags behave as they did in flagd, through the flagd protocol.
    let channel = tests::channel(r.addr).await;
    let mut fc = ServiceClient::new(channel);
    let corp = boolean(
        &mut fc,
        "dark-mode",
        Some("prod"),
        &[("targetingKey", "u"), ("email", "ada@corp.com")],
    )
    .await
    .unwrap();
    assert_eq!(
        (corp.value, corp.reason.as_str()),
        (Some(true), "TARGETING_MATCH")
    );
    let other = boolean(
        &mut fc,
        "dark-mode",
        Some("prod"),
        &[("targetingKey", "u"), ("email", "bob@else.com")],
    )
    .await
    .unwrap();
    assert_eq!(
        (other.value, other.reason.as_str()),
        (Some(false), "DEFAULT")
    );
    let retired = boolean(&mut fc, "retired", Some("prod"), &[])
        .await
        .unwrap();
    assert_eq!(retired.reason, "DISABLED");

    // Export renders the same flags back; importing it again changes nothing.
    let exported = rc
        .export_flagd(rpb::ExportFlagdRequest {
            environment: "prod".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .document;
    let doc: serde_json::Value = serde_json::from_str(&exported).unwrap();
    assert_eq!(doc["flags"]["dark-mode"]["state"], "ENABLED");
    assert_eq!(doc["flags"]["dark-mode"]["defaultVariant"], "off");
    assert_eq!(
        doc["flags"]["dark-mode"]["targeting"],
        serde_json::json!({"if": [{"ends_with": [{"var": "email"}, "@corp.com"]}, "on", null]}),
        "$ref resolved"
    );
    assert_eq!(
        doc["flags"]["headline"]["variants"],
        serde_json::json!({"a": "Hello", "b": "Hi"})
    );
    assert_eq!(doc["flags"]["retired"]["state"], "DISABLED");
    let again = rc
        .import_flagd(rpb::ImportFlagdRequest {
            environment: "prod".into(),
            document: exported,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        again.created.is_empty() && again.updated.is_empty(),
        "{again:?}"
    );
    assert_eq!(again.unchanged.len(), 3);
    assert!(again.release.is_empty(), "already released: no new release");

    // A bad document is refused whole, naming the flag...
    let bad_doc = r#"{"flags": {
        "x": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "zz"},
        "y": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a"}
    }}"#;
    let bad = rc
        .import_flagd(rpb::ImportFlagdRequest {
            environment: "prod".into(),
            document: bad_doc.into(),
            skip_invalid: false,
        })
        .await;
    assert_eq!(
        tests::status::bad_fields(bad),
        ["document.flags.x.defaultVariant"]
    );
    assert!(
        boolean(&mut fc, "y", Some("prod"), &[]).await.is_err(),
        "nothing of a refused document is written"
    );
    // ...or, with skip_invalid, the valid flags are imported and the bad ones listed.
    let partial = rc
        .import_flagd(rpb::ImportFlagdRequest {
            environment: "prod".into(),
            document: bad_doc.into(),
            skip_invalid: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(partial.created, ["y"]);
    assert_eq!(partial.skipped.len(), 1);
    assert_eq!(partial.skipped[0].key, "x");
    assert!(
        partial.skipped[0].problems[0].starts_with("document.flags.x.defaultVariant: "),
        "{partial:?}"
    );

    // A flag without a default variant answers "use the code default" when no rule picks.
    rc.import_flagd(rpb::ImportFlagdRequest {
        environment: "prod".into(),
        document: r#"{"flags": {"nd": {"state": "ENABLED", "variants": {"on": true, "off": false},
            "targeting": {"if": [{"==": [{"var": "email"}, "ada@corp.com"]}, "on", null]}}}}"#
            .into(),
        skip_invalid: false,
    })
    .await
    .unwrap();
    let none = boolean(&mut fc, "nd", Some("prod"), &[("email", "bob@else.com")])
        .await
        .unwrap();
    assert_eq!(
        (none.value, none.variant, none.reason.as_str()),
        (None, None, "DEFAULT")
    );
    let hit = boolean(&mut fc, "nd", Some("prod"), &[("email", "ada@corp.com")])
        .await
        .unwrap();
    assert_eq!(
        (hit.value, hit.reason.as_str()),
        (Some(true), "TARGETING_MATCH")
    );
    r.shutdown().await.unwrap();
    d.shutdown().await.unwrap();
}

/// The real pair (both binaries) and the stock Python provider: a feature released to 50%
/// in prod is true for about half of 1,000 users; the kill switch reaches the provider as a
/// configuration_change event, after which every user resolves false.
#[tokio::test]
async fn stock_provider_follows_a_half_rollout_and_the_kill_switch() {
    use tokio::io::AsyncBufReadExt;

    let dir = tempfile::tempdir().unwrap();
    let d = tests::Binary::start(&dir.path().join("deploy.db"), &[]).await;
    let deploy_url = format!("http://{}", d.addr);
    let release_db = dir.path().join("release.db");
    let r = tests::Binary::spawn(
        "release-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            &release_db.to_string_lossy(),
            "--deploy-svc",
            &deploy_url,
        ],
    )
    .await;
    let (mut dc, mut rc) = (tests::connect(d.addr).await, release::connect(r.addr).await);
    let g = Gated::setup(&mut dc, &mut rc, 2, 1.0, 50.0).await;
    g.report(&mut dc, &g.targets, P::Placed).await;
    let open = eventually(
        &mut rc,
        "new-cart",
        "prod",
        "probe",
        rpb::Reason::Split,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        open.reason(),
        rpb::Reason::Split,
        "gate never opened: {open:?}"
    );

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/flagd_provider_rollout.py"
    );
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .env("FLAGD_HOST", r.addr.ip().to_string())
        .env("FLAGD_PORT", r.addr.port().to_string())
        .env("FLAG_KEY", "new-cart")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the provider script answers within 60 s")
            .unwrap()
            .expect("the provider script printed a line");
        serde_json::from_str(&line).unwrap()
    };
    let before = next().await;
    let on = before["true"].as_u64().unwrap();
    assert!(
        (430..=570).contains(&on),
        "about half of 1,000 users should see a 50% release: {before}"
    );
    assert_eq!(
        before["reasons"]["TARGETING_MATCH"], 1000,
        "percentage decisions are targeting decisions, never cached: {before}"
    );

    // Kill switch.
    rc.pause_release(rpb::PauseReleaseRequest {
        name: g.release.clone(),
        reason: "incident".into(),
    })
    .await
    .unwrap();
    let after = next().await;
    assert_eq!(after["true"], 0, "after the kill switch: {after}");
    assert_eq!(after["false"], 1000, "{after}");
    assert!(
        after["flags_changed"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("new-cart")),
        "{after}"
    );
    assert!(child.wait().await.unwrap().success());
}
