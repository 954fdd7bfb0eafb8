//! release-svc on PostgreSQL end to end: the real binary with a
//! `postgres://` database, following the real deploy-svc; its decisions, cursor and audit
//! trail survive a SIGKILL and restart. Runs when TEST_DATABASE_URL is set (`.ci/run` sets
//! it); each run gets its own database, dropped at the end.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proto::deploy::v1::PlacementState as P;
use proto::release::v1 as rpb;
use tests::release::{self, eventually};
use tests::{fresh_database, Binary, Gated};

async fn release_svc(db_url: &str, deploy: &Binary) -> Binary {
    Binary::spawn(
        "release-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            db_url,
            "--deploy-svc",
            &format!("http://{}", deploy.addr),
        ],
    )
    .await
}

#[tokio::test]
async fn release_svc_serves_from_postgres_and_keeps_its_state_across_a_restart() {
    let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
        eprintln!("TEST_DATABASE_URL is not set: release-svc on PostgreSQL was not tested");
        return;
    };
    let (admin, db_url, db) = fresh_database(&url, "release_e2e").await;

    let dir = tempfile::tempdir().unwrap();
    let d = Binary::start(&dir.path().join("deploy.db"), &[]).await;
    let r = release_svc(&db_url, &d).await;
    let mut dc = tests::connect(d.addr).await;
    let mut rc = release::connect(r.addr).await;
    let g = Gated::setup(&mut dc, &mut rc, 2, 1.0, 100.0).await;
    g.report(&mut dc, &g.targets, P::Placed).await;
    let (open, _) = eventually(
        &mut rc,
        "new-cart",
        "prod",
        "u1",
        rpb::Reason::Static,
        Duration::from_secs(10),
    )
    .await;
    assert!(open.visible, "{open:?}");
    let before = rc
        .get_consumer_status(rpb::GetConsumerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(before.cursor > 0, "{before:?}");

    // SIGKILL, then a new process on the same database: the same answer at once, the same
    // cursor, and the audit trail as written.
    r.kill().await;
    let r = release_svc(&db_url, &d).await;
    let mut rc = release::connect(r.addr).await;
    let again = release::evaluate(&mut rc, "new-cart", "prod", "u1").await;
    assert!(again.visible, "state restored from PostgreSQL: {again:?}");
    let after = rc
        .get_consumer_status(rpb::GetConsumerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(after.cursor >= before.cursor, "{before:?} {after:?}");
    let audit = rc
        .list_audit_records(rpb::ListAuditRecordsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(
        actions,
        ["CreateFeature", "CreateRelease", "SetRollout"],
        "{audit:?}"
    );
    // A removed placement still withdraws, recorded in PostgreSQL.
    g.report(&mut dc, &g.targets[..1], P::Removed).await;
    let (closed, _) = eventually(
        &mut rc,
        "new-cart",
        "prod",
        "u1",
        rpb::Reason::NotDeployed,
        Duration::from_secs(10),
    )
    .await;
    assert!(!closed.visible, "{closed:?}");
    let withdrawals = rc
        .list_withdrawals(rpb::ListWithdrawalsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(withdrawals.withdrawals.len(), 1, "{withdrawals:?}");

    r.kill().await;
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

async fn status(rc: &mut release::Client) -> rpb::ConsumerStatus {
    rc.get_consumer_status(rpb::GetConsumerStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Two release-svc replicas on one database: exactly one applies placement events; a write
/// on either is served by the other; SIGKILL the applier during a burst of placement
/// events and the other takes over within 5 s, nothing lost, nothing applied twice.
#[tokio::test]
async fn two_replicas_share_one_database_with_one_applier_and_failover() {
    let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
        eprintln!("TEST_DATABASE_URL is not set: release-svc replicas were not tested");
        return;
    };
    let (admin, db_url, db) = fresh_database(&url, "release_replicas").await;
    let dir = tempfile::tempdir().unwrap();
    let d = Binary::start(&dir.path().join("deploy.db"), &[]).await;
    let mut replicas = vec![
        release_svc(&db_url, &d).await,
        release_svc(&db_url, &d).await,
    ];
    let mut clients = vec![
        release::connect(replicas[0].addr).await,
        release::connect(replicas[1].addr).await,
    ];
    // Exactly one applier.
    let start = std::time::Instant::now();
    let active = loop {
        let a = status(&mut clients[0]).await.active;
        let b = status(&mut clients[1]).await.active;
        assert!(!(a && b), "two appliers");
        if a || b {
            break usize::from(b);
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no applier");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let standby = 1 - active;

    // A feature and its release written through the standby are served by the applier.
    let mut dc = tests::connect(d.addr).await;
    let g = Gated::setup(&mut dc, &mut clients[standby], 2, 1.0, 100.0).await;
    let start = std::time::Instant::now();
    loop {
        let seen = clients[active]
            .evaluate(rpb::EvaluateRequest {
                feature: "new-cart".into(),
                context: Some(rpb::EvaluationContext {
                    environment: "prod".into(),
                    targeting_key: "u1".into(),
                    attributes: None,
                }),
            })
            .await;
        if seen.is_ok_and(|r| r.get_ref().release.starts_with("releases/")) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the other replica never saw it"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "write on one replica served by the other after {:?}",
        start.elapsed()
    );

    // The same CreateRelease request id sent to both replicas at once: one release, the
    // same answer from both (a request id is an idempotency key across replicas).
    let create = |mut c: release::Client| async move {
        c.create_release(rpb::CreateReleaseRequest {
            release: Some(rpb::Release {
                features: vec!["new-cart".into()],
                environments: vec![rpb::ReleaseEnvironment {
                    environment: "prod".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            request_id: "race-1".into(),
        })
        .await
        .map(|r| r.into_inner().name)
    };
    let (a, b) = tokio::join!(create(clients[0].clone()), create(clients[1].clone()));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b, "one request id, two releases");

    // A burst of placement events; the applier dies in the middle of it.
    let churn = tests::Churn::setup(&mut dc, "edge", "cdn", 4).await;
    let burst = {
        let mut c = tests::connect(d.addr).await;
        let churn_targets = churn.targets.len();
        tokio::spawn(async move {
            for t in 0..churn_targets {
                churn.run(&mut c, t, 0, 150).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    replicas.remove(active).kill().await;
    clients.remove(active);
    let start = std::time::Instant::now();
    loop {
        if status(&mut clients[0]).await.active {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no takeover within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("takeover after {:?}", start.elapsed());
    burst.await.unwrap();

    // Everything deploy-svc logged is applied, exactly once.
    let mut w = tests::watch::open(&mut dc, Some(0), "", "").await.unwrap();
    let (_, beat) = tests::watch::until_heartbeat(&mut w).await;
    let start = std::time::Instant::now();
    let last = loop {
        let s = status(&mut clients[0]).await;
        if s.cursor >= beat.head_sequence {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{s:?} < {}",
            beat.head_sequence
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(last.cursor, beat.head_sequence, "{last:?}");
    assert_eq!(
        last.events_applied, last.cursor,
        "every event applied exactly once: {last:?}"
    );
    let _ = g;

    drop(replicas);
    drop(clients);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
