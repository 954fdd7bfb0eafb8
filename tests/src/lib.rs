//! Helpers for the end-to-end tests: servers on port 0 (in-process and as real binaries),
//! clients, fixtures, and small assertions on gRPC statuses. The tests themselves are in
//! `tests/` (one file per subject) and run with `scripts/test`.
//!
//! # Layout
//!
//! - [`channel`] / [`connect`] ([`Client`]): plaintext channels and deploy-svc clients.
//! - [`Served`]: any server spawned in-process on a listener bound to port 0, stopped
//!   through its shutdown future.
//! - [`InProcess`]: deploy-svc served by the library on port 0 (on SQLite, or on
//!   PostgreSQL when the backend switch says so: [`report::switched_to_postgres`]).
//! - [`fresh_database`]: a new database on the `TEST_DATABASE_URL` PostgreSQL server;
//!   [`test_database`] / [`deploy_database`]: a service's database as the backend switch
//!   says;
//!   [`assert_backend`]: a service really stores where it was told.
//! - [`report`]: the backend switch and what `scripts/test` reports (backends, skips).
//! - [`Binary`] / [`bin_dir`]: the real binaries started on port 0; the bound address is
//!   read from their first stdout line.
//! - [`digest`], [`environment`], [`targets`], [`artifact`], [`deploy`], [`report`]:
//!   deploy-svc fixtures in one call each.
//! - [`status`]: assertions on codes, field violations and precondition violations.
//! - [`rss_kib`]: a process's resident memory, for the memory bounds of tests and benchmarks.
//! - [`watch`]: WatchPlacements helpers (open, snapshot, events, heartbeats, gap checks).
//! - [`Churn`]: a deployment whose targets report forever (one event per report).
//! - [`release`]: release-svc in-process, its client and fixtures (features, releases,
//!   rollouts, evaluations, waiting for an answer).
//! - [`Gated`]: the release gate fixture (a feature carried by an artifact in `prod`).
//! - [`fleet`]: real `deploy-agent` processes against a real deploy-svc binary.
//! - [`pki`]: a development PKI made at run time (CA, server and client certificates,
//!   JWT signers and their JWKS, token and policy files); [`raw`]: calls by gRPC path.
//! - `src/bin/bench-{deploy,release,agents}.rs`: benchmark drivers,
//!   `src/bin/noop-release.rs`: the no-op gRPC baseline (see `docs/benchmarks.md`), and
//!   `src/bin/dev-pki.rs`: the secure quick start's certificates, tokens and policy.
//! - Beside the crate: `python/` (scripts the stock OpenFeature flagd provider runs),
//!   `conformance/` (pytest-bdd steps for the flagd testbed's scenarios) and
//!   `flagd-testbed/` (the vendored testbed). The tests find `python3` and `grpcurl` on
//!   the PATH; `scripts/test` puts the project virtualenv (target/venv) first on it.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use proto::deploy::v1 as pb;
use proto::deploy::v1::deploy_service_client::DeployServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// A client of deploy-svc.
pub type Client = DeployServiceClient<Channel>;

/// A plaintext channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Connects a client to `addr`.
pub async fn connect(addr: SocketAddr) -> Client {
    DeployServiceClient::new(channel(addr).await)
}

