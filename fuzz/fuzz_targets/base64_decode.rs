//! Any text through the base64 decoder (data URIs, line breaks, padding or none): an error or bytes whose
//! re-encoding decodes to the same bytes.
#![no_main]

use base64::Engine as _;
use clipserve::inputs::image::decode_base64;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(bytes) = decode_base64(text) {
        let again = base64::engine::general_purpose::STANDARD.encode(&bytes);
        assert_eq!(decode_base64(&again).unwrap(), bytes);
    }
});
