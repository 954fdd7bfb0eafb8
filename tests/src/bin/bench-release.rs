//! Benchmarks of release-svc (see docs/benchmarks.md). Each starts the real release binaries.
//!
//! ```sh
//! cargo build --release -p deploy-svc -p release-svc -p tests
//! target/release/bench-release throughput   # Evaluate over h2load vs a no-op tonic baseline
//! target/release/bench-release flagd        # flagd v2 ResolveBoolean vs native Evaluate
//! target/release/bench-release gate         # placement change -> visibility change latency
//! target/release/bench-release memory       # RSS with 10,000 features x 10 environments, restart time
//! ```

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use prost::Message;
use proto::deploy::v1::PlacementState as P;
use proto::release::v1 as rpb;
use tests::release::{self, evaluate};
use tests::{artifact, deploy, environment, report, targets, Binary, Gated};

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
    let tmp = tempfile::Builder::new()
        .prefix("pair")
        .tempdir_in(dir)
        .unwrap();
    let deploy = Binary::start(&tmp.path().join("deploy.db"), &[]).await;
    let release_args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--database".into(),
        tmp.path().join("release.db").to_string_lossy().into_owned(),
        "--deploy-svc".into(),
        format!("http://{}", deploy.addr),
    ];
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
        Cmd::Flagd {
            requests,
            clients,
            streams,
            rounds,
        } => flagd(&args.dir, requests, clients, streams, rounds).await,
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
        .arg(format!("http://{addr}/{method}"))
        .output()
        .expect("h2load missing: apt-get install nghttp2-client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
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
    (rps, status)
}

/// The pair with `new-cart` released to 50% of prod behind a placed carrier, and the
/// Evaluate request the throughput runs send (bob: inside the 50%).
async fn loaded_pair(dir: &Path) -> (Pair, release::Client, rpb::EvaluateRequest) {
    let p = pair(dir).await;
    let mut dc = tests::connect(p.deploy.addr).await;
    let mut rc = release::connect(p.release.addr).await;
    let request = load(&mut dc, &mut rc).await;
    (p, rc, request)
}

/// Releases `new-cart` to 50% of prod behind a placed carrier; returns the Evaluate
/// request the throughput runs send (bob: inside the 50%), checked once.
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
            targeting_key: "bob".into(),
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
    let after = evaluate(&mut rc, "new-cart", "prod", "bob").await;
    assert_eq!(after.reason(), rpb::Reason::Split);
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio release-svc / baseline: median {:.3} (rounds: {ratios:.3?})",
        ratios[ratios.len() / 2]
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
                    kind: Some(prost_types::value::Kind::StringValue("bob".into())),
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
    let after = evaluate(&mut rc, "new-cart", "prod", "bob").await;
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
    let (d, pt) = (g.deployment.clone(), g.targets.clone());
    let mut h = Histogram::<u64>::new(3).unwrap();
    for i in 0..flips {
        let opening = i % 2 == 0;
        if opening && i > 0 {
            report(&mut dc, &d, &pt[0], P::Placing).await.unwrap();
        }
        let want = if opening {
            rpb::Reason::Static
        } else {
            rpb::Reason::NotDeployed
        };
        let state = if opening { P::Placed } else { P::Removed };
        let start = Instant::now();
        report(&mut dc, &d, &pt[0], state).await.unwrap();
        loop {
            if evaluate(&mut rc, "new-cart", "prod", "u").await.reason() == want {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "flip {i} never seen"
            );
        }
        h.record(start.elapsed().as_micros() as u64).unwrap();
    }
    println!(
        "placement report sent -> Evaluate sees the change, {} flips: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

async fn memory(dir: &Path, features: usize, environments: usize) {
    let mut p = pair(dir).await;
    let mut rc = release::connect(p.release.addr).await;
    let idle = rss_kib(p.release.child.id().unwrap());
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
    let loaded = rss_kib(p.release.child.id().unwrap());
    let probe = evaluate(&mut rc, "feature-00042", "env-3", "u").await;
    println!("loaded {features} features x {environments} environments in {load_time:.1?}");
    println!(
        "release-svc RSS: idle {:.1} MiB, loaded {:.1} MiB",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0
    );

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
        "restart: listening after {:.0} ms, first Evaluate answered after {:.0} ms; RSS after restart {:.1} MiB",
        listening.as_secs_f64() * 1000.0,
        serving.as_secs_f64() * 1000.0,
        rss_kib(restarted.child.id().unwrap()) as f64 / 1024.0
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
    let mut releases = Vec::new();
    for d in &deploys {
        let deploy_url = format!("http://{}", d.addr);
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--database",
            &release_db,
            "--deploy-svc",
            &deploy_url,
        ];
        releases.push(Binary::spawn("release-svc", &args).await);
    }
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
            evaluate(rc, "new-cart", "prod", "bob").await.reason(),
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
    let (check, _) = release::eventually(
        rc,
        "new-cart",
        "prod",
        "bob",
        rpb::Reason::Split,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(check.reason(), rpb::Reason::Split, "{check:?}");
}
