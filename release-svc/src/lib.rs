//! release-svc: Release Management. Features and releases, visibility decisions from an
//! immutable in-memory snapshot, gated on deploy-svc's real placements, which a consumer
//! follows over WatchPlacements.
//!
//! # Layout
//!
//! - [`config`]: command-line flags and environment variables.
//! - [`domain`]: features, releases, rules, hashing, the coverage gate, the evaluator.
//! - [`store`]: the storage trait and its backends: SQLite (the embedded default) and
//!   PostgreSQL (several replicas on one database, one of them applying placements).
//! - [`engine`]: the state, its durable writes, the snapshot swap and change announcements.
//! - [`consumer`]: follows deploy-svc's placement stream into the engine.
//! - [`calendar_client`]: deploy-svc's change calendar (freeze windows), read for policy
//!   checks.
//! - [`grpc`]: the `release.v1.ReleaseService` handlers and conversions, and flagd's
//!   evaluation protocol (v1 and v2) for OpenFeature providers.
//! - [`telemetry`]: release-svc's own Prometheus metrics (names, labels, HELP text).
//! - [`cli`]: the `import-flagd` and `export-flagd` subcommands of the binary.
//! - [`Server`] / [`serve`]: opens the store, then serves an already-bound listener.

pub mod calendar_client;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod domain;
pub mod engine;
pub mod grpc;
pub mod ofrep;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::flagd::evaluation::v1::service_server::ServiceServer as FlagdV1Server;
use proto::flagd::evaluation::v2::service_server::ServiceServer as FlagdV2Server;
use proto::flagd::sync::v1::flag_sync_service_server::FlagSyncServiceServer;
use proto::release::v1::release_service_server::ReleaseServiceServer;
use service_kit::background::Background;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use engine::Engine;
use grpc::decode::DecodeErrors;
use grpc::ReleaseApi;
use store::sqlite::SqliteStore;

/// The gRPC service name, as health checks know it.
pub const SERVICE_NAME: &str = "release.v1.ReleaseService";

/// The services also served over the Connect protocol, for browsers.
pub const CONNECT_SERVICES: [&str; 2] =
    ["flagd.evaluation.v1.Service", "flagd.evaluation.v2.Service"];

/// Serves release-svc on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Server::open(config).await?.run(listener, shutdown).await
}

/// [`serve`] on the time of `clock` (tests run schedules on a simulated clock).
pub async fn serve_with_clock(
    listener: TcpListener,
    config: Config,
    clock: Arc<dyn engine::Clock>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Server::open_with_clock(config, clock)
        .await?
        .run(listener, shutdown)
        .await
}

/// release-svc with its state loaded, ready to serve.
pub struct Server {
    config: Config,
    engine: Arc<Engine>,
}

impl Server {
    /// Opens the store and loads the state (serving starts from it, before deploy-svc is
    /// reachable).
    pub async fn open(config: Config) -> anyhow::Result<Self> {
        Self::open_with_clock(config, Arc::new(engine::SystemClock)).await
    }

    /// [`Server::open`] on the time of `clock`.
    pub async fn open_with_clock(
        config: Config,
        clock: Arc<dyn engine::Clock>,
    ) -> anyhow::Result<Self> {
        let database = config.database.to_string_lossy().into_owned();
        let store: Arc<dyn store::Store> =
            if database.starts_with("postgres://") || database.starts_with("postgresql://") {
                store::postgres::PostgresStore::open(&database, None).await?
            } else {
                Arc::new(SqliteStore::open(&config.database)?)
            };
        let calendar: Arc<dyn engine::Calendar> = match config.change_calendar {
            config::CalendarSource::DeploySvc => Arc::new(calendar_client::DeployCalendar::new(
                config.deploy_svc.clone(),
                config.deploy_svc_security(),
            )),
            config::CalendarSource::None => Arc::new(calendar_client::NoCalendar),
        };
        let engine =
            Arc::new(Engine::load(store, config.fractional_bucketing, clock, calendar).await?);
        Ok(Self { config, engine })
    }

