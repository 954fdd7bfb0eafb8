//! The PostgreSQL backend (a `postgres://` database URL): the same [`Store`] contract as
//! SQLite, the same stored forms (shared with [`super::sqlite`]), its own migrations.
//!
//! One connection behind an async mutex (release-svc writes rarely; reads are served from
//! the in-memory snapshot). A lost connection is re-established on the next call; a call
//! that fails because the server is unreachable is UNAVAILABLE and writes nothing (each
//! write is one transaction). Migrations run under an advisory lock, so replicas starting
//! together apply them once.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use service_kit::pg::MakeRustlsConnect;
use tokio::sync::Mutex;
use tokio_postgres::{Client, Transaction};
use tokio_util::sync::CancellationToken;

use super::sqlite::{
    corrupt, feature_body, feature_from, placement_state, policy_body, policy_from,
    release_columns, release_from, withdrawal_entries,
};
use super::{
    AuditEntry, AuditFilter, ChangeNotifier, Changed, Changes, LastEvaluated, Loaded,
    PlacementsAfter, Store, UsageCount, Withdrawal, LAST_EVALUATED, PRUNE_USAGE, SEEN_OF, USAGE_OF,
};
use crate::domain::model::{Feature, Millis, Release};
use crate::domain::placements::Placement;
use crate::domain::policy::Policy;
use crate::domain::{Error, Result};

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/postgres/0001_init.sql"),
    include_str!("migrations/postgres/0002_audit_truncate.sql"),
    include_str!("migrations/postgres/0003_usage.sql"),
    include_str!("migrations/postgres/0004_placements_seq.sql"),
];

/// The PostgreSQL store.
pub struct PostgresStore {
    url: String,
    /// TLS as the URL's `sslmode` asks.
    tls: MakeRustlsConnect,
    schema: Option<String>,
    client: Mutex<Option<Client>>,
    /// The server process of our write connection: its own notifications need no reload.
    own_pid: Arc<AtomicI32>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

fn pg(e: tokio_postgres::Error) -> Error {
    // Connection trouble, a server shutting down (class 57: admin shutdown, crash shutdown,
    // cannot connect now) or a connection exception (class 08): retryable, UNAVAILABLE.
    let transient = e.as_db_error().is_none_or(|d| {
        let class = &d.code().code()[..2];
        class == "57" || class == "08"
    });
    if e.is_closed() || transient {
        Error::Unavailable(format!("PostgreSQL: {e}"))
    } else {
        Error::Internal(format!("PostgreSQL: {}", service_kit::error::chain(&e)))
    }
}

use service_kit::time::{locks, to_i64, to_u64};

/// The server process id of a connection.
async fn backend_pid(client: &Client) -> Result<i32> {
    Ok(client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(pg)?
        .get(0))
}

async fn connect(url: &str, tls: &MakeRustlsConnect, schema: Option<&str>) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, tls.clone())
        .await
        .map_err(pg)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    if let Some(schema) = schema {
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; SET search_path TO \"{schema}\""
            ))
            .await
            .map_err(pg)?;
    }
    Ok(client)
}

impl PostgresStore {
    /// Connects to `url` and migrates; with `schema`, everything lives in that schema
    /// (created if missing: tests get one each).
    pub async fn open(url: &str, schema: Option<&str>) -> Result<Arc<Self>> {
        let (url, tls) = service_kit::pg::connector(url)
            .map_err(|e| Error::Unavailable(format!("PostgreSQL: {e:#}")))?;
        let url = url.as_str();
        let mut client = connect(url, &tls, schema).await?;
        let tx = client.transaction().await.map_err(pg)?;
        // A runtime role without CREATE on the schema opens an up-to-date database: no
        // DDL runs unless a migration is due.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&locks::RELEASE_MIGRATIONS],
        )
        .await
        .map_err(pg)?;
        let tracked: bool = tx
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await
            .map_err(pg)?
            .get(0);
        if !tracked {
            tx.batch_execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
                .await
                .map_err(pg)?;
        }
        let applied: i64 = tx
            .query_one("SELECT count(*) FROM schema_migrations", &[])
            .await
            .map_err(pg)?
            .get(0);
        for (i, m) in MIGRATIONS.iter().enumerate().skip(to_u64(applied) as usize) {
            tx.batch_execute(m).await.map_err(pg)?;
            let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        let own_pid = Arc::new(AtomicI32::new(backend_pid(&client).await?));
        Ok(Arc::new(Self {
            url: url.to_owned(),
            tls,
            schema: schema.map(str::to_owned),
            client: Mutex::new(Some(client)),
            own_pid,
        }))
    }

