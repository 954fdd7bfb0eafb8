//! The deploy agent's loop: registers its target with deploy-svc, keeps a heartbeat,
//! follows its orders (WatchOrders), carries each out with [`crate::place::Placer`] and
//! reports PLACING, then PLACED or FAILED with the reason. It reconnects with backoff
//! (100 ms doubling to 2 s). After a restart, what is on disk decides: the target's labels
//! carry `agent.current` (the version `current` points at, or `none`), and an order for a
//! version already current and complete is reported PLACED without fetching again.
//!
//! A reason is made to fit deploy-svc's text rules before it is sent (control characters
//! replaced, cut to [`MAX_REASON_BYTES`] on a character boundary): a report the server
//! refuses would bring the same order back after the reconnect, for ever. When the agent
//! stops, the order in progress is abandoned at once (see [`crate::place::Stop`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::deploy::v1 as pb;
use proto::deploy::v1::deploy_service_client::DeployServiceClient;
use service_kit::backoff::Backoff;
use service_kit::client::AuthChannel;
use tokio_util::sync::CancellationToken;

use crate::place::{Limits, Order, Placer, Sources, Stop};

/// The longest reason deploy-svc accepts in ReportPlacement (bytes).
pub const MAX_REASON_BYTES: usize = service_kit::validate::MAX_TEXT;

/// What an agent needs to know.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentConfig {
    /// deploy-svc's address.
    #[arg(
        long,
        env = "DEPLOY_AGENT_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// The environment of the target.
    #[arg(long, env = "DEPLOY_AGENT_ENVIRONMENT")]
    pub environment: String,
    /// The target id.
    #[arg(long, env = "DEPLOY_AGENT_TARGET")]
    pub target: String,
    /// TLS to deploy-svc and the agent's credentials (a client certificate or a token
    /// whose role binding names this target).
    #[command(flatten)]
    pub client: service_kit::client::ClientArgs,
    /// Target labels, `KEY=VALUE` (repeatable).
    #[arg(long = "label", value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// Where versions go: `<root>/versions/...` and the `<root>/current` link.
    #[arg(long, env = "DEPLOY_AGENT_ROOT")]
    pub root: PathBuf,
    /// Heartbeat period in milliseconds.
    #[arg(long, env = "DEPLOY_AGENT_HEARTBEAT_MS", default_value_t = 2_000)]
    pub heartbeat_ms: u64,
    /// Command run (`sh -c`) in the new version's directory before switching. Its output
    /// is logged here, never reported.
    #[arg(long, env = "DEPLOY_AGENT_PRE_SWITCH")]
    pub pre_switch: Option<String>,
    /// Pre-switch timeout in milliseconds (then it is killed with its process group).
    #[arg(
        long,
        env = "DEPLOY_AGENT_PRE_SWITCH_TIMEOUT_MS",
        default_value_t = 300_000
    )]
    pub pre_switch_timeout_ms: u64,
    /// Command run (`sh -c`) after switching; failure or timeout switches back.
    #[arg(long, env = "DEPLOY_AGENT_HEALTH_CHECK")]
    pub health_check: Option<String>,
    /// Health check timeout in milliseconds.
    #[arg(long, env = "DEPLOY_AGENT_HEALTH_TIMEOUT_MS", default_value_t = 10_000)]
    pub health_timeout_ms: u64,
    /// Version directories kept (current included).
    #[arg(long, env = "DEPLOY_AGENT_KEEP", default_value_t = 3)]
    pub keep: usize,
    #[command(flatten)]
    pub sources: SourceArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Where the agent may fetch artifacts from: nothing unless allowed here.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Allows `file://` sources beneath this directory (repeatable; comma-separated in the
    /// environment). Without it `file://` is refused.
    #[arg(
        long = "allow-file-dir",
        env = "DEPLOY_AGENT_ALLOW_FILE_DIR",
        value_delimiter = ','
    )]
    pub file_dirs: Vec<PathBuf>,
    /// Allows `http(s)://` sources under this URL prefix, e.g.
    /// `https://artifacts.example.com/releases/` (repeatable; comma-separated in the
    /// environment). Redirects must stay under an allowed prefix too.
    #[arg(
        long = "allow-source",
        env = "DEPLOY_AGENT_ALLOW_SOURCE",
        value_delimiter = ','
    )]
    pub url_prefixes: Vec<String>,
    /// Refuses `http://` sources and redirects.
    #[arg(long, env = "DEPLOY_AGENT_HTTPS_ONLY")]
    pub https_only: bool,
    /// Redirect hops followed per fetch.
    #[arg(long, env = "DEPLOY_AGENT_MAX_REDIRECTS", default_value_t = crate::place::sources::DEFAULT_MAX_REDIRECTS)]
    pub max_redirects: u32,
    /// Whole-request timeout of an HTTP fetch in milliseconds.
    #[arg(long, env = "DEPLOY_AGENT_FETCH_TIMEOUT_MS", default_value_t = 60_000)]
    pub fetch_timeout_ms: u64,
}

