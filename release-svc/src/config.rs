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
    /// SQLite database file (created if missing), or a PostgreSQL URL
    /// (`postgres://user@host:5432/db`; migrated at start).
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
    /// PEM CA bundle that deploy-svc's certificate must chain to (TLS to deploy-svc; the
    /// address must then be `https://`).
    #[arg(long, env = "RELEASE_SVC_DEPLOY_SVC_CA")]
    pub deploy_svc_ca: Option<PathBuf>,
    /// PEM client certificate release-svc presents to deploy-svc (mutual TLS).
    #[arg(long, env = "RELEASE_SVC_DEPLOY_SVC_CERT", requires = "deploy_svc_key")]
    pub deploy_svc_cert: Option<PathBuf>,
    /// PEM key of `--deploy-svc-cert`.
    #[arg(long, env = "RELEASE_SVC_DEPLOY_SVC_KEY", requires = "deploy_svc_cert")]
    pub deploy_svc_key: Option<PathBuf>,
    /// File holding the bearer token release-svc sends to deploy-svc (re-read when it
    /// changes).
    #[arg(long, env = "RELEASE_SVC_DEPLOY_SVC_TOKEN_FILE")]
    pub deploy_svc_token_file: Option<PathBuf>,
    /// On shutdown, the longest wait for in-flight calls before exiting.
    #[arg(long, env = "RELEASE_SVC_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Largest request or response message in bytes.
    #[arg(long, env = "RELEASE_SVC_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Change streams (WatchVisibility and flagd EventStream, on every listener together)
    /// open at once at most; past it a new one is RESOURCE_EXHAUSTED.
    #[arg(long, env = "RELEASE_SVC_MAX_WATCHERS", default_value_t = crate::grpc::DEFAULT_MAX_WATCHERS)]
    pub max_watchers: usize,
    /// flagd sync streams (SyncFlags, every listener together) open at once at most; past
    /// it a new one is RESOURCE_EXHAUSTED. Each stream may hold a document (at most
    /// `--max-message-bytes`) its client has not read yet, so this bounds that memory.
    #[arg(long, env = "RELEASE_SVC_MAX_SYNC_STREAMS", default_value_t = 512)]
    pub max_sync_streams: usize,
    /// Serve the OpenFeature Remote Evaluation Protocol (OFREP: HTTP/1.1 and HTTP/2 with
    /// JSON, `/ofrep/v1/evaluate/flags[/{key}]`) on this address, with the same TLS and
    /// authentication as the gRPC listener.
    #[arg(long, env = "RELEASE_SVC_OFREP_LISTEN")]
    pub ofrep_listen: Option<SocketAddr>,
    /// Browser origins (`https://app.example.com`) allowed to call OFREP and the flagd
    /// Connect protocol from another origin (CORS); repeat for several. None by default:
    /// only same-origin pages (or a proxy in front) can. `--ofrep-cors-origin` is its
    /// older name.
    #[arg(
        long = "cors-origin",
        visible_alias = "ofrep-cors-origin",
        env = "RELEASE_SVC_OFREP_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
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
    /// The flagd context attribute that names the environment when no selector does; an
    /// empty value turns context-chosen environments off (then context-free answers are
    /// STATIC, which providers cache, even without a selector).
    #[arg(
        long,
        env = "RELEASE_SVC_FLAGD_ENVIRONMENT_ATTRIBUTE",
        default_value = "environment"
    )]
    pub flagd_environment_attribute: String,
    /// The flagd `fractional` bucketing generation: `v2` (flagd 0.15-0.16 and the SDKs of
    /// that generation), `v1` (flagd up to 0.14) or `v3` (the 2026 SDKs' CBOR-based
    /// bucketing of any JSON value). Rollout percentages are decided by the same generation
    /// (so in-process flagd providers of that generation decide them alike).
    #[arg(long, env = "RELEASE_SVC_FRACTIONAL_BUCKETING", default_value = "v2")]
    pub fractional_bucketing: crate::domain::rules::Bucketing,
    /// Seconds between keep_alive events on an idle flagd EventStream.
    #[arg(
        long,
        env = "RELEASE_SVC_FLAGD_KEEP_ALIVE_SECONDS",
        default_value_t = 20
    )]
    pub flagd_keep_alive_seconds: u64,
    /// flagd source selectors mapped to environments, `SOURCE=ENV` (repeatable; comma
    /// separated in the environment variable): providers configured with a flagd source
    /// selector (`source=<s>` or a bare `<s>`) read that environment.
    #[arg(long = "flagd-source-alias", env = "RELEASE_SVC_FLAGD_SOURCE_ALIAS", value_delimiter = ',', value_parser = key_value)]
    pub flagd_source_aliases: Vec<(String, String)>,
    /// Context values added to every flagd-protocol evaluation, `KEY=VALUE` (repeatable;
    /// comma separated in the environment variable), like flagd's `--context-value`. They
    /// override the request's values of the same key.
    #[arg(long = "flagd-context", env = "RELEASE_SVC_FLAGD_CONTEXT", value_delimiter = ',', value_parser = key_value)]
    pub flagd_context: Vec<(String, String)>,
    /// Where the change calendar (freeze windows, protected environments) comes from:
    /// `deploy-svc` (its environments; when it cannot be read, releases do not advance:
    /// fail closed) or `none` (no freeze windows: release-svc used without deploy-svc, as a
    /// plain flag service).
    #[arg(
        long,
        env = "RELEASE_SVC_CHANGE_CALENDAR",
        value_enum,
        default_value = "deploy-svc"
    )]
    pub change_calendar: CalendarSource,
    /// How often planned releases are checked and advanced, in milliseconds.
    #[arg(
        long,
        env = "RELEASE_SVC_SCHEDULER_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub scheduler_interval_ms: u64,
    /// How often evaluation usage (counts per feature, environment and variant) is written
    /// to the database, in seconds; also written at shutdown. A replica killed without a
    /// shutdown loses at most this much usage (never a decision).
    #[arg(
        long,
        env = "RELEASE_SVC_USAGE_FLUSH_INTERVAL_SECONDS",
        default_value_t = 60
    )]
    pub usage_flush_interval_seconds: u64,
    /// TLS, authentication, authorization and limits of the listeners.
    #[command(flatten)]
    pub server: service_kit::ServerArgs,
    /// Logging.
    #[command(flatten)]
    pub log: service_kit::LogArgs,
    /// A one-shot command against a running release-svc instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Where freeze windows come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CalendarSource {
    /// deploy-svc's environments.
    DeploySvc,
    /// None: no freeze windows, no protected environments.
    None,
}

