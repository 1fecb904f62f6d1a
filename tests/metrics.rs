//! Request metrics over the wire: every call is counted once, with the outcome the client saw, on both
//! transports, including calls refused before any handler ran (API key) and streams that end in an error or are
//! abandoned by their client.

mod common;
#[path = "support/raw_h2.rs"]
mod raw_h2;

use std::time::Duration;

use clipserve::pb::{EmbedRequest, InfoRequest, Item};
use common::*;
use futures::StreamExt;
use raw_h2::RawConnection;
use tonic::Code;

const KEY: &str = "s3cret";

fn text_request(t: &str) -> EmbedRequest {
    EmbedRequest { items: vec![Item { id: t.into(), image: None, text: Some(t.into()) }], normalize: false }
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    request
}

fn requests(transport: &str, rpc: &str, outcome: &str) -> String {
    format!(r#"clipserve_requests_total{{transport="{transport}",rpc="{rpc}",outcome="{outcome}"}}"#)
}

/// Waits (up to 10 s) until `sample` reaches `want`; returns the last value seen.
async fn wait_for(server: &TestServer, sample: &str, want: f64) -> f64 {
    let mut value = 0.0;
    for _ in 0..200 {
        value = server.metric(sample).await;
        if value >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    value
}

#[tokio::test(flavor = "multi_thread")]
async fn every_call_is_counted_once_with_the_outcome_its_client_saw() {
    let server = TestServer::start(&model_dir("tiny"), &["--api-key", KEY]).await;
    let mut client = server.client().await;

    // gRPC: refused by the interceptor, a good call, a bad call, Info.
    let status = client.embed(text_request("no key")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    client.embed(authorized(text_request("fine"))).await.unwrap();
    let empty = EmbedRequest { items: vec![Item { id: "empty".into(), image: None, text: None }], normalize: false };
    let status = client.embed(authorized(empty)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    client.info(authorized(InfoRequest {})).await.unwrap();

    // HTTP: refused by the middleware, a good call, a bad call.
    let http = reqwest::Client::new();
    let score = format!("{}/score", server.http_url());
    let good = serde_json::json!({"input_data": {"columns": ["image", "text"], "index": [0], "data": [["", "a cat"]]}});
    let r = http.post(&score).json(&good).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.post(&score).bearer_auth(KEY).json(&good).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.post(&score).bearer_auth(KEY).json(&serde_json::json!({"input_data": 5})).send().await.unwrap();
    assert_eq!(r.status(), 400);

    let m = server.metrics().await;
    let expect = [
        (requests("grpc", "Embed", "unauthenticated"), 1.0),
        (requests("grpc", "Embed", "ok"), 1.0),
        (requests("grpc", "Embed", "invalid_argument"), 1.0),
        (requests("grpc", "Info", "ok"), 1.0),
        (r#"clipserve_request_duration_seconds_count{transport="grpc",rpc="Embed"}"#.to_string(), 3.0),
        (r#"clipserve_request_duration_seconds_count{transport="grpc",rpc="Info"}"#.to_string(), 1.0),
        (requests("http", "score", "401"), 1.0),
        (requests("http", "score", "ok"), 1.0),
        (requests("http", "score", "400"), 1.0),
        (r#"clipserve_request_duration_seconds_count{transport="http",rpc="score"}"#.to_string(), 3.0),
    ];
    for (sample, want) in expect {
        assert_eq!(metric_value(&m, &sample), want, "{sample}\n{m}");
    }
    // Health checks made while the server started are counted under their own method.
    assert!(metric_value(&m, &requests("grpc", "Check", "ok")) >= 1.0, "{m}");
    assert!(metric_value(&m, r#"clipserve_request_duration_seconds_sum{transport="grpc",rpc="Info"}"#) > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_is_counted_with_its_final_status() {
    let server = TestServer::start(&model_dir("tiny"), &["--max-message-bytes", "65536"]).await;
    let mut client = server.client().await;

    // One good message, then one over the message limit: the stream answers the first and ends in an error.
    let messages = vec![text_request("fine"), text_request(&"x".repeat(100_000))];
    let mut responses = client.embed_stream(futures::stream::iter(messages)).await.unwrap().into_inner();
    let first = responses.next().await.unwrap().unwrap();
    assert_eq!(first.embeddings[0].text_features.len(), 512);
    let status = responses.next().await.unwrap().unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    assert!(responses.next().await.is_none());
    let outcome = clipserve::telemetry::outcome(status.code());
    assert_eq!(wait_for(&server, &requests("grpc", "EmbedStream", outcome), 1.0).await, 1.0, "{status:?}");
    assert_eq!(server.metric(&requests("grpc", "EmbedStream", "ok")).await, 0.0);

    // A stream that ends well is counted ok.
    let messages = vec![text_request("a"), text_request("b")];
    let answers: Vec<_> =
        client.embed_stream(futures::stream::iter(messages)).await.unwrap().into_inner().collect().await;
    assert!(answers.iter().all(|a| a.is_ok()) && answers.len() == 2);
    assert_eq!(wait_for(&server, &requests("grpc", "EmbedStream", "ok"), 1.0).await, 1.0);

    // A stream whose client goes away before its end (its connection closes, as when the client process exits)
    // is counted cancelled.
    let connection = RawConnection::connect(&server.grpc_addr).await;
    let endless = futures::stream::iter(0..).map(|i: usize| text_request(&format!("message {i}")));
    let mut responses = connection.client().embed_stream(endless).await.unwrap().into_inner();
    responses.next().await.unwrap().unwrap();
    connection.cut();
    let cancelled = wait_for(&server, &requests("grpc", "EmbedStream", "cancelled"), 1.0).await;
    assert_eq!(cancelled, 1.0, "{}", server.metrics().await);
    let m = server.metrics().await;
    assert_eq!(
        metric_value(&m, r#"clipserve_request_duration_seconds_count{transport="grpc",rpc="EmbedStream"}"#),
        3.0
    );
}
