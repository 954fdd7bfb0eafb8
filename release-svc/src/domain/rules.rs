//! The targeting rule language: JSON Logic (the whole standard operator set, arrays and
//! `missing` included) with flagd's operators (`fractional`, `sem_ver`, `starts_with`,
//! `ends_with`), so flagd targeting rules carry over. A rule evaluates to a
//! variant name, or null for "no match" (the default variant).
//!
//! Rules are parsed and checked once (unknown operators are refused when the feature is
//! written) and evaluated against the context's attributes plus `targetingKey` and
//! `$flagd.flagKey` and `$flagd.timestamp` (seconds since the Unix epoch).
//!
//! Budgets: a rule is at most [`MAX_RULE_BYTES`] of JSON nested at most [`MAX_RULE_DEPTH`]
//! levels (checked when it is parsed, so evaluation recursion is bounded too), and one
//! evaluation performs at most [`MAX_EVAL_OPS`] operations and produces at most
//! [`MAX_EVAL_OUTPUT_BYTES`] of strings and arrays. Over budget, [`Rule::evaluate`] answers
//! [`OverBudget`] instead of a value; the caller serves the default.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::hash::{murmur3_32, Murmur3};

mod fast;

/// What a rule reads: the context's attributes, `targetingKey` and `$flagd.flagKey`, looked
/// up in place (no merged copy is built per evaluation).
#[derive(Debug, Clone, Copy)]
pub struct Data<'a> {
    /// The context attributes.
    pub attributes: &'a Map<String, Value>,
    /// The targeting key.
    pub targeting_key: &'a str,
    /// The feature (flag) key.
    pub flag_key: &'a str,
    /// How `fractional` buckets.
    pub bucketing: Bucketing,
}

/// What `var` reads at one point of an evaluation: the request's [`Data`], or inside
/// `map`, `filter`, `reduce`, `all`, `none` and `some` the current item (JSON Logic's scoped
/// data: there `{"var": ""}` is the item and `{"var": "x"}` its field `x`).
#[derive(Debug, Clone, Copy)]
struct Scope<'a> {
    data: Data<'a>,
    item: Option<&'a Value>,
}

impl<'a> std::ops::Deref for Scope<'a> {
    type Target = Data<'a>;

    fn deref(&self) -> &Data<'a> {
        &self.data
    }
}

/// flagd's generations of `fractional` bucketing (the flagd testbed's `@fractional-v1/2/3`
/// profiles). All hash with MurmurHash3 (x86, 32-bit, seed 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Bucketing {
    /// flagd up to 0.14: the hash as a signed integer, `abs(h) / i32::MAX * 100` against
    /// cumulative percentages; string bucketing keys only.
    V1,
    /// flagd 0.15-0.16 (and the SDKs of that generation): `(h as u64 * total) >> 32`
    /// against cumulative integer weights; string bucketing keys only; negative weights
    /// count as 0, a missing weight as 1.
    #[default]
    V2,
    /// The 2026 SDKs' profile: as V2, but the bucketing input is any JSON value encoded as
    /// deterministic CBOR (RFC 8949 section 4.2.1, whole floats as integers), and the implicit
    /// input is the array `[flagKey, targetingKey]`.
    V3,
}

impl std::str::FromStr for Bucketing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "v1" => Ok(Self::V1),
            "v2" => Ok(Self::V2),
            "v3" => Ok(Self::V3),
            other => Err(format!("{other:?} is not a bucketing profile (v1, v2, v3)")),
        }
    }
}

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
    "missing",
    "missing_some",
    "map",
    "filter",
    "reduce",
    "all",
    "none",
    "some",
    "substr",
    "merge",
    "starts_with",
    "ends_with",
    "sem_ver",
    "fractional",
];

/// Longest rule, as JSON text.
pub const MAX_RULE_BYTES: usize = 64 * 1024;
/// Deepest nesting of a rule's JSON (arrays and operator objects).
pub const MAX_RULE_DEPTH: usize = 64;
/// Most operations one evaluation performs (each operator, literal and array item is one).
pub const MAX_EVAL_OPS: u32 = 100_000;
/// Most bytes of strings and arrays one evaluation produces (copies of context values
/// included).
pub const MAX_EVAL_OUTPUT_BYTES: usize = 1024 * 1024;

/// An evaluation ran out of its operation or output budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget;

/// What one evaluation may still spend.
#[derive(Debug)]
struct Budget {
    ops: u32,
    bytes: usize,
    over: bool,
}

impl Budget {
    fn new() -> Self {
        Self {
            ops: MAX_EVAL_OPS,
            bytes: MAX_EVAL_OUTPUT_BYTES,
            over: false,
        }
    }

    /// Takes one operation; false once the budget is gone (every later call too).
    #[inline]
    fn op(&mut self) -> bool {
        if self.ops == 0 {
            self.over = true;
            return false;
        }
        self.ops -= 1;
        true
    }

    /// Takes `bytes` of output; false (and the whole budget gone) when they do not fit.
    #[inline]
    fn spend(&mut self, bytes: usize) -> bool {
        if bytes > self.bytes {
            self.bytes = 0;
            self.ops = 0;
            self.over = true;
            return false;
        }
        self.bytes -= bytes;
        true
    }

    fn exceeded(&self) -> bool {
        self.over
    }

    /// Takes `ops` operations and `bytes` of output at once (a constant's whole cost);
    /// false (and the whole budget gone) when they do not fit.
    fn take(&mut self, ops: u32, bytes: usize) -> bool {
        if ops > self.ops {
            self.ops = 0;
            self.over = true;
            return false;
        }
        self.ops -= ops;
        self.spend(bytes)
    }
}

/// The bytes a copy of `v` costs, roughly (iterative: values nest deeply).
fn weight(v: &Value) -> usize {
    match v {
        Value::String(s) => return 8 + s.len(),
        // The usual array (a bucket, a list of names): scalars only, no stack needed.
        Value::Array(items) if items.iter().all(|i| !i.is_array() && !i.is_object()) => {
            return 8 + items.iter().map(weight).sum::<usize>();
        }
        Value::Array(_) | Value::Object(_) => {}
        _ => return 8,
    }
    let mut total = 0;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        total += 8;
        match v {
            Value::String(s) => total += s.len(),
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => {
                for (k, item) in map {
                    total += k.len();
                    stack.push(item);
                }
            }
            _ => {}
        }
    }
    total
}

/// [`weight`] of a constant array whose items weigh `bytes` (as [`Node::Const`] counts
/// them): for the usual array of scalars (a `fractional` bucket), without walking it again.
fn const_weight(v: &Value, bytes: u32) -> usize {
    match v {
        Value::Array(items) if items.iter().all(|i| !i.is_array() && !i.is_object()) => {
            8 + bytes as usize
        }
        other => weight(other),
    }
}

/// `v` owned, its copy paid from `budget` (null when it does not fit).
fn owned(v: Cow<'_, Value>, budget: &mut Budget) -> Value {
    match v {
        Cow::Owned(v) => v,
        Cow::Borrowed(v) => {
            if budget.spend(weight(v)) {
                v.clone()
            } else {
                Value::Null
            }
        }
    }
}

/// A checked targeting rule, compiled: operators resolved once, constants kept as JSON and
/// read in place. About a quarter of the memory of the rule's JSON tree (whose every
/// operator object is a map), and no operator name compared to a list per evaluation.
///
/// A rule whose operators are all of the usual targeting kind is evaluated on a fast path
/// first (the `fast` module): the same tree, borrowed values only, and the walker's exact
/// answers (it hands over to the walker wherever it cannot be sure of them).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    root: Node,
}

/// One node of a compiled rule.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// A scalar or `{}`: one operation, read in place.
    Lit(Value),
    /// An array without an operator inside, read in place. It costs what evaluating it
    /// item by item would: one operation per value in it and its items' bytes.
    Const { value: Value, ops: u32, bytes: u32 },
    /// An array with an operator inside: evaluated item by item.
    Array(Box<[Node]>),
    /// An operator (its name from [`OPERATORS`]) and its arguments; `bare` when the rule
    /// wrote the single argument without an array (`{"var": "plan"}`).
    ///
    /// `fast` is set on a rule's root operator when the whole rule is for the fast path (it
    /// lives in the node's padding: a rule costs no more memory for it). `split` is the
    /// fast path's plan of a `fractional` in flagd's usual form ([`fast::Split`]; `None` on
    /// every other operator: a rule without one costs no more memory for it).
    Op {
        name: &'static str,
        code: Code,
        args: Box<[Node]>,
        bare: bool,
        fast: bool,
        split: Option<Box<fast::Split>>,
    },
    /// `var` of a constant path without a default (its usual form): one call instead of
    /// the operator's and its path's.
    Var {
        path: Box<str>,
        bare: bool,
        kind: VarKind,
    },
    /// `sem_ver` against a constant version (its usual form), the version parsed once.
    SemVer {
        args: Box<[Node]>,
        against: Box<semver::Version>,
    },
}

/// What a constant `var` path reads outside a `map`-like scope, told when the rule is
/// compiled (the walker reads the path itself; the fast path goes by this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VarKind {
    /// One attribute (no dot in the path).
    Key,
    /// An attribute and keys or indexes inside it.
    Path,
    /// The targeting key (the path's first part is `targetingKey`).
    TargetingKey,
    /// The flag key (`$flagd.flagKey`).
    FlagKey,
    /// Nothing: a `$flagd` path other than the flag key and the timestamp.
    Null,
    /// The whole data (an empty first part) or `$flagd.timestamp`: the walker's.
    Slow,
}

impl VarKind {
    fn of(path: &str) -> Self {
        let (first, rest) = path
            .split_once('.')
            .map_or((path, None), |(f, r)| (f, Some(r)));
        match first {
            "" => Self::Slow,
            "targetingKey" => Self::TargetingKey,
            "$flagd" => match rest.and_then(|r| r.split('.').next()) {
                Some("flagKey") => Self::FlagKey,
                Some("timestamp") => Self::Slow,
                _ => Self::Null,
            },
            _ if rest.is_some() => Self::Path,
            _ => Self::Key,
        }
    }
}

