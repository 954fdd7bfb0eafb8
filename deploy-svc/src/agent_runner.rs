//! The deploy agent's loop: registers its target with deploy-svc, keeps a heartbeat,
//! follows its orders (WatchOrders), carries each out with [`crate::agent::Placer`] and
//! reports PLACING, then PLACED or FAILED with the reason. It reconnects with backoff
//! (100 ms doubling to 2 s). After a restart, what is on disk decides: the target's labels
//! carry `agent.current` (the version `current` points at, or `none`), and an order for a
//! version already current and complete is reported PLACED without fetching again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::deploy::v1 as pb;
use proto::deploy::v1::deploy_service_client::DeployServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::agent::{Order, Placer};

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
    /// Target labels, `KEY=VALUE` (repeatable).
    #[arg(long = "label", value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// Where versions go: `<root>/versions/...` and the `<root>/current` link.
    #[arg(long, env = "DEPLOY_AGENT_ROOT")]
    pub root: PathBuf,
    /// Heartbeat period in milliseconds.
    #[arg(long, env = "DEPLOY_AGENT_HEARTBEAT_MS", default_value_t = 2_000)]
    pub heartbeat_ms: u64,
    /// Command run (`sh -c`) in the new version's directory before switching.
    #[arg(long, env = "DEPLOY_AGENT_PRE_SWITCH")]
    pub pre_switch: Option<String>,
    /// Command run (`sh -c`) after switching; failure or timeout switches back.
    #[arg(long, env = "DEPLOY_AGENT_HEALTH_CHECK")]
    pub health_check: Option<String>,
    /// Health check timeout in milliseconds.
    #[arg(long, env = "DEPLOY_AGENT_HEALTH_TIMEOUT_MS", default_value_t = 10_000)]
    pub health_timeout_ms: u64,
    /// Version directories kept (current included).
    #[arg(long, env = "DEPLOY_AGENT_KEEP", default_value_t = 3)]
    pub keep: usize,
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

    fn placer(&self) -> Placer {
        Placer::new(&self.root, self.keep)
            .with_pre_switch(self.pre_switch.clone())
            .with_health_check(
                self.health_check.clone(),
                Duration::from_millis(self.health_timeout_ms),
            )
    }
}

fn request<T>(principal: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = principal.parse() {
        req.metadata_mut().insert("x-principal", v);
    }
    req
}

/// Runs the agent until `stop` is cancelled.
pub async fn run(config: AgentConfig, stop: CancellationToken) -> anyhow::Result<()> {
    let placer = Arc::new(config.placer());
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            r = session(&config, placer.clone(), &stop) => r,
        };
        match session {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "agent disconnected");
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One connection: register, heartbeat, follow orders until the stream ends.
async fn session(
    config: &AgentConfig,
    placer: Arc<Placer>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(config.server.clone())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let mut client = DeployServiceClient::new(channel);
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
    mut client: DeployServiceClient<Channel>,
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
        let beat = client
            .heartbeat_target(pb::HeartbeatTargetRequest {
                name: format!("environments/{environment}/targets/{target}"),
            })
            .await;
        if let Err(e) = beat {
            tracing::debug!(error = %e, "heartbeat failed");
        }
    }
}

async fn follow(
    config: &AgentConfig,
    client: &mut DeployServiceClient<Channel>,
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
        carry_out(config, client, placer.clone(), principal, order).await?;
    }
}

async fn report(
    config: &AgentConfig,
    client: &mut DeployServiceClient<Channel>,
    principal: &str,
    deployment: &str,
    state: pb::PlacementState,
    message: String,
) -> anyhow::Result<()> {
    client
        .report_placement(request(
            principal,
            pb::ReportPlacementRequest {
                deployment: deployment.to_owned(),
                target: config.target_name(),
                state: state.into(),
                message,
            },
        ))
        .await?;
    Ok(())
}

async fn carry_out(
    config: &AgentConfig,
    client: &mut DeployServiceClient<Channel>,
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
        format!("placing {}@{}", order.artifact, order.version),
    )
    .await?;
    let job = Order {
        artifact: order.artifact.clone(),
        version: order.version.clone(),
        digest: order.digest.clone(),
        source_uri: order.source_uri.clone(),
    };
    let outcome = tokio::task::spawn_blocking(move || placer.place(&job)).await?;
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
    report(config, client, principal, &order.deployment, state, message).await
}
