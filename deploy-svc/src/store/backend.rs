//! What a database backend provides the application layer: write and read transactions,
//! the log, and liveness.

use std::sync::Arc;

use async_trait::async_trait;

use super::db::Db;
use crate::domain::audit::Caller;
use crate::domain::clock::Millis;
use crate::domain::model::{LogBounds, Placement, PlacementEvent, PlacementReport, ReportOutcome};
use crate::domain::{Error, Result};

pub(crate) use service_kit::time::{to_i64, to_u64};

/// A write: runs inside the backend's transaction, may be run again when the backend
/// retries the transaction, pushes the events it appends.
pub type WriteJob<T> =
    Arc<dyn Fn(&dyn Db, Millis, &mut Vec<PlacementEvent>) -> Result<T> + Send + Sync>;
/// A read: runs inside one consistent snapshot.
pub type ReadJob<T> = Box<dyn FnOnce(&dyn Db) -> Result<T> + Send>;

/// Connections and transactions of one database.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Runs `job` in a write transaction and commits; the result is returned only once the
    /// commit is durable.
    async fn write<T: Send + 'static>(&self, job: WriteJob<T>) -> Result<T>;
    /// A placement report: a write run with `lock`'s deployment locked against every other
    /// writer (the backend takes the lock before the job starts). Reports may be committed
    /// together, and a backend may apply `input` alongside other reports' inputs in fewer
    /// statements instead of running `job` (the same rules: see [`crate::app`]).
    async fn report(
        &self,
        lock: ReportLock,
        input: Arc<ReportInput>,
        job: WriteJob<ReportOutcome>,
    ) -> Result<ReportOutcome>;
    /// Runs `job` on a consistent snapshot.
    async fn read<T: Send + 'static>(&self, job: ReadJob<T>) -> Result<T>;
    /// Up to `max` events after `after` that watchers may see, in order.
    async fn read_events(&self, after: u64, max: usize) -> Result<Vec<PlacementEvent>>;
    /// Every placement and the sequence the set reflects.
    async fn snapshot(&self) -> Result<(Vec<Placement>, u64)>;
    /// The bounds of the retained log.
    async fn log_bounds(&self) -> Result<LogBounds>;
    /// Rung when another replica committed (see [`super::Store::remote_changes`]).
    fn remote_changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
    /// See [`super::Store::writer_alive`].
    fn writer_alive(&self) -> tokio::sync::watch::Receiver<bool> {
        tokio::sync::watch::channel(true).1
    }
    /// Finishes queued writes and stops.
    async fn close(&self);
}

/// What a placement report locks: its deployment's row (taken by the backend before the job
/// runs) and its target's row (the heartbeat it writes). Ordered by target, so a backend
/// that commits reports together can take the target rows in one order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReportLock {
    /// The target's environment.
    pub environment: String,
    /// The target.
    pub target: String,
    /// The deployment.
    pub deployment: i64,
}

/// A placement report and its caller, as the application applies it.
#[derive(Debug, Clone)]
pub struct ReportInput {
    /// The report.
    pub report: PlacementReport,
    /// Who sent it.
    pub caller: Caller,
}

pub(crate) fn internal(e: impl std::error::Error) -> Error {
    Error::internal(e)
}
