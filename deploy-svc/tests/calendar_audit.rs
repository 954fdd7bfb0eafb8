//! The change calendar (freeze windows, emergency overrides) and the audit trail, over real
//! gRPC on a real socket against a real SQLite file. The server runs in-process through
//! the library with a clock the test moves, so "now" is exact.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use deploy_svc::domain::clock::{ManualClock, Millis};
use prost_types::{FieldMask, Timestamp};
use proto::deploy::v1 as pb;
use proto::deploy::v1::deploy_service_client::DeployServiceClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

type Client = DeployServiceClient<Channel>;

/// Wednesday 2026-03-04 12:00:00 UTC.
const T0: Millis = 1_772_625_600_000;
const MINUTE: Millis = 60_000;
const HOUR: Millis = 60 * MINUTE;

struct Running {
    addr: SocketAddr,
    clock: Arc<ManualClock>,
    /// Keeps the SQLite file's directory alive.
    #[allow(dead_code)]
    dir: tempfile::TempDir,
    /// The SQLite file or the PostgreSQL URL.
    database: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Binds 127.0.0.1:0, then serves deploy-svc on that listener with a test clock at T0.
    async fn start(tweak: impl FnOnce(&mut deploy_svc::Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = match report::switched_to_postgres() {
            Some(url) => fresh_database(&url).await,
            None => dir.path().join("deploy.db").to_string_lossy().into_owned(),
        };
        let mut config = deploy_svc::Config::for_database(&database);
        tweak(&mut config);
        let clock = Arc::new(ManualClock::new(T0));
        let server = deploy_svc::Server::open(config, clock.clone()).unwrap();
        // The store is open: its schema is where the switch said.
        let catalog = if report::is_postgres(&database) {
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'audit_records'"
        } else {
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'audit_records'"
        };
        assert_eq!(count(&database, catalog).await, 1, "{database}");
        report::used(&database);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            clock,
            dir,
            database,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn client(&self) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        DeployServiceClient::new(channel)
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

/// A request made by `principal` (the `x-principal` metadata).
fn by<T>(principal: &str, message: T) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert("x-principal", principal.parse().unwrap());
    req
}

fn ts(ms: Millis) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap(),
    })
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

fn weekly(
    name: &str,
    time_zone: &str,
    start: (pb::DayOfWeek, &str),
    end: (pb::DayOfWeek, &str),
) -> pb::FreezeWindow {
    pb::FreezeWindow {
        name: name.into(),
        schedule: Some(pb::freeze_window::Schedule::Weekly(pb::WeeklyWindow {
            time_zone: time_zone.into(),
            start_day: start.0.into(),
            start_time: start.1.into(),
            end_day: end.0.into(),
            end_time: end.1.into(),
        })),
    }
}

async fn create_env(
    c: &mut Client,
    principal: &str,
    id: &str,
    upstream: Option<&str>,
    protected: bool,
    windows: Vec<pb::FreezeWindow>,
) -> Result<pb::Environment, Status> {
    c.create_environment(by(
        principal,
        pb::CreateEnvironmentRequest {
            environment_id: id.into(),
            environment: Some(pb::Environment {
                upstream: upstream
                    .map(|u| format!("environments/{u}"))
                    .unwrap_or_default(),
                protected,
                freeze_windows: windows,
                ..Default::default()
            }),
            request_id: String::new(),
        },
    ))
    .await
    .map(tonic::Response::into_inner)
}

async fn target(c: &mut Client, principal: &str, env: &str, id: &str) -> pb::Target {
    c.register_target(by(
        principal,
        pb::RegisterTargetRequest {
            parent: format!("environments/{env}"),
            target_id: id.into(),
            labels: Default::default(),
        },
    ))
    .await
    .unwrap()
    .into_inner()
}

async fn artifact(c: &mut Client, principal: &str, name: &str, version: &str) -> pb::Artifact {
    c.register_artifact(by(
        principal,
        pb::RegisterArtifactRequest {
            artifact: name.into(),
            version: version.into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            metadata: Default::default(),
            source_uri: String::new(),
        },
    ))
    .await
    .unwrap()
    .into_inner()
}

