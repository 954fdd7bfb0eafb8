//! One conformance suite for release-svc's storage backends: every scenario is one test per
//! backend, each on a fresh store: SQLite (a temp file) and PostgreSQL (TEST_DATABASE_URL, a
//! fresh schema per test). Without TEST_DATABASE_URL the PostgreSQL half is reported as
//! skipped (`scripts/test` counts it); `scripts/test` finds or starts a server and sets it.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
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

/// One `#[tokio::test]` per scenario per backend, each on a fresh store.
macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let backend = super::sqlite();
                    super::$scenario(&backend).await;
                    super::report::used(&backend.database);
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let Some(backend) = super::postgres().await else { return };
                    super::$scenario(&backend).await;
                    super::report::used(&backend.database);
                    super::drop_schema(&backend).await;
                }
            )*
        }
    };
}

conformance!(
    features_are_unique_and_updated_optimistically,
    releases_are_idempotent_per_request_id_and_updated_optimistically,
    a_policy_is_created_once,
    placements_apply_once_with_their_withdrawals,
    everything_survives_a_reopen_as_written,
    a_resync_replaces_every_placement,
    the_audit_trail_holds_only_what_committed_in_order,
    audit_filters_prefixes_and_pages_hold,
    stored_rows_that_do_not_decode_fail_loudly_naming_their_row,
);

type Reopen = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn Store>>>>>;

/// A fresh store on one backend, and a way to open a second handle on the same data.
struct Backend {
    store: Arc<dyn Store>,
    reopen: Reopen,
    database: String,
    /// The PostgreSQL schema of the scenario.
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("release.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let database = path.to_string_lossy().into_owned();
    Backend {
        store,
        reopen: Box::new(move || {
            let path = path.clone();
            Box::pin(async move { Arc::new(SqliteStore::open(&path).unwrap()) as Arc<dyn Store> })
        }),
        database,
        schema: None,
        _dir: Some(dir),
    }
}

async fn postgres() -> Option<Backend> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let url = report::postgres_or_skip("release-svc's PostgreSQL store")?;
    let schema = format!(
        "conformance_{}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let store: Arc<dyn Store> = PostgresStore::open(&url, Some(&schema))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is not usable: {e}"));
    let database = url.clone();
    let kept = Some(schema.clone());
    Some(Backend {
        store,
        reopen: Box::new(move || {
            let (url, schema) = (url.clone(), schema.clone());
            Box::pin(async move {
                PostgresStore::open(&url, Some(&schema)).await.unwrap() as Arc<dyn Store>
            })
        }),
        database,
        schema: kept,
        _dir: None,
    })
}

/// Drops the scenario's schema once it passed, and any an earlier run left over an hour ago
/// (a failed scenario keeps its schema for a look).
async fn drop_schema(b: &Backend) {
    let Some(schema) = &b.schema else { return };
    let (client, connection) = tokio_postgres::connect(&b.database, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let rows = client
        .query(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'conformance\\_%'",
            &[],
        )
        .await
        .unwrap();
    for row in rows {
        let name: String = row.get(0);
        let born: u128 = name
            .split('_')
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(now_ns);
        if name == *schema || now_ns.saturating_sub(born) > 3_600_000_000_000 {
            client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                .await
                .unwrap();
        }
    }
}

/// Feature `a`: inserted, refused a second time, updated to revision 2, refused a stale
/// update.
async fn write_features(store: &dyn Store) {
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
    assert!(matches!(dup, Err(Error::AlreadyExists { .. })), "{dup:?}");
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
    assert!(matches!(stale, Err(Error::Aborted(_))), "{stale:?}");
}

/// A release of `a`: created once per request id, updated to revision 2 (released at
/// 100%), refused a stale update. Returns its id and what it became.
async fn write_release(store: &dyn Store) -> (i64, Release) {
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
        "a retry returns the first release"
    );
    let other = store
        .insert_release(
            release(&["b"]),
            Some("req-1".into()),
            audit("CreateRelease", "releases/", "rita", 22),
        )
        .await;
    assert!(matches!(other, Err(Error::InvalidArgument(_))), "{other:?}");
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
    assert!(matches!(conflict, Err(Error::Aborted(_))), "{conflict:?}");
    (id, next)
}

/// The policy of `prod`: created, refused a second creation. Returns it.
async fn write_policy(store: &dyn Store) -> Policy {
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
    assert!(matches!(twice, Err(Error::Aborted(_))), "{twice:?}");
    policy
}

/// Three placement events applied once (a replay applies nothing) with a withdrawal of
/// `a` in `prod` and its audit record.
async fn write_placements(store: &dyn Store) {
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
    assert_eq!(replay, 3, "a replay applies nothing");
    let withdrawals = store.list_withdrawals(None, 10).await.unwrap();
    assert_eq!(withdrawals.len(), 1);
    assert_eq!(withdrawals[0].1, w);
}

/// Every write of the suite, in order: features, a release, a policy, placements.
async fn write_everything(store: &dyn Store) -> (i64, Release, Policy) {
    write_features(store).await;
    let (id, next) = write_release(store).await;
    let policy = write_policy(store).await;
    write_placements(store).await;
    (id, next, policy)
}

async fn features_are_unique_and_updated_optimistically(b: &Backend) {
    write_features(b.store.as_ref()).await;
    let loaded = b.store.load().await.unwrap();
    assert_eq!(*loaded.features["a"], feature("a", 2));
}

