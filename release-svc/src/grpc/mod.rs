//! gRPC handlers of `release.v1.ReleaseService`: decode, validate ([`convert`]), call the
//! engine, map the error (`service_kit::status`), encode.
//!
//! # Layout
//!
//! - [`convert`]: proto <-> domain conversions and request validation.
//! - [`flagd`]: flagd's evaluation protocol (v2) over the same evaluator.
//! - [`decode`]: requests the protobuf decoder refuses answer INVALID_ARGUMENT.

pub mod convert;
pub mod decode;
pub mod flagd;
pub mod flagd_sync;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use proto::release::v1 as pb;
use proto::release::v1::release_service_server::ReleaseService;
use service_kit::auth::{self, Permission};
use service_kit::streams::StreamCap;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::consumer::SharedStatus;
use crate::domain::model::{Millis, Release, Transition};
use crate::domain::{names, Error, Violations};
use crate::engine::{Caller, Change, Cursor, Engine, DAY_MS};

/// The caller of a request: the authenticated principal (or, with authentication off, the
/// `x-principal` metadata; see [`service_kit::auth`]) and the request id (`request_id`,
/// else `x-request-id`, refused when malformed: [`service_kit::principal::request_id`]).
fn actor<T>(req: &Request<T>, request_id: &str) -> std::result::Result<Caller, Status> {
    let principal = auth::caller(req)?.principal().to_owned();
    let request_id = service_kit::principal::request_id(request_id, req.metadata())?;
    Ok(Caller {
        principal,
        request_id,
        trace_parent: None,
    })
}

/// The ReleaseService implementation.
#[derive(Clone)]
pub struct ReleaseApi {
    engine: Arc<Engine>,
    consumer: SharedStatus,
    deploy_svc: String,
    streams: CancellationToken,
    /// Open WatchVisibility streams (shared with the flagd EventStreams).
    watchers: StreamCap,
    max_response_bytes: usize,
}

/// Change streams (WatchVisibility and flagd EventStream together) open at once unless
/// configured.
pub const DEFAULT_MAX_WATCHERS: usize = 4096;

/// Most features one EvaluateBatch evaluates.
pub const MAX_BATCH_FEATURES: usize = 1000;

impl ReleaseApi {
    /// A service over `engine`; visibility streams end when `streams` is cancelled.
    pub fn new(
        engine: Arc<Engine>,
        consumer: SharedStatus,
        deploy_svc: String,
        streams: CancellationToken,
    ) -> Self {
        Self {
            engine,
            consumer,
            deploy_svc,
            streams,
            watchers: StreamCap::new(DEFAULT_MAX_WATCHERS, "change streams"),
            max_response_bytes: 4 * 1024 * 1024,
        }
    }

    /// Counts WatchVisibility streams against `cap` (share it with the flagd services so
    /// one limit covers every change stream).
    pub fn with_stream_cap(mut self, cap: StreamCap) -> Self {
        self.watchers = cap;
        self
    }

    /// Caps responses built from many features (EvaluateBatch, ExportFlagd) at `bytes`
    /// (the server's encoding limit): above it the call answers RESOURCE_EXHAUSTED.
    pub fn with_max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// RESOURCE_EXHAUSTED when a response of `len` bytes exceeds the response cap.
    fn response_fits(&self, what: &str, len: usize) -> std::result::Result<(), Status> {
        if len > self.max_response_bytes {
            return Err(Error::ResourceExhausted(format!(
                "the {what} would be {len} bytes, above the {} byte response limit; ask for less",
                self.max_response_bytes
            ))
            .into());
        }
        Ok(())
    }
}

type Result<T> = std::result::Result<Response<T>, Status>;

impl ReleaseApi {
    /// ArchiveFeature (`archive`) and UnarchiveFeature.
    async fn archive(
        &self,
        actor: Caller,
        feature: &str,
        etag: &str,
        archive: bool,
    ) -> Result<pb::Feature> {
        let mut v = Violations::default();
        let key = v
            .check("name", names::parse_feature(feature))
            .unwrap_or_default();
        let expected = convert::etag(&mut v, "etag", etag);
        v.finish()?;
        let feature = self
            .engine
            .archive_feature(&key, archive, expected, &actor)
            .await?;
        Ok(Response::new(convert::feature_pb(&feature)))
    }

