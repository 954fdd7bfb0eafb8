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
    release_svc_with(db_url, deploy, &[]).await
}

async fn release_svc_with(db_url: &str, deploy: &Binary, extra: &[&str]) -> Binary {
    let deploy_url = format!("http://{}", deploy.addr);
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--database",
        db_url,
        "--deploy-svc",
        &deploy_url,
    ];
    args.extend_from_slice(extra);
    Binary::spawn("release-svc", &args).await
}

/// The replica of `clients` that applies placement events (waiting for one to take it).
async fn applier(clients: &mut [release::Client]) -> usize {
    let start = std::time::Instant::now();
    loop {
        let a = status(&mut clients[0]).await.active;
        let b = status(&mut clients[1]).await.active;
        assert!(!(a && b), "two appliers");
        if a || b {
            return usize::from(b);
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no applier");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn release_svc_serves_from_postgres_and_keeps_its_state_across_a_restart() {
    let Some(url) = tests::report::postgres_or_skip("release-svc on PostgreSQL") else {
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
    let open = eventually(
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
    let closed = eventually(
        &mut rc,
        "new-cart",
        "prod",
        "u1",
        rpb::Reason::NotDeployed,
        Duration::from_secs(10),
    )
    .await;
    assert!(!closed.visible, "{closed:?}");
    release::assert_withdrawn_once(&mut rc, "new-cart", "prod", "1/2").await;

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
/// events and the other takes over, nothing lost, nothing applied twice.
#[tokio::test]
async fn two_replicas_share_one_database_with_one_applier_and_failover() {
    let Some(url) = tests::report::postgres_or_skip("release-svc replicas") else {
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
    let active = applier(&mut clients).await;
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
            start.elapsed() < Duration::from_secs(30),
            "the other replica did not see it within 30 s"
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
    const BURST: u64 = 600;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let burst = {
        let (mut c, sent) = (tests::connect(d.addr).await, sent.clone());
        let churn_targets = churn.targets.len();
        tokio::spawn(async move {
            for t in 0..churn_targets {
                for i in 0..150 {
                    churn.run(&mut c, t, i, 1).await;
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    };
    // The applier dies once the burst is under way (100 events acknowledged)...
    let start = std::time::Instant::now();
    while sent.load(std::sync::atomic::Ordering::Relaxed) < 100 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the burst did not start"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    replicas.remove(active).kill().await;
    // ...and before it is over.
    let at_kill = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(at_kill < BURST, "the burst was over before the kill");
    clients.remove(active);
    let start = std::time::Instant::now();
    loop {
        if status(&mut clients[0]).await.active {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no takeover within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("takeover after {:?}", start.elapsed());
    burst.await.unwrap();
    assert_eq!(sent.load(std::sync::atomic::Ordering::Relaxed), BURST);

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
    drop(g);

    drop(replicas);
    drop(clients);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// A replica that does not apply placement events follows the applier's batches by reading
/// only the placements committed since its last read (not by reloading everything): the
/// gate opens and closes on it as on the applier, its consumer position follows, and its
/// refresh counter shows placement reads and no full reload.
#[tokio::test]
async fn a_standby_replica_follows_placements_without_reloading_everything() {
    let Some(url) = tests::report::postgres_or_skip("release-svc replicas") else {
        return;
    };
    let (admin, db_url, db) = fresh_database(&url, "release_follow").await;
    let dir = tempfile::tempdir().unwrap();
    let d = Binary::start(&dir.path().join("deploy.db"), &[]).await;
    let metrics = [tests::free_port(), tests::free_port()];
    let replicas = [
        release_svc_with(&db_url, &d, &["--metrics-listen", &metrics[0]]).await,
        release_svc_with(&db_url, &d, &["--metrics-listen", &metrics[1]]).await,
    ];
    let mut clients = vec![
        release::connect(replicas[0].addr).await,
        release::connect(replicas[1].addr).await,
    ];
    let active = applier(&mut clients).await;
    let standby = 1 - active;
    let mut dc = tests::connect(d.addr).await;
    // 50% of 2 targets: p-1 placed opens the gate, removed closes it.
    let g = Gated::setup(&mut dc, &mut clients[active], 2, 0.5, 100.0).await;
    let mut sc = clients[standby].clone();
    // The standby sees the release, the gate closed.
    eventually(
        &mut sc,
        "new-cart",
        "prod",
        "u",
        rpb::Reason::NotDeployed,
        Duration::from_secs(10),
    )
    .await;
    let series = |kind: &str| format!("release_svc_replica_refreshes_total{{kind=\"{kind}\"}}");
    let everything_before = tests::metric(&metrics[standby], &series("everything")).await;
    let placements_before = tests::metric(&metrics[standby], &series("placements")).await;

    // Six flips reported to deploy-svc, each awaited on the standby.
    let flips = g.flip_latencies(&mut dc, &mut sc, 6).await;
    assert_eq!(flips.len(), 6);
    // The standby's consumer position follows the applier's.
    let start = std::time::Instant::now();
    loop {
        let (a, s) = (status(&mut clients[active]).await, status(&mut sc).await);
        if s.cursor == a.cursor && s.events_applied == a.events_applied && a.cursor > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "standby {s:?} behind applier {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let placements_after = tests::metric(&metrics[standby], &series("placements")).await;
    let everything_after = tests::metric(&metrics[standby], &series("everything")).await;
    assert!(
        placements_after > placements_before,
        "placement reads: {placements_before} -> {placements_after}"
    );
    assert_eq!(
        everything_after, everything_before,
        "no full reload while only placements changed"
    );

    drop(replicas);
    drop(clients);
    drop(sc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
