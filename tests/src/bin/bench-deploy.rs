//! Benchmarks of deploy-svc (see docs/benchmarks.md). Starts the real release binary as a separate
//! process on a fresh database for each measurement, so every figure and its baseline come
//! from the same run on the same machine.
//!
//! ```sh
//! cargo build --release -p deploy-svc -p tests
//! target/release/bench-deploy ingest      # group commit vs one commit per report
//! target/release/bench-deploy delivery    # commit-to-delivery latency, 100 watchers, one slow
//! target/release/bench-deploy postgres    # NOTIFY cost; 8 writers on 2 PostgreSQL replicas
//! target/release/bench-deploy scale-out   # 2 PostgreSQL replicas against raw INSERTs, 8 and 64 writers
//! target/release/bench-deploy overload    # 4x capacity for 30 s, with and without shedding
//! ```

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use proto::deploy::v1 as pb;
use tests::{connect, Binary, Churn};

#[derive(Parser)]
struct Args {
    /// Where the databases go (a real disk: fsync must be real).
    #[arg(long, default_value = "target/bench-data")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// PostgreSQL: what a NOTIFY per transaction costs plain inserts (8 writers), then
    /// acknowledged reports/s from 8 writers over 2 deploy-svc replicas with coalesced
    /// wake-ups, with none (the plain-insert baseline) and with a NOTIFY per transaction,
    /// beside one SQLite deploy-svc, in alternating rounds.
    Postgres {
        /// A PostgreSQL server (databases are created on it).
        #[arg(
            long,
            env = "TEST_DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        url: String,
        /// Concurrent writers.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Rounds.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Scale-out ingest: acknowledged reports/s over 2 deploy-svc replicas on PostgreSQL
    /// against raw single-row INSERTs from as many connections (the database's own
    /// limit), for each writer count, on independent deployments and on one deployment
    /// with a target per writer, in alternating rounds.
    ScaleOut {
        /// A PostgreSQL server (databases are created on it).
        #[arg(
            long,
            env = "TEST_DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        url: String,
        /// Writer counts (concurrent closed-loop writers), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "8,64")]
        writers: Vec<usize>,
        /// deploy-svc replicas the writers are spread over.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
        /// An extra argument for every replica (repeat it: `--deploy-arg=--pg-report-groups
        /// --deploy-arg=4`).
        #[arg(long = "deploy-arg", allow_hyphen_values = true)]
        deploy_args: Vec<String>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 4)]
        seconds: u64,
        /// Rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Acknowledged reports per second with synchronous=FULL: group commit vs max-batch 1.
    Ingest {
        /// Concurrent in-flight reports (one target each).
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// HTTP/2 connections the reports are spread over.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Overload: measures ReportPlacement capacity (closed loop), then offers a multiple of
    /// it open-loop, then half of it, against a server that sheds load (the default limits)
    /// and one that does not (limits raised out of reach).
    Overload {
        /// Offered load during the overload, as a multiple of the measured capacity.
        #[arg(long, default_value_t = 4.0)]
        factor: f64,
        /// Seconds of overload.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Seconds at half the capacity after the overload (recovery is measured here).
        #[arg(long, default_value_t = 10)]
        after: u64,
        /// HTTP/2 connections the calls are spread over.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// The deadline every call carries (`grpc-timeout`), in milliseconds.
        #[arg(long, default_value_t = 1000)]
        deadline_ms: u64,
        /// Runs (each: both set-ups, each on a fresh database).
        #[arg(long, default_value_t = 2)]
        runs: usize,
    },
    /// Request-to-delivery latency with 100 watchers, without and with one slow watcher.
    Delivery {
        /// Watchers (one of them slow in the second phase).
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        /// Reports per second written during the measurement.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds per phase.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rounds of (calm, slow) phases.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir).unwrap();
    match args.command {
        Cmd::Postgres {
            url,
            writers,
            seconds,
            rounds,
        } => postgres(&args.dir, &url, writers, seconds, rounds).await,
        Cmd::ScaleOut {
            url,
            writers,
            replicas,
            deploy_args,
            seconds,
            rounds,
        } => {
            let replicas = Replicas {
                count: replicas,
                args: deploy_args,
            };
            scale_out(&url, &writers, &replicas, seconds, rounds).await;
        }
        Cmd::Ingest {
            concurrency,
            connections,
            seconds,
        } => {
            let baseline = ingest(&args.dir, "1", concurrency, connections, seconds).await;
            let grouped = ingest(&args.dir, "1024", concurrency, connections, seconds).await;
            println!("| mode | acknowledged reports/s |");
            println!("|---|---|");
            println!("| one commit per report (--max-batch 1) | {baseline:.0} |");
            println!("| group commit (--max-batch 1024) | {grouped:.0} |");
            println!("ratio: {:.1}x", grouped / baseline);
        }
        Cmd::Overload {
            factor,
            seconds,
            after,
            connections,
            deadline_ms,
            runs,
        } => {
            let plan = overload::Plan {
                factor,
                overload: Duration::from_secs(seconds),
                after: Duration::from_secs(after),
                connections,
                deadline: Duration::from_millis(deadline_ms),
            };
            overload::run(&args.dir, &plan, runs).await;
        }
        Cmd::Delivery {
            watchers,
            rate,
            seconds,
            rounds,
        } => {
            // Phases alternate (calm, slow, calm, slow, ...) so drift on a shared machine
            // hits both alike; the impact is the median of the per-round ratios.
            println!("| round | phase | deliveries | p50 ms | p99 ms | max ms |");
            println!("|---|---|---|---|---|---|");
            let (mut p50_ratios, mut p99_ratios) = (Vec::new(), Vec::new());
            let mut all_calm = Histogram::<u64>::new(3).unwrap();
            for round in 1..=rounds {
                let calm = delivery(&args.dir, watchers, 0, rate, seconds).await;
                let with_slow = delivery(&args.dir, watchers - 1, 1, rate, seconds).await;
                for (name, h) in [
                    (format!("{watchers} watchers"), &calm),
                    (
                        format!("{} watchers + 1 slow (slow one excluded)", watchers - 1),
                        &with_slow,
                    ),
                ] {
                    println!(
                        "| {round} | {name} | {} | {:.2} | {:.2} | {:.2} |",
                        h.len(),
                        h.value_at_quantile(0.5) as f64 / 1000.0,
                        h.value_at_quantile(0.99) as f64 / 1000.0,
                        h.max() as f64 / 1000.0
                    );
                }
                p50_ratios.push(
                    with_slow.value_at_quantile(0.5) as f64 / calm.value_at_quantile(0.5) as f64,
                );
                p99_ratios.push(
                    with_slow.value_at_quantile(0.99) as f64 / calm.value_at_quantile(0.99) as f64,
                );
                all_calm.add(&calm).unwrap();
            }
            println!(
                "all calm rounds: p50 {:.2} ms, p99 {:.2} ms",
                all_calm.value_at_quantile(0.5) as f64 / 1000.0,
                all_calm.value_at_quantile(0.99) as f64 / 1000.0
            );
            println!(
                "slow-watcher impact on the others (median over rounds): p50 x{:.3}, p99 x{:.3}",
                median(&mut p50_ratios),
                median(&mut p99_ratios)
            );
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn start(dir: &std::path::Path, name: &str, args: &[&str]) -> (Binary, tempfile::TempDir) {
    let tmp = tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(dir)
        .unwrap();
    let bin = Binary::start(&tmp.path().join("deploy.db"), args).await;
    (bin, tmp)
}

async fn ingest(
    dir: &std::path::Path,
    max_batch: &str,
    concurrency: usize,
    connections: usize,
    seconds: u64,
) -> f64 {
    let (bin, _tmp) = start(
        dir,
        "ingest",
        &["--synchronous", "full", "--max-batch", max_batch],
    )
    .await;
    let mut c = connect(bin.addr).await;
    let churn = Arc::new(Churn::setup(&mut c, "bench", "api", concurrency).await);
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(connect(bin.addr).await);
    }
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (churn, acked, stop) = (churn.clone(), acked.clone(), stop.clone());
        let mut c = clients[t % connections].clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = tests::report(
                    &mut c,
                    &churn.deployment,
                    &churn.targets[t],
                    Churn::state(i),
                )
                .await;
                assert!(r.unwrap().changed);
                acked.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (start_count, started) = (acked.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let rate =
        (acked.load(Ordering::Relaxed) - start_count) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    rate
}

/// Returns the histogram (µs) of request-sent to event-received over the normal watchers.
async fn delivery(
    dir: &std::path::Path,
    normal: usize,
    slow: usize,
    rate: u64,
    seconds: u64,
) -> Histogram<u64> {
    let (bin, _tmp) = start(dir, "delivery", &["--synchronous", "full"]).await;
    let mut c = connect(bin.addr).await;
    let writers = 8;
    let churn = Arc::new(Churn::setup(&mut c, "bench", "api", writers).await);
    let (_, head) = {
        let mut w = tests::watch::open(&mut c, None, "", "").await.unwrap();
        tests::watch::snapshot(&mut w).await
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Watchers spread over 10 connections; each records (sequence, receive instant).
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(connect(bin.addr).await);
    }
    let mut watchers = Vec::new();
    for i in 0..normal + slow {
        let is_slow = i >= normal;
        // A slow client is its own process in real life: it gets its own connection, so
        // its unread data does not hold the HTTP/2 connection window of other watchers.
        let mut client = if is_slow {
            connect(bin.addr).await
        } else {
            conns[i % conns.len()].clone()
        };
        let stop = stop.clone();
        watchers.push(tokio::spawn(async move {
            let mut s = tests::watch::open(&mut client, Some(head), "", "")
                .await
                .unwrap();
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), s.message()).await {
                    Ok(Ok(Some(m))) => {
                        if let Some(pb::watch_placements_response::Kind::Event(e)) = m.kind {
                            seen.push((e.sequence, Instant::now()));
                            if is_slow {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                    Ok(_) => break,
                    Err(_) => {}
                }
            }
            (is_slow, seen)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Paced writers: request instant per acknowledged sequence.
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let acks = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let per_writer = Duration::from_secs_f64(writers as f64 / rate as f64);
    let mut tasks = Vec::new();
    for t in 0..writers {
        let (churn, sent, stop, acks) = (churn.clone(), sent.clone(), stop.clone(), acks.clone());
        let mut c = connect(bin.addr).await;
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(per_writer);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let at = Instant::now();
                let r = tests::report(
                    &mut c,
                    &churn.deployment,
                    &churn.targets[t],
                    Churn::state(i),
                )
                .await
                .unwrap();
                acks.lock()
                    .unwrap()
                    .record(at.elapsed().as_micros() as u64)
                    .unwrap();
                sent.lock().unwrap().insert(r.sequence, at);
                i += 1;
            }
        }));
    }
    let pid = bin.child.id().unwrap();
    let cpu_before = tests::cpu_ms(pid).unwrap();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu = tests::cpu_ms(pid).unwrap() - cpu_before;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let sent = sent.lock().unwrap().clone();
    let acks = acks.lock().unwrap().clone();
    println!(
        "  (request-to-acknowledgement in this phase: p50 {:.2} ms, p99 {:.2} ms; deploy-svc CPU {:.0} ms per second, {:.2} ms per report)",
        acks.value_at_quantile(0.5) as f64 / 1000.0,
        acks.value_at_quantile(0.99) as f64 / 1000.0,
        cpu as f64 / seconds as f64,
        cpu as f64 / sent.len().max(1) as f64
    );
    let mut h = Histogram::<u64>::new(3).unwrap();
    for w in watchers {
        let (is_slow, seen) = w.await.unwrap();
        if is_slow {
            continue;
        }
        for (seq, at) in seen {
            if let Some(sent_at) = sent.get(&seq) {
                h.record(at.duration_since(*sent_at).as_micros() as u64)
                    .unwrap();
            }
        }
    }
    h
}

/// Runs `writers` closed-loop tasks for `seconds` (after a 1 s warm-up); each calls `op`
/// with its index and a counter; returns completed operations per second.
async fn closed_loop<F, Fut>(writers: usize, seconds: u64, op: F) -> f64
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (op, done, stop) = (op.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    op(w, i).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (start, started) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let rate = (done.load(Ordering::Relaxed) - start) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    rate
}

async fn pg(url: &str) -> tokio_postgres::Client {
    let (c, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    tokio::spawn(connection);
    c
}

/// How the raw insert benchmark writes an event row.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Raw {
    /// A plain INSERT (autocommit).
    Plain,
    /// INSERT and NOTIFY in one transaction.
    NotifyEach,
    /// deploy-svc's outbox: the table's trigger forces the transaction id and draws the
    /// sequence (`RETURNING seq`), and a separate connection sends one coalesced NOTIFY at
    /// most every 2 ms while inserts commit.
    Outbox,
}

/// Inserts of event rows by `writers` connections, the `Raw` way.
async fn raw_inserts(url: &str, writers: usize, seconds: u64, how: Raw) -> f64 {
    let bell = Arc::new(tokio::sync::Notify::new());
    let notifier = (how == Raw::Outbox).then(|| {
        let (bell, url) = (bell.clone(), url.to_owned());
        tokio::spawn(async move {
            let c = pg(&url).await;
            c.batch_execute("SET synchronous_commit = off")
                .await
                .unwrap();
            loop {
                bell.notified().await;
                c.batch_execute("NOTIFY bench_events").await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    });
    let mut clients = Vec::new();
    for _ in 0..writers {
        clients.push(Arc::new(pg(url).await));
    }
    let rate = closed_loop(writers, seconds, move |w, i| {
        let (c, bell) = (clients[w].clone(), bell.clone());
        async move {
            let columns = "(commit_ms, deployment, environment, target, artifact, version, digest, state, previous_state, message)
                          VALUES ($1, 1, 'bench', $2, 'api', '1.0.0', 'sha256:0', 2, 1, '')";
            let target = format!("t{w}");
            let i = i64::try_from(i).unwrap();
            match how {
                Raw::Plain => {
                    c.execute(&format!("INSERT INTO bench_events {columns}"), &[&i, &target])
                        .await
                        .unwrap();
                }
                Raw::NotifyEach => {
                    c.batch_execute("BEGIN").await.unwrap();
                    c.execute(&format!("INSERT INTO bench_events {columns}"), &[&i, &target])
                        .await
                        .unwrap();
                    c.batch_execute("NOTIFY bench_events; COMMIT").await.unwrap();
                }
                Raw::Outbox => {
                    let row = c
                        .query_one(
                            &format!("INSERT INTO bench_outbox {columns} RETURNING seq"),
                            &[&i, &target],
                        )
                        .await
                        .unwrap();
                    assert!(row.get::<_, i64>(0) > 0);
                    bell.notify_one();
                }
            }
        }
    })
    .await;
    if let Some(n) = notifier {
        n.abort();
    }
    rate
}

/// Acknowledged reports/s from `writers` writers (each on its own deployment) spread over
/// the deploy-svc replicas `bins`; checks a watcher on the last replica saw every event.
/// How the writers' reports spread over deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shape {
    /// Each writer on its own deployment and target.
    Independent,
    /// One deployment with a target per writer.
    OneDeployment,
}

/// Acknowledged reports/s of `writers` closed-loop writers spread over `bins` (each
/// writer on its own deployment); checks the last replica streamed every one, in order.
async fn service_ingest(bins: &[Binary], writers: usize, seconds: u64) -> f64 {
    shaped_ingest(bins, writers, seconds, Shape::Independent).await
}

/// [`service_ingest`] with the writers' reports spread as `shape` says.
async fn shaped_ingest(bins: &[Binary], writers: usize, seconds: u64, shape: Shape) -> f64 {
    let mut c = connect(bins[0].addr).await;
    let mut churns = Vec::new();
    match shape {
        Shape::Independent => {
            for w in 0..writers {
                churns.push((
                    Arc::new(Churn::setup(&mut c, &format!("w{w}"), "api", 1).await),
                    0,
                ));
            }
        }
        Shape::OneDeployment => {
            let churn = Arc::new(Churn::setup(&mut c, "shared", "api", writers).await);
            churns.extend((0..writers).map(|w| (churn.clone(), w)));
        }
    }
    let head = churns.last().unwrap().0.head;
    let mut clients = Vec::new();
    for w in 0..writers {
        clients.push(connect(bins[w % bins.len()].addr).await);
    }
    let mut wc = connect(bins[bins.len() - 1].addr).await;
    let mut watcher = tests::watch::open(&mut wc, Some(head), "", "")
        .await
        .unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let sink = acked.clone();
    let rate = closed_loop(writers, seconds, move |w, i| {
        let (mut c, (churn, t), sink) = (clients[w].clone(), churns[w].clone(), sink.clone());
        async move {
            let r = tests::report(
                &mut c,
                &churn.deployment,
                &churn.targets[t],
                Churn::state(i),
            )
            .await
            .unwrap();
            assert!(r.changed);
            sink.lock().unwrap().push(r.sequence);
        }
    })
    .await;
    let mut acked = acked.lock().unwrap().clone();
    acked.sort_unstable();
    let got = tests::watch::events(&mut watcher, acked.len()).await;
    assert_eq!(
        tests::watch::sequences(&got),
        acked,
        "the other replica's stream must hold every acknowledged report, in order"
    );
    rate
}

/// One report at a time on replica A, watched on replica B: how long after A acknowledged
/// does B stream the event; and A's own acknowledgement latency. Returns (ack, cross) in µs.
async fn cross_replica(bins: &[Binary], reports: usize) -> (Histogram<u64>, Histogram<u64>) {
    let mut a = connect(bins[0].addr).await;
    let churn = Churn::setup(&mut a, "latency", "api", 1).await;
    let mut b = connect(bins[1].addr).await;
    let mut watcher = tests::watch::open(&mut b, Some(churn.head), "", "")
        .await
        .unwrap();
    let (mut ack, mut cross) = (
        Histogram::<u64>::new(3).unwrap(),
        Histogram::<u64>::new(3).unwrap(),
    );
    for i in 0..reports {
        let sent = Instant::now();
        let r = tests::report(
            &mut a,
            &churn.deployment,
            &churn.targets[0],
            Churn::state(i),
        )
        .await
        .unwrap();
        let acked = Instant::now();
        let got = tests::watch::events(&mut watcher, 1).await;
        assert_eq!(got[0].sequence, r.sequence);
        ack.record((acked - sent).as_micros() as u64).unwrap();
        cross.record(acked.elapsed().as_micros() as u64).unwrap();
        // A steady trickle, not a burst.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (ack, cross)
}

/// The raw-insert baseline's table: `placement_events`' columns, a plain sequence.
const BENCH_EVENTS: &str = "DROP TABLE IF EXISTS bench_events;
     CREATE TABLE bench_events (seq BIGSERIAL PRIMARY KEY, commit_ms BIGINT NOT NULL, deployment BIGINT NOT NULL,
       environment TEXT NOT NULL, target TEXT NOT NULL, artifact TEXT NOT NULL, version TEXT NOT NULL,
       digest TEXT NOT NULL, state BIGINT NOT NULL, previous_state BIGINT NOT NULL, message TEXT NOT NULL);";

async fn postgres(dir: &std::path::Path, url: &str, writers: usize, seconds: u64, rounds: usize) {
    let admin = pg(url).await;
    admin.batch_execute(BENCH_EVENTS).await.unwrap();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS bench_outbox;
             DROP SEQUENCE IF EXISTS bench_outbox_seq;
             CREATE SEQUENCE bench_outbox_seq;
             CREATE TABLE bench_outbox (LIKE bench_events);
             ALTER TABLE bench_outbox ADD PRIMARY KEY (seq);
             CREATE OR REPLACE FUNCTION bench_outbox_sequence() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_current_xact_id(); NEW.seq := nextval('bench_outbox_seq'); RETURN NEW; END $$;
             CREATE TRIGGER bench_outbox_sequence BEFORE INSERT ON bench_outbox
               FOR EACH ROW EXECUTE FUNCTION bench_outbox_sequence();",
        )
        .await
        .unwrap();
    println!("| round | what | ops/s |");
    println!("|---|---|---|");
    let mut ratios: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 1..=rounds {
        // Each measurement starts after a checkpoint; odd and even rounds run the modes in
        // opposite orders, so drift and table growth hit all alike.
        let mut raw = HashMap::new();
        let mut order = [Raw::Plain, Raw::NotifyEach, Raw::Outbox];
        if round % 2 == 0 {
            order.reverse();
        }
        for how in order {
            admin.batch_execute("CHECKPOINT").await.unwrap();
            raw.insert(how as u8, raw_inserts(url, writers, seconds, how).await);
        }
        let (plain, notified, outbox) = (
            raw[&(Raw::Plain as u8)],
            raw[&(Raw::NotifyEach as u8)],
            raw[&(Raw::Outbox as u8)],
        );
        println!("| {round} | raw INSERT, {writers} connections (the plain-insert baseline) | {plain:.0} |");
        println!("| {round} | raw INSERT + NOTIFY in each transaction | {notified:.0} |");
        println!("| {round} | raw INSERT into deploy-svc's outbox (sequence trigger) + coalesced NOTIFY | {outbox:.0} |");
        ratios
            .entry("raw notify-each / plain")
            .or_default()
            .push(notified / plain);
        ratios
            .entry("raw outbox + coalesced / plain")
            .or_default()
            .push(outbox / plain);

        let mut rates = HashMap::new();
        let mut modes = ["off", "coalesced", "per-transaction"];
        if round % 2 == 0 {
            modes.reverse();
        }
        for mode in modes {
            admin.batch_execute("CHECKPOINT").await.unwrap();
            let (_, db_url, _) = tests::fresh_database(url, "bench_deploy").await;
            let mut bins = Vec::new();
            for _ in 0..2 {
                bins.push(
                    Binary::start(std::path::Path::new(&db_url), &["--pg-notify", mode]).await,
                );
            }
            let rate = service_ingest(&bins, writers, seconds).await;
            rates.insert(mode, rate);
            for b in bins {
                b.kill().await;
            }
        }
        for mode in ["off", "coalesced", "per-transaction"] {
            println!(
                "| {round} | ReportPlacement, 2 replicas on PostgreSQL, --pg-notify {mode} | {:.0} |",
                rates[mode]
            );
        }
        let (sqlite, _tmp) = start(dir, "pg-compare", &["--synchronous", "full"]).await;
        let lite = service_ingest(std::slice::from_ref(&sqlite), writers, seconds).await;
        println!(
            "| {round} | ReportPlacement, 1 replica on SQLite (synchronous=FULL) | {lite:.0} |"
        );
        sqlite.kill().await;
        ratios
            .entry("coalesced / off")
            .or_default()
            .push(rates["coalesced"] / rates["off"]);
        ratios
            .entry("per-transaction / off")
            .or_default()
            .push(rates["per-transaction"] / rates["off"]);
    }
    // Cross-replica delivery with the default (coalesced) wake-ups.
    let (_, db_url, _) = tests::fresh_database(url, "bench_deploy").await;
    let mut bins = Vec::new();
    for _ in 0..2 {
        bins.push(Binary::start(std::path::Path::new(&db_url), &[]).await);
    }
    let (ack, cross) = cross_replica(&bins, 500).await;
    for b in bins {
        b.kill().await;
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "one report at a time (500): acknowledged by replica A p50 {:.2} ms p99 {:.2} ms; streamed by replica B after A's acknowledgement p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        ms(&ack, 0.5),
        ms(&ack, 0.99),
        ms(&cross, 0.5),
        ms(&cross, 0.99),
        cross.max() as f64 / 1000.0
    );
    let mut keys: Vec<_> = ratios.keys().copied().collect();
    keys.sort_unstable();
    for k in keys {
        let v = ratios.get_mut(k).unwrap();
        let rounds = v.clone();
        println!("ratio {k}: median {:.3} (rounds: {rounds:.3?})", median(v));
    }
    admin
        .batch_execute(
            "DROP TABLE bench_events; DROP TABLE bench_outbox; DROP SEQUENCE bench_outbox_seq",
        )
        .await
        .unwrap();
}

/// Scale-out ingest against the database's own limit (see [`Cmd::ScaleOut`]).
/// How many deploy-svc replicas, started with which extra arguments.
struct Replicas {
    count: usize,
    args: Vec<String>,
}

async fn scale_out(
    url: &str,
    writer_counts: &[usize],
    replicas: &Replicas,
    seconds: u64,
    rounds: usize,
) {
    let args: Vec<&str> = replicas.args.iter().map(String::as_str).collect();
    let admin = pg(url).await;
    admin.batch_execute(BENCH_EVENTS).await.unwrap();
    println!("| round | writers | what | ops/s | / raw INSERT |");
    println!("|---|---|---|---|---|");
    let mut ratios: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for round in 1..=rounds {
        for &writers in writer_counts {
            let mut steps = [None, Some(Shape::Independent), Some(Shape::OneDeployment)];
            if round % 2 == 0 {
                steps.reverse();
            }
            let mut rates = HashMap::new();
            for step in steps {
                admin.batch_execute("CHECKPOINT").await.unwrap();
                let rate = match step {
                    None => raw_inserts(url, writers, seconds, Raw::Plain).await,
                    Some(shape) => {
                        let (_, db_url, _) = tests::fresh_database(url, "bench_deploy").await;
                        // The raw baseline's connections are plain TCP: so are the
                        // services' (the default, sslmode=prefer, takes TLS when offered).
                        let db_url = format!("{db_url}?sslmode=disable");
                        let mut bins = Vec::new();
                        for _ in 0..replicas.count {
                            bins.push(Binary::start(std::path::Path::new(&db_url), &args).await);
                        }
                        let rate = shaped_ingest(&bins, writers, seconds, shape).await;
                        for b in bins {
                            b.kill().await;
                        }
                        rate
                    }
                };
                rates.insert(step, rate);
            }
            let raw = rates[&None];
            println!("| {round} | {writers} | raw INSERT, {writers} connections (baseline) | {raw:.0} | 1 |");
            for (shape, what) in [
                (Shape::Independent, "each writer on its own deployment"),
                (Shape::OneDeployment, "one deployment, a target per writer"),
            ] {
                let rate = rates[&Some(shape)];
                println!(
                    "| {round} | {writers} | ReportPlacement, {} replicas, {what} | {rate:.0} | {:.3} |",
                    replicas.count,
                    rate / raw
                );
                ratios
                    .entry(format!("{writers} writers, {what} / raw INSERT"))
                    .or_default()
                    .push(rate / raw);
            }
        }
    }
    for (k, v) in &mut ratios {
        let rounds = v.clone();
        println!("ratio {k}: median {:.3} (rounds: {rounds:.3?})", median(v));
    }
    admin
        .batch_execute("DROP TABLE bench_events")
        .await
        .unwrap();
}

/// The overload benchmark: capacity, then a multiple of it offered open-loop, then half of
/// it; with and without load shedding.
mod overload {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use hdrhistogram::Histogram;
    use proto::deploy::v1 as pb;
    use tests::{Churn, Client};
    use tonic::Code;

    /// Every run writes one commit (and one fsync) per report, so that the single writer,
    /// not the CPU the load generator shares, is what bounds the server. Targets whose
    /// reports are refused for a while are not agents gone silent: no lost-agent timeout
    /// (it would fail the deployment, and every later report with it).
    const STORE: &[&str] = &["--max-batch", "1", "--agent-timeout-ms", "86400000"];
    /// The set-ups: name and flags.
    const SETUPS: &[(&str, &[&str])] = &[
        // The default limits: the in-flight cap (2048) and admission by deadline.
        ("shedding (defaults)", &[]),
        // The in-flight cap alone.
        ("in-flight cap only", &["--deadline-admission", "false"]),
        // No shedding: no admission by deadline, and the in-flight cap and the
        // per-connection stream cap (which would otherwise bound the queue at 256 calls per
        // connection) out of reach.
        (
            "no shedding",
            &[
                "--deadline-admission",
                "false",
                "--max-in-flight",
                "10000000",
                "--max-streams-per-connection",
                "1000000",
            ],
        ),
    ];
    /// Targets the reports go round (one deployment over all of them).
    const TARGETS: usize = 4096;
    /// Width of the throughput and recovery windows.
    const WINDOW: Duration = Duration::from_millis(250);
    /// The code recorded for a call the client itself gave up on (no answer by its
    /// deadline plus 2 s).
    const NO_ANSWER: i32 = -1;
    /// The code recorded for a call whose deadline the client's own timer saw pass first:
    /// tonic's channel enforces `grpc-timeout` itself and reports it as CANCELLED
    /// ("Timeout expired").
    const CLIENT_DEADLINE: i32 = -2;

    /// What one run offers.
    pub struct Plan {
        pub factor: f64,
        pub overload: Duration,
        pub after: Duration,
        pub connections: usize,
        pub deadline: Duration,
    }

    /// One open-loop call.
    #[derive(Clone, Copy)]
    struct Call {
        /// When it was issued, since the origin of the run.
        at: Duration,
        /// How late it was issued against its schedule.
        lag: Duration,
        /// Issue to answer.
        latency: Duration,
        /// Its gRPC code, or [`NO_ANSWER`].
        code: i32,
    }

    /// What one set-up measured.
    struct Outcome {
        name: &'static str,
        offered: f64,
        ok_per_s: f64,
        admitted: Histogram<u64>,
        refused: Histogram<u64>,
        /// DEADLINE_EXCEEDED answered by the server.
        deadline_exceeded: u64,
        /// Deadlines the client's own timer saw pass first.
        client_deadline: u64,
        others: BTreeMap<String, u64>,
        rss_before_kib: u64,
        rss_peak_kib: u64,
        rss_end_kib: u64,
        lag_p99: Duration,
        baseline_p99: Duration,
        recovery: Option<Duration>,
        timeline: Vec<u64>,
    }

    pub async fn run(dir: &Path, plan: &Plan, runs: usize) {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_default();
        println!(
            "machine: nproc {}, {cpu}, load average at start {}",
            std::thread::available_parallelism().map_or(0, usize::from),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        for run in 1..=runs {
            // Capacity is measured on the default server; every set-up gets the same load.
            let (bin, tmp) = super::start(dir, "overload", &[STORE, SETUPS[0].1].concat()).await;
            let (clients, churn) = setup(&bin, plan.connections).await;
            let capacity = capacity(&clients, &churn).await;
            println!(
                "run {run}: capacity {capacity:.0} OK calls/s (closed loop, 256 callers); \
                 offering {:.0}/s for {} s, then {:.0}/s for {} s",
                capacity * plan.factor,
                plan.overload.as_secs(),
                capacity / 2.0,
                plan.after.as_secs()
            );
            let mut outcomes = vec![drive(&bin, clients, churn, capacity, plan, SETUPS[0].0).await];
            drop((bin, tmp));
            for (name, flags) in &SETUPS[1..] {
                let (bin, _tmp) = super::start(dir, "overload", &[STORE, flags].concat()).await;
                let (clients, churn) = setup(&bin, plan.connections).await;
                outcomes.push(drive(&bin, clients, churn, capacity, plan, name).await);
            }
            print_table(run, &outcomes);
        }
    }

    async fn setup(bin: &tests::Binary, connections: usize) -> (Vec<Client>, Arc<Churn>) {
        let mut c = tests::connect(bin.addr).await;
        let churn = Arc::new(Churn::setup(&mut c, "bench", "api", TARGETS).await);
        let mut clients = Vec::new();
        for _ in 0..connections {
            clients.push(tests::connect(bin.addr).await);
        }
        (clients, churn)
    }

    /// The report call number `k` makes: round the targets, alternating states.
    fn request(
        churn: &Churn,
        k: usize,
        deadline: Duration,
    ) -> tonic::Request<pb::ReportPlacementRequest> {
        let mut r = tonic::Request::new(pb::ReportPlacementRequest {
            deployment: churn.deployment.clone(),
            target: churn.targets[k % TARGETS].clone(),
            state: Churn::state(k / TARGETS).into(),
            message: String::new(),
        });
        r.set_timeout(deadline);
        r
    }

    /// OK calls per second from 256 closed-loop callers over 5 s (each call may take 30 s:
    /// these must not fail).
    async fn capacity(clients: &[Client], churn: &Arc<Churn>) -> f64 {
        let (clients, churn) = (clients.to_vec(), churn.clone());
        let deadline = Duration::from_secs(30);
        let next = Arc::new(AtomicU64::new(0));
        super::closed_loop(256, 5, move |w, _| {
            let mut c = clients[w % clients.len()].clone();
            let k = next.fetch_add(1, Ordering::Relaxed) as usize;
            let r = request(&churn, k, deadline);
            async move {
                c.report_placement(r).await.unwrap();
            }
        })
        .await
    }

    /// Issues calls at `rate` per second for `duration`, on a schedule that does not wait
    /// for answers; each answer is pushed to `calls`.
    #[allow(clippy::too_many_arguments)]
    async fn open_loop(
        clients: &[Client],
        churn: &Arc<Churn>,
        rate: f64,
        duration: Duration,
        origin: Instant,
        deadline: Duration,
        next: &AtomicU64,
        calls: &Arc<Mutex<Vec<Call>>>,
        pending: &Arc<AtomicU64>,
    ) {
        let started = Instant::now();
        let mut issued: u64 = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let elapsed = started.elapsed();
            if elapsed >= duration {
                break;
            }
            let due = (elapsed.as_secs_f64() * rate) as u64;
            while issued < due {
                let scheduled = started + Duration::from_secs_f64(issued as f64 / rate);
                issued += 1;
                let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                let mut c = clients[k % clients.len()].clone();
                let r = request(churn, k, deadline);
                let (calls, pending) = (calls.clone(), pending.clone());
                pending.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let at = Instant::now();
                    let answer = tokio::time::timeout(
                        deadline + Duration::from_secs(2),
                        c.report_placement(r),
                    )
                    .await;
                    let latency = at.elapsed();
                    let code = match answer {
                        Ok(Ok(_)) => Code::Ok as i32,
                        Ok(Err(status)) if client_deadline(&status) => CLIENT_DEADLINE,
                        Ok(Err(status)) => status.code() as i32,
                        Err(_) => NO_ANSWER,
                    };
                    calls.lock().unwrap().push(Call {
                        at: at.duration_since(origin),
                        lag: at.saturating_duration_since(scheduled),
                        latency,
                        code,
                    });
                    pending.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }

    /// Whether `status` is the client's own timer for the call's deadline.
    fn client_deadline(status: &tonic::Status) -> bool {
        let mut source = std::error::Error::source(status);
        while let Some(e) = source {
            if e.is::<tonic::TimeoutExpired>() {
                return status.code() == Code::Cancelled;
            }
            source = e.source();
        }
        false
    }

    /// Half the capacity for 5 s (the baseline), `factor` times it for the overload, half
    /// again for the recovery; RSS sampled every 200 ms throughout.
    async fn drive(
        bin: &tests::Binary,
        clients: Vec<Client>,
        churn: Arc<Churn>,
        capacity: f64,
        plan: &Plan,
        name: &'static str,
    ) -> Outcome {
        let pid = bin.child.id().unwrap();
        let origin = Instant::now();
        let rss: Arc<Mutex<Vec<(Duration, u64)>>> = Arc::default();
        let sampler = {
            let rss = rss.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tick.tick().await;
                    let Some(kib) = tests::rss_kib(pid) else {
                        break;
                    };
                    rss.lock().unwrap().push((origin.elapsed(), kib));
                }
            })
        };
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let pending = Arc::new(AtomicU64::new(0));
        let next = AtomicU64::new(0);
        let baseline = Duration::from_secs(5);
        let phases = [
            (capacity / 2.0, baseline),
            (capacity * plan.factor, plan.overload),
            (capacity / 2.0, plan.after),
        ];
        let mut bounds = Vec::new();
        for (rate, duration) in phases {
            let from = origin.elapsed();
            open_loop(
                &clients,
                &churn,
                rate,
                duration,
                origin,
                plan.deadline,
                &next,
                &calls,
                &pending,
            )
            .await;
            bounds.push((from, origin.elapsed()));
        }
        while pending.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sampler.abort();
        let calls = calls.lock().unwrap().clone();
        let rss = rss.lock().unwrap().clone();
        analyse(name, &calls, &rss, &bounds)
    }

    fn analyse(
        name: &'static str,
        calls: &[Call],
        rss: &[(Duration, u64)],
        bounds: &[(Duration, Duration)],
    ) -> Outcome {
        let (base, over, after) = (bounds[0], bounds[1], bounds[2]);
        let within = |c: &Call, (from, to): (Duration, Duration)| c.at >= from && c.at < to;
        let histogram = || Histogram::<u64>::new(3).unwrap();
        let us = |d: Duration| d.as_micros() as u64;

        let mut baseline = histogram();
        for c in calls
            .iter()
            .filter(|c| within(c, base) && c.code == Code::Ok as i32)
        {
            baseline.record(us(c.latency)).unwrap();
        }
        let baseline_p99 = Duration::from_micros(baseline.value_at_quantile(0.99));

        let (mut admitted, mut refused, mut lag) = (histogram(), histogram(), histogram());
        let (mut deadline_exceeded, mut client_deadline) = (0, 0);
        let mut others = BTreeMap::new();
        let mut offered = 0u64;
        for c in calls.iter().filter(|c| within(c, over)) {
            offered += 1;
            lag.record(us(c.lag)).unwrap();
            match c.code {
                x if x == Code::Ok as i32 => admitted.record(us(c.latency)).unwrap(),
                x if x == Code::ResourceExhausted as i32 => refused.record(us(c.latency)).unwrap(),
                x if x == Code::DeadlineExceeded as i32 => deadline_exceeded += 1,
                CLIENT_DEADLINE => client_deadline += 1,
                NO_ANSWER => *others.entry("no answer".to_owned()).or_insert(0) += 1,
                x => *others.entry(format!("{:?}", Code::from(x))).or_insert(0) += 1,
            }
        }
        let seconds = (over.1 - over.0).as_secs_f64();

        // Recovery: windows of calls issued after the overload; a window is normal when its
        // p99 (a call not answered OK counts as endless) is within max(2x the baseline p99,
        // 10 ms): at least 99% of its calls OK, and fast. Recovered at the start of the first
        // run of 4 normal windows (1 s).
        let limit = (baseline_p99 * 2).max(Duration::from_millis(10));
        let windows = ((after.1 - after.0).as_secs_f64() / WINDOW.as_secs_f64()) as usize;
        let mut latencies = vec![Vec::new(); windows];
        for c in calls.iter().filter(|c| within(c, after)) {
            let w = ((c.at - after.0).as_secs_f64() / WINDOW.as_secs_f64()) as usize;
            if let Some(l) = latencies.get_mut(w) {
                l.push(if c.code == Code::Ok as i32 {
                    c.latency
                } else {
                    Duration::MAX
                });
            }
        }
        let normal: Vec<bool> = latencies
            .iter_mut()
            .map(|l| {
                l.sort();
                l.is_empty() || l[(l.len() * 99).div_ceil(100) - 1] <= limit
            })
            .collect();
        let recovery = normal
            .windows(4)
            .position(|run| run.iter().all(|n| *n))
            .map(|w| WINDOW * w as u32);

        // OK answers per window (by answer time), from 1 s before the overload ends to 3 s
        // after.
        let from = over.1.saturating_sub(Duration::from_secs(1));
        let mut timeline = vec![0u64; 16];
        for c in calls.iter().filter(|c| c.code == Code::Ok as i32) {
            let done = c.at + c.latency;
            if done >= from {
                let w = ((done - from).as_secs_f64() / WINDOW.as_secs_f64()) as usize;
                if let Some(n) = timeline.get_mut(w) {
                    *n += 1;
                }
            }
        }

        let rss_before_kib = rss
            .iter()
            .take_while(|(t, _)| *t < over.0)
            .last()
            .map_or(0, |(_, k)| *k);
        let rss_peak_kib = rss
            .iter()
            .filter(|(t, _)| *t >= over.0)
            .map(|(_, k)| *k)
            .max()
            .unwrap_or(0);
        let rss_end_kib = rss.last().map_or(0, |(_, k)| *k);
        Outcome {
            name,
            offered: offered as f64 / seconds,
            ok_per_s: admitted.len() as f64 / seconds,
            admitted,
            refused,
            deadline_exceeded,
            client_deadline,
            others,
            rss_before_kib,
            rss_peak_kib,
            rss_end_kib,
            lag_p99: Duration::from_micros(lag.value_at_quantile(0.99)),
            baseline_p99,
            recovery,
            timeline,
        }
    }

    fn print_table(run: usize, outcomes: &[Outcome]) {
        let ms = |v: u64| v as f64 / 1000.0;
        println!();
        println!(
            "| run | set-up | offered/s | OK/s | admitted p50 / p99 / max ms | refused | refused p99 ms | deadline passed (server / client timer) | other errors | RSS before / peak / end MiB | recovery |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for o in outcomes {
            let others = if o.others.is_empty() {
                "0".to_owned()
            } else {
                o.others
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let refused_p99 = if o.refused.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2}", ms(o.refused.value_at_quantile(0.99)))
            };
            let recovery = o.recovery.map_or("not within the phase".to_owned(), |d| {
                format!("{:.2} s", d.as_secs_f64())
            });
            println!(
                "| {run} | {} | {:.0} | {:.0} | {:.1} / {:.1} / {:.1} | {} | {refused_p99} | {} / {} | {others} | {:.0} / {:.0} / {:.0} | {recovery} |",
                o.name,
                o.offered,
                o.ok_per_s,
                ms(o.admitted.value_at_quantile(0.5)),
                ms(o.admitted.value_at_quantile(0.99)),
                ms(o.admitted.max()),
                o.refused.len(),
                o.deadline_exceeded,
                o.client_deadline,
                o.rss_before_kib as f64 / 1024.0,
                o.rss_peak_kib as f64 / 1024.0,
                o.rss_end_kib as f64 / 1024.0,
            );
        }
        for o in outcomes {
            println!(
                "{}: baseline p99 {:.1} ms; client issue lag p99 {:.1} ms; OK answers per 250 ms from 1 s before the overload ends: {:?}",
                o.name,
                o.baseline_p99.as_secs_f64() * 1000.0,
                o.lag_p99.as_secs_f64() * 1000.0,
                o.timeline
            );
        }
    }
}
