//! Payload kinds and tar.gz extraction that cannot write outside the version directory,
//! whatever the archive holds.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use tar::EntryType;

use super::beneath::{self, is_escape, Beneath};
use super::placer::METADATA_FILE;
use super::{PlaceError, Stop};

/// What a verified payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// gzip (magic `1f 8b`) whose first decompressed block is a tar header.
    TarGz,
    /// Anything else: placed as one file.
    File,
}

/// Looks at the start of `path` to tell a tar.gz from a single file.
pub(super) fn detect(path: &Path) -> std::io::Result<Kind> {
    let mut file = File::open(path)?;
    let mut magic = [0u8; 2];
    if read_full(&mut file, &mut magic)? < 2 || magic != [0x1f, 0x8b] {
        return Ok(Kind::File);
    }
    let mut block = [0u8; 512];
    let gz = MultiGzDecoder::new(BufReader::new(File::open(path)?));
    // A gzip that does not even decompress is not a tar.gz: it is placed as it is.
    match read_full(gz, &mut block) {
        Ok(512) if is_tar_header(&block) => Ok(Kind::TarGz),
        _ => Ok(Kind::File),
    }
}

/// Limits on what one archive may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes of file content written, all files together.
    pub bytes: u64,
    /// Tar entries (files, directories, links and extension headers).
    pub entries: u64,
}

/// The largest GNU long name or pax extension entry read (they are held in memory).
const MAX_META_BYTES: u64 = 64 * 1024;

