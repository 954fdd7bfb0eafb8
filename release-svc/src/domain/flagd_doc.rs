//! flagd flag-definition documents <-> features: import (with `$evaluators` / `$ref`
//! resolved) and export.
//!
//! A flagd flag becomes a feature with the same key, variants, default variant and
//! targeting; `state: DISABLED` becomes a disabled feature. flagd has no "hidden" state, so
//! an imported feature's off variant is its default variant. A flag without a default
//! variant (absent or null) gets an empty one: when no rule picks a variant the answer is
//! "use the code default" (flagd's semantics). Features keep their carriers,
//! allow and deny lists on re-import.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::evaluate::Snapshot;
use super::model::Feature;
use super::names::validate_feature_key;
use super::rules::Rule;
use super::Violations;

/// One flag of a document, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedFlag {
    /// The key.
    pub key: String,
    /// Variants.
    pub variants: BTreeMap<String, Value>,
    /// Default variant.
    pub default_variant: String,
    /// Targeting with every `$ref` resolved.
    pub targeting: Option<Rule>,
    /// `state: DISABLED`.
    pub disabled: bool,
}

impl ImportedFlag {
    /// The feature this flag becomes, keeping what flagd does not describe from `existing`.
    pub fn to_feature(&self, existing: Option<&Feature>) -> Feature {
        let base = existing.cloned().unwrap_or(Feature {
            key: self.key.clone(),
            description: "imported from a flagd flag definition".into(),
            owner: String::new(),
            variants: BTreeMap::new(),
            default_variant: String::new(),
            off_variant: String::new(),
            targeting: None,
            allow: Vec::new(),
            deny: Vec::new(),
            carriers: Vec::new(),
            disabled: false,
            revision: 0,
            create_ms: 0,
            update_ms: 0,
        });
        Feature {
            variants: self.variants.clone(),
            default_variant: self.default_variant.clone(),
            off_variant: self.default_variant.clone(),
            targeting: self.targeting.clone(),
            disabled: self.disabled,
            ..base
        }
    }
}

/// Replaces every `{"$ref": name}` in `v` with the named evaluator, recursively.
pub fn resolve_refs(
    v: &Value,
    evaluators: &Map<String, Value>,
    path: &str,
    depth: usize,
) -> Result<Value, String> {
    if depth > 32 {
        return Err(format!("{path}: $ref nesting deeper than 32 (a cycle?)"));
    }
    Ok(match v {
        Value::Object(map) if map.len() == 1 && map.contains_key("$ref") => {
            let name = map["$ref"]
                .as_str()
                .ok_or_else(|| format!("{path}: $ref must name an evaluator"))?;
            let target = evaluators
                .get(name)
                .ok_or_else(|| format!("{path}: $ref {name:?} is not in $evaluators"))?;
            resolve_refs(target, evaluators, path, depth + 1)?
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), resolve_refs(v, evaluators, path, depth)?)))
                .collect::<Result<_, String>>()?,
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| resolve_refs(v, evaluators, path, depth))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// A document's flags: those that can be imported, and those that cannot with their
/// violations.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Valid flags.
    pub flags: Vec<ImportedFlag>,
    /// Invalid flags by key, each with every problem found.
    pub invalid: Vec<(String, Violations)>,
}

/// Parses and validates a whole document; every problem is reported, naming the flag.
/// A document-level problem is always an error; an invalid flag is one too unless
/// `skip_invalid`, when it is listed in [`Parsed::invalid`] and the others are kept (flagd
/// itself loads such files and fails only the broken flags at evaluation).
pub fn parse(document: &str, skip_invalid: bool) -> Result<Parsed, super::Error> {
    let mut doc_violations = Violations::default();
    let doc: Value = match serde_json::from_str(document) {
        Ok(doc) => doc,
        Err(e) => {
            doc_violations.push("document", format!("is not valid JSON: {e}"));
            doc_violations.finish()?;
            return Ok(Parsed::default());
        }
    };
    let empty = Map::new();
    let evaluators = doc
        .get("$evaluators")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let Some(flags) = doc.get("flags").and_then(Value::as_object) else {
        doc_violations.push("document", "has no \"flags\" object");
        doc_violations.finish()?;
        return Ok(Parsed::default());
    };
    let mut out = Parsed::default();
    for (key, flag) in flags {
        let mut v = Violations::default();
        let flag = parse_flag(key, flag, evaluators, &mut v);
        if v.recorded().is_empty() {
            out.flags.push(flag);
        } else {
            out.invalid.push((key.clone(), v));
        }
    }
    if !skip_invalid && !out.invalid.is_empty() {
        let mut all = Violations::default();
        for (_, v) in std::mem::take(&mut out.invalid) {
            all.append(v);
        }
        all.finish()?;
    }
    Ok(out)
}

