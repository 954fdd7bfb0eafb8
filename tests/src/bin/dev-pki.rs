//! `dev-pki <dir>`: a development CA, server certificate, client certificates, static
//! tokens and a policy for trying the secure mode on one machine (`scripts/quickstart
//! --secure`). Never use these files in production.
//!
//! Writes: `ca.pem`, `server.{crt,key}` (localhost, 127.0.0.1), client certificates
//! `release-svc`, `agent-local-1`, `agent-local-2`, `admin` (SPIFFE IDs
//! `spiffe://dev.local/<name>`), `admin.token` and `viewer.token` (static bearer tokens),
//! `tokens.json` (their hashes) and `policy.json` (the role bindings).

use std::path::PathBuf;

use serde_json::json;
use tests::pki;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or_else(|| anyhow::anyhow!("usage: dev-pki <directory>"))?,
    );
    std::fs::create_dir_all(&dir)?;
    let ca = pki::Ca::new(&dir, "ca")?;
    ca.server(&dir, "server")?;
    let id = |name: &str| format!("spiffe://dev.local/{name}");
    for name in ["release-svc", "agent-local-1", "agent-local-2", "admin"] {
        ca.client(&dir, name, &id(name))?;
    }
    let admin = pki::random_token();
    let viewer = pki::random_token();
    std::fs::write(dir.join("admin.token"), &admin)?;
    std::fs::write(dir.join("viewer.token"), &viewer)?;
    pki::token_file(
        &dir.join("tokens.json"),
        &[
            (admin.as_str(), "admin", &["operators"][..]),
            (viewer.as_str(), "viewer", &[][..]),
        ],
    )?;
    pki::policy_file(
        &dir.join("policy.json"),
        &[
            json!({"role": "admin", "groups": ["operators"], "principals": [id("admin")]}),
            json!({"role": "viewer", "principals": ["viewer"]}),
            json!({"role": "release-service", "principals": [id("release-svc")]}),
            json!({"role": "agent", "principals": [id("agent-local-1")], "targets": ["local/local-1"]}),
            json!({"role": "agent", "principals": [id("agent-local-2")], "targets": ["local/local-2"]}),
        ],
    )?;
    #[allow(clippy::print_stdout)]
    {
        println!(
            "development PKI, tokens and policy written to {}",
            dir.display()
        );
    }
    Ok(())
}
