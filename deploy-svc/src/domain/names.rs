//! Resource ids and names (AIP-122), parsed and validated. Each function returns the
//! reason as a `String`, to be attached to the request field by the caller.

use std::collections::BTreeMap;

/// Most labels or metadata entries on one resource.
pub const MAX_MAP_ENTRIES: usize = 64;
/// Longest free-text field (descriptions, messages, reasons).
pub const MAX_TEXT: usize = 1024;
/// Longest request id or change reference.
pub const MAX_KEY: usize = 128;
/// Default page size of every List.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size of every List.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Checks an RFC 1123 label: 1-63 of `a-z`, `0-9`, `-`, starting with a letter and not
/// ending with `-`.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > 63 {
        return Err(format!("must be at most 63 characters, got {}", id.len()));
    }
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let starts = id.as_bytes()[0].is_ascii_lowercase();
    if !ok_chars || !starts || id.ends_with('-') {
        return Err(format!(
            "{id:?} is not a valid id: use lowercase letters, digits and '-', start with a letter, not end with '-'"
        ));
    }
    Ok(())
}

/// Checks an artifact version: 1-128 of letters, digits and `.-+_`.
pub fn validate_version(version: &str) -> Result<(), String> {
    if version.is_empty() {
        return Err("must not be empty".into());
    }
    if version.len() > MAX_KEY {
        return Err(format!("must be at most {MAX_KEY} characters"));
    }
    if !version
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'_'))
    {
        return Err(format!(
            "{version:?} is not a valid version: use letters, digits and '.-+_'"
        ));
    }
    Ok(())
}

/// Checks a digest: `sha256:` followed by 64 lowercase hex digits.
pub fn validate_digest(digest: &str) -> Result<(), String> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        return Err("must start with 'sha256:'".into());
    };
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("must be 'sha256:' followed by 64 lowercase hex digits".into());
    }
    Ok(())
}

/// Checks a free-text field against a length limit.
pub fn validate_text(text: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!("must be at most {max} bytes, got {}", text.len()));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// Checks an optional idempotency key or reference (empty allowed).
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_KEY {
        return Err(format!("must be at most {MAX_KEY} characters"));
    }
    if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain whitespace or control characters".into());
    }
    Ok(())
}

/// Checks labels or metadata: entry count, key shape, value length.
pub fn validate_map(map: &BTreeMap<String, String>, max_value: usize) -> Result<(), String> {
    if map.len() > MAX_MAP_ENTRIES {
        return Err(format!("must have at most {MAX_MAP_ENTRIES} entries"));
    }
    for (k, v) in map {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'));
        if !key_ok {
            return Err(format!(
                "key {k:?} must be 1-63 characters of letters, digits and '.-_/'"
            ));
        }
        if v.len() > max_value {
            return Err(format!("value of {k:?} must be at most {max_value} bytes"));
        }
    }
    Ok(())
}

/// Parses `environments/{environment}` into the environment id.
pub fn parse_environment(name: &str) -> Result<String, String> {
    let id = name
        .strip_prefix("environments/")
        .ok_or_else(|| format!("{name:?} must look like 'environments/{{environment}}'"))?;
    validate_id(id)?;
    Ok(id.to_owned())
}

/// Parses `environments/{environment}/targets/{target}` into (environment, target).
pub fn parse_target(name: &str) -> Result<(String, String), String> {
    let bad =
        || format!("{name:?} must look like 'environments/{{environment}}/targets/{{target}}'");
    let rest = name.strip_prefix("environments/").ok_or_else(bad)?;
    let (env, target) = rest.split_once("/targets/").ok_or_else(bad)?;
    validate_id(env)?;
    validate_id(target)?;
    Ok((env.to_owned(), target.to_owned()))
}

/// Parses `artifacts/{artifact}/versions/{version}` into (artifact, version).
pub fn parse_artifact_version(name: &str) -> Result<(String, String), String> {
    let bad = || format!("{name:?} must look like 'artifacts/{{artifact}}/versions/{{version}}'");
    let rest = name.strip_prefix("artifacts/").ok_or_else(bad)?;
    let (artifact, version) = rest.split_once("/versions/").ok_or_else(bad)?;
    validate_id(artifact)?;
    validate_version(version)?;
    Ok((artifact.to_owned(), version.to_owned()))
}

/// Parses `deployments/{deployment}` into the numeric deployment id.
pub fn parse_deployment(name: &str) -> Result<i64, String> {
    name.strip_prefix("deployments/")
        .and_then(|id| id.parse::<i64>().ok())
        .filter(|id| *id > 0)
        .ok_or_else(|| format!("{name:?} must look like 'deployments/{{number}}'"))
}

/// Resource name of an environment.
pub fn environment_name(id: &str) -> String {
    format!("environments/{id}")
}

/// Resource name of a target.
pub fn target_name(env: &str, id: &str) -> String {
    format!("environments/{env}/targets/{id}")
}

/// Resource name of an artifact version.
pub fn artifact_version_name(artifact: &str, version: &str) -> String {
    format!("artifacts/{artifact}/versions/{version}")
}

/// Resource name of a deployment.
pub fn deployment_name(id: i64) -> String {
    format!("deployments/{id}")
}

/// Validates a page size: 0 means the default, negatives are refused, large ones capped.
pub fn page_size(size: i32) -> Result<usize, String> {
    match size {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(format!("must not be negative, got {n}")),
        n => Ok(usize::try_from(n)
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE)),
    }
}

/// Encodes a keyset position as an opaque page token.
pub fn encode_page_token(key: &str) -> String {
    hex::encode(key.as_bytes())
}

/// Decodes a page token made by [`encode_page_token`]; empty means the first page.
pub fn decode_page_token(token: &str) -> Result<Option<String>, String> {
    if token.is_empty() {
        return Ok(None);
    }
    hex::decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(Some)
        .ok_or_else(|| "is not a page token returned by this service".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("prod").is_ok());
        assert!(validate_id("eu-west-1").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("Prod").is_err());
        assert!(validate_id("1prod").is_err());
        assert!(validate_id("prod-").is_err());
        assert!(validate_id(&"a".repeat(64)).is_err());
    }

    #[test]
    fn digests() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(validate_digest(&good).is_ok());
        assert!(validate_digest(&"a".repeat(64)).is_err());
        assert!(validate_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(validate_digest(&format!("sha256:{}", "a".repeat(63))).is_err());
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(
            parse_environment("environments/prod").as_deref(),
            Ok("prod")
        );
        assert!(parse_environment("prod").is_err());
        assert_eq!(
            parse_target("environments/prod/targets/web-1"),
            Ok(("prod".into(), "web-1".into()))
        );
        assert_eq!(
            parse_artifact_version("artifacts/web/versions/1.2.3+b4"),
            Ok(("web".into(), "1.2.3+b4".into()))
        );
        assert_eq!(parse_deployment("deployments/42"), Ok(42));
        assert!(parse_deployment("deployments/0").is_err());
        assert!(parse_deployment("deployments/x").is_err());
        let token = encode_page_token("prod");
        assert_eq!(decode_page_token(&token), Ok(Some("prod".into())));
        assert!(decode_page_token("zz").is_err());
    }
}
