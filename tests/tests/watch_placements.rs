//! WatchPlacements: ordered, unique, atomic, reliable, resumable, bookmarkable; slow
//! watchers cut off without stalling anyone; retention and range errors; shutdown.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use proto::deploy::v1 as pb;
use tests::status::{expect_code, violated_rules};
use tests::watch::{self, assert_gap_free, sequences};
use tests::{artifact, deploy, environment, report, targets, Binary, Churn, InProcess};
use tonic::Code;

#[tokio::test]
async fn watcher_receives_1000_reports_in_order_and_resumes_after_300() {
    let server = InProcess::start().await;
    let mut c = server.client().await;
    let churn = Churn::setup(&mut c, "dev", "api", 1).await;
    let mut w = watch::open(&mut c, None, "", "").await.unwrap();
    let (_, start) = watch::snapshot(&mut w).await;

    let acked = churn.run(&mut c, 0, 0, 1000).await;
    let got = watch::events(&mut w, 1000).await;
    assert_gap_free(&got, start + 1);
    assert_eq!(
        sequences(&got),
        acked,
        "events arrive in commit order, once each"
    );
    for (i, e) in got.iter().enumerate() {
        assert_eq!(e.placement.as_ref().unwrap().state(), Churn::state(i));
    }
    drop(w);

    // (b) A client that processed 300 events resumes after the 300th: exactly 301..1000.
    let mut first = watch::open(&mut c, Some(start), "", "").await.unwrap();
    let head300 = watch::events(&mut first, 300).await;
    drop(first);
    let resume_after = head300.last().unwrap().sequence;
    let mut resumed = watch::open(&mut c, Some(resume_after), "", "")
        .await
        .unwrap();
    let (rest, hb) = watch::until_heartbeat(&mut resumed).await;
    assert_eq!(rest.len(), 700);
    assert_gap_free(&rest, resume_after + 1);
    assert_eq!(sequences(&rest), acked[300..].to_vec());
    assert_eq!(hb.sequence, *acked.last().unwrap());
    assert_eq!(hb.head_sequence, *acked.last().unwrap());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn eight_writers_three_watchers_match_the_stored_log() {
    let server = InProcess::start().await;
    let mut c = server.client().await;
    let churn = std::sync::Arc::new(Churn::setup(&mut c, "dev", "api", 8).await);
    let mut watchers = Vec::new();
    let head = churn.head;
    assert_eq!(
        head, 8,
        "one PENDING event per target of the new deployment"
    );
    for _ in 0..3 {
        let mut w = watch::open(&mut c, Some(head), "", "").await.unwrap();
        watchers.push(tokio::spawn(
            async move { watch::events(&mut w, 4000).await },
        ));
    }
    let writers = (0..8).map(|t| {
        let churn = churn.clone();
        let addr = server.addr;
        tokio::spawn(async move {
            let mut c = tests::connect(addr).await;
            churn.run(&mut c, t, 0, 500).await
        })
    });
    let mut acked: Vec<u64> = join_all(writers)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    acked.sort_unstable();

    let stored = stored_events(&server.database(), head).await;
    assert_eq!(stored.len(), 4000);
    let stored_seqs: Vec<u64> = stored.iter().map(|s| s.0).collect();
    assert_eq!(
        stored_seqs, acked,
        "every acknowledged report is one stored event"
    );
    for w in watchers {
        let got = w.await.unwrap();
        assert_eq!(sequences(&got), stored_seqs);
        for (e, s) in got.iter().zip(&stored) {
            let p = e.placement.as_ref().unwrap();
            assert_eq!(p.target, format!("environments/dev/targets/{}", s.1));
            assert_eq!(i64::from(p.state), s.2);
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn sigkill_after_acknowledged_reports_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = tests::deploy_database(dir.path()).await;
    let bin = Binary::start(&db, &[]).await;
    let mut c = tests::connect(bin.addr).await;
    let churn = std::sync::Arc::new(Churn::setup(&mut c, "dev", "api", 4).await);
    // Four writers report as fast as they can; each remembers what was acknowledged.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (churn, acked, addr) = (churn.clone(), acked.clone(), bin.addr);
            tokio::spawn(async move {
                let mut c = tests::connect(addr).await;
                let mut i = 0;
                loop {
                    match report(
                        &mut c,
                        &churn.deployment,
                        &churn.targets[t],
                        Churn::state(i),
                    )
                    .await
                    {
                        Ok(r) => {
                            let p = r.placement.unwrap();
                            acked.lock().unwrap().push((r.sequence, p.target, p.state));
                        }
                        Err(_) => return,
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let start = std::time::Instant::now();
    while acked.lock().unwrap().len() < 400 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "400 reports were not acknowledged within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bin.kill().await;
    join_all(writers).await;
    let acked = acked.lock().unwrap().clone();

    let bin = Binary::start(&db, &[]).await;
    let mut c = tests::connect(bin.addr).await;
    let mut w = watch::open(&mut c, Some(0), "", "").await.unwrap();
    let (replayed, hb) = watch::until_heartbeat(&mut w).await;
    if tests::report::switched_to_postgres().is_some() {
        // PostgreSQL skips the sequence numbers of transactions that never committed (the
        // kill cuts some off): the log is ordered, not dense.
        assert!(
            replayed.windows(2).all(|p| p[0].sequence < p[1].sequence),
            "the replay is out of order"
        );
    } else {
        assert_gap_free(&replayed, 1);
    }
    assert_eq!(hb.head_sequence, replayed.last().unwrap().sequence);
    let stored: HashSet<(u64, String, i32)> = replayed
        .iter()
        .map(|e| {
            let p = e.placement.clone().unwrap();
            (e.sequence, p.target, p.state)
        })
        .collect();
    for a in &acked {
        assert!(
            stored.contains(a),
            "acknowledged event {a:?} lost after SIGKILL"
        );
    }
    // The restarted server keeps streaming live events after the replay.
    let last_state = replayed
        .iter()
        .rev()
        .find(|e| e.placement.as_ref().unwrap().target == churn.targets[0])
        .map(|e| e.placement.as_ref().unwrap().state());
    let next_state = if last_state == Some(pb::PlacementState::Placing) {
        pb::PlacementState::Removed
    } else {
        pb::PlacementState::Placing
    };
    let next = report(&mut c, &churn.deployment, &churn.targets[0], next_state)
        .await
        .unwrap();
    let live = watch::events(&mut w, 1).await;
    // After the head; on PostgreSQL a transaction cut off by the SIGKILL may have taken the
    // next sequence number, which is then skipped (the log stays ordered, not dense).
    assert!(live[0].sequence > hb.head_sequence, "{live:?}");
    assert_eq!(live[0].sequence, next.sequence);
}

#[tokio::test]
async fn snapshot_then_events_with_filters() {
    let server = InProcess::start().await;
    let mut c = server.client().await;
    environment(&mut c, "dev", None, false).await;
    environment(&mut c, "qa", None, false).await;
    let dev_t = targets(&mut c, "dev", "d", 2).await;
    let qa_t = targets(&mut c, "qa", "q", 1).await;
    artifact(&mut c, "api", "1.0.0").await;
    artifact(&mut c, "web", "1.0.0").await;
    let api_dev = deploy(&mut c, "api", "1.0.0", "dev", "").await.unwrap();
    let web_dev = deploy(&mut c, "web", "1.0.0", "dev", "").await.unwrap();
    let api_qa = deploy(&mut c, "api", "1.0.0", "qa", "").await.unwrap();
    report(&mut c, &api_dev.name, &dev_t[0], pb::PlacementState::Placed)
        .await
        .unwrap();
    report(
        &mut c,
        &api_dev.name,
        &dev_t[1],
        pb::PlacementState::Placing,
    )
    .await
    .unwrap();
    report(&mut c, &web_dev.name, &dev_t[0], pb::PlacementState::Placed)
        .await
        .unwrap();
    report(&mut c, &api_qa.name, &qa_t[0], pb::PlacementState::Placed)
        .await
        .unwrap();
    // The snapshot holds every placement in its current state, pending and removed ones too.
    report(
        &mut c,
        &web_dev.name,
        &dev_t[0],
        pb::PlacementState::Removed,
    )
    .await
    .unwrap();

    let mut all = watch::open(&mut c, None, "", "").await.unwrap();
    let (snap, seq) = watch::snapshot(&mut all).await;
    // 5 PENDING events (one per included target of the 3 deployments) + 5 reports.
    assert_eq!(seq, 10);
    let mut current: Vec<(String, String, i32)> = snap
        .iter()
        .map(|p| (p.deployment.clone(), p.target.clone(), p.state))
        .collect();
    current.sort();
    assert_eq!(
        current,
        vec![
            (
                api_dev.name.clone(),
                dev_t[0].clone(),
                pb::PlacementState::Placed as i32
            ),
            (
                api_dev.name.clone(),
                dev_t[1].clone(),
                pb::PlacementState::Placing as i32
            ),
            (
                web_dev.name.clone(),
                dev_t[0].clone(),
                pb::PlacementState::Removed as i32
            ),
            (
                web_dev.name.clone(),
                dev_t[1].clone(),
                pb::PlacementState::Pending as i32
            ),
            (
                api_qa.name.clone(),
                qa_t[0].clone(),
                pb::PlacementState::Placed as i32
            ),
        ]
    );
    let mut dev_api = watch::open(&mut c, None, "environments/dev", "api")
        .await
        .unwrap();
    let (snap, _) = watch::snapshot(&mut dev_api).await;
    assert_eq!(snap.len(), 2);
    assert!(snap
        .iter()
        .all(|p| p.environment == "environments/dev" && p.artifact == "api"));

    // Later events: only matching ones reach the filtered watcher, and its heartbeat still
    // advances past the filtered ones.
    report(&mut c, &api_qa.name, &qa_t[0], pb::PlacementState::Removed)
        .await
        .unwrap();
    let placed = report(&mut c, &api_dev.name, &dev_t[1], pb::PlacementState::Placed)
        .await
        .unwrap();
    let (events, hb) = watch::until_heartbeat(&mut dev_api).await;
    assert_eq!(sequences(&events), [placed.sequence]);
    assert_eq!(hb.sequence, placed.sequence);
    let got = watch::events(&mut all, 2).await;
    assert_gap_free(&got, 11);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn positions_outside_the_retained_log_are_refused() {
    let server = InProcess::start_with(|c| c.retention_events = 50).await;
    let mut c = server.client().await;
    let churn = Churn::setup(&mut c, "dev", "api", 1).await;
    let acked = churn.run(&mut c, 0, 0, 200).await;
    let head = *acked.last().unwrap();
    // Too old: the client must resync from a snapshot.
    let rules = violated_rules(watch::open(&mut c, Some(0), "", "").await);
    assert_eq!(rules, ["EVENT_RETENTION"]);
    // Ahead of the head.
    expect_code(
        watch::open(&mut c, Some(head + 10), "", "").await,
        Code::OutOfRange,
    );
    // A recent position still works, and so does a snapshot.
    let mut w = watch::open(&mut c, Some(head - 10), "", "").await.unwrap();
    assert_eq!(
        sequences(&watch::events(&mut w, 10).await),
        acked[190..].to_vec()
    );
    let mut s = watch::open(&mut c, None, "", "").await.unwrap();
    assert_eq!(watch::snapshot(&mut s).await.1, head);
    // Bad start.
    let bad = c
        .watch_placements(pb::WatchPlacementsRequest::default())
        .await;
    assert_eq!(tests::status::bad_fields(bad), ["start"]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_slow_watcher_is_cut_off_without_stalling_writers_or_other_watchers() {
    let server = InProcess::start_with(|c| {
        c.watch_queue = 16;
        c.slow_watcher_timeout_ms = 300;
        // Sequential reports each wait for their own commit; skip the fsync to keep the
        // test short (durability is not what it checks).
        c.synchronous = "normal".into();
    })
    .await;
    let mut c = server.client().await;
    let churn = Churn::setup(&mut c, "dev", "api", 1).await;
    let mut fast = watch::open(&mut c, Some(churn.head), "", "").await.unwrap();
    // The slow watcher opens its own connection with a small HTTP/2 window, so the server
    // feels its backpressure quickly, and reads nothing for a while.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(Some(8 * 1024))
        .initial_connection_window_size(Some(64 * 1024))
        .connect()
        .await
        .unwrap();
    let mut slow_client = tests::Client::new(channel);
    let mut slow = watch::open(&mut slow_client, Some(churn.head), "", "")
        .await
        .unwrap();

    let fast_reader = tokio::spawn(async move { watch::events(&mut fast, 5_000).await });
    let acked = churn.run(&mut c, 0, 0, 5_000).await;
    let fast_got = fast_reader.await.unwrap();
    assert_eq!(
        sequences(&fast_got),
        acked,
        "the fast watcher got everything"
    );

    // Now the slow one reads: what was queued, then RESOURCE_EXHAUSTED.
    let mut got = Vec::new();
    let status = loop {
        let next = tokio::time::timeout(Duration::from_secs(30), slow.message());
        match next.await.expect("the slow watcher was never cut off") {
            Ok(Some(m)) => {
                if let Some(pb::watch_placements_response::Kind::Event(e)) = m.kind {
                    got.push(e);
                }
            }
            Ok(None) => panic!("the slow watcher's stream ended without an error"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        got.len() < acked.len(),
        "the slow watcher was cut off before the end"
    );
    assert_gap_free(&got, churn.head + 1);
    // It resumes from its last sequence and receives exactly the rest.
    let last = got.last().map(|e| e.sequence).unwrap_or(churn.head);
    let mut resumed = watch::open(&mut slow_client, Some(last), "", "")
        .await
        .unwrap();
    let rest = watch::events(&mut resumed, acked.len() - got.len()).await;
    assert_gap_free(&rest, last + 1);
    assert_eq!(rest.last().unwrap().sequence, *acked.last().unwrap());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_returns() {
    let server = InProcess::start().await;
    let mut c = server.client().await;
    environment(&mut c, "dev", None, false).await;
    let mut w = watch::open(&mut c, Some(0), "", "").await.unwrap();
    let reader = tokio::spawn(async move {
        loop {
            match w.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("shutdown blocked by an open stream")
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    let status = ended.expect("the stream ended without telling the client to resume");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("after_sequence"), "{status:?}");
}

#[tokio::test]
async fn sigterm_drains_and_exits_with_an_open_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut bin = Binary::start(
        &tests::deploy_database(dir.path()).await,
        &["--drain-timeout-ms", "5000"],
    )
    .await;
    let mut c = tests::connect(bin.addr).await;
    environment(&mut c, "dev", None, false).await;
    let mut w = watch::open(&mut c, Some(0), "", "").await.unwrap();
    bin.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), bin.child.wait())
        .await
        .expect("deploy-svc did not exit within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let end = w.message().await;
    assert!(
        matches!(end, Err(ref s) if s.code() == Code::Unavailable),
        "{end:?}"
    );
}

/// `(seq, target, state)` of the stored events after `after`, read straight from the
/// database (SQLite file or PostgreSQL URL), not through the service.
async fn stored_events(database: &std::path::Path, after: u64) -> Vec<(u64, String, i64)> {
    const SQL: &str = "SELECT seq, target, state FROM placement_events WHERE seq > $1 ORDER BY seq";
    let url = database.to_string_lossy();
    if url.starts_with("postgres://") {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let rows = client.query(SQL, &[&(after as i64)]).await.unwrap();
        return rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1), r.get(2)))
            .collect();
    }
    let db = rusqlite::Connection::open(database).unwrap();
    let mut stmt = db.prepare(&SQL.replace("$1", "?1")).unwrap();
    stmt.query_map([after as i64], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Hostile bodies sent to WatchPlacements (served by its own route, which shares one
/// encoding of each event between watchers) against the real binary: a body past the
/// message limit, bytes that are not a request, and a position past the head. Each gets a
/// clear error status;
/// the process keeps serving, and an honest watcher afterwards still gets the snapshot
/// and the next event.
#[tokio::test]
async fn hostile_watch_requests_are_refused_and_the_route_keeps_serving() {
    const PATH: &str = "/deploy.v1.DeployService/WatchPlacements";
    let dir = tempfile::tempdir().unwrap();
    let db = tests::deploy_database(dir.path()).await;
    let mut bin = Binary::start(&db, &[]).await;
    let mut c = tests::connect(bin.addr).await;
    let churn = Churn::setup(&mut c, "dev", "api", 1).await;
    let ch = tests::channel(bin.addr).await;
    let raw = |body: Vec<u8>, metadata: &'static [(&'static str, &'static str)]| {
        let ch = ch.clone();
        async move { tests::raw::call_with(ch, PATH, metadata, body, true).await }
    };

    // 5 MB: past the 4 MiB message limit.
    let big = raw(vec![0x0a; 5 << 20], &[]).await.unwrap_err();
    assert_eq!(big.code(), Code::OutOfRange, "{big:?}");
    // Not a protobuf message: a field tag with wire type 7 (none exists).
    let garbage = raw(vec![0xff; 64], &[]).await.unwrap_err();
    assert_ne!(garbage.code(), Code::Unknown, "a clear status: {garbage:?}");
    // A position past the head of the log.
    let future = pb::WatchPlacementsRequest {
        start: Some(pb::watch_placements_request::Start::AfterSequence(1 << 40)),
        ..Default::default()
    };
    let ahead = raw(prost::Message::encode_to_vec(&future), &[])
        .await
        .unwrap_err();
    assert_eq!(ahead.code(), Code::OutOfRange, "{ahead:?}");

    // The process lives and the route still serves an honest watcher in order.
    assert!(
        matches!(bin.child.try_wait(), Ok(None)),
        "deploy-svc exited under hostile WatchPlacements bodies"
    );
    let mut w = watch::open(&mut c, None, "", "").await.unwrap();
    let (_, start) = watch::snapshot(&mut w).await;
    let acked = churn.run(&mut c, 0, 0, 3).await;
    let got = watch::events(&mut w, 3).await;
    assert_gap_free(&got, start + 1);
    assert_eq!(sequences(&got), acked);
}
