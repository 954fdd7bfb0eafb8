//! Placement against real temp directories, real tar.gz files, real `sh` and a real HTTP
//! listener on 127.0.0.1.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest as _, Sha256};

use super::{Limits, Order, PlaceError, Placer, Sources, Stop};

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A tar.gz of regular files.
fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, path, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// A tar.gz with one entry whose raw name is `name` (the builder refuses `..` itself).
fn tar_gz_raw_name(name: &str, data: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder.append(&header, data).unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

/// A tar.gz with one symlink `name` -> `target`.
fn tar_gz_symlink(name: &str, target: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    builder.append_link(&mut header, name, target).unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

/// A temp dir with `root/` for the placer and `src/` for payloads.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("src")).unwrap();
        Self { dir }
    }

    /// The allow-list of these tests: `file://` beneath `src/`.
    fn sources(&self) -> Sources {
        Sources::default()
            .allow_file_dir(&self.dir.path().join("src"))
            .unwrap()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn placer(&self, keep: usize) -> Placer {
        Placer::new(self.root(), keep).with_sources(self.sources())
    }

    /// Writes `bytes` as a source file and returns an order for it.
    fn order(&self, artifact: &str, version: &str, bytes: &[u8]) -> Order {
        let src = self.dir.path().join("src");
        fs::create_dir_all(&src).unwrap();
        let path = src.join(format!("{artifact}-{version}.payload"));
        fs::write(&path, bytes).unwrap();
        Order {
            artifact: artifact.to_owned(),
            version: version.to_owned(),
            digest: digest(bytes),
            source_uri: format!("file://{}", path.display()),
        }
    }

    /// A tar.gz order whose `VERSION` file says `version`.
    fn app(&self, version: &str) -> Order {
        self.order(
            "app",
            version,
            &tar_gz(&[
                ("VERSION", version.as_bytes()),
                ("bin/run.sh", b"#!/bin/sh\necho hi\n"),
            ]),
        )
    }

    fn versions(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.root().join("versions"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn current_version(&self, placer: &Placer) -> Option<String> {
        placer.current().map(|c| c.version)
    }

    fn current_file(&self, name: &str) -> String {
        fs::read_to_string(self.root().join("current").join(name)).unwrap()
    }
}

#[test]
fn places_a_tar_gz_and_points_current_at_it() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    let order = fx.app("1.0.0");

    let placed = placer.place(&order).unwrap();

    assert!(!placed.reused);
    assert_eq!(placed.path, fx.root().join("versions/app-1.0.0"));
    assert_eq!(
        fs::read_link(fx.root().join("current")).unwrap(),
        Path::new("versions/app-1.0.0")
    );
    assert_eq!(fx.current_file("VERSION"), "1.0.0");
    assert_eq!(fx.current_file("bin/run.sh"), "#!/bin/sh\necho hi\n");
    let current = placer.current().unwrap();
    assert_eq!(
        (current.artifact.as_str(), current.version.as_str()),
        ("app", "1.0.0")
    );
    assert_eq!(current.digest, order.digest);
    assert_eq!(current.path, placed.path);
    assert!(placed.path.join(super::placer::METADATA_FILE).is_file());
    assert_eq!(fx.versions(), ["app-1.0.0"]);
    assert_eq!(fs::read_dir(fx.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn a_second_version_becomes_current_and_the_first_stays() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    placer.place(&fx.app("1")).unwrap();

    placer.place(&fx.app("2")).unwrap();

    assert_eq!(fx.current_version(&placer).as_deref(), Some("2"));
    assert_eq!(fx.current_file("VERSION"), "2");
    assert_eq!(fx.versions(), ["app-1", "app-2"]);
    assert_eq!(
        fs::read_to_string(fx.root().join("versions/app-1/VERSION")).unwrap(),
        "1"
    );
}

#[test]
fn a_wrong_digest_is_refused_before_anything_is_unpacked() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    placer.place(&fx.app("1")).unwrap();
    let mut order = fx.app("2");
    let real = order.digest.clone();
    order.digest = digest(b"something else");

    let err = placer.place(&order).unwrap_err();

    assert_eq!(
        err,
        PlaceError::Digest {
            expected: order.digest.clone(),
        }
    );
    // What was really fetched is logged on the target, never put in the reason.
    let reason = err.to_string();
    assert!(reason.starts_with("digest mismatch"), "{reason}");
    assert!(!reason.contains(&real[7..]), "{reason}");
    assert_eq!(fx.current_version(&placer).as_deref(), Some("1"));
    assert_eq!(fx.versions(), ["app-1"]);
    assert_eq!(fs::read_dir(fx.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn a_failing_health_check_switches_current_back() {
    let fx = Fixture::new();
    fx.placer(3).place(&fx.app("1")).unwrap();
    let placer = fx.placer(3).with_health_check(
        Some("echo not healthy >&2; exit 1".into()),
        Duration::from_secs(10),
    );

    let err = placer.place(&fx.app("2")).unwrap_err();

    let PlaceError::HealthCheck(why) = &err else {
        panic!("expected a health check error, got {err:?}");
    };
    assert!(why.contains("exited with status 1"), "{why}");
    assert!(
        !why.contains("not healthy"),
        "hook output stays local: {why}"
    );
    assert!(why.contains("switched back to versions/app-1"), "{why}");
    assert_eq!(fx.current_version(&placer).as_deref(), Some("1"));
    assert_eq!(fx.current_file("VERSION"), "1");
    // The new version stays on disk; pruning may remove it later.
    assert_eq!(fx.versions(), ["app-1", "app-2"]);
}

#[test]
fn a_slow_health_check_is_killed_and_current_switched_back() {
    let fx = Fixture::new();
    fx.placer(3).place(&fx.app("1")).unwrap();
    // The check writes its process id, then sleeps far longer than its 200 ms budget.
    let pid_file = fx.dir.path().join("check.pid");
    let placer = fx.placer(3).with_health_check(
        Some(format!("echo $$ > {}; exec sleep 60", pid_file.display())),
        Duration::from_millis(200),
    );

    let err = placer.place(&fx.app("2")).unwrap_err();

    // Killed: the process is gone once place returns (it would sleep for a minute).
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "health check process {} still exists",
        pid.trim()
    );
    let PlaceError::HealthCheck(why) = &err else {
        panic!("expected a health check error, got {err:?}");
    };
    assert!(
        why.contains("timed out after 200 ms and was killed"),
        "{why}"
    );
    assert_eq!(fx.current_version(&placer).as_deref(), Some("1"));
}

#[test]
fn a_failing_first_health_check_leaves_no_current() {
    let fx = Fixture::new();
    let placer = fx
        .placer(3)
        .with_health_check(Some("exit 3".into()), Duration::from_secs(10));

    let err = placer.place(&fx.app("1")).unwrap_err();

    assert!(err.to_string().contains("current removed"), "{err}");
    assert!(placer.current().is_none());
    assert!(fs::symlink_metadata(fx.root().join("current")).is_err());
}

#[test]
fn a_passing_health_check_runs_in_current_with_the_agent_environment() {
    let fx = Fixture::new();
    let placer = fx.placer(3).with_health_check(
        Some(
            r#"test "$(cat VERSION)" = "$AGENT_VERSION" && test "$AGENT_ARTIFACT" = app \
               && test "$AGENT_VERSION_DIR" = "$AGENT_ROOT/versions/app-7" && test -f .agent-version.json"#
                .into(),
        ),
        Duration::from_secs(10),
    );

    placer.place(&fx.app("7")).unwrap();

    assert_eq!(fx.current_version(&placer).as_deref(), Some("7"));
}

#[test]
fn a_failing_pre_switch_leaves_current_unchanged() {
    let fx = Fixture::new();
    fx.placer(3).place(&fx.app("1")).unwrap();
    let placer = fx.placer(3).with_pre_switch(
        Some("echo migrate failed with password=hunter2; exit 2".into()),
        Duration::from_secs(10),
    );

    let err = placer.place(&fx.app("2")).unwrap_err();

    // Which hook and how it ended; what it printed stays in the agent's log.
    assert_eq!(err, PlaceError::PreSwitch("exited with status 2".into()));
    assert_eq!(
        err.to_string(),
        "pre-switch command failed: exited with status 2"
    );
    assert_eq!(fx.current_version(&placer).as_deref(), Some("1"));
    // The command may have half-changed the new directory: it is not kept.
    assert_eq!(fx.versions(), ["app-1"]);
}

#[test]
fn the_pre_switch_runs_in_the_new_version_dir_with_the_agent_environment() {
    let fx = Fixture::new();
    let placer = fx.placer(3).with_pre_switch(
        Some(
            r#"echo "$AGENT_ARTIFACT $AGENT_VERSION $AGENT_VERSION_DIR $AGENT_ROOT $(pwd -P)" > rendered"#
                .into(),
        ),
        Duration::from_secs(10),
    );

    let placed = placer.place(&fx.app("5")).unwrap();

    let root = fs::canonicalize(fx.root()).unwrap();
    let dir = root.join("versions/app-5");
    assert_eq!(placed.path, fx.root().join("versions/app-5"));
    assert_eq!(
        fx.current_file("rendered"),
        format!(
            "app 5 {} {} {}\n",
            fx.root().join("versions/app-5").display(),
            fx.root().display(),
            dir.display()
        )
    );
}

#[test]
fn a_single_file_artifact_is_placed_under_its_name() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    let order = fx.order("tool", "2.1", b"\x7fELF pretend binary");

    let placed = placer.place(&order).unwrap();

    let file = placed.path.join("tool");
    assert_eq!(fs::read(&file).unwrap(), b"\x7fELF pretend binary");
    assert_eq!(fx.current_file("tool"), "\x7fELF pretend binary");
    // Not executable unless the agent is told so.
    assert_eq!(mode(&file), 0o644);
    assert_eq!(placer.current().unwrap().artifact, "tool");

    let executable = fx.placer(3).with_single_file_mode(0o4777);
    let placed = executable
        .place(&fx.order("tool", "2.2", b"\x7fELF another"))
        .unwrap();
    assert_eq!(mode(&placed.path.join("tool")), 0o755, "masked to 755");
}

#[test]
fn a_gzip_that_is_not_a_tar_is_a_single_file() {
    let fx = Fixture::new();
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(b"just some compressed text, no tar header here")
        .unwrap();
    let bytes = gz.finish().unwrap();
    let placer = fx.placer(3);

    let placed = placer.place(&fx.order("data.gz", "1", &bytes)).unwrap();

    assert_eq!(fs::read(placed.path.join("data.gz")).unwrap(), bytes);
}

#[test]
fn placing_the_current_version_again_reuses_it_without_reading_the_source() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    let order = fx.app("1");
    placer.place(&order).unwrap();
    let source = order.source_uri.strip_prefix("file://").unwrap();
    fs::remove_file(source).unwrap();

    let placed = placer.place(&order).unwrap();

    assert!(placed.reused);
    assert_eq!(placed.path, fx.root().join("versions/app-1"));
    // The source really is gone: a version that is not on disk cannot be placed from it.
    let mut other = order.clone();
    other.version = "2".into();
    assert!(
        matches!(placer.place(&other), Err(PlaceError::Fetch(_))),
        "{:?}",
        placer.place(&other)
    );
}

#[test]
fn switching_back_to_a_complete_older_version_does_not_fetch() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    let first = fx.app("1");
    placer.place(&first).unwrap();
    placer.place(&fx.app("2")).unwrap();
    fs::remove_file(first.source_uri.strip_prefix("file://").unwrap()).unwrap();

    let placed = placer.place(&first).unwrap();

    assert!(!placed.reused);
    assert_eq!(fx.current_version(&placer).as_deref(), Some("1"));
}

#[test]
fn remove_drops_current_and_the_version_dir_and_is_idempotent() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    placer.place(&fx.app("1")).unwrap();
    placer.place(&fx.app("2")).unwrap();

    placer.remove("app", "1").unwrap();
    assert_eq!(fx.versions(), ["app-2"]);
    assert_eq!(fx.current_version(&placer).as_deref(), Some("2"));

    placer.remove("app", "2").unwrap();
    assert!(placer.current().is_none());
    assert!(fs::symlink_metadata(fx.root().join("current")).is_err());
    assert!(fx.versions().is_empty());

    placer.remove("app", "2").unwrap();
    Placer::new(fx.dir.path().join("never-used"), 2)
        .remove("app", "1")
        .unwrap();
}

#[test]
fn entries_escaping_the_version_dir_are_refused() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    placer.place(&fx.app("1")).unwrap();

    for (version, payload, needle) in [
        (
            "2",
            tar_gz_raw_name("../evil", b"x"),
            "`../evil` is absolute or climbs out",
        ),
        ("3", tar_gz_raw_name("a/../../evil", b"x"), "climbs out"),
        (
            "4",
            tar_gz_raw_name("/tmp/evil", b"x"),
            "`/tmp/evil` is absolute",
        ),
        (
            "5",
            tar_gz_symlink("link", "../../outside"),
            "points outside",
        ),
        ("6", tar_gz_symlink("link", "/etc"), "points outside"),
        (
            "7",
            tar_gz_raw_name(".agent-version.json", b"{}"),
            "metadata file",
        ),
    ] {
        let err = placer
            .place(&fx.order("app", version, &payload))
            .unwrap_err();
        let PlaceError::Unpack(why) = &err else {
            panic!("version {version}: expected an unpack error, got {err:?}");
        };
        assert!(why.contains(needle), "version {version}: {why}");
    }

    assert!(!fx.root().join("evil").exists());
    assert!(!fx.dir.path().join("evil").exists());
    assert_eq!(fx.current_version(&placer).as_deref(), Some("1"));
    assert_eq!(fx.versions(), ["app-1"]);
}

