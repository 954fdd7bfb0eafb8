//! flagd's evaluation protocol (`flagd.evaluation.v2.Service`, and the deprecated
//! `flagd.evaluation.v1.Service` older providers speak) over the same evaluator as
//! `release.v1.ReleaseService/Evaluate`, so stock OpenFeature flagd providers consume
//! release decisions.
//!
//! Mapping: each feature is a flag. The environment comes from the `Flagd-Selector` header
//! (`flagSetId=<env>`, fixed per provider; or a flagd source selector, `source=<s>` or a
//! bare `<s>`, through the configured source aliases), else the context attribute
//! `environment` (configurable, or off), else the configured default. Configured static
//! context values (flagd's `--context-value`) override the request's. `targetingKey` is
//! the user.
//!
//! Reasons: STATIC only for answers that are context-free AND whose environment is fixed
//! for the caller (by the selector header, or because no context attribute may name one):
//! providers cache STATIC results by flag key alone, so an answer whose environment came
//! from a context (or could come from a later one) is TARGETING_MATCH. TARGETING_MATCH also
//! for rule, list, percentage and release/deployment gate results; DEFAULT for the default
//! variant after rules (value and variant unset for a flag without a default variant);
//! DISABLED with value and variant unset ("use the code default"). Errors use flagd's
//! codes: NOT_FOUND, INVALID_ARGUMENT for a type mismatch.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde_json::{Map, Value};
use service_kit::streams::StreamCap;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::convert::{from_json, struct_to_json};
use crate::domain::evaluate::{Context, Decision, Reason};
use crate::engine::{Change, Engine};

/// How flagd-protocol requests map onto release-svc.
#[derive(Debug, Clone, Default)]
pub struct FlagdOptions {
    /// The environment when neither the selector nor the context names one.
    pub default_environment: String,
    /// Time between keep_alive events on an idle EventStream.
    pub keep_alive: Duration,
    /// The context attribute that may name the environment; empty: none may, so the
    /// environment is fixed by the selector or the default (and context-free answers are
    /// STATIC even without a selector).
    pub environment_attribute: String,
    /// Source selectors (`source=<s>` or a bare `<s>`, as flagd providers configured for
    /// file or sync sources send them) mapped to environments.
    pub source_aliases: HashMap<String, String>,
    /// Context values set by the service (flagd's `--context-value`); they override the
    /// request's values of the same key, so a caller cannot forge them.
    pub static_context: Map<String, Value>,
    /// Largest ResolveAll response in bytes (0: 4 MiB); above it the call answers
    /// RESOURCE_EXHAUSTED.
    pub max_response_bytes: usize,
}

/// The flagd evaluation services (v1 and v2 share everything but message shapes).
#[derive(Clone)]
pub struct Flagd {
    engine: Arc<Engine>,
    options: Arc<FlagdOptions>,
    streams: CancellationToken,
    /// Open EventStreams (shared with WatchVisibility).
    watchers: StreamCap,
}

impl Flagd {
    /// A service over `engine`.
    pub fn new(engine: Arc<Engine>, options: FlagdOptions, streams: CancellationToken) -> Self {
        Self {
            engine,
            options: Arc::new(options),
            streams,
            watchers: StreamCap::new(super::DEFAULT_MAX_WATCHERS, "change streams"),
        }
    }

    /// Counts EventStreams against `cap`.
    pub fn with_stream_cap(mut self, cap: StreamCap) -> Self {
        self.watchers = cap;
        self
    }

    /// The engine the decisions come from.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The cap on change streams this service counts against.
    pub fn watchers(&self) -> &StreamCap {
        &self.watchers
    }

