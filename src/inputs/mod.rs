//! Turning request inputs into model inputs: image decoding and preprocessing, base64, tokenizing.

pub mod fetch;
pub mod image;
pub mod jpeg;
pub mod resample;
pub mod text;
