//! What the stores refuse to do quietly: decode a corrupt row into a default (release-svc
//! and deploy-svc fail loudly, naming the table and row), or let the service's own database role rewrite
//! the audit trail (append-only triggers and the least-privilege roles of
//! `deploy/postgres/roles.sql`). Against the real release-svc and deploy-svc binaries and the real
//! PostgreSQL (when TEST_DATABASE_URL is set).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use proto::release::v1 as rpb;
use tests::release::{self, Client};
use tests::status::expect_code;
use tests::{fresh_database, Binary};
use tonic::Code;

fn args(database: &str) -> Vec<String> {
    [
        "--listen",
        "127.0.0.1:0",
        "--database",
        database,
        "--deploy-svc",
        "http://127.0.0.1:9",
        "--change-calendar",
        "none",
        "--log-format",
        "json",
    ]
    .map(str::to_owned)
    .to_vec()
}

async fn release_svc(database: &str) -> Binary {
    let args = args(database);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Binary::spawn("release-svc", &args).await
}

/// Runs release-svc expecting it to refuse to start: its exit status and its logs.
async fn failed_start(database: &Path) -> (std::process::ExitStatus, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(tests::bin_dir().join("release-svc"))
            .args(args(&database.to_string_lossy()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("release-svc started on a corrupt database")
    .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn create_release(c: &mut Client, request_id: &str) -> Result<rpb::Release, tonic::Status> {
    tests::release::create_with_id(c, "f", request_id).await
}

/// A corrupt row read by a call answers INTERNAL; corrupt rows read at start stop the
/// service with an error naming the table and the row. Neither becomes a default (an
/// unknown placement state used to load as PENDING).
#[tokio::test]
async fn corrupt_rows_fail_loudly_naming_table_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("release.db");
    let r = release_svc(&db.to_string_lossy()).await;
    let mut c = release::connect(r.addr).await;
    release::plain_feature(&mut c, "f", false).await;
    let first = create_release(&mut c, "req-1").await.unwrap();
    let raw = rusqlite::Connection::open(&db).unwrap();
    raw.execute(
        "UPDATE request_ids SET resource = 'not a release id' WHERE request_id = 'req-1'",
        [],
    )
    .unwrap();
    // The retry of the same request reads the corrupt row.
    expect_code(create_release(&mut c, "req-1").await, Code::Internal);
    r.kill().await;

    raw.execute(
        "UPDATE request_ids SET resource = ?1 WHERE request_id = 'req-1'",
        [first.name.trim_start_matches("releases/")],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO placements (deployment, target, environment, artifact, version, state, seq) VALUES (7, 'p1', 'prod', 'web', '1.0.0', 99, 1)",
        [],
    )
    .unwrap();
    let (status, logs) = failed_start(&db).await;
    assert!(!status.success());
    assert!(logs.contains("corrupt stored row"), "{logs}");
    assert!(
        logs.contains(r#""table":"placements""#) && logs.contains(r#""row":"7/p1""#),
        "{logs}"
    );

    raw.execute("DELETE FROM placements", []).unwrap();
    raw.execute(
        "UPDATE features SET body = '{\"description\": 1' WHERE key = 'f'",
        [],
    )
    .unwrap();
    let (status, logs) = failed_start(&db).await;
    assert!(!status.success());
    assert!(
        logs.contains(r#""table":"features""#) && logs.contains(r#""row":"f""#),
        "{logs}"
    );
}

/// deploy-svc: each stored form read by a call (target labels, artifact metadata, a
/// deployment's strategy and state, a placement's state) that does not decode answers
/// INTERNAL, with an error log naming the table and row, and never a default: corrupt labels
/// are not an empty map, a corrupt strategy is not all-at-once (which would order every
/// target at once), an unknown state is not PENDING.
#[tokio::test]
async fn deploy_svc_corrupt_rows_fail_loudly_naming_table_and_row() {
    use proto::deploy::v1 as pb;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("deploy.db");
    let log = dir.path().join("deploy-svc.log");
    let d = Binary::spawn_logging(
        "deploy-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            &db.to_string_lossy(),
            "--log-format",
            "json",
        ],
        &log,
    )
    .await;
    let mut c = tests::connect(d.addr).await;
    tests::environment(&mut c, "prod", None, false).await;
    let targets = tests::targets(&mut c, "prod", "t", 2).await;
    tests::artifact(&mut c, "web", "1.0.0").await;
    let deployment = tests::deploy(&mut c, "web", "1.0.0", "prod", "CHG-1")
        .await
        .unwrap();
    let id: i64 = deployment
        .name
        .trim_start_matches("deployments/")
        .parse()
        .unwrap();
    let raw = rusqlite::Connection::open(&db).unwrap();
    let sql = |q: &str| {
        raw.execute(q, []).unwrap();
    };
    let logged = |table: &str, row: &str| {
        let logs = std::fs::read_to_string(&log).unwrap();
        assert!(
            logs.lines().any(|l| l.contains("corrupt stored row")
                && l.contains(&format!(r#""table":"{table}""#))
                && l.contains(&format!(r#""row":"{row}""#))),
            "no error naming {table} {row}: {logs}"
        );
    };
    let list_targets = pb::ListTargetsRequest {
        parent: "environments/prod".into(),
        ..Default::default()
    };
    let get_deployment = pb::GetDeploymentRequest {
        name: deployment.name.clone(),
    };
    // The calls answer before the rows are touched.
    c.list_targets(list_targets.clone()).await.unwrap();
    c.get_deployment(get_deployment.clone()).await.unwrap();

    sql("UPDATE targets SET labels = '{\"a\":' WHERE id = 't-1'");
    expect_code(c.list_targets(list_targets.clone()).await, Code::Internal);
    logged("targets", "environments/prod/targets/t-1");
    sql("UPDATE targets SET labels = '{}'");

    sql("UPDATE artifacts SET metadata = '[1, 2]'");
    expect_code(
        c.get_artifact(pb::GetArtifactRequest {
            name: "artifacts/web/versions/1.0.0".into(),
        })
        .await,
        Code::Internal,
    );
    logged("artifacts", "artifacts/web/versions/1.0.0");
    sql("UPDATE artifacts SET metadata = '{}'");

    sql("UPDATE deployments SET strategy = '{\"rolling\": {}}'");
    expect_code(
        c.get_deployment(get_deployment.clone()).await,
        Code::Internal,
    );
    logged("deployments", &deployment.name);
    sql("UPDATE deployments SET strategy = '{}', state = 42");
    expect_code(
        c.get_deployment(get_deployment.clone()).await,
        Code::Internal,
    );
    sql("UPDATE deployments SET state = 1");

    let target = targets[1].rsplit('/').next().unwrap().to_owned();
    raw.execute(
        "UPDATE placements SET state = 99 WHERE target = ?1",
        [&target],
    )
    .unwrap();
    expect_code(
        c.get_deployment(get_deployment.clone()).await,
        Code::Internal,
    );
    logged("placements", &format!("{id}/{target}"));
    d.kill().await;
}

/// release-svc's SQLite audit table refuses UPDATE and DELETE, whoever asks.
#[tokio::test]
async fn sqlite_audit_records_are_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("release.db");
    let r = release_svc(&db.to_string_lossy()).await;
    let mut c = release::connect(r.addr).await;
    release::plain_feature(&mut c, "f", false).await;
    let raw = rusqlite::Connection::open(&db).unwrap();
    let count = |raw: &rusqlite::Connection| -> i64 {
        raw.query_row("SELECT count(*) FROM audit_records", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(count(&raw), 1);
    let update = raw.execute("UPDATE audit_records SET principal = 'nobody'", []);
    assert!(
        update.unwrap_err().to_string().contains("append-only"),
        "update"
    );
    let delete = raw.execute("DELETE FROM audit_records", []);
    assert!(
        delete.unwrap_err().to_string().contains("append-only"),
        "delete"
    );
    assert_eq!(count(&raw), 1);
    // The service still appends.
    release::plain_feature(&mut c, "g", false).await;
    assert_eq!(count(&raw), 2);
}

async fn connect_as(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// The database URL `url` with `role` as the user.
fn as_role(url: &str, role: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{role}@{host}")
}

/// Asserts that `client` can neither UPDATE, DELETE nor TRUNCATE audit records, each
/// refused with an error containing `because`.
async fn refuses_audit_rewrites(client: &tokio_postgres::Client, because: &str) {
    for statement in [
        "UPDATE audit_records SET principal = 'nobody'",
        "DELETE FROM audit_records",
        "TRUNCATE audit_records",
    ] {
        let err = client.batch_execute(statement).await.unwrap_err();
        let message = err.as_db_error().map(|e| e.message().to_owned());
        assert!(
            message.as_deref().is_some_and(|m| m.contains(because)),
            "{statement}: {err:?}"
        );
    }
}

/// The documented roles on a fresh database: the migration role creates the schema, the
/// runtime role serves (features, releases, audit records appended), and the runtime role
/// cannot UPDATE, DELETE or TRUNCATE audit records; even the owner is stopped by the
/// append-only triggers.
#[tokio::test]
async fn postgres_runtime_role_cannot_rewrite_the_audit_trail() {
    let Some(url) = tests::report::postgres_or_skip("the PostgreSQL roles") else {
        return;
    };
    let (admin, db_url, db) = fresh_database(&url, "release_roles").await;
    let tag = db.rsplit('_').take(3).collect::<Vec<_>>().join("_");
    let (migrator, runtime) = (format!("rm_{tag}"), format!("rr_{tag}"));
    let roles = include_str!("../../deploy/postgres/roles.sql")
        .replace("release_migrator", &migrator)
        .replace("release_runtime", &runtime);
    let superuser = connect_as(&db_url).await;
    superuser.batch_execute(&roles).await.unwrap();

    // The migration role migrates (by starting the service once).
    let m = release_svc(&as_role(&db_url, &migrator)).await;
    m.kill().await;
    // The runtime role serves.
    let r = release_svc(&as_role(&db_url, &runtime)).await;
    let mut c = release::connect(r.addr).await;
    release::plain_feature(&mut c, "f", false).await;
    let rel = release::release(&mut c, &["f"], &["prod"]).await;
    release::rollout(&mut c, &rel, "prod", 10.0).await;
    let audit = c
        .list_audit_records(rpb::ListAuditRecordsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    let appended = audit.len();
    assert!(appended >= 3, "{audit:?}");

    let as_runtime = connect_as(&as_role(&db_url, &runtime)).await;
    refuses_audit_rewrites(&as_runtime, "permission denied").await;
    // The owner holds every privilege, and the triggers still refuse.
    let as_owner = connect_as(&as_role(&db_url, &migrator)).await;
    refuses_audit_rewrites(&as_owner, "append-only").await;
    // Nor can the runtime role change the schema.
    let err = as_runtime
        .batch_execute("DROP TABLE audit_records")
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("must be owner"), "{err:?}");
    let count: i64 = as_runtime
        .query_one("SELECT count(*) FROM audit_records", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(usize::try_from(count).unwrap(), appended);

    r.kill().await;
    drop((as_runtime, as_owner, superuser));
    for statement in [
        format!("DROP DATABASE {db} WITH (FORCE)"),
        format!("DROP ROLE {migrator}"),
        format!("DROP ROLE {runtime}"),
    ] {
        admin.batch_execute(&statement).await.unwrap();
    }
}