    /// Cancelled when streams must end (shutdown).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.streams.clone()
    }

    /// The service's static context values (flagd's `--context-value`).
    pub fn static_context(&self) -> &Map<String, Value> {
        &self.options.static_context
    }

    /// The largest response built from many flags, in bytes.
    pub fn max_response_bytes(&self) -> usize {
        match self.options.max_response_bytes {
            0 => 4 * 1024 * 1024,
            n => n,
        }
    }

    /// The environment a `Flagd-Selector` header names: `flagSetId=<env>`, or a source
    /// (`source=<s>`, or a bare `<s>`) through the aliases, else the source itself.
    fn selected_environment(&self, selector: &str) -> Option<String> {
        let mut source = None;
        for part in selector.split([',', ' ', ';']).map(str::trim) {
            if let Some(env) = part.strip_prefix("flagSetId=") {
                return Some(env.to_owned());
            }
            if let Some(s) = part.strip_prefix("source=") {
                source = Some(s);
            } else if !part.is_empty() && !part.contains('=') {
                source = source.or(Some(part));
            }
        }
        let source = source?;
        Some(
            self.options
                .source_aliases
                .get(source)
                .cloned()
                .unwrap_or_else(|| source.to_owned()),
        )
    }

    /// The evaluation context of a request, and whether the selector header fixed its
    /// environment.
    /// The request's context is held to the limits of `release.v1` contexts
    /// ([`crate::domain::values`]): INVALID_ARGUMENT naming `context` when over.
    fn context(
        &self,
        metadata: &MetadataMap,
        extensions: &tonic::Extensions,
        context: Option<prost_types::Struct>,
    ) -> Result<(Context, bool), Status> {
        let attributes = context.as_ref().map(struct_to_json).unwrap_or_default();
        let selector = metadata.get("flagd-selector").and_then(|v| v.to_str().ok());
        self.context_of(
            selector,
            extensions.get::<service_kit::auth::Caller>(),
            attributes,
        )
    }

    /// The evaluation context of `attributes` with the `Flagd-Selector` header's value (as
    /// in [`Flagd::context`]), for faces other than gRPC (OFREP); `caller` must be allowed
    /// to evaluate in the chosen environment.
    pub fn context_of(
        &self,
        selector: Option<&str>,
        caller: Option<&service_kit::auth::Caller>,
        mut attributes: Map<String, Value>,
    ) -> Result<(Context, bool), Status> {
        crate::domain::values::check_context(&attributes)
            .map_err(|d| Status::from(crate::domain::Error::invalid("context", d)))?;
        for (k, v) in &self.options.static_context {
            attributes.insert(k.clone(), v.clone());
        }
        let targeting_key = match attributes.remove("targetingKey") {
            Some(Value::String(k)) => k,
            _ => String::new(),
        };
        if targeting_key.len() > super::convert::MAX_TARGETING_KEY {
            return Err(crate::domain::Error::invalid(
                "context.targetingKey",
                format!(
                    "must be at most {} bytes",
                    super::convert::MAX_TARGETING_KEY
                ),
            )
            .into());
        }
        let from_header = selector.and_then(|s| self.selected_environment(s));
        let attribute = self.options.environment_attribute.as_str();
        let from_context = match attributes.get(attribute) {
            Some(Value::String(e)) if !attribute.is_empty() => Some(e.clone()),
            _ => None,
        };
        let fixed = from_header.is_some() || attribute.is_empty();
        let ctx = Context {
            environment: from_header
                .or(from_context)
                .unwrap_or_else(|| self.options.default_environment.clone()),
            targeting_key,
            attributes,
        };
        // The caller evaluates only in the environments its binding names.
        if let Some(caller) = caller {
            caller.require_environment(&ctx.environment)?;
        }
        Ok((ctx, fixed))
    }

    /// Decides `key`. The v1 protocol cannot say "use the code default" (its fields are not
    /// optional), so there, as flagd's v1 did, a disabled flag or one without a default
    /// variant answers NOT_FOUND and the provider falls back to the code default.
    fn decide(
        &self,
        metadata: &MetadataMap,
        extensions: &tonic::Extensions,
        key: &str,
        context: Option<prost_types::Struct>,
        v1: bool,
    ) -> Result<Decision, Status> {
        let (ctx, fixed) = self.context(metadata, extensions, context)?;
        let d =
            self.engine.snapshot().evaluate(key, &ctx).ok_or_else(|| {
                Status::not_found(format!("FLAG_NOT_FOUND: flag {key:?} not found"))
            })?;
        if v1 && code_default(&d) {
            return Err(Status::not_found(if d.reason == Reason::Disabled {
                format!("FLAG_DISABLED: flag {key:?} is disabled")
            } else {
                format!("FLAG_NOT_FOUND: flag {key:?} has no default variant")
            }));
        }
        Ok(cacheable(d, fixed))
    }
}

