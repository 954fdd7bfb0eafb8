//! The fast path of rule evaluation: the same compiled rule, walked for the usual targeting
//! operators (`if`, `and`, `or`, `!`, `!!`, the equalities, comparisons, `in`,
//! `starts_with`, `ends_with`, `sem_ver`, `fractional`) with values that are only ever
//! borrowed ([`Val`]: a reference into the rule or the context, no drop, no copy) and no
//! operation budget counted per node.
//!
//! The fast path answers exactly what the general walker ([`super::apply`]) answers, or
//! nothing: wherever the walker would pay for a copy or a rendering (a number compared as
//! text, say) or where `fractional` would build a value, it gives up (`None`) and the rule is
//! evaluated again by the walker, which has no side effects to repeat. A rule is only
//! walked here when every operator in it is one of the above and its evaluation cannot run
//! out of operations outside `fractional` (which is given what remains of the budget, and
//! gives up when it runs out): so the fast path never answers where the walker would have
//! answered [`super::OverBudget`].

use std::borrow::Cow;

use serde_json::Value;

use super::super::hash::Murmur3;
use super::super::text::{ends_with, same, starts_with};
use super::{
    bucket, compare, compare_plain, compare_text, compare_versions, const_weight, fractional,
    loose_eq, number, parse_version, pick_v1, pick_weighted, sem_ver, strict_eq, truthy,
    walk_parts, weight_v2, Bucketing, Budget, Code, Data, Node, Scope, VarKind, FALSE,
    MAX_EVAL_OPS, MAX_EVAL_OUTPUT_BYTES, MAX_RULE_BYTES, NULL, TRUE,
};

/// A value during fast evaluation: borrowed from the rule or the context, or one of the
/// request's own texts named (two words: returned in registers).
#[derive(Debug, Clone, Copy)]
pub(super) enum Val<'a> {
    Value(&'a Value),
    TargetingKey,
    FlagKey,
}

impl<'a> Val<'a> {
    fn boolean(b: bool) -> Self {
        Self::Value(if b { &TRUE } else { &FALSE })
    }

    /// The value read: the request's texts looked up in `data`.
    #[inline]
    fn see(self, data: &Data<'a>) -> Seen<'a> {
        match self {
            Self::Value(v) => Json(v),
            Self::TargetingKey => Text(data.targeting_key),
            Self::FlagKey => Text(data.flag_key),
        }
    }

    /// The value as the walker answers it (a request text as an owned string, as `var`
    /// gives it there).
    pub(super) fn into_cow(self, data: &Data<'a>) -> Cow<'a, Value> {
        match self.see(data) {
            Json(v) => Cow::Borrowed(v),
            Text(s) => Cow::Owned(Value::String(s.to_owned())),
        }
    }
}

/// A [`Val`] read: a JSON value, or one of the request's texts.
#[derive(Debug, Clone, Copy)]
enum Seen<'a> {
    Json(&'a Value),
    Text(&'a str),
}

use Seen::{Json, Text};

impl<'a> Seen<'a> {
    fn truthy(self) -> bool {
        match self {
            Json(v) => truthy(v),
            Text(s) => !s.is_empty(),
        }
    }

    fn text(self) -> Option<&'a str> {
        match self {
            Json(Value::String(s)) => Some(s),
            Text(s) => Some(s),
            Json(_) => None,
        }
    }

    /// The text the walker reads for free (strings, and null as the empty text); `None`
    /// where it would pay for a rendering.
    fn free_text(self) -> Option<&'a str> {
        match self {
            Json(Value::Null) => Some(""),
            other => other.text(),
        }
    }

    fn number(self) -> Option<f64> {
        match self {
            Json(v) => number(v),
            Text(s) => s.trim().parse().ok(),
        }
    }
}

/// The most the walker spends on a node outside `fractional`: operations, and bytes of
/// output (the fast path's nodes pay bytes only for constants read in place; wherever the
/// walker would pay for a rendering, the fast path hands over).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Cost {
    ops: u32,
    bytes: u32,
}

impl Cost {
    fn plus(self, other: Cost) -> Option<Cost> {
        Some(Cost {
            ops: self.ops.checked_add(other.ops)?,
            bytes: self.bytes.checked_add(other.bytes)?,
        })
    }

    fn ops(ops: u32) -> Cost {
        Cost { ops, bytes: 0 }
    }
}

