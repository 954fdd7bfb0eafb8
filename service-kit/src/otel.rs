//! Distributed tracing with OpenTelemetry: spans exported over OTLP/gRPC, the W3C trace
//! context (`traceparent`) read from callers and sent to deploy-svc.
//!
//! Off unless `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) is set. Then every
//! program installs a batch exporter to that collector with the resource attribute
//! `service.name` (the program's name, or `--otel-service-name` / `OTEL_SERVICE_NAME`), and:
//!
//! - the [`access`](crate::access) layer opens one server span per call (see
//!   [`server_span`]), a child of the caller's `traceparent` when it sends a valid one;
//! - outbound calls (the [`client`](crate::client) channels) carry the `traceparent` of the
//!   span they are made in ([`inject`]);
//! - the programs open their own spans with the target [`TARGET`]: only spans of that target
//!   are exported (never log events, so nothing a log line holds reaches the collector), and
//!   log lines never show them.
//!
//! Everything here is a no-op while tracing is off ([`enabled`] is one atomic load): no span
//! is created and nothing is allocated on the call path.
//!
//! The caller's `traceparent` is used for one thing, the parent of the server span; a
//! malformed one is ignored. Every span is recorded whatever the caller's sampled flag says,
//! unless `OTEL_TRACES_SAMPLER` picks a sampler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The tracing target of every exported span. Spans of other targets stay local.
pub const TARGET: &str = "otel";

/// The W3C trace context header (and gRPC metadata key).
pub const TRACEPARENT: &str = "traceparent";

static ON: AtomicBool = AtomicBool::new(false);

/// Trace export options, flattened into each program's command line (with the log options).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OtelArgs {
    /// Export traces over OTLP/gRPC to this collector, such as `http://127.0.0.1:4317`, or
    /// `https://collector:4317` with `--otlp-ca` (off unless set).
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// PEM CA bundle the collector's certificate must chain to (an `https://` endpoint).
    #[arg(long = "otlp-ca", env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    pub otlp_ca: Option<std::path::PathBuf>,
    /// PEM client certificate presented to the collector (mutual TLS).
    #[arg(
        long = "otlp-cert",
        env = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        requires = "otlp_key"
    )]
    pub otlp_cert: Option<std::path::PathBuf>,
    /// PEM key of `--otlp-cert`.
    #[arg(
        long = "otlp-key",
        env = "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        requires = "otlp_cert"
    )]
    pub otlp_key: Option<std::path::PathBuf>,
    /// The `service.name` of the exported spans (default: the program's name).
    #[arg(long = "otel-service-name", env = "OTEL_SERVICE_NAME")]
    pub service_name: Option<String>,
}

/// Whether spans are exported (`--otlp-endpoint` is set).
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The exporter of a program; flush it with [`Tracing::shutdown`] before exiting.
#[derive(Debug, Default)]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Exports the spans still queued and stops the exporter (at most a few seconds).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The batch exporter flushes on its own thread; do not block a runtime worker.
        let done = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(std::time::Duration::from_secs(5))
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "traces not flushed");
        }
    }
}

/// Builds the exporter and the tracer (inside a Tokio runtime: the gRPC channel needs one).
pub(crate) fn tracer(
    args: &OtelArgs,
    program: &'static str,
) -> anyhow::Result<Option<(Tracing, opentelemetry_sdk::trace::Tracer)>> {
    let Some(endpoint) = args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    anyhow::ensure!(
        endpoint.starts_with("http://") || endpoint.starts_with("https://"),
        "--otlp-endpoint must be the http:// or https:// address of an OTLP/gRPC collector"
    );
    // The same client set-up as every other outbound channel: TLS with the CA bundle (an
    // https:// endpoint needs one), a client certificate for mutual TLS, keepalives.
    let security = crate::client::ClientSecurity {
        ca: args.otlp_ca.clone(),
        cert: args.otlp_cert.clone(),
        key: args.otlp_key.clone(),
        token_file: None,
    };
    let channel = security
        .endpoint(endpoint)
        .map_err(|e| anyhow::anyhow!("--otlp-endpoint: {e:#}"))?
        .connect_lazy();
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_channel(channel)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot set up the OTLP exporter: {e}"))?;
    let name = args
        .service_name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| program.to_owned());
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(name)
                .build(),
        );
    // Every span is recorded unless the operator picks a sampler (the SDK reads
    // OTEL_TRACES_SAMPLER): a caller's sampled flag alone never decides.
    if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
        provider = provider.with_sampler(Sampler::AlwaysOn);
    }
    let provider = provider.build();
    let tracer = provider.tracer(program);
    ON.store(true, Ordering::Relaxed);
    Ok(Some((
        Tracing {
            provider: Some(provider),
        },
        tracer,
    )))
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// The server span of one call: named after the method (`deploy.v1.DeployService/
/// ReportPlacement`, or `unknown` outside the authorization table), kind server, with
/// `rpc.system`, `rpc.service`, `rpc.method` and, once it ends, `rpc.grpc.status_code`
/// ([`record_status`]). Its parent is the caller's `traceparent`, when valid. A disabled
/// span while tracing is off.
pub fn server_span(
    name: &'static str,
    service: &'static str,
    method: &'static str,
    headers: &http::HeaderMap,
) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "rpc.server",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    if headers.contains_key(TRACEPARENT) {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        if parent.span().span_context().is_remote() {
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// Records the status code a call ended with on its server span; server errors
/// (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) also set
/// the span's status to error.
pub fn record_status(span: &Span, code: i32) {
    if span.is_none() {
        return;
    }
    span.record("rpc.grpc.status_code", i64::from(code));
    if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
        span.record("otel.status_code", "error");
    }
}

/// Adds the `traceparent` of the current span to an outbound call's metadata (nothing
/// while tracing is off or outside a span).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if !enabled() {
        return;
    }
    let cx = Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut Metadata(metadata));
    }
}

/// The W3C `traceparent` of the current span (`00-<trace id>-<span id>-<flags>`), `None`
/// while tracing is off or outside a span: what a placement event records of the call that
/// caused it.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The span context a `traceparent` names; `None` when it is malformed.
pub fn parse_traceparent(traceparent: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Links `span` to the span a `traceparent` names (a malformed one is ignored): how a span
/// names the call that caused it when it is not that call's child.
pub fn link(span: &Span, traceparent: &str) {
    if span.is_none() {
        return;
    }
    if let Some(sc) = parse_traceparent(traceparent) {
        span.add_link(sc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_parses_and_garbage_does_not() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let sc = parse_traceparent(tp).expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn an_endpoint_needs_a_scheme_and_https_needs_a_ca() {
        let args = |e: Option<&str>| OtelArgs {
            otlp_endpoint: e.map(str::to_owned),
            ..OtelArgs::default()
        };
        assert!(matches!(tracer(&args(None), "p"), Ok(None)));
        assert!(matches!(tracer(&args(Some("")), "p"), Ok(None)));
        for bad in ["https://collector:4317", "collector:4317"] {
            match tracer(&args(Some(bad)), "p") {
                Err(e) => assert!(e.to_string().contains("--otlp-endpoint"), "{e}"),
                Ok(_) => panic!("{bad} accepted"),
            }
        }
        assert!(!enabled());
    }

    #[test]
    fn off_means_no_span_and_no_header() {
        // Tracing is never switched on in this test binary.
        let span = server_span("a/b", "a", "b", &http::HeaderMap::new());
        assert!(span.is_none());
        let mut md = tonic::metadata::MetadataMap::new();
        inject(&mut md);
        assert!(md.is_empty());
        assert!(current_traceparent().is_none());
    }
}