/// A STATIC decision stays STATIC only when the environment was fixed for the caller (by
/// the selector, or because no context attribute can name one).
pub(crate) fn cacheable(mut d: Decision, environment_fixed: bool) -> Decision {
    if d.reason == Reason::Static && !environment_fixed {
        d.reason = Reason::TargetingMatch;
    }
    d
}

/// A flag's metadata as a protobuf Struct (`None` when it has none).
pub(crate) fn flag_metadata(
    snapshot: &crate::domain::evaluate::Snapshot,
    key: &str,
) -> Option<prost_types::Struct> {
    let entry = snapshot.features.get(key)?;
    let metadata = &entry.feature.metadata;
    (!metadata.is_empty()).then(|| prost_types::Struct {
        fields: metadata
            .iter()
            .map(|(k, v)| (k.clone(), from_json(v)))
            .collect(),
    })
}

/// flagd's reason string for a decision.
pub fn reason(r: Reason) -> &'static str {
    match r {
        Reason::Static => "STATIC",
        Reason::Default => "DEFAULT",
        Reason::Disabled => "DISABLED",
        Reason::NotReleased | Reason::NotDeployed | Reason::TargetingMatch | Reason::Split => {
            "TARGETING_MATCH"
        }
    }
}

fn mismatch(key: &str, want: &str, got: &Value) -> Status {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    Status::invalid_argument(format!("TYPE_MISMATCH: flag {key:?} is {kind}, not {want}"))
}

/// Whether a decision means "use the code default": a disabled feature, or a feature
/// without a default variant when no rule picked one.
pub(crate) fn code_default(d: &Decision) -> bool {
    d.reason == Reason::Disabled || d.variant.is_empty()
}

/// The typed value of a decision: `Ok(None)` means "use the code default".
fn typed<T>(
    d: &Decision,
    key: &str,
    want: &str,
    pick: impl Fn(&Value) -> Option<T>,
) -> Result<Option<T>, Status> {
    if code_default(d) {
        return Ok(None);
    }
    pick(&d.value)
        .map(Some)
        .ok_or_else(|| mismatch(key, want, &d.value))
}

fn variant(d: &Decision) -> Option<String> {
    (!code_default(d)).then(|| d.variant.clone())
}

fn integer(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

type R<T> = Result<Response<T>, Status>;

/// Fills a response field from an optional value: v2 fields are `optional` (unset means
/// "use the code default"), v1 fields are plain (the zero value).
trait Field<T> {
    fn field(v: Option<T>) -> Self;
}

impl<T> Field<T> for Option<T> {
    fn field(v: Option<T>) -> Self {
        v
    }
}

macro_rules! plain_field {
    ($($t:ty),*) => {$(
        impl Field<$t> for $t {
            fn field(v: Option<$t>) -> Self {
                v.unwrap_or_default()
            }
        }
    )*};
}
plain_field!(bool, String, f64, i64);

fn object(v: &Value) -> Option<prost_types::Struct> {
    v.as_object().map(|m| prost_types::Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), from_json(v))).collect(),
    })
}

fn update_flags(keys: impl IntoIterator<Item = String>) -> prost_types::Struct {
    let update = prost_types::Struct {
        fields: [(
            "type".to_owned(),
            from_json(&Value::String("update".into())),
        )]
        .into(),
    };
    let flags = prost_types::Struct {
        fields: keys
            .into_iter()
            .map(|k| {
                (
                    k,
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StructValue(update.clone())),
                    },
                )
            })
            .collect(),
    };
    prost_types::Struct {
        fields: [(
            "flags".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StructValue(flags)),
            },
        )]
        .into(),
    }
}

/// The keys a change announces (all keys for a full invalidation), or `None` for none.
fn changed_keys(change: &Change, engine: &Engine) -> Option<Vec<String>> {
    if change.all {
        return Some(
            engine
                .snapshot()
                .keys
                .iter()
                .map(|k| k.to_string())
                .collect(),
        );
    }
    let mut keys: Vec<String> = change.pairs.iter().map(|(k, _)| k.clone()).collect();
    keys.sort();
    keys.dedup();
    (!keys.is_empty()).then_some(keys)
}