    /// Checks `p` in every environment of release `id` (NOT_FOUND first for an unknown
    /// release).
    async fn require_release<T>(
        &self,
        req: &Request<T>,
        id: i64,
        p: Option<Permission>,
    ) -> std::result::Result<(), Status> {
        let access = auth::caller(req)?;
        let release = self.engine.release(id).await?;
        for e in &release.environments {
            match p {
                Some(p) => access.require(p, &e.environment)?,
                None => access.require_environment(&e.environment)?,
            }
        }
        Ok(())
    }

    /// The caller of a call on release `name` and the release's id, once the caller may act
    /// in every environment of the release ([`ReleaseApi::require_release`]).
    async fn release_call<T>(
        &self,
        req: &Request<T>,
        name: &str,
    ) -> std::result::Result<(Caller, i64), Status> {
        let actor = actor(req, "")?;
        let id = release_id(name)?;
        self.require_release(req, id, None).await?;
        Ok((actor, id))
    }

    /// Transition `t` of release `id` by `actor` as `action`, for the caller's free-text
    /// `reason` (INVALID_ARGUMENT when it is too long).
    async fn transition_for(
        &self,
        actor: &Caller,
        id: i64,
        t: Transition,
        action: &str,
        reason: &str,
    ) -> std::result::Result<Release, Status> {
        check_reason(reason)?;
        Ok(self.engine.transition(id, t, actor, action, reason).await?)
    }
}

/// The answer carrying `release`.
fn release_reply(release: &Release) -> Result<pb::Release> {
    Ok(Response::new(convert::release_pb(release)))
}

/// The response stream of WatchVisibility.
pub type VisibilityStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::VisibilityChange, Status>> + Send>>;

fn name<T>(
    field: &str,
    value: &str,
    parse: impl Fn(&str) -> std::result::Result<T, String>,
) -> std::result::Result<T, Status> {
    parse(value).map_err(|d| Status::from(Error::invalid(field, d)))
}

/// The id of release `name` (`releases/{id}`): INVALID_ARGUMENT naming `name` otherwise.
fn release_id(name: &str) -> std::result::Result<i64, Status> {
    self::name("name", name, names::parse_release)
}

/// Checks release `name` and the `environment` named with it into `v`; the release's id
/// (0 when `name` names none).
fn release_and_environment(v: &mut Violations, name: &str, environment: &str) -> i64 {
    let id = v
        .check("name", names::parse_release(name))
        .unwrap_or_default();
    v.check("environment", names::validate_environment(environment));
    id
}

/// A free-text reason (kill switch, rollback, cancel): INVALID_ARGUMENT naming `reason`
/// when it is too long.
fn check_reason(reason: &str) -> std::result::Result<(), Status> {
    let mut v = Violations::default();
    convert::reason_text(&mut v, "reason", reason);
    Ok(v.finish()?)
}

fn page(v: &mut Violations, size: i32, token: &str) -> (usize, Option<String>) {
    let size = v
        .check("page_size", service_kit::validate::page_size(size))
        .unwrap_or_default();
    let after = v
        .check(
            "page_token",
            service_kit::validate::decode_page_token(token),
        )
        .flatten();
    (size, after)
}

/// A page token that carries a numeric id (releases, withdrawals: newest first).
fn id_token(v: &mut Violations, after: Option<String>) -> Option<i64> {
    let after = after?;
    v.check(
        "page_token",
        after
            .parse::<i64>()
            .map_err(|_| "is not a page token returned by this service".to_owned()),
    )
}

