//! Zero-shot classification over the wire: gRPC `Classify` and the `zero-shot-image-classification` flavour of
//! `/score` and `/invocations`, against transformers' zero-shot-image-classification pipeline on the same weights
//! (dev/make_test_fixtures.py); the label embedding cache and its metrics; the errors and their reasons.

mod common;

use base64::Engine as _;
use clipserve::pb::{item::Image, ClassifyRequest, Item};
use common::*;
use serde_json::{json, Value};
use tonic::Code;

/// One reference case: images classified against labels by the pipeline.
struct Case {
    images: Vec<String>,
    labels: Vec<String>,
    template: Option<String>,
    /// Per image, the pipeline's probability of each label, in label order.
    probs: Vec<Vec<f32>>,
    /// Per image, the cosine with each label's text.
    cosines: Vec<Vec<f32>>,
    logit_scale: f64,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().expect("a list").iter().map(|s| s.as_str().expect("a string").to_string()).collect()
}

fn cases(model: &str) -> Vec<Case> {
    let f = fixtures();
    let cases = f["models"][model]["zero_shot"].as_array().expect("zero-shot fixtures: run dev/test.sh");
    assert!(cases.len() >= 4);
    cases
        .iter()
        .map(|c| Case {
            images: strings(&c["images"]),
            labels: strings(&c["labels"]),
            template: c["template"].as_str().map(str::to_string),
            probs: matrix(&c["probs"]),
            cosines: matrix(&c["cosines"]),
            logit_scale: c["logit_scale"].as_f64().unwrap(),
        })
        .collect()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The largest absolute difference between two equally long vectors.
fn max_diff(a: &[f32], b: &[f32], what: &str) -> f32 {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// A loopback server for the fixture images, at `/NAME`.
async fn image_server() -> String {
    use axum::extract::Path;
    let app = axum::Router::new().route(
        "/{name}",
        axum::routing::get(|Path(name): Path<String>| async move {
            ([("content-type", "application/octet-stream")], image_bytes(&name))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// Every reference case through gRPC Classify, images sent as bytes, base64 and URLs in turn; probabilities to
/// 1e-4 (the task's bound) and cosines to 1e-5.
async fn classify_matches_the_pipeline(model: &str) {
    let images_at = image_server().await;
    let server = TestServer::start(&model_dir(model), &["--allow-private-urls"]).await;
    let mut client = server.client().await;
    let (mut worst_prob, mut worst_cosine) = (0f32, 0f32);
    let mut sent = 0;
    for (c, case) in cases(model).iter().enumerate() {
        let images = case
            .images
            .iter()
            .map(|file| {
                sent += 1;
                let image = match sent % 3 {
                    0 => Image::ImageBytes(image_bytes(file)),
                    1 => Image::ImageBase64(b64(&image_bytes(file))),
                    _ => Image::ImageUrl(format!("{images_at}/{file}")),
                };
                Item { id: format!("{c}:{file}"), image: Some(image), text: None }
            })
            .collect();
        let request = ClassifyRequest { images, labels: case.labels.clone(), template: case.template.clone() };
        let answer = client.classify(request).await.unwrap_or_else(|e| panic!("case {c}: {e:?}")).into_inner();
        let scale = case.logit_scale.exp();
        assert!((answer.scale as f64 - scale).abs() < 1e-4 * scale, "case {c}: scale {} for {scale}", answer.scale);
        assert_eq!(answer.classifications.len(), case.images.len(), "case {c}");
        for (i, got) in answer.classifications.iter().enumerate() {
            assert_eq!(got.id, format!("{c}:{}", case.images[i]));
            let what = format!("{model} case {c} image {}", case.images[i]);
            worst_prob = worst_prob.max(max_diff(&got.probs, &case.probs[i], &what));
            worst_cosine = worst_cosine.max(max_diff(&got.scores, &case.cosines[i], &what));
            let sum: f32 = got.probs.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{what}: probabilities sum to {sum}");
        }
    }
    eprintln!(
        "{model}: Classify vs the pipeline: max |prob diff| {worst_prob:.2e}, max |cosine diff| {worst_cosine:.2e}"
    );
    assert!(worst_prob <= 1e-4, "{model}: probabilities differ from the pipeline's by {worst_prob}");
    assert!(worst_cosine <= 1e-5, "{model}: cosines differ by {worst_cosine}");
}

#[tokio::test(flavor = "multi_thread")]
async fn classify_matches_the_pipeline_tiny() {
    classify_matches_the_pipeline("tiny").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn classify_matches_the_pipeline_vit_b32() {
    classify_matches_the_pipeline("vit-b32").await;
}

async fn post(server: &TestServer, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", server.http_url()))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

/// The answer's rows: the body itself, or MLflow's `{"predictions": [...]}` around them on /invocations.
fn rows(body: &Value) -> &Vec<Value> {
    body.get("predictions").unwrap_or(body).as_array().unwrap_or_else(|| panic!("no rows in {body}"))
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}")).iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// The Azure zero-shot request of a case: labels comma-separated in the first row (with spaces around them, as
/// the Azure sample writes them), the other rows with the image alone or a text that does not count.
fn azure_request(case: &Case) -> Value {
    let data: Vec<Value> = case
        .images
        .iter()
        .enumerate()
        .map(|(i, file)| match i {
            0 => json!([b64(&image_bytes(file)), format!("  {} ", case.labels.join(" ,  "))]),
            1 => json!([b64(&image_bytes(file))]),
            _ => json!([b64(&image_bytes(file)), "not labels, ignored"]),
        })
        .collect();
    json!({"input_data": {"columns": ["image", "text"], "index": (0..data.len()).collect::<Vec<_>>(), "data": data}})
}

/// Checks an Azure zero-shot answer against a case.
fn assert_azure_answer(body: &Value, case: &Case, what: &str) -> f32 {
    let rows = rows(body);
    assert_eq!(rows.len(), case.images.len(), "{what}: {body}");
    let mut worst = 0f32;
    for (i, row) in rows.iter().enumerate() {
        let mut keys: Vec<&str> = row.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["labels", "probs"], "{what}: {row}");
        assert_eq!(strings(&row["labels"]), case.labels, "{what}: the labels, stripped, in the order given");
        worst = worst.max(max_diff(&floats(&row["probs"]), &case.probs[i], what));
    }
    worst
}

#[tokio::test(flavor = "multi_thread")]
async fn the_azure_zero_shot_flavour_answers_probs_and_labels_as_the_pipeline() {
    let flavour = ["--azure-task", "zero-shot-image-classification"];
    let all = cases("tiny");
    let server = TestServer::start(&model_dir("tiny"), &flavour).await;
    let mut worst = 0f32;
    for (c, case) in all.iter().enumerate().filter(|(_, c)| c.template.is_none()) {
        let (status, body) = post(&server, "/score", &azure_request(case)).await;
        assert_eq!(status, 200, "case {c}: {body}");
        worst = worst.max(assert_azure_answer(&body, case, &format!("/score case {c}")));
    }
    // /invocations answers the same rows, to MLflow's dataframe_split.
    let case = &all[0];
    let mut body = azure_request(case);
    body = json!({"dataframe_split": body["input_data"].clone()});
    let (status, answer) = post(&server, "/invocations", &body).await;
    assert_eq!(status, 200, "{answer}");
    worst = worst.max(assert_azure_answer(&answer, case, "/invocations"));
    eprintln!("tiny: /score zero-shot vs the pipeline: max |prob diff| {worst:.2e}");
    assert!(worst <= 1e-4, "probabilities differ from the pipeline's by {worst}");
    drop(server);

    // With the labels embedded as they are, as the Azure endpoint's scoring code does.
    let server = TestServer::start(&model_dir("tiny"), &[&flavour[..], &["--zero-shot-template", "{}"]].concat()).await;
    let case = all.iter().find(|c| c.template.as_deref() == Some("{}")).expect("a case without template");
    let (status, body) = post(&server, "/score", &azure_request(case)).await;
    assert_eq!(status, 200, "{body}");
    let worst = assert_azure_answer(&body, case, "/score with --zero-shot-template {}");
    assert!(worst <= 1e-4, "probabilities differ from the pipeline's by {worst}");
    // The embeddings flavour is not served meanwhile: a text-only row is a row without an image to classify.
    let (status, body) = post(&server, "/score", &json!({"input_data": {"columns": ["text"], "data": [["a"]]}})).await;
    assert_eq!((status, body["reason"].as_str()), (400, Some("EMPTY_ITEM")), "{body}");
}

fn reason(status: &tonic::Status) -> String {
    clipserve::error::status_reason(status).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_labels_templates_and_images_get_clear_errors() {
    let args = [
        "--azure-task",
        "zero-shot-image-classification",
        "--max-labels",
        "4",
        "--max-items-per-request",
        "3",
        "--max-text-chars",
        "40",
    ];
    let server = TestServer::start(&model_dir("tiny"), &args).await;
    let jpeg = image_bytes("landscape_640x480.jpg");
    let img = b64(&jpeg);

    // HTTP: (rows, status, reason, what the message says).
    let http_cases: Vec<(Value, u16, &str, &str)> = vec![
        (json!([[img, ""]]), 400, "INVALID_LABELS", "row 0"),
        (json!([[img]]), 400, "INVALID_LABELS", "comma-separated labels"),
        (json!([[img, " , ,, "]]), 400, "INVALID_LABELS", "holds none"),
        (json!([]), 400, "INVALID_LABELS", "no rows"),
        (json!([[img, "a,b,c,d,e"]]), 413, "TOO_MANY_LABELS", "limit of 4 labels"),
        (json!([[img, "cat, dog"], ["", "x"]]), 400, "EMPTY_ITEM", "row 1: no image"),
        (json!([[img, "cat, dog"], [null]]), 400, "EMPTY_ITEM", "row 1: no image"),
        (json!([[img, "cat, dog"], ["!!not base64!!"]]), 400, "INVALID_BASE64", "row 1"),
        (json!([[img, "cat, dog"], [img, "x", "y"]]), 400, "MALFORMED_REQUEST", "row 1: has 3 values for 2 columns"),
        (json!([[img, "cat"], [img], [img], [img]]), 413, "TOO_MANY_ITEMS", "limit of 3"),
        // The text embedded is the template's, "This is a photo of {}.": 43 characters with this label.
        (json!([[img, "cat, twenty-five chars label"]]), 413, "TEXT_TOO_LONG", "label 1"),
    ];
    for (data, status, want, needle) in http_cases {
        let body = json!({"input_data": {"columns": ["image", "text"], "data": data}});
        let (got, answer) = post(&server, "/score", &body).await;
        assert_eq!((got, answer["reason"].as_str()), (status, Some(want)), "{data}: {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }

    // gRPC: (request, code, reason, what the message says).
    let image = |id: &str| Item { id: id.into(), image: Some(Image::ImageBytes(jpeg.clone())), text: None };
    let labels = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let request = |images: Vec<Item>, l: &[&str], template: Option<&str>| ClassifyRequest {
        images,
        labels: labels(l),
        template: template.map(str::to_string),
    };
    let corrupt = Item { id: "bad".into(), image: Some(Image::ImageBytes(jpeg[..200].to_vec())), text: None };
    let grpc_cases: Vec<(ClassifyRequest, Code, &str, &str)> = vec![
        (request(vec![image("a")], &[], None), Code::InvalidArgument, "INVALID_LABELS", "no labels"),
        (request(vec![image("a")], &["cat", ""], None), Code::InvalidArgument, "INVALID_LABELS", "label 1 is empty"),
        (request(vec![image("a")], &["a", "b", "c", "d", "e"], None), Code::ResourceExhausted, "TOO_MANY_LABELS", "4"),
        (request(vec![image("a")], &["cat"], Some("a photo")), Code::InvalidArgument, "INVALID_LABELS", "no {}"),
        (request(vec![image("a")], &["cat"], Some("{} {}")), Code::InvalidArgument, "INVALID_LABELS", "more than one"),
        (request(vec![image("a")], &["cat"], Some("{label}")), Code::InvalidArgument, "INVALID_LABELS", "template"),
        (
            request(vec![image("a"), Item { text: Some("t".into()), ..image("b") }], &["cat"], None),
            Code::InvalidArgument,
            "MALFORMED_REQUEST",
            "item 1 (id \"b\")",
        ),
        (
            request(vec![image("a"), Item { image: None, ..image("c") }], &["cat"], None),
            Code::InvalidArgument,
            "EMPTY_ITEM",
            "item 1 (id \"c\"): no image",
        ),
        (
            request(vec![image("a"), corrupt], &["cat"], None),
            Code::InvalidArgument,
            "INVALID_IMAGE",
            "item 1 (id \"bad\")",
        ),
        (
            request(vec![image("a"), image("b"), image("c"), image("d")], &["cat"], None),
            Code::ResourceExhausted,
            "TOO_MANY_ITEMS",
            "limit of 3",
        ),
        (
            request(vec![image("a")], &["cat", "dog", "a label that makes the text too long"], None),
            Code::ResourceExhausted,
            "TEXT_TOO_LONG",
            "label 2",
        ),
    ];
    let mut client = server.client().await;
    for (req, code, want, needle) in grpc_cases {
        let what = format!("{:?} / {:?}", req.labels, req.template);
        let status = client.classify(req).await.expect_err(&what);
        assert_eq!((status.code(), reason(&status).as_str()), (code, want), "{what}: {status:?}");
        assert!(status.message().contains(needle), "{what}: {needle:?} not in {:?}", status.message());
    }
    // No images: an empty answer.
    let empty = client.classify(request(vec![], &["cat"], None)).await.unwrap().into_inner();
    assert!(empty.classifications.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn label_embeddings_are_computed_once_and_reused_across_requests_and_transports() {
    let server = TestServer::start(&model_dir("tiny"), &["--azure-task", "zero-shot-image-classification"]).await;
    let mut client = server.client().await;
    let jpeg = image_bytes("landscape_640x480.jpg");
    let classify = |labels: Vec<String>, template: Option<&str>| ClassifyRequest {
        images: vec![Item { id: "i".into(), image: Some(Image::ImageBytes(jpeg.clone())), text: None }],
        labels,
        template: template.map(str::to_string),
    };
    let counts = || async {
        let text = server.metrics().await;
        (
            metric_value(&text, "clipserve_label_cache_misses_total"),
            metric_value(&text, "clipserve_label_cache_hits_total"),
            metric_value(&text, "clipserve_label_cache_entries"),
        )
    };
    assert_eq!(counts().await, (0.0, 0.0, 0.0));
    let labels: Vec<String> = ["cat", "dog", "cat", "car"].iter().map(|s| s.to_string()).collect();
    let first = client.classify(classify(labels.clone(), None)).await.unwrap().into_inner();
    // Three distinct texts computed; the repeated label scored twice, alike.
    assert_eq!(counts().await, (3.0, 0.0, 3.0));
    let probs = &first.classifications[0].probs;
    assert_eq!(probs.len(), 4);
    assert_eq!(probs[0], probs[2]);
    let again = client.classify(classify(labels.clone(), None)).await.unwrap().into_inner();
    assert_eq!(counts().await, (3.0, 3.0, 3.0));
    // The same answer, up to the float noise of the image's batch.
    assert!(max_diff(&again.classifications[0].probs, probs, "again") < 1e-6);
    // Another template is another text.
    client.classify(classify(labels.clone(), Some("{}"))).await.unwrap();
    assert_eq!(counts().await, (6.0, 3.0, 6.0));
    // The HTTP flavour shares the cache (same default template).
    let body = json!({"input_data": {"columns": ["image", "text"], "data": [[b64(&jpeg), "car,cat"]]}});
    let (status, answer) = post(&server, "/score", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(counts().await, (6.0, 5.0, 6.0));
    // The same probabilities for the same label over both transports.
    let http_probs = floats(&rows(&answer)[0]["probs"]);
    let grpc = client.classify(classify(vec!["car".into(), "cat".into()], None)).await.unwrap().into_inner();
    assert!(max_diff(&http_probs, &grpc.classifications[0].probs, "car,cat") < 1e-6);

    // Concurrent requests with the same new labels compute each text once.
    let fresh: Vec<String> = (0..40).map(|i| format!("label number {i}")).collect();
    let calls = (0..8).map(|_| {
        let mut client = client.clone();
        let request = classify(fresh.clone(), None);
        async move { client.classify(request).await.unwrap().into_inner() }
    });
    let answers = futures::future::join_all(calls).await;
    for a in &answers {
        assert!(max_diff(&a.classifications[0].probs, &answers[0].classifications[0].probs, "concurrent") < 1e-6);
    }
    let (misses, hits, entries) = counts().await;
    assert_eq!((misses, hits, entries), (46.0, 7.0 + 7.0 * 40.0, 46.0));
    let bytes = server.metric("clipserve_label_cache_bytes").await;
    assert!(bytes > 46.0 * 2048.0 && bytes < 46.0 * 2400.0, "{bytes} bytes for 46 entries");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_label_cache_stays_within_its_byte_bound() {
    // About four 512-d entries.
    let server = TestServer::start(&model_dir("tiny"), &["--label-cache-bytes", "10000"]).await;
    let mut client = server.client().await;
    let jpeg = image_bytes("exact_224x224.jpg");
    let labels: Vec<String> = (0..10).map(|i| format!("thing {i}")).collect();
    let request = || ClassifyRequest {
        images: vec![Item { id: "i".into(), image: Some(Image::ImageBytes(jpeg.clone())), text: None }],
        labels: labels.clone(),
        template: None,
    };
    let first = client.classify(request()).await.unwrap().into_inner();
    let second = client.classify(request()).await.unwrap().into_inner();
    assert!(max_diff(&first.classifications[0].probs, &second.classifications[0].probs, "second") < 1e-6);
    let text = server.metrics().await;
    // The ten texts do not fit: the last four inserted are kept, the second request computes the other six again.
    let misses = metric_value(&text, "clipserve_label_cache_misses_total");
    let hits = metric_value(&text, "clipserve_label_cache_hits_total");
    assert_eq!((misses, hits), (16.0, 4.0));
    let (entries, bytes) =
        (metric_value(&text, "clipserve_label_cache_entries"), metric_value(&text, "clipserve_label_cache_bytes"));
    assert!(entries == 4.0 && bytes <= 10000.0, "{entries} entries, {bytes} bytes");
}

/// A model directory exported before manifest.json carried logit_scale: zero-shot uses CLIP's trained scale of
/// 100, and says so at start-up. A template without `{}` is refused at start-up.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_without_logit_scale_uses_100_and_a_bad_template_is_refused_at_start() {
    let tiny = model_dir("tiny");
    let old = std::env::temp_dir().join(format!("clipserve-old-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&old).unwrap();
    for file in ["model.pt", "tokenizer.json"] {
        let _ = std::fs::remove_file(old.join(file));
        std::os::unix::fs::symlink(tiny.join(file), old.join(file)).unwrap();
    }
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.as_object_mut().unwrap().remove("logit_scale").is_some());
    std::fs::write(old.join("manifest.json"), manifest.to_string()).unwrap();

    let server = TestServer::start(&old, &[]).await;
    let log: Vec<String> = server.early_log.iter().cloned().chain(server.log.try_iter()).collect();
    assert!(log.iter().any(|l| l.contains("no logit_scale") && l.contains("100")), "no warning in {log:?}");
    let request = ClassifyRequest {
        images: vec![Item {
            id: "i".into(),
            image: Some(Image::ImageBytes(image_bytes("exact_224x224.jpg"))),
            text: None,
        }],
        labels: vec!["cat".into(), "dog".into(), "a diagram".into()],
        template: None,
    };
    let answer = server.client().await.classify(request).await.unwrap().into_inner();
    assert_eq!(answer.scale, 100.0);
    let c = &answer.classifications[0];
    let scores: Vec<f64> = c.scores.iter().map(|s| *s as f64).collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = scores.iter().map(|s| (100.0 * (s - max)).exp()).sum();
    for (p, s) in c.probs.iter().zip(&scores) {
        assert!((*p as f64 - (100.0 * (s - max)).exp() / sum).abs() < 1e-6, "{:?} for scores {scores:?}", c.probs);
    }
    drop(server);
    std::fs::remove_dir_all(&old).unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clipserve"))
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--device", "cpu"])
        .args(["--zero-shot-template", "a photo of a"])
        .arg("--model")
        .arg(&tiny)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--zero-shot-template") && stderr.contains("exactly one {}"), "{stderr}");
}
