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
use super::rules::{Rule, MAX_RULE_BYTES, MAX_RULE_DEPTH};
use super::{values, Violations};

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
    /// The flag's `metadata` over the document's (flag-set) `metadata`.
    pub metadata: BTreeMap<String, Value>,
}

impl ImportedFlag {
    /// The feature this flag becomes, keeping what flagd does not describe from `existing`.
    pub fn to_feature(&self, existing: Option<&Feature>) -> Feature {
        let base = existing.cloned().unwrap_or(Feature {
            key: self.key.clone(),
            description: "imported from a flagd flag definition".into(),
            owner: String::new(),
            variants: BTreeMap::new().into(),
            default_variant: String::new(),
            off_variant: String::new(),
            targeting: None,
            allow: Vec::new(),
            deny: Vec::new(),
            carriers: Vec::new(),
            disabled: false,
            metadata: BTreeMap::new(),
            revision: 0,
            create_ms: 0,
            update_ms: 0,
            archived_ms: None,
        });
        Feature {
            variants: self.variants.clone().into(),
            default_variant: self.default_variant.clone(),
            off_variant: self.default_variant.clone(),
            targeting: self.targeting.clone(),
            disabled: self.disabled,
            metadata: self.metadata.clone(),
            ..base
        }
    }
}

/// Most `$ref` hops on one path from a flag's targeting (a longer chain is a cycle, or
/// abuse).
pub const MAX_REF_HOPS: usize = 32;
/// The flag metadata keys [`render`] writes with a flag's release state in the environment;
/// import leaves them out of the feature's own metadata.
pub const EXPORTED_STATE: &[&str] = &["release", "rolloutPercent", "deployed"];

/// Most flags in one document.
pub const MAX_FLAGS: usize = 1000;
/// Most variants of one flag (as CreateFeature).
pub const MAX_VARIANTS: usize = 64;
/// Most bytes of expanded targeting across a whole document.
pub const MAX_DOCUMENT_EXPANDED_BYTES: usize = 16 * 1024 * 1024;

/// What expanding `$ref`s may still produce.
#[derive(Debug)]
struct Expansion<'e> {
    evaluators: &'e Map<String, Value>,
    /// Bytes of JSON the expansion may still produce (an estimate that never exceeds the
    /// real text: the rule's exact size is checked when it is parsed).
    bytes: usize,
}

/// Replaces every `{"$ref": name}` in `v` with the named evaluator. The expansion is
/// bounded as it goes: at most [`MAX_REF_HOPS`] hops on a path, the result nested at most
/// [`MAX_RULE_DEPTH`] levels and at most [`MAX_RULE_BYTES`] of JSON (the limits of a rule
/// written with CreateFeature), so neither a deep chain nor a "billion laughs" document
/// can exhaust the stack or the memory.
pub fn resolve_refs(v: &Value, evaluators: &Map<String, Value>) -> Result<Value, String> {
    let mut e = Expansion {
        evaluators,
        bytes: MAX_RULE_BYTES,
    };
    expand(v, &mut e, 0, 0)
}

