//! Attacks on the deploy agent, replayed against the real deploy-svc binary and a real
//! `deploy-agent` process (see SECURITY.md, "Deploy agent"). Each test checks that the
//! attack fails, the agent process is alive with bounded memory (or, for SIGTERM, gone),
//! nothing outside the agent's root was written, and a later deployment still completes.
//!
//! The agents get their settings from environment variables (`DEPLOY_AGENT_*`), the way a
//! service manager would set them.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::deploy::v1 as pb;
use sha2::Digest as _;
use tests::fleet::{self, deploy, is, tarball, until, Agent};
use tests::{environment, Binary};

const ENV: &str = "dev";

/// An agent's memory stays below this (KiB) whatever it is fed.
const MAX_AGENT_RSS_KIB: u64 = 100 * 1024;

struct Setup {
    deploy: Binary,
    client: tests::Client,
    dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let deploy = Binary::start(
        &dir.path().join("deploy.db"),
        &["--agent-timeout-ms", "1500", "--tick-interval-ms", "100"],
    )
    .await;
    let mut client = tests::connect(deploy.addr).await;
    environment(&mut client, ENV, None, false).await;
    std::fs::create_dir(dir.path().join("artifacts")).unwrap();
    Setup {
        deploy,
        client,
        dir,
    }
}

impl Setup {
    fn artifacts(&self) -> PathBuf {
        self.dir.path().join("artifacts")
    }

    /// Starts one agent `t-1` with root `<dir>/host/agent` and `vars`, and waits for it to
    /// register.
    async fn agent(&mut self, vars: &[(&str, &str)]) -> Agent {
        let root = self.dir.path().join("host/agent");
        let agent = Agent::start_with(&self.deploy, ENV, "t-1", root, &[], vars).await;
        fleet::registered(&mut self.client, ENV, 1).await;
        agent
    }

    async fn register(&mut self, version: &str, source_uri: &str, digest: &str) {
        self.client
            .register_artifact(pb::RegisterArtifactRequest {
                artifact: "app".into(),
                version: version.into(),
                digest: digest.into(),
                metadata: Default::default(),
                source_uri: source_uri.into(),
            })
            .await
            .unwrap();
    }

    /// Deploys `version` and waits for `state`.
    async fn roll(&mut self, version: &str, state: pb::DeploymentState) -> pb::Deployment {
        let d = deploy(&mut self.client, "app", version, ENV, None).await;
        until(&mut self.client, &d.name, version, is(state)).await
    }

    /// A good tar.gz in artifacts/, registered and deployed: it must succeed.
    async fn later_deployment_completes(&mut self, agent: &Agent, version: &str) {
        let (path, digest) = tarball(&self.artifacts(), version, &[("app.txt", version)]);
        self.register(version, &format!("file://{}", path.display()), &digest)
            .await;
        self.roll(version, pb::DeploymentState::Succeeded).await;
        assert_eq!(agent.current().as_deref(), Some(version));
    }

