//! WatchPlacements on the wire: each committed event is encoded once, by the first watcher
//! that sends it, and the same bytes go to every other watcher.
//!
//! tonic's generated server encodes every message it is handed, so a hundred watchers would
//! convert and encode each event a hundred times. [`WatchRoute`] wraps the generated server
//! and serves the WatchPlacements path itself, through [`WireCodec`], whose items are either
//! bytes already encoded or a message to encode (snapshot entries and heartbeats, which are
//! per watcher). Every other method goes to the generated server untouched. Authentication
//! and authorization run before either, in the server's layers.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use futures::{Stream, StreamExt};
use prost::Message;
use proto::deploy::v1 as pb;
use proto::deploy::v1::deploy_service_server::DeployServiceServer;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::{NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstDecoder;

use super::{convert, DeployApi};
use crate::placement_log::WatchItem;

/// The path of WatchPlacements, served by [`WatchRoute`].
const WATCH_PATH: &str = "/deploy.v1.DeployService/WatchPlacements";

/// One WatchPlacements response on its way out.
#[derive(Debug)]
pub enum Wire {
    /// A `WatchPlacementsResponse` already encoded (a committed event, shared by watchers).
    Encoded(Bytes),
    /// A response to encode (snapshot entries, heartbeats).
    Message(Box<pb::WatchPlacementsResponse>),
}

/// A watch item as a protobuf message.
pub fn watch_message(item: WatchItem) -> pb::WatchPlacementsResponse {
    use pb::watch_placements_response::Kind;
    let kind = match item {
        WatchItem::Snapshot(p) => Kind::SnapshotPlacement(convert::placement(&p)),
        WatchItem::SnapshotEnd { sequence, count } => Kind::SnapshotEnd(pb::SnapshotEnd {
            sequence,
            placement_count: count,
        }),
        WatchItem::Event(e) => Kind::Event(convert::event(&e.event)),
        WatchItem::Heartbeat { sequence, head } => Kind::Heartbeat(pb::Heartbeat {
            sequence,
            head_sequence: head,
        }),
    };
    pb::WatchPlacementsResponse { kind: Some(kind) }
}

/// A watch item on the wire: a committed event's shared encoding, or a message.
pub fn wire(item: WatchItem) -> Wire {
    match item {
        WatchItem::Event(e) => Wire::Encoded(e.wire(|_| {
            watch_message(WatchItem::Event(e.clone()))
                .encode_to_vec()
                .into()
        })),
        item => Wire::Message(Box::new(watch_message(item))),
    }
}

/// The codec of WatchPlacements: requests decoded by prost, responses written as [`Wire`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WireCodec;

impl Codec for WireCodec {
    type Encode = Wire;
    type Decode = pb::WatchPlacementsRequest;
    type Encoder = WireEncoder;
    type Decoder = WireDecoder;

    fn encoder(&mut self) -> WireEncoder {
        WireEncoder
    }

    fn decoder(&mut self) -> WireDecoder {
        WireDecoder(ProstDecoder::default())
    }
}

/// Writes a [`Wire`] item.
#[derive(Debug)]
pub struct WireEncoder;

impl Encoder for WireEncoder {
    type Item = Wire;
    type Error = Status;

    fn encode(&mut self, item: Wire, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Wire::Encoded(bytes) => {
                dst.put_slice(&bytes);
                Ok(())
            }
            Wire::Message(message) => message
                .encode(dst)
                .map_err(|e| Status::internal(format!("encoding a watch response: {e}"))),
        }
    }
}

/// Reads a `WatchPlacementsRequest`.
#[derive(Debug)]
pub struct WireDecoder(ProstDecoder<pb::WatchPlacementsRequest>);

impl Decoder for WireDecoder {
    type Item = pb::WatchPlacementsRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(src)
    }
}

