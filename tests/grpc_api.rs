//! The gRPC contract over the wire: shapes, ids and order, normalization, base64, errors and their codes,
//! streams with per-item errors, health, reflection, limits and overload.

mod common;
#[path = "support/raw_h2.rs"]
mod raw_h2;

use base64::Engine as _;
use clipserve::pb::{item::Image, EmbedRequest, InfoRequest, Item};
use common::*;
use futures::StreamExt;
use raw_h2::RawConnection;
use tonic::Code;

fn text(id: &str, t: &str) -> Item {
    Item { id: id.into(), image: None, text: Some(t.into()) }
}

fn image(id: &str, bytes: Vec<u8>) -> Item {
    Item { id: id.into(), image: Some(Image::ImageBytes(bytes)), text: None }
}

fn jpeg() -> Vec<u8> {
    image_bytes("landscape_640x480.jpg")
}

fn request(items: Vec<Item>) -> EmbedRequest {
    EmbedRequest { items, normalize: false }
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

#[tokio::test(flavor = "multi_thread")]
async fn info_health_and_reflection() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let mut client = server.client().await;
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model_id, "clipserve/tiny-clip-random");
    assert_eq!(info.weights, "random-init:seed=0");
    assert_eq!(info.embedding_dim, 512);
    assert_eq!(info.device, "cpu");
    assert_eq!(info.dtype, "float32");
    assert_eq!(info.context_length, 77);
    assert_eq!(info.image_size, 224);

    // The start-up log says the weights are random.
    let log: Vec<String> = server.early_log.iter().cloned().chain(server.log.try_iter()).collect();
    assert!(log.iter().any(|l| l.contains("RANDOM weights")), "no random-weights warning in {log:?}");

    // Reflection lists the service.
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection.server_reflection_info(futures::stream::iter(vec![req])).await.unwrap().into_inner();
    let Some(Ok(resp)) = stream.next().await else { panic!("no reflection answer") };
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("unexpected answer") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"clipserve.v1.Embedder".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn embeds_images_texts_and_both_in_order() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let mut client = server.client().await;
    let both = Item { id: "both".into(), image: Some(Image::ImageBytes(jpeg())), text: Some("a cat".into()) };
    let items = vec![text("t0", "a dog"), image("i0", jpeg()), both, text("t1", "a cat")];
    let out = client.embed(request(items)).await.unwrap().into_inner().embeddings;
    let ids: Vec<&str> = out.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["t0", "i0", "both", "t1"]);
    assert_eq!((out[0].image_features.len(), out[0].text_features.len()), (0, 512));
    assert_eq!((out[1].image_features.len(), out[1].text_features.len()), (512, 0));
    assert_eq!((out[2].image_features.len(), out[2].text_features.len()), (512, 512));
    assert!(out.iter().all(|e| e.error.is_none()));
    // Same input, same numbers, wherever it sits in the request.
    assert_close(&out[1].image_features, &out[2].image_features, "same image");
    assert_close(&out[2].text_features, &out[3].text_features, "same text");
    assert_ne!(out[0].text_features, out[3].text_features);
    // Raw projections by default: not unit length.
    assert!((norm(&out[0].text_features) - 1.0).abs() > 1e-3);
}

#[tokio::test(flavor = "multi_thread")]
async fn normalize_returns_unit_vectors_in_the_same_direction() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let mut client = server.client().await;
    let items = vec![image("i", jpeg()), text("t", "a photo of a dog")];
    let raw = client.embed(request(items.clone())).await.unwrap().into_inner().embeddings;
    let unit = client.embed(EmbedRequest { items, normalize: true }).await.unwrap().into_inner().embeddings;
    for (r, u) in [(&raw[0].image_features, &unit[0].image_features), (&raw[1].text_features, &unit[1].text_features)] {
        assert!((norm(u) - 1.0).abs() < 1e-5, "norm {}", norm(u));
        assert!(cosine(r, u) > 0.99999);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn base64_forms_equal_raw_bytes() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let mut client = server.client().await;
    let bytes = image_bytes("rgba_257x199.png");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    // Python's base64.encodebytes: a newline every 76 characters.
    let wrapped: String = b64.as_bytes().chunks(76).map(|c| format!("{}\n", std::str::from_utf8(c).unwrap())).collect();
    let forms = [b64.clone(), wrapped, format!("data:image/png;base64,{b64}")];
    let mut items = vec![image("raw", bytes)];
    items.extend(forms.iter().enumerate().map(|(i, f)| Item {
        id: format!("b64-{i}"),
        image: Some(Image::ImageBase64(f.clone())),
        text: None,
    }));
    let out = client.embed(request(items)).await.unwrap().into_inner().embeddings;
    for e in &out[1..] {
        assert_close(&e.image_features, &out[0].image_features, &e.id);
    }
}

