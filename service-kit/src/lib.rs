//! Plumbing shared by deploy-svc and release-svc: logging, signals, reflection and a
//! graceful serve loop. Domain logic never goes here.
//!
//! # Layout
//!
//! - [`LogArgs`] / [`init_tracing`]: human or JSON logs, filtered by `RUST_LOG`.
//! - [`shutdown_signal`]: resolves on SIGINT or SIGTERM.
//! - [`reflection`]: gRPC reflection v1 and v1alpha over the contracts, with comments.
//! - [`serve_gracefully`]: runs a tonic router until shutdown, then marks health
//!   NOT_SERVING, ends open streams, drains in-flight calls with a hard timeout.
//! - [`health`]: health that follows the store (NOT_SERVING once it cannot write).
//! - [`error`]: the request error type (field and precondition violations), no tonic types.
//! - [`status`]: the one exhaustive `From<Error> for Status`, with rich error details.
//! - [`sqlite`]: the SQLite error mapping and migration runner of the embedded stores.
//! - [`validate`]: limits and checks every API shares (text, keys, pages, page tokens).
//! - [`principal()`]: who is calling (the `x-principal` metadata until authentication).

pub mod error;
pub mod health;
pub mod principal;
pub mod sqlite;
pub mod status;
pub mod validate;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::server::HealthReporter;

pub use principal::principal;

/// Logging options, flattened into each service's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long = "log-format", env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
}

/// Installs the global tracing subscriber (stderr; level from `RUST_LOG`, default info).
pub fn init_tracing(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if args.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "tracing already initialised");
    }
}

/// Resolves when the process receives SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
        () = term => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}

/// The reflection services (v1 and v1alpha: grpcurl 1.8 speaks only v1alpha).
pub fn reflection(routes: Routes) -> anyhow::Result<Routes> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok(routes.add_service(v1).add_service(v1alpha))
}

/// How the server drains.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// The longest the server waits for in-flight calls after shutdown begins.
    pub timeout: Duration,
}

/// Serves `routes` on `listener` until `shutdown` resolves; then sets every health status
/// in `service_names` (and the overall one) to NOT_SERVING, cancels `streams` so endless
/// server streams end, and waits for in-flight calls at most `drain.timeout`.
pub async fn serve_gracefully(
    listener: TcpListener,
    routes: Routes,
    health: HealthReporter,
    service_names: &[&str],
    streams: CancellationToken,
    drain: Drain,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        // Per-connection concurrency cap: a single client cannot monopolise the server.
        .concurrency_limit_per_connection(1024)
        // Detects dead peers on idle connections (watchers behind a NAT, crashed agents).
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            // Small unary messages: do not wait to coalesce packets. (The builder's
            // `tcp_nodelay` only reaches sockets tonic accepts itself, not these: without
            // this, a client sending one call at a time waited ~40 ms per call for the
            // delayed ACK.)
            TcpListenerStream::new(listener).map(|accepted| {
                accepted.and_then(|socket| {
                    socket.set_nodelay(true)?;
                    Ok(socket)
                })
            }),
            stop.clone().cancelled_owned(),
        );
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.map_err(Into::into),
        () = shutdown => {}
    }
    for name in service_names {
        health
            .set_service_status(*name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    streams.cancel();
    stop.cancel();
    match tokio::time::timeout(drain.timeout, &mut server).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => {
            tracing::warn!(timeout = ?drain.timeout, "drain timeout reached; exiting with calls in flight");
            Ok(())
        }
    }
}