/// An operator resolved when the rule is compiled, so evaluation dispatches on a small
/// integer instead of comparing the operator's name against each arm. Operators that share
/// an arm share a code (the arm tells them apart by name where it must).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    Var,
    If,
    Eq,
    Ne,
    StrictEq,
    StrictNe,
    Not,
    NotNot,
    And,
    Or,
    Compare,
    In,
    Cat,
    Fold,
    Arith,
    Affix,
    SemVer,
    Fractional,
    Missing,
    MissingSome,
    Iterate,
    Reduce,
    Substr,
    Merge,
    Unknown,
}

impl Code {
    fn of(name: &str) -> Self {
        match name {
            "var" => Self::Var,
            "if" | "?:" => Self::If,
            "==" => Self::Eq,
            "!=" => Self::Ne,
            "===" => Self::StrictEq,
            "!==" => Self::StrictNe,
            "!" => Self::Not,
            "!!" => Self::NotNot,
            "and" => Self::And,
            "or" => Self::Or,
            "<" | "<=" | ">" | ">=" => Self::Compare,
            "in" => Self::In,
            "cat" => Self::Cat,
            "+" | "*" | "min" | "max" => Self::Fold,
            "-" | "/" | "%" => Self::Arith,
            "starts_with" | "ends_with" => Self::Affix,
            "sem_ver" => Self::SemVer,
            "fractional" => Self::Fractional,
            "missing" => Self::Missing,
            "missing_some" => Self::MissingSome,
            "map" | "filter" | "all" | "none" | "some" => Self::Iterate,
            "reduce" => Self::Reduce,
            "substr" => Self::Substr,
            "merge" => Self::Merge,
            _ => Self::Unknown,
        }
    }
}

/// The argument an operator reads where the rule gives none.
static NULL_NODE: Node = Node::Lit(Value::Null);
/// Answers that need no copy (an owned `Value` would be built and dropped per operator).
pub(crate) static NULL: Value = Value::Null;
static TRUE: Value = Value::Bool(true);
static FALSE: Value = Value::Bool(false);

impl Node {
    /// Compiles a checked rule.
    fn compile(v: &Value) -> Self {
        match v {
            Value::Object(map) => match map.iter().next() {
                Some((op, raw)) => {
                    let name = OPERATORS
                        .iter()
                        .copied()
                        .find(|o| *o == op)
                        .unwrap_or("unknown");
                    let (args, bare): (Box<[Node]>, bool) = match raw {
                        Value::Array(items) => (items.iter().map(Self::compile).collect(), false),
                        other => (Box::from([Self::compile(other)]), true),
                    };
                    if let ("sem_ver", [_, _, Self::Lit(Value::String(b))]) = (name, &args[..]) {
                        if let Some(against) = parse_version(b) {
                            let against = Box::new(against);
                            return Self::SemVer { args, against };
                        }
                    }
                    if let ("var", [Self::Lit(Value::String(path))]) = (name, &args[..]) {
                        let kind = VarKind::of(path);
                        let path = path.as_str().into();
                        return Self::Var { path, bare, kind };
                    }
                    let code = Code::of(name);
                    let split = if code == Code::Fractional {
                        fast::Split::plan(&args)
                    } else {
                        None
                    };
                    Self::Op {
                        name,
                        code,
                        args,
                        bare,
                        fast: false,
                        split,
                    }
                }
                None => Self::Lit(v.clone()),
            },
            Value::Array(items) => {
                let items: Box<[Node]> = items.iter().map(Self::compile).collect();
                if items
                    .iter()
                    .all(|n| matches!(n, Self::Lit(_) | Self::Const { .. }))
                {
                    let (ops, bytes) = items.iter().fold((1u32, 0u32), |(o, b), n| match n {
                        Self::Const { ops, bytes, .. } => (o + ops, b + bytes),
                        Self::Lit(v) => (o + 1, b + weight(v) as u32),
                        _ => (o, b),
                    });
                    Self::Const {
                        value: v.clone(),
                        ops,
                        bytes,
                    }
                } else {
                    Self::Array(items)
                }
            }
            other => Self::Lit(other.clone()),
        }
    }

    /// The JSON the node was compiled from.
    fn to_json(&self) -> Value {
        match self {
            Self::Lit(v) | Self::Const { value: v, .. } => v.clone(),
            Self::Array(items) => Value::Array(items.iter().map(Self::to_json).collect()),
            Self::Var { path, bare, .. } => {
                let path = Value::String(path.to_string());
                let args = if *bare {
                    path
                } else {
                    Value::Array(vec![path])
                };
                let mut map = Map::with_capacity(1);
                map.insert("var".to_owned(), args);
                Value::Object(map)
            }
            Self::SemVer { args, .. } => {
                let args = args.iter().map(Self::to_json).collect();
                let mut map = Map::with_capacity(1);
                map.insert("sem_ver".to_owned(), Value::Array(args));
                Value::Object(map)
            }
            Self::Op {
                name, args, bare, ..
            } => {
                let args = match (bare, &args[..]) {
                    (true, [one]) => one.to_json(),
                    _ => Value::Array(args.iter().map(Self::to_json).collect()),
                };
                let mut map = Map::with_capacity(1);
                map.insert((*name).to_owned(), args);
                Value::Object(map)
            }
        }
    }
}

impl Rule {
    /// Parses and checks a rule written as JSON: at most [`MAX_RULE_BYTES`], nested at
    /// most [`MAX_RULE_DEPTH`] levels, known operators only.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_RULE_BYTES {
            return Err(format!(
                "must be at most {MAX_RULE_BYTES} bytes of JSON, got {}",
                text.len()
            ));
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("is not valid JSON: {e}"))?;
        check(&value, 0)?;
        let mut root = Node::compile(&value);
        let applies = fast::applies(&root);
        if let Node::Op { fast, .. } = &mut root {
            *fast = applies;
        }
        Ok(Self { root })
    }

    /// The rule as JSON (as written, object keys in order).
    pub fn to_json(&self) -> Value {
        self.root.to_json()
    }

    /// Evaluates the rule against `data` within the evaluation budget.
    pub fn evaluate<'a>(&'a self, data: &Data<'a>) -> Result<Cow<'a, Value>, OverBudget> {
        if let Node::Op { fast: true, .. } = &self.root {
            if let Some(v) = fast::eval(&self.root, data, &mut fast::budget()) {
                return Ok(v.into_cow(data));
            }
        }
        self.evaluate_walked(data)
    }

    /// Evaluates the rule with the general walker alone (what [`Rule::evaluate`] answers,
    /// always; public so that tests and the fuzzer can hold the fast path to it).
    #[doc(hidden)]
    pub fn evaluate_walked<'a>(&'a self, data: &Data<'a>) -> Result<Cow<'a, Value>, OverBudget> {
        let mut budget = Budget::new();
        let scope = Scope {
            data: *data,
            item: None,
        };
        let v = apply(&self.root, &scope, &mut budget);
        if budget.exceeded() {
            Err(OverBudget)
        } else {
            Ok(v)
        }
    }
}

fn check(rule: &Value, depth: usize) -> Result<(), String> {
    if depth > MAX_RULE_DEPTH {
        return Err(format!("nests deeper than {MAX_RULE_DEPTH} levels"));
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
        Value::Number(n) => number_text(n),
        other => other.to_string(),
    }
}

/// A number as JSON Logic's JavaScript and flagd's Go write it: a whole number without a
/// fraction (`1`, not `1.0`: a request's numbers arrive as floats), whatever its JSON type.
fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e21 => (f as i128).to_string(),
        _ => n.to_string(),
    }
}

/// JSON Logic's `===`: numbers by value (`1 === 1.0`: a request's numbers arrive as
/// floats, a rule's whole numbers as integers), everything else by JSON equality.
fn strict_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
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

fn var<'a>(
    data: &Scope<'a>,
    path: &str,
    default: Option<Cow<'a, Value>>,
    budget: &mut Budget,
) -> Cow<'a, Value> {
    if let Some(item) = data.item {
        return walk(item, path)
            .map_or_else(|| default.unwrap_or(Cow::Borrowed(&NULL)), Cow::Borrowed);
    }
    // Most paths are one key: find the dot by a plain byte scan (no searcher set up).
    let (first, rest) = match path.bytes().position(|b| b == b'.') {
        Some(i) => (&path[..i], Some(&path[i + 1..])),
        None => (path, None),
    };
    let mut parts = rest.into_iter().flat_map(|r| r.split('.'));
    let current: &'a Value = match first {
        "" => return Cow::Owned(whole(data, budget)),
        "targetingKey" => return Cow::Owned(Value::String(data.targeting_key.to_owned())),
        "$flagd" => {
            return match parts.next() {
                Some("flagKey") => Cow::Owned(Value::String(data.flag_key.to_owned())),
                Some("timestamp") => Cow::Owned(Value::from(unix_seconds())),
                _ => default.unwrap_or(Cow::Borrowed(&NULL)),
            }
        }
        key => match data.attributes.get(key) {
            Some(v) => v,
            None => return default.unwrap_or(Cow::Borrowed(&NULL)),
        },
    };
    match walk_parts(current, parts) {
        Some(v) => Cow::Borrowed(v),
        None => default.unwrap_or(Cow::Borrowed(&NULL)),
    }
}

/// `cat`: each piece of `args` in order, paid for, handed to `sink`; false when the budget
/// ran out. The request's own texts (`targetingKey`, `$flagd.flagKey`: flagd's usual
/// bucketing seed) are handed over in place, at the general form's cost.
fn cat_pieces<'a>(
    args: &'a [Node],
    data: &Scope<'a>,
    budget: &mut Budget,
    mut sink: impl FnMut(&str),
) -> bool {
    for arg in args {
        if let Some(own) = own_text(arg, data) {
            if !budget.op() || !budget.op() || !budget.spend(own.len()) {
                return false;
            }
            sink(own);
            continue;
        }
        let piece = apply(arg, data, budget);
        let piece = paid_text(&piece, budget);
        if !budget.spend(piece.len()) {
            return false;
        }
        sink(&piece);
    }
    true
}

