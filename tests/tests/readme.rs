//! Runs every grpcurl recipe of the README, in order and as written, against fresh
//! deploy-svc and release-svc binaries wired together (only the addresses are substituted).
//!
//! Markers in the README: `# expect: Code` (the next call must fail with that code) and
//! `# expect-output: TEXT` (the next call's output must contain TEXT; it is retried for up
//! to 10 s, since release-svc learns placements from deploy-svc's stream asynchronously
//! and agents place artifacts in the background). Two real deploy agents serve the
//! environment `local`, as `scripts/quickstart` starts them.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use tests::Binary;

struct Recipe {
    line: usize,
    command: String,
    expect: Option<String>,
    output: Option<String>,
}

fn recipes() -> Vec<Recipe> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- recipes:start -->")
        .expect("README lacks the recipes:start marker");
    let end = readme
        .find("<!-- recipes:end -->")
        .expect("README lacks the recipes:end marker");
    let first_line = readme[..start].lines().count();
    let mut out = Vec::new();
    let (mut expect, mut output) = (None, None);
    for (i, line) in readme[start..end].lines().enumerate() {
        let line = line.trim();
        if let Some(code) = line.strip_prefix("# expect: ") {
            expect = Some(code.trim().to_owned());
        } else if let Some(text) = line.strip_prefix("# expect-output: ") {
            output = Some(text.trim().to_owned());
        } else if line.starts_with("grpcurl ") {
            out.push(Recipe {
                line: first_line + i,
                command: line.to_owned(),
                expect: expect.take(),
                output: output.take(),
            });
        }
    }
    out
}

fn run(command: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(command).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn every_readme_recipe_works_as_written() {
    let recipes = recipes();
    assert!(
        recipes.len() >= 60,
        "expected the full walkthrough, found {} recipes",
        recipes.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Binary::start(&dir.path().join("deploy.db"), &[]).await;
    let deploy_url = format!("http://{}", d.addr);
    let rdb = dir.path().join("release.db");
    let r = Binary::spawn(
        "release-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            rdb.to_str().unwrap(),
            "--deploy-svc",
            &deploy_url,
        ],
    )
    .await;
    // The quickstart's agents: they register once the README creates `local`, and read
    // the walkthrough's artifacts from examples/, as scripts/quickstart allows them to.
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut agents = Vec::new();
    for i in 1..=2 {
        let root = dir.path().join(format!("agents/local-{i}"));
        agents.push(
            tests::fleet::Agent::start(
                &d,
                "local",
                &format!("local-{i}"),
                root,
                &["--allow-file-dir", examples],
            )
            .await,
        );
    }
    let grpcurl = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    for rec in recipes {
        let command = rec
            .command
            .replace("127.0.0.1:50051", &d.addr.to_string())
            .replace("127.0.0.1:50052", &r.addr.to_string())
            .replacen("grpcurl", &grpcurl, 1);
        let started = Instant::now();
        let (ok, text) = loop {
            let (ok, text) = run(&command);
            let wanted = rec
                .output
                .as_ref()
                .is_none_or(|o| text.contains(o.as_str()));
            if wanted || started.elapsed() > Duration::from_secs(10) {
                break (ok, text);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match &rec.expect {
            None => assert!(ok, "README line {}: {}\n{text}", rec.line, rec.command),
            Some(code) => {
                assert!(
                    !ok,
                    "README line {} should fail with {code}: {}\n{text}",
                    rec.line, rec.command
                );
                assert!(
                    text.contains(&format!("Code: {code}")),
                    "README line {} should fail with {code}:\n{text}",
                    rec.line
                );
            }
        }
        if let Some(o) = &rec.output {
            assert!(
                text.contains(o.as_str()),
                "README line {}: output lacks {o:?}:\n{text}",
                rec.line
            );
        }
    }
    // The walkthrough's last word: the rollback put hello 1.0.0 back on every agent's disk.
    for a in &agents {
        let text = std::fs::read_to_string(a.root.join("current/app.txt")).unwrap();
        assert_eq!(text, "hello 1.0.0\n", "{}", a.target);
    }
}
