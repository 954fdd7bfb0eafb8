//! Server limits against the real binaries: streams per HTTP/2 connection, the cap on open
//! placement watches (deploy-svc) and on open change streams (release-svc: WatchVisibility
//! and flagd EventStream v1 and v2 under one cap), the in-flight cap (a call past it is
//! RESOURCE_EXHAUSTED at once, never queued) and per-call deadlines (DEADLINE_EXCEEDED).
//! Replays "10,000 WatchPlacements streams on one connection" (which once took RSS from 14
//! to 163 MB with no limit).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proto::deploy::v1 as pb;
use tests::Binary;
use tonic::Code;

fn rss_kib(b: &Binary) -> u64 {
    tests::rss_kib(b.child.id().expect("running")).expect("VmRSS")
}

/// 10,000 WatchPlacements calls on one connection: the server admits at most its
/// per-connection stream limit at a time (the rest wait at the client), its memory stays
/// bounded, and another client is served meanwhile.
#[tokio::test]
async fn ten_thousand_watches_on_one_connection_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let b = Binary::start(&dir.path().join("d.db"), &[]).await;
    let before = rss_kib(&b);
    let channel = tests::channel(b.addr).await;
    let mut calls = Vec::new();
    for _ in 0..10_000 {
        let mut c = pb::deploy_service_client::DeployServiceClient::new(channel.clone());
        calls.push(tokio::spawn(async move {
            let s = tests::watch::open(&mut c, None, "", "").await;
            // Hold the stream open.
            if let Ok(mut s) = s {
                let _ = s.message().await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }));
    }
    // Let the server take what it admits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = rss_kib(&b);
    let mut other = tests::connect(b.addr).await;
    other
        .list_environments(pb::ListEnvironmentsRequest::default())
        .await
        .expect("another client is served");
    assert!(
        during < before + 48 * 1024,
        "RSS grew from {before} KiB to {during} KiB"
    );
    for c in calls {
        c.abort();
    }
    assert!(b.child.id().is_some());
}

/// The total of open watches is capped: past `--max-watchers` a watch is
/// RESOURCE_EXHAUSTED, and a slot frees when a watcher leaves.
#[tokio::test]
async fn watches_beyond_the_cap_are_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let b = Binary::start(&dir.path().join("d.db"), &["--max-watchers", "8"]).await;
    let mut open = Vec::new();
    for i in 0..8 {
        let mut c = tests::connect(b.addr).await;
        let mut s = tests::watch::open(&mut c, None, "", "")
            .await
            .unwrap_or_else(|e| panic!("watch {i}: {e:?}"));
        s.message().await.unwrap();
        open.push((c, s));
    }
    let mut c = tests::connect(b.addr).await;
    let refused = tests::watch::open(&mut c, None, "", "").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // One leaves; a new one is admitted (the slot returns once the server sees it go).
    drop(open.pop());
    let mut admitted = false;
    for _ in 0..100 {
        if tests::watch::open(&mut c, None, "", "").await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "a freed slot was never given back");
}