/// The text `{"var": "targetingKey"}` or `{"var": "$flagd.flagKey"}` reads outside a
/// `map`-like scope (where `var` reads the current item instead); `None` for any other node.
fn own_text<'a>(node: &Node, data: &Scope<'a>) -> Option<&'a str> {
    match (node, data.item) {
        (Node::Var { path, .. }, None) => match path.as_ref() {
            "targetingKey" => Some(data.targeting_key),
            "$flagd.flagKey" => Some(data.flag_key),
            _ => None,
        },
        _ => None,
    }
}

/// `path` (dot-separated keys and array indexes) inside `v`; the empty path is `v`.
fn walk<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    if path.is_empty() {
        return Some(v);
    }
    walk_parts(v, path.split('.'))
}

/// `parts` (keys and array indexes) inside `v`, one after the other.
fn walk_parts<'v, 'p>(
    mut current: &'v Value,
    parts: impl Iterator<Item = &'p str>,
) -> Option<&'v Value> {
    for part in parts {
        current = match current {
            Value::Object(map) => map.get(part)?,
            Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// The whole data as one object (only for `{"var": ""}`), its copy paid from `budget`.
fn whole(data: &Data<'_>, budget: &mut Budget) -> Value {
    let cost: usize = data
        .attributes
        .iter()
        .map(|(k, v)| k.len() + weight(v))
        .sum();
    if !budget.spend(cost + data.targeting_key.len() + data.flag_key.len()) {
        return Value::Null;
    }
    let mut map = data.attributes.clone();
    map.insert(
        "targetingKey".into(),
        Value::String(data.targeting_key.into()),
    );
    let mut flagd = Map::new();
    flagd.insert("flagKey".into(), Value::String(data.flag_key.into()));
    flagd.insert("timestamp".into(), Value::from(unix_seconds()));
    map.insert("$flagd".into(), Value::Object(flagd));
    Value::Object(map)
}

/// `$flagd.timestamp`: the evaluation time in whole seconds since the Unix epoch.
fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn compare(op: &str, a: f64, b: f64) -> bool {
    match op {
        "<" => a < b,
        "<=" => a <= b,
        ">" => a > b,
        _ => a >= b,
    }
}

/// `<`, `<=`, `>`, `>=` on two texts, in code point order (the order of their UTF-8
/// bytes), as the JSON Logic engines of flagd and its providers compare two strings (dates
/// written as ISO 8601 texts order as dates).
fn compare_text(op: &str, a: &str, b: &str) -> bool {
    let order = a.cmp(b);
    match op {
        "<" => order.is_lt(),
        "<=" => order.is_le(),
        ">" => order.is_gt(),
        _ => order.is_ge(),
    }
}

/// JSON Logic's order of two values: two texts as texts, anything else as numbers (false
/// when either is no number).
fn ordered(op: &str, a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => compare_text(op, x, y),
        _ => matches!((number(a), number(b)), (Some(x), Some(y)) if compare(op, x, y)),
    }
}

fn bool_value<'a>(b: bool) -> Cow<'a, Value> {
    Cow::Borrowed(if b { &TRUE } else { &FALSE })
}

fn number_value<'a>(f: Option<f64>) -> Cow<'a, Value> {
    Cow::Owned(f.map_or(Value::Null, f64_value))
}

/// A value as text, its rendering paid from `budget` (strings are borrowed for free).
fn paid_text<'v>(v: &'v Value, budget: &mut Budget) -> Cow<'v, str> {
    match v {
        Value::String(s) => Cow::Borrowed(s.as_str()),
        Value::Null => Cow::Borrowed(""),
        other => {
            if budget.spend(weight(other)) {
                Cow::Owned(text(other))
            } else {
                Cow::Borrowed("")
            }
        }
    }
}

/// Evaluates `rule` against `data`, borrowing from the rule and the data where it can and
/// paying every operation and copy from `budget` (null once it is spent). Recursion is
/// bounded by the rule's checked depth.
///
/// Long by design: one arm per operator of [`OPERATORS`], each with its budget accounting
/// beside its evaluation, so the whole operator table reads (and is fuzzed) in one place.
fn apply<'a>(rule: &'a Node, data: &Scope<'a>, budget: &mut Budget) -> Cow<'a, Value> {
    let (op, code, args): (&str, Code, &'a [Node]) = match rule {
        Node::Op {
            name, code, args, ..
        } => (name, *code, args),
        Node::Lit(v) => {
            return if budget.op() {
                Cow::Borrowed(v)
            } else {
                Cow::Borrowed(&NULL)
            };
        }
        Node::Const { value, ops, bytes } => {
            return if budget.take(*ops, *bytes as usize) {
                Cow::Borrowed(value)
            } else {
                Cow::Borrowed(&NULL)
            };
        }
        Node::Var { path, .. } => {
            // The operations of the general form: the operator and its path.
            if !budget.op() || !budget.op() {
                return Cow::Borrowed(&NULL);
            }
            return var(data, path, None, budget);
        }
        Node::SemVer { args, against } => {
            // The operations and copies of the general form: the operator, its three
            // arguments (the version a literal), texts borrowed.
            if !budget.op() {
                return Cow::Borrowed(&NULL);
            }
            let (a, o) = (apply(&args[0], data, budget), apply(&args[1], data, budget));
            if !budget.op() {
                return Cow::Borrowed(&NULL);
            }
            let (a, o) = (paid_text(&a, budget), paid_text(&o, budget));
            return parse_version(&a)
                .and_then(|a| compare_versions(&a, &o, against))
                .map_or(Cow::Borrowed(&NULL), bool_value);
        }
        Node::Array(items) => {
            if !budget.op() {
                return Cow::Borrowed(&NULL);
            }
            let mut out = Vec::with_capacity(items.len());
            for v in items.iter() {
                let item = apply(v, data, budget);
                out.push(owned(item, budget));
            }
            return Cow::Owned(Value::Array(out));
        }
    };
    if !budget.op() {
        return Cow::Borrowed(&NULL);
    }
    let eval = |i: usize, budget: &mut Budget| arg(args, i, data, budget);
    match code {
        Code::Var => {
            let path = eval(0, budget);
            let default = args.get(1).map(|v| apply(v, data, budget));
            match path.as_ref() {
                Value::String(p) => var(data, p, default, budget),
                Value::Null => var(data, "", default, budget),
                other => {
                    let p = paid_text(other, budget);
                    var(data, &p, default, budget)
                }
            }
        }
        Code::If => {
            let mut i = 0;
            while i + 1 < args.len() {
                if truthy(&eval(i, budget)) {
                    return eval(i + 1, budget);
                }
                i += 2;
            }
            if i < args.len() {
                eval(i, budget)
            } else {
                Cow::Borrowed(&NULL)
            }
        }
        Code::Eq => bool_value(loose_eq(&eval(0, budget), &eval(1, budget))),
        Code::Ne => bool_value(!loose_eq(&eval(0, budget), &eval(1, budget))),
        Code::StrictEq => bool_value(strict_eq(&eval(0, budget), &eval(1, budget))),
        Code::StrictNe => bool_value(!strict_eq(&eval(0, budget), &eval(1, budget))),
        Code::Not => bool_value(!truthy(&eval(0, budget))),
        Code::NotNot => bool_value(truthy(&eval(0, budget))),
        Code::And => {
            let mut last = bool_value(true);
            for i in 0..args.len() {
                last = eval(i, budget);
                if !truthy(&last) {
                    return last;
                }
            }
            last
        }
        Code::Or => {
            let mut last = bool_value(false);
            for i in 0..args.len() {
                last = eval(i, budget);
                if truthy(&last) {
                    return last;
                }
            }
            last
        }
        Code::Compare => {
            let a = eval(0, budget);
            let b = eval(1, budget);
            let ok = match args.len() {
                2 => ordered(op, &a, &b),
                // JSON Logic's "between": a < b < c.
                3 if op == "<" || op == "<=" => {
                    ordered(op, &a, &b) && ordered(op, &b, &eval(2, budget))
                }
                _ => false,
            };
            bool_value(ok)
        }
        Code::In => {
            let needle = eval(0, budget);
            let ok = match eval(1, budget).as_ref() {
                Value::String(hay) => hay.contains(paid_text(&needle, budget).as_ref()),
                Value::Array(items) => items
                    .iter()
                    .any(|v| v.is_string() == needle.is_string() && loose_eq(v, &needle)),
                _ => false,
            };
            bool_value(ok)
        }
        Code::Cat => {
            let mut out = String::with_capacity(32);
            if !cat_pieces(args, data, budget, |piece| out.push_str(piece)) {
                return Cow::Borrowed(&NULL);
            }
            Cow::Owned(Value::String(out))
        }
        Code::Fold => fold(op, args, data, budget),
        Code::Arith => arith(op, args, data, budget),
        // flagd's operators answer null (not false) to bad input: wrong argument counts,
        // non-strings, invalid versions or operators; the flag then serves its default.
        Code::Affix => {
            if args.len() != 2 {
                return Cow::Borrowed(&NULL);
            }
            let (s, p) = (eval(0, budget), eval(1, budget));
            match (s.as_ref(), p.as_ref()) {
                (Value::String(s), Value::String(p)) if op == "starts_with" => {
                    bool_value(s.starts_with(p.as_str()))
                }
                (Value::String(s), Value::String(p)) => bool_value(s.ends_with(p.as_str())),
                _ => Cow::Borrowed(&NULL),
            }
        }
        Code::SemVer => {
            if args.len() != 3 {
                return Cow::Borrowed(&NULL);
            }
            let (a, o, b) = (eval(0, budget), eval(1, budget), eval(2, budget));
            let (a, o, b) = (
                paid_text(&a, budget),
                paid_text(&o, budget),
                paid_text(&b, budget),
            );
            sem_ver(&a, &o, &b).map_or(Cow::Borrowed(&NULL), bool_value)
        }
        Code::Fractional => fractional(args, data, budget),
        Code::Missing => Cow::Owned(missing(args, data, budget)),
        Code::MissingSome => missing_some(args, data, budget),
        Code::Iterate => iterate(op, args, data, budget),
        Code::Reduce => reduce(args, data, budget),
        Code::Substr => substr(args, data, budget),
        Code::Merge => merge(args, data, budget),
        Code::Unknown => Cow::Borrowed(&NULL),
    }
}

