//! Environments: creation (idempotent per request id), partial updates with optimistic
//! concurrency, freeze windows stored as JSON, the promotion path.

use calendar::{FreezeWindow, Schedule, WeekTime};
use serde::{Deserialize, Serialize};

use super::audit::{append_audit, check_request_id, record_request_id};
use super::{limit, page, SqlStore};
use crate::domain::audit::{self, action, AuditEntry, Caller};
use crate::domain::model::{Environment, EnvironmentUpdate, NewEnvironment, Page, PageRequest};
use crate::domain::names::environment_name;
use crate::domain::promotion::check_upstream;
use crate::domain::{Error, Result};
use crate::store::backend::{internal, Backend};
use crate::store::db::{p, Db, SqlRow};

/// A freeze window as stored in `environments.freeze_windows` (JSON).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct StoredWindow {
    name: String,
    #[serde(flatten)]
    schedule: StoredSchedule,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum StoredSchedule {
    Absolute {
        start_ms: i64,
        end_ms: i64,
    },
    Weekly {
        time_zone: String,
        start_day: u32,
        start_minute: u32,
        end_day: u32,
        end_minute: u32,
    },
}

pub(super) fn windows_json(windows: &[FreezeWindow]) -> Result<String> {
    let stored: Vec<StoredWindow> = windows
        .iter()
        .map(|w| StoredWindow {
            name: w.name.clone(),
            schedule: match &w.schedule {
                Schedule::Absolute { start_ms, end_ms } => StoredSchedule::Absolute {
                    start_ms: *start_ms,
                    end_ms: *end_ms,
                },
                Schedule::Weekly {
                    time_zone,
                    start,
                    end,
                } => StoredSchedule::Weekly {
                    time_zone: time_zone.clone(),
                    start_day: start.day,
                    start_minute: start.minute,
                    end_day: end.day,
                    end_minute: end.minute,
                },
            },
        })
        .collect();
    serde_json::to_string(&stored).map_err(internal)
}

/// The stored windows; a column that does not parse fails the read (never an empty
/// calendar, which would silently lift every freeze).
pub(super) fn json_windows(text: &str) -> Result<Vec<FreezeWindow>> {
    let stored: Vec<StoredWindow> = serde_json::from_str(text).map_err(|e| {
        Error::internal_message(format!(
            "stored freeze windows do not parse: {}",
            service_kit::error::chain(&e)
        ))
    })?;
    Ok(stored
        .into_iter()
        .map(|w| FreezeWindow {
            name: w.name,
            schedule: match w.schedule {
                StoredSchedule::Absolute { start_ms, end_ms } => {
                    Schedule::Absolute { start_ms, end_ms }
                }
                StoredSchedule::Weekly {
                    time_zone,
                    start_day,
                    start_minute,
                    end_day,
                    end_minute,
                } => Schedule::Weekly {
                    time_zone,
                    start: WeekTime {
                        day: start_day,
                        minute: start_minute,
                    },
                    end: WeekTime {
                        day: end_day,
                        minute: end_minute,
                    },
                },
            },
        })
        .collect())
}

pub(super) const ENV_COLUMNS: &str =
    "id, description, protected, upstream, revision, create_ms, update_ms, freeze_windows";

pub(super) fn env_row(r: &SqlRow) -> Result<Environment> {
    let windows: String = r.col("freeze_windows")?;
    Ok(Environment {
        id: r.col("id")?,
        description: r.col("description")?,
        protected: r.col("protected")?,
        upstream: r.col("upstream")?,
        revision: r.col("revision")?,
        create_ms: r.col("create_ms")?,
        update_ms: r.col("update_ms")?,
        promotion_path: Vec::new(),
        freeze_windows: json_windows(&windows)?,
    })
}

pub(super) fn promotion_path(conn: &dyn Db, id: &str) -> Result<Vec<String>> {
    let mut path = vec![id.to_owned()];
    let mut current = id.to_owned();
    while path.len() <= 64 {
        let upstream: Option<String> = conn
            .value::<Option<String>>(
                "SELECT upstream FROM environments WHERE id = ?1",
                p![&current],
            )?
            .flatten();
        match upstream {
            Some(u) if !path.contains(&u) => {
                path.push(u.clone());
                current = u;
            }
            _ => break,
        }
    }
    path.reverse();
    Ok(path)
}

pub(super) fn load_environment(conn: &dyn Db, id: &str) -> Result<Environment> {
    let mut env = conn
        .one(
            &format!("SELECT {ENV_COLUMNS} FROM environments WHERE id = ?1"),
            p![id],
            env_row,
        )?
        .ok_or_else(|| Error::NotFound(environment_name(id)))?;
    env.promotion_path = promotion_path(conn, id)?;
    Ok(env)
}

pub(super) fn require_environment(conn: &dyn Db, id: &str) -> Result<()> {
    let exists: Option<i64> =
        conn.one("SELECT 1 FROM environments WHERE id = ?1", p![id], |r| {
            r.get(0)
        })?;
    exists
        .map(|_| ())
        .ok_or_else(|| Error::NotFound(environment_name(id)))
}

