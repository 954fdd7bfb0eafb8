//! The scale curve: how the cost of the work grows with the fleet and the replicas, on
//! PostgreSQL.
//!
//! ```sh
//! cargo build --release -p deploy-svc -p release-svc -p tests
//! target/release/bench-scale                          # fleets 100,1000,10000 x replicas 1,2,4
//! target/release/bench-scale --fleets 100,1000 --replicas 1,2 --svg target/scale.svg
//! ```
//!
//! For each fleet size and replica count, on fresh databases: that many deploy-svc replicas
//! and as many release-svc replicas (each following its own deploy-svc replica), a fleet of
//! targets in one environment with one deployment placing an artifact on all of them, and
//! the gated feature of the gate benchmark in another environment. Then three phases:
//!
//! - **ingest**: closed-loop writers (spread over the deploy-svc replicas) report placements
//!   across the whole fleet; acknowledged reports per second;
//! - **delivery**: writers paced at a fixed rate, one WatchPlacements stream per deploy-svc
//!   replica; from sending a report to each stream receiving its event (p50, p99);
//! - **decision**: the gate opened and closed by reports sent to the first deploy-svc
//!   replica, watched through Evaluate on the last release-svc replica; from sending the
//!   report to the new answer (p50, p99).
//!
//! Every figure is also printed as a ratio to the smallest cell of the same run. `--svg`
//! writes the three curves as a chart.

// A benchmark prints its results; a panic is a failed run.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use proto::deploy::v1 as pb;
use tests::release;
use tests::{artifact, deploy, environment, report, Binary, Churn, Client, Gated};

#[derive(Parser)]
struct Args {
    /// A PostgreSQL server (databases are created on it).
    #[arg(
        long,
        env = "TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    url: String,
    /// Fleet sizes (targets).
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1_000, 10_000])]
    fleets: Vec<usize>,
    /// Replica counts (of each service).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4])]
    replicas: Vec<usize>,
    /// Writers of the ingest and delivery phases.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Seconds of the ingest phase (after one second of warm-up) and of the delivery phase.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Reports per second in the delivery phase.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Gate flips in the decision phase.
    #[arg(long, default_value_t = 100)]
    flips: usize,
    /// Writes the chart here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// One cell of the curve.
struct Cell {
    fleet: usize,
    replicas: usize,
    ingest: f64,
    delivery: (f64, f64),
    decision: (f64, f64),
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    println!(
        "| targets | replicas | ingest reports/s | delivery p50 / p99 ms | decision p50 / p99 ms |"
    );
    println!("|---|---|---|---|---|");
    let mut cells = Vec::new();
    for &fleet in &args.fleets {
        for &replicas in &args.replicas {
            let c = cell(&args, fleet, replicas).await;
            println!(
                "| {} | {} | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} |",
                c.fleet,
                c.replicas,
                c.ingest,
                c.delivery.0,
                c.delivery.1,
                c.decision.0,
                c.decision.1
            );
            cells.push(c);
        }
    }
    let base = &cells[0];
    println!(
        "\nratios to {} targets x {} replica(s):",
        base.fleet, base.replicas
    );
    println!("| targets | replicas | ingest | delivery p99 | decision p99 |");
    println!("|---|---|---|---|---|");
    for c in &cells {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} |",
            c.fleet,
            c.replicas,
            c.ingest / base.ingest,
            c.delivery.1 / base.delivery.1,
            c.decision.1 / base.decision.1
        );
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, chart(&cells)).unwrap();
        println!("chart written to {}", path.display());
    }
}

