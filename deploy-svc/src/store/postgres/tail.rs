//! The tail of the placement log: every replica delivers events in sequence order and
//! stops at a hole until the transaction that could fill it has ended (the hole rule: see
//! the module documentation of [`super`]).

use std::sync::Arc;
use std::time::Duration;

use store_kit::postgres::{Conn, Pool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{pg_error, NotifyMode};
use crate::domain::model::PlacementEvent;
use crate::domain::{Error, Result};
use crate::placement_log::Feed;
use crate::store::backend::{to_i64, to_u64};
use crate::store::db::{p, V};
use crate::store::log;

/// A hole in the sequence: where it starts and a transaction id assigned after the
/// snapshot that saw it (so above the id of any transaction that could fill it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hole {
    start: u64,
    xid: i64,
}

/// The tailer's position.
#[derive(Debug, Clone, Copy)]
struct Tail {
    cursor: u64,
    hole: Option<Hole>,
}

/// A transaction id newer than every id assigned so far (a transaction of its own that
/// writes nothing).
fn fresh_xid(conn: &mut Conn) -> Result<i64> {
    let row = conn
        .client
        .query_one(
            "SELECT CAST(CAST(pg_current_xact_id() AS text) AS bigint)",
            &[],
        )
        .map_err(|e| pg_error(&e))?;
    Ok(row.get(0))
}

/// The tailer's one statement (one snapshot, one round trip): the snapshot's oldest
/// running transaction id, where retention pruned the log through, and up to `$2` events
/// after `$1` (none: one row with NULL event columns).
const TAIL_READ: &str = "SELECT m.xmin, m.pruned, e.seq, e.commit_ms, e.deployment, e.environment, e.target, e.artifact, e.version, e.digest, e.state, e.previous_state, e.message, e.trace_parent
     FROM (SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS text) AS bigint) AS xmin,
                  (SELECT pruned_through FROM log_meta WHERE id = 1) AS pruned) m
     LEFT JOIN LATERAL (SELECT * FROM placement_events WHERE seq > ?1 ORDER BY seq LIMIT ?2) e ON true
     ORDER BY e.seq";

/// Reads what follows `tail` and returns the events safe to deliver, in order, the new
/// position, and whether a newly seen hole still needs its transaction id (see the module
/// documentation for the hole rule).
fn tail_read(conn: &mut Conn, tail: Tail, max: usize) -> Result<(Vec<PlacementEvent>, Tail, bool)> {
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let rows = conn.query(TAIL_READ, p![to_i64(tail.cursor), limit])?;
    let mut xmin = 0;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        xmin = row.get(0)?;
        let pruned = to_u64(row.get(1)?);
        if tail.cursor < pruned {
            return Err(crate::placement_log::retention_error(tail.cursor, pruned));
        }
        if row.values().get(2).is_some_and(|v| *v != V::N) {
            events.push(log::event_row(&row.skip(2))?);
        }
    }
    let mut out = Vec::with_capacity(events.len());
    let mut next = tail;
    let mut new_hole = false;
    for event in events {
        let expected = next.cursor + 1;
        if event.sequence != expected {
            match next.hole {
                // Every transaction that could fill it has ended: it stays empty.
                Some(h) if h.start == expected && xmin > h.xid => {}
                Some(h) if h.start == expected => break,
                _ => {
                    // Seen now; its transaction id is taken right after this snapshot.
                    next.hole = Some(Hole {
                        start: expected,
                        xid: i64::MAX,
                    });
                    new_hole = true;
                    break;
                }
            }
        }
        next.hole = None;
        next.cursor = event.sequence;
        out.push(event);
    }
    Ok((out, next, new_hole))
}