pub(super) async fn create_environment<B: Backend>(
    store: &SqlStore<B>,
    env: NewEnvironment,
    request_id: Option<String>,
    caller: Caller,
) -> Result<Environment> {
    store
        .write(move |conn, now, _| {
            let windows = windows_json(&env.freeze_windows)?;
            let mut fingerprint = format!(
                "{}|{}|{}|{:?}",
                env.id, env.description, env.protected, env.upstream
            );
            // Appended only when present, so request ids recorded before calendars existed
            // keep matching their retries.
            if !env.freeze_windows.is_empty() {
                fingerprint = format!("{fingerprint}|{windows}");
            }
            if let Some(resource) = check_request_id(
                conn,
                request_id.as_deref(),
                "CreateEnvironment",
                &fingerprint,
            )? {
                let id = resource.trim_start_matches("environments/");
                return load_environment(conn, id);
            }
            let exists: Option<i64> = conn.one(
                "SELECT 1 FROM environments WHERE id = ?1",
                p![&env.id],
                |r| r.get(0),
            )?;
            if exists.is_some() {
                return Err(Error::AlreadyExists {
                    resource: environment_name(&env.id),
                    detail: "choose another environment_id".into(),
                });
            }
            if let Some(upstream) = &env.upstream {
                require_environment(conn, upstream)?;
            }
            conn.execute(
                &format!(
                "INSERT INTO environments ({ENV_COLUMNS}) VALUES (?1, ?2, ?3, ?4, 1, ?5, ?5, ?6)"
            ),
                p![
                    env.id,
                    env.description,
                    env.protected,
                    env.upstream,
                    now,
                    windows
                ],
            )?;
            record_request_id(
                conn,
                request_id.as_deref(),
                "CreateEnvironment",
                &fingerprint,
                &environment_name(&env.id),
                now,
            )?;
            let created = load_environment(conn, &env.id)?;
            append_audit(
                conn,
                now,
                &caller,
                AuditEntry {
                    action: action::CREATE_ENVIRONMENT,
                    resource: environment_name(&env.id),
                    before: String::new(),
                    after: audit::text(&audit::environment_fields(&created)),
                    reason: String::new(),
                },
            )?;
            Ok(created)
        })
        .await
}

pub(super) async fn get_environment<B: Backend>(
    store: &SqlStore<B>,
    id: &str,
) -> Result<Environment> {
    let id = id.to_owned();
    store.read(move |conn| load_environment(conn, &id)).await
}

pub(super) async fn list_environments<B: Backend>(
    store: &SqlStore<B>,
    req: PageRequest,
) -> Result<Page<Environment>> {
    store
        .read(move |conn| {
            let mut items: Vec<Environment> = conn.all(
                &format!(
                    "SELECT {ENV_COLUMNS} FROM environments WHERE id > ?1 ORDER BY id LIMIT ?2"
                ),
                p![req.after.unwrap_or_default(), limit(req.size)],
                env_row,
            )?;
            for env in &mut items {
                env.promotion_path = promotion_path(conn, &env.id)?;
            }
            Ok(page(items, req.size, |e| e.id.clone()))
        })
        .await
}

pub(super) async fn update_environment<B: Backend>(
    store: &SqlStore<B>,
    update: EnvironmentUpdate,
    caller: Caller,
) -> Result<Environment> {
    store.write(move |conn, now, _| {
        let mut env = load_environment(conn, &update.id)?;
        let before = env.clone();
        if let Some(expected) = update.expected_revision {
            if expected != env.revision {
                return Err(Error::Aborted(format!(
                    "etag {expected:?} is stale: {} is at etag \"{}\"; read it again and retry",
                    environment_name(&env.id),
                    env.revision
                )));
            }
        }
        if let Some(description) = &update.description {
            env.description.clone_from(description);
        }
        if let Some(protected) = update.protected {
            env.protected = protected;
        }
        if let Some(windows) = &update.freeze_windows {
            env.freeze_windows.clone_from(windows);
        }
        if let Some(upstream) = update.upstream.clone() {
            if let Some(u) = &upstream {
                require_environment(conn, u)?;
                if let Some(v) = check_upstream(&env.id, &promotion_path(conn, u)?) {
                    return Err(Error::FailedPrecondition(vec![v]));
                }
            }
            env.upstream = upstream;
        }
        conn.execute("UPDATE environments SET description = ?1, protected = ?2, upstream = ?3, freeze_windows = ?4, revision = revision + 1, update_ms = ?5 WHERE id = ?6", p![
                env.description,
                env.protected,
                env.upstream,
                windows_json(&env.freeze_windows)?,
                now,
                env.id
            ])?;
        let updated = load_environment(conn, &env.id)?;
        let (b, a) = audit::environment_change(&before, &updated, &update);
        append_audit(
            conn,
            now,
            &caller,
            AuditEntry {
                action: action::UPDATE_ENVIRONMENT,
                resource: environment_name(&env.id),
                before: audit::text(&b),
                after: audit::text(&a),
                reason: String::new(),
            },
        )?;
        Ok(updated)
    })
    .await
}
