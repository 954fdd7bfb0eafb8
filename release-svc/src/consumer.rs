//! The placement consumer: follows deploy-svc's WatchPlacements from the stored cursor and
//! applies events through the engine (each batch and the cursor in one transaction, so a
//! crash neither loses nor double-applies an event). It reconnects with jittered
//! exponential backoff and resyncs from a snapshot when its cursor is older than
//! deploy-svc's retained log. While deploy-svc is unreachable, evaluations keep using the
//! last known placements.
//!
//! A silent stream is a lost stream: deploy-svc sends a heartbeat every
//! [`HEARTBEAT_INTERVAL`]; after [`SILENCE_LIMIT`] without any message (a frozen or
//! partitioned deploy-svc keeps the TCP connection open) the consumer drops the stream,
//! reports it in GetConsumerStatus and reconnects. The health service name
//! [`PLACEMENT_FEED_HEALTH`] is SERVING while the stream is open and NOT_SERVING while it
//! is lost.
//!
//! While traces are exported, opening the stream runs in a span (`placement-feed.open`, so
//! deploy-svc's WatchPlacements span is its child), and each automatic withdrawal gets a
//! span (`auto.withdraw`) linked to the trace context the causing events carry (the
//! deploy-svc call that changed the placement).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use proto::deploy::v1 as dpb;
use proto::deploy::v1::deploy_service_client::DeployServiceClient;
use service_kit::backoff::Backoff;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::domain::model::Millis;
use crate::domain::names;
use crate::domain::placements::{Placement, PlacementState};
use crate::engine::{now_ms, Engine};
use crate::store::Withdrawal;
use crate::telemetry;

/// Most events applied in one transaction.
const BATCH: usize = 512;

/// How often deploy-svc is asked to send a heartbeat on an idle stream.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// No message for this long (three heartbeats) means the stream is dead.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(6);
/// The health service name of the placement feed: NOT_SERVING while the applier replica
/// has lost deploy-svc's stream (evaluations go on from the last known placements).
pub const PLACEMENT_FEED_HEALTH: &str = "release.placement-feed";

/// What GetConsumerStatus reports.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// deploy-svc's head as last seen.
    pub head: u64,
    /// Whether the stream is open.
    pub connected: bool,
    /// The last error.
    pub last_error: String,
    /// When the last message arrived.
    pub last_message_ms: Millis,
    /// This replica applies deploy-svc's events (holds the applier lease).
    pub active: bool,
}

/// Records whether this replica is the placement applier.
pub fn set_active(status: &SharedStatus, active: bool) {
    update(status, |s| {
        s.active = active;
        if !active {
            s.connected = false;
        }
    });
}

/// Shared consumer status.
pub type SharedStatus = Arc<Mutex<Status>>;

