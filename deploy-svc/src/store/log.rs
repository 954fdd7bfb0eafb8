//! The placement log as the backends read it: retained events, the pruned bound, and every
//! placement for a snapshot.

use crate::domain::model::{Placement, PlacementEvent, PlacementState};
use crate::domain::{Error, Result};
use crate::store::backend::{to_i64, to_u64};
use crate::store::db::{p, Db, SqlRow};

pub(crate) fn event_row(r: &SqlRow) -> Result<PlacementEvent> {
    let stored: i64 = r.get(0)?;
    let seq = u64::try_from(stored)
        .map_err(|e| Error::corrupt("placement_events", &stored, format!("seq: {e}")))?;
    let state =
        |i: usize, column: &str| placement_state("placement_events", column, &seq, r.get(i)?);
    Ok(PlacementEvent {
        sequence: seq,
        commit_ms: r.get(1)?,
        previous_state: state(9, "previous_state")?,
        placement: Placement {
            deployment: r.get(2)?,
            environment: r.get(3)?,
            target: r.get(4)?,
            artifact: r.get(5)?,
            version: r.get(6)?,
            digest: r.get(7)?,
            state: state(8, "state")?,
            message: r.get(10)?,
            sequence: seq,
            update_ms: r.get(1)?,
        },
        trace_parent: r.get(11)?,
    })
}

/// Where event retention has pruned the log through.
pub(crate) fn pruned_through(conn: &dyn Db) -> Result<u64> {
    let pruned: i64 = conn.row(
        "SELECT pruned_through FROM log_meta WHERE id = 1",
        &[],
        |r| r.get(0),
    )?;
    Ok(to_u64(pruned))
}

/// Up to `max` retained events after `after` and at most `through`, in order; the
/// retention error when events after `after` were pruned.
pub(crate) fn read_log(
    conn: &dyn Db,
    after: u64,
    through: u64,
    max: usize,
) -> Result<Vec<PlacementEvent>> {
    let pruned = pruned_through(conn)?;
    if after < pruned {
        return Err(crate::placement_log::retention_error(after, pruned));
    }
    conn.all(
        "SELECT seq, commit_ms, deployment, environment, target, artifact, version, digest, state, previous_state, message, trace_parent
         FROM placement_events WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
        p![to_i64(after), to_i64(through), i64::try_from(max).unwrap_or(i64::MAX)],
        event_row,
    )
}

/// Every placement in its current state, by sequence.
pub(crate) fn all_placements(conn: &dyn Db) -> Result<Vec<Placement>> {
    conn.all(
        "SELECT p.deployment, d.environment, p.target, d.artifact, d.version, a.digest, p.state, p.message, p.seq, p.update_ms
         FROM placements p JOIN deployments d ON d.id = p.deployment
         JOIN artifacts a ON a.name = d.artifact AND a.version = d.version
         ORDER BY p.seq",
        &[],
        placement_row,
    )
}

/// A placement read with [`all_placements`]' columns.
pub(crate) fn placement_row(r: &SqlRow) -> Result<Placement> {
    let (deployment, target): (i64, String) = (r.get(0)?, r.get(2)?);
    let state = placement_state(
        "placements",
        "state",
        &format!("{deployment}/{target}"),
        r.get(6)?,
    )?;
    Ok(Placement {
        deployment,
        environment: r.get(1)?,
        target,
        artifact: r.get(3)?,
        version: r.get(4)?,
        digest: r.get(5)?,
        state,
        message: r.get(7)?,
        sequence: to_u64(r.get(8)?),
        update_ms: r.get(9)?,
    })
}

/// A stored placement state (`column` of `table`'s `row`), strictly.
pub(crate) fn placement_state(
    table: &str,
    column: &str,
    row: &dyn std::fmt::Display,
    code: i64,
) -> Result<PlacementState> {
    PlacementState::from_code(code)
        .ok_or_else(|| Error::corrupt(table, row, format!("{column}: unknown state {code}")))
}
