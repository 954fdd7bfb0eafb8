//! The flagd testbed's evaluator test kit (`tests/flagd-testbed/evaluator`) run against
//! release-svc's rule engine: every Scenario (Outline rows expanded) with the kit's flag
//! definitions, flagd's evaluation semantics around the engine, and each row's bucketing
//! profile (`@fractional-v1`, `@fractional-v3`; `@fractional-v2`, `@fractional-nested` and
//! untagged rows with v2, the default). Metadata steps are skipped.
//! Prints pass counts per feature file and fails if any row that runs fails.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use release_svc::domain::flagd_doc::resolve_refs;
use release_svc::domain::rules::{Bucketing, Data, Rule};
use serde_json::{json, Map, Value};

fn testbed() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/flagd-testbed/evaluator");
    assert!(
        dir.exists(),
        "the flagd testbed is missing at {}",
        dir.display()
    );
    dir
}

struct Flag {
    state: String,
    variants: Map<String, Value>,
    default_variant: Option<String>,
    targeting: Option<Result<Rule, String>>,
}

fn load_flags() -> BTreeMap<String, Flag> {
    let text = std::fs::read_to_string(testbed().join("flags/testkit-flags.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let evaluators = doc
        .get("$evaluators")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for (key, f) in doc["flags"].as_object().unwrap() {
        let targeting = match f.get("targeting") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) if m.is_empty() => None,
            Some(t) => Some(resolve_refs(t, &evaluators).and_then(|t| Rule::parse(&t.to_string()))),
        };
        out.insert(
            key.clone(),
            Flag {
                state: f["state"].as_str().unwrap_or("ENABLED").to_owned(),
                variants: f["variants"].as_object().cloned().unwrap_or_default(),
                default_variant: f
                    .get("defaultVariant")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                targeting,
            },
        );
    }
    out
}

#[derive(Debug, Default)]
struct Outcome {
    value: Value,
    reason: String,
    error: Option<String>,
}

fn type_ok(kind: &str, v: &Value) -> bool {
    match kind {
        "Boolean" => v.is_boolean(),
        "String" => v.is_string(),
        "Integer" => v.as_i64().is_some() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "Float" => v.is_number(),
        "Object" => v.is_object(),
        _ => false,
    }
}

/// flagd's evaluation around the rule engine.
fn evaluate(
    flags: &BTreeMap<String, Flag>,
    key: &str,
    kind: &str,
    fallback: Value,
    ctx: &Map<String, Value>,
    targeting_key: &str,
    bucketing: Bucketing,
) -> Outcome {
    let err = |code: &str, fallback: Value| Outcome {
        value: fallback,
        reason: "ERROR".into(),
        error: Some(code.into()),
    };
    let Some(flag) = flags.get(key) else {
        return err("FLAG_NOT_FOUND", fallback);
    };
    if flag.state == "DISABLED" {
        return Outcome {
            value: fallback,
            reason: "DISABLED".into(),
            error: None,
        };
    }
    let (variant, reason) = match &flag.targeting {
        None => (flag.default_variant.clone(), "STATIC"),
        Some(Err(_)) => return err("PARSE_ERROR", fallback),
        Some(Ok(rule)) => {
            let data = Data {
                attributes: ctx,
                targeting_key,
                flag_key: key,
                bucketing,
            };
            let Ok(value) = rule.evaluate(&data) else {
                return err("GENERAL", fallback);
            };
            match value.into_owned() {
                Value::String(v) if flag.variants.contains_key(&v) => (Some(v), "TARGETING_MATCH"),
                Value::Bool(b) if flag.variants.contains_key(&b.to_string()) => {
                    (Some(b.to_string()), "TARGETING_MATCH")
                }
                Value::Null => (flag.default_variant.clone(), "DEFAULT"),
                Value::String(_) | Value::Bool(_) => return err("GENERAL", fallback),
                _ => (flag.default_variant.clone(), "DEFAULT"),
            }
        }
    };
    let Some(variant) = variant else {
        // No default variant: the caller's code default.
        return Outcome {
            value: fallback,
            reason: "DEFAULT".into(),
            error: None,
        };
    };
    let Some(value) = flag.variants.get(&variant) else {
        return err("GENERAL", fallback);
    };
    if !type_ok(kind, value) {
        return err("TYPE_MISMATCH", fallback);
    }
    Outcome {
        value: value.clone(),
        reason: reason.into(),
        error: None,
    }
}