/// Argument `i` of an operator evaluated (null where the rule gives none).
fn arg<'a>(args: &'a [Node], i: usize, data: &Scope<'a>, budget: &mut Budget) -> Cow<'a, Value> {
    args.get(i)
        .map_or(Cow::Borrowed(&NULL), |v| apply(v, data, budget))
}

/// `+`, `*`, `min` and `max`, apart from [`apply`] (rarely used; a smaller `apply` is faster).
#[inline(never)]
fn fold<'a>(op: &str, args: &'a [Node], data: &Scope<'a>, budget: &mut Budget) -> Cow<'a, Value> {
    let eval = |i: usize, budget: &mut Budget| arg(args, i, data, budget);
    let nums: Option<Vec<f64>> = (0..args.len()).map(|i| number(&eval(i, budget))).collect();
    number_value(nums.filter(|n| !n.is_empty()).map(|n| match op {
        "+" => n.iter().sum(),
        "*" => n.iter().product(),
        "min" => n.iter().copied().fold(f64::INFINITY, f64::min),
        _ => n.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }))
}

/// `-`, `/` and `%`, apart from [`apply`] (rarely used; a smaller `apply` is faster).
#[inline(never)]
fn arith<'a>(op: &str, args: &'a [Node], data: &Scope<'a>, budget: &mut Budget) -> Cow<'a, Value> {
    let eval = |i: usize, budget: &mut Budget| arg(args, i, data, budget);
    number_value(match (number(&eval(0, budget)), args.len()) {
        (Some(a), 1) if op == "-" => Some(-a),
        (Some(a), _) => match number(&eval(1, budget)) {
            Some(b) if op == "-" => Some(a - b),
            Some(b) if b != 0.0 && op == "/" => Some(a / b),
            Some(b) if b != 0.0 => Some(a % b),
            _ => None,
        },
        _ => None,
    })
}

/// `missing_some`, apart from [`apply`] (rarely used; a smaller `apply` is faster).
#[inline(never)]
fn missing_some<'a>(args: &'a [Node], data: &Scope<'a>, budget: &mut Budget) -> Cow<'a, Value> {
    let eval = |i: usize, budget: &mut Budget| arg(args, i, data, budget);
    let need = number(&eval(0, budget)).unwrap_or(0.0);
    let keys = args
        .get(1)
        .map_or(Cow::Borrowed(&NULL), |v| apply(v, data, budget));
    let Value::Array(keys) = keys.as_ref() else {
        return Cow::Owned(Value::Array(Vec::new()));
    };
    let absent = missing_keys(keys, data, budget);
    let present = keys.len() - absent.len();
    if present as f64 >= need {
        Cow::Owned(Value::Array(Vec::new()))
    } else {
        Cow::Owned(Value::Array(absent))
    }
}

/// `map`, `filter`, `all`, `none` and `some`, apart from [`apply`] (rarely used; a smaller `apply` is faster).
#[inline(never)]
fn iterate<'a>(
    op: &str,
    args: &'a [Node],
    data: &Scope<'a>,
    budget: &mut Budget,
) -> Cow<'a, Value> {
    let eval = |i: usize, budget: &mut Budget| arg(args, i, data, budget);
    let mut items = eval(0, budget);
    if let (Value::String(text), "all") = (items.as_ref(), op) {
        // json-logic-js's `all` walks a string's characters.
        if !budget.spend(text.len() * 9) {
            return Cow::Borrowed(&NULL);
        }
        let chars = text.chars().map(|c| Value::String(c.into())).collect();
        items = Cow::Owned(Value::Array(chars));
    }
    let Value::Array(items) = items.as_ref() else {
        // JSON Logic: over anything but an array, map and filter give [], all and
        // some false, none true.
        return Cow::Owned(match op {
            "map" | "filter" => Value::Array(Vec::new()),
            "none" => Value::Bool(true),
            _ => Value::Bool(false),
        });
    };
    let logic = args.get(1).unwrap_or(&NULL_NODE);
    let mut out = Vec::new();
    for item in items {
        if budget.exceeded() {
            return Cow::Borrowed(&NULL);
        }
        let inner = Scope {
            data: data.data,
            item: Some(item),
        };
        let result = apply(logic, &inner, budget);
        match op {
            "map" => {
                let v = owned(result, budget);
                out.push(v);
            }
            "filter" if truthy(&result) && budget.spend(weight(item)) => {
                out.push(item.clone());
            }
            "all" if !truthy(&result) => return bool_value(false),
            "none" if truthy(&result) => return bool_value(false),
            "some" if truthy(&result) => return bool_value(true),
            _ => {}
        }
    }
    Cow::Owned(match op {
        "map" | "filter" => Value::Array(out),
        // `all` of nothing is false in JSON Logic.
        "all" => Value::Bool(!items.is_empty()),
        "none" => Value::Bool(true),
        _ => Value::Bool(false),
    })
}

/// `reduce`, apart from [`apply`] (rarely used; a smaller `apply` is faster).
#[inline(never)]
fn reduce<'a>(args: &'a [Node], data: &Scope<'a>, budget: &mut Budget) -> Cow<'a, Value> {
    let eval = |i: usize, budget: &mut Budget| arg(args, i, data, budget);
    let items = eval(0, budget);
    let initial = eval(2, budget);
    let mut accumulator = owned(initial, budget);
    let Value::Array(items) = items.as_ref() else {
        return Cow::Owned(accumulator);
    };
    let logic = args.get(1).unwrap_or(&NULL_NODE);
    for item in items {
        if budget.exceeded() || !budget.spend(weight(item)) {
            return Cow::Borrowed(&NULL);
        }
        let mut state = Map::with_capacity(2);
        state.insert("current".into(), item.clone());
        state.insert("accumulator".into(), accumulator);
        let state = Value::Object(state);
        let inner = Scope {
            data: data.data,
            item: Some(&state),
        };
        let next = apply(logic, &inner, budget);
        accumulator = owned(next, budget);
    }
    Cow::Owned(accumulator)
}

/// `substr`, apart from [`apply`] (rarely used; a smaller `apply` is faster).
#[inline(never)]
fn substr<'a>(args: &'a [Node], data: &Scope<'a>, budget: &mut Budget) -> Cow<'a, Value> {
    let eval = |i: usize, budget: &mut Budget| arg(args, i, data, budget);
    let source = eval(0, budget);
    let source = paid_text(&source, budget);
    let chars: Vec<char> = source.chars().collect();
    let len = chars.len() as i64;
    let start = number(&eval(1, budget)).unwrap_or(0.0) as i64;
    // Saturating: the numbers come from the rule or the context, as large as i64 goes.
    let start = if start < 0 {
        len.saturating_add(start).max(0)
    } else {
        start.min(len)
    };
    let end = match args.get(2) {
        None => len,
        Some(_) => {
            let n = number(&eval(2, budget)).unwrap_or(0.0) as i64;
            if n < 0 {
                len.saturating_add(n).max(start)
            } else {
                start.saturating_add(n).min(len)
            }
        }
    };
    let piece: String = chars[start as usize..end.max(start) as usize]
        .iter()
        .collect();
    if !budget.spend(piece.len()) {
        return Cow::Borrowed(&NULL);
    }
    Cow::Owned(Value::String(piece))
}

/// `merge`, apart from [`apply`] (rarely used; a smaller `apply` is faster).
#[inline(never)]
fn merge<'a>(args: &'a [Node], data: &Scope<'a>, budget: &mut Budget) -> Cow<'a, Value> {
    let eval = |i: usize, budget: &mut Budget| arg(args, i, data, budget);
    let mut out = Vec::new();
    for i in 0..args.len() {
        match eval(i, budget) {
            Cow::Owned(Value::Array(items)) => out.extend(items),
            Cow::Borrowed(Value::Array(items)) => {
                for item in items {
                    if !budget.spend(weight(item)) {
                        return Cow::Borrowed(&NULL);
                    }
                    out.push(item.clone());
                }
            }
            other => {
                let v = owned(other, budget);
                out.push(v);
            }
        }
    }
    Cow::Owned(Value::Array(out))
}

/// JSON Logic's `missing`: the keys (the arguments, or the first argument when it is an
/// array) whose value is null or the empty string.
fn missing<'a>(args: &'a [Node], data: &Scope<'a>, budget: &mut Budget) -> Value {
    let mut keys = Vec::with_capacity(args.len());
    for v in args {
        let key = apply(v, data, budget);
        keys.push(owned(key, budget));
    }
    let keys = match keys.first() {
        Some(Value::Array(first)) => first.clone(),
        _ => keys,
    };
    Value::Array(missing_keys(&keys, data, budget))
}

fn missing_keys(keys: &[Value], data: &Scope<'_>, budget: &mut Budget) -> Vec<Value> {
    let mut absent = Vec::new();
    for key in keys {
        if !budget.op() {
            break;
        }
        let path = paid_text(key, budget);
        let found = var(data, &path, None, budget);
        if matches!(found.as_ref(), Value::Null) || found.as_ref() == &Value::String(String::new())
        {
            absent.push(key.clone());
        }
    }
    absent
}

