//! The OpenAI embeddings API over real HTTP: the official `openai` Python client against the real server (texts
//! and images, float and base64, data URIs, `"modality": "image"`, URLs, models, errors), equal to the server's
//! gRPC answers; and the exact shapes and statuses of answers and errors with a plain HTTP client.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use base64::Engine as _;
use clipserve::pb::{item::Image, EmbedRequest, InfoRequest, Item};
use common::*;
use serde_json::{json, Value};

const KEY: &str = "s3cret-key";

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("a list of numbers").iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn vectors(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().expect("a list of vectors").iter().map(floats).collect()
}

/// Texts of the reference fixtures (the empty one left out: OpenAI refuses empty strings) and their token counts.
fn fixture_texts() -> (Vec<String>, Vec<usize>) {
    let f = fixtures();
    let texts: Vec<String> = f["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let ids = f["models"]["tiny"]["token_ids"].as_array().unwrap();
    texts
        .into_iter()
        .zip(ids)
        .filter(|(t, _)| !t.is_empty())
        .take(6)
        .map(|(t, ids)| (t, ids.as_array().unwrap().len()))
        .unzip()
}

/// gRPC `Embed` answers (unit length) for these items, with the API key.
async fn grpc_normalized(server: &TestServer, items: Vec<Item>) -> Vec<clipserve::pb::Embedding> {
    let mut client = server.client().await;
    let mut request = tonic::Request::new(EmbedRequest { items, normalize: true });
    request.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    client.embed(request).await.unwrap().into_inner().embeddings
}

async fn image_server() -> SocketAddr {
    use axum::response::IntoResponse;
    let jpeg = image_bytes("landscape_640x480.jpg");
    let app = axum::Router::new().route(
        "/cat.jpg",
        axum::routing::get(move || async move { ([("content-type", "image/jpeg")], jpeg.clone()).into_response() }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn assert_all_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: number of vectors");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_close(g, w, &format!("{what}[{i}]"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_client_gets_the_grpc_answers() {
    let host = image_server().await;
    let server =
        TestServer::start(&model_dir("tiny"), &["--api-key", KEY, "--allow-private-urls", "--cache-mb", "0"]).await;
    let model_id = {
        let mut client = server.client().await;
        let mut request = tonic::Request::new(InfoRequest {});
        request.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
        client.info(request).await.unwrap().into_inner().model_id
    };
    let (texts, token_counts) = fixture_texts();
    let image_files = ["landscape_640x480.jpg", "portrait_480x640.png", "webp_320x240.webp"];
    let url = format!("http://{host}/cat.jpg");

    let mut command = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"));
    command
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/openai_client.py"))
        .args(["--base-url", &format!("{}/v1", server.http_url()), "--api-key", KEY, "--model", &model_id])
        .args(["--url", &url]);
    for t in &texts {
        command.args(["--text", t]);
    }
    for f in image_files {
        command.arg("--image").arg(fixtures_dir().join("images").join(f));
    }
    let output = command.output().expect("running the openai client");
    assert!(output.status.success(), "openai client failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let out: Value = serde_json::from_slice(&output.stdout).expect("the client's JSON");

    // The gRPC answers of the same server, normalized (OpenAI's embeddings are unit length).
    let text_items = texts.iter().map(|t| Item { text: Some(t.clone()), ..Default::default() }).collect();
    let grpc_texts: Vec<Vec<f32>> =
        grpc_normalized(&server, text_items).await.into_iter().map(|e| e.text_features).collect();
    let image_items = image_files
        .iter()
        .map(|f| Item { image: Some(Image::ImageBytes(image_bytes(f))), ..Default::default() })
        .chain([Item { image: Some(Image::ImageUrl(url.clone())), ..Default::default() }])
        .collect();
    let grpc_images: Vec<Vec<f32>> =
        grpc_normalized(&server, image_items).await.into_iter().map(|e| e.image_features).collect();

    for v in grpc_texts.iter().chain(&grpc_images) {
        let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "gRPC normalize gives unit vectors: {norm}");
    }
    assert_all_close(&vectors(&out["texts_float"]["vectors"]), &grpc_texts, "texts, float");
    assert_all_close(&vectors(&out["texts_default"]), &grpc_texts, "texts, client's default (base64)");
    assert_all_close(&vectors(&out["texts_base64"]["vectors"]), &grpc_texts, "texts, base64");
    assert_all_close(&vectors(&out["single"]), &grpc_texts[..1], "one string");
    assert_all_close(&vectors(&out["images_data_uri"]["vectors"]), &grpc_images[..3], "images, data URIs");
    assert_all_close(&vectors(&out["images_modality"]["vectors"]), &grpc_images[..3], "images, modality image");
    assert_all_close(&vectors(&out["image_url"]), &grpc_images[3..], "image URL");
    let mixed = vectors(&out["mixed"]["vectors"]);
    assert_all_close(&mixed, &[grpc_texts[0].clone(), grpc_images[0].clone()], "a text and an image");

    // The answer's shape: a list object, one embedding object per input in order, the model, CLIP token counts.
    let n = texts.len() as u64;
    let tokens: usize = token_counts.iter().sum();
    for (key, kind) in [("texts_float", "list"), ("texts_base64", "str")] {
        let r = &out[key];
        assert_eq!(r["object"], "list");
        assert_eq!(r["model"], model_id.as_str());
        assert_eq!(r["objects"], json!(["embedding"]));
        assert_eq!(r["kinds"], json!([kind]), "{key}");
        assert_eq!(r["indices"], json!((0..n).collect::<Vec<_>>()));
        assert_eq!(r["usage"], json!({"prompt_tokens": tokens, "total_tokens": tokens}), "{key}");
    }
    assert_eq!(out["images_data_uri"]["usage"]["prompt_tokens"], 0, "images count no tokens");
    assert_eq!(out["mixed"]["usage"]["prompt_tokens"], token_counts[0]);

    // Timings in the headers, in milliseconds.
    for h in ["x-total-time", "x-queue-time", "x-preprocess-time", "x-inference-time"] {
        let ms: f64 = out["headers"][h].as_str().unwrap_or_else(|| panic!("{h} missing")).parse().unwrap();
        assert!((0.0..60_000.0).contains(&ms), "{h}: {ms}");
    }
    assert!(out["headers"]["x-inference-time"].as_str().unwrap().parse::<f64>().unwrap() > 0.0);

    assert_eq!(out["models"], json!([model_id]));
    assert_eq!(out["retrieved"], model_id.as_str());

    // Errors as the client sees them: its exception class, the status, our reason as `code`, the parameter.
    let errors = &out["errors"];
    let expect = |name: &str, class: &str, status: u16, code: &str, param: Value| {
        let e = &errors[name];
        assert_eq!(
            (&e["class"], &e["status"], &e["code"], &e["param"]),
            (&json!(class), &json!(status), &json!(code), &param),
            "{name}: {e}"
        );
        assert!(!e["message"].as_str().unwrap().is_empty());
    };
    expect("unknown_model", "NotFoundError", 404, "MODEL_NOT_FOUND", json!("model"));
    expect("wrong_key", "AuthenticationError", 401, "UNAUTHENTICATED", Value::Null);
    expect("token_arrays", "BadRequestError", 400, "MALFORMED_REQUEST", json!("input"));
    expect("dimensions", "BadRequestError", 400, "MALFORMED_REQUEST", json!("dimensions"));
    expect("bad_image", "BadRequestError", 400, "UNSUPPORTED_IMAGE_FORMAT", json!("input"));
    expect("retrieve_unknown", "NotFoundError", 404, "MODEL_NOT_FOUND", json!("model"));
    assert!(errors["bad_image"]["message"].as_str().unwrap().starts_with("input[1]"), "{}", errors["bad_image"]);
    assert!(errors["token_arrays"]["message"].as_str().unwrap().contains("not supported"));
    assert_eq!(errors["wrong_key"]["type"], "authentication_error");
    assert_eq!(errors["unknown_model"]["type"], "invalid_request_error");
}

async fn post(
    server: &TestServer,
    path: &str,
    body: Vec<u8>,
    key: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", server.http_url()))
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let r = request.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.unwrap();
    (status, headers, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

/// OpenAI's error object, exactly: four keys.
fn assert_openai_error(body: &Value, code: &str, param: Value, message_part: &str) {
    let e = body["error"].as_object().unwrap_or_else(|| panic!("no error object: {body}"));
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    assert_eq!((&e["code"], &e["param"]), (&json!(code), &param), "{body}");
    assert!(e["message"].as_str().unwrap().contains(message_part), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_and_errors_have_openais_shapes_and_the_tables_statuses() {
    let server = TestServer::start(
        &model_dir("tiny"),
        &["--api-key", KEY, "--max-items-per-request", "4", "--max-request-bytes", "200000", "--max-text-chars", "50"],
    )
    .await;
    let model_id = {
        let r = reqwest::Client::new().get(format!("{}/v1/models", server.http_url())).bearer_auth(KEY);
        let models: Value = r.send().await.unwrap().json().await.unwrap();
        assert_eq!(models["object"], "list");
        let m = &models["data"][0];
        assert_eq!((&m["object"], &m["owned_by"]), (&json!("model"), &json!("clipserve")));
        assert!(m["created"].as_u64().unwrap() > 1_600_000_000);
        m["id"].as_str().unwrap().to_string()
    };
    // GET /v1/models/{id} with the id's slash.
    let r = reqwest::Client::new().get(format!("{}/v1/models/{model_id}", server.http_url())).bearer_auth(KEY);
    let one: Value = r.send().await.unwrap().json().await.unwrap();
    assert_eq!(one["id"], model_id.as_str());

    // A successful answer, exactly: list, data, model, usage, and nothing else.
    let body = json!({"model": model_id, "input": ["a photo of a cat", "a dog"]});
    let (status, headers, answer) =
        post(&server, "/v1/embeddings", serde_json::to_vec(&body).unwrap(), Some(KEY)).await;
    assert_eq!(status, 200, "{answer}");
    let mut keys: Vec<&str> = answer.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["data", "model", "object", "usage"]);
    assert_eq!(answer["usage"], json!({"prompt_tokens": 11, "total_tokens": 11}));
    let datum = answer["data"][1].as_object().unwrap();
    assert_eq!(datum.len(), 3);
    assert_eq!((&datum["object"], &datum["index"]), (&json!("embedding"), &json!(1)));
    assert_eq!(floats(&datum["embedding"]).len(), 512);
    assert!(headers.contains_key("x-inference-time") && headers.contains_key("x-total-time"));
    // base64: 512 little-endian float32s.
    let body = json!({"input": "a dog", "encoding_format": "base64"});
    let (status, _, b64) = post(&server, "/v1/embeddings", serde_json::to_vec(&body).unwrap(), Some(KEY)).await;
    assert_eq!(status, 200, "{b64}");
    let raw = base64::engine::general_purpose::STANDARD.decode(b64["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(decoded, floats(&answer["data"][1]["embedding"]));

    // Body, API key, status, code, param, part of the message.
    type Case<'a> = (Vec<u8>, Option<&'a str>, u16, &'a str, Value, &'a str);
    let cases: Vec<Case> = vec![
        (br#"{"input": "a"}"#.to_vec(), None, 401, "UNAUTHENTICATED", Value::Null, "API key"),
        (br#"{"input": "a"}"#.to_vec(), Some("nope"), 401, "UNAUTHENTICATED", Value::Null, "API key"),
        (b"{not json".to_vec(), Some(KEY), 400, "MALFORMED_REQUEST", Value::Null, "malformed JSON"),
        (
            br#"{"input": ["a","b","c","d","e"]}"#.to_vec(),
            Some(KEY),
            413,
            "TOO_MANY_ITEMS",
            json!("input"),
            "limit of 4",
        ),
        (
            format!(r#"{{"input": "{}"}}"#, "x".repeat(51)).into_bytes(),
            Some(KEY),
            413,
            "TEXT_TOO_LONG",
            json!("input"),
            "input[0]",
        ),
        (vec![b' '; 300_000], Some(KEY), 413, "REQUEST_TOO_LARGE", Value::Null, "200000 bytes"),
        (
            br#"{"input": "a", "model": "clip"}"#.to_vec(),
            Some(KEY),
            404,
            "MODEL_NOT_FOUND",
            json!("model"),
            "not served",
        ),
        (
            br#"{"input": ["a", "data:image/jpeg;base64,!!!"]}"#.to_vec(),
            Some(KEY),
            400,
            "INVALID_BASE64",
            json!("input"),
            "input[1]",
        ),
        (
            br#"{"input": "aGVsbG8=", "modality": "image"}"#.to_vec(),
            Some(KEY),
            400,
            "UNSUPPORTED_IMAGE_FORMAT",
            json!("input"),
            "input[0]",
        ),
        (
            br#"{"input": "http://127.0.0.1:9/x.jpg", "modality": "image"}"#.to_vec(),
            Some(KEY),
            400,
            "URL_NOT_ALLOWED",
            json!("input"),
            "input[0]",
        ),
        (br#"{"input": [""]}"#.to_vec(), Some(KEY), 400, "EMPTY_ITEM", json!("input"), "empty string"),
    ];
    for (body, key, status, code, param, part) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        let (got, headers, answer) = post(&server, "/v1/embeddings", body, key).await;
        assert_eq!(got, status, "{shown}: {answer}");
        assert_openai_error(&answer, code, param, part);
        assert_eq!(headers["content-type"], "application/json");
    }
    // /v1/models needs the key too; the Azure route keeps its own error shape.
    let r = reqwest::Client::new().get(format!("{}/v1/models", server.http_url())).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_openai_error(&r.json().await.unwrap(), "UNAUTHENTICATED", Value::Null, "API key");
    let (status, _, azure) = post(&server, "/score", b"{}".to_vec(), Some(KEY)).await;
    assert_eq!(status, 400);
    assert_eq!(azure["reason"], "MALFORMED_REQUEST", "{azure}");
}
