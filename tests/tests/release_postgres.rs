//! release-svc on PostgreSQL end to end (issue 6, first step): the real binary with a
//! `postgres://` database, following the real deploy-svc; its decisions, cursor and audit
//! trail survive a SIGKILL and restart. Runs when TEST_DATABASE_URL is set (`.ci/run` sets
//! it); each run gets its own database, dropped at the end.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proto::deploy::v1::PlacementState as P;
use proto::release::v1 as rpb;
use tests::release::{self, eventually};
use tests::{Binary, Gated};

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
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is not reachable: {e}"));
    tokio::spawn(connection);
    let db = format!(
        "release_e2e_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    let db_url = format!("{base}/{db}");

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
