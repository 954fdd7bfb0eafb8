//! Plumbing shared by deploy-svc and release-svc: logging, signals, reflection, TLS,
//! authentication and authorization, request limits and a graceful serve loop. Domain
//! logic never goes here.
//!
//! # Layout
//!
//! - [`LogArgs`] / [`init_tracing`]: human or JSON logs, filtered by `RUST_LOG`, and the
//!   trace exporter.
//! - [`otel`]: OpenTelemetry traces over OTLP, W3C `traceparent` in and out.
//! - [`shutdown_signal`]: resolves on SIGINT or SIGTERM.
//! - [`reflection()`]: gRPC reflection v1 and v1alpha over the contracts a server serves,
//!   with comments.
//! - [`serve_gracefully`]: runs a tonic router until shutdown (TLS, the [`auth`] layer,
//!   connection, stream, in-flight and deadline limits), then marks health NOT_SERVING,
//!   ends open streams, drains in-flight calls with a hard timeout.
//! - [`ServerArgs`]: the listener's security and limits, flattened into each service's
//!   command line.
//! - [`tls`]: TLS and mutual TLS on listeners, certificates reloaded when they change.
//! - [`auth`]: who calls (mTLS, JWT, static tokens) and the one table of what each RPC
//!   needs.
//! - [`backoff`]: jittered exponential reconnect delays.
//! - [`connect`]: the Connect protocol (JSON or protobuf, HTTP/1.1 or HTTP/2) beside gRPC
//!   for chosen services, translated to gRPC calls; 415 for other content types.
//! - [`cors`]: the page origins allowed to call an HTTP face cross-origin.
//! - [`deadline`]: per-call deadlines (`grpc-timeout`, `--rpc-timeout-ms`); expired calls
//!   are DEADLINE_EXCEEDED.
//! - [`client`]: outbound gRPC channels with TLS, client certificates and bearer tokens.
//! - [`reload`]: values that follow their file (policies, token files, JWKS).
//! - [`redact`]: secrets out of URLs before they are logged or returned.
//! - `pg` (feature `postgres`): TLS for PostgreSQL connections, by `sslmode`.
//! - [`health`]: health that follows the store (NOT_SERVING once it cannot write).
//! - [`error`]: the request error type (field and precondition violations), no tonic types.
//! - [`status`]: the one exhaustive `From<Error> for Status`, with rich error details.
//! - [`streams`]: a cap on open server streams (RESOURCE_EXHAUSTED past it).
//! - [`telemetry`]: Prometheus metrics on their own plain-HTTP port (`--metrics-listen`).
//! - [`audit`]: the audit record both services keep (who, what, which resource, why).
//! - [`admission`]: refuses at once a call that the calls in flight would keep past half
//!   of its deadline (`--deadline-admission`).
//! - [`access`]: the layer that writes one access-log line per call and the per-RPC
//!   metrics (counts by status code, latency, open streams).
//! - [`time`]: milliseconds, the injectable clock, SQL integer conversions and the
//!   registry of PostgreSQL advisory-lock keys.
//! - [`validate`]: limits and checks every API shares (text, keys, pages, page tokens).
//! - [`principal()`]: who is calling with authentication off (the `x-principal` metadata).

pub mod access;
pub mod admission;
pub mod audit;
pub mod auth;
pub mod background;
pub mod backoff;
pub mod client;
pub mod connect;
pub mod cors;
pub mod deadline;
pub mod error;
pub mod health;
pub mod otel;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod principal;
pub mod redact;
pub mod reload;
pub mod status;
pub mod streams;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod validate;

use std::future::Future;
use std::time::Duration;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::server::HealthReporter;

pub use principal::principal;

/// Logging and trace export options, flattened into each program's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long = "log-format", env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
    /// Traces (OpenTelemetry over OTLP).
    #[command(flatten)]
    pub otel: otel::OtelArgs,
}

