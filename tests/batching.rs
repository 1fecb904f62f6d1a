//! Dynamic batching, admission, deadlines, cancellation and metrics, observed over the wire.

mod common;
#[path = "support/raw_h2.rs"]
mod raw_h2;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clipserve::pb::{item::Image, EmbedRequest, Item};
use common::*;
use futures::StreamExt;
use raw_h2::RawConnection;

fn text_request(t: &str) -> EmbedRequest {
    EmbedRequest { items: vec![Item { id: t.into(), image: None, text: Some(t.into()) }], normalize: false }
}

/// Waits (up to 20 s) until `sample` reaches `want`; false if it never does.
async fn wait_for(server: &TestServer, sample: &str, want: f64) -> bool {
    for _ in 0..400 {
        if server.metric(sample).await >= want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits (up to 20 s) until `sample` holds still for a second, and returns its value; None if it never does.
async fn settled(server: &TestServer, sample: &str) -> Option<f64> {
    let mut last = server.metric(sample).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = server.metric(sample).await;
        if now == last {
            return Some(now);
        }
        last = now;
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_calls_share_forward_passes() {
    let server = TestServer::start(&model_dir("vit-b32"), &[]).await;
    let client = server.client().await;
    let calls = (0..64).map(|i| {
        let mut c = client.clone();
        async move { c.embed(text_request(&format!("caption {i}"))).await.map(|r| r.into_inner()) }
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.unwrap().embeddings[0].text_features.len(), 512);
    }
    let metrics = server.metrics().await;
    let batches = metric_value(&metrics, r#"clipserve_batch_size_count{modality="text"}"#);
    let items = metric_value(&metrics, r#"clipserve_batch_size_sum{modality="text"}"#);
    assert_eq!(items, 64.0, "every item ran exactly once");
    assert!(batches < 32.0, "64 concurrent texts ran in {batches} forward passes: no batching");
    assert_eq!(metric_value(&metrics, r#"clipserve_model_items_total{modality="text"}"#), 64.0);
    assert!(metric_value(&metrics, r#"clipserve_requests_total{transport="grpc",rpc="Embed",outcome="ok"}"#) >= 64.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_ready_and_metrics_endpoints() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let mut client = server.client().await;
    client.embed(text_request("one")).await.unwrap();
    let base = server.http_url();
    for path in ["/", "/health", "/ready"] {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let metrics = server.metrics().await;
    assert_eq!(metric_value(&metrics, "clipserve_ready"), 1.0);
    assert!(metrics.contains("# TYPE clipserve_batch_size histogram"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_deadline_never_reaches_the_model() {
    // The load is 32 copies of one image: without the content cache, so that each costs its forward pass.
    let server = TestServer::start(&model_dir("vit-b32"), &["--cache-mb", "0"]).await;
    let client = server.client().await;
    // Keep the only model worker busy for about a second with 32 images of the full-size model.
    let jpeg = image_bytes("landscape_640x480.jpg");
    let blocker = EmbedRequest {
        items: (0..32)
            .map(|i| Item { id: i.to_string(), image: Some(Image::ImageBytes(jpeg.clone())), text: None })
            .collect(),
        normalize: false,
    };
    let mut c = client.clone();
    let blocking = tokio::spawn(async move { c.embed(blocker).await });
    // Wait until the images' forward pass has begun (their batch is formed just before it).
    let mut started = false;
    for _ in 0..400 {
        if server.metric(r#"clipserve_batch_size_count{modality="image"}"#).await >= 1.0 {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started, "the blocking batch never started");
    // These texts are queued at once but can only run once the worker is free, after their deadline.
    let texts_before = server.metric(r#"clipserve_model_items_total{modality="text"}"#).await;
    let items = (0..8).map(|i| Item { id: i.to_string(), image: None, text: Some(format!("late {i}")) });
    let mut req = tonic::Request::new(EmbedRequest { items: items.collect(), normalize: false });
    req.set_timeout(Duration::from_millis(200));
    let mut c = client.clone();
    let status = c.embed(req).await.unwrap_err();
    assert!(matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{status:?}");
    assert_eq!(blocking.await.unwrap().unwrap().into_inner().embeddings.len(), 32);
    // The late items are discarded when the worker, free again, takes its next batch.
    let mut dropped = 0.0;
    let mut m = String::new();
    for _ in 0..100 {
        m = server.metrics().await;
        dropped = metric_value(&m, r#"clipserve_dropped_items_total{reason="deadline"}"#)
            + metric_value(&m, r#"clipserve_dropped_items_total{reason="cancelled"}"#);
        if dropped >= 8.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dropped, 8.0, "every late item is dropped before the model");
    let texts_after = metric_value(&m, r#"clipserve_model_items_total{modality="text"}"#);
    assert_eq!(texts_after, texts_before, "items past their deadline reached the model");
    // And the server still answers.
    assert!(c.embed(text_request("still here")).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_whose_client_stops_reading_stops_reading_too() {
    let window = 4;
    let server = TestServer::start(&model_dir("tiny"), &["--stream-window", &window.to_string()]).await;
    let connection = RawConnection::connect(&server.grpc_addr).await;
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    // An endless request stream that counts how many messages the server has taken.
    let requests = futures::stream::iter(0..).map(move |i: usize| {
        counter.fetch_add(1, Ordering::SeqCst);
        text_request(&format!("message {i}"))
    });
    let mut responses = connection.client().embed_stream(requests).await.unwrap().into_inner();
    for _ in 0..3 {
        let r = responses.next().await.unwrap().unwrap();
        assert_eq!(r.embeddings[0].text_features.len(), 512);
    }
    // Stop reading answers: backpressure must stall the server once the transport's buffers are full.
    let stalled = settled(&server, "clipserve_stream_messages_total").await.expect("server kept consuming");
    let produced = pulled.load(Ordering::SeqCst);
    assert!(stalled < produced as f64, "server took all {produced} messages the client offered");
    // The client goes away (its connection closes, as when its process exits): the server notices, ends the
    // stream, and takes nothing more.
    connection.cut();
    let cancelled = r#"clipserve_requests_total{transport="grpc",rpc="EmbedStream",outcome="cancelled"}"#;
    let mut ended = 0.0;
    for _ in 0..100 {
        ended = server.metric(cancelled).await;
        if ended >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ended, 1.0, "the server did not notice that the client went away");
    assert_eq!(server.metric("clipserve_stream_messages_total").await, stalled, "server read on after the client left");
    eprintln!("client offered {produced} messages; server took {stalled}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_stream_drops_its_queued_work_before_the_model() {
    let window = 4;
    // The first forward pass stalls for 5 s: the stream's messages queue up behind it.
    let server = TestServer::start(
        &model_dir("tiny"),
        &["--stream-window", &window.to_string(), "--inject-faults", "model-stall:ms=5000"],
    )
    .await;
    let mut client = server.client().await;
    let blocking = tokio::spawn(async move { client.embed(text_request("blocker")).await });
    assert!(
        wait_for(&server, r#"clipserve_batch_size_count{modality="text"}"#, 1.0).await,
        "the stalled forward pass never started"
    );

    let connection = RawConnection::connect(&server.grpc_addr).await;
    let endless = futures::stream::iter(0..).map(|i: usize| text_request(&format!("message {i}")));
    let _responses = connection.client().embed_stream(endless).await.unwrap().into_inner();
    // The server holds one window of messages, their texts queued for the model, and reads no further.
    assert!(
        wait_for(&server, r#"clipserve_queue_depth{modality="text"}"#, window as f64).await,
        "the stream's texts were not queued"
    );
    assert_eq!(server.metric("clipserve_stream_messages_total").await, window as f64);

    // The client goes away while its work waits: none of it may reach the model.
    connection.cut();
    assert!(blocking.await.unwrap().is_ok());
    assert!(
        wait_for(&server, r#"clipserve_dropped_items_total{reason="cancelled"}"#, window as f64).await,
        "the cancelled stream's queued items were not dropped"
    );
    let m = server.metrics().await;
    assert_eq!(metric_value(&m, r#"clipserve_dropped_items_total{reason="cancelled"}"#), window as f64);
    assert_eq!(metric_value(&m, r#"clipserve_model_items_total{modality="text"}"#), 1.0, "only the blocker ran");
    assert_eq!(metric_value(&m, "clipserve_stream_messages_total"), window as f64, "read on after the cancel");
}
