//! The deploy-svc binary's command line. (Being an integration test of this package also
//! makes `cargo test --workspace` build the binary the end-to-end tests start.)

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_deploy-svc");

#[test]
fn help_lists_every_flag_with_its_environment_variable() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--database",
        "--synchronous",
        "--max-batch",
        "--retention-events",
        "--drain-timeout-ms",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(help.contains("DEPLOY_SVC_LISTEN") && help.contains("DEPLOY_SVC_DATABASE"));
}

#[test]
fn bad_flags_are_refused() {
    let out = Command::new(BIN)
        .args(["--synchronous", "off"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--synchronous"));
}

#[test]
fn environment_variables_configure_it_and_port_0_prints_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("env.db");
    let mut child = Command::new(BIN)
        .env("DEPLOY_SVC_LISTEN", "127.0.0.1:0")
        .env("DEPLOY_SVC_DATABASE", &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: std::net::SocketAddr = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
    assert_ne!(addr.port(), 0);
    assert!(
        db.exists(),
        "the database named by DEPLOY_SVC_DATABASE was created"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
