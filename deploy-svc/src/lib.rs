//! deploy-svc: Deployment Management. Environments with promotion paths and a change
//! calendar (freeze windows, overridden only by an approved emergency override), targets
//! with heartbeats, immutable artifact versions, deployments whose state derives from
//! per-target placements, the placement event stream that release-svc follows, and an
//! append-only audit trail of every change.
//!
//! # Layout
//!
//! - [`config`]: command-line flags and environment variables.
//! - [`domain`]: resources, validation, the deployment state machine, the promotion rule,
//!   freeze windows, audit records.
//! - [`app`]: the use cases, one module per resource, each a transaction written once as
//!   SQL over the store's `Db`: transactional outbox, each change's audit record in the
//!   change's transaction, the orders signal rung on commit.
//! - [`store`]: the storage trait and two backends: SQLite (the embedded default, group
//!   commit) and PostgreSQL (several replicas on one database); migrations per backend.
//! - [`placement_log`]: the in-memory tail of the event log and WatchPlacements watchers
//!   (on PostgreSQL fed by a tailer that follows the other replicas' commits).
//! - [`grpc`]: the `deploy.v1.DeployService` handlers, conversions and status mapping
//!   (including WatchOrders, the agents' order stream).
//! - [`telemetry`]: deploy-svc's own Prometheus metrics (names and HELP text).
//! - [`Server`] / [`serve`]: opens the store, starts the background work, then serves an
//!   already-bound listener until a shutdown future resolves, and drains.

pub mod app;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod placement_log;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::deploy::v1::deploy_service_server::DeployServiceServer;
use service_kit::background::Background;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
use domain::clock::{Clock, SystemClock};
use grpc::DeployApi;
use store::postgres::PostgresStore;
use store::sqlite::SqliteStore;

/// The gRPC service name, as health checks know it.
pub const SERVICE_NAME: &str = "deploy.v1.DeployService";

/// Serves deploy-svc on `listener` until `shutdown` resolves, then drains and closes the
/// store.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Server::open(config, Arc::new(SystemClock))?
        .run(listener, shutdown)
        .await
}

/// deploy-svc with its store open, ready to serve.
pub struct Server {
    config: Config,
    clock: Arc<dyn Clock>,
    store: Arc<dyn store::Store>,
    feed: Arc<placement_log::Feed>,
}

impl Server {
    /// Opens (creating and migrating) the store, with an injected clock.
    /// A `postgres://` database opens the PostgreSQL backend, which starts background tasks:
    /// call it inside a Tokio runtime.
    pub fn open(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let (store, feed): (Arc<dyn store::Store>, _) = match config.postgres_url() {
            Some(url) => {
                let (store, feed) =
                    PostgresStore::open(config.postgres_options(url), clock.clone())?;
                (Arc::new(store), feed)
            }
            None => {
                let (store, feed) = SqliteStore::open(config.sqlite_options(), clock.clone())?;
                (Arc::new(store), feed)
            }
        };
        Ok(Self {
            config,
            clock,
            store,
            feed,
        })
    }

    /// Serves on `listener` until `shutdown` resolves, then drains and closes the store.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Self {
            config,
            clock,
            store,
            feed,
        } = self;
        let serving = config
            .server
            .serving("deploy-svc", &[listener.local_addr()?])?;
        let streams = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (mut background, writable) = start_background(&config, &store, &feed, &streams).await?;
        let api = DeployApi::new(
            store.clone(),
            feed,
            clock,
            config.health_windows(),
            config.watch_limits(),
            streams.clone(),
            tasks.clone(),
        );

        let (health, health_service) = service_kit::health::reporter(streams.clone());
        health.set_serving::<DeployServiceServer<DeployApi>>().await;
        // A store that can no longer write takes the replica out of service.
        background.spawn_abortable(service_kit::health::follow_store(
            writable,
            health.clone(),
            vec![SERVICE_NAME],
            streams.clone(),
        ));
        if let Some(addr) = config.server.health_listen {
            let probes =
                service_kit::serve_health(addr, health_service.clone(), streams.clone()).await?;
            background.abort_on_drain(&probes);
        }
        let routes = tonic::service::Routes::new(health_service)
            .add_service(grpc::watch::WatchRoute::new(api, config.max_message_bytes));
        let routes = service_kit::reflection(routes, &[SERVICE_NAME])?;
        tracing::info!(address = %listener.local_addr()?, database = %database(&config), "deploy-svc serving");
        let result = service_kit::serve_gracefully(
            listener,
            routes,
            health,
            &[SERVICE_NAME],
            streams.clone(),
            service_kit::Drain {
                timeout: Duration::from_millis(config.drain_timeout_ms),
            },
            &serving,
            shutdown,
        )
        .await;
        shut_down(background, tasks, store.as_ref()).await;
        result
    }
}