/// Size limits on each order and the mode of single-file artifacts.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// The most bytes an artifact may have; a fetch stops there.
    #[arg(long, env = "DEPLOY_AGENT_MAX_ARTIFACT_BYTES", default_value_t = Limits::default().artifact_bytes)]
    pub max_artifact_bytes: u64,
    /// The most bytes of file content a tar.gz may unpack to.
    #[arg(long, env = "DEPLOY_AGENT_MAX_UNPACKED_BYTES", default_value_t = Limits::default().unpacked_bytes)]
    pub max_unpacked_bytes: u64,
    /// The most entries a tar.gz may hold.
    #[arg(long, env = "DEPLOY_AGENT_MAX_ENTRIES", default_value_t = Limits::default().entries)]
    pub max_entries: u64,
    /// Mode (octal) of an artifact that is a single file rather than a tar.gz; masked to
    /// 755. Use 755 for a single executable.
    #[arg(long, env = "DEPLOY_AGENT_SINGLE_FILE_MODE", default_value = "644", value_parser = octal)]
    pub single_file_mode: u32,
}

fn octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode"))
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

impl AgentConfig {
    fn principal(&self) -> String {
        format!("agent:{}/{}", self.environment, self.target)
    }

    fn target_name(&self) -> String {
        format!("environments/{}/targets/{}", self.environment, self.target)
    }

    fn sources(&self) -> anyhow::Result<Sources> {
        let mut sources = Sources::default()
            .https_only(self.sources.https_only)
            .max_redirects(self.sources.max_redirects);
        for dir in &self.sources.file_dirs {
            sources = sources.allow_file_dir(dir).map_err(anyhow::Error::msg)?;
        }
        for prefix in &self.sources.url_prefixes {
            sources = sources
                .allow_url_prefix(prefix)
                .map_err(anyhow::Error::msg)?;
        }
        Ok(sources)
    }

    fn placer(&self, stop: Stop) -> anyhow::Result<Placer> {
        Ok(Placer::new(&self.root, self.keep)
            .with_sources(self.sources()?)
            .with_limits(Limits {
                artifact_bytes: self.limits.max_artifact_bytes,
                unpacked_bytes: self.limits.max_unpacked_bytes,
                entries: self.limits.max_entries,
            })
            .with_single_file_mode(self.limits.single_file_mode)
            .with_fetch_timeout(Duration::from_millis(self.sources.fetch_timeout_ms))
            .with_pre_switch(
                self.pre_switch.clone(),
                Duration::from_millis(self.pre_switch_timeout_ms),
            )
            .with_health_check(
                self.health_check.clone(),
                Duration::from_millis(self.health_timeout_ms),
            )
            .with_stop(stop))
    }
}

fn request<T>(principal: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = principal.parse() {
        req.metadata_mut().insert("x-principal", v);
    }
    req
}

/// `text` as deploy-svc accepts it in a reason: control characters (but newline and tab)
/// become spaces, and it is cut to [`MAX_REASON_BYTES`] on a character boundary.
pub fn fit_reason(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                ' '
            } else {
                c
            }
        })
        .collect();
    if out.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// Opens the agent's gRPC channel to deploy-svc at `endpoint` (`http://host:port`, or
/// `https://` with a CA). Every connection the agent makes goes through here, so this is
/// the one place where its transport is configured: connect timeout, TLS, the client
/// certificate and the bearer token.
pub async fn connect(
    endpoint: &str,
    security: &service_kit::client::ClientSecurity,
) -> anyhow::Result<AuthChannel> {
    let bearer = security.bearer()?;
    let channel = security
        .endpoint(endpoint)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel, bearer,
    ))
}

