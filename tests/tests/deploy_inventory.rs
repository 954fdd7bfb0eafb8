//! ListInventory and the per-target versions of ListTargets over real gRPC on a real
//! socket, on a fixture built by real deployments and placement reports: two environments
//! with targets (one with a freeze window active and a weekly one to come), an empty third
//! one, completed deployments, a canary waiting at its first step, a rolling deployment
//! at its third batch, an all-at-once one half placed. The server runs in-process through
//! the library with a clock the test sets, so freeze state and target health are exact.
//! On SQLite, or on PostgreSQL with `TEST_BACKEND=postgres`.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use deploy_svc::domain::clock::{ManualClock, Millis};
use prost_types::Timestamp;
use proto::deploy::v1 as pb;
use tests::status::{bad_fields, expect_code};
use tests::{artifact, environment, targets, Client};
use tokio::sync::oneshot;
use tonic::Code;

use pb::{PlacementState as P, StrategyPhase as Phase, TargetHealth as H};

/// Wednesday 2026-03-04 12:00:00 UTC.
const T0: Millis = 1_772_625_600_000;
const SECOND: Millis = 1_000;
const HOUR: Millis = 3_600_000;
/// Friday 2026-03-06 18:00 UTC and Monday 2026-03-09 08:00 UTC.
const WEEKEND_START: Millis = T0 + 2 * 24 * HOUR + 6 * HOUR;
const WEEKEND_END: Millis = T0 + 4 * 24 * HOUR + 20 * HOUR;

