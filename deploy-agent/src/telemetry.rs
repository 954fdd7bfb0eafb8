//! The agent's Prometheus metrics, served with `--metrics-listen`: names, labels and HELP
//! text in one place. Labels are bounded: `outcome` is `placed`, `reused` or `failed`;
//! `hook` is `pre_switch` or `health_check`.

/// Counter, label `outcome`: orders carried out.
pub const PLACEMENTS: &str = "deploy_agent_placements_total";
/// Counter: artifact bytes fetched.
pub const FETCH_BYTES: &str = "deploy_agent_fetch_bytes_total";
/// Histogram: how long fetching one artifact took (successful or not).
pub const FETCH_SECONDS: &str = "deploy_agent_fetch_seconds";
/// Counter, label `hook`: hook commands that failed (non-zero exit, timeout, not started).
pub const HOOK_FAILURES: &str = "deploy_agent_hook_failures_total";
/// Gauge: 1 while the order stream to deploy-svc is open, else 0.
pub const CONNECTED: &str = "deploy_agent_connected";

/// Registers the HELP text of the metrics above.
pub fn describe() {
    metrics::describe_counter!(PLACEMENTS, "orders carried out, by outcome");
    metrics::describe_counter!(FETCH_BYTES, metrics::Unit::Bytes, "artifact bytes fetched");
    metrics::describe_histogram!(
        FETCH_SECONDS,
        metrics::Unit::Seconds,
        "time to fetch one artifact"
    );
    metrics::describe_counter!(HOOK_FAILURES, "hook commands that failed, by hook");
    metrics::describe_gauge!(CONNECTED, "1 while the order stream to deploy-svc is open");
}
