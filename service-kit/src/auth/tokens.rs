//! Static bearer tokens for small set-ups: a JSON file of SHA-256 hashes (never the
//! tokens themselves) with the principal and groups each one authenticates:
//!
//! ```json
//! {"tokens": [{"sha256": "<64 hex digits>", "principal": "ci", "groups": ["deployers"]}]}
//! ```
//!
//! Tokens should be long random strings (`openssl rand -hex 32`); `sha256sum` of the token
//! (without a newline) gives the hash.

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::Identity;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    sha256: String,
    principal: String,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<Entry>,
}

/// The token table, by hash.
#[derive(Debug)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], Identity>,
}

impl Tokens {
    /// Parses a token file.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        let file: File = serde_json::from_slice(bytes)?;
        let mut by_hash = HashMap::new();
        for (i, e) in file.tokens.into_iter().enumerate() {
            let hash: [u8; 32] = hex::decode(e.sha256.trim())
                .ok()
                .and_then(|h| h.try_into().ok())
                .ok_or_else(|| anyhow::anyhow!("token {i}: sha256 is not 64 hex digits"))?;
            anyhow::ensure!(!e.principal.is_empty(), "token {i}: empty principal");
            by_hash.insert(
                hash,
                Identity {
                    principal: e.principal,
                    groups: e.groups,
                    method: "token",
                },
            );
        }
        Ok(Self { by_hash })
    }

    /// The identity of `token`, if it is one of the file's.
    pub fn identify(&self, token: &str) -> Option<Identity> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_hash.get(&hash).cloned()
    }
}

/// The hash to write in a token file for `token`.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}
