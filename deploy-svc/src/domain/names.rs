//! Resource ids and names (AIP-122), parsed and validated. Each function returns the
//! reason as a `String`, to be attached to the request field by the caller.

pub use service_kit::validate::*;

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
    }
}
