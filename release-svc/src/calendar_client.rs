//! The change calendar as deploy-svc keeps it: freeze windows and the `protected` flag of
//! its environments, read with `GetEnvironment` (release-svc already depends on deploy-svc;
//! deploy-svc never calls release-svc). Answers are cached briefly so a scheduler pass over
//! many releases asks once per environment.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use calendar::{FreezeWindow, Schedule, WeekTime};
use proto::deploy::v1 as dpb;
use proto::deploy::v1::deploy_service_client::DeployServiceClient;
use tokio::sync::Mutex;

use crate::engine::{Calendar, EnvironmentFacts};
use crate::grpc::convert::millis;

/// How long an environment's calendar is reused.
const FRESH: Duration = Duration::from_secs(2);

/// deploy-svc's change calendar.
#[derive(Debug)]
pub struct DeployCalendar {
    url: String,
    cache: Mutex<HashMap<String, (Instant, EnvironmentFacts)>>,
}

impl DeployCalendar {
    /// The calendar of the deploy-svc at `url`.
    pub fn new(url: String) -> Self {
        Self {
            url,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

/// A deploy.v1 freeze window in the calendar's terms (`None` for an unusable one).
pub fn window(w: &dpb::FreezeWindow) -> Option<FreezeWindow> {
    let schedule = match w.schedule.as_ref()? {
        dpb::freeze_window::Schedule::Absolute(a) => Schedule::Absolute {
            start_ms: millis(a.start_time.as_ref()?),
            end_ms: millis(a.end_time.as_ref()?),
        },
        dpb::freeze_window::Schedule::Weekly(wk) => Schedule::Weekly {
            time_zone: wk.time_zone.clone(),
            start: WeekTime {
                day: u32::try_from(wk.start_day - 1).ok()?,
                minute: calendar::parse_minute(&wk.start_time).ok()?,
            },
            end: WeekTime {
                day: u32::try_from(wk.end_day - 1).ok()?,
                minute: calendar::parse_minute(&wk.end_time).ok()?,
            },
        },
    };
    Some(FreezeWindow {
        name: w.name.clone(),
        schedule,
    })
}

#[async_trait]
impl Calendar for DeployCalendar {
    async fn environment(&self, environment: &str) -> Result<EnvironmentFacts, String> {
        if let Some((at, facts)) = self.cache.lock().await.get(environment) {
            if at.elapsed() < FRESH {
                return Ok(facts.clone());
            }
        }
        let endpoint = tonic::transport::Endpoint::from_shared(self.url.clone())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5));
        let mut client = DeployServiceClient::new(
            endpoint
                .connect()
                .await
                .map_err(|e| format!("deploy-svc at {}: {e}", self.url))?,
        );
        let env = client
            .get_environment(dpb::GetEnvironmentRequest {
                name: format!("environments/{environment}"),
            })
            .await;
        let facts = match env {
            Ok(env) => {
                let env = env.into_inner();
                EnvironmentFacts {
                    protected: env.protected,
                    freeze_windows: env.freeze_windows.iter().filter_map(window).collect(),
                }
            }
            // An environment deploy-svc does not know has no calendar entries.
            Err(s) if s.code() == tonic::Code::NotFound => EnvironmentFacts::default(),
            Err(s) => return Err(format!("deploy-svc: {}", s.message())),
        };
        self.cache
            .lock()
            .await
            .insert(environment.to_owned(), (Instant::now(), facts.clone()));
        Ok(facts)
    }
}
