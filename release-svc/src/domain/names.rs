//! Resource names of release.v1, and the deploy.v1 names the placement consumer reads.

/// Checks a feature key: 1-128 of letters, digits and `._-` (flagd flag keys carry over).
pub fn validate_feature_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 128 {
        return Err("must be 1-128 characters".into());
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{key:?} may only contain letters, digits and '._-'"
        ));
    }
    Ok(())
}

/// Checks a deploy-svc environment id (an RFC 1123 label).
pub fn validate_environment(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && !id.ends_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then_some(())
        .ok_or_else(|| format!("{id:?} is not a deploy-svc environment id (for example \"prod\")"))
}

/// Parses `features/{key}`.
pub fn parse_feature(name: &str) -> Result<String, String> {
    let key = name
        .strip_prefix("features/")
        .ok_or_else(|| format!("{name:?} must look like 'features/{{key}}'"))?;
    validate_feature_key(key)?;
    Ok(key.to_owned())
}

/// Parses `releases/{id}`.
pub fn parse_release(name: &str) -> Result<i64, String> {
    name.strip_prefix("releases/")
        .and_then(|id| id.parse::<i64>().ok())
        .filter(|id| *id > 0)
        .ok_or_else(|| format!("{name:?} must look like 'releases/{{number}}'"))
}

/// Parses deploy.v1's `deployments/{id}`.
pub fn parse_deployment(name: &str) -> Result<i64, String> {
    match name.split('/').collect::<Vec<_>>().as_slice() {
        ["deployments", id] => id
            .parse()
            .map_err(|_| format!("bad deployment name {name:?}")),
        _ => Err(format!("bad deployment name {name:?}")),
    }
}

/// Parses deploy.v1's `environments/{environment}/targets/{target}`.
pub fn parse_target(name: &str) -> Result<(String, String), String> {
    match name.split('/').collect::<Vec<_>>().as_slice() {
        ["environments", env, "targets", target] => Ok(((*env).to_owned(), (*target).to_owned())),
        _ => Err(format!("bad target name {name:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            parse_feature("features/new-checkout").as_deref(),
            Ok("new-checkout")
        );
        assert!(parse_feature("new-checkout").is_err());
        assert!(validate_feature_key("has space").is_err());
        assert_eq!(parse_release("releases/3"), Ok(3));
        assert!(parse_release("releases/x").is_err());
        assert_eq!(parse_deployment("deployments/12"), Ok(12));
        assert_eq!(
            parse_target("environments/prod/targets/web-1"),
            Ok(("prod".into(), "web-1".into()))
        );
        assert!(validate_environment("prod").is_ok());
        assert!(validate_environment("environments/prod").is_err());
    }
}
