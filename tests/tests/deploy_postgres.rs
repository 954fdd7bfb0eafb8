//! Several deploy-svc replicas (real binaries) on one PostgreSQL database: every replica
//! streams every committed placement event, written by any replica, in one order with no
//! skips, including events that commit late with a lower sequence; a replica killed during
//! writes loses nothing acknowledged. Runs when TEST_DATABASE_URL is set (`.ci/run` sets it).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use futures::future::join_all;
use proto::deploy::v1 as pb;
use tests::watch::{self, sequences};
use tests::{free_port, fresh_database, metric, Binary, Churn};
use tonic::Streaming;

fn server() -> Option<String> {
    tests::report::postgres_or_skip("deploy-svc replicas on PostgreSQL")
}

async fn replicas(url: &str, n: usize) -> Vec<Binary> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Binary::start(Path::new(url), &[]).await);
    }
    out
}

/// `(seq, target, state)` of every stored event after `after`.
async fn stored(db: &tokio_postgres::Client, after: u64) -> Vec<(u64, String, i64)> {
    db.query(
        "SELECT seq, target, state FROM placement_events WHERE seq > $1 ORDER BY seq",
        &[&i64::try_from(after).unwrap()],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            u64::try_from(r.get::<_, i64>(0)).unwrap(),
            r.get(1),
            r.get(2),
        )
    })
    .collect()
}

