//! Identity and access against the real binaries: TLS and mutual TLS, bearer JWTs and
//! static tokens, the authorization table (every RPC x every built-in role), scoped
//! bindings, agents bound to their targets, governance on authenticated principals,
//! release-svc's own identity towards deploy-svc, certificate rotation, safe defaults and
//! redaction. Certificates, keys and tokens are made at test time.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::deploy::v1 as pb;
use proto::deploy::v1::deploy_service_client::DeployServiceClient;
use proto::release::v1 as rpb;
use proto::release::v1::release_service_client::ReleaseServiceClient;
use serde_json::json;
use service_kit::auth::table::{Scope, ROLES, TABLE};
use service_kit::client::ClientSecurity;
use tests::pki::{self, Ca, Issued, Signer};
use tests::{release, Binary};
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

const ISSUER: &str = "https://issuer.example.test/realms/platform";
const AUDIENCE: &str = "deploy-release";

/// The test PKI, tokens and policy, and the pair of binaries using them.
struct Secure {
    dir: tempfile::TempDir,
    ca: Ca,
    server: Issued,
    signer: Signer,
    k8s: Signer,
    /// Role -> static token bound to it.
    role_tokens: BTreeMap<&'static str, String>,
    certs: BTreeMap<&'static str, Issued>,
}

fn spiffe(name: &str) -> String {
    format!("spiffe://example.test/{name}")
}

impl Secure {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = Ca::new(d, "test-ca").unwrap();
        let server = ca.server(d, "server").unwrap();
        let signer = Signer::es256("keycloak-1").unwrap();
        let k8s = Signer::rs256("k8s-1", d).unwrap();
        pki::jwks(&d.join("jwks.json"), &[&signer, &k8s]).unwrap();
        let mut role_tokens = BTreeMap::new();
        for role in ROLES {
            role_tokens.insert(role, pki::random_token());
        }
        let entries: Vec<(String, String)> = role_tokens
            .iter()
            .map(|(role, token)| (token.clone(), format!("token-{role}")))
            .collect();
        let refs: Vec<(&str, &str, &[&str])> = entries
            .iter()
            .map(|(t, p)| (t.as_str(), p.as_str(), &[][..]))
            .collect();
        pki::token_file(&d.join("tokens.json"), &refs).unwrap();
        let mut bindings: Vec<serde_json::Value> = ROLES
            .iter()
            .map(|role| json!({"role": role, "principals": [format!("token-{role}")]}))
            .collect();
        let mut certs = BTreeMap::new();
        for (who, binding) in [
            ("admin", json!({"role": "admin"})),
            ("release-svc", json!({"role": "release-service"})),
            (
                "agent-p-1",
                json!({"role": "agent", "targets": ["prod/p-1"]}),
            ),
            (
                "agent-p-2",
                json!({"role": "agent", "targets": ["prod/p-2"]}),
            ),
            (
                "ci",
                json!({"role": "deployer", "environments": ["prod", "staging-*"]}),
            ),
            (
                "ci-staging",
                json!({"role": "deployer", "environments": ["staging-*"]}),
            ),
            ("ann", json!({"role": "release-manager"})),
            ("bob", json!({"role": "approver", "environments": ["prod"]})),
            (
                "carol",
                json!({"role": "environment-admin", "environments": ["prod"]}),
            ),
            ("policy", json!({"role": "policy-admin"})),
            (
                "app",
                json!({"role": "evaluator", "environments": ["prod"]}),
            ),
        ] {
            let mut b = binding;
            b["principals"] = json!([spiffe(who)]);
            bindings.push(b);
            certs.insert(who, ca.client(d, who, &spiffe(who)).unwrap());
        }
        // Groups from JWTs.
        bindings.push(json!({"role": "viewer", "groups": ["platform-viewers"]}));
        bindings.push(json!({"role": "deployer", "principals": ["system:serviceaccount:ci:pipeline"], "environments": ["staging-*"]}));
        pki::policy_file(&d.join("policy.json"), &bindings).unwrap();
        Self {
            dir,
            ca,
            server,
            signer,
            k8s,
            role_tokens,
            certs,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server_args(&self, client_auth: &str) -> Vec<String> {
        let p = |x: &Path| x.to_string_lossy().into_owned();
        vec![
            "--tls-cert".into(),
            p(&self.server.cert),
            "--tls-key".into(),
            p(&self.server.key),
            "--tls-client-ca".into(),
            p(&self.ca.pem),
            "--tls-client-auth".into(),
            client_auth.into(),
            "--auth-mtls".into(),
            "--auth-tokens".into(),
            p(&self.path("tokens.json")),
            "--auth-jwks".into(),
            p(&self.path("jwks.json")),
            "--auth-jwt-issuer".into(),
            ISSUER.into(),
            "--auth-jwt-audience".into(),
            AUDIENCE.into(),
            "--auth-policy".into(),
            p(&self.path("policy.json")),
        ]
    }

    async fn deploy_svc(&self) -> Binary {
        let db = self.path("deploy.db").to_string_lossy().into_owned();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--database".into(),
            db,
        ];
        args.extend(self.server_args("optional"));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Binary::spawn("deploy-svc", &refs).await
    }

