//! Calls by gRPC path with raw message bytes: the authorization matrix calls every method
//! of the table without knowing its types (an empty message is valid for every request
//! type).

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::Status;

/// A codec passing message bytes through.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Calls `path` with an empty message and `metadata` (key, value) pairs; server streams
/// count as successful once the response headers arrive. Returns the status of the call.
pub async fn call(
    channel: Channel,
    path: &str,
    metadata: &[(&str, &str)],
    streaming: bool,
) -> Result<(), Status> {
    let until = if streaming {
        Until::Headers
    } else {
        Until::Answer
    };
    invoke(channel, path, metadata, Vec::new(), until)
        .await
        .map(|_| ())
}

/// Calls `path` with `body` as the message bytes (anything, valid or not); a server stream
/// returns its first message (or the status that ended it first), a unary call its answer.
pub async fn call_with(
    channel: Channel,
    path: &str,
    metadata: &[(&str, &str)],
    body: Vec<u8>,
    streaming: bool,
) -> Result<Vec<u8>, Status> {
    let until = if streaming {
        Until::FirstMessage
    } else {
        Until::Answer
    };
    let answer = invoke(channel, path, metadata, body, until).await?;
    answer.ok_or_else(|| Status::unknown("the stream ended without a message"))
}

/// How far a call is followed.
#[derive(Clone, Copy, PartialEq)]
enum Until {
    /// A unary call's answer.
    Answer,
    /// A server stream's response headers.
    Headers,
    /// A server stream's first message.
    FirstMessage,
}

async fn invoke(
    channel: Channel,
    path: &str,
    metadata: &[(&str, &str)],
    body: Vec<u8>,
    until: Until,
) -> Result<Option<Vec<u8>>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
    let mut request = tonic::Request::new(body);
    for (k, v) in metadata {
        let key: tonic::metadata::MetadataKey<tonic::metadata::Ascii> = k
            .parse()
            .map_err(|_| Status::internal("bad metadata key"))?;
        request.metadata_mut().insert(
            key,
            v.parse()
                .map_err(|_| Status::internal("bad metadata value"))?,
        );
    }
    let path: http::uri::PathAndQuery = path.parse().map_err(|_| Status::internal("bad path"))?;
    match until {
        Until::Answer => grpc
            .unary(request, path, RawCodec)
            .await
            .map(|r| Some(r.into_inner())),
        Until::Headers => grpc
            .server_streaming(request, path, RawCodec)
            .await
            .map(|_| None),
        Until::FirstMessage => {
            let mut stream = grpc
                .server_streaming(request, path, RawCodec)
                .await?
                .into_inner();
            stream.message().await
        }
    }
}
