//! The application layer: every use case of deploy-svc as a transaction over [`Db`],
//! written once for both backends. Each write runs in one transaction with its placement
//! events (transactional outbox) and its audit record; the [`Backend`] owns connections and
//! transactions (the SQLite one commits in groups from one writer thread; the PostgreSQL
//! one runs each write as a serializable transaction on a pool, retried on serialization
//! failure).
//!
//! One module per resource: `environments`, `targets` (with `inventory`),
//! `artifacts`, `deployments`, `reports` (placement reports and agents' orders),
//! `audit` (the trail and request-id idempotency) and `tick` (the background pass that
//! paces deployments and notices lost agents). [`SqlStore`] implements [`Store`] by
//! calling them.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::audit::{AuditEntry, AuditFilter, AuditRecord, Caller};
use crate::domain::clock::Millis;
use crate::domain::inventory::{EnvironmentInventory, InventoryQuery, TargetVersion};
use crate::domain::model::{
    Artifact, Deployment, DeploymentFilter, EmergencyOverride, Environment, EnvironmentUpdate,
    LogBounds, NewDeployment, NewEnvironment, Page, PageRequest, Placement, PlacementEvent,
    PlacementReport, ReportOutcome, Target,
};
use crate::domain::{Error, Result};
use crate::store::backend::{internal, Backend};
use crate::store::db::Db;
use crate::store::Store;
pub(crate) use reports::apply_group;
pub use reports::OrderRow;

mod artifacts;
mod audit;
mod deployments;
mod environments;
mod inventory;
mod reports;
mod targets;
mod tick;

/// A [`Store`] over a [`Backend`].
#[derive(Debug)]
pub struct SqlStore<B> {
    pub(crate) backend: B,
    /// Rung after each commit that may change orders (see [`Store::order_changes`]).
    orders: tokio::sync::watch::Sender<u64>,
}

impl<B: Backend> SqlStore<B> {
    /// The application over `backend`.
    pub(crate) fn new(backend: B) -> Self {
        Self {
            backend,
            orders: tokio::sync::watch::channel(0).0,
        }
    }

    /// Rings [`Store::order_changes`].
    fn orders_changed(&self) {
        self.orders.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Rings [`Store::order_changes`] once `written` committed.
    fn ring<T>(&self, written: Result<T>) -> Result<T> {
        if written.is_ok() {
            self.orders_changed();
        }
        written
    }

    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&dyn Db, Millis, &mut Vec<PlacementEvent>) -> Result<T> + Send + Sync + 'static,
    {
        self.backend.write(Arc::new(f)).await
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Db) -> Result<T> + Send + 'static,
    {
        self.backend.read(Box::new(f)).await
    }
}

fn map_json(map: &BTreeMap<String, String>) -> Result<String> {
    serde_json::to_string(map).map_err(internal)
}

/// A stored JSON map column (`table`.`column` of `row`), strictly.
fn json_map(
    table: &str,
    column: &str,
    row: &dyn std::fmt::Display,
    s: &str,
) -> Result<BTreeMap<String, String>> {
    serde_json::from_str(s).map_err(|e| Error::corrupt(table, row, format!("{column}: {e}")))
}

fn page<T>(mut items: Vec<T>, size: usize, key: impl Fn(&T) -> String) -> Page<T> {
    let next = if items.len() > size {
        items.truncate(size);
        items.last().map(key)
    } else {
        None
    };
    Page { items, next }
}

pub(super) fn limit(size: usize) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX).saturating_add(1)
}

#[async_trait]
impl<B: Backend> Store for SqlStore<B> {
    async fn create_environment(
        &self,
        env: NewEnvironment,
        request_id: Option<String>,
        caller: Caller,
    ) -> Result<Environment> {
        environments::create_environment(self, env, request_id, caller).await
    }

    async fn get_environment(&self, id: &str) -> Result<Environment> {
        environments::get_environment(self, id).await
    }

    async fn list_environments(&self, req: PageRequest) -> Result<Page<Environment>> {
        environments::list_environments(self, req).await
    }

    async fn update_environment(
        &self,
        update: EnvironmentUpdate,
        caller: Caller,
    ) -> Result<Environment> {
        environments::update_environment(self, update, caller).await
    }

