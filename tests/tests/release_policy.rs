//! Release planning and policy end to end, on real gRPC with real deploy-svc and
//! release-svc, release-svc on a simulated clock: a plan 100% staging -> 1% / 10% / 100%
//! prod with two approvals advances by itself; separation of duties; soak time; a freeze
//! window from deploy-svc's change calendar and its emergency override; the cadence limit;
//! the dry run; and the audit trail of the whole story.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::deploy::v1 as dpb;
use proto::release::v1 as rpb;
use release_svc::engine::{Clock, ManualClock};
use tests::release::{self, by};
use tests::{environment, InProcess};
use tonic::Code;

/// A manual clock that counts how often the service read it.
struct Counted {
    clock: ManualClock,
    reads: AtomicU64,
}

impl Clock for Counted {
    fn now_ms(&self) -> i64 {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.clock.now_ms()
    }
}

impl Counted {
    fn advance(&self, ms: i64) {
        self.clock.advance(ms);
    }

    /// Waits until the clock has been read `n` more times (the scheduler reads it once per
    /// pass, every 10 ms).
    async fn read_again(&self, n: u64) {
        let (from, start) = (self.reads.load(Ordering::SeqCst), Instant::now());
        while self.reads.load(Ordering::SeqCst) < from + n {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the scheduler did not read the clock"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The audit records of `resource`.
async fn audit_of(rc: &mut release::Client, resource: &str) -> Vec<rpb::AuditRecord> {
    rc.list_audit_records(rpb::ListAuditRecordsRequest {
        resource: resource.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .records
}

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

fn dur(ms: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: ms / 1000,
        nanos: 0,
    })
}

fn ts(ms: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: 0,
    })
}

fn step(percent: f64, min: i64) -> rpb::RolloutStep {
    rpb::RolloutStep {
        percent,
        min_duration: dur(min),
    }
}

/// Polls GetRelease until `done` holds (the scheduler runs every 10 ms).
async fn until(
    rc: &mut release::Client,
    name: &str,
    what: &str,
    done: impl Fn(&rpb::Release) -> bool,
) -> rpb::Release {
    let start = Instant::now();
    loop {
        let r = rc
            .get_release(rpb::GetReleaseRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        if done(&r) {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: still {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn percent(r: &rpb::Release, env: &str) -> f64 {
    r.environments
        .iter()
        .find(|e| e.environment == env)
        .unwrap()
        .rollout_percent
}

fn kinds(violations: &[rpb::PolicyViolation]) -> Vec<&str> {
    violations.iter().map(|v| v.r#type.as_str()).collect()
}

#[tokio::test]
async fn a_planned_release_is_governed_from_approval_to_100_percent() {
    let d = InProcess::start().await;
    let clock = Arc::new(Counted {
        clock: ManualClock::new(release_svc::engine::now_ms()),
        reads: AtomicU64::new(0),
    });
    let r = release::InProcess::start_with_clock(d.addr, clock.clone()).await;
    let (mut dc, mut rc) = (d.client().await, r.client().await);
    environment(&mut dc, "staging", None, false).await;
    environment(&mut dc, "prod", Some("staging"), false).await;
    release::plain_feature(&mut rc, "one-page-checkout", false).await;
    release::plain_feature(&mut rc, "dark-mode", false).await;
    release::plain_feature(&mut rc, "search-v2", false).await;

    // prod's policy: 2 approvals by ann/ben/cy, 1 h soak in staging, 2 starts a day,
    // a change reference.
    let policy = rc
        .set_policy(by(
            "pat",
            rpb::SetPolicyRequest {
                policy: Some(rpb::Policy {
                    environment: "prod".into(),
                    max_releases_per_day: 2,
                    min_soak: dur(HOUR),
                    required_approvals: 2,
                    approvers: vec!["ann".into(), "ben".into(), "cy".into()],
                    require_change_reference: true,
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (policy.etag.as_str(), policy.required_approvals),
        ("\"1\"", 2)
    );
    // A stale etag is ABORTED.
    let stale = rc
        .set_policy(rpb::SetPolicyRequest {
            policy: Some(rpb::Policy {
                environment: "prod".into(),
                etag: "\"0\"".into(),
                ..Default::default()
            }),
        })
        .await;
    tests::status::expect_code(stale, Code::Aborted);

    // rita plans: staging 100%, then prod 1% (10 min), 10% (10 min), 100%.
    let plan = rc
        .create_release(by(
            "rita",
            rpb::CreateReleaseRequest {
                release: Some(rpb::Release {
                    description: "one-page checkout".into(),
                    features: vec!["one-page-checkout".into()],
                    environments: vec![
                        rpb::ReleaseEnvironment {
                            environment: "staging".into(),
                            steps: vec![step(100.0, 0)],
                            ..Default::default()
                        },
                        rpb::ReleaseEnvironment {
                            environment: "prod".into(),
                            steps: vec![step(1.0, 10 * MIN), step(10.0, 10 * MIN), step(100.0, 0)],
                            ..Default::default()
                        },
                    ],
                    change_reference: "CHG-1042".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let name = plan.name.clone();
    assert_eq!(plan.requester, "rita");
    let submitted = rc
        .submit_release(by("rita", rpb::SubmitReleaseRequest { name: name.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(submitted.state(), rpb::ReleaseState::Planned);

    // Separation of duties: the requester cannot approve; a non-approver cannot either.
    let own = rc
        .approve_release(by(
            "rita",
            rpb::ApproveReleaseRequest { name: name.clone() },
        ))
        .await;
    assert_eq!(tests::status::violated_rules(own), ["SEPARATION_OF_DUTIES"]);
    let outsider = rc
        .approve_release(by(
            "mallory",
            rpb::ApproveReleaseRequest { name: name.clone() },
        ))
        .await;
    assert_eq!(tests::status::violated_rules(outsider), ["APPROVER_ROLE"]);
    let one = rc
        .approve_release(by("ann", rpb::ApproveReleaseRequest { name: name.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.state(), rpb::ReleaseState::Planned, "1 of 2 approvals");
    let two = rc
        .approve_release(by("ben", rpb::ApproveReleaseRequest { name: name.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(two.state(), rpb::ReleaseState::Approved);

    // The plan starts on its own: staging at 100%, then waits for the soak time.
    let staged = until(&mut rc, &name, "staging 100% and waiting", |r| {
        percent(r, "staging") == 100.0 && !r.waiting.is_empty()
    })
    .await;
    assert_eq!(kinds(&staged.waiting), ["SOAK_TIME"], "{staged:#?}");
    assert_eq!(percent(&staged, "prod"), 0.0);
    let dry = rc
        .check_release(rpb::CheckReleaseRequest {
            name: name.clone(),
            environment: "prod".into(),
            step: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!dry.allowed);
    assert_eq!(kinds(&dry.violations), ["SOAK_TIME"]);
    // Evaluated: visible in staging, not in prod.
    let staging = release::evaluate(&mut rc, "one-page-checkout", "staging", "u1").await;
    assert!(staging.visible);
    let prod = release::evaluate(&mut rc, "one-page-checkout", "prod", "u1").await;
    assert!(!prod.visible, "{prod:?}");
    assert_eq!(prod.reason(), rpb::Reason::Split, "prod at 0%: {prod:?}");

    // An hour later prod opens at 1%, then 10% and 100%, each after its minimum.
    clock.advance(HOUR);
    let one_pct = until(&mut rc, &name, "prod 1%", |r| percent(r, "prod") == 1.0).await;
    assert_eq!(one_pct.state(), rpb::ReleaseState::Releasing);
    assert!(one_pct.waiting.is_empty());
    // Halfway through the step's minimum the clock stands still until the scheduler has
    // read it a few times; the audit trail shows below that it did not advance then.
    clock.advance(5 * MIN);
    clock.read_again(3).await;
    clock.advance(5 * MIN);
    until(&mut rc, &name, "prod 10%", |r| percent(r, "prod") == 10.0).await;
    clock.advance(10 * MIN);
    let done = until(&mut rc, &name, "prod 100%", |r| {
        r.state() == rpb::ReleaseState::Released
    })
    .await;
    // Each step lasted at least its minimum, by the time recorded when it was taken.
    let advances: Vec<(String, i64)> = audit_of(&mut rc, &name)
        .await
        .into_iter()
        .filter(|a| a.action == "auto.advance" && a.reason.ends_with(" of prod"))
        .map(|a| {
            let t = a.time.unwrap();
            (a.reason, t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        })
        .collect();
    let at = |step: &str| {
        advances
            .iter()
            .find(|(reason, _)| reason == &format!("step {step} of prod"))
            .unwrap_or_else(|| panic!("no auto.advance to step {step}: {advances:?}"))
            .1
    };
    assert!(at("2") - at("1") >= 10 * MIN, "{advances:?}");
    assert!(at("3") - at("2") >= 10 * MIN, "{advances:?}");
    assert_eq!(percent(&done, "prod"), 100.0);
    assert!(
        release::evaluate(&mut rc, "one-page-checkout", "prod", "u1")
            .await
            .visible
    );

    // A freeze window on prod in deploy-svc's change calendar blocks the next release,
    // naming the window; the same violations come from the dry run and the real call.
    let now = clock.now_ms();
    let env = dc
        .get_environment(dpb::GetEnvironmentRequest {
            name: "environments/prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    dc.update_environment(dpb::UpdateEnvironmentRequest {
        environment: Some(dpb::Environment {
            name: "environments/prod".into(),
            etag: env.etag,
            freeze_windows: vec![dpb::FreezeWindow {
                name: "black-friday".into(),
                schedule: Some(dpb::freeze_window::Schedule::Absolute(
                    dpb::AbsoluteWindow {
                        start_time: ts(now - MIN),
                        end_time: ts(now + HOUR),
                    },
                )),
            }],
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["freeze_windows".into()],
        }),
    })
    .await
    .unwrap();
    // The kill switch works during a freeze; turning visibility back on is a change the
    // freeze refuses like any other.
    rc.pause_release(rpb::PauseReleaseRequest {
        name: name.clone(),
        reason: "incident".into(),
    })
    .await
    .unwrap();
    let resume = rc
        .resume_release(rpb::ResumeReleaseRequest { name: name.clone() })
        .await;
    assert_eq!(tests::status::violated_rules(resume), ["FREEZE_WINDOW"]);
    assert!(
        !release::evaluate(&mut rc, "one-page-checkout", "prod", "u1")
            .await
            .visible
    );

    let hotfix = create(&mut rc, "dark-mode", "CHG-1043").await;
    let check = rc
        .check_release(rpb::CheckReleaseRequest {
            name: hotfix.clone(),
            environment: "prod".into(),
            step: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kinds(&check.violations), ["FREEZE_WINDOW", "APPROVALS"]);
    assert!(check.violations[0].description.contains("black-friday"));
    let refused = rollout(&mut rc, &hotfix).await;
    assert_eq!(
        tests::status::violated_rules(refused),
        ["FREEZE_WINDOW", "APPROVALS"],
        "the real transition refuses with the dry run's violations"
    );
    let unchanged = release::evaluate(&mut rc, "dark-mode", "prod", "u1").await;
    assert!(!unchanged.visible, "nothing was written: {unchanged:?}");
    assert_eq!(
        unchanged.reason(),
        rpb::Reason::NotReleased,
        "nothing was written: {unchanged:?}"
    );
    approve(&mut rc, &hotfix, &["ann", "cy"]).await;
    let frozen = rollout(&mut rc, &hotfix).await;
    assert_eq!(tests::status::violated_rules(frozen), ["FREEZE_WINDOW"]);

    // The emergency override passes the freeze: reason and an approver who is not the
    // requester; the pass is audited as such.
    let own = rc
        .set_emergency_override(by(
            "rita",
            rpb::SetEmergencyOverrideRequest {
                name: hotfix.clone(),
                reason: "INC-88 payment outage".into(),
                approver: "rita".into(),
            },
        ))
        .await;
    assert_eq!(tests::status::violated_rules(own), ["SEPARATION_OF_DUTIES"]);
    rc.set_emergency_override(by(
        "rita",
        rpb::SetEmergencyOverrideRequest {
            name: hotfix.clone(),
            reason: "INC-88 payment outage".into(),
            approver: "cy".into(),
        },
    ))
    .await
    .unwrap();
    rollout(&mut rc, &hotfix).await.unwrap();
    assert!(
        release::evaluate(&mut rc, "dark-mode", "prod", "u1")
            .await
            .visible
    );

    // Cadence: two releases started in prod within 24 hours; the third waits a day.
    clock.advance(2 * HOUR);
    let third = create(&mut rc, "search-v2", "CHG-1044").await;
    approve(&mut rc, &third, &["ann", "ben"]).await;
    let busy = rollout(&mut rc, &third).await;
    assert_eq!(tests::status::violated_rules(busy), ["CADENCE_DAY"]);
    clock.advance(24 * HOUR);
    rollout(&mut rc, &third).await.unwrap();

    // The audit trail lists every step in order with its principal; refused calls left
    // nothing.
    let trail = |records: &[rpb::AuditRecord]| -> Vec<(String, String)> {
        records
            .iter()
            .map(|r| (r.action.clone(), r.principal.clone()))
            .collect()
    };
    let story = audit_of(&mut rc, &name).await;
    let expect = [
        ("CreateRelease", "rita"),
        ("SubmitRelease", "rita"),
        ("ApproveRelease", "ann"),
        ("ApproveRelease", "ben"),
        ("auto.advance", "system"),
        ("auto.wait", "system"),
        ("auto.advance", "system"),
        ("auto.advance", "system"),
        ("auto.advance", "system"),
        ("PauseRelease", "anonymous"),
    ];
    assert_eq!(
        trail(&story),
        expect
            .iter()
            .map(|(a, p)| (a.to_string(), p.to_string()))
            .collect::<Vec<_>>()
    );
    assert_eq!(story[5].reason, "SOAK_TIME");
    let hot = rc
        .list_audit_records(rpb::ListAuditRecordsRequest {
            resource: hotfix.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let actions: Vec<&str> = hot.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "CreateRelease",
            "ApproveRelease",
            "ApproveRelease",
            "SetEmergencyOverride",
            "SetRollout",
            "freeze.override"
        ]
    );
    assert!(
        hot[5].reason.contains("EMERGENCY OVERRIDE: INC-88"),
        "{:?}",
        hot[5]
    );
    assert!(hot[5].after.contains("approved by cy"));
    // Filters: by principal and by time; pagination returns every record once.
    let pat = rc
        .list_audit_records(rpb::ListAuditRecordsRequest {
            principal: "pat".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(trail(&pat), [("SetPolicy".to_string(), "pat".to_string())]);
    assert_eq!(pat[0].resource, "policies/prod");
    let all = rc
        .list_audit_records(rpb::ListAuditRecordsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    let late = rc
        .list_audit_records(rpb::ListAuditRecordsRequest {
            start_time: ts(clock.now_ms() - HOUR),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(
        trail(&late),
        [("SetRollout".to_string(), "rita".to_string())]
    );
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = rc
            .list_audit_records(rpb::ListAuditRecordsRequest {
                page_size: 4,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        paged.extend(page.records.into_iter().map(|r| r.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged, all.iter().map(|r| r.id).collect::<Vec<_>>());
    let bad = rc
        .list_audit_records(rpb::ListAuditRecordsRequest {
            page_size: -1,
            page_token: "x".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(tests::status::bad_fields(bad), ["page_size", "page_token"]);
}

/// A release of `feature` to prod by rita with a change reference (no plan).
async fn create(rc: &mut release::Client, feature: &str, change: &str) -> String {
    rc.create_release(by(
        "rita",
        rpb::CreateReleaseRequest {
            release: Some(rpb::Release {
                features: vec![feature.into()],
                environments: vec![rpb::ReleaseEnvironment {
                    environment: "prod".into(),
                    ..Default::default()
                }],
                change_reference: change.into(),
                ..Default::default()
            }),
            request_id: String::new(),
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .name
}

async fn approve(rc: &mut release::Client, name: &str, who: &[&str]) {
    for p in who {
        rc.approve_release(by(p, rpb::ApproveReleaseRequest { name: name.into() }))
            .await
            .unwrap();
    }
}

async fn rollout(
    rc: &mut release::Client,
    name: &str,
) -> Result<tonic::Response<rpb::Release>, tonic::Status> {
    rc.set_rollout(by(
        "rita",
        rpb::SetRolloutRequest {
            name: name.into(),
            environment: "prod".into(),
            rollout_percent: 100.0,
        },
    ))
    .await
}