#[test]
fn a_symlink_staying_inside_is_fine() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o755);
    header.set_cksum();
    builder
        .append_data(&mut header, "lib/run", &b"#!x"[..])
        .unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    builder
        .append_link(&mut header, "bin/run", "../lib/run")
        .unwrap();
    let payload = builder.into_inner().unwrap().finish().unwrap();
    let placed = placer.place(&fx.order("app", "1", &payload)).unwrap();
    assert_eq!(
        fs::read_link(placed.path.join("bin/run")).unwrap(),
        Path::new("../lib/run")
    );
}

#[test]
fn pruning_keeps_keep_complete_versions() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    for version in ["1", "2", "3", "4", "5"] {
        placer.place(&fx.app(version)).unwrap();
    }
    assert_eq!(fx.versions(), ["app-3", "app-4", "app-5"]);

    // Below the minimum of two: current and the one before it always stay.
    let placer = fx.placer(0);
    placer.place(&fx.app("6")).unwrap();
    assert_eq!(fx.versions(), ["app-5", "app-6"]);

    // Going back to the previous one keeps the one it replaced.
    placer.place(&fx.app("5")).unwrap();
    assert_eq!(fx.versions(), ["app-5", "app-6"]);
    assert_eq!(fx.current_version(&placer).as_deref(), Some("5"));
}

