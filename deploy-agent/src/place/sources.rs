//! The agent's own allow-list of sources. An artifact's `source_uri` is written by whoever
//! may register artifacts in deploy-svc; the agent runs on the target, often as root, so
//! it decides for itself what it reads:
//!
//! - `file:///abs/path` only beneath a directory given with [`Sources::allow_file_dir`]
//!   (none by default), opened with `openat2(RESOLVE_BENEATH)` from that directory, so a
//!   symlink inside it cannot lead out; fifos, sockets and directories are refused;
//! - `http://` and `https://` only under a URL prefix given with
//!   [`Sources::allow_url_prefix`] (none by default): same scheme, host and port, and a path
//!   under the prefix's path, with no `.`/`..` segment (plain or percent-encoded);
//! - with [`Sources::https_only`], no `http://` at all;
//! - redirects are followed by the agent, not the HTTP client: each hop must be allowed
//!   too, https never goes to http, and at most [`Sources::max_redirects`] hops.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use ureq::http::Uri;

use super::{beneath, PlaceError};

/// Redirect hops followed unless [`Sources::max_redirects`] says otherwise.
pub const DEFAULT_MAX_REDIRECTS: u32 = 5;

/// What the agent may fetch from. The default allows nothing.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Allowed directories, canonical.
    file_dirs: Vec<PathBuf>,
    prefixes: Vec<Prefix>,
    https_only: bool,
    max_redirects: u32,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            file_dirs: Vec::new(),
            prefixes: Vec::new(),
            https_only: false,
            max_redirects: DEFAULT_MAX_REDIRECTS,
        }
    }
}

/// An allowed URL prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Prefix {
    scheme: String,
    host: String,
    port: u16,
    /// Ends with `/`.
    path: String,
}

/// A source URI that the allow-list accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Source {
    /// A file beneath `dir` (an allowed directory, canonical) at `rel`.
    File {
        /// The allowed directory.
        dir: PathBuf,
        /// The path below it, normal components only.
        rel: PathBuf,
    },
    /// An `http://` or `https://` URL, fetched with GET.
    Http(String),
}

impl Sources {
    /// Allows `file://` sources beneath `dir` (which must exist; symlinks in its own path
    /// are resolved now).
    pub fn allow_file_dir(mut self, dir: &Path) -> Result<Self, String> {
        let canonical = dir
            .canonicalize()
            .map_err(|e| format!("allowed file directory {}: {e}", dir.display()))?;
        if !canonical.is_dir() {
            return Err(format!(
                "allowed file directory {} is not a directory",
                dir.display()
            ));
        }
        self.file_dirs.push(canonical);
        Ok(self)
    }

    /// Allows `http(s)://` sources under `prefix`, such as
    /// `https://artifacts.example.com/releases/` (scheme, host and port must match; the path
    /// must be under the prefix's path).
    pub fn allow_url_prefix(mut self, prefix: &str) -> Result<Self, String> {
        let uri: Uri = prefix
            .parse()
            .map_err(|e| format!("allowed source prefix `{prefix}`: {e}"))?;
        let (scheme, host, port, path) = parts(&uri)
            .ok_or_else(|| format!("allowed source prefix `{prefix}` is not an http(s) URL"))?;
        let mut path = path.to_owned();
        if !path.ends_with('/') {
            path.push('/');
        }
        self.prefixes.push(Prefix {
            scheme,
            host,
            port,
            path,
        });
        Ok(self)
    }

    /// Refuses every `http://` source and redirect target.
    pub fn https_only(mut self, yes: bool) -> Self {
        self.https_only = yes;
        self
    }

    /// The most redirect hops followed for one fetch.
    pub fn max_redirects(mut self, hops: u32) -> Self {
        self.max_redirects = hops;
        self
    }

    pub(super) fn redirect_limit(&self) -> u32 {
        self.max_redirects
    }

    /// Checks `uri` against the allow-list.
    pub(super) fn check(&self, uri: &str) -> Result<Source, PlaceError> {
        let scheme_end = uri
            .find("://")
            .ok_or_else(|| PlaceError::InvalidOrder("the source uri has no scheme".into()))?;
        match uri[..scheme_end].to_ascii_lowercase().as_str() {
            "file" => self.check_file(&uri[scheme_end + 3..]),
            "http" | "https" => {
                self.check_url(uri)?;
                Ok(Source::Http(uri.to_owned()))
            }
            other => Err(PlaceError::NotAllowed(format!(
                "scheme `{other}` (file, http or https only)"
            ))),
        }
    }

