//! [`Placer`]: carries out place and remove orders under one root directory.
//!
//! `place` runs these steps, each only if the one before succeeded:
//!
//! 1. check the order (names that are single path components, a `sha256:<64 hex>` digest,
//!    a source allowed by [`Sources`]); return `reused` at once if `current` already points
//!    at this version, complete and with this digest;
//! 2. clean up after a crashed run: `tmp/`, `versions/*.partial`, `current.tmp-*`;
//! 3. unless `versions/<artifact>-<version>` is already complete with this digest: fetch
//!    into `tmp/` while hashing (at most [`Limits::artifact_bytes`]), compare the digest
//!    (nothing else has been written yet), unpack into `versions/<dir>.partial` beneath that directory (at most
//!    [`Limits::unpacked_bytes`] and [`Limits::entries`]), write `.agent-version.json`
//!    (`O_EXCL | O_NOFOLLOW`), flush the file system, rename to `versions/<dir>`;
//! 4. the pre-switch command, in the version directory, with a timeout (on failure the
//!    directory is deleted, since the command may have half-changed it, and `current` is
//!    untouched);
//! 5. switch: a new symlink `current.tmp-<unique>` -> `versions/<dir>` renamed over
//!    `current` (atomic);
//! 6. the health check, in `current`; on failure or timeout `current` is switched back to
//!    its previous target the same way (or removed if there was none);
//! 7. prune old complete versions (a failure there is logged, the placement stands).
//!
//! One `Placer` per root, one order at a time: the agent serialises orders, so there is no
//! lock. Placers on different roots share nothing.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::beneath::{self, Beneath};
use super::command::{self, Hook};
use super::fetch::{self, Bounds};
use super::sources::{Source, Sources};
use super::unpack::{self, Kind, UnpackLimits};
use super::{OnDisk, Order, PlaceError, Placed, Stop};

/// The file that makes a version directory complete: `{artifact, version, digest}`.
pub const METADATA_FILE: &str = ".agent-version.json";

/// The fetch timeout unless [`Placer::with_fetch_timeout`] says otherwise.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// The health check timeout until [`Placer::with_health_check`] sets one.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

/// The pre-switch timeout until [`Placer::with_pre_switch`] sets one.
pub const DEFAULT_PRE_SWITCH_TIMEOUT: Duration = Duration::from_secs(300);

/// The mode of a single-file artifact (not a tar.gz) unless
/// [`Placer::with_single_file_mode`] says otherwise: not executable.
pub const DEFAULT_SINGLE_FILE_MODE: u32 = 0o644;

/// Size limits on one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes an artifact (what is fetched) may have.
    pub artifact_bytes: u64,
    /// The most bytes of file content a tar.gz may unpack to.
    pub unpacked_bytes: u64,
    /// The most entries a tar.gz may hold.
    pub entries: u64,
}

impl Default for Limits {
    /// 2 GiB fetched, 8 GiB unpacked, 100,000 entries.
    fn default() -> Self {
        Self {
            artifact_bytes: 2 << 30,
            unpacked_bytes: 8 << 30,
            entries: 100_000,
        }
    }
}

/// The fewest version directories pruning keeps: the current one and the one before it.
pub const MIN_KEEP: usize = 2;

const CURRENT: &str = "current";
const CURRENT_TMP_PREFIX: &str = "current.tmp-";
const VERSIONS: &str = "versions";
const TMP: &str = "tmp";
const PARTIAL_SUFFIX: &str = ".partial";

/// Carries out place and remove orders under one root directory (see the module doc for
/// the layout and the steps).
#[derive(Debug, Clone)]
pub struct Placer {
    root: PathBuf,
    keep: usize,
    pre_switch: Option<String>,
    pre_switch_timeout: Duration,
    health_check: Option<String>,
    health_timeout: Duration,
    fetch_timeout: Duration,
    sources: Sources,
    limits: Limits,
    single_file_mode: u32,
    stop: Stop,
}

/// The content of [`METADATA_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Metadata {
    artifact: String,
    version: String,
    digest: String,
}