/// Installs the global tracing subscriber (stderr; level from `RUST_LOG`, default info) and,
/// with `--otlp-endpoint`, the span exporter (see [`otel`]); `program` is the exported
/// `service.name`. Call it inside a Tokio runtime, and flush the returned exporter with
/// [`otel::Tracing::shutdown`] before exiting.
pub fn init_tracing(args: &LogArgs, program: &'static str) -> anyhow::Result<otel::Tracing> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    // Static filters only (per-callsite decisions, a level hint): a filter without a hint
    // would let every `trace!` and `log` record of the dependencies through to be judged
    // one by one on the call path.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Exported spans stay out of the log lines.
    let logged = filter.add_directive(format!("{}=off", otel::TARGET).parse()?);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if args.format == "json" {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let (tracing, tracer) = match otel::tracer(&args.otel, program)? {
        Some((tracing, tracer)) => (tracing, Some(tracer)),
        None => (otel::Tracing::default(), None),
    };
    let exported = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(otel::TARGET, tracing::Level::INFO),
            )
    });
    if let Err(e) = tracing_subscriber::registry()
        .with(fmt.with_filter(logged))
        .with(exported)
        .try_init()
    {
        tracing::debug!(error = %e, "tracing already initialised");
    }
    if let Some(endpoint) = &args.otel.otlp_endpoint {
        if otel::enabled() {
            tracing::info!(endpoint = %redact::url(endpoint), "exporting traces over OTLP");
        }
    }
    Ok(tracing)
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

/// The reflection services (v1 and v1alpha: grpcurl 1.8 speaks only v1alpha) for a server
/// that serves `services` (full names, such as `deploy.v1.DeployService`): `list` shows
/// those, health and reflection, and `describe` knows only their files and what they
/// import, never the other service's API.
pub fn reflection(routes: Routes, services: &[&str]) -> anyhow::Result<Routes> {
    let set = descriptors_for(services)?;
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_file_descriptor_set(set.clone())
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for name in services {
            b = b.with_service_name(*name);
        }
        b
    };
    let v1 = builder().build_v1()?;
    let v1alpha = builder().build_v1alpha()?;
    Ok(routes.add_service(v1).add_service(v1alpha))
}

/// The files of the contracts that define `services`, with everything they import, and the
/// `google.rpc` error details every service may send (so that grpcurl decodes them); with
/// their comments: `describe` shows them.
fn descriptors_for(services: &[&str]) -> anyhow::Result<prost_types::FileDescriptorSet> {
    use prost::Message;
    let all = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET)?;
    let by_name: std::collections::HashMap<&str, &prost_types::FileDescriptorProto> =
        all.file.iter().map(|f| (f.name(), f)).collect();
    let mut wanted: Vec<&str> = all
        .file
        .iter()
        .filter(|f| f.package() == "google.rpc")
        .map(|f| f.name())
        .collect();
    for service in services {
        let file = all
            .file
            .iter()
            .find(|f| {
                f.service
                    .iter()
                    .any(|s| format!("{}.{}", f.package(), s.name()) == *service)
            })
            .ok_or_else(|| anyhow::anyhow!("no contract defines the service {service}"))?;
        wanted.push(file.name());
    }
    let mut keep = std::collections::BTreeSet::new();
    while let Some(name) = wanted.pop() {
        if keep.insert(name) {
            if let Some(file) = by_name.get(name) {
                wanted.extend(file.dependency.iter().map(String::as_str));
            }
        }
    }
    Ok(prost_types::FileDescriptorSet {
        file: all
            .file
            .iter()
            .filter(|f| keep.contains(f.name()))
            .cloned()
            .collect(),
    })
}

/// How the server drains.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// The longest the server waits for in-flight calls after shutdown begins.
    pub timeout: Duration,
}

/// Limits every listener applies, flattened into each service's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Open connections at most; more clients wait in the kernel's accept queue.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Concurrent streams (calls) per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "MAX_STREAMS_PER_CONNECTION", default_value_t = 256)]
    pub max_streams_per_connection: u32,
    /// Calls being handled at once across all connections (a stream counts until its
    /// first message); beyond it, calls are refused at once with RESOURCE_EXHAUSTED instead
    /// of queueing.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 2048)]
    pub max_in_flight: usize,
    /// Longest a unary call may take, in milliseconds (a shorter `grpc-timeout` wins);
    /// past it the call is answered DEADLINE_EXCEEDED.
    #[arg(long, env = "RPC_TIMEOUT_MS", default_value_t = 30_000)]
    pub rpc_timeout_ms: u64,
    /// Also refuse a call at once (RESOURCE_EXHAUSTED) when the calls in flight, at the rate
    /// calls complete now, would keep it past half of its deadline (see
    /// `service_kit::admission`); `false` leaves only the `--max-in-flight` count.
    #[arg(long, env = "DEADLINE_ADMISSION", default_value_t = true, action = clap::ArgAction::Set)]
    pub deadline_admission: bool,
}