/// [`Cost`] of `node`, or `None` when the node (or one inside it) is outside the fast
/// path's operators.
pub(super) fn cost(node: &Node) -> Option<Cost> {
    let sum = |args: &[Node], own: u32| {
        args.iter()
            .try_fold(Cost::ops(own), |total, n| total.plus(cost(n)?))
    };
    match node {
        Node::Lit(_) => Some(Cost::ops(1)),
        Node::Const { ops, bytes, .. } => Some(Cost {
            ops: *ops,
            bytes: *bytes,
        }),
        Node::Array(_) => None,
        Node::Var { kind, .. } => (*kind != VarKind::Slow).then_some(Cost::ops(2)),
        Node::SemVer { args, .. } => sum(args, 2),
        Node::Op { code, args, .. } => match code {
            Code::If
            | Code::Eq
            | Code::Ne
            | Code::StrictEq
            | Code::StrictNe
            | Code::Not
            | Code::NotNot
            | Code::And
            | Code::Or
            | Code::Compare
            | Code::In
            | Code::Affix
            | Code::SemVer => sum(args, 1),
            // Its arguments are walked by `fractional` itself, from the budget it is given.
            Code::Fractional => Some(Cost::ops(1)),
            _ => None,
        },
    }
}

/// Whether a rule is for the fast path: every node of its operators, and no more spent
/// outside `fractional` than [`budget`] leaves aside for them.
pub(super) fn applies(root: &Node) -> bool {
    cost(root).is_some_and(|c| c.ops <= RESERVED.ops && c.bytes <= RESERVED.bytes)
}

/// What is set aside for the fast path's nodes outside `fractional`. A node costs at most
/// as many operations as its compact JSON has bytes (a literal one, a constant one per item
/// and one for itself, `var` two, an operator one more than its arguments), and a constant
/// at most 4 bytes of output per byte of its JSON (`1,` weighs 8), so every rule of at most
/// [`MAX_RULE_BYTES`] of compact JSON fits.
const RESERVED: Cost = Cost {
    ops: MAX_RULE_BYTES as u32,
    bytes: 4 * MAX_RULE_BYTES as u32,
};

/// The budget `fractional` may spend on the fast path: what remains once the rule's other
/// nodes have taken the most they can ([`RESERVED`]); it gives up when that runs out.
pub(super) fn budget() -> Budget {
    let mut budget = Budget::new();
    budget.ops = MAX_EVAL_OPS - RESERVED.ops;
    budget.bytes = MAX_EVAL_OUTPUT_BYTES - RESERVED.bytes as usize;
    budget
}

/// `var` of a constant path outside any `map`-like scope, as the walker reads it.
fn var<'a>(path: &str, kind: VarKind, data: &Data<'a>) -> Option<Val<'a>> {
    let (first, rest) = match kind {
        VarKind::TargetingKey => return Some(Val::TargetingKey),
        VarKind::FlagKey => return Some(Val::FlagKey),
        VarKind::Null => return Some(Val::Value(&NULL)),
        VarKind::Slow => return None,
        VarKind::Key => (path, ""),
        VarKind::Path => path.split_once('.')?,
    };
    let found = match (attribute(data, first), kind) {
        (Some(v), VarKind::Path) => walk_parts(v, rest.split('.')),
        (found, _) => found,
    };
    Some(Val::Value(found.unwrap_or(&NULL)))
}

/// The attribute `key`. A context's few attributes are scanned with their lengths compared
/// first (most keys differ in length), rather than ordered by comparing their texts.
#[inline]
fn attribute<'a>(data: &Data<'a>, key: &str) -> Option<&'a Value> {
    if data.attributes.len() > 8 {
        return data.attributes.get(key);
    }
    data.attributes
        .iter()
        .find(|(k, _)| same(k, key))
        .map(|(_, v)| v)
}

/// JSON Logic's `==` where the walker's answer needs no rendering.
fn loose(a: Seen<'_>, b: Seen<'_>) -> Option<bool> {
    match (a, b) {
        (Json(x), Json(y)) => Some(loose_eq(x, y)),
        (Text(s), other) | (other, Text(s)) => match other {
            Json(Value::Null) => Some(false),
            // A number or a boolean against a text compares as numbers: left to the walker.
            other => other.text().map(|t| t == s),
        },
    }
}

fn strict(a: Seen<'_>, b: Seen<'_>) -> bool {
    match (a, b) {
        (Json(x), Json(y)) => strict_eq(x, y),
        (Text(s), other) | (other, Text(s)) => other.text() == Some(s),
    }
}