/// Starts the metrics endpoint (with the log head already on it) and deploy-svc's
/// background work (see [`spawn_background`]), all of it stopped by `streams` or by the
/// returned [`Background`]'s drain; also returns whether the store can write.
async fn start_background(
    config: &Config,
    store: &Arc<dyn store::Store>,
    feed: &placement_log::Feed,
    streams: &CancellationToken,
) -> anyhow::Result<(Background, tokio::sync::watch::Receiver<bool>)> {
    let metrics_server = service_kit::telemetry::serve_metrics(
        &config.server.metrics,
        telemetry::describe,
        streams.clone(),
    )
    .await?;
    metrics::gauge!(telemetry::LOG_HEAD).set(feed.head() as f64);
    let mut background = Background::new(streams.clone());
    let writable = spawn_background(&mut background, store, config);
    if let Some(metrics_server) = &metrics_server {
        background.abort_on_drain(metrics_server);
    }
    Ok((background, writable))
}

/// The database as the log shows it (a PostgreSQL URL without its secrets).
fn database(config: &Config) -> String {
    match config.postgres_url() {
        Some(url) => service_kit::redact::url(&url),
        None => config.database.display().to_string(),
    }
}

/// After serving: drains the background work, gives the watch tasks a moment to end and
/// closes the store.
async fn shut_down(background: Background, tasks: TaskTracker, store: &dyn store::Store) {
    background.drain().await;
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(2), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("watch tasks still running at exit");
    }
    store.close().await;
    tracing::info!("deploy-svc stopped");
}

/// Starts deploy-svc's background work on `background` (aborted by its drain): the periodic
/// pass (lost agents, baked canaries, automatic rollbacks) and, with a database shared by
/// replicas, the relay of their commits to the orders signal. Returns whether the store can
/// write, as the periodic pass finds it (each pass is a write transaction: a dead SQLite
/// writer or an unreachable PostgreSQL shows there), for health to follow, both ways.
fn spawn_background(
    background: &mut Background,
    store: &Arc<dyn store::Store>,
    config: &Config,
) -> tokio::sync::watch::Receiver<bool> {
    let stop = background.stop();
    // Other replicas' writes may order our agents' targets.
    if let Some(bell) = store.remote_changes() {
        let (store, stop) = (store.clone(), stop.clone());
        background.spawn_abortable(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = bell.notified() => store.remote_orders_changed(),
                }
            }
        });
    }
    let (writable_tx, writable) = tokio::sync::watch::channel(true);
    let store = store.clone();
    let alive = store.writer_alive();
    let (interval, timeout) = (
        Duration::from_millis(config.tick_interval_ms.max(10)),
        i64::try_from(config.agent_timeout_ms).unwrap_or(i64::MAX),
    );
    background.spawn_abortable(service_kit::background::every(interval, stop, move || {
        let (store, alive, writable_tx) = (store.clone(), alive.clone(), writable_tx.clone());
        async move {
            let wrote = match store.tick(timeout).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "periodic deployment work failed; retrying");
                    false
                }
            };
            let writable = wrote && *alive.borrow();
            writable_tx.send_if_modified(|w| std::mem::replace(w, writable) != writable);
        }
    }));
    writable
}
