//! Operating the pair, against the real binaries: Prometheus metrics (scraped over HTTP and
//! checked with the real `promtool`), the access log (JSON lines on stderr), reflection
//! listings (the real grpcurl), health that follows the placement feed, and shutdown with
//! an open health watch.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::deploy::v1 as pb;
use proto::release::v1 as rpb;
use tests::fleet::{self, register, tarball};
use tests::{bin_dir, environment, release};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// A real binary with its stderr (JSON logs) collected.
struct Proc {
    /// The gRPC address (first stdout line), for the services.
    addr: SocketAddr,
    child: Child,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Proc {
    /// Starts `name` with `args` plus `--log-format json`; `serves` when its first stdout
    /// line ends with the address it listens on.
    async fn spawn(name: &str, args: &[&str], env: &[(&str, &str)], serves: bool) -> Self {
        let bin = bin_dir().join(name);
        let mut child = Command::new(&bin)
            .args(args)
            .args(["--log-format", "json"])
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): run `cargo build --workspace --bins` (scripts/test does)",
                    bin.display()
                )
            });
        let logs = Arc::new(Mutex::new(Vec::new()));
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = logs.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
                sink.lock().unwrap().push(value);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("{name} printed nothing within 30 s"))
            .unwrap()
            .unwrap_or_else(|| panic!("{name} exited at once"));
        let addr = if serves {
            first.rsplit(' ').next().unwrap().parse().unwrap()
        } else {
            SocketAddr::from(([127, 0, 0, 1], 0))
        };
        // Keep reading: a closed pipe would fail the program's next line on stdout.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        Self { addr, child, logs }
    }

    /// The first log line for which `pick` holds, waiting for it at most 30 s.
    async fn log(
        &self,
        what: &str,
        pick: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.logs.lock().unwrap().iter().find(|v| pick(v)) {
                return v.clone();
            }
            assert!(Instant::now() < deadline, "no log line {what} within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address of the metrics listener (from its `metrics served` log line).
    async fn metrics(&self) -> SocketAddr {
        self.log("metrics served", |v| {
            v["fields"]["message"] == "metrics served"
        })
        .await["fields"]["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {signal} {pid} failed");
    }
}

/// One scrape of `/metrics` over plain HTTP.
async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    body.to_owned()
}

