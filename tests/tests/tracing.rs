//! Traces end to end: the real deploy-svc, release-svc and deploy-agent binaries export
//! their spans over OTLP/gRPC to a TraceService receiver served by this test, which checks
//! how the spans relate: a caller's `traceparent` becomes the server span's parent;
//! release-svc's and the agent's calls to deploy-svc are children of their spans; a
//! placement event carries the trace context of the call that caused it, and release-svc's
//! automatic withdrawal span links to that call's span. release-svc exports with a 60 s
//! delay, so its spans arrive only because it flushes them when it stops.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use proto::deploy::v1 as pb;
use proto::release::v1 as rpb;
use tests::fleet::{self, register, tarball, until, Agent};
use tests::{environment, release, Binary};

const ENV: &str = "dev";
/// Exports every 100 ms (the SDK's `OTEL_BSP_SCHEDULE_DELAY`, in milliseconds).
const SOON: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "100");
/// Not before a minute: what arrives earlier was flushed at shutdown.
const LATE: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "60000");
const WAIT: Duration = Duration::from_secs(20);

/// One exported span and the `service.name` of the process that exported it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    span: Span,
}

impl Got {
    fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }
    fn span_id(&self) -> String {
        hex::encode(&self.span.span_id)
    }
    fn parent_id(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }
    fn attribute(&self, key: &str) -> Option<Value> {
        self.span
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone())
            .and_then(|v| v.value)
    }
}

/// The OTLP receiver: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Got>>>);

