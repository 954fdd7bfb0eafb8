//! The placement log as the backends read it: retained events, the pruned bound, and every
//! placement for a snapshot.

use crate::domain::model::{Placement, PlacementEvent, PlacementState};
use crate::domain::{Error, Result};
use crate::store::backend::{to_i64, to_u64};
use crate::store::db::{p, Db, SqlRow};

/// An event read with `placement_events`' columns (by name).
pub(crate) fn event_row(r: &SqlRow) -> Result<PlacementEvent> {
    let stored: i64 = r.col("seq")?;
    let seq = u64::try_from(stored)
        .map_err(|e| Error::corrupt("placement_events", &stored, format!("seq: {e}")))?;
    let state = |column: &str| placement_state("placement_events", column, &seq, r.col(column)?);
    Ok(PlacementEvent {
        sequence: seq,
        commit_ms: r.col("commit_ms")?,
        previous_state: state("previous_state")?,
        placement: Placement {
            deployment: r.col("deployment")?,
            environment: r.col("environment")?,
            target: r.col("target")?,
            artifact: r.col("artifact")?,
            version: r.col("version")?,
            digest: r.col("digest")?,
            state: state("state")?,
            message: r.col("message")?,
            sequence: seq,
            update_ms: r.col("commit_ms")?,
        },
        trace_parent: r.col("trace_parent")?,
    })
}

/// Where event retention has pruned the log through.
pub(crate) fn pruned_through(conn: &dyn Db) -> Result<u64> {
    let pruned: i64 = conn.row(
        "SELECT pruned_through FROM log_meta WHERE id = 1",
        &[],
        |r| r.col("pruned_through"),
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

/// A placement read with [`all_placements`]' columns (by name).
pub(crate) fn placement_row(r: &SqlRow) -> Result<Placement> {
    let (deployment, target): (i64, String) = (r.col("deployment")?, r.col("target")?);
    let state = placement_state(
        "placements",
        "state",
        &format!("{deployment}/{target}"),
        r.col("state")?,
    )?;
    Ok(Placement {
        deployment,
        environment: r.col("environment")?,
        target,
        artifact: r.col("artifact")?,
        version: r.col("version")?,
        digest: r.col("digest")?,
        state,
        message: r.col("message")?,
        sequence: to_u64(r.col("seq")?),
        update_ms: r.col("update_ms")?,
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
