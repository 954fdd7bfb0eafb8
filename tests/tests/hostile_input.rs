//! Hostile input against the real release-svc binary: each attack is replayed as an
//! attacker would send it, then the test checks the refusal is a clear status naming the
//! field, the process is alive and answers, its memory stayed bounded, and nothing was
//! written.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use prost_types::value::Kind;
use proto::release::v1 as rpb;
use tests::release::{self, Client};
use tests::status::{bad_fields, expect_code};
use tests::Binary;
use tonic::Code;

/// The most resident memory any attack may leave the process with.
const MAX_RSS_KIB: u64 = 512 * 1024;

/// release-svc on port 0 with a SQLite file in `dir`, without a reachable deploy-svc (it
/// keeps retrying in the background) and without a change calendar.
async fn release_svc(dir: &Path) -> Binary {
    Binary::release_alone(&dir.join("release.db"), &[]).await
}

/// The process's resident memory in KiB.
fn rss_kib(r: &Binary) -> u64 {
    let pid = r.child.id().expect("release-svc exited");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// What a caller can see of the state: every feature and every audit record.
async fn state(c: &mut Client) -> (Vec<rpb::Feature>, Vec<rpb::AuditRecord>) {
    let features = c
        .list_features(rpb::ListFeaturesRequest {
            page_size: 1000,
            page_token: String::new(),
            show_archived: true,
        })
        .await
        .unwrap()
        .into_inner()
        .features;
    let audit = c
        .list_audit_records(rpb::ListAuditRecordsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    (features, audit)
}

/// The process survived: it has not exited, its memory is bounded, it still answers, and
/// the state is what it was before the attack.
async fn survived(
    r: &mut Binary,
    c: &mut Client,
    before: &(Vec<rpb::Feature>, Vec<rpb::AuditRecord>),
) {
    assert!(
        r.child.try_wait().unwrap().is_none(),
        "release-svc exited during the attack"
    );
    let rss = rss_kib(r);
    assert!(rss < MAX_RSS_KIB, "release-svc grew to {rss} KiB");
    assert_eq!(&state(c).await, before, "the attack changed the state");
}

fn import(document: String) -> rpb::ImportFlagdRequest {
    rpb::ImportFlagdRequest {
        environment: "prod".into(),
        document,
        skip_invalid: false,
    }
}

/// A flag whose targeting is `{"$ref": first}`, beside an innocent flag that must not be
/// imported either (no partial import).
fn document(evaluators: &serde_json::Map<String, serde_json::Value>, first: &str) -> String {
    serde_json::json!({
        "$evaluators": evaluators,
        "flags": {
            "innocent": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off"},
            "hostile": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                        "targeting": {"$ref": first}}
        }
    })
    .to_string()
}

/// Attack 1: ImportFlagd of a ~9 KB document whose `$evaluators` chain `$ref`s ~4,000
/// levels deep (32 evaluators of 124 nested arrays each: every evaluator alone is within
/// the JSON parser's depth limit, and the chain stays within the old hop count).
#[tokio::test]
async fn a_deep_ref_chain_is_refused_without_exhausting_the_stack() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = release_svc(dir.path()).await;
    let mut c = release::connect(r.addr).await;
    let before = state(&mut c).await;
    let mut evaluators = serde_json::Map::new();
    for i in 0..32 {
        let inner = if i == 31 {
            "true".to_owned()
        } else {
            format!(r#"{{"$ref":"e{}"}}"#, i + 1)
        };
        let text = format!("{}{inner}{}", "[".repeat(124), "]".repeat(124));
        evaluators.insert(format!("e{i}"), serde_json::from_str(&text).unwrap());
    }
    let doc = document(&evaluators, "e0");
    assert!((8_000..10_000).contains(&doc.len()), "{} bytes", doc.len());

    let fields = bad_fields(c.import_flagd(import(doc)).await);
    assert_eq!(fields, ["document.flags.hostile.targeting"]);
    survived(&mut r, &mut c, &before).await;
}

/// Attack 2: ImportFlagd of a ~1.8 KB "billion laughs" document: each of ten evaluators
/// references the one below ten times (10^10 leaves once expanded).
#[tokio::test]
async fn a_billion_laughs_document_is_refused_within_the_expansion_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = release_svc(dir.path()).await;
    let mut c = release::connect(r.addr).await;
    let before = state(&mut c).await;
    let mut evaluators = serde_json::Map::new();
    for i in 0..10 {
        let refs: Vec<serde_json::Value> = (0..10)
            .map(|_| serde_json::json!({"$ref": format!("l{}", i + 1)}))
            .collect();
        evaluators.insert(format!("l{i}"), serde_json::Value::Array(refs));
    }
    evaluators.insert("l10".into(), serde_json::json!("lol"));
    let doc = document(&evaluators, "l0");
    assert!((1_500..2_500).contains(&doc.len()), "{} bytes", doc.len());

    let status = expect_code(
        c.import_flagd(import(doc.clone())).await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("65536 bytes"), "{status:?}");
    let fields = bad_fields(c.import_flagd(import(doc)).await);
    assert_eq!(fields, ["document.flags.hostile.targeting"]);
    survived(&mut r, &mut c, &before).await;
}

