//! flagd's sync protocol (`flagd.sync.v1.FlagSyncService`) for in-process providers: each
//! environment's decisions as a flagd flag-definition document (see
//! [`crate::domain::flagd_doc::render_decisions`]), sent whole at the start of a SyncFlags
//! stream and again after every change that alters it.
//!
//! The environment is chosen as for flagd evaluation: the `Flagd-Selector` header (or the
//! request's deprecated `selector` field), `flagSetId=<env>` or a source through the
//! configured aliases, else the default environment; the caller must be allowed to
//! evaluate there. The service's static context values travel as `sync_context` (and
//! from GetMetadata), so in-process evaluations see them as remote ones do. Streams count
//! against the change-stream cap and end with UNAVAILABLE at shutdown.
//!
//! A document is rendered once per snapshot version and environment, whatever the number
//! of streams; a stream sends it only when its text changed. A document larger than the
//! response limit (`--max-message-bytes`) is refused with RESOURCE_EXHAUSTED (a stream
//! ends with it), as ResolveAll is; SyncFlags streams have their own cap
//! (`--max-sync-streams`), since each may hold a document its client has not read.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use proto::flagd::sync::v1 as spb;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tonic::{Request, Response, Status};

use service_kit::streams::StreamCap;

use super::flagd::Flagd;

/// Environments whose rendered document is kept (a caller may name many: past this, the
/// cache starts over).
const MAX_CACHED_ENVIRONMENTS: usize = 64;

/// Rendered documents by environment, with the snapshot version they were rendered from.
type Rendered = Mutex<HashMap<String, (u64, Arc<str>)>>;

/// The sync service.
#[derive(Clone)]
pub struct FlagSync {
    flagd: Flagd,
    rendered: Arc<Rendered>,
    streams: StreamCap,
}

impl FlagSync {
    /// A service over the same engine and options as `flagd`, its SyncFlags streams counted
    /// against `streams`.
    pub fn new(flagd: Flagd, streams: StreamCap) -> Self {
        Self {
            flagd,
            rendered: Arc::default(),
            streams,
        }
    }

    /// The environment a call follows, checked against the caller's binding.
    fn environment<T>(&self, req: &Request<T>, field: &str) -> Result<String, Status> {
        let header = req
            .metadata()
            .get("flagd-selector")
            .and_then(|v| v.to_str().ok());
        let selector = header.or(Some(field).filter(|s| !s.is_empty()));
        let (ctx, _) = self.flagd.context_of(
            selector,
            req.extensions().get::<service_kit::auth::Caller>(),
            serde_json::Map::new(),
        )?;
        Ok(ctx.environment)
    }

    /// The environment's document at the current snapshot; RESOURCE_EXHAUSTED when it is
    /// larger than the response limit.
    fn document(&self, environment: &str) -> Result<Arc<str>, Status> {
        let doc = render_cached(&self.flagd, &self.rendered, environment);
        let limit = self.flagd.max_response_bytes();
        if doc.len() > limit {
            return Err(Status::resource_exhausted(format!(
                "flag_configuration: the document of {environment:?} would be {} bytes, above the {limit} byte response limit",
                doc.len()
            )));
        }
        Ok(doc)
    }

    fn sync_context(&self) -> prost_types::Struct {
        prost_types::Struct {
            fields: self
                .flagd
                .static_context()
                .iter()
                .map(|(k, v)| (k.clone(), super::convert::from_json(v)))
                .collect(),
        }
    }
}

fn render_cached(flagd: &Flagd, cache: &Rendered, environment: &str) -> Arc<str> {
    let snapshot = flagd.engine().snapshot();
    if let Some((version, doc)) = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(environment)
    {
        if *version == snapshot.version {
            return doc.clone();
        }
    }
    let doc: Arc<str> = crate::domain::flagd_doc::render_decisions(&snapshot, environment)
        .to_string()
        .into();
    let mut cache = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if cache.len() >= MAX_CACHED_ENVIRONMENTS && !cache.contains_key(environment) {
        cache.clear();
    }
    cache.insert(environment.to_owned(), (snapshot.version, doc.clone()));
    doc
}

type R<T> = Result<Response<T>, Status>;

/// The SyncFlags stream.
pub type SyncStream = Pin<Box<dyn Stream<Item = Result<spb::SyncFlagsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl spb::flag_sync_service_server::FlagSyncService for FlagSync {
    type SyncFlagsStream = SyncStream;

    async fn sync_flags(&self, req: Request<spb::SyncFlagsRequest>) -> R<SyncStream> {
        #[allow(deprecated)]
        let environment = self.environment(&req, &req.get_ref().selector)?;
        let slot = self.streams.take()?;
        // Subscribed before the first render: no change falls between the two.
        let rx = self.flagd.engine().subscribe();
        let first = self.document(&environment)?;
        let context = self.sync_context();
        let this = self.clone();
        let streams = self.flagd.shutdown_token();
        let state = (Some(Ok(first)), None::<Arc<str>>, rx, false);
        let stream = futures::stream::unfold(state, move |(mut pending, last, mut rx, done)| {
            let this = this.clone();
            let streams = streams.clone();
            let context = context.clone();
            let environment = environment.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    if let Some(next) = pending.take() {
                        let doc: Arc<str> = match next {
                            Ok(doc) => doc,
                            Err(status) => return Some((Err(status), (None, last, rx, true))),
                        };
                        if last.as_deref() != Some(&*doc) {
                            let msg = spb::SyncFlagsResponse {
                                flag_configuration: doc.to_string(),
                                sync_context: Some(context),
                            };
                            return Some((Ok(msg), (None, Some(doc), rx, false)));
                        }
                    }
                    tokio::select! {
                        () = streams.cancelled() => {
                            let status = Status::unavailable("server is shutting down; reconnect");
                            return Some((Err(status), (None, last, rx, true)));
                        }
                        r = rx.recv() => match r {
                            Ok(_) | Err(RecvError::Lagged(_)) => {
                                // Changes that arrived together are one new document.
                                loop {
                                    match rx.try_recv() {
                                        Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                                        Err(TryRecvError::Empty) => break,
                                        Err(TryRecvError::Closed) => return None,
                                    }
                                }
                                pending = Some(this.document(&environment));
                            }
                            Err(RecvError::Closed) => return None,
                        },
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(slot.hold(stream))))
    }

    async fn fetch_all_flags(
        &self,
        req: Request<spb::FetchAllFlagsRequest>,
    ) -> R<spb::FetchAllFlagsResponse> {
        #[allow(deprecated)]
        let environment = self.environment(&req, &req.get_ref().selector)?;
        Ok(Response::new(spb::FetchAllFlagsResponse {
            flag_configuration: self.document(&environment)?.to_string(),
        }))
    }

    #[allow(deprecated)]
    async fn get_metadata(
        &self,
        req: Request<spb::GetMetadataRequest>,
    ) -> R<spb::GetMetadataResponse> {
        self.environment(&req, "")?;
        Ok(Response::new(spb::GetMetadataResponse {
            metadata: Some(self.sync_context()),
        }))
    }
}
