//! deploy-svc's store, one conformance suite for both backends: every scenario is one test
//! per backend, each on a fresh database (a new SQLite file; a new PostgreSQL database). The
//! PostgreSQL tests run whenever `TEST_DATABASE_URL` is set; without it they are reported
//! as skipped (`scripts/test` counts them).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use deploy_svc::domain::audit::{AuditFilter, Caller};
use deploy_svc::domain::clock::SystemClock;
use deploy_svc::domain::model::{
    Artifact, DeploymentState, EnvironmentUpdate, NewDeployment, NewEnvironment, PageRequest,
    PlacementReport, PlacementState,
};
use deploy_svc::domain::Error;
use deploy_svc::store::postgres::{PostgresOptions, PostgresStore};
use deploy_svc::store::sqlite::{SqliteOptions, SqliteStore};
use deploy_svc::store::Store;

/// One `#[tokio::test]` per scenario per backend.
macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            use deploy_svc::store::Store as _;
            $(
                #[tokio::test]
                async fn $scenario() {
                    let (store, _dir) = super::sqlite();
                    super::$scenario(&store).await;
                    store.close().await;
                }
            )*
        }
        mod postgres {
            use deploy_svc::store::Store as _;
            $(
                #[tokio::test]
                async fn $scenario() {
                    let Some(store) = super::postgres().await else { return };
                    super::$scenario(&store).await;
                    store.close().await;
                }
            )*
        }
    };
}

conformance!(
    a_request_id_makes_creation_idempotent,
    a_stale_revision_is_refused_and_nothing_changes,
    a_deployment_orders_its_targets_and_reports_finish_it,
    reports_outside_the_rules_are_refused_without_a_trace,
    a_cancelled_deployment_withdraws_its_orders,
    every_change_leaves_one_audit_record,
    commits_that_change_orders_ring_the_orders_signal,
);

fn sqlite() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deploy.db");
    tests::report::used(&path.to_string_lossy());
    let (store, _feed) =
        SqliteStore::open(SqliteOptions::new(path), Arc::new(SystemClock)).unwrap();
    (store, dir)
}

async fn postgres() -> Option<PostgresStore> {
    let url = tests::report::postgres_or_skip("deploy-svc's PostgreSQL store")?;
    let (_admin, url, _name) = tests::fresh_database(&url, "deploy_store").await;
    tests::report::used(&url);
    let (store, _feed) = tokio::task::spawn_blocking(move || {
        PostgresStore::open(PostgresOptions::new(url), Arc::new(SystemClock))
    })
    .await
    .unwrap()
    .unwrap();
    Some(store)
}

fn caller(principal: &str, request_id: &str) -> Caller {
    Caller {
        principal: principal.into(),
        request_id: request_id.into(),
        trace_parent: None,
    }
}

fn environment(id: &str) -> NewEnvironment {
    NewEnvironment {
        id: id.into(),
        description: format!("the {id} environment"),
        protected: false,
        upstream: None,
        freeze_windows: vec![],
    }
}

fn deployment(environment: &str) -> NewDeployment {
    NewDeployment {
        artifact: "api".into(),
        version: "1.0.0".into(),
        environment: environment.into(),
        change_reference: String::new(),
        emergency: None,
        strategy: Default::default(),
        auto_rollback: false,
        targets: None,
        rollback_of: None,
    }
}

fn report(deployment: i64, target: &str, state: PlacementState) -> PlacementReport {
    PlacementReport {
        deployment,
        environment: "dev".into(),
        target: target.into(),
        state,
        message: String::new(),
    }
}

/// An environment `dev` with `targets`, and the artifact api 1.0.0.
async fn fleet(store: &dyn Store, targets: &[&str]) {
    let who = caller("alice", "");
    store
        .create_environment(environment("dev"), None, who.clone())
        .await
        .unwrap();
    for t in targets {
        store
            .register_target("dev", t, BTreeMap::new(), who.clone())
            .await
            .unwrap();
    }
    let artifact = Artifact {
        name: "api".into(),
        version: "1.0.0".into(),
        digest: format!("sha256:{}", "ab".repeat(32)),
        metadata: BTreeMap::new(),
        source_uri: String::new(),
        create_ms: 0,
    };
    store.register_artifact(artifact, who).await.unwrap();
}

fn page() -> PageRequest {
    PageRequest {
        size: 100,
        after: None,
    }
}

async fn a_request_id_makes_creation_idempotent(store: &dyn Store) {
    let rid = Some("req-1".to_owned());
    let first = store
        .create_environment(environment("dev"), rid.clone(), caller("alice", "req-1"))
        .await
        .unwrap();
    let again = store
        .create_environment(environment("dev"), rid.clone(), caller("alice", "req-1"))
        .await
        .unwrap();
    assert_eq!(first, again, "a retry returns what the first call created");
    let other = store
        .create_environment(environment("prod"), rid, caller("alice", "req-1"))
        .await
        .unwrap_err();
    assert!(
        matches!(other, Error::InvalidArgument(_)),
        "the request id of another request: {other:?}"
    );
    let listed = store.list_environments(page()).await.unwrap();
    let ids: Vec<&str> = listed.items.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        ["dev"],
        "one environment created, none by the reused id"
    );
}