#[test]
fn leftovers_of_a_crashed_run_are_cleaned_at_the_next_place() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    placer.place(&fx.app("1")).unwrap();
    fs::create_dir_all(fx.root().join("versions/app-9.partial/bin")).unwrap();
    fs::write(fx.root().join("tmp/fetch-123"), b"half a download").unwrap();
    std::os::unix::fs::symlink("versions/app-1", fx.root().join("current.tmp-123")).unwrap();
    // A directory without metadata is incomplete: it is not current material.
    fs::create_dir_all(fx.root().join("versions/app-8")).unwrap();

    placer.place(&fx.app("8")).unwrap();

    assert_eq!(fx.versions(), ["app-1", "app-8"]);
    assert_eq!(fx.current_file("VERSION"), "8");
    assert_eq!(fs::read_dir(fx.root().join("tmp")).unwrap().count(), 0);
    assert!(fs::symlink_metadata(fx.root().join("current.tmp-123")).is_err());
}

#[test]
fn current_is_none_when_absent_dangling_or_incomplete() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    assert!(placer.current().is_none());
    fs::create_dir_all(fx.root().join("versions/app-1")).unwrap();
    std::os::unix::fs::symlink("versions/app-1", fx.root().join("current")).unwrap();
    assert!(placer.current().is_none(), "no metadata file");
    fs::remove_dir(fx.root().join("versions/app-1")).unwrap();
    assert!(placer.current().is_none(), "dangling");
}

