//! Deploy agents at scale (see docs/benchmarks.md): the real deploy-svc binary and
//! in-process agents (the same `deploy_agent::runner` loop the `deploy-agent` binary
//! runs, each with its own connection, heartbeat and root directory).
//!
//! ```sh
//! cargo build --release -p deploy-svc -p deploy-agent -p tests
//! target/release/bench-agents place     # 100 agents: all-at-once vs rolling batches of 10
//! target/release/bench-agents memory    # deploy-svc RSS with 1,000 connected agents
//! ```

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use deploy_agent::runner::{run, AgentConfig};
use proto::deploy::v1 as pb;
use proto::deploy::v1::strategy::Kind;
use tests::fleet::{deploy, is, register, tarball, until};
use tests::{connect, environment, Binary};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Where the databases and agent roots go.
    #[arg(long, default_value = "target/bench-data")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time to place one artifact on N agents, all at once and in rolling batches.
    Place {
        /// Agents.
        #[arg(long, default_value_t = 100)]
        agents: usize,
        /// Rolling batch size.
        #[arg(long, default_value_t = 10)]
        batch: u32,
        /// Rounds of each strategy (a new version each round).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// deploy-svc's resident memory with N connected agents.
    Memory {
        /// Agents.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
    },
}

fn rss_kib(pid: u32) -> u64 {
    tests::rss_kib(pid).expect("the server is running")
}

/// The agent's flags, parsed like the `deploy-agent` binary parses them.
#[derive(Parser)]
struct AgentArgs {
    #[command(flatten)]
    agent: AgentConfig,
}

/// Starts `n` in-process agents for environment `bench`.
fn agents(server: &Binary, root: &Path, n: usize, stop: &CancellationToken) {
    for i in 0..n {
        // The artifacts are written next to the agents' roots: allowed as a file source.
        let config = AgentArgs::parse_from([
            "deploy-agent".to_owned(),
            format!("--server=http://{}", server.addr),
            "--environment=bench".into(),
            format!("--target=t-{i:04}"),
            format!("--root={}", root.join(format!("agent-{i:04}")).display()),
            "--heartbeat-ms=5000".into(),
            "--keep=2".into(),
            format!("--allow-file-dir={}", root.display()),
        ])
        .agent;
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = run(config, stop).await;
        });
    }
}

async fn wait_registered(c: &mut tests::Client, n: usize) {
    let start = Instant::now();
    loop {
        let mut count = 0;
        let mut token = String::new();
        loop {
            let page = c
                .list_targets(pb::ListTargetsRequest {
                    parent: "environments/bench".into(),
                    page_size: 1000,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            count += page.targets.len();
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        if count >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{count} of {n} agents registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn setup(
    dir: &Path,
    n: usize,
) -> (Binary, tests::Client, tempfile::TempDir, CancellationToken) {
    let tmp = tempfile::Builder::new()
        .prefix("agents")
        .tempdir_in(dir)
        .unwrap();
    let server = Binary::start(
        &tmp.path().join("deploy.db"),
        &["--agent-timeout-ms", "60000"],
    )
    .await;
    let mut c = connect(server.addr).await;
    environment(&mut c, "bench", None, false).await;
    let stop = CancellationToken::new();
    agents(&server, tmp.path(), n, &stop);
    wait_registered(&mut c, n).await;
    (server, c, tmp, stop)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir).unwrap();
    match args.command {
        Cmd::Place {
            agents: n,
            batch,
            rounds,
        } => {
            let (_server, mut c, tmp, stop) = setup(&args.dir, n).await;
            println!("| round | strategy | agents | time to SUCCEEDED |");
            println!("|---|---|---|---|");
            let mut version = 0;
            let mut times: Vec<(String, Vec<f64>)> = vec![
                ("all-at-once".into(), Vec::new()),
                (format!("rolling, batches of {batch}"), Vec::new()),
            ];
            for round in 1..=rounds {
                for (i, (label, samples)) in times.iter_mut().enumerate() {
                    version += 1;
                    let v = format!("{version}.0.0");
                    let (path, digest) = tarball(
                        tmp.path(),
                        &format!("app-{v}"),
                        &[("app.txt", &v), ("payload.bin", &"x".repeat(64 * 1024))],
                    );
                    register(&mut c, "app", &v, &path, &digest).await;
                    let strategy = (i == 1).then_some(Kind::Rolling(pb::Rolling {
                        batch_size: batch,
                        batch_percent: 0.0,
                        max_failures: 0,
                    }));
                    let start = Instant::now();
                    let d = deploy(&mut c, "app", &v, "bench", strategy).await;
                    until(&mut c, &d.name, &v, is(pb::DeploymentState::Succeeded)).await;
                    let secs = start.elapsed().as_secs_f64();
                    samples.push(secs);
                    println!("| {round} | {label} | {n} | {:.0} ms |", secs * 1000.0);
                }
            }
            for (label, mut samples) in times {
                samples.sort_by(f64::total_cmp);
                println!(
                    "median {label}: {:.0} ms",
                    samples[samples.len() / 2] * 1000.0
                );
            }
            stop.cancel();
        }
        Cmd::Memory { agents: n } => {
            let tmp = tempfile::Builder::new()
                .prefix("agents")
                .tempdir_in(&args.dir)
                .unwrap();
            let server = Binary::start(&tmp.path().join("deploy.db"), &[]).await;
            let pid = server.child.id().unwrap();
            let mut c = connect(server.addr).await;
            environment(&mut c, "bench", None, false).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let idle = rss_kib(pid);
            let stop = CancellationToken::new();
            agents(&server, tmp.path(), n, &stop);
            wait_registered(&mut c, n).await;
            // Let every agent open its order stream and send a heartbeat.
            tokio::time::sleep(Duration::from_secs(6)).await;
            let connected = rss_kib(pid);
            println!(
                "deploy-svc RSS: {:.1} MiB idle, {:.1} MiB with {n} connected agents ({:.1} KiB per agent)",
                idle as f64 / 1024.0,
                connected as f64 / 1024.0,
                (connected - idle) as f64 / n as f64
            );
            stop.cancel();
        }
    }
}
