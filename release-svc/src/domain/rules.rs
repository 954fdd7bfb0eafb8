//! The targeting rule language: JSON Logic with flagd's operators (`fractional`, `sem_ver`,
//! `starts_with`, `ends_with`), so flagd targeting rules carry over. A rule evaluates to a
//! variant name, or null for "no match" (the default variant).
//!
//! Rules are parsed and checked once (unknown operators are refused when the feature is
//! written) and evaluated against the context's attributes plus `targetingKey` and
//! `$flagd.flagKey`.

use serde_json::{Map, Value};

use super::hash::fractional_bucket;

/// Every operator the engine knows.
pub const OPERATORS: &[&str] = &[
    "var",
    "if",
    "?:",
    "==",
    "!=",
    "===",
    "!==",
    "!",
    "!!",
    "and",
    "or",
    "<",
    "<=",
    ">",
    ">=",
    "in",
    "cat",
    "+",
    "-",
    "*",
    "/",
    "%",
    "min",
    "max",
    "starts_with",
    "ends_with",
    "sem_ver",
    "fractional",
];

/// A checked targeting rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule(Value);

impl Rule {
    /// Parses and checks a rule written as JSON.
    pub fn parse(text: &str) -> Result<Self, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("is not valid JSON: {e}"))?;
        check(&value, 0)?;
        Ok(Self(value))
    }

    /// The rule as JSON.
    pub fn as_json(&self) -> &Value {
        &self.0
    }

    /// Evaluates the rule against `data` (the context) for feature `flag_key`.
    pub fn evaluate(&self, data: &Value, flag_key: &str) -> Value {
        apply(&self.0, data, flag_key)
    }
}

fn check(rule: &Value, depth: usize) -> Result<(), String> {
    if depth > 64 {
        return Err("nests deeper than 64 levels".into());
    }
    match rule {
        Value::Array(items) => items.iter().try_for_each(|v| check(v, depth + 1)),
        Value::Object(map) if map.len() == 1 => {
            let (op, args) = map.iter().next().ok_or("empty operator")?;
            if !OPERATORS.contains(&op.as_str()) {
                return Err(format!("uses the unknown operator {op:?}"));
            }
            check(args, depth + 1)
        }
        Value::Object(map) if map.is_empty() => Ok(()),
        Value::Object(_) => {
            Err("has an object with more than one key (an operator object has exactly one)".into())
        }
        _ => Ok(()),
    }
}

fn args_of(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    }
}

