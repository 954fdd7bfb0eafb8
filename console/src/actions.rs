//! The actions a person expects on the pages: the kill switch (`PauseRelease`) and resume,
//! approve, continue a canary, roll back a deployment. Each is a POST that the page sends
//! only after a confirmation, made as the person (their bearer token) so that the services'
//! RBAC applies exactly as on the API. Cross-site requests are refused: the `HX-Request`
//! header (which a form on another site cannot send) is required, and an `Origin` header,
//! when present, must name this console. The answer is a flash message; a refusal keeps
//! its gRPC code and message.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use proto::deploy::v1 as dpb;
use proto::release::v1 as rpb;

use crate::backend::{Backends, Failure, User};
use crate::views::render;
use crate::AppState;

/// The reason the kill switch records.
const KILL_REASON: &str = "kill switch in the console";

/// `POST /actions/{collection}/{id}/{verb}`: `releases/{id}/pause` (the kill switch),
/// `releases/{id}/resume`, `releases/{id}/approve`, `deployments/{id}/continue` (a canary
/// waiting for a person), `deployments/{id}/rollback`.
pub async fn action(
    State(state): State<AppState>,
    Path((collection, id, verb)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(why) = same_origin(&headers) {
        tracing::warn!(why, "cross-site action refused");
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    let user = User::from_headers(&headers);
    if user.is_anonymous() && state.backends.has_own_token {
        // The console's own identity reads; it never acts for someone unknown.
        return (
            StatusCode::UNAUTHORIZED,
            "sign in: actions are made as you, with your own token",
        )
            .into_response();
    }
    let name = format!("{collection}/{id}");
    match perform(&state.backends, &user, &collection, &verb, name.clone()).await {
        Ok(Some(done)) => {
            let mut response = render(
                &state,
                StatusCode::OK,
                "flash.html",
                minijinja::context! { message => format!("{name} {done}") },
            );
            // The page fetches its view again.
            response
                .headers_mut()
                .insert("hx-trigger", header::HeaderValue::from_static("changed"));
            response
        }
        Ok(None) => (StatusCode::NOT_FOUND, "no such action").into_response(),
        Err(status) => {
            let failure = Failure::from(status);
            render(
                &state,
                failure.http,
                "failure.html",
                minijinja::context! { failure },
            )
        }
    }
}

/// Makes the call as `user`; what it did, for people (`None`: no such action).
async fn perform(
    b: &Backends,
    user: &User,
    collection: &str,
    verb: &str,
    name: String,
) -> Result<Option<&'static str>, tonic::Status> {
    let (mut release, mut deploy) = (b.release.clone(), b.deploy.clone());
    Ok(Some(match (collection, verb) {
        ("releases", "pause") => {
            let reason = KILL_REASON.into();
            let request = b.request(rpb::PauseReleaseRequest { name, reason }, user)?;
            release.pause_release(request).await?;
            "paused"
        }
        ("releases", "resume") => {
            let request = b.request(rpb::ResumeReleaseRequest { name }, user)?;
            release.resume_release(request).await?;
            "resumed"
        }
        ("releases", "approve") => {
            let request = b.request(rpb::ApproveReleaseRequest { name }, user)?;
            release.approve_release(request).await?;
            "approved"
        }
        ("deployments", "continue") => {
            let request = b.request(dpb::ContinueDeploymentRequest { name }, user)?;
            deploy.continue_deployment(request).await?;
            "continued"
        }
        ("deployments", "rollback") => {
            let reason = "rolled back in the console".into();
            let rollback = dpb::RollbackDeploymentRequest {
                name,
                reason,
                emergency: None,
            };
            deploy
                .rollback_deployment(b.request(rollback, user)?)
                .await?;
            "rolled back"
        }
        _ => return Ok(None),
    }))
}

/// The CSRF defence: the header htmx sends, and no foreign `Origin`.
pub fn same_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    if headers.get("hx-request").and_then(|v| v.to_str().ok()) != Some("true") {
        return Err("actions need the HX-Request header: use the console's pages");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = origin.to_str().ok();
    let authority = origin.and_then(|o| o.split_once("://")).map(|(_, a)| a);
    match (authority, host) {
        (Some(a), Some(h)) if a == h => Ok(()),
        _ => Err("actions from another origin are refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, header::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn actions_need_htmx_and_the_same_origin() {
        assert!(same_origin(&headers(&[("host", "127.0.0.1:8080")])).is_err());
        assert!(same_origin(&headers(&[
            ("hx-request", "true"),
            ("host", "127.0.0.1:8080")
        ]))
        .is_ok());
        assert!(same_origin(&headers(&[
            ("hx-request", "true"),
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]))
        .is_ok());
        assert!(same_origin(&headers(&[
            ("hx-request", "true"),
            ("host", "127.0.0.1:8080"),
            ("origin", "https://evil.example"),
        ]))
        .is_err());
    }
}