    fn check_file(&self, rest: &str) -> Result<Source, PlaceError> {
        let rest = rest.strip_prefix("localhost").unwrap_or(rest);
        if !rest.starts_with('/') {
            return Err(PlaceError::InvalidOrder(
                "a file source must be file:///absolute/path".into(),
            ));
        }
        if self.file_dirs.is_empty() {
            return Err(PlaceError::NotAllowed(
                "file:// sources are off on this agent (--allow-file-dir)".into(),
            ));
        }
        let path = percent_decode(rest);
        let mut clean = PathBuf::from("/");
        for component in path.components() {
            match component {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(part) => clean.push(part),
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(PlaceError::NotAllowed(
                        "a file source with `..` in its path".into(),
                    ))
                }
            }
        }
        for dir in &self.file_dirs {
            if let Ok(rel) = clean.strip_prefix(dir) {
                if !rel.as_os_str().is_empty() {
                    return Ok(Source::File {
                        dir: dir.clone(),
                        rel: rel.to_path_buf(),
                    });
                }
            }
        }
        Err(PlaceError::NotAllowed(
            "the file is not beneath a directory allowed on this agent".into(),
        ))
    }

    /// Checks an `http(s)://` URL (a source or a redirect target).
    pub(super) fn check_url(&self, url: &str) -> Result<(), PlaceError> {
        let uri: Uri = url
            .parse()
            .map_err(|_| PlaceError::InvalidOrder("the source uri is not a valid URL".into()))?;
        let (scheme, host, port, path) = parts(&uri)
            .ok_or_else(|| PlaceError::InvalidOrder("the source uri has no host".into()))?;
        if self.https_only && scheme != "https" {
            return Err(PlaceError::NotAllowed(
                "http:// on an https-only agent (--https-only)".into(),
            ));
        }
        let bad_segment = path.split('/').any(|segment| {
            let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
            decoded == "." || decoded == ".." || decoded.contains("%2f") || decoded.contains('\\')
        });
        if bad_segment {
            return Err(PlaceError::NotAllowed(
                "a URL path with `.`, `..` or an encoded `/`".into(),
            ));
        }
        let allowed = self.prefixes.iter().any(|p| {
            p.scheme == scheme
                && p.host == host
                && p.port == port
                && (path.starts_with(&p.path) || p.path.strip_suffix('/') == Some(path))
        });
        if allowed {
            Ok(())
        } else {
            Err(PlaceError::NotAllowed(format!(
                "{scheme}://{host}:{port} and that path are not under a prefix allowed on this agent (--allow-source)"
            )))
        }
    }

    /// Checks a redirect from `from` to `location` and returns the absolute target.
    pub(super) fn check_redirect(&self, from: &str, location: &str) -> Result<String, PlaceError> {
        let next = resolve(from, location).ok_or_else(|| {
            PlaceError::Fetch("a redirect with an unusable Location header".into())
        })?;
        let scheme = |u: &str| u.split("://").next().unwrap_or("").to_ascii_lowercase();
        if scheme(from) == "https" && scheme(&next) != "https" {
            return Err(PlaceError::NotAllowed(
                "a redirect from https to http".into(),
            ));
        }
        self.check_url(&next).map_err(|e| match e {
            PlaceError::NotAllowed(why) => {
                PlaceError::NotAllowed(format!("redirect target: {why}"))
            }
            other => other,
        })?;
        Ok(next)
    }
}

/// Opens an allowed file source for reading, resolved beneath its allowed directory.
pub(super) fn open_file(dir: &Path, rel: &Path) -> Result<File, PlaceError> {
    beneath::open_source(dir, rel).map_err(|e| {
        if beneath::is_escape(&e) {
            PlaceError::NotAllowed(
                "the file resolves outside the directory allowed on this agent".into(),
            )
        } else {
            PlaceError::Fetch(format!("could not open the file source: {e}"))
        }
    })
}

/// Scheme (`http`/`https`), lowercased host, port (default by scheme) and path.
fn parts(uri: &Uri) -> Option<(String, String, u16, &str)> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let host = uri.host()?.to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    Some((
        scheme,
        host,
        uri.port_u16().unwrap_or(default_port),
        uri.path(),
    ))
}

/// The absolute URL a `Location` header names, relative to `base`.
fn resolve(base: &str, location: &str) -> Option<String> {
    let location = location.trim();
    let lower = location.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Some(location.to_owned());
    }
    let uri: Uri = base.parse().ok()?;
    let scheme = uri.scheme_str()?;
    if let Some(rest) = location.strip_prefix("//") {
        return Some(format!("{scheme}://{rest}"));
    }
    let authority = uri.authority()?.as_str();
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if location.starts_with('/') {
        return Some(format!("{scheme}://{authority}{location}"));
    }
    if location.contains("://") {
        // Another scheme (ftp://, file://...): never followed.
        return None;
    }
    let path = uri.path();
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    Some(format!("{scheme}://{authority}{dir}{location}"))
}