fn expand(v: &Value, e: &mut Expansion<'_>, depth: usize, hops: usize) -> Result<Value, String> {
    let cost = match v {
        Value::String(s) => s.len() + 3,
        Value::Object(map) => map.keys().map(|k| k.len() + 4).sum::<usize>() + 2,
        Value::Array(items) => items.len() + 2,
        _ => 2,
    };
    if let Value::Object(map) = v {
        if map.len() == 1 {
            if let Some(target) = map.get("$ref") {
                let name = target
                    .as_str()
                    .ok_or_else(|| "$ref must name an evaluator".to_owned())?;
                let target = e
                    .evaluators
                    .get(name)
                    .ok_or_else(|| format!("$ref {name:?} is not in $evaluators"))?;
                if hops >= MAX_REF_HOPS {
                    return Err(format!(
                        "$ref chains longer than {MAX_REF_HOPS} hops (a cycle?)"
                    ));
                }
                return expand(target, e, depth, hops + 1);
            }
        }
    }
    if cost > e.bytes {
        return Err(format!(
            "expands ($ref included) to more than {MAX_RULE_BYTES} bytes"
        ));
    }
    e.bytes -= cost;
    Ok(match v {
        Value::Object(_) | Value::Array(_) if depth > MAX_RULE_DEPTH => {
            return Err(format!(
                "nests ($ref included) deeper than {MAX_RULE_DEPTH} levels"
            ))
        }
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, item) in map {
                out.insert(k.clone(), expand(item, e, depth + 1, hops)?);
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(expand(item, e, depth + 1, hops)?);
            }
            Value::Array(out)
        }
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
    let doc: Value = serde_json::from_str(document)
        .map_err(|e| super::Error::invalid("document", format!("is not valid JSON: {e}")))?;
    let empty = Map::new();
    let evaluators = doc
        .get("$evaluators")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let Some(flags) = doc.get("flags").and_then(Value::as_object) else {
        return Err(super::Error::invalid("document", "has no \"flags\" object"));
    };
    if flags.len() > MAX_FLAGS {
        return Err(super::Error::invalid(
            "document.flags",
            format!("must have at most {MAX_FLAGS} flags, got {}", flags.len()),
        ));
    }
    let set_metadata = set_metadata(&doc)?;
    let mut out = Parsed::default();
    let mut expanded = 0usize;
    for (key, flag) in flags {
        let mut v = Violations::default();
        let mut flag = parse_flag(key, flag, evaluators, &mut v);
        for (k, val) in &set_metadata {
            flag.metadata
                .entry(k.clone())
                .or_insert_with(|| val.clone());
        }
        v.check(
            &format!("document.flags.{key}.metadata"),
            values::check_metadata(flag.metadata.iter()),
        );
        expanded += flag
            .targeting
            .as_ref()
            .map_or(0, |r| r.to_json().to_string().len());
        if expanded > MAX_DOCUMENT_EXPANDED_BYTES {
            return Err(super::Error::invalid(
                "document",
                format!(
                    "expands ($ref included) to more than {MAX_DOCUMENT_EXPANDED_BYTES} bytes of targeting"
                ),
            ));
        }
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

/// The flag set's metadata (the document's `metadata`): every flag carries it, under its
/// own.
fn set_metadata(doc: &Value) -> Result<BTreeMap<String, Value>, super::Error> {
    let mut v = Violations::default();
    let metadata: BTreeMap<String, Value> = match doc.get("metadata") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(_) => {
            v.push("document.metadata", "must be an object");
            BTreeMap::new()
        }
    };
    v.check("document.metadata", values::check_metadata(metadata.iter()));
    v.finish()?;
    Ok(metadata)
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
    let variants = flag_variants(&field, flag, v);
    let default_variant = default_variant(&field, flag, &variants, v);
    let disabled = match flag.get("state").and_then(Value::as_str) {
        Some("ENABLED") => false,
        Some("DISABLED") => true,
        _ => {
            v.push(&format!("{field}.state"), "must be ENABLED or DISABLED");
            false
        }
    };
    let targeting = flag_targeting(&field, flag, evaluators, v);
    let metadata = flag_metadata(&field, flag, v);
    ImportedFlag {
        key: key.to_owned(),
        variants,
        default_variant,
        targeting,
        disabled,
        metadata,
    }
}

/// A flag's `variants`: one to [`MAX_VARIANTS`], named by 1-128 characters.
fn flag_variants(field: &str, flag: &Value, v: &mut Violations) -> BTreeMap<String, Value> {
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
    if variants.len() > MAX_VARIANTS || variants.keys().any(|k| k.is_empty() || k.len() > 128) {
        v.push(
            &format!("{field}.variants"),
            format!("must have at most {MAX_VARIANTS} variants named by 1-128 characters"),
        );
    }
    v.check(
        &format!("{field}.variants"),
        values::check_variants(&variants),
    );
    variants
}

/// A flag's `defaultVariant`: one of `variants`, or empty when absent or null.
fn default_variant(
    field: &str,
    flag: &Value,
    variants: &BTreeMap<String, Value>,
    v: &mut Violations,
) -> String {
    match flag.get("defaultVariant") {
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
    }
}

/// A flag's `targeting` with its `$ref`s resolved (none when absent, null or empty).
fn flag_targeting(
    field: &str,
    flag: &Value,
    evaluators: &Map<String, Value>,
    v: &mut Violations,
) -> Option<Rule> {
    match flag.get("targeting") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) if m.is_empty() => None,
        Some(t) => match resolve_refs(t, evaluators) {
            Ok(resolved) => v.check(
                &format!("{field}.targeting"),
                Rule::parse(&resolved.to_string()),
            ),
            Err(e) => {
                v.push(&format!("{field}.targeting"), e);
                None
            }
        },
    }
}