fn parse_version(v: &str) -> Option<semver::Version> {
    // A plain version has nothing to trim.
    if let Some(plain) = plain_version(v) {
        return Some(plain);
    }
    // One `v` (or `V`) prefix, as flagd reads it: `vv1.2.3` is no version.
    let v = v.trim();
    let v = v.strip_prefix(['v', 'V']).unwrap_or(v);
    if let Some(plain) = plain_version(v) {
        return Some(plain);
    }
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

/// The usual version, `MAJOR.MINOR.PATCH` in plain decimal, read without the general
/// parser (a context's version is read on every evaluation of a `sem_ver` rule); `None`
/// for anything else (pre-release, build, leading zeros, more than 18 digits), which the
/// general parser then reads or refuses exactly as before.
fn plain_version(v: &str) -> Option<semver::Version> {
    plain_parts(v).map(|[major, minor, patch]| semver::Version::new(major, minor, patch))
}

/// The numbers of a plain version ([`plain_version`]).
#[inline]
fn plain_parts(v: &str) -> Option<[u64; 3]> {
    let b = v.as_bytes();
    let mut parts = [0u64; 3];
    let mut i = 0;
    for (n, part) in parts.iter_mut().enumerate() {
        let start = i;
        while let Some(d) = b.get(i).filter(|d| d.is_ascii_digit()) {
            if i - start == 18 {
                return None;
            }
            *part = *part * 10 + u64::from(d - b'0');
            i += 1;
        }
        if i == start || (i - start > 1 && b[start] == b'0') {
            return None;
        }
        match (n, b.get(i)) {
            (2, None) => {}
            (0 | 1, Some(b'.')) => i += 1,
            _ => return None,
        }
    }
    Some(parts)
}

/// flagd's `sem_ver`: `[version, operator, version]` with `= != < <= > >= ^ ~`; `None`
/// for an invalid version or operator.
pub fn sem_ver(a: &str, op: &str, b: &str) -> Option<bool> {
    compare_versions(&parse_version(a)?, op, &parse_version(b)?)
}

fn compare_versions(a: &semver::Version, op: &str, b: &semver::Version) -> Option<bool> {
    // Precedence ignores build metadata (SemVer 2.0 section 10): 1.0.0+build = 1.0.0.
    order_answer(
        a.cmp_precedence(b),
        op,
        [a.major, a.minor],
        [b.major, b.minor],
    )
}

/// `sem_ver` of a plain version (`MAJOR.MINOR.PATCH`: no pre-release, no build) against
/// `b`, compared as numbers without building a version; `None` where [`compare_versions`]
/// must answer (`a` not plain, `b` a pre-release).
#[inline]
fn compare_plain(a: &str, op: &str, b: &semver::Version) -> Option<Option<bool>> {
    if !b.pre.is_empty() {
        return None;
    }
    let a = plain_parts(a)?;
    let order = a.cmp(&[b.major, b.minor, b.patch]);
    Some(order_answer(order, op, [a[0], a[1]], [b.major, b.minor]))
}

/// flagd's `sem_ver` operators on an ordering (and the major and minor numbers, for `^`
/// and `~`).
fn order_answer(order: std::cmp::Ordering, op: &str, a: [u64; 2], b: [u64; 2]) -> Option<bool> {
    Some(match op {
        "=" => order.is_eq(),
        "!=" => order.is_ne(),
        "<" => order.is_lt(),
        "<=" => order.is_le(),
        ">" => order.is_gt(),
        ">=" => order.is_ge(),
        "^" => a[0] == b[0],
        "~" => a == b,
        _ => return None,
    })
}

fn fractional<'a>(raw_args: &'a [Node], data: &Scope<'a>, budget: &mut Budget) -> Cow<'a, Value> {
    // Names and weights may be expressions (flagd's "nested" fractional): evaluate first.
    // The trailing constant buckets (the usual form: a seed, then `[variant, weight]`
    // literals) are read in place, with no list built; values read in place are paid for
    // as if copied, in argument order.
    let constant = raw_args
        .iter()
        .rev()
        .take_while(|n| {
            matches!(
                n,
                Node::Const {
                    value: Value::Array(_),
                    ..
                }
            )
        })
        .count();
    let (evaluated, constant) = raw_args.split_at(raw_args.len() - constant);
    let streamed = match streamed_seed(evaluated, data, budget) {
        Ok(hash) => hash,
        Err(OverBudget) => return Cow::Borrowed(&NULL),
    };
    let evaluated = if streamed.is_some() { &[] } else { evaluated };
    let mut args: Vec<Cow<'a, Value>> = Vec::new();
    for v in evaluated {
        let item = match apply(v, data, budget) {
            Cow::Borrowed(v) if !budget.spend(weight(v)) => Cow::Borrowed(&NULL),
            item => item,
        };
        args.push(item);
    }
    for node in constant {
        if let Node::Const { value, ops, bytes } = node {
            if !budget.take(*ops, *bytes as usize) || !budget.spend(const_weight(value, *bytes)) {
                return Cow::Borrowed(&NULL);
            }
        }
    }
    // An optional first argument that is not a [variant, weight] pair is the bucketing input.
    let explicit = match args.first().map(AsRef::as_ref) {
        None | Some(Value::Array(_)) => None,
        Some(v) => Some(v),
    };
    // Variants keep their JSON type: `[[false, 0], [true, 100]]` may serve as a condition.
    let dynamic = args[usize::from(explicit.is_some())..]
        .iter()
        .filter_map(|b| bucket(b));
    let fixed = constant.iter().filter_map(|n| match n {
        Node::Const { value, .. } => bucket(value),
        _ => None,
    });
    let weights = dynamic
        .clone()
        .map(|b| b.1)
        .chain(fixed.clone().map(|b| b.1));
    let Some(hash) = streamed.or_else(|| seed_hash(explicit, data, budget)) else {
        return Cow::Borrowed(&NULL);
    };
    let picked = match data.bucketing {
        Bucketing::V1 => pick_v1(hash, weights),
        Bucketing::V2 | Bucketing::V3 => pick_weighted(hash, weights),
    };
    // The chosen bucket's variant: borrowed from the rule when it is a constant bucket.
    let Some(picked) = picked else {
        return Cow::Borrowed(&NULL);
    };
    let evaluated = dynamic.clone().count();
    match picked.checked_sub(evaluated) {
        None => dynamic
            .clone()
            .nth(picked)
            .map_or(Cow::Borrowed(&NULL), |b| Cow::Owned(b.0.clone())),
        Some(i) => fixed
            .clone()
            .nth(i)
            .map_or(Cow::Borrowed(&NULL), |b| Cow::Borrowed(b.0)),
    }
}

/// The hash of `fractional`'s usual seed, a `cat` (of the flag key and a targeting
/// attribute, say), taken as its pieces come, at the same cost, without building its text;
/// `None` for any other seed and under V3 (whose input starts with the text's length).
fn streamed_seed<'a>(
    evaluated: &'a [Node],
    data: &Scope<'a>,
    budget: &mut Budget,
) -> Result<Option<u32>, OverBudget> {
    let (
        [Node::Op {
            code: Code::Cat,
            args: pieces,
            ..
        }],
        Bucketing::V1 | Bucketing::V2,
    ) = (evaluated, data.bucketing)
    else {
        return Ok(None);
    };
    let mut h = Murmur3::new(0);
    if !budget.op() || !cat_pieces(pieces, data, budget, |p| h.write(p.as_bytes())) {
        return Err(OverBudget);
    }
    Ok(Some(h.finish()))
}

/// V1 and V2's implicit bucketing input: the flag key followed by the targeting key.
fn implicit_seed(data: &Scope<'_>) -> u32 {
    let mut h = Murmur3::new(0);
    h.write(data.flag_key.as_bytes());
    h.write(data.targeting_key.as_bytes());
    h.finish()
}

/// The hash `fractional` buckets by under the evaluation's profile: of the bucketing input
/// `explicit` when given, else of the flag and targeting keys; `None` where flagd answers
/// null (an input of the wrong type, no targeting key).
fn seed_hash(explicit: Option<&Value>, data: &Scope<'_>, budget: &mut Budget) -> Option<u32> {
    match data.bucketing {
        Bucketing::V1 => match explicit {
            Some(Value::String(s)) => Some(murmur3_32(s.as_bytes(), 0)),
            // A bucketing expression that found nothing (a missing attribute).
            Some(_) => None,
            None => Some(implicit_seed(data)),
        },
        Bucketing::V2 => match explicit {
            Some(Value::String(s)) => Some(murmur3_32(s.as_bytes(), 0)),
            Some(_) => None,
            None if data.targeting_key.is_empty() => None,
            None => Some(implicit_seed(data)),
        },
        Bucketing::V3 => {
            let implicit;
            let input = match explicit {
                Some(v) if v.is_null() => return None,
                Some(v) => v,
                None if data.targeting_key.is_empty() => return None,
                None => {
                    implicit = Value::Array(vec![
                        Value::String(data.flag_key.to_owned()),
                        Value::String(data.targeting_key.to_owned()),
                    ]);
                    &implicit
                }
            };
            if !budget.spend(weight(input)) {
                return None;
            }
            let mut bytes = Vec::new();
            cbor(input, &mut bytes);
            Some(murmur3_32(&bytes, 0))
        }
    }
}

/// V1: cumulative percentages against `abs(h as i32) / i32::MAX * 100`.
/// A `fractional` bucket, `[variant, weight]` (weight optional); `None` for anything else.
fn bucket(b: &Value) -> Option<(&Value, Option<&Value>)> {
    match b {
        Value::Array(pair) if !pair.is_empty() => Some((&pair[0], pair.get(1))),
        _ => None,
    }
}

fn pick_v1<'v>(
    hash: u32,
    weights: impl Iterator<Item = Option<&'v Value>> + Clone,
) -> Option<usize> {
    let weight = |w: Option<&Value>| w.and_then(number).unwrap_or(1.0);
    let count = weights.clone().count();
    let total: f64 = weights.clone().map(weight).sum();
    if count == 0 || total <= 0.0 {
        return None;
    }
    let signed = i32::from_ne_bytes(hash.to_ne_bytes());
    let bucket = (f64::from(signed).abs() / f64::from(i32::MAX)) * 100.0;
    let mut end = 0.0;
    for (i, w) in weights.enumerate() {
        end += weight(w) * 100.0 / total;
        if bucket < end {
            return Some(i);
        }
    }
    Some(count - 1)
}

