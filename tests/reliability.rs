//! Reliability under load, faults and hostile input, over the wire and bounded in time: overload, shutdown with
//! work in flight, a corrupt item inside a long stream, broken and oversized images, invalid UTF-8, huge texts,
//! and the API key.

mod common;

use std::time::{Duration, Instant};

use clipserve::pb::{item::Image, EmbedRequest, Item};
use common::*;
use futures::StreamExt;
use tonic::Code;

fn image(id: &str, bytes: Vec<u8>) -> Item {
    Item { id: id.into(), image: Some(Image::ImageBytes(bytes)), text: None }
}

fn text(id: &str, t: &str) -> Item {
    Item { id: id.into(), image: None, text: Some(t.into()) }
}

fn request(items: Vec<Item>) -> EmbedRequest {
    EmbedRequest { items, normalize: false }
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_at_ten_times_the_queue_answers_every_call() {
    // Copies of one image make the load: without the content cache, so that each is decoded.
    let server = TestServer::start(&model_dir("tiny"), &["--max-queued-items", "8", "--cache-mb", "0"]).await;
    let client = server.client().await;
    // A large JPEG takes tens of milliseconds to decode, so admitted calls hold the queue while the rest arrive.
    let jpeg = image_bytes("large_2000x1500.jpg");
    // 80 calls of 1 item over gRPC and 20 over HTTP against a queue of 8.
    let grpc = (0..80).map(|i| {
        let mut c = client.clone();
        let item = image(&i.to_string(), jpeg.clone());
        async move { c.embed(request(vec![item])).await.map(|r| r.into_inner()).map_err(|s| s.code()) }
    });
    let body = serde_json::json!({"input_data": {"columns": ["text"], "data": [["a caption"]]}});
    let http = (0..20).map(|_| {
        let (url, body) = (format!("{}/score", server.http_url()), body.clone());
        async move { reqwest::Client::new().post(url).json(&body).send().await.unwrap().status().as_u16() }
    });
    let (grpc, http) = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join(futures::future::join_all(grpc), futures::future::join_all(http)),
    )
    .await
    .expect("calls hung under overload");
    let ok = grpc.iter().filter(|r| r.is_ok()).count();
    let exhausted = grpc.iter().filter(|r| matches!(r, Err(Code::ResourceExhausted))).count();
    assert_eq!(ok + exhausted, 80, "{grpc:?}");
    assert!(ok > 0 && exhausted > 0, "ok {ok}, exhausted {exhausted}");
    for r in grpc.into_iter().flatten() {
        assert_eq!(r.embeddings[0].image_features.len(), 512);
    }
    assert!(http.iter().all(|s| *s == 200 || *s == 429), "{http:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_item_in_a_thousand_item_stream_fails_alone() {
    let server = TestServer::start(&model_dir("tiny"), &["--stream-window", "8"]).await;
    let mut client = server.client().await;
    let small = image_bytes("exact_224x224.jpg");
    let mut truncated = small.clone();
    truncated.truncate(small.len() / 2);
    let messages: Vec<EmbedRequest> = (0..100)
        .map(|m| {
            request(
                (0..10)
                    .map(|k| {
                        let n = m * 10 + k;
                        match n {
                            500 => image("500", truncated.clone()),
                            n if n % 2 == 0 => image(&n.to_string(), small.clone()),
                            n => text(&n.to_string(), &format!("caption {n}")),
                        }
                    })
                    .collect(),
            )
        })
        .collect();
    let answers: Vec<_> = tokio::time::timeout(
        Duration::from_secs(120),
        client.embed_stream(futures::stream::iter(messages)).await.unwrap().into_inner().collect::<Vec<_>>(),
    )
    .await
    .expect("stream hung");
    assert_eq!(answers.len(), 100);
    let embeddings: Vec<_> = answers.into_iter().flat_map(|a| a.unwrap().embeddings).collect();
    assert_eq!(embeddings.len(), 1000);
    let mut ok = 0;
    for (n, e) in embeddings.iter().enumerate() {
        assert_eq!(e.id, n.to_string(), "order");
        if n == 500 {
            assert_eq!(e.error.as_ref().expect("item 500 fails").code, Code::InvalidArgument as i32);
        } else {
            assert!(e.error.is_none(), "item {n}: {:?}", e.error);
            assert_eq!(e.image_features.len() + e.text_features.len(), 512);
            ok += 1;
        }
    }
    assert_eq!(ok, 999);
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_and_oversized_images_are_refused_cheaply() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let mut client = server.client().await;
    let jpeg = image_bytes("landscape_640x480.jpg");
    let png = image_bytes("portrait_480x640.png");
    // A valid PNG header claiming 30000x30000 pixels, a few bytes in all.
    let mut huge = image_bytes("pixel_1x1.png");
    huge[16..20].copy_from_slice(&30000u32.to_be_bytes());
    huge[20..24].copy_from_slice(&30000u32.to_be_bytes());
    let crc = crc32fast::hash(&huge[12..29]);
    huge[29..33].copy_from_slice(&crc.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, Code)> = vec![
        ("truncated-jpeg", jpeg[..jpeg.len() / 2].to_vec(), Code::InvalidArgument),
        ("garbage-jpeg", [&jpeg[..20], &[0x5au8; 4000][..]].concat(), Code::InvalidArgument),
        ("truncated-png", png[..png.len() / 3].to_vec(), Code::InvalidArgument),
        ("garbage", vec![0x42; 10_000], Code::InvalidArgument),
        ("zero-bytes", Vec::new(), Code::InvalidArgument),
        ("huge-claim", huge, Code::ResourceExhausted),
    ];
    let rss_before = rss_mib(server.pid());
    for (id, bytes, code) in cases {
        let started = Instant::now();
        let status = client.embed(request(vec![image(id, bytes)])).await.unwrap_err();
        assert_eq!(status.code(), code, "{id}: {status:?}");
        assert!(status.message().contains(id), "{id}: {}", status.message());
        assert!(started.elapsed() < Duration::from_secs(2), "{id} took {:?}", started.elapsed());
    }
    let rss_after = rss_mib(server.pid());
    assert!(rss_after - rss_before < 100.0, "memory grew from {rss_before:.0} to {rss_after:.0} MiB");
    // Still serving.
    let ok = client.embed(request(vec![image("fine", jpeg)])).await.unwrap().into_inner();
    assert_eq!(ok.embeddings[0].image_features.len(), 512);
}

/// An `EmbedRequest` whose text field carries raw bytes, to send invalid UTF-8 where a string belongs.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRequest {
    #[prost(message, repeated, tag = "1")]
    items: Vec<RawItem>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawItem {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(bytes = "vec", tag = "5")]
    text: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_and_huge_texts_are_client_errors() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let raw = RawRequest { items: vec![RawItem { id: "bad".into(), text: vec![0x61, 0xff, 0xfe, 0x62] }] };
    let codec = tonic_prost::ProstCodec::<RawRequest, clipserve::pb::EmbedResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/clipserve.v1.Embedder/Embed");
    let status = grpc.unary(tonic::Request::new(raw), path, codec).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let mut client = server.client().await;
    let huge = "word ".repeat(20_000); // 100 KB
    let status = client.embed(request(vec![text("huge", &huge)])).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("huge"));

    let http = reqwest::Client::new();
    let url = format!("{}/score", server.http_url());
    let mut body = br#"{"input_data":{"columns":["text"],"data":[["a"#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(br#""]]}}"#);
    let r = http.post(&url).body(body).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let big = serde_json::json!({"input_data": {"columns": ["text"], "data": [[huge]]}});
    let r = http.post(&url).json(&big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("row 0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_work_in_flight_and_exits_in_time() {
    // Copies of one image make the work in flight: without the content cache, so that each costs its share.
    let server = TestServer::start(&model_dir("vit-b32"), &["--shutdown-timeout", "20s", "--cache-mb", "0"]).await;
    let client = server.client().await;
    // A stream left open by its client: it must not hold the shutdown up.
    let (tx, rx) = tokio::sync::mpsc::channel::<EmbedRequest>(4);
    tx.send(request(vec![text("s", "streamed")])).await.unwrap();
    let mut c = client.clone();
    let mut stream = c.embed_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(stream.next().await.unwrap().is_ok());
    let jpeg = image_bytes("landscape_640x480.jpg");
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let mut c = client.clone();
            let items = (0..4).map(|k| image(&format!("{i}-{k}"), jpeg.clone())).collect();
            tokio::spawn(async move { c.embed(request(items)).await })
        })
        .collect();
    // Wait until all 32 images are admitted (a loaded machine can take a while to get them there); one forward
    // pass over them takes over a second on this CPU, so they are still in flight.
    let mut in_flight = 0.0;
    for _ in 0..200 {
        in_flight = server.metric("clipserve_admitted_items").await;
        if in_flight >= 32.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(in_flight, 32.0, "the 8 calls of 4 images were not all admitted");

    let started = Instant::now();
    server.signal(libc::SIGTERM);
    // Not ready as soon as the signal is handled, and new work is refused, while in-flight work goes on.
    let ready_url = format!("{}/ready", server.http_url());
    wait_until("/ready answers 503", Duration::from_secs(10), || async {
        reqwest::get(&ready_url).await.is_ok_and(|r| r.status() == 503)
    })
    .await;
    let mut late = client.clone();
    let refused = late.embed(request(vec![text("late", "too late")])).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    for call in calls {
        let response = call.await.unwrap().expect("in-flight call answered").into_inner();
        assert_eq!(response.embeddings.len(), 4);
        assert!(response.embeddings.iter().all(|e| e.image_features.len() == 512));
    }
    // The open stream is ended by the server.
    assert!(tokio::time::timeout(Duration::from_secs(15), stream.next()).await.expect("stream left open").is_none());
    let status = server.wait_exit(Duration::from_secs(18));
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(18), "shutdown took {:?}", started.elapsed());
    drop(tx);
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_guards_embedding_but_not_health() {
    let server = TestServer::start(&model_dir("tiny"), &["--api-key", "s3cret"]).await;
    let mut client = server.client().await;
    let status = client.embed(request(vec![text("t", "x")])).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut with_key = tonic::Request::new(request(vec![text("t", "x")]));
    with_key.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
    assert_eq!(client.embed(with_key).await.unwrap().into_inner().embeddings.len(), 1);
    let mut wrong = tonic::Request::new(request(vec![text("t", "x")]));
    wrong.metadata_mut().insert("authorization", "Bearer s3creT".parse().unwrap());
    assert_eq!(client.embed(wrong).await.unwrap_err().code(), Code::Unauthenticated);

    let http = reqwest::Client::new();
    let body = serde_json::json!({"input_data": {"columns": ["text"], "data": [["a"]]}});
    let url = format!("{}/score", server.http_url());
    assert_eq!(http.post(&url).json(&body).send().await.unwrap().status(), 401);
    let r = http.post(&url).bearer_auth("s3cret").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(reqwest::get(format!("{}{open}", server.http_url())).await.unwrap().status(), 200, "{open}");
    }
    // gRPC health stays open too (TestServer::start already waited on it without a key).
}