/// A flag's own `metadata`, without the release state that export writes.
fn flag_metadata(field: &str, flag: &Value, v: &mut Violations) -> BTreeMap<String, Value> {
    match flag.get("metadata") {
        None | Some(Value::Null) => BTreeMap::new(),
        // The release state that export writes is not the flag's own metadata.
        Some(Value::Object(m)) => m
            .iter()
            .filter(|(k, _)| !EXPORTED_STATE.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        Some(_) => {
            v.push(&format!("{field}.metadata"), "must be an object");
            BTreeMap::new()
        }
    }
}

/// Renders the features as a flagd document for `environment`.
pub fn render(snapshot: &Snapshot, environment: &str) -> Value {
    let mut flags = Map::new();
    let env = snapshot.environments.id(environment);
    for key in snapshot.keys.iter() {
        let Some(entry) = snapshot.features.get(key) else {
            continue;
        };
        let f = &entry.feature;
        let governing = env.and_then(|id| entry.governing(id));
        let enabled = governing.is_some() && !f.disabled;
        let mut flag = Map::new();
        flag.insert(
            "state".into(),
            Value::String(if enabled { "ENABLED" } else { "DISABLED" }.into()),
        );
        flag.insert("variants".into(), f.variants.to_json());
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
                .map(|r| r.to_json())
                .unwrap_or(Value::Object(Map::new())),
        );
        let mut metadata: Map<String, Value> = f.metadata.clone().into_iter().collect();
        if let Some(g) = governing {
            metadata.insert(
                "release".into(),
                Value::String(format!("releases/{}", g.release)),
            );
            if let Some(p) = serde_json::Number::from_f64(g.rollout_percent) {
                metadata.insert("rolloutPercent".into(), Value::Number(p));
            }
            metadata.insert("deployed".into(), Value::Bool(g.deployed));
        }
        if !metadata.is_empty() {
            flag.insert("metadata".into(), Value::Object(metadata));
        }
        flags.insert(key.to_string(), Value::Object(flag));
    }
    let mut doc = Map::new();
    doc.insert("flags".into(), Value::Object(flags));
    Value::Object(doc)
}

