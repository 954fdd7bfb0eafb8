//! Secrets out of text before it is logged, put in an error or returned: passwords in
//! URLs (`postgres://user:pw@host`, `https://ci:token@host`) and query parameters that
//! carry signatures or tokens (`X-Amz-Signature`, `sig`, `token`, ...).

/// Query parameters whose values are secrets (compared without case).
const SECRET_PARAMS: &[&str] = &[
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "sig",
    "signature",
    "token",
    "access_token",
    "password",
    "sslpassword",
    "secret",
    "key",
    "api_key",
    "apikey",
    "code",
];

/// The value that replaces a secret.
pub const REDACTED: &str = "REDACTED";

/// `url` with the password of its user info and the values of secret query parameters
/// replaced by `REDACTED`. Text that is not a URL comes back unchanged.
pub fn url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{REDACTED}{host}"),
                None => format!("{REDACTED}{host}"),
            }
        }
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        None => tail.to_owned(),
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()) => {
                        format!("{k}={REDACTED}")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            let mut out = format!("{path}?{}", query.join("&"));
            if let Some(f) = fragment {
                out.push('#');
                out.push_str(f);
            }
            out
        }
    };
    format!("{scheme}{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_signatures_are_redacted() {
        assert_eq!(
            url("https://ci:hunter2@example.com/a.tgz?X-Amz-Signature=abc&v=1"),
            "https://ci:REDACTED@example.com/a.tgz?X-Amz-Signature=REDACTED&v=1"
        );
        assert_eq!(
            url("postgres://app:s3cret@db:5432/x?sslmode=require&password=p"),
            "postgres://app:REDACTED@db:5432/x?sslmode=require&password=REDACTED"
        );
        assert_eq!(url("https://tok@host/p"), "https://REDACTED@host/p");
        assert_eq!(url("file:///srv/a.tgz"), "file:///srv/a.tgz");
        assert_eq!(url("data/release.db"), "data/release.db");
        assert!(!url("https://u:hunter2@h/p?sig=zzz#frag").contains("hunter2"));
    }
}