/// One-shot commands: clients of a running release-svc's gRPC API.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Imports a flagd flag-definition file as features released in an environment
    /// (ImportFlagd); prints what was created, updated, unchanged and skipped as JSON.
    ImportFlagd {
        /// The flag-definition file (JSON); `-` reads standard input.
        file: PathBuf,
        /// The environment the flags are released to.
        #[arg(long)]
        environment: String,
        /// Import the valid flags and list the invalid ones instead of refusing the file.
        #[arg(long)]
        skip_invalid: bool,
        /// The release-svc to call.
        #[arg(long, default_value = "http://127.0.0.1:50052")]
        server: String,
        /// TLS and credentials.
        #[command(flatten)]
        client: service_kit::client::ClientArgs,
    },
    /// Prints an environment's features as a flagd flag-definition document (ExportFlagd).
    ExportFlagd {
        /// The environment whose view is rendered.
        #[arg(long)]
        environment: String,
        /// The release-svc to call.
        #[arg(long, default_value = "http://127.0.0.1:50052")]
        server: String,
        /// TLS and credentials.
        #[command(flatten)]
        client: service_kit::client::ClientArgs,
    },
}

/// Parses `KEY=VALUE`.
fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
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

    /// How release-svc authenticates to deploy-svc.
    pub fn deploy_svc_security(&self) -> service_kit::client::ClientSecurity {
        service_kit::client::ClientSecurity {
            ca: self.deploy_svc_ca.clone(),
            cert: self.deploy_svc_cert.clone(),
            key: self.deploy_svc_key.clone(),
            token_file: self.deploy_svc_token_file.clone(),
        }
    }
}
