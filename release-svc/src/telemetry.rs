//! release-svc's own Prometheus metrics (beside the per-RPC ones every service has): names,
//! label sets and HELP text in one place. Served with `--metrics-listen`.
//!
//! Labels are bounded: `reason` is one of the evaluation reasons (`DISABLED`,
//! `NOT_RELEASED`, `NOT_DEPLOYED`, `TARGETING_MATCH`, `SPLIT`, `DEFAULT`, `STATIC`,
//! `FEATURE_NOT_FOUND`); no metric is labelled by feature, user or environment.

/// Counter, label `reason`: evaluations decided (every API: Evaluate, bulk, flagd, streams).
pub const EVALUATIONS: &str = "release_svc_evaluations_total";
/// Counter: evaluations whose targeting rule ran out of its budget (served the default).
pub const RULE_BUDGET_EXCEEDED: &str = "release_svc_rule_budget_exceeded_total";
/// Counter: features withdrawn automatically because a placement went away.
pub const WITHDRAWALS: &str = "release_svc_withdrawals_total";
/// Gauge: deploy-svc's placement-log head as last seen.
pub const CONSUMER_HEAD: &str = "release_svc_consumer_head_sequence";
/// Gauge: events behind deploy-svc (head minus the applied cursor).
pub const CONSUMER_LAG: &str = "release_svc_consumer_lag_events";
/// Gauge: Unix time of the last message (event or heartbeat) from deploy-svc.
pub const CONSUMER_LAST_MESSAGE: &str = "release_svc_consumer_last_message_timestamp_seconds";
/// Gauge: 1 while the placement stream is open, else 0.
pub const CONSUMER_CONNECTED: &str = "release_svc_consumer_connected";
/// Counter: placement streams lost (errors, ends, missed heartbeats).
pub const CONSUMER_STREAM_LOSSES: &str = "release_svc_consumer_stream_losses_total";

/// Registers the HELP text of the metrics above.
pub fn describe() {
    metrics::describe_counter!(EVALUATIONS, "evaluations decided, by reason");
    metrics::describe_counter!(
        RULE_BUDGET_EXCEEDED,
        "evaluations whose targeting rule ran out of its budget and served the default"
    );
    metrics::describe_counter!(
        WITHDRAWALS,
        "features withdrawn automatically because a placement went away"
    );
    metrics::describe_gauge!(
        CONSUMER_HEAD,
        "deploy-svc's placement-log head as last seen"
    );
    metrics::describe_gauge!(
        CONSUMER_LAG,
        "placement events behind deploy-svc (head minus applied cursor)"
    );
    metrics::describe_gauge!(
        CONSUMER_LAST_MESSAGE,
        "Unix time of the last message from deploy-svc's placement stream"
    );
    metrics::describe_gauge!(CONSUMER_CONNECTED, "1 while the placement stream is open");
    metrics::describe_counter!(
        CONSUMER_STREAM_LOSSES,
        "placement streams lost (errors, ends, missed heartbeats)"
    );
}