impl Placer {
    /// A placer for `root` (created on the first `place`; made absolute so that hooks see
    /// an absolute `AGENT_ROOT`). `keep` is how many complete version directories pruning
    /// leaves in total, the current one included; it is raised to [`MIN_KEEP`] (the current
    /// version and the one it replaced are never pruned).
    pub fn new(root: impl Into<PathBuf>, keep: usize) -> Self {
        let root = root.into();
        Self {
            root: std::path::absolute(&root).unwrap_or(root),
            keep: keep.max(MIN_KEEP),
            pre_switch: None,
            pre_switch_timeout: DEFAULT_PRE_SWITCH_TIMEOUT,
            health_check: None,
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            sources: Sources::default(),
            limits: Limits::default(),
            single_file_mode: DEFAULT_SINGLE_FILE_MODE,
            stop: Stop::default(),
        }
    }

    /// Where artifacts may come from (nothing until set).
    pub fn with_sources(mut self, sources: Sources) -> Self {
        self.sources = sources;
        self
    }

    /// Size limits ([`Limits::default`] until set).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The mode of a single-file artifact, masked to `0o755` (no setuid, setgid, sticky or
    /// write for others); [`DEFAULT_SINGLE_FILE_MODE`] until set.
    pub fn with_single_file_mode(mut self, mode: u32) -> Self {
        self.single_file_mode = mode & 0o755;
        self
    }

    /// Stopping `stop` abandons the order in progress at its next check: a fetch between
    /// chunks, an unpack between entries, a hook is killed.
    pub fn with_stop(mut self, stop: Stop) -> Self {
        self.stop = stop;
        self
    }

    /// A command run with `sh -c` in the new version directory before switching, with
    /// `AGENT_ARTIFACT`, `AGENT_VERSION`, `AGENT_VERSION_DIR` and `AGENT_ROOT` set. A non-zero
    /// exit, or still running after `timeout` (then it is killed with its process group),
    /// fails the placement with `current` unchanged.
    pub fn with_pre_switch(mut self, command: Option<String>, timeout: Duration) -> Self {
        self.pre_switch = command;
        self.pre_switch_timeout = timeout;
        self
    }

    /// A command run with `sh -c` in `current` right after switching, with the same
    /// environment as the pre-switch command. A non-zero exit, or still running after
    /// `timeout` (then it is killed with its process group), switches `current` back.
    pub fn with_health_check(mut self, command: Option<String>, timeout: Duration) -> Self {
        self.health_check = command;
        self.health_timeout = timeout;
        self
    }

    /// The whole-request timeout for `http(s)://` sources ([`DEFAULT_FETCH_TIMEOUT`] unless
    /// set).
    pub fn with_fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// The root directory (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Places `order`: fetch, verify digest BEFORE anything else is written, unpack into
    /// root/versions/<dir>, pre-switch, atomic switch of root/current, health check, prune.
    /// On any failure the previous version stays (or becomes again) current and the error
    /// says why.
    pub fn place(&self, order: &Order) -> Result<Placed, PlaceError> {
        let expected = normalize_digest(&order.digest)?;
        check_name("artifact", &order.artifact)?;
        check_name("version", &order.version)?;
        let source = self.sources.check(&order.source_uri)?;
        let want = Metadata {
            artifact: order.artifact.clone(),
            version: order.version.clone(),
            digest: expected,
        };
        let name = dir_name(&order.artifact, &order.version);
        let dir = self.versions().join(&name);

        if self.already_current(&dir, &want) {
            tracing::info!(artifact = %order.artifact, version = %order.version, "already current");
            return Ok(Placed {
                path: dir,
                reused: true,
            });
        }

        self.clean_leftovers()?;
        let previous = self.current_target()?;
        self.ensure_version_dir(order, &source, &want, &name, &dir, previous.as_deref())?;

        let env = self.env(order, &dir);
        self.run_pre_switch(&dir, &env)?;
        touch(&dir);
        self.switch(&Path::new(VERSIONS).join(&name))?;
        tracing::info!(artifact = %order.artifact, version = %order.version, "switched current");
        self.run_health_check(order, &env, previous.as_deref())?;

        let mut protected = vec![dir.clone()];
        protected.extend(previous.map(|p| self.root.join(p)));
        if let Err(e) = self.prune(&protected) {
            tracing::warn!(error = %e, "pruning old versions failed");
        }
        Ok(Placed {
            path: dir,
            reused: false,
        })
    }

    /// Whether `current` already points at `dir`, complete and holding `want`.
    fn already_current(&self, dir: &Path, want: &Metadata) -> bool {
        self.current()
            .is_some_and(|on_disk| on_disk.path == dir && Metadata::from(&on_disk) == *want)
    }

