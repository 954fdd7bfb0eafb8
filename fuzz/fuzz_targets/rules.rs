//! The rule language: any text is parsed and checked, and a rule that parses is evaluated
//! against a context with strings, numbers, nested values and a large attribute. Parsing
//! must refuse or accept without panicking; evaluation must answer or report that it ran
//! out of its budget, and answer exactly what the general walker alone answers (the fast
//! path of the usual operators may never differ from it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use release_svc::domain::rules::{Bucketing, Data, Rule};
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(rule) = Rule::parse(text) else {
        return;
    };
    let attributes = json!({
        "email": "ada@corp.com",
        "plan": "pro",
        "age": 37,
        "version": "2.4.1",
        "user": {"name": "jack", "tags": ["a", "b", {"c": [1, 2.5, null, true]}]},
        "big": "x".repeat(4096),
    });
    let attributes = attributes.as_object().cloned().unwrap_or_default();
    for bucketing in [Bucketing::V1, Bucketing::V2, Bucketing::V3] {
        let data = Data {
            attributes: &attributes,
            targeting_key: "user-1",
            flag_key: "flag",
            bucketing,
        };
        if rule.evaluate(&data) != rule.evaluate_walked(&data) {
            // The walker reads the clock (`$flagd.timestamp`, also inside `{"var": ""}`): a
            // second may have ticked between the two. Only a difference that repeats is a
            // fault.
            assert_eq!(rule.evaluate(&data), rule.evaluate_walked(&data), "{text}");
        }
    }
});