fn string(attributes: &[KeyValue], key: &str) -> String {
    attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut all = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .map(|r| string(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    all.push(Got {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    async fn serve() -> (Self, SocketAddr) {
        Self::serve_with(None).await
    }

    /// The receiver, over TLS (and mutual TLS with `client_ca`) when `tls` is given.
    async fn serve_with(tls: Option<tonic::transport::ServerTlsConfig>) -> (Self, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Self::default();
        let server = TraceServiceServer::new(receiver.clone());
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).unwrap();
        }
        tokio::spawn(async move {
            builder
                .add_service(server)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (receiver, addr)
    }

    fn all(&self) -> Vec<Got> {
        self.0.lock().unwrap().clone()
    }

    /// The first span `service` exported that is named `name` and satisfies `pred`, waiting
    /// for it at most [`WAIT`].
    async fn find(&self, service: &str, name: &str, pred: impl Fn(&Got) -> bool) -> Got {
        let start = Instant::now();
        loop {
            if let Some(g) = self
                .all()
                .into_iter()
                .find(|g| g.service == service && g.span.name == name && pred(g))
            {
                return g;
            }
            assert!(
                start.elapsed() < WAIT,
                "no span {name} from {service}; received: {:#?}",
                self.all()
                    .iter()
                    .map(|g| (
                        &g.service,
                        &g.span.name,
                        g.trace_id(),
                        g.span_id(),
                        g.parent_id()
                    ))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A caller's W3C trace context: a trace id and a span id of its own.
struct Caller {
    trace: String,
    span: String,
}

impl Caller {
    fn new(n: u8) -> Self {
        Self {
            trace: format!(
                "{:032x}",
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4700_u128 + u128::from(n)
            ),
            span: format!("{:016x}", 0x00f0_67aa_0ba9_0200_u64 + u64::from(n)),
        }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{}-{}-01", self.trace, self.span)
                .parse()
                .unwrap(),
        );
        req
    }

    /// Whether `g` is a direct child of this caller's span.
    fn parent_of(&self, g: &Got) -> bool {
        g.trace_id() == self.trace && g.parent_id() == self.span
    }
}

fn assert_server_span(g: &Got, service: &str, method: &str) {
    assert_eq!(g.span.kind(), SpanKind::Server, "{g:#?}");
    assert_eq!(g.span.name, format!("{service}/{method}"), "{g:#?}");
    assert_eq!(
        g.attribute("rpc.system"),
        Some(Value::StringValue("grpc".into()))
    );
    assert_eq!(
        g.attribute("rpc.service"),
        Some(Value::StringValue(service.into()))
    );
    assert_eq!(
        g.attribute("rpc.method"),
        Some(Value::StringValue(method.into()))
    );
    assert_eq!(
        g.attribute("rpc.grpc.status_code"),
        Some(Value::IntValue(0)),
        "{g:#?}"
    );
}

#[tokio::test]
async fn spans_follow_calls_across_the_services_and_withdrawals_link_to_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, otlp) = Receiver::serve().await;
    let endpoint = format!("http://{otlp}");
    let deploy_db = tests::deploy_database(dir.path()).await;
    let deploy = Binary::spawn_with_vars(
        "deploy-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            &deploy_db.to_string_lossy(),
            "--otlp-endpoint",
            &endpoint,
        ],
        &[SOON],
    )
    .await;
    let mut dc = tests::connect(deploy.addr).await;
    environment(&mut dc, ENV, None, false).await;
    let release_db = tests::test_database(dir.path(), "release").await;
    let mut rs = Binary::spawn_with_vars(
        "release-svc",
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            &release_db.to_string_lossy(),
            "--deploy-svc",
            &format!("http://{}", deploy.addr),
            "--otlp-endpoint",
            &endpoint,
        ],
        &[LATE],
    )
    .await;
    let mut rc = release::connect(rs.addr).await;
    release::feature(&mut rc, "new-cart", "app", "2.0.0", 1.0).await;
    let rel = release::release(&mut rc, &["new-cart"], &[ENV]).await;

    // 1. A caller's traceparent on release-svc's SetRollout, which reads deploy-svc's
    //    change calendar (GetEnvironment) before widening the release.
    let rollout = Caller::new(1);
    rc.set_rollout(rollout.request(rpb::SetRolloutRequest {
        name: rel.clone(),
        environment: ENV.into(),
        rollout_percent: 100.0,
    }))
    .await
    .unwrap();

    // 2. A real agent places app 2.0.0, deployed by a caller with its own trace.
    let (path, digest) = tarball(dir.path(), "app-2.0.0", &[("app.txt", "2.0.0")]);
    register(&mut dc, "app", "2.0.0", &path, &digest).await;
    let allowed = dir.path().to_string_lossy().into_owned();
    let _agent = Agent::start_with(
        &deploy,
        ENV,
        "a-1",
        dir.path().join("agent-1"),
        &["--otlp-endpoint", &endpoint],
        &[("DEPLOY_AGENT_ALLOW_FILE_DIR", &allowed), SOON],
    )
    .await;
    fleet::registered(&mut dc, ENV, 1).await;
    let deployer = Caller::new(2);
    let d = dc
        .create_deployment(deployer.request(pb::CreateDeploymentRequest {
            deployment: Some(pb::Deployment {
                artifact_version: "artifacts/app/versions/2.0.0".into(),
                environment: format!("environments/{ENV}"),
                ..Default::default()
            }),
            request_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    until(
        &mut dc,
        &d.name,
        "placed",
        fleet::is(pb::DeploymentState::Succeeded),
    )
    .await;
    visible_becomes(&mut rc, true).await;

    // 3. A caller removes the placement: the feature loses its carrier, and release-svc
    //    withdraws it automatically.
    let remover = Caller::new(3);
    dc.report_placement(remover.request(pb::ReportPlacementRequest {
        deployment: d.name.clone(),
        target: format!("environments/{ENV}/targets/a-1"),
        state: pb::PlacementState::Removed.into(),
        message: "decommissioned".into(),
    }))
    .await
    .unwrap();
    visible_becomes(&mut rc, false).await;

    // 4. A malformed traceparent is ignored: the call is served, its span is a root.
    let mut bad = tonic::Request::new(pb::GetArtifactRequest {
        name: "artifacts/app/versions/2.0.0".into(),
    });
    bad.metadata_mut()
        .insert("traceparent", "00-not-a-trace-01".parse().unwrap());
    dc.get_artifact(bad).await.unwrap();

    // deploy-svc's spans: children of the callers' spans.
    let created = receiver
        .find(
            "deploy-svc",
            "deploy.v1.DeployService/CreateDeployment",
            |g| deployer.parent_of(g),
        )
        .await;
    assert_server_span(&created, "deploy.v1.DeployService", "CreateDeployment");
    let removed = receiver
        .find(
            "deploy-svc",
            "deploy.v1.DeployService/ReportPlacement",
            |g| remover.parent_of(g),
        )
        .await;
    assert_server_span(&removed, "deploy.v1.DeployService", "ReportPlacement");
    let root = receiver
        .find("deploy-svc", "deploy.v1.DeployService/GetArtifact", |_| {
            true
        })
        .await;
    assert!(root.span.parent_span_id.is_empty(), "{root:#?}");
    assert_eq!(root.span.trace_id.len(), 16, "{root:#?}");
    assert_ne!(root.span.trace_id, vec![0; 16], "{root:#?}");

    // The agent's reports (PLACING, then PLACED) are children of its placement span.
    let place = receiver
        .find("deploy-agent", "place", |g| {
            g.attribute("deploy.deployment") == Some(Value::StringValue(d.name.clone()))
        })
        .await;
    let reports: Vec<Got> = receiver
        .all()
        .into_iter()
        .filter(|g| {
            g.service == "deploy-svc"
                && g.span.name == "deploy.v1.DeployService/ReportPlacement"
                && g.trace_id() == place.trace_id()
                && g.parent_id() == place.span_id()
        })
        .collect();
    assert_eq!(reports.len(), 2, "PLACING and PLACED: {reports:#?}");

    // Nothing from release-svc yet: it exports once a minute.
    assert!(
        !receiver.all().iter().any(|g| g.service == "release-svc"),
        "release-svc exported before its delay"
    );
    // SIGTERM: release-svc flushes its spans as it stops, and its WatchPlacements stream
    // ends, which ends deploy-svc's span of it.
    rs.signal("TERM");
    let status = tokio::time::timeout(WAIT, rs.child.wait())
        .await
        .expect("release-svc did not stop")
        .unwrap();
    assert!(status.success(), "{status:?}");

    // release-svc's SetRollout: a child of the caller; deploy-svc's GetEnvironment (the
    // calendar read): a child of release-svc's SetRollout.
    let set = receiver
        .find("release-svc", "release.v1.ReleaseService/SetRollout", |g| {
            rollout.parent_of(g)
        })
        .await;
    assert_server_span(&set, "release.v1.ReleaseService", "SetRollout");
    let calendar = receiver
        .find(
            "deploy-svc",
            "deploy.v1.DeployService/GetEnvironment",
            |g| g.parent_id() == set.span_id(),
        )
        .await;
    assert_eq!(calendar.trace_id(), rollout.trace, "{calendar:#?}");
    assert_server_span(&calendar, "deploy.v1.DeployService", "GetEnvironment");

    // deploy-svc's WatchPlacements span: a child of release-svc's span that opened it.
    let watch = receiver
        .find(
            "deploy-svc",
            "deploy.v1.DeployService/WatchPlacements",
            |_| true,
        )
        .await;
    let open = receiver
        .find("release-svc", "placement-feed.open", |g| {
            g.span_id() == watch.parent_id()
        })
        .await;
    assert_eq!(open.trace_id(), watch.trace_id());
    assert_eq!(open.span.kind(), SpanKind::Client, "{open:#?}");

    // The automatic withdrawal: its own trace, linked to the ReportPlacement that removed
    // the placement.
    let withdraw = receiver
        .find("release-svc", "auto.withdraw", |_| true)
        .await;
    assert!(withdraw.span.parent_span_id.is_empty(), "{withdraw:#?}");
    assert_eq!(
        withdraw.attribute("release.feature"),
        Some(Value::StringValue("new-cart".into()))
    );
    let links: Vec<(String, String)> = withdraw
        .span
        .links
        .iter()
        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
        .collect();
    assert_eq!(
        links,
        vec![(remover.trace.clone(), removed.span_id())],
        "{withdraw:#?}"
    );
    let withdrawals = receiver
        .all()
        .into_iter()
        .filter(|g| g.span.name == "auto.withdraw")
        .count();
    assert_eq!(withdrawals, 1);
}

/// Polls Evaluate (every 50 ms, at most [`WAIT`]) until `new-cart` in `dev` is `visible`.
async fn visible_becomes(rc: &mut release::Client, visible: bool) {
    let start = Instant::now();
    loop {
        let r = release::evaluate(rc, "new-cart", ENV, "u1").await;
        if r.visible == visible {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "visible never became {visible}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A deploy-svc on a fresh database in `dir` exporting to the collector on 127.0.0.1:`port`
/// over TLS (`https://localhost`), with `extra` flags; one environment created through it.
async fn deploy_exporting_to(dir: &std::path::Path, port: u16, extra: &[&str]) -> Binary {
    let db = tests::deploy_database(dir).await;
    let (db, endpoint) = (db.to_string_lossy(), format!("https://localhost:{port}"));
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--database",
        &db,
        "--otlp-endpoint",
        &endpoint,
    ];
    args.extend_from_slice(extra);
    let deploy = Binary::spawn_with_vars("deploy-svc", &args, &[SOON]).await;
    let mut dc = tests::connect(deploy.addr).await;
    environment(&mut dc, ENV, None, false).await;
    deploy
}

#[tokio::test]
async fn spans_reach_a_collector_over_mutual_tls() {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let dir = tempfile::tempdir().unwrap();
    let ca = tests::pki::Ca::new(dir.path(), "ca").unwrap();
    let server = ca.server(dir.path(), "collector").unwrap();
    let client = ca
        .client(
            dir.path(),
            "exporter",
            "spiffe://example.org/ns/ops/sa/deploy-svc",
        )
        .unwrap();
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let tls = || {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(read(&server.cert), read(&server.key)))
            .client_ca_root(Certificate::from_pem(read(&ca.pem)))
    };
    let (ca_pem, cert, key) = (
        ca.pem.to_string_lossy(),
        client.cert.to_string_lossy(),
        client.key.to_string_lossy(),
    );
    let (receiver, otlp) = Receiver::serve_with(Some(tls())).await;
    let _deploy = deploy_exporting_to(
        dir.path(),
        otlp.port(),
        &[
            "--otlp-ca",
            &ca_pem,
            "--otlp-cert",
            &cert,
            "--otlp-key",
            &key,
        ],
    )
    .await;
    let span = receiver
        .find(
            "deploy-svc",
            "deploy.v1.DeployService/CreateEnvironment",
            |_| true,
        )
        .await;
    assert_server_span(&span, "deploy.v1.DeployService", "CreateEnvironment");

    // Without the client certificate the collector refuses the exporter: nothing arrives,
    // and deploy-svc still answers (export failures never reach callers).
    let (refusing, otlp) = Receiver::serve_with(Some(tls())).await;
    let second = tempfile::tempdir().unwrap();
    let _anonymous = deploy_exporting_to(second.path(), otlp.port(), &["--otlp-ca", &ca_pem]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(refusing.all().is_empty(), "{:?}", refusing.all());
}
