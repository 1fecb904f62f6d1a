//! The content cache and per-item timings over the wire: the same answers with the cache on and off, hits and
//! misses counted, identical inputs in flight computed once (within a call and across calls), a leader that goes
//! away handing its waiters back, errors never cached; timings in gRPC items, gRPC response metadata and HTTP
//! headers, with queue time that follows the batch delay and zero inference time for cached items.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use clipserve::pb::{item::Image, EmbedRequest, Embedding, Item};
use common::*;
use serde_json::{json, Value};

fn text(t: &str) -> Item {
    Item { id: t.into(), text: Some(t.into()), ..Default::default() }
}

fn image(file: &str) -> Item {
    Item { id: file.into(), image: Some(Image::ImageBytes(image_bytes(file))), ..Default::default() }
}

async fn embed(server: &TestServer, items: Vec<Item>, normalize: bool) -> Vec<Embedding> {
    let mut client = server.client().await;
    client.embed(EmbedRequest { items, normalize }).await.unwrap().into_inner().embeddings
}

const HITS_TEXT: &str = r#"clipserve_cache_hits_total{modality="text"}"#;
const HITS_IMAGE: &str = r#"clipserve_cache_hits_total{modality="image"}"#;
const MISSES_TEXT: &str = r#"clipserve_cache_misses_total{modality="text"}"#;
const MISSES_IMAGE: &str = r#"clipserve_cache_misses_total{modality="image"}"#;
const MODEL_TEXTS: &str = r#"clipserve_model_items_total{modality="text"}"#;
const MODEL_IMAGES: &str = r#"clipserve_model_items_total{modality="image"}"#;

async fn counts(server: &TestServer) -> [f64; 6] {
    let m = server.metrics().await;
    [HITS_TEXT, HITS_IMAGE, MISSES_TEXT, MISSES_IMAGE, MODEL_TEXTS, MODEL_IMAGES].map(|s| metric_value(&m, s))
}

