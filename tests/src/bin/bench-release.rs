//! Benchmarks of release-svc (see docs/benchmarks.md). Each starts the real release binaries.
//!
//! ```sh
//! cargo build --release -p deploy-svc -p release-svc -p tests
//! target/release/bench-release throughput   # Evaluate over h2load vs a no-op tonic baseline
//! target/release/bench-release secure-throughput  # Evaluate with TLS + JWT vs plaintext, no auth
//! target/release/bench-release flagd        # flagd v2 ResolveBoolean vs native Evaluate
//! target/release/bench-release gate         # placement change -> visibility change latency
//! target/release/bench-release memory       # RSS with 10,000 features x 10 environments, restart time
//! ```

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use prost::Message;
use proto::deploy::v1::PlacementState as P;
use proto::release::v1 as rpb;
use proto::release::v1::release_service_client::ReleaseServiceClient;
use service_kit::client::ClientSecurity;
use tests::release::{self, evaluate};
use tests::{artifact, deploy, environment, pki, report, targets, Binary, Gated};

#[derive(Parser)]
struct Args {
    /// Where the databases go.
    #[arg(long, default_value = "target/bench-data")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Evaluate requests/s over two release-svc replicas (and two deploy-svc replicas) on
    /// PostgreSQL, beside one pair on SQLite, in alternating rounds.
    Replicas {
        /// A PostgreSQL server (databases are created on it).
        #[arg(
            long,
            env = "TEST_DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        url: String,
        /// Requests per round (split over the replicas).
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
        /// Connections per replica.
        #[arg(long, default_value_t = 8)]
        clients: u32,
        /// Concurrent streams per connection.
        #[arg(long, default_value_t = 32)]
        streams: u32,
        /// Rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Evaluate requests/s with h2load against release-svc and a no-op baseline.
    Throughput {
        /// Requests per h2load run.
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
        /// Connections.
        #[arg(long, default_value_t = 8)]
        clients: u32,
        /// Concurrent streams per connection.
        #[arg(long, default_value_t = 32)]
        streams: u32,
        /// Alternating rounds (baseline, release-svc).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Evaluate requests/s with TLS and bearer JWT authentication on, against plaintext with
    /// authentication off, in alternating rounds.
    SecureThroughput {
        /// Requests per h2load run.
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
        /// Connections.
        #[arg(long, default_value_t = 8)]
        clients: u32,
        /// Concurrent streams per connection.
        #[arg(long, default_value_t = 32)]
        streams: u32,
        /// Alternating rounds (plaintext, secure).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// flagd v2 ResolveBoolean requests/s against native Evaluate on the same release-svc.
    Flagd {
        /// Requests per h2load run.
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
        /// Connections.
        #[arg(long, default_value_t = 8)]
        clients: u32,
        /// Concurrent streams per connection.
        #[arg(long, default_value_t = 32)]
        streams: u32,
        /// Alternating rounds (Evaluate, ResolveBoolean).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// OFREP single evaluation over HTTP/1.1 keep-alive against gRPC Evaluate over HTTP/2, the
    /// same decision with the same number of requests in flight, alternating rounds.
    Ofrep {
        /// Requests per h2load run.
        #[arg(long, default_value_t = 100_000)]
        requests: u64,
        /// Requests in flight: gRPC 8 connections x in_flight/8 streams, OFREP in_flight
        /// HTTP/1.1 connections with one request each.
        #[arg(long, default_value_t = 256)]
        in_flight: u32,
        /// Alternating rounds.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// In-process (flagd sync) against remote (flagd RPC) evaluation in the same client:
    /// the stock Python flagd provider, alternating rounds (needs python3 with
    /// openfeature-provider-flagd on the PATH, as `scripts/test` sets up in target/venv).
    InProcess {
        /// Evaluations per round and resolver.
        #[arg(long, default_value_t = 5_000)]
        evaluations: usize,
        /// Alternating rounds.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Placement change -> visibility change seen by an Evaluate poller.
    Gate {
        /// Gate flips measured (half opening, half closing).
        #[arg(long, default_value_t = 200)]
        flips: usize,
    },
    /// Resident memory with many features and environments; restart-to-serving time.
    Memory {
        /// Features.
        #[arg(long, default_value_t = 10_000)]
        features: usize,
        /// Environments each feature is released to.
        #[arg(long, default_value_t = 10)]
        environments: usize,
    },
}

struct Pair {
    deploy: Binary,
    release: Binary,
    _dir: tempfile::TempDir,
    release_args: Vec<String>,
}

async fn pair(dir: &Path) -> Pair {
    pair_with(dir, &[]).await
}

/// [`pair`] with `extra` release-svc arguments.
async fn pair_with(dir: &Path, extra: &[&str]) -> Pair {
    let tmp = tempfile::Builder::new()
        .prefix("pair")
        .tempdir_in(dir)
        .unwrap();
    let deploy = Binary::start(&tmp.path().join("deploy.db"), &[]).await;
    let mut release_args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--database".into(),
        tmp.path().join("release.db").to_string_lossy().into_owned(),
        "--deploy-svc".into(),
        format!("http://{}", deploy.addr),
    ];
    release_args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = release_args.iter().map(String::as_str).collect();
    let release = Binary::spawn("release-svc", &args).await;
    Pair {
        deploy,
        release,
        _dir: tmp,
        release_args,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir).unwrap();
    match args.command {
        Cmd::Replicas {
            url,
            requests,
            clients,
            streams,
            rounds,
        } => replicas(&args.dir, &url, requests, clients, streams, rounds).await,
        Cmd::Throughput {
            requests,
            clients,
            streams,
            rounds,
        } => throughput(&args.dir, requests, clients, streams, rounds).await,
        Cmd::SecureThroughput {
            requests,
            clients,
            streams,
            rounds,
        } => secure_throughput(&args.dir, requests, clients, streams, rounds).await,
        Cmd::Flagd {
            requests,
            clients,
            streams,
            rounds,
        } => flagd(&args.dir, requests, clients, streams, rounds).await,
        Cmd::Ofrep {
            requests,
            in_flight,
            rounds,
        } => ofrep(&args.dir, requests, in_flight, rounds).await,
        Cmd::InProcess {
            evaluations,
            rounds,
        } => in_process(&args.dir, evaluations, rounds).await,
        Cmd::Gate { flips } => gate(&args.dir, flips).await,
        Cmd::Memory {
            features,
            environments,
        } => memory(&args.dir, features, environments).await,
    }
}

const EVALUATE: &str = "release.v1.ReleaseService/Evaluate";
const RESOLVE_BOOLEAN: &str = "flagd.evaluation.v2.Service/ResolveBoolean";

/// One h2load run; returns requests/s and h2load's status-code line. `headers` are added to
/// every request.
fn h2load(
    addr: std::net::SocketAddr,
    method: &str,
    headers: &[&str],
    body: &Path,
    requests: u64,
    clients: u32,
    streams: u32,
) -> (f64, String) {
    let run = h2load_at(
        &format!("http://{addr}"),
        method,
        headers,
        body,
        requests,
        clients,
        streams,
    );
    (run.rps, run.status)
}

/// What one h2load run reports.
struct H2load {
    /// Requests per second.
    rps: f64,
    /// The `status codes:` line.
    status: String,
    /// Response body bytes (DATA frames) over all requests.
    data: u64,
}

/// One h2load run against `base` (`http://ADDR`, or `https://ADDR` for TLS with ALPN h2).
fn h2load_at(
    base: &str,
    method: &str,
    headers: &[&str],
    body: &Path,
    requests: u64,
    clients: u32,
    streams: u32,
) -> H2load {
    let out = Command::new("h2load")
        .args([
            "-n",
            &requests.to_string(),
            "-c",
            &clients.to_string(),
            "-m",
            &streams.to_string(),
            "-t",
            "1",
        ])
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(headers.iter().flat_map(|h| ["-H", h]))
        .arg(format!("{base}/{method}"))
        .output()
        .expect("h2load missing: apt-get install nghttp2-client");
    parse_h2load(&String::from_utf8_lossy(&out.stdout))
}

/// One h2load run over HTTP/1.1 keep-alive (`--h1`, one request at a time per connection)
/// POSTing `body` as JSON to `url`.
fn h2load_h1(url: &str, headers: &[&str], body: &Path, requests: u64, connections: u32) -> H2load {
    let out = Command::new("h2load")
        .args([
            "--h1",
            "-n",
            &requests.to_string(),
            "-c",
            &connections.to_string(),
        ])
        .args(["-m", "1", "-t", "1"])
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/json"])
        .args(headers.iter().flat_map(|h| ["-H", h]))
        .arg(url)
        .output()
        .expect("h2load missing: apt-get install nghttp2-client");
    parse_h2load(&String::from_utf8_lossy(&out.stdout))
}

/// Requests/s, status codes and data bytes from h2load's report.
fn parse_h2load(text: &str) -> H2load {
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read h2load output:\n{text}"));
    let status = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_default()
        .to_owned();
    // "traffic: 9.92MB (10400000) total, 1.15MB (1200000) headers (...), 3.81MB (4000000) data"
    let data = text
        .lines()
        .find(|l| l.starts_with("traffic:"))
        .and_then(|l| l.rsplit(", ").next())
        .and_then(|s| s.split_once('(')?.1.split_once(')'))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read h2load traffic:\n{text}"));
    H2load { rps, status, data }
}

/// The pair with `new-cart` released to 50% of prod behind a placed carrier, and the
/// Evaluate request the throughput runs send (alice: inside the 50%).
async fn loaded_pair(dir: &Path) -> (Pair, release::Client, rpb::EvaluateRequest) {
    let p = pair(dir).await;
    let mut dc = tests::connect(p.deploy.addr).await;
    let mut rc = release::connect(p.release.addr).await;
    let request = load(&mut dc, &mut rc).await;
    (p, rc, request)
}

/// OFREP over HTTP/1.1 against gRPC Evaluate on one release-svc (see [`Cmd::Ofrep`]).
async fn ofrep(dir: &Path, requests: u64, in_flight: u32, rounds: usize) {
    let mut p = pair_with(dir, &["--ofrep-listen", "127.0.0.1:0"]).await;
    let ofrep = p.release.address_of("OFREP").await;
    let mut dc = tests::connect(p.deploy.addr).await;
    let mut rc = release::connect(p.release.addr).await;
    let request = load(&mut dc, &mut rc).await;
    let url = format!("http://{ofrep}/ofrep/v1/evaluate/flags/new-cart");
    let json_body = dir.join("ofrep.json");
    std::fs::write(
        &json_body,
        r#"{"context": {"targetingKey": "alice", "environment": "prod"}}"#,
    )
    .unwrap();
    // The same decision both ways, checked once (h2load counts any 200).
    let check = h2load_h1(&url, &[], &json_body, 1, 1);
    assert!(check.status.contains("1 2xx"), "{}", check.status);
    let evaluate_body = dir.join("evaluate.bin");
    frame(&request, &evaluate_body);
    pin(&[p.release.child.id(), p.deploy.child.id()]);
    let streams = (in_flight / 8).max(1);
    let grpc = |n: u64| {
        let run = h2load_at(
            &format!("http://{}", p.release.addr),
            EVALUATE,
            &[],
            &evaluate_body,
            n,
            8,
            streams,
        );
        assert!(run.status.contains(&format!("{n} 2xx")), "{}", run.status);
        run.rps
    };
    let http1 = |n: u64| {
        let run = h2load_h1(&url, &[], &json_body, n, in_flight);
        assert!(run.status.contains(&format!("{n} 2xx")), "{}", run.status);
        // Every answer is the SPLIT decision's JSON (h2load does not read bodies).
        assert!(
            run.data >= n * 40,
            "OFREP answers too short: {} bytes",
            run.data
        );
        run.rps
    };
    grpc(requests / 4);
    http1(requests / 4);
    println!("| round | gRPC Evaluate (HTTP/2) req/s | OFREP (HTTP/1.1 keep-alive) req/s | OFREP / gRPC |");
    println!("|---|---|---|---|");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let (g, o) = if round % 2 == 1 {
            let g = grpc(requests);
            (g, http1(requests))
        } else {
            let o = http1(requests);
            (grpc(requests), o)
        };
        println!("| {round} | {g:.0} | {o:.0} | {:.3} |", o / g);
        ratios.push(o / g);
    }
    ratios.sort_by(f64::total_cmp);
    println!("median OFREP / gRPC: {:.3}", ratios[ratios.len() / 2]);
    let after = evaluate(&mut rc, "new-cart", "prod", "alice").await;
    assert_eq!(after.reason(), rpb::Reason::Split, "{after:?}");
}

/// Runs tests/python/bench_in_process.py against one pair (`new-cart` at 50%) whose
/// rollouts bucket as the Python provider does, and prints its rounds.
async fn in_process(dir: &Path, evaluations: usize, rounds: usize) {
    let p = pair_with(dir, &["--fractional-bucketing", "v3"]).await;
    let mut dc = tests::connect(p.deploy.addr).await;
    let mut rc = release::connect(p.release.addr).await;
    load(&mut dc, &mut rc).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/bench_in_process.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .env("FLAGD_HOST", p.release.addr.ip().to_string())
        .env("FLAGD_PORT", p.release.addr.port().to_string())
        .env("FLAG_KEY", "new-cart")
        .env("ROUNDS", rounds.to_string())
        .env("EVALUATIONS", evaluations.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the benchmark script failed");
    println!(
        "| round | remote (RPC) evaluations/s | in-process evaluations/s | in-process / remote |"
    );
    println!("|---|---|---|---|");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(round) = v.get("round") {
            println!(
                "| {round} | {} | {} | {} |",
                v["remote_per_s"], v["in_process_per_s"], v["ratio"]
            );
        } else {
            println!("median in-process / remote: {}", v["median_ratio"]);
        }
    }
}

/// Releases `new-cart` to 50% of prod behind a placed carrier; returns the Evaluate
/// request the throughput runs send (alice: inside the 50%), checked once.
async fn load(dc: &mut tests::Client, rc: &mut release::Client) -> rpb::EvaluateRequest {
    let (mut dc, mut rc) = (dc.clone(), rc.clone());
    environment(&mut dc, "prod", None, false).await;
    let pt = targets(&mut dc, "prod", "p", 4).await;
    artifact(&mut dc, "checkout", "2.0.0").await;
    rc.create_feature(rpb::CreateFeatureRequest {
        feature: Some(rpb::Feature {
            key: "new-cart".into(),
            targeting: r#"{"if": [{"ends_with": [{"var": "email"}, "@corp.com"]}, "on", null]}"#
                .into(),
            carriers: vec![rpb::Carrier {
                artifact: "checkout".into(),
                min_version: "2.0.0".into(),
                required_coverage: 1.0,
            }],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let rel = release::release(&mut rc, &["new-cart"], &["prod"]).await;
    release::rollout(&mut rc, &rel, "prod", 50.0).await;
    let d = deploy(&mut dc, "checkout", "2.0.0", "prod", "")
        .await
        .unwrap();
    for t in &pt {
        report(&mut dc, &d.name, t, P::Placed).await.unwrap();
    }
    let request = rpb::EvaluateRequest {
        feature: "new-cart".into(),
        context: Some(rpb::EvaluationContext {
            environment: "prod".into(),
            targeting_key: "alice".into(),
            attributes: None,
        }),
    };
    // The answer h2load will get, checked once (h2load counts HTTP 200 even for gRPC errors).
    expect_split(&mut rc).await;
    request
}

/// Pins the processes to CPU 0 (h2load gets CPU 1).
fn pin(pids: &[Option<u32>]) {
    for pid in pids.iter().flatten() {
        let ok = Command::new("taskset")
            .args(["-a", "-cp", "0", &pid.to_string()])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "taskset failed for pid {pid}");
    }
}

/// Writes `message` as one gRPC frame to `path`.
fn frame(message: &impl Message, path: &Path) {
    let encoded = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(encoded.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&encoded);
    std::fs::write(path, frame).unwrap();
}

async fn throughput(dir: &Path, requests: u64, clients: u32, streams: u32, rounds: usize) {
    let (p, mut rc, request) = loaded_pair(dir).await;
    let noop = Binary::spawn("noop-release", &[]).await;
    let mut nc = release::connect(noop.addr).await;
    assert!(
        nc.evaluate(request.clone())
            .await
            .unwrap()
            .into_inner()
            .visible
    );

    pin(&[p.release.child.id(), noop.child.id(), p.deploy.child.id()]);
    let body = dir.join("evaluate.bin");
    frame(&request, &body);

    // Warm both up (connections, allocator, caches) before measuring.
    h2load(
        noop.addr,
        EVALUATE,
        &[],
        &body,
        requests / 4,
        clients,
        streams,
    );
    h2load(
        p.release.addr,
        EVALUATE,
        &[],
        &body,
        requests / 4,
        clients,
        streams,
    );
    println!("| round | server | requests/s | h2load status codes |");
    println!("|---|---|---|---|");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let (base, bs) = h2load(noop.addr, EVALUATE, &[], &body, requests, clients, streams);
        let (svc, ss) = h2load(
            p.release.addr,
            EVALUATE,
            &[],
            &body,
            requests,
            clients,
            streams,
        );
        println!("| {round} | no-op tonic baseline | {base:.0} | {bs} |");
        println!("| {round} | release-svc Evaluate | {svc:.0} | {ss} |");
        ratios.push(svc / base);
    }
    // Still correct after the load.
    let after = evaluate(&mut rc, "new-cart", "prod", "alice").await;
    assert_eq!(after.reason(), rpb::Reason::Split);
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio release-svc / baseline: median {:.3} (rounds: {ratios:.3?})",
        ratios[ratios.len() / 2]
    );
}

const ISSUER: &str = "https://issuer.bench.test";
const AUDIENCE: &str = "release-svc";
/// The evaluating application, as a Kubernetes service account would be named.
const APP: &str = "system:serviceaccount:apps:checkout";

/// The TLS and JWT material of the secure runs, made at run time.
struct Material {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    token: String,
    token_file: PathBuf,
    /// release-svc's flags for TLS on the listener.
    tls: Vec<String>,
    /// release-svc's flags for bearer JWTs and the policy.
    auth: Vec<String>,
}

/// A CA, release-svc's certificate, an ES256 signer and its JWKS, one day-long token for
/// [`APP`], and a policy binding [`APP`] to `evaluator` in `prod` only.
fn material(dir: &Path) -> Material {
    let tmp = tempfile::Builder::new()
        .prefix("pki")
        .tempdir_in(dir)
        .unwrap();
    let d = tmp.path();
    let ca = pki::Ca::new(d, "bench-ca").unwrap();
    let server = ca.server(d, "release-svc").unwrap();
    let signer = pki::Signer::es256("bench-1").unwrap();
    pki::jwks(&d.join("jwks.json"), &[&signer]).unwrap();
    let now = pki::now();
    let token = signer.sign(&serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": APP,
        "iat": now, "nbf": now, "exp": now + 24 * 3600,
    }));
    let token_file = d.join("app.token");
    std::fs::write(&token_file, &token).unwrap();
    pki::policy_file(
        &d.join("policy.json"),
        &[serde_json::json!({"role": "evaluator", "principals": [APP], "environments": ["prod"]})],
    )
    .unwrap();
    let p = |x: &Path| x.to_string_lossy().into_owned();
    let tls = vec![
        "--tls-cert".into(),
        p(&server.cert),
        "--tls-key".into(),
        p(&server.key),
    ];
    let auth = vec![
        "--auth-jwks".into(),
        p(&d.join("jwks.json")),
        "--auth-jwt-issuer".into(),
        ISSUER.into(),
        "--auth-jwt-audience".into(),
        AUDIENCE.into(),
        "--auth-policy".into(),
        p(&d.join("policy.json")),
    ];
    Material {
        ca: ca.pem.clone(),
        _dir: tmp,
        token,
        token_file,
        tls,
        auth,
    }
}

/// The three set-ups of `secure-throughput`.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Plain,
    /// Plaintext, authentication off, but every request carries the bearer token (which
    /// the server decodes and ignores): the cost of the header alone.
    PlainWithToken,
    Tls,
    Secure,
}

impl Setup {
    const ALL: [Setup; 4] = [
        Setup::Plain,
        Setup::PlainWithToken,
        Setup::Tls,
        Setup::Secure,
    ];

    fn name(self) -> &'static str {
        match self {
            Setup::Plain => "plaintext, auth off",
            Setup::PlainWithToken => "plaintext, auth off, token header sent",
            Setup::Tls => "TLS, auth off",
            Setup::Secure => "TLS + JWT (evaluator)",
        }
    }
}

/// A pair loaded as in `throughput` with authentication off, then release-svc restarted on
/// its database with `extra` flags; returns the pair's deploy-svc, release-svc and data.
async fn restarted(dir: &Path, extra: &[String]) -> (Binary, Binary, tempfile::TempDir) {
    let Pair {
        deploy,
        release,
        _dir: data,
        release_args,
    } = loaded_pair(dir).await.0;
    release.kill().await;
    let args: Vec<&str> = release_args
        .iter()
        .chain(extra)
        .map(String::as_str)
        .collect();
    (deploy, Binary::spawn("release-svc", &args).await, data)
}

/// Polls Evaluate until the answer is the 50% split (a restarted release-svc first learns
/// the placements again).
async fn until_split<T>(
    c: &mut ReleaseServiceClient<T>,
    request: &rpb::EvaluateRequest,
) -> rpb::EvaluateResponse
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let start = Instant::now();
    loop {
        let a = c.evaluate(request.clone()).await.unwrap().into_inner();
        if a.reason() == rpb::Reason::Split || start.elapsed() > Duration::from_secs(10) {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Evaluate over plaintext with authentication off, against Evaluate over TLS with bearer
/// JWT authentication on (and over TLS alone, to tell the two costs apart), in rotating
/// rounds with the same h2load flags.
async fn secure_throughput(dir: &Path, requests: u64, clients: u32, streams: u32, rounds: usize) {
    // Plaintext, authentication off.
    let (plain, mut rc, request) = loaded_pair(dir).await;
    let plain_answer = rc.evaluate(request.clone()).await.unwrap().into_inner();
    assert_eq!(plain_answer.reason(), rpb::Reason::Split);

    // The same data set made with authentication off, then release-svc restarted on its
    // database with TLS (and, for the secure set-up, JWT authentication, where the token's
    // principal holds only `evaluator` in prod, as an application back end would).
    let m = material(dir);
    let (tls_deploy, tls, _tls_data) = restarted(dir, &m.tls).await;
    let both: Vec<String> = m.tls.iter().chain(&m.auth).cloned().collect();
    let (secure_deploy, secure, _secure_data) = restarted(dir, &both).await;
    let tls_url = format!("https://{}", tls.addr);
    let secure_url = format!("https://{}", secure.addr);
    let anonymous = ClientSecurity {
        ca: Some(m.ca.clone()),
        ..Default::default()
    };
    let security = ClientSecurity {
        token_file: Some(m.token_file.clone()),
        ..anonymous.clone()
    };
    let mut tc = ReleaseServiceClient::new(anonymous.connect(&tls_url).await.unwrap());
    let mut sc = ReleaseServiceClient::new(security.connect(&secure_url).await.unwrap());
    // Authentication is really on: no token, no answer.
    let refused = ReleaseServiceClient::new(anonymous.connect(&secure_url).await.unwrap())
        .evaluate(request.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    // The same answer everywhere, checked with a real client over TLS with the bearer token
    // (h2load counts HTTP 200 even for gRPC errors).
    let tls_answer = until_split(&mut tc, &request).await;
    let secure_answer = until_split(&mut sc, &request).await;
    for a in [&tls_answer, &secure_answer] {
        assert_eq!(
            (a.reason(), a.visible),
            (plain_answer.reason(), plain_answer.visible),
            "{a:?} vs {plain_answer:?}"
        );
    }

    pin(&[
        plain.release.child.id(),
        plain.deploy.child.id(),
        tls.child.id(),
        tls_deploy.child.id(),
        secure.child.id(),
        secure_deploy.child.id(),
    ]);
    let body = dir.join("evaluate.bin");
    frame(&request, &body);
    let bearer = format!("authorization: Bearer {}", m.token);
    let plain_url = format!("http://{}", plain.release.addr);
    // Every response must carry exactly the one message checked above: a gRPC error is a
    // trailers-only response without any DATA, so h2load's data bytes prove the status.
    let run = |setup: Setup, n: u64| {
        let (base, headers, answer) = match setup {
            Setup::Plain => (&plain_url, vec![], &plain_answer),
            Setup::PlainWithToken => (&plain_url, vec![bearer.as_str()], &plain_answer),
            Setup::Tls => (&tls_url, vec![], &tls_answer),
            Setup::Secure => (&secure_url, vec![bearer.as_str()], &secure_answer),
        };
        let got = h2load_at(base, EVALUATE, &headers, &body, n, clients, streams);
        assert!(
            got.status.contains(&format!("{n} 2xx")),
            "{base}: {}",
            got.status
        );
        let message = 5 + u64::try_from(answer.encoded_len()).unwrap();
        assert_eq!(
            got.data,
            n * message,
            "{base}: {} response bytes, not {n} x {message}: some calls did not answer",
            got.data
        );
        got
    };
    for setup in Setup::ALL {
        run(setup, requests / 4);
    }
    println!("| round | set-up | requests/s | h2load status codes |");
    println!("|---|---|---|---|");
    let mut ratios = vec![Vec::new(); Setup::ALL.len()];
    let mut same_flags = Vec::new();
    for round in 1..=rounds {
        // Rotate which goes first, so drift on the machine favours none.
        let mut rps = [0.0; Setup::ALL.len()];
        for i in 0..rps.len() {
            let k = (i + round) % rps.len();
            let got = run(Setup::ALL[k], requests);
            println!(
                "| {round} | {} | {:.0} | {} |",
                Setup::ALL[k].name(),
                got.rps,
                got.status
            );
            rps[k] = got.rps;
        }
        for (k, r) in rps.iter().enumerate() {
            ratios[k].push(r / rps[0]);
        }
        // The same h2load flags on both sides: the token header sent to a server with
        // TLS and authentication off, against TLS + JWT.
        same_flags.push(rps[Setup::Secure as usize] / rps[Setup::PlainWithToken as usize]);
    }
    // Still answering correctly, and with OK, after the load.
    let checks = 1000;
    for _ in 0..checks {
        let a = sc.evaluate(request.clone()).await.unwrap().into_inner();
        assert_eq!(a.reason(), rpb::Reason::Split);
    }
    assert_eq!(
        until_split(&mut tc, &request).await.reason(),
        rpb::Reason::Split
    );
    let after = evaluate(&mut rc, "new-cart", "prod", "alice").await;
    assert_eq!(after.reason(), rpb::Reason::Split);
    println!(
        "every h2load response carried one EvaluateResponse; {checks} more calls over TLS + JWT answered OK"
    );
    for (setup, mut ratios) in Setup::ALL.into_iter().zip(ratios).skip(1) {
        ratios.sort_by(f64::total_cmp);
        println!(
            "ratio {} / {}: median {:.3} (rounds: {ratios:.3?})",
            setup.name(),
            Setup::Plain.name(),
            ratios[ratios.len() / 2]
        );
    }
    same_flags.sort_by(f64::total_cmp);
    println!(
        "ratio {} / {} (same h2load flags): median {:.3} (rounds: {same_flags:.3?})",
        Setup::Secure.name(),
        Setup::PlainWithToken.name(),
        same_flags[same_flags.len() / 2]
    );
}

async fn flagd(dir: &Path, requests: u64, clients: u32, streams: u32, rounds: usize) {
    use proto::flagd::evaluation::v2 as fpb;
    let (p, mut rc, request) = loaded_pair(dir).await;
    // The same decision through the flagd protocol: environment from the selector header
    // h2load sends, the user from the context's targetingKey.
    let resolve = fpb::ResolveBooleanRequest {
        flag_key: "new-cart".into(),
        context: Some(prost_types::Struct {
            fields: [(
                "targetingKey".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("alice".into())),
                },
            )]
            .into(),
        }),
    };
    let mut fc = fpb::service_client::ServiceClient::new(tests::channel(p.release.addr).await);
    let mut check = tonic::Request::new(resolve.clone());
    check
        .metadata_mut()
        .insert("flagd-selector", "flagSetId=prod".parse().unwrap());
    let answer = fc.resolve_boolean(check).await.unwrap().into_inner();
    assert_eq!(
        (answer.value, answer.reason.as_str()),
        (Some(true), "TARGETING_MATCH"),
        "{answer:?}"
    );
    pin(&[p.release.child.id(), p.deploy.child.id()]);
    let evaluate_body = dir.join("evaluate.bin");
    frame(&request, &evaluate_body);
    let resolve_body = dir.join("resolve-boolean.bin");
    frame(&resolve, &resolve_body);
    // Both calls carry the selector header (Evaluate ignores it), so the requests differ
    // only in method and message.
    let run = |method: &str, body: &Path, n: u64| {
        let (rps, status) = h2load(
            p.release.addr,
            method,
            &["flagd-selector: flagSetId=prod"],
            body,
            n,
            clients,
            streams,
        );
        assert!(status.contains(&format!("{n} 2xx")), "{method}: {status}");
        rps
    };
    run(EVALUATE, &evaluate_body, requests / 4);
    run(RESOLVE_BOOLEAN, &resolve_body, requests / 4);
    println!("| round | call | requests/s |");
    println!("|---|---|---|");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let native = run(EVALUATE, &evaluate_body, requests);
        let flagd = run(RESOLVE_BOOLEAN, &resolve_body, requests);
        println!("| {round} | release.v1 Evaluate | {native:.0} |");
        println!("| {round} | flagd.evaluation.v2 ResolveBoolean | {flagd:.0} |");
        ratios.push(flagd / native);
    }
    let after = evaluate(&mut rc, "new-cart", "prod", "alice").await;
    assert_eq!(after.reason(), rpb::Reason::Split);
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio ResolveBoolean / Evaluate: median {:.3} (rounds: {ratios:.3?})",
        ratios[ratios.len() / 2]
    );
}

