//! release.v1 request validation: the first byte picks a request type, the rest is decoded
//! as that protobuf message (as the server does) and run through the same conversions and
//! checks the handlers use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::release::v1 as pb;
use release_svc::domain::Violations;
use release_svc::grpc::convert;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 6 {
        0 => {
            if let Ok(req) = pb::CreateFeatureRequest::decode(bytes) {
                let _ = convert::feature(req.feature.unwrap_or_default(), true);
            }
        }
        1 => {
            if let Ok(req) = pb::UpdateFeatureRequest::decode(bytes) {
                let _ = convert::feature(req.feature.unwrap_or_default(), false);
            }
        }
        2 => {
            if let Ok(req) = pb::CreateReleaseRequest::decode(bytes) {
                let _ = convert::new_release(req);
            }
        }
        3 => {
            if let Ok(req) = pb::SetPolicyRequest::decode(bytes) {
                let _ = convert::policy(req.policy.unwrap_or_default());
            }
        }
        4 => {
            if let Ok(req) = pb::EvaluateRequest::decode(bytes) {
                let mut v = Violations::default();
                let _ = convert::context(&mut v, req.context);
                let _ = v.finish();
            }
        }
        _ => {
            if let Ok(req) = pb::SetEmergencyOverrideRequest::decode(bytes) {
                let mut v = Violations::default();
                convert::reason_text(&mut v, "reason", &req.reason);
                convert::principal_text(&mut v, "approver", &req.approver);
                let _ = v.finish();
            }
        }
    }
});