    /// Serves until `shutdown`, following deploy-svc meanwhile.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        self.run_with_flagd_port(listener, None, shutdown).await
    }

    /// [`Server::run`], also serving the flagd protocols (and health, reflection) on a
    /// dedicated listener, as flagd does on 8013.
    pub async fn run_with_flagd_port(
        self,
        listener: TcpListener,
        flagd_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        self.run_with_ports(listener, flagd_listener, None, shutdown)
            .await
    }

    /// [`Server::run_with_flagd_port`], also serving OFREP (HTTP and JSON, see [`ofrep`]) on
    /// `ofrep_listener`.
    pub async fn run_with_ports(
        self,
        listener: TcpListener,
        flagd_listener: Option<TcpListener>,
        ofrep_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Self { config, engine } = self;
        let cors = service_kit::cors::Origins::new(config.cors_origins.clone(), "--cors-origin");
        let others = [flagd_listener.as_ref(), ofrep_listener.as_ref()];
        let serving = serving(&config, &listener, others, &cors)?;
        let streams = CancellationToken::new();
        let Started {
            routes,
            health,
            flagd,
            background,
        } = start(&config, engine, &streams).await?;
        let drain = service_kit::Drain {
            timeout: Duration::from_millis(config.drain_timeout_ms),
        };
        // One shutdown signal stops every listener.
        let stop = CancellationToken::new();
        let ofrep_task = match ofrep_listener {
            Some(l) => {
                let ofrep =
                    ofrep::Ofrep::new(flagd.flagd.clone(), &serving, config.max_message_bytes)
                        .with_cors_origins(cors);
                Some(serve_ofrep(l, ofrep, &serving, &stop)?)
            }
            None => None,
        };
        let second = match flagd_listener {
            Some(l) => {
                let port = FlagdPort {
                    streams: streams.clone(),
                    drain,
                    serving: serving.clone(),
                    stop: stop.clone(),
                };
                Some(port.serve(l, &flagd).await?)
            }
            None => None,
        };
        tracing::info!(
            address = %listener.local_addr()?,
            database = %service_kit::redact::url(&config.database.to_string_lossy()),
            deploy_svc = %service_kit::redact::url(&config.deploy_svc),
            "release-svc serving"
        );
        let stopper = stop.clone();
        let result = service_kit::serve_gracefully(
            listener,
            routes,
            health,
            &service_names(),
            streams.clone(),
            drain,
            &serving,
            async move {
                shutdown.await;
                stopper.cancel();
            },
        )
        .await;
        stop.cancel();
        join_listener(ofrep_task, "OFREP").await;
        join_listener(second, "flagd").await;
        background.drain().await;
        tracing::info!("release-svc stopped");
        result
    }
}

/// How every listener serves (TLS, authentication, limits), judged from all their
/// addresses; browsers (the flagd web provider) speak Connect to the flagd evaluation
/// services, on every gRPC listener.
fn serving(
    config: &Config,
    listener: &TcpListener,
    others: [Option<&TcpListener>; 2],
    cors: &service_kit::cors::Origins,
) -> anyhow::Result<service_kit::Serving> {
    let mut addresses = vec![listener.local_addr()?];
    for l in others.into_iter().flatten() {
        addresses.push(l.local_addr()?);
    }
    Ok(config
        .server
        .serving("release-svc", &addresses)?
        .with_connect(service_kit::connect::Connect::new(
            &CONNECT_SERVICES,
            config.max_message_bytes,
            cors.clone(),
        )?))
}

/// The main listener's routes and health, the flagd services (for their own port and
/// OFREP) and the background work, once started.
struct Started {
    routes: tonic::service::Routes,
    health: tonic_health::server::HealthReporter,
    flagd: FlagdServices,
    background: Background,
}

/// Starts the metrics endpoint, the health probes and the background work, and builds the
/// services of the main listener, marked SERVING.
async fn start(
    config: &Config,
    engine: Arc<Engine>,
    streams: &CancellationToken,
) -> anyhow::Result<Started> {
    let metrics_server = service_kit::telemetry::serve_metrics(
        &config.server.metrics,
        telemetry::describe,
        streams.clone(),
    )
    .await?;
    let (health, health_service) = service_kit::health::reporter(streams.clone());
    // Lost until the consumer has opened deploy-svc's stream.
    consumer::report_feed(&health, false).await;
    let status = consumer::SharedStatus::default();
    let mut background = spawn_background(&engine, config, &status, &health, streams).await;
    // One cap for every change stream (WatchVisibility, flagd EventStream v1 and v2),
    // on every listener.
    let change_streams =
        service_kit::streams::StreamCap::new(config.max_watchers, "change streams");
    let flagd = FlagdServices::new(&engine, config, streams, &change_streams);
    let store_alive = engine.store().writer_alive();
    let api = ReleaseApi::new(engine, status, config.deploy_svc.clone(), streams.clone())
        .with_max_response_bytes(config.max_message_bytes)
        .with_stream_cap(change_streams);
    health
        .set_serving::<ReleaseServiceServer<ReleaseApi>>()
        .await;
    flagd.set_serving(&health).await;
    if let Some(metrics_server) = &metrics_server {
        background.abort_on_drain(metrics_server);
    }
    // Probes, and a store that can no longer write takes the replica out of service.
    if let Some(addr) = config.server.health_listen {
        let probes =
            service_kit::serve_health(addr, health_service.clone(), streams.clone()).await?;
        background.abort_on_drain(&probes);
    }
    background.spawn_abortable(service_kit::health::follow_store(
        store_alive,
        health.clone(),
        service_names(),
        streams.clone(),
    ));
    let routes = tonic::service::Routes::new(health_service).add_service(DecodeErrors(
        ReleaseServiceServer::new(api)
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes),
    ));
    Ok(Started {
        routes: service_kit::reflection(flagd.routes(routes), &service_names())?,
        health,
        flagd,
        background,
    })
}

