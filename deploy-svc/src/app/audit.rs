//! The audit trail (one record per change, in the change's transaction) and request-id
//! idempotency.

use super::{limit, page, SqlStore};
use crate::domain::audit::{self, AuditEntry, AuditFilter, AuditRecord, Caller};
use crate::domain::clock::Millis;
use crate::domain::model::{Page, PageRequest};
use crate::domain::{Error, FieldViolation, Result};
use crate::store::backend::Backend;
use crate::store::db::{p, Db, SqlRow, V};

/// Appends the audit record of a change, in the change's transaction.
pub(super) fn append_audit(
    conn: &dyn Db,
    now: Millis,
    caller: &Caller,
    entry: AuditEntry,
) -> Result<()> {
    conn.execute("INSERT INTO audit_records (time_ms, principal, action, resource, before_summary, after_summary, request_id, reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)", p![
        now,
        caller.principal,
        entry.action,
        entry.resource,
        entry.before,
        entry.after,
        caller.request_id,
        entry.reason
    ])?;
    Ok(())
}

pub(super) fn audit_row(r: &SqlRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        id: r.col("id")?,
        record: service_kit::audit::AuditRecord {
            time_ms: r.col("time_ms")?,
            principal: r.col("principal")?,
            action: r.col("action")?,
            resource: r.col("resource")?,
            before: r.col("before_summary")?,
            after: r.col("after_summary")?,
            request_id: r.col("request_id")?,
            reason: r.col("reason")?,
        },
    })
}

/// The records after `after` matching `filter`, by id, at most `limit`. The WHERE clause
/// names only the filters given, so SQLite can use the resource, principal or time index.
pub(super) fn query_audit(
    conn: &dyn Db,
    filter: &AuditFilter,
    after: i64,
    limit: i64,
) -> Result<Vec<AuditRecord>> {
    let mut clauses = vec!["id > ?".to_owned()];
    let mut values: Vec<V> = vec![after.into()];
    if let Some(resource) = &filter.resource {
        let (exact, lo, hi) = audit::resource_range(resource);
        clauses.push("(resource = ? OR (resource >= ? AND resource < ?))".into());
        values.extend([exact.into(), lo.into(), hi.into()]);
    }
    if let Some(principal) = &filter.principal {
        clauses.push("principal = ?".into());
        values.push(principal.clone().into());
    }
    if let Some(start) = filter.start_ms {
        clauses.push("time_ms >= ?".into());
        values.push(start.into());
    }
    if let Some(end) = filter.end_ms {
        clauses.push("time_ms < ?".into());
        values.push(end.into());
    }
    values.push(limit.into());
    // Number the placeholders, so PostgreSQL reads them too.
    let mut n = 0;
    let clauses: Vec<String> = clauses
        .iter()
        .map(|c| {
            c.split('?')
                .enumerate()
                .map(|(i, part)| {
                    if i == 0 {
                        part.to_owned()
                    } else {
                        n += 1;
                        format!("?{n}{part}")
                    }
                })
                .collect()
        })
        .collect();
    conn.all(
        &format!(
            "SELECT id, time_ms, principal, action, resource, before_summary, after_summary, request_id, reason
             FROM audit_records WHERE {} ORDER BY id LIMIT ?{}",
            clauses.join(" AND "),
            n + 1
        ),
        &values,
        audit_row,
    )
}

// ---- requests ids (AIP-155) ----

/// What a request id maps to: `Some(resource)` to return, `None` to proceed.
pub(super) fn check_request_id(
    conn: &dyn Db,
    request_id: Option<&str>,
    method: &str,
    fingerprint: &str,
) -> Result<Option<String>> {
    let Some(request_id) = request_id else {
        return Ok(None);
    };
    let row: Option<(String, String, String)> = conn.one(
        "SELECT method, fingerprint, resource FROM request_ids WHERE request_id = ?1",
        p![request_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    match row {
        None => Ok(None),
        Some((m, f, resource)) if m == method && f == fingerprint => Ok(Some(resource)),
        Some(_) => Err(Error::InvalidArgument(vec![FieldViolation::new(
            "request_id",
            "was already used for a different request; use a new request_id",
        )])),
    }
}

pub(super) fn record_request_id(
    conn: &dyn Db,
    request_id: Option<&str>,
    method: &str,
    fingerprint: &str,
    resource: &str,
    now: Millis,
) -> Result<()> {
    if let Some(request_id) = request_id {
        conn.execute("INSERT INTO request_ids (request_id, method, fingerprint, resource, create_ms) VALUES (?1, ?2, ?3, ?4, ?5)", p![request_id, method, fingerprint, resource, now])?;
    }
    Ok(())
}

pub(super) async fn audit_event<B: Backend>(
    store: &SqlStore<B>,
    caller: Caller,
    entry: AuditEntry,
) -> Result<()> {
    store
        .write(move |conn, now, _| append_audit(conn, now, &caller, entry.clone()))
        .await
}

pub(super) async fn list_audit_records<B: Backend>(
    store: &SqlStore<B>,
    filter: AuditFilter,
    req: PageRequest,
) -> Result<Page<AuditRecord>> {
    store
        .read(move |conn| {
            let after: i64 = req
                .after
                .as_deref()
                .and_then(|k| k.parse().ok())
                .unwrap_or(0);
            let items = query_audit(conn, &filter, after, limit(req.size))?;
            Ok(page(items, req.size, |r: &AuditRecord| r.id.to_string()))
        })
        .await
}
