//! Module docs that name what does not exist fail here: every `# Layout` section of a `//!`
//! doc in the workspace's crates (each crate's `src/lib.rs` and `src/main.rs`, and any other
//! source file whose module doc has one) is read, and each module, item or file it names
//! must exist. Nothing is listed here: the docs are checked against the tree as it is.
//!
//! What a section names:
//! - intra-doc links (`` [`store`] ``, `` [`deploy::v1`] ``, `` [`principal()`] ``): every
//!   path segment but the last is a module (`name.rs`, `name/mod.rs` or an inline `mod`);
//!   the last is a module or an item declared or re-exported in its parent;
//! - backticked paths (`` `src/bin/deploy-agent.rs` ``, `` `tests/python` ``, brace lists
//!   such as `` `bench-{deploy,release}.rs` `` expanded): a file or directory relative to
//!   the documented file's directory, its crate or the workspace root.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate).
const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The member directories listed in the root Cargo.toml's `members = [...]`.
fn members(root: &Path) -> Vec<PathBuf> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let start = manifest.find("members").expect("workspace members");
    let open = start + manifest[start..].find('[').unwrap();
    let close = open + manifest[open..].find(']').unwrap();
    manifest[open + 1..close]
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .map(|m| root.join(m))
        .collect()
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `# Layout` section of the file's opening `//!` doc, if any.
fn layout_section(text: &str) -> Option<String> {
    let doc: Vec<&str> = text
        .lines()
        .take_while(|l| l.trim_start().starts_with("//!") || l.trim().is_empty())
        .filter_map(|l| l.trim_start().strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    let start = doc.iter().position(|l| l.trim() == "# Layout")?;
    let section: Vec<&str> = doc[start + 1..]
        .iter()
        .take_while(|l| !l.starts_with("# "))
        .copied()
        .collect();
    Some(section.join("\n"))
}

/// What a section names: (intra-doc link paths, backticked file paths).
fn names(section: &str) -> (Vec<String>, Vec<String>) {
    let mut links = Vec::new();
    let mut files = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find('`') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('`') else { break };
        let name = &after[..close];
        let is_link = rest[..open].ends_with('[') && after[close + 1..].starts_with(']');
        if is_link {
            links.push(name.trim_end_matches("()").trim_end_matches('!').to_owned());
        } else if looks_like_path(name) {
            files.extend(expand_braces(name));
        }
        rest = &after[close + 1..];
    }
    (links, files)
}

/// A backticked word names a file when it has a slash or a source file extension and no
/// spaces, options or placeholders.
fn looks_like_path(name: &str) -> bool {
    let plain =
        !name.contains([' ', '<', '>', '*', '$', '=', ':', '"', '\'']) && !name.starts_with('-');
    let pathy = name.contains('/')
        || [
            ".rs", ".py", ".sql", ".sh", ".toml", ".md", ".json", ".yaml",
        ]
        .iter()
        .any(|e| name.ends_with(e));
    plain && pathy && !name.starts_with("http")
}

/// `a{b,c}d` -> `abd`, `acd` (one level, repeated).
fn expand_braces(name: &str) -> Vec<String> {
    let (Some(open), Some(close)) = (name.find('{'), name.find('}')) else {
        return vec![name.to_owned()];
    };
    if close < open {
        return vec![name.to_owned()];
    }
    name[open + 1..close]
        .split(',')
        .flat_map(|alt| expand_braces(&format!("{}{alt}{}", &name[..open], &name[close + 1..])))
        .collect()
}

/// Whether `text` declares or imports `name` (a module, function, type, constant, macro,
/// or a `use` that brings it into scope, which is what rustdoc resolves links against).
fn declares(text: &str, name: &str) -> bool {
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut rest = text;
    while let Some(at) = rest.find("use ") {
        let line_start = rest[..at].rfind('\n').map_or(0, |i| i + 1);
        let prefix = rest[line_start..at].trim();
        let tail = &rest[at..];
        let statement = &tail[..tail.find(';').unwrap_or(tail.len())];
        if (prefix.is_empty() || prefix.starts_with("pub"))
            && words(statement).iter().any(|w| w == name)
        {
            return true;
        }
        rest = &rest[at + 4..];
    }
    text.lines().any(|line| {
        let words: Vec<&str> = line
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '!'))
            .filter(|w| !w.is_empty())
            .collect();
        let kinds = [
            "mod",
            "fn",
            "struct",
            "enum",
            "trait",
            "type",
            "const",
            "static",
            "macro_rules!",
        ];
        let declared = words
            .windows(2)
            .any(|w| kinds.contains(&w[0]) && w[1] == name);
        declared
    })
}

/// Where a module's source lives: a file (`x.rs`, `x/mod.rs`) or inline in its parent.
enum Module {
    File(PathBuf),
    Inline(String),
}

impl Module {
    fn text(&self) -> String {
        match self {
            Module::File(p) => std::fs::read_to_string(p).unwrap(),
            Module::Inline(t) => t.clone(),
        }
    }

