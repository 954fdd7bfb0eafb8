//! PostgreSQL restarts while deploy-svc and release-svc (each on its own database there) take
//! writes: writes during the outage fail with UNAVAILABLE (never a false acknowledgement),
//! both services recover without a restart of their own, and no acknowledged write is lost.
//! The test runs a PostgreSQL server of its own (`initdb` and `pg_ctl` in a temporary
//! directory, on a free port), so it never touches the machine's server; it needs the
//! PostgreSQL server programs (Debian's `postgresql` package, which `scripts/test` installs).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use proto::release::v1 as rpb;
use tests::{fresh_database, release, Binary, Churn};
use tonic::Code;

/// The directory holding `initdb` and `pg_ctl`: on the PATH, else Debian's newest
/// `/usr/lib/postgresql/<version>/bin`.
fn server_programs() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
    });
    on_path.or_else(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").is_file().then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    })
}

/// A PostgreSQL server of the test's own, stopped and deleted when dropped.
struct OwnServer {
    programs: PathBuf,
    data: PathBuf,
    port: u16,
    /// initdb refuses to run as root: as root, the server runs as the `postgres` user.
    as_postgres: bool,
    dir: tempfile::TempDir,
}

impl OwnServer {
    fn start(programs: PathBuf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if as_postgres {
            let owned = Command::new("chown")
                .args(["postgres:postgres", &dir.path().to_string_lossy()])
                .status()
                .unwrap();
            assert!(owned.success(), "chown postgres {}", dir.path().display());
        }
        // A free port: bound, read, released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Self {
            programs,
            data: dir.path().join("data"),
            port,
            as_postgres,
            dir,
        };
        let data = server.data.to_string_lossy().into_owned();
        server.run(
            "initdb",
            &["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync"],
        );
        assert!(server.pg_ctl("start"), "pg_ctl start failed");
        server
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs one of the server programs (as `postgres` when the test runs as root).
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let path = self.programs.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.args(args).current_dir(self.dir.path());
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self.command(program, args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl start` (and wait until it accepts connections) or `pg_ctl stop` (fast).
    fn pg_ctl(&self, action: &str) -> bool {
        let data = self.data.to_string_lossy().into_owned();
        let log = self.dir.path().join("server.log");
        let options = format!(
            "-p {} -h 127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        let mut args = vec!["-D", &data, "-w", "-t", "60"];
        let log = log.to_string_lossy().into_owned();
        match action {
            "start" => args.extend(["-o", &options, "-l", &log, "start"]),
            "stop" => args.extend(["-m", "fast", "stop"]),
            other => args.push(other),
        }
        self.command("pg_ctl", &args)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let _ = self
            .command("pg_ctl", &["-D", &data, "-w", "-m", "immediate", "stop"])
            .status();
    }
}

#[tokio::test]
async fn both_services_survive_a_postgres_restart_without_losing_an_acknowledged_write() {
    let Some(programs) = server_programs() else {
        tests::report::skipped("no PostgreSQL server programs (initdb, pg_ctl) to run a server");
        return;
    };
    let server = OwnServer::start(programs);
    let url = server.url();
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
    let d = Binary::start(Path::new(&deploy_url), &[]).await;
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
            assert!(server.pg_ctl("stop"), "pg_ctl stop failed");
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
            assert!(server.pg_ctl("start"), "pg_ctl start failed");
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
    let d = Binary::start(Path::new(&deploy_url), &[]).await;
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