/// Runs the agent until `stop` is cancelled. A configuration error (an allowed directory
/// that does not exist, a malformed prefix) is returned at once.
pub async fn run(config: AgentConfig, stop: CancellationToken) -> anyhow::Result<()> {
    let placing = Stop::default();
    let placer = Arc::new(config.placer(placing.clone())?);
    // A fetch, unpack or hook in progress gives up as soon as the agent is told to stop.
    let on_stop = stop.clone();
    tokio::spawn(async move {
        on_stop.cancelled().await;
        placing.stop();
    });
    // Jittered: a fleet of agents cut off together does not reconnect in lockstep.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let session = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            r = session(&config, placer.clone(), &stop, &mut backoff) => r,
        };
        metrics::gauge!(crate::telemetry::CONNECTED).set(0.0);
        match session {
            Ok(()) => return Ok(()),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "agent disconnected");
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// One connection: register, heartbeat, follow orders until the stream ends.
async fn session(
    config: &AgentConfig,
    placer: Arc<Placer>,
    stop: &CancellationToken,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let mut client =
        DeployServiceClient::new(connect(&config.server, &config.client.security()).await?);
    let principal = config.principal();
    let on_disk = placer.current();
    let mut labels: BTreeMap<String, String> = config.labels.iter().cloned().collect();
    labels.insert(
        "agent.current".into(),
        on_disk.as_ref().map_or_else(
            || "none".into(),
            |d| format!("{}@{}", d.artifact, d.version),
        ),
    );
    client
        .register_target(request(
            &principal,
            pb::RegisterTargetRequest {
                parent: format!("environments/{}", config.environment),
                target_id: config.target.clone(),
                labels: labels.into_iter().collect(),
            },
        ))
        .await?;
    tracing::info!(target = %config.target_name(), on_disk = ?on_disk.map(|d| d.version), "agent registered");
    backoff.reset();
    metrics::gauge!(crate::telemetry::CONNECTED).set(1.0);
    let beating = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeats(
        client.clone(),
        config.environment.clone(),
        config.target.clone(),
        Duration::from_millis(config.heartbeat_ms.max(10)),
        beating.clone(),
    ));
    let result = follow(config, &mut client, placer, &principal, stop).await;
    beating.cancel();
    let _ = heartbeat.await;
    result
}

async fn heartbeats(
    mut client: DeployServiceClient<AuthChannel>,
    environment: String,
    target: String,
    every: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // A call to a deploy-svc that stopped answering never ends on its own: the session
        // ending (its order stream lost) cancels it, so the agent reconnects at once.
        let beat = tokio::select! {
            () = stop.cancelled() => return,
            beat = client.heartbeat_target(pb::HeartbeatTargetRequest {
                name: format!("environments/{environment}/targets/{target}"),
            }) => beat,
        };
        if let Err(e) = beat {
            tracing::debug!(error = %e, "heartbeat failed");
        }
    }
}

async fn follow(
    config: &AgentConfig,
    client: &mut DeployServiceClient<AuthChannel>,
    placer: Arc<Placer>,
    principal: &str,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut orders = client
        .watch_orders(pb::WatchOrdersRequest {
            target: config.target_name(),
        })
        .await?
        .into_inner();
    loop {
        let order = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            o = orders.message() => o?,
        };
        let Some(order) = order else {
            anyhow::bail!("the order stream ended");
        };
        if order.action() != pb::OrderAction::Place {
            tracing::warn!(?order, "order action not supported; ignored");
            continue;
        }
        // While traces are exported, one span per order: its reports to deploy-svc (and so
        // the placement events they write) are its children.
        let span = tracing::info_span!(
            target: service_kit::otel::TARGET,
            parent: None,
            "place",
            otel.kind = "internal",
            deploy.deployment = %order.deployment,
            deploy.target = %config.target_name(),
            deploy.artifact = %order.artifact,
            deploy.version = %order.version,
        );
        let carried = tracing::Instrument::instrument(
            carry_out(config, client, placer.clone(), principal, order),
            span,
        );
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            r = carried => r?,
        }
    }
}

async fn report(
    config: &AgentConfig,
    client: &mut DeployServiceClient<AuthChannel>,
    principal: &str,
    deployment: &str,
    state: pb::PlacementState,
    message: &str,
) -> anyhow::Result<()> {
    let sent = client
        .report_placement(request(
            principal,
            pb::ReportPlacementRequest {
                deployment: deployment.to_owned(),
                target: config.target_name(),
                state: state.into(),
                message: fit_reason(message),
            },
        ))
        .await;
    match sent {
        Ok(_) => Ok(()),
        // Sending it again would be refused again: skip this report instead of
        // reconnecting into the same order for ever.
        Err(status) if status.code() == tonic::Code::InvalidArgument => {
            tracing::error!(deployment, ?state, error = %status, "report refused by deploy-svc; not retried");
            Ok(())
        }
        Err(status) => Err(status.into()),
    }
}