    /// The directory holding this module's child module files.
    fn child_dir(&self, parent_dir: &Path) -> PathBuf {
        match self {
            Module::File(p) => {
                let stem = p.file_stem().unwrap().to_str().unwrap();
                if ["lib", "main", "mod"].contains(&stem) {
                    p.parent().unwrap().to_path_buf()
                } else {
                    p.with_extension("")
                }
            }
            Module::Inline(_) => parent_dir.to_path_buf(),
        }
    }

    /// The child module `name`, as a file or an inline `mod name {`.
    fn child(&self, parent_dir: &Path, name: &str) -> Option<(Module, PathBuf)> {
        let dir = self.child_dir(parent_dir);
        for file in [
            dir.join(format!("{name}.rs")),
            dir.join(name).join("mod.rs"),
        ] {
            if file.is_file() {
                return Some((Module::File(file), dir.clone()));
            }
        }
        // A `#[path]`-less `mod name;` whose file is missing is not a module.
        let text = self.text();
        let inline = format!("mod {name} {{");
        text.find(&inline)
            .map(|at| (Module::Inline(text[at..].to_owned()), dir.join(name)))
    }
}

/// Problems with one documented file: names in its `# Layout` that do not exist.
fn check_file(file: &Path, crate_dir: &Path, root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let Some(section) = layout_section(&text) else {
        return Vec::new();
    };
    let (links, files) = names(&section);
    let mut problems = Vec::new();
    let dir = file.parent().unwrap();
    for link in links {
        let segments: Vec<&str> = link.split("::").collect();
        let (mut module, mut module_dir) = (Module::File(file.to_path_buf()), dir.to_path_buf());
        let mut ok = true;
        for (i, seg) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            match module.child(&module_dir, seg) {
                Some((child, child_dir)) => (module, module_dir) = (child, child_dir),
                None if last && declares(&module.text(), seg) => {}
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            problems.push(format!(
                "{}: `# Layout` names [`{link}`], which is neither a module nor an item there",
                file.display()
            ));
        }
    }
    for name in files {
        let found = [dir, crate_dir, root]
            .iter()
            .any(|base| base.join(&name).exists());
        if !found {
            problems.push(format!(
                "{}: `# Layout` names `{name}`, which does not exist",
                file.display()
            ));
        }
    }
    problems
}

#[test]
fn every_layout_section_names_what_exists() {
    let root = PathBuf::from(WORKSPACE);
    let mut problems = Vec::new();
    let mut crates_with_layout = 0;
    for crate_dir in members(&root) {
        let mut files = Vec::new();
        sources(&crate_dir.join("src"), &mut files);
        files.sort();
        let root_files: Vec<&PathBuf> = files
            .iter()
            .filter(|f| {
                f.parent() == Some(&crate_dir.join("src"))
                    && ["lib.rs", "main.rs"].iter().any(|n| f.ends_with(n))
            })
            .collect();
        if root_files
            .iter()
            .any(|f| layout_section(&std::fs::read_to_string(f).unwrap()).is_some())
        {
            crates_with_layout += 1;
        } else {
            problems.push(format!(
                "{}: the crate's opening `//!` doc has no `# Layout` section",
                crate_dir.display()
            ));
        }
        for file in &files {
            problems.extend(check_file(file, &crate_dir, &root));
        }
    }
    assert!(crates_with_layout > 0, "no crate documents its layout");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checker itself: a layout naming a missing module, item or file is reported, and one
/// naming what exists is not.
#[test]
fn a_layout_naming_a_missing_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("store")).unwrap();
    std::fs::write(src.join("store/mod.rs"), "pub struct Store;\n").unwrap();
    std::fs::write(src.join("grpc.rs"), "mod inner {}\n").unwrap();
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(src.join("bin/agent.rs"), "fn main() {}\n").unwrap();
    let lib = src.join("lib.rs");
    let good = "//! A crate.\n//!\n//! # Layout\n//!\n//! - [`store`]: storage; [`store::Store`].\n\
                //! - [`grpc`] and `src/bin/agent.rs`, [`serve`], [`Config`], [`helpers`], [`Caller`].\n\
                //!\n//! # Other\n//!\n//! [`missing_outside_layout`]\n\
                pub mod grpc;\npub mod store;\npub use config::Config;\npub fn serve() {}\n\
                use crate::store::{\n    Store,\n    Caller,\n};\n\
                pub mod helpers {\n}\n";
    std::fs::write(&lib, good).unwrap();
    assert_eq!(
        check_file(&lib, dir.path(), dir.path()),
        Vec::<String>::new()
    );

    for (bad, named) in [
        (
            "//! # Layout\n//!\n//! - [`placement_log`]: gone.\n",
            "placement_log",
        ),
        (
            "//! # Layout\n//!\n//! - [`store::Backend`]: gone.\n",
            "store::Backend",
        ),
        (
            "//! # Layout\n//!\n//! - `src/bin/deploy-agent.rs`: moved.\n",
            "deploy-agent.rs",
        ),
        (
            "//! # Layout\n//!\n//! - `src/bin/{agent,other}.rs`.\n",
            "other.rs",
        ),
        ("//! # Layout\n//!\n//! - [`grpc::outer`].\n", "grpc::outer"),
    ] {
        std::fs::write(&lib, bad).unwrap();
        let problems = check_file(&lib, dir.path(), dir.path());
        assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
        assert!(problems[0].contains(named), "{problems:?}");
    }
}
