//! The web console end to end: the real deploy-svc, release-svc and console binaries, and
//! the console driven in headless Chromium (tests/node/console.cjs, puppeteer-core with
//! Debian's chromium; scripts/test installs both). The page loads without console errors;
//! the inventory shows a placement within 1 s of its report (pushed by WatchPlacements over
//! server-sent events, no polling); the kill switch, confirmed in the page, makes the next
//! Evaluate of the feature not visible; with authentication on, a viewer's kill switch is
//! refused and the page shows PERMISSION_DENIED with the service's message; the audit feed
//! lists the kill switch; Resume shows the feature again; Roll back in the inventory cancels
//! the deployment in flight and starts its rollback; the calendar shows a freeze window. Screenshots of
//! each view are saved in target/console-screenshots.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use proto::deploy::v1 as dpb;
use proto::release::v1 as rpb;
use serde_json::Value;
use tests::{pki, release, Binary};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// Where the screenshots go (target/console-screenshots).
fn screenshots() -> PathBuf {
    let dir = tests::bin_dir()
        .parent()
        .unwrap()
        .join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The console binary in front of `deploy` and `release`, plus `args`.
async fn console(deploy: &Binary, release: &Binary, args: &[&str]) -> Binary {
    let deploy_url = format!("http://{}", deploy.addr);
    let release_url = format!("http://{}", release.addr);
    let mut all = vec![
        "--listen",
        "127.0.0.1:0",
        "--deploy-svc",
        &deploy_url,
        "--release-svc",
        &release_url,
    ];
    all.extend_from_slice(args);
    Binary::spawn("console", &all).await
}

/// Starts the browser script in `mode` against `console`.
fn browser(console: &Binary, mode: &str, release: &str, token: Option<&str>) -> Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/node/console.cjs");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(script)
        .env("NODE_PATH", tests::node_modules())
        .env("CONSOLE_URL", format!("http://{}", console.addr))
        .env("CONSOLE_MODE", mode)
        .env("CONSOLE_RELEASE", release)
        .env("SCREENSHOTS", screenshots())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    if let Some(token) = token {
        cmd.env("CONSOLE_TOKEN", token);
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("node: {e} (scripts/test installs puppeteer-core and chromium)"))
}

/// The next JSON line of the script; fails the test on the script's own failure.
async fn next(lines: &mut Lines<BufReader<ChildStdout>>, phase: &str) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no {phase:?} from the browser within 60 s"))
        .unwrap()
        .unwrap_or_else(|| panic!("the browser script ended before {phase:?}"));
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["phase"], phase, "{v}");
    v
}

fn no_errors(v: &Value) {
    assert_eq!(v["errors"], serde_json::json!([]), "console errors: {v}");
}