fn within(needle: Seen<'_>, hay: Seen<'_>) -> Option<bool> {
    Some(match hay {
        Json(Value::Array(items)) => match needle {
            Json(Value::String(s)) => items.iter().any(|v| v.as_str().is_some_and(|v| same(v, s))),
            Json(n) => items
                .iter()
                .any(|v| v.is_string() == n.is_string() && loose_eq(v, n)),
            Text(s) => items.iter().any(|v| v.as_str().is_some_and(|v| same(v, s))),
        },
        hay => match hay.text() {
            Some(h) => h.contains(needle.free_text()?),
            None => false,
        },
    })
}

/// Evaluates `node` as the walker would, or `None` where the walker must (see the module).
/// Recursion is bounded by the rule's checked depth.
///
/// Leaves (literals, constants, `var`) are read where they are met; an operator is a call.
#[inline(always)]
pub(super) fn eval<'a>(node: &'a Node, data: &Data<'a>, budget: &mut Budget) -> Option<Val<'a>> {
    match node {
        Node::Lit(v) | Node::Const { value: v, .. } => Some(Val::Value(v)),
        Node::Var { path, kind, .. } => var(path, *kind, data),
        _ => operator(node, data, budget),
    }
}

/// [`eval`] of an operator (or of a leaf: the same answer).
#[inline(never)]
fn operator<'a>(node: &'a Node, data: &Data<'a>, budget: &mut Budget) -> Option<Val<'a>> {
    let (name, code, args): (&str, Code, &'a [Node]) = match node {
        Node::Lit(v) | Node::Const { value: v, .. } => return Some(Val::Value(v)),
        Node::Var { path, kind, .. } => return var(path, *kind, data),
        Node::SemVer { args, against } => {
            let a = eval(&args[0], data, budget)?.see(data).free_text()?;
            let o = eval(&args[1], data, budget)?.see(data).free_text()?;
            let answer = compare_plain(a, o, against)
                .unwrap_or_else(|| parse_version(a).and_then(|a| compare_versions(&a, o, against)));
            return Some(answer.map_or(Val::Value(&NULL), Val::boolean));
        }
        Node::Array(_) => return None,
        Node::Op {
            code: Code::Fractional,
            args,
            split: plan,
            ..
        } => return split(plan.as_deref(), args, data, budget),
        Node::Op {
            name, code, args, ..
        } => (name, *code, args),
    };
    let mut arg = |i: usize| match args.get(i) {
        Some(n) => eval(n, data, budget),
        None => Some(Val::Value(&NULL)),
    };
    Some(match code {
        Code::If => {
            let mut i = 0;
            while i + 1 < args.len() {
                if arg(i)?.see(data).truthy() {
                    return arg(i + 1);
                }
                i += 2;
            }
            return arg(i);
        }
        Code::And | Code::Or => {
            let stop = code == Code::Or;
            let mut last = Val::boolean(!stop);
            for i in 0..args.len() {
                last = arg(i)?;
                if last.see(data).truthy() == stop {
                    break;
                }
            }
            last
        }
        Code::Not | Code::NotNot => {
            Val::boolean(arg(0)?.see(data).truthy() == (code == Code::NotNot))
        }
        Code::Eq | Code::Ne => {
            Val::boolean(loose(arg(0)?.see(data), arg(1)?.see(data))? == (code == Code::Eq))
        }
        Code::StrictEq | Code::StrictNe => {
            Val::boolean(strict(arg(0)?.see(data), arg(1)?.see(data)) == (code == Code::StrictEq))
        }
        Code::In => {
            let needle = arg(0)?;
            Val::boolean(within(needle.see(data), arg(1)?.see(data))?)
        }
        Code::Compare => return comparison(name, args, data, budget),
        Code::Affix if args.len() == 2 => {
            let (s, p) = (arg(0)?.see(data), arg(1)?.see(data));
            match (s.text(), p.text()) {
                (Some(s), Some(p)) if name == "starts_with" => Val::boolean(starts_with(s, p)),
                (Some(s), Some(p)) => Val::boolean(ends_with(s, p)),
                _ => Val::Value(&NULL),
            }
        }
        Code::SemVer if args.len() == 3 => return versions(args, data, budget),
        Code::Affix | Code::SemVer => Val::Value(&NULL),
        _ => return None,
    })
}

