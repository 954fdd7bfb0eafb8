//! Deploy agents end to end: real `deploy-agent` processes (4 per test) placing
//! real files from `file://` tar.gz artifacts under temporary roots, against the real
//! deploy-svc binary (and, for the gate, the real release-svc binary).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proto::deploy::v1 as pb;
use proto::deploy::v1::strategy::Kind;
use proto::release::v1 as rpb;
use tests::fleet::{self, deploy, is, register, tarball, until, Agent};
use tests::{environment, release, Binary};

const ENV: &str = "dev";
const N: usize = 4;

struct Fleet {
    deploy: Binary,
    client: tests::Client,
    agents: Vec<Agent>,
    dir: tempfile::TempDir,
}

/// deploy-svc with a short agent timeout, environment `dev`, and `N` agents.
async fn fleet(agent_args: &[&str]) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let deploy = Binary::start(
        &tests::deploy_database(dir.path()).await,
        &["--agent-timeout-ms", "1500", "--tick-interval-ms", "100"],
    )
    .await;
    let mut client = tests::connect(deploy.addr).await;
    environment(&mut client, ENV, None, false).await;
    let mut agents = Vec::new();
    // The artifacts are written in `dir`: the agents may read file:// sources there.
    let allowed = dir.path().to_string_lossy().into_owned();
    for i in 1..=N {
        let root = dir.path().join(format!("agent-{i}"));
        agents.push(
            Agent::start_with(
                &deploy,
                ENV,
                &format!("a-{i}"),
                root,
                agent_args,
                &[("DEPLOY_AGENT_ALLOW_FILE_DIR", &allowed)],
            )
            .await,
        );
    }
    fleet::registered(&mut client, ENV, N).await;
    Fleet {
        deploy,
        client,
        agents,
        dir,
    }
}

impl Fleet {
    /// Registers `app` `version` whose app.txt says `version` (plus `extra` files).
    async fn artifact(&mut self, version: &str, extra: &[(&str, &str)]) -> String {
        let mut files = vec![("app.txt", version)];
        files.extend_from_slice(extra);
        let (path, digest) = tarball(self.dir.path(), &format!("app-{version}"), &files);
        register(&mut self.client, "app", version, &path, &digest).await;
        digest
    }

    /// The `agent.current` label of target `target`, as registered.
    async fn label(&mut self, target: &str) -> Option<String> {
        dev_targets(&mut self.client)
            .await
            .iter()
            .find(|t| t.name.ends_with(target))
            .and_then(|t| t.labels.get("agent.current").cloned())
    }

    /// Rolls deployment `name` back.
    async fn rollback(&mut self, name: &str, reason: &str) -> pb::Deployment {
        self.client
            .rollback_deployment(pb::RollbackDeploymentRequest {
                name: name.into(),
                reason: reason.into(),
                emergency: None,
            })
            .await
            .unwrap()
            .into_inner()
    }

    fn currents(&self) -> Vec<Option<String>> {
        self.agents.iter().map(Agent::current).collect()
    }

    /// Deploys `version` and waits for `state`.
    async fn roll(
        &mut self,
        version: &str,
        strategy: Option<Kind>,
        state: pb::DeploymentState,
    ) -> pb::Deployment {
        let d = deploy(&mut self.client, "app", version, ENV, strategy).await;
        until(&mut self.client, &d.name, version, is(state)).await
    }
}

