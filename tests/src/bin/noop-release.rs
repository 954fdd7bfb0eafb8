//! The baseline of the Evaluate throughput benchmark: a tonic server of the same
//! `release.v1.ReleaseService` whose Evaluate returns a constant answer at once, served with
//! the same transport settings as release-svc. Everything but Evaluate is UNIMPLEMENTED.
//!
//! `noop-release [ADDR]` prints `noop-release listening on ADDR` and serves until killed.

#![allow(clippy::print_stdout)]

use proto::release::v1 as pb;
use proto::release::v1::release_service_server::{ReleaseService, ReleaseServiceServer};
use tonic::{Request, Response, Status};

struct Noop;

type R<T> = Result<Response<T>, Status>;

fn no<T>() -> R<T> {
    Err(Status::unimplemented(
        "the no-op baseline only serves Evaluate",
    ))
}

#[tonic::async_trait]
impl ReleaseService for Noop {
    async fn create_feature(&self, _: Request<pb::CreateFeatureRequest>) -> R<pb::Feature> {
        no()
    }
    async fn get_feature(&self, _: Request<pb::GetFeatureRequest>) -> R<pb::Feature> {
        no()
    }
    async fn list_features(
        &self,
        _: Request<pb::ListFeaturesRequest>,
    ) -> R<pb::ListFeaturesResponse> {
        no()
    }
    async fn update_feature(&self, _: Request<pb::UpdateFeatureRequest>) -> R<pb::Feature> {
        no()
    }
    async fn create_release(&self, _: Request<pb::CreateReleaseRequest>) -> R<pb::Release> {
        no()
    }
    async fn get_release(&self, _: Request<pb::GetReleaseRequest>) -> R<pb::Release> {
        no()
    }
    async fn list_releases(
        &self,
        _: Request<pb::ListReleasesRequest>,
    ) -> R<pb::ListReleasesResponse> {
        no()
    }
    async fn set_rollout(&self, _: Request<pb::SetRolloutRequest>) -> R<pb::Release> {
        no()
    }
    async fn pause_release(&self, _: Request<pb::PauseReleaseRequest>) -> R<pb::Release> {
        no()
    }
    async fn resume_release(&self, _: Request<pb::ResumeReleaseRequest>) -> R<pb::Release> {
        no()
    }
    async fn rollback_release(&self, _: Request<pb::RollbackReleaseRequest>) -> R<pb::Release> {
        no()
    }
    async fn evaluate(&self, req: Request<pb::EvaluateRequest>) -> R<pb::EvaluateResponse> {
        let req = req.into_inner();
        Ok(Response::new(pb::EvaluateResponse {
            feature: req.feature,
            visible: true,
            variant: "on".into(),
            value: Some(prost_types::Value {
                kind: Some(prost_types::value::Kind::BoolValue(true)),
            }),
            reason: pb::Reason::Split.into(),
            release: "releases/1".into(),
            snapshot_version: 1,
        }))
    }
    async fn evaluate_batch(
        &self,
        _: Request<pb::EvaluateBatchRequest>,
    ) -> R<pb::EvaluateBatchResponse> {
        no()
    }
    type WatchVisibilityStream = futures::stream::Empty<Result<pb::VisibilityChange, Status>>;
    async fn watch_visibility(
        &self,
        _: Request<pb::WatchVisibilityRequest>,
    ) -> R<Self::WatchVisibilityStream> {
        no()
    }
    async fn list_visibility(
        &self,
        _: Request<pb::ListVisibilityRequest>,
    ) -> R<pb::ListVisibilityResponse> {
        no()
    }
    async fn get_release_timeline(
        &self,
        _: Request<pb::GetReleaseTimelineRequest>,
    ) -> R<pb::ReleaseTimeline> {
        no()
    }
    async fn get_feature_usage(
        &self,
        _: Request<pb::GetFeatureUsageRequest>,
    ) -> R<pb::FeatureUsage> {
        no()
    }
    async fn list_stale_features(
        &self,
        _: Request<pb::ListStaleFeaturesRequest>,
    ) -> R<pb::ListStaleFeaturesResponse> {
        no()
    }
    async fn archive_feature(&self, _: Request<pb::ArchiveFeatureRequest>) -> R<pb::Feature> {
        no()
    }
    async fn unarchive_feature(&self, _: Request<pb::UnarchiveFeatureRequest>) -> R<pb::Feature> {
        no()
    }
    async fn get_consumer_status(
        &self,
        _: Request<pb::GetConsumerStatusRequest>,
    ) -> R<pb::ConsumerStatus> {
        no()
    }
    async fn import_flagd(&self, _: Request<pb::ImportFlagdRequest>) -> R<pb::ImportFlagdResponse> {
        no()
    }
    async fn export_flagd(&self, _: Request<pb::ExportFlagdRequest>) -> R<pb::ExportFlagdResponse> {
        no()
    }
    async fn list_withdrawals(
        &self,
        _: Request<pb::ListWithdrawalsRequest>,
    ) -> R<pb::ListWithdrawalsResponse> {
        no()
    }
    async fn submit_release(&self, _: Request<pb::SubmitReleaseRequest>) -> R<pb::Release> {
        no()
    }
    async fn approve_release(&self, _: Request<pb::ApproveReleaseRequest>) -> R<pb::Release> {
        no()
    }
    async fn cancel_release(&self, _: Request<pb::CancelReleaseRequest>) -> R<pb::Release> {
        no()
    }
    async fn set_emergency_override(
        &self,
        _: Request<pb::SetEmergencyOverrideRequest>,
    ) -> R<pb::Release> {
        no()
    }
    async fn check_release(
        &self,
        _: Request<pb::CheckReleaseRequest>,
    ) -> R<pb::CheckReleaseResponse> {
        no()
    }
    async fn get_policy(&self, _: Request<pb::GetPolicyRequest>) -> R<pb::Policy> {
        no()
    }
    async fn set_policy(&self, _: Request<pb::SetPolicyRequest>) -> R<pb::Policy> {
        no()
    }
    async fn list_audit_records(
        &self,
        _: Request<pb::ListAuditRecordsRequest>,
    ) -> R<pb::ListAuditRecordsResponse> {
        no()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("noop-release listening on {}", listener.local_addr()?);
    let (health, health_service) = tonic_health::server::health_reporter();
    let routes =
        tonic::service::Routes::new(health_service).add_service(ReleaseServiceServer::new(Noop));
    service_kit::serve_gracefully(
        listener,
        routes,
        health,
        &[],
        tokio_util::sync::CancellationToken::new(),
        service_kit::Drain {
            timeout: std::time::Duration::from_secs(1),
        },
        &service_kit::Serving::insecure("noop-release"),
        service_kit::shutdown_signal(),
    )
    .await
}
