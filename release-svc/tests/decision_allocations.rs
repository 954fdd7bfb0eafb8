//! A decision allocates nothing: every allocation of the process is counted (an instrumented
//! global allocator), with the Prometheus recorder installed as in the service, and 100,000
//! decisions over 1,000 features and 256 users must add none once each (feature,
//! environment, variant) has been counted once (its first count claims a usage slot).

#![allow(clippy::unwrap_used)]

#[path = "../benches/fixture/mod.rs"]
mod fixture;

use std::alloc::System;

use release_svc::domain::evaluate::Reason;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn deciding_allocates_nothing() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("recorder");
    let s = fixture::snapshot(1000);
    let keys: Vec<String> = (0..1000).map(fixture::key).collect();
    let contexts = fixture::contexts();
    // The first count of a (feature, environment, variant) claims its usage slot.
    for key in &keys {
        for ctx in &contexts {
            s.decide(key, ctx).expect("known feature");
        }
    }

    let region = Region::new(GLOBAL);
    let mut reasons = [0u64; Reason::ALL.len()];
    let mut visible = 0u64;
    for i in 0..100_000usize {
        let d = s
            .decide(&keys[i % keys.len()], &contexts[(i / 7) % contexts.len()])
            .expect("known feature");
        reasons[d.reason as usize] += 1;
        visible += u64::from(d.visible);
    }
    let change = region.change();
    let allocated = change.allocations + change.reallocations;

    assert_eq!(
        allocated, 0,
        "100,000 decisions allocated {allocated} times"
    );
    // The decisions were real ones: split, targeted and served.
    assert!(reasons[Reason::Split as usize] > 10_000, "{reasons:?}");
    assert!(
        reasons[Reason::TargetingMatch as usize] > 10_000,
        "{reasons:?}"
    );
    assert!(visible > 10_000 && visible < 90_000, "{visible} visible");
    // And counted where an operator reads them.
    let text = handle.render();
    let split = text
        .lines()
        .find(|l| l.starts_with("release_svc_evaluations_total{reason=\"SPLIT\"}"))
        .expect("the SPLIT counter is exported");
    let n: u64 = split.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= reasons[Reason::Split as usize], "{split}");
}
