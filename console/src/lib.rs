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
    /// How the console reaches the services: TLS, client certificate and its own token
    /// (used for the live streams, and for pages when the browser sends no token).
    #[command(flatten)]
    pub client: service_kit::client::ClientArgs,
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
        .with_state(state)
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
