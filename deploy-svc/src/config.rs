//! Configuration: every flag has an environment variable (`DEPLOY_SVC_*`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::domain::model::HealthWindows;
use crate::placement_log::WatchLimits;
use crate::store::postgres::{NotifyMode, PostgresOptions, ReportStatements};
use crate::store::sqlite::SqliteOptions;

/// deploy-svc's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "deploy-svc",
    about = "Deployment Management gRPC service",
    version
)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "DEPLOY_SVC_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// SQLite database file (created if missing), or a PostgreSQL URL
    /// (`postgres://user@host:port/db`) for several replicas on one database.
    #[arg(
        long,
        env = "DEPLOY_SVC_DATABASE",
        default_value = "data/deploy-svc.db"
    )]
    pub database: PathBuf,
    /// SQLite durability: `full` survives power loss, `normal` only process crashes.
    #[arg(long, env = "DEPLOY_SVC_SYNCHRONOUS", default_value = "full", value_parser = ["full", "normal"])]
    pub synchronous: String,
    /// Most writes committed in one transaction (group commit); 1 commits every write alone.
    #[arg(long, env = "DEPLOY_SVC_MAX_BATCH", default_value_t = 1024)]
    pub max_batch: usize,
    /// Placement events retained for resuming watchers; older ones are pruned.
    #[arg(long, env = "DEPLOY_SVC_RETENTION_EVENTS", default_value_t = 1_000_000)]
    pub retention_events: u64,
    /// Messages queued per watcher before it counts as slow.
    #[arg(long, env = "DEPLOY_SVC_WATCH_QUEUE", default_value_t = 256)]
    pub watch_queue: usize,
    /// A watcher whose queue stays full this long is cut off (RESOURCE_EXHAUSTED).
    #[arg(
        long,
        env = "DEPLOY_SVC_SLOW_WATCHER_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub slow_watcher_timeout_ms: u64,
    /// A target without a heartbeat for this long is STALE.
    #[arg(long, env = "DEPLOY_SVC_HEALTHY_WINDOW_MS", default_value_t = 30_000)]
    pub healthy_window_ms: i64,
    /// A target without a heartbeat for this long is LOST.
    #[arg(long, env = "DEPLOY_SVC_LOST_WINDOW_MS", default_value_t = 300_000)]
    pub lost_window_ms: i64,
    /// An agent silent (no heartbeat, no report) for this long has its unfinished ordered
    /// placements marked FAILED.
    #[arg(long, env = "DEPLOY_SVC_AGENT_TIMEOUT_MS", default_value_t = 15_000)]
    pub agent_timeout_ms: u64,
    /// How often lost agents, baked canaries and automatic rollbacks are handled.
    #[arg(long, env = "DEPLOY_SVC_TICK_INTERVAL_MS", default_value_t = 1_000)]
    pub tick_interval_ms: u64,
    /// On shutdown, the longest wait for in-flight calls before exiting.
    #[arg(long, env = "DEPLOY_SVC_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Largest request or response message in bytes.
    #[arg(long, env = "DEPLOY_SVC_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// PostgreSQL: connections (each on its own thread) for reads and writes.
    #[arg(long, env = "DEPLOY_SVC_PG_POOL_SIZE", default_value_t = 8)]
    pub pg_pool_size: usize,
    /// PostgreSQL: groups of placement reports committing at once (each on its own
    /// connection; the reports that arrive meanwhile form the next group). One by default:
    /// a group is four round trips whatever its size, so the reports queued behind it
    /// make the next group larger rather than a second transaction contending for the
    /// same rows.
    #[arg(long, env = "DEPLOY_SVC_PG_REPORT_GROUPS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub pg_report_groups: u16,
    /// PostgreSQL: how a group of placement reports is written: `group` (one read and one
    /// write statement for the whole group) or `each` (one of each per report, for
    /// comparison).
    #[arg(
        long,
        env = "DEPLOY_SVC_PG_REPORT_STATEMENTS",
        value_enum,
        default_value = "group"
    )]
    pub pg_report_statements: ReportStatements,
    /// PostgreSQL: how replicas wake each other after writes: `coalesced` (one NOTIFY
    /// outside the write transactions), `per-transaction` (a NOTIFY in every write, for
    /// comparison) or `off` (replicas only poll).
    #[arg(
        long,
        env = "DEPLOY_SVC_PG_NOTIFY",
        value_enum,
        default_value = "coalesced"
    )]
    pub pg_notify: NotifyMode,
    /// PostgreSQL: how often a replica reads the log without a wake-up.
    #[arg(long, env = "DEPLOY_SVC_PG_POLL_MS", default_value_t = 100)]
    pub pg_poll_ms: u64,
    /// TLS, authentication, authorization and limits of the listener.
    #[command(flatten)]
    pub server: service_kit::ServerArgs,
    /// Most WatchPlacements streams open at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DEPLOY_SVC_MAX_WATCHERS", default_value_t = 1024)]
    pub max_watchers: usize,
    /// Logging.
    #[command(flatten)]
    pub log: service_kit::LogArgs,
}

impl Config {
    /// A configuration with defaults for a database at `database` (used by tests).
    pub fn for_database(database: impl Into<PathBuf>) -> Self {
        use clap::Parser;
        let mut config = Self::parse_from(["deploy-svc"]);
        config.database = database.into();
        config
    }

    /// The storage options.
    pub fn sqlite_options(&self) -> SqliteOptions {
        SqliteOptions {
            synchronous_full: self.synchronous == "full",
            max_batch: self.max_batch,
            retention: self.retention_events,
            ..SqliteOptions::new(&self.database)
        }
    }

    /// The PostgreSQL URL, when `--database` is one.
    pub fn postgres_url(&self) -> Option<String> {
        let text = self.database.to_string_lossy();
        (text.starts_with("postgres://") || text.starts_with("postgresql://"))
            .then(|| text.into_owned())
    }

    /// The PostgreSQL options (for a `postgres://` database).
    pub fn postgres_options(&self, url: String) -> PostgresOptions {
        PostgresOptions {
            pool_size: self.pg_pool_size,
            report_groups: usize::from(self.pg_report_groups),
            report_statements: self.pg_report_statements,
            retention: self.retention_events,
            notify: self.pg_notify,
            poll_interval: Duration::from_millis(self.pg_poll_ms.max(1)),
            ..PostgresOptions::new(url)
        }
    }

    /// The health windows of targets.
    pub fn health_windows(&self) -> HealthWindows {
        HealthWindows {
            healthy_ms: self.healthy_window_ms,
            lost_ms: self.lost_window_ms,
        }
    }

    /// The limits of every watcher.
    pub fn watch_limits(&self) -> WatchLimits {
        WatchLimits {
            queue: self.watch_queue,
            slow_timeout: Duration::from_millis(self.slow_watcher_timeout_ms),
            max_watchers: self.max_watchers,
            ..WatchLimits::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_parse() {
        let c = Config::parse_from([
            "deploy-svc",
            "--listen",
            "127.0.0.1:0",
            "--database",
            "/tmp/x.db",
            "--synchronous",
            "normal",
            "--max-batch",
            "1",
        ]);
        assert_eq!(c.listen.port(), 0);
        assert!(!c.sqlite_options().synchronous_full);
        assert_eq!(c.sqlite_options().max_batch, 1);
        assert!(Config::try_parse_from(["deploy-svc", "--synchronous", "off"]).is_err());
    }
}