fn update(status: &SharedStatus, f: impl FnOnce(&mut Status)) {
    f(&mut status.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Converts a streamed placement; `None` if it is malformed.
fn placement(p: &dpb::Placement) -> Option<Placement> {
    let deployment = names::parse_deployment(&p.deployment).ok()?;
    let (environment, target) = names::parse_target(&p.target).ok()?;
    Some(Placement {
        deployment,
        environment,
        target,
        artifact: p.artifact.clone(),
        version: p.version.clone(),
        state: PlacementState::from_code(i64::from(p.state))?,
        sequence: p.sequence,
    })
}

enum Outcome {
    /// The stream ended or failed; reconnect after a backoff.
    Retry(String),
    /// deploy-svc no longer has our position: resync from a snapshot.
    Resync(String),
    /// Shutting down.
    Stop,
}

/// Sets the placement feed's health status and the connected gauge.
pub async fn report_feed(health: &HealthReporter, connected: bool) {
    metrics::gauge!(telemetry::CONSUMER_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    let status = if connected {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health
        .set_service_status(PLACEMENT_FEED_HEALTH, status)
        .await;
}

/// Runs the consumer until `cancel`.
pub async fn run(
    engine: Arc<Engine>,
    deploy_svc: String,
    security: service_kit::client::ClientSecurity,
    status: SharedStatus,
    health: HealthReporter,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut resync = engine.cursor().await.0 == 0;
    loop {
        let outcome = tokio::select! {
            () = cancel.cancelled() => Outcome::Stop,
            o = follow(&engine, &deploy_svc, &security, &status, &health, resync, &mut backoff) => o,
        };
        update(&status, |s| s.connected = false);
        report_feed(&health, false).await;
        if !matches!(outcome, Outcome::Stop) {
            metrics::counter!(telemetry::CONSUMER_STREAM_LOSSES).increment(1);
        }
        match outcome {
            Outcome::Stop => return,
            Outcome::Resync(why) => {
                tracing::warn!(reason = %why, "placement cursor outside deploy-svc's log; resyncing from a snapshot");
                update(&status, |s| s.last_error = why);
                resync = true;
            }
            Outcome::Retry(why) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %why, retry_in = ?delay, "placement stream lost; retrying");
                update(&status, |s| s.last_error = why);
                resync = false;
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Opens the stream and applies what it sends until it ends, fails or falls silent.
async fn follow(
    engine: &Engine,
    deploy_svc: &str,
    security: &service_kit::client::ClientSecurity,
    status: &SharedStatus,
    health: &HealthReporter,
    resync: bool,
    backoff: &mut Backoff,
) -> Outcome {
    let (mut stream, cursor) = match open_bounded(engine, deploy_svc, security, resync).await {
        Ok(opened) => opened,
        Err(outcome) => return outcome,
    };
    update(status, |s| {
        s.connected = true;
        s.last_error.clear();
    });
    report_feed(health, true).await;
    backoff.reset();
    tracing::info!(%deploy_svc, cursor, resync, "following deploy-svc placements");
    let mut applied = cursor;
    let mut snapshot = Vec::new();
    loop {
        let batch = match next_batch(&mut stream).await {
            Ok(batch) => batch,
            Err(outcome) => return outcome,
        };
        let now = now_ms();
        update(status, |s| s.last_message_ms = now);
        metrics::gauge!(telemetry::CONSUMER_LAST_MESSAGE).set(now as f64 / 1000.0);
        let mut events = Events::default();
        for msg in batch {
            let taken = take(engine, status, msg, &mut snapshot, &mut events).await;
            match taken {
                Ok(Some(sequence)) => applied = sequence,
                Ok(None) => {}
                Err(outcome) => return outcome,
            }
        }
        match apply(engine, events).await {
            Ok(Some(sequence)) => applied = sequence,
            Ok(None) => {}
            Err(outcome) => return outcome,
        }
        let head = status.lock().unwrap_or_else(|p| p.into_inner()).head;
        metrics::gauge!(telemetry::CONSUMER_HEAD).set(head as f64);
        metrics::gauge!(telemetry::CONSUMER_LAG).set(head.saturating_sub(applied) as f64);
    }
}

/// [`open`] in its span, bounded by [`SILENCE_LIMIT`].
async fn open_bounded(
    engine: &Engine,
    deploy_svc: &str,
    security: &service_kit::client::ClientSecurity,
    resync: bool,
) -> Result<Opened, Outcome> {
    // A frozen deploy-svc accepts TCP connections and then says nothing: bound the
    // connection and the call that opens the stream like the stream itself.
    let span = tracing::info_span!(
        target: service_kit::otel::TARGET,
        parent: None,
        "placement-feed.open",
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = "deploy.v1.DeployService",
        rpc.method = "WatchPlacements",
        resync,
    );
    tokio::time::timeout(
        SILENCE_LIMIT,
        tracing::Instrument::instrument(open(engine, deploy_svc, security, resync), span),
    )
    .await
    .unwrap_or_else(|_| {
        Err(Outcome::Retry(format!(
            "deploy-svc did not answer WatchPlacements within {SILENCE_LIMIT:?}"
        )))
    })
}

/// The next message, waited for at most [`SILENCE_LIMIT`], and whatever else is already
/// buffered behind it (at most [`BATCH`] in all).
async fn next_batch(
    stream: &mut tonic::Streaming<dpb::WatchPlacementsResponse>,
) -> Result<Vec<dpb::WatchPlacementsResponse>, Outcome> {
    let first = match tokio::time::timeout(SILENCE_LIMIT, stream.message()).await {
        Err(_) => {
            return Err(Outcome::Retry(format!(
                "no message from deploy-svc for {SILENCE_LIMIT:?} (heartbeats are due every {HEARTBEAT_INTERVAL:?}): the stream is dead"
            )))
        }
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => return Err(Outcome::Retry("deploy-svc ended the stream".into())),
        Ok(Err(s)) if matches!(s.code(), Code::FailedPrecondition | Code::OutOfRange) => {
            return Err(Outcome::Resync(s.message().to_owned()))
        }
        Ok(Err(s)) => return Err(Outcome::Retry(format!("stream error: {s}"))),
    };
    // Take whatever else is already buffered, so one transaction covers a burst.
    let mut batch = vec![first];
    while batch.len() < BATCH {
        match stream.message().now_or_never() {
            Some(Ok(Some(m))) => batch.push(m),
            _ => break,
        }
    }
    Ok(batch)
}

/// The placement events of one batch, applied together after it is read.
#[derive(Default)]
struct Events {
    placements: Vec<Placement>,
    /// (environment, traceparent) of the events that carry one, while traces are on.
    causes: Vec<(String, String)>,
    /// The sequence of the batch's last event (a malformed one included).
    cursor_after: Option<u64>,
}

/// Takes one message: a snapshot placement into `snapshot` (stored as a resync at the
/// snapshot's end), an event into `events`, a heartbeat's head into the status. Returns the
/// sequence a stored snapshot reaches.
async fn take(
    engine: &Engine,
    status: &SharedStatus,
    msg: dpb::WatchPlacementsResponse,
    snapshot: &mut Vec<Placement>,
    events: &mut Events,
) -> Result<Option<u64>, Outcome> {
    use dpb::watch_placements_response::Kind;
    match msg.kind {
        Some(Kind::SnapshotPlacement(p)) => {
            if let Some(p) = placement(&p) {
                snapshot.push(p);
            }
        }
        Some(Kind::SnapshotEnd(end)) => {
            if let Err(e) = engine.resync(std::mem::take(snapshot), end.sequence).await {
                tracing::error!(error = %e, "cannot store the snapshot");
                return Err(Outcome::Retry(format!(
                    "cannot store the snapshot: {}",
                    e.for_caller()
                )));
            }
            update(status, |s| s.head = s.head.max(end.sequence));
            return Ok(Some(end.sequence));
        }
        Some(Kind::Event(e)) => {
            events.cursor_after = Some(e.sequence);
            match e.placement.as_ref().and_then(placement) {
                Some(p) => {
                    if let Some(tp) = e.trace_parent.filter(|_| service_kit::otel::enabled()) {
                        events.causes.push((p.environment.clone(), tp));
                    }
                    events.placements.push(p);
                }
                None => tracing::error!(sequence = e.sequence, "malformed placement event skipped"),
            }
            update(status, |s| s.head = s.head.max(e.sequence));
        }
        Some(Kind::Heartbeat(h)) => update(status, |s| s.head = h.head_sequence),
        None => {}
    }
    Ok(None)
}

/// Applies a batch's events and advances the cursor past them (tracing any automatic
/// withdrawal); returns the new cursor when the batch had events.
async fn apply(engine: &Engine, events: Events) -> Result<Option<u64>, Outcome> {
    let Some(cursor_after) = events.cursor_after else {
        return Ok(None);
    };
    match engine
        .apply_placements(events.placements, cursor_after)
        .await
    {
        Ok(withdrawals) => trace_withdrawals(&withdrawals, &events.causes),
        Err(e) => {
            tracing::error!(error = %e, "cannot apply placement events");
            return Err(Outcome::Retry(format!(
                "cannot apply placement events: {}",
                e.for_caller()
            )));
        }
    }
    Ok(Some(cursor_after))
}

/// One span per automatic withdrawal, linked to the trace context of every event of the
/// batch in the withdrawal's environment (the calls that changed its placements).
fn trace_withdrawals(withdrawals: &[Withdrawal], causes: &[(String, String)]) {
    for w in withdrawals {
        let span = tracing::info_span!(
            target: service_kit::otel::TARGET,
            parent: None,
            "auto.withdraw",
            otel.kind = "internal",
            release.feature = %w.feature,
            release.environment = %w.environment,
            release.reason = %w.reason,
            deploy.placement_sequence = w.sequence,
        );
        let mut linked: Vec<&str> = Vec::new();
        for (environment, tp) in causes {
            if *environment == w.environment && !linked.contains(&tp.as_str()) {
                service_kit::otel::link(&span, tp);
                linked.push(tp);
            }
        }
    }
}

type Opened = (tonic::Streaming<dpb::WatchPlacementsResponse>, u64);

/// Connects and opens the stream from the stored cursor (or a snapshot).
async fn open(
    engine: &Engine,
    deploy_svc: &str,
    security: &service_kit::client::ClientSecurity,
    resync: bool,
) -> Result<Opened, Outcome> {
    let channel = match security.connect(deploy_svc).await {
        Ok(c) => c,
        Err(e) => {
            return Err(Outcome::Retry(format!(
                "cannot connect to {}: {e:#}",
                service_kit::redact::url(deploy_svc)
            )))
        }
    };
    let mut client = DeployServiceClient::new(channel);
    let cursor = engine.cursor().await.0;
    let start = if resync {
        dpb::watch_placements_request::Start::Snapshot(true)
    } else {
        dpb::watch_placements_request::Start::AfterSequence(cursor)
    };
    let request = dpb::WatchPlacementsRequest {
        start: Some(start),
        environment: String::new(),
        artifact: String::new(),
        heartbeat_interval_seconds: HEARTBEAT_INTERVAL.as_secs() as u32,
    };
    match client.watch_placements(request).await {
        Ok(r) => Ok((r.into_inner(), cursor)),
        Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::OutOfRange) => {
            Err(Outcome::Resync(s.message().to_owned()))
        }
        Err(s) => Err(Outcome::Retry(format!("WatchPlacements failed: {s}"))),
    }
}
