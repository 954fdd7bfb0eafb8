//! A value loaded from a file and loaded again when the file changes (looked at, at most
//! every half second, when the value is used): policies, token files, JWKS. A file that
//! stops loading keeps the last good value, with a warning.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

/// How often, at most, the file's metadata is read.
const CHECK_EVERY: Duration = Duration::from_millis(500);

type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// A value that follows its file.
pub struct Reloading<T> {
    path: PathBuf,
    what: &'static str,
    parse: fn(&[u8]) -> anyhow::Result<T>,
    current: ArcSwap<T>,
    seen: Mutex<(Stamp, Instant)>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("path", &self.path)
            .field("what", &self.what)
            .finish()
    }
}

impl<T> Reloading<T> {
    /// Loads `path` with `parse`; a file that does not load is an error naming `what`.
    pub fn load(
        path: PathBuf,
        what: &'static str,
        parse: fn(&[u8]) -> anyhow::Result<T>,
    ) -> anyhow::Result<Self> {
        let seen = stamp(&path);
        let bytes = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("cannot read the {what} file {}: {e}", path.display()))?;
        let value = parse(&bytes)
            .map_err(|e| anyhow::anyhow!("bad {what} file {}: {e}", path.display()))?;
        Ok(Self {
            path,
            what,
            parse,
            current: ArcSwap::from_pointee(value),
            seen: Mutex::new((seen, Instant::now())),
        })
    }

    /// The current value and whether it was just reloaded.
    pub fn get(&self) -> (Arc<T>, bool) {
        let reload = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.1.elapsed() < CHECK_EVERY {
                false
            } else {
                seen.1 = Instant::now();
                let now = stamp(&self.path);
                let changed = now != seen.0;
                seen.0 = now;
                changed
            }
        };
        if reload {
            match std::fs::read(&self.path)
                .map_err(anyhow::Error::from)
                .and_then(|b| (self.parse)(&b))
            {
                Ok(v) => {
                    self.current.store(Arc::new(v));
                    tracing::info!(file = %self.path.display(), what = self.what, "reloaded");
                    return (self.current.load_full(), true);
                }
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), what = self.what, error = %e, "changed file does not load; keeping the previous one")
                }
            }
        }
        (self.current.load_full(), false)
    }
}