fn timing(e: &Embedding) -> clipserve::pb::ItemTiming {
    e.timing.unwrap_or_else(|| panic!("item {} has no timing", e.id))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_changes_no_answer_counts_hits_and_computes_repeats_once() {
    let cached = TestServer::start(&model_dir("tiny"), &[]).await;
    let uncached = TestServer::start(&model_dir("tiny"), &["--cache-mb", "0"]).await;
    // Repeats inside the call: an image twice (once as bytes, once as base64 of the same bytes), a text three
    // times, an item with both.
    let jpeg = image_bytes("landscape_640x480.jpg");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&jpeg);
    let items = || {
        vec![
            image("landscape_640x480.jpg"),
            text("a photo of a cat"),
            Item { id: "b64".into(), image: Some(Image::ImageBase64(b64.clone())), ..Default::default() },
            text("a photo of a cat"),
            image("portrait_480x640.png"),
            Item {
                id: "both".into(),
                image: Some(Image::ImageBytes(jpeg.clone())),
                text: Some("a photo of a cat".into()),
            },
            text("a dog"),
        ]
    };
    let reference = embed(&uncached, items(), false).await;
    assert_eq!(counts(&uncached).await[..4], [0.0; 4], "no lookups with --cache-mb 0");
    assert!(reference.iter().all(|e| !timing(e).cached && timing(e).inference_us > 0));

    let first = embed(&cached, items(), false).await;
    // 2 distinct images and 2 distinct texts were computed; the other 4 inputs waited for them.
    let [ht, hi, mt, mi, model_t, model_i] = counts(&cached).await;
    assert_eq!((mt, mi, model_t, model_i), (2.0, 2.0, 2.0, 2.0), "each distinct input computed once");
    assert_eq!((ht, hi), (2.0, 2.0), "the repeats in the call are hits");
    let second = embed(&cached, items(), false).await;
    let [ht, hi, mt, mi, model_t, model_i] = counts(&cached).await;
    assert_eq!((mt, mi, model_t, model_i), (2.0, 2.0, 2.0, 2.0), "nothing new reached the model");
    assert_eq!((ht, hi), (6.0, 6.0));
    for (got, want) in [(&first, &reference), (&second, &reference)] {
        for (g, w) in got.iter().zip(want.iter()) {
            assert_eq!(g.id, w.id);
            assert_close(&g.image_features, &w.image_features, &format!("{} image", g.id));
            assert_close(&g.text_features, &w.text_features, &format!("{} text", g.id));
        }
    }
    // Repeats within a call and across calls are the very same numbers.
    assert_eq!(first[0].image_features, first[2].image_features);
    assert_eq!(first[1].text_features, second[3].text_features);
    for e in &second {
        let t = timing(e);
        assert!(t.cached && t.inference_us == 0, "{}: {t:?}", e.id);
    }
    // Normalization is applied after the cache.
    let unit = embed(&cached, vec![text("a dog")], true).await;
    let norm = unit[0].text_features.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");

    // Errors are not cached: the same corrupt image fails twice, and is looked up (missed) twice.
    let before = counts(&cached).await;
    for _ in 0..2 {
        let mut client = cached.client().await;
        let bad =
            Item { id: "bad".into(), image: Some(Image::ImageBytes(b"\x89PNG\r\n\x1a\nbroken".to_vec())), text: None };
        let status = client.embed(EmbedRequest { items: vec![bad], normalize: false }).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    let after = counts(&cached).await;
    assert_eq!((after[3] - before[3], after[1] - before[1]), (2.0, 0.0));

    // Over HTTP: a repeated /score is answered from the cache, and says so in its headers.
    let body = json!({"input_data": {"columns": ["image", "text"], "data": [[b64, "a dog"]]}});
    let r = reqwest::Client::new().post(format!("{}/score", cached.http_url())).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache-hits"], "1");
    assert_eq!(r.headers()["x-inference-time"], "0.000");
    let rows: Value = r.json().await.unwrap();
    let floats = |v: &Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
    assert_close(&floats(&rows[0]["image_features"]), &reference[0].image_features, "cached /score image");
}

#[tokio::test(flavor = "multi_thread")]
async fn identical_inputs_of_concurrent_calls_are_computed_once() {
    // A batch delay keeps the first input queued while the other calls arrive.
    let server = TestServer::start(&model_dir("tiny"), &["--max-batch-delay", "300ms"]).await;
    let calls = (0..8).map(|_| {
        let url = server.url();
        tokio::spawn(async move {
            let mut client = clipserve::pb::embedder_client::EmbedderClient::connect(url).await.unwrap();
            let items = vec![text("a red car parked next to a blue house"), image("gray_333x500.jpg")];
            client.embed(EmbedRequest { items, normalize: false }).await.unwrap().into_inner().embeddings
        })
    });
    let answers: Vec<Vec<Embedding>> = futures::future::join_all(calls).await.into_iter().map(Result::unwrap).collect();
    for a in &answers[1..] {
        assert_eq!(a[0].text_features, answers[0][0].text_features);
        assert_eq!(a[1].image_features, answers[0][1].image_features);
    }
    let [ht, hi, mt, mi, model_t, model_i] = counts(&server).await;
    assert_eq!((model_t, model_i), (1.0, 1.0), "eight calls, one forward pass per distinct input");
    assert_eq!((mt, mi, ht, hi), (1.0, 1.0, 7.0, 7.0));
    let shared = answers.iter().filter(|a| timing(&a[0]).cached).count();
    assert_eq!(shared, 7, "all but the leader report a cached answer");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_that_goes_away_hands_its_waiters_back() {
    // The batch delay holds the leader's input in the queue past its caller's deadline (or departure).
    let server = TestServer::start(&model_dir("tiny"), &["--max-batch-delay", "500ms"]).await;
    for (round, leaves_by) in ["deadline", "disconnect"].into_iter().enumerate() {
        let content = format!("a painting of round {round}");
        let mut leader = server.client().await;
        let lead_items = vec![text(&content)];
        let lead = tokio::spawn(async move {
            let mut request = tonic::Request::new(EmbedRequest { items: lead_items, normalize: false });
            if leaves_by == "deadline" {
                request.set_timeout(Duration::from_millis(200));
                leader.embed(request).await.map(|_| ())
            } else {
                // Dropping the call's future resets its stream: the server sees the caller go.
                let call = tokio::time::timeout(Duration::from_millis(200), leader.embed(request)).await;
                assert!(call.is_err(), "the leader's call should have been abandoned");
                Ok(())
            }
        });
        tokio::time::sleep(Duration::from_millis(60)).await; // the leader's input is queued
        let waiter = embed(&server, vec![text(&content)], false).await;
        if leaves_by == "deadline" {
            // The client's own timer may answer first (CANCELLED); the server holds the input's deadline either way.
            let status = lead.await.unwrap().unwrap_err();
            assert!(matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{status:?}");
        } else {
            lead.await.unwrap().unwrap();
        }
        assert_eq!(waiter[0].text_features.len(), 512, "{leaves_by}: the waiter got its embedding");
        let reference = embed(&server, vec![text(&content)], false).await;
        assert_eq!(waiter[0].text_features, reference[0].text_features);
        assert!(timing(&reference[0]).cached);
    }
    // Each round: the leader's input never ran, the waiter's did, once.
    assert_eq!(server.metric(MODEL_TEXTS).await, 2.0);
}

fn header_ms(headers: &reqwest::header::HeaderMap, name: &str) -> f64 {
    headers.get(name).unwrap_or_else(|| panic!("no {name}")).to_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn timings_come_with_every_item_and_every_answer() {
    let server = TestServer::start(&model_dir("tiny"), &["--cache-mb", "0", "--max-batch-delay", "250ms"]).await;
    // gRPC: per item, and for the call in the response metadata.
    let mut client = server.client().await;
    let started = Instant::now();
    let items = vec![image("large_2000x1500.jpg"), text("the quick brown fox"), image("exact_224x224.jpg")];
    let response = client.embed(EmbedRequest { items, normalize: false }).await.unwrap();
    let wall_us = started.elapsed().as_micros() as u64;
    for e in &response.get_ref().embeddings {
        let t = timing(e);
        assert!(!t.cached && t.inference_us > 0 && t.preprocess_us > 0, "{}: {t:?}", e.id);
        // Every input waits out the batch delay in the queue.
        assert!(t.queue_us >= 240_000, "{}: {t:?}", e.id);
        assert!(t.queue_us + t.preprocess_us + t.inference_us <= wall_us, "{}: {t:?} > {wall_us}us", e.id);
    }
    let big = timing(&response.get_ref().embeddings[0]);
    let small = timing(&response.get_ref().embeddings[2]);
    assert!(big.preprocess_us > small.preprocess_us, "a 2000x1500 JPEG takes longer to prepare: {big:?} {small:?}");
    let md = response.metadata();
    let total: f64 = md.get("x-total-time").unwrap().to_str().unwrap().parse().unwrap();
    let queue: f64 = md.get("x-queue-time").unwrap().to_str().unwrap().parse().unwrap();
    assert!(queue >= 240.0 && total >= queue && total <= wall_us as f64 / 1e3, "total {total} queue {queue}");

    // A stream's items carry their timings too.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(EmbedRequest { items: vec![text("streamed")], normalize: false }).await.unwrap();
    drop(tx);
    let mut stream = client.embed_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let message = stream.message().await.unwrap().unwrap();
    assert!(timing(&message.embeddings[0]).inference_us > 0);

    // HTTP: /score, /invocations and /v1/embeddings send the headers.
    let frame = json!({"columns": ["text"], "data": [["a"], ["b"]]});
    for (path, body) in [
        ("/score", json!({"input_data": frame})),
        ("/invocations", json!({"dataframe_split": frame})),
        ("/v1/embeddings", json!({"input": ["a", "b"]})),
    ] {
        let started = Instant::now();
        let r = reqwest::Client::new().post(format!("{}{path}", server.http_url())).json(&body).send().await.unwrap();
        let wall_ms = started.elapsed().as_secs_f64() * 1e3;
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        let [total, queue, pre, inf] =
            ["x-total-time", "x-queue-time", "x-preprocess-time", "x-inference-time"].map(|n| header_ms(h, n));
        assert!(queue >= 240.0 && inf > 0.0 && pre > 0.0, "{path}: queue {queue} preprocess {pre} inference {inf}");
        assert!(queue + pre + inf <= total + 0.01 && total <= wall_ms, "{path}: {total} vs {wall_ms}");
        assert_eq!(h["x-cache-hits"], "0");
    }
}