fn typed(kind: &str, raw: &str) -> Value {
    match kind {
        "Boolean" => Value::Bool(raw == "true"),
        "Integer" => raw
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or(Value::String(raw.into())),
        "Float" => raw
            .parse::<f64>()
            .map(|f| json!(f))
            .unwrap_or(Value::String(raw.into())),
        "Object" => serde_json::from_str(raw).unwrap_or(Value::Null),
        _ => Value::String(raw.into()),
    }
}

fn same(kind: &str, got: &Value, want: &str) -> bool {
    match kind {
        "Integer" | "Float" => got
            .as_f64()
            .zip(want.parse::<f64>().ok())
            .is_some_and(|(a, b)| a == b),
        "Object" => serde_json::from_str::<Value>(want).is_ok_and(|w| &w == got),
        "Boolean" => got.as_bool().map(|b| b.to_string()).as_deref() == Some(want),
        _ => got.as_str() == Some(want),
    }
}

/// The double-quoted strings of a step, with backslash escapes (`\"`, `\\`) undone.
fn quoted(line: &str) -> Vec<String> {
    let (mut out, mut current) = (Vec::new(), String::new());
    let (mut inside, mut escaped) = (false, false);
    for c in line.chars() {
        if !inside {
            inside = c == '"';
        } else if escaped {
            current.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            out.push(std::mem::take(&mut current));
            inside = false;
        } else {
            current.push(c);
        }
    }
    out
}

/// Runs one scenario's steps (placeholders already substituted); `None` if it uses a step
/// this runner does not know (metadata), else whether it passed.
fn run(
    flags: &BTreeMap<String, Flag>,
    steps: &[String],
    bucketing: Bucketing,
) -> Option<Result<(), String>> {
    let (mut key, mut kind, mut fallback) = (String::new(), String::new(), Value::Null);
    let mut ctx = Map::new();
    let mut targeting_key = String::new();
    let mut outcome = None;
    for step in steps {
        let q = quoted(step);
        let body = step.split_once(' ').map(|x| x.1).unwrap_or_default();
        if body.starts_with("an evaluator") {
        } else if body.contains("-flag with key") {
            kind = body
                .split('-')
                .next()
                .unwrap_or_default()
                .trim_start_matches("a ")
                .to_owned();
            key = q[0].clone();
            fallback = typed(&kind, &q[1]);
        } else if body.starts_with("a context containing a key") {
            ctx.insert(q[0].clone(), typed(&q[1], &q[2]));
        } else if body.starts_with("a context containing a nested property") {
            ctx.insert(q[0].clone(), json!({ q[1].clone(): q[2].clone() }));
        } else if body.starts_with("a context containing a targeting key") {
            targeting_key = q[0].clone();
        } else if body.starts_with("the flag was evaluated") {
            outcome = Some(evaluate(
                flags,
                &key,
                &kind,
                fallback.clone(),
                &ctx,
                &targeting_key,
                bucketing,
            ));
        } else if body.starts_with("the resolved details value should be") {
            let o = outcome.as_ref()?;
            if !same(&kind, &o.value, &q[0]) {
                return Some(Err(format!("{key}: value {} != {:?}", o.value, q[0])));
            }
        } else if body.starts_with("the reason should be") {
            let o = outcome.as_ref()?;
            if o.reason != q[0] {
                return Some(Err(format!("{key}: reason {} != {}", o.reason, q[0])));
            }
        } else if body.starts_with("the error-code should be") {
            let o = outcome.as_ref()?;
            if o.error.as_deref() != Some(q[0].as_str()) {
                return Some(Err(format!("{key}: error {:?} != {}", o.error, q[0])));
            }
        } else {
            return None;
        }
    }
    Some(Ok(()))
}

struct Scenario {
    tags: Vec<String>,
    steps: Vec<String>,
    rows: Vec<(Vec<String>, Vec<String>)>,
}

