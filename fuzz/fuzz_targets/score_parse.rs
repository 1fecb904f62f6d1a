//! Any body through the /score and /invocations parser, with and without small limits: a request, a client error
//! (400) or a limit (413), never a panic; a request that parses stays within the limits.
#![no_main]

use clipserve::error::Kind;
use clipserve::http::azure::{parse, ParseLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let small = ParseLimits { max_items: 3, max_text_chars: 8 };
    for limits in [ParseLimits::NONE, small] {
        match parse(body, &["input_data", "dataframe_split"], limits) {
            Ok(request) => {
                assert!(request.items.iter().all(|i| !i.id.is_empty()));
                assert!(request.items.len() <= limits.max_items);
                let chars = |t: &Option<String>| t.as_ref().map_or(0, |t| t.chars().count());
                assert!(request.items.iter().all(|i| chars(&i.text) <= limits.max_text_chars));
            }
            Err(e) if e.kind() == Kind::InvalidArgument => {}
            Err(e) if e.kind() == Kind::TooLarge && limits.max_items == small.max_items => {}
            Err(other) => panic!("unexpected error kind: {other:?}"),
        }
    }
});