async fn cell(args: &Args, fleet: usize, replicas: usize) -> Cell {
    let (_, deploy_db, _) = tests::fresh_database(&args.url, "scale_deploy").await;
    let (_, release_db, _) = tests::fresh_database(&args.url, "scale_release").await;
    let mut deploys = Vec::new();
    // Targets here never heartbeat: no lost-agent timeout (it would fail the deployments
    // while a large fleet is still being registered).
    for _ in 0..replicas {
        deploys
            .push(Binary::start(Path::new(&deploy_db), &["--agent-timeout-ms", "86400000"]).await);
    }
    let releases = tests::release_replicas(&deploys, &release_db).await;
    let mut dc = tests::connect(deploys[0].addr).await;
    let mut rc = release::connect(releases[0].addr).await;
    let gated = Gated::setup(&mut dc, &mut rc, 2, 0.5, 100.0).await;
    let targets = Arc::new(register_fleet(&deploys, fleet).await);
    artifact(&mut dc, "api", "1.0.0").await;
    let deployment = Arc::new(
        deploy(&mut dc, "api", "1.0.0", "fleet", "")
            .await
            .unwrap()
            .name,
    );
    let reports = Arc::new((0..fleet).map(|_| AtomicUsize::new(0)).collect::<Vec<_>>());
    let writers = Writers {
        clients: futures_clients(&deploys, args.writers).await,
        targets,
        deployment,
        reports,
    };

    let ingest = writers.closed_loop(args.seconds).await;
    let delivery = delivery(&deploys, &writers, args.rate, args.seconds).await;
    let mut last = release::connect(releases[replicas - 1].addr).await;
    let h = gated.flip_latencies(&mut dc, &mut last, args.flips).await;
    let decision = (ms(&h, 0.5), ms(&h, 0.99));
    for b in releases.into_iter().chain(deploys) {
        b.kill().await;
    }
    Cell {
        fleet,
        replicas,
        ingest,
        delivery,
        decision,
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Registers `fleet` targets in environment `fleet`, eight at a time.
async fn register_fleet(deploys: &[Binary], fleet: usize) -> Vec<String> {
    let mut c = tests::connect(deploys[0].addr).await;
    environment(&mut c, "fleet", None, false).await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = tests::connect(deploys[w % deploys.len()].addr).await;
        tasks.push(tokio::spawn(async move {
            let mut names = Vec::new();
            for i in (w..fleet).step_by(8) {
                let request = pb::RegisterTargetRequest {
                    parent: "environments/fleet".into(),
                    target_id: format!("t-{i}"),
                    labels: Default::default(),
                };
                // ABORTED (a write that kept conflicting with the other registrations) is
                // the service asking its caller to retry, as a client does.
                let t = loop {
                    match c.register_target(request.clone()).await {
                        Err(s) if s.code() == tonic::Code::Aborted => continue,
                        other => break other.unwrap().into_inner(),
                    }
                };
                names.push((i, t.name));
            }
            names
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all.into_iter().map(|(_, n)| n).collect()
}

/// One client per writer, spread over the replicas.
async fn futures_clients(deploys: &[Binary], writers: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for w in 0..writers {
        clients.push(tests::connect(deploys[w % deploys.len()].addr).await);
    }
    clients
}

/// Writers reporting across the fleet: writer `w` takes the targets `w`, `w + writers`, ...
/// in turn; each target's reports alternate so that every one changes its placement.
struct Writers {
    clients: Vec<Client>,
    targets: Arc<Vec<String>>,
    deployment: Arc<String>,
    reports: Arc<Vec<AtomicUsize>>,
}

impl Writers {
    /// Sends writer `w`'s `i`-th report; returns its sequence.
    async fn send(&self, c: &mut Client, w: usize, i: usize) -> u64 {
        let n = self.clients.len();
        // Writer `w` owns the targets `w`, `w + n`, ... (fleets are larger than the writers).
        let mine = self.targets.len().saturating_sub(w).div_ceil(n).max(1);
        let t = w + n * (i % mine);
        let k = self.reports[t].fetch_add(1, Ordering::Relaxed);
        let r = report(c, &self.deployment, &self.targets[t], Churn::state(k))
            .await
            .unwrap();
        assert!(r.changed, "every report changes its placement");
        r.sequence
    }

    /// Acknowledged reports per second over `seconds`, after one second of warm-up.
    async fn closed_loop(&self, seconds: u64) -> f64 {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let this = Arc::new(self.shallow());
        let mut tasks = Vec::new();
        for w in 0..self.clients.len() {
            let (this, done, stop) = (this.clone(), done.clone(), stop.clone());
            let mut c = self.clients[w].clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    this.send(&mut c, w, i).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                i
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (from, started) = (done.load(Ordering::Relaxed), Instant::now());
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let rate = (done.load(Ordering::Relaxed) - from) as f64 / started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        rate
    }

    fn shallow(&self) -> Self {
        Self {
            clients: self.clients.clone(),
            targets: self.targets.clone(),
            deployment: self.deployment.clone(),
            reports: self.reports.clone(),
        }
    }
}

/// Paced writers at `rate` reports/s for `seconds`, one watcher per deploy-svc replica:
/// from sending each report to each watcher receiving its event, (p50, p99) in ms.
async fn delivery(deploys: &[Binary], writers: &Writers, rate: u64, seconds: u64) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut watchers = Vec::new();
    for d in deploys {
        let mut c = tests::connect(d.addr).await;
        let mut s = tests::watch::open(&mut c, None, "", "").await.unwrap();
        tests::watch::snapshot(&mut s).await;
        let stop = stop.clone();
        watchers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(100), s.message()).await {
                    Ok(Ok(Some(m))) => {
                        if let Some(pb::watch_placements_response::Kind::Event(e)) = m.kind {
                            seen.push((e.sequence, Instant::now()));
                        }
                    }
                    Ok(_) => break,
                    Err(_) => {}
                }
            }
            seen
        }));
    }
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let this = Arc::new(writers.shallow());
    let n = writers.clients.len();
    let period = Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
    let writer_stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..n {
        let (this, sent, writer_stop) = (this.clone(), sent.clone(), writer_stop.clone());
        let mut c = writers.clients[w].clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            // Numbering continues after the closed loop's reports (any i works: the
            // per-target counters decide the state).
            let mut i = 0;
            while !writer_stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let at = Instant::now();
                let seq = this.send(&mut c, w, i).await;
                sent.lock().unwrap().insert(seq, at);
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    writer_stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = sent.lock().unwrap().clone();
    let mut h = Histogram::<u64>::new(3).unwrap();
    let mut received = 0;
    for w in watchers {
        for (seq, at) in w.await.unwrap() {
            if let Some(s) = sent.get(&seq) {
                received += 1;
                h.record(at.duration_since(*s).as_micros() as u64).unwrap();
            }
        }
    }
    assert_eq!(
        received,
        sent.len() * deploys.len(),
        "every watcher receives every report's event"
    );
    (ms(&h, 0.5), ms(&h, 0.99))
}

/// The three curves as an SVG chart: one panel per figure, the fleet on a log axis, a line
/// per replica count.
fn chart(cells: &[Cell]) -> String {
    type Figure = fn(&Cell) -> f64;
    let panels: [(&str, Figure); 3] = [
        ("ingest, reports/s", |c| c.ingest),
        ("delivery p99, ms", |c| c.delivery.1),
        ("decision p99, ms", |c| c.decision.1),
    ];
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
    let (pw, ph, pad) = (300.0, 220.0, 50.0);
    let width = panels.len() as f64 * (pw + pad) + pad;
    let height = ph + 2.5 * pad;
    let mut fleets: Vec<usize> = cells.iter().map(|c| c.fleet).collect();
    fleets.sort_unstable();
    fleets.dedup();
    let mut replicas: Vec<usize> = cells.iter().map(|c| c.replicas).collect();
    replicas.sort_unstable();
    replicas.dedup();
    let (lo, hi) = (
        (*fleets.first().unwrap_or(&1) as f64).log10(),
        (*fleets.last().unwrap_or(&10) as f64).log10(),
    );
    let x_of = |fleet: usize| {
        let span = (hi - lo).max(f64::EPSILON);
        ((fleet as f64).log10() - lo) / span * pw
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
"#
    );
    for (p, (title, figure)) in panels.iter().enumerate() {
        let ox = pad + p as f64 * (pw + pad);
        let oy = pad;
        let max = cells.iter().map(figure).fold(0.0_f64, f64::max) * 1.1;
        let max = if max > 0.0 { max } else { 1.0 };
        let y_of = |v: f64| oy + ph - v / max * ph;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" font-weight="bold">{title}</text>"#,
            ox + pw / 2.0,
            oy - 15.0
        );
        let _ = writeln!(
            svg,
            r##"<rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
        );
        for k in 0..=4 {
            let v = max * k as f64 / 4.0;
            let _ = writeln!(
                svg,
                r##"<line x1="{ox}" x2="{}" y1="{y}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                ox + pw,
                ox - 4.0,
                y_of(v) + 4.0,
                if max >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                },
                y = y_of(v),
            );
        }
        for &f in &fleets {
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="middle">{f}</text>"#,
                ox + x_of(f),
                oy + ph + 16.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">targets</text>"#,
            ox + pw / 2.0,
            oy + ph + 32.0
        );
        for (r, &n) in replicas.iter().enumerate() {
            let colour = colours[r % colours.len()];
            let points: Vec<String> = cells
                .iter()
                .filter(|c| c.replicas == n)
                .map(|c| format!("{:.1},{:.1}", ox + x_of(c.fleet), y_of(figure(c))))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                points.join(" ")
            );
            for pt in &points {
                let (x, y) = pt.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"#);
            }
        }
    }
    for (r, &n) in replicas.iter().enumerate() {
        let colour = colours[r % colours.len()];
        let x = pad + r as f64 * 140.0;
        let y = height - 15.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="14" height="4" fill="{colour}"/><text x="{}" y="{y}">{n} replica{} of each service</text>"#,
            y - 6.0,
            x + 20.0,
            if n == 1 { "" } else { "s" }
        );
    }
    svg.push_str("</svg>\n");
    svg
}
