//! Storage: the [`Store`] trait the handlers call, and the databases under it.
//!
//! # Layout
//!
//! - [`Store`]: every read and write the service needs. Each write is one transaction that
//!   includes its placement events (transactional outbox) and its audit record: every
//!   mutating method takes the [`Caller`] the record names. Implemented once, by the
//!   application layer (the crate's `app` module), over a [`backend::Backend`].
//! - [`db`]: the small SQL surface (`Db`) the application layer's SQL is written against.
//! - [`backend`]: what a database provides: write and read transactions, the log, liveness.
//! - [`log`]: the placement log as the backends read it.
//! - [`postgres`]: PostgreSQL (`postgres://` URL), for several replicas on one database.
//! - [`sqlite`]: the embedded default (WAL, group commit by one writer thread).
//! - `migrations/sqlite/`, `migrations/postgres/`: embedded schema migrations.

pub mod backend;
pub mod db;
pub mod log;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::domain::audit::{AuditEntry, AuditFilter, AuditRecord, Caller};
use crate::domain::inventory::{EnvironmentInventory, InventoryQuery, TargetVersion};
use crate::domain::model::{
    Artifact, Deployment, DeploymentFilter, EmergencyOverride, Environment, EnvironmentUpdate,
    LogBounds, NewDeployment, NewEnvironment, Page, PageRequest, Placement, PlacementEvent,
    PlacementReport, ReportOutcome, Target,
};
use crate::domain::Result;

pub use crate::app::OrderRow;

/// Every read and write of deploy-svc.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates an environment (idempotent per `request_id`).
    async fn create_environment(
        &self,
        env: NewEnvironment,
        request_id: Option<String>,
        caller: Caller,
    ) -> Result<Environment>;
    /// Reads one environment.
    async fn get_environment(&self, id: &str) -> Result<Environment>;
    /// Lists environments by id.
    async fn list_environments(&self, page: PageRequest) -> Result<Page<Environment>>;
    /// Applies a partial update with optimistic concurrency.
    async fn update_environment(
        &self,
        update: EnvironmentUpdate,
        caller: Caller,
    ) -> Result<Environment>;

    /// Registers or re-registers a target.
    async fn register_target(
        &self,
        environment: &str,
        id: &str,
        labels: BTreeMap<String, String>,
        caller: Caller,
    ) -> Result<Target>;
    /// Lists the targets of an environment by id, each with the current version of every
    /// artifact placed on it.
    async fn list_targets(
        &self,
        environment: &str,
        page: PageRequest,
    ) -> Result<Page<(Target, Vec<TargetVersion>)>>;
    /// One page of the inventory: environment x artifact entries, grouped by environment
    /// (NOT_FOUND for an unknown environment named by the query).
    async fn inventory(&self, query: InventoryQuery) -> Result<Page<EnvironmentInventory>>;
    /// Records a heartbeat (not audited: a liveness signal, not a change).
    async fn heartbeat_target(&self, environment: &str, id: &str) -> Result<Target>;

    /// Registers an immutable artifact version (idempotent for the same digest).
    async fn register_artifact(&self, artifact: Artifact, caller: Caller) -> Result<Artifact>;
    /// Reads one artifact version.
    async fn get_artifact(&self, name: &str, version: &str) -> Result<Artifact>;
    /// Lists artifact versions.
    async fn list_artifacts(
        &self,
        name: Option<String>,
        page: PageRequest,
    ) -> Result<Page<Artifact>>;

    /// Creates a deployment after checking the promotion rules and the freeze windows at
    /// the commit time (idempotent per `request_id`), with one PENDING placement event per
    /// included target.
    async fn create_deployment(
        &self,
        deployment: NewDeployment,
        request_id: Option<String>,
        caller: Caller,
    ) -> Result<Deployment>;
    /// Reads one deployment with its placements.
    async fn get_deployment(&self, id: i64) -> Result<Deployment>;
    /// Lists deployments newest first, without placements.
    async fn list_deployments(
        &self,
        filter: DeploymentFilter,
        page: PageRequest,
    ) -> Result<Page<Deployment>>;
    /// Cancels an unfinished deployment.
    async fn cancel_deployment(
        &self,
        id: i64,
        reason: String,
        caller: Caller,
    ) -> Result<Deployment>;

    /// Lets a running canary deployment order the rest of its targets.
    async fn continue_deployment(&self, id: i64, caller: Caller) -> Result<Deployment>;
    /// Redeploys the previous successful version on the targets deployment `id` touched
    /// (cancelling it if it still runs); returns the new deployment.
    async fn rollback_deployment(
        &self,
        id: i64,
        reason: String,
        emergency: Option<EmergencyOverride>,
        caller: Caller,
    ) -> Result<Deployment>;
    /// The unfinished ordered placements of one target.
    async fn orders(&self, environment: &str, target: &str) -> Result<Vec<OrderRow>>;
    /// Periodic work: fails the placements of agents silent for `agent_timeout_ms`, lets
    /// baked canaries continue, rolls back failed deployments that asked for it. Returns
    /// whether anything changed.
    async fn tick(&self, agent_timeout_ms: i64) -> Result<bool>;

    /// Applies a placement report and writes its event in the same transaction.
    async fn report_placement(
        &self,
        report: PlacementReport,
        caller: Caller,
    ) -> Result<ReportOutcome>;

    /// Appends an audit record that changes no resource: a refused action (a placement
    /// report for a target outside the caller's binding) or a grant (an emergency override).
    async fn audit_event(&self, caller: Caller, entry: AuditEntry) -> Result<()>;

    /// Lists audit records by id ascending; the page position is the last id returned.
    async fn list_audit_records(
        &self,
        filter: AuditFilter,
        page: PageRequest,
    ) -> Result<Page<AuditRecord>>;

    /// Reads up to `limit` events with a sequence greater than `after`, in order. Fails
    /// with the retention error if events after `after` were pruned.
    async fn read_events(&self, after: u64, limit: usize) -> Result<Vec<PlacementEvent>>;
    /// A consistent snapshot of every placement in its current state and the
    /// sequence it reflects.
    async fn snapshot(&self) -> Result<(Vec<Placement>, u64)>;
    /// The bounds of the retained log.
    async fn log_bounds(&self) -> Result<LogBounds>;

    /// Changes after every commit that may have changed some target's orders: a deployment
    /// created, cancelled, continued or rolled back, a report that moved its deployment on,
    /// a tick that did work, and (see [`Store::remote_orders_changed`]) another replica's
    /// commits. WatchOrders streams re-read their target's orders when it changes.
    fn order_changes(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Tells [`Store::order_changes`] that another replica committed.
    fn remote_orders_changed(&self);

    /// Rung when another replica changed something (orders included), for backends shared
    /// by several replicas; `None` when this process is the only writer.
    fn remote_changes(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }

    /// Whether the store can still write: true until it cannot (the SQLite writer thread
    /// died), then false for good. The serve loop turns health NOT_SERVING on false.
    fn writer_alive(&self) -> tokio::sync::watch::Receiver<bool> {
        tokio::sync::watch::channel(true).1
    }

    /// Finishes queued writes and stops accepting new ones.
    async fn close(&self);
}