/// A feature with `rule`, released at 100% in `prod`; the default variant is `off`.
async fn ruled_feature(c: &mut Client, key: &str, rule: String) {
    c.create_feature(rpb::CreateFeatureRequest {
        feature: Some(rpb::Feature {
            key: key.into(),
            targeting: rule,
            default_variant: "off".into(),
            off_variant: "off".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let rel = release::release(c, &[key], &["prod"]).await;
    release::rollout(c, &rel, "prod", 100.0).await;
}

fn evaluate_with(feature: &str, a: String) -> rpb::EvaluateRequest {
    rpb::EvaluateRequest {
        feature: feature.into(),
        context: Some(rpb::EvaluationContext {
            environment: "prod".into(),
            targeting_key: "u1".into(),
            attributes: Some(prost_types::Struct {
                fields: [(
                    "a".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::StringValue(a)),
                    },
                )]
                .into(),
            }),
        }),
    }
}

/// Attack 3: a feature whose rule is a 64 KiB `cat` of 5,459 `{"var":"a"}`, then Evaluate
/// with a 700 KB attribute `a` (3.8 GB of output). The context is refused by its size
/// limit; a context within it makes the rule run out of its evaluation budget, and the
/// feature serves its default.
#[tokio::test]
async fn a_rule_that_multiplies_a_large_attribute_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = release_svc(dir.path()).await;
    let mut c = release::connect(r.addr).await;
    let vars = |n: usize| vec![r#"{"var":"a"}"#; n].join(",");
    let cat = format!(r#"{{"cat":[{}]}}"#, vars(5459));
    assert!(
        cat.len() <= 64 * 1024 && cat.len() > 65_000,
        "{}",
        cat.len()
    );
    ruled_feature(&mut c, "cat-bomb", cat).await;
    let guarded = format!(r#"{{"if":[{{"cat":[{}]}},"on","off"]}}"#, vars(5450));
    ruled_feature(&mut c, "guarded", guarded).await;
    let before = state(&mut c).await;

    let fields = bad_fields(
        c.evaluate(evaluate_with("cat-bomb", "x".repeat(700_000)))
            .await,
    );
    assert_eq!(fields, ["context.attributes"]);
    survived(&mut r, &mut c, &before).await;

    // Within the context limit (60 KB: 327 MB of output), over the evaluation budget.
    let over = c
        .evaluate(evaluate_with("guarded", "x".repeat(60_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(over.reason(), rpb::Reason::Default, "{over:?}");
    assert_eq!(over.variant, "off");
    // The same rule within budget picks its variant.
    let fine = c
        .evaluate(evaluate_with("guarded", "x".into()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fine.reason(), rpb::Reason::TargetingMatch, "{fine:?}");
    assert_eq!(fine.variant, "on");
    survived(&mut r, &mut c, &before).await;
}

/// `starts_with` and `ends_with` against a text whose characters are longer than one
/// byte: the affix's length can fall inside a character of the attribute. Each answers as
/// text comparison does (no panic, no dropped call), and the service carries on.
#[tokio::test]
async fn affixes_against_texts_of_any_script_answer_and_the_service_survives() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = release_svc(dir.path()).await;
    let mut c = release::connect(r.addr).await;
    let rule = r#"{"if":[{"ends_with":[{"var":"a"},"x"]},"on",{"starts_with":[{"var":"a"},"é"]},"on","off"]}"#;
    ruled_feature(&mut c, "affixes", rule.into()).await;
    let before = state(&mut c).await;
    for (a, variant) in [
        ("é", "on"),
        ("€x", "on"),
        ("x€", "off"),
        ("ü", "off"),
        ("", "off"),
    ] {
        let got = c
            .evaluate(evaluate_with("affixes", a.into()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.variant, variant, "{a:?}: {got:?}");
    }
    survived(&mut r, &mut c, &before).await;
}

/// Attack 9: PauseRelease with a 3.9 MB reason and an emergency approver of 3.9 MB were
/// accepted, and afterwards the release's audit trail could not be listed any more.
#[tokio::test]
async fn megabyte_reasons_and_approvers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = release_svc(dir.path()).await;
    let mut c = release::connect(r.addr).await;
    release::plain_feature(&mut c, "paused", false).await;
    let rel = release::release(&mut c, &["paused"], &["prod"]).await;
    release::rollout(&mut c, &rel, "prod", 50.0).await;
    let before = state(&mut c).await;
    let huge = "r".repeat(3_900_000);

    let fields = bad_fields(
        c.pause_release(rpb::PauseReleaseRequest {
            name: rel.clone(),
            reason: huge.clone(),
        })
        .await,
    );
    assert_eq!(fields, ["reason"]);
    let fields = bad_fields(
        c.set_emergency_override(rpb::SetEmergencyOverrideRequest {
            name: rel.clone(),
            reason: "the payment provider is down".into(),
            approver: huge,
        })
        .await,
    );
    assert_eq!(fields, ["approver"]);
    survived(&mut r, &mut c, &before).await;
    // The release's audit trail still lists, and a reason within the limit is accepted.
    let records = c
        .list_audit_records(rpb::ListAuditRecordsRequest {
            resource: rel.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(!records.is_empty());
    let paused = c
        .pause_release(rpb::PauseReleaseRequest {
            name: rel.clone(),
            reason: "r".repeat(1024),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.state(), rpb::ReleaseState::Paused);
}

/// A protobuf Value nested `depth` lists deep.
fn nested(depth: usize) -> prost_types::Value {
    let mut v = prost_types::Value {
        kind: Some(Kind::BoolValue(true)),
    };
    for _ in 0..depth {
        v = prost_types::Value {
            kind: Some(Kind::StructValue(prost_types::Struct {
                fields: [("n".to_owned(), v)].into(),
            })),
        };
    }
    v
}

/// A variant value or a context attribute nested ~45 levels deep was refused by the
/// protobuf decoder with INTERNAL; nested less deeply (35) it was accepted. Both are
/// INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn deeply_nested_values_are_invalid_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = release_svc(dir.path()).await;
    let mut c = release::connect(r.addr).await;
    release::plain_feature(&mut c, "plain", false).await;
    let before = state(&mut c).await;
    for depth in [45, 35] {
        let fields = bad_fields(
            c.create_feature(rpb::CreateFeatureRequest {
                feature: Some(rpb::Feature {
                    key: format!("nested-{depth}"),
                    variants: [
                        ("on".to_owned(), nested(depth)),
                        ("off".to_owned(), nested(0)),
                    ]
                    .into(),
                    ..Default::default()
                }),
            })
            .await,
        );
        assert_eq!(fields, ["feature.variants"], "depth {depth}");
        let fields = bad_fields(
            c.evaluate(rpb::EvaluateRequest {
                feature: "plain".into(),
                context: Some(rpb::EvaluationContext {
                    environment: "prod".into(),
                    targeting_key: "u1".into(),
                    attributes: Some(prost_types::Struct {
                        fields: [("deep".to_owned(), nested(depth))].into(),
                    }),
                }),
            })
            .await,
        );
        assert_eq!(fields, ["context.attributes"], "depth {depth}");
    }
    survived(&mut r, &mut c, &before).await;
}

/// A CreateFeature carrying `x-request-id: id`.
fn with_request_id(key: &str, id: &str) -> tonic::Request<rpb::CreateFeatureRequest> {
    let mut req = tonic::Request::new(rpb::CreateFeatureRequest {
        feature: Some(rpb::Feature {
            key: key.into(),
            ..Default::default()
        }),
    });
    req.metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    req
}

/// A malformed `x-request-id` (300 characters; with a space) was cut to 128 characters or
/// kept as sent by release-svc and written into its audit trail, while deploy-svc refused
/// it: both now refuse it as INVALID_ARGUMENT naming the metadata, change nothing, and
/// record a well-formed id exactly as sent.
#[tokio::test]
async fn malformed_request_ids_are_refused_by_both_services() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = release_svc(dir.path()).await;
    let mut c = release::connect(r.addr).await;
    let before = state(&mut c).await;
    for bad in ["r".repeat(300), "two words".to_owned()] {
        let fields = bad_fields(c.create_feature(with_request_id("f", &bad)).await);
        assert_eq!(fields, ["x-request-id"], "{bad:?}");
    }
    survived(&mut r, &mut c, &before).await;
    c.create_feature(with_request_id("f", "req-1.a"))
        .await
        .unwrap();
    let (_, audit) = state(&mut c).await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].request_id, "req-1.a");

    let deploy = Binary::start(&tests::deploy_database(dir.path()).await, &[]).await;
    let mut d = tests::connect(deploy.addr).await;
    let mut req = tonic::Request::new(proto::deploy::v1::CreateEnvironmentRequest {
        environment_id: "dev".into(),
        environment: Some(Default::default()),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-request-id", "r".repeat(300).parse().unwrap());
    assert_eq!(
        bad_fields(d.create_environment(req).await),
        ["x-request-id"]
    );
}
