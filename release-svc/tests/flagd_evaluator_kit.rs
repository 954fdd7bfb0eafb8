//! The flagd testbed's evaluator test kit (`tests/flagd-testbed/evaluator`) run against
//! release-svc itself: the kit's flag definitions are imported with ImportFlagd into a
//! release-svc served on port 0 (one per bucketing profile: `@fractional-v1`,
//! `@fractional-v3`; `@fractional-v2`, `@fractional-nested` and untagged rows with v2, the
//! default), and every Scenario (Outline rows expanded) is evaluated through release-svc's
//! flagd evaluation protocol (`flagd.evaluation.v2`): the values, reasons, error codes and
//! metadata checked are release-svc's own answers, nothing is re-implemented here.
//!
//! A row that cannot run (its flag is refused by ImportFlagd, or it uses a step this kit
//! does not know) is counted and named; the list is pinned below, so a row that stops
//! running fails the test. Prints per-file counts and fails if any row that runs fails.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use proto::flagd::evaluation::v2 as fpb;
use proto::flagd::evaluation::v2::service_client::ServiceClient;
use proto::release::v1 as rpb;
use proto::release::v1::release_service_client::ReleaseServiceClient;
use release_svc::config::CalendarSource;
use release_svc::domain::rules::Bucketing;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// The environment the kit's flags are imported into.
const ENV: &str = "kit";

fn testbed() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/flagd-testbed/evaluator");
    assert!(
        dir.exists(),
        "the flagd testbed is missing at {}",
        dir.display()
    );
    dir
}

/// release-svc on port 0 (no deploy-svc, no change calendar) with the kit's flags
/// imported: flagd's view of one flag set.
struct Kit {
    channel: Channel,
    /// The flags ImportFlagd refused, with its reasons.
    refused: BTreeMap<String, String>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Kit {
    async fn start(bucketing: Bucketing) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // No deploy-svc listens on port 9: the kit's flags carry no deployment gate.
        let mut config =
            release_svc::Config::new(dir.path().join("release.db"), "http://127.0.0.1:9");
        config.change_calendar = CalendarSource::None;
        config.flagd_default_environment = ENV.into();
        // The environment is fixed (no context attribute names one): STATIC is honest.
        config.flagd_environment_attribute = String::new();
        config.fractional_bucketing = bucketing;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(release_svc::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let document = std::fs::read_to_string(testbed().join("flags/testkit-flags.json")).unwrap();
        let imported = ReleaseServiceClient::new(channel.clone())
            .import_flagd(rpb::ImportFlagdRequest {
                environment: ENV.into(),
                document,
                skip_invalid: true,
            })
            .await
            .unwrap()
            .into_inner();
        let refused = imported
            .skipped
            .into_iter()
            .map(|s| (s.key, s.problems.join("; ")))
            .collect();
        Self {
            channel,
            refused,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }

    /// Resolves `key` as `kind` through the flagd v2 protocol.
    async fn resolve(&self, key: &str, kind: &str, ctx: &Map<String, Value>) -> Outcome {
        let mut c = ServiceClient::new(self.channel.clone());
        let context = Some(to_struct(ctx));
        let flag_key = key.to_owned();
        let answer = match kind {
            "Boolean" => c
                .resolve_boolean(fpb::ResolveBooleanRequest { flag_key, context })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.value.map(Value::Bool), r.reason, r.metadata)
                }),
            "String" => c
                .resolve_string(fpb::ResolveStringRequest { flag_key, context })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.value.map(Value::String), r.reason, r.metadata)
                }),
            "Integer" => c
                .resolve_int(fpb::ResolveIntRequest { flag_key, context })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.value.map(Value::from), r.reason, r.metadata)
                }),
            "Float" => c
                .resolve_float(fpb::ResolveFloatRequest { flag_key, context })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.value.map(|f| json!(f)), r.reason, r.metadata)
                }),
            "Object" => c
                .resolve_object(fpb::ResolveObjectRequest { flag_key, context })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (
                        r.value.map(|s| Value::Object(from_struct(s))),
                        r.reason,
                        r.metadata,
                    )
                }),
            other => panic!("unknown flag type {other}"),
        };
        match answer {
            Ok((value, reason, metadata)) => Outcome {
                // Unset: use the code default (a disabled flag, no default variant).
                value,
                reason,
                error: None,
                metadata: metadata.map(from_struct).unwrap_or_default(),
            },
            // flagd's providers read the error code from the front of the message.
            Err(status) => Outcome {
                value: None,
                reason: "ERROR".into(),
                error: Some(
                    status
                        .message()
                        .split_once(':')
                        .map(|(code, _)| code)
                        .filter(|c| c.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_'))
                        .unwrap_or("GENERAL")
                        .to_owned(),
                ),
                metadata: Map::new(),
            },
        }
    }
}

