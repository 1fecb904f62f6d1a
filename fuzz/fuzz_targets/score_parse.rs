//! Any body through the /score and /invocations parser: a request or a client error (400), never a panic.
#![no_main]

use clipserve::error::Kind;
use clipserve::http::azure::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    match parse(body, &["input_data", "dataframe_split"]) {
        Ok(request) => assert!(request.items.iter().all(|i| !i.id.is_empty())),
        Err(e) if e.kind() == Kind::InvalidArgument => {}
        Err(other) => panic!("unexpected error kind: {other:?}"),
    }
});