/// Every service of the main listener: release-svc's own and the flagd protocols'.
fn service_names() -> Vec<&'static str> {
    let mut names = vec![SERVICE_NAME];
    names.extend_from_slice(&FLAGD_SERVICES);
    names
}

/// The flagd protocols' services: evaluation v1 and v2 and flag sync.
const FLAGD_SERVICES: [&str; 3] = [
    "flagd.evaluation.v1.Service",
    "flagd.evaluation.v2.Service",
    "flagd.sync.v1.FlagSyncService",
];

/// The flagd evaluation services and flag sync, served on the main listener and, when
/// asked, on a port of their own.
struct FlagdServices {
    flagd: grpc::flagd::Flagd,
    sync: grpc::flagd_sync::FlagSync,
}

impl FlagdServices {
    fn new(
        engine: &Arc<Engine>,
        config: &Config,
        streams: &CancellationToken,
        change_streams: &service_kit::streams::StreamCap,
    ) -> Self {
        let options = grpc::flagd::FlagdOptions {
            default_environment: config.flagd_default_environment.clone(),
            keep_alive: Duration::from_secs(config.flagd_keep_alive_seconds.max(1)),
            environment_attribute: config.flagd_environment_attribute.clone(),
            source_aliases: config.flagd_source_aliases.iter().cloned().collect(),
            static_context: config
                .flagd_context
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
            max_response_bytes: config.max_message_bytes,
        };
        let flagd = grpc::flagd::Flagd::new(engine.clone(), options, streams.clone())
            .with_stream_cap(change_streams.clone());
        let sync = grpc::flagd_sync::FlagSync::new(
            flagd.clone(),
            service_kit::streams::StreamCap::new(config.max_sync_streams, "sync streams"),
        );
        Self { flagd, sync }
    }

    fn routes(&self, routes: tonic::service::Routes) -> tonic::service::Routes {
        routes
            .add_service(DecodeErrors(FlagdV1Server::new(self.flagd.clone())))
            .add_service(DecodeErrors(FlagdV2Server::new(self.flagd.clone())))
            .add_service(DecodeErrors(FlagSyncServiceServer::new(self.sync.clone())))
    }

    async fn set_serving(&self, health: &tonic_health::server::HealthReporter) {
        health
            .set_serving::<FlagdV1Server<grpc::flagd::Flagd>>()
            .await;
        health
            .set_serving::<FlagdV2Server<grpc::flagd::Flagd>>()
            .await;
        health
            .set_serving::<FlagSyncServiceServer<grpc::flagd_sync::FlagSync>>()
            .await;
    }
}

/// The flagd protocols on a port of their own (`--flagd-listen`), with their own health
/// service, stopped with the main listener.
struct FlagdPort {
    streams: CancellationToken,
    drain: service_kit::Drain,
    serving: service_kit::Serving,
    stop: CancellationToken,
}

impl FlagdPort {
    async fn serve(
        self,
        listener: TcpListener,
        flagd: &FlagdServices,
    ) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
        let (health, health_service) = service_kit::health::reporter(self.streams.clone());
        flagd.set_serving(&health).await;
        let routes = service_kit::reflection(
            flagd.routes(tonic::service::Routes::new(health_service)),
            &FLAGD_SERVICES,
        )?;
        tracing::info!(address = %listener.local_addr()?, "flagd protocols serving on their own port");
        Ok(tokio::spawn(async move {
            service_kit::serve_gracefully(
                listener,
                routes,
                health,
                &FLAGD_SERVICES,
                self.streams,
                self.drain,
                &self.serving,
                self.stop.cancelled_owned(),
            )
            .await
        }))
    }
}

/// OFREP on `listener` until `stop`.
fn serve_ofrep(
    listener: TcpListener,
    ofrep: ofrep::Ofrep,
    serving: &service_kit::Serving,
    stop: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    tracing::info!(address = %listener.local_addr()?, "OFREP serving");
    let (ofrep, serving, stop) = (Arc::new(ofrep), serving.clone(), stop.clone());
    Ok(tokio::spawn(async move {
        ofrep::serve(listener, ofrep, &serving, stop).await
    }))
}

/// Waits for a listener's task, logging how it failed.
async fn join_listener(task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>, what: &str) {
    let Some(task) = task else { return };
    match task.await {
        Ok(Err(e)) => tracing::error!(error = %e, listener = what, "listener failed"),
        Err(e) => tracing::error!(error = %e, listener = what, "listener task failed"),
        Ok(Ok(())) => {}
    }
}

