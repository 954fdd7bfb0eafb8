//! Wake-ups between replicas: one coalesced NOTIFY after local commits, and a listener
//! that wakes the tailer and the order streams when another replica commits.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use store_kit::postgres::{connect_async, connect_spawned};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::CHANNEL;

pub(super) async fn notifier(
    url: String,
    bell: Arc<Notify>,
    stop: CancellationToken,
    own_pid: Arc<AtomicI32>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = bell.notified() => {}
        }
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            client = match connect_spawned(&url).await {
                Ok(c) => {
                    let ok = c
                        .batch_execute("SET synchronous_commit = off")
                        .await
                        .is_ok();
                    if let Ok(row) = c.query_one("SELECT pg_backend_pid()", &[]).await {
                        own_pid.store(row.get(0), Ordering::Relaxed);
                    }
                    ok.then_some(c)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to notify other replicas");
                    None
                }
            };
        }
        if let Some(c) = &client {
            if let Err(e) = c.batch_execute(&format!("NOTIFY {CHANNEL}")).await {
                tracing::warn!(error = %e, "cannot notify other replicas");
            }
        }
        // At most one notification per window: commits meanwhile ride on the next one, so
        // under load the other replicas read the log in batches rather than per commit.
        tokio::time::sleep(NOTIFY_WINDOW).await;
    }
}

/// The shortest time between two notifications of one replica.
const NOTIFY_WINDOW: Duration = Duration::from_millis(2);

pub(super) async fn listener(
    url: String,
    tail: Arc<Notify>,
    remote: Arc<Notify>,
    stop: CancellationToken,
    own_pid: Arc<AtomicI32>,
) {
    use futures::StreamExt;
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = connect_async(&url).await;
        let (client, mut connection) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to listen for other replicas");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let listen_sql = format!("LISTEN {CHANNEL}");
        let listen = client.batch_execute(&listen_sql);
        let mut listen = std::pin::pin!(listen);
        let mut listening = false;
        backoff = Duration::from_millis(100);
        // Catch up on whatever committed while we were not listening.
        tail.notify_one();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                r = &mut listen, if !listening => {
                    if r.is_err() { break; }
                    listening = true;
                }
                m = messages.next() => match m {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        if n.process_id() != own_pid.load(Ordering::Relaxed) {
                            tail.notify_one();
                            remote.notify_one();
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
            }
        }
        tracing::warn!("lost the PostgreSQL notification connection; reconnecting");
    }
}