/// A server running in-process on a listener bound to `127.0.0.1:0`, stopped gracefully
/// through its shutdown future.
pub struct Served {
    /// The bound address.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Served {
    /// Binds port 0 and spawns `serve(listener, shutdown)`.
    pub async fn spawn<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(tokio::net::TcpListener, futures::future::BoxFuture<'static, ()>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(serve(listener, shutdown));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Triggers graceful shutdown and waits for the server to return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

/// A fresh database on the TEST_DATABASE_URL server: (admin client, its URL, its name).
pub async fn fresh_database(url: &str, tag: &str) -> (tokio_postgres::Client, String, String) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let (admin, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is not reachable: {e}"));
    tokio::spawn(connection);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    // Databases earlier runs left behind (named `{tag}_{pid}_{millis}_{n}`) go after an hour.
    let stale = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname ~ '^(deploy|release|bench)_[a-z_]+_[0-9]+_[0-9]{13}_[0-9]+$'",
            &[],
        )
        .await
        .unwrap();
    for row in stale {
        let name: String = row.get(0);
        let born: u128 = name
            .rsplit('_')
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or(now_ms);
        if now_ms.saturating_sub(born) > 3_600_000 {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
    let db = format!(
        "{tag}_{}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    (admin, format!("{base}/{db}"), db)
}

/// The database for a service of the test, chosen by the backend switch
/// ([`report::switched_to_postgres`], `TEST_BACKEND=postgres`: the same suites, run once per
/// backend by `scripts/test`): a fresh PostgreSQL database, or `{service}.db` in `dir`.
pub async fn test_database(dir: &Path, service: &str) -> PathBuf {
    match report::switched_to_postgres() {
        Some(url) => PathBuf::from(fresh_database(&url, &format!("{service}_test")).await.1),
        None => dir.join(format!("{service}.db")),
    }
}

/// deploy-svc's database as the backend switch says ([`test_database`]).
pub async fn deploy_database(dir: &Path) -> PathBuf {
    test_database(dir, "deploy").await
}

/// Asserts that a service started on `database` really stores there (its schema is in the
/// PostgreSQL database, or its SQLite file exists), and reports the backend the running
/// test used to `scripts/test`.
pub async fn assert_backend(database: &Path) {
    let db = database.to_string_lossy();
    if report::is_postgres(&db) {
        // The schema is checked over a plain connection, whatever `sslmode` the service used.
        let plain = db.split_once('?').map_or(&*db, |(url, _)| url);
        let (client, connection) = tokio_postgres::connect(plain, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {db} is not reachable: {e}"));
        tokio::spawn(connection);
        let tables: i64 = client
            .query_one(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            tables > 0,
            "the service wrote no schema into {db}: not on PostgreSQL"
        );
    } else {
        assert!(
            std::fs::metadata(database).is_ok_and(|m| m.len() > 0),
            "no SQLite database at {db}"
        );
    }
    report::used(&db);
}

/// deploy-svc served in-process on a listener bound to `127.0.0.1:0`.
pub struct InProcess {
    /// The bound address.
    pub addr: SocketAddr,
    /// The temporary directory holding the database.
    pub dir: tempfile::TempDir,
    database: PathBuf,
    served: Served,
}

impl InProcess {
    /// Starts a server with default configuration on a fresh database.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `tweak` adjusts the configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut deploy_svc::Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = deploy_database(dir.path()).await;
        let mut config = deploy_svc::Config::for_database(&database);
        tweak(&mut config);
        let served =
            Served::spawn(|listener, shutdown| deploy_svc::serve(listener, config, shutdown)).await;
        // Answered once the store is open.
        connect(served.addr)
            .await
            .list_environments(pb::ListEnvironmentsRequest::default())
            .await
            .unwrap();
        assert_backend(&database).await;
        Self {
            addr: served.addr,
            dir,
            database,
            served,
        }
    }

    /// A new client.
    pub async fn client(&self) -> Client {
        connect(self.addr).await
    }

    /// The database: a SQLite file, or a PostgreSQL URL.
    pub fn database(&self) -> PathBuf {
        self.database.clone()
    }

    /// Triggers graceful shutdown and waits for the server to return.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.served.shutdown().await
    }
}

/// The directory holding the workspace's built binaries: `target/<profile>`, found from the
/// running test (`target/<profile>/deps/<test>`) or benchmark (`target/<profile>/<bench>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The resident memory (VmRSS) of process `pid` in KiB; `None` once it has exited.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// The anonymous part of process `pid`'s resident memory (RssAnon: its heap and stacks,
/// without the pages of its binary and libraries) in KiB; `None` once it has exited.
pub fn rss_anon_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "RssAnon:")
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The CPU time (user + system) process `pid` has used, in milliseconds; `None` once it has
/// exited.
pub fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3, state.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // Linux reports clock ticks of 1/100 s to user space.
    Some((utime + stime) * 10)
}

/// One release-svc replica per deploy-svc replica in `deploys`, each following its own, all
/// on the database `release_db`.
pub async fn release_replicas(deploys: &[Binary], release_db: &str) -> Vec<Binary> {
    let mut releases = Vec::new();
    for d in deploys {
        let deploy_url = format!("http://{}", d.addr);
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--database",
            release_db,
            "--deploy-svc",
            &deploy_url,
        ];
        releases.push(Binary::spawn("release-svc", &args).await);
    }
    releases
}

/// The address of a free local port (for `--metrics-listen`).
pub fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The value of a sample named exactly `series` (with its labels, as exported) in a
/// `/metrics` scrape of `addr` (0 when it is not exported yet).
pub async fn metric(addr: &str, series: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Where `scripts/test` installs the Node packages (`OFREP_NODE_MODULES` overrides).
pub fn node_modules() -> String {
    std::env::var("OFREP_NODE_MODULES").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/node/node_modules").to_owned()
    })
}