/// Implements one version of `flagd.evaluation.vN.Service` for [`Flagd`].
macro_rules! flagd_service {
    ($fpb:ident, $stream:ident, $v1:expr) => {
        /// The event stream of this protocol version.
        pub type $stream = Pin<Box<dyn Stream<Item = Result<$fpb::EventStreamResponse, Status>> + Send>>;

        #[tonic::async_trait]
        impl $fpb::service_server::Service for Flagd {
            async fn resolve_all(&self, req: Request<$fpb::ResolveAllRequest>) -> R<$fpb::ResolveAllResponse> {
                let (metadata, extensions, req) = req.into_parts();
                let (ctx, fixed) = self.context(&metadata, &extensions, req.context)?;
                let snapshot = self.engine.snapshot();
                let mut flags = std::collections::HashMap::new();
                for key in snapshot.keys.iter() {
                    let Some(d) = snapshot.evaluate(key, &ctx).map(|d| cacheable(d, fixed)) else {
                        continue;
                    };
                    if $v1 && code_default(&d) {
                        // v1 has no way to say "use the code default": left out.
                        continue;
                    }
                    let value = if code_default(&d) {
                        None
                    } else {
                        match &d.value {
                            Value::Bool(b) => Some($fpb::any_flag::Value::BoolValue(*b)),
                            Value::String(s) => Some($fpb::any_flag::Value::StringValue(s.clone())),
                            Value::Number(n) => n.as_f64().map($fpb::any_flag::Value::DoubleValue),
                            v @ Value::Object(_) => object(v).map($fpb::any_flag::Value::ObjectValue),
                            _ => None,
                        }
                    };
                    flags.insert(
                        key.to_string(),
                        $fpb::AnyFlag {
                            reason: reason(d.reason).to_owned(),
                            variant: Field::field(variant(&d)),
                            value,
                            metadata: flag_metadata(&snapshot, key),
                        },
                    );
                }
                let metadata = prost_types::Struct {
                    fields: [("flagSetId".to_owned(), from_json(&Value::String(ctx.environment)))].into(),
                };
                let response = $fpb::ResolveAllResponse {
                    flags,
                    metadata: Some(metadata),
                };
                let limit = match self.options.max_response_bytes {
                    0 => 4 * 1024 * 1024,
                    n => n,
                };
                let len = prost::Message::encoded_len(&response);
                if len > limit {
                    return Err(Status::resource_exhausted(format!(
                        "the resolved flags would be {len} bytes, above the {limit} byte response limit; resolve flags one by one"
                    )));
                }
                Ok(Response::new(response))
            }

            async fn resolve_boolean(&self, req: Request<$fpb::ResolveBooleanRequest>) -> R<$fpb::ResolveBooleanResponse> {
                let (metadata, extensions, req) = req.into_parts();
                let d = self.decide(&metadata, &extensions, &req.flag_key, req.context, $v1)?;
                Ok(Response::new($fpb::ResolveBooleanResponse {
                    value: Field::field(typed(&d, &req.flag_key, "boolean", Value::as_bool)?),
                    reason: reason(d.reason).to_owned(),
                    variant: Field::field(variant(&d)),
                    metadata: flag_metadata(&self.engine.snapshot(), &req.flag_key),
                }))
            }

            async fn resolve_string(&self, req: Request<$fpb::ResolveStringRequest>) -> R<$fpb::ResolveStringResponse> {
                let (metadata, extensions, req) = req.into_parts();
                let d = self.decide(&metadata, &extensions, &req.flag_key, req.context, $v1)?;
                Ok(Response::new($fpb::ResolveStringResponse {
                    value: Field::field(typed(&d, &req.flag_key, "string", |v| v.as_str().map(str::to_owned))?),
                    reason: reason(d.reason).to_owned(),
                    variant: Field::field(variant(&d)),
                    metadata: flag_metadata(&self.engine.snapshot(), &req.flag_key),
                }))
            }

            async fn resolve_float(&self, req: Request<$fpb::ResolveFloatRequest>) -> R<$fpb::ResolveFloatResponse> {
                let (metadata, extensions, req) = req.into_parts();
                let d = self.decide(&metadata, &extensions, &req.flag_key, req.context, $v1)?;
                Ok(Response::new($fpb::ResolveFloatResponse {
                    value: Field::field(typed(&d, &req.flag_key, "float", Value::as_f64)?),
                    reason: reason(d.reason).to_owned(),
                    variant: Field::field(variant(&d)),
                    metadata: flag_metadata(&self.engine.snapshot(), &req.flag_key),
                }))
            }

            async fn resolve_int(&self, req: Request<$fpb::ResolveIntRequest>) -> R<$fpb::ResolveIntResponse> {
                let (metadata, extensions, req) = req.into_parts();
                let d = self.decide(&metadata, &extensions, &req.flag_key, req.context, $v1)?;
                Ok(Response::new($fpb::ResolveIntResponse {
                    value: Field::field(typed(&d, &req.flag_key, "integer", integer)?),
                    reason: reason(d.reason).to_owned(),
                    variant: Field::field(variant(&d)),
                    metadata: flag_metadata(&self.engine.snapshot(), &req.flag_key),
                }))
            }

            async fn resolve_object(&self, req: Request<$fpb::ResolveObjectRequest>) -> R<$fpb::ResolveObjectResponse> {
                let (metadata, extensions, req) = req.into_parts();
                let d = self.decide(&metadata, &extensions, &req.flag_key, req.context, $v1)?;
                Ok(Response::new($fpb::ResolveObjectResponse {
                    value: typed(&d, &req.flag_key, "object", object)?,
                    reason: reason(d.reason).to_owned(),
                    variant: Field::field(variant(&d)),
                    metadata: flag_metadata(&self.engine.snapshot(), &req.flag_key),
                }))
            }

            type EventStreamStream = $stream;

            async fn event_stream(&self, _req: Request<$fpb::EventStreamRequest>) -> R<Self::EventStreamStream> {
                let event = |kind: &str, data: Option<prost_types::Struct>| $fpb::EventStreamResponse {
                    r#type: kind.to_owned(),
                    data,
                };
                let slot = self.watchers.take()?;
                let rx = self.engine.subscribe();
                let start = (
                    Some(event("provider_ready", None)),
                    rx,
                    self.streams.clone(),
                    self.engine.clone(),
                    self.options.keep_alive,
                    false,
                );
                let stream = futures::stream::unfold(start, move |(mut pending, mut rx, streams, engine, keep_alive, done)| async move {
                    if done {
                        return None;
                    }
                    loop {
                        if let Some(msg) = pending.take() {
                            return Some((Ok(msg), (None, rx, streams, engine, keep_alive, false)));
                        }
                        tokio::select! {
                            () = streams.cancelled() => {
                                let status = Status::unavailable("server is shutting down; reconnect");
                                return Some((Err(status), (None, rx, streams, engine, keep_alive, true)));
                            }
                            () = tokio::time::sleep(keep_alive) => pending = Some(event("keep_alive", None)),
                            r = rx.recv() => match r {
                                Ok(change) => {
                                    pending = changed_keys(&change, &engine)
                                        .map(|keys| event("configuration_change", Some(update_flags(keys))));
                                }
                                Err(RecvError::Lagged(_)) => {
                                    let keys = engine.snapshot().keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
                                    pending = Some(event("configuration_change", Some(update_flags(keys))));
                                }
                                Err(RecvError::Closed) => return None,
                            },
                        }
                    }
                });
                Ok(Response::new(Box::pin(slot.hold(stream))))
            }
        }
    };
}

use proto::flagd::evaluation::{v1 as fpb1, v2 as fpb2};

flagd_service!(fpb1, EventStreamV1, true);
flagd_service!(fpb2, EventStreamV2, false);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_follow_flagd() {
        assert_eq!(reason(Reason::Static), "STATIC");
        assert_eq!(reason(Reason::Split), "TARGETING_MATCH");
        assert_eq!(reason(Reason::NotDeployed), "TARGETING_MATCH");
        assert_eq!(reason(Reason::Default), "DEFAULT");
        assert_eq!(reason(Reason::Disabled), "DISABLED");
    }

    #[test]
    fn integers_accept_whole_numbers_only() {
        assert_eq!(integer(&serde_json::json!(3)), Some(3));
        assert_eq!(integer(&serde_json::json!(3.0)), Some(3));
        assert_eq!(integer(&serde_json::json!(3.5)), None);
        assert_eq!(integer(&serde_json::json!("3")), None);
    }
}