#[test]
fn bad_orders_are_refused_before_touching_the_disk() {
    let fx = Fixture::new();
    let placer = fx.placer(3);
    let good = fx.app("1");
    let cases = [
        Order {
            artifact: "../x".into(),
            ..good.clone()
        },
        Order {
            artifact: "a/b".into(),
            ..good.clone()
        },
        Order {
            version: "..".into(),
            ..good.clone()
        },
        Order {
            version: String::new(),
            ..good.clone()
        },
        Order {
            digest: "sha256:abc".into(),
            ..good.clone()
        },
        Order {
            digest: "md5:00".into(),
            ..good.clone()
        },
    ];
    for order in cases {
        let err = placer.place(&order).unwrap_err();
        assert!(
            matches!(err, PlaceError::InvalidOrder(_)),
            "{order:?}: {err:?}"
        );
    }
    for uri in [
        "ftp://example/x",
        "file:///etc/hostname",
        "http://169.254.169.254/x",
    ] {
        let err = placer
            .place(&Order {
                source_uri: uri.into(),
                ..good.clone()
            })
            .unwrap_err();
        assert!(matches!(err, PlaceError::NotAllowed(_)), "{uri}: {err:?}");
    }
    assert!(!fx.root().exists());
}

/// Serves one canned response per connection, `responses` in order, on 127.0.0.1; returns
/// the base URL and the thread (which returns the request lines it saw).
fn serve_http(responses: Vec<Vec<u8>>) -> (String, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let thread = std::thread::spawn(move || {
        let mut requests = Vec::new();
        for response in responses {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).unwrap();
                assert!(n > 0, "client closed before the end of the headers");
                request.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&request);
            requests.push(text.lines().next().unwrap_or_default().to_owned());
            stream.write_all(&response).unwrap();
        }
        requests
    });
    (base, thread)
}