/// The real deploy-svc binary, started on port 0.
pub struct Binary {
    /// The bound address.
    pub addr: SocketAddr,
    /// The process.
    pub child: Child,
    /// The lines it printed after the first (further listeners' addresses), read on as
    /// they come so that the process never writes into a closed pipe.
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Binary {
    /// Starts `deploy-svc` with `args` (plus `--listen 127.0.0.1:0`) and waits for it to
    /// print its address.
    pub async fn start(database: &Path, args: &[&str]) -> Self {
        let db = database.to_string_lossy();
        let mut all = vec!["--listen", "127.0.0.1:0", "--database", &db];
        all.extend_from_slice(args);
        Self::spawn("deploy-svc", &all).await
    }

    /// Starts `release-svc` on port 0 with the SQLite file `database`, without a reachable
    /// deploy-svc (it keeps retrying in the background) and without a change calendar, plus
    /// `args`.
    pub async fn release_alone(database: &Path, args: &[&str]) -> Self {
        let db = database.to_string_lossy();
        let mut all = vec![
            "--listen",
            "127.0.0.1:0",
            "--database",
            &db,
            "--deploy-svc",
            "http://127.0.0.1:9",
            "--change-calendar",
            "none",
        ];
        all.extend_from_slice(args);
        Self::spawn("release-svc", &all).await
    }

    /// Starts `release-svc` on port 0 following the deploy-svc at `deploy`, on the database
    /// the backend switch picks for `dir` ([`test_database`]), plus `args`.
    pub async fn release_following(dir: &Path, deploy: SocketAddr, args: &[&str]) -> Self {
        let db = test_database(dir, "release").await;
        let db = db.to_string_lossy();
        let deploy_url = format!("http://{deploy}");
        let mut all = vec![
            "--listen",
            "127.0.0.1:0",
            "--database",
            &db,
            "--deploy-svc",
            &deploy_url,
        ];
        all.extend_from_slice(args);
        Self::spawn("release-svc", &all).await
    }

    /// Starts the workspace binary `name` with exactly `args` and waits for it to print its
    /// address (its first stdout line ends with it).
    pub async fn spawn(name: &str, args: &[&str]) -> Self {
        Self::spawn_with_vars(name, args, &[]).await
    }

    /// Like [`Binary::spawn`], with the environment variables `vars` added.
    pub async fn spawn_with_vars(name: &str, args: &[&str], vars: &[(&str, &str)]) -> Self {
        // TEST_SERVER_LOGS=1 shows the servers' logs beside the test's output.
        let stderr = if std::env::var_os("TEST_SERVER_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        Self::spawn_with(name, args, stderr, vars).await
    }

    /// Like [`Binary::spawn`], with the process's logs (stderr) written to the file `log`.
    pub async fn spawn_logging(name: &str, args: &[&str], log: &Path) -> Self {
        let file = std::fs::File::create(log).unwrap();
        Self::spawn_with(name, args, Stdio::from(file), &[]).await
    }

    async fn spawn_with(name: &str, args: &[&str], stderr: Stdio, vars: &[(&str, &str)]) -> Self {
        let bin = bin_dir().join(name);
        assert!(
            bin.exists(),
            "{} is missing: run `cargo build --workspace --bins` (scripts/test does)",
            bin.display()
        );
        let mut child = Command::new(&bin)
            .args(args)
            .envs(vars.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{name} did not print its address within 30 s"))
            .unwrap()
            .unwrap_or_else(|| panic!("{name} exited before printing its address"));
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        // The address is printed once the store is open: check where it stores.
        if let Some(database) = args
            .iter()
            .position(|a| *a == "--database")
            .and_then(|i| args.get(i + 1))
        {
            assert_backend(Path::new(database)).await;
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        Self {
            addr,
            child,
            lines: rx,
        }
    }

    /// The address on the next stdout line that contains `what` (such as "OFREP"): the
    /// address of a further listener started on port 0.
    pub async fn address_of(&mut self, what: &str) -> SocketAddr {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no line with {what:?} within 30 s"))
                .unwrap_or_else(|| panic!("the process ended before printing {what:?}"));
            if line.contains(what) {
                return line
                    .rsplit(' ')
                    .next()
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected line {line:?}"));
            }
        }
    }

    /// Sends SIGKILL and waits for the process to die.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// Sends SIGTERM and waits (at most 30 s) for the process to finish its graceful
    /// shutdown; panics if it does not exit cleanly.
    pub async fn stop(mut self) {
        self.signal("TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("no exit within 30 s of SIGTERM")
            .unwrap();
        assert!(status.success(), "exit after SIGTERM: {status}");
    }

    /// Sends `signal` (for example `TERM`) with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {signal} {pid} failed");
    }
}

/// A `sha256:` digest derived from `seed` (the content does not matter to deploy-svc).
pub fn digest(seed: &str) -> String {
    let mut hex = String::new();
    let mut x: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        x = (x ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    while hex.len() < 64 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        hex.push_str(&format!("{x:016x}"));
    }
    format!("sha256:{}", &hex[..64])
}

/// Creates environment `id` (with `upstream` and `protected`) and returns it.
pub async fn environment(
    c: &mut Client,
    id: &str,
    upstream: Option<&str>,
    protected: bool,
) -> pb::Environment {
    c.create_environment(pb::CreateEnvironmentRequest {
        environment_id: id.into(),
        environment: Some(pb::Environment {
            upstream: upstream
                .map(|u| format!("environments/{u}"))
                .unwrap_or_default(),
            protected,
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Registers targets `{prefix}-1..=n` in `env`.
pub async fn targets(c: &mut Client, env: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for i in 1..=n {
        let t = c
            .register_target(pb::RegisterTargetRequest {
                parent: format!("environments/{env}"),
                target_id: format!("{prefix}-{i}"),
                labels: Default::default(),
            })
            .await
            .unwrap()
            .into_inner();
        names.push(t.name);
    }
    names
}

/// Registers artifact `name` at `version`.
pub async fn artifact(c: &mut Client, name: &str, version: &str) -> pb::Artifact {
    c.register_artifact(pb::RegisterArtifactRequest {
        artifact: name.into(),
        version: version.into(),
        digest: digest(&format!("{name}@{version}")),
        metadata: Default::default(),
        source_uri: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Creates a deployment.
pub async fn deploy(
    c: &mut Client,
    artifact: &str,
    version: &str,
    env: &str,
    change: &str,
) -> Result<pb::Deployment, tonic::Status> {
    c.create_deployment(pb::CreateDeploymentRequest {
        deployment: Some(pb::Deployment {
            artifact_version: format!("artifacts/{artifact}/versions/{version}"),
            environment: format!("environments/{env}"),
            change_reference: change.into(),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Reports `state` for `target` in `deployment`.
pub async fn report(
    c: &mut Client,
    deployment: &str,
    target: &str,
    state: pb::PlacementState,
) -> Result<pb::ReportPlacementResponse, tonic::Status> {
    c.report_placement(pb::ReportPlacementRequest {
        deployment: deployment.into(),
        target: target.into(),
        state: state.into(),
        message: String::new(),
    })
    .await
    .map(tonic::Response::into_inner)
}

pub mod pki;
pub mod raw;
pub mod report;

/// Assertions on statuses.
pub mod status {
    use tonic::{Code, Status};
    use tonic_types::StatusExt;

    /// Asserts `code` and returns the status.
    pub fn expect_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
        match result {
            Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
            Err(s) => {
                assert_eq!(s.code(), code, "unexpected status: {s:?}");
                s
            }
        }
    }

    /// The fields named by the BadRequest details of an INVALID_ARGUMENT status.
    pub fn bad_fields<T: std::fmt::Debug>(result: Result<T, Status>) -> Vec<String> {
        let s = expect_code(result, Code::InvalidArgument);
        s.get_details_bad_request()
            .map(|b| b.field_violations.into_iter().map(|f| f.field).collect())
            .unwrap_or_default()
    }

    /// The violation types of a FAILED_PRECONDITION status.
    pub fn violated_rules<T: std::fmt::Debug>(result: Result<T, Status>) -> Vec<String> {
        let s = expect_code(result, Code::FailedPrecondition);
        s.get_details_precondition_failure()
            .map(|p| p.violations.into_iter().map(|v| v.r#type).collect())
            .unwrap_or_default()
    }
}

/// Placement stream helpers.
pub mod watch {
    use std::time::Duration;

    use pb::watch_placements_response::Kind;
    use proto::deploy::v1 as pb;
    use tonic::Streaming;

    use super::Client;

    /// Opens a watch after `after` (or a snapshot when `None`) with optional filters.
    pub async fn open(
        c: &mut Client,
        after: Option<u64>,
        environment: &str,
        artifact: &str,
    ) -> Result<Streaming<pb::WatchPlacementsResponse>, tonic::Status> {
        let start = match after {
            Some(seq) => pb::watch_placements_request::Start::AfterSequence(seq),
            None => pb::watch_placements_request::Start::Snapshot(true),
        };
        c.watch_placements(pb::WatchPlacementsRequest {
            start: Some(start),
            environment: environment.into(),
            artifact: artifact.into(),
            heartbeat_interval_seconds: 1,
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// The next message of a stream; panics on error, end, or 30 s of silence while
    /// waiting for `what`.
    pub async fn next(s: &mut Streaming<pb::WatchPlacementsResponse>, what: &str) -> Option<Kind> {
        tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .unwrap_or_else(|_| panic!("no {what} within 30 s"))
            .expect("stream failed")
            .expect("stream ended")
            .kind
    }

    /// Reads the snapshot part of a stream: (placements, sequence).
    pub async fn snapshot(
        s: &mut Streaming<pb::WatchPlacementsResponse>,
    ) -> (Vec<pb::Placement>, u64) {
        let mut placements = Vec::new();
        loop {
            match next(s, "snapshot").await {
                Some(Kind::SnapshotPlacement(p)) => placements.push(p),
                Some(Kind::SnapshotEnd(end)) => return (placements, end.sequence),
                other => panic!("unexpected message in snapshot: {other:?}"),
            }
        }
    }

    /// Reads `n` events, skipping heartbeats; panics on error, end, or 60 s of silence.
    pub async fn events(
        s: &mut Streaming<pb::WatchPlacementsResponse>,
        n: usize,
    ) -> Vec<pb::PlacementEvent> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let msg = tokio::time::timeout(Duration::from_secs(60), s.message())
                .await
                .unwrap_or_else(|_| panic!("no event within 60 s after {} of {n}", out.len()))
                .expect("stream failed")
                .expect("stream ended");
            if let Some(Kind::Event(e)) = msg.kind {
                out.push(e);
            }
        }
        out
    }

    /// Reads until a heartbeat shows the stream caught up with the log head; returns the
    /// events seen before it and that heartbeat.
    pub async fn until_heartbeat(
        s: &mut Streaming<pb::WatchPlacementsResponse>,
    ) -> (Vec<pb::PlacementEvent>, pb::Heartbeat) {
        let mut out = Vec::new();
        loop {
            match next(s, "heartbeat").await {
                Some(Kind::Event(e)) => out.push(e),
                Some(Kind::Heartbeat(h)) if h.sequence >= h.head_sequence => return (out, h),
                Some(Kind::Heartbeat(_)) => {}
                other => panic!("unexpected message: {other:?}"),
            }
        }
    }

    /// The sequences of `events`.
    pub fn sequences(events: &[pb::PlacementEvent]) -> Vec<u64> {
        events.iter().map(|e| e.sequence).collect()
    }

    /// Asserts the sequences are `first, first+1, ...` (strictly increasing, no gap).
    pub fn assert_gap_free(events: &[pb::PlacementEvent], first: u64) {
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.sequence, first + i as u64, "gap or reorder at index {i}");
        }
    }
}

/// A deployment whose targets can report forever: each target alternates PLACING and
/// REMOVED, so every report writes one event.
pub struct Churn {
    /// The deployment name.
    pub deployment: String,
    /// The target names.
    pub targets: Vec<String>,
    /// The log head after the setup (the deployment's PENDING events included).
    pub head: u64,
}

impl Churn {
    /// Sets up environment `env`, `n` targets, artifact `art` 1.0.0 and a deployment.
    pub async fn setup(c: &mut Client, env: &str, art: &str, n: usize) -> Self {
        environment(c, env, None, false).await;
        let targets = targets(c, env, "t", n).await;
        artifact(c, art, "1.0.0").await;
        let d = deploy(c, art, "1.0.0", env, "").await.unwrap();
        let mut w = watch::open(c, None, "", "").await.unwrap();
        let (_, head) = watch::snapshot(&mut w).await;
        Self {
            deployment: d.name,
            targets,
            head,
        }
    }

    /// The state report number `i` of a target should carry.
    pub fn state(i: usize) -> pb::PlacementState {
        if i.is_multiple_of(2) {
            pb::PlacementState::Placing
        } else {
            pb::PlacementState::Removed
        }
    }

    /// Sends `count` reports for target `t` (starting at report number `from`); returns the
    /// acknowledged sequences.
    pub async fn run(&self, c: &mut Client, t: usize, from: usize, count: usize) -> Vec<u64> {
        let mut seqs = Vec::with_capacity(count);
        for i in from..from + count {
            let r = report(c, &self.deployment, &self.targets[t], Self::state(i))
                .await
                .unwrap();
            assert!(r.changed);
            seqs.push(r.sequence);
        }
        seqs
    }
}

/// release-svc helpers.
pub mod release {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use proto::release::v1 as rpb;
    use proto::release::v1::release_service_client::ReleaseServiceClient;
    use tonic::transport::Channel;

    /// A client of release-svc.
    pub type Client = ReleaseServiceClient<Channel>;

    /// An evaluation context of string attributes (flagd's `context`).
    pub fn context(pairs: &[(&str, &str)]) -> prost_types::Struct {
        prost_types::Struct {
            fields: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), string(v)))
                .collect(),
        }
    }

    /// A string value.
    pub fn string(s: &str) -> prost_types::Value {
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(s.into())),
        }
    }

    /// The flags the OpenFeature tests (OFREP, Connect) evaluate: `new-cart` (boolean,
    /// released to 100% in prod), `banner-text` (string: "hello" by default, "bye" when off;
    /// released to 100% in prod; metadata `team` and `tier`), `old-thing` (disabled).
    /// Returns the new-cart release.
    pub async fn openfeature_flags(rc: &mut Client) -> String {
        plain_feature(rc, "new-cart", false).await;
        rc.create_feature(rpb::CreateFeatureRequest {
            feature: Some(rpb::Feature {
                key: "banner-text".into(),
                variants: [
                    ("a".to_owned(), string("hello")),
                    ("b".to_owned(), string("bye")),
                ]
                .into(),
                default_variant: "a".into(),
                off_variant: "b".into(),
                metadata: [
                    ("team".to_owned(), string("growth")),
                    (
                        "tier".to_owned(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::NumberValue(2.0)),
                        },
                    ),
                ]
                .into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
        plain_feature(rc, "old-thing", true).await;
        let cart = release(rc, &["new-cart"], &["prod"]).await;
        rollout(rc, &cart, "prod", 100.0).await;
        let banner = release(rc, &["banner-text"], &["prod"]).await;
        rollout(rc, &banner, "prod", 100.0).await;
        cart
    }

    /// release-svc served in-process on port 0, following deploy-svc at `deploy`.
    pub struct InProcess {
        /// The bound address.
        pub addr: SocketAddr,
        /// Holds the database.
        pub dir: tempfile::TempDir,
        served: super::Served,
    }

    impl InProcess {
        /// Starts release-svc following deploy-svc at `deploy`.
        pub async fn start(deploy: SocketAddr) -> Self {
            Self::start_on(deploy, None).await
        }

        /// Starts release-svc on the time of `clock`, its scheduler passing every 10 ms.
        pub async fn start_with_clock(
            deploy: SocketAddr,
            clock: std::sync::Arc<dyn release_svc::engine::Clock>,
        ) -> Self {
            Self::start_on(deploy, Some(clock)).await
        }

        async fn start_on(
            deploy: SocketAddr,
            clock: Option<std::sync::Arc<dyn release_svc::engine::Clock>>,
        ) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let database = super::test_database(dir.path(), "release").await;
            let mut config = release_svc::Config::new(database.clone(), format!("http://{deploy}"));
            let served = match clock {
                Some(clock) => {
                    config.scheduler_interval_ms = 10;
                    super::Served::spawn(|listener, shutdown| {
                        release_svc::serve_with_clock(listener, config, clock, shutdown)
                    })
                    .await
                }
                None => {
                    super::Served::spawn(|listener, shutdown| {
                        release_svc::serve(listener, config, shutdown)
                    })
                    .await
                }
            };
            // Answered once the store is open.
            connect(served.addr)
                .await
                .get_consumer_status(rpb::GetConsumerStatusRequest {})
                .await
                .unwrap();
            super::assert_backend(&database).await;
            Self {
                addr: served.addr,
                dir,
                served,
            }
        }

        /// A new client.
        pub async fn client(&self) -> Client {
            connect(self.addr).await
        }

        /// Graceful shutdown.
        pub async fn shutdown(self) -> anyhow::Result<()> {
            self.served.shutdown().await
        }
    }

    /// A request sent as `principal` (the `x-principal` metadata).
    pub fn by<T>(principal: &str, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("x-principal", principal.parse().unwrap());
        req
    }

    /// Connects a release-svc client.
    pub async fn connect(addr: SocketAddr) -> Client {
        ReleaseServiceClient::new(super::channel(addr).await)
    }

    /// Creates a boolean feature with no carrier (optionally disabled).
    pub async fn plain_feature(c: &mut Client, key: &str, disabled: bool) -> rpb::Feature {
        c.create_feature(rpb::CreateFeatureRequest {
            feature: Some(rpb::Feature {
                key: key.into(),
                disabled,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
    }

    /// Creates a boolean feature carried by `artifact` >= `min_version` at `coverage`.
    pub async fn feature(
        c: &mut Client,
        key: &str,
        artifact: &str,
        min_version: &str,
        coverage: f64,
    ) -> rpb::Feature {
        c.create_feature(rpb::CreateFeatureRequest {
            feature: Some(rpb::Feature {
                key: key.into(),
                carriers: vec![rpb::Carrier {
                    artifact: artifact.into(),
                    min_version: min_version.into(),
                    required_coverage: coverage,
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
    }

    /// Creates a release of `features` to `envs` (all at 0%), returning its name.
    pub async fn release(c: &mut Client, features: &[&str], envs: &[&str]) -> String {
        c.create_release(rpb::CreateReleaseRequest {
            release: Some(rpb::Release {
                features: features.iter().map(|f| (*f).to_owned()).collect(),
                environments: envs
                    .iter()
                    .map(|e| rpb::ReleaseEnvironment {
                        environment: (*e).to_owned(),
                        rollout_percent: 0.0,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .name
    }

    /// A plan for `feature` whose second step waits: `second`'s policy asks for an hour of
    /// soak in `first`; the release takes `first` to 100% in one step, then `second`. Made
    /// and submitted by rita (approved at once: no approvals asked); returns its name.
    pub async fn soaking_plan(c: &mut Client, feature: &str, first: &str, second: &str) -> String {
        c.set_policy(by(
            "pat",
            rpb::SetPolicyRequest {
                policy: Some(rpb::Policy {
                    environment: second.into(),
                    min_soak: Some(prost_types::Duration {
                        seconds: 3600,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap();
        let env = |e: &str| rpb::ReleaseEnvironment {
            environment: e.into(),
            steps: vec![rpb::RolloutStep {
                percent: 100.0,
                ..Default::default()
            }],
            ..Default::default()
        };
        let name = c
            .create_release(by(
                "rita",
                rpb::CreateReleaseRequest {
                    release: Some(rpb::Release {
                        features: vec![feature.into()],
                        environments: vec![env(first), env(second)],
                        ..Default::default()
                    }),
                    request_id: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .name;
        c.submit_release(by("rita", rpb::SubmitReleaseRequest { name: name.clone() }))
            .await
            .unwrap();
        name
    }

    /// Sets a release's rollout in one environment.
    pub async fn rollout(c: &mut Client, release: &str, env: &str, percent: f64) -> rpb::Release {
        c.set_rollout(rpb::SetRolloutRequest {
            name: release.into(),
            environment: env.into(),
            rollout_percent: percent,
        })
        .await
        .unwrap()
        .into_inner()
    }

    /// Evaluates `feature` for `user` in `env`.
    pub async fn evaluate(
        c: &mut Client,
        feature: &str,
        env: &str,
        user: &str,
    ) -> rpb::EvaluateResponse {
        c.evaluate(rpb::EvaluateRequest {
            feature: feature.into(),
            context: Some(rpb::EvaluationContext {
                environment: env.into(),
                targeting_key: user.into(),
                attributes: None,
            }),
        })
        .await
        .unwrap()
        .into_inner()
    }

    /// Asserts that release-svc recorded exactly one automatic withdrawal, of `feature` in
    /// `env`, whose cause contains `cause` (for example the coverage it fell to, `1/2`).
    pub async fn assert_withdrawn_once(c: &mut Client, feature: &str, env: &str, cause: &str) {
        let withdrawals = c
            .list_withdrawals(rpb::ListWithdrawalsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .withdrawals;
        assert_eq!(withdrawals.len(), 1, "{withdrawals:?}");
        let w = &withdrawals[0];
        assert_eq!(
            (w.feature.as_str(), w.environment.as_str()),
            (feature, env),
            "{w:?}"
        );
        assert!(w.reason.contains(cause), "{w:?}");
        assert!(w.sequence > 0, "{w:?}");
    }

    /// Creates a release of `feature` to `prod` with `request_id` (the idempotency key).
    pub async fn create_with_id(
        c: &mut Client,
        feature: &str,
        request_id: &str,
    ) -> Result<rpb::Release, tonic::Status> {
        c.create_release(rpb::CreateReleaseRequest {
            release: Some(rpb::Release {
                features: vec![feature.into()],
                environments: vec![rpb::ReleaseEnvironment {
                    environment: "prod".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            request_id: request_id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// Polls `evaluate` until the reason is `want`; panics with the last answer if that
    /// has not happened within `within` (a deadline, not a measurement).
    pub async fn eventually(
        c: &mut Client,
        feature: &str,
        env: &str,
        user: &str,
        want: rpb::Reason,
        within: Duration,
    ) -> rpb::EvaluateResponse {
        let start = Instant::now();
        loop {
            let r = evaluate(c, feature, env, user).await;
            if r.reason() == want {
                return r;
            }
            assert!(
                start.elapsed() < within,
                "{feature} in {env} for {user}: no {want:?} answer within {within:?}; last: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The common gate fixture: `prod` with `n` targets, `checkout` 2.0.0 deployed there (not
/// placed yet), and the feature `new-cart` carried by it at `coverage`, released to `prod`
/// at `percent`.
pub struct Gated {
    /// The prod targets.
    pub targets: Vec<String>,
    /// The release name.
    pub release: String,
    /// The deployment name.
    pub deployment: String,
}

impl Gated {
    /// Builds the fixture through both services' APIs.
    pub async fn setup(
        dc: &mut Client,
        rc: &mut release::Client,
        n: usize,
        coverage: f64,
        percent: f64,
    ) -> Self {
        environment(dc, "prod", None, false).await;
        let targets = targets(dc, "prod", "p", n).await;
        artifact(dc, "checkout", "2.0.0").await;
        release::feature(rc, "new-cart", "checkout", "2.0.0", coverage).await;
        let rel = release::release(rc, &["new-cart"], &["prod"]).await;
        release::rollout(rc, &rel, "prod", percent).await;
        let d = deploy(dc, "checkout", "2.0.0", "prod", "").await.unwrap();
        Self {
            targets,
            release: rel,
            deployment: d.name,
        }
    }

    /// Reports `state` for each of `targets`.
    pub async fn report(&self, dc: &mut Client, targets: &[String], state: pb::PlacementState) {
        for t in targets {
            report(dc, &self.deployment, t, state).await.unwrap();
        }
    }

    /// Opens and closes the gate `flips` times (built with 2 targets at 50% coverage: the
    /// first target placed opens it, removed closes it; the second stays pending), reporting
    /// through `dc` and evaluating through `rc`: microseconds from sending each report until
    /// `rc` answers with the new reason.
    pub async fn flip_latencies(
        &self,
        dc: &mut Client,
        rc: &mut release::Client,
        flips: usize,
    ) -> hdrhistogram::Histogram<u64> {
        use proto::release::v1::Reason;
        let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        let target = &self.targets[0];
        for i in 0..flips {
            let opening = i % 2 == 0;
            if opening && i > 0 {
                report(dc, &self.deployment, target, pb::PlacementState::Placing)
                    .await
                    .unwrap();
            }
            let (state, want) = if opening {
                (pb::PlacementState::Placed, Reason::Static)
            } else {
                (pb::PlacementState::Removed, Reason::NotDeployed)
            };
            let start = std::time::Instant::now();
            report(dc, &self.deployment, target, state).await.unwrap();
            while release::evaluate(rc, "new-cart", "prod", "u")
                .await
                .reason()
                != want
            {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "flip {i} never seen"
                );
            }
            h.record(start.elapsed().as_micros() as u64).unwrap();
        }
        h
    }
}

/// Real deploy agents (the `deploy-agent` binary) against a real deploy-svc binary.
pub mod fleet {
    use std::path::{Path, PathBuf};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    use proto::deploy::v1 as pb;
    use sha2::Digest;
    use tokio::process::{Child, Command};

    use super::{bin_dir, Binary, Client};

    /// A tar.gz holding `app.txt` (its text) and any `extra` files; returns its path and
    /// digest.
    pub fn tarball(dir: &Path, name: &str, files: &[(&str, &str)]) -> (PathBuf, String) {
        let path = dir.join(format!("{name}.tar.gz"));
        let file = std::fs::File::create(&path).unwrap();
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        for (file, text) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, file, text.as_bytes()).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
        (path, digest)
    }

    /// Registers `artifact` `version` with `digest`, fetched from `path`.
    pub async fn register(
        c: &mut Client,
        artifact: &str,
        version: &str,
        path: &Path,
        digest: &str,
    ) {
        c.register_artifact(pb::RegisterArtifactRequest {
            artifact: artifact.into(),
            version: version.into(),
            digest: digest.into(),
            metadata: Default::default(),
            source_uri: format!("file://{}", path.display()),
        })
        .await
        .unwrap();
    }

    /// One agent process.
    pub struct Agent {
        /// Its target id.
        pub target: String,
        /// Its root directory.
        pub root: PathBuf,
        args: Vec<String>,
        vars: Vec<(String, String)>,
        child: Option<Child>,
    }

    impl Agent {
        /// Starts an agent for `target` in `env` with `extra` arguments.
        pub async fn start(
            server: &Binary,
            env: &str,
            target: &str,
            root: PathBuf,
            extra: &[&str],
        ) -> Self {
            Self::start_with(server, env, target, root, extra, &[]).await
        }

        /// Like [`Agent::start`], with environment variables `vars` (settings given the
        /// way a service manager would, e.g. `DEPLOY_AGENT_ALLOW_FILE_DIR`).
        pub async fn start_with(
            server: &Binary,
            env: &str,
            target: &str,
            root: PathBuf,
            extra: &[&str],
            vars: &[(&str, &str)],
        ) -> Self {
            let mut args = vec![
                "--server".to_owned(),
                format!("http://{}", server.addr),
                "--environment".into(),
                env.into(),
                "--target".into(),
                target.into(),
                "--root".into(),
                root.to_string_lossy().into_owned(),
                "--heartbeat-ms".into(),
                "200".into(),
            ];
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            let mut agent = Self {
                target: target.into(),
                root,
                args,
                vars: vars
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                child: None,
            };
            agent.spawn();
            agent
        }

        fn spawn(&mut self) {
            let bin = bin_dir().join("deploy-agent");
            assert!(
                bin.exists(),
                "{} is missing: run `cargo build --workspace --bins` (scripts/test does)",
                bin.display()
            );
            self.child = Some(
                Command::new(bin)
                    .args(&self.args)
                    .envs(self.vars.iter().map(|(k, v)| (k, v)))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap(),
            );
        }

        /// SIGKILL.
        pub async fn kill(&mut self) {
            if let Some(mut c) = self.child.take() {
                c.kill().await.unwrap();
            }
        }

        /// Whether the process is still running.
        pub fn alive(&mut self) -> bool {
            self.child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        }

        /// Its resident memory in KiB (0 once it has exited).
        pub fn rss_kib(&self) -> u64 {
            self.child
                .as_ref()
                .and_then(Child::id)
                .and_then(super::rss_kib)
                .unwrap_or(0)
        }

        /// Sends SIGTERM and waits for the process to exit, at most `within`; `None` if it
        /// was still running then (it is killed).
        pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
            let mut child = self.child.take()?;
            let pid = child.id()?;
            let sent = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .unwrap();
            assert!(sent.success(), "kill -TERM {pid} failed");
            match tokio::time::timeout(within, child.wait()).await {
                Ok(status) => Some(status.unwrap()),
                Err(_) => {
                    child.kill().await.unwrap();
                    None
                }
            }
        }

        /// Starts it again with the same arguments and root.
        pub fn restart(&mut self) {
            self.spawn();
        }

        /// The text of `current/app.txt`, if any.
        pub fn current(&self) -> Option<String> {
            std::fs::read_to_string(self.root.join("current/app.txt")).ok()
        }
    }

    /// Waits until every target of `env` is registered and heartbeating (`n` of them).
    pub async fn registered(c: &mut Client, env: &str, n: usize) {
        let start = Instant::now();
        loop {
            let targets = c
                .list_targets(pb::ListTargetsRequest {
                    parent: format!("environments/{env}"),
                    page_size: 100,
                    page_token: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .targets;
            if targets.len() >= n {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "agents did not register"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls GetDeployment until `done` holds (20 s at most).
    pub async fn until(
        c: &mut Client,
        name: &str,
        what: &str,
        done: impl Fn(&pb::Deployment) -> bool,
    ) -> pb::Deployment {
        let start = Instant::now();
        loop {
            let d = c
                .get_deployment(pb::GetDeploymentRequest { name: name.into() })
                .await
                .unwrap()
                .into_inner();
            if done(&d) {
                return d;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{what}: {d:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates a deployment of `artifact` `version` in `env` with `strategy`.
    pub async fn deploy(
        c: &mut Client,
        artifact: &str,
        version: &str,
        env: &str,
        strategy: Option<pb::strategy::Kind>,
    ) -> pb::Deployment {
        c.create_deployment(pb::CreateDeploymentRequest {
            deployment: Some(pb::Deployment {
                artifact_version: format!("artifacts/{artifact}/versions/{version}"),
                environment: format!("environments/{env}"),
                strategy: strategy.map(|k| pb::Strategy { kind: Some(k) }),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
    }

    /// Whether a deployment has reached `state`.
    pub fn is(state: pb::DeploymentState) -> impl Fn(&pb::Deployment) -> bool {
        move |d| d.state() == state
    }
}