async fn gate(dir: &Path, flips: usize) {
    let p = pair(dir).await;
    let mut dc = tests::connect(p.deploy.addr).await;
    let mut rc = release::connect(p.release.addr).await;
    // 50% coverage of 2 targets: p-1 placed opens the gate, p-1 removed closes it; p-2
    // stays pending so the deployment never finishes and p-1 can cycle.
    let g = Gated::setup(&mut dc, &mut rc, 2, 0.5, 100.0).await;
    let h = g.flip_latencies(&mut dc, &mut rc, flips).await;
    println!(
        "placement report sent -> Evaluate sees the change, {} flips: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

fn rss_kib(pid: u32) -> u64 {
    tests::rss_kib(pid).expect("the server is running")
}

/// VmRSS and RssAnon of `pid`, in MiB, for printing.
fn rss_mib(pid: u32) -> String {
    let anon = tests::rss_anon_kib(pid).expect("the server is running");
    format!(
        "{:.1} MiB (anonymous {:.1} MiB)",
        rss_kib(pid) as f64 / 1024.0,
        anon as f64 / 1024.0
    )
}

async fn memory(dir: &Path, features: usize, environments: usize) {
    let mut p = pair(dir).await;
    let mut rc = release::connect(p.release.addr).await;
    let idle = rss_mib(p.release.child.id().unwrap());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut rc = rc.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..features).step_by(8) {
                rc.create_feature(rpb::CreateFeatureRequest {
                    feature: Some(rpb::Feature {
                        key: format!("feature-{i:05}"),
                        description: format!("benchmark feature {i}"),
                        owner: "bench".into(),
                        targeting: format!(r#"{{"if": [{{"in": [{{"var": "plan"}}, ["pro", "team-{i}"]]}}, "on", null]}}"#),
                        carriers: vec![rpb::Carrier {
                            artifact: format!("svc-{}", i % 50),
                            min_version: "1.0.0".into(),
                            required_coverage: 1.0,
                        }],
                        ..Default::default()
                    }),
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let envs: Vec<String> = (0..environments).map(|e| format!("env-{e}")).collect();
    let env_refs: Vec<&str> = envs.iter().map(String::as_str).collect();
    for chunk in (0..features).collect::<Vec<_>>().chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("feature-{i:05}")).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let rel = release::release(&mut rc, &key_refs, &env_refs).await;
        for e in &envs {
            release::rollout(&mut rc, &rel, e, 50.0).await;
        }
    }
    let load_time = started.elapsed();
    let loaded = rss_mib(p.release.child.id().unwrap());
    let probe = evaluate(&mut rc, "feature-00042", "env-3", "u").await;
    println!("loaded {features} features x {environments} environments in {load_time:.1?}");
    println!("release-svc RSS: idle {idle}, loaded {loaded}");

    // Restart to serving from the stored state.
    p.release.signal("TERM");
    let _ = p.release.child.wait().await;
    let args: Vec<&str> = p.release_args.iter().map(String::as_str).collect();
    let start = Instant::now();
    let restarted = Binary::spawn("release-svc", &args).await;
    let listening = start.elapsed();
    let mut rc = release::connect(restarted.addr).await;
    let again = evaluate(&mut rc, "feature-00042", "env-3", "u").await;
    let serving = start.elapsed();
    assert_eq!(
        again.reason, probe.reason,
        "the restarted service answers as before"
    );
    println!(
        "restart: listening after {:.0} ms, first Evaluate answered after {:.0} ms; RSS after restart {}",
        listening.as_secs_f64() * 1000.0,
        serving.as_secs_f64() * 1000.0,
        rss_mib(restarted.child.id().unwrap())
    );
    drop(p.deploy);
}

async fn replicas(dir: &Path, url: &str, requests: u64, clients: u32, streams: u32, rounds: usize) {
    let (p, _rc, request) = loaded_pair(dir).await;
    let body = dir.join("evaluate.bin");
    frame(&request, &body);

    let (_, deploy_db, _) = tests::fresh_database(url, "bench_deploy").await;
    let (_, release_db, _) = tests::fresh_database(url, "bench_release").await;
    let mut deploys = Vec::new();
    for _ in 0..2 {
        deploys.push(Binary::start(Path::new(&deploy_db), &[]).await);
    }
    let releases = tests::release_replicas(&deploys, &release_db).await;
    let mut dc = tests::connect(deploys[0].addr).await;
    let mut rc = release::connect(releases[0].addr).await;
    load(&mut dc, &mut rc).await;
    // The second replica serves the same decision, from its own snapshot.
    let mut rc2 = release::connect(releases[1].addr).await;
    expect_split(&mut rc2).await;

    // Warm-up.
    h2load(
        p.release.addr,
        EVALUATE,
        &[],
        &body,
        requests / 4,
        clients,
        streams,
    );
    for r in &releases {
        h2load(r.addr, EVALUATE, &[], &body, requests / 8, clients, streams);
    }
    println!("| round | setup | Evaluate requests/s | h2load status codes |");
    println!("|---|---|---|---|");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let (lite, ls) = h2load(
            p.release.addr,
            EVALUATE,
            &[],
            &body,
            requests,
            clients,
            streams,
        );
        let addrs: Vec<_> = releases.iter().map(|r| r.addr).collect();
        let started = Instant::now();
        let body2 = body.clone();
        let runs: Vec<_> = addrs
            .into_iter()
            .map(|a| {
                let body = body2.clone();
                std::thread::spawn(move || {
                    h2load(a, EVALUATE, &[], &body, requests / 2, clients, streams)
                })
            })
            .collect();
        let results: Vec<(f64, String)> = runs.into_iter().map(|h| h.join().unwrap()).collect();
        // All requests over the wall time of both runs (not the sum of their rates, which
        // would overstate when one finishes first).
        let both = requests as f64 / started.elapsed().as_secs_f64();
        println!("| {round} | 1 release-svc on SQLite | {lite:.0} | {ls} |");
        println!(
            "| {round} | 2 release-svc replicas on PostgreSQL (one h2load each, all requests / wall time) | {both:.0} | {} / {} |",
            results[0].1, results[1].1
        );
        ratios.push(both / lite);
    }
    for rc in [&mut rc, &mut rc2] {
        assert_eq!(
            evaluate(rc, "new-cart", "prod", "alice").await.reason(),
            rpb::Reason::Split
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio 2 PostgreSQL replicas / 1 SQLite: median {:.3} (rounds: {ratios:.3?})",
        ratios[ratios.len() / 2]
    );
    for b in releases.into_iter().chain(deploys) {
        b.kill().await;
    }
}

/// Waits until bob's new-cart decision is the 50% split (h2load counts HTTP 200 even for
/// gRPC errors, so the answer is checked once this way).
async fn expect_split(rc: &mut release::Client) {
    let check = release::eventually(
        rc,
        "new-cart",
        "prod",
        "alice",
        rpb::Reason::Split,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(check.reason(), rpb::Reason::Split, "{check:?}");
}