/// The targets of `ENV`, as registered.
async fn dev_targets(c: &mut tests::Client) -> Vec<pb::Target> {
    c.list_targets(pb::ListTargetsRequest {
        parent: format!("environments/{ENV}"),
        page_size: 10,
        page_token: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .targets
}

/// A timestamp in milliseconds.
fn millis(t: prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

/// Waits until every target of `ENV` has heartbeated after `at_ms` (server time).
async fn heartbeats_after(c: &mut tests::Client, at_ms: i64) {
    let start = std::time::Instant::now();
    loop {
        let targets = dev_targets(c).await;
        if targets
            .iter()
            .all(|t| t.last_heartbeat_time.is_some_and(|h| millis(h) > at_ms))
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no heartbeats after {at_ms}: {targets:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn all(v: &str) -> Vec<Option<String>> {
    vec![Some(v.to_owned()); N]
}

/// `(sequence, target, state)` of every logged event of `deployment`, read up to the log
/// head.
async fn events(c: &mut tests::Client, deployment: &str) -> Vec<(u64, String, pb::PlacementState)> {
    let mut stream = tests::watch::open(c, Some(0), "", "").await.unwrap();
    let (logged, _) = tests::watch::until_heartbeat(&mut stream).await;
    logged
        .into_iter()
        .filter_map(|e| e.placement.map(|p| (e.sequence, p)))
        .filter(|(_, p)| p.deployment == deployment)
        .map(|(seq, p)| (seq, p.target.clone(), p.state()))
        .collect()
}

#[tokio::test]
async fn agents_place_all_at_once_rolling_and_canary_and_roll_back() {
    let mut f = fleet(&[]).await;
    f.artifact("1.0.0", &[]).await;
    f.artifact("2.0.0", &[]).await;
    f.artifact("3.0.0", &[]).await;

    // All at once: every agent places 1.0.0 on disk.
    f.roll("1.0.0", None, pb::DeploymentState::Succeeded).await;
    assert_eq!(f.currents(), all("1.0.0"));

    // Rolling, batches of 2: the second batch starts after the first has finished.
    let rolling = Kind::Rolling(pb::Rolling {
        batch_size: 2,
        batch_percent: 0.0,
        max_failures: 0,
    });
    let d2 = f
        .roll("2.0.0", Some(rolling), pb::DeploymentState::Succeeded)
        .await;
    assert_eq!(f.currents(), all("2.0.0"));
    let ev = events(&mut f.client, &d2.name).await;
    let seq = |target: &str, state: pb::PlacementState| {
        ev.iter()
            .find(|(_, t, s)| t.ends_with(target) && *s == state)
            .map(|e| e.0)
            .unwrap_or_else(|| panic!("no {state:?} event for {target}: {ev:?}"))
    };
    let first_done =
        seq("a-1", pb::PlacementState::Placed).max(seq("a-2", pb::PlacementState::Placed));
    let second_start =
        seq("a-3", pb::PlacementState::Placing).min(seq("a-4", pb::PlacementState::Placing));
    assert!(
        first_done < second_start,
        "batch 2 started (seq {second_start}) before batch 1 finished (seq {first_done}): {ev:?}"
    );

    // Canary: one target first; the rest only after ContinueDeployment.
    let canary = Kind::Canary(pb::Canary {
        canary_targets: 1,
        bake_time: None,
    });
    let d3 = deploy(&mut f.client, "app", "3.0.0", ENV, Some(canary)).await;
    let waiting = until(&mut f.client, &d3.name, "canary placed", |d| {
        d.placements
            .iter()
            .filter(|p| p.state() == pb::PlacementState::Placed)
            .count()
            == 1
    })
    .await;
    // Every agent heartbeats twice more after the canary was placed (each has had the
    // chance to take an order); the durable log then shows below that no other target
    // started before ContinueDeployment.
    let canary_at = waiting
        .placements
        .iter()
        .find(|p| p.state() == pb::PlacementState::Placed)
        .and_then(|p| p.update_time)
        .unwrap();
    heartbeats_after(&mut f.client, millis(canary_at) + 400).await;
    let still = until(&mut f.client, &d3.name, "still waiting", |_| true).await;
    assert_eq!(
        still.state(),
        pb::DeploymentState::InProgress,
        "{waiting:?}"
    );
    assert_eq!(placed(&still), 1, "{still:#?}");
    let mut w = tests::watch::open(&mut f.client, Some(0), "", "")
        .await
        .unwrap();
    let (_, before_continue) = tests::watch::until_heartbeat(&mut w).await;
    assert_eq!(
        f.currents()
            .iter()
            .filter(|c| c.as_deref() == Some("3.0.0"))
            .count(),
        1,
        "only the canary has 3.0.0"
    );
    f.client
        .continue_deployment(pb::ContinueDeploymentRequest {
            name: d3.name.clone(),
        })
        .await
        .unwrap();
    until(
        &mut f.client,
        &d3.name,
        "continued",
        is(pb::DeploymentState::Succeeded),
    )
    .await;
    assert_eq!(f.currents(), all("3.0.0"));
    let ev = events(&mut f.client, &d3.name).await;
    let canary_target = waiting
        .placements
        .iter()
        .find(|p| p.state() == pb::PlacementState::Placed)
        .map(|p| p.target.clone())
        .unwrap();
    let rest: Vec<_> = ev
        .iter()
        .filter(|(_, t, s)| *t != canary_target && *s != pb::PlacementState::Pending)
        .collect();
    assert_eq!(
        rest.iter()
            .filter(|(_, _, s)| *s == pb::PlacementState::Placed)
            .count(),
        N - 1,
        "{ev:?}"
    );
    assert!(
        rest.iter()
            .all(|(seq, _, _)| *seq > before_continue.head_sequence),
        "a target started before ContinueDeployment (head {}): {ev:?}",
        before_continue.head_sequence
    );

    // Rollback: the previous successful version goes back on every target.
    let back = f.rollback(&d3.name, "checkout errors").await;
    assert_eq!(back.rollback_of, d3.name);
    assert_eq!(back.artifact_version, "artifacts/app/versions/2.0.0");
    let retry = f.rollback(&d3.name, "checkout errors").await;
    assert_eq!(
        retry.name, back.name,
        "a retried rollback returns the first one"
    );
    until(
        &mut f.client,
        &back.name,
        "rolled back",
        is(pb::DeploymentState::Succeeded),
    )
    .await;
    assert_eq!(f.currents(), all("2.0.0"));
    drop(f.deploy);
}

#[tokio::test]
async fn a_wrong_digest_or_a_failing_health_check_leaves_current_unchanged() {
    let mut f = fleet(&["--health-check", "test ! -f broken"]).await;
    f.artifact("1.0.0", &[]).await;
    f.roll("1.0.0", None, pb::DeploymentState::Succeeded).await;

    // Registered with the digest of other content: every agent refuses it.
    let (path, _) = tarball(f.dir.path(), "real-2", &[("app.txt", "2.0.0")]);
    let (_, other) = tarball(f.dir.path(), "other", &[("app.txt", "tampered")]);
    register(&mut f.client, "app", "2.0.0", &path, &other).await;
    let failed = f.roll("2.0.0", None, pb::DeploymentState::Failed).await;
    assert!(
        failed
            .placements
            .iter()
            .any(|p| p.message.contains("digest")),
        "{failed:#?}"
    );
    assert_eq!(f.currents(), all("1.0.0"));

    // The new version fails its health check: switched back.
    f.artifact("3.0.0", &[("broken", "yes")]).await;
    let d = deploy(&mut f.client, "app", "3.0.0", ENV, None).await;
    // The deployment reads FAILED at the first failed placement; a target that had not
    // taken its order by then is never started (it stays PENDING). Wait until no placement
    // is running any more.
    let unhealthy = until(&mut f.client, &d.name, "placements settled", |d| {
        d.state() == pb::DeploymentState::Failed
            && d.placements.iter().all(|p| {
                matches!(
                    p.state(),
                    pb::PlacementState::Failed | pb::PlacementState::Pending
                )
            })
    })
    .await;
    let ran: Vec<_> = unhealthy
        .placements
        .iter()
        .filter(|p| p.state() == pb::PlacementState::Failed)
        .collect();
    assert!(!ran.is_empty(), "{unhealthy:#?}");
    assert!(
        ran.iter().all(|p| p.message.contains("health")),
        "{unhealthy:#?}"
    );
    assert_eq!(f.currents(), all("1.0.0"));
}

#[tokio::test]
async fn a_killed_agent_fails_its_placement_and_reports_its_disk_after_restart() {
    // The pre-switch hook holds each placement for a second: time to kill one agent.
    let mut f = fleet(&["--pre-switch", "sleep 1"]).await;
    f.artifact("1.0.0", &[]).await;
    f.roll("1.0.0", None, pb::DeploymentState::Succeeded).await;
    f.artifact("2.0.0", &[]).await;
    let d = deploy(&mut f.client, "app", "2.0.0", ENV, None).await;
    until(&mut f.client, &d.name, "a-4 placing", |d| {
        d.placements
            .iter()
            .any(|p| p.target.ends_with("a-4") && p.state() == pb::PlacementState::Placing)
    })
    .await;
    f.agents[3].kill().await;
    // The heartbeat timeout (1.5 s) marks its placement FAILED; all-at-once fails.
    let done = until(
        &mut f.client,
        &d.name,
        "agent lost",
        is(pb::DeploymentState::Failed),
    )
    .await;
    let lost = done
        .placements
        .iter()
        .find(|p| p.target.ends_with("a-4"))
        .unwrap();
    assert_eq!(lost.state(), pb::PlacementState::Failed);
    assert!(lost.message.contains("agent lost"), "{lost:?}");
    assert_eq!(f.agents[3].current().as_deref(), Some("1.0.0"));
    assert_eq!(
        f.label("a-4").await.as_deref(),
        Some("none"),
        "registered with an empty root"
    );

    // Restarted, it re-registers reporting what is on its disk: still 1.0.0.
    f.agents[3].restart();
    // It registered first with an empty root ("none"): the label changes only when the
    // restarted agent re-registers with what its disk holds.
    let start = std::time::Instant::now();
    while f.label("a-4").await.as_deref() != Some("app@1.0.0") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no re-registration"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The deploy -> release gate across three processes: a feature needing 100% coverage of
/// app >= 2.0.0 opens only after the 4th agent has placed it, and closes after a rollback.
#[tokio::test]
async fn the_release_gate_follows_real_agents() {
    let mut f = fleet(&[
        "--pre-switch",
        "while [ -f \"$AGENT_ROOT.hold\" ]; do sleep 0.05; done",
    ])
    .await;
    let r = Binary::spawn(
        "release-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            &f.dir.path().join("release.db").to_string_lossy(),
            "--deploy-svc",
            &format!("http://{}", f.deploy.addr),
        ],
    )
    .await;
    let mut rc = release::connect(r.addr).await;
    release::feature(&mut rc, "new-cart", "app", "2.0.0", 1.0).await;
    let rel = release::release(&mut rc, &["new-cart"], &[ENV]).await;
    release::rollout(&mut rc, &rel, ENV, 100.0).await;
    f.artifact("1.0.0", &[]).await;
    f.roll("1.0.0", None, pb::DeploymentState::Succeeded).await;
    f.artifact("2.0.0", &[]).await;

    // One target at a time: the feature stays hidden until the 4th is placed. The 4th
    // agent's pre-switch hook holds its placement while `agent-4.hold` exists, so the
    // 3-of-4 state lasts until the test has looked at it.
    let hold = f.dir.path().join("agent-4.hold");
    std::fs::write(&hold, "").unwrap();
    let one_by_one = Kind::Rolling(pb::Rolling {
        batch_size: 1,
        batch_percent: 0.0,
        max_failures: 0,
    });
    let d = deploy(&mut f.client, "app", "2.0.0", ENV, Some(one_by_one)).await;
    let three = until(&mut f.client, &d.name, "3 of 4 placed, a-4 held", |d| {
        placed(d) == N - 1
            && d.placements
                .iter()
                .any(|p| p.target.ends_with("a-4") && p.state() == pb::PlacementState::Placing)
    })
    .await;
    // release-svc has applied everything deploy-svc logged so far, and still hides it.
    caught_up(&mut f.client, &mut rc).await;
    let hidden = release::evaluate(&mut rc, "new-cart", ENV, "u1").await;
    assert!(!hidden.visible, "visible with 3 of {N} placed: {hidden:?}");
    assert_eq!(hidden.reason(), rpb::Reason::NotDeployed, "{hidden:?}");
    let still = until(&mut f.client, &d.name, "poll", |_| true).await;
    assert_eq!(placed(&still), N - 1, "{three:#?}");

    // Released: the 4th is placed and the gate opens.
    std::fs::remove_file(&hold).unwrap();
    until(
        &mut f.client,
        &d.name,
        "all placed",
        is(pb::DeploymentState::Succeeded),
    )
    .await;
    let open = release::eventually(
        &mut rc,
        "new-cart",
        ENV,
        "u1",
        rpb::Reason::Static,
        Duration::from_secs(20),
    )
    .await;
    assert!(open.visible, "{open:?}");

    // Rollback to 1.0.0 closes the gate again: an automatic withdrawal, recorded.
    let back = f.rollback(&d.name, "bad release").await;
    until(
        &mut f.client,
        &back.name,
        "rolled back",
        is(pb::DeploymentState::Succeeded),
    )
    .await;
    let closed = release::eventually(
        &mut rc,
        "new-cart",
        ENV,
        "u1",
        rpb::Reason::NotDeployed,
        Duration::from_secs(20),
    )
    .await;
    assert!(!closed.visible, "{closed:?}");
    assert_eq!(f.currents(), all("1.0.0"));
    // The rollback may move several targets before release-svc applies them: 3/4 or fewer.
    release::assert_withdrawn_once(&mut rc, "new-cart", ENV, "/4 targets at >= 2.0.0").await;
}

/// The placed placements of a deployment.
fn placed(d: &pb::Deployment) -> usize {
    d.placements
        .iter()
        .filter(|p| p.state() == pb::PlacementState::Placed)
        .count()
}

/// Waits until release-svc's consumer has applied deploy-svc's log up to its head now.
async fn caught_up(dc: &mut tests::Client, rc: &mut release::Client) {
    let mut w = tests::watch::open(dc, Some(0), "", "").await.unwrap();
    let (_, beat) = tests::watch::until_heartbeat(&mut w).await;
    let start = std::time::Instant::now();
    loop {
        let s = rc
            .get_consumer_status(rpb::GetConsumerStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.cursor >= beat.head_sequence {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "release-svc did not reach {}: {s:?}",
            beat.head_sequence
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
