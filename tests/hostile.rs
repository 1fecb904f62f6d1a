//! Hostile inputs and abusive clients, over the wire against the real server: extreme image shapes on every
//! decoder, progressive-JPEG scan bombs, work cancelled mid-decode, fairness between a large and a small call,
//! admission that a cancel-and-resend loop cannot cheat, oversized ids, image URLs that never answer, and the
//! machine-readable reason of each error. Every case asserts its time (and memory where it matters).

mod common;

use std::io::Cursor;
use std::time::{Duration, Instant};

use clipserve::error::status_reason;
use clipserve::pb::{item::Image, EmbedRequest, Item};
use common::*;
use futures::StreamExt;
use tonic::Code;

fn image(id: &str, bytes: Vec<u8>) -> Item {
    Item { id: id.into(), image: Some(Image::ImageBytes(bytes)), text: None }
}

fn request(items: Vec<Item>) -> EmbedRequest {
    EmbedRequest { items, normalize: false }
}

fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A striped RGB image of `w` x `h`.
fn stripes(w: u32, h: u32) -> image::DynamicImage {
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([((x * 7 + y * 3) % 256) as u8, ((x ^ y) % 256) as u8, 90])
    }))
}

/// A progressive JPEG of `w` x `h` whose last scan is repeated `extra` times: each repeat costs the decoder a
/// pass over the whole image (a "scan bomb"), for a few bytes of file.
fn scan_bomb(w: usize, h: usize, extra: usize) -> Vec<u8> {
    let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    c.set_fastest_defaults();
    c.set_size(w, h);
    c.set_quality(80.0);
    c.set_progressive_mode();
    let mut started = c.start_compress(Vec::new()).unwrap();
    let row = vec![128u8; w * 3];
    for _ in 0..h {
        started.write_scanlines(&row).unwrap();
    }
    let jpeg = started.finish().unwrap();
    let last_sos = jpeg.windows(2).rposition(|p| p == [0xFF, 0xDA]).unwrap();
    let eoi = jpeg.len() - 2;
    assert_eq!(&jpeg[eoi..], &[0xFF, 0xD9]);
    let mut out = jpeg[..eoi].to_vec();
    for _ in 0..extra {
        out.extend_from_slice(&jpeg[last_sos..eoi]);
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

fn reason(status: &tonic::Status) -> String {
    status_reason(status).unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn extreme_shapes_cost_what_they_produce_on_every_decoder() {
    use image::ImageFormat::*;
    let server = TestServer::start(&model_dir("tiny"), &["--max-image-bytes", "64000000"]).await;
    let mut client = server.client().await;
    let baseline = rss_mib(server.pid());
    // (name, encoded image): one side a single pixel, the other as long as each format allows.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("png 1x300000", encode(stripes(1, 300_000), Png)),
        ("png 300000x1", encode(stripes(300_000, 1), Png)),
        ("png 1x9000000", encode(stripes(1, 9_000_000), Png)),
        ("gif 1x65535", encode(stripes(1, 65_535), Gif)),
        ("gif 65535x1", encode(stripes(65_535, 1), Gif)),
        ("bmp 1x65535", encode(stripes(1, 65_535), Bmp)),
        ("webp 1x16383", encode(stripes(1, 16_383), WebP)),
        ("webp 16383x1", encode(stripes(16_383, 1), WebP)),
        ("jpeg 1x65500", encode(stripes(1, 65_500), Jpeg)),
        ("jpeg 65500x1", encode(stripes(65_500, 1), Jpeg)),
        ("jpeg 2x60000 progressive", scan_bomb(2, 60_000, 0)),
    ];
    for (name, bytes) in cases {
        let start = Instant::now();
        let answer = client.embed(request(vec![image(name, bytes)])).await;
        let took = start.elapsed();
        let e = answer.unwrap_or_else(|s| panic!("{name}: {s:?}")).into_inner();
        assert_eq!(e.embeddings[0].image_features.len(), 512, "{name}");
        assert!(took < Duration::from_secs(3), "{name} took {took:?}");
        eprintln!("{name}: embedded in {took:?}");
    }
    // Long sides whose resize Pillow cannot represent (224 x 20,000,000 > 2^31) are refused from the header,
    // naming the limit, before any pixel is decoded.
    let start = Instant::now();
    let flat = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(1, 20_000_000, image::Rgb([9, 99, 199])));
    let huge = encode(flat, Png);
    eprintln!("png 1x20000000: {} bytes", huge.len());
    let status = client.embed(request(vec![image("huge", huge)])).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "IMAGE_DIMENSIONS_TOO_LARGE");
    assert!(status.message().contains("2147483647"), "{}", status.message());
    assert!(start.elapsed() < Duration::from_secs(3));
    // BMPs are decoded up to 65535 pixels a side: past it, the same reason, naming that limit.
    let status = client.embed(request(vec![image("bmp", encode(stripes(1, 300_000), Bmp))])).await.unwrap_err();
    assert_eq!(reason(&status), "IMAGE_DIMENSIONS_TOO_LARGE");
    assert!(status.message().contains("65535"), "{}", status.message());
    let grown = rss_mib(server.pid()) - baseline;
    eprintln!("RSS growth over the extreme shapes: {grown:.0} MiB");
    assert!(grown < 400.0, "RSS grew by {grown:.0} MiB");
    // The server is alive and well.
    let ok = client.embed(request(vec![image("ok", image_bytes("landscape_640x480.jpg"))])).await.unwrap();
    assert_eq!(ok.into_inner().embeddings[0].image_features.len(), 512);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_gif_frames_cost_one_frame() {
    // A GIF of 3000 frames: only the first frame is decoded, as Pillow's Image.open + convert does.
    let frames: Vec<image::Frame> = (0..3000)
        .map(|i| image::Frame::new(image::RgbaImage::from_pixel(120, 90, image::Rgba([(i % 256) as u8, 10, 20, 255]))))
        .collect();
    let mut gif = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut gif);
        encoder.encode_frames(frames).unwrap();
    }
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let mut client = server.client().await;
    let start = Instant::now();
    let answer = client.embed(request(vec![image("frames", gif)])).await.unwrap().into_inner();
    assert_eq!(answer.embeddings[0].image_features.len(), 512);
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_progressive_scan_bomb_is_refused_at_the_scan_limit() {
    let bomb = scan_bomb(3000, 3000, 20_000);
    eprintln!("scan bomb: {} bytes", bomb.len());
    let server = TestServer::start(&model_dir("tiny"), &["--max-jpeg-scans", "50"]).await;
    let mut client = server.client().await;
    let (cpu, rss) = (cpu_seconds(server.pid()), rss_mib(server.pid()));
    let start = Instant::now();
    let status = client.embed(request(vec![image("bomb", bomb.clone())])).await.unwrap_err();
    let took = start.elapsed();
    eprintln!(
        "scan bomb refused in {took:?}, {:.2} CPU s, RSS {:+.0} MiB",
        cpu_seconds(server.pid()) - cpu,
        rss_mib(server.pid()) - rss
    );
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "IMAGE_TOO_COMPLEX");
    assert!(status.message().contains("50 scans"), "{}", status.message());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // In a stream it fails alone.
    let outbound = futures::stream::iter(vec![
        request(vec![image("bomb", bomb)]),
        request(vec![image("ok", image_bytes("landscape_640x480.jpg"))]),
    ]);
    let answers: Vec<_> = client.embed_stream(outbound).await.unwrap().into_inner().collect().await;
    let bomb_answer = answers[0].as_ref().unwrap().embeddings[0].error.clone().expect("an item error");
    assert_eq!(bomb_answer.reason, "IMAGE_TOO_COMPLEX");
    assert_eq!(answers[1].as_ref().unwrap().embeddings[0].image_features.len(), 512);
}

