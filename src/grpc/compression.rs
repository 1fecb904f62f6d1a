//! Compressed gRPC requests (`grpc-encoding` gzip, deflate or zstd), and the message limit on every request.
//!
//! A tower layer around every gRPC service reads the length-prefixed messages of a request body as they arrive,
//! before tonic does:
//! - a message whose length prefix is over `--max-message-bytes` is refused at once, compressed or not;
//! - a compressed message is inflated here, into a buffer that never grows past the limit: one that inflates
//!   past it is refused as soon as it does, whatever it would inflate to (a gzip length trailer or a zstd content
//!   size over the limit refuses it before any inflating). zstd's window is bounded by the limit too, so memory
//!   per message stays within a small multiple of the limit (the compressed message, the output, zstd's window),
//!   and inflating runs inline on the connection's task, so no more run at once than the runtime has threads;
//! - the refusals carry the error table's reasons: RESOURCE_EXHAUSTED / `REQUEST_TOO_LARGE` for a message over the
//!   limit (tonic's own check answers OUT_OF_RANGE with no reason), INVALID_ARGUMENT / `MALFORMED_REQUEST` for one
//!   that does not decompress.
//!
//! tonic then receives uncompressed messages (the `grpc-encoding` header is removed). Answers are compressed by
//! tonic in the request's encoding when the client's `grpc-accept-encoding` lists it, and sent uncompressed
//! otherwise (as grpc-go servers do: a client that compresses what it sends gets compressed answers; one that
//! merely accepts compression is not made to pay for it). An encoding other than these three is left to tonic,
//! which answers UNIMPLEMENTED with the encodings it accepts in `grpc-accept-encoding`.

use std::io::Read;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Request};
use http_body::Frame;

use crate::error::{Error, Reason};

const ENCODING: &str = "grpc-encoding";
const ACCEPT_ENCODING: &str = "grpc-accept-encoding";
/// A gRPC message's prefix: a compressed flag and a big-endian length.
const PREFIX: usize = 5;

/// Request messages decompressed here, by `encoding` (gzip, deflate, zstd).
pub const DECOMPRESSED_MESSAGES: &str = "clipserve_grpc_decompressed_messages_total";

/// The compression encodings decompressed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Deflate,
    Zstd,
}

impl Encoding {
    /// Every encoding, for tonic's `accept_compressed` / `send_compressed`.
    pub const ALL: [Encoding; 3] = [Encoding::Gzip, Encoding::Deflate, Encoding::Zstd];

    fn parse(name: &[u8]) -> Option<Encoding> {
        match name {
            b"gzip" => Some(Encoding::Gzip),
            b"deflate" => Some(Encoding::Deflate),
            b"zstd" => Some(Encoding::Zstd),
            _ => None,
        }
    }

    /// The name in `grpc-encoding`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
            Encoding::Zstd => "zstd",
        }
    }

    /// tonic's name for it.
    pub fn tonic(self) -> tonic::codec::CompressionEncoding {
        match self {
            Encoding::Gzip => tonic::codec::CompressionEncoding::Gzip,
            Encoding::Deflate => tonic::codec::CompressionEncoding::Deflate,
            Encoding::Zstd => tonic::codec::CompressionEncoding::Zstd,
        }
    }
}

/// The layer: `Routes::into_axum_router().layer(GrpcMessagesLayer::new(max_message_bytes))`.
#[derive(Debug, Clone, Copy)]
pub struct GrpcMessagesLayer {
    max_message_bytes: usize,
}

impl GrpcMessagesLayer {
    /// Refuses request messages over `max_message_bytes` (after decompression).
    pub fn new(max_message_bytes: usize) -> Self {
        GrpcMessagesLayer { max_message_bytes }
    }
}

impl<S> tower_layer::Layer<S> for GrpcMessagesLayer {
    type Service = GrpcMessages<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMessages { inner, max_message_bytes: self.max_message_bytes }
    }
}

/// The service the layer makes.
#[derive(Debug, Clone)]
pub struct GrpcMessages<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S> tower_service::Service<Request<Body>> for GrpcMessages<S>
where
    S: tower_service::Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let encoding = match parts.headers.get(ENCODING).map(HeaderValue::as_bytes) {
            None | Some(b"identity") => None,
            Some(name) => match Encoding::parse(name) {
                Some(encoding) => Some(encoding),
                // Not one of ours: tonic refuses it (UNIMPLEMENTED, listing the accepted encodings).
                None => return self.inner.call(Request::from_parts(parts, body)),
            },
        };
        // Answer in the request's encoding if the client takes it, else uncompressed.
        let accepted = encoding.filter(|e| {
            parts
                .headers
                .get_all(ACCEPT_ENCODING)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|name| name.trim() == e.as_str())
        });
        match accepted {
            Some(e) => {
                parts.headers.insert(ACCEPT_ENCODING, HeaderValue::from_static(e.as_str()));
            }
            None => {
                parts.headers.remove(ACCEPT_ENCODING);
            }
        }
        parts.headers.remove(ENCODING);
        let body = Body::new(Messages::new(body, encoding, self.max_message_bytes));
        self.inner.call(Request::from_parts(parts, body))
    }
}

