//! release-svc (skeleton): Release Management. This first cut serves only gRPC health and
//! reflection so the pair can be started and probed together; features, releases and
//! placement-gated visibility come with the release-svc issue.
//!
//! # Layout
//!
//! - `main.rs`: configuration, logging, bind, health, reflection, graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// release-svc's configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "release-svc",
    about = "Release Management gRPC service (skeleton)",
    version
)]
struct Config {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "RELEASE_SVC_LISTEN", default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    /// deploy-svc's address, whose placement stream release-svc will follow.
    #[arg(
        long,
        env = "RELEASE_SVC_DEPLOY_SVC",
        default_value = "http://127.0.0.1:50051"
    )]
    deploy_svc: String,
    /// On shutdown, the longest wait for in-flight calls before exiting.
    #[arg(long, env = "RELEASE_SVC_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    drain_timeout_ms: u64,
    /// Logging.
    #[command(flatten)]
    log: service_kit::LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    service_kit::init_tracing(&config.log);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    #[allow(clippy::print_stdout)]
    {
        println!("release-svc listening on {}", listener.local_addr()?);
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    let routes = service_kit::reflection(tonic::service::Routes::new(health_service))?;
    tracing::info!(address = %listener.local_addr()?, deploy_svc = %config.deploy_svc, "release-svc (skeleton) serving health and reflection");
    service_kit::serve_gracefully(
        listener,
        routes,
        health,
        &[],
        CancellationToken::new(),
        service_kit::Drain {
            timeout: Duration::from_millis(config.drain_timeout_ms),
        },
        service_kit::shutdown_signal(),
    )
    .await
}