/// release-svc counts WatchVisibility and both flagd EventStreams against one
/// `--max-watchers` cap: past it any of them is RESOURCE_EXHAUSTED at once, and a slot frees
/// when a stream goes.
#[tokio::test]
async fn release_svc_change_streams_beyond_the_cap_are_resource_exhausted() {
    use proto::flagd::evaluation::{v1 as f1, v2 as f2};
    use proto::release::v1 as rpb;
    let dir = tempfile::tempdir().unwrap();
    let r = Binary::release_alone(&dir.path().join("r.db"), &["--max-watchers", "3"]).await;
    let channel = tests::channel(r.addr).await;
    let mut release = rpb::release_service_client::ReleaseServiceClient::new(channel.clone());
    let mut v1 = f1::service_client::ServiceClient::new(channel.clone());
    let mut v2 = f2::service_client::ServiceClient::new(channel.clone());
    let watch = rpb::WatchVisibilityRequest {
        environment: "prod".into(),
    };

    let mut w = release
        .watch_visibility(watch.clone())
        .await
        .unwrap()
        .into_inner();
    w.message().await.unwrap().unwrap();
    let mut e1 = v1
        .event_stream(f1::EventStreamRequest {})
        .await
        .unwrap()
        .into_inner();
    e1.message().await.unwrap().unwrap();
    let mut e2 = v2
        .event_stream(f2::EventStreamRequest {})
        .await
        .unwrap()
        .into_inner();
    e2.message().await.unwrap().unwrap();

    // Three open: each kind is refused, whichever kinds hold the places.
    let refused = release.watch_visibility(watch.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("change streams"), "{refused:?}");
    let refused = v1
        .event_stream(f1::EventStreamRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let refused = v2
        .event_stream(f2::EventStreamRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // One goes; a new one is admitted once the server sees it go.
    drop(e1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match v2.event_stream(f2::EventStreamRequest {}).await {
            Ok(s) => {
                let mut s = s.into_inner();
                assert_eq!(s.message().await.unwrap().unwrap().r#type, "provider_ready");
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a freed place was never given back"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A unary call (ListEnvironments) on its own bare HTTP/2 connection, whose request never
/// ends: the server holds it in flight (its handler waits for the message) until its
/// deadline or until the connection goes (drop the future). `grpc_timeout` is sent as
/// is (a tonic channel would also enforce it itself, and report CANCELLED first). Returns
/// the answer's `grpc-status` and `grpc-message` headers (a trailers-only answer).
async fn stalled_call(addr: std::net::SocketAddr, grpc_timeout: Option<&str>) -> (String, String) {
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    let never_ends = http_body_util::StreamBody::new(futures::stream::pending::<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >());
    let mut request = http::Request::post(format!(
        "http://{addr}/deploy.v1.DeployService/ListEnvironments"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    if let Some(t) = grpc_timeout {
        request = request.header("grpc-timeout", t);
    }
    let request = request.body(never_ends).unwrap();
    // The connection is driven here: dropping this future closes it.
    let answer = tokio::select! {
        answer = sender.send_request(request) => answer.unwrap(),
        end = conn => panic!("connection ended: {end:?}"),
    };
    let header = |name: &str| {
        answer
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    (header("grpc-status"), header("grpc-message"))
}

fn list_environments(deadline: Duration) -> tonic::Request<pb::ListEnvironmentsRequest> {
    let mut r = tonic::Request::new(pb::ListEnvironmentsRequest::default());
    r.set_timeout(deadline);
    r
}

/// `--max-in-flight 2` with two calls held in flight: a third call is refused with
/// RESOURCE_EXHAUSTED at once (a queued call would wait out its 60 s deadline and end
/// DEADLINE_EXCEEDED instead), and calls are admitted again once the held ones go.
#[tokio::test]
async fn calls_past_max_in_flight_are_refused_at_once_not_queued() {
    let dir = tempfile::tempdir().unwrap();
    // Held calls wait for the server's deadline at most: far longer than the test.
    let b = Binary::start(
        &dir.path().join("d.db"),
        &["--max-in-flight", "2", "--rpc-timeout-ms", "600000"],
    )
    .await;
    let mut c = tests::connect(b.addr).await;
    c.list_environments(list_environments(Duration::from_secs(60)))
        .await
        .expect("served under the cap");
    let hold = || tokio::spawn(stalled_call(b.addr, None));
    let mut held = vec![hold(), hold()];
    // Once both held calls have reached the server, the next is refused. (A held call that
    // arrived while this test's own call had the other place was refused: hold it again.)
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let refused = loop {
        for h in &mut held {
            if h.is_finished() {
                *h = hold();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let answer = c
            .list_environments(list_environments(Duration::from_secs(60)))
            .await;
        if let Err(e) = answer {
            if held.iter().all(|h| !h.is_finished()) {
                break e;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "never refused with 2 calls held in flight"
        );
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Refused every time while both are held, whichever connection asks.
    let mut other = tests::connect(b.addr).await;
    for _ in 0..20 {
        let e = other
            .list_environments(list_environments(Duration::from_secs(60)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    }
    for h in &held {
        assert!(!h.is_finished(), "a held call ended: {h:?}");
    }
    // The held calls go (their streams are reset); the places come back.
    for h in held {
        h.abort();
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Err(e) = c
        .list_environments(list_environments(Duration::from_secs(60)))
        .await
    {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            tokio::time::Instant::now() < until,
            "places never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call still unanswered at its deadline is DEADLINE_EXCEEDED (not CANCELLED, which a
/// client cannot tell from its own cancellation): the caller's `grpc-timeout`, and
/// `--rpc-timeout-ms` when the caller sets none or a longer one.
#[tokio::test]
async fn an_expired_deadline_is_deadline_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let b = Binary::start(&dir.path().join("d.db"), &["--rpc-timeout-ms", "1500"]).await;
    // The caller's deadline, shorter than the server's.
    let (status, message) =
        tokio::time::timeout(Duration::from_secs(30), stalled_call(b.addr, Some("200m")))
            .await
            .expect("answered before the server's own deadline");
    assert_eq!(status, "4", "{message}");
    assert!(message.contains("200"), "{message}");
    // No deadline from the caller, or a longer one: the server's.
    for timeout in [None, Some("600S")] {
        let (status, message) = stalled_call(b.addr, timeout).await;
        assert_eq!(status, "4", "{timeout:?}: {message}");
        assert!(message.contains("1500"), "{timeout:?}: {message}");
    }
    // The server still serves.
    tests::connect(b.addr)
        .await
        .list_environments(pb::ListEnvironmentsRequest::default())
        .await
        .unwrap();
}

/// Admission by deadline acts on a measured load, never on a quiet spell: a trickle of
/// calls, then a burst of 64 writes with a 2 s deadline, all admitted. (It once measured
/// the trickle as the server's capacity and refused most of the burst as "needing" many
/// seconds.)
#[tokio::test]
async fn a_burst_after_a_quiet_trickle_is_admitted() {
    use proto::release::v1 as rpb;
    let dir = tempfile::tempdir().unwrap();
    let r = Binary::release_alone(&dir.path().join("r.db"), &[]).await;
    let rc = tests::release::connect(r.addr).await;
    let create = |key: String| {
        let mut rc = rc.clone();
        async move {
            let mut request = tonic::Request::new(rpb::CreateFeatureRequest {
                feature: Some(rpb::Feature {
                    key,
                    ..Default::default()
                }),
            });
            request.set_timeout(Duration::from_secs(2));
            rc.create_feature(request).await.map(|_| ())
        }
    };
    for i in 0..4 {
        create(format!("trickle-{i}")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let burst = futures::future::join_all((0..64).map(|i| create(format!("burst-{i}")))).await;
    let refused: Vec<_> = burst.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        refused.is_empty(),
        "{} refused: {:?}",
        refused.len(),
        refused.first()
    );
}
