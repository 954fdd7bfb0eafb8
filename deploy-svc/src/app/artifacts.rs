//! Artifacts: immutable versions, registered idempotently for the same digest.

use serde_json::json;

use super::audit::append_audit;
use super::{json_map, limit, map_json, page, SqlStore};
use crate::domain::audit::{self, action, AuditEntry, Caller};
use crate::domain::model::{Artifact, Page, PageRequest};
use crate::domain::names::artifact_version_name;
use crate::domain::{Error, Result};
use crate::store::backend::Backend;
use crate::store::db::{p, Db, SqlRow};

pub(super) const ARTIFACT_COLUMNS: &str = "name, version, digest, metadata, create_ms, source_uri";

pub(super) fn artifact_row(r: &SqlRow) -> Result<Artifact> {
    let (name, version, metadata): (String, String, String) =
        (r.col("name")?, r.col("version")?, r.col("metadata")?);
    let metadata = json_map(
        "artifacts",
        "metadata",
        &artifact_version_name(&name, &version),
        &metadata,
    )?;
    Ok(Artifact {
        name,
        version,
        digest: r.col("digest")?,
        metadata,
        create_ms: r.col("create_ms")?,
        source_uri: r.col("source_uri")?,
    })
}

pub(super) fn find_artifact(conn: &dyn Db, name: &str, version: &str) -> Result<Option<Artifact>> {
    conn.one(
        &format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE name = ?1 AND version = ?2"),
        p![name, version],
        artifact_row,
    )
}

pub(super) async fn register_artifact<B: Backend>(
    store: &SqlStore<B>,
    artifact: Artifact,
    caller: Caller,
) -> Result<Artifact> {
    store.write(move |conn, now, _| {
        if let Some(existing) = find_artifact(conn, &artifact.name, &artifact.version)? {
            if existing.digest == artifact.digest {
                return Ok(existing);
            }
            return Err(Error::AlreadyExists {
                resource: artifact_version_name(&artifact.name, &artifact.version),
                detail: format!(
                    "registered with digest {}; versions are immutable, register a new version",
                    existing.digest
                ),
            });
        }
        conn.execute(&format!("INSERT INTO artifacts ({ARTIFACT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"), p![
                artifact.name,
                artifact.version,
                artifact.digest,
                map_json(&artifact.metadata)?,
                now,
                artifact.source_uri
            ])?;
        append_audit(
            conn,
            now,
            &caller,
            AuditEntry {
                action: action::REGISTER_ARTIFACT,
                resource: artifact_version_name(&artifact.name, &artifact.version),
                before: String::new(),
                after: audit::text(
                    &json!({"digest": artifact.digest, "metadata": artifact.metadata, "source_uri": artifact.source_uri}),
                ),
                reason: String::new(),
            },
        )?;
        Ok(Artifact {
            create_ms: now,
            ..artifact.clone()
        })
    })
    .await
}

pub(super) async fn get_artifact<B: Backend>(
    store: &SqlStore<B>,
    name: &str,
    version: &str,
) -> Result<Artifact> {
    let (name, version) = (name.to_owned(), version.to_owned());
    store
        .read(move |conn| {
            find_artifact(conn, &name, &version)?
                .ok_or_else(|| Error::NotFound(artifact_version_name(&name, &version)))
        })
        .await
}

pub(super) async fn list_artifacts<B: Backend>(
    store: &SqlStore<B>,
    name: Option<String>,
    req: PageRequest,
) -> Result<Page<Artifact>> {
    store.read(move |conn| {
        let (after_name, after_version) = req
            .after
            .as_deref()
            .and_then(|k| k.split_once('\n'))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .unwrap_or_default();
        let items = conn.all(&format!(
                "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE (CAST(?1 AS TEXT) IS NULL OR name = ?1) AND (name, version) > (?2, ?3)
                 ORDER BY name, version LIMIT ?4"
            ), p![name, after_name, after_version, limit(req.size)], artifact_row)?;
        Ok(page(items, req.size, |a: &Artifact| format!("{}\n{}", a.name, a.version)))
    })
    .await
}
