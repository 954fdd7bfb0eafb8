//! deploy.v1 over real gRPC on a server bound to port 0: the promotion path, refusals,
//! idempotency, immutability, optimistic concurrency and bad input.

#![allow(clippy::unwrap_used)]

use proto::deploy::v1 as pb;
use tests::status::{bad_fields, expect_code, violated_rules};
use tests::{artifact, deploy, digest, environment, report, targets, InProcess};
use tonic::Code;

use pb::{DeploymentState as D, PlacementState as P};

#[tokio::test]
async fn deploy_through_a_promotion_path_with_refusals() {
    let server = InProcess::start().await;
    let mut c = server.client().await;
    environment(&mut c, "dev", None, false).await;
    environment(&mut c, "staging", Some("dev"), false).await;
    let prod = environment(&mut c, "prod", Some("staging"), true).await;
    assert_eq!(
        prod.promotion_path,
        [
            "environments/dev",
            "environments/staging",
            "environments/prod"
        ]
    );
    let dev_targets = targets(&mut c, "dev", "dev", 2).await;
    let staging_targets = targets(&mut c, "staging", "stg", 2).await;
    let prod_targets = targets(&mut c, "prod", "web", 3).await;
    artifact(&mut c, "checkout", "1.0.0").await;

    // Straight to prod: both the promotion rule and the change reference are violated,
    // and both are listed.
    let rules = violated_rules(deploy(&mut c, "checkout", "1.0.0", "prod", "").await);
    assert_eq!(rules, ["PROMOTION_ORDER", "CHANGE_REFERENCE_REQUIRED"]);
    // Staging before dev succeeded.
    let rules = violated_rules(deploy(&mut c, "checkout", "1.0.0", "staging", "").await);
    assert_eq!(rules, ["PROMOTION_ORDER"]);

    // dev: PENDING -> IN_PROGRESS -> SUCCEEDED as the targets report.
    let d = deploy(&mut c, "checkout", "1.0.0", "dev", "")
        .await
        .unwrap();
    assert_eq!(d.state(), D::Pending);
    assert_eq!(d.placements.len(), 2);
    let r = report(&mut c, &d.name, &dev_targets[0], P::Placing)
        .await
        .unwrap();
    assert_eq!(r.deployment_state(), D::InProgress);
    let r = report(&mut c, &d.name, &dev_targets[0], P::Placed)
        .await
        .unwrap();
    assert_eq!(r.deployment_state(), D::InProgress);
    // Still not promotable while dev is in progress.
    let rules = violated_rules(deploy(&mut c, "checkout", "1.0.0", "staging", "").await);
    assert_eq!(rules, ["PROMOTION_ORDER"]);
    let r = report(&mut c, &d.name, &dev_targets[1], P::Placed)
        .await
        .unwrap();
    assert_eq!(r.deployment_state(), D::Succeeded);
    assert!(r.changed);
    // Repeating a report changes nothing and writes no event.
    let again = report(&mut c, &d.name, &dev_targets[1], P::Placed)
        .await
        .unwrap();
    assert!(!again.changed);
    assert_eq!(again.sequence, r.sequence);

    // staging now allowed; a failure there fails the deployment.
    let s = deploy(&mut c, "checkout", "1.0.0", "staging", "")
        .await
        .unwrap();
    report(&mut c, &s.name, &staging_targets[0], P::Placed)
        .await
        .unwrap();
    let r = report(&mut c, &s.name, &staging_targets[1], P::Failed)
        .await
        .unwrap();
    assert_eq!(r.deployment_state(), D::Failed);
    let rules = violated_rules(deploy(&mut c, "checkout", "1.0.0", "prod", "CHG-1").await);
    assert_eq!(rules, ["PROMOTION_ORDER"]);
    // A finished deployment refuses new placing.
    let rules = violated_rules(report(&mut c, &s.name, &staging_targets[1], P::Placing).await);
    assert_eq!(rules, ["PLACEMENT_TRANSITION"]);

    // A second staging deployment succeeds; prod still needs the change reference.
    let s2 = deploy(&mut c, "checkout", "1.0.0", "staging", "")
        .await
        .unwrap();
    for t in &staging_targets {
        report(&mut c, &s2.name, t, P::Placed).await.unwrap();
    }
    let rules = violated_rules(deploy(&mut c, "checkout", "1.0.0", "prod", "").await);
    assert_eq!(rules, ["CHANGE_REFERENCE_REQUIRED"]);
    let p = deploy(&mut c, "checkout", "1.0.0", "prod", "CHG-42")
        .await
        .unwrap();
    assert_eq!(p.change_reference, "CHG-42");
    for t in &prod_targets {
        report(&mut c, &p.name, t, P::Placed).await.unwrap();
    }
    let p = c
        .get_deployment(pb::GetDeploymentRequest {
            name: p.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.state(), D::Succeeded);
    assert!(p.placements.iter().all(|pl| pl.state() == P::Placed));

    // A target of another environment cannot report on this deployment.
    let rules = violated_rules(report(&mut c, &p.name, &dev_targets[0], P::Placed).await);
    assert_eq!(rules, ["TARGET_NOT_IN_ENVIRONMENT"]);

    // Lists and filters.
    let list = c
        .list_deployments(pb::ListDeploymentsRequest {
            environment: "environments/staging".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.deployments.len(), 2);
    assert_eq!(list.deployments[0].name, s2.name, "newest first");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn create_deployment_is_idempotent_per_request_id() {
    let server = InProcess::start().await;
    let mut c = server.client().await;
    environment(&mut c, "dev", None, false).await;
    targets(&mut c, "dev", "t", 1).await;
    artifact(&mut c, "api", "2.0.0").await;
    let request = pb::CreateDeploymentRequest {
        deployment: Some(pb::Deployment {
            artifact_version: "artifacts/api/versions/2.0.0".into(),
            environment: "environments/dev".into(),
            ..Default::default()
        }),
        request_id: "8d1f6f3e-retry-1".into(),
    };
    let first = c
        .create_deployment(request.clone())
        .await
        .unwrap()
        .into_inner();
    let second = c
        .create_deployment(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.name, second.name);
    assert_eq!(first.create_time, second.create_time);
    let all = c
        .list_deployments(pb::ListDeploymentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        all.deployments.len(),
        1,
        "a retry must not create a second deployment"
    );

    // The same request id for a different request is refused, naming the field.
    let mut other = request;
    other.deployment.as_mut().unwrap().change_reference = "CHG-9".into();
    assert_eq!(bad_fields(c.create_deployment(other).await), ["request_id"]);

    // Environments too.
    let env_req = pb::CreateEnvironmentRequest {
        environment_id: "qa".into(),
        environment: None,
        request_id: "env-req-1".into(),
    };
    let a = c
        .create_environment(env_req.clone())
        .await
        .unwrap()
        .into_inner();
    let b = c.create_environment(env_req).await.unwrap().into_inner();
    assert_eq!(a, b);
    // Without the request id, a second create is ALREADY_EXISTS.
    expect_code(
        c.create_environment(pb::CreateEnvironmentRequest {
            environment_id: "qa".into(),
            ..Default::default()
        })
        .await,
        Code::AlreadyExists,
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn artifact_versions_are_immutable() {
    let server = InProcess::start().await;
    let mut c = server.client().await;
    let a = artifact(&mut c, "web", "1.2.3").await;
    assert_eq!(a.name, "artifacts/web/versions/1.2.3");
    // Same digest again: idempotent, same stored record.
    let again = artifact(&mut c, "web", "1.2.3").await;
    assert_eq!(a, again);
    // Another digest for the same version: refused, and the stored digest is unchanged.
    let refused = c
        .register_artifact(pb::RegisterArtifactRequest {
            artifact: "web".into(),
            version: "1.2.3".into(),
            digest: digest("something else"),
            metadata: Default::default(),
            source_uri: String::new(),
        })
        .await;
    expect_code(refused, Code::AlreadyExists);
    let stored = c
        .get_artifact(pb::GetArtifactRequest {
            name: "artifacts/web/versions/1.2.3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.digest, a.digest);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn environment_updates_use_etags_and_keep_the_path_acyclic() {
    let server = InProcess::start().await;
    let mut c = server.client().await;
    environment(&mut c, "dev", None, false).await;
    let staging = environment(&mut c, "staging", Some("dev"), false).await;
    let mask = |paths: &[&str]| Some(prost_types_mask(paths));
    let updated = c
        .update_environment(pb::UpdateEnvironmentRequest {
            environment: Some(pb::Environment {
                name: "environments/staging".into(),
                protected: true,
                etag: staging.etag.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["protected"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.protected);
    assert_ne!(updated.etag, staging.etag);
    assert_eq!(
        updated.upstream, "environments/dev",
        "fields outside the mask are kept"
    );
    // The old etag is stale now.
    expect_code(
        c.update_environment(pb::UpdateEnvironmentRequest {
            environment: Some(pb::Environment {
                name: "environments/staging".into(),
                description: "late".into(),
                etag: staging.etag,
                ..Default::default()
            }),
            update_mask: mask(&["description"]),
        })
        .await,
        Code::Aborted,
    );
    // dev <- staging; making staging the upstream of dev would be a cycle.
    let rules = violated_rules(
        c.update_environment(pb::UpdateEnvironmentRequest {
            environment: Some(pb::Environment {
                name: "environments/dev".into(),
                upstream: "environments/staging".into(),
                ..Default::default()
            }),
            update_mask: mask(&["upstream"]),
        })
        .await,
    );
    assert_eq!(rules, ["PROMOTION_PATH_CYCLE"]);
    server.shutdown().await.unwrap();
}

fn prost_types_mask(paths: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    }
}

#[tokio::test]
async fn lists_paginate() {
    let server = InProcess::start().await;
    let mut c = server.client().await;
    for i in 0..7 {
        environment(&mut c, &format!("env-{i}"), None, false).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_environments(pb::ListEnvironmentsRequest {
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.environments.len() <= 3);
        seen.extend(page.environments.into_iter().map(|e| e.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let want: Vec<_> = (0..7).map(|i| format!("environments/env-{i}")).collect();
    assert_eq!(seen, want);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn cancel_and_heartbeat() {
    let server = InProcess::start().await;
    let mut c = server.client().await;
    environment(&mut c, "dev", None, false).await;
    let t = targets(&mut c, "dev", "t", 1).await;
    artifact(&mut c, "api", "1.0.0").await;
    let d = deploy(&mut c, "api", "1.0.0", "dev", "").await.unwrap();
    let cancelled = c
        .cancel_deployment(pb::CancelDeploymentRequest {
            name: d.name.clone(),
            reason: "wrong build".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), D::Cancelled);
    let rules = violated_rules(
        c.cancel_deployment(pb::CancelDeploymentRequest {
            name: d.name.clone(),
            reason: String::new(),
        })
        .await,
    );
    assert_eq!(rules, ["DEPLOYMENT_FINISHED"]);
    let hb = c
        .heartbeat_target(pb::HeartbeatTargetRequest { name: t[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.health(), pb::TargetHealth::Healthy);
    expect_code(
        c.heartbeat_target(pb::HeartbeatTargetRequest {
            name: "environments/dev/targets/ghost".into(),
        })
        .await,
        Code::NotFound,
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn target_health_follows_heartbeat_age() {
    // A 1 ms healthy window and a 2 ms lost window make a target lost almost at once.
    let server = InProcess::start_with(|c| {
        c.healthy_window_ms = 1;
        c.lost_window_ms = 2;
    })
    .await;
    let mut c = server.client().await;
    environment(&mut c, "dev", None, false).await;
    targets(&mut c, "dev", "t", 1).await;
    // Lost once 2 ms have passed since registration: polled, with a generous deadline.
    let start = std::time::Instant::now();
    loop {
        let list = c
            .list_targets(pb::ListTargetsRequest {
                parent: "environments/dev".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let health = list.targets[0].health();
        if health == pb::TargetHealth::Lost {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "still {health:?} 10 s after registration, with a 2 ms lost window"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_names_the_field_and_writes_nothing() {
    let server = InProcess::start().await;
    let mut c = server.client().await;
    environment(&mut c, "dev", None, false).await;
    let t = targets(&mut c, "dev", "t", 1).await;
    artifact(&mut c, "api", "1.0.0").await;
    let d = deploy(&mut c, "api", "1.0.0", "dev", "").await.unwrap();

    let env = |id: &str, upstream: &str, request_id: &str| pb::CreateEnvironmentRequest {
        environment_id: id.into(),
        environment: Some(pb::Environment {
            upstream: upstream.into(),
            ..Default::default()
        }),
        request_id: request_id.into(),
    };
    assert_eq!(
        bad_fields(c.create_environment(env("", "", "")).await),
        ["environment_id"]
    );
    assert_eq!(
        bad_fields(c.create_environment(env("Prod", "", "")).await),
        ["environment_id"]
    );
    assert_eq!(
        bad_fields(c.create_environment(env(&"a".repeat(64), "", "")).await),
        ["environment_id"]
    );
    assert_eq!(
        bad_fields(c.create_environment(env("x", "dev", "")).await),
        ["environment.upstream"]
    );
    assert_eq!(
        bad_fields(c.create_environment(env("x", "environments/x", "")).await),
        ["environment.upstream"]
    );
    assert_eq!(
        bad_fields(c.create_environment(env("x", "", "has space")).await),
        ["request_id"]
    );
    // Every bad field is reported at once.
    assert_eq!(
        bad_fields(c.create_environment(env("X", "nope", "a b")).await),
        ["environment_id", "environment.upstream", "request_id"]
    );
    let long_description = pb::CreateEnvironmentRequest {
        environment_id: "x".into(),
        environment: Some(pb::Environment {
            description: "d".repeat(2000),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    assert_eq!(
        bad_fields(c.create_environment(long_description).await),
        ["environment.description"]
    );

    let art = |name: &str, version: &str, digest: &str| pb::RegisterArtifactRequest {
        artifact: name.into(),
        version: version.into(),
        digest: digest.into(),
        metadata: Default::default(),
        source_uri: String::new(),
    };
    let good = digest("x");
    assert_eq!(
        bad_fields(c.register_artifact(art("api", "1.0.1", "md5:abc")).await),
        ["digest"]
    );
    assert_eq!(
        bad_fields(
            c.register_artifact(art("api", "1.0.1", &good.to_uppercase()))
                .await
        ),
        ["digest"]
    );
    assert_eq!(
        bad_fields(c.register_artifact(art("api", "1.0.1", &good[..70])).await),
        ["digest"]
    );
    assert_eq!(
        bad_fields(c.register_artifact(art("api", "", &good)).await),
        ["version"]
    );
    assert_eq!(
        bad_fields(c.register_artifact(art("api", "1 0", &good)).await),
        ["version"]
    );
    assert_eq!(
        bad_fields(c.register_artifact(art("API", "1.0.1", &good)).await),
        ["artifact"]
    );
    let mut too_many = art("api", "1.0.1", &good);
    too_many.metadata = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    assert_eq!(
        bad_fields(c.register_artifact(too_many).await),
        ["metadata"]
    );

    let target = |parent: &str, id: &str| pb::RegisterTargetRequest {
        parent: parent.into(),
        target_id: id.into(),
        labels: Default::default(),
    };
    assert_eq!(
        bad_fields(c.register_target(target("dev", "t-9")).await),
        ["parent"]
    );
    assert_eq!(
        bad_fields(c.register_target(target("environments/dev", "T_9")).await),
        ["target_id"]
    );
    let mut bad_label = target("environments/dev", "t-9");
    bad_label.labels.insert("bad key".into(), "v".into());
    assert_eq!(bad_fields(c.register_target(bad_label).await), ["labels"]);

    let dep = |version: &str, env: &str, change: &str| pb::CreateDeploymentRequest {
        deployment: Some(pb::Deployment {
            artifact_version: version.into(),
            environment: env.into(),
            change_reference: change.into(),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    assert_eq!(
        bad_fields(
            c.create_deployment(dep("api@1.0.0", "environments/dev", ""))
                .await
        ),
        ["deployment.artifact_version"]
    );
    assert_eq!(
        bad_fields(
            c.create_deployment(dep("artifacts/api/versions/1.0.0", "dev", ""))
                .await
        ),
        ["deployment.environment"]
    );
    assert_eq!(
        bad_fields(
            c.create_deployment(dep(
                "artifacts/api/versions/1.0.0",
                "environments/dev",
                &"c".repeat(200)
            ))
            .await
        ),
        ["deployment.change_reference"]
    );
    assert_eq!(
        bad_fields(
            c.create_deployment(pb::CreateDeploymentRequest::default())
                .await
        ),
        ["deployment.artifact_version", "deployment.environment"]
    );

    let rep = |deployment: &str, target: &str, state: i32| pb::ReportPlacementRequest {
        deployment: deployment.into(),
        target: target.into(),
        state,
        message: String::new(),
    };
    assert_eq!(
        bad_fields(c.report_placement(rep(&d.name, &t[0], 0)).await),
        ["state"]
    );
    assert_eq!(
        bad_fields(
            c.report_placement(rep(&d.name, &t[0], P::Pending.into()))
                .await
        ),
        ["state"]
    );
    assert_eq!(
        bad_fields(c.report_placement(rep(&d.name, &t[0], 99)).await),
        ["state"]
    );
    assert_eq!(
        bad_fields(
            c.report_placement(rep("deployments/abc", &t[0], P::Placed.into()))
                .await
        ),
        ["deployment"]
    );
    assert_eq!(
        bad_fields(
            c.report_placement(rep(&d.name, "t-1", P::Placed.into()))
                .await
        ),
        ["target"]
    );

    assert_eq!(
        bad_fields(
            c.list_environments(pb::ListEnvironmentsRequest {
                page_size: -1,
                page_token: String::new()
            })
            .await
        ),
        ["page_size"]
    );
    assert_eq!(
        bad_fields(
            c.list_environments(pb::ListEnvironmentsRequest {
                page_size: 0,
                page_token: "not-a-token".into()
            })
            .await
        ),
        ["page_token"]
    );
    assert_eq!(
        bad_fields(
            c.get_environment(pb::GetEnvironmentRequest { name: "dev".into() })
                .await
        ),
        ["name"]
    );
    assert_eq!(
        bad_fields(
            c.get_deployment(pb::GetDeploymentRequest {
                name: "deployments/-1".into()
            })
            .await
        ),
        ["name"]
    );
    assert_eq!(
        bad_fields(
            c.update_environment(pb::UpdateEnvironmentRequest {
                environment: Some(pb::Environment {
                    name: "environments/dev".into(),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await
        ),
        ["update_mask"]
    );

    // Nothing was written by any refused call.
    let envs = c
        .list_environments(pb::ListEnvironmentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(envs.environments.len(), 1);
    let arts = c
        .list_artifacts(pb::ListArtifactsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(arts.artifacts.len(), 1);
    let tl = c
        .list_targets(pb::ListTargetsRequest {
            parent: "environments/dev".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tl.targets.len(), 1);
    let deps = c
        .list_deployments(pb::ListDeploymentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deps.deployments.len(), 1);
    let got = c
        .get_deployment(pb::GetDeploymentRequest {
            name: d.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), D::Pending);

    // Missing resources are NOT_FOUND.
    expect_code(
        deploy(&mut c, "api", "9.9.9", "dev", "").await,
        Code::NotFound,
    );
    expect_code(
        deploy(&mut c, "api", "1.0.0", "nowhere", "").await,
        Code::NotFound,
    );
    expect_code(
        report(&mut c, "deployments/999", &t[0], P::Placed).await,
        Code::NotFound,
    );
    server.shutdown().await.unwrap();
}