async fn releases_are_idempotent_per_request_id_and_updated_optimistically(b: &Backend) {
    let (id, next) = write_release(b.store.as_ref()).await;
    let loaded = b.store.load().await.unwrap();
    assert_eq!(loaded.releases[&id], next);
    assert_eq!(loaded.releases.len(), 1, "one release for one request id");
}

async fn a_policy_is_created_once(b: &Backend) {
    let policy = write_policy(b.store.as_ref()).await;
    assert_eq!(b.store.load().await.unwrap().policies["prod"], policy);
}

async fn placements_apply_once_with_their_withdrawals(b: &Backend) {
    write_placements(b.store.as_ref()).await;
    let loaded = b.store.load().await.unwrap();
    assert_eq!((loaded.cursor, loaded.events_applied), (3, 3));
}

async fn everything_survives_a_reopen_as_written(b: &Backend) {
    let (id, next, policy) = write_everything(b.store.as_ref()).await;
    let loaded = (b.reopen)().await.load().await.unwrap();
    assert_eq!(*loaded.features["a"], feature("a", 2));
    assert_eq!(loaded.releases[&id], next);
    assert_eq!(loaded.policies["prod"], policy);
    assert_eq!((loaded.cursor, loaded.events_applied), (3, 3));
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
    );
}

async fn a_resync_replaces_every_placement(b: &Backend) {
    let store = &b.store;
    write_placements(store.as_ref()).await;
    store
        .replace_placements(
            vec![placement(9, "t3", PlacementState::Placed)],
            9,
            Vec::new(),
        )
        .await
        .unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.placements.len(), 1);
    assert_eq!(loaded.cursor, 9);
    // A resync is not a change anyone made: the trail holds only the withdrawal's record.
    let trail = trail(store.as_ref()).await;
    let actions: Vec<&str> = trail.iter().map(|(_, a)| a.action.as_str()).collect();
    assert_eq!(actions, ["auto.withdraw"]);
}

/// Every write of the suite, then the whole audit trail (the release's record names the
/// release it created).
async fn audited(store: &dyn Store) -> Vec<(i64, AuditEntry)> {
    let (id, _, _) = write_everything(store).await;
    let all = trail(store).await;
    assert_eq!(all[2].1.resource, format!("releases/{id}"));
    all
}

/// The whole audit trail, oldest first.
async fn trail(store: &dyn Store) -> Vec<(i64, AuditEntry)> {
    store
        .list_audit(AuditFilter {
            limit: 100,
            ..AuditFilter::default()
        })
        .await
        .unwrap()
}

async fn the_audit_trail_holds_only_what_committed_in_order(b: &Backend) {
    let store = &b.store;
    let all = audited(store.as_ref()).await;
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
        "refused writes left no record"
    );
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
    assert_eq!(rita.len(), 1, "{rita:?}");
}

async fn audit_filters_prefixes_and_pages_hold(b: &Backend) {
    let store = &b.store;
    let all = audited(store.as_ref()).await;
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
    );
    assert_eq!(
        by_prefix(all[2].1.resource.clone()).await,
        ["CreateRelease", "SetRollout"],
    );
    assert!(by_prefix(format!("{}0", all[2].1.resource))
        .await
        .is_empty(),);
    assert!(by_prefix("releases0".into()).await.is_empty());
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
    assert_eq!(first_page.len() + rest.len(), all.len());
}

/// The report to `scripts/test` (backends used, tests skipped), shared with the end-to-end
/// tests.
#[path = "../../tests/src/report.rs"]
mod report;

/// Runs `sql` on the backend's database directly, beside the store (as a bad migration, a
/// hand edit or disk corruption would).
async fn raw(b: &Backend, sql: &str) {
    match &b.schema {
        None => rusqlite::Connection::open(&b.database)
            .unwrap()
            .execute_batch(sql)
            .unwrap(),
        Some(schema) => {
            let (client, connection) = tokio_postgres::connect(&b.database, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client
                .batch_execute(&format!("SET search_path TO \"{schema}\"; {sql}"))
                .await
                .unwrap();
        }
    }
}

/// The load's error, which must be INTERNAL and name `table` and `row`.
async fn load_fails(store: &dyn Store, table: &str, row: &str) {
    let err = store.load().await.unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(table) && text.contains(row), "{text}");
}

async fn stored_rows_that_do_not_decode_fail_loudly_naming_their_row(b: &Backend) {
    let store = &*b.store;
    store.load().await.unwrap();
    raw(
        b,
        "INSERT INTO placements (deployment, target, environment, artifact, version, state, seq) VALUES (1, 't1', 'prod', 'web', '1.0.0', 99, 1)",
    )
    .await;
    load_fails(store, "placements", "1/t1").await;
    raw(b, "UPDATE placements SET state = 2").await;
    store.load().await.unwrap();
    raw(
        b,
        "INSERT INTO features (key, body, revision, create_ms, update_ms) VALUES ('broken', '{\"description\": 1', 1, 0, 0)",
    )
    .await;
    load_fails(store, "features", "broken").await;
    raw(b, "DELETE FROM features").await;
    raw(
        b,
        "INSERT INTO releases (id, description, features, environments, state, revision, create_ms, update_ms, governance) VALUES (41, 'r', '[]', '[]', 99, 1, 0, 0, '{}')",
    )
    .await;
    load_fails(store, "releases", "41").await;
    raw(b, "DELETE FROM releases").await;
    raw(
        b,
        "INSERT INTO policies (environment, body, revision, update_ms) VALUES ('prod', '[]', 1, 0)",
    )
    .await;
    load_fails(store, "policies", "prod").await;
    raw(b, "DELETE FROM policies").await;
    store.load().await.unwrap();
}
