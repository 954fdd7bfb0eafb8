//! flagd's usual split, `fractional` seeded by `cat` of the flag key and the targeting key
//! over constant buckets, evaluates without allocating (each evaluation used to build the
//! seed's text, the argument list and the chosen variant's name), under the bucketing
//! profiles that hash text (V1, V2); every allocation of the process is counted, after a
//! warm-up pass.

#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::collections::BTreeMap;

use release_svc::domain::rules::{Bucketing, Data, Rule};
use serde_json::{json, Map, Value};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn a_seeded_fractional_split_allocates_nothing() {
    let rule = json!({"fractional": [
        {"cat": [{"var": "$flagd.flagKey"}, "/", {"var": "targetingKey"}]},
        ["red", 25], ["blue", 25], ["green", 50],
    ]});
    let rule = Rule::parse(&rule.to_string()).unwrap();
    let users: Vec<String> = (0..1000).map(|u| format!("user-{u}")).collect();
    let attributes = Map::new();
    for bucketing in [Bucketing::V1, Bucketing::V2] {
        let mut landed: BTreeMap<&str, usize> = ["red", "blue", "green"]
            .into_iter()
            .map(|c| (c, 0))
            .collect();
        // Anything done once (lazily) on a first evaluation is not per evaluation.
        for user in &users {
            let data = Data {
                attributes: &attributes,
                targeting_key: user,
                flag_key: "color",
                bucketing,
            };
            rule.evaluate(&data).unwrap();
        }
        let region = Region::new(GLOBAL);
        for i in 0..10_000usize {
            let data = Data {
                attributes: &attributes,
                targeting_key: &users[i % users.len()],
                flag_key: "color",
                bucketing,
            };
            let v = rule.evaluate(&data).unwrap();
            let Value::String(name) = v.as_ref() else {
                panic!("{bucketing:?}: {v}")
            };
            *landed.get_mut(name.as_str()).expect("a bucket's name") += 1;
        }
        let change = region.change();
        let allocated = change.allocations + change.reallocations;
        // Every allocation of the process counts, the test harness's other threads
        // included (a CI run once saw 4 without a warm-up); one per evaluation would be
        // 10,000 (the seed's text, the argument list and the variant's name made 20,000).
        assert!(
            allocated <= 8,
            "{bucketing:?}: 10,000 evaluations allocated {allocated} times"
        );
        // The evaluations were real: every bucket served, near its weight.
        assert!(
            landed.values().all(|n| *n > 1000),
            "{bucketing:?}: {landed:?}"
        );
        let green = landed["green"] as f64 / 10_000.0;
        assert!((0.4..0.6).contains(&green), "{bucketing:?}: {landed:?}");
    }
}