/// The value of `series` (name and labels exactly as exposed) in a scrape.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `series` satisfies `ok` (at most 60 s); returns the scrape.
async fn until(addr: SocketAddr, series: &str, ok: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = scrape(addr).await;
        if value(&text, series).is_some_and(&ok) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached the expected value; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `promtool check metrics` on a scrape: the exposition format and Prometheus' naming
/// rules (HELP text, `_total` counters, base units).
fn promtool_check(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: install Debian's `prometheus` package (scripts/test does)");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn deploy_svc(dir: &Path, extra: &[&str]) -> Proc {
    let db = dir.join("deploy.db").to_string_lossy().into_owned();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--database",
        &db,
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Proc::spawn("deploy-svc", &args, &[], true).await
}

async fn release_svc(dir: &Path, deploy: SocketAddr, extra: &[&str]) -> Proc {
    let db = dir.join("release.db").to_string_lossy().into_owned();
    let url = format!("http://{deploy}");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--database",
        &db,
        "--deploy-svc",
        &url,
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Proc::spawn("release-svc", &args, &[], true).await
}

/// The agent for target `a-1` of `dev`, rooted in `dir/agent`, allowed to read `file://`
/// sources in `dir`, with metrics.
async fn deploy_agent(deploy: SocketAddr, dir: &Path) -> Proc {
    let allowed = dir.to_string_lossy().into_owned();
    let root = dir.join("agent").to_string_lossy().into_owned();
    let server = format!("http://{deploy}");
    Proc::spawn(
        "deploy-agent",
        &[
            "--server",
            &server,
            "--environment",
            "dev",
            "--target",
            "a-1",
            "--root",
            &root,
            "--heartbeat-ms",
            "200",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[("DEPLOY_AGENT_ALLOW_FILE_DIR", &allowed)],
        false,
    )
    .await
}

const OK_CREATE_ENV: &str = r#"grpc_server_handled_total{grpc_service="deploy.v1.DeployService",grpc_method="CreateEnvironment",grpc_code="OK"}"#;
const NOT_FOUND_GET_ENV: &str = r#"grpc_server_handled_total{grpc_service="deploy.v1.DeployService",grpc_method="GetEnvironment",grpc_code="NOT_FOUND"}"#;
const WATCHERS: &str = r#"grpc_server_open_streams{kind="WatchPlacements"}"#;

#[tokio::test]
async fn deploy_svc_release_svc_and_the_agent_export_metrics_that_follow_the_calls() {
    let dir = tempfile::tempdir().unwrap();
    let d = deploy_svc(dir.path(), &[]).await;
    let dm = d.metrics().await;
    let r = release_svc(dir.path(), d.addr, &[]).await;
    let rm = r.metrics().await;

    // release-svc's consumer opens one placement stream and reports it connected.
    until(dm, WATCHERS, |v| v == 1.0).await;
    until(rm, "release_svc_consumer_connected", |v| v == 1.0).await;

    // Per-RPC counts by method and status code, and latency histograms.
    let mut dc = tests::connect(d.addr).await;
    environment(&mut dc, "dev", None, false).await;
    let missing = dc
        .get_environment(pb::GetEnvironmentRequest {
            name: "environments/nowhere".into(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);
    let text = until(dm, OK_CREATE_ENV, |v| v == 1.0).await;
    assert_eq!(value(&text, NOT_FOUND_GET_ENV), Some(1.0), "{text}");
    assert_eq!(
        value(
            &text,
            r#"grpc_server_handling_seconds_count{grpc_service="deploy.v1.DeployService",grpc_method="CreateEnvironment"}"#
        ),
        Some(1.0),
        "{text}"
    );
    let head_before = value(&text, "deploy_svc_placement_log_head").unwrap();

    // Open streams by kind: one more watcher, then one fewer.
    let watch = dc
        .watch_placements(pb::WatchPlacementsRequest {
            start: Some(pb::watch_placements_request::Start::AfterSequence(0)),
            environment: String::new(),
            artifact: String::new(),
            heartbeat_interval_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner();
    until(dm, WATCHERS, |v| v == 2.0).await;
    drop(watch);
    until(dm, WATCHERS, |v| v == 1.0).await;

    // An agent places an artifact: its placement, fetch and the log head move, and
    // release-svc's consumer follows the head.
    let agent = deploy_agent(d.addr, dir.path()).await;
    let am = agent.metrics().await;
    fleet::registered(&mut dc, "dev", 1).await;
    let (path, digest) = tarball(dir.path(), "app-1.0.0", &[("app.txt", "1.0.0")]);
    register(&mut dc, "app", "1.0.0", &path, &digest).await;
    let size = std::fs::metadata(&path).unwrap().len() as f64;
    let dep = fleet::deploy(&mut dc, "app", "1.0.0", "dev", None).await;
    fleet::until(
        &mut dc,
        &dep.name,
        "1.0.0",
        fleet::is(pb::DeploymentState::Succeeded),
    )
    .await;
    let text = until(
        am,
        r#"deploy_agent_placements_total{outcome="placed"}"#,
        |v| v == 1.0,
    )
    .await;
    assert_eq!(
        value(&text, "deploy_agent_fetch_bytes_total"),
        Some(size),
        "{text}"
    );
    assert_eq!(value(&text, "deploy_agent_connected"), Some(1.0), "{text}");
    assert_eq!(
        value(&text, "deploy_agent_fetch_seconds_count"),
        Some(1.0),
        "{text}"
    );
    promtool_check(&text);
    let text = until(dm, "deploy_svc_placement_log_head", |v| v > head_before).await;
    let head = value(&text, "deploy_svc_placement_log_head").unwrap();
    assert!(value(&text, "deploy_svc_group_commit_writes_count").unwrap() >= 1.0);
    promtool_check(&text);
    until(rm, "release_svc_consumer_head_sequence", |v| v == head).await;
    until(rm, "release_svc_consumer_lag_events", |v| v == 0.0).await;

    // Evaluations by reason, including an unknown feature.
    let mut rc = release::connect(r.addr).await;
    release::plain_feature(&mut rc, "dark", false).await;
    let answer = release::evaluate(&mut rc, "dark", "dev", "u1").await;
    assert_eq!(answer.reason(), rpb::Reason::NotReleased);
    let unknown = rc
        .evaluate(rpb::EvaluateRequest {
            feature: "nothing-here".into(),
            context: Some(rpb::EvaluationContext {
                environment: "dev".into(),
                targeting_key: "u1".into(),
                attributes: None,
            }),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);
    let text = until(
        rm,
        r#"release_svc_evaluations_total{reason="NOT_RELEASED"}"#,
        |v| v >= 1.0,
    )
    .await;
    assert!(
        value(
            &text,
            r#"release_svc_evaluations_total{reason="FEATURE_NOT_FOUND"}"#
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"grpc_server_handled_total{grpc_service="release.v1.ReleaseService",grpc_method="Evaluate",grpc_code="NOT_FOUND"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(value(&text, "release_svc_consumer_last_message_timestamp_seconds").unwrap() > 1.0e9);
    assert!(
        value(&text, "release_svc_snapshot_version").unwrap() >= 1.0,
        "{text}"
    );
    assert!(value(&text, "release_svc_snapshot_updated_timestamp_seconds").unwrap() > 1.0e9);
    promtool_check(&text);

    // A plan whose second step waits on a policy rule (dev needs an hour of soak in
    // staging): the scheduler's wait is counted and the waiting gauge names the rule.
    environment(&mut dc, "staging", None, false).await;
    release::soaking_plan(&mut rc, "dark", "staging", "dev").await;
    let text = until(
        rm,
        r#"release_svc_releases_waiting{rule="SOAK_TIME"}"#,
        |v| v == 1.0,
    )
    .await;
    assert_eq!(
        value(
            &text,
            r#"release_svc_scheduler_waits_total{rule="SOAK_TIME"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"release_svc_releases_waiting{rule="APPROVALS"}"#),
        Some(0.0),
        "{text}"
    );
    assert!(value(&text, "release_svc_release_longest_wait_seconds").unwrap() < 3600.0);
    assert_eq!(
        value(&text, "release_svc_releases_overdue"),
        Some(0.0),
        "{text}"
    );
    promtool_check(&text);
}

#[tokio::test]
async fn each_call_writes_one_json_access_line_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let d = deploy_svc(dir.path(), &[]).await;
    let mut dc = tests::connect(d.addr).await;
    let mut req = tonic::Request::new(pb::GetEnvironmentRequest {
        name: "environments/nowhere".into(),
    });
    req.metadata_mut()
        .insert("x-request-id", "req-42.a".parse().unwrap());
    req.metadata_mut()
        .insert("x-principal", "alice".parse().unwrap());
    req.metadata_mut()
        .insert("authorization", "Bearer s3cr3t-token".parse().unwrap());
    let answer = dc.get_environment(req).await.unwrap_err();
    assert_eq!(answer.code(), tonic::Code::NotFound);
    // The id is echoed back so the caller can quote it.
    assert_eq!(
        answer
            .metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        "req-42.a"
    );
    let line = d
        .log("access line for req-42.a", |v| {
            v["target"] == "access" && v["fields"]["request_id"] == "req-42.a"
        })
        .await;
    let f = &line["fields"];
    assert_eq!(f["message"], "call");
    assert_eq!(f["method"], "/deploy.v1.DeployService/GetEnvironment");
    assert_eq!(f["code"], "NOT_FOUND");
    assert_eq!(f["principal"], "alice");
    assert!(f["latency_ms"].as_f64().unwrap() >= 0.0);
    let peer: SocketAddr = f["peer"].as_str().unwrap().parse().unwrap();
    assert!(peer.ip().is_loopback());

    // A call without an id gets one, logged and returned.
    environment(&mut dc, "dev", None, false).await;
    let line = d
        .log("access line for CreateEnvironment", |v| {
            v["target"] == "access"
                && v["fields"]["method"] == "/deploy.v1.DeployService/CreateEnvironment"
        })
        .await;
    assert_eq!(line["fields"]["code"], "OK");
    assert!(!line["fields"]["request_id"].as_str().unwrap().is_empty());

    // One line per call, and the token appears in no line.
    let logs = d.logs.lock().unwrap().clone();
    let ours = logs
        .iter()
        .filter(|v| v["target"] == "access" && v["fields"]["request_id"] == "req-42.a")
        .count();
    assert_eq!(ours, 1);
    for v in &logs {
        assert!(
            !v.to_string().contains("s3cr3t"),
            "a secret in the log: {v}"
        );
    }
}

/// Opens grpc.health.v1 Watch on `addr` for `service` and waits for its first answer.
async fn health_watch(
    addr: SocketAddr,
    service: &str,
) -> (tonic::Streaming<tonic_health::pb::HealthCheckResponse>, i32) {
    let mut client = tonic_health::pb::health_client::HealthClient::new(tests::channel(addr).await);
    let mut stream = client
        .watch(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    (stream, first.status)
}

/// Waits for the process to exit (at most `within`); its status, or `None` if it did not.
async fn exited(p: &mut Proc, within: Duration) -> Option<std::process::ExitStatus> {
    tokio::time::timeout(within, p.child.wait())
        .await
        .ok()
        .map(Result::unwrap)
}

#[tokio::test]
async fn an_open_health_watch_does_not_hold_shutdown() {
    use tonic_health::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    // A drain timeout far beyond the wait below: exiting in time proves the watch ended.
    let mut d = deploy_svc(dir.path(), &["--drain-timeout-ms", "120000"]).await;
    let mut r = release_svc(dir.path(), d.addr, &["--drain-timeout-ms", "120000"]).await;
    for p in [&mut r, &mut d] {
        let (mut watch, first) = health_watch(p.addr, "").await;
        assert_eq!(first, ServingStatus::Serving as i32);
        p.signal("TERM");
        let status = exited(p, Duration::from_secs(30))
            .await
            .expect("the service did not exit within 30 s of SIGTERM with a health watch open");
        assert!(status.success(), "{status:?}");
        // Whatever the watcher got after SERVING says NOT_SERVING, then the stream ended.
        while let Ok(Some(msg)) = watch.message().await {
            assert_eq!(msg.status, ServingStatus::NotServing as i32);
        }
    }
}

/// Polls GetConsumerStatus until `ok` holds (at most 60 s).
async fn consumer_until(
    rc: &mut tests::release::Client,
    what: &str,
    ok: impl Fn(&rpb::ConsumerStatus) -> bool,
) -> rpb::ConsumerStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = rc
            .get_consumer_status(rpb::GetConsumerStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "consumer never {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The health status of `service` on `addr`.
async fn health_of(addr: SocketAddr, service: &str) -> i32 {
    tonic_health::pb::health_client::HealthClient::new(tests::channel(addr).await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

const FEED: &str = "release.placement-feed";

#[tokio::test]
async fn a_frozen_deploy_svc_is_noticed_reported_and_reconnected_to() {
    use tonic_health::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let d = deploy_svc(dir.path(), &[]).await;
    let r = release_svc(dir.path(), d.addr, &[]).await;
    let rm = r.metrics().await;
    let mut rc = release::connect(r.addr).await;
    release::plain_feature(&mut rc, "dark", false).await;
    consumer_until(&mut rc, "connected", |s| s.connected).await;
    assert_eq!(health_of(r.addr, FEED).await, ServingStatus::Serving as i32);

    // SIGSTOP: the TCP connection stays open and silent, as in a network partition.
    d.signal("STOP");
    let lost = consumer_until(&mut rc, "noticed the silence", |s| !s.connected).await;
    assert!(!lost.last_error.is_empty(), "{lost:?}");
    assert_eq!(
        health_of(r.addr, FEED).await,
        ServingStatus::NotServing as i32
    );
    // Evaluations go on from the last known placements; the service itself is SERVING.
    let answer = release::evaluate(&mut rc, "dark", "dev", "u1").await;
    assert_eq!(answer.reason(), rpb::Reason::NotReleased);
    assert_eq!(
        health_of(r.addr, "release.v1.ReleaseService").await,
        ServingStatus::Serving as i32
    );
    let text = until(rm, "release_svc_consumer_connected", |v| v == 0.0).await;
    assert!(value(&text, "release_svc_consumer_stream_losses_total").unwrap() >= 1.0);

    // Thawed, deploy-svc is followed again without a restart of release-svc.
    d.signal("CONT");
    let back = consumer_until(&mut rc, "reconnected", |s| s.connected).await;
    assert!(back.last_error.is_empty(), "{back:?}");
    assert_eq!(health_of(r.addr, FEED).await, ServingStatus::Serving as i32);
}

/// `grpcurl -plaintext ADDR ARGS...` (the real grpcurl 1.8.6: reflection v1alpha).
fn grpcurl(addr: SocketAddr, args: &[&str]) -> (bool, String) {
    let program = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let out = std::process::Command::new(&program)
        .arg("-plaintext")
        .arg(addr.to_string())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run grpcurl ({e}): scripts/test installs it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The services listed over reflection v1 (tonic's client).
async fn list_v1(addr: SocketAddr) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut client = ServerReflectionClient::new(tests::channel(addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a list answer");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

const COMMON: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

fn expected(own: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = own.iter().chain(&COMMON).map(|s| (*s).to_owned()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn reflection_lists_and_describes_only_what_each_service_serves() {
    let dir = tempfile::tempdir().unwrap();
    let d = deploy_svc(dir.path(), &[]).await;
    let r = release_svc(dir.path(), d.addr, &["--flagd-listen", "127.0.0.1:0"]).await;
    let flagd: SocketAddr = r
        .log("flagd port", |v| {
            v["fields"]["message"] == "flagd protocols serving on their own port"
        })
        .await["fields"]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let flagd_services = [
        "flagd.evaluation.v1.Service",
        "flagd.evaluation.v2.Service",
        "flagd.sync.v1.FlagSyncService",
    ];
    let release_services = [
        "release.v1.ReleaseService",
        "flagd.evaluation.v1.Service",
        "flagd.evaluation.v2.Service",
        "flagd.sync.v1.FlagSyncService",
    ];
    for (addr, own) in [
        (d.addr, &["deploy.v1.DeployService"][..]),
        (r.addr, &release_services[..]),
        (flagd, &flagd_services[..]),
    ] {
        let (ok, listed) = grpcurl(addr, &["list"]);
        assert!(ok, "{listed}");
        let mut names: Vec<String> = listed.lines().map(str::to_owned).collect();
        names.sort();
        assert_eq!(names, expected(own), "grpcurl list (v1alpha) on {addr}");
        assert_eq!(
            list_v1(addr).await,
            expected(own),
            "reflection v1 on {addr}"
        );
    }
    // describe knows the service's own contract, with its comments, and not the other's.
    let (ok, described) = grpcurl(d.addr, &["describe", "deploy.v1.DeployService"]);
    assert!(ok && described.contains("WatchPlacements"), "{described}");
    assert!(
        described.contains("//"),
        "comments are missing: {described}"
    );
    let (ok, other) = grpcurl(d.addr, &["describe", "release.v1.ReleaseService"]);
    assert!(!ok, "deploy-svc describes release-svc's API: {other}");
    let (ok, other) = grpcurl(r.addr, &["describe", "deploy.v1.DeployService"]);
    assert!(!ok, "release-svc describes deploy-svc's API: {other}");
}

/// A TCP proxy to `upstream` that can cut every connection and refuse new ones (an
/// unreachable database), then let them through again.
struct Proxy {
    addr: SocketAddr,
    open: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<Mutex<tokio_util::sync::CancellationToken>>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let cut = Arc::new(Mutex::new(tokio_util::sync::CancellationToken::new()));
        let (o, c) = (open.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let token = c.lock().unwrap().clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { addr, open, cut }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
        if !open {
            let mut cut = self.cut.lock().unwrap();
            cut.cancel();
            *cut = tokio_util::sync::CancellationToken::new();
        }
    }
}

/// Polls the health of `service` on `addr` until it is `want` (at most 60 s).
async fn health_until(addr: SocketAddr, service: &str, want: i32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = health_of(addr, service).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service} stayed {now}, never {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn deploy_svc_is_not_serving_while_postgresql_is_unreachable_and_serving_after() {
    use tonic_health::ServingStatus;
    let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
        eprintln!("TEST_DATABASE_URL is not set: skipped (the SQLite case is a unit test)");
        return;
    };
    let (_admin, db_url, _) = tests::fresh_database(&url, "deploy_ops").await;
    // postgres://user[:password]@host:port/db -> the same through the proxy.
    let (head, rest) = db_url.split_once('@').unwrap();
    let (server, db) = rest.split_once('/').unwrap();
    let proxy = Proxy::start(server.to_owned()).await;
    let via_proxy = format!("{head}@{}/{db}", proxy.addr);
    let dir = tempfile::tempdir().unwrap();
    let d = Proc::spawn(
        "deploy-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            &via_proxy,
            "--metrics-listen",
            "127.0.0.1:0",
            "--tick-interval-ms",
            "200",
        ],
        &[],
        true,
    )
    .await;
    let dm = d.metrics().await;
    let name = "deploy.v1.DeployService";
    health_until(d.addr, name, ServingStatus::Serving as i32).await;

    proxy.set_open(false);
    health_until(d.addr, name, ServingStatus::NotServing as i32).await;
    until(dm, "store_writable", |v| v == 0.0).await;
    let mut dc = tests::connect(d.addr).await;
    let refused = dc
        .create_environment(pb::CreateEnvironmentRequest {
            environment_id: "dev".into(),
            environment: Some(pb::Environment::default()),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    proxy.set_open(true);
    health_until(d.addr, name, ServingStatus::Serving as i32).await;
    until(dm, "store_writable", |v| v == 1.0).await;
    environment(&mut dc, "dev", None, false).await;
    // The PostgreSQL store's own series: commits timed, pool waits, retries exported.
    let text = until(
        dm,
        r#"deploy_svc_commit_seconds_count{outcome="committed"}"#,
        |v| v >= 1.0,
    )
    .await;
    assert!(
        value(
            &text,
            r#"deploy_svc_store_pool_wait_seconds_count{pool="write"}"#
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        value(
            &text,
            r#"deploy_svc_store_pool_wait_seconds_count{pool="tail"}"#
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        value(&text, "deploy_svc_store_retries_total").is_some(),
        "{text}"
    );
    promtool_check(&text);
    drop(dir);
}

#[tokio::test]
async fn an_agent_notices_a_frozen_deploy_svc_and_reconnects_after() {
    let dir = tempfile::tempdir().unwrap();
    let d = deploy_svc(dir.path(), &[]).await;
    let mut dc = tests::connect(d.addr).await;
    environment(&mut dc, "dev", None, false).await;
    let agent = deploy_agent(d.addr, dir.path()).await;
    let am = agent.metrics().await;
    until(am, "deploy_agent_connected", |v| v == 1.0).await;
    // Frozen, deploy-svc keeps the agent's connection open and says nothing: HTTP/2
    // keepalive pings find the connection dead.
    d.signal("STOP");
    until(am, "deploy_agent_connected", |v| v == 0.0).await;
    agent
        .log("agent disconnected", |v| {
            v["fields"]["message"] == "agent disconnected"
        })
        .await;
    d.signal("CONT");
    until(am, "deploy_agent_connected", |v| v == 1.0).await;
}

#[tokio::test]
async fn during_the_shutdown_delay_health_is_not_serving_and_calls_still_succeed() {
    use tonic_health::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let mut d = deploy_svc(dir.path(), &["--shutdown-delay-ms", "20000"]).await;
    let mut dc = tests::connect(d.addr).await;
    let name = "deploy.v1.DeployService";
    health_until(d.addr, name, ServingStatus::Serving as i32).await;
    d.signal("TERM");
    health_until(d.addr, name, ServingStatus::NotServing as i32).await;
    // Still taking calls: a load balancer that has not caught up loses nothing.
    environment(&mut dc, "dev", None, false).await;
    d.log("the delay", |v| {
        v["fields"]["message"] == "NOT_SERVING; still serving until the shutdown delay ends"
    })
    .await;
    let status = exited(&mut d, Duration::from_secs(120))
        .await
        .expect("no exit after the shutdown delay");
    assert!(status.success(), "{status:?}");
}

/// SIGTERM while 500 change streams are open and eight clients evaluate in a loop, each
/// stopping when client-side health checking (a Health Watch) reports NOT_SERVING, as gRPC
/// clients and load balancers do, but not before five calls after the signal: no unary call fails (those in flight at the signal and
/// those sent before the clients noticed complete), every stream ends with UNAVAILABLE and
/// its resume hint, and the process exits within 5 s.
#[tokio::test]
async fn sigterm_with_500_streams_and_unary_load_fails_no_call() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tonic_health::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let d = deploy_svc(dir.path(), &[]).await;
    let mut r = release_svc(dir.path(), d.addr, &["--shutdown-delay-ms", "1000"]).await;
    let mut rc = release::connect(r.addr).await;
    release::plain_feature(&mut rc, "new-cart", false).await;

    let mut streams = Vec::new();
    for _ in 0..5 {
        let channel = tests::channel(r.addr).await;
        for _ in 0..100 {
            let mut c = rpb::release_service_client::ReleaseServiceClient::new(channel.clone());
            streams.push(
                c.watch_visibility(rpb::WatchVisibilityRequest::default())
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
    }

    let (mut watch, first) = health_watch(r.addr, "release.v1.ReleaseService").await;
    assert_eq!(first, ServingStatus::Serving as i32);
    let routed = Arc::new(AtomicBool::new(true));
    let noticed = {
        let routed = routed.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = watch.message().await {
                if msg.status != ServingStatus::Serving as i32 {
                    break;
                }
            }
            routed.store(false, Ordering::SeqCst);
        })
    };
    let signalled = Arc::new(AtomicBool::new(false));
    let (ok, after_signal) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (routed, signalled) = (routed.clone(), signalled.clone());
        let (ok, after_signal) = (ok.clone(), after_signal.clone());
        let mut c = release::connect(r.addr).await;
        load.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            // Each client also sends five calls after the signal, whenever it notices: the
            // shutdown delay (1 s) must serve them, as it serves a balancer that lags.
            let mut mine_after = 0;
            while (routed.load(Ordering::SeqCst) || mine_after < 5) && failures.is_empty() {
                let late = signalled.load(Ordering::SeqCst);
                let call = c
                    .evaluate(rpb::EvaluateRequest {
                        feature: "new-cart".into(),
                        context: Some(rpb::EvaluationContext {
                            environment: "prod".into(),
                            targeting_key: "u1".into(),
                            attributes: None,
                        }),
                    })
                    .await;
                match call {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        if late {
                            after_signal.fetch_add(1, Ordering::SeqCst);
                            mine_after += 1;
                        }
                    }
                    Err(status) => failures.push(status),
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    signalled.store(true, Ordering::SeqCst);
    r.signal("TERM");
    let mut failures = Vec::new();
    for task in load {
        failures.extend(task.await.unwrap());
    }
    noticed.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} calls failed: {:?}",
        failures.len(),
        &failures[..1]
    );
    assert!(
        ok.load(Ordering::SeqCst) > 0 && after_signal.load(Ordering::SeqCst) > 0,
        "the load must overlap the signal: {ok:?} OK, {after_signal:?} after it"
    );
    for (i, s) in streams.iter_mut().enumerate() {
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(10), s.message()).await {
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => panic!("stream {i} ended without a status"),
                Ok(Err(status)) => break status,
                Err(_) => panic!("stream {i} still open 10 s after SIGTERM"),
            }
        };
        assert_eq!(end.code(), tonic::Code::Unavailable, "stream {i}: {end:?}");
        assert!(end.message().contains("reconnect"), "stream {i}: {end:?}");
    }
    let status = exited(
        &mut r,
        Duration::from_secs(5).saturating_sub(started.elapsed()),
    )
    .await
    .expect("release-svc did not exit within 5 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    eprintln!(
        "{} calls OK ({} sent after SIGTERM), 500 streams ended UNAVAILABLE, exit {:?} after SIGTERM",
        ok.load(Ordering::SeqCst),
        after_signal.load(Ordering::SeqCst),
        started.elapsed()
    );
}

/// A storage failure the service cannot classify reaches the log with its whole chain
/// (PostgreSQL's client says only "db error"; the server's message is its source), and
/// the caller gets INTERNAL without it.
#[tokio::test]
async fn an_internal_storage_error_is_logged_with_its_cause_and_not_returned() {
    let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
        eprintln!("TEST_DATABASE_URL is not set: skipped");
        return;
    };
    let (admin, db_url, db) = tests::fresh_database(&url, "deploy_chain").await;
    let d = Proc::spawn(
        "deploy-svc",
        &["--listen", "127.0.0.1:0", "--database", &db_url],
        &[],
        true,
    )
    .await;
    let mut dc = tests::connect(d.addr).await;
    environment(&mut dc, "dev", None, false).await;
    // Break the schema under the running service.
    let (broken, connection) = tokio_postgres::connect(
        &format!("{}/{db}", url.rsplit_once('/').unwrap().0),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    broken
        .batch_execute("DROP TABLE targets CASCADE")
        .await
        .unwrap();
    drop(admin);
    let failed = dc
        .register_target(pb::RegisterTargetRequest {
            parent: "environments/dev".into(),
            target_id: "t1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Internal, "{failed:?}");
    assert!(
        !failed.message().contains("targets"),
        "the cause stays in the log: {failed:?}"
    );
    let line = d
        .log("the internal error with its cause", |v| {
            v["fields"]["message"] == "internal error"
        })
        .await;
    let error = line["fields"]["error"].as_str().unwrap();
    assert!(
        error.contains("db error") && error.contains(r#"relation "targets" does not exist"#),
        "{error}"
    );
}
