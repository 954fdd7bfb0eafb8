//! The placement log: the in-memory tail of committed events and the watchers that stream
//! them (WatchPlacements).
//!
//! The contract is etcd's watch contract:
//!
//! - ordered and unique: a watcher advances a single cursor through gap-free sequences,
//!   so every event is sent at most once and in commit order;
//! - atomic: the store publishes a transaction's events only after it commits, together;
//! - reliable and resumable: a watcher that leaves the in-memory ring reads the retained
//!   log from the store, so nothing is skipped; a client resumes with the last sequence;
//! - bookmarkable: idle heartbeats carry the cursor, which advances past filtered events.
//!
//! Writers never wait for watchers: publishing appends to a bounded ring and bumps a
//! `watch` channel. Each watcher owns a bounded outgoing queue; one that does not drain it
//! within the slow-consumer timeout is cut off with RESOURCE_EXHAUSTED after the events
//! already queued, and resumes from its last sequence. Memory is bounded by the ring size
//! plus one queue per watcher.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use service_kit::streams::StreamSlot;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::model::{Placement, PlacementEvent};
use crate::domain::{Error, Result};
use crate::store::Store;

/// The rule name carried by the retention error.
pub const EVENT_RETENTION: &str = "EVENT_RETENTION";

/// The retention error for a cursor older than the retained log.
pub fn retention_error(after: u64, pruned_through: u64) -> Error {
    Error::precondition(
        EVENT_RETENTION,
        "after_sequence",
        format!(
            "events after sequence {after} are no longer retained (pruned through {pruned_through}); resync: start a new watch with snapshot=true"
        ),
    )
}

/// A committed event as watchers share it: the event and, once the first watcher has sent
/// it, its wire form, so a hundred watchers encode it once rather than a hundred times.
#[derive(Debug)]
pub struct LoggedEvent {
    /// The event.
    pub event: PlacementEvent,
    wire: OnceLock<Bytes>,
}

impl LoggedEvent {
    /// Wraps a committed event.
    pub fn new(event: PlacementEvent) -> Self {
        Self {
            event,
            wire: OnceLock::new(),
        }
    }

    /// The event's wire form: encoded by `encode` on the first call, shared afterwards.
    pub fn wire(&self, encode: impl FnOnce(&PlacementEvent) -> Bytes) -> Bytes {
        self.wire.get_or_init(|| encode(&self.event)).clone()
    }
}

/// The committed tail of the placement log, shared by the store (which publishes) and the
/// watchers (which read).
#[derive(Debug)]
pub struct Feed {
    /// The newest events and the sequence through which the ring is complete (events at or
    /// below it are only in the store). Sequences increase; on PostgreSQL a rolled-back
    /// transaction leaves a hole, so neighbours may differ by more than one.
    ring: RwLock<(VecDeque<Arc<LoggedEvent>>, u64)>,
    capacity: usize,
    head: watch::Sender<u64>,
}

impl Feed {
    /// A feed whose log head is `head`, keeping the newest `capacity` events in memory.
    pub fn new(head: u64, capacity: usize) -> Self {
        Self {
            ring: RwLock::new((VecDeque::with_capacity(capacity.min(1 << 16)), head)),
            capacity: capacity.max(1),
            head: watch::Sender::new(head),
        }
    }

    /// Publishes committed events (in sequence order) and wakes the watchers.
    pub fn publish(&self, events: Vec<PlacementEvent>) {
        let Some(last) = events.last().map(|e| e.sequence) else {
            return;
        };
        {
            let mut guard = self.ring.write().unwrap_or_else(|p| p.into_inner());
            let (ring, floor) = &mut *guard;
            for event in events {
                ring.push_back(Arc::new(LoggedEvent::new(event)));
            }
            while ring.len() > self.capacity {
                if let Some(gone) = ring.pop_front() {
                    *floor = gone.event.sequence;
                }
            }
        }
        self.head.send_replace(last);
        metrics::gauge!(crate::telemetry::LOG_HEAD).set(last as f64);
    }

