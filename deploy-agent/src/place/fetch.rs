//! Streams an allowed source into a new temp file while computing its sha256, at most
//! `max_bytes` (one byte more fails the fetch, so `/dev/zero` stops there), checking the
//! [`Stop`] between chunks. HTTP redirects are followed here, one checked hop at a time.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::sources::{self, redact, Source, Sources};
use super::unpack::{copy_limited, Copy};
use super::{PlaceError, Stop};

/// How a fetch is bounded.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds<'a> {
    /// The whole-request timeout of an HTTP fetch (redirect hops each get it).
    pub timeout: Duration,
    /// The most bytes the artifact may have.
    pub max_bytes: u64,
    /// Checked between chunks.
    pub stop: &'a Stop,
}

/// A writer that hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Copies `source` into the new file `dest` (never through a symlink) and returns the
/// payload's `sha256:<hex>`. On error `dest` may exist; the caller deletes it.
pub(super) fn fetch(
    sources: &Sources,
    source: &Source,
    dest: &Path,
    bounds: Bounds<'_>,
) -> Result<String, PlaceError> {
    let started = std::time::Instant::now();
    let result = fetch_once(sources, source, dest, bounds);
    metrics::histogram!(crate::telemetry::FETCH_SECONDS).record(started.elapsed().as_secs_f64());
    result
}

fn fetch_once(
    sources: &Sources,
    source: &Source,
    dest: &Path,
    bounds: Bounds<'_>,
) -> Result<String, PlaceError> {
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(dest)
        .map_err(|e| PlaceError::Io(format!("could not create {}: {e}", dest.display())))?;
    let mut out = Hashing {
        inner: out,
        hasher: Sha256::new(),
    };
    match source {
        Source::File { dir, rel } => {
            let mut file = sources::open_file(dir, rel)?;
            copy(&mut file, &mut out, bounds, "the file source")?;
        }
        Source::Http(url) => {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(bounds.timeout))
                .http_status_as_error(false)
                // Redirects are followed below, each hop checked against the allow-list.
                .max_redirects(0)
                .https_only(sources_https_only(url))
                .build()
                .into();
            let mut url = url.clone();
            let mut hops = 0;
            let response = loop {
                bounds.stop.check()?;
                let response = agent
                    .get(&url)
                    .call()
                    .map_err(|e| PlaceError::Fetch(format!("GET failed: {}", describe(&e))))?;
                let status = response.status();
                if !status.is_redirection() {
                    break response;
                }
                let location = response
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        PlaceError::Fetch(format!("GET answered {status} without a Location"))
                    })?;
                hops += 1;
                if hops > sources.redirect_limit() {
                    return Err(PlaceError::Fetch(format!(
                        "more than {} redirects",
                        sources.redirect_limit()
                    )));
                }
                let next = sources.check_redirect(&url, location)?;
                tracing::info!(from = %redact(&url), to = %redact(&next), "following a redirect");
                url = next;
            };
            let status = response.status();
            if !status.is_success() {
                return Err(PlaceError::Fetch(format!("GET answered {status}")));
            }
            let mut body = response.into_body().into_reader();
            copy(&mut body, &mut out, bounds, "the response body")?;
        }
    }
    out.flush()
        .map_err(|e| PlaceError::Io(format!("could not write {}: {e}", dest.display())))?;
    Ok(format!("sha256:{}", hex::encode(out.hasher.finalize())))
}

/// `https_only` for the HTTP client as a second guard: once the allow-list accepted an
/// https source, the client refuses plain http too.
fn sources_https_only(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

fn copy(
    from: &mut impl std::io::Read,
    to: &mut impl Write,
    bounds: Bounds<'_>,
    what: &str,
) -> Result<u64, PlaceError> {
    let copied = copy_limited(from, to, bounds.max_bytes, bounds.stop);
    if let Ok(n) = copied {
        metrics::counter!(crate::telemetry::FETCH_BYTES).increment(n);
    }
    copied.map_err(|e| match e {
        Copy::Limit => PlaceError::Fetch(format!(
            "the artifact is larger than {} bytes (--max-artifact-bytes)",
            bounds.max_bytes
        )),
        Copy::Stopped => PlaceError::Cancelled,
        Copy::Io(e) => PlaceError::Fetch(format!("reading {what} failed: {e}")),
    })
}

/// An HTTP client error for the reason, without the URL (whose query may hold a token).
fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::BadUri(_) => "the URL is not valid".to_owned(),
        other => other.to_string(),
    }
}
