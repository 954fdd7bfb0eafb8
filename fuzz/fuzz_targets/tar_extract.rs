//! Archive placement through the agent's public `Placer`: the input is an uncompressed tar
//! stream (so the fuzzer mutates headers, names and link targets rather than gzip), gzipped
//! here and placed from an allowed `file://` directory with the digest it really has.
//!
//! Whatever the archive holds, after `place` (success or failure):
//! - nothing exists in the sandbox but the agent's root and the source directory, and the
//!   file `outside` next to them is unchanged (an escape would write there first: seeds name
//!   it through `..`, absolute paths and symlink chains);
//! - every symlink under the root that resolves at all resolves beneath the root;
//! - no file under the root is setuid, setgid, sticky or writable by others, and none is a
//!   device, FIFO or socket.
#![no_main]

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use deploy_agent::place::{Limits, Order, Placer, Sources};
use flate2::write::GzEncoder;
use flate2::Compression;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const OUTSIDE: &[u8] = b"untouched";

fuzz_target!(|tar: &[u8]| {
    let sandbox = tempfile::tempdir().expect("temp dir");
    let base = sandbox.path();
    let src = base.join("src");
    let root = base.join("root");
    fs::create_dir(&src).expect("src dir");
    fs::write(base.join("outside"), OUTSIDE).expect("outside file");

    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(tar).expect("gzip");
    let payload = gz.finish().expect("gzip");
    let archive = src.join("a.tar.gz");
    fs::write(&archive, &payload).expect("archive");

    let sources = Sources::default()
        .allow_file_dir(&src)
        .expect("allowed dir");
    let placer = Placer::new(&root, 2)
        .with_sources(sources)
        .with_limits(Limits {
            artifact_bytes: 1 << 20,
            unpacked_bytes: 1 << 20,
            entries: 256,
        });
    let order = Order {
        artifact: "app".into(),
        version: "1.0.0".into(),
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&payload))),
        source_uri: format!("file://{}", archive.display()),
    };
    let _ = placer.place(&order);

    let mut names: Vec<_> = fs::read_dir(base)
        .expect("sandbox")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    let allowed = ["outside", "root", "src"];
    assert!(
        names.iter().all(|n| allowed.contains(&n.as_str())),
        "written outside the root: {names:?}"
    );
    assert_eq!(fs::read(base.join("outside")).expect("outside"), OUTSIDE);
    let src_names: Vec<_> = fs::read_dir(&src).expect("src").collect();
    assert_eq!(src_names.len(), 1, "written into the source directory");
    if root.exists() {
        let root = root.canonicalize().expect("root");
        check_tree(&root, &root);
    }
});

fn check_tree(root: &Path, dir: &Path) {
    for entry in fs::read_dir(dir).expect("read dir") {
        let entry = entry.expect("entry");
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).expect("metadata");
        let kind = meta.file_type();
        if kind.is_symlink() {
            if let Ok(target) = path.canonicalize() {
                assert!(
                    target.starts_with(root),
                    "{} resolves outside the root: {}",
                    path.display(),
                    target.display()
                );
            }
            continue;
        }
        assert!(
            !(kind.is_block_device()
                || kind.is_char_device()
                || kind.is_fifo()
                || kind.is_socket()),
            "special file {}",
            path.display()
        );
        let mode = meta.permissions().mode();
        assert_eq!(mode & 0o7002, 0, "{} has mode {mode:o}", path.display());
        if kind.is_dir() {
            check_tree(root, &path);
        }
    }
}