/// Starts release-svc's background work, stopped by one [`Background::drain`]: the refresher
/// (replicas sharing a database follow each other's commits), the placement applier (the
/// deploy-svc consumer, on the replica holding the applier lease), the release scheduler
/// and the usage flusher. Each watches `streams`.
async fn spawn_background(
    engine: &Arc<Engine>,
    config: &Config,
    status: &consumer::SharedStatus,
    health: &tonic_health::server::HealthReporter,
    streams: &CancellationToken,
) -> Background {
    let mut background = Background::new(streams.clone());
    // Replicas sharing the database reload when another one commits.
    let changes = engine.store().changes().await;
    let shared = changes.is_some();
    if let Some(changes) = changes {
        background.spawn(
            "refresher",
            refresher(engine.clone(), changes, streams.clone()),
        );
    }
    background.spawn(
        "placement applier",
        applier(
            engine.clone(),
            config,
            status.clone(),
            health.clone(),
            shared,
            streams.clone(),
        ),
    );
    background.spawn(
        "scheduler",
        scheduler(
            engine.clone(),
            status.clone(),
            Duration::from_millis(config.scheduler_interval_ms.max(1)),
            streams.clone(),
        ),
    );
    background.spawn(
        "usage flusher",
        usage_flusher(
            engine.clone(),
            Duration::from_secs(config.usage_flush_interval_seconds.max(1)),
            streams.clone(),
        ),
    );
    background
}

/// Follows the commits of the replicas sharing the database: the placements they committed
/// (read incrementally), else everything (reloaded), until `stop`.
async fn refresher(engine: Arc<Engine>, mut changes: store::Changes, stop: CancellationToken) {
    loop {
        let changed = tokio::select! {
            () = stop.cancelled() => return,
            got = changes.recv() => match got {
                Some(changed) => changed,
                None => return,
            },
        };
        let caught_up = changed == store::Changed::Placements
            && match engine.catch_up_placements().await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "reading placements after a change failed; reloading everything");
                    false
                }
            };
        let kind = if caught_up {
            "placements"
        } else {
            "everything"
        };
        metrics::counter!(telemetry::REPLICA_REFRESHES, "kind" => kind).increment(1);
        if !caught_up {
            if let Err(e) = engine.reload().await {
                tracing::warn!(error = %e, "reload after a change failed");
            }
        }
    }
}

/// One applier of placement events at a time across replicas: the deploy-svc consumer runs
/// while this process holds the store's applier lease, until `stop`.
fn applier(
    engine: Arc<Engine>,
    config: &Config,
    status: consumer::SharedStatus,
    health: tonic_health::server::HealthReporter,
    shared: bool,
    stop: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let (url, security) = (config.deploy_svc.clone(), config.deploy_svc_security());
    async move {
        while !stop.is_cancelled() {
            let lease = match engine.store().applier_lease(&stop).await {
                Ok(lease) => lease,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take the applier lease; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if stop.is_cancelled() {
                break;
            }
            consumer::set_active(&status, true);
            tracing::info!("placement applier: this replica applies deploy-svc's events");
            // A new applier starts from what the last one committed.
            if shared {
                if let Err(e) = engine.reload().await {
                    tracing::warn!(error = %e, "reload before applying failed");
                }
            }
            consumer::run(
                engine.clone(),
                url.clone(),
                security.clone(),
                status.clone(),
                health.clone(),
                lease.clone(),
            )
            .await;
            consumer::set_active(&status, false);
            lease.cancel();
        }
    }
}

/// Flushes evaluation usage every `interval`, and once more at shutdown (after the
/// listeners drained: the last evaluations are in it). A failed flush keeps its counts for
/// the next one.
async fn usage_flusher(engine: Arc<Engine>, interval: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        let last = tokio::select! {
            () = stop.cancelled() => true,
            _ = ticks.tick() => false,
        };
        if let Err(e) = engine.flush_usage().await {
            tracing::warn!(error = %e, "evaluation usage not flushed; its counts go with the next flush");
        }
        if last {
            return;
        }
    }
}

/// Advances planned releases: one engine pass every `interval` until `stop`, on the replica
/// that applies placement events only (the others reload what it commits).
async fn scheduler(
    engine: Arc<Engine>,
    status: consumer::SharedStatus,
    interval: Duration,
    stop: CancellationToken,
) {
    service_kit::background::every(interval, stop, || async {
        if !status.lock().unwrap_or_else(|p| p.into_inner()).active {
            return;
        }
        match engine.tick().await {
            Ok(advanced) => {
                for id in advanced {
                    tracing::info!(release = %format!("releases/{id}"), "release advanced by its plan");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "scheduler pass failed; retrying at the next tick")
            }
        }
    })
    .await;
}