async fn carry_out(
    config: &AgentConfig,
    client: &mut DeployServiceClient<AuthChannel>,
    placer: Arc<Placer>,
    principal: &str,
    order: pb::Order,
) -> anyhow::Result<()> {
    report(
        config,
        client,
        principal,
        &order.deployment,
        pb::PlacementState::Placing,
        &format!("placing {}@{}", order.artifact, order.version),
    )
    .await?;
    let job = Order {
        artifact: order.artifact.clone(),
        version: order.version.clone(),
        digest: order.digest.clone(),
        source_uri: order.source_uri.clone(),
    };
    let outcome = tokio::task::spawn_blocking(move || placer.place(&job)).await?;
    let label = match &outcome {
        Ok(p) if p.reused => "reused",
        Ok(_) => "placed",
        Err(_) => "failed",
    };
    metrics::counter!(crate::telemetry::PLACEMENTS, "outcome" => label).increment(1);
    let (state, message) = match outcome {
        Ok(p) if p.reused => (
            pb::PlacementState::Placed,
            format!("already current at {}", p.path.display()),
        ),
        Ok(p) => (
            pb::PlacementState::Placed,
            format!("placed at {}", p.path.display()),
        ),
        Err(e) => (pb::PlacementState::Failed, e.to_string()),
    };
    tracing::info!(deployment = %order.deployment, version = %order.version, ?state, %message, "order carried out");
    report(
        config,
        client,
        principal,
        &order.deployment,
        state,
        &message,
    )
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        agent: AgentConfig,
    }

    fn parse(extra: &[&str]) -> AgentConfig {
        let mut args = vec![
            "deploy-agent",
            "--environment",
            "dev",
            "--target",
            "t",
            "--root",
            "/tmp/r",
        ];
        args.extend_from_slice(extra);
        Args::try_parse_from(args).unwrap().agent
    }

    #[test]
    fn a_long_reason_is_cut_to_the_servers_limit_on_a_char_boundary() {
        // 3-byte characters: 1,024 is not a boundary (1,023 is).
        let long = "€".repeat(600);
        let fitted = fit_reason(&long);
        assert_eq!(fitted.len(), 1_023);
        assert!(long.starts_with(&fitted));
        assert!(service_kit::validate::validate_text(&fitted, MAX_REASON_BYTES).is_ok());

        let ascii = "x".repeat(5_000);
        assert_eq!(fit_reason(&ascii).len(), MAX_REASON_BYTES);
        assert_eq!(fit_reason("short"), "short");
    }

    #[test]
    fn control_characters_are_replaced_so_that_the_server_accepts_the_reason() {
        let fitted = fit_reason("a\u{1b}[31mred\r\nnext\tcol\u{0}");
        assert_eq!(fitted, "a [31mred \nnext\tcol ");
        assert!(service_kit::validate::validate_text(&fitted, MAX_REASON_BYTES).is_ok());
    }

    #[test]
    fn by_default_no_source_is_allowed_and_limits_are_set() {
        let config = parse(&[]);
        assert!(config.sources.file_dirs.is_empty());
        assert!(config.sources.url_prefixes.is_empty());
        assert!(!config.sources.https_only);
        assert_eq!(config.limits.max_artifact_bytes, 2 << 30);
        assert_eq!(config.limits.max_unpacked_bytes, 8 << 30);
        assert_eq!(config.limits.max_entries, 100_000);
        assert_eq!(config.limits.single_file_mode, 0o644);
        assert_eq!(config.pre_switch_timeout_ms, 300_000);
    }

    #[test]
    fn sources_and_limits_are_flags() {
        let config = parse(&[
            "--allow-file-dir",
            "/srv/a",
            "--allow-file-dir",
            "/srv/b",
            "--allow-source",
            "https://artifacts.example.com/releases/",
            "--https-only",
            "--max-artifact-bytes",
            "1000",
            "--single-file-mode",
            "755",
        ]);
        assert_eq!(config.sources.file_dirs.len(), 2);
        assert_eq!(
            config.sources.url_prefixes,
            ["https://artifacts.example.com/releases/"]
        );
        assert!(config.sources.https_only);
        assert_eq!(config.limits.max_artifact_bytes, 1000);
        assert_eq!(config.limits.single_file_mode, 0o755);
        assert!(Args::try_parse_from([
            "deploy-agent",
            "--environment=dev",
            "--target=t",
            "--root=/r",
            "--single-file-mode=9"
        ])
        .is_err());
    }

    #[test]
    fn an_allowed_directory_that_does_not_exist_stops_the_agent_at_start() {
        let config = parse(&["--allow-file-dir", "/nonexistent/artifacts"]);
        let err = config.placer(Stop::default()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/artifacts"), "{err}");
    }
}