/// JSON Logic truthiness.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(_) => true,
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        Value::Null => Some(0.0),
        _ => None,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Null, _) | (_, Value::Null) => false,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        _ => match (number(a), number(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

fn f64_value(f: f64) -> Value {
    serde_json::Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

fn var(data: &Value, path: &Value, default: Option<&Value>) -> Value {
    let path = text(path);
    if path.is_empty() {
        return data.clone();
    }
    let mut current = data;
    for part in path.split('.') {
        let next = match current {
            Value::Object(map) => map.get(part),
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        match next {
            Some(v) => current = v,
            None => return default.cloned().unwrap_or(Value::Null),
        }
    }
    current.clone()
}

fn compare(op: &str, a: f64, b: f64) -> bool {
    match op {
        "<" => a < b,
        "<=" => a <= b,
        ">" => a > b,
        _ => a >= b,
    }
}

/// Evaluates `rule` against `data`.
pub fn apply(rule: &Value, data: &Value, flag_key: &str) -> Value {
    let map = match rule {
        Value::Object(map) if map.len() == 1 => map,
        Value::Array(items) => {
            return Value::Array(items.iter().map(|v| apply(v, data, flag_key)).collect())
        }
        other => return other.clone(),
    };
    let Some((op, raw)) = map.iter().next() else {
        return Value::Null;
    };
    let args = args_of(raw);
    let eval = |i: usize| {
        args.get(i)
            .map(|v| apply(v, data, flag_key))
            .unwrap_or(Value::Null)
    };
    match op.as_str() {
        "var" => {
            let path = eval(0);
            let default = args.get(1).map(|v| apply(v, data, flag_key));
            var(data, &path, default.as_ref())
        }
        "if" | "?:" => {
            let mut i = 0;
            while i + 1 < args.len() {
                if truthy(&eval(i)) {
                    return eval(i + 1);
                }
                i += 2;
            }
            if i < args.len() {
                eval(i)
            } else {
                Value::Null
            }
        }
        "==" => Value::Bool(loose_eq(&eval(0), &eval(1))),
        "!=" => Value::Bool(!loose_eq(&eval(0), &eval(1))),
        "===" => Value::Bool(eval(0) == eval(1)),
        "!==" => Value::Bool(eval(0) != eval(1)),
        "!" => Value::Bool(!truthy(&eval(0))),
        "!!" => Value::Bool(truthy(&eval(0))),
        "and" => {
            let mut last = Value::Bool(true);
            for i in 0..args.len() {
                last = eval(i);
                if !truthy(&last) {
                    return last;
                }
            }
            last
        }
        "or" => {
            let mut last = Value::Bool(false);
            for i in 0..args.len() {
                last = eval(i);
                if truthy(&last) {
                    return last;
                }
            }
            last
        }
        "<" | "<=" | ">" | ">=" => {
            let values: Vec<Option<f64>> = (0..args.len()).map(|i| number(&eval(i))).collect();
            let ok = match values.as_slice() {
                [Some(a), Some(b)] => compare(op, *a, *b),
                // JSON Logic's "between": a < b < c.
                [Some(a), Some(b), Some(c)] if op == "<" || op == "<=" => {
                    compare(op, *a, *b) && compare(op, *b, *c)
                }
                _ => false,
            };
            Value::Bool(ok)
        }
        "in" => {
            let needle = eval(0);
            let ok = match eval(1) {
                Value::String(hay) => hay.contains(&text(&needle)),
                Value::Array(items) => items
                    .iter()
                    .any(|v| loose_eq(v, &needle) && v.is_string() == needle.is_string()),
                _ => false,
            };
            Value::Bool(ok)
        }
        "cat" => Value::String((0..args.len()).map(|i| text(&eval(i))).collect()),
        "+" | "*" | "min" | "max" => {
            let nums: Option<Vec<f64>> = (0..args.len()).map(|i| number(&eval(i))).collect();
            match nums {
                Some(n) if !n.is_empty() => f64_value(match op.as_str() {
                    "+" => n.iter().sum(),
                    "*" => n.iter().product(),
                    "min" => n.iter().copied().fold(f64::INFINITY, f64::min),
                    _ => n.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                }),
                _ => Value::Null,
            }
        }
        "-" | "/" | "%" => match (number(&eval(0)), args.len()) {
            (Some(a), 1) if op == "-" => f64_value(-a),
            (Some(a), _) => match number(&eval(1)) {
                Some(b) if op == "-" => f64_value(a - b),
                Some(b) if b != 0.0 && op == "/" => f64_value(a / b),
                Some(b) if b != 0.0 => f64_value(a % b),
                _ => Value::Null,
            },
            _ => Value::Null,
        },
        "starts_with" => match (eval(0), eval(1)) {
            (Value::String(s), Value::String(p)) => Value::Bool(s.starts_with(&p)),
            _ => Value::Bool(false),
        },
        "ends_with" => match (eval(0), eval(1)) {
            (Value::String(s), Value::String(p)) => Value::Bool(s.ends_with(&p)),
            _ => Value::Bool(false),
        },
        "sem_ver" => Value::Bool(sem_ver(&text(&eval(0)), &text(&eval(1)), &text(&eval(2)))),
        "fractional" => fractional(&args, data, flag_key),
        _ => Value::Null,
    }
}

fn parse_version(v: &str) -> Option<semver::Version> {
    let v = v.trim().trim_start_matches(['v', 'V']);
    semver::Version::parse(v).ok().or_else(|| {
        // flagd accepts "1" and "1.2" as 1.0.0 and 1.2.0.
        let parts: Vec<&str> = v.split('.').collect();
        match parts.len() {
            1 => semver::Version::parse(&format!("{v}.0.0")).ok(),
            2 => semver::Version::parse(&format!("{v}.0")).ok(),
            _ => None,
        }
    })
}

/// flagd's `sem_ver`: `[version, operator, version]` with `= != < <= > >= ^ ~`.
pub fn sem_ver(a: &str, op: &str, b: &str) -> bool {
    let (Some(a), Some(b)) = (parse_version(a), parse_version(b)) else {
        return false;
    };
    match op {
        "=" => a == b,
        "!=" => a != b,
        "<" => a < b,
        "<=" => a <= b,
        ">" => a > b,
        ">=" => a >= b,
        "^" => a.major == b.major,
        "~" => a.major == b.major && a.minor == b.minor,
        _ => false,
    }
}

fn fractional(args: &[&Value], data: &Value, flag_key: &str) -> Value {
    let mut args: Vec<Value> = args.iter().map(|v| apply(v, data, flag_key)).collect();
    // An optional first argument that is not a [variant, weight] pair is the bucketing key.
    let hash_key = match args.first() {
        Some(Value::String(_)) => text(&args.remove(0)),
        _ => {
            let key = var(data, &Value::String("targetingKey".into()), None);
            format!("{flag_key}{}", text(&key))
        }
    };
    let buckets: Vec<(String, f64)> = args
        .iter()
        .filter_map(|b| match b {
            Value::Array(pair) if !pair.is_empty() => {
                let weight = pair.get(1).and_then(number).unwrap_or(1.0);
                Some((text(&pair[0]), weight))
            }
            _ => None,
        })
        .collect();
    let total: f64 = buckets.iter().map(|b| b.1).sum();
    if buckets.is_empty() || total <= 0.0 {
        return Value::Null;
    }
    let bucket = fractional_bucket(&hash_key);
    let mut end = 0.0;
    for (variant, weight) in &buckets {
        end += weight * 100.0 / total;
        if bucket < end {
            return Value::String(variant.clone());
        }
    }
    buckets
        .last()
        .map(|b| Value::String(b.0.clone()))
        .unwrap_or(Value::Null)
}

/// Builds the data a rule sees: the attributes, `targetingKey` and `$flagd.flagKey`.
pub fn context_data(attributes: &Map<String, Value>, targeting_key: &str, flag_key: &str) -> Value {
    let mut data = attributes.clone();
    data.insert("targetingKey".into(), Value::String(targeting_key.into()));
    let mut flagd = Map::new();
    flagd.insert("flagKey".into(), Value::String(flag_key.into()));
    data.insert("$flagd".into(), Value::Object(flagd));
    Value::Object(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(rule: Value, data: Value) -> Value {
        let rule = Rule::parse(&rule.to_string()).unwrap_or_else(|e| panic!("{e}"));
        rule.evaluate(&data, "flag")
    }

    #[test]
    fn comparisons_and_lists() {
        let data =
            json!({"email": "ada@example.com", "age": 37, "plan": "pro", "version": "2.4.1"});
        assert_eq!(
            eval(json!({"==": [{"var": "plan"}, "pro"]}), data.clone()),
            json!(true)
        );
        assert_eq!(
            eval(
                json!({"in": [{"var": "plan"}, ["pro", "team"]]}),
                data.clone()
            ),
            json!(true)
        );
        assert_eq!(
            eval(json!({"in": ["example", {"var": "email"}]}), data.clone()),
            json!(true)
        );
        assert_eq!(
            eval(
                json!({"ends_with": [{"var": "email"}, "@example.com"]}),
                data.clone()
            ),
            json!(true)
        );
        assert_eq!(
            eval(
                json!({"starts_with": [{"var": "email"}, "bob"]}),
                data.clone()
            ),
            json!(false)
        );
        assert_eq!(
            eval(json!({">=": [{"var": "age"}, 18]}), data.clone()),
            json!(true)
        );
        assert_eq!(
            eval(json!({"<": [18, {"var": "age"}, 30]}), data.clone()),
            json!(false)
        );
        assert_eq!(
            eval(
                json!({"sem_ver": [{"var": "version"}, ">=", "2.0.0"]}),
                data.clone()
            ),
            json!(true)
        );
        assert_eq!(
            eval(
                json!({"sem_ver": [{"var": "version"}, "^", "3.0.0"]}),
                data.clone()
            ),
            json!(false)
        );
        assert_eq!(
            eval(
                json!({"sem_ver": [{"var": "version"}, "~", "2.4.0"]}),
                data.clone()
            ),
            json!(true)
        );
        assert_eq!(
            eval(json!({"var": ["missing", "fallback"]}), data.clone()),
            json!("fallback")
        );
        assert_eq!(
            eval(
                json!({"if": [{"==": [{"var": "plan"}, "free"]}, "off", {"==": [{"var": "plan"}, "pro"]}, "on", null]}),
                data
            ),
            json!("on")
        );
    }

    #[test]
    fn fractional_splits_by_weight_and_is_stable() {
        let rule = json!({"fractional": [["a", 50], ["b", 50]]});
        let mut a = 0;
        for i in 0..2_000 {
            let data = context_data(&Map::new(), &format!("user-{i}"), "flag");
            let v = eval(rule.clone(), data.clone());
            assert_eq!(v, eval(rule.clone(), data), "stable per key");
            if v == json!("a") {
                a += 1;
            }
        }
        assert!((800..1_200).contains(&a), "50/50 split gave {a}/2000");
    }

    #[test]
    fn unknown_operators_and_bad_json_are_refused() {
        assert!(Rule::parse(r#"{"regex": ["a", "b"]}"#)
            .unwrap_err()
            .contains("regex"));
        assert!(Rule::parse("{not json").is_err());
        assert!(Rule::parse(r#"{"==": [1, 1], "!=": [1, 2]}"#).is_err());
    }
}
