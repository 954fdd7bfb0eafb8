//! The gRPC clients, the identity each call is made with, and service errors as people
//! see them.
//!
//! A call made for a browser request carries that person's bearer token when the browser
//! sent one (an `Authorization: Bearer` header, or the `console_token` cookie), else the
//! console's own token (`--token-file`), if any: the services' RBAC decides either way.
//! Actions are never made with the console's own token: with one configured, an action
//! without the person's token is refused (401). The live streams always use the console's
//! own identity.

use axum::http::{header, HeaderMap, StatusCode};
use proto::deploy::v1::deploy_service_client::DeployServiceClient;
use proto::release::v1::release_service_client::ReleaseServiceClient;
use serde::Serialize;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::Config;

/// The name of the cookie that may carry a person's bearer token.
pub const TOKEN_COOKIE: &str = "console_token";

/// Clients of both services (channels connect on first use and reconnect after failures).
#[derive(Clone)]
pub struct Backends {
    /// deploy-svc.
    pub deploy: DeployServiceClient<Channel>,
    /// release-svc.
    pub release: ReleaseServiceClient<Channel>,
    own: service_kit::client::Bearer,
    /// The console has a token of its own (`--token-file`): authentication is on, and
    /// actions need the person's own token.
    pub has_own_token: bool,
}

impl Backends {
    /// Channels to the services `config` names, with its TLS and token file.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let security = config.client.security();
        Ok(Self {
            deploy: DeployServiceClient::new(security.endpoint(&config.deploy_svc)?.connect_lazy()),
            release: ReleaseServiceClient::new(
                security.endpoint(&config.release_svc)?.connect_lazy(),
            ),
            own: security.bearer()?,
            has_own_token: config.client.token_file.is_some(),
        })
    }

    /// A request carrying `message` as `user` (the console itself when `user` has no token).
    pub fn request<T>(&self, message: T, user: &User) -> Result<Request<T>, Status> {
        let (mut metadata, extensions, ()) = self.own.clone().call(Request::new(()))?.into_parts();
        if let Some(token) = &user.0 {
            metadata.insert("authorization", token.clone());
        }
        Ok(Request::from_parts(metadata, extensions, message))
    }

    /// A request made as the console itself.
    pub fn own_request<T>(&self, message: T) -> Result<Request<T>, Status> {
        self.request(message, &User(None))
    }
}

/// The person behind a browser request: their bearer token, if the browser sent one.
#[derive(Debug, Clone, Default)]
pub struct User(Option<AsciiMetadataValue>);

impl User {
    /// The browser sent no token.
    pub fn is_anonymous(&self) -> bool {
        self.0.is_none()
    }

    /// From the `Authorization: Bearer` header, else the `console_token` cookie.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| {
                headers
                    .get_all(header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .filter_map(|c| c.trim().split_once('='))
                    .find(|(name, _)| *name == TOKEN_COOKIE)
                    .map(|(_, value)| value)
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        Self(bearer.and_then(|t| format!("Bearer {t}").parse().ok()))
    }
}

/// A service's refusal or failure, as shown on the page.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// The gRPC code's name, for example `PERMISSION_DENIED`.
    pub code: &'static str,
    /// The service's message.
    pub message: String,
    /// The policy rules that refused it (a `PreconditionFailure`'s violations), if any.
    pub violations: Vec<String>,
    /// The HTTP status the page gets.
    #[serde(skip)]
    pub http: StatusCode,
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        let violations = status
            .get_error_details()
            .precondition_failure()
            .map(|p| {
                p.violations
                    .iter()
                    .map(|v| format!("{} {}: {}", v.r#type, v.subject, v.description))
                    .collect()
            })
            .unwrap_or_default();
        let (code, http) = code(status.code());
        Self {
            code,
            message: status.message().to_owned(),
            violations,
            http,
        }
    }
}

/// The code's name and the HTTP status that fits it.
fn code(code: Code) -> (&'static str, StatusCode) {
    match code {
        Code::Ok => ("OK", StatusCode::OK),
        Code::Cancelled => ("CANCELLED", StatusCode::BAD_GATEWAY),
        Code::Unknown => ("UNKNOWN", StatusCode::BAD_GATEWAY),
        Code::InvalidArgument => ("INVALID_ARGUMENT", StatusCode::BAD_REQUEST),
        Code::DeadlineExceeded => ("DEADLINE_EXCEEDED", StatusCode::GATEWAY_TIMEOUT),
        Code::NotFound => ("NOT_FOUND", StatusCode::NOT_FOUND),
        Code::AlreadyExists => ("ALREADY_EXISTS", StatusCode::CONFLICT),
        Code::PermissionDenied => ("PERMISSION_DENIED", StatusCode::FORBIDDEN),
        Code::ResourceExhausted => ("RESOURCE_EXHAUSTED", StatusCode::TOO_MANY_REQUESTS),
        Code::FailedPrecondition => ("FAILED_PRECONDITION", StatusCode::CONFLICT),
        Code::Aborted => ("ABORTED", StatusCode::CONFLICT),
        Code::OutOfRange => ("OUT_OF_RANGE", StatusCode::BAD_REQUEST),
        Code::Unimplemented => ("UNIMPLEMENTED", StatusCode::NOT_IMPLEMENTED),
        Code::Internal => ("INTERNAL", StatusCode::BAD_GATEWAY),
        Code::Unavailable => ("UNAVAILABLE", StatusCode::BAD_GATEWAY),
        Code::DataLoss => ("DATA_LOSS", StatusCode::BAD_GATEWAY),
        Code::Unauthenticated => ("UNAUTHENTICATED", StatusCode::UNAUTHORIZED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends() -> Backends {
        Backends::new(&Config {
            listen: ([127, 0, 0, 1], 0).into(),
            deploy_svc: "http://127.0.0.1:9".into(),
            release_svc: "http://127.0.0.1:9".into(),
            public_origins: Vec::new(),
            max_live_streams: 10,
            client: Default::default(),
        })
        .unwrap()
    }

    fn authorization(headers: &[(header::HeaderName, &'static str)]) -> Option<String> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(k.clone(), header::HeaderValue::from_static(v));
        }
        let request = backends().request((), &User::from_headers(&map)).unwrap();
        request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn the_person_token_is_forwarded_from_the_header_or_the_cookie() {
        assert_eq!(
            authorization(&[(header::AUTHORIZATION, "Bearer abc")]).as_deref(),
            Some("Bearer abc")
        );
        assert_eq!(
            authorization(&[(header::COOKIE, "a=b; console_token=xyz")]).as_deref(),
            Some("Bearer xyz")
        );
        assert_eq!(authorization(&[(header::AUTHORIZATION, "Basic abc")]), None);
        assert_eq!(authorization(&[]), None);
    }
}