/// Extracts the tar.gz at `archive` into the existing directory `dest`, every path resolved
/// beneath `dest` by the kernel (see `beneath`). Refused: absolute paths and `..`,
/// symlinks with an absolute target or that do not resolve to an entry beneath `dest`
/// (checked by the kernel once everything is unpacked, so chains of links are followed as
/// they really are), hard links to anything but a regular file beneath `dest`, devices,
/// fifos, sparse files, the metadata file in `dest` itself, and more than `limits` allow.
/// File modes come from the archive, reduced to `0o755` (executable) or `0o644`.
///
/// Long by design: every refusal above is a check in one pass over the entries, in the
/// order an attacker's archive meets them; split, the order would be harder to review.
pub(super) fn extract_tar_gz(
    archive: &Path,
    dest: &Path,
    limits: UnpackLimits,
    stop: &Stop,
) -> Result<(), PlaceError> {
    let file = File::open(archive)
        .map_err(|e| PlaceError::Io(format!("could not open {}: {e}", archive.display())))?;
    let mut tar = tar::Archive::new(MultiGzDecoder::new(BufReader::new(file)));
    let beneath = Beneath::open(dest)
        .map_err(|e| PlaceError::Io(format!("could not open {}: {e}", dest.display())))?;
    // Raw entries: extension headers are folded here, with a size cap, instead of being
    // read whole into memory by the tar crate.
    let entries = tar
        .entries()
        .map_err(|e| PlaceError::Unpack(format!("not a readable tar: {e}")))?
        .raw(true);
    let mut count: u64 = 0;
    let mut written: u64 = 0;
    let mut links: Vec<PathBuf> = Vec::new();
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax_path: Option<Vec<u8>> = None;
    let mut pax_link: Option<Vec<u8>> = None;
    for entry in entries {
        stop.check()?;
        let mut entry = entry.map_err(|e| PlaceError::Unpack(format!("corrupt tar entry: {e}")))?;
        count += 1;
        if count > limits.entries {
            return Err(PlaceError::Unpack(format!(
                "the archive has more than {} entries (--max-entries)",
                limits.entries
            )));
        }
        let kind = entry.header().entry_type();
        match kind {
            EntryType::GNULongName => {
                long_name = Some(trim_nul(read_meta(&mut entry)?));
                continue;
            }
            EntryType::GNULongLink => {
                long_link = Some(trim_nul(read_meta(&mut entry)?));
                continue;
            }
            EntryType::XHeader => {
                let data = read_meta(&mut entry)?;
                for ext in tar::PaxExtensions::new(&data) {
                    let ext = ext.map_err(|e| {
                        PlaceError::Unpack(format!("corrupt pax extension header: {e}"))
                    })?;
                    match ext.key_bytes() {
                        b"path" => pax_path = Some(ext.value_bytes().to_vec()),
                        b"linkpath" => pax_link = Some(ext.value_bytes().to_vec()),
                        b"size" | b"GNU.sparse.map" | b"GNU.sparse.size" => {
                            return Err(PlaceError::Unpack(
                                "pax size and sparse extensions are not supported".into(),
                            ))
                        }
                        _ => {}
                    }
                }
                continue;
            }
            EntryType::XGlobalHeader => {
                read_meta(&mut entry)?;
                continue;
            }
            _ => {}
        }
        let path_bytes = pax_path
            .take()
            .or(long_name.take())
            .unwrap_or_else(|| entry.path_bytes().into_owned());
        let link_bytes = pax_link
            .take()
            .or(long_link.take())
            .or_else(|| entry.link_name_bytes().map(|b| b.into_owned()));
        let path = PathBuf::from(OsString::from_vec(path_bytes));
        let shown = path.display().to_string();
        let inside = entry_path(&path).ok_or_else(|| {
            PlaceError::Unpack(format!(
                "entry `{shown}` is absolute or climbs out with `..`"
            ))
        })?;
        let entry_error = |e: std::io::Error| {
            if is_escape(&e) {
                PlaceError::Unpack(format!("entry `{shown}` escapes the version directory"))
            } else {
                PlaceError::Unpack(format!("entry `{shown}`: {e}"))
            }
        };
        let Some(name) = inside.file_name().map(ToOwned::to_owned) else {
            if kind == EntryType::Directory {
                // `./`: the version directory itself.
                continue;
            }
            return Err(PlaceError::Unpack(format!(
                "entry `{shown}` is not a directory but names the version directory"
            )));
        };
        let parent = inside.parent().unwrap_or(Path::new("")).to_path_buf();
        let dir = beneath.create_dirs(&parent).map_err(entry_error)?;
        // Also when reached through a link such as `a -> .` (`a/a/.agent-version.json`).
        if name == METADATA_FILE && beneath.is_root(&dir).map_err(entry_error)? {
            return Err(PlaceError::Unpack(format!(
                "entry `{shown}` would replace the agent's metadata file"
            )));
        }
        match kind {
            EntryType::Directory => {
                beneath.create_dirs(&inside).map_err(entry_error)?;
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = entry
                    .header()
                    .size()
                    .map_err(|e| PlaceError::Unpack(format!("entry `{shown}`: {e}")))?;
                if written.saturating_add(size) > limits.bytes {
                    return Err(too_big(limits));
                }
                let mode = entry.header().mode().unwrap_or(0o644);
                let mut out = beneath::create_file(&dir, &name, file_mode(mode)).map_err(entry_error)?;
                let copied = copy_limited(&mut entry, &mut out, limits.bytes - written, stop)
                    .map_err(|e| match e {
                        Copy::Limit => too_big(limits),
                        Copy::Stopped => PlaceError::Cancelled,
                        Copy::Io(e) => PlaceError::Unpack(format!("entry `{shown}`: {e}")),
                    })?;
                written += copied;
            }
            EntryType::Symlink => {
                let target = PathBuf::from(OsString::from_vec(link_bytes.ok_or_else(|| {
                    PlaceError::Unpack(format!("link `{shown}` has no target"))
                })?));
                // Early and readable; the real check is the kernel's, once all is unpacked.
                if target.is_absolute() || !lexically_inside(&parent.join(&target)) {
                    return Err(PlaceError::Unpack(format!(
                        "link `{shown}` -> `{}` points outside the version directory",
                        target.display()
                    )));
                }
                beneath::symlink(&dir, &name, &target).map_err(entry_error)?;
                links.push(inside);
            }
            EntryType::Link => {
                let target = PathBuf::from(OsString::from_vec(link_bytes.ok_or_else(|| {
                    PlaceError::Unpack(format!("link `{shown}` has no target"))
                })?));
                let refused = || {
                    PlaceError::Unpack(format!(
                        "hard link `{shown}` -> `{}` does not point at a file of the archive",
                        target.display()
                    ))
                };
                // A hard link's target is relative to the archive root.
                let target_inside = entry_path(&target).ok_or_else(refused)?;
                let target_name = target_inside.file_name().ok_or_else(refused)?.to_owned();
                let target_parent = target_inside.parent().unwrap_or(Path::new("")).to_path_buf();
                let target_dir = beneath.create_dirs(&target_parent).map_err(|_| refused())?;
                beneath::hard_link(&target_dir, &target_name, &dir, &name)
                    .map_err(|_| refused())?;
            }
            EntryType::GNUSparse => {
                return Err(PlaceError::Unpack(format!(
                    "entry `{shown}` is a sparse file, which is not supported"
                )))
            }
            other => {
                return Err(PlaceError::Unpack(format!(
                    "entry `{shown}` has an unsupported type ({other:?}): only files, directories and links"
                )))
            }
        }
    }
    // Every symlink must resolve, as the kernel follows it now that all is in place, to an
    // entry beneath the version directory.
    for link in links {
        if let Err(e) = beneath.check_resolves(&link) {
            let why = if is_escape(&e) {
                "resolves outside the version directory".to_owned()
            } else if e.kind() == std::io::ErrorKind::NotFound {
                "does not resolve to an entry of the archive".to_owned()
            } else {
                format!("does not resolve: {e}")
            };
            return Err(PlaceError::Unpack(format!(
                "link `{}` {why}",
                link.display()
            )));
        }
    }
    Ok(())
}

