//! What the tests tell `scripts/test` beyond pass/fail: which database backend each test
//! ran on, and which tests were skipped and why. Written only when `TEST_REPORT_DIR` is set
//! (`scripts/test` sets it and prints the counts at the end): one line per fact, appended
//! to `backends` (`sqlite|postgres <test>`) or `skipped` (`<test>: <reason>`).
//!
//! Only the standard library: deploy-svc's and release-svc's own test files include this
//! file too (`#[path]`), so the backend switch and the report are written once.

#![allow(dead_code)]

use std::io::Write;

/// The switch that moves the deploy-svc suites from SQLite to PostgreSQL:
/// `DEPLOY_TEST_BACKEND=postgres`, with the server at `TEST_DATABASE_URL`. Panics when the
/// switch is on without a server (a run that asked for PostgreSQL never falls back).
pub fn deploy_postgres() -> Option<String> {
    match std::env::var("DEPLOY_TEST_BACKEND").as_deref() {
        Ok("postgres") => Some(std::env::var("TEST_DATABASE_URL").expect(
            "DEPLOY_TEST_BACKEND=postgres needs TEST_DATABASE_URL (a PostgreSQL server URL)",
        )),
        Ok("sqlite") | Err(_) => None,
        Ok(other) => panic!("DEPLOY_TEST_BACKEND={other}: expected sqlite or postgres"),
    }
}

/// The PostgreSQL server of the PostgreSQL-only tests (`TEST_DATABASE_URL`), or `None`
/// after reporting `what` as skipped.
pub fn postgres_or_skip(what: &str) -> Option<String> {
    let url = std::env::var("TEST_DATABASE_URL").ok();
    if url.is_none() {
        skipped(&format!("{what}: TEST_DATABASE_URL is not set"));
    }
    url
}

/// Reports the running test as skipped, with `reason`.
pub fn skipped(reason: &str) {
    eprintln!("SKIPPED {}: {reason}", test_name());
    append("skipped", &format!("{}: {reason}", test_name()));
}

/// Records that the running test used `database` (a `postgres://` URL or a SQLite file).
pub fn used(database: &str) {
    let backend = if is_postgres(database) {
        "postgres"
    } else {
        "sqlite"
    };
    append("backends", &format!("{backend} {}", test_name()));
}

/// Whether `database` names a PostgreSQL database.
pub fn is_postgres(database: &str) -> bool {
    database.starts_with("postgres://") || database.starts_with("postgresql://")
}

/// `<test binary>::<test>`: the binary without cargo's hash, the test from the thread
/// name libtest gives each test.
fn test_name() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let binary = exe.rsplit_once('-').map_or(exe.as_str(), |(name, _)| name);
    let thread = std::thread::current();
    format!("{binary}::{}", thread.name().unwrap_or("?"))
}

fn append(file: &str, line: &str) {
    let Some(dir) = std::env::var_os("TEST_REPORT_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let _ = std::fs::create_dir_all(&dir);
    // One short write per line on an O_APPEND file: lines from concurrent tests do not mix.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(file))
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!("could not write the test report in {}: {e}", dir.display());
    }
}
