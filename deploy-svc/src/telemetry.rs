//! deploy-svc's own Prometheus metrics (beside the per-RPC ones every service has): names
//! and HELP text in one place. Served with `--metrics-listen`.

/// Gauge: the newest sequence in the placement log.
pub const LOG_HEAD: &str = "deploy_svc_placement_log_head";
/// Histogram: writes committed in one transaction (SQLite's group commit, and PostgreSQL's
/// groups of placement reports).
pub const GROUP_COMMIT_WRITES: &str = "deploy_svc_group_commit_writes";
/// Counter, label `applied` (`together`, `one_by_one`): groups of placement reports
/// committed on PostgreSQL, by how their reports were applied (`together`: one read and one
/// write statement for the group).
pub const REPORT_GROUPS: &str = "deploy_svc_report_groups_total";
/// Histogram, label `outcome` (`committed`, `failed`): time from BEGIN to COMMIT of a
/// group commit (SQLite, or a group of placement reports on PostgreSQL) or of one write
/// transaction attempt (PostgreSQL).
pub const COMMIT_SECONDS: &str = "deploy_svc_commit_seconds";
/// Counter: PostgreSQL write transactions run again after a serialization failure or a
/// deadlock (each extra attempt counts once).
pub const STORE_RETRIES: &str = "deploy_svc_store_retries_total";
/// Histogram, label `pool` (`write`, `report`, `tail`): time a PostgreSQL task waited for a free
/// pooled connection.
pub const POOL_WAIT_SECONDS: &str = "deploy_svc_store_pool_wait_seconds";
/// Counter: WatchPlacements streams cut off because their queue stayed full.
pub const SLOW_WATCHER_CUTOFFS: &str = "deploy_svc_slow_watcher_cutoffs_total";

/// Registers the HELP text of the metrics above.
pub fn describe() {
    metrics::describe_gauge!(LOG_HEAD, "newest sequence in the placement log");
    metrics::describe_histogram!(
        GROUP_COMMIT_WRITES,
        "writes committed in one transaction (group commit)"
    );
    metrics::describe_counter!(
        REPORT_GROUPS,
        "groups of placement reports committed on PostgreSQL, by how their reports were applied"
    );
    metrics::describe_histogram!(
        COMMIT_SECONDS,
        metrics::Unit::Seconds,
        "time from BEGIN to COMMIT of one group commit (SQLite) or write transaction attempt (PostgreSQL), by outcome"
    );
    metrics::describe_counter!(
        STORE_RETRIES,
        "PostgreSQL write transactions run again after a conflict"
    );
    // Exported from the start (0 on SQLite), so a rate over it exists before a conflict.
    metrics::counter!(STORE_RETRIES).absolute(0);
    metrics::describe_histogram!(
        POOL_WAIT_SECONDS,
        metrics::Unit::Seconds,
        "time a PostgreSQL task waited for a pooled connection, by pool"
    );
    metrics::describe_counter!(
        SLOW_WATCHER_CUTOFFS,
        "WatchPlacements streams cut off because their queue stayed full"
    );
}