    /// Runs `f` in one transaction on a live connection (reconnecting if the last one
    /// died); a write (`notify`) also tells every replica listening that data changed.
    async fn tx<T, F>(&self, notify: bool, f: F) -> Result<T>
    where
        F: for<'a> FnOnce(
            &'a Transaction<'a>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>,
        >,
    {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let client = connect(&self.url, &self.tls, self.schema.as_deref()).await?;
            self.own_pid
                .store(backend_pid(&client).await?, Ordering::Relaxed);
            *guard = Some(client);
        }
        let Some(client) = guard.as_mut() else {
            return Err(Error::Unavailable("PostgreSQL: no connection".into()));
        };
        let tx = client.transaction().await.map_err(pg)?;
        let out = f(&tx).await?;
        if notify {
            // Delivered at commit, only if the transaction commits.
            tx.batch_execute(&format!("NOTIFY {CHANNEL}"))
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        Ok(out)
    }
}

/// The notification channel of committed changes.
const CHANNEL: &str = "release_svc_changes";

const APPLIER_LOCK: i64 = locks::RELEASE_APPLIER;
const REQUEST_ID_LOCK: i32 = locks::RELEASE_REQUEST_ID;

/// The payload of a commit that applied placement events and changed nothing else.
const PLACEMENTS: &str = "placements";

/// Drives `connection`, forwarding notifications to `tx` until it ends.
async fn pump<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    tx: ChangeNotifier,
    own_pid: Arc<AtomicI32>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let message = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
        match message {
            // This replica's own commits are in its memory already.
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n)))
                if n.process_id() == own_pid.load(Ordering::Relaxed) => {}
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                tx.notify(if n.payload() == PLACEMENTS {
                    Changed::Placements
                } else {
                    Changed::Everything
                });
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

/// The columns [`placement_row`] reads.
const PLACEMENT_COLUMNS: &str = "deployment, target, environment, artifact, version, state, seq";

/// A placement read with [`PLACEMENT_COLUMNS`].
fn placement_row(r: &tokio_postgres::Row) -> Result<Placement> {
    let deployment: i64 = r.get(0);
    let target: String = r.get(1);
    Ok(Placement {
        state: placement_state(r.get(5), deployment, &target)?,
        deployment,
        target,
        environment: r.get(2),
        artifact: r.get(3),
        version: r.get(4),
        sequence: to_u64(r.get(6)),
    })
}

/// The consumer's cursor and events-applied counter.
async fn consumer_position(tx: &Transaction<'_>) -> Result<(u64, u64)> {
    let c = tx
        .query_one(
            "SELECT cursor, events_applied FROM consumer WHERE id = 1",
            &[],
        )
        .await
        .map_err(pg)?;
    Ok((to_u64(c.get(0)), to_u64(c.get(1))))
}

