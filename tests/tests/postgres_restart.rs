//! PostgreSQL restarts while deploy-svc and release-svc (each on its own database there) take
//! writes: writes during the outage fail with UNAVAILABLE (never a false acknowledgement),
//! both services recover without a restart of their own, and no acknowledged write is lost. Restarts the machine's PostgreSQL server
//! (`pg_ctlcluster`), so it is a test binary of its own (cargo runs test binaries one at a
//! time); runs when TEST_DATABASE_URL is set and `pg_ctlcluster` is available.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use proto::release::v1 as rpb;
use tests::{fresh_database, release, Binary, Churn};
use tonic::Code;

fn cluster(action: &str) -> bool {
    let Some(version) = std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
    else {
        return false;
    };
    Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action])
        .status()
        .is_ok_and(|s| s.success())
}

fn ready() -> bool {
    Command::new("pg_isready")
        .args(["-h", "127.0.0.1", "-p", "5432", "-q"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts the server again whatever happens to the test.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        if !ready() {
            cluster("start");
        }
        let start = Instant::now();
        while !ready() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[tokio::test]
async fn both_services_survive_a_postgres_restart_without_losing_an_acknowledged_write() {
    let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
        eprintln!("TEST_DATABASE_URL is not set: the PostgreSQL restart was not tested");
        return;
    };
    if Command::new("pg_ctlcluster")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("pg_ctlcluster is not available: the PostgreSQL restart was not tested");
        return;
    }
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is not reachable: {e}"));
    let admin_task = tokio::spawn(connection);
    let db = format!("release_restart_{}", std::process::id());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    drop(admin);
    let _ = admin_task.await;
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    let db_url = format!("{base}/{db}");
    let (_, deploy_url, _) = fresh_database(&url, "deploy_restart").await;
    let d = Binary::start(std::path::Path::new(&deploy_url), &[]).await;
    let mut dc = tests::connect(d.addr).await;
    let churn = Churn::setup(&mut dc, "dev", "api", 1).await;
    // deploy-svc writes: (report number, acknowledged sequence); a refused report is sent
    // again with the same state (it may have committed: then it changes nothing).
    let mut reports = Reports::default();
    let r = Binary::spawn(
        "release-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            &db_url,
            "--deploy-svc",
            &format!("http://{}", d.addr),
        ],
    )
    .await;
    let mut rc = release::connect(r.addr).await;
    let _guard = Restart;

    let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
    let mut restarted = false;
    let started = Instant::now();
    let mut i = 0;
    // Writes before, during and after the restart, until 40 more succeed after it.
    let mut after = 0;
    while after < 40 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the service did not recover"
        );
        let key = format!("f-{i}");
        i += 1;
        let res = rc
            .create_feature(rpb::CreateFeatureRequest {
                feature: Some(rpb::Feature {
                    key: key.clone(),
                    ..Default::default()
                }),
            })
            .await;
        match res {
            Ok(_) => {
                acknowledged.push(key);
                if restarted {
                    after += 1;
                }
            }
            Err(status) => refused.push((key, status.code(), status.message().to_owned())),
        }
        reports.send(&mut dc, &churn).await;
        if i == 20 {
            // Stop, wait, start: the outage is at least a second long.
            assert!(cluster("stop"), "pg_ctlcluster stop failed");
            restarted = true;
            let wait = tokio::time::sleep(Duration::from_secs(1));
            tokio::pin!(wait);
            // Writes while the server is down.
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    res = rc.create_feature(rpb::CreateFeatureRequest {
                        feature: Some(rpb::Feature { key: format!("down-{i}"), ..Default::default() }),
                    }) => {
                        let status = res.expect_err("acknowledged while PostgreSQL was down");
                        refused.push((format!("down-{i}"), status.code(), status.message().to_owned()));
                        // deploy-svc refuses its writes too while the server is down.
                        reports.send(&mut dc, &churn).await;
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            assert!(cluster("start"), "pg_ctlcluster start failed");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused.iter().any(|(k, _, _)| k.starts_with("down-")),
        "no write was attempted during the outage"
    );
    for (key, code, message) in &refused {
        assert_eq!(*code, Code::Unavailable, "{key}: {message}");
    }
    assert!(
        !reports.refused.is_empty(),
        "no report was refused during the outage"
    );
    for (code, message) in &reports.refused {
        assert_eq!(*code, Code::Unavailable, "report: {message}");
    }
    // Every acknowledged report is in the log a fresh deploy-svc process streams.
    d.kill().await;
    let d = Binary::start(std::path::Path::new(&deploy_url), &[]).await;
    let mut dc = tests::connect(d.addr).await;
    let mut w = tests::watch::open(&mut dc, Some(churn.head), "", "")
        .await
        .unwrap();
    let (streamed, _) = tests::watch::until_heartbeat(&mut w).await;
    let streamed = tests::watch::sequences(&streamed);
    for seq in &reports.acknowledged {
        assert!(streamed.contains(seq), "acknowledged report {seq} is lost");
    }
    // A refusal whose commit happened anyway (the connection died after COMMIT was sent)
    // is the only way to an event nobody was told about.
    assert!(streamed.len() - reports.acknowledged.len() <= reports.refused.len());
    // Every acknowledged write is there, read back by a fresh process on the same database.
    r.kill().await;
    let r = Binary::spawn(
        "release-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            &db_url,
            "--deploy-svc",
            &format!("http://{}", d.addr),
        ],
    )
    .await;
    let mut rc = release::connect(r.addr).await;
    for key in &acknowledged {
        rc.get_feature(rpb::GetFeatureRequest {
            name: format!("features/{key}"),
        })
        .await
        .unwrap_or_else(|e| panic!("acknowledged {key} is lost: {e}"));
    }
    eprintln!(
        "release-svc: {} acknowledged, {} refused with UNAVAILABLE; deploy-svc: {} reports acknowledged, {} refused with UNAVAILABLE",
        acknowledged.len(),
        refused.len(),
        reports.acknowledged.len(),
        reports.refused.len()
    );
    r.kill().await;
}

/// deploy-svc placement reports alternating the churn target's state: the sequences of
/// acknowledged changes and the refusals.
#[derive(Default)]
struct Reports {
    next: usize,
    acknowledged: Vec<u64>,
    refused: Vec<(Code, String)>,
}

impl Reports {
    async fn send(&mut self, dc: &mut tests::Client, churn: &Churn) {
        match tests::report(
            dc,
            &churn.deployment,
            &churn.targets[0],
            Churn::state(self.next),
        )
        .await
        {
            Ok(r) => {
                if r.changed {
                    self.acknowledged.push(r.sequence);
                }
                self.next += 1;
            }
            Err(status) => self
                .refused
                .push((status.code(), status.message().to_owned())),
        }
    }
}
