//! Turning request inputs into model inputs: image decoding and preprocessing, base64, tokenizing.

pub mod fetch;
pub mod image;
pub mod jpeg;
pub mod resample;
pub mod text;

/// Where an item's image comes from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// An encoded image file.
    Bytes(Vec<u8>),
    /// Base64 of an encoded image file.
    Base64(String),
    /// An http(s) URL.
    Url(String),
}