    /// The newest published sequence.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// A receiver woken whenever the head moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Up to `max` events after `after` from memory, or `None` when the ring does not hold
    /// the event right after `after` (the caller reads the store instead).
    pub fn read_after(&self, after: u64, max: usize) -> Option<Vec<Arc<LoggedEvent>>> {
        let guard = self.ring.read().unwrap_or_else(|p| p.into_inner());
        let (ring, floor) = &*guard;
        if after < *floor {
            return None;
        }
        let start = ring.partition_point(|e| e.event.sequence <= after);
        let end = start.saturating_add(max).min(ring.len());
        Some(ring.range(start..end).cloned().collect())
    }
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// After this sequence.
    After(u64),
    /// With a snapshot of current placements.
    Snapshot,
}

/// A validated WatchPlacements request.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    /// Where to start.
    pub start: Start,
    /// Only this environment id.
    pub environment: Option<String>,
    /// Only this artifact name.
    pub artifact: Option<String>,
    /// Heartbeat interval when idle.
    pub heartbeat: Duration,
}

/// Server-side limits of every watcher.
#[derive(Debug, Clone, Copy)]
pub struct WatchLimits {
    /// Messages queued per watcher before it counts as slow.
    pub queue: usize,
    /// How long a full queue may stay full before the watcher is cut off.
    pub slow_timeout: Duration,
    /// Events read per step.
    pub batch: usize,
    /// Watches open at once at most, across all clients.
    pub max_watchers: usize,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            queue: 256,
            slow_timeout: Duration::from_secs(30),
            batch: 512,
            max_watchers: 1024,
        }
    }
}

/// One message of a watch.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// A placement of the snapshot.
    Snapshot(Placement),
    /// The snapshot is complete and reflects events through `sequence`.
    SnapshotEnd {
        /// The sequence the snapshot reflects.
        sequence: u64,
        /// How many placements it held (after filters).
        count: u64,
    },
    /// A committed event.
    Event(Arc<LoggedEvent>),
    /// An idle heartbeat.
    Heartbeat {
        /// The stream's cursor.
        sequence: u64,
        /// The log head.
        head: u64,
    },
}

/// The stream a watch returns: items, then possibly one terminal error.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchItem>> + Send>>;

