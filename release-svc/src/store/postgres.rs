//! The PostgreSQL backend (a `postgres://` database URL): the shared SQL ([`super::sql`])
//! on a small pool of connections ([`store_kit::postgres::Pool`]), each write one READ
//! COMMITTED transaction, each read one REPEATABLE READ snapshot. A lost connection is
//! replaced on the next call; a call that finds the server unreachable is UNAVAILABLE and
//! writes nothing. Migrations run under an advisory lock, so replicas starting together
//! apply them once.
//!
//! # Replicas
//!
//! A committed write that changed what Evaluate decides sends a NOTIFY inside its
//! transaction (delivered only if it commits) naming this process and what changed:
//! `placements` (the applier applied placement events: read the placements since the last
//! read) or `everything` (reload). Every replica LISTENs on its own connection and ignores
//! its own notifications. One replica at a time applies placement events: the holder of a
//! session advisory lock (the applier lease), lost with its connection.

use std::sync::Arc;

use async_trait::async_trait;
use store_kit::postgres::{connect_async, IsolationLevel, PgDb, Pool, PoolConfig};
use tokio_util::sync::CancellationToken;

use super::sql::{Backend, Job, SqlStore, Told};
use super::{ChangeNotifier, Changed, Changes};
use crate::domain::Result;
use service_kit::time::locks;

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/postgres/0001_init.sql"),
    include_str!("migrations/postgres/0002_audit_truncate.sql"),
    include_str!("migrations/postgres/0003_usage.sql"),
    include_str!("migrations/postgres/0004_placements_seq.sql"),
];

/// Connections per process: release-svc writes rarely and serves decisions from memory;
/// the pool lets an audit listing or a usage read run beside a write.
const POOL_SIZE: usize = 4;

/// The notification channel of committed changes.
const CHANNEL: &str = "release_svc_changes";

/// The PostgreSQL store.
pub type PostgresStore = SqlStore<PostgresBackend>;

/// The PostgreSQL backend.
pub struct PostgresBackend {
    url: String,
    schema: Option<String>,
    pool: Pool,
    /// This process in its notifications (so it skips its own).
    instance: Arc<str>,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// A name for this process unlikely to be any other replica's.
fn instance() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", h.finish())
}

/// Quotes `name` as an identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl SqlStore<PostgresBackend> {
    /// Connects to `url` and migrates; with `schema`, everything lives in that schema
    /// (created if missing: tests get one each).
    pub async fn open(url: &str, schema: Option<&str>) -> Result<Arc<Self>> {
        let init = schema.map_or(String::new(), |s| {
            format!("SET search_path TO {}", quoted(s))
        });
        let pool = Pool::start(PoolConfig {
            name: "release",
            url: url.to_owned(),
            size: POOL_SIZE,
            init: init.clone(),
            wait_metric: None,
        })?;
        let create = schema.map(|s| format!("CREATE SCHEMA IF NOT EXISTS {}", quoted(s)));
        pool.run(move |conn| {
            if let Some(create) = &create {
                conn.client
                    .batch_execute(&format!("{create}; {init}"))
                    .map_err(|e| store_kit::postgres::error(&e))?;
            }
            store_kit::postgres::migrate(&mut conn.client, locks::RELEASE_MIGRATIONS, MIGRATIONS)
        })
        .await?;
        Ok(Arc::new(Self::new(PostgresBackend {
            url: url.to_owned(),
            schema: schema.map(str::to_owned),
            pool,
            instance: instance().into(),
        })))
    }
}

/// The payload of a commit's notification: who committed and what changed.
fn payload(instance: &str, told: Told) -> Option<String> {
    match told {
        Told::Nobody => None,
        Told::Placements => Some(format!("{instance}:placements")),
        Told::Everything => Some(format!("{instance}:everything")),
    }
}

/// What a notification asks of this replica (`None`: its own commit, in memory already).
/// A payload without a sender (an older replica's) is another replica's.
fn heard(own: &str, payload: &str) -> Option<Changed> {
    let (from, what) = payload.split_once(':').unwrap_or(("", payload));
    if from == own {
        return None;
    }
    Some(if what == "placements" {
        Changed::Placements
    } else {
        Changed::Everything
    })
}

