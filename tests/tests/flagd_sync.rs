//! flagd's sync protocol (`flagd.sync.v1`) against the real release-svc binary: the stock
//! OpenFeature Python flagd provider, in-process, evaluates the served documents to the
//! same value and variant as release-svc's own Evaluate for 10,000 generated contexts, and
//! sees a kill switch; the raw protocol's documents, selector, scoping and stream updates.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use proto::deploy::v1::PlacementState as P;
use proto::flagd::sync::v1 as spb;
use proto::flagd::sync::v1::flag_sync_service_client::FlagSyncServiceClient;
use proto::release::v1 as rpb;
use release_svc::grpc::convert::{from_json, to_json};
use serde_json::{json, Value};
use tests::release::{self, Client};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tonic::{Code, Request};

fn to_struct(m: &serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), from_json(v))).collect(),
    }
}

fn text(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.into())),
    }
}

/// Creates a feature from its parts and releases it to `percent` in prod.
async fn released(rc: &mut Client, feature: rpb::Feature, percent: Option<f64>) -> String {
    let key = feature.key.clone();
    rc.create_feature(rpb::CreateFeatureRequest {
        feature: Some(feature),
    })
    .await
    .unwrap();
    let Some(percent) = percent else {
        return String::new();
    };
    let rel = release::release(rc, &[&key], &["prod"]).await;
    release::rollout(rc, &rel, "prod", percent).await;
    rel
}

fn boolean(key: &str) -> rpb::Feature {
    rpb::Feature {
        key: key.into(),
        ..Default::default()
    }
}

/// A string feature: `a` by default, `z` when hidden, `eu` and `senior` by its rule.
fn colours(key: &str, rule: &str, allow: &[&str], deny: &[&str]) -> rpb::Feature {
    rpb::Feature {
        key: key.into(),
        variants: [
            ("a".to_owned(), text("alpha")),
            ("z".to_owned(), text("zulu")),
            ("eu".to_owned(), text("europe")),
            ("senior".to_owned(), text("older")),
        ]
        .into(),
        default_variant: "a".into(),
        off_variant: "z".into(),
        targeting: rule.into(),
        allow: allow.iter().map(|s| (*s).to_owned()).collect(),
        deny: deny.iter().map(|s| (*s).to_owned()).collect(),
        metadata: [("team".to_owned(), text("growth"))].into(),
        ..Default::default()
    }
}

const RULE: &str = r#"{"if": [{"in": [{"var": "country"}, ["de", "fr"]]}, "eu",
    {">=": [{"var": "age"}, 40]}, "senior", null]}"#;

const DATED: &str = r#"{"if": [{"<": [{"var": "signup"}, "2026-07-01"]}, "eu",
    {">=": [{"var": "signup"}, "2026-10-01"]}, "senior", null]}"#;

