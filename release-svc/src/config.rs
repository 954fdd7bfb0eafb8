//! Configuration: every flag has an environment variable (`RELEASE_SVC_*`).

use std::net::SocketAddr;
use std::path::PathBuf;

/// release-svc's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "release-svc",
    about = "Release Management gRPC service",
    version
)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "RELEASE_SVC_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,
    /// SQLite database file (created if missing).
    #[arg(
        long,
        env = "RELEASE_SVC_DATABASE",
        default_value = "data/release-svc.db"
    )]
    pub database: PathBuf,
    /// deploy-svc's address, whose placement stream release-svc follows.
    #[arg(
        long,
        env = "RELEASE_SVC_DEPLOY_SVC",
        default_value = "http://127.0.0.1:50051"
    )]
    pub deploy_svc: String,
    /// On shutdown, the longest wait for in-flight calls before exiting.
    #[arg(long, env = "RELEASE_SVC_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Largest request or response message in bytes.
    #[arg(long, env = "RELEASE_SVC_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Also serve the flagd protocols on this address (flagd's default port is 8013);
    /// they are always served on --listen too.
    #[arg(long, env = "RELEASE_SVC_FLAGD_LISTEN")]
    pub flagd_listen: Option<SocketAddr>,
    /// The environment flagd-protocol evaluations use when neither the `Flagd-Selector`
    /// header (`flagSetId=<env>`) nor the context attribute `environment` names one.
    #[arg(
        long,
        env = "RELEASE_SVC_FLAGD_DEFAULT_ENVIRONMENT",
        default_value = "prod"
    )]
    pub flagd_default_environment: String,
    /// Seconds between keep_alive events on an idle flagd EventStream.
    #[arg(
        long,
        env = "RELEASE_SVC_FLAGD_KEEP_ALIVE_SECONDS",
        default_value_t = 20
    )]
    pub flagd_keep_alive_seconds: u64,
    /// Logging.
    #[command(flatten)]
    pub log: service_kit::LogArgs,
}

impl Config {
    /// Defaults with a database at `database` following deploy-svc at `deploy_svc`.
    pub fn new(database: impl Into<PathBuf>, deploy_svc: impl Into<String>) -> Self {
        use clap::Parser;
        let mut config = Self::parse_from(["release-svc"]);
        config.database = database.into();
        config.deploy_svc = deploy_svc.into();
        config
    }
}
