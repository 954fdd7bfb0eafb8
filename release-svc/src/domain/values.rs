//! Limits on the JSON values callers send: variant values and evaluation contexts. Values
//! are measured without recursion (they may nest as deep as the wire allows).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Deepest nesting of a variant value or a context attribute (a scalar is depth 0).
pub const MAX_VALUE_DEPTH: usize = 32;
/// Most bytes of all of a feature's variant values together.
pub const MAX_VARIANTS_BYTES: usize = 64 * 1024;
/// Most bytes of an evaluation context's attributes together.
pub const MAX_CONTEXT_BYTES: usize = 64 * 1024;
/// Most attributes of an evaluation context.
pub const MAX_CONTEXT_ATTRIBUTES: usize = 256;

/// The approximate JSON size of `v` in bytes and its nesting depth.
pub fn measure(v: &Value) -> (usize, usize) {
    let (mut bytes, mut deepest) = (0, 0);
    let mut stack = vec![(v, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        bytes += match v {
            Value::Null | Value::Bool(_) => 5,
            Value::Number(_) => 8,
            Value::String(s) => s.len() + 2,
            Value::Array(items) => {
                stack.extend(items.iter().map(|i| (i, depth + 1)));
                2 + items.len()
            }
            Value::Object(map) => {
                let mut keys = 2;
                for (k, i) in map {
                    keys += k.len() + 4;
                    stack.push((i, depth + 1));
                }
                keys
            }
        };
    }
    (bytes, deepest)
}

fn check_entries<'v>(
    entries: impl Iterator<Item = (&'v String, &'v Value)>,
    max_bytes: usize,
) -> Result<(), String> {
    let mut total = 0;
    for (k, v) in entries {
        let (bytes, depth) = measure(v);
        if depth > MAX_VALUE_DEPTH {
            return Err(format!(
                "value of {k:?} nests deeper than {MAX_VALUE_DEPTH} levels"
            ));
        }
        total += k.len() + bytes;
        if total > max_bytes {
            return Err(format!("must be at most {max_bytes} bytes in total"));
        }
    }
    Ok(())
}

/// Checks a feature's variant values: depth and total size.
pub fn check_variants(variants: &BTreeMap<String, Value>) -> Result<(), String> {
    check_entries(variants.iter(), MAX_VARIANTS_BYTES)
}

/// Most entries of a feature's metadata.
pub const MAX_METADATA_ENTRIES: usize = 64;

/// Checks flag metadata as OpenFeature defines it: at most [`MAX_METADATA_ENTRIES`]
/// entries, keys of 1-128 characters, values strings of at most 1,024 bytes, numbers or
/// booleans.
pub fn check_metadata<'a>(
    metadata: impl ExactSizeIterator<Item = (&'a String, &'a Value)>,
) -> Result<(), String> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(format!(
            "must have at most {MAX_METADATA_ENTRIES} entries, got {}",
            metadata.len()
        ));
    }
    for (k, v) in metadata {
        if k.is_empty() || k.len() > 128 {
            return Err(format!("key {k:?} must have 1-128 characters"));
        }
        match v {
            Value::String(s) if s.len() > 1024 => {
                return Err(format!("{k:?} must be at most 1024 bytes"));
            }
            Value::String(_) | Value::Number(_) | Value::Bool(_) => {}
            _ => return Err(format!("{k:?} must be a string, a number or a boolean")),
        }
    }
    Ok(())
}

/// Checks an evaluation context's attributes: count, depth and total size.
pub fn check_context(attributes: &Map<String, Value>) -> Result<(), String> {
    if attributes.len() > MAX_CONTEXT_ATTRIBUTES {
        return Err(format!(
            "must have at most {MAX_CONTEXT_ATTRIBUTES} attributes, got {}",
            attributes.len()
        ));
    }
    check_entries(attributes.iter(), MAX_CONTEXT_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_size_and_count_are_bounded() {
        let mut deep = json!(1);
        for _ in 0..=MAX_VALUE_DEPTH {
            deep = json!([deep]);
        }
        assert_eq!(measure(&deep).1, MAX_VALUE_DEPTH + 1);
        let mut ctx = Map::new();
        ctx.insert("a".into(), deep);
        assert!(check_context(&ctx).unwrap_err().contains("deeper"));
        ctx.insert("a".into(), json!("x".repeat(MAX_CONTEXT_BYTES)));
        assert!(check_context(&ctx).unwrap_err().contains("bytes"));
        let many: Map<String, Value> = (0..=MAX_CONTEXT_ATTRIBUTES)
            .map(|i| (format!("k{i}"), json!(i)))
            .collect();
        assert!(check_context(&many).unwrap_err().contains("attributes"));
        let fine: Map<String, Value> = [("plan".to_owned(), json!({"tier": ["pro"]}))]
            .into_iter()
            .collect();
        assert!(check_context(&fine).is_ok());
    }
}
