//! File system operations confined to one directory by the kernel: every path is resolved
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from a descriptor of that
//! directory, so neither `..`, an absolute symlink nor a chain of symlinks (`a -> .`, then
//! `a/a/...`) can lead outside it. The last component of anything created is never followed
//! (`O_CREAT | O_EXCL | O_NOFOLLOW`, `mkdirat`, `symlinkat`, `linkat` without
//! `AT_SYMLINK_FOLLOW`).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// How every path below the directory is resolved.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// Directory permissions: the owner writes, everyone may list and enter.
pub(super) const DIR_MODE: u32 = 0o755;

/// A directory that paths are resolved beneath.
#[derive(Debug)]
pub(super) struct Beneath {
    root: OwnedFd,
}

impl Beneath {
    /// Opens `dir`, which must be a directory and not a symlink.
    pub(super) fn open(dir: &Path) -> io::Result<Self> {
        let root = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { root })
    }

    /// The directory itself.
    pub(super) fn root(&self) -> &OwnedFd {
        &self.root
    }

    /// Opens the existing directory `rel` (empty: the root itself).
    fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        Ok(rustix::fs::openat2(
            &self.root,
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )?)
    }

    /// Creates the directory `rel` and its missing parents (like `mkdir -p`) and opens it.
    /// `rel` holds only normal components; each is resolved from the root again, so that a
    /// symlink met on the way is followed only as far as it stays beneath the root.
    pub(super) fn create_dirs(&self, rel: &Path) -> io::Result<OwnedFd> {
        let mut done = PathBuf::new();
        let mut fd = self.open_dir(&done)?;
        for part in rel.iter() {
            done.push(part);
            fd = match self.open_dir(&done) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match rustix::fs::mkdirat(&fd, part, Mode::from_raw_mode(DIR_MODE)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    self.open_dir(&done)?
                }
                Err(e) => return Err(e),
            };
        }
        Ok(fd)
    }

    /// Whether `dir` is the root itself (reached through a symlink such as `a -> .`).
    pub(super) fn is_root(&self, dir: &OwnedFd) -> io::Result<bool> {
        let a = rustix::fs::fstat(&self.root)?;
        let b = rustix::fs::fstat(dir)?;
        Ok(a.st_dev == b.st_dev && a.st_ino == b.st_ino)
    }

    /// Checks that `rel` (which may be or go through symlinks) resolves to an existing file
    /// or directory beneath the root. `EXDEV` if a step leads outside, `ENOENT` if it
    /// dangles, `ELOOP` for a loop.
    pub(super) fn check_resolves(&self, rel: &Path) -> io::Result<()> {
        rustix::fs::openat2(
            &self.root,
            rel,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )?;
        Ok(())
    }
}

/// Makes room for a new entry `name` in `dir`: a file or symlink of that name (an earlier
/// entry of the archive) is unlinked, never followed; a directory is an error.
fn make_room(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Directory => {
            Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a directory of that name exists",
            ))
        }
        Ok(_) => Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?),
    }
}

/// Creates the new regular file `name` in `dir` with exactly `mode`, never following a
/// symlink; an earlier entry of the same name is replaced.
pub(super) fn create_file(dir: &OwnedFd, name: &OsStr, mode: u32) -> io::Result<File> {
    make_room(dir, name)?;
    create_new_file(dir, name, mode)
}

/// Creates the new regular file `name` in `dir` with exactly `mode`; fails if anything of
/// that name exists (a symlink included: it is not followed).
pub(super) fn create_new_file(dir: &OwnedFd, name: &OsStr, mode: u32) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    // Exactly `mode`, whatever the umask.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    Ok(File::from(fd))
}

/// Creates the symlink `name` -> `target` in `dir`, replacing an earlier file or link.
pub(super) fn symlink(dir: &OwnedFd, name: &OsStr, target: &Path) -> io::Result<()> {
    make_room(dir, name)?;
    Ok(rustix::fs::symlinkat(target, dir, name)?)
}

/// Creates the hard link `name` in `dir` to the regular file `target_name` of
/// `target_dir` (both beneath the root); the source is never followed if it is a symlink.
pub(super) fn hard_link(
    target_dir: &OwnedFd,
    target_name: &OsStr,
    dir: &OwnedFd,
    name: &OsStr,
) -> io::Result<()> {
    let stat = rustix::fs::statat(target_dir, target_name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a hard link must point at a regular file",
        ));
    }
    make_room(dir, name)?;
    Ok(rustix::fs::linkat(
        target_dir,
        target_name,
        dir,
        name,
        AtFlags::empty(),
    )?)
}

/// Opens `dir`'s child `name` for reading without following a symlink there.
pub(super) fn open_nofollow(dir: impl AsFd, name: &OsStr) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// `true` for the error the kernel gives when a resolution would leave the root.
pub(super) fn is_escape(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error())
}

/// Opens the file `rel` beneath the directory `dir` for reading (a source). Non-blocking,
/// so that a fifo cannot hang the agent; fifos, sockets and directories are refused.
pub(super) fn open_source(dir: &Path, rel: &Path) -> io::Result<File> {
    let dir = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let fd = rustix::fs::openat2(
        &dir,
        rel,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
    match kind {
        FileType::RegularFile | FileType::CharacterDevice | FileType::BlockDevice => {
            Ok(File::from(fd))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({kind:?})"),
        )),
    }
}
