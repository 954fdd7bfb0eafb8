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