/// `<`, `<=`, `>`, `>=` (apart from [`eval`], whose frame stays small).
#[inline(never)]
fn comparison<'a>(
    name: &str,
    args: &'a [Node],
    data: &Data<'a>,
    b: &mut Budget,
) -> Option<Val<'a>> {
    let mut arg = |i: usize| {
        args.get(i)
            .map_or(Some(Val::Value(&NULL)), |n| eval(n, data, b))
    };
    // Two texts as texts, anything else as numbers (the walker's `ordered`).
    let order = |x: Seen<'_>, y: Seen<'_>| match (x.text(), y.text()) {
        (Some(x), Some(y)) => compare_text(name, x, y),
        _ => matches!((x.number(), y.number()), (Some(x), Some(y)) if compare(name, x, y)),
    };
    let (x, y) = (arg(0)?.see(data), arg(1)?.see(data));
    Some(Val::boolean(match args.len() {
        2 => order(x, y),
        // JSON Logic's "between": x < y < z.
        3 if name == "<" || name == "<=" => order(x, y) && order(y, arg(2)?.see(data)),
        _ => false,
    }))
}

/// `sem_ver` of three evaluated arguments (the version not a literal).
#[inline(never)]
fn versions<'a>(args: &'a [Node], data: &Data<'a>, budget: &mut Budget) -> Option<Val<'a>> {
    let a = eval(&args[0], data, budget)?.see(data).free_text()?;
    let o = eval(&args[1], data, budget)?.see(data).free_text()?;
    let b = eval(&args[2], data, budget)?.see(data).free_text()?;
    Some(sem_ver(a, o, b).map_or(Val::Value(&NULL), Val::boolean))
}

/// `fractional`, by its plan under V2, else by the walker's own function, from what
/// remains of the budget.
#[inline(never)]
fn split<'a>(
    plan: Option<&Split>,
    args: &'a [Node],
    data: &Data<'a>,
    budget: &mut Budget,
) -> Option<Val<'a>> {
    if let (Some(plan), Bucketing::V2) = (plan, data.bucketing) {
        if let Some(answer) = plan.split(args, data, budget) {
            return answer;
        }
    }
    if let Some(answer) = usual_split(args, data, budget) {
        return answer;
    }
    let scope = Scope {
        data: *data,
        item: None,
    };
    match fractional(args, &scope, budget) {
        _ if budget.exceeded() => None,
        Cow::Borrowed(v) => Some(Val::Value(v)),
        Cow::Owned(_) => None,
    }
}

/// flagd's usual `fractional` (a `cat` of literal texts and `var`s as the seed, then
/// constant non-empty buckets whose weights decide under V2), planned when the rule is
/// compiled: what the walker charges for everything but the `var`s' texts, and the V2
/// cumulative weights. Evaluating it hashes the seed's pieces as they come, charges the
/// budget once, and finds the bucket among the plan's integers (the buckets' JSON is read
/// only for the variant chosen).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Split {
    /// Operations: the `cat`, one per literal piece, two per `var`, the buckets'.
    ops: u32,
    /// Output bytes: the literal pieces' and the buckets' (read in place and paid as
    /// copies), without the `var`s' texts.
    bytes: u32,
    /// Each bucket's cumulative V2 weight (the last is the total, from 1 to `i32::MAX`).
    ends: Box<[u32]>,
    /// The hash of the seed's leading literal pieces, and how many there are (flagd's
    /// usual seed starts with the flag's own text: hashed once, here).
    prefix: Murmur3,
    literal: usize,
}

impl Split {
    /// The plan of a `fractional` with these arguments, when they are in the usual form
    /// and their weights decide under V2 (`None` otherwise: the other paths run).
    pub(super) fn plan(args: &[Node]) -> Option<Box<Split>> {
        let (pieces, buckets) = cat_seed(args)?;
        let (mut ops, mut bytes) = (1u64, 0u64);
        let mut prefix = Murmur3::new(0);
        let literal = pieces
            .iter()
            .take_while(|p| matches!(p, Node::Lit(Value::String(_))))
            .count();
        for piece in &pieces[..literal] {
            if let Node::Lit(Value::String(s)) = piece {
                prefix.write(s.as_bytes());
            }
        }
        for piece in pieces.iter() {
            match piece {
                Node::Lit(Value::String(s)) => (ops, bytes) = (ops + 1, bytes + s.len() as u64),
                Node::Var { kind, .. } if *kind != VarKind::Slow => ops += 2,
                _ => return None,
            }
        }
        let mut ends = Vec::with_capacity(buckets.len());
        let mut total = 0u64;
        for b in buckets {
            let Node::Const {
                value: value @ Value::Array(_),
                ops: o,
                bytes: n,
            } = b
            else {
                return None;
            };
            let (_, w) = bucket(value)?;
            ops += u64::from(*o);
            bytes += u64::from(*n) + const_weight(value, *n) as u64;
            total += weight_v2(w)?;
            ends.push(u32::try_from(total).ok()?);
        }
        if total == 0 || total > i32::MAX as u64 {
            return None;
        }
        Some(Box::new(Split {
            ops: u32::try_from(ops).ok()?,
            bytes: u32::try_from(bytes).ok()?,
            ends: ends.into(),
            prefix,
            literal,
        }))
    }

