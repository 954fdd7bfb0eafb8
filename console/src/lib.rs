//! The web console: a small process that serves web pages and talks gRPC to deploy-svc and
//! release-svc, so that neither service grows a web stack. Pages are rendered on the server
//! (minijinja templates) and made live with htmx: one server-sent-event stream per browser,
//! fed by one `WatchPlacements` and one `WatchVisibility` per console process, tells the page
//! which fragment to fetch again. Actions are POSTs confirmed in the page, refused without
//! the header htmx sends (a cross-site form cannot set it) or from another origin, and made
//! with the caller's bearer token when the browser sends one, so that the services' RBAC
//! decides what each person sees and may do.
//!
//! # Layout
//!
//! - [`backend`]: the gRPC clients, the identity a call is made with, service errors as
//!   shown to people.
//! - [`events`]: the two watches, their broadcast, the server-sent event stream.
//! - [`views`]: the pages and fragments (inventory, visibility, release, calendar,
//!   audit).
//! - [`actions`]: kill switch, resume, approve, continue and roll back, with the CSRF check.
//! - `templates/` and `assets/`: the HTML templates, the CSS and the vendored htmx files.

pub mod actions;
pub mod backend;
pub mod events;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tokio_util::sync::CancellationToken;

/// The console's options.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to serve the pages on. Loopback by default: to share the console, put it
    /// behind a proxy that signs people in and forwards their bearer token.
    #[arg(long, env = "CONSOLE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// deploy-svc's address.
    #[arg(
        long,
        env = "CONSOLE_DEPLOY_SVC",
        default_value = "http://127.0.0.1:50051"
    )]
    pub deploy_svc: String,
    /// release-svc's address.
    #[arg(
        long,
        env = "CONSOLE_RELEASE_SVC",
        default_value = "http://127.0.0.1:50052"
    )]
    pub release_svc: String,
    /// The origin people reach the console at through a proxy, such as
    /// `https://console.example.com` (repeatable). Requests naming any other host are
    /// refused (a DNS-rebinding page cannot borrow the console); the listen address,
    /// `localhost` and `127.0.0.1` on its port are always accepted.
    #[arg(
        long = "public-origin",
        env = "CONSOLE_PUBLIC_ORIGIN",
        value_delimiter = ','
    )]
    pub public_origins: Vec<String>,
    /// Live-update streams (server-sent events) open at once, one per open page; more are
    /// answered 503 (the page retries).
    #[arg(long, env = "CONSOLE_MAX_LIVE_STREAMS", default_value_t = 1000)]
    pub max_live_streams: usize,
    /// How the console reaches the services: TLS, client certificate and its own token
    /// (used for the live streams, and for pages when the browser sends no token; never for
    /// actions, which are made as the signed-in person).
    #[command(flatten)]
    pub client: service_kit::client::ClientArgs,
}

impl Config {
    /// The `Host` values the console answers when bound to `bound`: that address,
    /// `localhost`, `127.0.0.1` and `[::1]` on its port, and the host of each public origin.
    pub fn hosts(&self, bound: SocketAddr) -> anyhow::Result<Vec<String>> {
        let port = bound.port();
        let mut hosts = vec![
            bound.to_string(),
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
        ];
        for origin in &self.public_origins {
            let uri: axum::http::Uri = origin
                .parse()
                .map_err(|e| anyhow::anyhow!("--public-origin {origin:?}: {e}"))?;
            let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
                anyhow::bail!("--public-origin {origin:?}: expected scheme://host[:port]");
            };
            let host = authority.as_str().to_ascii_lowercase();
            hosts.push(host.clone());
            // The default port may be left out of Host.
            let default = match scheme {
                "https" => ":443",
                "http" => ":80",
                _ => anyhow::bail!("--public-origin {origin:?}: http or https"),
            };
            if let Some(bare) = host.strip_suffix(default) {
                hosts.push(bare.to_owned());
            } else if authority.port().is_none() {
                hosts.push(format!("{host}{default}"));
            }
        }
        Ok(hosts)
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The services.
    pub backends: backend::Backends,
    /// The templates.
    pub templates: Arc<minijinja::Environment<'static>>,
    /// The live events.
    pub events: events::Hub,
    /// The `Host` values served (see [`Config::hosts`]).
    pub hosts: Arc<Vec<String>>,
    /// Free live-stream slots.
    pub live_streams: Arc<tokio::sync::Semaphore>,
}

/// Serves the console on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let backends = backend::Backends::new(&config)?;
    let events = events::Hub::start(backends.clone(), shutdown.clone());
    let state = AppState {
        backends,
        templates: Arc::new(views::templates()),
        events,
        hosts: Arc::new(config.hosts(listener.local_addr()?)?),
        live_streams: Arc::new(tokio::sync::Semaphore::new(config.max_live_streams)),
    };
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// The routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(views::inventory_page))
        .route("/visibility", get(views::visibility_page))
        .route("/releases/{id}", get(views::release_page))
        .route("/calendar", get(views::calendar_page))
        .route("/audit", get(views::audit_page))
        .route("/stale", get(views::stale_page))
        .route("/fragments/audit", get(views::audit_fragment))
        .route("/fragments/inventory", get(views::inventory_fragment))
        .route("/fragments/visibility", get(views::visibility_fragment))
        .route("/fragments/releases/{id}", get(views::release_fragment))
        .route("/events", get(events::stream))
        .route("/actions/{collection}/{id}/{verb}", post(actions::action))
        .route("/assets/htmx.min.js", get(htmx))
        .route("/assets/htmx-sse.js", get(htmx_sse))
        .route("/assets/console.css", get(css))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            known_host,
        ))
        .with_state(state)
}

/// Refuses a request whose `Host` is not one the console serves: a page on another site
/// whose name was made to resolve to the console (DNS rebinding) is same-origin to itself,
/// so the origin check alone cannot stop it.
async fn known_host(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    match host {
        Some(h) if state.hosts.contains(&h) => next.run(request).await,
        _ => {
            tracing::warn!(host = ?host, "request for an unknown host refused");
            (
                axum::http::StatusCode::MISDIRECTED_REQUEST,
                "unknown host: reach the console at its address or a --public-origin",
            )
                .into_response()
        }
    }
}

const JS: &str = "text/javascript; charset=utf-8";

async fn htmx() -> impl IntoResponse {
    asset(JS, include_str!("../assets/htmx.min.js"))
}

async fn htmx_sse() -> impl IntoResponse {
    asset(JS, include_str!("../assets/htmx-sse.js"))
}

async fn css() -> impl IntoResponse {
    asset(
        "text/css; charset=utf-8",
        include_str!("../assets/console.css"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        body,
    )
}
