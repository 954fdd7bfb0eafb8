//! gRPC handlers of `deploy.v1.DeployService`: decode, validate (in [`convert`]), call the
//! store or the placement log, map the error (`service_kit::status`), encode. Mutating
//! handlers pass the [`Caller`] (principal and request id, from [`caller`]) to the store,
//! which writes the audit record in the change's transaction.
//!
//! # Layout
//!
//! - [`convert`]: proto <-> domain conversions and request validation.
//! - [`watch`]: WatchPlacements on the wire, each event encoded once for all watchers.

pub mod convert;
pub mod watch;

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use proto::deploy::v1 as pb;
use proto::deploy::v1::deploy_service_server::DeployService;
use service_kit::auth::{self, Permission};
use service_kit::streams::StreamCap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::domain::audit::{AuditEntry, AuditFilter, Caller};
use crate::domain::clock::Clock;
use crate::domain::inventory::InventoryQuery;
use crate::domain::model::HealthWindows;
use crate::domain::names;
use crate::placement_log::{self, Feed, WatchLimits};
use crate::store::Store;

/// The DeployService implementation.
#[derive(Clone)]
pub struct DeployApi {
    store: Arc<dyn Store>,
    feed: Arc<Feed>,
    clock: Arc<dyn Clock>,
    health: HealthWindows,
    watch_limits: WatchLimits,
    /// Open WatchPlacements streams, at most `watch_limits.max_watchers`.
    watchers: StreamCap,
    streams: CancellationToken,
    tasks: TaskTracker,
}

impl DeployApi {
    /// Opens a watch: validates the request and takes a place under the cap on watchers.
    /// Served by [`watch::WatchRoute`]; the generated trait method shares it.
    pub async fn open_watch(
        &self,
        request: pb::WatchPlacementsRequest,
    ) -> std::result::Result<placement_log::WatchStream, Status> {
        let request = convert::watch_request(request)?;
        let slot = self.watchers.take()?;
        Ok(placement_log::watch(
            self.store.clone(),
            self.feed.clone(),
            request,
            self.watch_limits,
            slot,
            self.streams.clone(),
            &self.tasks,
        )
        .await?)
    }

    /// A service over `store`; watch streams end when `streams` is cancelled.
    pub fn new(
        store: Arc<dyn Store>,
        feed: Arc<Feed>,
        clock: Arc<dyn Clock>,
        health: HealthWindows,
        watch_limits: WatchLimits,
        streams: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            store,
            feed,
            clock,
            health,
            watch_limits,
            watchers: StreamCap::new(watch_limits.max_watchers, "placement watches"),
            streams,
            tasks,
        }
    }
}

type Result<T> = std::result::Result<Response<T>, Status>;

/// How long an emergency grant may be used.
const GRANT_VALIDITY_MS: i64 = 3_600_000;

impl DeployApi {
    /// Checks the method's permission in the environment of deployment `id` (NOT_FOUND
    /// first for an unknown deployment); returns that environment.
    async fn require_deployment(
        &self,
        access: &auth::Caller,
        id: i64,
    ) -> std::result::Result<String, Status> {
        let environment = self.store.get_deployment(id).await?.environment;
        access.require_environment(&environment)?;
        Ok(environment)
    }

