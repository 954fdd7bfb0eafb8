//! A development PKI made at run time: a CA, server and client certificates (client
//! identities as SPIFFE URI SANs), JWT signing keys with their JWKS, signed tokens, static
//! token files and policy files. Used by the security tests and by `dev-pki` (the secure
//! quick start). Nothing here is fit for production keys.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

/// A certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate's PEM file.
    pub pem: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

impl Ca {
    /// A new CA named `name`, written to `dir/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem())?;
        Ok(Self { cert, key, pem })
    }

    fn issue(
        &self,
        params: CertificateParams,
        cert_path: PathBuf,
        key_path: PathBuf,
    ) -> anyhow::Result<Issued> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(Issued {
            cert: cert_path,
            key: key_path,
        })
    }

    /// A server certificate for `localhost` and 127.0.0.1, written as `dir/<name>.{crt,key}`.
    pub fn server(&self, dir: &Path, name: &str) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(
            params,
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        )
    }

    /// A client certificate whose URI SAN is `spiffe_id`, as `dir/<file>.{crt,key}`.
    pub fn client(&self, dir: &Path, file: &str, spiffe_id: &str) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .subject_alt_names
            .push(SanType::URI(spiffe_id.try_into()?));
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(
            params,
            dir.join(format!("{file}.crt")),
            dir.join(format!("{file}.key")),
        )
    }
}

/// A JWT signer (ES256, as Keycloak and Dex can issue; or RS256, as Kubernetes issues
/// service-account tokens) and its public JWK.
pub struct Signer {
    key: jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
    kid: String,
    /// The public key as a JWK.
    pub jwk: serde_json::Value,
}

impl Signer {
    /// A new P-256 key.
    pub fn es256(kid: &str) -> anyhow::Result<Self> {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let raw = pair.public_key_raw();
        anyhow::ensure!(raw.len() == 65 && raw[0] == 4, "unexpected EC point");
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        });
        Ok(Self {
            key: jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der()),
            alg: jsonwebtoken::Algorithm::ES256,
            kid: kid.to_owned(),
            jwk,
        })
    }

    /// A new 2048-bit RSA key (made by the `openssl` command).
    pub fn rs256(kid: &str, dir: &Path) -> anyhow::Result<Self> {
        let pem = dir.join(format!("{kid}.rsa.pem"));
        let ok = std::process::Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&pem)
            .arg("2048")
            .stderr(std::process::Stdio::null())
            .status()?
            .success();
        anyhow::ensure!(ok, "openssl genrsa failed");
        let out = std::process::Command::new("openssl")
            .args(["rsa", "-noout", "-modulus", "-in"])
            .arg(&pem)
            .output()?;
        let text = String::from_utf8(out.stdout)?;
        let modulus = hex::decode(text.trim().trim_start_matches("Modulus="))?;
        let jwk = serde_json::json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(modulus),
            "e": "AQAB",
        });
        Ok(Self {
            key: jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(&pem)?)?,
            alg: jsonwebtoken::Algorithm::RS256,
            kid: kid.to_owned(),
            jwk,
        })
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).expect("sign")
    }
}

/// Writes a JWKS file with the keys of `signers`.
pub fn jwks(path: &Path, signers: &[&Signer]) -> anyhow::Result<()> {
    let keys: Vec<_> = signers.iter().map(|s| s.jwk.clone()).collect();
    std::fs::write(
        path,
        serde_json::to_vec(&serde_json::json!({ "keys": keys }))?,
    )?;
    Ok(())
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random token (hex of 32 random bytes, from the kernel).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom");
    hex::encode(bytes)
}

/// Writes a static token file: `(token, principal, groups)` each.
pub fn token_file(path: &Path, tokens: &[(&str, &str, &[&str])]) -> anyhow::Result<()> {
    let entries: Vec<_> = tokens
        .iter()
        .map(|(token, principal, groups)| {
            serde_json::json!({
                "sha256": service_kit::auth::tokens::hash(token),
                "principal": principal,
                "groups": groups,
            })
        })
        .collect();
    std::fs::write(
        path,
        serde_json::to_vec(&serde_json::json!({ "tokens": entries }))?,
    )?;
    Ok(())
}

/// Writes a policy file from bindings given as JSON values.
pub fn policy_file(path: &Path, bindings: &[serde_json::Value]) -> anyhow::Result<()> {
    std::fs::write(
        path,
        serde_json::to_vec_pretty(&serde_json::json!({ "bindings": bindings }))?,
    )?;
    Ok(())
}

/// A static token for the principal `checkout`, bound to the role `evaluator` in `prod`
/// only: (token, token file, policy file), written in `dir`.
pub fn evaluator_in_prod(dir: &Path) -> anyhow::Result<(String, PathBuf, PathBuf)> {
    let token = random_token();
    let (tokens, policy) = (dir.join("tokens.json"), dir.join("policy.json"));
    token_file(&tokens, &[(&token, "checkout", &[])])?;
    policy_file(
        &policy,
        &[
            serde_json::json!({"role": "evaluator", "principals": ["checkout"], "environments": ["prod"]}),
        ],
    )?;
    Ok((token, tokens, policy))
}