/// One flag; problems go to `v` (the flag is meaningless when any were recorded).
fn parse_flag(
    key: &str,
    flag: &Value,
    evaluators: &Map<String, Value>,
    v: &mut Violations,
) -> ImportedFlag {
    let field = format!("document.flags.{key}");
    v.check(&field, validate_feature_key(key));
    let variants: BTreeMap<String, Value> = flag
        .get("variants")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    if variants.is_empty() {
        v.push(
            &format!("{field}.variants"),
            "must have at least one variant",
        );
    }
    let default_variant = match flag.get("defaultVariant") {
        Some(Value::String(d)) if variants.contains_key(d) => d.clone(),
        Some(Value::String(d)) => {
            v.push(
                &format!("{field}.defaultVariant"),
                format!("{d:?} is not one of the variants"),
            );
            String::new()
        }
        // No default variant: when no rule picks one, the caller's code default.
        None | Some(Value::Null) => String::new(),
        Some(_) => {
            v.push(
                &format!("{field}.defaultVariant"),
                "must be a variant name or null",
            );
            String::new()
        }
    };
    let disabled = match flag.get("state").and_then(Value::as_str) {
        Some("ENABLED") => false,
        Some("DISABLED") => true,
        _ => {
            v.push(&format!("{field}.state"), "must be ENABLED or DISABLED");
            false
        }
    };
    let targeting = match flag.get("targeting") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) if m.is_empty() => None,
        Some(t) => match resolve_refs(t, evaluators, &format!("{field}.targeting"), 0) {
            Ok(resolved) => v.check(
                &format!("{field}.targeting"),
                Rule::parse(&resolved.to_string()),
            ),
            Err(e) => {
                v.push(&format!("{field}.targeting"), e);
                None
            }
        },
    };
    ImportedFlag {
        key: key.to_owned(),
        variants,
        default_variant,
        targeting,
        disabled,
    }
}

/// Renders the features as a flagd document for `environment`.
pub fn render(snapshot: &Snapshot, environment: &str) -> Value {
    let mut flags = Map::new();
    for key in snapshot.keys.iter() {
        let Some(entry) = snapshot.features.get(key) else {
            continue;
        };
        let f = &entry.feature;
        let governing = entry.governing(environment);
        let enabled = governing.is_some() && !f.disabled;
        let mut flag = Map::new();
        flag.insert(
            "state".into(),
            Value::String(if enabled { "ENABLED" } else { "DISABLED" }.into()),
        );
        flag.insert(
            "variants".into(),
            Value::Object(f.variants.clone().into_iter().collect()),
        );
        flag.insert(
            "defaultVariant".into(),
            if f.default_variant.is_empty() {
                Value::Null
            } else {
                Value::String(f.default_variant.clone())
            },
        );
        flag.insert(
            "targeting".into(),
            f.targeting
                .as_ref()
                .map(|r| r.as_json().clone())
                .unwrap_or(Value::Object(Map::new())),
        );
        if let Some(g) = governing {
            let mut metadata = Map::new();
            metadata.insert(
                "release".into(),
                Value::String(format!("releases/{}", g.release)),
            );
            if let Some(p) = serde_json::Number::from_f64(g.rollout_percent) {
                metadata.insert("rolloutPercent".into(), Value::Number(p));
            }
            metadata.insert("deployed".into(), Value::Bool(g.deployed));
            flag.insert("metadata".into(), Value::Object(metadata));
        }
        flags.insert(key.to_string(), Value::Object(flag));
    }
    let mut doc = Map::new();
    doc.insert("flags".into(), Value::Object(flags));
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_are_resolved_and_every_problem_is_named() {
        let doc = r#"{
            "$evaluators": {"is-corp": {"ends_with": [{"var": "email"}, "@corp.com"]}},
            "flags": {
                "ok": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                       "targeting": {"if": [{"$ref": "is-corp"}, "on", null]}},
                "plain": {"state": "DISABLED", "variants": {"a": "x"}, "defaultVariant": "a"}
            }
        }"#;
        let flags = parse(doc, false).unwrap().flags;
        assert_eq!(flags.len(), 2);
        let ok = &flags[0];
        assert_eq!(ok.key, "ok");
        assert!(ok
            .targeting
            .as_ref()
            .unwrap()
            .as_json()
            .to_string()
            .contains("@corp.com"));
        assert!(flags[1].disabled);

        let bad = r#"{"flags": {
            "no-default": {"state": "ENABLED", "variants": {"a": 1}},
            "bad-default": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "b"},
            "bad-ref": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a", "targeting": {"$ref": "nope"}},
            "bad-state": {"state": "ON", "variants": {"a": 1}, "defaultVariant": "a"}
        }}"#;
        let err = parse(bad, false).unwrap_err().to_string();
        assert!(
            err.contains("document.flags.bad-default.defaultVariant"),
            "{err}"
        );
        assert!(err.contains("document.flags.bad-ref.targeting"), "{err}");
        assert!(err.contains("document.flags.bad-state.state"), "{err}");
        assert!(!err.contains("no-default"), "{err}");

        // Skipping keeps the valid flags and names each invalid one.
        let parsed = parse(bad, true).unwrap();
        let kept: Vec<_> = parsed.flags.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(kept, ["no-default"]);
        assert_eq!(parsed.flags[0].default_variant, "");
        let skipped: Vec<_> = parsed.invalid.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(skipped, ["bad-default", "bad-ref", "bad-state"]);
        assert!(parse("not json", true).is_err());
    }
}
