//! Both services on port 0 over real gRPC: visibility is released by release-svc and gated
//! on the placements release-svc learns from deploy-svc's stream.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use proto::deploy::v1::PlacementState as P;
use proto::release::v1 as rpb;
use rpb::Reason as R;
use tests::release::{self, evaluate, eventually};
use tests::{artifact, deploy, environment, report, targets, Gated, InProcess};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn visible_in_staging_only_while_prod_lacks_the_artifact() {
    let d = InProcess::start().await;
    let r = release::InProcess::start(d.addr).await;
    let (mut dc, mut rc) = (d.client().await, r.client().await);
    environment(&mut dc, "staging", None, false).await;
    environment(&mut dc, "prod", Some("staging"), false).await;
    let st = targets(&mut dc, "staging", "s", 2).await;
    targets(&mut dc, "prod", "p", 2).await;
    artifact(&mut dc, "checkout", "2.0.0").await;
    release::feature(&mut rc, "new-cart", "checkout", "2.0.0", 1.0).await;
    let rel = release::release(&mut rc, &["new-cart"], &["staging", "prod"]).await;

    // Released nowhere yet.
    assert_eq!(
        evaluate(&mut rc, "new-cart", "staging", "u1")
            .await
            .reason(),
        R::NotReleased
    );
    let started = release::rollout(&mut rc, &rel, "staging", 100.0).await;
    assert_eq!(started.state(), rpb::ReleaseState::Releasing);
    release::rollout(&mut rc, &rel, "prod", 100.0).await;
    // Released, but not deployed anywhere.
    assert_eq!(
        evaluate(&mut rc, "new-cart", "staging", "u1")
            .await
            .reason(),
        R::NotDeployed
    );

    let dep = deploy(&mut dc, "checkout", "2.0.0", "staging", "")
        .await
        .unwrap();
    for t in &st {
        report(&mut dc, &dep.name, t, P::Placed).await.unwrap();
    }
    let s = eventually(&mut rc, "new-cart", "staging", "u1", R::Static, WAIT).await;
    assert!(s.visible, "{s:?}");
    assert_eq!(s.release, rel);
    let p = evaluate(&mut rc, "new-cart", "prod", "u1").await;
    assert!(!p.visible, "{p:?}");
    assert_eq!(p.reason(), R::NotDeployed, "{p:?}");
    // Unknown features are NOT_FOUND.
    let unknown = rc
        .evaluate(rpb::EvaluateRequest {
            feature: "nope".into(),
            context: Some(rpb::EvaluationContext {
                environment: "prod".into(),
                ..Default::default()
            }),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);
    r.shutdown().await.unwrap();
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn canary_on_1_of_4_does_not_open_a_full_coverage_feature_until_the_4th_is_placed() {
    let d = InProcess::start().await;
    let r = release::InProcess::start(d.addr).await;
    let (mut dc, mut rc) = (d.client().await, r.client().await);
    let g = Gated::setup(&mut dc, &mut rc, 4, 1.0, 100.0).await;
    g.report(&mut dc, &g.targets[..3], P::Placed).await;
    // Wait until release-svc has applied the three placements, then check it stays closed.
    let mut status = rc.clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = status
            .get_consumer_status(rpb::GetConsumerStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.cursor >= 7 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumer stuck: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let closed = evaluate(&mut rc, "new-cart", "prod", "u1").await;
    assert!(!closed.visible);
    assert_eq!(closed.reason(), R::NotDeployed);
    g.report(&mut dc, &g.targets[3..], P::Placed).await;
    let open = eventually(&mut rc, "new-cart", "prod", "u1", R::Static, WAIT).await;
    assert!(open.visible, "{open:?}");
    r.shutdown().await.unwrap();
    d.shutdown().await.unwrap();
}

/// Both services, the gate fixture on 2 targets, both placed: `new-cart` is visible.
struct Opened {
    d: InProcess,
    r: release::InProcess,
    dc: tests::Client,
    rc: release::Client,
    g: Gated,
}

impl Opened {
    async fn setup() -> Self {
        let d = InProcess::start().await;
        let r = release::InProcess::start(d.addr).await;
        let (mut dc, mut rc) = (d.client().await, r.client().await);
        let g = Gated::setup(&mut dc, &mut rc, 2, 1.0, 100.0).await;
        g.report(&mut dc, &g.targets, P::Placed).await;
        let open = eventually(&mut rc, "new-cart", "prod", "u1", R::Static, WAIT).await;
        assert!(open.visible, "{open:?}");
        Self { d, r, dc, rc, g }
    }
}

#[tokio::test]
async fn a_removed_placement_withdraws_visibility_and_is_recorded() {
    let Opened {
        d,
        r,
        mut dc,
        mut rc,
        g,
    } = Opened::setup().await;

    let mut watch = rc
        .watch_visibility(rpb::WatchVisibilityRequest {
            environment: "prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert!(
        first.all_features,
        "a new stream starts with a full invalidation"
    );

    g.report(&mut dc, &g.targets[1..], P::Removed).await;
    let closed = eventually(&mut rc, "new-cart", "prod", "u1", R::NotDeployed, WAIT).await;
    assert_eq!(closed.reason(), R::NotDeployed, "{closed:?}");

    // Announced on WatchVisibility, and recorded durably.
    let change = tokio::time::timeout(WAIT, async {
        loop {
            let c = watch.next().await.unwrap().unwrap();
            if c.features.contains(&"new-cart".to_owned()) {
                return c;
            }
        }
    })
    .await
    .unwrap();
    assert!(change.cause.contains("withdrawn"), "{change:?}");
    release::assert_withdrawn_once(&mut rc, "new-cart", "prod", "1/2").await;
    r.shutdown().await.unwrap();
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn kill_switch_pause_and_rollback_hide_at_once() {
    let d = InProcess::start().await;
    let r = release::InProcess::start(d.addr).await;
    let mut rc = r.client().await;
    release::plain_feature(&mut rc, "banner", false).await;
    let rel = release::release(&mut rc, &["banner"], &["prod"]).await;
    release::rollout(&mut rc, &rel, "prod", 10.0).await;
    let users: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
    let mut at_10 = Vec::new();
    for u in &users {
        let e = evaluate(&mut rc, "banner", "prod", u).await;
        assert_eq!(e.reason(), R::Split);
        if e.visible {
            at_10.push(u.clone());
        }
    }
    assert!(
        (140..=260).contains(&at_10.len()),
        "10% of 2000 gave {}",
        at_10.len()
    );
    let released = release::rollout(&mut rc, &rel, "prod", 100.0).await;
    assert_eq!(released.state(), rpb::ReleaseState::Released);
    for u in &at_10 {
        assert!(
            evaluate(&mut rc, "banner", "prod", u).await.visible,
            "{u} left at 100%"
        );
    }
    // Pause: the very next evaluation is hidden.
    let paused = rc
        .pause_release(rpb::PauseReleaseRequest {
            name: rel.clone(),
            reason: "incident".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.state(), rpb::ReleaseState::Paused);
    let e = evaluate(&mut rc, "banner", "prod", &at_10[0]).await;
    assert!(!e.visible);
    assert_eq!(e.reason(), R::NotReleased);
    rc.resume_release(rpb::ResumeReleaseRequest { name: rel.clone() })
        .await
        .unwrap();
    assert!(evaluate(&mut rc, "banner", "prod", &at_10[0]).await.visible);
    rc.rollback_release(rpb::RollbackReleaseRequest {
        name: rel.clone(),
        reason: "bad".into(),
    })
    .await
    .unwrap();
    let rolled_back = evaluate(&mut rc, "banner", "prod", &at_10[0]).await;
    assert!(!rolled_back.visible, "{rolled_back:?}");
    assert_eq!(rolled_back.reason(), R::NotReleased, "{rolled_back:?}");
    let refused = rc
        .set_rollout(rpb::SetRolloutRequest {
            name: rel,
            environment: "prod".into(),
            rollout_percent: 50.0,
        })
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::FailedPrecondition);
    r.shutdown().await.unwrap();
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_release_input_names_the_field() {
    let d = InProcess::start().await;
    let r = release::InProcess::start(d.addr).await;
    let mut rc = r.client().await;
    let bad_feature = rc
        .create_feature(rpb::CreateFeatureRequest {
            feature: Some(rpb::Feature {
                key: "has space".into(),
                targeting: r#"{"regex": [1]}"#.into(),
                carriers: vec![rpb::Carrier {
                    artifact: "web".into(),
                    min_version: "two".into(),
                    required_coverage: 1.5,
                }],
                default_variant: "maybe".into(),
                ..Default::default()
            }),
        })
        .await;
    assert_eq!(
        tests::status::bad_fields(bad_feature),
        [
            "feature.key",
            "feature.default_variant",
            "feature.targeting",
            "feature.carriers[0].min_version",
            "feature.carriers[0].required_coverage"
        ]
    );
    let bad_release = rc
        .create_release(rpb::CreateReleaseRequest {
            release: Some(rpb::Release {
                features: vec![],
                environments: vec![rpb::ReleaseEnvironment {
                    environment: "environments/prod".into(),
                    rollout_percent: 120.0,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await;
    assert_eq!(
        tests::status::bad_fields(bad_release),
        [
            "release.features",
            "release.environments[0].environment",
            "release.environments[0].rollout_percent"
        ]
    );
    let missing = rc
        .create_release(rpb::CreateReleaseRequest {
            release: Some(rpb::Release {
                features: vec!["ghost".into()],
                environments: vec![rpb::ReleaseEnvironment {
                    environment: "prod".into(),
                    rollout_percent: 0.0,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await;
    assert_eq!(tests::status::violated_rules(missing), ["FEATURE_EXISTS"]);
    let no_env = rc
        .evaluate(rpb::EvaluateRequest {
            feature: "x".into(),
            context: None,
        })
        .await;
    assert_eq!(tests::status::bad_fields(no_env), ["context.environment"]);
    r.shutdown().await.unwrap();
    d.shutdown().await.unwrap();
}

/// A placement that turns FAILED on a target that carried the feature withdraws it
/// automatically, and the withdrawal is recorded with its cause.
#[tokio::test]
async fn a_failed_placement_withdraws_visibility_and_is_recorded() {
    let Opened {
        d,
        r,
        mut dc,
        mut rc,
        g,
    } = Opened::setup().await;
    assert!(rc
        .list_withdrawals(rpb::ListWithdrawalsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .withdrawals
        .is_empty());

    g.report(&mut dc, &g.targets[1..], P::Failed).await;
    let closed = eventually(&mut rc, "new-cart", "prod", "u1", R::NotDeployed, WAIT).await;
    assert!(!closed.visible, "{closed:?}");
    release::assert_withdrawn_once(&mut rc, "new-cart", "prod", "1/2").await;
    r.shutdown().await.unwrap();
    d.shutdown().await.unwrap();
}

/// CreateRelease retried with the same request id, over gRPC on a SQLite file, returns the
/// release the first call created: in the same process, and after a restart of the real
/// binary on the same file. Another request id creates another release.
#[tokio::test]
async fn create_release_retries_with_a_request_id_return_the_first_release() {
    let d = InProcess::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("release.db");
    let args = |db: &std::path::Path| {
        vec![
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--database".to_owned(),
            db.to_string_lossy().into_owned(),
            "--deploy-svc".to_owned(),
            format!("http://{}", d.addr),
        ]
    };
    let start = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tests::Binary::spawn("release-svc", &args).await
    };
    let create = |mut rc: release::Client, request_id: &'static str| async move {
        release::create_with_id(&mut rc, "banner", request_id)
            .await
            .unwrap()
    };
    let bin = start(args(&db)).await;
    let mut rc = release::connect(bin.addr).await;
    release::plain_feature(&mut rc, "banner", false).await;
    let first = create(rc.clone(), "deploy-42-attempt").await;
    let retry = create(rc.clone(), "deploy-42-attempt").await;
    assert_eq!(retry, first, "a retry returns the first release as created");
    bin.kill().await;

    let bin = start(args(&db)).await;
    let rc = release::connect(bin.addr).await;
    let after_restart = create(rc.clone(), "deploy-42-attempt").await;
    assert_eq!(after_restart.name, first.name, "the key survives a restart");
    let other = create(rc.clone(), "deploy-43").await;
    assert_ne!(other.name, first.name);
    let mut lc = rc.clone();
    let releases = lc
        .list_releases(rpb::ListReleasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .releases;
    assert_eq!(releases.len(), 2, "{releases:?}");
    let created = lc
        .list_audit_records(rpb::ListAuditRecordsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records
        .into_iter()
        .filter(|a| a.action == "CreateRelease")
        .count();
    assert_eq!(created, 2, "one audit record per release created");
    bin.kill().await;
    d.shutdown().await.unwrap();
}