/// release-svc's answer for one evaluation.
#[derive(Debug)]
struct Outcome {
    /// `None`: the caller's code default.
    value: Option<Value>,
    reason: String,
    error: Option<String>,
    metadata: Map<String, Value>,
}

fn to_struct(m: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn to_value(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn from_struct(s: prost_types::Struct) -> Map<String, Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, from_value(v)))
        .collect()
}

fn from_value(v: prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(from_value).collect()),
        Some(Kind::StructValue(s)) => Value::Object(from_struct(s)),
    }
}

/// A step's text typed as the kit's `kind` says.
fn typed(kind: &str, raw: &str) -> Value {
    match kind {
        "Boolean" => Value::Bool(raw == "true"),
        "Integer" => raw
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or(Value::String(raw.into())),
        "Float" => raw
            .parse::<f64>()
            .map(|f| json!(f))
            .unwrap_or(Value::String(raw.into())),
        "Object" => serde_json::from_str(raw).unwrap_or(Value::Null),
        _ => Value::String(raw.into()),
    }
}

/// Whether `got` is the kit's expected text `want` for a `kind` value.
fn same(kind: &str, got: &Value, want: &str) -> bool {
    match kind {
        "Integer" | "Float" => got
            .as_f64()
            .zip(want.parse::<f64>().ok())
            .is_some_and(|(a, b)| a == b),
        // Over the protocol every number is a double: 100 and 100.0 are the same value.
        "Object" => serde_json::from_str::<Value>(want).is_ok_and(|w| json_eq(&w, got)),
        "Boolean" => got.as_bool().map(|b| b.to_string()).as_deref() == Some(want),
        _ => got.as_str() == Some(want),
    }
}

/// JSON equality with numbers compared as doubles.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// The double-quoted strings of a step, with backslash escapes (`\"`, `\\`) undone.
fn quoted(line: &str) -> Vec<String> {
    let (mut out, mut current) = (Vec::new(), String::new());
    let (mut inside, mut escaped) = (false, false);
    for c in line.chars() {
        if !inside {
            inside = c == '"';
        } else if escaped {
            current.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            out.push(std::mem::take(&mut current));
            inside = false;
        } else {
            current.push(c);
        }
    }
    out
}

/// One step and the data table under it, if any.
#[derive(Debug, Clone)]
struct Step {
    text: String,
    table: Vec<Vec<String>>,
}

/// Why a row did not run.
enum Verdict {
    Passed,
    Failed(String),
    CannotRun(String),
}

/// Runs one scenario's steps (placeholders already substituted) against `kit`.
async fn run(kit: &Kit, steps: &[Step]) -> Verdict {
    let (mut key, mut kind, mut fallback) = (String::new(), String::new(), Value::Null);
    let mut ctx = Map::new();
    let mut outcome: Option<Outcome> = None;
    for step in steps {
        let q = quoted(&step.text);
        let body = step.text.split_once(' ').map(|x| x.1).unwrap_or_default();
        if body.starts_with("an evaluator") {
        } else if body.contains("-flag with key") {
            kind = body
                .split('-')
                .next()
                .unwrap_or_default()
                .trim_start_matches("a ")
                .to_owned();
            key = q[0].clone();
            fallback = typed(&kind, &q[1]);
            if let Some(why) = kit.refused.get(&key) {
                return Verdict::CannotRun(format!(
                    "release-svc refuses the flag {key:?} at write time: {why}"
                ));
            }
        } else if body.starts_with("a context containing a key") {
            ctx.insert(q[0].clone(), typed(&q[1], &q[2]));
        } else if body.starts_with("a context containing a nested property") {
            ctx.insert(q[0].clone(), json!({ q[1].clone(): q[2].clone() }));
        } else if body.starts_with("a context containing a targeting key") {
            ctx.insert("targetingKey".into(), Value::String(q[0].clone()));
        } else if body.starts_with("the flag was evaluated") {
            outcome = Some(kit.resolve(&key, &kind, &ctx).await);
        } else if let Some(o) = &outcome {
            if let Err(e) = check(o, body, &q, &step.table, &kind, &fallback) {
                return match e {
                    Check::Failed(e) => Verdict::Failed(format!("{key}: {e}; answer {o:?}")),
                    Check::Unsupported(why) => Verdict::CannotRun(why.to_owned()),
                    Check::Unknown => {
                        Verdict::CannotRun(format!("the step {body:?} is not known to this kit"))
                    }
                };
            }
        } else {
            return Verdict::CannotRun(format!("the step {body:?} is not known to this kit"));
        }
    }
    Verdict::Passed
}