    /// Makes `dir` (`versions/<name>`) a complete version directory of `want`: kept if it
    /// already is one, else fetched and unpacked afresh, unless it is the one `current`
    /// points at (`previous`): the running version is never pulled out from under itself.
    fn ensure_version_dir(
        &self,
        order: &Order,
        source: &Source,
        want: &Metadata,
        name: &str,
        dir: &Path,
        previous: Option<&Path>,
    ) -> Result<(), PlaceError> {
        let is_current = previous.is_some_and(|p| self.root.join(p) == dir);
        match read_metadata(dir) {
            Some(found) if found == *want => {
                tracing::info!(artifact = %order.artifact, version = %order.version, "version directory already complete, not fetching");
                Ok(())
            }
            found => {
                if is_current {
                    // Never pull the running version out from under itself.
                    return Err(PlaceError::Io(match found {
                        Some(found) => format!(
                            "{} is current and holds {} {} with digest {}; remove it before placing {} {} with digest {}",
                            dir.display(), found.artifact, found.version, found.digest, want.artifact, want.version, want.digest
                        ),
                        None => format!(
                            "{} is current but incomplete (no {METADATA_FILE}); remove it before placing again",
                            dir.display()
                        ),
                    }));
                }
                self.fetch_and_unpack(order, source, &want.digest, name, dir)
            }
        }
    }

