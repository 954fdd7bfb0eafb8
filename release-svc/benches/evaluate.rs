//! In-process evaluation: 1,000 features with rules and a carrier gate, one decision per
//! iteration over varying features and users (`cargo bench -p release-svc --bench evaluate`).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use release_svc::domain::evaluate::{Context, Snapshot};
use release_svc::domain::model::{Carrier, Feature, Release, ReleaseEnvironment, ReleaseState};
use release_svc::domain::placements::{Placement, PlacementIndex, PlacementState};
use release_svc::domain::rules::Rule;
use serde_json::{Map, Value};

fn snapshot(n: usize) -> Snapshot {
    let mut features = BTreeMap::new();
    for i in 0..n {
        let key = format!("feature-{i:04}");
        let rule = format!(
            r#"{{"if": [{{"and": [{{"in": [{{"var": "plan"}}, ["pro", "team"]]}}, {{"ends_with": [{{"var": "email"}}, "@corp-{}.com"]}}]}}, "on", {{"sem_ver": [{{"var": "app_version"}}, ">=", "2.{}.0"]}}, "on", null]}}"#,
            i % 7,
            i % 5
        );
        let f = Feature {
            key: key.clone(),
            description: String::new(),
            owner: String::new(),
            variants: Feature::boolean_variants(),
            default_variant: "off".into(),
            off_variant: "off".into(),
            targeting: Some(Rule::parse(&rule).expect("rule")),
            allow: vec![format!("vip-{i}")],
            deny: vec![],
            carriers: vec![Carrier {
                artifact: format!("svc-{}", i % 20),
                min_version: semver::Version::new(1, 0, 0),
                required_coverage: 1.0,
            }],
            disabled: false,
            metadata: Default::default(),
            revision: 1,
            create_ms: 0,
            update_ms: 0,
            archived_ms: None,
        };
        features.insert(key, Arc::new(f));
    }
    let release = Release {
        id: 1,
        description: String::new(),
        features: features.keys().cloned().collect(),
        environments: vec![ReleaseEnvironment {
            environment: "prod".into(),
            rollout_percent: 50.0,
            ..ReleaseEnvironment::default()
        }],
        state: ReleaseState::Releasing,
        governance: Default::default(),
        revision: 1,
        create_ms: 0,
        update_ms: 0,
    };
    let mut placements = PlacementIndex::default();
    for a in 0..20 {
        for t in 0..4 {
            placements.apply(Placement {
                deployment: a,
                environment: "prod".into(),
                target: format!("t{t}"),
                artifact: format!("svc-{a}"),
                version: "1.2.0".into(),
                state: PlacementState::Placed,
                sequence: (a * 4 + t) as u64 + 1,
            });
        }
    }
    Snapshot::build(1, &features, &BTreeMap::from([(1, release)]), &placements)
}

fn bench(c: &mut Criterion) {
    let s = snapshot(1000);
    let keys: Vec<String> = (0..1000).map(|i| format!("feature-{i:04}")).collect();
    let contexts: Vec<Context> = (0..256)
        .map(|u| {
            let mut attributes = Map::new();
            attributes.insert(
                "plan".into(),
                Value::String(if u % 3 == 0 { "pro" } else { "free" }.into()),
            );
            attributes.insert(
                "email".into(),
                Value::String(format!("user{u}@corp-{}.com", u % 7)),
            );
            attributes.insert(
                "app_version".into(),
                Value::String(format!("2.{}.1", u % 6)),
            );
            Context {
                environment: "prod".into(),
                targeting_key: format!("user-{u}"),
                attributes,
            }
        })
        .collect();
    let mut i = 0usize;
    c.bench_function("evaluate 1000 features with rules", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let key = &keys[i % keys.len()];
            let ctx = &contexts[(i / 7) % contexts.len()];
            black_box(s.evaluate(black_box(key), black_box(ctx)))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