/// Where the reader of a request body is in its stream of messages.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Waiting for a message's prefix.
    Prefix,
    /// Passing on this many more bytes of an uncompressed message as they come.
    Passing(usize),
    /// Collecting a compressed message of this many bytes (the prefix still in the buffer).
    Collecting(usize),
    /// Refused: nothing more is read.
    Failed,
}

pin_project_lite::pin_project! {
    /// A gRPC request body whose messages are checked against the limit and decompressed.
    struct Messages {
        #[pin]
        inner: Body,
        encoding: Option<Encoding>,
        max: usize,
        buf: BytesMut,
        state: State,
    }
}

impl Messages {
    fn new(inner: Body, encoding: Option<Encoding>, max: usize) -> Self {
        Messages { inner, encoding, max, buf: BytesMut::new(), state: State::Prefix }
    }
}

/// A refusal as a body error: tonic finds the status in the error's source chain and answers it.
fn refusal(e: Error) -> axum::Error {
    axum::Error::new(tonic::Status::from(e))
}

impl http_body::Body for Messages {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut this = self.project();
        loop {
            // What can be passed on from what is buffered.
            match *this.state {
                State::Failed => return Poll::Ready(None),
                State::Prefix if this.buf.len() >= PREFIX => {
                    let compressed = this.buf[0] == 1;
                    let len = u32::from_be_bytes([this.buf[1], this.buf[2], this.buf[3], this.buf[4]]) as usize;
                    if len > *this.max {
                        *this.state = State::Failed;
                        let what = if compressed { "compressed message" } else { "message" };
                        return Poll::Ready(Some(Err(refusal(Error::new(
                            Reason::RequestTooLarge,
                            format!(
                                "{what} of {len} bytes is over the limit of {} bytes (--max-message-bytes)",
                                this.max
                            ),
                        )))));
                    }
                    *this.state = match this.encoding {
                        // A compressed flag without an encoding is tonic's to refuse (a protocol error).
                        // (The buffer grows as the message arrives, not by what its prefix claims.)
                        Some(_) if compressed => State::Collecting(len),
                        _ => State::Passing(PREFIX + len),
                    };
                    continue;
                }
                State::Passing(left) if !this.buf.is_empty() => {
                    let chunk = this.buf.split_to(left.min(this.buf.len())).freeze();
                    *this.state = if chunk.len() == left { State::Prefix } else { State::Passing(left - chunk.len()) };
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                State::Collecting(len) if this.buf.len() >= PREFIX + len => {
                    let mut message = this.buf.split_to(PREFIX + len);
                    message.advance(PREFIX);
                    *this.state = State::Prefix;
                    let encoding = this.encoding.expect("collecting only with an encoding");
                    return match inflate(encoding, &message, *this.max) {
                        Ok(framed) => {
                            metrics::counter!(DECOMPRESSED_MESSAGES, "encoding" => encoding.as_str()).increment(1);
                            Poll::Ready(Some(Ok(Frame::data(framed))))
                        }
                        Err(e) => {
                            *this.state = State::Failed;
                            Poll::Ready(Some(Err(refusal(e))))
                        }
                    };
                }
                _ => {}
            }
            // More is needed.
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        // An uncompressed message goes on without a copy where it can.
                        if let (State::Passing(left), true) = (*this.state, this.buf.is_empty()) {
                            let chunk = data.split_to(left.min(data.len()));
                            this.buf.extend_from_slice(&data);
                            *this.state =
                                if chunk.len() == left { State::Prefix } else { State::Passing(left - chunk.len()) };
                            if !chunk.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(chunk))));
                            }
                        } else {
                            this.buf.extend_from_slice(&data);
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    // A message cut short: passed on as it is, for tonic to refuse.
                    if this.buf.is_empty() {
                        return Poll::Ready(None);
                    }
                    *this.state = State::Failed;
                    return Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Failed) || (self.buf.is_empty() && self.inner.is_end_stream())
    }
}

