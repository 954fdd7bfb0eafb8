//! The audit trail: who changed what, when and why. Every committed change appends one
//! record in the same transaction as the change, so there is never a change without its
//! record nor a record without its change; a refused call, and a call that changes nothing
//! (an idempotent retry, a repeated report), appends nothing. Heartbeats are liveness
//! signals, not changes, and are not audited. Records are never edited or deleted.
//!
//! Before/after summaries are compact JSON of the changed fields, in the API's field
//! names, so an operator reads them next to `grpcurl` output.

use serde_json::{json, Map, Value};

use super::clock::Millis;
use super::freeze::windows_json;
use super::model::{EmergencyOverride, Environment, EnvironmentUpdate};
use super::names::environment_name;

/// The RPC names recorded as actions.
pub mod action {
    /// CreateEnvironment.
    pub const CREATE_ENVIRONMENT: &str = "CreateEnvironment";
    /// UpdateEnvironment.
    pub const UPDATE_ENVIRONMENT: &str = "UpdateEnvironment";
    /// RegisterTarget.
    pub const REGISTER_TARGET: &str = "RegisterTarget";
    /// RegisterArtifact.
    pub const REGISTER_ARTIFACT: &str = "RegisterArtifact";
    /// CreateDeployment.
    pub const CREATE_DEPLOYMENT: &str = "CreateDeployment";
    /// CancelDeployment.
    pub const CANCEL_DEPLOYMENT: &str = "CancelDeployment";
    /// ReportPlacement.
    pub const REPORT_PLACEMENT: &str = "ReportPlacement";
}

pub use service_kit::principal::Caller;

/// What a change appends to the trail (the store adds id, time and caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// The RPC name.
    pub action: &'static str,
    /// The resource changed.
    pub resource: String,
    /// The changed fields before (compact JSON; empty for a creation).
    pub before: String,
    /// The changed fields after (compact JSON).
    pub after: String,
    /// Why: change reference, cancellation reason or emergency override.
    pub reason: String,
}

/// A stored audit record: its position in the trail and the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Position in the trail, increasing in commit order.
    pub id: i64,
    /// The record (its fields read through this one: `record.principal` as `principal`).
    pub record: service_kit::audit::AuditRecord,
}

impl std::ops::Deref for AuditRecord {
    type Target = service_kit::audit::AuditRecord;

    fn deref(&self) -> &Self::Target {
        &self.record
    }
}

/// Filters of ListAuditRecords; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// A resource name (matching it and the resources under it) or a prefix ending in `/`.
    pub resource: Option<String>,
    /// Exact principal.
    pub principal: Option<String>,
    /// Records at or after this time.
    pub start_ms: Option<Millis>,
    /// Records before this time.
    pub end_ms: Option<Millis>,
}

/// The resource filter as an exact name and a half-open range of names under it:
/// `deployments/7` gives (`deployments/7`, [`deployments/7/`, `deployments/70`)) so it
/// never matches `deployments/70`; `environments/` gives the range [`environments/`,
/// `environments0`). Range bounds compare bytewise ('0' follows '/').
pub fn resource_range(filter: &str) -> (String, String, String) {
    let prefix = if filter.ends_with('/') {
        filter.to_owned()
    } else {
        format!("{filter}/")
    };
    let upper = format!("{}0", &prefix[..prefix.len() - 1]);
    (filter.to_owned(), prefix, upper)
}

/// The reason recorded for an emergency override.
pub fn override_reason(o: &EmergencyOverride) -> String {
    format!(
        "EMERGENCY OVERRIDE: {} (approved by {})",
        o.reason, o.approver
    )
}

/// Compact JSON text of `value`.
pub fn text(value: &Value) -> String {
    value.to_string()
}

fn upstream(env: &Environment) -> Value {
    env.upstream
        .as_deref()
        .map(|u| Value::from(environment_name(u)))
        .unwrap_or_else(|| Value::from(""))
}

/// Every field of a new environment.
pub fn environment_fields(env: &Environment) -> Value {
    json!({
        "description": env.description,
        "protected": env.protected,
        "upstream": upstream(env),
        "freeze_windows": windows_json(&env.freeze_windows),
    })
}

/// The fields an update names, before and after it.
pub fn environment_change(
    before: &Environment,
    after: &Environment,
    update: &EnvironmentUpdate,
) -> (Value, Value) {
    let (mut b, mut a) = (Map::new(), Map::new());
    let mut field = |name: &str, f: &dyn Fn(&Environment) -> Value| {
        b.insert(name.to_owned(), f(before));
        a.insert(name.to_owned(), f(after));
    };
    if update.description.is_some() {
        field("description", &|e| Value::from(e.description.clone()));
    }
    if update.protected.is_some() {
        field("protected", &|e| Value::from(e.protected));
    }
    if update.upstream.is_some() {
        field("upstream", &upstream);
    }
    if update.freeze_windows.is_some() {
        field("freeze_windows", &|e| windows_json(&e.freeze_windows));
    }
    (Value::Object(b), Value::Object(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ranges_respect_name_boundaries() {
        let (exact, lo, hi) = resource_range("deployments/7");
        assert_eq!(exact, "deployments/7");
        let under = |name: &str| name == exact || (name >= lo.as_str() && name < hi.as_str());
        assert!(under("deployments/7"));
        assert!(!under("deployments/70"));
        let (_, lo, hi) = resource_range("environments/");
        let under = |name: &str| name >= lo.as_str() && name < hi.as_str();
        assert!(under("environments/prod"));
        assert!(under("environments/prod/targets/web-1"));
        assert!(!under("deployments/1"));
        assert!(!under("environments"));
    }

    #[test]
    fn the_request_field_wins_over_metadata() {
        let c = Caller {
            principal: "alice".into(),
            request_id: "meta".into(),
            trace_parent: None,
        };
        assert_eq!(c.clone().with_request_id(Some("")).request_id, "meta");
        assert_eq!(c.with_request_id(Some("body")).request_id, "body");
    }
}