impl Default for LimitArgs {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_streams_per_connection: 256,
            max_in_flight: 2048,
            rpc_timeout_ms: 30_000,
            deadline_admission: true,
        }
    }
}

/// A listener's security and limits, flattened into each service's command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// TLS.
    #[command(flatten)]
    pub tls: tls::TlsArgs,
    /// Authentication and authorization.
    #[command(flatten)]
    pub auth: auth::AuthArgs,
    /// Limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Also serve grpc.health.v1 alone, in plaintext and without credentials, on this
    /// address: for Kubernetes gRPC probes, which speak neither TLS nor tokens.
    #[arg(long, env = "HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Prometheus metrics.
    #[command(flatten)]
    pub metrics: telemetry::MetricsArgs,
    /// On SIGTERM, how long to keep serving (health already NOT_SERVING) before draining,
    /// in milliseconds: time for load balancers and Kubernetes endpoints to stop sending
    /// new calls.
    #[arg(long, env = "SHUTDOWN_DELAY_MS", default_value_t = 0)]
    pub shutdown_delay_ms: u64,
}

/// Serves only `health` (plaintext, no credentials: health is public) on `addr` until
/// `stop` is cancelled.
pub async fn serve_health(
    addr: SocketAddr,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(address = %listener.local_addr()?, "health probes served in plaintext");
    Ok(tokio::spawn(async move {
        // Anyone who reaches this port may call it: few connections, few streams each.
        let incoming = tls::incoming(
            listener,
            None,
            tls::AcceptLimits {
                max_connections: 64,
                handshake_timeout: Duration::from_secs(10),
            },
            stop.clone(),
        );
        if let Err(e) = tonic::transport::Server::builder()
            .max_concurrent_streams(16)
            .concurrency_limit_per_connection(16)
            .timeout(Duration::from_secs(10))
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::warn!(error = %e, "health listener failed");
        }
    }))
}

impl ServerArgs {
    /// Loads certificates, keys, token files and the policy for a service listening on
    /// every address of `listen`; refuses insecure combinations (see
    /// [`auth::Auth::from_args`]).
    pub fn serving(&self, service: &'static str, listen: &[SocketAddr]) -> anyhow::Result<Serving> {
        let tls = self.tls.server()?;
        let mutual = tls.as_ref().is_some_and(|t| t.mutual());
        // The least trusted address decides.
        let address = listen
            .iter()
            .copied()
            .find(|a| !a.ip().is_loopback())
            .or_else(|| listen.first().copied())
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let auth = auth::Auth::from_args(service, &self.auth, address, mutual)?;
        if tls.is_none() && auth.enabled() {
            tracing::warn!(
                "authentication is on without TLS: credentials cross the network in plaintext"
            );
        }
        Ok(Serving {
            tls,
            auth,
            limits: self.limits.clone(),
            shutdown_delay: Duration::from_millis(self.shutdown_delay_ms),
            connect: None,
        })
    }
}

/// What [`serve_gracefully`] enforces.
#[derive(Debug, Clone)]
pub struct Serving {
    /// TLS, when on.
    pub tls: Option<Arc<tls::ServerTls>>,
    /// Authentication and authorization.
    pub auth: Arc<auth::Auth>,
    /// Limits.
    pub limits: LimitArgs,
    /// How long to keep serving after shutdown begins, health NOT_SERVING, before draining.
    pub shutdown_delay: Duration,
    /// Services also served over Connect (HTTP/1.1 is then accepted too); `None`: gRPC only.
    pub connect: Option<Arc<connect::Connect>>,
}

impl Serving {
    /// Plaintext, authentication off, default limits (tests and the loopback quick start).
    pub fn insecure(service: &'static str) -> Self {
        Self {
            tls: None,
            auth: auth::Auth::off(service),
            limits: LimitArgs::default(),
            shutdown_delay: Duration::ZERO,
            connect: None,
        }
    }