async fn a_stale_revision_is_refused_and_nothing_changes(store: &dyn Store) {
    let created = store
        .create_environment(environment("dev"), None, caller("alice", ""))
        .await
        .unwrap();
    let update = |revision, description: &str| EnvironmentUpdate {
        id: "dev".into(),
        expected_revision: Some(revision),
        description: Some(description.into()),
        ..Default::default()
    };
    let updated = store
        .update_environment(update(created.revision, "first"), caller("alice", ""))
        .await
        .unwrap();
    assert!(updated.revision > created.revision);
    let stale = store
        .update_environment(update(created.revision, "second"), caller("bob", ""))
        .await
        .unwrap_err();
    assert!(matches!(stale, Error::Aborted(_)), "{stale:?}");
    let now = store.get_environment("dev").await.unwrap();
    assert_eq!(now.description, "first");
    assert_eq!(now.revision, updated.revision);
}

async fn a_deployment_orders_its_targets_and_reports_finish_it(store: &dyn Store) {
    fleet(store, &["t1", "t2"]).await;
    let (head_before, _) = log_head(store).await;
    let d = store
        .create_deployment(deployment("dev"), None, caller("alice", ""))
        .await
        .unwrap();
    assert_eq!(d.placements.len(), 2);
    for t in ["t1", "t2"] {
        let orders = store.orders("dev", t).await.unwrap();
        assert_eq!(
            orders.iter().map(|o| o.deployment).collect::<Vec<_>>(),
            [d.id]
        );
    }
    let mut acked = Vec::new();
    for t in ["t1", "t2"] {
        for state in [PlacementState::Placing, PlacementState::Placed] {
            let outcome = store
                .report_placement(report(d.id, t, state), caller("agent", ""))
                .await
                .unwrap();
            assert!(outcome.changed);
            acked.push(outcome.placement.sequence);
        }
    }
    let done = store.get_deployment(d.id).await.unwrap();
    assert_eq!(done.state, DeploymentState::Succeeded);
    // The log holds two PENDING announcements, then the four reports, in commit order.
    let events = store.read_events(head_before, 100).await.unwrap();
    let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences.len(), 6, "{events:?}");
    assert!(
        sequences.windows(2).all(|w| w[1] == w[0] + 1),
        "{sequences:?}"
    );
    assert_eq!(&sequences[2..], &acked[..]);
    // A repeated report changes nothing and writes no event.
    let repeat = store
        .report_placement(
            report(d.id, "t1", PlacementState::Placed),
            caller("agent", ""),
        )
        .await
        .unwrap();
    assert!(!repeat.changed);
    assert_eq!(log_head(store).await.0, *acked.last().unwrap());
}

async fn reports_outside_the_rules_are_refused_without_a_trace(store: &dyn Store) {
    fleet(store, &["t1"]).await;
    store
        .create_environment(environment("prod"), None, caller("alice", ""))
        .await
        .unwrap();
    let d = store
        .create_deployment(deployment("dev"), None, caller("alice", ""))
        .await
        .unwrap();
    let (head, _) = log_head(store).await;
    let unknown = store
        .report_placement(
            report(d.id, "t9", PlacementState::Placing),
            caller("agent", ""),
        )
        .await
        .unwrap_err();
    assert!(matches!(unknown, Error::NotFound(_)), "{unknown:?}");
    let elsewhere = PlacementReport {
        environment: "prod".into(),
        ..report(d.id, "t1", PlacementState::Placing)
    };
    let refused = store
        .report_placement(elsewhere, caller("agent", ""))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, Error::FailedPrecondition(_)),
        "{refused:?}"
    );
    let missing = store
        .report_placement(
            report(d.id + 1000, "t1", PlacementState::Placing),
            caller("agent", ""),
        )
        .await
        .unwrap_err();
    assert!(matches!(missing, Error::NotFound(_)), "{missing:?}");
    assert_eq!(
        log_head(store).await.0,
        head,
        "no event for a refused report"
    );
    let trail = store
        .list_audit_records(AuditFilter::default(), page())
        .await
        .unwrap();
    assert!(
        trail.items.iter().all(|r| r.principal != "agent"),
        "no audit record for a refused report"
    );
}

async fn a_cancelled_deployment_withdraws_its_orders(store: &dyn Store) {
    fleet(store, &["t1"]).await;
    let d = store
        .create_deployment(deployment("dev"), None, caller("alice", ""))
        .await
        .unwrap();
    assert_eq!(store.orders("dev", "t1").await.unwrap().len(), 1);
    let cancelled = store
        .cancel_deployment(d.id, "wrong version".into(), caller("alice", ""))
        .await
        .unwrap();
    assert_eq!(cancelled.state, DeploymentState::Cancelled);
    assert!(store.orders("dev", "t1").await.unwrap().is_empty());
    let again = store
        .cancel_deployment(d.id, "again".into(), caller("alice", ""))
        .await
        .unwrap_err();
    assert!(matches!(again, Error::FailedPrecondition(_)), "{again:?}");
}