    /// Runs the pre-switch command, if any, in the version directory `dir`; if it fails,
    /// `dir` is deleted and `current` is left as it is.
    fn run_pre_switch(
        &self,
        dir: &Path,
        env: &[(&'static str, OsString)],
    ) -> Result<(), PlaceError> {
        let Some(pre_switch) = &self.pre_switch else {
            return Ok(());
        };
        if let Err(why) = self.run_hook(pre_switch, "pre-switch", dir, env, self.pre_switch_timeout)
        {
            // The command may have changed the directory half-way: unpack afresh next time.
            if let Err(e) = self.delete_dir(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not delete the version directory after a failed pre-switch");
            }
            return Err(PlaceError::PreSwitch(why));
        }
        Ok(())
    }

    /// Runs the health check, if any, in `current`; if it fails, `current` is switched back
    /// to `previous` (or removed if there was none) and the error says both.
    fn run_health_check(
        &self,
        order: &Order,
        env: &[(&'static str, OsString)],
        previous: Option<&Path>,
    ) -> Result<(), PlaceError> {
        let Some(health_check) = &self.health_check else {
            return Ok(());
        };
        let cwd = self.root.join(CURRENT);
        if let Err(why) =
            self.run_hook(health_check, "health check", &cwd, env, self.health_timeout)
        {
            let restored = self.restore(previous);
            tracing::warn!(artifact = %order.artifact, version = %order.version, reason = %why, %restored, "health check failed");
            return Err(PlaceError::HealthCheck(format!("{why}; {restored}")));
        }
        Ok(())
    }

    /// Switches `current` back to `previous`, or removes it if there was none; says what
    /// happened, failures included.
    fn restore(&self, previous: Option<&Path>) -> String {
        let restored = match previous {
            Some(target) => self
                .switch(target)
                .map(|()| format!("current switched back to {}", target.display())),
            None => self
                .remove_current()
                .map(|()| "current removed, there was no previous version".to_owned()),
        };
        restored.unwrap_or_else(|e| format!("restoring current failed too: {e}"))
    }

    /// Runs `command` as the hook `what` (see [`command::run`]), its output in a file of
    /// `tmp/` named after the hook and deleted afterwards.
    fn run_hook(
        &self,
        command: &str,
        what: &'static str,
        cwd: &Path,
        env: &[(&'static str, OsString)],
        timeout: Duration,
    ) -> Result<(), String> {
        let output = self.tmp().join(unique(&what.replace(' ', "-")));
        let result = command::run(&Hook {
            command,
            what,
            cwd,
            env,
            timeout,
            stop: &self.stop,
            output: &output,
        });
        let _ = fs::remove_file(&output);
        result
    }

    /// Removes: root/current is removed (atomically) if it points at `version`; the version
    /// directory is deleted. Idempotent. A directory of that name whose metadata names
    /// another artifact or version is left alone.
    pub fn remove(&self, artifact: &str, version: &str) -> Result<(), PlaceError> {
        check_name("artifact", artifact)?;
        check_name("version", version)?;
        let dir = self.versions().join(dir_name(artifact, version));
        if let Some(found) = read_metadata(&dir) {
            if found.artifact != artifact || found.version != version {
                tracing::warn!(dir = %dir.display(), artifact = %found.artifact, version = %found.version, "not removing a version directory that belongs to another artifact version");
                return Ok(());
            }
        }
        if let Some(target) = self.current_target()? {
            if self.root.join(target) == dir {
                self.remove_current()?;
                tracing::info!(artifact, version, "removed current");
            }
        }
        match fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("could not inspect", &dir, e)),
            Ok(_) => {
                self.delete_dir(&dir)?;
                tracing::info!(artifact, version, "removed version directory");
                Ok(())
            }
        }
    }

    /// What is on disk: the version `current` points at (with its artifact and digest, read
    /// from a small metadata file written in each complete version dir), if any and
    /// complete.
    pub fn current(&self) -> Option<OnDisk> {
        let target = fs::read_link(self.root.join(CURRENT)).ok()?;
        let path = self.root.join(target);
        let Metadata {
            artifact,
            version,
            digest,
        } = read_metadata(&path)?;
        Some(OnDisk {
            artifact,
            version,
            digest,
            path,
        })
    }

    fn versions(&self) -> PathBuf {
        self.root.join(VERSIONS)
    }

    fn tmp(&self) -> PathBuf {
        self.root.join(TMP)
    }

    fn env(&self, order: &Order, dir: &Path) -> Vec<(&'static str, OsString)> {
        vec![
            ("AGENT_ARTIFACT", order.artifact.clone().into()),
            ("AGENT_VERSION", order.version.clone().into()),
            ("AGENT_VERSION_DIR", dir.as_os_str().to_owned()),
            ("AGENT_ROOT", self.root.as_os_str().to_owned()),
        ]
    }

    /// Creates the layout and deletes what a crashed run left: `tmp/*`,
    /// `versions/*.partial`, `current.tmp-*`.
    fn clean_leftovers(&self) -> Result<(), PlaceError> {
        for dir in [self.root.clone(), self.versions(), self.tmp()] {
            fs::create_dir_all(&dir).map_err(|e| io_error("could not create", &dir, e))?;
        }
        for entry in read_dir(&self.tmp())? {
            remove_any(&entry)?;
        }
        for entry in read_dir(&self.versions())? {
            if has_suffix(&entry, PARTIAL_SUFFIX) {
                remove_any(&entry)?;
            }
        }
        for entry in read_dir(&self.root)? {
            if has_prefix(&entry, CURRENT_TMP_PREFIX) {
                remove_any(&entry)?;
            }
        }
        Ok(())
    }

    /// Fetches into `tmp/`, verifies, unpacks into `<dir>.partial`, completes it and renames
    /// it to `dir` (replacing an incomplete or different directory of that name).
    fn fetch_and_unpack(
        &self,
        order: &Order,
        source: &Source,
        expected: &str,
        name: &str,
        dir: &Path,
    ) -> Result<(), PlaceError> {
        let download = self.fetch_verified(order, source, expected)?;
        if fs::symlink_metadata(dir).is_ok() {
            self.delete_dir(dir)?;
        }
        let partial = TempDir(self.versions().join(format!("{name}{PARTIAL_SUFFIX}")));
        fs::create_dir(&partial.0).map_err(|e| io_error("could not create", &partial.0, e))?;
        let kind =
            unpack::detect(&download.0).map_err(|e| io_error("could not read", &download.0, e))?;
        let version_dir =
            Beneath::open(&partial.0).map_err(|e| io_error("could not open", &partial.0, e))?;
        self.unpack_into(order, kind, &download.0, &partial.0, &version_dir)?;
        drop(download);

        let metadata = Metadata {
            artifact: order.artifact.clone(),
            version: order.version.clone(),
            digest: expected.to_owned(),
        };
        write_metadata(&version_dir, &partial.0, &metadata)?;
        self.complete(partial, dir)
    }

    /// Fetches the artifact into a file of `tmp/` (deleted when dropped) and checks that
    /// its digest is `expected`.
    fn fetch_verified(
        &self,
        order: &Order,
        source: &Source,
        expected: &str,
    ) -> Result<TempPath, PlaceError> {
        let download = TempPath(self.tmp().join(unique("fetch")));
        let actual = fetch::fetch(
            &self.sources,
            source,
            &download.0,
            Bounds {
                timeout: self.fetch_timeout,
                max_bytes: self.limits.artifact_bytes,
                stop: &self.stop,
            },
        )?;
        if actual != expected {
            // What was fetched stays on the target: the reason goes to every caller.
            tracing::warn!(artifact = %order.artifact, version = %order.version, expected, actual, "digest mismatch");
            return Err(PlaceError::Digest {
                expected: expected.to_owned(),
            });
        }
        tracing::info!(artifact = %order.artifact, version = %order.version, digest = %actual, "fetched and verified");
        Ok(download)
    }

    /// Unpacks `download`, of `kind`, into `partial` (open as `version_dir`): a tar.gz
    /// within the limits, or the single file moved in under the artifact's name with the
    /// single-file mode.
    fn unpack_into(
        &self,
        order: &Order,
        kind: Kind,
        download: &Path,
        partial: &Path,
        version_dir: &Beneath,
    ) -> Result<(), PlaceError> {
        match kind {
            Kind::TarGz => unpack::extract_tar_gz(
                download,
                partial,
                UnpackLimits {
                    bytes: self.limits.unpacked_bytes,
                    entries: self.limits.entries,
                },
                &self.stop,
            )?,
            Kind::File => {
                let file = partial.join(&order.artifact);
                fs::rename(download, &file)
                    .map_err(|e| io_error("could not move the download to", &file, e))?;
                beneath::open_nofollow(version_dir.root(), order.artifact.as_ref())
                    .and_then(|f| {
                        rustix::fs::fchmod(
                            &f,
                            rustix::fs::Mode::from_raw_mode(self.single_file_mode),
                        )
                        .map_err(std::io::Error::from)
                    })
                    .map_err(|e| io_error("could not set permissions on", &file, e))?;
            }
        }
        Ok(())
    }

    /// Makes the unpacked `partial` directory the complete version directory `dir`: on
    /// disk first, then renamed, the rename made durable.
    fn complete(&self, partial: TempDir, dir: &Path) -> Result<(), PlaceError> {
        // Everything unpacked reaches the disk before the directory counts as complete.
        File::open(&partial.0)
            .and_then(|d| rustix::fs::syncfs(d).map_err(std::io::Error::from))
            .map_err(|e| io_error("could not flush the file system of", &partial.0, e))?;
        fs::rename(&partial.0, dir)
            .map_err(|e| io_error("could not rename the unpacked version to", dir, e))?;
        partial.disarm();
        sync_dir(&self.versions())
    }

    /// `current`'s raw link target, if `current` exists.
    fn current_target(&self) -> Result<Option<PathBuf>, PlaceError> {
        let current = self.root.join(CURRENT);
        match fs::read_link(&current) {
            Ok(target) => Ok(Some(target)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("could not read the symlink", &current, e)),
        }
    }

    /// Points `current` at `target` (relative to the root) atomically.
    fn switch(&self, target: &Path) -> Result<(), PlaceError> {
        let current = self.root.join(CURRENT);
        let tmp = self
            .root
            .join(unique(CURRENT_TMP_PREFIX.trim_end_matches('-')));
        std::os::unix::fs::symlink(target, &tmp)
            .map_err(|e| io_error("could not create the symlink", &tmp, e))?;
        if let Err(e) = fs::rename(&tmp, &current) {
            let _ = fs::remove_file(&tmp);
            return Err(io_error("could not switch", &current, e));
        }
        sync_dir(&self.root)
    }

    fn remove_current(&self) -> Result<(), PlaceError> {
        let current = self.root.join(CURRENT);
        match fs::remove_file(&current) {
            Ok(()) => sync_dir(&self.root),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("could not remove", &current, e)),
        }
    }

    /// Deletes a directory so that it disappears at once: renamed into `tmp/`, then removed.
    fn delete_dir(&self, dir: &Path) -> Result<(), PlaceError> {
        let tmp = self.tmp();
        fs::create_dir_all(&tmp).map_err(|e| io_error("could not create", &tmp, e))?;
        let doomed = tmp.join(unique("deleting"));
        fs::rename(dir, &doomed).map_err(|e| io_error("could not move away", dir, e))?;
        fs::remove_dir_all(&doomed).map_err(|e| io_error("could not delete", &doomed, e))
    }

    /// Keeps the `keep` most recently modified complete version directories, `protected`
    /// ones always among them; deletes the other complete ones.
    fn prune(&self, protected: &[PathBuf]) -> Result<(), PlaceError> {
        let mut complete = Vec::new();
        for path in read_dir(&self.versions())? {
            if has_suffix(&path, PARTIAL_SUFFIX) || read_metadata(&path).is_none() {
                continue;
            }
            let meta =
                fs::symlink_metadata(&path).map_err(|e| io_error("could not inspect", &path, e))?;
            if !meta.is_dir() {
                continue;
            }
            let modified = meta.modified().unwrap_or(UNIX_EPOCH);
            complete.push((modified, path));
        }
        complete.sort_by(|a, b| b.cmp(a));
        let mut kept = complete
            .iter()
            .filter(|(_, p)| protected.contains(p))
            .count();
        for (_, path) in complete {
            if protected.contains(&path) {
                continue;
            }
            if kept < self.keep {
                kept += 1;
                continue;
            }
            self.delete_dir(&path)?;
            tracing::info!(dir = %path.display(), "pruned old version");
        }
        Ok(())
    }
}

/// Writes [`METADATA_FILE`] into the unpacked directory `partial` (open as
/// `version_dir`).
fn write_metadata(
    version_dir: &Beneath,
    partial: &Path,
    metadata: &Metadata,
) -> Result<(), PlaceError> {
    let metadata_path = partial.join(METADATA_FILE);
    let json = serde_json::to_vec_pretty(metadata)
        .map_err(|e| PlaceError::Io(format!("could not encode {METADATA_FILE}: {e}")))?;
    // Never through a link, never over something the archive put there.
    let mut file = beneath::create_new_file(version_dir.root(), METADATA_FILE.as_ref(), 0o644)
        .map_err(|e| io_error("could not create", &metadata_path, e))?;
    file.write_all(&json)
        .map_err(|e| io_error("could not write", &metadata_path, e))
}

/// Sets the modification time of the version directory `dir` to now: pruning keeps the
/// most recently switched-to versions. A failure is only logged.
fn touch(dir: &Path) {
    let touched = fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::DIRECTORY).bits() as i32)
        .open(dir)
        .and_then(|d| d.set_modified(SystemTime::now()));
    if let Err(e) = touched {
        tracing::warn!(dir = %dir.display(), error = %e, "could not touch the version directory");
    }
}

impl From<&OnDisk> for Metadata {
    fn from(on_disk: &OnDisk) -> Self {
        Self {
            artifact: on_disk.artifact.clone(),
            version: on_disk.version.clone(),
            digest: on_disk.digest.clone(),
        }
    }
}

/// A file deleted when dropped (it may already be gone).
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A directory deleted when dropped, unless disarmed.
struct TempDir(PathBuf);

impl TempDir {
    fn disarm(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

fn dir_name(artifact: &str, version: &str) -> String {
    format!("{artifact}-{version}")
}

/// `sha256:<64 hex>`, lowercased.
fn normalize_digest(digest: &str) -> Result<String, PlaceError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            PlaceError::InvalidOrder(format!("digest `{digest}` is not sha256:<64 hex digits>"))
        })?;
    Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
}