    async fn release_svc(&self, deploy: &Binary) -> Binary {
        let p = |x: &Path| x.to_string_lossy().into_owned();
        let me = &self.certs["release-svc"];
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--database".into(),
            p(&self.path("release.db")),
            "--deploy-svc".into(),
            format!("https://{}", deploy.addr),
            "--deploy-svc-ca".into(),
            p(&self.ca.pem),
            "--deploy-svc-cert".into(),
            p(&me.cert),
            "--deploy-svc-key".into(),
            p(&me.key),
        ];
        args.extend(self.server_args("optional"));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Binary::spawn("release-svc", &refs).await
    }

    /// A TLS channel, presenting `who`'s client certificate if given.
    async fn channel(&self, addr: std::net::SocketAddr, who: Option<&str>) -> Channel {
        self.try_channel(addr, who, &self.ca.pem)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e:#}"))
    }

    async fn try_channel(
        &self,
        addr: std::net::SocketAddr,
        who: Option<&str>,
        ca: &Path,
    ) -> anyhow::Result<Channel> {
        let security = ClientSecurity {
            ca: Some(ca.to_path_buf()),
            cert: who.map(|w| self.certs[w].cert.clone()),
            key: who.map(|w| self.certs[w].key.clone()),
            token_file: None,
        };
        Ok(security
            .endpoint(&format!("https://{addr}"))?
            .connect()
            .await?)
    }

    async fn deploy_client(&self, b: &Binary, who: &str) -> tests::Client {
        DeployServiceClient::new(self.channel(b.addr, Some(who)).await)
    }

    async fn release_client(&self, b: &Binary, who: &str) -> release::Client {
        ReleaseServiceClient::new(self.channel(b.addr, Some(who)).await)
    }

    fn jwt(&self, signer: &Signer, claims: serde_json::Value) -> String {
        signer.sign(&claims)
    }
}