/// A small Gherkin reader: Background, Scenario / Scenario Outline, tagged Examples tables.
fn scenarios(text: &str) -> (Vec<String>, Vec<Scenario>) {
    let (mut background, mut out): (Vec<String>, Vec<Scenario>) = (Vec::new(), Vec::new());
    let (mut pending_tags, mut feature_tags) = (Vec::new(), Vec::new());
    let mut in_background = false;
    let mut header: Option<Vec<String>> = None;
    let mut example_tags: Vec<String> = Vec::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('@') {
            pending_tags.extend(line.split_whitespace().map(str::to_owned));
        } else if line.starts_with("Feature:") {
            feature_tags = std::mem::take(&mut pending_tags);
        } else if line.starts_with("Background:") {
            in_background = true;
        } else if line.starts_with("Scenario") {
            in_background = false;
            header = None;
            let mut tags = feature_tags.clone();
            tags.extend(std::mem::take(&mut pending_tags));
            out.push(Scenario {
                tags,
                steps: Vec::new(),
                rows: Vec::new(),
            });
        } else if line.starts_with("Examples") {
            example_tags = std::mem::take(&mut pending_tags);
            header = None;
            if let Some(s) = out.last_mut() {
                s.rows.push((example_tags.clone(), Vec::new()));
                s.rows.pop();
            }
        } else if line.starts_with('|') {
            let cells: Vec<String> = line
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect();
            match &header {
                None => header = Some(cells),
                Some(h) => {
                    if let Some(s) = out.last_mut() {
                        let mut tags = example_tags.clone();
                        tags.extend(h.iter().map(|c| format!("<{c}>")));
                        s.rows.push((tags, cells));
                    }
                }
            }
        } else if in_background {
            background.push(line.to_owned());
        } else if let Some(s) = out.last_mut() {
            s.steps.push(line.to_owned());
        }
    }
    (background, out)
}

#[test]
fn the_flagd_evaluator_kit_passes_on_the_rule_engine() {
    let flags = load_flags();
    let mut files: Vec<_> = std::fs::read_dir(testbed().join("gherkin"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let (mut failures, mut total_passed) = (Vec::new(), 0);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let (background, scenarios) = scenarios(&text);
        let (mut passed, mut skipped, mut failed) = (0, 0, 0);
        for s in scenarios {
            let runs: Vec<(Vec<String>, Vec<String>)> = if s.rows.is_empty() {
                vec![(Vec::new(), Vec::new())]
            } else {
                s.rows.clone()
            };
            for (row_tags, cells) in runs {
                let tags: Vec<&String> = s
                    .tags
                    .iter()
                    .chain(row_tags.iter().filter(|t| t.starts_with('@')))
                    .collect();
                let bucketing = if tags.iter().any(|t| *t == "@fractional-v1") {
                    Bucketing::V1
                } else if tags.iter().any(|t| *t == "@fractional-v3") {
                    Bucketing::V3
                } else {
                    Bucketing::V2
                };
                let names: Vec<&String> = row_tags.iter().filter(|t| t.starts_with('<')).collect();
                let steps: Vec<String> = background
                    .iter()
                    .chain(s.steps.iter())
                    .map(|step| {
                        let mut step = step.clone();
                        for (name, cell) in names.iter().zip(cells.iter()) {
                            step = step.replace(name.as_str(), cell);
                        }
                        step
                    })
                    .collect();
                match run(&flags, &steps, bucketing) {
                    None => skipped += 1,
                    Some(Ok(())) => passed += 1,
                    Some(Err(e)) => {
                        failed += 1;
                        failures.push(format!(
                            "{}: {e}",
                            file.file_name().unwrap().to_string_lossy()
                        ));
                    }
                }
            }
        }
        total_passed += passed;
        eprintln!(
            "{:<28} {passed} passed, {failed} failed, {skipped} skipped",
            file.file_name().unwrap().to_string_lossy()
        );
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A ratchet: 135 rows pass today (docs/openfeature.md); fewer means the engine or the runner regressed.
    assert!(total_passed >= 135, "only {total_passed} rows ran");
}
