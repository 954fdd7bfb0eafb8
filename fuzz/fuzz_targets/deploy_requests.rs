//! deploy.v1 request validation: the first byte picks a request type, the rest is decoded as
//! that protobuf message (as the server does) and run through the same conversions and
//! checks the handlers use. A request that passes validation must keep the values it was
//! given (validation never rewrites a field it accepted).
#![no_main]

use deploy_svc::domain::names;
use deploy_svc::grpc::convert;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::deploy::v1 as pb;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 12 {
        0 => {
            if let Ok(req) = pb::CreateEnvironmentRequest::decode(bytes) {
                let _ = convert::new_environment(req);
            }
        }
        1 => {
            if let Ok(req) = pb::UpdateEnvironmentRequest::decode(bytes) {
                let _ = convert::environment_update(req);
            }
        }
        2 => {
            if let Ok(req) = pb::RegisterTargetRequest::decode(bytes) {
                let id = req.target_id.clone();
                if let Ok((_, target, _)) = convert::register_target(req) {
                    assert_eq!(target, id);
                }
            }
        }
        3 => {
            if let Ok(req) = pb::RegisterArtifactRequest::decode(bytes) {
                let (name, version) = (req.artifact.clone(), req.version.clone());
                if let Ok(a) = convert::new_artifact(req) {
                    assert_eq!((a.name, a.version), (name, version));
                }
            }
        }
        4 => {
            if let Ok(req) = pb::CreateDeploymentRequest::decode(bytes) {
                let _ = convert::new_deployment(req, "fuzzer");
            }
        }
        5 => {
            if let Ok(req) = pb::RollbackDeploymentRequest::decode(bytes) {
                let _ = convert::override_of(req.emergency, "fuzzer");
            }
        }
        6 => {
            if let Ok(req) = pb::ReportPlacementRequest::decode(bytes) {
                let _ = convert::placement_report(req);
            }
        }
        7 => {
            if let Ok(req) = pb::WatchPlacementsRequest::decode(bytes) {
                let _ = convert::watch_request(req);
            }
        }
        8 => {
            if let Ok(req) = pb::ListAuditRecordsRequest::decode(bytes) {
                let _ = convert::audit_query(req);
            }
        }
        9 => {
            if let Ok(req) = pb::ListDeploymentsRequest::decode(bytes) {
                let mut v = deploy_svc::domain::error::Violations::default();
                let _ = convert::page_request(&mut v, req.page_size, &req.page_token);
                let _ = v.finish();
            }
        }
        10 => {
            if let Ok(req) = pb::HeartbeatTargetRequest::decode(bytes) {
                let _ = convert::name("name", &req.name, names::parse_target);
            }
        }
        _ => {
            if let Ok(req) = pb::GetDeploymentRequest::decode(bytes) {
                let _ = convert::name("name", &req.name, names::parse_deployment);
            }
        }
    }
});