/// Drives a listening connection, forwarding notifications to `tx` until it ends.
async fn pump(
    mut connection: store_kit::postgres::AsyncConnection,
    tx: ChangeNotifier,
    own: Arc<str>,
) {
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                if let Some(changed) = heard(&own, n.payload()) {
                    tx.notify(changed);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "PostgreSQL listener connection failed");
                return;
            }
            None => return,
        }
    }
}

#[async_trait]
impl Backend for PostgresBackend {
    async fn write<T: Send + 'static>(&self, told: Told, job: Job<T>) -> Result<T> {
        let notify = payload(&self.instance, told).map(|p| format!("NOTIFY {CHANNEL}, '{p}'"));
        self.pool
            .run(move |conn| {
                let db = PgDb::begin(conn, IsolationLevel::ReadCommitted, false)
                    .map_err(|e| store_kit::postgres::error(&e))?;
                let out = job(&db)?;
                if let Some(notify) = &notify {
                    db.batch(notify)?;
                }
                db.commit().map_err(|f| f.error)?;
                Ok(out)
            })
            .await
    }

    async fn read<T: Send + 'static>(&self, job: Job<T>) -> Result<T> {
        self.pool.run(move |conn| conn.read(job)).await
    }

    async fn changes(&self) -> Option<Changes> {
        let (rx, tx) = Changes::channel();
        let (url, own) = (self.url.clone(), self.instance.clone());
        tokio::spawn(async move {
            loop {
                match connect_async(&url).await {
                    Ok((client, connection)) => {
                        let pumping = tokio::spawn(pump(connection, tx.clone(), own.clone()));
                        if client
                            .batch_execute(&format!("LISTEN {CHANNEL}"))
                            .await
                            .is_ok()
                        {
                            // Whatever happened while not listening: reload once.
                            tx.notify(Changed::Everything);
                            let _ = pumping.await;
                        }
                        drop(client);
                    }
                    Err(e) => tracing::warn!(error = %e, "PostgreSQL listener cannot connect"),
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
        Some(rx)
    }

    async fn applier_lease(&self, stop: &CancellationToken) -> Result<CancellationToken> {
        loop {
            if stop.is_cancelled() {
                return Ok(stop.child_token());
            }
            if let Ok((client, connection)) = connect_async(&self.url).await {
                let lost = CancellationToken::new();
                let on_end = lost.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!(error = %e, "applier lease connection ended");
                    }
                    on_end.cancel();
                });
                let held: bool = match client
                    .query_one(
                        "SELECT pg_try_advisory_lock($1)",
                        &[&locks::RELEASE_APPLIER],
                    )
                    .await
                {
                    Ok(row) => row.get(0),
                    Err(_) => false,
                };
                if held {
                    // The lock lives as long as this session: keep it open (and check it)
                    // until it dies or the service stops.
                    let (watch, stop) = (lost.clone(), stop.clone());
                    tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => break,
                                () = watch.cancelled() => break,
                                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                            }
                            if client.simple_query("SELECT 1").await.is_err() {
                                break;
                            }
                        }
                        watch.cancel();
                    });
                    return Ok(lost);
                }
                lost.cancel();
            }
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_skips_its_own_notifications_and_hears_the_others() {
        let own = "a1";
        assert_eq!(heard(own, &payload(own, Told::Placements).unwrap()), None);
        assert_eq!(
            heard(own, &payload("b2", Told::Placements).unwrap()),
            Some(Changed::Placements)
        );
        assert_eq!(
            heard(own, &payload("b2", Told::Everything).unwrap()),
            Some(Changed::Everything)
        );
        // An older replica's payloads name no sender.
        assert_eq!(heard(own, "placements"), Some(Changed::Placements));
        assert_eq!(heard(own, ""), Some(Changed::Everything));
        assert_eq!(payload(own, Told::Nobody), None);
    }
}
