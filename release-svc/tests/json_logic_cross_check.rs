//! The rule engine's JSON Logic array, `missing` and string operators (`map`, `filter`,
//! `reduce`, `all`, `none`, `some`, `merge`, `missing`, `missing_some`, `substr`), checked
//! against an independent implementation (the `jsonlogic` crate, a port of json-logic-js) on
//! generated rules and contexts, plus the reference examples of jsonlogic.com.

#![allow(clippy::unwrap_used)]

use release_svc::domain::rules::{Bucketing, Data, Rule};
use serde_json::{json, Map, Value};

fn ours(rule: &Value, attributes: &Map<String, Value>) -> Value {
    let rule = Rule::parse(&rule.to_string()).unwrap_or_else(|e| panic!("{rule}: {e}"));
    let data = Data {
        attributes,
        targeting_key: "",
        flag_key: "f",
        bucketing: Bucketing::V2,
    };
    rule.evaluate(&data).unwrap().into_owned()
}

/// Equal as JSON Logic results: numbers by value (3 and 3.0 are the same answer).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// A small deterministic generator (xorshift64*).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// Numbers and booleans only. The reference crate departs from json-logic-js (which
    /// flagd follows, and the engine too) on null and "" in `missing` (it counts them
    /// present) and on comparing a string with a number (`"a" > 0` is true there, false in
    /// JavaScript); the reference examples cover strings and missing values instead.
    fn scalar(&mut self) -> Value {
        match self.below(2) {
            0 => json!(self.below(10)),
            _ => json!(self.below(2) == 0),
        }
    }

    fn array(&mut self) -> Value {
        let n = self.below(5);
        Value::Array((0..n).map(|_| json!(self.below(10))).collect())
    }

    fn context(&mut self) -> Map<String, Value> {
        let mut m = Map::new();
        for key in ["a", "b", "c"] {
            if self.below(4) != 0 {
                let v = self.scalar();
                m.insert(key.into(), v);
            }
        }
        // Always there: `merge` of a missing list would put a null among the numbers, and
        // arithmetic on null differs between implementations (json-logic-js gives NaN).
        for key in ["xs", "ys"] {
            let v = self.array();
            m.insert(key.into(), v);
        }
        m
    }

    /// Logic applied to each item (`{"var": ""}` is the item).
    fn item_logic(&mut self) -> Value {
        let item = json!({"var": ""});
        let n = json!(self.below(10));
        match self.below(5) {
            0 => json!({">": [item, n]}),
            1 => json!({"==": [{"%": [item, 2]}, 0]}),
            2 => json!({"*": [item, n]}),
            3 => json!({"+": [item, 1]}),
            _ => json!({"<=": [item, n]}),
        }
    }

    fn list(&mut self) -> Value {
        match self.below(4) {
            0 => json!({"var": self.pick(&["xs", "ys"])}),
            1 => self.array(),
            2 => json!({"merge": [{"var": "xs"}, self.array(), self.below(10)]}),
            _ => json!({"var": self.pick(&["a", "missing_attr"])}),
        }
    }

    fn rule(&mut self) -> Value {
        let list = self.list();
        match self.below(8) {
            0 => json!({"map": [list, self.item_logic()]}),
            1 => json!({"filter": [list, self.item_logic()]}),
            2 => json!({"all": [list, self.item_logic()]}),
            3 => json!({"none": [list, self.item_logic()]}),
            4 => json!({"some": [list, self.item_logic()]}),
            5 => json!({"reduce": [
                list,
                {"+": [{"var": "current"}, {"var": "accumulator"}]},
                self.below(5)
            ]}),
            6 => json!({"merge": [list, self.list(), self.scalar()]}),
            // `missing_some` is left to the reference examples: this crate returns the keys
            // missing before the count was reached where json-logic-js (and flagd) return [].
            _ => json!({"missing": ["a", "b", "c", "xs"]}),
        }
    }
}

#[test]
fn generated_rules_agree_with_an_independent_json_logic() {
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let mut compared = 0;
    for _ in 0..5_000 {
        let rule = g.rule();
        let context = g.context();
        let reference = jsonlogic::apply(&rule, &Value::Object(context.clone()))
            .unwrap_or_else(|e| panic!("reference refused {rule}: {e}"));
        let answer = ours(&rule, &context);
        assert!(
            same(&answer, &reference),
            "{rule} with {context:?}: ours {answer}, reference {reference}"
        );
        compared += 1;
    }
    assert_eq!(compared, 5_000);
}