/// The DeployService server with WatchPlacements served through [`WireCodec`].
#[derive(Clone)]
pub struct WatchRoute {
    inner: DeployServiceServer<DeployApi>,
    api: Arc<DeployApi>,
    max_message_bytes: usize,
}

impl WatchRoute {
    /// Serves `api`, refusing requests and responses over `max_message_bytes`.
    pub fn new(api: DeployApi, max_message_bytes: usize) -> Self {
        let api = Arc::new(api);
        Self {
            inner: DeployServiceServer::from_arc(api.clone())
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
            api,
            max_message_bytes,
        }
    }
}

impl NamedService for WatchRoute {
    const NAME: &'static str = <DeployServiceServer<DeployApi> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for WatchRoute
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
    DeployServiceServer<DeployApi>:
        Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    <DeployServiceServer<DeployApi> as Service<http::Request<B>>>::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            return Box::pin(self.inner.call(req));
        }
        let api = self.api.clone();
        let limit = Some(self.max_message_bytes);
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(WireCodec).apply_max_message_size_config(limit, limit);
            Ok(grpc.server_streaming(WatchMethod(api), req).await)
        })
    }
}

/// The response stream of WatchPlacements on the wire.
type WireStream = Pin<Box<dyn Stream<Item = Result<Wire, Status>> + Send>>;

struct WatchMethod(Arc<DeployApi>);

impl ServerStreamingService<pb::WatchPlacementsRequest> for WatchMethod {
    type Response = Wire;
    type ResponseStream = WireStream;
    type Future = BoxFuture<Response<WireStream>, Status>;

    fn call(&mut self, request: Request<pb::WatchPlacementsRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move {
            let items = api.open_watch(request.into_inner()).await?;
            let stream: WireStream =
                Box::pin(items.map(|item| item.map(wire).map_err(Status::from)));
            Ok(Response::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::{Placement, PlacementEvent, PlacementState};
    use crate::placement_log::LoggedEvent;

    fn logged(sequence: u64) -> Arc<LoggedEvent> {
        Arc::new(LoggedEvent::new(PlacementEvent {
            sequence,
            commit_ms: 1_700_000_000_123,
            previous_state: PlacementState::Pending,
            trace_parent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            placement: Placement {
                deployment: 7,
                environment: "prod".into(),
                target: "web-1".into(),
                artifact: "checkout".into(),
                version: "1.4.2".into(),
                digest: format!("sha256:{}", "ab".repeat(32)),
                state: PlacementState::Placed,
                message: "placed".into(),
                sequence,
                update_ms: 1_700_000_000_100,
            },
        }))
    }

    fn bytes(wire: Wire) -> Vec<u8> {
        match wire {
            Wire::Encoded(b) => b.to_vec(),
            Wire::Message(m) => m.encode_to_vec(),
        }
    }

    #[test]
    fn a_shared_encoding_is_the_message_the_generated_server_would_send() {
        let event = logged(42);
        let first = wire(WatchItem::Event(event.clone()));
        assert!(matches!(first, Wire::Encoded(_)));
        let expected = watch_message(WatchItem::Event(event.clone())).encode_to_vec();
        assert_eq!(bytes(first), expected);
        // The second watcher gets the same bytes, and they decode to the event.
        let second = bytes(wire(WatchItem::Event(event)));
        assert_eq!(second, expected);
        let decoded = pb::WatchPlacementsResponse::decode(second.as_slice()).unwrap();
        let Some(pb::watch_placements_response::Kind::Event(e)) = decoded.kind else {
            panic!("not an event: {decoded:?}");
        };
        assert_eq!(e.sequence, 42);
        assert_eq!(
            e.placement.map(|p| p.target),
            Some("environments/prod/targets/web-1".into())
        );
    }

    #[test]
    fn heartbeats_are_encoded_per_watcher() {
        let item = WatchItem::Heartbeat {
            sequence: 5,
            head: 9,
        };
        assert!(matches!(wire(item), Wire::Message(_)));
    }
}
