//! Sources: `file:///abs/path`, `http://` and `https://`. The payload is streamed into a
//! temp file (artifacts can be big) while its sha256 is computed.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::PlaceError;

/// A source URI, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Source {
    /// A local file.
    File(PathBuf),
    /// An `http://` or `https://` URL, fetched with GET.
    Http(String),
}

impl Source {
    /// Parses `uri`; a scheme other than file, http and https is a fetch error.
    pub(super) fn parse(uri: &str) -> Result<Self, PlaceError> {
        let scheme_end = uri.find("://").ok_or_else(|| {
            PlaceError::Fetch(format!("source uri `{}` has no scheme", redact(uri)))
        })?;
        match uri[..scheme_end].to_ascii_lowercase().as_str() {
            "file" => {
                let rest = &uri[scheme_end + 3..];
                let rest = rest.strip_prefix("localhost").unwrap_or(rest);
                if !rest.starts_with('/') {
                    return Err(PlaceError::Fetch(format!(
                        "file source `{uri}` is not of the form file:///absolute/path"
                    )));
                }
                Ok(Self::File(percent_decode(rest)))
            }
            "http" | "https" => Ok(Self::Http(uri.to_owned())),
            other => Err(PlaceError::Fetch(format!(
                "source uri scheme `{other}` is not supported (file, http or https)"
            ))),
        }
    }
}

/// Copies `source` into the new file `dest` and returns the payload's `sha256:<hex>`.
/// On error `dest` may exist; the caller deletes it.
pub(super) fn fetch(source: &Source, dest: &Path, timeout: Duration) -> Result<String, PlaceError> {
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| PlaceError::Io(format!("could not create {}: {e}", dest.display())))?;
    match source {
        Source::File(path) => {
            let file = File::open(path).map_err(|e| {
                PlaceError::Fetch(format!("could not open {}: {e}", path.display()))
            })?;
            copy_hashing(file, &mut out, dest, &path.display().to_string())
        }
        Source::Http(url) => {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(timeout))
                .http_status_as_error(false)
                .build()
                .into();
            let shown = redact(url);
            let response = agent
                .get(url)
                .call()
                .map_err(|e| PlaceError::Fetch(format!("GET {shown} failed: {e}")))?;
            let status = response.status();
            if !status.is_success() {
                return Err(PlaceError::Fetch(format!("GET {shown} answered {status}")));
            }
            // No size limit: the payload goes to disk, not to memory.
            let body = response.into_body().into_reader();
            copy_hashing(body, &mut out, dest, &format!("GET {shown}"))
        }
    }
}

/// Streams `from` into `to`, hashing; read errors are fetch errors, write errors disk errors.
fn copy_hashing(
    mut from: impl Read,
    to: &mut File,
    dest: &Path,
    what: &str,
) -> Result<String, PlaceError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(PlaceError::Fetch(format!("reading {what} failed: {e}"))),
        };
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])
            .map_err(|e| PlaceError::Io(format!("could not write {}: {e}", dest.display())))?;
    }
    to.flush()
        .map_err(|e| PlaceError::Io(format!("could not write {}: {e}", dest.display())))?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// `uri` without credentials (`user:pass@`) or query string (signed URLs carry tokens
/// there), for messages that leave the target.
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
    PathBuf::from(OsString::from_vec(out))
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
