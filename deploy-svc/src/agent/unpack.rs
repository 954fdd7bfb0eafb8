//! Payload kinds and tar.gz extraction that refuses anything escaping the target directory.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use tar::EntryType;

use super::place::METADATA_FILE;
use super::PlaceError;

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

/// Extracts the tar.gz at `archive` into the existing directory `dest`. Refused: absolute
/// paths, `..`, hard links out of the archive, symlinks pointing outside `dest`, device and
/// fifo entries, and a top-level entry named like the metadata file.
pub(super) fn extract_tar_gz(archive: &Path, dest: &Path) -> Result<(), PlaceError> {
    let file = File::open(archive)
        .map_err(|e| PlaceError::Io(format!("could not open {}: {e}", archive.display())))?;
    let mut tar = tar::Archive::new(MultiGzDecoder::new(BufReader::new(file)));
    // Mode bits yes (executables stay executable), setuid/setgid/sticky and owners no.
    tar.set_preserve_permissions(false);
    tar.set_preserve_ownerships(false);
    let entries = tar
        .entries()
        .map_err(|e| PlaceError::Unpack(format!("not a readable tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| PlaceError::Unpack(format!("corrupt tar entry: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| PlaceError::Unpack(format!("entry with an unreadable path: {e}")))?
            .into_owned();
        let shown = path.display().to_string();
        let inside = inside_path(&path).ok_or_else(|| {
            PlaceError::Unpack(format!("entry `{shown}` escapes the version directory"))
        })?;
        if inside.as_os_str() == METADATA_FILE {
            return Err(PlaceError::Unpack(format!(
                "entry `{shown}` would replace the agent's metadata file"
            )));
        }
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory => {}
            EntryType::Symlink | EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| {
                        PlaceError::Unpack(format!(
                            "entry `{shown}` has an unreadable link target: {e}"
                        ))
                    })?
                    .ok_or_else(|| PlaceError::Unpack(format!("link `{shown}` has no target")))?
                    .into_owned();
                // A symlink's target is relative to the link's directory, a hard link's to
                // the archive root.
                let base = if kind == EntryType::Symlink {
                    inside.parent().map(Path::to_path_buf).unwrap_or_default()
                } else {
                    PathBuf::new()
                };
                if inside_path(&base.join(&target)).is_none() {
                    return Err(PlaceError::Unpack(format!(
                        "link `{shown}` -> `{}` points outside the version directory",
                        target.display()
                    )));
                }
            }
            // Extension headers the iterator did not fold into the next entry.
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => continue,
            other => {
                return Err(PlaceError::Unpack(format!(
                    "entry `{shown}` has an unsupported type ({other:?})"
                )))
            }
        }
        let unpacked = entry
            .unpack_in(dest)
            .map_err(|e| PlaceError::Unpack(format!("entry `{shown}`: {e}")))?;
        if !unpacked {
            return Err(PlaceError::Unpack(format!(
                "entry `{shown}` escapes the version directory"
            )));
        }
    }
    Ok(())
}

/// `path` resolved lexically inside the directory, or `None` if it is absolute or climbs
/// out with `..`.
fn inside_path(path: &Path) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => return None,
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Normal(part) => parts.push(part),
        }
    }
    Some(parts.iter().collect())
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