/// A bucket's weight under V2 and V3: missing or null 1, negative 0, a whole number
/// written with a fraction (`50.0`) that number, as flagd reads JSON numbers; `None` (no
/// decision) for a fraction, a non-number or a weight above `i32::MAX`.
fn weight_v2(w: Option<&Value>) -> Option<u64> {
    let w = match w {
        None | Some(Value::Null) => 1,
        Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => u64::try_from(i.max(0)).unwrap_or(0),
            (None, Some(f)) if f.fract() == 0.0 && f < 0.0 => 0,
            // Exact: a whole float up to i32::MAX converts without rounding.
            (None, Some(f)) if f.fract() == 0.0 && f <= f64::from(i32::MAX) => f as u64,
            _ => return None,
        },
        Some(_) => return None,
    };
    (w <= i32::MAX as u64).then_some(w)
}

/// V2 and V3: integer weights (missing or null: 1, negative: 0; fractional or above
/// `i32::MAX`: no decision), `(h * total) >> 32` against the cumulative weights.
fn pick_weighted<'v>(
    hash: u32,
    weights: impl Iterator<Item = Option<&'v Value>> + Clone,
) -> Option<usize> {
    let mut total: u64 = 0;
    for w in weights.clone() {
        total += weight_v2(w)?;
    }
    if total == 0 || total > i32::MAX as u64 {
        return None;
    }
    let bucket = (u64::from(hash) * total) >> 32;
    let mut end = 0;
    for (i, w) in weights.enumerate() {
        end += weight_v2(w)?;
        if bucket < end {
            return Some(i);
        }
    }
    None
}

/// Deterministic CBOR (RFC 8949 section 4.2.1: shortest heads, shortest exact float,
/// map keys in bytewise order of their encodings), with whole floats within the integer
/// ranges written as integers (so `-0.0`, `0.0` and `0` hash alike).
pub fn cbor(v: &Value, out: &mut Vec<u8>) {
    fn head(major: u8, n: u64, out: &mut Vec<u8>) {
        let m = major << 5;
        match n {
            0..=23 => out.push(m | n as u8),
            24..=0xff => out.extend([m | 24, n as u8]),
            0x100..=0xffff => {
                out.push(m | 25);
                out.extend((n as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(m | 26);
                out.extend((n as u32).to_be_bytes());
            }
            _ => {
                out.push(m | 27);
                out.extend(n.to_be_bytes());
            }
        }
    }
    match v {
        Value::Null => out.push(0xf6),
        Value::Bool(b) => out.push(if *b { 0xf5 } else { 0xf4 }),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                head(0, u, out);
            } else if let Some(i) = n.as_i64() {
                head(1, (-1 - i) as u64, out);
            } else if let Some(f) = n.as_f64() {
                cbor_float(f, out, head);
            }
        }
        Value::String(s) => {
            head(3, s.len() as u64, out);
            out.extend(s.as_bytes());
        }
        Value::Array(items) => {
            head(4, items.len() as u64, out);
            for item in items {
                cbor(item, out);
            }
        }
        Value::Object(map) => {
            let mut entries: Vec<(Vec<u8>, &Value)> = map
                .iter()
                .map(|(k, v)| {
                    let mut key = Vec::new();
                    cbor(&Value::String(k.clone()), &mut key);
                    (key, v)
                })
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            head(5, entries.len() as u64, out);
            for (key, value) in entries {
                out.extend(key);
                cbor(value, out);
            }
        }
    }
}

fn cbor_float(f: f64, out: &mut Vec<u8>, head: fn(u8, u64, &mut Vec<u8>)) {
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    if f.is_finite() && f.fract() == 0.0 && (-TWO_63..TWO_64).contains(&f) {
        // Whole: an integer (the casts are exact in these ranges).
        if f >= 0.0 {
            head(0, f as u64, out);
        } else {
            head(1, (-1 - f as i64) as u64, out);
        }
    } else if let Some(h) = f16_bits(f) {
        out.push(0xf9);
        out.extend(h.to_be_bytes());
    } else if f.is_nan() || (f as f32) as f64 == f {
        out.push(0xfa);
        out.extend((f as f32).to_bits().to_be_bytes());
    } else {
        out.push(0xfb);
        out.extend(f.to_bits().to_be_bytes());
    }
}