    /// The split under V2 as the walker answers it; `None` when a piece of the seed is not
    /// a text the walker reads for free (nothing charged: the walker's `fractional` runs),
    /// `Some(None)` when the budget runs out.
    fn split<'a>(
        &self,
        args: &'a [Node],
        data: &Data<'a>,
        budget: &mut Budget,
    ) -> Option<Option<Val<'a>>> {
        let (pieces, buckets) = cat_seed(args)?;
        let mut hash = self.prefix.clone();
        let mut read = 0usize;
        for piece in pieces.get(self.literal..)? {
            let text = seed_piece(piece, data)?;
            if matches!(piece, Node::Var { .. }) {
                read += text.len();
            }
            hash.write(text.as_bytes());
        }
        // Every charge fits exactly when their sum does (the walker charges piece by piece).
        if !budget.take(self.ops, self.bytes as usize + read) {
            return Some(None);
        }
        let total = self.ends.last().copied().unwrap_or_default();
        let at = (u64::from(hash.finish()) * u64::from(total)) >> 32;
        let i = self
            .ends
            .iter()
            .take_while(|&&end| u64::from(end) <= at)
            .count();
        let variant = match buckets.get(i) {
            Some(Node::Const {
                value: Value::Array(pair),
                ..
            }) => pair.first(),
            _ => None,
        };
        Some(Some(Val::Value(variant.unwrap_or(&NULL))))
    }
}

/// A `fractional` seeded by a `cat`: the `cat`'s pieces and the arguments after it.
fn cat_seed(args: &[Node]) -> Option<(&[Node], &[Node])> {
    match args.split_first()? {
        (
            Node::Op {
                code: Code::Cat,
                args: pieces,
                ..
            },
            rest,
        ) => Some((pieces, rest)),
        _ => None,
    }
}

/// A piece of a `fractional` seed as the walker reads it: a literal text or a `var` of
/// text (null reads as the empty text); `None` for anything the walker would render.
fn seed_piece<'a>(node: &'a Node, data: &Data<'a>) -> Option<&'a str> {
    match node {
        Node::Lit(Value::String(s)) => Some(s),
        Node::Var { path, kind, .. } => var(path, *kind, data)?.see(data).free_text(),
        _ => None,
    }
}

/// flagd's usual `fractional` under V1 and V2: a `cat` of texts as the seed, then constant
/// buckets. The seed is hashed as its pieces come and the budget is charged what the
/// walker charges (the `cat`, one operation per literal and two per `var`, the pieces'
/// bytes, the buckets read in place); `None` for any other form (the walker's own
/// `fractional` runs), `Some(None)` when the budget runs out.
fn usual_split<'a>(
    args: &'a [Node],
    data: &Data<'a>,
    budget: &mut Budget,
) -> Option<Option<Val<'a>>> {
    if !matches!(data.bucketing, Bucketing::V1 | Bucketing::V2) {
        return None;
    }
    let (pieces, buckets) = cat_seed(args)?;
    let constant = |n: &Node| {
        matches!(
            n,
            Node::Const {
                value: Value::Array(_),
                ..
            }
        )
    };
    if !buckets.iter().all(constant) || !pieces.iter().all(|p| seed_piece(p, data).is_some()) {
        return None;
    }
    let mut hash = Murmur3::new(0);
    if !budget.op() {
        return Some(None);
    }
    for piece in pieces.iter() {
        let text = seed_piece(piece, data).unwrap_or_default();
        let ops = if matches!(piece, Node::Lit(_)) { 1 } else { 2 };
        if !budget.take(ops, text.len()) {
            return Some(None);
        }
        hash.write(text.as_bytes());
    }
    let fixed = buckets.iter().filter_map(|n| match n {
        Node::Const { value, ops, bytes } => Some((value, *ops, *bytes)),
        _ => None,
    });
    for (value, ops, bytes) in fixed.clone() {
        if !budget.take(ops, bytes as usize) || !budget.spend(const_weight(value, bytes)) {
            return Some(None);
        }
    }
    let fixed = fixed.filter_map(|(value, ..)| bucket(value));
    let weights = fixed.clone().map(|b| b.1);
    let hash = hash.finish();
    let picked = match data.bucketing {
        Bucketing::V1 => pick_v1(hash, weights),
        _ => pick_weighted(hash, weights),
    };
    let variant = picked.and_then(|i| fixed.clone().nth(i));
    Some(Some(Val::Value(variant.map_or(&NULL, |b| b.0))))
}