/// Starts a watch holding `slot` (its place under the server's cap on open watches, given
/// back when the watch ends). Fails at once if the start position is outside the retained
/// log.
pub async fn watch(
    store: Arc<dyn Store>,
    feed: Arc<Feed>,
    request: WatchRequest,
    limits: WatchLimits,
    slot: StreamSlot,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> Result<WatchStream> {
    if let Start::After(after) = request.start {
        let bounds = store.log_bounds().await?;
        let mut head = bounds.head.max(feed.head());
        if after > head && store.remote_changes().is_some() {
            // Another replica may have streamed this position already; this one's tail
            // follows within milliseconds.
            let mut rx = feed.subscribe();
            let _ = timeout(Duration::from_secs(2), rx.wait_for(|h| *h >= after)).await;
            head = head.max(feed.head());
        }
        if after < bounds.pruned_through {
            return Err(retention_error(after, bounds.pruned_through));
        }
        if after > head {
            return Err(Error::OutOfRange(format!(
                "after_sequence {after} is ahead of the log head {head}; resync: start a new watch with snapshot=true"
            )));
        }
    }
    let (tx, rx) = mpsc::channel(limits.queue.max(1));
    let (term_tx, term_rx) = oneshot::channel::<Error>();
    let watcher = Watcher {
        store,
        feed,
        request,
        limits,
        cancel,
        tx,
        term: Some(term_tx),
        last_sent: Instant::now(),
        _slot: slot,
    };
    tasks.spawn(watcher.run());
    let terminal = futures::stream::once(term_rx).filter_map(|r| async move { r.ok().map(Err) });
    Ok(Box::pin(ReceiverStream::new(rx).chain(terminal)))
}

enum Flow {
    Continue,
    Stop,
}

struct Watcher {
    store: Arc<dyn Store>,
    feed: Arc<Feed>,
    request: WatchRequest,
    limits: WatchLimits,
    cancel: CancellationToken,
    tx: mpsc::Sender<Result<WatchItem>>,
    term: Option<oneshot::Sender<Error>>,
    last_sent: Instant,
    _slot: StreamSlot,
}

impl Watcher {
    fn matches(&self, p: &Placement) -> bool {
        self.request
            .environment
            .as_ref()
            .is_none_or(|e| *e == p.environment)
            && self
                .request
                .artifact
                .as_ref()
                .is_none_or(|a| *a == p.artifact)
    }

    fn terminate(&mut self, error: Error) -> Flow {
        if let Some(term) = self.term.take() {
            let _ = term.send(error);
        }
        Flow::Stop
    }

    fn shutting_down(&mut self, cursor: u64) -> Flow {
        self.terminate(Error::Unavailable(format!(
            "server is shutting down; resume with after_sequence={cursor}"
        )))
    }

    async fn send(&mut self, item: WatchItem, cursor: u64) -> Flow {
        enum Sent {
            Queued,
            Gone,
            Slow,
            Cancelled,
        }
        let sent = {
            let reserve = timeout(self.limits.slow_timeout, self.tx.reserve());
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => Sent::Cancelled,
                r = reserve => match r {
                    Ok(Ok(permit)) => {
                        permit.send(Ok(item));
                        Sent::Queued
                    }
                    Ok(Err(_)) => Sent::Gone,
                    Err(_) => Sent::Slow,
                },
            }
        };
        match sent {
            Sent::Queued => {
                self.last_sent = Instant::now();
                Flow::Continue
            }
            Sent::Gone => Flow::Stop,
            Sent::Cancelled => self.shutting_down(cursor),
            Sent::Slow => {
                tracing::warn!(
                    cursor,
                    head = self.feed.head(),
                    "cutting off a slow watcher"
                );
                metrics::counter!(crate::telemetry::SLOW_WATCHER_CUTOFFS).increment(1);
                self.terminate(Error::ResourceExhausted(format!(
                    "watcher fell behind: its queue stayed full for {:?} (log head {}); resume with after_sequence set to the last sequence received",
                    self.limits.slow_timeout,
                    self.feed.head()
                )))
            }
        }
    }

    async fn run(mut self) {
        let cursor = match self.request.start {
            Start::After(after) => after,
            Start::Snapshot => match self.send_snapshot().await {
                Ok(Some(seq)) => seq,
                Ok(None) => return,
                Err(e) => {
                    self.terminate(e);
                    return;
                }
            },
        };
        if let Err(e) = self.follow(cursor).await {
            self.terminate(e);
        }
    }

    async fn send_snapshot(&mut self) -> Result<Option<u64>> {
        let (placements, sequence) = self.store.snapshot().await?;
        let mut count = 0;
        for p in placements {
            if self.matches(&p) {
                count += 1;
                if let Flow::Stop = self.send(WatchItem::Snapshot(p), sequence).await {
                    return Ok(None);
                }
            }
        }
        match self
            .send(WatchItem::SnapshotEnd { sequence, count }, sequence)
            .await
        {
            Flow::Continue => Ok(Some(sequence)),
            Flow::Stop => Ok(None),
        }
    }

    async fn follow(&mut self, mut cursor: u64) -> Result<()> {
        let mut head_rx = self.feed.subscribe();
        loop {
            head_rx.borrow_and_update();
            let batch = match self.feed.read_after(cursor, self.limits.batch) {
                Some(batch) => batch,
                None => self
                    .store
                    .read_events(cursor, self.limits.batch)
                    .await?
                    .into_iter()
                    .map(|e| Arc::new(LoggedEvent::new(e)))
                    .collect(),
            };
            if batch.is_empty() {
                let deadline = self.last_sent + self.request.heartbeat;
                tokio::select! {
                    () = self.cancel.cancelled() => {
                        self.shutting_down(cursor);
                        return Ok(());
                    }
                    () = self.tx.closed() => return Ok(()),
                    changed = head_rx.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                    }
                    () = sleep_until(deadline) => {
                        let head = self.feed.head();
                        if let Flow::Stop = self.send(WatchItem::Heartbeat { sequence: cursor, head }, cursor).await {
                            return Ok(());
                        }
                    }
                }
                continue;
            }
            for event in batch {
                // Sequences only grow. They may skip a number: on PostgreSQL a rolled-back
                // transaction leaves a hole, published only once nothing can fill it.
                if event.event.sequence <= cursor {
                    return Err(Error::Internal(format!(
                        "placement log out of order: read sequence {} after {cursor}",
                        event.event.sequence
                    )));
                }
                cursor = event.event.sequence;
                if self.matches(&event.event.placement) {
                    if let Flow::Stop = self.send(WatchItem::Event(event), cursor).await {
                        return Ok(());
                    }
                }
            }
            if self.last_sent.elapsed() >= self.request.heartbeat {
                let head = self.feed.head();
                if let Flow::Stop = self
                    .send(
                        WatchItem::Heartbeat {
                            sequence: cursor,
                            head,
                        },
                        cursor,
                    )
                    .await
                {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::PlacementState;

    fn event(seq: u64) -> PlacementEvent {
        PlacementEvent {
            sequence: seq,
            commit_ms: 0,
            previous_state: PlacementState::Pending,
            trace_parent: None,
            placement: Placement {
                deployment: 1,
                environment: "dev".into(),
                target: "t".into(),
                artifact: "a".into(),
                version: "1".into(),
                digest: String::new(),
                state: PlacementState::Placed,
                message: String::new(),
                sequence: seq,
                update_ms: 0,
            },
        }
    }

    #[test]
    fn ring_serves_recent_events_and_defers_older_ones_to_the_store() {
        let feed = Feed::new(10, 4);
        // Nothing in memory yet: positions before the head must be read from the store.
        assert!(feed.read_after(5, 10).is_none());
        assert_eq!(feed.read_after(10, 10).map(|v| v.len()), Some(0));
        feed.publish((11..=16).map(event).collect());
        assert_eq!(feed.head(), 16);
        // The ring keeps 13..=16.
        assert!(feed.read_after(11, 10).is_none());
        let seqs: Vec<_> = feed
            .read_after(12, 10)
            .unwrap_or_default()
            .iter()
            .map(|e| e.event.sequence)
            .collect();
        assert_eq!(seqs, [13, 14, 15, 16]);
        let seqs: Vec<_> = feed
            .read_after(14, 1)
            .unwrap_or_default()
            .iter()
            .map(|e| e.event.sequence)
            .collect();
        assert_eq!(seqs, [15]);
        assert_eq!(feed.read_after(16, 10).map(|v| v.len()), Some(0));
    }

    #[test]
    fn ring_serves_across_holes_left_by_rolled_back_sequences() {
        let feed = Feed::new(10, 3);
        feed.publish([11, 14, 15].into_iter().map(event).collect());
        let seqs = |after| -> Option<Vec<u64>> {
            feed.read_after(after, 10)
                .map(|v| v.iter().map(|e| e.event.sequence).collect())
        };
        // A cursor inside the hole (12, 13) resumes at the next event, not from the store.
        assert_eq!(seqs(12), Some(vec![14, 15]));
        assert_eq!(seqs(10), Some(vec![11, 14, 15]));
        feed.publish([20, 21].into_iter().map(event).collect());
        // 11 and 14 left the ring: the ring is complete only above 14.
        assert_eq!(seqs(13), None);
        assert_eq!(seqs(14), Some(vec![15, 20, 21]));
        assert_eq!(seqs(17), Some(vec![20, 21]));
    }

    #[test]
    fn an_event_in_the_ring_is_encoded_once_for_all_its_readers() {
        let feed = Feed::new(10, 4);
        feed.publish(vec![event(11)]);
        let encodings = std::cell::Cell::new(0);
        let encode = |e: &PlacementEvent| {
            encodings.set(encodings.get() + 1);
            Bytes::from(e.sequence.to_string())
        };
        for _ in 0..3 {
            let wires: Vec<_> = feed
                .read_after(10, 10)
                .unwrap_or_default()
                .iter()
                .map(|e| e.wire(encode))
                .collect();
            assert_eq!(wires, [Bytes::from("11")]);
        }
        assert_eq!(encodings.get(), 1);
    }
}