fn http_response(status: &str, body: &[u8]) -> Vec<u8> {
    http_response_with(status, "", body)
}

/// A response with extra header lines (each ending in `\r\n`).
fn http_response_with(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body);
    response
}

#[test]
fn an_http_source_is_downloaded_and_a_404_is_a_fetch_error() {
    let fx = Fixture::new();
    let payload = tar_gz(&[("VERSION", b"http")]);
    let (base, server) = serve_http(vec![
        http_response("200 OK", &payload),
        http_response("404 Not Found", b"no such artifact"),
    ]);
    let placer = fx.placer(3).with_sources(
        fx.sources()
            .allow_url_prefix(&format!("{base}/artifacts/"))
            .unwrap(),
    );
    let order = Order {
        artifact: "app".into(),
        version: "1".into(),
        digest: digest(&payload),
        source_uri: format!("{base}/artifacts/app-1.tar.gz?token=secret"),
    };

    placer.place(&order).unwrap();
    assert_eq!(fx.current_file("VERSION"), "http");

    let missing = Order {
        version: "2".into(),
        source_uri: format!("{base}/artifacts/app-2.tar.gz?token=secret"),
        ..order
    };
    let err = placer.place(&missing).unwrap_err();
    let PlaceError::Fetch(why) = &err else {
        panic!("expected a fetch error, got {err:?}");
    };
    assert!(why.contains("404"), "{why}");
    assert!(
        !why.contains("secret"),
        "the query string is redacted: {why}"
    );
    assert_eq!(fx.current_version(&placer).as_deref(), Some("1"));
    assert_eq!(fx.versions(), ["app-1"]);

    let requests = server.join().unwrap();
    assert_eq!(
        requests,
        [
            "GET /artifacts/app-1.tar.gz?token=secret HTTP/1.1",
            "GET /artifacts/app-2.tar.gz?token=secret HTTP/1.1"
        ]
    );
}