/// The log head every replica can agree on at start: the newest sequence of a snapshot,
/// once every transaction running at that snapshot has ended (so nothing at or below it
/// can still commit).
pub(super) fn settled_head(conn: &mut Conn) -> Result<u64> {
    let max_seq: i64 = conn
        .client
        .query_one("SELECT COALESCE(MAX(seq), 0) FROM placement_events", &[])
        .map_err(|e| pg_error(&e))?
        .get(0);
    let xid = fresh_xid(conn)?;
    for _ in 0..6000 {
        let xmin: i64 = conn
            .client
            .query_one(
                "SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS text) AS bigint)",
                &[],
            )
            .map_err(|e| pg_error(&e))?
            .get(0);
        if xmin > xid {
            return Ok(to_u64(max_seq));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(Error::Unavailable(
        "a transaction older than this start is still running; retry".into(),
    ))
}

/// What the tailer task needs (it outlives no one: it stops with the store).
pub(super) struct TailerParts {
    pub(super) pool: Arc<Pool>,
    pub(super) feed: Arc<Feed>,
    pub(super) wake: Arc<Notify>,
    pub(super) stop: CancellationToken,
    pub(super) poll: Duration,
    pub(super) retention: u64,
    pub(super) remote: Arc<Notify>,
    pub(super) notify: NotifyMode,
}

impl TailerParts {
    /// Follows the placement log from `head` until the store stops: reads and publishes
    /// what was committed whenever woken (or polled), then prunes.
    pub(super) async fn run(self, head: u64) {
        let mut tail = Tail {
            cursor: head,
            hole: None,
        };
        let mut pruned = 0u64;
        let mut hole_wait = Duration::ZERO;
        loop {
            // At a hole, look again soon, less often the longer it stays open.
            let wait = if tail.hole.is_some() {
                hole_wait =
                    (hole_wait * 2).clamp(Duration::from_millis(1), Duration::from_millis(50));
                hole_wait
            } else {
                hole_wait = Duration::ZERO;
                self.poll
            };
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {
                    if self.notify == NotifyMode::Off {
                        // Without notifications, a poll that finds events stands for them.
                        self.remote.notify_one();
                    }
                }
            }
            tail = self.read_log(tail).await;
            pruned = self.prune(pruned).await;
        }
    }

    /// Reads the log after `tail` and publishes it, 4096 events at a time until a read
    /// returns fewer; a failed read is logged and left for the next round. Returns the
    /// position reached.
    async fn read_log(&self, mut tail: Tail) -> Tail {
        loop {
            let read = self
                .pool
                .run(move |conn| {
                    let (events, mut next, new_hole) = tail_read(conn, tail, 4096)?;
                    if new_hole {
                        if let Some(h) = next.hole.as_mut() {
                            h.xid = fresh_xid(conn)?;
                        }
                    }
                    Ok((events, next))
                })
                .await;
            match read {
                Ok((events, next)) => {
                    let more = events.len() == 4096;
                    tail = next;
                    self.feed.publish(events);
                    if !more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the placement log; retrying");
                    break;
                }
            }
        }
        tail
    }

    /// Prunes the log, in steps of a tenth of the retention (any replica may; they agree).
    /// `pruned`: the sequence the log was last pruned through; returns it, moved on when
    /// this prune happened.
    async fn prune(&self, pruned: u64) -> u64 {
        let (head, retention) = (self.feed.head(), self.retention);
        if head.saturating_sub(pruned) <= retention + retention / 10 {
            return pruned;
        }
        let through = to_i64(head - retention);
        let outcome = self
            .pool.run(move |conn| {
                let mut tx = conn.client.transaction().map_err(|e| pg_error(&e))?;
                tx.execute("DELETE FROM placement_events WHERE seq <= $1", &[&through])
                    .map_err(|e| pg_error(&e))?;
                tx.execute(
                    "UPDATE log_meta SET pruned_through = GREATEST(pruned_through, $1) WHERE id = 1",
                    &[&through],
                )
                .map_err(|e| pg_error(&e))?;
                tx.commit().map_err(|e| pg_error(&e))
            })
            .await;
        match outcome {
            Ok(()) => to_u64(through),
            Err(e) => {
                tracing::warn!(error = %e, "cannot prune the placement log");
                pruned
            }
        }
    }
}