/// Renders `environment`'s decisions as a flagd document an in-process provider evaluates
/// to the same value and variant as release-svc's own Evaluate (flagd's sync protocol
/// serves it).
///
/// Every feature is an ENABLED flag; what release-svc decides from its own state is
/// written into the flag:
/// - hidden everywhere (disabled, not released here, carriers not deployed here): the
///   default variant is the off variant, no targeting;
/// - released and deployed, context-free (100%, no rule, no lists): the default variant;
/// - otherwise the default variant is the off variant and the targeting is the decision
///   order of Evaluate: deny list -> `null` (hidden), allow list -> the served variant,
///   percentage -> flagd's `fractional` over `"{feature}/{targetingKey}"` with weights
///   in basis points (bit for bit the rollout of [`super::hash::in_rollout`] under the
///   server's bucketing generation), then the served variant: the feature's rule's
///   variant when it names one (a boolean result names `true`/`on` or `false`/`off`),
///   else the default variant.
///
/// Reasons differ (an in-process provider says TARGETING_MATCH or DEFAULT where Evaluate
/// says SPLIT or NOT_DEPLOYED); values and variants do not.
pub fn render_decisions(snapshot: &Snapshot, environment: &str) -> Value {
    let mut flags = Map::new();
    let env = snapshot.environments.id(environment);
    for key in snapshot.keys.iter() {
        let Some(entry) = snapshot.features.get(key) else {
            continue;
        };
        let f = &entry.feature;
        let off = variant_ref(f, &f.off_variant);
        let served = variant_ref(f, &f.default_variant);
        let mut flag = Map::new();
        flag.insert("state".into(), Value::String("ENABLED".into()));
        flag.insert("variants".into(), f.variants.to_json());
        let governing = env
            .and_then(|id| entry.governing(id))
            .filter(|g| !f.disabled && g.deployed);
        let (default, targeting) = match governing {
            None => (off, None),
            Some(g)
                if g.rollout_percent >= 100.0
                    && f.targeting.is_none()
                    && f.allow.is_empty()
                    && f.deny.is_empty() =>
            {
                (served, None)
            }
            Some(g) => (off, Some(decision_rule(f, key, g.rollout_percent, served))),
        };
        flag.insert("defaultVariant".into(), default);
        if let Some(t) = targeting {
            flag.insert("targeting".into(), t);
        }
        if !f.metadata.is_empty() {
            flag.insert(
                "metadata".into(),
                Value::Object(f.metadata.clone().into_iter().collect()),
            );
        }
        flags.insert(key.to_string(), Value::Object(flag));
    }
    serde_json::json!({
        "flags": flags,
        "metadata": {"flagSetId": environment, "environment": environment},
    })
}

/// A variant name as a flagd document writes it: `null` ("use the code default") for
/// none.
fn variant_ref(f: &Feature, name: &str) -> Value {
    if name.is_empty() || !f.variants.contains_key(name) {
        Value::Null
    } else {
        Value::String(name.to_owned())
    }
}