/// Sends one bad item among good ones and returns the status.
async fn embed_error(
    client: &mut clipserve::pb::embedder_client::EmbedderClient<tonic::transport::Channel>,
    bad: Item,
) -> tonic::Status {
    let items = vec![text("ok-0", "fine"), bad, text("ok-2", "fine too")];
    match client.embed(request(items)).await {
        Ok(_) => panic!("the call must fail"),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_items_fail_embed_with_invalid_argument_naming_the_item() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let mut client = server.client().await;
    let mut truncated = jpeg();
    truncated.truncate(truncated.len() / 3);
    let cases = vec![
        Item { id: "empty-item".into(), image: None, text: None },
        Item { id: "bad-b64".into(), image: Some(Image::ImageBase64("%%% not base64 %%%".into())), text: None },
        image("html", b"<html><body>not an image</body></html>".to_vec()),
        image("zero-bytes", Vec::new()),
        image("truncated-jpeg", truncated),
        Item { id: "url".into(), image: Some(Image::ImageUrl("http://127.0.0.1:9/cat.jpg".into())), text: None },
    ];
    for bad in cases {
        let id = bad.id.clone();
        let status = embed_error(&mut client, bad).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{id}: {status:?}");
        assert!(status.message().contains("item 1") && status.message().contains(&id), "{id}: {}", status.message());
    }
    // The server is unharmed.
    let ok = client.embed(request(vec![image("i", jpeg())])).await.unwrap().into_inner();
    assert_eq!(ok.embeddings[0].image_features.len(), 512);
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_answer_resource_exhausted() {
    let server = TestServer::start(
        &model_dir("tiny"),
        &["--max-items-per-request", "4", "--max-text-chars", "100", "--max-image-pixels", "1000000"],
    )
    .await;
    let mut client = server.client().await;
    let many = (0..5).map(|i| text(&i.to_string(), "x")).collect();
    let status = client.embed(request(many)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let status = embed_error(&mut client, text("long", &"y".repeat(101))).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("long"));
    let status = embed_error(&mut client, image("big", image_bytes("large_2000x1500.jpg"))).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_answers_every_message_in_order_with_per_item_errors() {
    let server = TestServer::start(&model_dir("tiny"), &["--stream-window", "4"]).await;
    let mut client = server.client().await;
    let mut messages = Vec::new();
    for m in 0..20 {
        let mut items = vec![text(&format!("{m}-t"), &format!("message {m}")), image(&format!("{m}-i"), jpeg())];
        if m == 7 {
            items.insert(1, image("7-corrupt", b"GIF89a garbage".to_vec()));
        }
        messages.push(request(items));
    }
    let responses: Vec<_> =
        client.embed_stream(futures::stream::iter(messages)).await.unwrap().into_inner().collect::<Vec<_>>().await;
    assert_eq!(responses.len(), 20);
    for (m, r) in responses.into_iter().enumerate() {
        let r = r.unwrap();
        let ids: Vec<&str> = r.embeddings.iter().map(|e| e.id.as_str()).collect();
        if m == 7 {
            assert_eq!(ids, ["7-t", "7-corrupt", "7-i"]);
            let err = r.embeddings[1].error.as_ref().expect("the corrupt item has an error");
            assert_eq!(err.code, Code::InvalidArgument as i32);
            assert!(r.embeddings[1].image_features.is_empty());
            assert!(r.embeddings[0].error.is_none() && r.embeddings[2].error.is_none());
            assert_eq!(r.embeddings[2].image_features.len(), 512);
        } else {
            assert_eq!(ids, [format!("{m}-t"), format!("{m}-i")]);
            assert!(r.embeddings.iter().all(|e| e.error.is_none()));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_share_batches_and_equal_single_calls() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let client = server.client().await;
    let files = ["landscape_640x480.jpg", "portrait_480x640.png", "gray_300x300.png", "rgba_257x199.png"];
    let mut alone = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let mut c = client.clone();
        let items = vec![image(f, image_bytes(f)), text("t", &format!("caption number {i}"))];
        alone.push(c.embed(request(items)).await.unwrap().into_inner().embeddings);
    }
    let calls = (0..32).map(|k| {
        let mut c = client.clone();
        let i = k % files.len();
        let items = vec![image(files[i], image_bytes(files[i])), text("t", &format!("caption number {i}"))];
        async move { (i, c.embed(request(items)).await.unwrap().into_inner().embeddings) }
    });
    for (i, got) in futures::future::join_all(calls).await {
        for (g, a) in got.iter().zip(&alone[i]) {
            assert_close(&g.image_features, &a.image_features, &g.id);
            assert_close(&g.text_features, &a.text_features, &g.id);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_rejects_at_once_and_loses_nothing() {
    // Copies of one image make the load: without the content cache, so that each is decoded.
    let server = TestServer::start(&model_dir("tiny"), &["--max-queued-items", "4", "--cache-mb", "0"]).await;
    let client = server.client().await;
    let big = image_bytes("large_2000x1500.jpg");
    let calls = (0..40).map(|_| {
        let mut c = client.clone();
        let items = (0..4).map(|j| image(&j.to_string(), big.clone())).collect();
        async move { c.embed(request(items)).await }
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let exhausted = results.iter().filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted)).count();
    assert_eq!(ok + exhausted, 40, "every call answered OK or RESOURCE_EXHAUSTED: {results:?}");
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, exhausted {exhausted}");
    for r in results.into_iter().flatten() {
        assert_eq!(r.into_inner().embeddings.iter().filter(|e| e.image_features.len() == 512).count(), 4);
    }
    // A request that can never fit is refused as too large.
    let mut c = client.clone();
    let status = c.embed(request((0..5).map(|j| text(&j.to_string(), "x")).collect())).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_deadline_gives_deadline_exceeded() {
    // The first forward pass stalls for 3 s, so that a call made meanwhile cannot be served before its deadline.
    let server = TestServer::start(&model_dir("tiny"), &["--inject-faults", "model-stall:ms=3000"]).await;
    let mut client = server.client().await;
    let mut blocker = client.clone();
    let blocking = tokio::spawn(async move { blocker.embed(request(vec![text("b", "blocker")])).await });
    let mut started = false;
    for _ in 0..400 {
        if server.metric(r#"clipserve_batch_size_count{modality="text"}"#).await >= 1.0 {
            started = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(started, "the stalled forward pass never started");

    // A client that does not enforce the deadline itself (tonic's channel would, and report its own CANCELLED):
    // what it gets is the server's answer.
    let connection = RawConnection::connect(&server.grpc_addr).await;
    let mut req = tonic::Request::new(request(vec![text("late", "too late")]));
    req.set_timeout(std::time::Duration::from_millis(300));
    let sent = std::time::Instant::now();
    let status = connection.client().embed(req).await.unwrap_err();
    let waited = sent.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(clipserve::error::status_reason(&status).as_deref(), Some("DEADLINE_EXCEEDED"));
    assert!(waited < std::time::Duration::from_millis(2000), "answered after {waited:?}");

    // Once the model is free again, the late item is dropped before it: only the blocker ran.
    assert_eq!(blocking.await.unwrap().unwrap().into_inner().embeddings.len(), 1);
    let mut dropped = 0.0;
    for _ in 0..100 {
        dropped = server.metric(r#"clipserve_dropped_items_total{reason="deadline"}"#).await;
        if dropped >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(dropped, 1.0, "the late item was not dropped for its deadline");
    let m = server.metrics().await;
    assert_eq!(metric_value(&m, r#"clipserve_model_items_total{modality="text"}"#), 1.0, "the late item ran");
    let outcome = r#"clipserve_requests_total{transport="grpc",rpc="Embed",outcome="deadline_exceeded"}"#;
    assert_eq!(metric_value(&m, outcome), 1.0);
    // Still serving afterwards.
    let ok = client.embed(request(vec![text("t", "still here")])).await.unwrap().into_inner();
    assert_eq!(ok.embeddings[0].text_features.len(), 512);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_cleanly() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}
