//! The embedded SQLite backend: one write connection (release-svc writes rarely; placement
//! events arrive in batches) and one read-only connection beside it (WAL lets it read while
//! the writer writes: an audit scan never holds the writer), used on the blocking thread
//! pool. The SQL is the shared one ([`super::sql`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::Connection;
use store_kit::sqlite::error as sql;

use super::forms::internal;
use super::sql::{Backend, Job, SqlStore, Told};
use crate::domain::{Error, Result};

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/sqlite/0001_init.sql"),
    include_str!("migrations/sqlite/0002_governance.sql"),
    include_str!("migrations/sqlite/0003_audit_append_only.sql"),
    include_str!("migrations/sqlite/0004_usage.sql"),
    include_str!("migrations/sqlite/0005_placements_seq.sql"),
];

/// The SQLite store.
pub type SqliteStore = SqlStore<SqliteBackend>;

/// The SQLite backend.
pub struct SqliteBackend {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    /// The read-only connection.
    reader: Arc<Mutex<Connection>>,
    alive: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.path)
            .finish()
    }
}

impl SqlStore<SqliteBackend> {
    /// Opens (creating and migrating) the database.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;
             PRAGMA cache_size = -1024;",
        )
        .map_err(sql)?;
        store_kit::sqlite::migrate(&conn, MIGRATIONS)?;
        let reader = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        reader
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        // Decisions are served from memory and the store is read in full only at start:
        // 1 MiB of page cache per connection (SQLite's default is 2 MiB) is plenty.
        reader
            .execute_batch("PRAGMA cache_size = -1024;")
            .map_err(sql)?;
        Ok(Self::new(SqliteBackend {
            path: path.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
            reader: Arc::new(Mutex::new(reader)),
            alive: tokio::sync::watch::channel(true).0,
        }))
    }
}

impl SqliteBackend {
    /// Runs `job` in a transaction on `conn` (committed if it succeeds, rolled back
    /// otherwise) on the blocking thread pool.
    async fn transaction<T: Send + 'static>(
        &self,
        conn: &Arc<Mutex<Connection>>,
        job: Job<T>,
    ) -> Result<T> {
        if !*self.alive.borrow() {
            return Err(Error::Unavailable(
                "the store failed and no longer writes; restart the service".into(),
            ));
        }
        let conn = conn.clone();
        match tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.unchecked_transaction().map_err(sql)?;
            let out = job(&*tx)?;
            tx.commit().map_err(sql)?;
            Ok(out)
        })
        .await
        {
            Ok(result) => result,
            Err(e) => {
                // A panic while holding the connection: what it left behind is unknown, so
                // the store stops serving and health turns NOT_SERVING.
                tracing::error!(error = %e, "the sqlite store panicked; writes fail until a restart");
                self.alive.send_replace(false);
                Err(internal(e))
            }
        }
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn write<T: Send + 'static>(&self, _told: Told, job: Job<T>) -> Result<T> {
        // One process writes an SQLite file: there is nobody to tell.
        self.transaction(&self.conn, job).await
    }

    async fn read<T: Send + 'static>(&self, job: Job<T>) -> Result<T> {
        self.transaction(&self.reader, job).await
    }

    fn writer_alive(&self) -> tokio::sync::watch::Receiver<bool> {
        self.alive.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::policy::Policy;
    use crate::store::{AuditEntry, AuditFilter, Store};

    /// An exact audit listing counts only its own resource's records toward its limit: a
    /// release's timeline is not pushed out by the records of releases whose names it
    /// prefixes (releases/1 and releases/10..19).
    #[tokio::test]
    async fn an_exact_audit_listing_skips_the_names_it_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        for (i, resource) in (10..20)
            .map(|n| format!("releases/{n}"))
            .chain(["releases/1".to_owned()])
            .enumerate()
        {
            let policy = Policy {
                environment: format!("env-{i}"),
                ..Policy::default()
            };
            let audit = AuditEntry {
                resource,
                action: "CancelRelease".into(),
                ..AuditEntry::default()
            };
            store.put_policy(policy, 0, audit).await.unwrap();
        }
        let list = |exact| {
            store.list_audit(AuditFilter {
                resource_prefix: "releases/1".into(),
                exact,
                limit: 5,
                ..AuditFilter::default()
            })
        };
        let prefixed = list(false).await.unwrap();
        assert!(prefixed.iter().all(|(_, a)| a.resource != "releases/1"));
        let exact = list(true).await.unwrap();
        let resources: Vec<&str> = exact.iter().map(|(_, a)| a.resource.as_str()).collect();
        assert_eq!(resources, ["releases/1"]);
    }

    /// A panic while the store holds its connection leaves a store that says it can no
    /// longer write; later calls fail as UNAVAILABLE.
    #[tokio::test]
    async fn a_panic_in_the_store_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        let mut alive = store.writer_alive();
        assert!(*alive.borrow_and_update());
        let died = store
            .backend
            .write(
                Told::Nobody,
                Box::new(|_| -> Result<()> { panic!("a bug while writing") }),
            )
            .await;
        assert!(matches!(died, Err(Error::Internal(_))), "{died:?}");
        alive.changed().await.unwrap();
        assert!(!*alive.borrow());
        let after = store.load().await;
        assert!(matches!(after, Err(Error::Unavailable(_))), "{after:?}");
    }
}