#[test]
fn redirects_are_followed_only_within_the_allow_list() {
    let fx = Fixture::new();
    let payload = tar_gz(&[("VERSION", b"moved")]);
    // The other server is not on the allow-list: a redirect there is not followed.
    let (elsewhere, _never) = serve_http(vec![]);
    let (base, server) = serve_http(vec![
        http_response_with("302 Found", "Location: /artifacts/real.tar.gz\r\n", b""),
        http_response("200 OK", &payload),
        http_response_with(
            "301 Moved Permanently",
            &format!("Location: {elsewhere}/artifacts/x\r\n"),
            b"",
        ),
        http_response_with(
            "307 Temporary Redirect",
            "Location: /artifacts/loop\r\n",
            b"",
        ),
        http_response_with(
            "307 Temporary Redirect",
            "Location: /artifacts/loop\r\n",
            b"",
        ),
    ]);
    let placer = fx.placer(3).with_sources(
        fx.sources()
            .allow_url_prefix(&format!("{base}/artifacts/"))
            .unwrap()
            .max_redirects(1),
    );
    let order = Order {
        artifact: "app".into(),
        version: "1".into(),
        digest: digest(&payload),
        source_uri: format!("{base}/artifacts/old.tar.gz"),
    };
    placer.place(&order).unwrap();
    assert_eq!(fx.current_file("VERSION"), "moved");

    let err = placer
        .place(&Order {
            version: "2".into(),
            ..order.clone()
        })
        .unwrap_err();
    assert!(
        matches!(&err, PlaceError::NotAllowed(why) if why.starts_with("redirect target")),
        "{err:?}"
    );
    let err = placer
        .place(&Order {
            version: "3".into(),
            ..order
        })
        .unwrap_err();
    assert!(
        matches!(&err, PlaceError::Fetch(why) if why.contains("more than 1 redirects")),
        "{err:?}"
    );
    assert_eq!(
        server.join().unwrap(),
        [
            "GET /artifacts/old.tar.gz HTTP/1.1",
            "GET /artifacts/real.tar.gz HTTP/1.1",
            "GET /artifacts/old.tar.gz HTTP/1.1",
            "GET /artifacts/old.tar.gz HTTP/1.1",
            "GET /artifacts/loop HTTP/1.1",
        ]
    );
}

#[test]
fn a_fetch_stops_at_the_artifact_size_limit() {
    let fx = Fixture::new();
    let placer = Placer::new(fx.root(), 3)
        .with_sources(
            Sources::default()
                .allow_file_dir(Path::new("/dev"))
                .unwrap(),
        )
        .with_limits(Limits {
            artifact_bytes: 1 << 20,
            ..Limits::default()
        });
    let err = placer
        .place(&Order {
            artifact: "zero".into(),
            version: "1".into(),
            digest: digest(b""),
            source_uri: "file:///dev/zero".into(),
        })
        .unwrap_err();
    assert!(
        matches!(&err, PlaceError::Fetch(why) if why.contains("larger than 1048576 bytes")),
        "{err:?}"
    );
    // The partial download is gone.
    assert_eq!(fs::read_dir(fx.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn a_stopped_placer_abandons_a_fetch_and_kills_a_hook() {
    let fx = Fixture::new();
    let stop = Stop::default();
    let placer = Placer::new(fx.root(), 3)
        .with_sources(
            Sources::default()
                .allow_file_dir(Path::new("/dev"))
                .unwrap(),
        )
        .with_stop(stop.clone());
    let order = Order {
        artifact: "zero".into(),
        version: "1".into(),
        digest: digest(b""),
        source_uri: "file:///dev/zero".into(),
    };
    let running = std::thread::spawn(move || placer.place(&order));
    // Endless input and no size limit in reach: only the stop ends it.
    while fs::read_dir(fx.root().join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
        == 0
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.stop();
    assert_eq!(running.join().unwrap(), Err(PlaceError::Cancelled));

    let stop = Stop::default();
    let placer = fx
        .placer(3)
        .with_pre_switch(
            Some("touch \"$AGENT_ROOT/started\"; sleep 600".into()),
            Duration::from_secs(600),
        )
        .with_stop(stop.clone());
    let order = fx.app("2");
    let running = std::thread::spawn(move || placer.place(&order));
    while !fx.root().join("started").exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.stop();
    assert_eq!(
        running.join().unwrap(),
        Err(PlaceError::PreSwitch(
            "killed: the agent is stopping".into()
        ))
    );
}

#[test]
fn a_slow_pre_switch_is_killed_at_its_timeout() {
    let fx = Fixture::new();
    let placer = fx
        .placer(3)
        .with_pre_switch(Some("sleep 600".into()), Duration::from_millis(100));
    let err = placer.place(&fx.app("1")).unwrap_err();
    assert_eq!(
        err,
        PlaceError::PreSwitch("timed out after 100 ms and was killed".into())
    );
    assert!(placer.current().is_none());
}

#[test]
fn placers_can_move_to_blocking_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Placer>();
    send_sync::<Order>();
    send_sync::<PlaceError>();
}