fn too_big(limits: UnpackLimits) -> PlaceError {
    PlaceError::Unpack(format!(
        "the archive unpacks to more than {} bytes (--max-unpacked-bytes)",
        limits.bytes
    ))
}

/// A GNU long name or pax extension entry's content, at most [`MAX_META_BYTES`].
fn read_meta(entry: &mut impl Read) -> Result<Vec<u8>, PlaceError> {
    let mut data = Vec::new();
    entry
        .take(MAX_META_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(|e| PlaceError::Unpack(format!("corrupt tar extension header: {e}")))?;
    if data.len() as u64 > MAX_META_BYTES {
        return Err(PlaceError::Unpack(format!(
            "a tar extension header is larger than {MAX_META_BYTES} bytes"
        )));
    }
    Ok(data)
}

fn trim_nul(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

/// The mode a file gets: `0o755` if the archive marks it executable for anyone, `0o644`
/// otherwise; never setuid, setgid, sticky or writable by group or others.
pub(super) fn file_mode(archive_mode: u32) -> u32 {
    if archive_mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// Why [`copy_limited`] stopped early.
pub(super) enum Copy {
    /// More than the limit was offered.
    Limit,
    /// The agent is stopping.
    Stopped,
    /// Reading or writing failed.
    Io(std::io::Error),
}

/// Copies `from` into `to`, at most `limit` bytes (one more is an error), checking `stop`
/// between chunks; returns the bytes copied.
pub(super) fn copy_limited(
    from: &mut impl Read,
    to: &mut impl Write,
    limit: u64,
    stop: &Stop,
) -> Result<u64, Copy> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut copied: u64 = 0;
    loop {
        if stop.stopped() {
            return Err(Copy::Stopped);
        }
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Copy::Io(e)),
        };
        copied += n as u64;
        if copied > limit {
            return Err(Copy::Limit);
        }
        to.write_all(&buf[..n]).map_err(Copy::Io)?;
    }
}

/// An entry's path made of normal components only (`.` dropped), or `None` if it is
/// absolute or has a `..` anywhere.
fn entry_path(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Whether `path` stays inside by its text alone (`..` pops a component). Not enough on its
/// own (symlinks change what `..` means); the kernel checks every link afterwards.
fn lexically_inside(path: &Path) -> bool {
    let mut depth: usize = 0;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// A POSIX/GNU/v7 header block: its checksum matches, or it is all zeros (an empty archive).
fn is_tar_header(block: &[u8; 512]) -> bool {
    if block.iter().all(|&b| b == 0) {
        return true;
    }
    let field = &block[148..156];
    let digits = field
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|&&b| (b'0'..=b'7').contains(&b));
    let mut stored: u32 = 0;
    let mut any = false;
    for &d in digits {
        stored = stored.saturating_mul(8).saturating_add(u32::from(d - b'0'));
        any = true;
    }
    if !any {
        return false;
    }
    let unsigned: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u32::from(b' ')
            } else {
                u32::from(b)
            }
        })
        .sum();
    // Some old tars summed signed bytes.
    let signed: i64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                i64::from(b' ')
            } else {
                i64::from(b as i8)
            }
        })
        .sum();
    stored == unsigned || i64::from(stored) == signed
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(mut from: impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match from.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