    async fn register_target(
        &self,
        environment: &str,
        id: &str,
        labels: BTreeMap<String, String>,
        caller: Caller,
    ) -> Result<Target> {
        targets::register_target(self, environment, id, labels, caller).await
    }

    async fn list_targets(
        &self,
        environment: &str,
        req: PageRequest,
    ) -> Result<Page<(Target, Vec<TargetVersion>)>> {
        targets::list_targets(self, environment, req).await
    }

    async fn inventory(&self, query: InventoryQuery) -> Result<Page<EnvironmentInventory>> {
        targets::inventory(self, query).await
    }

    async fn audit_event(&self, caller: Caller, entry: AuditEntry) -> Result<()> {
        audit::audit_event(self, caller, entry).await
    }

    async fn heartbeat_target(&self, environment: &str, id: &str) -> Result<Target> {
        targets::heartbeat_target(self, environment, id).await
    }

    async fn register_artifact(&self, artifact: Artifact, caller: Caller) -> Result<Artifact> {
        artifacts::register_artifact(self, artifact, caller).await
    }

    async fn get_artifact(&self, name: &str, version: &str) -> Result<Artifact> {
        artifacts::get_artifact(self, name, version).await
    }

    async fn list_artifacts(
        &self,
        name: Option<String>,
        req: PageRequest,
    ) -> Result<Page<Artifact>> {
        artifacts::list_artifacts(self, name, req).await
    }

    async fn create_deployment(
        &self,
        new: NewDeployment,
        request_id: Option<String>,
        caller: Caller,
    ) -> Result<Deployment> {
        self.ring(deployments::create_deployment(self, new, request_id, caller).await)
    }

    async fn get_deployment(&self, id: i64) -> Result<Deployment> {
        deployments::get_deployment(self, id).await
    }

    async fn list_deployments(
        &self,
        filter: DeploymentFilter,
        req: PageRequest,
    ) -> Result<Page<Deployment>> {
        deployments::list_deployments(self, filter, req).await
    }

    async fn cancel_deployment(
        &self,
        id: i64,
        reason: String,
        caller: Caller,
    ) -> Result<Deployment> {
        self.ring(deployments::cancel_deployment(self, id, reason, caller).await)
    }

    async fn continue_deployment(&self, id: i64, caller: Caller) -> Result<Deployment> {
        self.ring(deployments::continue_deployment(self, id, caller).await)
    }

    async fn rollback_deployment(
        &self,
        id: i64,
        reason: String,
        emergency: Option<EmergencyOverride>,
        caller: Caller,
    ) -> Result<Deployment> {
        self.ring(deployments::rollback_deployment(self, id, reason, emergency, caller).await)
    }

    async fn orders(&self, environment: &str, target: &str) -> Result<Vec<OrderRow>> {
        reports::orders(self, environment, target).await
    }

    async fn tick(&self, agent_timeout_ms: i64) -> Result<bool> {
        let worked = tick::tick(self, agent_timeout_ms).await?;
        if worked {
            self.orders_changed();
        }
        Ok(worked)
    }

    async fn report_placement(
        &self,
        report: PlacementReport,
        caller: Caller,
    ) -> Result<ReportOutcome> {
        let outcome = reports::report_placement(self, report, caller).await?;
        if outcome.changed {
            self.orders_changed();
        }
        Ok(outcome)
    }

    async fn list_audit_records(
        &self,
        filter: AuditFilter,
        req: PageRequest,
    ) -> Result<Page<AuditRecord>> {
        audit::list_audit_records(self, filter, req).await
    }

    async fn read_events(&self, after: u64, max: usize) -> Result<Vec<PlacementEvent>> {
        self.backend.read_events(after, max).await
    }

    async fn snapshot(&self) -> Result<(Vec<Placement>, u64)> {
        self.backend.snapshot().await
    }

    async fn log_bounds(&self) -> Result<LogBounds> {
        self.backend.log_bounds().await
    }

    fn order_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.orders.subscribe()
    }

    fn remote_orders_changed(&self) {
        self.orders_changed();
    }

    fn remote_changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.backend.remote_changes()
    }

    fn writer_alive(&self) -> tokio::sync::watch::Receiver<bool> {
        self.backend.writer_alive()
    }

    async fn close(&self) {
        self.backend.close().await;
    }
}
