//! release-svc's queries end to end, on real gRPC with real deploy-svc and release-svc.
//! ListVisibility: a fixture built by real deployments, placements and releases covers
//! every decision class; each cell agrees with what Evaluate answers; the gate's cell
//! follows a placement; paging, filters and bad input. GetReleaseTimeline: a plan's steps
//! taken and waited on, a kill switch and its resumption, an automatic withdrawal, the
//! steps to come.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use proto::deploy::v1 as dpb;
use proto::release::v1 as rpb;
use rpb::VisibilityClass as Class;
use tests::release;
use tests::{environment, Gated, InProcess};

/// Every feature of the fixture, by key.
const KEYS: [&str; 8] = [
    "dark", "half", "killed", "new-cart", "off", "plain", "planned", "vip",
];

async fn matrix(
    rc: &mut release::Client,
    req: rpb::ListVisibilityRequest,
) -> rpb::ListVisibilityResponse {
    rc.list_visibility(req).await.unwrap().into_inner()
}

/// The cell of `feature` in `env` in a full listing.
async fn cell(rc: &mut release::Client, feature: &str, env: &str) -> rpb::VisibilityCell {
    let m = matrix(
        rc,
        rpb::ListVisibilityRequest {
            feature: feature.into(),
            environment: env.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(m.environments, [env]);
    assert_eq!(m.features.len(), 1, "{m:?}");
    m.features[0].cells[0].clone()
}

/// A release of `features` to `env` at `percent`.
async fn released(rc: &mut release::Client, features: &[&str], env: &str, percent: f64) -> String {
    let rel = release::release(rc, features, &[env]).await;
    release::rollout(rc, &rel, env, percent).await;
    rel
}

#[tokio::test]
async fn every_decision_class_with_its_reason_and_the_same_answer_as_evaluate() {
    let d = InProcess::start().await;
    let r = release::InProcess::start(d.addr).await;
    let (mut dc, mut rc) = (d.client().await, r.client().await);
    for env in ["dev", "qa", "uat"] {
        environment(&mut dc, env, None, false).await;
    }
    // prod: new-cart at 100%, carried by checkout 2.0.0 on both targets (not placed yet).
    let gated = Gated::setup(&mut dc, &mut rc, 2, 1.0, 100.0).await;

    release::plain_feature(&mut rc, "dark", false).await;
    release::plain_feature(&mut rc, "half", false).await;
    let half = released(&mut rc, &["half"], "dev", 50.0).await;
    release::plain_feature(&mut rc, "killed", false).await;
    let killed = released(&mut rc, &["killed"], "dev", 100.0).await;
    rc.pause_release(rpb::PauseReleaseRequest {
        name: killed.clone(),
        reason: "error rate".into(),
    })
    .await
    .unwrap();
    release::plain_feature(&mut rc, "off", true).await;
    released(&mut rc, &["off"], "dev", 100.0).await;
    release::plain_feature(&mut rc, "plain", false).await;
    let plain = released(&mut rc, &["plain"], "dev", 100.0).await;
    rc.create_feature(rpb::CreateFeatureRequest {
        feature: Some(rpb::Feature {
            key: "vip".into(),
            allow: vec!["alice".into()],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    released(&mut rc, &["vip"], "dev", 100.0).await;

    // planned: qa 100%, then uat, where an hour of soak in qa is required.
    release::plain_feature(&mut rc, "planned", false).await;
    let planned = release::soaking_plan(&mut rc, "planned", "qa", "uat").await;
    let start = Instant::now();
    let waiting = loop {
        let c = cell(&mut rc, "planned", "uat").await;
        if !c.waiting.is_empty() {
            break c;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // The whole matrix: columns from releases, policies and placements.
    let m = matrix(&mut rc, rpb::ListVisibilityRequest::default()).await;
    assert_eq!(m.environments, ["dev", "prod", "qa", "uat"]);
    assert_eq!(
        m.features
            .iter()
            .map(|f| f.feature.as_str())
            .collect::<Vec<_>>(),
        KEYS
    );
    assert!(m.next_page_token.is_empty());
    let at = |feature: &str, env: &str| {
        let row = m.features.iter().find(|f| f.feature == feature).unwrap();
        let i = m.environments.iter().position(|e| e == env).unwrap();
        row.cells[i].clone()
    };
    let class = |feature: &str, env: &str| at(feature, env).class();
    assert_eq!(class("dark", "dev"), Class::NotReleased);
    assert!(at("dark", "dev").release.is_empty());
    let h = at("half", "dev");
    assert_eq!(
        (h.class(), h.rollout_percent, h.release.as_str()),
        (Class::Rollout, 50.0, half.as_str())
    );
    assert_eq!(h.release_state(), rpb::ReleaseState::Releasing);
    let k = at("killed", "dev");
    assert_eq!(
        (k.class(), k.release.as_str()),
        (Class::Paused, killed.as_str())
    );
    assert_eq!(k.release_state(), rpb::ReleaseState::Paused);
    let g = at("new-cart", "prod");
    assert_eq!(
        (g.class(), g.release.as_str()),
        (Class::NotDeployed, gated.release.as_str())
    );
    assert!(
        g.not_deployed.contains("checkout") && g.not_deployed.contains("0/2"),
        "{g:?}"
    );
    assert_eq!(class("new-cart", "dev"), Class::NotReleased);
    assert_eq!(class("off", "dev"), Class::Disabled);
    assert!(
        m.features
            .iter()
            .find(|f| f.feature == "off")
            .unwrap()
            .disabled
    );
    let p = at("plain", "dev");
    assert_eq!(
        (p.class(), p.release.as_str(), p.rollout_percent),
        (Class::Static, plain.as_str(), 100.0)
    );
    let vip = m.features.iter().find(|f| f.feature == "vip").unwrap();
    assert!(vip.targeted);
    assert_eq!(class("vip", "dev"), Class::Targeted);
    // The plan: qa took its one step; uat's step waits on the soak time.
    let qa = at("planned", "qa");
    assert_eq!((qa.class(), qa.step, qa.steps), (Class::Static, 1, 1));
    assert!(qa.waiting.is_empty(), "the waiting step is uat's: {qa:?}");
    let uat = at("planned", "uat");
    // The release is RELEASING, so it governs uat too, at 0% until the step is taken.
    assert_eq!(
        (uat.class(), uat.rollout_percent, uat.step, uat.steps),
        (Class::Rollout, 0.0, 0, 1)
    );
    assert_eq!(uat.release, planned);
    assert_eq!(
        uat.waiting
            .iter()
            .map(|w| w.r#type.as_str())
            .collect::<Vec<_>>(),
        ["SOAK_TIME"]
    );
    assert_eq!(uat.waiting, waiting.waiting);

    // Every cell agrees with Evaluate (alice is on vip's allow list; u1 is in nobody's).
    for row in &m.features {
        for c in &row.cells {
            for user in ["alice", "u1"] {
                let e = release::evaluate(&mut rc, &row.feature, &c.environment, user).await;
                let reasons: &[rpb::Reason] = match c.class() {
                    Class::Disabled => &[rpb::Reason::Disabled],
                    Class::NotReleased | Class::Paused => &[rpb::Reason::NotReleased],
                    Class::NotDeployed => &[rpb::Reason::NotDeployed],
                    Class::Rollout => &[rpb::Reason::Split, rpb::Reason::TargetingMatch],
                    Class::Targeted => &[rpb::Reason::TargetingMatch, rpb::Reason::Default],
                    Class::Static => &[rpb::Reason::Static],
                    Class::Unspecified => panic!("{c:?}"),
                };
                assert!(
                    reasons.contains(&e.reason()),
                    "{} in {}: {c:?} but Evaluate said {e:?}",
                    row.feature,
                    c.environment
                );
            }
        }
    }

    // The gate's cell follows the placements: both targets placed -> STATIC.
    gated
        .report(&mut dc, &gated.targets, dpb::PlacementState::Placed)
        .await;
    let start = Instant::now();
    loop {
        let c = cell(&mut rc, "new-cart", "prod").await;
        if c.class() == Class::Static {
            assert!(c.not_deployed.is_empty(), "{c:?}");
            break;
        }
        assert_eq!(c.class(), Class::NotDeployed);
        assert!(start.elapsed() < Duration::from_secs(30), "{c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Pages of 3 features walk the rows in key order, each with every column.
    let (mut seen, mut token) = (Vec::new(), String::new());
    loop {
        let page = matrix(
            &mut rc,
            rpb::ListVisibilityRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await;
        assert!(page.features.len() <= 3);
        assert!(page.features.iter().all(|f| f.cells.len() == 4));
        seen.extend(page.features.into_iter().map(|f| f.feature));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, KEYS);

    // One column.
    let prod = matrix(
        &mut rc,
        rpb::ListVisibilityRequest {
            environment: "prod".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(prod.environments, ["prod"]);
    assert!(prod.features.iter().all(|f| f.cells.len() == 1));
    assert_eq!(prod.features.len(), KEYS.len());
}

#[tokio::test]
async fn bad_requests_name_their_field() {
    let d = InProcess::start().await;
    let r = release::InProcess::start(d.addr).await;
    let mut rc = r.client().await;
    for (req, field) in [
        (
            rpb::ListVisibilityRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            rpb::ListVisibilityRequest {
                page_token: "not a token".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            rpb::ListVisibilityRequest {
                environment: "Prod Env!".into(),
                ..Default::default()
            },
            "environment",
        ),
        (
            rpb::ListVisibilityRequest {
                feature: "no spaces allowed".into(),
                ..Default::default()
            },
            "feature",
        ),
    ] {
        let refused = rc.list_visibility(req).await;
        assert_eq!(tests::status::bad_fields(refused), [field]);
    }
    // An unknown feature is an empty page, not an error (a filter, not a lookup).
    let none = matrix(
        &mut rc,
        rpb::ListVisibilityRequest {
            feature: "nothing-here".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(none.features.is_empty());
}

/// The timeline of `name`, waiting (at most 30 s) until `ready` holds.
async fn timeline_when(
    rc: &mut release::Client,
    name: &str,
    ready: impl Fn(&rpb::ReleaseTimeline) -> bool,
) -> rpb::ReleaseTimeline {
    let start = Instant::now();
    loop {
        let t = rc
            .get_release_timeline(rpb::GetReleaseTimelineRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        if ready(&t) {
            return t;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{t:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kinds(t: &rpb::ReleaseTimeline) -> Vec<&str> {
    t.events.iter().map(|e| e.kind.as_str()).collect()
}

#[tokio::test]
async fn a_timeline_tells_the_story_of_a_release_and_its_steps_to_come() {
    let d = InProcess::start().await;
    let r = release::InProcess::start(d.addr).await;
    let (mut dc, mut rc) = (d.client().await, r.client().await);
    for env in ["qa", "uat"] {
        environment(&mut dc, env, None, false).await;
    }
    release::plain_feature(&mut rc, "planned", false).await;
    let plan = release::soaking_plan(&mut rc, "planned", "qa", "uat").await;

    // qa's step is taken, uat's waits on the soak time: the next step, due since qa's step
    // began (it has no minimum), names the rule.
    let t = timeline_when(&mut rc, &plan, |t| kinds(t).contains(&"auto.wait")).await;
    assert_eq!(
        kinds(&t),
        [
            "CreateRelease",
            "SubmitRelease",
            "auto.advance",
            "auto.wait"
        ],
        "{t:#?}"
    );
    assert_eq!(t.events[0].principal, "rita");
    assert_eq!(t.events[2].principal, "system");
    assert_eq!(t.events[3].reason, "SOAK_TIME");
    let times: Vec<_> = t.events.iter().map(|e| e.time.unwrap().seconds).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_eq!(t.upcoming.len(), 1, "{t:#?}");
    let next = &t.upcoming[0];
    assert_eq!(
        (next.environment.as_str(), next.step, next.percent),
        ("uat", 1, 100.0)
    );
    assert_eq!(
        next.waiting
            .iter()
            .map(|w| w.r#type.as_str())
            .collect::<Vec<_>>(),
        ["SOAK_TIME"]
    );
    let released = t.release.as_ref().unwrap();
    let qa = released
        .environments
        .iter()
        .find(|e| e.environment == "qa")
        .unwrap();
    // qa's one step is its start.
    let started = qa.start_time.unwrap();
    assert_eq!(next.due_time.unwrap(), started, "due when qa's step began");

    // The kill switch and its resumption, with who and why.
    rc.pause_release(release::by(
        "oncall",
        rpb::PauseReleaseRequest {
            name: plan.clone(),
            reason: "error rate".into(),
        },
    ))
    .await
    .unwrap();
    rc.resume_release(release::by(
        "oncall",
        rpb::ResumeReleaseRequest { name: plan.clone() },
    ))
    .await
    .unwrap();
    let t = timeline_when(&mut rc, &plan, |t| kinds(t).contains(&"ResumeRelease")).await;
    let pause = t.events.iter().find(|e| e.kind == "PauseRelease").unwrap();
    assert_eq!(
        (pause.principal.as_str(), pause.reason.as_str()),
        ("oncall", "error rate")
    );
    let k = kinds(&t);
    let at = |kind: &str| k.iter().position(|x| *x == kind).unwrap();
    assert!(at("auto.wait") < at("PauseRelease") && at("PauseRelease") < at("ResumeRelease"));

    // A withdrawal of a release's feature: in the gated release's timeline, not the plan's.
    let gated = Gated::setup(&mut dc, &mut rc, 2, 1.0, 100.0).await;
    gated
        .report(&mut dc, &gated.targets, dpb::PlacementState::Placed)
        .await;
    release::eventually(
        &mut rc,
        "new-cart",
        "prod",
        "u1",
        rpb::Reason::Static,
        Duration::from_secs(30),
    )
    .await;
    gated
        .report(&mut dc, &gated.targets[..1], dpb::PlacementState::Removed)
        .await;
    let t = timeline_when(&mut rc, &gated.release, |t| {
        kinds(t).contains(&"auto.withdraw")
    })
    .await;
    let w = t.events.iter().find(|e| e.kind == "auto.withdraw").unwrap();
    assert_eq!(w.environment, "prod");
    assert!(w.reason.contains("1/2"), "{w:?}");
    assert!(w.summary.contains("new-cart"), "{w:?}");
    assert!(t.upcoming.is_empty(), "no plan: {t:#?}");
    let plan_t = timeline_when(&mut rc, &plan, |_| true).await;
    assert!(!kinds(&plan_t).contains(&"auto.withdraw"));

    // Bad and unknown names.
    let bad = rc
        .get_release_timeline(rpb::GetReleaseTimelineRequest {
            name: "release/x".into(),
        })
        .await;
    assert_eq!(tests::status::bad_fields(bad), ["name"]);
    let missing = rc
        .get_release_timeline(rpb::GetReleaseTimelineRequest {
            name: "releases/999".into(),
        })
        .await;
    tests::status::expect_code(missing, tonic::Code::NotFound);
}

/// GetFeature of `key`.
async fn get_feature(rc: &mut release::Client, key: &str) -> rpb::Feature {
    rc.get_feature(rpb::GetFeatureRequest {
        name: format!("features/{key}"),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn listed(rc: &mut release::Client, show_archived: bool) -> Vec<String> {
    rc.list_features(rpb::ListFeaturesRequest {
        show_archived,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .features
    .into_iter()
    .map(|f| f.key)
    .collect()
}

fn archive(key: &str, etag: &str) -> rpb::ArchiveFeatureRequest {
    rpb::ArchiveFeatureRequest {
        name: format!("features/{key}"),
        etag: etag.into(),
    }
}

#[tokio::test]
async fn an_archived_feature_leaves_evaluation_and_lists_survives_a_restart_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = tests::test_database(dir.path(), "release").await;
    let r = tests::Binary::release_alone(&db, &[]).await;
    let mut rc = release::connect(r.addr).await;
    release::plain_feature(&mut rc, "old-flag", false).await;
    release::plain_feature(&mut rc, "kept", false).await;
    let rel = released(&mut rc, &["old-flag"], "dev", 100.0).await;

    // Refused while a release includes it, naming the release.
    let refused = rc.archive_feature(archive("old-flag", "")).await;
    assert_eq!(
        tests::status::violated_rules(refused),
        ["FEATURE_IN_RELEASE"]
    );
    assert_eq!(
        release::evaluate(&mut rc, "old-flag", "dev", "u1")
            .await
            .reason(),
        rpb::Reason::Static
    );
    rc.rollback_release(rpb::RollbackReleaseRequest {
        name: rel,
        reason: "flag removed from the code".into(),
    })
    .await
    .unwrap();

    // A stale etag is ABORTED; then archived, with its time.
    let etag = get_feature(&mut rc, "old-flag").await.etag;
    let stale = rc.archive_feature(archive("old-flag", "\"0\"")).await;
    tests::status::expect_code(stale, tonic::Code::Aborted);
    let archived = rc
        .archive_feature(archive("old-flag", &etag))
        .await
        .unwrap()
        .into_inner();
    assert!(archived.archive_time.is_some(), "{archived:?}");
    // Again: nothing changes.
    let again = rc
        .archive_feature(archive("old-flag", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.etag, archived.etag);

    let gone = |r: &mut release::Client| {
        let mut r = r.clone();
        async move {
            let e = r
                .evaluate(rpb::EvaluateRequest {
                    feature: "old-flag".into(),
                    context: Some(rpb::EvaluationContext {
                        environment: "dev".into(),
                        targeting_key: "u1".into(),
                        attributes: None,
                    }),
                })
                .await;
            tests::status::expect_code(e, tonic::Code::NotFound);
            assert_eq!(listed(&mut r, false).await, ["kept"]);
            assert_eq!(listed(&mut r, true).await, ["kept", "old-flag"]);
            let m = matrix(&mut r, rpb::ListVisibilityRequest::default()).await;
            assert!(m.features.iter().all(|f| f.feature != "old-flag"), "{m:?}");
            let update = r
                .update_feature(rpb::UpdateFeatureRequest {
                    feature: Some(rpb::Feature {
                        name: "features/old-flag".into(),
                        ..Default::default()
                    }),
                })
                .await;
            assert_eq!(tests::status::violated_rules(update), ["FEATURE_ARCHIVED"]);
            let rel = r
                .create_release(rpb::CreateReleaseRequest {
                    release: Some(rpb::Release {
                        features: vec!["old-flag".into()],
                        environments: vec![rpb::ReleaseEnvironment {
                            environment: "dev".into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await;
            assert_eq!(tests::status::violated_rules(rel), ["FEATURE_ARCHIVED"]);
        }
    };
    gone(&mut rc).await;

    // Still archived after a restart on the same database.
    r.kill().await;
    let r = tests::Binary::release_alone(&db, &[]).await;
    let mut rc = release::connect(r.addr).await;
    gone(&mut rc).await;
    assert!(get_feature(&mut rc, "old-flag")
        .await
        .archive_time
        .is_some());

    // Unarchived: back, not released anywhere.
    let back = rc
        .unarchive_feature(rpb::UnarchiveFeatureRequest {
            name: "features/old-flag".into(),
            etag: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(back.archive_time.is_none());
    assert_eq!(
        release::evaluate(&mut rc, "old-flag", "dev", "u1")
            .await
            .reason(),
        rpb::Reason::NotReleased
    );
    assert_eq!(listed(&mut rc, false).await, ["kept", "old-flag"]);

    // Bad input names its field; an unknown feature is NOT_FOUND.
    let bad = rc.archive_feature(archive("Not A Key", "")).await;
    assert_eq!(tests::status::bad_fields(bad), ["name"]);
    let bad = rc.archive_feature(archive("kept", "etag?")).await;
    assert_eq!(tests::status::bad_fields(bad), ["etag"]);
    let missing = rc.archive_feature(archive("nothing-here", "")).await;
    tests::status::expect_code(missing, tonic::Code::NotFound);
}

/// Evaluates `feature` in `env` for `n` users; the variants served, counted.
async fn evaluations(
    rc: &mut release::Client,
    feature: &str,
    env: &str,
    n: usize,
) -> std::collections::BTreeMap<String, u64> {
    let mut served = std::collections::BTreeMap::new();
    for i in 0..n {
        let d = release::evaluate(rc, feature, env, &format!("user-{i}")).await;
        *served.entry(d.variant).or_default() += 1;
    }
    served
}

/// Per environment, the (variant, last 24 h, last 7 days) counts of `feature`.
async fn usage(
    rc: &mut release::Client,
    feature: &str,
) -> std::collections::BTreeMap<String, Vec<(String, u64, u64)>> {
    let u = rc
        .get_feature_usage(rpb::GetFeatureUsageRequest {
            name: format!("features/{feature}"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.name, format!("features/{feature}"));
    if !u.environments.is_empty() {
        assert!(u.last_evaluate_time.is_some(), "{u:?}");
    }
    u.environments
        .into_iter()
        .map(|e| {
            assert!(e.last_evaluate_time.is_some(), "{e:?}");
            let counts = e
                .variants
                .into_iter()
                .map(|v| (v.variant, v.last_day, v.last_week))
                .collect();
            (e.environment, counts)
        })
        .collect()
}

/// The stale features listed for the two thresholds: (key, not evaluated, environments at
/// 100% for long enough).
async fn stale(
    rc: &mut release::Client,
    released_for: Duration,
    unevaluated_for: Duration,
) -> Vec<(String, bool, Vec<String>)> {
    let d = |d: Duration| prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap(),
        nanos: i32::try_from(d.subsec_nanos()).unwrap(),
    };
    rc.list_stale_features(rpb::ListStaleFeaturesRequest {
        released_for: Some(d(released_for)),
        unevaluated_for: Some(d(unevaluated_for)),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .features
    .into_iter()
    .map(|f| {
        (
            f.name.trim_start_matches("features/").to_owned(),
            f.not_evaluated,
            f.fully_released
                .into_iter()
                .map(|r| r.environment)
                .collect(),
        )
    })
    .collect()
}

/// The counts of `served` as usage rows (every variant served counted in both windows).
fn as_rows(served: &std::collections::BTreeMap<String, u64>) -> Vec<(String, u64, u64)> {
    served.iter().map(|(v, n)| (v.clone(), *n, *n)).collect()
}

#[tokio::test]
async fn usage_is_counted_per_environment_and_variant_survives_a_restart_and_finds_stale_flags() {
    let dir = tempfile::tempdir().unwrap();
    let db = tests::test_database(dir.path(), "release").await;
    let fast_flush = ["--usage-flush-interval-seconds", "1"];
    let r = tests::Binary::release_alone(&db, &fast_flush).await;
    let mut rc = release::connect(r.addr).await;
    for key in ["used", "unused", "done"] {
        release::plain_feature(&mut rc, key, false).await;
    }
    released(&mut rc, &["used"], "dev", 50.0).await;
    released(&mut rc, &["done"], "dev", 100.0).await;

    // Counted at once, per variant as served; an environment no release names is counted
    // under "*".
    let dev = evaluations(&mut rc, "used", "dev", 40).await;
    assert_eq!(dev.len(), 2, "a 50% rollout serves both variants: {dev:?}");
    let elsewhere = evaluations(&mut rc, "used", "made-up-env", 5).await;
    let expected = std::collections::BTreeMap::from([
        ("*".to_owned(), as_rows(&elsewhere)),
        ("dev".to_owned(), as_rows(&dev)),
    ]);
    assert_eq!(usage(&mut rc, "used").await, expected);
    assert_eq!(usage(&mut rc, "unused").await, Default::default());

    // Flushed once a second: counts neither lost nor added twice by the flushes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(usage(&mut rc, "used").await, expected);

    // Stale: "done" is at 100% in dev; "unused" and "done" were never evaluated (counted
    // from their creation, 2.5 s ago); "used" was just evaluated.
    evaluations(&mut rc, "used", "dev", 1).await;
    let hour = Duration::from_secs(3600);
    assert_eq!(
        stale(&mut rc, Duration::ZERO, Duration::from_secs(2)).await,
        [
            ("done".to_owned(), true, vec!["dev".to_owned()]),
            ("unused".to_owned(), true, vec![]),
        ]
    );
    assert_eq!(stale(&mut rc, hour, hour).await, []);

    // A graceful stop writes what is left; a restart (flushing once a minute) reads it back
    // and adds its own evaluations to it.
    let more = evaluations(&mut rc, "used", "dev", 7).await;
    r.stop().await;
    let r = tests::Binary::release_alone(&db, &[]).await;
    let mut rc = release::connect(r.addr).await;
    let later = evaluations(&mut rc, "used", "dev", 3).await;
    let mut dev_total = dev.clone();
    for (v, n) in [more, later].iter().flatten() {
        *dev_total.entry(v.clone()).or_default() += n;
    }
    *dev_total
        .entry(
            // user-0 twice more: before the stale listing, and now.
            release::evaluate(&mut rc, "used", "dev", "user-0")
                .await
                .variant,
        )
        .or_default() += 2;
    let expected = std::collections::BTreeMap::from([
        ("*".to_owned(), as_rows(&elsewhere)),
        ("dev".to_owned(), as_rows(&dev_total)),
    ]);
    assert_eq!(usage(&mut rc, "used").await, expected);
    assert_eq!(
        stale(&mut rc, Duration::ZERO, hour).await,
        [("done".to_owned(), false, vec!["dev".to_owned()])],
        "evaluated within the hour: only the release at 100% makes it stale"
    );

    // Bad requests name their field; an unknown feature is NOT_FOUND.
    let unknown = rc
        .get_feature_usage(rpb::GetFeatureUsageRequest {
            name: "features/nope".into(),
        })
        .await;
    tests::status::expect_code(unknown, tonic::Code::NotFound);
    let bad = rc
        .get_feature_usage(rpb::GetFeatureUsageRequest {
            name: "used".into(),
        })
        .await;
    assert_eq!(tests::status::bad_fields(bad), ["name"]);
    let bad = rc
        .list_stale_features(rpb::ListStaleFeaturesRequest {
            released_for: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            unevaluated_for: Some(prost_types::Duration {
                seconds: 3651 * 86_400,
                nanos: 0,
            }),
            page_size: -1,
            ..Default::default()
        })
        .await;
    assert_eq!(
        tests::status::bad_fields(bad),
        ["page_size", "released_for", "unevaluated_for"]
    );
}

/// With more environments than a page holds, the matrix comes in column chunks: the same
/// features with the next 200 columns, then the next features. (Policies for 250 made-up
/// environment names once made a one-row page of every column, past the message limit,
/// for everyone.)
#[tokio::test]
async fn many_environments_come_in_column_chunks_of_bounded_pages() {
    let dir = tempfile::tempdir().unwrap();
    let db = tests::test_database(dir.path(), "release").await;
    let r = tests::Binary::release_alone(&db, &[]).await;
    let mut rc = release::connect(r.addr).await;
    // 60 features: more than a page of 200 columns holds (10,000 / 200 = 50 rows).
    let keys: Vec<String> = (0..60).map(|i| format!("f-{i:02}")).collect();
    for key in &keys {
        release::plain_feature(&mut rc, key, false).await;
    }
    let names: Vec<String> = (0..250).map(|i| format!("env-{i:03}")).collect();
    for env in &names {
        rc.set_policy(rpb::SetPolicyRequest {
            policy: Some(rpb::Policy {
                environment: env.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    }
    let mut columns = std::collections::BTreeSet::new();
    let mut cells: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut pages = 0;
    let mut page_token = String::new();
    loop {
        let m = matrix(
            &mut rc,
            rpb::ListVisibilityRequest {
                page_token: page_token.clone(),
                // More than a page of 200 columns holds: the cell cap decides.
                page_size: 100,
                ..Default::default()
            },
        )
        .await;
        pages += 1;
        assert!(m.environments.len() <= 200, "{}", m.environments.len());
        assert!(
            m.features.len() * m.environments.len() <= 10_000,
            "{} x {}",
            m.features.len(),
            m.environments.len()
        );
        for f in &m.features {
            assert_eq!(f.cells.len(), m.environments.len(), "{}", f.feature);
            for (cell, env) in f.cells.iter().zip(&m.environments) {
                assert_eq!(&cell.environment, env);
            }
            cells
                .entry(f.feature.clone())
                .or_default()
                .extend(f.cells.iter().map(|c| c.environment.clone()));
        }
        columns.extend(m.environments);
        page_token = m.next_page_token;
        if page_token.is_empty() {
            break;
        }
        assert!(pages < 20, "paging does not end");
    }
    assert_eq!(columns.into_iter().collect::<Vec<_>>(), names);
    // Every feature got every column exactly once, in order, across the chunks.
    assert_eq!(cells.keys().cloned().collect::<Vec<_>>(), keys);
    for (feature, envs) in &cells {
        assert_eq!(envs, &names, "{feature}");
    }
    // Two chunks of columns for each of two pages of features.
    assert_eq!(pages, 4);
}