/// Names become path components: one component, not hidden, not a `.partial` leftover.
fn check_name(what: &str, name: &str) -> Result<(), PlaceError> {
    let bad = name.is_empty()
        || name.len() > 200
        || name.starts_with('.')
        || name.ends_with(PARTIAL_SUFFIX)
        || name.contains(['/', '\0']);
    if bad {
        Err(PlaceError::InvalidOrder(format!(
            "{what} `{name}` must be one path component of 1 to 200 bytes, without `/`, a leading `.` or a `.partial` suffix"
        )))
    } else {
        Ok(())
    }
}

fn read_metadata(dir: &Path) -> Option<Metadata> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(dir.join(METADATA_FILE))
        .ok()?
        .take(64 * 1024)
        .read_to_end(&mut bytes)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, PlaceError> {
    let entries = fs::read_dir(dir).map_err(|e| io_error("could not list", dir, e))?;
    entries
        .map(|entry| {
            entry
                .map(|e| e.path())
                .map_err(|e| io_error("could not list", dir, e))
        })
        .collect()
}

fn remove_any(path: &Path) -> Result<(), PlaceError> {
    let meta = fs::symlink_metadata(path).map_err(|e| io_error("could not inspect", path, e))?;
    let result = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    result.map_err(|e| io_error("could not delete", path, e))
}

fn has_suffix(path: &Path, suffix: &str) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(suffix))
}

fn has_prefix(path: &Path, prefix: &str) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(prefix))
}

/// Makes a rename or unlink in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), PlaceError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("could not sync", dir, e))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> PlaceError {
    PlaceError::Io(format!("{what} {}: {e}", path.display()))
}

/// A name no other run (in this process or another) is using: `<prefix>-<pid>-<nanos>-<n>`.
fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