/// The size a compressed message says it inflates to, where the format says it: a gzip member's length
/// trailer (modulo 2^32; for several members, the last one's, which the whole is at least), a zstd frame's content
/// size.
fn declared_size(encoding: Encoding, data: &[u8]) -> Option<u64> {
    match encoding {
        Encoding::Gzip if data.len() >= 18 => {
            let tail: [u8; 4] = data[data.len() - 4..].try_into().ok()?;
            Some(u32::from_le_bytes(tail) as u64)
        }
        Encoding::Zstd => zstd::zstd_safe::get_frame_content_size(data).ok().flatten(),
        _ => None,
    }
}

/// Inflates one message into a new uncompressed gRPC message (prefix included), refusing it once its output
/// passes `max` bytes.
fn inflate(encoding: Encoding, data: &[u8], max: usize) -> Result<Bytes, Error> {
    let name = encoding.as_str();
    let too_large = || {
        Error::new(
            Reason::RequestTooLarge,
            format!(
                "{name}-compressed message of {} bytes inflates past the limit of {max} bytes (--max-message-bytes)",
                data.len()
            ),
        )
    };
    let malformed = |e: std::io::Error| Error::new(Reason::MalformedRequest, format!("{name}-compressed message: {e}"));
    let declared = declared_size(encoding, data);
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let mut reader: Box<dyn Read + '_> = match encoding {
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(data)),
        Encoding::Deflate => Box::new(flate2::read::ZlibDecoder::new(data)),
        Encoding::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(data).map_err(malformed)?;
            // The decoder's window is memory too: no larger than a message may be (2^10 is zstd's least).
            let window_log = (usize::BITS - max.max(1).saturating_sub(1).leading_zeros()).clamp(10, 31);
            decoder.window_log_max(window_log).map_err(malformed)?;
            Box::new(decoder)
        }
    };
    // Room for the prefix, then the output, grown by doubling but never past the limit.
    let expected = declared.map_or(data.len().saturating_mul(4), |n| n as usize).clamp(1024, max.max(1024));
    let mut out = Vec::with_capacity(PREFIX + expected.min(max));
    out.extend_from_slice(&[0; PREFIX]);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(malformed(e)),
        };
        if out.len() - PREFIX + n > max {
            return Err(too_large());
        }
        if out.len() + n > out.capacity() {
            let want = (out.capacity() * 2).max(out.len() + n).min(PREFIX + max);
            out.reserve_exact(want - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
    }
    let len = (out.len() - PREFIX) as u32;
    out[1..PREFIX].copy_from_slice(&len.to_be_bytes());
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn inflates_within_the_limit_and_frames_the_output() {
        let text = b"a photo of a cat ".repeat(100);
        for (encoding, packed) in [
            (Encoding::Gzip, gzip(&text)),
            (Encoding::Zstd, zstd::encode_all(&text[..], 3).unwrap()),
            (Encoding::Deflate, {
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&text).unwrap();
                e.finish().unwrap()
            }),
        ] {
            let framed = inflate(encoding, &packed, text.len()).unwrap();
            assert_eq!(framed[0], 0, "{encoding:?}");
            assert_eq!(u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize, text.len());
            assert_eq!(&framed[5..], &text[..]);
            let e = inflate(encoding, &packed, text.len() - 1).unwrap_err();
            assert_eq!(e.reason(), Reason::RequestTooLarge, "{encoding:?}");
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        // 64 gzip members of 16 MiB of zeros each: 1 GiB inflated, about 1 MiB sent. The last member's trailer
        // says 16 MiB, under the 32 MiB limit, so only inflating finds it.
        let member = gzip(&vec![0u8; 16 << 20]);
        let bomb = member.repeat(64);
        let started = std::time::Instant::now();
        let e = inflate(Encoding::Gzip, &bomb, 32 << 20).unwrap_err();
        assert_eq!(e.reason(), Reason::RequestTooLarge);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
        // A zstd frame that declares its size is refused before inflating.
        let frame = zstd::encode_all(&vec![0u8; 64 << 20][..], 1).unwrap();
        assert_eq!(inflate(Encoding::Zstd, &frame, 1 << 20).unwrap_err().reason(), Reason::RequestTooLarge);
    }

    #[test]
    fn corrupt_data_is_malformed() {
        let mut packed = gzip(b"hello hello hello hello");
        let n = packed.len();
        packed[n / 2] ^= 0xff;
        packed[n - 8] ^= 0xff; // the CRC too
        assert_eq!(inflate(Encoding::Gzip, &packed, 1 << 20).unwrap_err().reason(), Reason::MalformedRequest);
        assert_eq!(
            inflate(Encoding::Zstd, b"not zstd at all", 1 << 20).unwrap_err().reason(),
            Reason::MalformedRequest
        );
    }
}