/// The targeting of a released, deployed feature that is not context-free (see
/// [`render_decisions`]); `null` is the hidden answer (the flag's default variant is the
/// off variant).
fn decision_rule(f: &Feature, key: &str, percent: f64, default: Value) -> Value {
    use serde_json::json;
    let served = match &f.targeting {
        None => default,
        Some(rule) => {
            let r = &rule.to_json();
            let names: Vec<Value> = f.variants.keys().cloned().map(Value::String).collect();
            let mut branches = vec![json!({"in": [r, names]}), r.clone()];
            for (result, named) in [(true, ["true", "on"]), (false, ["false", "off"])] {
                if let Some(n) = named.into_iter().find(|n| f.variants.contains_key(*n)) {
                    branches.push(json!({"===": [r, result]}));
                    branches.push(Value::String(n.to_owned()));
                }
            }
            branches.push(default);
            json!({ "if": branches })
        }
    };
    let tk = json!({"var": ["targetingKey", ""]});
    let mut branches = Vec::new();
    if !f.deny.is_empty() {
        branches.push(json!({"in": [tk, f.deny]}));
        branches.push(Value::Null);
    }
    if !f.allow.is_empty() {
        branches.push(json!({"in": [tk, f.allow]}));
        branches.push(served.clone());
    }
    if percent < 100.0 {
        let t = super::hash::basis_points(percent);
        let split = |inside: Value, outside: Value| {
            json!({"fractional": [
                {"cat": [format!("{key}/"), tk]},
                [inside, t],
                [outside, super::hash::ROLLOUT_TOTAL - t],
            ]})
        };
        let off = variant_ref(f, &f.off_variant);
        if branches.is_empty() && served.is_string() && off.is_string() {
            // A plain percentage names the variants itself: the cheapest rule for the
            // providers' rule engines (one operator instead of three).
            return split(served, off);
        }
        branches.push(json!({"==": [split("in".into(), "out".into()), "in"]}));
        branches.push(served);
        branches.push(Value::Null);
    } else {
        branches.push(served);
    }
    if branches.len() == 1 {
        return branches.remove(0);
    }
    json!({ "if": branches })
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
            .to_json()
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

    fn flag_with(evaluators: Value, first: &str) -> String {
        serde_json::json!({
            "$evaluators": evaluators,
            "flags": {"f": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on",
                            "targeting": {"$ref": first}}}
        })
        .to_string()
    }

    #[test]
    fn ref_expansion_is_bounded_in_depth_size_and_hops() {
        // Nesting through a chain: each evaluator is shallow, together they are deep.
        let mut chain = Map::new();
        for i in 0..20 {
            chain.insert(
                format!("e{i}"),
                serde_json::json!([[[[{"$ref": format!("e{}", i + 1)}]]]]),
            );
        }
        chain.insert("e20".into(), Value::Bool(true));
        let err = parse(&flag_with(Value::Object(chain), "e0"), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("document.flags.f.targeting") && err.contains("deeper"),
            "{err}"
        );
        // Billion laughs: tiny, exponentially large once expanded.
        let mut laughs = Map::new();
        for i in 0..10 {
            let refs = vec![serde_json::json!({"$ref": format!("l{}", i + 1)}); 10];
            laughs.insert(format!("l{i}"), Value::Array(refs));
        }
        laughs.insert("l10".into(), Value::String("lol".into()));
        let err = parse(&flag_with(Value::Object(laughs), "l0"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 65536 bytes"), "{err}");
        // A cycle of aliases nests nothing: the hop count stops it.
        let cycle = serde_json::json!({"a": {"$ref": "b"}, "b": {"$ref": "a"}});
        let err = parse(&flag_with(cycle, "a"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("hops"), "{err}");
        // A modest reuse of one evaluator is fine.
        let reuse = serde_json::json!({"corp": {"ends_with": [{"var": "email"}, "@corp.com"]},
                                       "any": {"or": [{"$ref": "corp"}, {"$ref": "corp"}]}});
        assert_eq!(
            parse(&flag_with(reuse, "any"), false).unwrap().flags.len(),
            1
        );
    }

    #[test]
    fn documents_are_bounded_in_flags() {
        let flags: Map<String, Value> = (0..=MAX_FLAGS)
            .map(|i| {
                (
                    format!("f{i}"),
                    serde_json::json!({"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"}),
                )
            })
            .collect();
        let doc = serde_json::json!({ "flags": flags }).to_string();
        let err = parse(&doc, true).unwrap_err().to_string();
        assert!(
            err.contains("document.flags") && err.contains("at most 1000"),
            "{err}"
        );
    }

    #[test]
    fn flag_metadata_is_imported_over_the_flag_sets_and_exported() {
        let parsed = parse(
            r#"{"metadata": {"team": "web", "tier": 1},
                "flags": {
                  "f": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on",
                        "metadata": {"tier": 2, "beta": true}},
                  "g": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"}}}"#,
            false,
        )
        .unwrap();
        let f = parsed.flags.iter().find(|f| f.key == "f").unwrap();
        assert_eq!(
            serde_json::to_value(&f.metadata).unwrap(),
            serde_json::json!({"team": "web", "tier": 2, "beta": true})
        );
        let g = parsed.flags.iter().find(|f| f.key == "g").unwrap();
        assert_eq!(
            serde_json::to_value(&g.metadata).unwrap(),
            serde_json::json!({"team": "web", "tier": 1})
        );
        assert_eq!(f.to_feature(None).metadata, f.metadata);
        // Values other than strings, numbers and booleans, or too many, are refused naming
        // the flag (or the flag set).
        let err = parse(
            r#"{"flags": {"f": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on",
                "metadata": {"nested": {"a": 1}}}}}"#,
            false,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("document.flags.f.metadata"),
            "{err}"
        );
        let err = parse(r#"{"metadata": [1], "flags": {}}"#, false).unwrap_err();
        assert!(err.to_string().contains("document.metadata"), "{err}");
    }
}