/// Creates a planned release (one 100% step) of `features` to `envs`.
async fn planned(c: &mut release::Client, features: &[&str], envs: &[&str]) -> String {
    c.create_release(rpb::CreateReleaseRequest {
        release: Some(rpb::Release {
            features: features.iter().map(|f| (*f).to_owned()).collect(),
            environments: envs
                .iter()
                .map(|e| rpb::ReleaseEnvironment {
                    environment: (*e).to_owned(),
                    steps: vec![rpb::RolloutStep {
                        percent: 100.0,
                        min_duration: None,
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .name
}

fn bearer<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn error_info(status: &tonic::Status) -> (String, std::collections::HashMap<String, String>) {
    let details = status.get_error_details();
    let info = details
        .error_info()
        .expect("PERMISSION_DENIED carries ErrorInfo");
    (info.reason.clone(), info.metadata.clone())
}

/// Every RPC of the table, by every built-in role (a static token each), on the server that
/// serves it: allowed -> never PERMISSION_DENIED; not allowed -> PERMISSION_DENIED. Then no
/// credentials -> UNAUTHENTICATED except for health, and a method outside the table is
/// refused.
#[tokio::test]
async fn every_rpc_by_every_role_follows_the_table() {
    let s = Secure::new();
    let deploy = s.deploy_svc().await;
    let rel = s.release_svc(&deploy).await;
    let dch = s.channel(deploy.addr, None).await;
    let rch = s.channel(rel.addr, None).await;
    let streaming = |path: &str| {
        path.contains("/Watch")
            || path.ends_with("/EventStream")
            || path.ends_with("/SyncFlags")
            || path.contains("ServerReflectionInfo")
    };
    let mut checked = 0;
    for rule in TABLE {
        let channels: Vec<&Channel> = if rule.path.starts_with("/deploy.v1.") {
            vec![&dch]
        } else if rule.path.starts_with("/release.v1.") || rule.path.starts_with("/flagd.") {
            vec![&rch]
        } else {
            vec![&dch, &rch]
        };
        if rule.path.contains("ServerReflectionInfo") || rule.path.ends_with("/List") {
            // Bidirectional reflection and the newer health List are not unary/server
            // streams; reflection is covered below with grpcurl-free checks.
            continue;
        }
        for ch in channels {
            for role in ROLES {
                let token = &s.role_tokens[role];
                let header = format!("Bearer {token}");
                let got = tests::raw::call(
                    ch.clone(),
                    rule.path,
                    &[("authorization", header.as_str())],
                    streaming(rule.path),
                )
                .await;
                let allowed = rule.permission == service_kit::auth::Permission::Health
                    || service_kit::auth::table::role(role)
                        .is_some_and(|p| p.contains(rule.permission));
                let denied = matches!(&got, Err(s) if s.code() == Code::PermissionDenied);
                assert_eq!(
                    denied, !allowed,
                    "{} as {role}: allowed={allowed} but got {got:?}",
                    rule.path
                );
                checked += 1;
            }
            let anonymous =
                tests::raw::call(ch.clone(), rule.path, &[], streaming(rule.path)).await;
            if rule.permission == service_kit::auth::Permission::Health {
                assert!(anonymous.is_ok(), "{}: {anonymous:?}", rule.path);
            } else {
                assert!(
                    matches!(&anonymous, Err(s) if s.code() == Code::Unauthenticated),
                    "{} without credentials: {anonymous:?}",
                    rule.path
                );
            }
        }
    }
    assert!(checked > 60 * ROLES.len(), "only {checked} calls checked");
    // A method without a row in the table never reaches a handler.
    let admin = format!("Bearer {}", s.role_tokens["admin"]);
    let unknown = tests::raw::call(
        dch.clone(),
        "/deploy.v1.DeployService/DropEverything",
        &[("authorization", admin.as_str())],
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), Code::PermissionDenied, "{unknown:?}");
    assert_eq!(error_info(&unknown).0, "UNKNOWN_METHOD");
    // Every environment-scoped row names a method whose request carries an environment.
    assert!(TABLE.iter().any(|r| r.scope == Scope::Environment));
}

/// Missing, expired, not-yet-valid, wrong-issuer, wrong-audience and badly signed tokens
/// are UNAUTHENTICATED; a Keycloak-style ES256 token with groups and a Kubernetes-style
/// RS256 service-account token are accepted with the principal and groups they carry.
#[tokio::test]
async fn bad_credentials_are_unauthenticated_and_good_tokens_carry_identity() {
    let s = Secure::new();
    let deploy = s.deploy_svc().await;
    let mut c = DeployServiceClient::new(s.channel(deploy.addr, None).await);
    let now = pki::now();
    let claims = |sub: &str, iat: u64, exp: u64| {
        json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": iat, "nbf": iat, "exp": exp,
               "groups": ["platform-viewers"]})
    };
    let list = || pb::ListEnvironmentsRequest::default();
    // Accepted: the group binds viewer.
    let good = s.jwt(&s.signer, claims("dave", now - 10, now + 600));
    c.list_environments(bearer(&good, list())).await.unwrap();
    // ... but viewer may not create.
    let refused = c
        .create_environment(bearer(
            &good,
            pb::CreateEnvironmentRequest {
                environment_id: "dev".into(),
                environment: Some(pb::Environment::default()),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let (reason, meta) = error_info(&refused);
    assert_eq!(reason, "MISSING_PERMISSION");
    assert_eq!(
        meta.get("permission").map(String::as_str),
        Some("environments.create")
    );
    // Kubernetes projected service-account token (RS256): a staging deployer.
    let sa = s.jwt(
        &s.k8s,
        json!({"iss": ISSUER, "aud": [AUDIENCE], "sub": "system:serviceaccount:ci:pipeline",
               "iat": now, "nbf": now, "exp": now + 600,
               "kubernetes.io": {"namespace": "ci", "serviceaccount": {"name": "pipeline"}}}),
    );
    c.list_deployments(bearer(&sa, pb::ListDeploymentsRequest::default()))
        .await
        .unwrap();
    let other = Signer::es256("keycloak-1").unwrap();
    let cases = [
        ("no credentials", None),
        ("expired", Some(s.jwt(&s.signer, claims("dave", now - 7200, now - 3600)))),
        ("not yet valid", Some(s.jwt(&s.signer, claims("dave", now + 3600, now + 7200)))),
        (
            "wrong issuer",
            Some(s.jwt(&s.signer, json!({"iss": "https://evil.test", "aud": AUDIENCE, "sub": "dave", "exp": now + 600}))),
        ),
        (
            "wrong audience",
            Some(s.jwt(&s.signer, json!({"iss": ISSUER, "aud": "other", "sub": "dave", "exp": now + 600}))),
        ),
        ("badly signed", Some(other.sign(&claims("dave", now, now + 600)))),
        ("unknown static token", Some(pki::random_token())),
        ("tampered", Some(format!("{good}x"))),
    ];
    for (what, token) in cases {
        let got = match token {
            Some(t) => c.list_environments(bearer(&t, list())).await,
            None => c.list_environments(list()).await,
        };
        let status = got.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(
            !status.message().contains("eyJ"),
            "{what}: the error echoes the token"
        );
    }
    // `x-principal` is never trusted with authentication on.
    let mut req = list();
    let mut req = tonic::Request::new(std::mem::take(&mut req));
    req.metadata_mut()
        .insert("x-principal", "admin".parse().unwrap());
    assert_eq!(
        c.list_environments(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

/// TLS is required on a TLS listener, client certificates are verified, and a certificate
/// rotated on disk is served to new connections without a restart.
#[tokio::test]
async fn tls_mutual_tls_and_certificate_rotation() {
    let s = Secure::new();
    let db = s.path("strict.db").to_string_lossy().into_owned();
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--database".into(),
        db,
    ];
    args.extend(s.server_args("required"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let strict = Binary::spawn("deploy-svc", &refs).await;
    // Plaintext against TLS: refused.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", strict.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let got = DeployServiceClient::new(ch)
            .list_environments(pb::ListEnvironmentsRequest::default())
            .await;
        assert!(got.is_err(), "a plaintext call succeeded: {got:?}");
    }
    // No client certificate with mutual TLS required: refused.
    let no_cert = match s.try_channel(strict.addr, None, &s.ca.pem).await {
        Err(_) => true,
        Ok(ch) => DeployServiceClient::new(ch)
            .list_environments(pb::ListEnvironmentsRequest::default())
            .await
            .is_err(),
    };
    assert!(no_cert, "a client without a certificate got through");
    // A certificate from another CA: refused.
    let rogue_ca = Ca::new(s.dir.path(), "rogue-ca").unwrap();
    let rogue = rogue_ca
        .client(s.dir.path(), "rogue", &spiffe("admin"))
        .unwrap();
    let security = ClientSecurity {
        ca: Some(s.ca.pem.clone()),
        cert: Some(rogue.cert.clone()),
        key: Some(rogue.key.clone()),
        token_file: None,
    };
    let rogue_ok = match security
        .endpoint(&format!("https://{}", strict.addr))
        .unwrap()
        .connect()
        .await
    {
        Err(_) => false,
        Ok(ch) => DeployServiceClient::new(ch)
            .list_environments(pb::ListEnvironmentsRequest::default())
            .await
            .is_ok(),
    };
    assert!(!rogue_ok, "a certificate from another CA was accepted");
    // The admin's certificate: accepted.
    let mut admin = s.deploy_client(&strict, "admin").await;
    admin
        .list_environments(pb::ListEnvironmentsRequest::default())
        .await
        .unwrap();
    // Rotation: a client trusting only a new CA fails now ...
    let new_ca = Ca::new(s.dir.path(), "new-ca").unwrap();
    let security = |ca: &Path| ClientSecurity {
        ca: Some(ca.to_path_buf()),
        cert: Some(s.certs["admin"].cert.clone()),
        key: Some(s.certs["admin"].key.clone()),
        token_file: None,
    };
    let try_new = || async {
        match security(&new_ca.pem)
            .endpoint(&format!("https://{}", strict.addr))
            .unwrap()
            .connect()
            .await
        {
            Err(_) => false,
            Ok(ch) => DeployServiceClient::new(ch)
                .list_environments(pb::ListEnvironmentsRequest::default())
                .await
                .is_ok(),
        }
    };
    assert!(!try_new().await, "the new CA is trusted before rotation");
    // ... then the server's files are replaced by a certificate of the new CA ...
    let rotated = new_ca.server(s.dir.path(), "rotated").unwrap();
    std::fs::copy(&rotated.key, &s.server.key).unwrap();
    std::fs::copy(&rotated.cert, &s.server.cert).unwrap();
    // ... and new connections get it, without a restart (the server looks at its files at
    // most every half second).
    let mut served = false;
    for _ in 0..100 {
        if try_new().await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "the rotated certificate was never served");
    assert!(strict.child.id().is_some(), "the server restarted or died");
}

/// A staging-scoped deployer cannot deploy to prod; a prod approver cannot approve a
/// staging release; an evaluator bound to prod cannot evaluate in staging.
#[tokio::test]
async fn scoped_bindings_hold_only_in_their_environments() {
    let s = Secure::new();
    let deploy = s.deploy_svc().await;
    let rel = s.release_svc(&deploy).await;
    let mut admin = s.deploy_client(&deploy, "admin").await;
    tests::environment(&mut admin, "prod", None, false).await;
    tests::environment(&mut admin, "staging-eu", None, false).await;
    tests::artifact(&mut admin, "checkout", "1.0.0").await;
    let mut ci_staging = s.deploy_client(&deploy, "ci-staging").await;
    tests::deploy(&mut ci_staging, "checkout", "1.0.0", "staging-eu", "")
        .await
        .unwrap();
    let refused = tests::deploy(&mut ci_staging, "checkout", "1.0.0", "prod", "")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let (_, meta) = error_info(&refused);
    assert_eq!(
        meta.get("permission").map(String::as_str),
        Some("deployments.create")
    );
    assert_eq!(meta.get("environment").map(String::as_str), Some("prod"));
    let prod_deployments = admin
        .list_deployments(pb::ListDeploymentsRequest {
            environment: "environments/prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(prod_deployments.deployments.is_empty());

    let mut ann = s.release_client(&rel, "ann").await;
    release::plain_feature(&mut ann, "beta", false).await;
    let staging = planned(&mut ann, &["beta"], &["staging-eu"]).await;
    ann.submit_release(rpb::SubmitReleaseRequest {
        name: staging.clone(),
    })
    .await
    .unwrap();
    let mut bob = s.release_client(&rel, "bob").await;
    let got = bob
        .approve_release(rpb::ApproveReleaseRequest {
            name: staging.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::PermissionDenied, "{got:?}");
    let mut app = s.release_client(&rel, "app").await;
    let eval = |env: &str| rpb::EvaluateRequest {
        feature: "beta".into(),
        context: Some(rpb::EvaluationContext {
            environment: env.into(),
            targeting_key: "u1".into(),
            attributes: None,
        }),
    };
    app.evaluate(eval("prod")).await.unwrap();
    assert_eq!(
        app.evaluate(eval("staging-eu")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
}

/// The attacks of the identity review, replayed with authentication on: each is refused
/// and the state is unchanged; the legitimate path still works end to end, with
/// release-svc following deploy-svc under its own narrow identity.
#[tokio::test]
async fn header_forgery_attacks_are_refused() {
    let s = Secure::new();
    let deploy = s.deploy_svc().await;
    let rel = s.release_svc(&deploy).await;
    let mut admin = s.deploy_client(&deploy, "admin").await;
    let mut radmin = s.release_client(&rel, "admin").await;
    let gated = tests::Gated::setup(&mut admin, &mut radmin, 2, 1.0, 100.0).await;
    radmin
        .submit_release(rpb::SubmitReleaseRequest {
            name: gated.release.clone(),
        })
        .await
        .ok();

    // 1. A forged placement: a deployer and an agent of another target report PLACED.
    let mut ci = s.deploy_client(&deploy, "ci").await;
    let forged = tests::report(
        &mut ci,
        &gated.deployment,
        &gated.targets[0],
        pb::PlacementState::Placed,
    )
    .await
    .unwrap_err();
    assert_eq!(forged.code(), Code::PermissionDenied, "{forged:?}");
    let mut agent1 = s.deploy_client(&deploy, "agent-p-1").await;
    let forged = tests::report(
        &mut agent1,
        &gated.deployment,
        &gated.targets[1],
        pb::PlacementState::Placed,
    )
    .await
    .unwrap_err();
    assert_eq!(forged.code(), Code::PermissionDenied, "{forged:?}");
    let d = admin
        .get_deployment(pb::GetDeploymentRequest {
            name: gated.deployment.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(d.state(), pb::DeploymentState::Succeeded);
    // The agent's attempt for a target outside its binding is in deploy-svc's audit trail,
    // under its authenticated principal (a caller without the agent role at all is refused
    // before any handler runs).
    let refused: Vec<String> = admin
        .list_audit_records(pb::ListAuditRecordsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records
        .into_iter()
        .filter(|r| r.action == "ReportPlacement" && r.after.contains("refused"))
        .map(|r| r.principal)
        .collect();
    assert_eq!(refused, vec![spiffe("agent-p-1")], "refusals audited");
    let mut app = s.release_client(&rel, "app").await;
    let r = release::evaluate(&mut app, "new-cart", "prod", "u1").await;
    assert!(!r.visible, "visible with nothing deployed: {r:?}");
    assert_eq!(r.reason(), rpb::Reason::NotDeployed, "{r:?}");
    // Each agent reports for its own target: the gate opens (release-svc follows
    // deploy-svc over mutual TLS as release-service).
    tests::report(
        &mut agent1,
        &gated.deployment,
        &gated.targets[0],
        pb::PlacementState::Placed,
    )
    .await
    .unwrap();
    let mut agent2 = s.deploy_client(&deploy, "agent-p-2").await;
    tests::report(
        &mut agent2,
        &gated.deployment,
        &gated.targets[1],
        pb::PlacementState::Placed,
    )
    .await
    .unwrap();
    let mut opened = false;
    for _ in 0..200 {
        if release::evaluate(&mut app, "new-cart", "prod", "u1")
            .await
            .visible
        {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(opened, "the gate never opened after real placements");
    // release-svc's own identity may watch placements and read environments, nothing else.
    let mut as_release_svc = s.deploy_client(&deploy, "release-svc").await;
    assert_eq!(
        tests::report(
            &mut as_release_svc,
            &gated.deployment,
            &gated.targets[0],
            pb::PlacementState::Removed
        )
        .await
        .unwrap_err()
        .code(),
        Code::PermissionDenied
    );

    // 2. Separation of duties on authenticated principals.
    let policy = |approvals: u32| rpb::SetPolicyRequest {
        policy: Some(rpb::Policy {
            environment: "prod".into(),
            required_approvals: approvals,
            approvers: vec![spiffe("bob"), spiffe("ann")],
            ..Default::default()
        }),
    };
    let mut pol = s.release_client(&rel, "policy").await;
    pol.set_policy(policy(1)).await.unwrap();
    let mut ann = s.release_client(&rel, "ann").await;
    release::plain_feature(&mut ann, "sod", false).await;
    let r = planned(&mut ann, &["sod"], &["prod"]).await;
    ann.submit_release(rpb::SubmitReleaseRequest { name: r.clone() })
        .await
        .unwrap();
    for forged in ["", "ann", "ben", &spiffe("bob")] {
        let mut req = tonic::Request::new(rpb::ApproveReleaseRequest { name: r.clone() });
        if !forged.is_empty() {
            req.metadata_mut()
                .insert("x-principal", forged.parse().unwrap());
        }
        let got = ann.approve_release(req).await.unwrap_err();
        assert!(
            matches!(
                got.code(),
                Code::FailedPrecondition | Code::PermissionDenied
            ),
            "approval as {forged:?}: {got:?}"
        );
    }
    let state = ann
        .get_release(rpb::GetReleaseRequest { name: r.clone() })
        .await
        .unwrap()
        .into_inner()
        .state();
    assert_ne!(state, rpb::ReleaseState::Approved);
    // The real approver can.
    let mut bob = s.release_client(&rel, "bob").await;
    bob.approve_release(rpb::ApproveReleaseRequest { name: r.clone() })
        .await
        .unwrap();

    // 3. A typed emergency approver and freeze removal.
    let frozen = pb::FreezeWindow {
        name: "change-freeze".into(),
        schedule: Some(pb::freeze_window::Schedule::Absolute(pb::AbsoluteWindow {
            start_time: Some(prost_types::Timestamp {
                seconds: pki::now() as i64 - 60,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: pki::now() as i64 + 86_400,
                nanos: 0,
            }),
        })),
    };
    admin
        .update_environment(pb::UpdateEnvironmentRequest {
            environment: Some(pb::Environment {
                name: "environments/prod".into(),
                freeze_windows: vec![frozen],
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["freeze_windows".into()],
            }),
        })
        .await
        .unwrap();
    tests::artifact(&mut admin, "checkout", "2.1.0").await;
    let emergency = |approver: &str| pb::CreateDeploymentRequest {
        deployment: Some(pb::Deployment {
            artifact_version: "artifacts/checkout/versions/2.1.0".into(),
            environment: "environments/prod".into(),
            emergency: Some(pb::EmergencyOverride {
                reason: "incident".into(),
                approver: approver.into(),
            }),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    let got = ci.create_deployment(emergency("cto")).await.unwrap_err();
    assert_eq!(got.code(), Code::FailedPrecondition, "{got:?}");
    assert!(got.message().contains("EMERGENCY_NOT_GRANTED"), "{got:?}");
    // Naming a real approver who granted nothing is refused the same way.
    let got = ci
        .create_deployment(emergency(&spiffe("bob")))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::FailedPrecondition, "{got:?}");
    // The requester cannot grant itself (no freeze.override), nor can an approver grant
    // itself.
    let grant = |requester: &str| pb::GrantEmergencyOverrideRequest {
        environment: "environments/prod".into(),
        requester: requester.into(),
        reason: "incident 42".into(),
    };
    let got = ci
        .grant_emergency_override(grant(&spiffe("ci")))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::PermissionDenied, "{got:?}");
    let mut bob_d = s.deploy_client(&deploy, "bob").await;
    let got = bob_d
        .grant_emergency_override(grant(&spiffe("bob")))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::InvalidArgument, "{got:?}");
    let listed = admin
        .list_deployments(pb::ListDeploymentsRequest {
            environment: "environments/prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deployments;
    assert_eq!(
        listed.len(),
        1,
        "a refused emergency deployment was created"
    );
    // The two-person path: the approver grants in its own call, then the requester deploys.
    let granted = bob_d
        .grant_emergency_override(grant(&spiffe("ci")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(granted.approver, spiffe("bob"));
    let d = ci
        .create_deployment(emergency(&spiffe("bob")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.emergency.map(|e| e.approver), Some(spiffe("bob")));
    let mut carol = s.deploy_client(&deploy, "carol").await;
    let cleared = carol
        .update_environment(pb::UpdateEnvironmentRequest {
            environment: Some(pb::Environment {
                name: "environments/prod".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["freeze_windows".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(cleared.code(), Code::PermissionDenied, "{cleared:?}");
    let (_, meta) = error_info(&cleared);
    assert_eq!(
        meta.get("permission").map(String::as_str),
        Some("freeze.override")
    );
    let env = admin
        .get_environment(pb::GetEnvironmentRequest {
            name: "environments/prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(env.freeze_windows.len(), 1, "the freeze was removed");

    // 4. An anonymous SetPolicy.
    let mut anonymous = ReleaseServiceClient::new(s.channel(rel.addr, None).await);
    let got = anonymous.set_policy(policy(0)).await.unwrap_err();
    assert_eq!(got.code(), Code::Unauthenticated);
    let p = pol
        .get_policy(rpb::GetPolicyRequest {
            environment: "prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.required_approvals, 1);

    // The audit trail names authenticated principals only.
    let records = radmin
        .list_audit_records(rpb::ListAuditRecordsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(!records.is_empty());
    assert!(
        records
            .iter()
            .all(|r| r.principal.starts_with("spiffe://") || r.principal == "system"),
        "{records:?}"
    );
}

/// Safe defaults: a non-loopback address without authentication refuses to start (unless
/// --insecure-no-auth); secrets in source URIs and database URLs never reach responses or
/// logs.
#[tokio::test]
async fn safe_defaults_and_redaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db").to_string_lossy().into_owned();
    let out = std::process::Command::new(tests::bin_dir().join("deploy-svc"))
        .args(["--listen", "0.0.0.0:0", "--database", &db])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "deploy-svc served 0.0.0.0 without authentication"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
    let insecure = Binary::spawn(
        "deploy-svc",
        &[
            "--listen",
            "0.0.0.0:0",
            "--database",
            &db,
            "--insecure-no-auth",
        ],
    )
    .await;
    let mut c = tests::connect(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        insecure.addr.port(),
    )))
    .await;
    let a = c
        .register_artifact(pb::RegisterArtifactRequest {
            artifact: "app".into(),
            version: "1.0.0".into(),
            digest: tests::digest("app"),
            source_uri:
                "https://ci:hunter2@artifacts.example.test/app.tgz?X-Amz-Signature=deadbeef&v=1"
                    .into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let listed = c
        .list_artifacts(pb::ListArtifactsRequest::default())
        .await
        .unwrap()
        .into_inner();
    for uri in std::iter::once(&a.source_uri).chain(listed.artifacts.iter().map(|a| &a.source_uri))
    {
        assert!(
            !uri.contains("hunter2") && !uri.contains("deadbeef"),
            "{uri}"
        );
        assert!(uri.contains("artifacts.example.test/app.tgz"), "{uri}");
    }
    // A database password never reaches the log.
    if let Some(url) = tests::report::postgres_or_skip("a PostgreSQL password kept out of the log")
    {
        let (_admin, fresh, _) = tests::fresh_database(&url, "release_redact").await;
        // The server's own password if the URL has one (a stock Debian set-up), else one
        // that trust authentication ignores.
        let (with_password, password) = match fresh.split_once("://postgres:") {
            Some((_, rest)) => (
                fresh.clone(),
                rest.split_once('@')
                    .map(|(p, _)| p.to_owned())
                    .unwrap_or_default(),
            ),
            None => (
                fresh.replacen("://postgres@", "://postgres:hunter2@", 1),
                "hunter2".to_owned(),
            ),
        };
        assert!(
            with_password.contains(&format!(":{password}@")),
            "URL shape: {url}"
        );
        let mut child = tokio::process::Command::new(tests::bin_dir().join("release-svc"))
            .args(["--listen", "127.0.0.1:0", "--database", &with_password])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        use tokio::io::AsyncBufReadExt as _;
        tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        assert!(line.contains("listening"), "{line}");
        // The log up to the line that names the database (read as it comes, not after a
        // pause), then the rest once the process is gone.
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
        let mut log = String::new();
        tokio::time::timeout(Duration::from_secs(30), async {
            while !log.contains("release-svc serving") {
                let mut l = String::new();
                if stderr.read_line(&mut l).await.unwrap() == 0 {
                    break;
                }
                log.push_str(&l);
            }
        })
        .await
        .expect("no \"release-svc serving\" line within 30 s");
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        use tokio::io::AsyncReadExt as _;
        stderr.read_to_string(&mut log).await.unwrap();
        assert!(log.contains("release-svc serving"), "{log}");
        assert!(
            !log.contains("hunter2"),
            "the password is in the log: {log}"
        );
    }
}

/// PostgreSQL connections follow the URL's `sslmode`: `require` encrypts every connection
/// of both services (the server's own view, pg_stat_ssl, says so), and `verify-full`
/// against a CA that did not sign the server's certificate refuses to connect.
#[tokio::test]
async fn postgres_connections_use_tls_as_sslmode_asks() {
    let Some(url) = tests::report::postgres_or_skip("PostgreSQL TLS") else {
        return;
    };
    let s = Secure::new();
    for (service, tag) in [("deploy-svc", "deploy_tls"), ("release-svc", "release_tls")] {
        let (admin, fresh, db) = tests::fresh_database(&url, tag).await;
        let required = format!("{fresh}?sslmode=require");
        let b = Binary::spawn(
            service,
            &["--listen", "127.0.0.1:0", "--database", &required],
        )
        .await;
        // A read, so every lazily opened connection is open.
        if service == "deploy-svc" {
            tests::connect(b.addr)
                .await
                .list_environments(pb::ListEnvironmentsRequest::default())
                .await
                .unwrap();
        } else {
            release::connect(b.addr)
                .await
                .list_features(rpb::ListFeaturesRequest::default())
                .await
                .unwrap();
        }
        let rows = admin
            .query(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1",
                &[&db],
            )
            .await
            .unwrap();
        let encrypted: Vec<bool> = rows.iter().map(|r| r.get(0)).collect();
        assert!(!encrypted.is_empty(), "{service}: no connection to {db}");
        assert!(
            encrypted.iter().all(|e| *e),
            "{service}: a plaintext connection: {encrypted:?}"
        );
        drop(b);
        let strict = format!(
            "{fresh}?sslmode=verify-full&sslrootcert={}",
            s.ca.pem.display()
        );
        let out = tokio::process::Command::new(tests::bin_dir().join(service))
            .args(["--listen", "127.0.0.1:0", "--database", &strict])
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("the service neither connected nor gave up")
            .unwrap();
        assert!(
            !out.status.success(),
            "{service} connected with verify-full to a server whose certificate the CA did not sign"
        );
    }
}

/// Real deploy agents over mutual TLS: an agent whose certificate is bound to its target
/// registers and places; an agent presenting a certificate bound to another target can
/// neither register nor act for the target it claims.
#[tokio::test]
async fn agents_authenticate_and_act_only_for_their_target() {
    use tests::fleet;
    let s = Secure::new();
    let deploy = s.deploy_svc().await;
    let mut admin = s.deploy_client(&deploy, "admin").await;
    tests::environment(&mut admin, "prod", None, false).await;
    let artifacts = s.path("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let (tgz, digest) = fleet::tarball(&artifacts, "web", &[("app.txt", "v1")]);
    fleet::register(&mut admin, "web", "1.0.0", &tgz, &digest).await;
    let agent = |target: &str, cert: &str| {
        let c = &s.certs[cert];
        let mut cmd = tokio::process::Command::new(tests::bin_dir().join("deploy-agent"));
        cmd.args(["--server", &format!("https://{}", deploy.addr)])
            .args(["--environment", "prod", "--target", target])
            .arg("--root")
            .arg(s.path(&format!("root-{target}")))
            .arg("--ca")
            .arg(&s.ca.pem)
            .arg("--cert")
            .arg(&c.cert)
            .arg("--key")
            .arg(&c.key)
            .arg("--allow-file-dir")
            .arg(&artifacts)
            .args(["--heartbeat-ms", "200"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd.spawn().unwrap()
    };
    let _honest = agent("p-1", "agent-p-1");
    // An impostor: agent-p-1's certificate claiming target p-2.
    let _impostor = agent("p-2", "agent-p-1");
    let mut registered = Vec::new();
    for _ in 0..200 {
        registered = admin
            .list_targets(pb::ListTargetsRequest {
                parent: "environments/prod".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .targets;
        if !registered.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let d = fleet::deploy(&mut admin, "web", "1.0.0", "prod", None).await;
    let done = fleet::until(
        &mut admin,
        &d.name,
        "the bound agent places",
        fleet::is(pb::DeploymentState::Succeeded),
    )
    .await;
    assert_eq!(done.placements.len(), 1, "{done:?}");
    let names: Vec<String> = admin
        .list_targets(pb::ListTargetsRequest {
            parent: "environments/prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .targets
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(
        names,
        vec!["environments/prod/targets/p-1".to_owned()],
        "{registered:?}"
    );
    let placed = std::fs::read_to_string(s.path("root-p-1").join("current/app.txt")).unwrap();
    assert_eq!(placed, "v1");
}

/// A key taken out of the JWKS file stops a token already verified (and cached) at once.
#[tokio::test]
async fn a_key_removed_from_the_jwks_revokes_cached_tokens() {
    let s = Secure::new();
    let deploy = s.deploy_svc().await;
    let mut c = DeployServiceClient::new(s.channel(deploy.addr, None).await);
    let now = pki::now();
    let token = s.jwt(
        &s.signer,
        json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "dave", "exp": now + 1_000_000_000,
               "groups": ["platform-viewers"]}),
    );
    let list = || bearer(&token, pb::ListEnvironmentsRequest::default());
    c.list_environments(list()).await.unwrap();
    pki::jwks(&s.path("jwks.json"), &[&s.k8s]).unwrap();
    let mut revoked = false;
    for _ in 0..100 {
        if let Err(status) = c.list_environments(list()).await {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            revoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(revoked, "a token of a removed key still works");
}
