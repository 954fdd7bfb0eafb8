//! Extraction edge cases against real temp directories: archives built header by header
//! (so that names and link targets are exactly what an attacker would write), extracted
//! into `root/version/` with `root/outside` next to it as the file an escape would reach.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use tar::{EntryType, Header};

use super::unpack::{extract_tar_gz, UnpackLimits};
use super::{PlaceError, Stop};

/// One raw entry: type, name, link target, content, mode.
struct E<'a>(EntryType, &'a str, &'a str, &'a [u8], u32);

fn file<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
    E(EntryType::Regular, name, "", data, 0o644)
}

fn symlink<'a>(name: &'a str, target: &'a str) -> E<'a> {
    E(EntryType::Symlink, name, target, b"", 0o777)
}

fn hard_link<'a>(name: &'a str, target: &'a str) -> E<'a> {
    E(EntryType::Link, name, target, b"", 0o644)
}

/// A tar.gz of `entries`, names and link targets written raw into v7 headers.
fn archive(entries: &[E<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for E(kind, name, link, data, mode) in entries {
        let mut header = Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(*mode);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

struct Fx {
    dir: tempfile::TempDir,
}

impl Fx {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("version")).unwrap();
        fs::write(dir.path().join("outside"), b"untouched").unwrap();
        Self { dir }
    }

    fn version(&self) -> PathBuf {
        self.dir.path().join("version")
    }

    fn extract(&self, entries: &[E<'_>]) -> Result<(), PlaceError> {
        self.extract_limited(
            entries,
            UnpackLimits {
                bytes: 1 << 20,
                entries: 100,
            },
        )
    }

    fn extract_limited(&self, entries: &[E<'_>], limits: UnpackLimits) -> Result<(), PlaceError> {
        let path = self.dir.path().join("a.tar.gz");
        fs::write(&path, archive(entries)).unwrap();
        let result = extract_tar_gz(&path, &self.version(), limits, &Stop::default());
        fs::remove_file(&path).unwrap();
        result
    }

    /// Nothing was written next to the version directory.
    fn assert_outside_untouched(&self) {
        assert_eq!(
            fs::read(self.dir.path().join("outside")).unwrap(),
            b"untouched"
        );
        let mut names: Vec<String> = fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["outside", "version"]);
    }
}

fn unpack_error(result: Result<(), PlaceError>) -> String {
    match result {
        Err(PlaceError::Unpack(why)) => why,
        other => panic!("expected an unpack error, got {other:?}"),
    }
}

#[test]
fn a_symlink_chain_cannot_carry_a_write_or_a_link_outside() {
    let fx = Fx::new();
    // `a -> .`, so `a/a/x` is `x`, and `../../outside` from there is two levels above the
    // version directory although the text `a/a/../../outside` stays inside.
    let why =
        unpack_error(fx.extract(&[symlink("a", "."), symlink("a/a/escape", "../../outside")]));
    assert!(why.contains("resolves outside"), "{why}");
    fx.assert_outside_untouched();

    // A link whose text stays inside but whose real resolution does not: `d -> .`, then
    // `e -> d/..` is the parent of the version directory.
    let fx = Fx::new();
    let why = unpack_error(fx.extract(&[symlink("d", "."), symlink("e", "d/..")]));
    assert!(why.contains("`e` resolves outside"), "{why}");

    // A file written through a link planted by the chain: refused by the kernel.
    let fx = Fx::new();
    let why = unpack_error(fx.extract(&[
        symlink("a", "."),
        symlink("a/a/b", ".."),
        file("b/escape", b"pwned"),
    ]));
    assert!(why.contains("escape"), "{why}");
    fx.assert_outside_untouched();
}

#[test]
fn the_metadata_file_cannot_be_planted_through_a_chain() {
    let fx = Fx::new();
    let why =
        unpack_error(fx.extract(&[symlink("a", "."), file("a/a/.agent-version.json", b"{}")]));
    assert!(why.contains("metadata file"), "{why}");
    assert!(!fx.version().join(".agent-version.json").exists());
    let fx = Fx::new();
    let why = unpack_error(fx.extract(&[
        symlink("a", "."),
        E(
            EntryType::Directory,
            "a/.agent-version.json/",
            "",
            b"",
            0o755,
        ),
    ]));
    assert!(why.contains("metadata file"), "{why}");
    assert!(!fx.version().join(".agent-version.json").exists());
    // Deeper down the name is an ordinary file.
    let fx = Fx::new();
    fx.extract(&[file("docs/.agent-version.json", b"{}")])
        .unwrap();
}

#[test]
fn absolute_and_climbing_links_and_names_are_refused() {
    for (entries, needle) in [
        (vec![symlink("l", "/etc/hostname")], "points outside"),
        (vec![symlink("sub/l", "../../outside")], "points outside"),
        (vec![file("../outside", b"pwned")], "climbs out"),
        (vec![file("ok/../../outside", b"pwned")], "climbs out"),
        (vec![file("/tmp/abs", b"pwned")], "is absolute"),
        // A dangling link cannot be checked, and could be completed later to lead out.
        (vec![symlink("l", "missing/file")], "does not resolve"),
    ] {
        let fx = Fx::new();
        let why = unpack_error(fx.extract(&entries));
        assert!(why.contains(needle), "{why}");
        fx.assert_outside_untouched();
    }
}

#[test]
fn links_inside_work_and_writes_follow_them_only_inside() {
    let fx = Fx::new();
    fx.extract(&[
        file("lib/run", b"#!/bin/sh\n"),
        symlink("bin", "lib"),
        file("bin/other", b"x"),
        hard_link("run-again", "lib/run"),
    ])
    .unwrap();
    assert_eq!(fs::read(fx.version().join("lib/other")).unwrap(), b"x");
    assert_eq!(
        fs::read(fx.version().join("run-again")).unwrap(),
        b"#!/bin/sh\n"
    );
    assert_eq!(
        fs::read_link(fx.version().join("bin")).unwrap(),
        Path::new("lib")
    );
}

#[test]
fn hard_links_out_of_the_archive_are_refused() {
    let outside = Fx::new();
    let abs = outside.dir.path().join("outside");
    for target in [
        "../outside",
        "/etc/hostname",
        abs.to_str().unwrap(),
        "missing",
    ] {
        let fx = Fx::new();
        let why = unpack_error(fx.extract(&[hard_link("h", target)]));
        assert!(
            why.contains("does not point at a file of the archive"),
            "{why}"
        );
        fx.assert_outside_untouched();
    }
    // Through a link to a directory of the archive that leads nowhere outside, and to a
    // symlink (never followed): refused too.
    let fx = Fx::new();
    let why = unpack_error(fx.extract(&[file("f", b"x"), symlink("s", "f"), hard_link("h", "s")]));
    assert!(why.contains("does not point at a file"), "{why}");
}

#[test]
fn devices_and_fifos_are_refused() {
    for kind in [EntryType::Char, EntryType::Block, EntryType::Fifo] {
        let fx = Fx::new();
        let why = unpack_error(fx.extract(&[E(kind, "dev", "", b"", 0o666)]));
        assert!(why.contains("unsupported type"), "{kind:?}: {why}");
        assert!(fs::symlink_metadata(fx.version().join("dev")).is_err());
    }
}

#[test]
fn too_many_entries_are_refused() {
    let fx = Fx::new();
    let names: Vec<String> = (0..11).map(|i| format!("f{i}")).collect();
    let entries: Vec<E<'_>> = names.iter().map(|n| file(n, b"x")).collect();
    let limits = UnpackLimits {
        bytes: 1 << 20,
        entries: 10,
    };
    let why = unpack_error(fx.extract_limited(&entries, limits));
    assert!(why.contains("more than 10 entries"), "{why}");
    fx.extract_limited(&entries[..10], limits).unwrap();
}

#[test]
fn more_unpacked_bytes_than_the_limit_are_refused() {
    let limits = UnpackLimits {
        bytes: 10_000,
        entries: 100,
    };
    // One big file (a gzip bomb in miniature: zeros compress well), then many small ones.
    let zeros = vec![0u8; 10_001];
    let fx = Fx::new();
    let why = unpack_error(fx.extract_limited(&[file("big", &zeros)], limits));
    assert!(why.contains("more than 10000 bytes"), "{why}");
    let chunk = vec![0u8; 4_000];
    let fx = Fx::new();
    let why = unpack_error(fx.extract_limited(
        &[file("a", &chunk), file("b", &chunk), file("c", &chunk)],
        limits,
    ));
    assert!(why.contains("more than 10000 bytes"), "{why}");
    assert!(!fx.version().join("c").exists());
    fx.extract_limited(&[file("a2", &chunk), file("b2", &chunk)], limits)
        .unwrap();
}

#[test]
fn file_modes_come_from_the_archive_without_special_bits() {
    let fx = Fx::new();
    fx.extract(&[
        E(EntryType::Regular, "run", "", b"x", 0o6777),
        E(EntryType::Regular, "data", "", b"x", 0o600),
        E(EntryType::Regular, "shared", "", b"x", 0o666),
        E(EntryType::Regular, "tool", "", b"x", 0o700),
    ])
    .unwrap();
    let mode = |n: &str| {
        fs::metadata(fx.version().join(n))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("run"), 0o755);
    assert_eq!(mode("data"), 0o644);
    assert_eq!(mode("shared"), 0o644);
    assert_eq!(mode("tool"), 0o755);
}

#[test]
fn a_stopped_agent_abandons_the_unpack() {
    let fx = Fx::new();
    let path = fx.dir.path().join("a.tar.gz");
    fs::write(&path, archive(&[file("a", b"x")])).unwrap();
    let stop = Stop::default();
    stop.stop();
    let result = extract_tar_gz(
        &path,
        &fx.version(),
        UnpackLimits {
            bytes: 100,
            entries: 100,
        },
        &stop,
    );
    assert_eq!(result, Err(PlaceError::Cancelled));
    assert!(!fx.version().join("a").exists());
}

/// A tar.gz whose entry names need extension headers: a GNU long name, a pax `path`
/// record, and a GNU long link target.
fn archive_with_extensions(long: &str, pax: &str, link: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut header = Header::new_gnu();
    header.set_size(4);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, long, &b"long"[..])
        .unwrap();
    // A pax header (type `x`) with one `path` record, then a plain entry it renames.
    let record = format!("path={pax}\n");
    let mut len = record.len() + 3;
    if format!("{len} {record}").len() != len {
        len += 1;
    }
    let pax_data = format!("{len} {record}");
    let mut header = Header::new_ustar();
    header.set_entry_type(EntryType::XHeader);
    header.set_size(pax_data.len() as u64);
    header.set_path("PaxHeader").unwrap();
    header.set_cksum();
    builder.append(&header, pax_data.as_bytes()).unwrap();
    let mut header = Header::new_ustar();
    header.set_size(3);
    header.set_mode(0o644);
    header.set_path("short-name").unwrap();
    header.set_cksum();
    builder.append(&header, &b"pax"[..]).unwrap();
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Symlink);
    header.set_size(0);
    builder.append_link(&mut header, "link", link).unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

#[test]
fn long_names_from_gnu_and_pax_headers_are_honoured() {
    let fx = Fx::new();
    let long = format!("{}/file", "d".repeat(150));
    let pax = format!("{}/pax-file", "p".repeat(120));
    let path = fx.dir.path().join("a.tar.gz");
    fs::write(&path, archive_with_extensions(&long, &pax, &long)).unwrap();
    extract_tar_gz(
        &path,
        &fx.version(),
        UnpackLimits {
            bytes: 100,
            entries: 100,
        },
        &Stop::default(),
    )
    .unwrap();
    assert_eq!(fs::read(fx.version().join(&long)).unwrap(), b"long");
    assert_eq!(fs::read(fx.version().join(&pax)).unwrap(), b"pax");
    assert!(!fx.version().join("short-name").exists());
    assert_eq!(fs::read(fx.version().join("link")).unwrap(), b"long");

    // A long name that climbs out is refused like a short one.
    let fx = Fx::new();
    let climbing = format!("{}/../../../outside", "d".repeat(150));
    fs::write(&path, archive_with_extensions(&long, &climbing, &long)).unwrap();
    let why = unpack_error(extract_tar_gz(
        &path,
        &fx.version(),
        UnpackLimits {
            bytes: 100,
            entries: 100,
        },
        &Stop::default(),
    ));
    assert!(why.contains("climbs out"), "{why}");
    fx.assert_outside_untouched();
}