enum Check {
    Failed(String),
    /// A check of something release-svc does not model (a known difference).
    Unsupported(&'static str),
    Unknown,
}

/// Checks one `Then` step against release-svc's answer.
fn check(
    o: &Outcome,
    body: &str,
    q: &[String],
    table: &[Vec<String>],
    kind: &str,
    fallback: &Value,
) -> Result<(), Check> {
    if body.starts_with("the resolved details value should be") {
        let value = o.value.as_ref().unwrap_or(fallback);
        if !same(kind, value, &q[0]) {
            return Err(Check::Failed(format!("value {value} != {:?}", q[0])));
        }
    } else if body.starts_with("the reason should be") {
        if o.reason != q[0] {
            return Err(Check::Failed(format!("reason {} != {}", o.reason, q[0])));
        }
    } else if body.starts_with("the error-code should be") {
        if o.error.as_deref() != Some(q[0].as_str()) {
            return Err(Check::Failed(format!("error {:?} != {}", o.error, q[0])));
        }
    } else if body.starts_with("the resolved metadata is empty") {
        if !o.metadata.is_empty() {
            return Err(Check::Failed(format!("metadata {:?}", o.metadata)));
        }
    } else if body.starts_with("the resolved metadata should contain") {
        // | key | metadata_type | value |: release-svc keeps no flag metadata.
        if o.metadata.is_empty() && table.len() > 1 {
            return Err(Check::Unsupported(
                "release-svc does not model flag metadata (it answers none)",
            ));
        }
        for row in table.iter().skip(1) {
            let got = o.metadata.get(&row[0]).unwrap_or(&Value::Null);
            if !same(&row[1], got, &row[2]) {
                return Err(Check::Failed(format!(
                    "metadata {:?} = {got}, not {} {:?}",
                    row[0], row[1], row[2]
                )));
            }
        }
    } else {
        return Err(Check::Unknown);
    }
    Ok(())
}

/// A Scenario, or a Scenario Outline with its Examples rows.
struct Scenario {
    name: String,
    tags: Vec<String>,
    steps: Vec<Step>,
    /// (the Examples block's tags, its header, one row's cells).
    rows: Vec<(Vec<String>, Vec<String>, Vec<String>)>,
}

/// A small Gherkin reader: Background, Scenario / Scenario Outline, steps with their data
/// tables, and tagged Examples tables. A table belongs to the Examples block above it when
/// there is one, else to the step above it.
fn scenarios(text: &str) -> (Vec<Step>, Vec<Scenario>) {
    let (mut background, mut out): (Vec<Step>, Vec<Scenario>) = (Vec::new(), Vec::new());
    let (mut pending_tags, mut feature_tags) = (Vec::new(), Vec::new());
    let mut in_background = false;
    // Inside an Examples block: its tags and header (None until the header row is read).
    let mut examples: Option<(Vec<String>, Option<Vec<String>>)> = None;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('@') {
            pending_tags.extend(line.split_whitespace().map(str::to_owned));
        } else if line.starts_with("Feature:") {
            feature_tags = std::mem::take(&mut pending_tags);
        } else if line.starts_with("Background:") {
            in_background = true;
            examples = None;
        } else if line.starts_with("Scenario") {
            in_background = false;
            examples = None;
            let mut tags = feature_tags.clone();
            tags.extend(std::mem::take(&mut pending_tags));
            let name = line.split_once(':').map_or(line, |(_, n)| n.trim());
            out.push(Scenario {
                name: name.to_owned(),
                tags,
                steps: Vec::new(),
                rows: Vec::new(),
            });
        } else if line.starts_with("Examples") {
            examples = Some((std::mem::take(&mut pending_tags), None));
        } else if line.starts_with('|') {
            let cells: Vec<String> = line
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect();
            match (&mut examples, out.last_mut()) {
                (Some((_, header @ None)), _) => *header = Some(cells),
                (Some((tags, Some(header))), Some(s)) => {
                    s.rows.push((tags.clone(), header.clone(), cells));
                }
                (None, last) => {
                    let steps = match last {
                        Some(s) if !in_background => &mut s.steps,
                        _ => &mut background,
                    };
                    if let Some(step) = steps.last_mut() {
                        step.table.push(cells);
                    }
                }
                (Some(_), None) => panic!("an Examples table outside a scenario"),
            }
        } else {
            let step = Step {
                text: line.to_owned(),
                table: Vec::new(),
            };
            match out.last_mut() {
                Some(s) if !in_background => s.steps.push(step),
                _ => background.push(step),
            }
        }
    }
    (background, out)
}