#[tokio::test(flavor = "multi_thread")]
async fn decoding_stops_when_the_deadline_passes() {
    // No scan limit to speak of, one preprocessing thread: only the deadline can stop the bomb, and the thread
    // must be free again right after it.
    let server = TestServer::start(&model_dir("tiny"), &["--max-jpeg-scans", "1000000", "--cpu-threads", "1"]).await;
    let mut client = server.client().await;
    let bomb = scan_bomb(3000, 3000, 20_000);
    let mut call = tonic::Request::new(request(vec![image("bomb", bomb)]));
    call.set_timeout(Duration::from_secs(1));
    let cpu = cpu_seconds(server.pid());
    let start = Instant::now();
    let status = client.embed(call).await.unwrap_err();
    assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}");
    let normal = Instant::now();
    let ok = client.embed(request(vec![image("ok", image_bytes("landscape_640x480.jpg"))])).await.unwrap();
    assert_eq!(ok.into_inner().embeddings[0].image_features.len(), 512);
    let waited = normal.elapsed();
    eprintln!(
        "bomb answered after {:?}; a normal call then took {waited:?}; {:.2} CPU s in all",
        normal - start,
        cpu_seconds(server.pid()) - cpu
    );
    assert!(waited < Duration::from_secs(2), "the preprocessing thread was still busy: {waited:?}");
    // And nothing goes on burning CPU for the abandoned item.
    let before = cpu_seconds(server.pid());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = cpu_seconds(server.pid()) - before;
    assert!(idle < 0.3, "{idle:.2} CPU s used in a second after the bomb was abandoned");
    assert!(server.metric("clipserve_dropped_items_total{reason=\"deadline\"}").await >= 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_call_is_not_stuck_behind_a_large_one() {
    let server = TestServer::start(&model_dir("tiny"), &["--cpu-threads", "1"]).await;
    let client = server.client().await;
    // 256 different texts of 16,000 characters each (the content cache would compute equal ones once): tokenizing
    // them takes seconds on one thread.
    let long = "a quick brown fox jumps over the lazy dog ".repeat(380);
    let big: Vec<Item> =
        (0..256).map(|i| Item { id: i.to_string(), image: None, text: Some(format!("{i} {long}")) }).collect();
    let mut c = client.clone();
    let large = tokio::spawn(async move {
        let start = Instant::now();
        c.embed(request(big)).await.unwrap();
        start.elapsed()
    });
    wait_until("the large call is admitted", Duration::from_secs(10), || async {
        server.metric("clipserve_admitted_items").await > 0.0
    })
    .await;
    let start = Instant::now();
    let mut c = client.clone();
    c.embed(request(vec![image("small", image_bytes("landscape_640x480.jpg"))])).await.unwrap();
    let small = start.elapsed();
    let large = large.await.unwrap();
    eprintln!("large call {large:?}, small call made during it {small:?}");
    assert!(large > Duration::from_secs(1), "the large call was too quick to tell ({large:?})");
    assert!(small < large / 5, "small call {small:?} vs large call {large:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_resend_cannot_hold_more_than_the_queue() {
    // Copies of one image make the load: without the content cache, so that each is decoded.
    let server =
        TestServer::start(&model_dir("tiny"), &["--max-queued-items", "8", "--cpu-threads", "1", "--cache-mb", "0"])
            .await;
    let client = server.client().await;
    let jpeg = image_bytes("large_2000x1500.jpg");
    let mut refused = 0;
    let mut most = 0f64;
    for round in 0..12 {
        let items: Vec<Item> = (0..8).map(|i| image(&format!("{round}-{i}"), jpeg.clone())).collect();
        let mut c = client.clone();
        let mut call = tonic::Request::new(request(items));
        call.set_timeout(Duration::from_millis(40));
        match c.embed(call).await {
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert_eq!(reason(&s), "QUEUE_FULL");
                refused += 1;
            }
            _ => {}
        }
        most = most.max(server.metric("clipserve_admitted_items").await);
    }
    eprintln!("refused {refused} of 12 resends; admitted gauge at most {most}");
    assert!(most <= 8.0, "admitted gauge reached {most}");
    assert!(refused > 0, "cancelled work released its capacity before it finished");
    // Once the abandoned work has drained, everything is released.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("clipserve_admitted_items").await > 0.0 {
        assert!(Instant::now() < deadline, "capacity never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn long_ids_are_refused_and_error_messages_stay_short() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let mut client = server.client().await;
    let id = "x".repeat(200_000);
    let item = Item { id: id.clone(), image: None, text: None };
    let status = client.embed(request(vec![item.clone()])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "ID_TOO_LONG");
    assert!(status.message().len() <= 1024, "message of {} bytes", status.message().len());
    // An empty item with a long (but allowed) id: INVALID_ARGUMENT, the id cut in the message.
    let item = Item { id: "y".repeat(1000), image: None, text: None };
    let status = client.embed(request(vec![item])).await.unwrap_err();
    assert_eq!((status.code(), reason(&status).as_str()), (Code::InvalidArgument, "EMPTY_ITEM"));
    assert!(status.message().len() < 200, "{}", status.message());
    // In a stream: the item's own error, the stream goes on.
    let ok = Item { id: "ok".into(), image: None, text: Some("a photo".into()) };
    let answers: Vec<_> = client
        .embed_stream(futures::stream::iter(vec![request(vec![Item { id, image: None, text: Some("t".into()) }, ok])]))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let e = &answers[0].as_ref().unwrap().embeddings;
    assert_eq!(e[0].error.as_ref().unwrap().reason, "ID_TOO_LONG");
    assert_eq!(e[1].text_features.len(), 512);
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_carry_a_reason_on_both_transports() {
    let server =
        TestServer::start(&model_dir("tiny"), &["--max-image-bytes", "100000", "--max-text-chars", "50"]).await;
    let mut client = server.client().await;
    let cases: Vec<(Item, Code, &str)> = vec![
        (image("garbage", b"not an image at all".to_vec()), Code::InvalidArgument, "UNSUPPORTED_IMAGE_FORMAT"),
        (image("big", image_bytes("large_2000x1500.jpg")), Code::ResourceExhausted, "IMAGE_TOO_LARGE"),
        (
            Item { id: "b64".into(), image: Some(Image::ImageBase64("!!!".into())), text: None },
            Code::InvalidArgument,
            "INVALID_BASE64",
        ),
        (Item { id: "t".into(), image: None, text: Some("a".repeat(51)) }, Code::ResourceExhausted, "TEXT_TOO_LONG"),
    ];
    for (item, code, want) in cases {
        let status = client.embed(request(vec![item])).await.unwrap_err();
        assert_eq!((status.code(), reason(&status).as_str()), (code, want), "{status:?}");
    }
    let body = serde_json::json!({"input_data": {"columns": ["image", "text"], "data": [["", "a".repeat(51)]]}});
    let answer = reqwest::Client::new().post(format!("{}/score", server.http_url())).json(&body).send().await.unwrap();
    assert_eq!(answer.status(), 413);
    let v: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(v["reason"], "TEXT_TOO_LONG", "{v}");
    assert!(v["error"].as_str().unwrap().contains("row 0"), "{v}");
}

/// A loopback HTTP server whose `/hang` never answers and `/missing` answers 404 at once.
async fn bad_image_host() -> std::net::SocketAddr {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/hang",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "never"
            }),
        )
        .route("/missing", get(|| async { (axum::http::StatusCode::NOT_FOUND, "no") }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn image_urls_have_a_request_deadline_and_a_unary_call_fails_fast() {
    let host = bad_image_host().await;
    let server = TestServer::start(
        &model_dir("tiny"),
        &[
            "--allow-private-urls",
            "--url-timeout",
            "20s",
            "--url-request-timeout",
            "1s",
            "--url-fetch-concurrency",
            "4",
        ],
    )
    .await;
    let mut client = server.client().await;
    let url = |path: &str, i: usize| Item {
        id: format!("{path}{i}"),
        image: Some(Image::ImageUrl(format!("http://{host}/{path}?{i}"))),
        text: None,
    };
    // 20 URLs that never answer, 4 at a time, each allowed 20 s: the request as a whole gets 1 s.
    let start = Instant::now();
    let answers: Vec<_> = client
        .embed_stream(futures::stream::iter(vec![request((0..20).map(|i| url("hang", i)).collect())]))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let took = start.elapsed();
    let embeddings = &answers[0].as_ref().unwrap().embeddings;
    assert_eq!(embeddings.len(), 20);
    assert!(embeddings.iter().all(|e| e.error.as_ref().is_some_and(|e| e.reason == "URL_FETCH_FAILED")));
    assert!(took < Duration::from_secs(4), "took {took:?}");
    // A unary call fails as soon as one URL has failed, without waiting for the others.
    let mut items: Vec<Item> = (0..3).map(|i| url("hang", i)).collect();
    items.push(url("missing", 0));
    let start = Instant::now();
    let status = client.embed(request(items)).await.unwrap_err();
    assert_eq!(reason(&status), "URL_FETCH_FAILED");
    assert!(status.message().contains("item 3"), "{}", status.message());
    assert!(start.elapsed() < Duration::from_millis(900), "took {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_behind_a_full_queue_stay_within_the_memory_budget() {
    let server = TestServer::start(
        &model_dir("tiny"),
        &[
            "--max-queued-items",
            "1",
            "--cpu-threads",
            "1",
            "--max-jpeg-scans",
            "1000000",
            "--memory-budget-bytes",
            "33554432",
            "--max-image-bytes",
            "41943040",
        ],
    )
    .await;
    let client = server.client().await;
    let baseline = rss_mib(server.pid());
    // One slow item holds the only queue slot while the streams arrive.
    let mut c = client.clone();
    let holder =
        tokio::spawn(async move { c.embed(request(vec![image("slow", scan_bomb(3000, 3000, 20_000))])).await });
    wait_until("the slow item holds the queue slot", Duration::from_secs(10), || async {
        server.metric("clipserve_admitted_items").await >= 1.0
    })
    .await;
    // Four streams, each offering 16 messages of 10 MB: without a budget they would buffer ~640 MB.
    let payload = vec![7u8; 10 << 20];
    let mut streams = Vec::new();
    for s in 0..4 {
        let mut c = client.clone();
        let messages: Vec<EmbedRequest> =
            (0..16).map(|i| request(vec![image(&format!("{s}-{i}"), payload.clone())])).collect();
        streams.push(tokio::spawn(async move {
            let answers = c.embed_stream(futures::stream::iter(messages)).await;
            if let Ok(a) = answers {
                let _ = tokio::time::timeout(Duration::from_secs(60), a.into_inner().collect::<Vec<_>>()).await;
            }
        }));
    }
    let mut peak = 0f64;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_mib(server.pid()) - baseline);
    }
    let held = server.metric("clipserve_memory_budget_held_bytes").await;
    eprintln!("RSS growth peak {peak:.0} MiB with 4 streams of 10 MB messages; budget held {held} bytes");
    assert!(held <= 32.0 * 1024.0 * 1024.0, "budget overdrawn: {held}");
    assert!(peak < 250.0, "RSS grew by {peak:.0} MiB");
    for s in streams {
        s.abort();
    }
    holder.abort();
    // Everything is released once the callers have gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("clipserve_memory_budget_held_bytes").await > 0.0 {
        assert!(Instant::now() < deadline, "the budget was never given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_while_preparing_an_item_fails_that_item_only() {
    let server = TestServer::start(&model_dir("tiny"), &["--inject-preprocess-panic", "boom"]).await;
    let mut client = server.client().await;
    let text = |id: &str, t: &str| Item { id: id.into(), image: None, text: Some(t.into()) };
    // Unary: INTERNAL for the call, with the reason, naming the item.
    let status = client.embed(request(vec![text("a", "fine"), text("b", "boom")])).await.unwrap_err();
    assert_eq!((status.code(), reason(&status).as_str()), (Code::Internal, "INTERNAL_PANIC"), "{status:?}");
    assert!(status.message().contains("item 1"), "{}", status.message());
    // In a stream: that item's error, its neighbours and the next messages are embedded.
    let messages = vec![
        request(vec![text("c", "before"), text("d", "boom"), text("e", "after")]),
        request(vec![text("f", "next message")]),
    ];
    let answers: Vec<_> =
        client.embed_stream(futures::stream::iter(messages)).await.unwrap().into_inner().collect().await;
    let first = &answers[0].as_ref().unwrap().embeddings;
    assert_eq!(first[0].text_features.len(), 512);
    assert_eq!(first[1].error.as_ref().unwrap().reason, "INTERNAL_PANIC");
    assert_eq!(first[2].text_features.len(), 512);
    assert_eq!(answers[1].as_ref().unwrap().embeddings[0].text_features.len(), 512);
    assert_eq!(server.metric(r#"clipserve_panics_total{stage="tokenize"}"#).await, 2.0);
    // Logged once per panic, with the item's index, and never through the default panic hook.
    let mut log: Vec<String> = Vec::new();
    wait_until("both panics are logged", Duration::from_secs(10), || {
        log.extend(server.log.try_iter());
        let logged = log.iter().filter(|l| l.contains("injected preprocessing fault")).count();
        async move { logged >= 2 }
    })
    .await;
    log.extend(server.log.try_iter());
    let panics: Vec<&String> = log.iter().filter(|l| l.contains("injected preprocessing fault")).collect();
    assert_eq!(panics.len(), 2, "{panics:#?}");
    assert!(panics.iter().all(|l| l.contains("text of item 1")), "{panics:#?}");
    assert!(!log.iter().any(|l| l.contains("panicked at")), "the default hook printed a panic");
}
