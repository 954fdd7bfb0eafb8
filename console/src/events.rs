//! Live updates: one `WatchPlacements` and one `WatchVisibility` per console process, made
//! with the console's own identity, broadcast to every open page over `/events`
//! (server-sent events). An event names what changed (`placement` or `visibility`); the
//! page fetches the fragment that shows it again. The broadcast is bounded: a browser that
//! falls behind is cut off (its EventSource reconnects and the page re-fetches), and at
//! most `--max-live-streams` pages are followed at once (more are answered 503; htmx's
//! EventSource retries).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use proto::deploy::v1 as dpb;
use proto::release::v1 as rpb;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_util::sync::CancellationToken;

use crate::backend::Backends;
use crate::AppState;

/// How many events wait for a browser before it is cut off.
const QUEUE: usize = 64;
/// Changes arriving this close together make one event.
const COALESCE: Duration = Duration::from_millis(30);
/// The wait before a watch that failed is opened again.
const RETRY: Duration = Duration::from_secs(1);

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A placement (deploy-svc): the inventory.
    Placement,
    /// A visibility decision (release-svc): the visibility matrix and releases.
    Visibility,
}

impl Change {
    /// The SSE event name.
    pub fn name(self) -> &'static str {
        match self {
            Change::Placement => "placement",
            Change::Visibility => "visibility",
        }
    }
}

/// The broadcast of changes.
#[derive(Clone)]
pub struct Hub {
    sender: broadcast::Sender<Change>,
    shutdown: CancellationToken,
}

impl Hub {
    /// Opens both watches (and keeps them open) until `shutdown`.
    pub fn start(backends: Backends, shutdown: CancellationToken) -> Self {
        let (sender, _) = broadcast::channel(QUEUE);
        tokio::spawn(watch_placements(
            backends.clone(),
            sender.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(watch_visibility(backends, sender.clone(), shutdown.clone()));
        Self { sender, shutdown }
    }

    /// The changes from now on, ending when the receiver lags or the console stops.
    pub fn subscribe(&self) -> impl Stream<Item = Change> + Send + 'static {
        BroadcastStream::new(self.sender.subscribe())
            .take_while(|c| std::future::ready(c.is_ok()))
            .filter_map(|c| std::future::ready(c.ok()))
            .take_until(self.shutdown.clone().cancelled_owned())
    }
}

/// `GET /events`: the server-sent events of one page.
pub async fn stream(State(state): State<AppState>) -> Response {
    // One slot per open stream, given back when the browser goes.
    let Ok(slot) = state.live_streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live pages open; retrying",
        )
            .into_response();
    };
    let events = state.events.subscribe().map(move |c| {
        let _held = &slot;
        Ok::<_, Infallible>(Event::default().event(c.name()).data(c.name()))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Sends `change`, then waits a moment and swallows what `more` yields meanwhile.
async fn coalesced<S, T>(sender: &broadcast::Sender<Change>, change: Change, more: &mut S) -> bool
where
    S: Stream<Item = T> + Unpin,
{
    let _ = sender.send(change);
    let deadline = tokio::time::sleep(COALESCE);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return true,
            next = more.next() => if next.is_none() { return false },
        }
    }
}

/// Keeps one watch open (`open` opens it) and broadcasts `change` for each message that
/// `counts`; reopens it after a failure.
async fn follow<T, F, Fut>(
    change: Change,
    sender: broadcast::Sender<Change>,
    shutdown: CancellationToken,
    open: F,
    counts: fn(&T) -> bool,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Streaming<T>, tonic::Status>>,
{
    while !shutdown.is_cancelled() {
        match open().await {
            Ok(stream) => {
                tracing::info!(watch = change.name(), "watching");
                // Whatever happened while the watch was down is shown again.
                let _ = sender.send(change);
                let mut messages =
                    stream.filter(|m| std::future::ready(m.as_ref().map_or(true, counts)));
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        next = messages.next() => match next {
                            Some(Ok(_)) => {
                                if !coalesced(&sender, change, &mut messages).await {
                                    break;
                                }
                            }
                            Some(Err(status)) => {
                                tracing::warn!(watch = change.name(), code = ?status.code(), message = status.message(), "watch ended");
                                break;
                            }
                            None => break,
                        }
                    }
                }
            }
            Err(status) => {
                tracing::warn!(watch = change.name(), code = ?status.code(), message = status.message(), "cannot watch");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Placement events (not the snapshot, not heartbeats) change the inventory.
async fn watch_placements(
    backends: Backends,
    sender: broadcast::Sender<Change>,
    shutdown: CancellationToken,
) {
    let open = || async {
        let request = backends.own_request(dpb::WatchPlacementsRequest {
            start: Some(dpb::watch_placements_request::Start::Snapshot(true)),
            heartbeat_interval_seconds: 30,
            ..Default::default()
        })?;
        Ok(backends
            .deploy
            .clone()
            .watch_placements(request)
            .await?
            .into_inner())
    };
    let counts = |m: &dpb::WatchPlacementsResponse| {
        matches!(m.kind, Some(dpb::watch_placements_response::Kind::Event(_)))
    };
    follow(Change::Placement, sender, shutdown, open, counts).await;
}

/// Every visibility change counts.
async fn watch_visibility(
    backends: Backends,
    sender: broadcast::Sender<Change>,
    shutdown: CancellationToken,
) {
    let open = || async {
        let request = backends.own_request(rpb::WatchVisibilityRequest::default())?;
        Ok(backends
            .release
            .clone()
            .watch_visibility(request)
            .await?
            .into_inner())
    };
    follow(Change::Visibility, sender, shutdown, open, |_| true).await;
}