    /// The same, also serving `connect`'s services over the Connect protocol.
    pub fn with_connect(mut self, connect: connect::Connect) -> Self {
        self.connect = Some(Arc::new(connect));
        self
    }
}

/// Serves `routes` on `listener` until `shutdown` resolves; then sets every health status
/// in `service_names` (and the overall one) to NOT_SERVING, keeps serving for the
/// shutdown delay, cancels `streams` so endless server streams end, and waits for
/// in-flight calls at most `drain.timeout`.
#[allow(clippy::too_many_arguments)]
pub async fn serve_gracefully(
    listener: TcpListener,
    routes: Routes,
    health: HealthReporter,
    service_names: &[&str],
    streams: CancellationToken,
    drain: Drain,
    serving: &Serving,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let server = server(listener, routes, serving, &stop);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.map_err(Into::into),
        () = shutdown => {}
    }
    mark_not_serving(&health, service_names).await;
    // Keep serving while callers learn that this replica is going (health watchers at
    // once, load balancers and endpoint lists within the delay).
    if !serving.shutdown_delay.is_zero() {
        tracing::info!(delay = ?serving.shutdown_delay, "NOT_SERVING; still serving until the shutdown delay ends");
        tokio::select! {
            result = &mut server => return result.map_err(Into::into),
            () = tokio::time::sleep(serving.shutdown_delay) => {}
        }
    }
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

/// The server of `routes` on `listener`, with the limits and layers `serving` asks for;
/// once `stop` is cancelled it accepts no more connections and ends when the calls in
/// flight have.
fn server(
    listener: TcpListener,
    routes: Routes,
    serving: &Serving,
    stop: &CancellationToken,
) -> impl Future<Output = Result<(), tonic::transport::Error>> {
    let limits = &serving.limits;
    let max_in_flight = limits.max_in_flight.max(1);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let rpc_timeout = Duration::from_millis(limits.rpc_timeout_ms.max(1));
    let admission = limits
        .deadline_admission
        .then(|| admission::Admission::new(in_flight.clone(), max_in_flight, rpc_timeout));
    tonic::transport::Server::builder()
        // Connect's clients (browsers' fetch among them) may speak HTTP/1.1.
        .accept_http1(serving.connect.is_some())
        // Per-connection concurrency cap: a single client cannot monopolise the server.
        .concurrency_limit_per_connection(limits.max_streams_per_connection as usize)
        // Streams per connection announced to clients (tonic's default is unbounded).
        .max_concurrent_streams(limits.max_streams_per_connection)
        // HTTP/2 rapid reset: a connection whose streams keep erroring is closed.
        .http2_max_local_error_reset_streams(Some(1024))
        .http2_max_pending_accept_reset_streams(Some(64))
        // Detects dead peers on idle connections (watchers behind a NAT, crashed agents).
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // gRPC passes; Connect calls become gRPC calls (and back); anything else is 415.
        .layer(connect::ConnectLayer::new(serving.connect.clone()))
        // One access-log line and the RPC metrics per call, refused calls included.
        .layer(access::CallLayer)
        // Unary calls end within the deadline, answered DEADLINE_EXCEEDED (streams are
        // bounded by their own limits); inside the access layer, so it counts them.
        .layer(deadline::DeadlineLayer::new(rpc_timeout))
        // Authenticate and authorize first: an anonymous caller never holds an in-flight
        // slot (health checks, which need no credentials, have their own small pool).
        .layer(auth::layer::AuthLayer::new(serving.auth.clone()))
        // A call the calls in flight would keep past half its deadline: refused at once.
        .layer(admission::AdmissionLayer::new(admission))
        // Over the in-flight cap, refuse at once instead of queueing.
        .layer(tower::load_shed::LoadShedLayer::new())
        .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(
            in_flight,
        ))
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tls::incoming(
                listener,
                serving.tls.clone(),
                tls::AcceptLimits {
                    max_connections: limits.max_connections,
                    handshake_timeout: Duration::from_secs(10),
                },
                stop.clone(),
            ),
            stop.clone().cancelled_owned(),
        )
}

/// Sets the health of every service in `service_names`, and the overall one, to
/// NOT_SERVING.
async fn mark_not_serving(health: &HealthReporter, service_names: &[&str]) {
    for name in service_names {
        health
            .set_service_status(*name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
}
