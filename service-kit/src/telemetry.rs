//! Prometheus metrics: one process-wide recorder (`metrics` facade, rendered by
//! `metrics-exporter-prometheus`) and a small plain-HTTP listener that serves it at
//! `/metrics`, on its own port so that scraping never competes with the gRPC listener's
//! limits or credentials.
//!
//! Every crate records with the `metrics` macros; without `--metrics-listen` no recorder is
//! installed and recording costs next to nothing. Label values are always drawn from bounded
//! sets (method names from the authorization table, status code names, enum names): never
//! from request data.

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Metrics options, flattened into each program's command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics over plain HTTP at `/metrics` on this address (off unless
    /// set). The endpoint needs no credentials: bind it to loopback or a network that only
    /// the scraper reaches.
    #[arg(long, env = "METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Buckets of every `*_seconds` histogram: 0.5 ms to 60 s.
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Buckets of every `*_bytes` histogram: 1 KiB to 1 GiB.
const BYTES: &[f64] = &[
    1024.0,
    16_384.0,
    262_144.0,
    1_048_576.0,
    16_777_216.0,
    268_435_456.0,
    1_073_741_824.0,
];
/// Buckets of every `*_writes` histogram (batch sizes): 1 to 4096.
const COUNTS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle).
pub fn recorder() -> anyhow::Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES)?
        .set_buckets_for_metric(Matcher::Suffix("_writes".into()), COUNTS)?
        .build_recorder();
    let handle = recorder.handle();
    // Another thread may have won the race: the first recorder installed is the one.
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = HANDLE.set(handle);
        crate::access::describe();
        crate::health::describe();
    }
    HANDLE
        .get()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("another metrics recorder is already installed"))
}

/// With `--metrics-listen`, installs the recorder, binds the address and serves `/metrics`
/// until `stop` is cancelled. Logs the bound address (`metrics served`, field `address`).
/// `describe` registers the program's own metric descriptions (HELP lines).
pub async fn serve_metrics(
    args: &MetricsArgs,
    describe: fn(),
    stop: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = args.metrics_listen else {
        return Ok(None);
    };
    let handle = recorder()?;
    describe();
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "metrics served");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                handle.run_upkeep();
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    handle.render(),
                )
            }
        }),
    );
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::warn!(error = %e, "metrics listener failed");
        }
    })))
}
