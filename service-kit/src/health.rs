//! Health that follows the storage: a store that can no longer write (its SQLite writer
//! died) turns the services NOT_SERVING, so probes and load balancers take the replica out
//! instead of sending it writes that all fail. [`reporter`] builds the health service
//! whose Watch streams end at shutdown, so an open watch never holds the drain.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// Gauge: 1 while the store can write, 0 once it cannot.
pub const STORE_WRITABLE: &str = "store_writable";

/// Registers the HELP text of [`STORE_WRITABLE`].
pub fn describe() {
    metrics::describe_gauge!(
        STORE_WRITABLE,
        "1 while the store can write, 0 once it cannot (the service is NOT_SERVING)"
    );
}

/// A health reporter and its grpc.health.v1 service. `Watch` streams end with UNAVAILABLE
/// once `stop` is cancelled (the serve loop cancels it after turning every status
/// NOT_SERVING): Kubernetes and gRPC client-side health checks keep a Watch open, and
/// tonic's graceful shutdown would otherwise wait the whole drain timeout for it.
pub fn reporter(stop: CancellationToken) -> (HealthReporter, HealthServer<StoppableHealth>) {
    let (reporter, _) = tonic_health::server::health_reporter();
    let inner = HealthService::from_health_reporter(reporter.clone());
    (reporter, HealthServer::new(StoppableHealth { inner, stop }))
}

/// See [`reporter`].
#[derive(Debug)]
pub struct StoppableHealth {
    inner: HealthService,
    stop: CancellationToken,
}

type WatchStream =
    Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Health for StoppableHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let inner = self.inner.watch(request).await?.into_inner();
        let stop = self.stop.clone();
        let ended = futures::stream::once(async {
            Err(tonic::Status::unavailable(
                "the server is shutting down; watch another replica",
            ))
        });
        let stream: WatchStream = Box::pin(inner.take_until(stop.cancelled_owned()).chain(ended));
        Ok(tonic::Response::new(stream))
    }
}

/// Follows `writable`: while it is false every service in `names` (and the overall
/// status) is NOT_SERVING, logged as an error; when it turns true again they are SERVING
/// again. Runs until `writable`'s sender is gone or `stop` is cancelled (from then on the
/// shutdown owns the statuses); spawn it beside the server.
pub async fn follow_store(
    mut writable: watch::Receiver<bool>,
    health: HealthReporter,
    names: Vec<&'static str>,
    stop: CancellationToken,
) {
    let mut was = true;
    metrics::gauge!(STORE_WRITABLE).set(1.0);
    loop {
        let now = *writable.borrow_and_update();
        if now != was && !stop.is_cancelled() {
            was = now;
            let status = if now {
                tracing::info!("the store can write again; health is SERVING");
                ServingStatus::Serving
            } else {
                tracing::error!("the store cannot write; health is NOT_SERVING until it can");
                ServingStatus::NotServing
            };
            metrics::gauge!(STORE_WRITABLE).set(if now { 1.0 } else { 0.0 });
            for name in &names {
                health.set_service_status(*name, status).await;
            }
            health.set_service_status("", status).await;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = writable.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn check(service: &tonic_health::server::HealthService, name: &str) -> i32 {
        use tonic_health::pb::health_server::Health as _;
        service
            .check(tonic::Request::new(tonic_health::pb::HealthCheckRequest {
                service: name.to_owned(),
            }))
            .await
            .unwrap()
            .into_inner()
            .status
    }

    #[tokio::test]
    async fn a_dead_store_turns_health_not_serving() {
        let (reporter, _) = tonic_health::server::health_reporter();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        reporter
            .set_service_status("svc", ServingStatus::Serving)
            .await;
        let (tx, rx) = watch::channel(true);
        let stop = CancellationToken::new();
        let follower = tokio::spawn(follow_store(rx, reporter, vec!["svc"], stop.clone()));
        assert_eq!(check(&service, "svc").await, ServingStatus::Serving as i32);
        tx.send_replace(false);
        drop(tx);
        follower.await.unwrap();
        assert_eq!(
            check(&service, "svc").await,
            ServingStatus::NotServing as i32
        );
        assert_eq!(check(&service, "").await, ServingStatus::NotServing as i32);
    }

    #[tokio::test]
    async fn a_store_that_writes_again_turns_health_serving_again() {
        let (reporter, _) = tonic_health::server::health_reporter();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        reporter
            .set_service_status("svc", ServingStatus::Serving)
            .await;
        let (tx, rx) = watch::channel(true);
        let stop = CancellationToken::new();
        let follower = tokio::spawn(follow_store(rx, reporter, vec!["svc"], stop.clone()));
        for (writable, want) in [
            (false, ServingStatus::NotServing),
            (true, ServingStatus::Serving),
        ] {
            tx.send_replace(writable);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while check(&service, "svc").await != want as i32 {
                assert!(std::time::Instant::now() < deadline, "never {want:?}");
                tokio::task::yield_now().await;
            }
        }
        // After shutdown begins, the follower leaves the statuses alone.
        stop.cancel();
        follower.await.unwrap();
    }
}
