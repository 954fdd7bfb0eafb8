//! Server limits against the real deploy-svc binary: streams per HTTP/2 connection and the
//! cap on open placement watches. Replays "10,000 WatchPlacements streams on one
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