/// The bucketing profile a row's tags ask for.
fn bucketing(tags: &[&String]) -> Bucketing {
    if tags.iter().any(|t| *t == "@fractional-v1") {
        Bucketing::V1
    } else if tags.iter().any(|t| *t == "@fractional-v3") {
        Bucketing::V3
    } else {
        Bucketing::V2
    }
}

/// How many rows cannot run, by file, and why; a row that starts or stops running changes
/// this list (the test's output names the rows).
const CANNOT_RUN: &[(&str, usize, &str)] = &[
    (
        "evaluator-refs.feature",
        1,
        "a $ref to a missing evaluator: release-svc refuses the flag at write time, so it \
         cannot answer PARSE_ERROR at evaluation",
    ),
    ("metadata.feature", 1, "flag metadata is not modelled"),
];

#[tokio::test]
async fn the_flagd_evaluator_kit_passes_on_release_svc() {
    let kits = [
        (Bucketing::V1, Kit::start(Bucketing::V1).await),
        (Bucketing::V2, Kit::start(Bucketing::V2).await),
        (Bucketing::V3, Kit::start(Bucketing::V3).await),
    ];
    let mut files: Vec<_> = std::fs::read_dir(testbed().join("gherkin"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let (mut failures, mut cannot_run, mut total_passed) = (Vec::new(), Vec::new(), 0);
    for file in files {
        let file_name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        let (background, scenarios) = scenarios(&text);
        let (mut passed, mut failed, mut skipped) = (0, 0, 0);
        for s in scenarios {
            let runs = if s.rows.is_empty() {
                vec![(Vec::new(), Vec::new(), Vec::new())]
            } else {
                s.rows.clone()
            };
            for (row_tags, header, cells) in runs {
                let tags: Vec<&String> = s.tags.iter().chain(row_tags.iter()).collect();
                let profile = bucketing(&tags);
                let kit = &kits.iter().find(|(b, _)| *b == profile).unwrap().1;
                let substitute = |text: &str| {
                    header
                        .iter()
                        .zip(&cells)
                        .fold(text.to_owned(), |t, (name, cell)| {
                            t.replace(&format!("<{name}>"), cell)
                        })
                };
                let steps: Vec<Step> = background
                    .iter()
                    .chain(&s.steps)
                    .map(|step| Step {
                        text: substitute(&step.text),
                        table: step.table.clone(),
                    })
                    .collect();
                let row = format!("{file_name}: {} {cells:?}", s.name);
                match run(kit, &steps).await {
                    Verdict::Passed => passed += 1,
                    Verdict::Failed(e) => {
                        failed += 1;
                        failures.push(format!("{row}: {e}"));
                    }
                    Verdict::CannotRun(why) => {
                        skipped += 1;
                        cannot_run.push((file_name.clone(), format!("{row}: {why}")));
                    }
                }
            }
        }
        total_passed += passed;
        eprintln!("{file_name:<28} {passed} passed, {failed} failed, {skipped} cannot run");
    }
    // Named in the test's output and in `scripts/test`'s report.
    for (_, why) in &cannot_run {
        report::skipped(&format!("flagd evaluator kit row {why}"));
    }
    for (_, kit) in kits {
        kit.shutdown().await;
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let mut by_file: BTreeMap<&str, usize> = BTreeMap::new();
    for (file, _) in &cannot_run {
        *by_file.entry(file.as_str()).or_default() += 1;
    }
    let pinned: BTreeMap<&str, usize> = CANNOT_RUN.iter().map(|(f, n, _)| (*f, *n)).collect();
    assert_eq!(
        by_file,
        pinned,
        "the rows that cannot run changed:\n{}",
        cannot_run
            .iter()
            .map(|(_, why)| why.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A ratchet: fewer rows passing means release-svc or the runner regressed.
    assert!(total_passed >= 138, "only {total_passed} rows ran");
}

/// The report to `scripts/test` (rows that cannot run), shared with the end-to-end tests.
#[path = "../../tests/src/report.rs"]
mod report;