async fn every_change_leaves_one_audit_record(store: &dyn Store) {
    fleet(store, &["t1"]).await;
    let d = store
        .create_deployment(deployment("dev"), None, caller("bob", "req-9"))
        .await
        .unwrap();
    let registered = last_heartbeat(store, "t1").await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let placing = store
        .report_placement(
            PlacementReport {
                message: "pulling \"sequence\":1 layers".into(),
                ..report(d.id, "t1", PlacementState::Placing)
            },
            caller("agent", ""),
        )
        .await
        .unwrap();
    // A report is a sign of life: the target's heartbeat moves with it.
    let reported_at = last_heartbeat(store, "t1").await;
    assert!(reported_at > registered, "{reported_at} > {registered}");
    // Reads and heartbeats are not changes.
    store.get_deployment(d.id).await.unwrap();
    store.heartbeat_target("dev", "t1").await.unwrap();
    let trail = store
        .list_audit_records(AuditFilter::default(), page())
        .await
        .unwrap();
    let actions: Vec<(&str, &str)> = trail
        .items
        .iter()
        .map(|r| (r.principal.as_str(), r.action.as_str()))
        .collect();
    assert_eq!(
        actions.len(),
        5,
        "environment, target, artifact, deployment, report: {actions:?}"
    );
    let created = trail
        .items
        .iter()
        .find(|r| r.principal == "bob")
        .expect("the deployment's record");
    assert_eq!(created.request_id, "req-9");
    assert_eq!(created.resource, format!("deployments/{}", d.id));
    // The report's record names the placement's states, its sequence and message, and the
    // deployment's move, exactly (PostgreSQL writes it in the report's one statement).
    let reported = trail
        .items
        .iter()
        .find(|r| r.principal == "agent")
        .expect("the report's record");
    let summary = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
    assert_eq!(
        summary(&reported.before),
        serde_json::json!({"target": "environments/dev/targets/t1", "state": "PENDING",
            "deployment_state": "PENDING"})
    );
    assert_eq!(
        summary(&reported.after),
        serde_json::json!({"target": "environments/dev/targets/t1", "state": "PLACING",
            "sequence": placing.placement.sequence, "message": "pulling \"sequence\":1 layers",
            "deployment_state": "IN_PROGRESS"})
    );
}

/// The last heartbeat of target `id` in `dev`.
async fn last_heartbeat(store: &dyn Store, id: &str) -> i64 {
    let targets = store.list_targets("dev", page()).await.unwrap();
    targets
        .items
        .iter()
        .find(|(t, _)| t.id == id)
        .map(|(t, _)| t.heartbeat_ms)
        .expect("the target is listed")
}

/// Whether `orders` changed since last seen (and marks it seen).
fn rang(orders: &mut tokio::sync::watch::Receiver<u64>) -> bool {
    let changed = orders.has_changed().unwrap_or(false);
    orders.borrow_and_update();
    changed
}

/// The orders signal follows commits: a deployment created or cancelled and a report that
/// changed a placement ring it; a read, a repeated report and a refused write do not.
async fn commits_that_change_orders_ring_the_orders_signal(store: &dyn Store) {
    let mut orders = store.order_changes();
    fleet(store, &["t1"]).await;
    assert!(!rang(&mut orders), "no orders changed yet");
    let d = store
        .create_deployment(deployment("dev"), None, caller("alice", ""))
        .await
        .unwrap();
    assert!(rang(&mut orders), "a new deployment orders its targets");
    store.get_deployment(d.id).await.unwrap();
    assert!(!rang(&mut orders), "a read changes no orders");
    let placing = report(d.id, "t1", PlacementState::Placing);
    store
        .report_placement(placing.clone(), caller("agent", ""))
        .await
        .unwrap();
    assert!(rang(&mut orders), "a report that moves the deployment on");
    store
        .report_placement(placing, caller("agent", ""))
        .await
        .unwrap();
    assert!(!rang(&mut orders), "a repeated report changes nothing");
    store
        .cancel_deployment(d.id, "stop".into(), caller("alice", ""))
        .await
        .unwrap();
    assert!(
        rang(&mut orders),
        "a cancelled deployment withdraws its orders"
    );
    let again = store
        .cancel_deployment(d.id, "stop".into(), caller("alice", ""))
        .await;
    assert!(again.is_err(), "{again:?}");
    assert!(!rang(&mut orders), "a refused write changes no orders");
}

/// The log's head and pruned bound.
async fn log_head(store: &dyn Store) -> (u64, u64) {
    let bounds = store.log_bounds().await.unwrap();
    (bounds.head, bounds.pruned_through)
}