async fn client(url: &str) -> tokio_postgres::Client {
    let (c, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    c
}

/// An event row written straight into the log (target and message both `$1`).
const INSERT_EVENT: &str = "INSERT INTO placement_events (commit_ms, deployment, environment, target, artifact, version, digest, state, previous_state, message)
     VALUES (0, 1, 'dev', $1, 'api', '1.0.0', '', 2, 1, $1) RETURNING seq";

/// Opens a transaction that takes a sequence number and does not commit yet: the late
/// commit, made on purpose. Returns the client holding it and the sequence.
async fn held_event(url: &str, target: &str) -> (tokio_postgres::Client, u64) {
    let c = client(url).await;
    c.batch_execute("BEGIN").await.unwrap();
    let seq: i64 = c.query_one(INSERT_EVENT, &[&target]).await.unwrap().get(0);
    (c, u64::try_from(seq).unwrap())
}

/// Two replicas on a fresh database, a deployment with one target, and a watch from its
/// head on each replica.
struct Watched {
    db_url: String,
    bins: Vec<Binary>,
    client: tests::Client,
    churn: Churn,
    streams: Vec<Streaming<pb::WatchPlacementsResponse>>,
}

async fn watched(url: &str, tag: &str) -> Watched {
    let (_admin, db_url, _) = fresh_database(url, tag).await;
    let bins = replicas(&db_url, 2).await;
    let mut client = tests::connect(bins[0].addr).await;
    let churn = Churn::setup(&mut client, "dev", "api", 1).await;
    let mut streams = Vec::new();
    for b in &bins {
        let mut bc = tests::connect(b.addr).await;
        streams.push(
            watch::open(&mut bc, Some(churn.head), "", "")
                .await
                .unwrap(),
        );
    }
    Watched {
        db_url,
        bins,
        client,
        churn,
        streams,
    }
}

/// Asserts every replica is held below `held`: each stream's own position report (a
/// heartbeat, sent after the later sequences were acknowledged: the second one read, the
/// first may have been in flight) is still below it, and no event came before it.
async fn assert_held_at(streams: &mut [Streaming<pb::WatchPlacementsResponse>], held: u64) {
    for s in streams {
        let mut beats = 0;
        while beats < 2 {
            match watch::next(s, "heartbeat").await {
                Some(pb::watch_placements_response::Kind::Heartbeat(h)) => {
                    assert!(
                        h.sequence < held,
                        "a replica moved past sequence {held}, still held open: {h:?} (the late-commit bug)"
                    );
                    beats += 1;
                }
                other => panic!(
                    "a replica delivered past sequence {held}, still held open: {other:?} (the late-commit bug)"
                ),
            }
        }
    }
}

/// A transaction that drew a lower sequence and commits after higher ones is delivered
/// first, by every replica: they stop at the hole instead of skipping it; a rolled-back
/// sequence is skipped once nothing can fill it.
#[tokio::test]
async fn a_late_commit_is_delivered_in_order_and_a_rolled_back_sequence_is_skipped() {
    let Some(url) = server() else { return };
    let Watched {
        db_url,
        bins,
        client: mut c,
        churn,
        mut streams,
    } = watched(&url, "deploy_late").await;
    let (late, late_seq) = held_event(&db_url, "late").await;
    let (aborted, aborted_seq) = held_event(&db_url, "aborted").await;
    assert!(late_seq < aborted_seq);
    // Higher sequences commit through the service while the two lower ones are open (each
    // acknowledgement waits up to 2 s for the replica's stream, which is held at the hole).
    let acked = churn.run(&mut c, 0, 0, 2).await;
    assert!(acked[0] > aborted_seq);
    assert_held_at(&mut streams, late_seq).await;

    late.batch_execute("COMMIT").await.unwrap();
    aborted.batch_execute("ROLLBACK").await.unwrap();
    let mut expected = vec![late_seq];
    expected.extend(&acked);
    for s in &mut streams {
        let got = watch::events(s, expected.len()).await;
        assert_eq!(
            sequences(&got),
            expected,
            "the late commit first, the hole skipped"
        );
        assert_eq!(got[0].placement.as_ref().unwrap().message, "late");
    }
    for b in bins {
        b.kill().await;
    }
}

/// A snapshot taken while a placement's newest event is beyond the replica's settled head
/// (a lower sequence is still open) shows the placement as of its last settled event. Found
/// by the scale benchmark: that path read its rows by a column name it did not select, and
/// the stream failed with INTERNAL.
#[tokio::test]
async fn a_snapshot_shows_a_placement_changed_past_a_hole_as_it_was_before() {
    let Some(url) = server() else { return };
    let Watched {
        db_url,
        bins,
        client: mut c,
        churn,
        streams,
    } = watched(&url, "deploy_snapshot_hole").await;
    drop(streams);
    let (held, held_seq) = held_event(&db_url, "held").await;
    // Committed above the hole (its acknowledgement waits up to 2 s for the held stream).
    let acked = churn.run(&mut c, 0, 0, 1).await;
    assert!(acked[0] > held_seq);
    for b in &bins {
        let mut bc = tests::connect(b.addr).await;
        let mut s = watch::open(&mut bc, None, "", "").await.unwrap();
        let (placements, at) = watch::snapshot(&mut s).await;
        assert!(
            at < held_seq,
            "the snapshot stops at the hole: {at} < {held_seq}"
        );
        let p = placements
            .iter()
            .find(|p| p.target == churn.targets[0])
            .expect("the placement is in the snapshot");
        assert_eq!(
            p.state(),
            pb::PlacementState::Pending,
            "as of its settled event"
        );
        assert!(p.sequence <= at, "{p:?}");
    }
    held.batch_execute("ROLLBACK").await.unwrap();
    for b in bins {
        b.kill().await;
    }
}

/// The case that defeats a rule based on the snapshot's `xmax`: transaction A takes its id
/// first; B takes a later id but draws the lower sequence; A draws the next one and commits.
/// While B is open its id is above the newest completed one, so only the fresh-id rule
/// keeps the replicas from moving past B's sequence.
#[tokio::test]
async fn a_lower_sequence_held_by_a_younger_transaction_is_not_skipped() {
    let Some(url) = server() else { return };
    let Watched {
        db_url,
        bins,
        mut streams,
        ..
    } = watched(&url, "deploy_younger").await;
    let older = client(&db_url).await;
    older
        .batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .unwrap();
    let (younger, low) = held_event(&db_url, "younger").await;
    let high: i64 = older
        .query_one(INSERT_EVENT, &[&"older"])
        .await
        .unwrap()
        .get(0);
    older.batch_execute("COMMIT").await.unwrap();
    let high = u64::try_from(high).unwrap();
    assert_eq!(high, low + 1);
    assert_held_at(&mut streams, low).await;
    younger.batch_execute("COMMIT").await.unwrap();
    for s in &mut streams {
        assert_eq!(sequences(&watch::events(s, 2).await), [low, high]);
    }
    for b in bins {
        b.kill().await;
    }
}

/// Three replicas, eight writers spread over them (each on its own deployment, so their
/// transactions overlap and commit out of sequence order), a watcher on every replica:
/// each watcher receives exactly the stored log, in order, and every acknowledged report
/// is in it once.
#[tokio::test]
async fn three_replicas_stream_every_committed_event_from_eight_concurrent_writers() {
    let Some(url) = server() else { return };
    let (_admin, db_url, _) = fresh_database(&url, "deploy_replicas").await;
    let bins = replicas(&db_url, 3).await;
    let mut c = tests::connect(bins[0].addr).await;
    let mut churns = Vec::new();
    for w in 0..8 {
        churns.push(std::sync::Arc::new(
            Churn::setup(&mut c, &format!("env{w}"), "api", 1).await,
        ));
    }
    let head = churns.last().unwrap().head;
    const REPORTS: usize = 150;
    let mut watchers = Vec::new();
    for b in &bins {
        let mut bc = tests::connect(b.addr).await;
        let mut s = watch::open(&mut bc, Some(head), "", "").await.unwrap();
        watchers.push(tokio::spawn(async move {
            watch::events(&mut s, 8 * REPORTS).await
        }));
    }
    let writers = churns.iter().enumerate().map(|(w, churn)| {
        let (churn, addr) = (churn.clone(), bins[w % bins.len()].addr);
        tokio::spawn(async move {
            let mut c = tests::connect(addr).await;
            churn.run(&mut c, 0, 0, REPORTS).await
        })
    });
    let mut acked: Vec<u64> = tokio::time::timeout(Duration::from_secs(120), join_all(writers))
        .await
        .expect("the writers did not finish within 120 s")
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    acked.sort_unstable();

    let db = client(&db_url).await;
    let log = stored(&db, head).await;
    let log_seqs: Vec<u64> = log.iter().map(|e| e.0).collect();
    assert_eq!(
        log_seqs, acked,
        "every acknowledged report is one stored event"
    );
    for w in watchers {
        let got = w.await.unwrap();
        assert_eq!(
            sequences(&got),
            log_seqs,
            "a replica's stream differs from the log"
        );
        for (e, s) in got.iter().zip(&log) {
            let p = e.placement.as_ref().unwrap();
            assert_eq!(p.target.rsplit('/').next().unwrap(), s.1);
            assert_eq!(i64::from(p.state), s.2);
        }
    }
    for b in bins {
        b.kill().await;
    }
}

/// SIGKILL one replica while writers use it: every report it acknowledged is in the other
/// replica's stream, which never stopped; the killed replica restarts on the same database
/// and serves the same log.
#[tokio::test]
async fn a_killed_replica_loses_no_acknowledged_report() {
    let Some(url) = server() else { return };
    let (_admin, db_url, _) = fresh_database(&url, "deploy_kill").await;
    let mut bins = replicas(&db_url, 2).await;
    let mut c = tests::connect(bins[0].addr).await;
    let churn = std::sync::Arc::new(Churn::setup(&mut c, "dev", "api", 4).await);
    let mut other = tests::connect(bins[1].addr).await;
    let mut stream = watch::open(&mut other, Some(churn.head), "", "")
        .await
        .unwrap();

    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (churn, acked, addr) = (churn.clone(), acked.clone(), bins[0].addr);
            tokio::spawn(async move {
                let mut c = tests::connect(addr).await;
                for i in 0.. {
                    match tests::report(
                        &mut c,
                        &churn.deployment,
                        &churn.targets[t],
                        Churn::state(i),
                    )
                    .await
                    {
                        Ok(r) => acked.lock().unwrap().push(r.sequence),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    // Killed while the writers are busy: once they have had 50 reports acknowledged.
    let start = std::time::Instant::now();
    while acked.lock().unwrap().len() < 50 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "50 reports were not acknowledged within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bins.remove(0).kill().await;
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "only {} reports before the kill",
        acked.len()
    );

    let db = client(&db_url).await;
    let log: Vec<u64> = stored(&db, churn.head).await.iter().map(|e| e.0).collect();
    for seq in &acked {
        assert!(
            log.contains(seq),
            "acknowledged sequence {seq} is not stored"
        );
    }
    let got = watch::events(&mut stream, log.len()).await;
    assert_eq!(sequences(&got), log);

    let restarted = Binary::start(Path::new(&db_url), &[]).await;
    let mut rc = tests::connect(restarted.addr).await;
    let mut again = watch::open(&mut rc, Some(churn.head), "", "")
        .await
        .unwrap();
    assert_eq!(sequences(&watch::events(&mut again, log.len()).await), log);
    let mut snap = watch::open(&mut rc, None, "", "").await.unwrap();
    let (placements, at) = watch::snapshot(&mut snap).await;
    assert_eq!(at, *log.last().unwrap());
    assert_eq!(placements.len(), 4);
    restarted.kill().await;
    bins.remove(0).kill().await;
}

/// Reports arriving together on one replica are committed in groups (fewer transactions
/// than reports), each keeps its own outcome: the valid ones are acknowledged with their
/// own sequence, stored once, streamed in order and counted on their deployment; the ones
/// naming an unknown target or deployment, or a target of another environment, fail alone
/// with their own status while the rest of their group commits.
#[tokio::test]
async fn reports_arriving_together_commit_in_groups_and_a_failing_report_fails_alone() {
    let Some(url) = server() else { return };
    let (_admin, db_url, _) = fresh_database(&url, "deploy_groups").await;
    let metrics = free_port();
    let bin = Binary::start(Path::new(&db_url), &["--metrics-listen", &metrics]).await;
    let mut c = tests::connect(bin.addr).await;
    let dev = Churn::setup(&mut c, "dev", "api", 40).await;
    let stage = Churn::setup(&mut c, "stage", "web", 20).await;
    let mut w = watch::open(&mut c, Some(stage.head), "", "").await.unwrap();
    let before = (
        metric(&metrics, "deploy_svc_group_commit_writes_sum").await,
        metric(&metrics, "deploy_svc_group_commit_writes_count").await,
    );

    // (deployment, target, the status code expected: None for success)
    let mut calls: Vec<(String, String, Option<tonic::Code>)> = Vec::new();
    for (i, (churn, other)) in [(&dev, &stage), (&stage, &dev)].into_iter().enumerate() {
        for t in &churn.targets {
            calls.push((churn.deployment.clone(), t.clone(), None));
        }
        calls.push((
            churn.deployment.clone(),
            format!("{}ghost", churn.targets[0]),
            Some(tonic::Code::NotFound),
        ));
        calls.push((
            churn.deployment.clone(),
            other.targets[i].clone(),
            Some(tonic::Code::FailedPrecondition),
        ));
        calls.push((
            format!("deployments/{}", 9000 + i),
            churn.targets[1].clone(),
            Some(tonic::Code::NotFound),
        ));
    }
    let outcomes = join_all(calls.iter().map(|(d, t, _)| {
        let mut c = c.clone();
        async move { tests::report(&mut c, d, t, pb::PlacementState::Placing).await }
    }))
    .await;
    let mut acked = Vec::new();
    for ((d, t, expected), outcome) in calls.iter().zip(outcomes) {
        match (expected, outcome) {
            (None, Ok(r)) => {
                assert!(r.changed, "{d} {t}");
                acked.push(r.sequence);
            }
            (Some(code), Err(s)) => assert_eq!(s.code(), *code, "{d} {t}: {s:?}"),
            (expected, got) => panic!("{d} {t}: expected {expected:?}, got {got:?}"),
        }
    }
    acked.sort_unstable();
    acked.dedup();
    assert_eq!(acked.len(), 60, "each valid report has its own sequence");

    let db = client(&db_url).await;
    let log: Vec<u64> = stored(&db, stage.head).await.iter().map(|e| e.0).collect();
    assert_eq!(log, acked, "exactly the valid reports are stored");
    assert_eq!(sequences(&watch::events(&mut w, 60).await), acked);
    let placing: Vec<i64> = db
        .query("SELECT n_placing FROM deployments ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(placing, [40, 20], "each deployment counts its own reports");
    let audited: i64 = db
        .query_one(
            "SELECT count(*) FROM audit_records WHERE action = 'ReportPlacement'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        audited, 60,
        "one audit record per stored report, none for a failed one"
    );

    // Every report went through a group; fewer groups than reports.
    let (sum, count) = (
        metric(&metrics, "deploy_svc_group_commit_writes_sum").await - before.0,
        metric(&metrics, "deploy_svc_group_commit_writes_count").await - before.1,
    );
    assert_eq!(sum, calls.len() as f64, "every report was in one group");
    assert!(
        count < sum,
        "{sum} reports arriving together were committed in {count} groups"
    );
    bin.kill().await;
}

/// What a replica answered to a scenario's reports (each wave's answers sorted: which of
/// two concurrent reports of one placement comes first is a race) and what it stored.
#[derive(Debug, PartialEq)]
struct Applied {
    answers: Vec<Vec<String>>,
    rows: Vec<String>,
}

/// Runs the same waves of concurrent reports (each wave sent at once, so its reports are
/// committed in groups; no wave holds two reports whose order would change an answer) on a fresh database through a replica started with
/// `--pg-report-statements statements`; returns the answers and the stored rows, with
/// sequence numbers and times left out. The waves hold what a group applies together and
/// what sends it one report at a time: refusals of every kind, repeats (accepted without a
/// change), several targets of one deployment, two reports of one placement, a report
/// that lets a rolling deployment order its next batch, and reports that finish a
/// deployment and the refusal after it.
async fn applied_with(url: &str, statements: &str) -> Applied {
    use pb::PlacementState::{Failed, Placed, Placing};
    let (_admin, db_url, _) = fresh_database(url, &format!("deploy_applied_{statements}")).await;
    let metrics = free_port();
    let args = [
        "--pg-report-statements",
        statements,
        "--metrics-listen",
        &metrics,
    ];
    let bin = Binary::start(Path::new(&db_url), &args).await;
    let mut c = tests::connect(bin.addr).await;
    let dev = Churn::setup(&mut c, "dev", "api", 6).await;
    tests::environment(&mut c, "stage", None, false).await;
    let stage = tests::targets(&mut c, "stage", "s", 4).await;
    let rolling = pb::strategy::Kind::Rolling(pb::Rolling {
        batch_size: 2,
        batch_percent: 0.0,
        max_failures: 1,
    });
    let rolled = tests::fleet::deploy(&mut c, "api", "1.0.0", "stage", Some(rolling)).await;
    let (a, t, r) = (&dev.deployment, &dev.targets, &rolled.name);
    let ghost = format!("{}-ghost", t[0]);
    let waves: Vec<Vec<(&str, &str, pb::PlacementState)>> = vec![
        // Each deployment's first report (it moves the deployment: which report does is
        // in its audit record).
        vec![(a, &t[0], Placing), (r, &stage[0], Placing)],
        // Every other dev target starts; refusals: an unknown target, a target of another
        // environment, an unknown deployment.
        t[1..]
            .iter()
            .map(|t| (a.as_str(), t.as_str(), Placing))
            .chain([
                (a.as_str(), ghost.as_str(), Placing),
                (a.as_str(), stage[0].as_str(), Placing),
                ("deployments/9999", t[0].as_str(), Placing),
                (r.as_str(), stage[1].as_str(), Placing),
            ])
            .collect(),
        // Repeats, two reports of one placement, and the rolling deployment's first batch
        // finishing (its next batch is ordered).
        vec![
            (a, &t[0], Placing),
            (a, &t[1], Placed),
            (a, &t[1], Placed),
            (a, &t[2], Placed),
            (r, &stage[0], Placed),
            (r, &stage[1], Placed),
        ],
        vec![
            (a, &t[0], Placed),
            (a, &t[4], Placed),
            (r, &stage[2], Placing),
            (r, &stage[3], Placing),
        ],
        // A failure alone (whether it comes before or after another report of the
        // deployment decides that report's fate): the deployment fails.
        vec![(a, &t[3], Failed)],
        // After the end: refused; the rolling deployment goes on.
        vec![
            (a, &t[5], Placed),
            (a, &t[0], Placing),
            (r, &stage[2], Placed),
        ],
    ];
    let mut answers = Vec::new();
    for wave in &waves {
        let replies = join_all(wave.iter().map(|&(d, t, state)| {
            let mut c = c.clone();
            async move { tests::report(&mut c, d, t, state).await }
        }))
        .await;
        let mut wave_answers: Vec<String> = wave
            .iter()
            .zip(replies)
            .map(|((d, t, state), reply)| match reply {
                Ok(r) => {
                    let p = r.placement.clone().unwrap_or_default();
                    format!(
                        "{d} {t} {state:?}: changed {} {:?} {:?}",
                        r.changed,
                        p.state(),
                        r.deployment_state()
                    )
                }
                Err(s) => format!("{d} {t} {state:?}: {:?}", s.code()),
            })
            .collect();
        wave_answers.sort();
        answers.push(wave_answers);
    }
    let db = client(&db_url).await;
    let mut rows = Vec::new();
    for query in [
        "SELECT deployment::TEXT || ' ' || target || ' ' || state || ' ' || message || ' ' || ordered FROM placements ORDER BY deployment, target",
        "SELECT id::TEXT || ' ' || state || ' ' || n_pending || ' ' || n_placing || ' ' || n_placed || ' ' || n_failed || ' ' || n_removed FROM deployments ORDER BY id",
        // Per placement in sequence order.
        "SELECT deployment::TEXT || ' ' || target || ' ' || previous_state || ' -> ' || state || ' ' || digest FROM placement_events ORDER BY deployment, target, seq",
        // Each report's audit record, its sequence that of its event.
        "SELECT 'audit ' || (e.seq IS NOT NULL) || ' ' || a.principal || ' ' || a.resource || ' ' || a.before_summary || ' ' || regexp_replace(a.after_summary, '\"sequence\":[0-9]+', '\"sequence\":_') || ' ' || (e.seq IS NOT NULL)
         FROM audit_records a LEFT JOIN placement_events e ON e.seq = (a.after_summary::jsonb->>'sequence')::BIGINT AND a.resource = 'deployments/' || e.deployment AND a.after_summary::jsonb->>'target' LIKE '%/' || e.target
         WHERE a.action = 'ReportPlacement' ORDER BY 1",
        "SELECT environment || '/' || id || ' ' || (heartbeat_ms > 0) FROM targets ORDER BY environment, id",
    ] {
        for row in db.query(query, &[]).await.unwrap() {
            rows.push(row.get::<_, String>(0));
        }
    }
    let groups = |applied: &str| {
        let series = format!("deploy_svc_report_groups_total{{applied=\"{applied}\"}}");
        let metrics = metrics.clone();
        async move { metric(&metrics, &series).await }
    };
    let (together, one_by_one) = (groups("together").await, groups("one_by_one").await);
    if statements == "group" {
        assert!(together > 0.0, "no group was applied together");
        assert!(
            one_by_one > 0.0,
            "no group was applied one report at a time"
        );
    } else {
        assert_eq!(
            together, 0.0,
            "--pg-report-statements each applied a group together"
        );
    }
    bin.kill().await;
    Applied { answers, rows }
}

/// A group's reports written together (one read and one write statement for the group)
/// answer and store exactly what the same reports written one at a time do.
#[tokio::test]
async fn reports_applied_together_answer_and_store_what_reports_applied_each_do() {
    let Some(url) = server() else { return };
    let together = applied_with(&url, "group").await;
    let each = applied_with(&url, "each").await;
    assert!(
        together.rows.iter().all(|r| !r.starts_with("audit false")),
        "an audit record names a sequence no event of its placement has: {:#?}",
        together.rows
    );
    assert_eq!(together, each);
}
