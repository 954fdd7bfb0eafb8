//! Runs every grpcurl recipe of the README, in order and as written, against a fresh
//! deploy-svc binary (only the address is substituted).

#![allow(clippy::unwrap_used)]

use std::process::Command;

use tests::Binary;

struct Recipe {
    line: usize,
    command: String,
    expect: Option<String>,
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
    let mut expect = None;
    for (i, line) in readme[start..end].lines().enumerate() {
        let line = line.trim();
        if let Some(code) = line.strip_prefix("# expect: ") {
            expect = Some(code.trim().to_owned());
        } else if line.starts_with("grpcurl ") {
            out.push(Recipe {
                line: first_line + i,
                command: line.to_owned(),
                expect: expect.take(),
            });
        }
    }
    out
}

#[tokio::test]
async fn every_readme_recipe_works_as_written() {
    let recipes = recipes();
    assert!(
        recipes.len() >= 30,
        "expected the full walkthrough, found {} recipes",
        recipes.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start(&dir.path().join("d.db"), &[]).await;
    let grpcurl = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    for r in recipes {
        let command = r
            .command
            .replace("127.0.0.1:50051", &bin.addr.to_string())
            .replacen("grpcurl", &grpcurl, 1);
        let out = Command::new("sh").arg("-c").arg(&command).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        match &r.expect {
            None => assert!(
                out.status.success(),
                "README line {}: {}\n{text}",
                r.line,
                r.command
            ),
            Some(code) => {
                assert!(
                    !out.status.success(),
                    "README line {} should fail with {code}: {}\n{text}",
                    r.line,
                    r.command
                );
                assert!(
                    text.contains(&format!("Code: {code}")),
                    "README line {} should fail with {code}:\n{text}",
                    r.line
                );
            }
        }
    }
}
