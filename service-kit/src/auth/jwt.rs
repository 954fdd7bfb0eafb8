//! Bearer JWTs (OIDC, Kubernetes projected service-account tokens, Keycloak, Dex): the
//! signature is checked offline against the keys of a JWKS file (reloaded when it
//! changes), then the issuer, audience, expiry and not-before; the principal comes from a
//! configurable claim (`sub` by default) and the groups from another (`groups`).
//! Only asymmetric algorithms are accepted (RS*, PS*, ES*, EdDSA).

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::Identity;

/// What a token must say.
#[derive(Debug, Clone)]
pub struct JwtRules {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of).
    pub audience: String,
    /// The claim naming the principal.
    pub principal_claim: String,
    /// The claim listing the groups (an array of strings, or one string).
    pub groups_claim: String,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway: u64,
}

/// The keys of a JWKS document.
pub struct Keys {
    keys: Vec<(Option<String>, Algorithm, DecodingKey)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("count", &self.keys.len())
            .finish()
    }
}

fn asymmetric(alg: Algorithm) -> bool {
    !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl Keys {
    /// Parses a JWKS document (`{"keys": [...]}`); symmetric keys are refused.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        let set: JwkSet = serde_json::from_slice(bytes)?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let key = DecodingKey::from_jwk(jwk)?;
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    jsonwebtoken::jwk::EllipticCurve::P256 => Algorithm::ES256,
                    jsonwebtoken::jwk::EllipticCurve::P384 => Algorithm::ES384,
                    _ => anyhow::bail!("unsupported elliptic curve"),
                },
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => jwk
                    .common
                    .key_algorithm
                    .and_then(|a| a.to_string().parse().ok())
                    .unwrap_or(Algorithm::RS256),
                jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => {
                    anyhow::bail!("symmetric keys are not accepted")
                }
            };
            keys.push((jwk.common.key_id.clone(), alg, key));
        }
        anyhow::ensure!(!keys.is_empty(), "no key in the JWKS");
        Ok(Self { keys })
    }

    /// Verifies `token`; the error says why in words safe to return (no token content).
    /// On success: the identity and the expiry (seconds since the epoch).
    pub fn verify(&self, token: &str, rules: &JwtRules) -> Result<(Identity, u64), &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token")?;
        if !asymmetric(header.alg) {
            return Err("token algorithm not accepted");
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&rules.issuer]);
        validation.set_audience(&[&rules.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = rules.leeway;
        let mut last = "no key in the JWKS matches the token";
        for (kid, _, key) in &self.keys {
            if let (Some(want), Some(have)) = (&header.kid, kid) {
                if want != have {
                    continue;
                }
            }
            match jsonwebtoken::decode::<serde_json::Value>(token, key, &validation) {
                Ok(data) => return identity(&data.claims, rules),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::ExpiredSignature => "token expired",
                        K::ImmatureSignature => "token not yet valid",
                        K::InvalidIssuer => "wrong token issuer",
                        K::InvalidAudience => "wrong token audience",
                        K::InvalidSignature | K::InvalidAlgorithm => "bad token signature",
                        K::MissingRequiredClaim(_) => "token misses a required claim",
                        _ => "invalid token",
                    };
                    if !matches!(e.kind(), K::InvalidSignature | K::InvalidAlgorithm) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn identity(claims: &serde_json::Value, rules: &JwtRules) -> Result<(Identity, u64), &'static str> {
    let principal = claims
        .get(&rules.principal_claim)
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .ok_or("token has no principal claim")?;
    let groups = match claims.get(&rules.groups_claim) {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    };
    let exp = claims
        .get("exp")
        .and_then(|v| v.as_u64())
        .ok_or("token has no expiry")?;
    Ok((
        Identity {
            principal: principal.to_owned(),
            groups,
            method: "jwt",
        },
        exp,
    ))
}
