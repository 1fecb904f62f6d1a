//! Any body through the /score and /invocations parsers (Azure JSON, MLflow JSON, CSV), with and without small
//! limits: a request, a client error (400) or a limit (413), never a panic; a request that parses stays within the
//! limits.
#![no_main]

use clipserve::error::Kind;
use clipserve::http::azure::{parse, ParseLimits, ScoreRequest};
use clipserve::http::mlflow::{parse_csv, parse_json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let small = ParseLimits { max_items: 3, max_text_chars: 8 };
    let parsers: [&dyn Fn(ParseLimits) -> Result<ScoreRequest, clipserve::error::Error>; 3] = [
        &|limits| parse(body, &["input_data", "dataframe_split"], limits),
        &|limits| parse_json(&mut body.to_vec(), limits),
        &|limits| parse_csv(body, limits),
    ];
    for (parser, limits) in parsers.iter().flat_map(|p| [(p, ParseLimits::NONE), (p, small)]) {
        match parser(limits) {
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
