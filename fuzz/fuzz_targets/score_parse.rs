//! Any body through the /score and /invocations parser: a request or a client error (400), never a panic.
#![no_main]

use clipserve::error::Error;
use clipserve::http::azure::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    match parse(body, &["input_data", "dataframe_split"]) {
        Ok(request) => assert!(request.items.iter().all(|i| !i.id.is_empty())),
        Err(Error::InvalidArgument(_)) => {}
        Err(other) => panic!("unexpected error kind: {other:?}"),
    }
});