    /// With authentication on, an emergency override names an approver who granted it to
    /// the caller in this environment within the last hour (GrantEmergencyOverride): the
    /// two-person rule rests on both principals' own calls, never on a typed name.
    async fn require_grant(
        &self,
        access: &auth::Caller,
        environment: &str,
        approver: &str,
    ) -> std::result::Result<(), Status> {
        if !access.authenticated() {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let filter = AuditFilter {
            resource: Some(names::environment_name(environment)),
            principal: Some(approver.to_owned()),
            start_ms: Some(now - GRANT_VALIDITY_MS),
            end_ms: None,
        };
        let mut after = None;
        loop {
            let page = self
                .store
                .list_audit_records(
                    filter.clone(),
                    crate::domain::model::PageRequest { size: 1000, after },
                )
                .await?;
            if page
                .items
                .iter()
                .any(|r| r.action == "GrantEmergencyOverride" && r.after == access.principal())
            {
                return Ok(());
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        Err(crate::domain::Error::precondition(
            "EMERGENCY_NOT_GRANTED",
            names::environment_name(environment),
            format!(
                "{approver} has not granted {} an emergency override here within the last hour (GrantEmergencyOverride)",
                access.principal()
            ),
        )
        .into())
    }

    /// The proto form of `target`, its health as of now.
    fn target(&self, target: crate::domain::model::Target) -> pb::Target {
        convert::target(target, &self.health, self.clock.now_ms())
    }

    /// Removing or shortening the freeze windows of an environment while one is active
    /// needs the override permission there, as does lifting `protected`.
    async fn check_freeze_removal(
        &self,
        access: &auth::Caller,
        update: &crate::domain::model::EnvironmentUpdate,
    ) -> std::result::Result<(), Status> {
        if update.freeze_windows.is_none() && update.protected != Some(false) {
            return Ok(());
        }
        let current = self.store.get_environment(&update.id).await?;
        let now = self.clock.now_ms();
        let lifts_protection = current.protected && update.protected == Some(false);
        let lifts_freeze = update.freeze_windows.as_ref().is_some_and(|windows| {
            let active = crate::domain::freeze::active_names(&current, now);
            let mut next = current.clone();
            next.freeze_windows = windows.clone();
            let still = crate::domain::freeze::active_names(&next, now);
            active.iter().any(|name| !still.contains(name))
        });
        if lifts_protection || lifts_freeze {
            access.require(Permission::FreezeOverride, &update.id)?;
        }
        Ok(())
    }
}

/// The metadata key of a request id for calls whose request has no `request_id` field.
pub use service_kit::principal::REQUEST_ID_METADATA;

/// Who makes a call: the principal (authenticated, or `x-principal` with authentication
/// off; see [`service_kit::auth`]), the `x-request-id` metadata (empty when absent) and,
/// while traces are exported, the call's span (for the placement events it causes). Bad
/// values are INVALID_ARGUMENT naming the metadata key.
pub fn caller<T>(req: &Request<T>) -> std::result::Result<Caller, Status> {
    let principal = auth::caller(req)?.principal().to_owned();
    let request_id = service_kit::principal::request_id("", req.metadata())?;
    Ok(Caller {
        principal,
        request_id,
        trace_parent: service_kit::otel::current_traceparent(),
    })
}

/// The prologue of a mutating call: what the caller may do (its grants, for the
/// permission checks) and who it is (for the audit record), in that order.
fn access_and_caller<T>(req: &Request<T>) -> std::result::Result<(auth::Caller, Caller), Status> {
    let access = auth::caller(req)?;
    let caller = caller(req)?;
    Ok((access, caller))
}

/// The response stream of WatchOrders.
pub type WatchOrdersStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::Order, Status>> + Send>>;

/// Sends the target's unfinished orders, each once, re-reading them whenever the orders
/// bell rings (and every 5 s in case a ring was missed); ends with UNAVAILABLE on shutdown.
fn order_stream(
    store: Arc<dyn Store>,
    environment: String,
    target: String,
    mut bell: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
) -> WatchOrdersStream {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut sent = std::collections::BTreeSet::new();
        loop {
            match store.orders(&environment, &target).await {
                Ok(rows) => {
                    let live: std::collections::BTreeSet<i64> =
                        rows.iter().map(|r| r.deployment).collect();
                    for r in rows {
                        if sent.insert(r.deployment) {
                            let order = pb::Order {
                                deployment: crate::domain::names::deployment_name(r.deployment),
                                artifact: r.artifact,
                                version: r.version,
                                digest: r.digest,
                                source_uri: r.source_uri,
                                action: pb::OrderAction::Place.into(),
                            };
                            if tx.send(Ok(order)).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Finished orders leave the set: a new deployment gets a new id anyway.
                    sent.retain(|d| live.contains(d));
                }
                Err(e) => {
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
            }
            let go_on = tokio::select! {
                () = stop.cancelled() => false,
                // The agent went away: stop reading its orders.
                () = tx.closed() => return,
                r = bell.changed() => r.is_ok(),
                () = tokio::time::sleep(std::time::Duration::from_secs(5)) => true,
            };
            if !go_on {
                let _ = tx
                    .send(Err(Status::unavailable(
                        "deploy-svc is shutting down; reconnect to WatchOrders",
                    )))
                    .await;
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The response stream of WatchPlacements.
pub type WatchPlacementsStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::WatchPlacementsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DeployService for DeployApi {
    async fn create_environment(
        &self,
        req: Request<pb::CreateEnvironmentRequest>,
    ) -> Result<pb::Environment> {
        let (access, caller) = access_and_caller(&req)?;
        let (env, request_id) = convert::new_environment(req.into_inner())?;
        access.require_environment(&env.id)?;
        let caller = caller.with_request_id(request_id.as_deref());
        let env = self
            .store
            .create_environment(env, request_id, caller)
            .await?;
        Ok(Response::new(convert::environment(env)))
    }

    async fn get_environment(
        &self,
        req: Request<pb::GetEnvironmentRequest>,
    ) -> Result<pb::Environment> {
        let id = convert::name("name", &req.into_inner().name, names::parse_environment)?;
        Ok(Response::new(convert::environment(
            self.store.get_environment(&id).await?,
        )))
    }

    async fn list_environments(
        &self,
        req: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<pb::ListEnvironmentsResponse> {
        let page = convert::environments_query(req.get_ref())?;
        let page = self.store.list_environments(page).await?;
        let (environments, next_page_token) = convert::list_page(page, convert::environment);
        Ok(Response::new(pb::ListEnvironmentsResponse {
            environments,
            next_page_token,
        }))
    }

    async fn update_environment(
        &self,
        req: Request<pb::UpdateEnvironmentRequest>,
    ) -> Result<pb::Environment> {
        let (access, caller) = access_and_caller(&req)?;
        let update = convert::environment_update(req.into_inner())?;
        access.require_environment(&update.id)?;
        self.check_freeze_removal(&access, &update).await?;
        Ok(Response::new(convert::environment(
            self.store.update_environment(update, caller).await?,
        )))
    }

    async fn register_target(&self, req: Request<pb::RegisterTargetRequest>) -> Result<pb::Target> {
        let (access, caller) = access_and_caller(&req)?;
        let (env, id, labels) = convert::register_target(req.into_inner())?;
        access.require_target(&env, &id)?;
        let target = self
            .store
            .register_target(&env, &id, labels, caller)
            .await?;
        Ok(Response::new(self.target(target)))
    }

    async fn list_targets(
        &self,
        req: Request<pb::ListTargetsRequest>,
    ) -> Result<pb::ListTargetsResponse> {
        let (env, page) = convert::targets_query(req.get_ref())?;
        let page = self.store.list_targets(&env, page).await?;
        let now = self.clock.now_ms();
        let (targets, next_page_token) = convert::list_page(page, |(t, versions)| {
            convert::target_with_versions(t, versions, &self.health, now)
        });
        Ok(Response::new(pb::ListTargetsResponse {
            targets,
            next_page_token,
        }))
    }

    async fn heartbeat_target(
        &self,
        req: Request<pb::HeartbeatTargetRequest>,
    ) -> Result<pb::Target> {
        let access = auth::caller(&req)?;
        let (env, id) = convert::name("name", &req.into_inner().name, names::parse_target)?;
        access.require_target(&env, &id)?;
        let target = self.store.heartbeat_target(&env, &id).await?;
        Ok(Response::new(self.target(target)))
    }

    async fn register_artifact(
        &self,
        req: Request<pb::RegisterArtifactRequest>,
    ) -> Result<pb::Artifact> {
        let caller = caller(&req)?;
        let artifact = convert::new_artifact(req.into_inner())?;
        Ok(Response::new(convert::artifact(
            self.store.register_artifact(artifact, caller).await?,
        )))
    }

    async fn get_artifact(&self, req: Request<pb::GetArtifactRequest>) -> Result<pb::Artifact> {
        let (name, version) = convert::name(
            "name",
            &req.into_inner().name,
            names::parse_artifact_version,
        )?;
        Ok(Response::new(convert::artifact(
            self.store.get_artifact(&name, &version).await?,
        )))
    }

    async fn list_artifacts(
        &self,
        req: Request<pb::ListArtifactsRequest>,
    ) -> Result<pb::ListArtifactsResponse> {
        let (artifact, page) = convert::artifacts_query(req.get_ref())?;
        let page = self.store.list_artifacts(artifact, page).await?;
        let (artifacts, next_page_token) = convert::list_page(page, convert::artifact);
        Ok(Response::new(pb::ListArtifactsResponse {
            artifacts,
            next_page_token,
        }))
    }

    async fn create_deployment(
        &self,
        req: Request<pb::CreateDeploymentRequest>,
    ) -> Result<pb::Deployment> {
        let (access, caller) = access_and_caller(&req)?;
        let (deployment, request_id) =
            convert::new_deployment(req.into_inner(), &caller.principal)?;
        access.require_environment(&deployment.environment)?;
        if let Some(e) = &deployment.emergency {
            self.require_grant(&access, &deployment.environment, &e.approver)
                .await?;
        }
        let caller = caller.with_request_id(request_id.as_deref());
        let deployment = self
            .store
            .create_deployment(deployment, request_id, caller)
            .await?;
        Ok(Response::new(convert::deployment(deployment)))
    }

    async fn get_deployment(
        &self,
        req: Request<pb::GetDeploymentRequest>,
    ) -> Result<pb::Deployment> {
        let id = convert::name("name", &req.into_inner().name, names::parse_deployment)?;
        Ok(Response::new(convert::deployment(
            self.store.get_deployment(id).await?,
        )))
    }

    async fn list_deployments(
        &self,
        req: Request<pb::ListDeploymentsRequest>,
    ) -> Result<pb::ListDeploymentsResponse> {
        let (filter, page) = convert::deployments_query(req.get_ref())?;
        let page = self.store.list_deployments(filter, page).await?;
        let (deployments, next_page_token) = convert::list_page(page, convert::deployment);
        Ok(Response::new(pb::ListDeploymentsResponse {
            deployments,
            next_page_token,
        }))
    }

    async fn cancel_deployment(
        &self,
        req: Request<pb::CancelDeploymentRequest>,
    ) -> Result<pb::Deployment> {
        let (access, caller) = access_and_caller(&req)?;
        let req = req.into_inner();
        let id = convert::deployment_and_reason(&req.name, &req.reason)?;
        self.require_deployment(&access, id).await?;
        let d = self.store.cancel_deployment(id, req.reason, caller).await?;
        Ok(Response::new(convert::deployment(d)))
    }

    async fn continue_deployment(
        &self,
        req: Request<pb::ContinueDeploymentRequest>,
    ) -> Result<pb::Deployment> {
        let (access, caller) = access_and_caller(&req)?;
        let id = convert::name("name", &req.into_inner().name, names::parse_deployment)?;
        self.require_deployment(&access, id).await?;
        let d = self.store.continue_deployment(id, caller).await?;
        Ok(Response::new(convert::deployment(d)))
    }

    async fn rollback_deployment(
        &self,
        req: Request<pb::RollbackDeploymentRequest>,
    ) -> Result<pb::Deployment> {
        let (access, caller) = access_and_caller(&req)?;
        let req = req.into_inner();
        let id = convert::deployment_and_reason(&req.name, &req.reason)?;
        let emergency = convert::override_of(req.emergency, &caller.principal)?;
        let environment = self.require_deployment(&access, id).await?;
        if let Some(e) = &emergency {
            self.require_grant(&access, &environment, &e.approver)
                .await?;
        }
        let d = self
            .store
            .rollback_deployment(id, req.reason, emergency, caller)
            .await?;
        Ok(Response::new(convert::deployment(d)))
    }

    type WatchOrdersStream = WatchOrdersStream;

    async fn watch_orders(
        &self,
        req: Request<pb::WatchOrdersRequest>,
    ) -> Result<Self::WatchOrdersStream> {
        let access = auth::caller(&req)?;
        let (environment, target) =
            convert::name("target", &req.into_inner().target, names::parse_target)?;
        access.require_target(&environment, &target)?;
        // Connecting is a sign of life; an unknown target is NOT_FOUND.
        self.store.heartbeat_target(&environment, &target).await?;
        Ok(Response::new(order_stream(
            self.store.clone(),
            environment,
            target,
            self.store.order_changes(),
            self.streams.clone(),
        )))
    }

    async fn report_placement(
        &self,
        req: Request<pb::ReportPlacementRequest>,
    ) -> Result<pb::ReportPlacementResponse> {
        let (access, caller) = access_and_caller(&req)?;
        let report = convert::placement_report(req.into_inner())?;
        // An agent reports only for its own target: a forged placement cannot open a
        // release gate. The attempt is audited.
        if let Err(denied) = access.require_target(&report.environment, &report.target) {
            let resource = names::target_name(&report.environment, &report.target);
            let detail = format!(
                "report {:?} for deployments/{} outside the caller's binding",
                report.state, report.deployment
            );
            let entry = AuditEntry {
                action: "ReportPlacement",
                resource,
                before: String::new(),
                after: "refused: PERMISSION_DENIED".into(),
                reason: detail,
            };
            if let Err(e) = self.store.audit_event(caller, entry).await {
                tracing::warn!(error = %e, "cannot audit a refused placement report");
            }
            return Err(denied);
        }
        let outcome = self.store.report_placement(report, caller).await?;
        Ok(Response::new(pb::ReportPlacementResponse {
            sequence: outcome.placement.sequence,
            placement: Some(convert::placement(&outcome.placement)),
            deployment_state: convert::deployment_state(outcome.deployment_state),
            changed: outcome.changed,
        }))
    }

    type WatchPlacementsStream = WatchPlacementsStream;

    async fn watch_placements(
        &self,
        req: Request<pb::WatchPlacementsRequest>,
    ) -> Result<Self::WatchPlacementsStream> {
        let stream = self.open_watch(req.into_inner()).await?;
        let stream = stream.map(|item| item.map(watch::watch_message).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn grant_emergency_override(
        &self,
        req: Request<pb::GrantEmergencyOverrideRequest>,
    ) -> Result<pb::EmergencyGrant> {
        let (access, caller) = access_and_caller(&req)?;
        let req = req.into_inner();
        let environment = convert::emergency_grant(&req, &caller.principal)?;
        access.require_environment(&environment)?;
        self.store.get_environment(&environment).await?;
        let now = self.clock.now_ms();
        let entry = AuditEntry {
            action: "GrantEmergencyOverride",
            resource: names::environment_name(&environment),
            before: String::new(),
            after: req.requester.clone(),
            reason: req.reason.clone(),
        };
        let approver = caller.principal.clone();
        self.store.audit_event(caller, entry).await?;
        Ok(Response::new(pb::EmergencyGrant {
            environment: names::environment_name(&environment),
            requester: req.requester,
            approver,
            reason: req.reason,
            expire_time: convert::timestamp(now + GRANT_VALIDITY_MS),
        }))
    }

    async fn list_inventory(
        &self,
        req: Request<pb::ListInventoryRequest>,
    ) -> Result<pb::ListInventoryResponse> {
        let access = auth::caller(&req)?;
        let (environment, size, after) = convert::inventory_request(req.get_ref())?;
        // One environment: the caller must view it. Every environment: those it may not
        // view are left out.
        if let Some(env) = &environment {
            access.require_environment(env)?;
        }
        let may_view = Box::new(move |env: &str| access.may(Permission::DeploymentsRead, env));
        let page = self
            .store
            .inventory(InventoryQuery {
                environment,
                size,
                after,
                may_view,
            })
            .await?;
        let now = self.clock.now_ms();
        let (environments, next_page_token) =
            convert::list_page(page, |e| convert::environment_inventory(e, now));
        Ok(Response::new(pb::ListInventoryResponse {
            environments,
            next_page_token,
        }))
    }

    async fn list_audit_records(
        &self,
        req: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<pb::ListAuditRecordsResponse> {
        let (filter, page) = convert::audit_query(req.into_inner())?;
        let page = self.store.list_audit_records(filter, page).await?;
        let (records, next_page_token) = convert::list_page(page, convert::audit_record);
        Ok(Response::new(pb::ListAuditRecordsResponse {
            records,
            next_page_token,
        }))
    }
}