struct Running {
    addr: SocketAddr,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Binds 127.0.0.1:0, then serves deploy-svc on it with the test clock at T0. Agents
    /// are never taken for lost (the clock jumps hours).
    async fn start(tweak: impl FnOnce(&mut deploy_svc::Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = tests::deploy_database(dir.path()).await;
        let mut config = deploy_svc::Config::for_database(&database);
        config.agent_timeout_ms = 30 * 24 * 3_600_000;
        tweak(&mut config);
        let clock = Arc::new(ManualClock::new(T0));
        let server = deploy_svc::Server::open(config, clock.clone()).unwrap();
        tests::assert_backend(&database).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            clock,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn set_now(&self, ms: Millis) {
        self.clock.set(ms);
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

fn ts(ms: Millis) -> Option<Timestamp> {
    deploy_svc::grpc::convert::timestamp(ms)
}

fn absolute(name: &str, start: Millis, end: Millis) -> pb::FreezeWindow {
    pb::FreezeWindow {
        name: name.into(),
        schedule: Some(pb::freeze_window::Schedule::Absolute(pb::AbsoluteWindow {
            start_time: ts(start),
            end_time: ts(end),
        })),
    }
}

fn weekend() -> pb::FreezeWindow {
    pb::FreezeWindow {
        name: "weekend".into(),
        schedule: Some(pb::freeze_window::Schedule::Weekly(pb::WeeklyWindow {
            time_zone: "UTC".into(),
            start_day: pb::DayOfWeek::Friday.into(),
            start_time: "18:00".into(),
            end_day: pb::DayOfWeek::Monday.into(),
            end_time: "08:00".into(),
        })),
    }
}

async fn deploy(
    c: &mut Client,
    art: &str,
    version: &str,
    env: &str,
    strategy: pb::strategy::Kind,
) -> String {
    tests::fleet::deploy(c, art, version, env, Some(strategy))
        .await
        .name
}

async fn report(c: &mut Client, deployment: &str, env: &str, target: &str, state: P) {
    tests::report(
        c,
        deployment,
        &format!("environments/{env}/targets/{target}"),
        state,
    )
    .await
    .unwrap();
}

async fn heartbeat(c: &mut Client, env: &str, target: &str) {
    c.heartbeat_target(pb::HeartbeatTargetRequest {
        name: format!("environments/{env}/targets/{target}"),
    })
    .await
    .unwrap();
}

fn all_at_once() -> pb::strategy::Kind {
    pb::strategy::Kind::AllAtOnce(pb::AllAtOnce {})
}

async fn inventory(
    c: &mut Client,
    env: &str,
    page_size: i32,
    page_token: &str,
) -> Result<pb::ListInventoryResponse, tonic::Status> {
    c.list_inventory(pb::ListInventoryRequest {
        environment: if env.is_empty() {
            String::new()
        } else {
            format!("environments/{env}")
        },
        page_size,
        page_token: page_token.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Every page of the inventory with `page_size`: (environment, artifacts) per page.
async fn pages(c: &mut Client, env: &str, page_size: i32) -> Vec<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = inventory(c, env, page_size, &token).await.unwrap();
        out.push(
            page.environments
                .iter()
                .map(|e| {
                    (
                        e.environment.clone(),
                        e.artifacts.iter().map(|a| a.artifact.clone()).collect(),
                    )
                })
                .collect(),
        );
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
        assert!(out.len() < 20, "paging does not end");
    }
}

/// The deployments of the fixture, by name.
struct Deployments {
    /// checkout 1.0.0 to dev, completed.
    checkout_dev: String,
    /// payments 1.0.0 to dev, completed.
    payments_dev: String,
    /// checkout 1.1.0 to dev, a canary waiting for ContinueDeployment.
    canary: String,
    /// billing 1.0.0 to dev, all at once, half way.
    billing: String,
    /// payments 1.0.0 to prod, rolling, at its third batch.
    rolling: String,
}

/// The fixture (see the module doc).
async fn fixture(s: &Running, c: &mut Client) -> Deployments {
    environment(c, "dev", None, false).await;
    c.create_environment(pb::CreateEnvironmentRequest {
        environment_id: "prod".into(),
        environment: Some(pb::Environment {
            upstream: "environments/dev".into(),
            freeze_windows: vec![absolute("launch", T0 + HOUR, T0 + 3 * HOUR), weekend()],
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
    environment(c, "qa", None, false).await;
    targets(c, "dev", "dev", 3).await;
    targets(c, "prod", "prod", 4).await;
    for (name, version) in [
        ("checkout", "1.0.0"),
        ("checkout", "1.1.0"),
        ("billing", "1.0.0"),
        ("payments", "1.0.0"),
    ] {
        artifact(c, name, version).await;
    }

    // Completed: checkout 1.0.0 and payments 1.0.0 everywhere in dev, checkout 1.0.0
    // everywhere in prod.
    s.set_now(T0 + 10 * SECOND);
    let checkout_dev = deploy(c, "checkout", "1.0.0", "dev", all_at_once()).await;
    let payments_dev = deploy(c, "payments", "1.0.0", "dev", all_at_once()).await;
    for t in ["dev-1", "dev-2", "dev-3"] {
        report(c, &checkout_dev, "dev", t, P::Placed).await;
        report(c, &payments_dev, "dev", t, P::Placed).await;
    }
    s.set_now(T0 + 20 * SECOND);
    let d = deploy(c, "checkout", "1.0.0", "prod", all_at_once()).await;
    for t in ["prod-1", "prod-2", "prod-3", "prod-4"] {
        report(c, &d, "prod", t, P::Placed).await;
    }

    // In flight in dev: a canary of checkout 1.1.0 with its canary (dev-1) placed, waiting
    // for ContinueDeployment; billing all at once, dev-1 placed and dev-2 placing.
    s.set_now(T0 + 30 * SECOND);
    let canary = deploy(
        c,
        "checkout",
        "1.1.0",
        "dev",
        pb::strategy::Kind::Canary(pb::Canary {
            canary_targets: 1,
            bake_time: None,
        }),
    )
    .await;
    report(c, &canary, "dev", "dev-1", P::Placed).await;
    let billing = deploy(c, "billing", "1.0.0", "dev", all_at_once()).await;
    report(c, &billing, "dev", "dev-1", P::Placed).await;
    report(c, &billing, "dev", "dev-2", P::Placing).await;

    // In flight in prod: payments rolling one target at a time, one failure tolerated:
    // prod-1 failed, prod-2 placed, prod-3 placing (the third batch).
    s.set_now(T0 + 40 * SECOND);
    let rolling = deploy(
        c,
        "payments",
        "1.0.0",
        "prod",
        pb::strategy::Kind::Rolling(pb::Rolling {
            batch_size: 1,
            batch_percent: 0.0,
            max_failures: 1,
        }),
    )
    .await;
    report(c, &rolling, "prod", "prod-1", P::Failed).await;
    report(c, &rolling, "prod", "prod-2", P::Placed).await;
    report(c, &rolling, "prod", "prod-3", P::Placing).await;
    Deployments {
        checkout_dev,
        payments_dev,
        canary,
        billing,
        rolling,
    }
}

#[tokio::test]
async fn inventory_of_real_deployments_with_freeze_health_and_paging() {
    let s = Running::start(|_| {}).await;
    let mut c = tests::connect(s.addr).await;
    let Deployments {
        checkout_dev,
        payments_dev,
        canary,
        billing,
        rolling,
    } = fixture(&s, &mut c).await;

    // Health: dev-1 heard 10 s ago (healthy), dev-2 60 s ago (stale), dev-3 not since the
    // fixture (lost); inside the launch freeze of prod.
    let now = T0 + 2 * HOUR;
    s.set_now(now - 60 * SECOND);
    heartbeat(&mut c, "dev", "dev-2").await;
    s.set_now(now - 10 * SECOND);
    heartbeat(&mut c, "dev", "dev-1").await;
    s.set_now(now);

    let all = inventory(&mut c, "", 0, "").await.unwrap();
    assert!(all.next_page_token.is_empty(), "one page by default");
    let names: Vec<&str> = all
        .environments
        .iter()
        .map(|e| e.environment.as_str())
        .collect();
    assert_eq!(
        names,
        ["environments/dev", "environments/prod", "environments/qa"]
    );
    let (dev, prod, qa) = (
        &all.environments[0],
        &all.environments[1],
        &all.environments[2],
    );

    // dev: 3 targets, no calendar.
    assert_eq!(dev.target_count, 3);
    assert_eq!(
        dev.freeze,
        Some(pb::FreezeState {
            frozen: false,
            active_windows: vec![],
            frozen_until: None,
            next_window: None,
        })
    );
    let arts: Vec<&str> = dev.artifacts.iter().map(|a| a.artifact.as_str()).collect();
    assert_eq!(arts, ["billing", "checkout", "payments"]);
    let digest = |a: &str, v: &str| tests::digest(&format!("{a}@{v}"));
    let version = |v: &str, a: &str, n: u32, cov: f64, at: Millis| pb::PlacedVersion {
        version: v.into(),
        digest: digest(a, v),
        target_count: n,
        coverage: cov,
        last_place_time: ts(at),
    };

    // billing in dev: 1.0.0 on dev-1 only; the all-at-once deployment half way.
    let b = &dev.artifacts[0];
    assert_eq!(
        b.versions,
        [version("1.0.0", "billing", 1, 1.0 / 3.0, T0 + 30 * SECOND)]
    );
    assert_eq!(b.in_flight_count, 1);
    let f = &b.in_flight[0];
    let d = f.deployment.as_ref().unwrap();
    assert_eq!(d.name, billing);
    assert_eq!(d.artifact_version, "artifacts/billing/versions/1.0.0");
    assert_eq!(d.state(), pb::DeploymentState::InProgress);
    assert!(
        d.placements.is_empty(),
        "placements are left to GetDeployment"
    );
    assert_eq!(
        f.step,
        Some(pb::StrategyStep {
            phase: Phase::AllAtOnce.into(),
            step: 1,
            step_count: 1,
            ordered_targets: 3,
            placed_targets: 1,
            failed_targets: 0,
            target_count: 3,
            continue_time: None,
        })
    );

    // checkout in dev: 1.1.0 on the canary (placed last, listed first), 1.0.0 on the other
    // two; the canary waits for ContinueDeployment at step 1 of 2.
    let co = &dev.artifacts[1];
    assert_eq!(
        co.versions,
        [
            version("1.1.0", "checkout", 1, 1.0 / 3.0, T0 + 30 * SECOND),
            version("1.0.0", "checkout", 2, 2.0 / 3.0, T0 + 10 * SECOND),
        ]
    );
    assert_eq!(co.in_flight_count, 1);
    let f = &co.in_flight[0];
    let d = f.deployment.as_ref().unwrap();
    assert_eq!(d.name, canary);
    assert!(matches!(
        d.strategy.as_ref().and_then(|s| s.kind.as_ref()),
        Some(pb::strategy::Kind::Canary(pb::Canary {
            canary_targets: 1,
            ..
        }))
    ));
    assert_eq!(
        f.step,
        Some(pb::StrategyStep {
            phase: Phase::CanaryWaiting.into(),
            step: 1,
            step_count: 2,
            ordered_targets: 1,
            placed_targets: 1,
            failed_targets: 0,
            target_count: 3,
            continue_time: None,
        })
    );

    // payments in dev: complete, nothing in flight.
    let pay = &dev.artifacts[2];
    assert_eq!(
        pay.versions,
        [version("1.0.0", "payments", 3, 1.0, T0 + 10 * SECOND)]
    );
    assert!(pay.in_flight.is_empty());
    assert_eq!(pay.in_flight_count, 0);

    // prod: frozen by launch until T0+3h, the weekend next.
    assert_eq!(prod.target_count, 4);
    assert_eq!(
        prod.freeze,
        Some(pb::FreezeState {
            frozen: true,
            active_windows: vec![pb::ActiveFreezeWindow {
                name: "launch".into(),
                end_time: ts(T0 + 3 * HOUR),
            }],
            frozen_until: ts(T0 + 3 * HOUR),
            next_window: Some(pb::FreezeWindowOccurrence {
                name: "weekend".into(),
                start_time: ts(WEEKEND_START),
                end_time: ts(WEEKEND_END),
            }),
        })
    );
    let arts: Vec<&str> = prod.artifacts.iter().map(|a| a.artifact.as_str()).collect();
    assert_eq!(arts, ["checkout", "payments"]);
    assert_eq!(
        prod.artifacts[0].versions,
        [version("1.0.0", "checkout", 4, 1.0, T0 + 20 * SECOND)]
    );
    assert!(prod.artifacts[0].in_flight.is_empty());
    // payments in prod: placed on prod-2 only (prod-1 failed); the rolling deployment at
    // its third batch of four.
    let pay = &prod.artifacts[1];
    assert_eq!(
        pay.versions,
        [version("1.0.0", "payments", 1, 0.25, T0 + 40 * SECOND)]
    );
    let f = &pay.in_flight[0];
    assert_eq!(f.deployment.as_ref().unwrap().name, rolling);
    assert_eq!(
        f.step,
        Some(pb::StrategyStep {
            phase: Phase::RollingBatch.into(),
            step: 3,
            step_count: 4,
            ordered_targets: 3,
            placed_targets: 1,
            failed_targets: 1,
            target_count: 4,
            continue_time: None,
        })
    );

    // qa: no target, no artifact, one entry all the same.
    assert_eq!(qa.target_count, 0);
    assert!(qa.artifacts.is_empty());
    assert!(!qa.freeze.as_ref().unwrap().frozen);

    // Before the launch window: not frozen, launch is next.
    s.set_now(T0 + 50 * SECOND);
    let early = inventory(&mut c, "prod", 0, "").await.unwrap();
    assert_eq!(early.environments.len(), 1);
    assert_eq!(
        early.environments[0].freeze,
        Some(pb::FreezeState {
            frozen: false,
            active_windows: vec![],
            frozen_until: None,
            next_window: Some(pb::FreezeWindowOccurrence {
                name: "launch".into(),
                start_time: ts(T0 + HOUR),
                end_time: ts(T0 + 3 * HOUR),
            }),
        })
    );
    assert_eq!(early.environments[0].artifacts, prod.artifacts);
    s.set_now(now);

    // Per target: the current version of each artifact and the health.
    let dev_targets = c
        .list_targets(pb::ListTargetsRequest {
            parent: "environments/dev".into(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let tv = |a: &str, v: &str, d: &str, at: Millis| pb::TargetVersion {
        artifact: a.into(),
        version: v.into(),
        deployment: d.into(),
        place_time: ts(at),
    };
    let t1 = &dev_targets.targets[0];
    assert_eq!(t1.name, "environments/dev/targets/dev-1");
    assert_eq!(t1.health(), H::Healthy);
    assert_eq!(t1.last_heartbeat_time, ts(now - 10 * SECOND));
    assert_eq!(
        t1.versions,
        [
            tv("billing", "1.0.0", &billing, T0 + 30 * SECOND),
            tv("checkout", "1.1.0", &canary, T0 + 30 * SECOND),
            tv("payments", "1.0.0", &payments_dev, T0 + 10 * SECOND),
        ]
    );
    let t2 = &dev_targets.targets[1];
    assert_eq!(t2.name, "environments/dev/targets/dev-2");
    assert_eq!(t2.health(), H::Stale);
    assert_eq!(
        t2.versions,
        [
            tv("checkout", "1.0.0", &checkout_dev, T0 + 10 * SECOND),
            tv("payments", "1.0.0", &payments_dev, T0 + 10 * SECOND),
        ],
        "billing is still placing on dev-2"
    );
    let rest = c
        .list_targets(pb::ListTargetsRequest {
            parent: "environments/dev".into(),
            page_size: 2,
            page_token: dev_targets.next_page_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.targets.len(), 1);
    assert_eq!(rest.targets[0].health(), H::Lost);
    assert_eq!(rest.targets[0].versions.len(), 2);
    let prod_targets = c
        .list_targets(pb::ListTargetsRequest {
            parent: "environments/prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let payments: Vec<bool> = prod_targets
        .targets
        .iter()
        .map(|t| t.versions.iter().any(|v| v.artifact == "payments"))
        .collect();
    assert_eq!(
        payments,
        [false, true, false, false],
        "only prod-2 placed it"
    );
    assert!(prod_targets.targets.iter().all(|t| t.health() == H::Lost));

    // Paging: six entries (dev x 3, prod x 2, qa); an environment split across pages
    // comes again with the rest of its artifacts.
    let env = |e: &str, arts: &[&str]| {
        (
            format!("environments/{e}"),
            arts.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        pages(&mut c, "", 2).await,
        [
            vec![env("dev", &["billing", "checkout"])],
            vec![env("dev", &["payments"]), env("prod", &["checkout"])],
            vec![env("prod", &["payments"]), env("qa", &[])],
        ]
    );
    assert_eq!(
        pages(&mut c, "", 4).await,
        [
            vec![
                env("dev", &["billing", "checkout", "payments"]),
                env("prod", &["checkout"])
            ],
            vec![env("prod", &["payments"]), env("qa", &[])],
        ]
    );
    assert_eq!(
        pages(&mut c, "", 6).await,
        [vec![
            env("dev", &["billing", "checkout", "payments"]),
            env("prod", &["checkout", "payments"]),
            env("qa", &[])
        ]],
        "an exactly full last page has no next token"
    );
    assert_eq!(
        pages(&mut c, "prod", 1).await,
        [
            vec![env("prod", &["checkout"])],
            vec![env("prod", &["payments"])]
        ]
    );
    assert_eq!(pages(&mut c, "qa", 1).await, [vec![env("qa", &[])]]);
    // A page continued after its environment's header repeats the header's figures.
    let first = inventory(&mut c, "", 2, "").await.unwrap();
    let second = inventory(&mut c, "", 2, &first.next_page_token)
        .await
        .unwrap();
    assert_eq!(second.environments[0].target_count, 3);
    assert_eq!(second.environments[0].freeze, dev.freeze);
    assert_eq!(second.environments[1].freeze, prod.freeze);

    // Finishing a deployment moves it out of flight and its version's coverage up.
    c.continue_deployment(pb::ContinueDeploymentRequest {
        name: canary.clone(),
    })
    .await
    .unwrap();
    let after = inventory(&mut c, "dev", 0, "").await.unwrap();
    let step = after.environments[0].artifacts[1].in_flight[0]
        .step
        .unwrap();
    assert_eq!(
        (step.phase(), step.step, step.ordered_targets),
        (Phase::CanaryRest, 2, 3)
    );
    s.set_now(now + SECOND);
    report(&mut c, &canary, "dev", "dev-2", P::Placed).await;
    report(&mut c, &canary, "dev", "dev-3", P::Placed).await;
    let done = inventory(&mut c, "dev", 0, "").await.unwrap();
    let co = &done.environments[0].artifacts[1];
    assert!(co.in_flight.is_empty());
    assert_eq!(
        co.versions,
        [version("1.1.0", "checkout", 3, 1.0, now + SECOND)]
    );

    s.shutdown().await;
}

#[tokio::test]
async fn bad_inventory_requests_name_the_field() {
    let s = Running::start(|_| {}).await;
    let mut c = tests::connect(s.addr).await;
    environment(&mut c, "dev", None, false).await;
    environment(&mut c, "prod", None, false).await;
    artifact(&mut c, "checkout", "1.0.0").await;
    targets(&mut c, "dev", "dev", 1).await;
    tests::deploy(&mut c, "checkout", "1.0.0", "dev", "")
        .await
        .unwrap();

    let status = expect_code(inventory(&mut c, "nowhere", 0, "").await, Code::NotFound);
    assert!(
        status.message().contains("environments/nowhere"),
        "{status:?}"
    );
    let bad = c
        .list_inventory(pb::ListInventoryRequest {
            environment: "prod".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(bad_fields(bad), ["environment"]);
    assert_eq!(
        bad_fields(inventory(&mut c, "", -1, "").await),
        ["page_size"]
    );
    assert_eq!(
        bad_fields(inventory(&mut c, "", 0, "zz").await),
        ["page_token"]
    );
    // Hex of something that is no inventory position.
    let forged = hex::encode("no position");
    assert_eq!(
        bad_fields(inventory(&mut c, "", 0, &forged).await),
        ["page_token"]
    );
    // A token of the all-environments form continuing in dev is not one for prod.
    let first = inventory(&mut c, "", 1, "").await.unwrap();
    assert!(!first.next_page_token.is_empty());
    assert_eq!(
        bad_fields(inventory(&mut c, "prod", 1, &first.next_page_token).await),
        ["page_token"]
    );
    // Every bad field at once.
    let bad = c
        .list_inventory(pb::ListInventoryRequest {
            environment: "environments/Bad_Name".into(),
            page_size: -5,
            page_token: "zz".into(),
        })
        .await;
    assert_eq!(bad_fields(bad), ["environment", "page_size", "page_token"]);
    // Large page sizes are capped, not refused.
    let capped = inventory(&mut c, "", i32::MAX, "").await.unwrap();
    assert_eq!(capped.environments.len(), 2);
    s.shutdown().await;
}

/// At most 20 deployments in flight per environment and artifact are listed, the oldest,
/// with the total.
#[tokio::test]
async fn deployments_in_flight_are_capped_with_their_total() {
    let s = Running::start(|_| {}).await;
    let mut c = tests::connect(s.addr).await;
    environment(&mut c, "dev", None, false).await;
    targets(&mut c, "dev", "dev", 1).await;
    artifact(&mut c, "checkout", "1.0.0").await;
    let mut names = Vec::new();
    for _ in 0..22 {
        names.push(deploy(&mut c, "checkout", "1.0.0", "dev", all_at_once()).await);
    }
    let page = inventory(&mut c, "dev", 0, "").await.unwrap();
    let co = &page.environments[0].artifacts[0];
    assert_eq!(co.in_flight_count, 22);
    let listed: Vec<&str> = co
        .in_flight
        .iter()
        .map(|f| f.deployment.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(listed, names[..20]);
    assert!(co.versions.is_empty(), "nothing placed yet");
    s.shutdown().await;
}

/// With authentication on, the all-environments inventory holds only the environments the
/// caller may view, and naming another one is PERMISSION_DENIED.
#[tokio::test]
async fn inventory_is_scoped_to_the_environments_the_caller_may_view() {
    let dir = tempfile::tempdir().unwrap();
    let (admin_token, viewer_token, agent_token) = (
        tests::pki::random_token(),
        tests::pki::random_token(),
        tests::pki::random_token(),
    );
    let (tokens, policy) = (
        dir.path().join("tokens.json"),
        dir.path().join("policy.json"),
    );
    tests::pki::token_file(
        &tokens,
        &[
            (&admin_token, "root", &[]),
            (&viewer_token, "prod-viewer", &[]),
            (&agent_token, "agent", &[]),
        ],
    )
    .unwrap();
    tests::pki::policy_file(
        &policy,
        &[
            serde_json::json!({"role": "admin", "principals": ["root"]}),
            serde_json::json!({"role": "viewer", "principals": ["prod-viewer"], "environments": ["prod"]}),
            serde_json::json!({"role": "agent", "principals": ["agent"]}),
        ],
    )
    .unwrap();
    let s = Running::start(|config| {
        config.server.auth.tokens = Some(tokens.clone());
        config.server.auth.policy = Some(policy.clone());
    })
    .await;
    let channel = tests::channel(s.addr).await;
    let with = |token: &str| {
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        pb::deploy_service_client::DeployServiceClient::with_interceptor(
            channel.clone(),
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            },
        )
    };
    let mut admin = with(&admin_token);
    for env in ["dev", "prod", "staging"] {
        admin
            .create_environment(pb::CreateEnvironmentRequest {
                environment_id: env.into(),
                environment: Some(pb::Environment::default()),
                request_id: String::new(),
            })
            .await
            .unwrap();
    }
    let request = |env: &str| pb::ListInventoryRequest {
        environment: env.into(),
        ..Default::default()
    };
    let all = admin
        .list_inventory(request(""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.environments.len(), 3);

    let mut viewer = with(&viewer_token);
    let mine = viewer
        .list_inventory(request(""))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = mine
        .environments
        .iter()
        .map(|e| e.environment.as_str())
        .collect();
    assert_eq!(names, ["environments/prod"]);
    viewer
        .list_inventory(request("environments/prod"))
        .await
        .unwrap();
    let denied = viewer
        .list_inventory(request("environments/dev"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("deployments.read"), "{denied:?}");
    // An identity without deployments.read anywhere is refused before the handler.
    let mut agent = with(&agent_token);
    let denied = agent.list_inventory(request("")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    s.shutdown().await;
}
