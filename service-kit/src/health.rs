//! Health that follows the storage: a store that can no longer write (its SQLite writer
//! died) turns the services NOT_SERVING, so probes and load balancers take the replica out
//! instead of sending it writes that all fail.

use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// Sets every service in `names` (and the overall status) NOT_SERVING when `alive` turns
/// false, logging it as an error. Runs until then, or until `alive`'s sender is gone while
/// still true (a store that never dies); spawn it beside the server.
pub async fn follow_store(
    mut alive: watch::Receiver<bool>,
    health: HealthReporter,
    names: Vec<&'static str>,
) {
    loop {
        if !*alive.borrow_and_update() {
            break;
        }
        if alive.changed().await.is_err() {
            if *alive.borrow() {
                return;
            }
            break;
        }
    }
    tracing::error!("the store can no longer write; health is NOT_SERVING until a restart");
    for name in names {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
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
        let follower = tokio::spawn(follow_store(rx, reporter, vec!["svc"]));
        assert_eq!(check(&service, "svc").await, ServingStatus::Serving as i32);
        tx.send_replace(false);
        follower.await.unwrap();
        assert_eq!(
            check(&service, "svc").await,
            ServingStatus::NotServing as i32
        );
        assert_eq!(check(&service, "").await, ServingStatus::NotServing as i32);
    }
}