async fn deploy(
    c: &mut Client,
    principal: &str,
    env: &str,
    change: &str,
    emergency: Option<(&str, &str)>,
) -> Result<pb::Deployment, Status> {
    c.create_deployment(by(
        principal,
        pb::CreateDeploymentRequest {
            deployment: Some(pb::Deployment {
                artifact_version: "artifacts/web/versions/1.0.0".into(),
                environment: format!("environments/{env}"),
                change_reference: change.into(),
                emergency: emergency.map(|(reason, approver)| pb::EmergencyOverride {
                    reason: reason.into(),
                    approver: approver.into(),
                }),
                ..Default::default()
            }),
            request_id: String::new(),
        },
    ))
    .await
    .map(tonic::Response::into_inner)
}

async fn report(
    c: &mut Client,
    principal: &str,
    deployment: &str,
    target: &str,
    state: pb::PlacementState,
) -> Result<pb::ReportPlacementResponse, Status> {
    c.report_placement(by(
        principal,
        pb::ReportPlacementRequest {
            deployment: deployment.into(),
            target: target.into(),
            state: state.into(),
            message: String::new(),
        },
    ))
    .await
    .map(tonic::Response::into_inner)
}

async fn audit(
    c: &mut Client,
    req: pb::ListAuditRecordsRequest,
) -> Result<pb::ListAuditRecordsResponse, Status> {
    c.list_audit_records(req)
        .await
        .map(tonic::Response::into_inner)
}

