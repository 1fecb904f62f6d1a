//! The protobuf codec of the service: tonic-prost's, except that a request that does not decode (invalid UTF-8 in
//! a string, a truncated message) is the client's error, `INVALID_ARGUMENT`, not the server's `INTERNAL`.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Codec used by the generated client and server code (`codec_path` in build.rs).
#[derive(Debug, Clone, Default)]
pub struct ClipCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> ClipCodec<T, U> {
    pub fn new() -> Self {
        ClipCodec { inner: ProstCodec::new() }
    }
}

impl<T, U> Codec for ClipCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ClipDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ClipDecoder { inner: self.inner.decoder() }
    }
}

/// Decodes with prost; decode failures become `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ClipDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: prost::Message + Default> Decoder for ClipDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|s| Status::invalid_argument(format!("malformed request: {}", s.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