/// A stale-view threshold: unset for 30 days, else between 0 and 3650 days.
fn stale_after(v: &mut Violations, field: &str, d: Option<&prost_types::Duration>) -> Millis {
    const MAX_DAYS: i64 = 3650;
    let Some(d) = d else {
        return 30 * DAY_MS;
    };
    let ms = convert::duration_ms(d);
    if d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos) || ms > MAX_DAYS * DAY_MS {
        v.push(field, format!("must be between 0 and {MAX_DAYS} days"));
    }
    ms
}

/// The first `size` of `rows` (read one past the page) and, when more follow, what names
/// the last of them (`last`).
fn one_page<T>(
    mut rows: Vec<T>,
    size: usize,
    last: impl FnOnce(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let more = rows.len() > size;
    rows.truncate(size);
    let last = if more { rows.last().map(last) } else { None };
    (rows, last)
}

/// The page token after the row named `last` (empty on the last page).
fn next_token(last: Option<String>) -> String {
    last.map(|k| service_kit::validate::encode_page_token(&k))
        .unwrap_or_default()
}

/// A change that asks the watcher to evaluate everything again, for `cause`.
fn everything(snapshot_version: u64, cause: &str) -> pb::VisibilityChange {
    pb::VisibilityChange {
        snapshot_version,
        features: Vec::new(),
        environments: Vec::new(),
        all_features: true,
        cause: cause.into(),
    }
}

fn change_message(c: &Change, environment: &str) -> Option<pb::VisibilityChange> {
    let mut features = Vec::new();
    let mut environments = Vec::new();
    for (f, e) in &c.pairs {
        if !environment.is_empty() && e != environment {
            continue;
        }
        if !features.contains(f) {
            features.push(f.clone());
        }
        if !environments.contains(e) {
            environments.push(e.clone());
        }
    }
    if !c.all && features.is_empty() {
        return None;
    }
    Some(pb::VisibilityChange {
        snapshot_version: c.version,
        features,
        environments,
        all_features: c.all,
        cause: c.cause.clone(),
    })
}

#[tonic::async_trait]
impl ReleaseService for ReleaseApi {
    async fn create_feature(&self, req: Request<pb::CreateFeatureRequest>) -> Result<pb::Feature> {
        let actor = actor(&req, "")?;
        let (feature, _) = convert::feature(req.into_inner().feature.unwrap_or_default(), true)?;
        let feature = self.engine.create_feature(feature, &actor).await?;
        Ok(Response::new(convert::feature_pb(&feature)))
    }

    async fn get_feature(&self, req: Request<pb::GetFeatureRequest>) -> Result<pb::Feature> {
        let key = name("name", &req.into_inner().name, names::parse_feature)?;
        let feature = self.engine.feature(&key).await?;
        Ok(Response::new(convert::feature_pb(&feature)))
    }

    async fn list_features(
        &self,
        req: Request<pb::ListFeaturesRequest>,
    ) -> Result<pb::ListFeaturesResponse> {
        let req = req.into_inner();
        let mut v = Violations::default();
        let (size, after) = page(&mut v, req.page_size, &req.page_token);
        v.finish()?;
        let features = self
            .engine
            .features(after.as_deref(), size, req.show_archived)
            .await;
        let (features, last) = one_page(features, size, |f| f.key.clone());
        Ok(Response::new(pb::ListFeaturesResponse {
            next_page_token: next_token(last),
            features: features.iter().map(|f| convert::feature_pb(f)).collect(),
        }))
    }

    async fn update_feature(&self, req: Request<pb::UpdateFeatureRequest>) -> Result<pb::Feature> {
        let actor = actor(&req, "")?;
        let (feature, expected) =
            convert::feature(req.into_inner().feature.unwrap_or_default(), false)?;
        let feature = self
            .engine
            .update_feature(feature, expected, &actor)
            .await?;
        Ok(Response::new(convert::feature_pb(&feature)))
    }

    async fn archive_feature(
        &self,
        req: Request<pb::ArchiveFeatureRequest>,
    ) -> Result<pb::Feature> {
        let actor = actor(&req, "")?;
        let req = req.into_inner();
        self.archive(actor, &req.name, &req.etag, true).await
    }

    async fn unarchive_feature(
        &self,
        req: Request<pb::UnarchiveFeatureRequest>,
    ) -> Result<pb::Feature> {
        let actor = actor(&req, "")?;
        let req = req.into_inner();
        self.archive(actor, &req.name, &req.etag, false).await
    }

    async fn create_release(&self, req: Request<pb::CreateReleaseRequest>) -> Result<pb::Release> {
        let actor = actor(&req, &req.get_ref().request_id)?;
        let access = auth::caller(&req)?;
        let (release, request_id) = convert::new_release(req.into_inner())?;
        for e in &release.environments {
            access.require_environment(&e.environment)?;
        }
        let release = self
            .engine
            .create_release(release, request_id, &actor)
            .await?;
        release_reply(&release)
    }

    async fn get_release(&self, req: Request<pb::GetReleaseRequest>) -> Result<pb::Release> {
        let id = release_id(&req.into_inner().name)?;
        release_reply(&self.engine.release(id).await?)
    }

    async fn list_releases(
        &self,
        req: Request<pb::ListReleasesRequest>,
    ) -> Result<pb::ListReleasesResponse> {
        let req = req.into_inner();
        let mut v = Violations::default();
        let (size, after) = page(&mut v, req.page_size, &req.page_token);
        let before = id_token(&mut v, after);
        v.finish()?;
        let releases = self.engine.releases(before, size).await;
        let (releases, last) = one_page(releases, size, |r| r.id.to_string());
        Ok(Response::new(pb::ListReleasesResponse {
            next_page_token: next_token(last),
            releases: releases.iter().map(convert::release_pb).collect(),
        }))
    }

    async fn set_rollout(&self, req: Request<pb::SetRolloutRequest>) -> Result<pb::Release> {
        let actor = actor(&req, "")?;
        let access = auth::caller(&req)?;
        let req = req.into_inner();
        let mut v = Violations::default();
        let id = release_and_environment(&mut v, &req.name, &req.environment);
        v.finish()?;
        access.require_environment(&req.environment)?;
        let percent = convert::rollout(req.rollout_percent)?;
        let release = self
            .engine
            .transition(
                id,
                Transition::SetRollout {
                    environment: req.environment,
                    percent,
                },
                &actor,
                "SetRollout",
                "",
            )
            .await?;
        release_reply(&release)
    }

    async fn pause_release(&self, req: Request<pb::PauseReleaseRequest>) -> Result<pb::Release> {
        let (actor, id) = self.release_call(&req, &req.get_ref().name).await?;
        let req = req.into_inner();
        let release = self
            .transition_for(&actor, id, Transition::Pause, "PauseRelease", &req.reason)
            .await?;
        tracing::info!(release = %req.name, reason = %req.reason, "release paused (kill switch)");
        release_reply(&release)
    }

    async fn resume_release(&self, req: Request<pb::ResumeReleaseRequest>) -> Result<pb::Release> {
        let (actor, id) = self.release_call(&req, &req.get_ref().name).await?;
        let release = self
            .engine
            .transition(id, Transition::Resume, &actor, "ResumeRelease", "")
            .await?;
        release_reply(&release)
    }

    async fn rollback_release(
        &self,
        req: Request<pb::RollbackReleaseRequest>,
    ) -> Result<pb::Release> {
        let (actor, id) = self.release_call(&req, &req.get_ref().name).await?;
        let req = req.into_inner();
        let release = self
            .transition_for(
                &actor,
                id,
                Transition::Rollback,
                "RollbackRelease",
                &req.reason,
            )
            .await?;
        tracing::info!(release = %req.name, reason = %req.reason, "release rolled back");
        release_reply(&release)
    }

    async fn evaluate(&self, req: Request<pb::EvaluateRequest>) -> Result<pb::EvaluateResponse> {
        let access = auth::caller(&req)?;
        let req = req.into_inner();
        let mut v = Violations::default();
        v.check("feature", names::validate_feature_key(&req.feature));
        let ctx = convert::context(&mut v, req.context);
        v.finish()?;
        access.require_environment(&ctx.environment)?;
        let (decision, version) = self.engine.evaluate(&req.feature, &ctx)?;
        Ok(Response::new(convert::decision(
            &req.feature,
            decision,
            version,
        )))
    }

    async fn evaluate_batch(
        &self,
        req: Request<pb::EvaluateBatchRequest>,
    ) -> Result<pb::EvaluateBatchResponse> {
        let access = auth::caller(&req)?;
        let req = req.into_inner();
        let mut v = Violations::default();
        if req.features.len() > MAX_BATCH_FEATURES {
            v.push(
                "features",
                format!(
                    "must name at most {MAX_BATCH_FEATURES} features, got {}",
                    req.features.len()
                ),
            );
        }
        for (i, k) in req.features.iter().enumerate().take(MAX_BATCH_FEATURES) {
            v.check(&format!("features[{i}]"), names::validate_feature_key(k));
        }
        let ctx = convert::context(&mut v, req.context);
        let snapshot = self.engine.snapshot();
        if req.features.is_empty() && snapshot.keys.len() > MAX_BATCH_FEATURES {
            v.push(
                "features",
                format!(
                    "must name the features to evaluate: there are {} features, and one batch evaluates at most {MAX_BATCH_FEATURES}",
                    snapshot.keys.len()
                ),
            );
        }
        v.finish()?;
        access.require_environment(&ctx.environment)?;
        let keys: Vec<String> = if req.features.is_empty() {
            snapshot.keys.iter().map(|k| k.to_string()).collect()
        } else {
            let mut k = req.features.clone();
            k.sort();
            k.dedup();
            k
        };
        let mut results = Vec::with_capacity(keys.len());
        for key in keys {
            let d = snapshot
                .evaluate(&key, &ctx)
                .ok_or_else(|| Status::from(Error::NotFound(format!("features/{key}"))))?;
            results.push(convert::decision(&key, d, snapshot.version));
        }
        let response = pb::EvaluateBatchResponse {
            results,
            snapshot_version: snapshot.version,
        };
        self.response_fits("batch", prost::Message::encoded_len(&response))?;
        Ok(Response::new(response))
    }

    type WatchVisibilityStream = VisibilityStream;

    async fn watch_visibility(
        &self,
        req: Request<pb::WatchVisibilityRequest>,
    ) -> Result<Self::WatchVisibilityStream> {
        let access = auth::caller(&req)?;
        let environment = req.into_inner().environment;
        if environment.is_empty() {
            // Every environment: only for callers that may evaluate everywhere.
            access.require_environment("*")?;
        } else {
            name("environment", &environment, names::validate_environment)?;
            access.require_environment(&environment)?;
        }
        let slot = self.watchers.take()?;
        let rx = self.engine.subscribe();
        let first = everything(
            self.engine.snapshot().version,
            "stream start: evaluate everything you cache",
        );
        let start = (
            Some(first),
            rx,
            self.streams.clone(),
            self.engine.clone(),
            environment,
            false,
        );
        let stream = futures::stream::unfold(
            start,
            |(mut pending, mut rx, streams, engine, env, done)| async move {
                if done {
                    return None;
                }
                loop {
                    if let Some(msg) = pending.take() {
                        return Some((Ok(msg), (None, rx, streams, engine, env, false)));
                    }
                    let next = tokio::select! {
                        () = streams.cancelled() => {
                            let status = Status::unavailable("server is shutting down; reconnect and re-evaluate");
                            return Some((Err(status), (None, rx, streams, engine, env, true)));
                        }
                        r = rx.recv() => r,
                    };
                    match next {
                        Ok(change) => pending = change_message(&change, &env),
                        Err(RecvError::Lagged(_)) => {
                            pending = Some(everything(
                                engine.snapshot().version,
                                "changes were dropped for this slow stream: evaluate everything again",
                            ));
                        }
                        Err(RecvError::Closed) => return None,
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(slot.hold(stream))))
    }

    async fn list_visibility(
        &self,
        req: Request<pb::ListVisibilityRequest>,
    ) -> Result<pb::ListVisibilityResponse> {
        let req = req.into_inner();
        let mut v = Violations::default();
        let (size, after) = page(&mut v, req.page_size, &req.page_token);
        let environment = (!req.environment.is_empty()).then_some(req.environment.as_str());
        if let Some(e) = environment {
            v.check("environment", names::validate_environment(e));
        }
        let feature = (!req.feature.is_empty()).then_some(req.feature.as_str());
        if let Some(f) = feature {
            v.check("feature", names::validate_feature_key(f));
        }
        v.finish()?;
        let from = after.map_or_else(Cursor::default, |a| match a.split_once('\n') {
            Some((f, e)) => Cursor {
                feature: (!f.is_empty()).then(|| f.to_owned()),
                environment: Some(e.to_owned()),
            },
            None => Cursor {
                feature: Some(a),
                environment: None,
            },
        });
        let matrix = self
            .engine
            .visibility(environment, feature, &from, size)
            .await;
        // A token names the last feature before the page, and the last column before it
        // when the columns come in chunks ("{feature}\n{environment}").
        let next_page_token = matrix
            .next
            .map(|c| {
                let feature = c.feature.unwrap_or_default();
                let after = match c.environment {
                    Some(e) => format!("{feature}\n{e}"),
                    None => feature,
                };
                service_kit::validate::encode_page_token(&after)
            })
            .unwrap_or_default();
        Ok(Response::new(pb::ListVisibilityResponse {
            next_page_token,
            features: matrix.rows.iter().map(convert::visibility_row_pb).collect(),
            environments: matrix.environments,
        }))
    }

    async fn get_release_timeline(
        &self,
        req: Request<pb::GetReleaseTimelineRequest>,
    ) -> Result<pb::ReleaseTimeline> {
        let id = release_id(&req.into_inner().name)?;
        let timeline = self.engine.timeline(id).await?;
        Ok(Response::new(convert::timeline_pb(&timeline)))
    }

    async fn get_feature_usage(
        &self,
        req: Request<pb::GetFeatureUsageRequest>,
    ) -> Result<pb::FeatureUsage> {
        let name = req.into_inner().name;
        let key = self::name("name", &name, names::parse_feature)?;
        let environments = self.engine.feature_usage(&key).await?;
        Ok(Response::new(convert::usage_pb(name, &environments)))
    }

    async fn list_stale_features(
        &self,
        req: Request<pb::ListStaleFeaturesRequest>,
    ) -> Result<pb::ListStaleFeaturesResponse> {
        let req = req.into_inner();
        let mut v = Violations::default();
        let (size, after) = page(&mut v, req.page_size, &req.page_token);
        let released_for = stale_after(&mut v, "released_for", req.released_for.as_ref());
        let unevaluated_for = stale_after(&mut v, "unevaluated_for", req.unevaluated_for.as_ref());
        v.finish()?;
        let stale = self
            .engine
            .stale_features(released_for, unevaluated_for, after.as_deref(), size)
            .await?;
        let (stale, last) = one_page(stale, size, |s| s.feature.clone());
        Ok(Response::new(pb::ListStaleFeaturesResponse {
            next_page_token: next_token(last),
            features: stale.iter().map(convert::stale_pb).collect(),
        }))
    }

    async fn get_consumer_status(
        &self,
        _req: Request<pb::GetConsumerStatusRequest>,
    ) -> Result<pb::ConsumerStatus> {
        let (cursor, applied) = self.engine.cursor().await;
        let s = self
            .consumer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let head = s.head.max(cursor);
        Ok(Response::new(pb::ConsumerStatus {
            cursor,
            head_sequence: head,
            lag: head - cursor,
            connected: s.connected,
            deploy_svc: self.deploy_svc.clone(),
            last_error: s.last_error,
            events_applied: applied,
            last_message_time: (s.last_message_ms > 0)
                .then(|| convert::timestamp(s.last_message_ms))
                .flatten(),
            active: s.active,
        }))
    }

    async fn list_withdrawals(
        &self,
        req: Request<pb::ListWithdrawalsRequest>,
    ) -> Result<pb::ListWithdrawalsResponse> {
        let req = req.into_inner();
        let mut v = Violations::default();
        let (size, after) = page(&mut v, req.page_size, &req.page_token);
        let before = id_token(&mut v, after);
        v.finish()?;
        let rows = self
            .engine
            .store()
            .list_withdrawals(before, size + 1)
            .await?;
        let (rows, last) = one_page(rows, size, |r| r.0.to_string());
        Ok(Response::new(pb::ListWithdrawalsResponse {
            next_page_token: next_token(last),
            withdrawals: rows.iter().map(|(_, w)| convert::withdrawal(w)).collect(),
        }))
    }

    async fn import_flagd(
        &self,
        req: Request<pb::ImportFlagdRequest>,
    ) -> Result<pb::ImportFlagdResponse> {
        let actor = actor(&req, "")?;
        let req = req.into_inner();
        let mut v = Violations::default();
        v.check("environment", names::validate_environment(&req.environment));
        if req.document.len() > 16 * 1024 * 1024 {
            v.push("document", "must be at most 16 MiB");
        }
        v.finish()?;
        let parsed = crate::domain::flagd_doc::parse(&req.document, req.skip_invalid)?;
        let skipped = parsed
            .invalid
            .iter()
            .map(|(key, v)| pb::SkippedFlag {
                key: key.clone(),
                problems: v
                    .recorded()
                    .iter()
                    .map(|p| format!("{}: {}", p.field, p.description))
                    .collect(),
            })
            .collect();
        let (created, updated, unchanged, release) = self
            .engine
            .import_flagd(&req.environment, parsed.flags, &actor)
            .await?;
        Ok(Response::new(pb::ImportFlagdResponse {
            skipped,
            created,
            updated,
            unchanged,
            release: release
                .map(|r| format!("releases/{}", r.id))
                .unwrap_or_default(),
        }))
    }

    async fn export_flagd(
        &self,
        req: Request<pb::ExportFlagdRequest>,
    ) -> Result<pb::ExportFlagdResponse> {
        let environment = req.into_inner().environment;
        name("environment", &environment, names::validate_environment)?;
        let doc = crate::domain::flagd_doc::render(&self.engine.snapshot(), &environment);
        let document = serde_json::to_string_pretty(&doc)
            .map_err(|e| Status::from(Error::Internal(e.to_string())))?;
        self.response_fits("document", document.len())?;
        Ok(Response::new(pb::ExportFlagdResponse { document }))
    }

    async fn submit_release(&self, req: Request<pb::SubmitReleaseRequest>) -> Result<pb::Release> {
        let (actor, id) = self.release_call(&req, &req.get_ref().name).await?;
        release_reply(&self.engine.submit(id, &actor).await?)
    }

    async fn approve_release(
        &self,
        req: Request<pb::ApproveReleaseRequest>,
    ) -> Result<pb::Release> {
        // An approver approves only where its binding holds: every environment of the
        // release.
        let (actor, id) = self.release_call(&req, &req.get_ref().name).await?;
        release_reply(&self.engine.approve(id, &actor).await?)
    }

    async fn cancel_release(&self, req: Request<pb::CancelReleaseRequest>) -> Result<pb::Release> {
        let (actor, id) = self.release_call(&req, &req.get_ref().name).await?;
        let reason = &req.get_ref().reason;
        let release = self
            .transition_for(&actor, id, Transition::Cancel, "CancelRelease", reason)
            .await?;
        release_reply(&release)
    }

    async fn set_emergency_override(
        &self,
        req: Request<pb::SetEmergencyOverrideRequest>,
    ) -> Result<pb::Release> {
        let actor = actor(&req, "")?;
        let access = auth::caller(&req)?;
        let mut v = Violations::default();
        let id = v
            .check("name", names::parse_release(&req.get_ref().name))
            .unwrap_or_default();
        let req_ref = req.get_ref();
        if req_ref.reason.trim().is_empty() {
            v.push("reason", "is required for an emergency override");
        }
        // With authentication on, the override is given by the approving principal in its
        // own call (two-person rule): the approver is the caller, never a typed name.
        let self_approved = access.authenticated();
        if self_approved {
            if !req_ref.approver.is_empty() && req_ref.approver != access.principal() {
                v.push(
                    "approver",
                    "with authentication on, the approver is the caller: leave it empty or name yourself",
                );
            }
        } else if req_ref.approver.trim().is_empty() {
            v.push("approver", "is required for an emergency override");
        }
        convert::reason_text(&mut v, "reason", &req_ref.reason);
        convert::principal_text(&mut v, "approver", &req_ref.approver);
        v.finish()?;
        self.require_release(&req, id, None).await?;
        let req = req.into_inner();
        let approver = if self_approved {
            access.principal().to_owned()
        } else {
            req.approver
        };
        let release = self
            .engine
            .emergency_override(id, req.reason, approver, self_approved, &actor)
            .await?;
        release_reply(&release)
    }

    async fn check_release(
        &self,
        req: Request<pb::CheckReleaseRequest>,
    ) -> Result<pb::CheckReleaseResponse> {
        let req = req.into_inner();
        let mut v = Violations::default();
        let id = release_and_environment(&mut v, &req.name, &req.environment);
        v.finish()?;
        let violations = self
            .engine
            .check_release(id, &req.environment, req.step as usize)
            .await?;
        Ok(Response::new(pb::CheckReleaseResponse {
            allowed: violations.is_empty(),
            violations: convert::violations_pb(&violations),
        }))
    }

    async fn get_policy(&self, req: Request<pb::GetPolicyRequest>) -> Result<pb::Policy> {
        let env = req.into_inner().environment;
        name("environment", &env, |e| {
            names::validate_environment(e).map(|()| e.to_owned())
        })?;
        Ok(Response::new(convert::policy_pb(
            &self.engine.policy(&env).await,
        )))
    }

    async fn set_policy(&self, req: Request<pb::SetPolicyRequest>) -> Result<pb::Policy> {
        let actor = actor(&req, "")?;
        let access = auth::caller(&req)?;
        let (policy, etag) = convert::policy(req.into_inner().policy.unwrap_or_default())?;
        access.require_environment(&policy.environment)?;
        Ok(Response::new(convert::policy_pb(
            &self.engine.set_policy(policy, etag, &actor).await?,
        )))
    }

    async fn list_audit_records(
        &self,
        req: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<pb::ListAuditRecordsResponse> {
        let req = req.into_inner();
        let mut v = Violations::default();
        let size = match req.page_size {
            0 => 100,
            n if (1..=1000).contains(&n) => n as usize,
            _ => {
                v.push("page_size", "must be between 0 and 1000");
                100
            }
        };
        let after_id = match req.page_token.as_str() {
            "" => 0,
            t => v
                .check(
                    "page_token",
                    t.parse::<i64>()
                        .map_err(|_| "is not a token this service returned".to_owned()),
                )
                .unwrap_or_default(),
        };
        if req.resource.len() > 512 {
            v.push("resource", "must be at most 512 characters");
        }
        convert::principal_text(&mut v, "principal", &req.principal);
        let start_ms = req.start_time.as_ref().map(convert::millis);
        let end_ms = req.end_time.as_ref().map(convert::millis);
        if let (Some(s), Some(e)) = (start_ms, end_ms) {
            if e <= s {
                v.push("end_time", "must be after start_time");
            }
        }
        v.finish()?;
        let rows = self
            .engine
            .store()
            .list_audit(crate::store::AuditFilter {
                resource_prefix: req.resource,
                exact: false,
                principal: req.principal,
                start_ms,
                end_ms,
                after_id,
                limit: size + 1,
            })
            .await?;
        let (rows, last) = one_page(rows, size, |(id, _)| id.to_string());
        Ok(Response::new(pb::ListAuditRecordsResponse {
            next_page_token: last.unwrap_or_default(),
            records: rows
                .iter()
                .map(|(id, a)| convert::audit_pb(*id, a))
                .collect(),
        }))
    }
}