/// Every record, following page tokens.
async fn all_records(c: &mut Client, mut req: pb::ListAuditRecordsRequest) -> Vec<pb::AuditRecord> {
    let mut out = Vec::new();
    loop {
        let page = audit(c, req.clone()).await.unwrap();
        out.extend(page.records);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
}

fn expect(result: Result<impl std::fmt::Debug, Status>, code: Code) -> Status {
    let status = result.expect_err("the call should have failed");
    assert_eq!(status.code(), code, "{status:?}");
    status
}

/// (type, subject, description) of each PreconditionFailure violation.
fn preconditions(status: &Status) -> Vec<(String, String, String)> {
    status
        .get_details_precondition_failure()
        .unwrap()
        .violations
        .into_iter()
        .map(|v| (v.r#type, v.subject, v.description))
        .collect()
}

/// The fields named by the BadRequest details.
fn bad_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|f| f.field)
        .collect()
}

#[tokio::test]
async fn an_active_freeze_window_refuses_a_deployment_unless_an_emergency_override_is_approved() {
    let server = Running::start(|_| {}).await;
    let mut c = server.client().await;
    create_env(&mut c, "alice", "staging", None, false, vec![])
        .await
        .unwrap();
    let window_end = T0 + HOUR;
    let prod = create_env(
        &mut c,
        "alice",
        "prod",
        Some("staging"),
        true,
        vec![absolute("quarter-close", T0 - HOUR, window_end)],
    )
    .await
    .unwrap();
    assert_eq!(prod.freeze_windows.len(), 1);
    let stg = target(&mut c, "agent", "staging", "stg-1").await.name;
    target(&mut c, "agent", "prod", "web-1").await;
    artifact(&mut c, "ci", "web", "1.0.0").await;
    let records_before = all_records(&mut c, Default::default()).await.len();

    // Every violated rule at once: promotion order, change reference, the freeze window.
    let refused = expect(
        deploy(&mut c, "alice", "prod", "", None).await,
        Code::FailedPrecondition,
    );
    let rules = preconditions(&refused);
    let types: Vec<_> = rules.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        types,
        [
            "PROMOTION_ORDER",
            "CHANGE_REFERENCE_REQUIRED",
            "FREEZE_WINDOW"
        ]
    );
    let (_, subject, description) = &rules[2];
    assert_eq!(subject, "environments/prod");
    assert!(
        description.contains("\"quarter-close\"")
            && description.contains("until 2026-03-04T13:00:00Z"),
        "{description}"
    );
    assert_eq!(
        all_records(&mut c, Default::default()).await.len(),
        records_before,
        "a refused call appends nothing"
    );

    // With the other rules satisfied, the freeze window alone still refuses.
    let d = deploy(&mut c, "alice", "staging", "", None).await.unwrap();
    report(&mut c, "agent", &d.name, &stg, pb::PlacementState::Placed)
        .await
        .unwrap();
    let refused = expect(
        deploy(&mut c, "alice", "prod", "CHG-7", None).await,
        Code::FailedPrecondition,
    );
    assert_eq!(preconditions(&refused).len(), 1);
    assert_eq!(preconditions(&refused)[0].0, "FREEZE_WINDOW");

    // The requester cannot approve their own override (in any case), and both fields are
    // required; every bad field is named at once.
    for approver in ["alice", "ALICE"] {
        let bad = expect(
            deploy(&mut c, "alice", "prod", "CHG-7", Some(("hotfix", approver))).await,
            Code::InvalidArgument,
        );
        assert_eq!(bad_fields(&bad), ["deployment.emergency.approver"]);
    }
    let bad = expect(
        deploy(&mut c, "alice", "prod", "CHG-7", Some((" ", ""))).await,
        Code::InvalidArgument,
    );
    assert_eq!(
        bad_fields(&bad),
        [
            "deployment.emergency.reason",
            "deployment.emergency.approver"
        ]
    );

    // Approved by someone else, it passes and the deployment shows the override.
    let records_before = all_records(&mut c, Default::default()).await.len();
    let urgent = deploy(
        &mut c,
        "alice",
        "prod",
        "CHG-7",
        Some(("INC-42 checkout down", "bob")),
    )
    .await
    .unwrap();
    let shown = pb::EmergencyOverride {
        reason: "INC-42 checkout down".into(),
        approver: "bob".into(),
    };
    assert_eq!(urgent.emergency.as_ref(), Some(&shown));
    let got = c
        .get_deployment(pb::GetDeploymentRequest {
            name: urgent.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.emergency.as_ref(), Some(&shown));
    let listed = c
        .list_deployments(pb::ListDeploymentsRequest {
            environment: "environments/prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.deployments[0].emergency.as_ref(), Some(&shown));

    // The audit trail has exactly one new record: the override, with who and why.
    let records = all_records(&mut c, Default::default()).await;
    assert_eq!(records.len(), records_before + 1);
    let record = records.last().unwrap();
    assert_eq!(record.action, "CreateDeployment");
    assert_eq!(record.resource, urgent.name);
    assert_eq!(record.principal, "alice");
    assert_eq!(
        record.reason,
        "EMERGENCY OVERRIDE: INC-42 checkout down (approved by bob)"
    );
    let after: serde_json::Value = serde_json::from_str(&record.after).unwrap();
    assert_eq!(
        after["emergency"]["overrode_freeze_windows"],
        serde_json::json!(["quarter-close"])
    );
    assert_eq!(record.time, ts(T0));

    // Once the window has ended, no override is needed.
    server.set_now(window_end);
    let later = deploy(&mut c, "alice", "prod", "CHG-8", None)
        .await
        .unwrap();
    assert!(later.emergency.is_none());

    server.shutdown().await;
}

/// The autumn daylight-saving change, end to end: Europe/Berlin goes back from UTC+2 to
/// UTC+1 at 2026-10-25 01:00 UTC, so local 02:00-03:00 happens twice. A weekly window on
/// Sunday 02:15-02:45 local refuses deployments in both occurrences, and not between them.
#[tokio::test]
async fn a_weekly_window_freezes_both_occurrences_of_the_repeated_autumn_hour() {
    const OCT_25_2026: Millis = 1_792_886_400_000;
    let server = Running::start(|_| {}).await;
    let mut c = server.client().await;
    let night = weekly(
        "sunday-night",
        "Europe/Berlin",
        (pb::DayOfWeek::Sunday, "02:15"),
        (pb::DayOfWeek::Sunday, "02:45"),
    );
    create_env(&mut c, "alice", "prod", None, false, vec![night])
        .await
        .unwrap();
    target(&mut c, "agent", "prod", "web-1").await;
    artifact(&mut c, "ci", "web", "1.0.0").await;
    for (utc, local, frozen) in [
        (14, "02:14 CEST", false),
        (30, "02:30 CEST", true),
        (50, "02:50 CEST", false),
        (60 + 10, "02:10 CET", false),
        (60 + 30, "02:30 CET", true),
        (60 + 45, "02:45 CET", false),
    ] {
        server.set_now(OCT_25_2026 + utc * MINUTE);
        let result = deploy(&mut c, "alice", "prod", "", None).await;
        if frozen {
            let refused = expect(result, Code::FailedPrecondition);
            let rules = preconditions(&refused);
            assert_eq!(rules.len(), 1, "{local}: {rules:?}");
            assert_eq!(rules[0].0, "FREEZE_WINDOW", "{local}");
            assert!(
                rules[0].2.contains("\"sunday-night\""),
                "{local}: {rules:?}"
            );
        } else {
            let d = result.unwrap_or_else(|e| panic!("{local}: refused: {e:?}"));
            c.cancel_deployment(by(
                "alice",
                pb::CancelDeploymentRequest {
                    name: d.name,
                    reason: "next instant".into(),
                },
            ))
            .await
            .unwrap();
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn weekly_windows_are_edited_with_the_etag_rule_and_validated_field_by_field() {
    let server = Running::start(|_| {}).await;
    let mut c = server.client().await;
    let dev = create_env(&mut c, "alice", "dev", None, false, vec![])
        .await
        .unwrap();
    target(&mut c, "agent", "dev", "dev-1").await;
    artifact(&mut c, "ci", "web", "1.0.0").await;

    // Friday 18:00 to Monday 08:00 in Berlin; T0 is a Wednesday.
    let weekend = weekly(
        "weekend",
        "Europe/Berlin",
        (pb::DayOfWeek::Friday, "18:00"),
        (pb::DayOfWeek::Monday, "08:00"),
    );
    let update = |env: pb::Environment| pb::UpdateEnvironmentRequest {
        environment: Some(env),
        update_mask: Some(FieldMask {
            paths: vec!["freeze_windows".into()],
        }),
    };
    let updated = c
        .update_environment(by(
            "alice",
            update(pb::Environment {
                name: "environments/dev".into(),
                etag: dev.etag.clone(),
                freeze_windows: vec![weekend.clone()],
                ..Default::default()
            }),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.freeze_windows, std::slice::from_ref(&weekend));
    let got = c
        .get_environment(pb::GetEnvironmentRequest {
            name: "environments/dev".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.freeze_windows,
        std::slice::from_ref(&weekend),
        "stored and read back"
    );

    // Not covering now: no block.
    deploy(&mut c, "alice", "dev", "", None).await.unwrap();

    // Saturday noon in Berlin: the window blocks and is named.
    server.set_now(T0 + 3 * 24 * HOUR);
    let refused = expect(
        deploy(&mut c, "alice", "dev", "", None).await,
        Code::FailedPrecondition,
    );
    let rules = preconditions(&refused);
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].0, "FREEZE_WINDOW");
    assert!(
        rules[0].2.contains("\"weekend\"")
            && rules[0]
                .2
                .contains("every week FRIDAY 18:00 to MONDAY 08:00 Europe/Berlin"),
        "{}",
        rules[0].2
    );

    // A stale etag is ABORTED and changes nothing.
    let stale = expect(
        c.update_environment(by(
            "alice",
            update(pb::Environment {
                name: "environments/dev".into(),
                etag: dev.etag.clone(),
                ..Default::default()
            }),
        ))
        .await,
        Code::Aborted,
    );
    assert!(stale.message().contains("stale"), "{stale:?}");

    // Bad windows: every bad field is named with its index.
    let bad = expect(
        c.update_environment(by(
            "alice",
            update(pb::Environment {
                name: "environments/dev".into(),
                freeze_windows: vec![
                    weekly(
                        "weekend",
                        "Mars/Olympus",
                        (pb::DayOfWeek::Friday, "18:00"),
                        (pb::DayOfWeek::Monday, "08:00"),
                    ),
                    weekly(
                        "nights",
                        "UTC",
                        (pb::DayOfWeek::Unspecified, "25:00"),
                        (pb::DayOfWeek::Monday, "08:00"),
                    ),
                    absolute("backwards", T0, T0 - 1),
                    pb::FreezeWindow {
                        name: String::new(),
                        schedule: None,
                    },
                ],
                ..Default::default()
            }),
        ))
        .await,
        Code::InvalidArgument,
    );
    assert_eq!(
        bad_fields(&bad),
        [
            "environment.freeze_windows[0].weekly.time_zone",
            "environment.freeze_windows[1].weekly.start_day",
            "environment.freeze_windows[1].weekly.start_time",
            "environment.freeze_windows[2].absolute.end_time",
            "environment.freeze_windows[3].name",
            "environment.freeze_windows[3].schedule",
        ]
    );
    // The same check at creation.
    let bad = expect(
        create_env(
            &mut c,
            "alice",
            "qa",
            None,
            false,
            vec![weekly(
                "weekend",
                "Mars/Olympus",
                (pb::DayOfWeek::Friday, "18:00"),
                (pb::DayOfWeek::Monday, "08:00"),
            )],
        )
        .await,
        Code::InvalidArgument,
    );
    assert_eq!(
        bad_fields(&bad),
        ["environment.freeze_windows[0].weekly.time_zone"]
    );

    // Clearing the calendar lifts the freeze; the update is audited with before and after.
    let current = c
        .get_environment(pb::GetEnvironmentRequest {
            name: "environments/dev".into(),
        })
        .await
        .unwrap()
        .into_inner();
    c.update_environment(by(
        "carol",
        update(pb::Environment {
            name: "environments/dev".into(),
            etag: current.etag,
            ..Default::default()
        }),
    ))
    .await
    .unwrap();
    deploy(&mut c, "alice", "dev", "", None).await.unwrap();
    let updates: Vec<_> = all_records(
        &mut c,
        pb::ListAuditRecordsRequest {
            resource: "environments/dev".into(),
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .filter(|r| r.action == "UpdateEnvironment")
    .collect();
    assert_eq!(updates.len(), 2, "refused updates are not audited");
    assert_eq!(updates[0].principal, "alice");
    assert_eq!(updates[0].before, r#"{"freeze_windows":[]}"#);
    assert!(
        updates[0].after.contains(r#""start_day":"FRIDAY""#),
        "{}",
        updates[0].after
    );
    assert_eq!(updates[1].principal, "carol");
    assert_eq!(updates[1].after, r#"{"freeze_windows":[]}"#);

    server.shutdown().await;
}

#[tokio::test]
async fn the_audit_trail_records_every_change_once_in_order_and_filters_and_pages() {
    // Retention of one event: pruning the placement log must not touch the audit trail.
    let server = Running::start(|config| config.retention_events = 1).await;
    let mut c = server.client().await;

    c.create_environment(by(
        "alice",
        pb::CreateEnvironmentRequest {
            environment_id: "dev".into(),
            environment: Some(pb::Environment::default()),
            request_id: "create-dev-1".into(),
        },
    ))
    .await
    .unwrap();
    let mut req = by(
        "ci",
        pb::RegisterArtifactRequest {
            artifact: "web".into(),
            version: "1.0.0".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            metadata: [("commit".to_owned(), "9f2e1c0".to_owned())].into(),
            source_uri: String::new(),
        },
    );
    req.metadata_mut()
        .insert("x-request-id", "build-77".parse().unwrap());
    c.register_artifact(req).await.unwrap();
    // An idempotent re-registration changes nothing and appends nothing.
    artifact(&mut c, "ci", "web", "1.0.0").await;

    server.set_now(T0 + MINUTE);
    let t1 = target(&mut c, "agent-1", "dev", "dev-1").await.name;
    // Re-registering with the same labels, and heartbeats, are not audited.
    target(&mut c, "agent-1", "dev", "dev-1").await;
    c.heartbeat_target(by(
        "agent-1",
        pb::HeartbeatTargetRequest { name: t1.clone() },
    ))
    .await
    .unwrap();
    let d1 = deploy(&mut c, "alice", "dev", "CHG-9", None).await.unwrap();
    report(
        &mut c,
        "agent-1",
        &d1.name,
        &t1,
        pb::PlacementState::Placing,
    )
    .await
    .unwrap();
    report(&mut c, "agent-1", &d1.name, &t1, pb::PlacementState::Placed)
        .await
        .unwrap();
    // A repeated report changes nothing.
    report(&mut c, "agent-1", &d1.name, &t1, pb::PlacementState::Placed)
        .await
        .unwrap();

    server.set_now(T0 + 2 * MINUTE);
    // Refused calls append nothing.
    expect(
        report(
            &mut c,
            "agent-1",
            &d1.name,
            &t1,
            pb::PlacementState::Placing,
        )
        .await,
        Code::FailedPrecondition,
    );
    expect(
        c.cancel_deployment(by(
            "alice",
            pb::CancelDeploymentRequest {
                name: d1.name.clone(),
                reason: "too late".into(),
            },
        ))
        .await,
        Code::FailedPrecondition,
    );
    let d2 = deploy(&mut c, "bob", "dev", "", None).await.unwrap();
    c.cancel_deployment(by(
        "bob",
        pb::CancelDeploymentRequest {
            name: d2.name.clone(),
            reason: "superseded".into(),
        },
    ))
    .await
    .unwrap();
    // No principal: anonymous.
    c.update_environment(pb::UpdateEnvironmentRequest {
        environment: Some(pb::Environment {
            name: "environments/dev".into(),
            description: "shared".into(),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["description".into()],
        }),
    })
    .await
    .unwrap();

    let all = all_records(&mut c, Default::default()).await;
    let rows: Vec<_> = all
        .iter()
        .map(|r| (r.action.as_str(), r.principal.as_str(), r.resource.as_str()))
        .collect();
    assert_eq!(
        rows,
        [
            ("CreateEnvironment", "alice", "environments/dev"),
            ("RegisterArtifact", "ci", "artifacts/web/versions/1.0.0"),
            (
                "RegisterTarget",
                "agent-1",
                "environments/dev/targets/dev-1"
            ),
            ("CreateDeployment", "alice", d1.name.as_str()),
            ("ReportPlacement", "agent-1", d1.name.as_str()),
            ("ReportPlacement", "agent-1", d1.name.as_str()),
            ("CreateDeployment", "bob", d2.name.as_str()),
            ("CancelDeployment", "bob", d2.name.as_str()),
            ("UpdateEnvironment", "anonymous", "environments/dev"),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "ids ascend");
    assert_eq!(all[0].request_id, "create-dev-1", "the request's own id");
    assert_eq!(all[1].request_id, "build-77", "x-request-id metadata");
    assert_eq!(all[2].request_id, "");
    assert_eq!(all[0].before, "");
    assert_eq!(all[3].reason, "CHG-9", "the change reference");
    assert_eq!(
        all[4].before,
        format!(r#"{{"deployment_state":"PENDING","state":"PENDING","target":"{t1}"}}"#)
    );
    assert_eq!(
        all[4].after,
        format!(
            r#"{{"deployment_state":"IN_PROGRESS","sequence":2,"state":"PLACING","target":"{t1}"}}"#
        )
    );
    let placed: serde_json::Value = serde_json::from_str(&all[5].after).unwrap();
    assert_eq!(placed["state"], "PLACED");
    assert_eq!(placed["deployment_state"], "SUCCEEDED");
    assert_eq!(all[7].reason, "superseded");
    assert_eq!(all[7].after, r#"{"state":"CANCELLED"}"#);
    assert_eq!(all[0].time, ts(T0));
    assert_eq!(all[2].time, ts(T0 + MINUTE));

    // Filters.
    let actions = |records: Vec<pb::AuditRecord>| -> Vec<String> {
        records.into_iter().map(|r| r.action).collect()
    };
    let filtered = |resource: &str, principal: &str, start: Option<Millis>, end: Option<Millis>| {
        pb::ListAuditRecordsRequest {
            resource: resource.into(),
            principal: principal.into(),
            start_time: start.and_then(ts),
            end_time: end.and_then(ts),
            ..Default::default()
        }
    };
    assert_eq!(
        actions(all_records(&mut c, filtered(&d1.name, "", None, None)).await),
        ["CreateDeployment", "ReportPlacement", "ReportPlacement"]
    );
    assert_eq!(
        actions(all_records(&mut c, filtered("environments/", "", None, None)).await),
        ["CreateEnvironment", "RegisterTarget", "UpdateEnvironment"]
    );
    assert_eq!(
        actions(all_records(&mut c, filtered("environments/dev", "alice", None, None)).await),
        ["CreateEnvironment"]
    );
    assert_eq!(
        actions(all_records(&mut c, filtered("", "agent-1", None, None)).await),
        ["RegisterTarget", "ReportPlacement", "ReportPlacement"]
    );
    assert_eq!(
        actions(all_records(&mut c, filtered("", "", None, Some(T0 + MINUTE))).await),
        ["CreateEnvironment", "RegisterArtifact"],
        "end_time is exclusive"
    );
    assert_eq!(
        actions(
            all_records(
                &mut c,
                filtered("", "", Some(T0 + MINUTE), Some(T0 + 2 * MINUTE))
            )
            .await
        ),
        [
            "RegisterTarget",
            "CreateDeployment",
            "ReportPlacement",
            "ReportPlacement"
        ],
        "start_time is inclusive"
    );

    // Pagination returns every record exactly once, in order.
    for size in [1, 2, 4] {
        let mut req = pb::ListAuditRecordsRequest {
            page_size: size,
            ..Default::default()
        };
        let mut pages = 0;
        let mut ids = Vec::new();
        loop {
            let page = audit(&mut c, req.clone()).await.unwrap();
            assert!(page.records.len() <= usize::try_from(size).unwrap());
            ids.extend(page.records.iter().map(|r| r.id));
            pages += 1;
            if page.next_page_token.is_empty() {
                break;
            }
            req.page_token = page.next_page_token;
        }
        let want: Vec<_> = all.iter().map(|r| r.id).collect();
        assert_eq!(ids, want, "page size {size}");
        assert!(pages >= all.len() / usize::try_from(size).unwrap());
    }

    // Bad filters name every field at once.
    let bad = expect(
        audit(
            &mut c,
            pb::ListAuditRecordsRequest {
                resource: "targets/x".into(),
                principal: "has space".into(),
                start_time: ts(T0),
                end_time: ts(T0),
                page_size: -1,
                page_token: "zz".into(),
            },
        )
        .await,
        Code::InvalidArgument,
    );
    assert_eq!(
        bad_fields(&bad),
        [
            "resource",
            "principal",
            "end_time",
            "page_size",
            "page_token"
        ]
    );
    // A bad principal header is refused before anything is written.
    let mut req = Request::new(pb::RegisterTargetRequest {
        parent: "environments/dev".into(),
        target_id: "dev-2".into(),
        labels: Default::default(),
    });
    req.metadata_mut()
        .insert("x-principal", "two words".parse().unwrap());
    let bad = expect(c.register_target(req).await, Code::InvalidArgument);
    assert_eq!(bad_fields(&bad), ["x-principal"]);
    assert_eq!(
        all_records(&mut c, Default::default()).await.len(),
        all.len()
    );

    // The placement log was pruned to one event; the trail keeps everything and refuses
    // edits even from SQL.
    let events = count(&server.database, "SELECT COUNT(*) FROM placement_events").await;
    assert!(events < 3, "retention pruned the placement log ({events})");
    let kept = count(&server.database, "SELECT COUNT(*) FROM audit_records").await;
    assert_eq!(kept, i64::try_from(all.len()).unwrap());
    // Refused by the append-only triggers themselves, not by any other error.
    for edit in [
        "DELETE FROM audit_records",
        "UPDATE audit_records SET principal = 'mallory'",
    ] {
        let refused = sql_error(&server.database, edit).await;
        assert!(
            refused.contains("audit records are append-only"),
            "{edit}: {refused}"
        );
    }
    assert_eq!(
        count(&server.database, "SELECT COUNT(*) FROM audit_records").await,
        i64::try_from(all.len()).unwrap()
    );

    server.shutdown().await;
}

/// The backend switch (`TEST_BACKEND=postgres` with TEST_DATABASE_URL: the same
/// tests, once per backend) and the report to `scripts/test`, shared with the end-to-end
/// tests.
#[path = "../../tests/src/report.rs"]
mod report;

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is not reachable: {e}"));
    tokio::spawn(connection);
    client
}

/// A new database on the server at `url`; returns its URL.
async fn fresh_database(url: &str) -> String {
    static NEXT: AtomicI64 = AtomicI64::new(0);
    let name = format!(
        "deploy_cal_{}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    admin(url)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    format!("{base}/{name}")
}

/// The single integer `sql` returns, read straight from the database.
async fn count(database: &str, sql: &str) -> i64 {
    if database.starts_with("postgres://") {
        return admin(database)
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0);
    }
    rusqlite::Connection::open(database)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

/// The error `sql` fails with, straight against the database (the database's own message);
/// panics if it succeeds.
async fn sql_error(database: &str, sql: &str) -> String {
    if database.starts_with("postgres://") {
        let e = admin(database)
            .await
            .batch_execute(sql)
            .await
            .expect_err(sql);
        return e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_owned());
    }
    rusqlite::Connection::open(database)
        .unwrap()
        .execute(sql, [])
        .expect_err(sql)
        .to_string()
}
