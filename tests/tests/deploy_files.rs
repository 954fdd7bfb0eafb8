//! What `deploy/` ships, checked offline with the real tools: the Prometheus alert rules
//! (`promtool check rules` and their unit tests with `promtool test rules`), the Grafana
//! dashboard, and the Kustomize overlays (`kubectl kustomize`, the schemas with
//! `kubernetes-validate --strict`, the restricted Pod Security profile and the probes with
//! `scripts/lib/check_manifests.py`). scripts/test installs the tools when they are missing.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `program` with `args` in `dir`; its standard output (panics with all it printed
/// unless it succeeds).
fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): scripts/test installs it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn alert_rules_are_valid_and_their_unit_tests_pass() {
    let dir = root().join("deploy/prometheus");
    let checked = run(&dir, "promtool", &["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run(&dir, "promtool", &["test", "rules", "alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn the_prometheus_rule_object_holds_the_same_rules_as_alerts_yml() {
    // Parsed by PyYAML (target/venv): the YAML of both files, not their text, must agree.
    let compared = run(
        &root(),
        "python3",
        &[
            "-c",
            "import yaml,sys\n\
             a = yaml.safe_load(open('deploy/prometheus/alerts.yml'))\n\
             r = yaml.safe_load(open('deploy/k8s/base/prometheus-rule.yaml'))\n\
             assert r['kind'] == 'PrometheusRule', r['kind']\n\
             assert r['spec']['groups'] == a['groups'], 'deploy/k8s/base/prometheus-rule.yaml differs from alerts.yml'\n\
             print(sum(len(g['rules']) for g in a['groups']))",
        ],
    );
    let rules: usize = compared.trim().parse().unwrap();
    assert!(rules >= 10, "{rules} rules");
}

/// Metric names (`grpc_server_*`, `deploy_svc_*`, ...) used in `text`, without the
/// `_bucket`, `_sum` and `_count` of histograms.
fn metric_names(text: &str) -> Vec<String> {
    const PREFIXES: [&str; 5] = [
        "grpc_server_",
        "deploy_svc_",
        "release_svc_",
        "deploy_agent_",
        "store_writable",
    ];
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| PREFIXES.iter().any(|p| w.starts_with(p)))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w)
                .to_owned()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_metric_the_alerts_and_the_dashboard_use_is_one_the_programs_export() {
    let root = root();
    let sources: String = [
        "service-kit/src/access.rs",
        "service-kit/src/health.rs",
        "deploy-svc/src/telemetry.rs",
        "release-svc/src/telemetry.rs",
        "deploy-agent/src/telemetry.rs",
    ]
    .iter()
    .map(|p| std::fs::read_to_string(root.join(p)).unwrap())
    .collect();
    let alerts = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/svc-pair.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for panel in panels {
        assert!(!panel["targets"].as_array().unwrap().is_empty(), "{panel}");
    }
    let used = [metric_names(&alerts), metric_names(&dashboard)].concat();
    assert!(used.len() >= 15, "{used:?}");
    for name in used {
        assert!(
            sources.contains(&format!("\"{name}\"")),
            "{name} is used in deploy/ but no program exports it"
        );
    }
}

#[test]
fn kustomize_overlays_render_validate_and_pass_the_restricted_profile() {
    let root = root();
    let out = tempfile::tempdir().unwrap();
    for overlay in ["sqlite", "postgres"] {
        let rendered = run(
            &root,
            "kubectl",
            &["kustomize", &format!("deploy/k8s/overlays/{overlay}")],
        );
        let file = out.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let file = file.to_string_lossy().into_owned();
        let validated = run(&root, "kubernetes-validate", &["--strict", &file]);
        assert!(!validated.contains("ERROR"), "{validated}");
        run(&root, "python3", &["scripts/lib/check_manifests.py", &file]);
        assert!(rendered.contains("kind: PrometheusRule"), "{rendered}");
        if overlay == "sqlite" {
            assert!(rendered.contains("persistentVolumeClaim"), "{rendered}");
            assert!(rendered.contains("Recreate"), "{rendered}");
        }
    }
}
