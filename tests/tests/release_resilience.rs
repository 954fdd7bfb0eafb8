//! release-svc under failure: SIGKILL while placement events flow (no loss, no double
//! apply), and a deploy-svc outage (every Evaluate answered; events arrive afterwards).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use proto::deploy::v1::PlacementState as P;
use proto::release::v1 as rpb;
use tests::release::{self, eventually};
use tests::{Binary, Churn, Gated, InProcess};

async fn consumer_status(rc: &mut release::Client) -> rpb::ConsumerStatus {
    rc.get_consumer_status(rpb::GetConsumerStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The release-svc command line: port 0, database `db`, following deploy-svc at `deploy`.
fn release_args(db: &std::path::Path, deploy: std::net::SocketAddr) -> Vec<String> {
    vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--database".into(),
        db.to_string_lossy().into_owned(),
        "--deploy-svc".into(),
        format!("http://{deploy}"),
    ]
}

/// Waits until the consumer's cursor reaches `at_least`.
async fn caught_up(
    rc: &mut release::Client,
    at_least: u64,
    within: Duration,
) -> rpb::ConsumerStatus {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let s = consumer_status(rc).await;
        if s.cursor >= at_least {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "release-svc did not catch up: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until release-svc follows deploy-svc (its first snapshot taken), at most 60 s: a
/// fresh release-svc starts from a snapshot, so events written before it connected arrive
/// in that snapshot, not one by one.
async fn following(rc: &mut release::Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = consumer_status(rc).await;
        if s.connected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "release-svc never connected: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every (deployment, target, state, seq) of a placements table.
fn placements(db: &std::path::Path) -> BTreeSet<(i64, String, i64, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT deployment, target, state, seq FROM placements")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn sigkill_while_5000_events_flow_loses_nothing_and_applies_nothing_twice() {
    let d = InProcess::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rdb = dir.path().join("release.db");
    let args = release_args(&rdb, d.addr);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // release-svc starts first, so it applies every event of the log (cursor 0, empty snapshot).
    let r = Binary::spawn("release-svc", &args).await;
    let mut rc = release::connect(r.addr).await;
    following(&mut rc).await;
    let mut dc = d.client().await;
    let churn = Arc::new(Churn::setup(&mut dc, "dev", "api", 10).await);

    let writers: Vec<_> = (0..10)
        .map(|t| {
            let (churn, addr) = (churn.clone(), d.addr);
            tokio::spawn(async move {
                let mut c = tests::connect(addr).await;
                churn.run(&mut c, t, 0, 500).await
            })
        })
        .collect();
    // Kill release-svc mid-stream.
    let at_kill = caught_up(&mut rc, 1000, Duration::from_secs(60)).await;
    assert!(
        at_kill.cursor < churn.head + 5000,
        "the events were not flowing any more"
    );
    r.kill().await;
    let acked: usize = join_all(writers)
        .await
        .into_iter()
        .map(|w| w.unwrap().len())
        .sum();
    assert_eq!(acked, 5000);
    let head = churn.head + 5000;

    let r = Binary::spawn("release-svc", &args).await;
    let mut rc = release::connect(r.addr).await;
    let status = caught_up(&mut rc, head, Duration::from_secs(60)).await;
    assert_eq!(status.cursor, head);
    assert_eq!(
        status.events_applied, head,
        "an event was applied twice or lost"
    );
    assert_eq!(
        placements(&rdb),
        placements(&d.database()),
        "placement state differs from deploy-svc's"
    );
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn deploy_svc_outage_keeps_evaluate_answering_and_events_arrive_after() {
    let dir = tempfile::tempdir().unwrap();
    let ddb = dir.path().join("deploy.db");
    let d = Binary::start(&ddb, &[]).await;
    let daddr = d.addr;
    let r = release::InProcess::start(daddr).await;
    let (mut dc, mut rc) = (tests::connect(daddr).await, r.client().await);
    let g = Gated::setup(&mut dc, &mut rc, 2, 1.0, 100.0).await;
    g.report(&mut dc, &g.targets, P::Placed).await;
    let open = eventually(
        &mut rc,
        "new-cart",
        "prod",
        "u",
        rpb::Reason::Static,
        Duration::from_secs(10),
    )
    .await;
    assert!(open.visible);

    // A client evaluates continuously through the outage; the answers given while
    // deploy-svc is known to be down are counted apart.
    let (stop, outage) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (answered, visible) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let poller = {
        let (stop, outage, answered, visible, mut rc) = (
            stop.clone(),
            outage.clone(),
            answered.clone(),
            visible.clone(),
            rc.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let during = outage.load(Ordering::SeqCst);
                let e = release::evaluate(&mut rc, "new-cart", "prod", "u").await;
                // Counted only if the outage held from before the call to after it.
                if during && outage.load(Ordering::SeqCst) {
                    answered.fetch_add(1, Ordering::SeqCst);
                    if e.visible && e.reason() == rpb::Reason::Static {
                        visible.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    d.kill().await;
    let start = std::time::Instant::now();
    while consumer_status(&mut rc).await.connected {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "release-svc still reports a connection 30 s after deploy-svc died"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The outage lasts until 500 evaluations have been answered during it.
    outage.store(true, Ordering::SeqCst);
    while answered.load(Ordering::SeqCst) < 500 {
        assert!(
            !poller.is_finished(),
            "the poller stopped: an Evaluate failed"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "only {} evaluations answered during the outage",
            answered.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    outage.store(false, Ordering::SeqCst);
    assert!(!consumer_status(&mut rc).await.connected);

    // deploy-svc comes back on the same address and database; a report made now reaches
    // release-svc once it reconnects.
    let listen = daddr.to_string();
    let d = Binary::spawn(
        "deploy-svc",
        &["--listen", &listen, "--database", ddb.to_str().unwrap()],
    )
    .await;
    let mut dc = tests::connect(d.addr).await;
    g.report(&mut dc, &g.targets[1..], P::Removed).await;
    let closed = eventually(
        &mut rc,
        "new-cart",
        "prod",
        "u",
        rpb::Reason::NotDeployed,
        Duration::from_secs(60),
    )
    .await;
    assert!(!closed.visible, "{closed:?}");
    stop.store(true, Ordering::SeqCst);
    poller.await.unwrap();
    // Every call was answered (a failure would have panicked the poller), and every answer
    // given during the outage was the last known decision: visible.
    let (answered, visible) = (
        answered.load(Ordering::SeqCst),
        visible.load(Ordering::SeqCst),
    );
    assert_eq!(
        visible, answered,
        "{visible} of {answered} answers during the outage were visible"
    );
    assert!(consumer_status(&mut rc).await.connected);
    r.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cursor_older_than_deploy_svc_retention_resyncs_from_a_snapshot() {
    let d = InProcess::start_with(|c| c.retention_events = 50).await;
    let dir = tempfile::tempdir().unwrap();
    let rdb = dir.path().join("release.db");
    let args = release_args(&rdb, d.addr);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = Binary::spawn("release-svc", &args).await;
    let mut rc = release::connect(r.addr).await;
    following(&mut rc).await;
    let mut dc = d.client().await;
    let churn = Churn::setup(&mut dc, "dev", "api", 2).await;
    churn.run(&mut dc, 0, 0, 10).await;
    let before = churn.head + 10;
    caught_up(&mut rc, before, Duration::from_secs(20)).await;
    r.kill().await;

    // While release-svc is down, deploy-svc moves on and prunes past its cursor.
    churn.run(&mut dc, 1, 0, 300).await;
    let head = before + 300;
    let r = Binary::spawn("release-svc", &args).await;
    let mut rc = release::connect(r.addr).await;
    let status = caught_up(&mut rc, head, Duration::from_secs(30)).await;
    assert_eq!(status.cursor, head);
    assert_eq!(
        status.events_applied, before,
        "the 300 pruned events came from a snapshot, not one by one"
    );
    assert_eq!(placements(&rdb), placements(&d.database()));
    d.shutdown().await.unwrap();
}
