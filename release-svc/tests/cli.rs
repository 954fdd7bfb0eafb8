//! The release-svc binary's command line. (Being an integration test of this package also
//! makes `cargo test --workspace` build the binary the end-to-end tests start.)

#![allow(clippy::unwrap_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_release-svc");

#[test]
fn help_lists_every_flag_with_its_environment_variable() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--database",
        "--deploy-svc",
        "--drain-timeout-ms",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(help.contains("RELEASE_SVC_DEPLOY_SVC"));
}

#[test]
fn bad_flags_are_refused() {
    let out = Command::new(BIN)
        .args(["--listen", "not-an-address"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}

/// A served release-svc on port 0 (killed on drop).
struct Served(std::process::Child, String, tempfile::TempDir);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve() -> Served {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--database"])
        .arg(dir.path().join("release.db"))
        .args([
            "--deploy-svc",
            "http://127.0.0.1:9",
            "--change-calendar",
            "none",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_owned();
    Served(child, format!("http://{addr}"), dir)
}

#[test]
fn flagd_files_import_and_export_from_the_command_line() {
    let s = serve();
    let file = s.2.path().join("flags.json");
    std::fs::write(
        &file,
        r#"{"flags": {
            "dark-mode": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off"},
            "broken": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "b"}
        }}"#,
    )
    .unwrap();
    let import = |extra: &[&str]| {
        Command::new(BIN)
            .arg("import-flagd")
            .arg(&file)
            .args(["--environment", "staging", "--server", &s.1])
            .args(extra)
            .output()
            .unwrap()
    };
    // A file with an invalid flag is refused whole, naming the flag's field...
    let refused = import(&[]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("InvalidArgument") && err.contains("document.flags.broken.defaultVariant"),
        "{err}"
    );
    // ...or imported without it when asked.
    let out = import(&["--skip-invalid"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["created"], serde_json::json!(["dark-mode"]));
    assert!(summary["skipped"]["broken"][0]
        .as_str()
        .unwrap()
        .contains("defaultVariant"));
    assert!(summary["release"]
        .as_str()
        .unwrap()
        .starts_with("releases/"));

    let export = Command::new(BIN)
        .args(["export-flagd", "--environment", "staging", "--server", &s.1])
        .output()
        .unwrap();
    assert!(export.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&export.stdout).unwrap();
    assert_eq!(doc["flags"]["dark-mode"]["state"], "ENABLED");
    assert_eq!(doc["flags"]["dark-mode"]["defaultVariant"], "off");
    assert!(doc["flags"].get("broken").is_none());
}
