//! Runs the README's five-minute tour and then every grpcurl recipe of `docs/recipes.md`, in
//! order and as written, against one fresh pair of deploy-svc and release-svc binaries
//! wired together (only the addresses are substituted), with two real deploy agents for the
//! environment `local`, which `scripts/local-env` creates first, as `scripts/quickstart`
//! does. Running the recipes after the tour, on the same databases, also shows that they
//! rely on the names they capture, never on numbering from an empty database.
//!
//! Between the `<!-- recipes:start -->` and `<!-- recipes:end -->` markers, a recipe is a
//! line that starts with `grpcurl ` or captures one's answer in a shell variable
//! (`NAME=$(grpcurl ... | grep -m1 '"name"' | cut -d'"' -f4); echo "$NAME"`); captured
//! variables are set for every later line. Markers: `# expect: Code` (the next call must
//! fail with that code) and `# expect-output: TEXT` (the next call's output must contain
//! TEXT, with captured `$NAME`s expanded; a plain call is retried for up to 10 s, since
//! release-svc learns placements from deploy-svc's stream asynchronously and agents place
//! artifacts in the background).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::Binary;

struct Recipe {
    file: &'static str,
    line: usize,
    command: String,
    /// The shell variable the line assigns, for a capturing line.
    captures: Option<String>,
    expect: Option<String>,
    output: Option<String>,
}

/// The workspace root (the parent of this crate).
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// `NAME` when `line` is `NAME=$(grpcurl ...`.
fn captured_name(line: &str) -> Option<String> {
    let (name, rest) = line.split_once("=$(")?;
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    (valid && rest.starts_with("grpcurl ")).then(|| name.to_owned())
}

fn recipes(file: &'static str) -> Vec<Recipe> {
    let text = std::fs::read_to_string(Path::new(ROOT).join(file)).unwrap();
    let start = text
        .find("<!-- recipes:start -->")
        .unwrap_or_else(|| panic!("{file} lacks the recipes:start marker"));
    let end = text
        .find("<!-- recipes:end -->")
        .unwrap_or_else(|| panic!("{file} lacks the recipes:end marker"));
    let first_line = text[..start].lines().count();
    let mut out = Vec::new();
    let (mut expect, mut output) = (None, None);
    for (i, line) in text[start..end].lines().enumerate() {
        let line = line.trim();
        if let Some(code) = line.strip_prefix("# expect: ") {
            expect = Some(code.trim().to_owned());
        } else if let Some(text) = line.strip_prefix("# expect-output: ") {
            output = Some(text.trim().to_owned());
        } else if line.starts_with("grpcurl ") || captured_name(line).is_some() {
            out.push(Recipe {
                file,
                line: first_line + i + 1,
                command: line.to_owned(),
                captures: captured_name(line),
                expect: expect.take(),
                output: output.take(),
            });
        }
    }
    out
}

/// Runs `command` with `sh`, the captured variables in its environment: (success, output).
fn run(command: &str, vars: &[(String, String)]) -> (bool, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `text` with every captured `$NAME` replaced by its value (longest names first).
fn expand(text: &str, vars: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = vars.iter().collect();
    sorted.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    sorted
        .iter()
        .fold(text.to_owned(), |t, (k, v)| t.replace(&format!("${k}"), v))
}

const MARK: &str = "@@captured=";

#[tokio::test]
async fn readme_tour_and_every_recipe_work_as_written() {
    let tour = recipes("README.md");
    let all = recipes("docs/recipes.md");
    assert!(
        tour.len() >= 15,
        "expected the README tour, found {} calls",
        tour.len()
    );
    assert!(
        all.len() >= 60,
        "expected every recipe, found {} calls",
        all.len()
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
    let grpcurl = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    // What scripts/quickstart does before it starts its agents.
    let setup = Command::new(Path::new(ROOT).join("scripts/local-env"))
        .arg(d.addr.to_string())
        .env("GRPCURL", &grpcurl)
        .output()
        .unwrap();
    assert!(
        setup.status.success(),
        "scripts/local-env failed:\n{}{}",
        String::from_utf8_lossy(&setup.stdout),
        String::from_utf8_lossy(&setup.stderr)
    );
    // The quickstart's agents read the walkthrough's artifacts from examples/ only.
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
    let mut vars: Vec<(String, String)> = Vec::new();
    for rec in tour.into_iter().chain(all) {
        let place = format!("{} line {}", rec.file, rec.line);
        let mut command = rec
            .command
            .replace("127.0.0.1:50051", &d.addr.to_string())
            .replace("127.0.0.1:50052", &r.addr.to_string())
            .replacen("grpcurl", &grpcurl, 1);
        if let Some(name) = &rec.captures {
            command.push_str(&format!("\nprintf '\\n{MARK}%s' \"${name}\""));
        }
        let wanted_text = rec.output.as_ref().map(|o| expand(o, &vars));
        let started = Instant::now();
        let (ok, text) = loop {
            let (ok, text) = run(&command, &vars);
            let wanted = wanted_text
                .as_ref()
                .is_none_or(|o| text.contains(o.as_str()));
            // A capturing call creates something: it runs once.
            if wanted || rec.captures.is_some() || started.elapsed() > Duration::from_secs(10) {
                break (ok, text);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match &rec.expect {
            None => assert!(ok, "{place}: {}\n{text}", rec.command),
            Some(code) => {
                assert!(
                    !ok,
                    "{place} should fail with {code}: {}\n{text}",
                    rec.command
                );
                assert!(
                    text.contains(&format!("Code: {code}")),
                    "{place} should fail with {code}:\n{text}"
                );
            }
        }
        if let Some(o) = &wanted_text {
            assert!(
                text.contains(o.as_str()),
                "{place}: output lacks {o:?}:\n{text}"
            );
        }
        if let Some(name) = rec.captures {
            let value = text
                .rsplit_once(MARK)
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default();
            assert!(
                !value.is_empty() && !value.contains(char::is_whitespace),
                "{place}: ${name} captured nothing from: {}\n{text}",
                rec.command
            );
            vars.retain(|(k, _)| *k != name);
            vars.push((name, value));
        }
    }
    // The walkthrough's last word: the rollback put hello 1.0.0 back on every agent's disk.
    for a in &agents {
        let text = std::fs::read_to_string(a.root.join("current/app.txt")).unwrap();
        assert_eq!(text, "hello 1.0.0\n", "{}", a.target);
    }
}
