//! Secrets out of text before it is logged, put in an error or returned: passwords in
//! URLs (`postgres://user:pw@host`, `https://ci:token@host`) and every query value and
//! fragment (signed URLs carry their secrets there under names no list can foresee:
//! `X-Amz-Signature`, `sig`, `client_secret`, percent-encoded names, ...). Parameter names
//! stay, so a reader still sees what the URL carried.

/// Query parameters kept in clear: they configure a connection and hold no secret.
const CLEAR_PARAMS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "application_name",
    "connect_timeout",
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
    let (rest, fragment) = match tail.split_once('#') {
        Some((r, _)) => (r, Some(REDACTED)),
        None => (tail, None),
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    // Path parameters (`/a.tgz;sig=...`) are as secret as query values.
    let mut out = match path.split_once(';') {
        Some((p, _)) => format!("{p};{REDACTED}"),
        None => path.to_owned(),
    };
    if let Some(query) = query {
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if CLEAR_PARAMS.contains(&k) && !v.contains('?') => {
                    format!("{k}={v}")
                }
                Some((k, _)) => format!("{k}={REDACTED}"),
                None if pair.is_empty() => String::new(),
                None => REDACTED.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&query.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    let tail = out;
    format!("{scheme}{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_signatures_are_redacted() {
        assert_eq!(
            url("https://ci:hunter2@example.com/a.tgz?X-Amz-Signature=abc&v=1"),
            "https://ci:REDACTED@example.com/a.tgz?X-Amz-Signature=REDACTED&v=REDACTED"
        );
        assert_eq!(
            url("postgres://app:s3cret@db:5432/x?sslmode=require&password=p"),
            "postgres://app:REDACTED@db:5432/x?sslmode=require&password=REDACTED"
        );
        for sneaky in [
            "https://h/p?client_secret=zz1",
            "https://h/p?X%2DAmz%2DSignature=zz1",
            "https://h/p?a=1?sig=zz1",
            "https://h/p;sig=zz1?x=zz1",
            "https://h/p#access_token=zz1",
            "https://h/p?sig[]=zz1&q-signature=zz1",
            "https://h/p?zz1",
        ] {
            let r = url(sneaky);
            assert!(!r.contains("zz1"), "{sneaky} -> {r}");
        }
        assert_eq!(url("https://tok@host/p"), "https://REDACTED@host/p");
        assert_eq!(url("file:///srv/a.tgz"), "file:///srv/a.tgz");
        assert_eq!(url("data/release.db"), "data/release.db");
        assert!(!url("https://u:hunter2@h/p?sig=zzz#frag").contains("hunter2"));
    }
}
