//! The Azure ML-compatible HTTP gateway over real HTTP: the seed's sample requests, equality with the gRPC path,
//! base64 forms, image URLs from a loopback server, refused destinations, and errors that name the row.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use clipserve::pb::{item::Image, EmbedRequest, Item};
use common::*;
use serde_json::{json, Value};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// What Python's `base64.encodebytes` writes: lines of 76 characters, each ending in a newline.
fn encodebytes(bytes: &[u8]) -> String {
    b64(bytes).as_bytes().chunks(76).map(|c| format!("{}\n", std::str::from_utf8(c).unwrap())).collect()
}

fn frame(rows: Vec<[&str; 2]>) -> Value {
    let index: Vec<usize> = (0..rows.len()).collect();
    json!({"input_data": {"columns": ["image", "text"], "index": index, "data": rows}})
}

async fn post(server: &TestServer, path: &str, body: &Value) -> (u16, Value) {
    post_raw(server, path, serde_json::to_vec(body).unwrap()).await
}

async fn post_raw(server: &TestServer, path: &str, body: Vec<u8>) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", server.http_url()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("a list of numbers").iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_else(|| panic!("no error field in {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_samples_return_the_documented_shape_and_the_grpc_numbers() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let (img1, img2) = (image_bytes("landscape_640x480.jpg"), image_bytes("portrait_480x640.png"));
    let (e1, e2) = (b64(&img1), encodebytes(&img2));

    let (status, image_only) = post(&server, "/score", &frame(vec![[&e1, ""], [&e2, ""]])).await;
    assert_eq!(status, 200, "{image_only}");
    let (status, text_only) = post(&server, "/score", &frame(vec![["", "sample text 1"], ["", "sample text 2"]])).await;
    assert_eq!(status, 200, "{text_only}");
    let (status, both) = post(&server, "/score", &frame(vec![[&e1, "sample text 1"], [&e2, "sample text 2"]])).await;
    assert_eq!(status, 200, "{both}");

    // One object per row, only the keys asked for, 512 numbers each.
    for (body, keys) in [
        (&image_only, vec!["image_features"]),
        (&text_only, vec!["text_features"]),
        (&both, vec!["image_features", "text_features"]),
    ] {
        let rows = body.as_array().expect("a JSON list");
        assert_eq!(rows.len(), 2);
        for row in rows {
            let mut got: Vec<&str> = row.as_object().unwrap().keys().map(String::as_str).collect();
            got.sort_unstable();
            assert_eq!(got, keys, "{row}");
            for k in &keys {
                assert_eq!(floats(&row[*k]).len(), 512);
            }
        }
    }

    // The same numbers as the gRPC path.
    let mut client = server.client().await;
    let items = vec![
        Item { id: "a".into(), image: Some(Image::ImageBytes(img1)), text: Some("sample text 1".into()) },
        Item { id: "b".into(), image: Some(Image::ImageBytes(img2)), text: Some("sample text 2".into()) },
    ];
    let grpc = client.embed(EmbedRequest { items, normalize: false }).await.unwrap().into_inner().embeddings;
    for r in 0..2 {
        assert_close(&floats(&image_only[r]["image_features"]), &grpc[r].image_features, "image-only row");
        assert_close(&floats(&text_only[r]["text_features"]), &grpc[r].text_features, "text-only row");
        assert_close(&floats(&both[r]["image_features"]), &grpc[r].image_features, "both row, image");
        assert_close(&floats(&both[r]["text_features"]), &grpc[r].text_features, "both row, text");
    }
    // Unnormalized by default, unit length with params.normalize.
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm(&floats(&text_only[0]["text_features"])) - 1.0).abs() > 1e-3);
    let mut normalized = frame(vec![["", "sample text 1"]]);
    normalized["params"] = json!({"normalize": true});
    let (_, unit) = post(&server, "/score", &normalized).await;
    assert!((norm(&floats(&unit[0]["text_features"])) - 1.0).abs() < 1e-5);

    // MLflow's dataframe_split on /invocations, data URI and columns in the other order.
    let body = json!({"dataframe_split": {"columns": ["text", "image"],
        "data": [["sample text 1", format!("data:image/jpeg;base64,{e1}")]]}});
    let (status, mlflow) = post(&server, "/invocations", &body).await;
    assert_eq!(status, 200, "{mlflow}");
    let mlflow = &mlflow["predictions"];
    assert_close(&floats(&mlflow[0]["image_features"]), &grpc[0].image_features, "invocations image");
    assert_close(&floats(&mlflow[0]["text_features"]), &grpc[0].text_features, "invocations text");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_400_naming_the_row() {
    let server = TestServer::start(&model_dir("tiny"), &["--max-request-bytes", "100000"]).await;
    let jpeg = b64(&image_bytes("landscape_640x480.jpg"));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"input_data\": ".to_vec(), "malformed JSON"),
        (br#"{"input_data":{"columns":["picture","text"],"data":[["","a"]]}}"#.to_vec(), "unknown column"),
        (br#"{"input_data":{"data":[["","a"]]}}"#.to_vec(), "columns"),
        (br#"{"input_data":{"columns":["image","text"],"data":[["","a"],["b"]]}}"#.to_vec(), "row 1"),
        (br#"{"input_data":{"columns":["image","text"],"data":[["","a"],["!!not base64!!",""]]}}"#.to_vec(), "row 1"),
        (br#"{"input_data":{"columns":["image","text"],"data":[["",""]]}}"#.to_vec(), "row 0"),
        (
            format!(r#"{{"input_data":{{"columns":["image","text"],"data":[["{}","a"],["","b"]]}}}}"#, &jpeg[..64])
                .into_bytes(),
            "row 0",
        ),
    ];
    for (body, needle) in cases {
        let (status, answer) = post_raw(&server, "/score", body.clone()).await;
        assert_eq!(status, 400, "{}: {answer}", String::from_utf8_lossy(&body[..body.len().min(80)]));
        assert!(error_of(&answer).contains(needle), "{needle:?} not in {answer}");
    }
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes();
    assert_eq!(post_raw(&server, "/score", deep).await.0, 400);
    let (status, answer) = post_raw(&server, "/score", vec![b' '; 200_000]).await;
    assert_eq!(status, 413, "{answer}");
    assert!(error_of(&answer).contains("limit"));
}

/// A loopback image server for URL rows.
async fn image_server(to_loopback: SocketAddr, bind: &str) -> SocketAddr {
    use axum::response::{IntoResponse, Redirect};
    use axum::routing::get;
    let jpeg = image_bytes("landscape_640x480.jpg");
    let slow = jpeg.clone();
    let app = axum::Router::new()
        .route("/cat.jpg", get(move || async move { ([("content-type", "image/jpeg")], jpeg.clone()).into_response() }))
        .route("/redirect", get(|| async { Redirect::temporary("/cat.jpg") }))
        .route(
            "/slow",
            get(move || async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                slow.clone().into_response()
            }),
        )
        .route(
            "/page.html",
            get(|| async { ([("content-type", "text/html")], "<html><body>hi</body></html>").into_response() }),
        )
        .route("/to-loopback", get(move || async move { Redirect::temporary(&format!("http://{to_loopback}/x.jpg")) }));
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A listener that only counts the connections it is offered.
async fn counting_listener(bind: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((_socket, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread")]
async fn image_urls_are_fetched_when_allowed() {
    let (trap, _) = counting_listener("127.0.0.1:0").await;
    let host = image_server(trap, "127.0.0.1:0").await;
    let server = TestServer::start(&model_dir("tiny"), &["--allow-private-urls", "--url-timeout", "1s"]).await;
    let direct = format!("http://{host}/cat.jpg");
    let redirected = format!("http://{host}/redirect");
    let (status, body) = post(&server, "/score", &frame(vec![[&direct, "a"], [&redirected, ""]])).await;
    assert_eq!(status, 200, "{body}");
    let (_, by_b64) = post(&server, "/score", &frame(vec![[&b64(&image_bytes("landscape_640x480.jpg")), ""]])).await;
    let want = floats(&by_b64[0]["image_features"]);
    assert_close(&floats(&body[0]["image_features"]), &want, "URL row");
    assert_close(&floats(&body[1]["image_features"]), &want, "redirected URL row");
    assert_eq!(floats(&body[0]["text_features"]).len(), 512);

    // The gRPC path fetches too.
    let mut client = server.client().await;
    let items = vec![Item { id: "u".into(), image: Some(Image::ImageUrl(direct.clone())), text: None }];
    let grpc = client.embed(EmbedRequest { items, normalize: false }).await.unwrap().into_inner();
    assert_close(&grpc.embeddings[0].image_features, &want, "gRPC URL item");

    let started = std::time::Instant::now();
    let slow = format!("http://{host}/slow");
    let (status, body) = post(&server, "/score", &frame(vec![[&direct, ""], [&slow, ""]])).await;
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).starts_with("row 1") && error_of(&body).contains("timed out"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(4), "the URL timeout did not apply");

    let html = format!("http://{host}/page.html");
    let (status, body) = post(&server, "/score", &frame(vec![[&html, "x"]])).await;
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).starts_with("row 0") && error_of(&body).contains("not return an image"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn private_destinations_are_refused_without_a_connection() {
    let (v4, v4_count) = counting_listener("127.0.0.1:0").await;
    let (v6, v6_count) = counting_listener("[::1]:0").await;
    // 127.0.0.2 stands for an allowed host (as a public one would be) that redirects to loopback.
    let allowed = image_server(v4, "127.0.0.2:0").await;
    let server = TestServer::start(&model_dir("tiny"), &["--allow-url-cidr", "127.0.0.2/32"]).await;
    let port = v4.port();
    let urls = [
        format!("http://127.0.0.1:{port}/x.jpg"),
        format!("http://localhost:{port}/x.jpg"),
        format!("http://[::1]:{}/x.jpg", v6.port()),
        format!("http://2130706433:{port}/x.jpg"), // 127.0.0.1 in decimal
        format!("http://0177.0.0.1:{port}/x.jpg"), // and in octal
        format!("http://[::ffff:127.0.0.1]:{port}/x.jpg"),
        format!("http://{allowed}/to-loopback"),
    ];
    let mut messages = Vec::new();
    for url in &urls {
        let (status, body) = post(&server, "/score", &frame(vec![["", "fine"], [url, ""]])).await;
        assert_eq!(status, 400, "{url}: {body}");
        assert!(error_of(&body).starts_with("row 1"), "{url}: {body}");
        messages.push(error_of(&body).to_string());
    }
    // One text for every refusal: nothing to tell one network answer from another.
    assert!(messages.iter().all(|m| m == &messages[0]), "{messages:#?}");
    assert!(messages[0].contains("not allowed"), "{}", messages[0]);
    assert_eq!(v4_count.load(Ordering::SeqCst), 0, "a refused URL reached the loopback listener");
    assert_eq!(v6_count.load(Ordering::SeqCst), 0, "a refused URL reached the [::1] listener");
    // The allowed host itself is fetched.
    let (status, body) = post(&server, "/score", &frame(vec![[&format!("http://{allowed}/cat.jpg"), ""]])).await;
    assert_eq!(status, 200, "{body}");
}
