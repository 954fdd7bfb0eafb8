//! The change calendar as deploy-svc keeps it: freeze windows and the `protected` flag of
//! its environments, read with `GetEnvironment` (release-svc already depends on deploy-svc;
//! deploy-svc never calls release-svc). Every check reads it afresh (checks are rare: a
//! transition, or a due plan step), so a window set in deploy-svc applies at once; the
//! channel to deploy-svc is reused.

use std::time::Duration;

use async_trait::async_trait;
use calendar::FreezeWindow;
use proto::deploy::v1 as dpb;
use proto::deploy::v1::deploy_service_client::DeployServiceClient;
use tokio::sync::OnceCell;

use crate::engine::{Calendar, EnvironmentFacts};

/// deploy-svc's change calendar.
#[derive(Debug)]
pub struct DeployCalendar {
    url: String,
    security: service_kit::client::ClientSecurity,
    channel: OnceCell<service_kit::client::AuthChannel>,
}

impl DeployCalendar {
    /// The calendar of the deploy-svc at `url`.
    pub fn new(url: String, security: service_kit::client::ClientSecurity) -> Self {
        Self {
            url,
            security,
            channel: OnceCell::new(),
        }
    }
}

/// No change calendar (`--change-calendar none`): no freeze windows, nothing protected.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCalendar;

#[async_trait]
impl Calendar for NoCalendar {
    async fn environment(&self, _: &str) -> Result<EnvironmentFacts, String> {
        Ok(EnvironmentFacts::default())
    }
}

/// A deploy.v1 freeze window in the calendar's terms (`None` for an unusable one).
pub fn window(w: &dpb::FreezeWindow) -> Option<FreezeWindow> {
    calendar::from_proto::window(w)
}

#[async_trait]
impl Calendar for DeployCalendar {
    async fn environment(&self, environment: &str) -> Result<EnvironmentFacts, String> {
        let channel = self
            .channel
            .get_or_try_init(|| async {
                self.security
                    .endpoint(&self.url)
                    .and_then(|e| {
                        Ok(tonic::service::interceptor::InterceptedService::new(
                            e.connect_timeout(Duration::from_secs(2))
                                .timeout(Duration::from_secs(5))
                                .connect_lazy(),
                            self.security.bearer()?,
                        ))
                    })
                    .map_err(|e| format!("{e:#}"))
            })
            .await?;
        let mut client = DeployServiceClient::new(channel.clone());
        let env = client
            .get_environment(dpb::GetEnvironmentRequest {
                name: format!("environments/{environment}"),
            })
            .await;
        let facts = match env {
            Ok(env) => {
                let env = env.into_inner();
                // A window this service cannot read fails the check closed.
                let windows: Option<Vec<FreezeWindow>> =
                    env.freeze_windows.iter().map(window).collect();
                EnvironmentFacts {
                    protected: env.protected,
                    freeze_windows: windows.ok_or_else(|| {
                        format!("environments/{environment} has a freeze window this release-svc cannot read")
                    })?,
                }
            }
            // An environment deploy-svc does not know has no calendar entries.
            Err(s) if s.code() == tonic::Code::NotFound => EnvironmentFacts::default(),
            Err(s) => return Err(format!("deploy-svc at {}: {}", self.url, s.message())),
        };
        Ok(facts)
    }
}