async fn insert_audit(tx: &Transaction<'_>, a: &AuditEntry) -> Result<()> {
    tx.execute(
        "INSERT INTO audit_records (time_ms, principal, action, resource, before, after, request_id, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[&a.time_ms, &a.principal, &a.action, &a.resource, &a.before, &a.after, &a.request_id, &a.reason],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

async fn insert_placement(tx: &Transaction<'_>, p: &Placement) -> Result<()> {
    tx.execute(
        "INSERT INTO placements (deployment, target, environment, artifact, version, state, seq) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (deployment, target) DO UPDATE SET state = excluded.state, seq = excluded.seq
         WHERE excluded.seq > placements.seq",
        &[&p.deployment, &p.target, &p.environment, &p.artifact, &p.version, &p.state.code(), &to_i64(p.sequence)],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

async fn insert_withdrawals(tx: &Transaction<'_>, withdrawals: &[Withdrawal]) -> Result<()> {
    for w in withdrawals {
        tx.execute(
            "INSERT INTO withdrawals (feature, environment, reason, seq, time_ms) VALUES ($1, $2, $3, $4, $5)",
            &[&w.feature, &w.environment, &w.reason, &to_i64(w.sequence), &w.time_ms],
        )
        .await
        .map_err(pg)?;
    }
    for a in withdrawal_entries(withdrawals) {
        insert_audit(tx, &a).await?;
    }
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
    async fn changes(&self) -> Option<Changes> {
        let (rx, tx) = Changes::channel();
        let (url, schema, tls) = (self.url.clone(), self.schema.clone(), self.tls.clone());
        let own_pid = self.own_pid.clone();
        tokio::spawn(async move {
            loop {
                match tokio_postgres::connect(&url, tls.clone()).await {
                    Ok((client, connection)) => {
                        let forward = tx.clone();
                        let pumping = tokio::spawn(pump(connection, forward, own_pid.clone()));
                        let listen = match &schema {
                            Some(s) => format!("SET search_path TO \"{s}\"; LISTEN {CHANNEL}"),
                            None => format!("LISTEN {CHANNEL}"),
                        };
                        if client.batch_execute(&listen).await.is_ok() {
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
            if let Ok((client, connection)) =
                tokio_postgres::connect(&self.url, self.tls.clone()).await
            {
                let lost = CancellationToken::new();
                let on_end = lost.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!(error = %e, "applier lease connection ended");
                    }
                    on_end.cancel();
                });
                let held: bool = match client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&APPLIER_LOCK])
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

    async fn placements_after(&self, after: u64) -> Result<PlacementsAfter> {
        self.tx(false, |tx| {
            Box::pin(async move {
                let mut out = PlacementsAfter::default();
                for r in tx
                    .query(
                        &format!(
                            "SELECT {PLACEMENT_COLUMNS} FROM placements WHERE seq > $1 ORDER BY seq"
                        ),
                        &[&to_i64(after)],
                    )
                    .await
                    .map_err(pg)?
                {
                    out.placements.push(placement_row(&r)?);
                }
                (out.cursor, out.events_applied) = consumer_position(tx).await?;
                Ok(out)
            })
        })
        .await
    }

    async fn load(&self) -> Result<Loaded> {
        self.tx(false, |tx| {
            Box::pin(async move {
                let mut loaded = Loaded::default();
                for r in tx
                    .query("SELECT key, body, revision, create_ms, update_ms FROM features", &[])
                    .await
                    .map_err(pg)?
                {
                    let key: String = r.get(0);
                    let body: String = r.get(1);
                    let f = feature_from(key.clone(), &body, r.get(2), r.get(3), r.get(4))
                        .map_err(|e| corrupt("features", &key, e))?;
                    loaded.features.insert(key, Arc::new(f));
                }
                for r in tx
                    .query("SELECT id, description, features, environments, state, revision, create_ms, update_ms, governance FROM releases", &[])
                    .await
                    .map_err(pg)?
                {
                    let id: i64 = r.get(0);
                    let features: String = r.get(2);
                    let governance: String = r.get(8);
                    let release = release_from(
                        id,
                        r.get(1),
                        &features,
                        r.get(3),
                        r.get(4),
                        r.get(5),
                        r.get(6),
                        r.get(7),
                        &governance,
                    )
                    .map_err(|e| corrupt("releases", &id, e))?;
                    loaded.releases.insert(id, release);
                }
                for r in tx
                    .query(&format!("SELECT {PLACEMENT_COLUMNS} FROM placements"), &[])
                    .await
                    .map_err(pg)?
                {
                    loaded.placements.push(placement_row(&r)?);
                }
                (loaded.cursor, loaded.events_applied) = consumer_position(tx).await?;
                for r in tx
                    .query("SELECT environment, body, revision, update_ms FROM policies", &[])
                    .await
                    .map_err(pg)?
                {
                    let environment: String = r.get(0);
                    let body: String = r.get(1);
                    loaded.policies.insert(
                        environment.clone(),
                        policy_from(environment.clone(), &body, r.get(2), r.get(3))
                            .map_err(|e| corrupt("policies", &environment, e))?,
                    );
                }
                Ok(loaded)
            })
        })
        .await
    }

    async fn insert_feature(&self, feature: Feature, audit: AuditEntry) -> Result<()> {
        self.tx(true, |tx| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "INSERT INTO features (key, body, revision, create_ms, update_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING",
                        &[&feature.key, &feature_body(&feature)?, &feature.revision, &feature.create_ms, &feature.update_ms],
                    )
                    .await
                    .map_err(pg)?;
                if n == 0 {
                    return Err(Error::AlreadyExists {
                        resource: format!("features/{}", feature.key),
                        detail: "choose another key or update the feature".into(),
                    });
                }
                insert_audit(tx, &audit).await
            })
        })
        .await
    }

    async fn update_feature(
        &self,
        feature: Feature,
        expected: i64,
        audit: AuditEntry,
    ) -> Result<()> {
        self.tx(true, |tx| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "UPDATE features SET body = $1, revision = $2, update_ms = $3 WHERE key = $4 AND revision = $5",
                        &[&feature_body(&feature)?, &feature.revision, &feature.update_ms, &feature.key, &expected],
                    )
                    .await
                    .map_err(pg)?;
                if n == 0 {
                    return Err(Error::Aborted(format!(
                        "features/{} changed concurrently; read it again and retry",
                        feature.key
                    )));
                }
                insert_audit(tx, &audit).await
            })
        })
        .await
    }

    async fn insert_release(
        &self,
        release: Release,
        request_id: Option<String>,
        mut audit: AuditEntry,
    ) -> Result<(i64, bool)> {
        self.tx(true, |tx| {
            Box::pin(async move {
                let (features, envs, governance) = release_columns(&release)?;
                let fingerprint = format!("{}|{features}|{envs}", release.description);
                if let Some(request_id) = &request_id {
                    // Replicas racing on one request id queue here; the second then finds
                    // the first's release (READ COMMITTED: the next statement sees it).
                    tx.execute(
                        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                        &[&REQUEST_ID_LOCK, request_id],
                    )
                    .await
                    .map_err(pg)?;
                    let seen = tx
                        .query_opt(
                            "SELECT fingerprint, resource FROM request_ids WHERE request_id = $1",
                            &[request_id],
                        )
                        .await
                        .map_err(pg)?;
                    if let Some(row) = seen {
                        let (f, resource): (String, String) = (row.get(0), row.get(1));
                        if f != fingerprint {
                            return Err(Error::invalid(
                                "request_id",
                                "was already used for a different request; use a new request_id",
                            ));
                        }
                        let id = resource
                            .parse()
                            .map_err(|e| corrupt("request_ids", &request_id, e))?;
                        return Ok((id, false));
                    }
                }
                let id: i64 = tx
                    .query_one(
                        "INSERT INTO releases (description, features, environments, state, revision, create_ms, update_ms, governance) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                        &[&release.description, &features, &envs, &release.state.code(), &release.revision, &release.create_ms, &release.update_ms, &governance],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                if audit.resource.ends_with('/') {
                    audit.resource.push_str(&id.to_string());
                }
                insert_audit(tx, &audit).await?;
                if let Some(request_id) = &request_id {
                    tx.execute(
                        "INSERT INTO request_ids (request_id, fingerprint, resource) VALUES ($1, $2, $3)",
                        &[request_id, &fingerprint, &id.to_string()],
                    )
                    .await
                    .map_err(pg)?;
                }
                Ok((id, true))
            })
        })
        .await
    }

    async fn update_release(
        &self,
        release: Release,
        expected: i64,
        audit: Vec<AuditEntry>,
    ) -> Result<()> {
        self.tx(true, |tx| {
            Box::pin(async move {
                let (features, envs, governance) = release_columns(&release)?;
                let n = tx
                    .execute(
                        "UPDATE releases SET description = $1, features = $2, environments = $3, state = $4, revision = $5, update_ms = $6, governance = $9 WHERE id = $7 AND revision = $8",
                        &[&release.description, &features, &envs, &release.state.code(), &release.revision, &release.update_ms, &release.id, &expected, &governance],
                    )
                    .await
                    .map_err(pg)?;
                if n == 0 {
                    return Err(Error::Aborted(format!(
                        "releases/{} changed concurrently; read it again and retry",
                        release.id
                    )));
                }
                for a in &audit {
                    insert_audit(tx, a).await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn put_policy(&self, policy: Policy, expected: i64, audit: AuditEntry) -> Result<()> {
        self.tx(true, |tx| {
            Box::pin(async move {
                let body = policy_body(&policy)?;
                let n = if expected == 0 {
                    tx.execute(
                        "INSERT INTO policies (environment, body, revision, update_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (environment) DO NOTHING",
                        &[&policy.environment, &body, &policy.revision, &policy.update_ms],
                    )
                    .await
                } else {
                    tx.execute(
                        "UPDATE policies SET body = $2, revision = $3, update_ms = $4 WHERE environment = $1 AND revision = $5",
                        &[&policy.environment, &body, &policy.revision, &policy.update_ms, &expected],
                    )
                    .await
                }
                .map_err(pg)?;
                if n == 0 {
                    return Err(Error::Aborted(format!(
                        "policies/{} changed concurrently; read it again and retry with its etag",
                        policy.environment
                    )));
                }
                insert_audit(tx, &audit).await
            })
        })
        .await
    }

    async fn list_audit(&self, filter: AuditFilter) -> Result<Vec<(i64, AuditEntry)>> {
        self.tx(false, |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT id, time_ms, principal, action, resource, before, after, request_id, reason FROM audit_records
                         WHERE id > $1 AND starts_with(resource, $2) AND ($3 = '' OR principal = $3)
                           AND time_ms >= $4 AND time_ms < $5 AND (NOT $7 OR resource = $2)
                         ORDER BY id LIMIT $6",
                        &[
                            &filter.after_id,
                            &filter.resource_prefix,
                            &filter.principal,
                            &filter.start_ms.unwrap_or(i64::MIN),
                            &filter.end_ms.unwrap_or(i64::MAX),
                            &i64::try_from(filter.limit).unwrap_or(i64::MAX),
                            &filter.exact,
                        ],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        (
                            r.get(0),
                            AuditEntry {
                                time_ms: r.get(1),
                                principal: r.get(2),
                                action: r.get(3),
                                resource: r.get(4),
                                before: r.get(5),
                                after: r.get(6),
                                request_id: r.get(7),
                                reason: r.get(8),
                            },
                        )
                    })
                    .collect())
            })
        })
        .await
    }

    async fn apply_placements(
        &self,
        events: Vec<Placement>,
        cursor: u64,
        withdrawals: Vec<Withdrawal>,
    ) -> Result<u64> {
        self.tx(false, |tx| {
            Box::pin(async move {
                // Replicas read only the placements since their last read (delivered at
                // commit, only if the transaction commits).
                tx.batch_execute(&format!("NOTIFY {CHANNEL}, '{PLACEMENTS}'"))
                    .await
                    .map_err(pg)?;
                // The consumer row is locked first: one applier at a time, whatever replica.
                let stored: i64 = tx
                    .query_one("SELECT cursor FROM consumer WHERE id = 1 FOR UPDATE", &[])
                    .await
                    .map_err(pg)?
                    .get(0);
                let fresh: Vec<&Placement> =
                    events.iter().filter(|e| e.sequence > to_u64(stored)).collect();
                for e in &fresh {
                    insert_placement(tx, e).await?;
                }
                insert_withdrawals(tx, &withdrawals).await?;
                let applied: i64 = tx
                    .query_one(
                        "UPDATE consumer SET cursor = greatest(cursor, $1), events_applied = events_applied + $2 WHERE id = 1 RETURNING events_applied",
                        &[&to_i64(cursor), &i64::try_from(fresh.len()).unwrap_or(i64::MAX)],
                    )
                    .await
                    .map_err(pg)?
                    .get(0);
                Ok(to_u64(applied))
            })
        })
        .await
    }

    async fn replace_placements(
        &self,
        placements: Vec<Placement>,
        cursor: u64,
        withdrawals: Vec<Withdrawal>,
    ) -> Result<()> {
        self.tx(true, |tx| {
            Box::pin(async move {
                tx.query_one("SELECT cursor FROM consumer WHERE id = 1 FOR UPDATE", &[])
                    .await
                    .map_err(pg)?;
                tx.execute("DELETE FROM placements", &[])
                    .await
                    .map_err(pg)?;
                for p in &placements {
                    insert_placement(tx, p).await?;
                }
                insert_withdrawals(tx, &withdrawals).await?;
                tx.execute(
                    "UPDATE consumer SET cursor = $1 WHERE id = 1",
                    &[&to_i64(cursor)],
                )
                .await
                .map_err(pg)?;
                Ok(())
            })
        })
        .await
    }

    async fn add_usage(
        &self,
        counts: Vec<UsageCount>,
        now_ms: Millis,
        prune_before_ms: Millis,
    ) -> Result<()> {
        // One statement per table for the whole flush (each (feature, environment,
        // variant) appears once per flush: the counters are unique).
        self.tx(false, |tx| {
            Box::pin(async move {
                let features: Vec<&str> = counts.iter().map(|c| c.feature.as_str()).collect();
                let environments: Vec<&str> =
                    counts.iter().map(|c| c.environment.as_str()).collect();
                let variants: Vec<&str> = counts.iter().map(|c| c.variant.as_str()).collect();
                let hours: Vec<i64> = counts.iter().map(|c| c.hour_ms).collect();
                let numbers: Vec<i64> = counts.iter().map(|c| to_i64(c.count)).collect();
                tx.execute(
                    "INSERT INTO evaluation_usage (feature, environment, variant, hour_ms, count) \
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) \
                     ON CONFLICT (feature, environment, variant, hour_ms) \
                     DO UPDATE SET count = evaluation_usage.count + excluded.count",
                    &[&features, &environments, &variants, &hours, &numbers],
                )
                .await
                .map_err(pg)?;
                tx.execute(
                    "INSERT INTO evaluation_seen (feature, environment, last_ms) \
                     SELECT DISTINCT f, e, $3::bigint FROM unnest($1::text[], $2::text[]) AS u(f, e) \
                     ON CONFLICT (feature, environment) DO UPDATE SET last_ms = \
                     GREATEST(evaluation_seen.last_ms, excluded.last_ms)",
                    &[&features, &environments, &now_ms],
                )
                .await
                .map_err(pg)?;
                tx.execute(PRUNE_USAGE, &[&prune_before_ms])
                    .await
                    .map_err(pg)?;
                Ok(())
            })
        })
        .await
    }

    async fn usage(
        &self,
        feature: String,
        since_ms: Millis,
    ) -> Result<(Vec<UsageCount>, Vec<LastEvaluated>)> {
        self.tx(false, |tx| {
            Box::pin(async move {
                let counts = tx
                    .query(USAGE_OF, &[&feature, &since_ms])
                    .await
                    .map_err(pg)?
                    .iter()
                    .map(|r| UsageCount {
                        feature: r.get("feature"),
                        environment: r.get("environment"),
                        variant: r.get("variant"),
                        hour_ms: r.get("hour_ms"),
                        count: to_u64(r.get("count")),
                    })
                    .collect();
                let seen = tx
                    .query(SEEN_OF, &[&feature])
                    .await
                    .map_err(pg)?
                    .iter()
                    .map(|r| LastEvaluated {
                        feature: r.get("feature"),
                        environment: r.get("environment"),
                        time_ms: r.get("last_ms"),
                    })
                    .collect();
                Ok((counts, seen))
            })
        })
        .await
    }

    async fn last_evaluated(&self) -> Result<Vec<(String, Millis)>> {
        self.tx(false, |tx| {
            Box::pin(async move {
                Ok(tx
                    .query(LAST_EVALUATED, &[])
                    .await
                    .map_err(pg)?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect())
            })
        })
        .await
    }

    async fn list_withdrawals(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, Withdrawal)>> {
        self.tx(false, |tx| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        "SELECT id, feature, environment, reason, seq, time_ms FROM withdrawals WHERE id < $1 ORDER BY id DESC LIMIT $2",
                        &[&before.unwrap_or(i64::MAX), &i64::try_from(limit).unwrap_or(i64::MAX)],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        (
                            r.get(0),
                            Withdrawal {
                                feature: r.get(1),
                                environment: r.get(2),
                                reason: r.get(3),
                                sequence: to_u64(r.get(4)),
                                time_ms: r.get(5),
                            },
                        )
                    })
                    .collect())
            })
        })
        .await
    }
}