/// The half-precision bits of `f` when it is exactly representable (NaN and the
/// infinities included), else `None`.
fn f16_bits(f: f64) -> Option<u16> {
    if f.is_nan() {
        return Some(0x7e00);
    }
    let bits = f.to_bits();
    let sign = ((bits >> 63) as u16) << 15;
    if f.is_infinite() {
        return Some(sign | 0x7c00);
    }
    let exp = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mant = bits & ((1u64 << 52) - 1);
    if f == 0.0 {
        return Some(sign);
    }
    if (-14..=15).contains(&exp) {
        // Normal: 10 mantissa bits.
        (mant & ((1u64 << 42) - 1) == 0)
            .then(|| sign | (((exp + 15) as u16) << 10) | (mant >> 42) as u16)
    } else if (-24..-14).contains(&exp) {
        // Subnormal: a multiple of 2^-24.
        let full = (1u64 << 52) | mant;
        let shift = 28 - exp;
        (full & ((1u64 << shift) - 1) == 0).then(|| sign | (full >> shift) as u16)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A compiled rule's nodes stay as small as the memory target was measured with: the
    /// fast path's flags and plans live in padding or behind a pointer on the few nodes
    /// that have one.
    #[test]
    fn compiled_nodes_keep_their_size() {
        assert_eq!(std::mem::size_of::<Node>(), 48);
        assert_eq!(std::mem::size_of::<Rule>(), 48);
    }

    fn eval(rule: Value, attributes: Value) -> Value {
        eval_for(rule, attributes, "user")
    }

    fn eval_for(rule: Value, attributes: Value, targeting_key: &str) -> Value {
        let rule = Rule::parse(&rule.to_string()).unwrap_or_else(|e| panic!("{e}"));
        let attributes = attributes.as_object().cloned().unwrap_or_default();
        let data = Data {
            attributes: &attributes,
            targeting_key,
            flag_key: "flag",
            bucketing: Bucketing::default(),
        };
        rule.evaluate(&data).unwrap().into_owned()
    }

    /// `<`, `<=`, `>`, `>=` compare two texts as texts (ISO 8601 dates order as dates, `"10"`
    /// comes before `"9"`), as flagd's JSON Logic engines do, and anything else as numbers:
    /// on both paths, the targeting key included, in the two- and three-argument forms.
    #[test]
    fn two_texts_order_as_texts_and_anything_else_as_numbers() {
        let rule = |op: &str, args: Value| {
            let text = json!({ op: args }).to_string();
            Rule::parse(&text).unwrap_or_else(|e| panic!("{e}"))
        };
        let attributes = json!({"signup": "2026-03-14", "n": "10", "m": 9});
        let attributes = attributes.as_object().cloned().unwrap_or_default();
        let data = Data {
            attributes: &attributes,
            targeting_key: "user-2",
            flag_key: "flag",
            bucketing: Bucketing::default(),
        };
        for (op, args, want) in [
            ("<", json!([{"var": "signup"}, "2026-04-01"]), true),
            ("<", json!(["2026-12-01", {"var": "signup"}]), false),
            (">=", json!([{"var": "signup"}, "2026-03-14"]), true),
            ("<", json!([{"var": "n"}, "9"]), true),
            ("<", json!([{"var": "n"}, 9]), false),
            ("<", json!([{"var": "m"}, {"var": "n"}]), true),
            ("<", json!(["a", "b"]), true),
            ("<", json!(["b", "a"]), false),
            ("<", json!(["é", "z"]), false),
            (">", json!([{"var": "targetingKey"}, "user-10"]), true),
            (
                "<",
                json!(["2026-01-01", {"var": "signup"}, "2026-06-30"]),
                true,
            ),
            (
                "<=",
                json!(["2026-01-01", {"var": "signup"}, "2026-02-28"]),
                false,
            ),
            ("<", json!(["a", 1]), false),
            ("<", json!([null, "b"]), false),
        ] {
            let r = rule(op, args.clone());
            let walked = r.evaluate_walked(&data).unwrap().into_owned();
            assert_eq!(walked, json!(want), "{op} {args}");
            assert_eq!(
                r.evaluate(&data).unwrap().into_owned(),
                walked,
                "{op} {args}"
            );
        }
    }

    /// A request's numbers arrive as floats (`1.0`): `===` compares numbers by value, and a
    /// whole number reads as text without a fraction, as JavaScript and Go write it.
    #[test]
    fn whole_numbers_from_a_request_compare_and_read_as_whole_numbers() {
        let whole = json!({"n": 1.0, "m": -0.0, "big": 1e20, "half": 1.5});
        for (rule, answer) in [
            (json!({"===": [{"var": "n"}, 1]}), json!(true)),
            (json!({"!==": [{"var": "n"}, 1]}), json!(false)),
            (json!({"===": [{"var": "m"}, 0]}), json!(true)),
            (json!({"===": [{"var": "n"}, "1"]}), json!(false)),
            (
                json!({"cat": [{"var": "n"}, "/", {"var": "half"}]}),
                json!("1/1.5"),
            ),
            (
                json!({"cat": [{"var": "m"}, "/", {"var": "big"}]}),
                json!("0/100000000000000000000"),
            ),
            (json!({"in": [{"var": "n"}, "abc1def"]}), json!(true)),
            (json!({"in": [{"var": "half"}, "a1.5"]}), json!(true)),
        ] {
            assert_eq!(eval(rule.clone(), whole.clone()), answer, "{rule}");
        }
    }

    #[test]
    fn flagd_timestamp_is_the_evaluation_time() {
        let past = json!({"if": [{">": [{"var": "$flagd.timestamp"}, {"var": "time"}]}, "past", "future"]});
        assert_eq!(eval(past.clone(), json!({"time": 1})), json!("past"));
        assert_eq!(
            eval(past, json!({"time": 4_133_980_802_u64})),
            json!("future")
        );
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
    fn plain_versions_read_as_the_general_parser_reads_them() {
        for v in [
            "0.0.0",
            "1.2.3",
            "10.20.30",
            "2.1.0",
            "999999999999999999.0.1",
            "01.2.3",
            "1.02.3",
            "1.2.03",
            "1.2",
            "1",
            "1.2.3.4",
            "1.2.3-rc.1",
            "1.2.3+build",
            "1..3",
            ".1.2",
            "1.2.",
            "a.b.c",
            "1.2.3 ",
            "",
            "9999999999999999999.0.0",
            "1.2.x",
        ] {
            let general = semver::Version::parse(v).ok();
            match plain_version(v) {
                Some(plain) => assert_eq!(Some(plain), general, "{v}"),
                // Not the plain form: left to the general parser (which may still accept it).
                None => assert!(
                    general.as_ref().is_none_or(|g| !g.pre.is_empty()
                        || !g.build.is_empty()
                        || v.split('.').any(|p| p.len() > 18)),
                    "{v} is plain but was not read as such"
                ),
            }
        }
    }

    /// The compiled shortcuts (`var` of a constant path, the request's texts in `cat`, the
    /// plain version) answer as the general forms they stand for, and a rule reads back as
    /// written.
    #[test]
    fn shortcuts_answer_as_the_general_forms() {
        let ctx =
            json!({"plan": "pro", "user": {"name": "ada"}, "v": "2.10.0", "list": ["x", "y"]});
        for (short, general) in [
            (json!({"var": "plan"}), json!({"var": ["plan", null]})),
            (
                json!({"var": ["user.name"]}),
                json!({"var": ["user.name", null]}),
            ),
            (json!({"var": "nothing"}), json!({"var": ["nothing", null]})),
            (
                json!({"var": "targetingKey"}),
                json!({"var": ["targetingKey", null]}),
            ),
            (
                json!({"var": "$flagd.flagKey"}),
                json!({"var": ["$flagd.flagKey", null]}),
            ),
            (
                json!({"cat": ["a/", {"var": "targetingKey"}, "/", {"var": "$flagd.flagKey"}]}),
                json!({"cat": ["a/", {"var": ["targetingKey", null]}, "/", {"var": ["$flagd.flagKey", null]}]}),
            ),
            (
                json!({"map": [{"var": "list"}, {"cat": [{"var": ""}, {"var": "targetingKey"}]}]}),
                json!({"map": [{"var": "list"}, {"cat": [{"var": ""}, {"var": ["targetingKey", null]}]}]}),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, ">", "2.9.0"]}),
                json!({"sem_ver": [{"var": "v"}, ">", {"cat": ["2.9", ".0"]}]}),
            ),
            (
                json!({"fractional": [{"cat": ["s", {"var": "targetingKey"}]}, ["a", 1], ["b", 1]]}),
                json!({"fractional": [{"cat": ["s", {"var": ["targetingKey", null]}]}, ["a", 1], {"merge": [["b", 1]]}]}),
            ),
            (
                json!({"fractional": [{"var": "targetingKey"}, ["a", 1], ["b", 1], ["c", 1]]}),
                json!({"fractional": [{"var": "targetingKey"}, {"merge": [["a", 1]]}, ["b", 1], {"merge": [["c", 1]]}]}),
            ),
            (
                json!({"fractional": [["a", 1], ["b", 1]]}),
                json!({"fractional": [{"merge": [["a", 1]]}, ["b", 1]]}),
            ),
        ] {
            for user in ["u1", "u2", "u3", "u4", "u5", "u6", ""] {
                assert_eq!(
                    eval_for(short.clone(), ctx.clone(), user),
                    eval_for(general.clone(), ctx.clone(), user),
                    "{short} / {general} for {user:?}"
                );
            }
            if short.get("fractional").is_some() {
                // The users land in more than one bucket, constant and evaluated alike.
                let landed: std::collections::BTreeSet<String> =
                    ["u1", "u2", "u3", "u4", "u5", "u6"]
                        .iter()
                        .map(|u| eval_for(general.clone(), ctx.clone(), u).to_string())
                        .collect();
                assert!(landed.len() > 1, "{general}: {landed:?}");
            }
            for rule in [&short, &general] {
                let text = rule.to_string();
                assert_eq!(&Rule::parse(&text).unwrap().to_json(), rule);
            }
        }
    }

    /// A constant array's weight as `fractional` pays it (from the items' counted bytes)
    /// is the weight of walking it.
    #[test]
    fn constant_weights_are_the_walked_weights() {
        for text in [
            r#"["in", 5000]"#,
            r#"[1, 2.5, null, true, "x", {}]"#,
            r#"[["a", 1], "b", [[]]]"#,
            "[]",
        ] {
            let rule = Rule::parse(text).unwrap();
            let Node::Const { value, bytes, .. } = &rule.root else {
                panic!("{text} is a constant");
            };
            assert_eq!(const_weight(value, *bytes), weight(value), "{text}");
        }
    }

    /// A `var` of a constant path costs what its general form did (the operator and its
    /// path: two operations): `100 x inner` of them inside two `map`s fit the budget exactly
    /// up to `inner = 332` (2 + 3 x 100 + 3 x 100 x 332 = 99,902 operations).
    #[test]
    fn constant_var_paths_cost_two_operations() {
        let over = |inner: usize| {
            let outer = vec![0; 100];
            let inner = vec![0; inner];
            let rule = json!({"map": [outer, {"map": [inner, {"var": "x"}]}]});
            let rule = Rule::parse(&rule.to_string()).unwrap();
            let attributes = Map::new();
            let data = Data {
                attributes: &attributes,
                targeting_key: "u",
                flag_key: "f",
                bucketing: Bucketing::default(),
            };
            rule.evaluate(&data).is_err()
        };
        assert!(!over(332));
        assert!(over(333));
    }

    /// Found by fuzzing: `substr` with a start and a length near `i64::MAX` (JSON numbers
    /// far past it, cast with saturation) overflowed adding them.
    #[test]
    fn substr_takes_lengths_as_large_as_numbers_go() {
        let huge =
            json!({"substr": ["abcdef", 2, 22222222222222222222308222220000001126706813402.0]});
        assert_eq!(eval(huge, json!({})), json!("cdef"));
        let negative = json!({"substr": ["abcdef", -1e300, -1e300]});
        assert_eq!(eval(negative, json!({})), json!(""));
        let from_end = json!({"substr": ["abcdef", -1e300]});
        assert_eq!(eval(from_end, json!({})), json!("abcdef"));
    }

    #[test]
    fn every_operator_has_its_own_arm() {
        for name in OPERATORS {
            assert_ne!(Code::of(name), Code::Unknown, "{name}");
        }
    }

    #[test]
    fn fractional_splits_by_weight_and_is_stable() {
        let rule = json!({"fractional": [["a", 50], ["b", 50]]});
        let mut a = 0;
        for i in 0..2_000 {
            let key = format!("user-{i}");
            let v = eval_for(rule.clone(), json!({}), &key);
            assert_eq!(v, eval_for(rule.clone(), json!({}), &key), "stable per key");
            if v == json!("a") {
                a += 1;
            }
        }
        assert!((800..1_200).contains(&a), "50/50 split gave {a}/2000");
    }

    #[test]
    fn evaluation_is_bounded_in_output_and_operations() {
        let attributes = json!({"a": "x".repeat(60_000)});
        let attributes = attributes.as_object().cloned().unwrap_or_default();
        let data = Data {
            attributes: &attributes,
            targeting_key: "u",
            flag_key: "f",
            bucketing: Bucketing::default(),
        };
        // 5,000 copies of a 60 KB attribute: 300 MB of output.
        let cat = format!(
            r#"{{"cat": [{}]}}"#,
            vec![r#"{"var": "a"}"#; 5000].join(",")
        );
        assert_eq!(Rule::parse(&cat).unwrap().evaluate(&data), Err(OverBudget));
        let list = format!("[{}]", vec![r#"{"var": "a"}"#; 5000].join(","));
        assert_eq!(Rule::parse(&list).unwrap().evaluate(&data), Err(OverBudget));
        let whole = format!(r#"{{"cat": [{}]}}"#, vec![r#"{"var": ""}"#; 100].join(","));
        assert_eq!(
            Rule::parse(&whole).unwrap().evaluate(&data),
            Err(OverBudget)
        );
        // A few copies fit.
        let few = format!(r#"{{"cat": [{}]}}"#, [r#"{"var": "a"}"#; 10].join(","));
        let few = Rule::parse(&few).unwrap();
        let v = few.evaluate(&data).unwrap();
        assert_eq!(v.as_str().map(str::len), Some(600_000));
    }

    #[test]
    fn rules_are_bounded_in_size_and_depth() {
        let big = format!("[{}]", vec!["1"; 40_000].join(","));
        assert!(Rule::parse(&big).unwrap_err().contains("65536"));
        let deep = format!("{}1{}", "[".repeat(70), "]".repeat(70));
        assert!(Rule::parse(&deep).unwrap_err().contains("deeper"));
    }

    #[test]
    fn unknown_operators_and_bad_json_are_refused() {
        assert!(Rule::parse(r#"{"regex": ["a", "b"]}"#)
            .unwrap_err()
            .contains("regex"));
        assert!(Rule::parse("{not json").is_err());
        assert!(Rule::parse(r#"{"==": [1, 1], "!=": [1, 2]}"#).is_err());
    }

    /// The flagd testbed v3.9.0 (`evaluator/gherkin/fractional.feature`, `@fractional-v1`
    /// rows: the flagd 0.7-0.16 daemons' float bucketing) with its flag definitions.
    #[test]
    fn fractional_matches_the_flagd_testbed_v1_rows() {
        let suits = json!({"fractional": [{"cat": [{"var": "$flagd.flagKey"}, {"var": "user.name"}]}, ["clubs", 25], ["diamonds", 25], ["hearts", 25], ["spades", 25]]});
        let shared = json!({"fractional": [{"cat": ["shared-seed", {"var": "user.name"}]}, ["clubs", 25], ["diamonds", 25], ["hearts", 25], ["spades", 25]]});
        let eval_flag = |rule: &Value, flag: &str, attributes: Value, key: &str| {
            let rule = Rule::parse(&rule.to_string()).unwrap();
            let attributes = attributes.as_object().cloned().unwrap_or_default();
            let data = Data {
                attributes: &attributes,
                targeting_key: key,
                flag_key: flag,
                bucketing: Bucketing::V1,
            };
            rule.evaluate(&data).unwrap().into_owned()
        };
        for (name, want) in [
            ("jack", "spades"),
            ("queen", "clubs"),
            ("ten", "diamonds"),
            ("nine", "hearts"),
            ("3", "diamonds"),
        ] {
            let got = eval_flag(
                &suits,
                "fractional-flag",
                json!({"user": {"name": name}}),
                "",
            );
            assert_eq!(got, json!(want), "fractional-flag, user.name {name}");
        }
        for (name, want) in [
            ("jack", "hearts"),
            ("queen", "spades"),
            ("ten", "hearts"),
            ("nine", "diamonds"),
        ] {
            let got = eval_flag(
                &shared,
                "fractional-flag-A-shared-seed",
                json!({"user": {"name": name}}),
                "",
            );
            assert_eq!(got, json!(want), "shared seed, user.name {name}");
        }
        let shorthand = json!({"fractional": [["heads"], ["tails", 1]]});
        for (key, want) in [("jon@company.com", "heads"), ("jane@company.com", "tails")] {
            let got = eval_flag(&shorthand, "fractional-flag-shorthand", json!({}), key);
            assert_eq!(got, json!(want), "shorthand, targeting key {key}");
        }
    }

    #[test]
    fn v2_buckets_the_unsigned_hash_by_integer_weights() {
        // Keys whose MurmurHash3 is 0, i32::MAX and 2^31 (the testbed's hash edge cases):
        // `(h * 2) >> 32` is 0, 0 and 1.
        let rule = json!({"fractional": [{"var": "k"}, ["lower", 1], ["upper", 1]]});
        for (key, hash, want) in [
            ("ejOoVL", 0u32, "lower"),
            ("SI7p-", 2_147_483_647, "lower"),
            ("6LvT0", 2_147_483_648, "upper"),
        ] {
            assert_eq!(murmur3_32(key.as_bytes(), 0), hash);
            assert_eq!(eval(rule.clone(), json!({"k": key})), json!(want), "{key}");
        }
        // Weights: negative counts as 0, a fraction or a zero total is no decision.
        let negative = json!({"fractional": [{"var": "k"}, ["one", -50], ["two", 100]]});
        assert_eq!(eval(negative, json!({"k": "x"})), json!("two"));
        let fraction = json!({"fractional": [{"var": "k"}, ["one", 50.5], ["two", 50]]});
        assert_eq!(eval(fraction, json!({"k": "x"})), Value::Null);
        let zero = json!({"fractional": [{"var": "k"}, ["one", 0], ["two", 0]]});
        assert_eq!(eval(zero, json!({"k": "x"})), Value::Null);
        // V2 buckets strings only; the shorthand needs a targeting key.
        let number = json!({"fractional": [{"var": "k"}, ["one", 1]]});
        assert_eq!(eval(number, json!({"k": 7})), Value::Null);
        let shorthand = json!({"fractional": [["one", 1], ["two", 1]]});
        assert_eq!(eval_for(shorthand, json!({}), ""), Value::Null);
    }

    /// A whole weight written with a fraction (`50.0`, as YAML tools and some encoders write
    /// numbers) weighs as that whole number, as in flagd (whose JSON numbers are all
    /// floats): every key lands in the same bucket as with `50`, on both paths, whatever
    /// the seed; above `i32::MAX` it is still no decision.
    #[test]
    fn whole_weights_written_as_floats_split_as_whole_numbers() {
        let seeds = [
            json!({"cat": ["f/", {"var": "targetingKey"}]}),
            json!({"var": "k"}),
        ];
        for seed in seeds {
            let as_floats = json!({"fractional": [seed, ["a", 25.0], ["b", 75.0], ["c", -0.0]]});
            let as_ints = json!({"fractional": [seed, ["a", 25], ["b", 75], ["c", 0]]});
            let (floats, ints) = (
                Rule::parse(&as_floats.to_string()).unwrap(),
                Rule::parse(&as_ints.to_string()).unwrap(),
            );
            for bucketing in [Bucketing::V2, Bucketing::V3] {
                let mut seen = std::collections::BTreeSet::new();
                for i in 0..400 {
                    let key = format!("user-{i}");
                    let attributes = json!({"k": key});
                    let attributes = attributes.as_object().cloned().unwrap_or_default();
                    let data = Data {
                        attributes: &attributes,
                        targeting_key: &key,
                        flag_key: "flag",
                        bucketing,
                    };
                    let want = ints.evaluate(&data).unwrap().into_owned();
                    assert_eq!(floats.evaluate(&data).unwrap().into_owned(), want, "{key}");
                    assert_eq!(floats.evaluate_walked(&data).unwrap().into_owned(), want);
                    seen.insert(want.to_string());
                }
                assert_eq!(seen.len(), 2, "{as_floats} under {bucketing:?}: {seen:?}");
            }
        }
        let over = json!({"fractional": [{"var": "k"}, ["one", 2_147_483_648.0], ["two", 1]]});
        assert_eq!(eval(over, json!({"k": "x"})), Value::Null);
    }

    #[test]
    fn cbor_is_deterministic_and_shortest() {
        let enc = |v: Value| {
            let mut out = Vec::new();
            cbor(&v, &mut out);
            out
        };
        assert_eq!(enc(json!("user1")), b"\x65user1");
        assert_eq!(enc(json!(23)), [0x17]);
        assert_eq!(enc(json!(24)), [0x18, 24]);
        assert_eq!(enc(json!(-1)), [0x20]);
        assert_eq!(enc(json!(65_536)), [0x1a, 0, 1, 0, 0]);
        // Whole floats are integers; -0.0 is 0.
        assert_eq!(enc(json!(1.0)), [0x01]);
        assert_eq!(enc(json!(-0.0)), [0x00]);
        // The shortest exact float: half, single, double.
        assert_eq!(enc(json!(2.5)), [0xf9, 0x41, 0x00]);
        assert_eq!(enc(json!(5.960_464_477_539_063e-8)), [0xf9, 0x00, 0x01]);
        assert_eq!(enc(json!(0.1)).len(), 9);
        assert_eq!(enc(json!(1.175_494_350_822_287_5e-38))[0], 0xfa);
        // Map keys in bytewise order of their encodings: shorter first.
        assert_eq!(
            enc(json!({"aa": 2, "z": 1})),
            [0xa2, 0x61, b'z', 0x01, 0x62, b'a', b'a', 0x02]
        );
        assert_eq!(enc(json!([null, true, false])), [0x83, 0xf6, 0xf5, 0xf4]);
    }

    /// The flagd testbed v3.9.0 `evaluator/gherkin/semver.feature` rows, with its flags.
    #[test]
    fn sem_ver_matches_the_flagd_testbed() {
        let egl = json!({"if": [{"sem_ver": [{"var": "version"}, "=", "2.0.0"]}, "equal", {"if": [{"sem_ver": [{"var": "version"}, ">", "2.0.0"]}, "greater", {"if": [{"sem_ver": [{"var": "version"}, "<", "2.0.0"]}, "lesser", "none"]}]}]});
        for (v, want) in [
            ("2.0.0", "equal"),
            ("2.1.0", "greater"),
            ("1.9.0", "lesser"),
            ("2.0.0-alpha", "lesser"),
            ("2.0.0.0", "none"),
        ] {
            assert_eq!(eval(egl.clone(), json!({"version": v})), json!(want), "{v}");
        }
        let mm = json!({"if": [{"sem_ver": [{"var": "version"}, "~", "3.0.0"]}, "minor", {"if": [{"sem_ver": [{"var": "version"}, "^", "3.0.0"]}, "major", "none"]}]});
        for (v, want) in [("3.0.1", "minor"), ("3.1.0", "major"), ("4.0.0", "none")] {
            assert_eq!(eval(mm.clone(), json!({"version": v})), json!(want), "{v}");
        }
        let prefix =
            json!({"if": [{"sem_ver": [{"var": "version"}, "=", "v1.0.0"]}, "match", "no-match"]});
        for (v, want) in [
            ("1.0.0", "match"),
            ("v1.0.0", "match"),
            ("V1.0.0", "match"),
            ("2.0.0", "no-match"),
            ("vv1.0.0", "no-match"),
            ("vV1.0.0", "no-match"),
        ] {
            assert_eq!(
                eval(prefix.clone(), json!({"version": v})),
                json!(want),
                "{v}"
            );
        }
        let partial =
            json!({"if": [{"sem_ver": [{"var": "version"}, "^", "1"]}, "match", "no-match"]});
        for (v, want) in [
            (json!("1.5.0"), "match"),
            (json!("1.0"), "match"),
            (json!("1"), "match"),
            (json!(1), "match"),
            (json!(1.0), "match"),
            (json!(1.2), "match"),
            (json!("2.0.0"), "no-match"),
        ] {
            assert_eq!(
                eval(partial.clone(), json!({"version": v})),
                json!(want),
                "{v}"
            );
        }
        let numeric =
            json!({"if": [{"sem_ver": [{"var": "version"}, ">", "1.1"]}, "match", "no-match"]});
        for (v, want) in [
            (json!(1.2), "match"),
            (json!(1.1), "no-match"),
            (json!(2), "match"),
            (json!(1), "no-match"),
            (json!("1.2"), "match"),
        ] {
            assert_eq!(
                eval(numeric.clone(), json!({"version": v})),
                json!(want),
                "{v}"
            );
        }
        let build = json!({"if": [{"sem_ver": [{"var": "version"}, "=", "1.0.0+build"]}, "match", "no-match"]});
        for (v, want) in [
            ("1.0.0", "match"),
            ("1.0.0+other", "match"),
            ("2.0.0", "no-match"),
        ] {
            assert_eq!(
                eval(build.clone(), json!({"version": v})),
                json!(want),
                "{v}"
            );
        }
    }
}
