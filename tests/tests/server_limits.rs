//! Server limits against the real binaries: streams per HTTP/2 connection, the cap on open
//! placement watches (deploy-svc) and on open change streams (release-svc: WatchVisibility
//! and flagd EventStream v1 and v2 under one cap). Replays "10,000 WatchPlacements streams on one
//! connection" (which once took RSS from 14 to 163 MB with no limit).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proto::deploy::v1 as pb;
use tests::Binary;
use tonic::Code;

fn rss_kib(b: &Binary) -> u64 {
    let pid = b.child.id().expect("running");
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .expect("VmRSS")
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