    fn deploy_alive(&mut self) {
        assert!(
            matches!(self.deploy.child.try_wait(), Ok(None)),
            "deploy-svc exited"
        );
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn reason(d: &pb::Deployment) -> String {
    d.placements
        .iter()
        .map(|p| p.message.clone())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn assert_bounded(agent: &mut Agent) {
    assert!(agent.alive(), "the agent exited");
    let rss = agent.rss_kib();
    assert!(rss < MAX_AGENT_RSS_KIB, "agent RSS {rss} KiB");
}

/// Every file and link under `dir` (not following links), relative.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                stack.push(path.clone());
            }
            out.push(path.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

/// A tar.gz of raw v7 entries (name, link target, type), as an attacker writes them.
fn raw_tar_gz(entries: &[(&str, &str, tar::EntryType, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, link, kind, data) in entries {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// Attack 4: a symlink chain (`a -> .`, then `a/a/a/a/.agent-version.json ->
/// ../../../../victim` and `a/.../escape -> ../../.../etc/hostname`) whose link texts stay
/// inside, but which really lead out of the version directory and the agent's root.
#[tokio::test]
async fn attack_4_a_symlink_chain_archive_fails_and_writes_nothing_outside_the_root() {
    let mut s = setup().await;
    let allowed = s.artifacts().to_string_lossy().into_owned();
    let mut agent = s.agent(&[("DEPLOY_AGENT_ALLOW_FILE_DIR", &allowed)]).await;
    // The version directory is <dir>/host/agent/versions/app-1.partial while unpacking:
    // four levels up is <dir>.
    let deep_escape = format!("{}escape", "a/".repeat(20));
    let to_root = format!("{}etc/hostname", "../".repeat(19));
    let payload = raw_tar_gz(&[
        ("a", ".", tar::EntryType::Symlink, b""),
        (
            "a/a/a/a/.agent-version.json",
            "../../../../victim",
            tar::EntryType::Symlink,
            b"",
        ),
        (&deep_escape, &to_root, tar::EntryType::Symlink, b""),
        ("app.txt", "", tar::EntryType::Regular, b"1"),
    ]);
    let path = s.artifacts().join("chain.tar.gz");
    std::fs::write(&path, &payload).unwrap();
    let before = tree(s.dir.path());

    s.register(
        "1",
        &format!("file://{}", path.display()),
        &format!("sha256:{}", sha256(&payload)),
    )
    .await;
    let failed = s.roll("1", pb::DeploymentState::Failed).await;

    let why = reason(&failed);
    assert!(why.contains("could not unpack"), "{why}");
    assert!(
        !s.dir.path().join("victim").exists(),
        "written outside the root"
    );
    assert!(agent.current().is_none());
    assert!(std::fs::symlink_metadata(agent.root.join("current")).is_err());
    // Outside the agent's root, nothing changed (the database files aside).
    let after: Vec<PathBuf> = tree(s.dir.path())
        .into_iter()
        .filter(|p| !p.starts_with("host") && !p.to_string_lossy().starts_with("deploy.db"))
        .collect();
    let before: Vec<PathBuf> = before
        .into_iter()
        .filter(|p| !p.starts_with("host") && !p.to_string_lossy().starts_with("deploy.db"))
        .collect();
    assert_eq!(after, before);
    assert_bounded(&mut agent);
    s.deploy_alive();
    s.later_deployment_completes(&agent, "2").await;
}

/// Attack 5: `source_uri: file:///...` of a host file with a wrong digest. The reason must
/// not carry the file's real sha256 (anyone could then register it and have the agent
/// place the host file), file:// is refused unless allowed, and a single file is never
/// made executable by default.
#[tokio::test]
async fn attack_5_a_host_file_source_is_refused_and_no_reason_echoes_its_digest() {
    let mut s = setup().await;
    let secret = s.dir.path().join("host-secret");
    std::fs::write(&secret, b"root:hunter2\n").unwrap();
    let real = sha256(b"root:hunter2\n");
    let wrong = format!("sha256:{}", sha256(b"a guess"));

    // Default agent: file:// is off.
    let mut agent = s.agent(&[]).await;
    s.register("1", &format!("file://{}", secret.display()), &wrong)
        .await;
    let failed = s.roll("1", pb::DeploymentState::Failed).await;
    let why = reason(&failed);
    assert!(!why.contains(&real), "the reason leaks the digest: {why}");
    assert!(why.contains("not allowed"), "{why}");
    assert_bounded(&mut agent);
    agent.kill().await;

    // An agent allowed to read artifacts/: a wrong digest there is "digest mismatch", and
    // still no observed digest in the reason.
    let allowed = s.artifacts().to_string_lossy().into_owned();
    let copy = s.artifacts().join("tool");
    std::fs::copy(&secret, &copy).unwrap();
    let mut agent = Agent::start_with(
        &s.deploy,
        ENV,
        "t-1",
        s.dir.path().join("host/agent"),
        &[],
        &[("DEPLOY_AGENT_ALLOW_FILE_DIR", &allowed)],
    )
    .await;
    s.register("2", &format!("file://{}", copy.display()), &wrong)
        .await;
    let failed = s.roll("2", pb::DeploymentState::Failed).await;
    let why = reason(&failed);
    assert!(why.contains("digest mismatch"), "{why}");
    assert!(!why.contains(&real), "the reason leaks the digest: {why}");

    // With the right digest a single file is placed, readable and not executable.
    s.register(
        "3",
        &format!("file://{}", copy.display()),
        &format!("sha256:{real}"),
    )
    .await;
    s.roll("3", pb::DeploymentState::Succeeded).await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent.root.join("current/app"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644);
    assert_bounded(&mut agent);
    s.deploy_alive();
}

/// Total size of the regular files under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    tree(dir)
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(dir.join(p)).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// An HTTP server on 127.0.0.1 that answers every GET with headers announcing a gigabyte
/// and then sends nothing: a fetch that never ends by itself.
fn serve_stalled() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n0123456789");
            open.push(stream);
        }
    });
    base
}

/// Attack 6: `source_uri: file:///dev/zero`. Refused by default; on an agent allowed to
/// read /dev it stops at the artifact size limit; and SIGTERM ends an agent in the middle
/// of a fetch that would never end.
#[tokio::test]
async fn attack_6_an_endless_source_stops_at_the_limit_and_sigterm_ends_the_agent() {
    let mut s = setup().await;
    let limit: u64 = 8 << 20;
    let stalled = serve_stalled();
    let prefix = format!("{stalled}/artifacts/");
    let limit_text = limit.to_string();
    let allowed = format!("/dev,{}", s.artifacts().display());
    let mut agent = s
        .agent(&[
            ("DEPLOY_AGENT_ALLOW_FILE_DIR", &allowed),
            ("DEPLOY_AGENT_ALLOW_SOURCE", &prefix),
            ("DEPLOY_AGENT_MAX_ARTIFACT_BYTES", &limit_text),
        ])
        .await;
    let tmp = agent.root.join("tmp");
    let digest = format!("sha256:{}", sha256(b"anything"));

    s.register("1", "file:///dev/zero", &digest).await;
    let d = deploy(&mut s.client, "app", "1", ENV, None).await;
    let peak = std::cell::Cell::new(0);
    let failed = until(&mut s.client, &d.name, "/dev/zero", |d| {
        peak.set(peak.get().max(disk_bytes(&tmp)));
        assert!(peak.get() <= limit, "temp dir reached {} bytes", peak.get());
        d.state() == pb::DeploymentState::Failed
    })
    .await;
    let peak = peak.get();
    let why = reason(&failed);
    assert!(why.contains(&format!("larger than {limit} bytes")), "{why}");
    assert!(peak <= limit, "temp dir reached {peak} bytes");
    assert!(disk_bytes(&tmp) <= limit);
    assert_bounded(&mut agent);
    s.deploy_alive();
    s.later_deployment_completes(&agent, "2").await;

    // A fetch that never ends by itself: SIGTERM still stops the agent.
    s.register("3", &format!("{prefix}stalled.tar.gz"), &digest)
        .await;
    let d = deploy(&mut s.client, "app", "3", ENV, None).await;
    until(&mut s.client, &d.name, "fetching", |d| {
        d.placements
            .iter()
            .any(|p| p.state() == pb::PlacementState::Placing)
    })
    .await;
    while std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = agent.terminate(Duration::from_secs(20)).await;
    assert!(
        status.is_some(),
        "the agent did not exit on SIGTERM during a fetch"
    );
    s.deploy_alive();
}

/// Attack 7: a source URI of 1,426 characters that fails. The reason fits deploy-svc's
/// 1,024-byte limit, the deployment fails once, and the agent takes the next order.
#[tokio::test]
async fn attack_7_a_long_failing_source_fails_once_and_later_deployments_complete() {
    let mut s = setup().await;
    let allowed = s.artifacts().to_string_lossy().into_owned();
    let mut agent = s.agent(&[("DEPLOY_AGENT_ALLOW_FILE_DIR", &allowed)]).await;
    let mut uri = format!("file://{}/", s.artifacts().display());
    while uri.len() < 1_426 {
        uri.push_str(&"x".repeat(200));
        uri.push('/');
    }
    uri.truncate(1_426);
    assert_eq!(uri.len(), 1_426);
    let digest = format!("sha256:{}", sha256(b"anything"));

    s.register("1", &uri, &digest).await;
    let failed = s.roll("1", pb::DeploymentState::Failed).await;
    for p in &failed.placements {
        assert!(p.message.len() <= 1_024, "{} bytes", p.message.len());
        assert!(p.message.contains("could not fetch"), "{}", p.message);
    }
    assert_bounded(&mut agent);
    s.deploy_alive();
    s.later_deployment_completes(&agent, "2").await;
}