/// `uri` without credentials (`user:pass@`) or query string (signed URLs carry tokens
/// there), for logs.
pub(super) fn redact(uri: &str) -> String {
    let uri = uri.split(['?', '#']).next().unwrap_or(uri);
    let Some(scheme_end) = uri.find("://") else {
        return uri.to_owned();
    };
    let authority_start = scheme_end + 3;
    let authority_end = uri[authority_start..]
        .find('/')
        .map_or(uri.len(), |i| authority_start + i);
    match uri[authority_start..authority_end].rfind('@') {
        Some(at) => format!(
            "{}***@{}",
            &uri[..authority_start],
            &uri[authority_start + at + 1..]
        ),
        None => uri.to_owned(),
    }
}

/// Decodes `%XX` escapes into a path; a malformed escape is kept as it is.
fn percent_decode(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn web() -> Sources {
        Sources::default()
            .allow_url_prefix("https://artifacts.example.com/releases")
            .unwrap()
            .allow_url_prefix("http://127.0.0.1:8080/")
            .unwrap()
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        let none = Sources::default();
        for uri in [
            "file:///etc/hostname",
            "http://127.0.0.1/a",
            "https://example.com/a",
        ] {
            assert!(
                matches!(none.check(uri), Err(PlaceError::NotAllowed(_))),
                "{uri}"
            );
        }
    }

    #[test]
    fn urls_must_match_scheme_host_port_and_path_prefix() {
        let s = web();
        assert!(s
            .check("https://artifacts.example.com/releases/a.tgz")
            .is_ok());
        assert!(s
            .check("https://ARTIFACTS.example.com:443/releases/a")
            .is_ok());
        assert!(s.check("http://127.0.0.1:8080/anything").is_ok());
        for bad in [
            "http://artifacts.example.com/releases/a.tgz",
            "https://artifacts.example.com/releases-evil/a",
            "https://artifacts.example.com/other/a",
            "https://artifacts.example.com:444/releases/a",
            "https://artifacts.example.com/releases/../admin",
            "https://artifacts.example.com/releases/%2e%2E/admin",
            "https://artifacts.example.com/releases/a%2fb",
            "http://127.0.0.1:8081/a",
            "http://169.254.169.254/latest/meta-data",
            "https://evil.com@artifacts.example.com.evil.com/releases/a",
        ] {
            assert!(s.check(bad).is_err(), "{bad} was allowed");
        }
        assert!(web()
            .https_only(true)
            .check("http://127.0.0.1:8080/a")
            .is_err());
    }

    #[test]
    fn redirects_stay_in_the_list_and_never_downgrade() {
        let s = web()
            .allow_url_prefix("http://artifacts.example.com/")
            .unwrap();
        let from = "https://artifacts.example.com/releases/a";
        assert_eq!(
            s.check_redirect(from, "/releases/b").unwrap(),
            "https://artifacts.example.com/releases/b"
        );
        assert_eq!(
            s.check_redirect(from, "c").unwrap(),
            "https://artifacts.example.com/releases/c"
        );
        assert!(matches!(
            s.check_redirect(from, "http://artifacts.example.com/releases/a"),
            Err(PlaceError::NotAllowed(_))
        ));
        assert!(s
            .check_redirect(from, "https://169.254.169.254/releases/a")
            .is_err());
        assert!(s.check_redirect(from, "file:///etc/shadow").is_err());
        assert!(s.check_redirect(from, "//evil.example/releases/a").is_err());
    }

    #[test]
    fn file_sources_only_beneath_an_allowed_directory() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::write(allowed.join("a"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink("../secret", allowed.join("link")).unwrap();
        let s = Sources::default().allow_file_dir(&allowed).unwrap();
        let canonical = allowed.canonicalize().unwrap();

        let Source::File { dir: d, rel } = s
            .check(&format!("file://{}/a", canonical.display()))
            .unwrap()
        else {
            panic!("not a file source")
        };
        assert!(open_file(&d, &rel).is_ok());
        assert!(s
            .check(&format!(
                "file://{}/secret",
                dir.path().canonicalize().unwrap().display()
            ))
            .is_err());
        assert!(s
            .check(&format!("file://{}/../secret", canonical.display()))
            .is_err());
        // A symlink inside the allowed directory that leads out is refused by the kernel.
        let Source::File { dir: d, rel } = s
            .check(&format!("file://{}/link", canonical.display()))
            .unwrap()
        else {
            panic!("not a file source")
        };
        assert!(matches!(
            open_file(&d, &rel),
            Err(PlaceError::NotAllowed(_))
        ));
    }

    #[test]
    fn redact_hides_credentials_and_queries() {
        assert_eq!(
            redact("https://user:secret@host.example/a.tgz?sig=abc#frag"),
            "https://***@host.example/a.tgz"
        );
        assert_eq!(redact("http://host/a"), "http://host/a");
    }

    #[test]
    fn file_uris_are_percent_decoded() {
        assert_eq!(percent_decode("/a%20b/c%2"), PathBuf::from("/a b/c%2"));
    }
}