#[tokio::test]
async fn live_inventory_and_the_kill_switch() {
    let dir = tempfile::tempdir().unwrap();
    let database = tests::deploy_database(dir.path()).await;
    let deploy = Binary::start(&database, &[]).await;
    let release_svc = Binary::release_following(dir.path(), deploy.addr, &[]).await;
    let mut dc = tests::connect(deploy.addr).await;
    let mut rc = release::connect(release_svc.addr).await;
    tests::environment(&mut dc, "prod", None, false).await;
    // stage: frozen for the whole day after tomorrow (UTC), for the calendar.
    let today = chrono_day();
    dc.create_environment(dpb::CreateEnvironmentRequest {
        environment_id: "stage".into(),
        environment: Some(dpb::Environment {
            freeze_windows: vec![dpb::FreezeWindow {
                name: "launch".into(),
                schedule: Some(dpb::freeze_window::Schedule::Absolute(
                    dpb::AbsoluteWindow {
                        start_time: Some(prost_types::Timestamp {
                            seconds: today + 2 * 86_400,
                            nanos: 0,
                        }),
                        end_time: Some(prost_types::Timestamp {
                            seconds: today + 3 * 86_400,
                            nanos: 0,
                        }),
                    },
                )),
            }],
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
    let targets = tests::targets(&mut dc, "prod", "p", 2).await;
    // 0.9.0 placed everywhere: what a rollback of 1.0.0 goes back to.
    tests::artifact(&mut dc, "checkout", "0.9.0").await;
    let earlier = tests::deploy(&mut dc, "checkout", "0.9.0", "prod", "CHG-0")
        .await
        .unwrap();
    for t in &targets {
        tests::report(&mut dc, &earlier.name, t, dpb::PlacementState::Placed)
            .await
            .unwrap();
    }
    tests::artifact(&mut dc, "checkout", "1.0.0").await;
    let deployment = tests::deploy(&mut dc, "checkout", "1.0.0", "prod", "CHG-1")
        .await
        .unwrap();
    release::plain_feature(&mut rc, "new-cart", false).await;
    let rel = release::release(&mut rc, &["new-cart"], &["prod"]).await;
    release::rollout(&mut rc, &rel, "prod", 100.0).await;
    assert!(
        release::evaluate(&mut rc, "new-cart", "prod", "u1")
            .await
            .visible
    );
    let console = console(&deploy, &release_svc, &[]).await;

    let id = rel.strip_prefix("releases/").unwrap();
    let mut node = browser(&console, "live", id, None);
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    next(&mut lines, "loaded").await;

    // The placement reaches the open page within 1 s, pushed by the live stream.
    let reported = Instant::now();
    tests::report(
        &mut dc,
        &deployment.name,
        &targets[0],
        dpb::PlacementState::Placed,
    )
    .await
    .unwrap();
    let mut stdin = node.stdin.take().unwrap();
    stdin.write_all(b"reported\n").await.unwrap();
    next(&mut lines, "placed").await;
    let shown = reported.elapsed();
    eprintln!("placement shown {} ms after its report", shown.as_millis());
    assert!(shown < Duration::from_secs(1), "{shown:?}");

    // Roll back, confirmed in the inventory: the deployment in flight is cancelled and a
    // rollback to 0.9.0 starts.
    next(&mut lines, "rolled-back").await;
    let rolled = dc
        .get_deployment(dpb::GetDeploymentRequest {
            name: deployment.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rolled.state(),
        dpb::DeploymentState::Cancelled,
        "{rolled:?}"
    );
    let rollback = dc
        .list_deployments(dpb::ListDeploymentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .deployments
        .into_iter()
        .find(|d| d.rollback_of == deployment.name)
        .expect("a rollback deployment");
    assert!(
        rollback.artifact_version.ends_with("/versions/0.9.0"),
        "{rollback:?}"
    );

    // The kill switch, confirmed in the page: the next Evaluate hides the feature.
    next(&mut lines, "killed").await;
    let after = release::evaluate(&mut rc, "new-cart", "prod", "u1").await;
    assert!(!after.visible, "{after:?}");
    let paused = rc
        .get_release(rpb::GetReleaseRequest { name: rel.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.state(), rpb::ReleaseState::Paused);

    // Resume, confirmed in the page: visible again.
    stdin.write_all(b"checked\n").await.unwrap();
    next(&mut lines, "resumed").await;
    let resumed = release::evaluate(&mut rc, "new-cart", "prod", "u1").await;
    assert!(resumed.visible, "{resumed:?}");

    no_errors(&next(&mut lines, "done").await);
    assert!(node.wait().await.unwrap().success());
    for view in [
        "inventory",
        "visibility",
        "stale",
        "release",
        "release-paused",
        "audit",
    ] {
        assert!(screenshots().join(format!("{view}.png")).exists(), "{view}");
    }
}

/// The start of today (UTC), in seconds since the epoch.
fn chrono_day() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    now - now % 86_400
}

/// `msg` sent with `token`.
fn bearer<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test]
async fn a_denied_action_shows_the_permission_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (admin, viewer, service) = (
        pki::random_token(),
        pki::random_token(),
        pki::random_token(),
    );
    pki::token_file(
        &d.join("tokens.json"),
        &[
            (&admin, "token-admin", &[]),
            (&viewer, "token-viewer", &[]),
            (&service, "token-release-svc", &[]),
        ],
    )
    .unwrap();
    pki::policy_file(
        &d.join("policy.json"),
        &[
            serde_json::json!({"role": "admin", "principals": ["token-admin"]}),
            serde_json::json!({"role": "viewer", "principals": ["token-viewer"]}),
            serde_json::json!({"role": "release-service", "principals": ["token-release-svc"]}),
        ],
    )
    .unwrap();
    let tokens = d.join("tokens.json").to_string_lossy().into_owned();
    let policy = d.join("policy.json").to_string_lossy().into_owned();
    let auth = ["--auth-tokens", &tokens, "--auth-policy", &policy];
    let deploy_db = d.join("deploy.db").to_string_lossy().into_owned();
    let mut args = vec!["--listen", "127.0.0.1:0", "--database", &deploy_db];
    args.extend_from_slice(&auth);
    let deploy = Binary::spawn("deploy-svc", &args).await;
    let service_token = write(&d.join("release-svc.token"), &service);
    let mut args = vec!["--deploy-svc-token-file", &service_token];
    args.extend_from_slice(&auth);
    let release_svc = Binary::release_following(d, deploy.addr, &args).await;
    let admin_token = write(&d.join("console.token"), &admin);
    let console = console(&deploy, &release_svc, &["--token-file", &admin_token]).await;

    let mut dc = tests::connect(deploy.addr).await;
    dc.create_environment(bearer(
        &admin,
        dpb::CreateEnvironmentRequest {
            environment_id: "prod".into(),
            environment: Some(dpb::Environment::default()),
            request_id: String::new(),
        },
    ))
    .await
    .unwrap();
    let mut rc = release::connect(release_svc.addr).await;
    rc.create_feature(bearer(
        &admin,
        rpb::CreateFeatureRequest {
            feature: Some(rpb::Feature {
                key: "new-cart".into(),
                ..Default::default()
            }),
        },
    ))
    .await
    .unwrap();
    let rel = rc
        .create_release(bearer(
            &admin,
            rpb::CreateReleaseRequest {
                release: Some(rpb::Release {
                    features: vec!["new-cart".into()],
                    environments: vec![rpb::ReleaseEnvironment {
                        environment: "prod".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .name;
    rc.set_rollout(bearer(
        &admin,
        rpb::SetRolloutRequest {
            name: rel.clone(),
            environment: "prod".into(),
            rollout_percent: 100.0,
        },
    ))
    .await
    .unwrap();

    // The viewer sees the release page (their token is forwarded) but may not pause it.
    let id = rel.strip_prefix("releases/").unwrap();
    let mut node = browser(&console, "denied", id, Some(&viewer));
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let denied = next(&mut lines, "denied").await;
    let text = denied["text"].as_str().unwrap();
    assert!(text.starts_with("PERMISSION_DENIED"), "{text}");
    assert!(text.contains("token-viewer"), "{text}");
    no_errors(&next(&mut lines, "done").await);
    assert!(node.wait().await.unwrap().success());
    let still = rc
        .get_release(bearer(&admin, rpb::GetReleaseRequest { name: rel }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.state(), rpb::ReleaseState::Released);
}

/// Sends one HTTP/1.1 request to `addr` and returns the response's status code, leaving
/// the connection open (a stream's response never ends) in `keep`.
async fn status_of(
    addr: std::net::SocketAddr,
    head: &str,
    keep: &mut Vec<tokio::net::TcpStream>,
) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("a status line within 10 s")
            .unwrap();
        assert!(n > 0, "closed before a status line");
        got.extend_from_slice(&buf[..n]);
    }
    keep.push(conn);
    let line = String::from_utf8_lossy(&got);
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Attacks on the console itself, replayed against the binary: a page on another site
/// whose name resolves to the console (DNS rebinding) is refused whatever it asks; with
/// authentication on, an action without the person's own token is refused instead of being
/// made with the console's identity; live streams past `--max-live-streams` are 503.
#[tokio::test]
async fn rebinding_anonymous_actions_and_too_many_streams_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = write(&dir.path().join("console.token"), &pki::random_token());
    // No service behind it: every refusal here happens in the console.
    let console = Binary::spawn(
        "console",
        &[
            "--listen",
            "127.0.0.1:0",
            "--deploy-svc",
            "http://127.0.0.1:9",
            "--release-svc",
            "http://127.0.0.1:9",
            "--token-file",
            &token,
            "--max-live-streams",
            "2",
        ],
    )
    .await;
    let addr = console.addr;
    let port = addr.port();
    let mut keep = Vec::new();
    let evil = format!("attacker.example:{port}");
    let action = |host: &str| {
        format!(
            "POST /actions/releases/1/pause HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\nHX-Request: true\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let get = |host: &str, path: &str| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    // DNS rebinding: same-origin to itself, refused for its Host.
    assert_eq!(status_of(addr, &action(&evil), &mut keep).await, 421);
    assert_eq!(status_of(addr, &get(&evil, "/"), &mut keep).await, 421);
    assert_eq!(
        status_of(addr, &get(&evil, "/events"), &mut keep).await,
        421
    );
    // The console's own address, with no token: an action is not made as the console.
    let own = addr.to_string();
    assert_eq!(status_of(addr, &action(&own), &mut keep).await, 401);
    let local = format!("localhost:{port}");
    assert_eq!(status_of(addr, &action(&local), &mut keep).await, 401);
    // Two live streams open; a third is 503 until one goes.
    assert_eq!(status_of(addr, &get(&own, "/events"), &mut keep).await, 200);
    assert_eq!(status_of(addr, &get(&own, "/events"), &mut keep).await, 200);
    assert_eq!(status_of(addr, &get(&own, "/events"), &mut keep).await, 503);
    keep.clear();
    let mut again = Vec::new();
    let mut status = 0;
    for _ in 0..50 {
        status = status_of(addr, &get(&own, "/events"), &mut again).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "a slot comes back when a stream goes");
}