#[cfg(test)]
mod tests {
    use super::super::{Bucketing, Data, Rule};
    use super::*;
    use serde_json::{json, Map};

    /// A small deterministic generator (xorshift), so a failure replays.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn pick<'v, T>(&mut self, items: &'v [T]) -> &'v T {
            &items[(self.next() % items.len() as u64) as usize]
        }

        fn scalar(&mut self) -> Value {
            self.pick(&[
                json!("pro"),
                json!("team"),
                json!(""),
                json!("2.1.0"),
                json!("v1.2"),
                json!("1.2.3-beta"),
                json!("2.1.0+b"),
                json!("2.0.10"),
                json!("user-3"),
                json!("@corp.com"),
                json!("é"),
                json!("x€"),
                json!(" 3 "),
                json!(3),
                json!(0),
                json!(2.5),
                json!(3.0),
                json!(-0.0),
                json!(true),
                json!(false),
                json!(null),
                json!(["pro", "team", 3]),
                json!({}),
            ])
            .clone()
        }

        fn var(&mut self) -> Value {
            let path = self.pick(&[
                "plan",
                "email",
                "version",
                "n",
                "flag",
                "absent",
                "user.tier",
                "user.tier.x",
                "user.org.id",
                "list.1",
                "list.9",
                "targetingKey",
                "targetingKey.x",
                "$flagd.flagKey",
                "$flagd.other",
                "$flagd",
            ]);
            if self.next().is_multiple_of(4) {
                json!({ "var": [path] })
            } else {
                json!({ "var": path })
            }
        }

        fn expr(&mut self, depth: u32) -> Value {
            match self.next() % 8 {
                0 | 1 => self.scalar(),
                2..=4 => self.var(),
                5 if depth > 0 => self.fractional(),
                _ if depth > 0 => self.rule(depth - 1),
                _ => self.var(),
            }
        }

        fn args(&mut self, n: u64, depth: u32) -> Vec<Value> {
            (0..n).map(|_| self.expr(depth)).collect()
        }

        fn fractional(&mut self) -> Value {
            let seed = json!({"cat": [{"var": "$flagd.flagKey"}, {"var": "targetingKey"}]});
            let mixed = json!({"cat": ["f/", {"var": "plan"}, {"var": ["targetingKey"]}]});
            match self.next() % 8 {
                // Planned (the usual form, weights that decide under V2).
                5 => json!({"fractional": [mixed, ["a", 2], ["b"], ["c", -1], [true, null, 1]]}),
                6 => json!({"fractional": [seed, ["a", 2_147_483_646], ["b", 1], ["c", 0]]}),
                // Not planned: no weight in total.
                7 => json!({"fractional": [seed, ["a", 0]]}),
                0 => json!({"fractional": [["a", 50], ["b", 50]]}),
                1 => json!({"fractional": [seed, ["a", 1], ["b", 3], ["c", 0]]}),
                2 => json!({"fractional": [mixed, ["a", 2.5], [], ["b"], ["c", -1], [true, 7]]}),
                3 => json!({"fractional": [seed, ["a", 1], {"var": "plan"}]}),
                _ => json!({"fractional": [{"var": "plan"}, ["a", 50], ["b", 50]]}),
            }
        }

        /// A rule of the fast path's operators, argument counts right and wrong.
        fn rule(&mut self, depth: u32) -> Value {
            let count = 1 + self.next() % 3;
            let op = *self.pick(&[
                "if",
                "?:",
                "and",
                "or",
                "!",
                "!!",
                "==",
                "!=",
                "===",
                "!==",
                "<",
                "<=",
                ">",
                ">=",
                "in",
                "starts_with",
                "ends_with",
                "sem_ver",
            ]);
            let args = match op {
                "if" | "?:" => {
                    let n = 1 + self.next() % 5;
                    self.args(n, depth)
                }
                "and" | "or" => self.args(count, depth),
                "!" | "!!" => return json!({ op: self.expr(depth) }),
                "<" | "<=" | ">" | ">=" => {
                    let n = 2 + self.next() % 2;
                    self.args(n, depth)
                }
                "sem_ver" => {
                    let ops = ["=", "!=", "<", "<=", ">", ">=", "^", "~", "=="];
                    let o = json!(*self.pick(&ops));
                    let version = self
                        .pick(&["2.1.0", "1", "v1.2", "x", "1.2.3-beta", "2.1.0+b", "2.0.9"])
                        .to_string();
                    let against = if self.next().is_multiple_of(2) {
                        json!(version)
                    } else {
                        self.expr(depth)
                    };
                    vec![self.expr(depth), o, against]
                }
                _ if self.next().is_multiple_of(8) => self.args(count, depth),
                _ => self.args(2, depth),
            };
            json!({ op: args })
        }

        fn attributes(&mut self) -> Map<String, Value> {
            let mut m = Map::new();
            for key in ["plan", "email", "version", "n", "flag"] {
                if !self.next().is_multiple_of(5) {
                    m.insert(key.into(), self.scalar());
                }
            }
            let (tier, id) = (self.scalar(), self.scalar());
            m.insert("user".into(), json!({ "tier": tier, "org": { "id": id } }));
            m.insert("list".into(), json!([self.scalar(), self.scalar()]));
            m
        }
    }

    /// Thousands of generated rules and contexts: the fast path's answer (where it gives
    /// one) is the walker's, and the rule's answer is always the walker's.
    #[test]
    fn the_fast_path_answers_what_the_walker_answers() {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        let (mut answered, mut handed_over) = (0, 0);
        for _ in 0..3000 {
            let text = g.rule(3).to_string();
            let rule = Rule::parse(&text).expect("a generated rule parses");
            // (A rule whose root is not an operator, a `sem_ver` against a literal version
            // say, is walked: the flag lives in the root operator.)
            assert!(
                matches!(rule.root, Node::Op { fast: true, .. } | Node::SemVer { .. }),
                "a rule of the fast path's operators: {text}"
            );
            for _ in 0..8 {
                let attributes = g.attributes();
                let tk = g.pick(&["user-3", "", "3"]).to_string();
                for bucketing in [Bucketing::V1, Bucketing::V2, Bucketing::V3] {
                    let data = Data {
                        attributes: &attributes,
                        targeting_key: &tk,
                        flag_key: "flag-a",
                        bucketing,
                    };
                    let walked = rule.evaluate_walked(&data);
                    match eval(&rule.root, &data, &mut budget()) {
                        Some(v) => {
                            answered += 1;
                            assert_eq!(Ok(v.into_cow(&data)), walked, "{text} on {attributes:?}");
                        }
                        None => handed_over += 1,
                    }
                    assert_eq!(rule.evaluate(&data), walked, "{text} on {attributes:?}");
                }
            }
        }
        // Both ways were exercised, and the fast path answered most evaluations.
        assert!(answered > 5 * handed_over, "{answered} / {handed_over}");
        assert!(handed_over > 0);
    }

    /// Constants read outside `fractional` and `fractional`'s own copies together just over
    /// the output budget (each alone within it): over budget on both paths.
    #[test]
    fn output_spent_outside_fractional_counts_against_it() {
        let ones = vec!["1"; 7000].join(",");
        let vars = vec![r#"{"var":"b"}"#; 501].join(",");
        let text = format!(r#"{{"if": [[{ones}], {{"fractional": [{vars}, ["a", 1]]}}, null]}}"#);
        let rule = Rule::parse(&text).unwrap();
        assert!(matches!(rule.root, Node::Op { fast: true, .. }));
        let mut attributes = Map::new();
        attributes.insert("b".into(), json!("x".repeat(1992)));
        for bucketing in [Bucketing::V1, Bucketing::V2, Bucketing::V3] {
            let data = Data {
                attributes: &attributes,
                targeting_key: "u",
                flag_key: "flag",
                bucketing,
            };
            assert_eq!(rule.evaluate_walked(&data), Err(super::super::OverBudget));
            assert_eq!(rule.evaluate(&data), Err(super::super::OverBudget));
        }
        // Without the constant, the same split fits and both paths pick its variant.
        let text = format!(r#"{{"if": [true, {{"fractional": [{vars}, ["a", 1]]}}, null]}}"#);
        let rule = Rule::parse(&text).unwrap();
        let data = Data {
            attributes: &attributes,
            targeting_key: "u",
            flag_key: "flag",
            bucketing: Bucketing::V2,
        };
        assert_eq!(rule.evaluate(&data), Ok(Cow::Owned(json!("a"))));
        assert_eq!(rule.evaluate_walked(&data), rule.evaluate(&data));
    }

    /// flagd's usual split is planned when its weights decide under V2, and the plan charges
    /// what the walker charges: around the output budget's edge (the seed's texts growing
    /// byte by byte across it), both paths answer alike, a variant and then over budget.
    #[test]
    fn the_usual_split_is_planned_and_charged_as_walked() {
        let planned = |text: &str| match Rule::parse(text).unwrap().root {
            Node::Op { split, .. } => split.is_some(),
            _ => false,
        };
        let seed = r#"{"cat": ["f/", {"var": "targetingKey"}, {"var": "plan"}]}"#;
        assert!(planned(&format!(
            r#"{{"fractional": [{seed}, ["a", 1], ["b"], ["c", null]]}}"#
        )));
        for buckets in [
            r#"["a", 1.5]"#,
            r#"["a", 0]"#,
            "[]",
            r#"["a", "1"]"#,
            r#"["a", 2147483648]"#,
        ] {
            let text = format!(r#"{{"fractional": [{seed}, {buckets}]}}"#);
            assert!(!planned(&text), "{text}");
        }
        assert!(!planned(r#"{"fractional": [{"cat": [1, "a"]}, ["a", 1]]}"#));
        assert!(!planned(r#"{"fractional": [{"var": "plan"}, ["a", 1]]}"#));

        let pieces = vec![r#"{"var":"b"}"#; 400].join(",");
        let text = format!(r#"{{"fractional": [{{"cat": [{pieces}]}}, ["a", 1], ["b", 1]]}}"#);
        assert!(planned(&text));
        let rule = Rule::parse(&text).unwrap();
        // 400 copies of the attribute's text: the fast path's share of the budget runs out
        // at about 1,966 bytes each (it hands over to the walker), the walker's own budget
        // at about 2,621.
        let (mut fast, mut handed_over, mut answered, mut over) = (0, 0, 0, 0);
        for len in (1940..1990).chain(2600..2640) {
            let mut attributes = Map::new();
            attributes.insert("b".into(), json!("x".repeat(len)));
            let data = Data {
                attributes: &attributes,
                targeting_key: "u",
                flag_key: "flag",
                bucketing: Bucketing::V2,
            };
            let walked = rule.evaluate_walked(&data);
            assert_eq!(rule.evaluate(&data), walked, "{len}");
            match eval(&rule.root, &data, &mut budget()) {
                Some(v) => {
                    fast += 1;
                    assert_eq!(Ok(v.into_cow(&data)), walked, "{len}");
                }
                None => handed_over += 1,
            }
            match walked {
                Ok(_) => answered += 1,
                Err(_) => over += 1,
            }
        }
        assert!(
            fast > 0 && handed_over > 0,
            "{fast} on the fast path, {handed_over} handed over"
        );
        assert!(
            answered > fast && over > 0,
            "{answered} answered, {over} over"
        );
    }

    #[test]
    fn rules_outside_the_fast_paths_operators_are_walked() {
        for text in [
            r#"{"cat": ["a", "b"]}"#,
            r#"{"if": [{"missing": ["a"]}, "on", null]}"#,
            r#"{"==": [{"var": ""}, 1]}"#,
            r#"{"<": [{"var": "$flagd.timestamp"}, 1]}"#,
            r#"{"in": ["a", [{"var": "x"}]]}"#,
            r#"{"var": ["x", "default"]}"#,
        ] {
            let rule = Rule::parse(text).unwrap();
            assert!(!matches!(rule.root, Node::Op { fast: true, .. }), "{text}");
        }
        for text in [
            r#"{"if": [{"in": [{"var": "plan"}, ["pro", "team"]]}, "on", null]}"#,
            r#"{"fractional": [{"cat": [{"var": "$flagd.flagKey"}, {"var": "targetingKey"}]}, ["a", 1]]}"#,
        ] {
            let rule = Rule::parse(text).unwrap();
            assert!(matches!(rule.root, Node::Op { fast: true, .. }), "{text}");
        }
    }
}
