//! One conformance suite for release-svc's storage backends: every scenario runs against
//! SQLite (a temp file) and PostgreSQL (TEST_DATABASE_URL, a fresh schema per run). Without
//! TEST_DATABASE_URL the PostgreSQL half is reported as skipped (`scripts/test` counts it);
//! `scripts/test` finds or starts a server and sets it.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use release_svc::domain::model::{Feature, Release, ReleaseEnvironment, ReleaseState};
use release_svc::domain::placements::{Placement, PlacementState};
use release_svc::domain::policy::Policy;
use release_svc::domain::Error;
use release_svc::store::postgres::PostgresStore;
use release_svc::store::sqlite::SqliteStore;
use release_svc::store::{AuditEntry, AuditFilter, Store, Withdrawal};

fn feature(key: &str, revision: i64) -> Feature {
    Feature {
        key: key.into(),
        description: "d".into(),
        owner: "team".into(),
        variants: Feature::boolean_variants(),
        default_variant: "on".into(),
        off_variant: "off".into(),
        targeting: None,
        allow: vec!["ann".into()],
        deny: Vec::new(),
        carriers: Vec::new(),
        disabled: false,
        // Stored and loaded back by both backends (the suite compares whole features).
        metadata: [
            ("team".to_owned(), serde_json::json!("web")),
            ("tier".to_owned(), serde_json::json!(2)),
        ]
        .into(),
        revision,
        create_ms: 1,
        update_ms: revision,
        // Archived from the second revision on: stored and loaded back alike.
        archived_ms: (revision > 1).then_some(revision * 10),
    }
}

fn release(features: &[&str]) -> Release {
    Release {
        id: 0,
        description: "r".into(),
        features: features.iter().map(|f| (*f).to_owned()).collect(),
        environments: vec![ReleaseEnvironment {
            environment: "prod".into(),
            rollout_percent: 10.0,
            started_ms: Some(5),
            ..ReleaseEnvironment::default()
        }],
        state: ReleaseState::Releasing,
        governance: Default::default(),
        revision: 1,
        create_ms: 1,
        update_ms: 1,
    }
}

fn audit(action: &str, resource: &str, principal: &str, time_ms: i64) -> AuditEntry {
    AuditEntry {
        time_ms,
        principal: principal.into(),
        action: action.into(),
        resource: resource.into(),
        ..AuditEntry::default()
    }
}

fn placement(seq: u64, target: &str, state: PlacementState) -> Placement {
    Placement {
        deployment: 1,
        target: target.into(),
        environment: "prod".into(),
        artifact: "app".into(),
        version: "1.0.0".into(),
        state,
        sequence: seq,
    }
}

