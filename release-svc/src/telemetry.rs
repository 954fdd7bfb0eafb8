//! release-svc's own Prometheus metrics (beside the per-RPC ones every service has): names,
//! label sets and HELP text in one place. Served with `--metrics-listen`.
//!
//! Labels are bounded: `reason` is one of the evaluation reasons (`DISABLED`,
//! `NOT_RELEASED`, `NOT_DEPLOYED`, `TARGETING_MATCH`, `SPLIT`, `DEFAULT`, `STATIC`,
//! `FEATURE_NOT_FOUND`); `rule` is one of the policy rules a plan step can wait on
//! ([`RULES`]); no metric is labelled by feature, release, user or environment.

/// Counter, label `reason`: evaluations decided (every API: Evaluate, bulk, flagd, streams).
pub const EVALUATIONS: &str = "release_svc_evaluations_total";
/// Counter: evaluations whose targeting rule ran out of its budget (served the default).
pub const RULE_BUDGET_EXCEEDED: &str = "release_svc_rule_budget_exceeded_total";
/// Counter: evaluations not counted in the feature's usage (it has its maximum of
/// environment x variant slots).
pub const USAGE_UNTRACKED: &str = "release_svc_usage_untracked_total";
/// Counter, label `outcome` (`ok`, `error`): flushes of evaluation usage to the store.
pub const USAGE_FLUSHES: &str = "release_svc_usage_flushes_total";
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

/// Counter, label `kind` (`placements`, `everything`): times this replica refreshed its
/// state after another replica committed (read the placements since its last read, or
/// reloaded everything).
pub const REPLICA_REFRESHES: &str = "release_svc_replica_refreshes_total";

/// Gauge: the version of the decision snapshot Evaluate answers from (it grows by one per
/// published change).
pub const SNAPSHOT_VERSION: &str = "release_svc_snapshot_version";
/// Gauge: Unix time the decision snapshot was last replaced (its age is `time()` minus
/// this; a replica with nothing to change keeps an old snapshot that is still current).
pub const SNAPSHOT_UPDATED: &str = "release_svc_snapshot_updated_timestamp_seconds";
/// Counter, label `rule`: times a plan step started waiting on a rule (the scheduler found
/// the step due and the rule violated; counted once per new set of waiting rules).
pub const SCHEDULER_WAITS: &str = "release_svc_scheduler_waits_total";
/// Gauge, label `rule`: releases whose next plan step waits on the rule now.
pub const RELEASES_WAITING: &str = "release_svc_releases_waiting";
/// Gauge: how long the longest-waiting release has waited past the time its next step was
/// due, in seconds (0 when none waits).
pub const LONGEST_WAIT: &str = "release_svc_release_longest_wait_seconds";
/// Gauge: waiting releases that have waited longer than their next step's minimum
/// duration (at least [`OVERDUE_FLOOR_MS`]).
pub const RELEASES_OVERDUE: &str = "release_svc_releases_overdue";
/// The shortest wait that counts as overdue, whatever the step's own duration.
pub const OVERDUE_FLOOR_MS: i64 = 15 * 60 * 1000;
/// Every rule a plan step can wait on: the values of the `rule` label.
pub const RULES: &[&str] = &[
    "FREEZE_WINDOW",
    "CADENCE_DAY",
    "CADENCE_WEEK",
    "SOAK_TIME",
    "APPROVALS",
    "CHANGE_REFERENCE",
    "DEPLOYMENT_COVERAGE",
    "CALENDAR_UNAVAILABLE",
    "FEATURE_EXISTS",
    "RELEASE_STATE",
];

/// The `rule` label for a violation kind: itself when known, else `OTHER` (bounded).
pub fn rule_label(kind: &str) -> &'static str {
    RULES
        .iter()
        .find(|r| **r == kind)
        .copied()
        .unwrap_or("OTHER")
}

/// Registers the HELP text of the metrics above.
pub fn describe() {
    metrics::describe_gauge!(SNAPSHOT_VERSION, "version of the decision snapshot");
    metrics::describe_gauge!(
        SNAPSHOT_UPDATED,
        "Unix time the decision snapshot was last replaced"
    );
    metrics::describe_counter!(
        SCHEDULER_WAITS,
        "plan steps that started waiting on a policy rule, by rule"
    );
    metrics::describe_gauge!(
        RELEASES_WAITING,
        "releases whose next plan step waits on a policy rule, by rule"
    );
    metrics::describe_gauge!(
        LONGEST_WAIT,
        metrics::Unit::Seconds,
        "longest time a release has waited past the time its next step was due"
    );
    metrics::describe_gauge!(
        RELEASES_OVERDUE,
        "waiting releases that have waited longer than their next step's duration"
    );
    metrics::describe_counter!(EVALUATIONS, "evaluations decided, by reason");
    metrics::describe_counter!(
        RULE_BUDGET_EXCEEDED,
        "evaluations whose targeting rule ran out of its budget and served the default"
    );
    metrics::describe_counter!(
        USAGE_UNTRACKED,
        "evaluations not counted in their feature's usage (slots full)"
    );
    metrics::describe_counter!(
        USAGE_FLUSHES,
        "flushes of evaluation usage to the store, by outcome"
    );
    metrics::describe_counter!(
        REPLICA_REFRESHES,
        "refreshes after another replica committed, by kind (placements read since the last read, or everything reloaded)"
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