/// The features of the run, with their type: every decision class.
async fn features(
    rc: &mut Client,
    dc: &mut tests::Client,
) -> (Vec<(String, &'static str)>, String, Vec<String>) {
    tests::environment(dc, "prod", None, false).await;
    let targets = tests::targets(dc, "prod", "p", 2).await;
    tests::artifact(dc, "checkout", "2.0.0").await;
    let mut flags = Vec::new();
    for (key, percent) in [("p0", 0.0), ("p1", 1.0), ("p50", 50.0), ("p100", 100.0)] {
        released(rc, boolean(key), Some(percent)).await;
        flags.push((key.to_owned(), "boolean"));
    }
    let paused = released(rc, boolean("paused"), Some(50.0)).await;
    rc.pause_release(rpb::PauseReleaseRequest {
        name: paused,
        reason: "checking".into(),
    })
    .await
    .unwrap();
    release::feature(rc, "gated", "checkout", "2.0.0", 1.0).await;
    let gated = release::release(rc, &["gated"], &["prod"]).await;
    release::rollout(rc, &gated, "prod", 100.0).await;
    released(
        rc,
        rpb::Feature {
            disabled: true,
            ..boolean("disabled")
        },
        Some(100.0),
    )
    .await;
    released(rc, boolean("unreleased"), None).await;
    flags.extend(["paused", "gated", "disabled", "unreleased"].map(|k| (k.to_owned(), "boolean")));
    released(rc, colours("targeted", RULE, &[], &[]), Some(100.0)).await;
    released(
        rc,
        colours("targeted-half", RULE, &["user-7", "user-8"], &["user-1"]),
        Some(50.0),
    )
    .await;
    released(
        rc,
        colours("listed", "", &["user-3", "user-4"], &["user-5"]),
        Some(1.0),
    )
    .await;
    // A rule of its own that splits with flagd's fractional (implicit bucketing input).
    released(
        rc,
        colours(
            "split-rule",
            r#"{"fractional": [["eu", 30], ["senior", 30], ["a", 40]]}"#,
            &[],
            &[],
        ),
        Some(100.0),
    )
    .await;
    // Dates as ISO 8601 texts: two texts order as texts, in every engine.
    released(rc, colours("dated", DATED, &[], &[]), Some(100.0)).await;
    flags.extend(
        ["targeted", "targeted-half", "listed", "split-rule", "dated"]
            .map(|k| (k.to_owned(), "string")),
    );
    let p100 = rc
        .list_releases(rpb::ListReleasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .releases
        .into_iter()
        .find(|r| r.features == ["p100"])
        .unwrap()
        .name;
    (flags, p100, targets)
}

/// The generated contexts: keys `user-0`.., every 97th without one; countries, ages,
/// signup dates.
fn contexts(n: usize) -> Vec<(Option<String>, serde_json::Map<String, Value>)> {
    let countries = ["de", "fr", "us", "jp", "br"];
    (0..n)
        .map(|i| {
            let key = (i % 97 != 0).then(|| format!("user-{i}"));
            let mut attrs = serde_json::Map::new();
            attrs.insert("country".into(), json!(countries[i % countries.len()]));
            if i % 4 != 0 {
                attrs.insert("age".into(), json!((i * 7) % 80));
            }
            let signup = format!("2026-{:02}-{:02}", 1 + i % 12, 1 + (i * 5) % 28);
            attrs.insert("signup".into(), json!(signup));
            (key, attrs)
        })
        .collect()
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Where `scripts/test` installs the Node packages.
fn node_modules() -> String {
    std::env::var("OFREP_NODE_MODULES").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/node/node_modules").to_owned()
    })
}

/// Runs the equivalence: release-svc with `--fractional-bucketing profile`, every feature
/// of [`features`] for `n` generated contexts through Evaluate and through `provider` (a
/// script speaking the protocol of tests/python/flagd_in_process.py), which must agree on
/// every value and variant; then the kill switch must reach the provider.
async fn equivalence(profile: &str, mut provider: tokio::process::Command, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let d = tests::Binary::start(&dir.path().join("deploy.db"), &[]).await;
    let r =
        tests::Binary::release_following(dir.path(), d.addr, &["--fractional-bucketing", profile])
            .await;
    let (mut dc, mut rc) = (tests::connect(d.addr).await, release::connect(r.addr).await);
    let (flags, p100, targets) = features(&mut rc, &mut dc).await;
    // One carrier target placed of two: `gated` stays NOT_DEPLOYED.
    let deployment = tests::deploy(&mut dc, "checkout", "2.0.0", "prod", "")
        .await
        .unwrap();
    tests::report(&mut dc, &deployment.name, &targets[0], P::Placed)
        .await
        .unwrap();

    // Every case: each context against every feature.
    let contexts = contexts(n);
    let mut cases = Vec::new();
    let mut want = Vec::new();
    for (key, attrs) in &contexts {
        let answers = rc
            .evaluate_batch(rpb::EvaluateBatchRequest {
                features: flags.iter().map(|f| f.0.clone()).collect(),
                context: Some(rpb::EvaluationContext {
                    environment: "prod".into(),
                    targeting_key: key.clone().unwrap_or_default(),
                    attributes: Some(to_struct(attrs)),
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        let by_key: BTreeMap<_, _> = answers.iter().map(|a| (a.feature.clone(), a)).collect();
        for (flag, kind) in &flags {
            let a = by_key[flag];
            let default = if *kind == "boolean" {
                json!(false)
            } else {
                json!("code-default")
            };
            cases.push(json!({
                "flag": flag, "type": kind, "default": default,
                "targetingKey": key, "attributes": attrs,
            }));
            want.push((
                flag.clone(),
                a.variant.clone(),
                to_json(a.value.as_ref().unwrap()),
                a.reason(),
            ));
        }
    }
    let cases_file = dir.path().join("cases.json");
    std::fs::write(&cases_file, serde_json::to_vec(&cases).unwrap()).unwrap();

    let mut child = provider
        .env("FLAGD_HOST", r.addr.ip().to_string())
        .env("FLAGD_PORT", r.addr.port().to_string())
        .env("FLAGD_SELECTOR", "flagSetId=prod")
        .env("CASES", &cases_file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .expect("the provider script answers")
            .unwrap()
            .expect("the provider script printed a line");
        serde_json::from_str(&line).unwrap()
    };
    let got = next().await;
    let results = got["results"].as_array().unwrap();
    assert_eq!(results.len(), want.len());
    let mut classes: BTreeMap<String, usize> = BTreeMap::new();
    let mut mismatches = Vec::new();
    for (i, ((flag, variant, value, reason), seen)) in want.iter().zip(results).enumerate() {
        *classes
            .entry(format!("{flag} {reason:?} {variant}"))
            .or_default() += 1;
        if seen["variant"] != json!(variant) || &seen["value"] != value {
            mismatches.push(format!(
                "{flag} for {}: Evaluate {variant} {value} ({reason:?}), in-process {seen}",
                cases[i]
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} decisions differ; first: {:#?}",
        mismatches.len(),
        want.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    // Every decision class the run is about was reached.
    for class in [
        "p0 Split off",
        "p1 Split on",
        "p1 Split off",
        "p50 Split on",
        "p50 Split off",
        "p100 Static on",
        "gated NotDeployed off",
        "disabled Disabled off",
        "unreleased NotReleased off",
        "targeted TargetingMatch eu",
        "targeted TargetingMatch senior",
        "targeted Default a",
        "targeted-half TargetingMatch eu",
        "targeted-half Split z",
        "listed TargetingMatch a",
        "listed TargetingMatch z",
        "split-rule TargetingMatch senior",
        "dated TargetingMatch eu",
        "dated TargetingMatch senior",
        "dated Default a",
    ] {
        assert!(classes.contains_key(class), "no {class:?} in {classes:#?}");
    }
    assert!(
        classes.keys().any(|c| c.starts_with("paused ")),
        "{classes:#?}"
    );
    eprintln!(
        "{} decisions agree ({} contexts x {} features); in-process evaluation took {:.2} s",
        want.len(),
        contexts.len(),
        flags.len(),
        got["seconds"].as_f64().unwrap()
    );

    // The kill switch: pausing p100's release reaches the in-process provider (which polls
    // from before the call; the time includes the call).
    let line = json!({"flag": "p100", "type": "boolean", "default": true, "want": false});
    stdin
        .write_all(format!("{line}\n").as_bytes())
        .await
        .unwrap();
    let polling = next().await;
    assert_eq!(polling["polling"], "p100", "{polling}");
    rc.pause_release(rpb::PauseReleaseRequest {
        name: p100,
        reason: "incident".into(),
    })
    .await
    .unwrap();
    let seen = next().await;
    let ms = seen["ms"].as_f64().unwrap_or_else(|| panic!("{seen}"));
    eprintln!("the kill switch reached the in-process provider in {ms:.1} ms");
    drop(stdin);
    assert!(child.wait().await.unwrap().success());
    r.kill().await;
    d.kill().await;
}

#[tokio::test]
async fn stock_python_in_process_provider_decides_as_evaluate_and_sees_the_kill_switch() {
    let mut python = tokio::process::Command::new(python());
    python.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/flagd_in_process.py"
    ));
    // openfeature-provider-flagd 0.6 buckets `fractional` as the 2026 SDKs do.
    equivalence("v3", python, 10_000).await;
}

#[tokio::test]
async fn stock_node_in_process_provider_decides_as_evaluate_and_sees_the_kill_switch() {
    let mut node = tokio::process::Command::new("node");
    node.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/node/flagd_in_process.cjs"
    ))
    .env("NODE_PATH", node_modules());
    // @openfeature/flagd-provider 0.16 (flagd-core 4) buckets as flagd 0.15-0.16 did.
    equivalence("v2", node, 10_000).await;
}

fn sync_request<T>(msg: T, selector: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("flagd-selector", selector.parse().unwrap());
    req
}

#[tokio::test]
async fn sync_serves_each_environment_and_streams_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = tests::Binary::start(&dir.path().join("deploy.db"), &[]).await;
    let r = tests::Binary::release_following(
        dir.path(),
        d.addr,
        &["--flagd-context", "region=eu-west"],
    )
    .await;
    let (mut dc, mut rc) = (tests::connect(d.addr).await, release::connect(r.addr).await);
    tests::environment(&mut dc, "prod", None, false).await;
    tests::environment(&mut dc, "staging", None, false).await;
    let rel = released(&mut rc, colours("banner", "", &[], &[]), Some(100.0)).await;
    let mut sync = FlagSyncServiceClient::new(tests::channel(r.addr).await);

    // FetchAllFlags: prod has the feature released (static), staging hidden.
    let doc = |s: &str| -> Value { serde_json::from_str(s).unwrap() };
    let prod = doc(&sync
        .fetch_all_flags(sync_request(
            spb::FetchAllFlagsRequest::default(),
            "flagSetId=prod",
        ))
        .await
        .unwrap()
        .into_inner()
        .flag_configuration);
    assert_eq!(prod["flags"]["banner"]["defaultVariant"], "a", "{prod}");
    assert_eq!(
        prod["flags"]["banner"]["metadata"]["team"], "growth",
        "{prod}"
    );
    assert_eq!(prod["metadata"]["flagSetId"], "prod");
    #[allow(deprecated)]
    let staging = doc(&sync
        .fetch_all_flags(spb::FetchAllFlagsRequest {
            selector: "flagSetId=staging".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .flag_configuration);
    assert_eq!(
        staging["flags"]["banner"]["defaultVariant"], "z",
        "{staging}"
    );

    // SyncFlags: the document now with the static context, then after each change.
    let mut stream = sync
        .sync_flags(sync_request(
            spb::SyncFlagsRequest::default(),
            "flagSetId=prod",
        ))
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a document within 10 s")
            .unwrap()
            .expect("the stream is open")
    };
    let first = next().await;
    assert_eq!(doc(&first.flag_configuration), prod);
    let context = first.sync_context.unwrap();
    assert_eq!(
        to_json(&prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(context)),
        }),
        json!({"region": "eu-west"})
    );
    release::rollout(&mut rc, &rel, "prod", 25.0).await;
    let second = doc(&next().await.flag_configuration);
    assert_eq!(second["flags"]["banner"]["defaultVariant"], "z", "{second}");
    let targeting = second["flags"]["banner"]["targeting"].to_string();
    assert!(
        targeting.contains("fractional") && targeting.contains("2500"),
        "{targeting}"
    );
    // A change elsewhere (staging) leaves prod's document alone: the next document is
    // the kill switch's.
    released(&mut rc, colours("other", "", &[], &[]), None).await;
    rc.pause_release(rpb::PauseReleaseRequest {
        name: rel,
        reason: "incident".into(),
    })
    .await
    .unwrap();
    let third = doc(&next().await.flag_configuration);
    if third["flags"].get("other").is_some() && third["flags"]["banner"]["defaultVariant"] != "z" {
        panic!("{third}");
    }
    let hidden = if third["flags"]["banner"].get("targeting").is_none() {
        third
    } else {
        doc(&next().await.flag_configuration)
    };
    assert_eq!(hidden["flags"]["banner"]["defaultVariant"], "z", "{hidden}");
    assert!(
        hidden["flags"]["banner"].get("targeting").is_none(),
        "{hidden}"
    );

    // GetMetadata (older providers) answers the static context too.
    #[allow(deprecated)]
    let meta = sync
        .get_metadata(spb::GetMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.metadata.unwrap().fields.len(), 1);
}

#[tokio::test]
async fn sync_is_scoped_to_the_callers_environments() {
    use tests::pki;
    let dir = tempfile::tempdir().unwrap();
    let token = pki::random_token();
    let (tokens, policy) = (
        dir.path().join("tokens.json"),
        dir.path().join("policy.json"),
    );
    pki::token_file(&tokens, &[(&token, "checkout", &[])]).unwrap();
    pki::policy_file(
        &policy,
        &[json!({"role": "evaluator", "principals": ["checkout"], "environments": ["prod"]})],
    )
    .unwrap();
    let r = tests::Binary::release_alone(
        &dir.path().join("r.db"),
        &[
            "--auth-tokens",
            &tokens.to_string_lossy(),
            "--auth-policy",
            &policy.to_string_lossy(),
        ],
    )
    .await;
    let mut sync = FlagSyncServiceClient::new(tests::channel(r.addr).await);
    let call = |selector: &str, token: Option<&str>| {
        let mut req = sync_request(spb::FetchAllFlagsRequest::default(), selector);
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        req
    };
    let prod = sync
        .fetch_all_flags(call("flagSetId=prod", Some(&token)))
        .await
        .unwrap()
        .into_inner();
    assert!(prod.flag_configuration.contains("\"flags\""), "{prod:?}");
    let err = sync
        .fetch_all_flags(call("flagSetId=staging", Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = sync
        .sync_flags(sync_request(
            spb::SyncFlagsRequest::default(),
            "flagSetId=prod",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    r.kill().await;
}

/// Found by attacking the service: documents had no size limit (a 4.8 MB document went out
/// where ResolveAll refused), and every stream, counted only against the change-stream cap,
/// could hold one its client never read. Now a document over the response limit is
/// RESOURCE_EXHAUSTED (an open stream ends with it), and SyncFlags has its own cap.
#[tokio::test]
async fn sync_documents_and_streams_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let d = tests::Binary::start(&dir.path().join("deploy.db"), &[]).await;
    let r = tests::Binary::release_following(
        dir.path(),
        d.addr,
        &["--max-message-bytes", "3000", "--max-sync-streams", "2"],
    )
    .await;
    let mut rc = release::connect(r.addr).await;
    let mut sync = FlagSyncServiceClient::new(tests::channel(r.addr).await);
    let open = |sync: &mut FlagSyncServiceClient<tonic::transport::Channel>| {
        let mut sync = sync.clone();
        async move {
            sync.sync_flags(sync_request(
                spb::SyncFlagsRequest::default(),
                "flagSetId=prod",
            ))
            .await
        }
    };
    let mut first = open(&mut sync).await.unwrap().into_inner();
    let _second = open(&mut sync).await.unwrap().into_inner();
    let third = open(&mut sync).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
    assert!(first.message().await.unwrap().is_some());

    // Features until the document is over 3,000 bytes: the stream ends, Fetch refuses.
    for i in 0..20 {
        released(&mut rc, colours(&format!("banner-{i}"), "", &[], &[]), None).await;
    }
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), first.message()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("no end within 10 s"),
        }
    };
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert!(end.message().contains("flag_configuration"), "{end:?}");
    let fetch = sync
        .fetch_all_flags(sync_request(
            spb::FetchAllFlagsRequest::default(),
            "flagSetId=prod",
        ))
        .await
        .unwrap_err();
    assert_eq!(fetch.code(), Code::ResourceExhausted, "{fetch:?}");
    r.kill().await;
}
