//! In-process evaluation (`cargo bench -p release-svc --bench evaluate`):
//!
//! - `evaluate 1000 features with rules`: one decision per iteration over varying features
//!   and users (a rule, an allow list, a carrier gate and a 50% rollout each);
//! - `peers/*`: the same rule, rollout and contexts decided by release-svc (its whole
//!   decision, and its rule engine alone on the peers' JSON Logic rule), by `datalogic-rs`
//!   (the rule compiled once, the context converted once) and by flagd's Rust evaluator
//!   (`flagd-evaluation-engine`, through its public `Operator::apply`), after a check that
//!   all of them reach the same answers.

#![allow(clippy::unwrap_used)]

#[path = "fixture/mod.rs"]
mod fixture;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use datalogic_rs::Engine;
use flagd_evaluation_engine::Operator;
use open_feature::EvaluationContext;
use release_svc::domain::evaluate::Context;
use release_svc::domain::rules::{Bucketing, Data, Rule};
use serde_json::{json, Value};

fn bench(c: &mut Criterion) {
    let s = fixture::snapshot(1000);
    let keys: Vec<String> = (0..1000).map(fixture::key).collect();
    let contexts = fixture::contexts();
    let mut i = 0usize;
    c.bench_function("evaluate 1000 features with rules", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let key = &keys[i % keys.len()];
            let ctx = &contexts[(i / 7) % contexts.len()];
            black_box(s.decide(black_box(key), black_box(ctx)))
        })
    });
}

/// Feature 1's decision as one JSON Logic rule, as release-svc renders it for flagd: inside
/// the 50% rollout (flagd's `fractional` over `"feature-0001/{targetingKey}"`) and the rule
/// names `on` -> `on`, else `off`.
fn peer_rule() -> Value {
    let rule: Value = serde_json::from_str(&fixture::rule(1)).unwrap();
    let matched = &rule["if"];
    json!({"if": [
        {"and": [
            {"==": [{"fractional": [
                {"cat": ["feature-0001/", {"var": "targetingKey"}]},
                ["in", 5000],
                ["out", 5000],
            ]}, "in"]},
            {"or": [matched[0], matched[2]]},
        ]},
        "on",
        "off",
    ]})
}

/// The context as a flagd provider hands it to its rule engine.
fn flagd_context(c: &Context) -> Value {
    let mut data = c.attributes.clone();
    data.insert("targetingKey".into(), c.targeting_key.clone().into());
    data.insert("$flagd".into(), json!({"flagKey": "feature-0001"}));
    Value::Object(data)
}

fn openfeature_context(c: &Context) -> EvaluationContext {
    let mut ctx = EvaluationContext::default().with_targeting_key(c.targeting_key.clone());
    for (k, v) in &c.attributes {
        ctx = ctx.with_custom_field(k.clone(), v.as_str().unwrap().to_owned());
    }
    ctx
}

/// What release-svc's rule engine reads for `ctx` deciding `key` (the peers' bucketing).
fn rule_data<'a>(ctx: &'a Context, key: &'a str) -> Data<'a> {
    Data {
        attributes: &ctx.attributes,
        targeting_key: &ctx.targeting_key,
        flag_key: key,
        bucketing: Bucketing::V2,
    }
}

fn peers(c: &mut Criterion) {
    let key = fixture::key(1);
    let contexts = fixture::contexts();
    let rule = peer_rule();
    let rule_text = rule.to_string();
    let datalogic = Engine::builder().build();
    let compiled = datalogic
        .compile(&rule_text)
        .expect("datalogic compiles the rule");
    let data: Vec<Value> = contexts.iter().map(flagd_context).collect();
    let flagd = Operator::new();
    let of_contexts: Vec<EvaluationContext> = contexts.iter().map(openfeature_context).collect();
    let our_rule = Rule::parse(&rule_text).expect("release-svc parses the rule");

    // The same answers, or the comparison means nothing. Both peers bucket `fractional` as
    // flagd 0.15-0.16 did (release-svc's V2): datalogic-rs's built-in operator (its `flagd`
    // feature), which also takes the place of flagd-evaluation-engine's own CBOR (V3)
    // operator once that feature is on in the build.
    for name in ["datalogic-rs", "flagd", "release-svc rule"] {
        let mut s = fixture::snapshot(2);
        s.bucketing = Bucketing::V2;
        let mut served = 0;
        for (u, ctx) in contexts.iter().enumerate() {
            let ours = s.decide(&key, ctx).unwrap().variant.to_owned();
            let theirs = if name == "flagd" {
                flagd
                    .apply(&key, &rule_text, &of_contexts[u])
                    .unwrap()
                    .unwrap()
            } else if name == "release-svc rule" {
                let v = our_rule.evaluate(&rule_data(ctx, &key)).unwrap();
                v.as_str().unwrap().to_owned()
            } else {
                let arena = datalogic_rs::bumpalo::Bump::new();
                let v = datalogic.evaluate(&compiled, &data[u], &arena).unwrap();
                v.as_str().unwrap().to_owned()
            };
            assert_eq!(ours, theirs, "{name} disagrees for user {u}");
            served += usize::from(ours == "on");
        }
        assert!(
            served > 10 && served < 246,
            "{name}: {served} of 256 served"
        );
    }

    let s = fixture::snapshot(2);
    let mut g = c.benchmark_group("peers");
    let mut i = 0usize;
    g.bench_function("release-svc", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let ctx = &contexts[i % contexts.len()];
            black_box(s.decide(black_box(&key), black_box(ctx)).map(|d| d.visible))
        })
    });
    g.bench_function("release-svc rule", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let data = rule_data(&contexts[i % contexts.len()], &key);
            let v = our_rule.evaluate(black_box(&data)).unwrap();
            black_box(v.as_str() == Some("on"))
        })
    });
    let mut arena = datalogic_rs::bumpalo::Bump::new();
    g.bench_function("datalogic-rs", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let input = &data[i % data.len()];
            let v = datalogic
                .evaluate(&compiled, black_box(input), &arena)
                .unwrap();
            black_box(v.as_str() == Some("on"));
            arena.reset();
        })
    });
    g.bench_function("flagd-evaluation-engine", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let ctx = &of_contexts[i % of_contexts.len()];
            black_box(flagd.apply(&key, black_box(&rule_text), ctx).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench, peers);
criterion_main!(benches);