/// Every scenario, against one backend; `reopen` gives a second handle on the same data.
async fn conformance<F, Fut>(name: &str, store: Arc<dyn Store>, reopen: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Store>>,
{
    // Features: insert, duplicate, optimistic update.
    store
        .insert_feature(
            feature("a", 1),
            audit("CreateFeature", "features/a", "ann", 10),
        )
        .await
        .unwrap();
    let dup = store
        .insert_feature(
            feature("a", 1),
            audit("CreateFeature", "features/a", "ann", 11),
        )
        .await;
    assert!(
        matches!(dup, Err(Error::AlreadyExists { .. })),
        "{name}: {dup:?}"
    );
    store
        .update_feature(
            feature("a", 2),
            1,
            audit("UpdateFeature", "features/a", "ben", 12),
        )
        .await
        .unwrap();
    let stale = store
        .update_feature(
            feature("a", 3),
            1,
            audit("UpdateFeature", "features/a", "ben", 13),
        )
        .await;
    assert!(matches!(stale, Err(Error::Aborted(_))), "{name}: {stale:?}");

    // Releases: ids, request-id idempotency, optimistic update.
    let (id, created) = store
        .insert_release(
            release(&["a"]),
            Some("req-1".into()),
            audit("CreateRelease", "releases/", "rita", 20),
        )
        .await
        .unwrap();
    assert!(created);
    let (again, created) = store
        .insert_release(
            release(&["a"]),
            Some("req-1".into()),
            audit("CreateRelease", "releases/", "rita", 21),
        )
        .await
        .unwrap();
    assert_eq!(
        (again, created),
        (id, false),
        "{name}: a retry returns the first release"
    );
    let other = store
        .insert_release(
            release(&["b"]),
            Some("req-1".into()),
            audit("CreateRelease", "releases/", "rita", 22),
        )
        .await;
    assert!(
        matches!(other, Err(Error::InvalidArgument(_))),
        "{name}: {other:?}"
    );
    let mut next = release(&["a"]);
    next.id = id;
    next.revision = 2;
    next.environments[0].rollout_percent = 100.0;
    next.environments[0].full_since_ms = Some(30);
    next.state = ReleaseState::Released;
    next.governance.requester = "rita".into();
    next.governance.change_reference = "CHG-1".into();
    store
        .update_release(
            next.clone(),
            1,
            vec![audit("SetRollout", &format!("releases/{id}"), "rita", 30)],
        )
        .await
        .unwrap();
    let conflict = store
        .update_release(
            next.clone(),
            1,
            vec![audit("SetRollout", &format!("releases/{id}"), "rita", 31)],
        )
        .await;
    assert!(
        matches!(conflict, Err(Error::Aborted(_))),
        "{name}: {conflict:?}"
    );

    // Policies: create, etag.
    let policy = Policy {
        environment: "prod".into(),
        required_approvals: 2,
        approvers: vec!["ann".into(), "ben".into()],
        min_soak_ms: 3_600_000,
        revision: 1,
        update_ms: 40,
        ..Policy::default()
    };
    store
        .put_policy(
            policy.clone(),
            0,
            audit("SetPolicy", "policies/prod", "pat", 40),
        )
        .await
        .unwrap();
    let twice = store
        .put_policy(
            policy.clone(),
            0,
            audit("SetPolicy", "policies/prod", "pat", 41),
        )
        .await;
    assert!(matches!(twice, Err(Error::Aborted(_))), "{name}: {twice:?}");

    // Placements: applied once, cursor and counter in the same transaction, withdrawals
    // recorded with their audit records.
    let events = vec![
        placement(1, "t1", PlacementState::Pending),
        placement(2, "t1", PlacementState::Placed),
        placement(3, "t2", PlacementState::Placed),
    ];
    let w = Withdrawal {
        feature: "a".into(),
        environment: "prod".into(),
        reason: "checkout: 1/2 targets".into(),
        sequence: 3,
        time_ms: 50,
    };
    let applied = store
        .apply_placements(events.clone(), 3, vec![w.clone()])
        .await
        .unwrap();
    assert_eq!(applied, 3);
    let replay = store.apply_placements(events, 3, Vec::new()).await.unwrap();
    assert_eq!(replay, 3, "{name}: a replay applies nothing");
    let withdrawals = store.list_withdrawals(None, 10).await.unwrap();
    assert_eq!(withdrawals.len(), 1);
    assert_eq!(withdrawals[0].1, w);

    // Everything survives a reopen, as written.
    let loaded = reopen().await.load().await.unwrap();
    assert_eq!(*loaded.features["a"], feature("a", 2), "{name}");
    assert_eq!(loaded.releases[&id], next, "{name}");
    assert_eq!(loaded.policies["prod"], policy, "{name}");
    assert_eq!((loaded.cursor, loaded.events_applied), (3, 3), "{name}");
    let mut placements: BTreeMap<String, PlacementState> = BTreeMap::new();
    for p in &loaded.placements {
        placements.insert(p.target.clone(), p.state);
    }
    assert_eq!(
        placements,
        BTreeMap::from([
            ("t1".to_owned(), PlacementState::Placed),
            ("t2".to_owned(), PlacementState::Placed)
        ]),
        "{name}"
    );

    // A resync replaces every placement.
    store
        .replace_placements(
            vec![placement(9, "t3", PlacementState::Placed)],
            9,
            Vec::new(),
        )
        .await
        .unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.placements.len(), 1, "{name}");
    assert_eq!(loaded.cursor, 9);

    // The audit trail: only what committed, in order; filters and pages.
    let all = store
        .list_audit(AuditFilter {
            limit: 100,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    let actions: Vec<(&str, &str)> = all
        .iter()
        .map(|(_, a)| (a.action.as_str(), a.principal.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("CreateFeature", "ann"),
            ("UpdateFeature", "ben"),
            ("CreateRelease", "rita"),
            ("SetRollout", "rita"),
            ("SetPolicy", "pat"),
            ("auto.withdraw", "system")
        ],
        "{name}: refused writes left no record"
    );
    assert_eq!(all[2].1.resource, format!("releases/{id}"));
    let rita = store
        .list_audit(AuditFilter {
            principal: "rita".into(),
            resource_prefix: "releases/".into(),
            start_ms: Some(25),
            limit: 100,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(rita.len(), 1, "{name}: {rita:?}");
    // A prefix is a prefix: every record under it, in order, and nothing else (SQLite reads
    // it as an index range on its read-only connection).
    let by_prefix = |prefix: String| {
        let store = store.clone();
        async move {
            store
                .list_audit(AuditFilter {
                    resource_prefix: prefix,
                    limit: 100,
                    ..AuditFilter::default()
                })
                .await
                .unwrap()
                .into_iter()
                .map(|(_, a)| a.action)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        by_prefix("features/".into()).await,
        ["CreateFeature", "UpdateFeature", "auto.withdraw"],
        "{name}"
    );
    assert_eq!(
        by_prefix(all[2].1.resource.clone()).await,
        ["CreateRelease", "SetRollout"],
        "{name}"
    );
    assert!(
        by_prefix(format!("{}0", all[2].1.resource))
            .await
            .is_empty(),
        "{name}"
    );
    assert!(by_prefix("releases0".into()).await.is_empty(), "{name}");
    let first_page = store
        .list_audit(AuditFilter {
            limit: 4,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    let rest = store
        .list_audit(AuditFilter {
            after_id: first_page.last().unwrap().0,
            limit: 4,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(first_page.len() + rest.len(), all.len(), "{name}");
}

#[tokio::test]
async fn sqlite_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("release.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    conformance("sqlite", store, || async {
        Arc::new(SqliteStore::open(&path).unwrap()) as Arc<dyn Store>
    })
    .await;
    report::used(&path.to_string_lossy());
}

#[tokio::test]
async fn postgres_backend_conforms() {
    let Some(url) = report::postgres_or_skip("release-svc's PostgreSQL store") else {
        return;
    };
    let schema = format!(
        "conformance_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let store: Arc<dyn Store> = PostgresStore::open(&url, Some(&schema))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is not usable: {e}"));
    conformance("postgres", store, || async {
        PostgresStore::open(&url, Some(&schema)).await.unwrap() as Arc<dyn Store>
    })
    .await;
    report::used(&url);
}

/// The report to `scripts/test` (backends used, tests skipped), shared with the end-to-end
/// tests.
#[path = "../../tests/src/report.rs"]
mod report;
