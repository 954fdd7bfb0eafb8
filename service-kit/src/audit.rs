//! The audit record both services keep: who changed which resource, when, how, and why.

use crate::time::Millis;

/// One record of an audit trail (appended in the transaction of the change it records).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditRecord {
    /// When (commit time, Unix milliseconds).
    pub time_ms: Millis,
    /// Who: the authenticated principal; `system` for automatic actions.
    pub principal: String,
    /// What: the RPC name, or `auto.*` for automatic actions.
    pub action: String,
    /// The resource changed (`releases/3`, `deployments/7`).
    pub resource: String,
    /// The resource (or its changed fields) before.
    pub before: String,
    /// The resource (or its changed fields) after.
    pub after: String,
    /// The request's idempotency key or `x-request-id`.
    pub request_id: String,
    /// Why: a change reference, an override reason, a withdrawal cause.
    pub reason: String,
}
