//! The placement consumer: follows deploy-svc's WatchPlacements from the stored cursor and
//! applies events through the engine (each batch and the cursor in one transaction, so a
//! crash neither loses nor double-applies an event). It reconnects with exponential backoff
//! and resyncs from a snapshot when its cursor is older than deploy-svc's retained log.
//! While deploy-svc is unreachable, evaluations keep using the last known placements.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use proto::deploy::v1 as dpb;
use proto::deploy::v1::deploy_service_client::DeployServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::domain::model::Millis;
use crate::domain::names;
use crate::domain::placements::{Placement, PlacementState};
use crate::engine::{now_ms, Engine};

/// Most events applied in one transaction.
const BATCH: usize = 512;

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

/// Runs the consumer until `cancel`.
pub async fn run(
    engine: Arc<Engine>,
    deploy_svc: String,
    security: service_kit::client::ClientSecurity,
    status: SharedStatus,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut resync = engine.cursor().await.0 == 0;
    loop {
        let outcome = tokio::select! {
            () = cancel.cancelled() => Outcome::Stop,
            o = follow(&engine, &deploy_svc, &security, &status, resync, &mut backoff) => o,
        };
        update(&status, |s| s.connected = false);
        match outcome {
            Outcome::Stop => return,
            Outcome::Resync(why) => {
                tracing::warn!(reason = %why, "placement cursor outside deploy-svc's log; resyncing from a snapshot");
                update(&status, |s| s.last_error = why);
                resync = true;
            }
            Outcome::Retry(why) => {
                tracing::warn!(error = %why, retry_in = ?backoff, "placement stream lost; retrying");
                update(&status, |s| s.last_error = why);
                resync = false;
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn follow(
    engine: &Engine,
    deploy_svc: &str,
    security: &service_kit::client::ClientSecurity,
    status: &SharedStatus,
    resync: bool,
    backoff: &mut Duration,
) -> Outcome {
    let channel = match security.connect(deploy_svc).await {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Retry(format!(
                "cannot connect to {}: {e:#}",
                service_kit::redact::url(deploy_svc)
            ))
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
        heartbeat_interval_seconds: 2,
    };
    let mut stream = match client.watch_placements(request).await {
        Ok(r) => r.into_inner(),
        Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::OutOfRange) => {
            return Outcome::Resync(s.message().to_owned())
        }
        Err(s) => return Outcome::Retry(format!("WatchPlacements failed: {s}")),
    };
    update(status, |s| {
        s.connected = true;
        s.last_error.clear();
    });
    *backoff = Duration::from_millis(100);
    tracing::info!(%deploy_svc, cursor, resync, "following deploy-svc placements");
    let mut snapshot = Vec::new();
    loop {
        let first = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Outcome::Retry("deploy-svc ended the stream".into()),
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::OutOfRange) => {
                return Outcome::Resync(s.message().to_owned())
            }
            Err(s) => return Outcome::Retry(format!("stream error: {s}")),
        };
        // Take whatever else is already buffered, so one transaction covers a burst.
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match stream.message().now_or_never() {
                Some(Ok(Some(m))) => batch.push(m),
                _ => break,
            }
        }
        update(status, |s| s.last_message_ms = now_ms());
        let mut events = Vec::new();
        let mut cursor_after = None;
        for msg in batch {
            use dpb::watch_placements_response::Kind;
            match msg.kind {
                Some(Kind::SnapshotPlacement(p)) => {
                    if let Some(p) = placement(&p) {
                        snapshot.push(p);
                    }
                }
                Some(Kind::SnapshotEnd(end)) => {
                    if let Err(e) = engine
                        .resync(std::mem::take(&mut snapshot), end.sequence)
                        .await
                    {
                        return Outcome::Retry(format!("cannot store the snapshot: {e}"));
                    }
                    update(status, |s| s.head = s.head.max(end.sequence));
                }
                Some(Kind::Event(e)) => {
                    cursor_after = Some(e.sequence);
                    match e.placement.as_ref().and_then(placement) {
                        Some(p) => events.push(p),
                        None => tracing::error!(
                            sequence = e.sequence,
                            "malformed placement event skipped"
                        ),
                    }
                    update(status, |s| s.head = s.head.max(e.sequence));
                }
                Some(Kind::Heartbeat(h)) => update(status, |s| s.head = h.head_sequence),
                None => {}
            }
        }
        if let Some(cursor_after) = cursor_after {
            if let Err(e) = engine.apply_placements(events, cursor_after).await {
                return Outcome::Retry(format!("cannot apply placement events: {e}"));
            }
        }
    }
}
