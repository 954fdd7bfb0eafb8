//! Targets: registration, heartbeats, listings with each target's placed versions, and the
//! inventory.

use std::collections::BTreeMap;

use serde_json::json;

use super::audit::append_audit;
use super::environments::require_environment;
use super::inventory;
use super::{json_map, limit, map_json, page, SqlStore};
use crate::domain::audit::{self, action, AuditEntry, Caller};
use crate::domain::inventory::{EnvironmentInventory, InventoryQuery, TargetVersion};
use crate::domain::model::{Page, PageRequest, Target};
use crate::domain::names::target_name;
use crate::domain::{Error, Result};
use crate::store::backend::Backend;
use crate::store::db::{p, Db, SqlRow};

pub(super) const TARGET_COLUMNS: &str = "environment, id, labels, register_ms, heartbeat_ms";

pub(super) fn target_row(r: &SqlRow) -> Result<Target> {
    let (environment, id, labels): (String, String, String) =
        (r.col("environment")?, r.col("id")?, r.col("labels")?);
    let labels = json_map(
        "targets",
        "labels",
        &target_name(&environment, &id),
        &labels,
    )?;
    Ok(Target {
        environment,
        id,
        labels,
        register_ms: r.col("register_ms")?,
        heartbeat_ms: r.col("heartbeat_ms")?,
    })
}

pub(super) fn load_target(conn: &dyn Db, env: &str, id: &str) -> Result<Target> {
    conn.one(
        &format!("SELECT {TARGET_COLUMNS} FROM targets WHERE environment = ?1 AND id = ?2"),
        p![env, id],
        target_row,
    )?
    .ok_or_else(|| Error::NotFound(target_name(env, id)))
}

pub(super) async fn register_target<B: Backend>(
    store: &SqlStore<B>,
    environment: &str,
    id: &str,
    labels: BTreeMap<String, String>,
    caller: Caller,
) -> Result<Target> {
    let (environment, id) = (environment.to_owned(), id.to_owned());
    store.write(move |conn, now, _| {
        require_environment(conn, &environment)?;
        let previous: Option<String> = conn.one("SELECT labels FROM targets WHERE environment = ?1 AND id = ?2", p![&environment, &id], |r| r.get(0))?;
        let previous = previous
            .map(|l| json_map("targets", "labels", &target_name(&environment, &id), &l))
            .transpose()?;
        conn.execute(&format!(
                "INSERT INTO targets ({TARGET_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (environment, id) DO UPDATE SET labels = excluded.labels, heartbeat_ms = excluded.heartbeat_ms"
            ), p![environment, id, map_json(&labels)?, now])?;
        // A re-registration with the same labels only refreshes the heartbeat: no
        // change, no record.
        if previous.as_ref() != Some(&labels) {
            append_audit(
                conn,
                now,
                &caller,
                AuditEntry {
                    action: action::REGISTER_TARGET,
                    resource: target_name(&environment, &id),
                    before: previous
                        .map(|l| audit::text(&json!({ "labels": l })))
                        .unwrap_or_default(),
                    after: audit::text(&json!({ "labels": labels })),
                    reason: String::new(),
                },
            )?;
        }
        load_target(conn, &environment, &id)
    })
    .await
}

pub(super) async fn list_targets<B: Backend>(
    store: &SqlStore<B>,
    environment: &str,
    req: PageRequest,
) -> Result<Page<(Target, Vec<TargetVersion>)>> {
    let environment = environment.to_owned();
    store.read(move |conn| {
        require_environment(conn, &environment)?;
        let items = conn.all(&format!(
                "SELECT {TARGET_COLUMNS} FROM targets WHERE environment = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
            ), p![environment, req.after.unwrap_or_default(), limit(req.size)], target_row)?;
        let targets = page(items, req.size, |t: &Target| t.id.clone());
        let mut versions = match (targets.items.first(), targets.items.last()) {
            (Some(first), Some(last)) => {
                inventory::target_versions(conn, &environment, &first.id, &last.id)?
            }
            _ => BTreeMap::new(),
        };
        Ok(Page {
            items: targets
                .items
                .into_iter()
                .map(|t| {
                    let v = versions.remove(&t.id).unwrap_or_default();
                    (t, v)
                })
                .collect(),
            next: targets.next,
        })
    })
    .await
}

pub(super) async fn inventory<B: Backend>(
    store: &SqlStore<B>,
    query: InventoryQuery,
) -> Result<Page<EnvironmentInventory>> {
    store
        .read(move |conn| {
            if let Some(id) = &query.environment {
                require_environment(conn, id)?;
            }
            inventory::inventory(conn, &query)
        })
        .await
}

pub(super) async fn heartbeat_target<B: Backend>(
    store: &SqlStore<B>,
    environment: &str,
    id: &str,
) -> Result<Target> {
    let (environment, id) = (environment.to_owned(), id.to_owned());
    store
        .write(move |conn, now, _| {
            let n = conn.execute(
                "UPDATE targets SET heartbeat_ms = ?1 WHERE environment = ?2 AND id = ?3",
                p![now, environment, id],
            )?;
            if n == 0 {
                return Err(Error::NotFound(target_name(&environment, &id)));
            }
            load_target(conn, &environment, &id)
        })
        .await
}