/// The operators' examples from jsonlogic.com/operations.html.
#[test]
fn the_reference_examples() {
    let none = Map::new();
    let ctx = |v: Value| v.as_object().unwrap().clone();
    let cases: Vec<(Value, Map<String, Value>, Value)> = vec![
        (
            json!({"map": [{"var": "integers"}, {"*": [{"var": ""}, 2]}]}),
            ctx(json!({"integers": [1, 2, 3, 4, 5]})),
            json!([2, 4, 6, 8, 10]),
        ),
        (
            json!({"filter": [{"var": "integers"}, {"%": [{"var": ""}, 2]}]}),
            ctx(json!({"integers": [1, 2, 3, 4, 5]})),
            json!([1, 3, 5]),
        ),
        (
            json!({"reduce": [{"var": "integers"}, {"+": [{"var": "current"}, {"var": "accumulator"}]}, 0]}),
            ctx(json!({"integers": [1, 2, 3, 4, 5]})),
            json!(15),
        ),
        (
            json!({"all": [[1, 2, 3], {">": [{"var": ""}, 0]}]}),
            none.clone(),
            json!(true),
        ),
        (
            json!({"some": [[-1, 0, 1], {">": [{"var": ""}, 0]}]}),
            none.clone(),
            json!(true),
        ),
        (
            json!({"none": [[-3, -2, -1], {">": [{"var": ""}, 0]}]}),
            none.clone(),
            json!(true),
        ),
        (
            json!({"some": [{"var": "pies"}, {"==": [{"var": "filling"}, "apple"]}]}),
            ctx(
                json!({"pies": [{"filling": "pumpkin", "temp": 110}, {"filling": "rhubarb", "temp": 210}, {"filling": "apple", "temp": 310}]}),
            ),
            json!(true),
        ),
        (
            json!({"all": [[], {">": [{"var": ""}, 0]}]}),
            none.clone(),
            json!(false),
        ),
        (
            json!({"all": ["abc", {"in": [{"var": ""}, "abcd"]}]}),
            none.clone(),
            json!(true),
        ),
        (
            json!({"some": ["abc", {"==": [{"var": ""}, "b"]}]}),
            none.clone(),
            json!(false),
        ),
        (
            json!({"merge": [[1, 2], [3, 4]]}),
            none.clone(),
            json!([1, 2, 3, 4]),
        ),
        (
            json!({"merge": [1, 2, [3, 4]]}),
            none.clone(),
            json!([1, 2, 3, 4]),
        ),
        (
            json!({"missing": ["a", "b"]}),
            ctx(json!({"a": "apple", "c": "carrot"})),
            json!(["b"]),
        ),
        (
            json!({"missing": ["a", "b"]}),
            ctx(json!({"a": "apple", "b": "banana"})),
            json!([]),
        ),
        (
            json!({"missing": ["a", "b"]}),
            ctx(json!({"a": "", "b": null})),
            json!(["a", "b"]),
        ),
        (
            json!({"missing": {"merge": ["vin", {"if": [{"var": "financing"}, ["apr", "term"], []]}]}}),
            ctx(json!({"financing": true})),
            json!(["vin", "apr", "term"]),
        ),
        (
            json!({"missing_some": [1, ["a", "b", "c"]]}),
            ctx(json!({"a": "apple"})),
            json!([]),
        ),
        (
            json!({"missing_some": [2, ["a", "b", "c"]]}),
            ctx(json!({"a": "apple"})),
            json!(["b", "c"]),
        ),
        (
            json!({"substr": ["jsonlogic", 4]}),
            none.clone(),
            json!("logic"),
        ),
        (
            json!({"substr": ["jsonlogic", -5]}),
            none.clone(),
            json!("logic"),
        ),
        (
            json!({"substr": ["jsonlogic", 1, 3]}),
            none.clone(),
            json!("son"),
        ),
        (
            json!({"substr": ["jsonlogic", 4, -2]}),
            none.clone(),
            json!("log"),
        ),
        (
            json!({"substr": ["häagen", 1, 2]}),
            none.clone(),
            json!("äa"),
        ),
        (json!({"substr": ["abc", 10]}), none.clone(), json!("")),
        (
            json!({"if": [{"some": [{"var": "groups"}, {"==": [{"var": ""}, "beta"]}]}, "on", "off"]}),
            ctx(json!({"groups": ["alpha", "beta"]})),
            json!("on"),
        ),
    ];
    for (rule, context, want) in cases {
        let got = ours(&rule, &context);
        assert!(same(&got, &want), "{rule}: got {got}, want {want}");
    }
}

/// Iterating operators pay from the evaluation budget: every step's operations and every
/// copied item count, so neither many small steps nor a growing accumulator runs away.
#[test]
fn iteration_is_bounded_by_the_evaluation_budget() {
    let big: Vec<Value> = (0..2_000).map(|i| json!(i)).collect();
    let mut context = Map::new();
    context.insert("xs".into(), Value::Array(big));
    let over = |context: &Map<String, Value>, rule: Value| {
        let rule = Rule::parse(&rule.to_string()).unwrap();
        let data = Data {
            attributes: context,
            targeting_key: "",
            flag_key: "f",
            bucketing: Bucketing::V2,
        };
        rule.evaluate(&data).is_err()
    };
    // 2,000 items x 62 operations: above the 100,000 operations of one evaluation.
    let sixty_ones: Vec<Value> = (0..60).map(|_| json!(1)).collect();
    assert!(over(
        &context,
        json!({"map": [{"var": "xs"}, {"+": sixty_ones.clone()}]})
    ));
    // The same rule over 1,000 items fits.
    context.insert(
        "xs".into(),
        Value::Array((0..1_000).map(|i| json!(i)).collect()),
    );
    assert!(!over(
        &context,
        json!({"map": [{"var": "xs"}, {"+": sixty_ones}]})
    ));
    // An accumulator that doubles at each step: stopped by the output budget.
    assert!(over(
        &context,
        json!({"reduce": [
            {"var": "xs"},
            {"merge": [{"var": "accumulator"}, {"var": "accumulator"}, 1]},
            []
        ]})
    ));
}
