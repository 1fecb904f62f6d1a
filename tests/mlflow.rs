//! MLflow's scoring protocol on `/invocations` against the real server: MLflow's own scoring client
//! (`mlflow.pyfunc.scoring_server.client.ScoringServerClient`, from the mlflow-skinny wheel in .venv), then one
//! test per input form (`dataframe_split`, `dataframe_records`, `instances` and `inputs` as records and as
//! columns, single values, CSV with and without pandas' index column), each compared with the gRPC `Embed` answers
//! of the same server, with and without `params`; MLflow-shaped errors with clipserve's statuses; `/ping` and
//! `/version`; and `/score`, which keeps answering a bare list.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use clipserve::pb::{item::Image, EmbedRequest, Embedding, Item};
use common::*;
use serde_json::{json, Value};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("a list of numbers: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

const TEXT_1: &str = "a photo of a cat, sitting";
const TEXT_2: &str = "a \"dog\"\nbarking";

/// The three rows every form sends: an image and a text, an image only, a text only.
struct Rows {
    image_1: String,
    image_2: String,
}

impl Rows {
    fn new() -> Rows {
        Rows { image_1: b64(&image_bytes("landscape_640x480.jpg")), image_2: b64(&image_bytes("portrait_480x640.png")) }
    }
}

/// The gRPC answers for the three rows, unnormalized and normalized.
async fn grpc_answers(server: &TestServer) -> [Vec<Embedding>; 2] {
    let mut client = server.client().await;
    let items = || {
        vec![
            Item {
                id: "0".into(),
                image: Some(Image::ImageBytes(image_bytes("landscape_640x480.jpg"))),
                text: Some(TEXT_1.into()),
            },
            Item { id: "1".into(), image: Some(Image::ImageBytes(image_bytes("portrait_480x640.png"))), text: None },
            Item { id: "2".into(), image: None, text: Some(TEXT_2.into()) },
        ]
    };
    let mut answers = Vec::new();
    for normalize in [false, true] {
        let reply = client.embed(EmbedRequest { items: items(), normalize }).await.unwrap().into_inner();
        answers.push(reply.embeddings);
    }
    answers.try_into().unwrap()
}

/// `predictions` holds one record per row, in row order, with the keys the row asked for and the gRPC numbers.
fn assert_predictions(answer: &Value, grpc: &[Embedding], what: &str) {
    let object = answer.as_object().unwrap_or_else(|| panic!("{what}: not an object: {answer}"));
    assert_eq!(object.keys().collect::<Vec<_>>(), ["predictions"], "{what}");
    let rows = answer["predictions"].as_array().unwrap_or_else(|| panic!("{what}: predictions is not a list"));
    assert_eq!(rows.len(), grpc.len(), "{what}: rows");
    for (r, (row, want)) in rows.iter().zip(grpc).enumerate() {
        let mut keys: Vec<&str> = row.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want_keys = Vec::new();
        if !want.image_features.is_empty() {
            want_keys.push("image_features");
            assert_close(&floats(&row["image_features"]), &want.image_features, &format!("{what}: row {r} image"));
        }
        if !want.text_features.is_empty() {
            want_keys.push("text_features");
            assert_close(&floats(&row["text_features"]), &want.text_features, &format!("{what}: row {r} text"));
        }
        assert_eq!(keys, want_keys, "{what}: row {r}");
    }
}

async fn invoke(server: &TestServer, content_type: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/invocations", server.http_url()))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
}

/// Sends a JSON form without and with `params`, and checks both answers against gRPC.
async fn check_json_form(name: &str, form: Value, rows: usize) {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let grpc = grpc_answers(&server).await;
    let key = form.as_object().unwrap().keys().next().unwrap().clone();
    for (normalize, want) in [(None, &grpc[0]), (Some(false), &grpc[0]), (Some(true), &grpc[1])] {
        let mut body = form.clone();
        if let Some(normalize) = normalize {
            body["params"] = json!({ "normalize": normalize });
        }
        let (status, answer) = invoke(&server, "application/json", serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(status, 200, "{name} ({key}), normalize {normalize:?}: {answer}");
        assert_predictions(&answer, &want[..rows], &format!("{name}, normalize {normalize:?}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dataframe_split() {
    let r = Rows::new();
    let form = json!({"dataframe_split": {"columns": ["image", "text"], "index": [0, 1, 2],
        "data": [[r.image_1, TEXT_1], [r.image_2, ""], [null, TEXT_2]]}});
    check_json_form("dataframe_split", form, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dataframe_records() {
    let r = Rows::new();
    let form = json!({"dataframe_records": [{"image": r.image_1, "text": TEXT_1}, {"image": r.image_2},
        {"text": TEXT_2, "image": null}]});
    check_json_form("dataframe_records", form, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_as_records() {
    let r = Rows::new();
    let form = json!({"instances": [{"image": r.image_1, "text": TEXT_1}, {"image": r.image_2, "text": ""},
        {"text": TEXT_2}]});
    check_json_form("instances (records)", form, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_as_columns() {
    let r = Rows::new();
    let form = json!({"instances": {"image": [r.image_1, r.image_2, null], "text": [TEXT_1, null, TEXT_2]}});
    check_json_form("instances (columns)", form, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inputs_as_columns() {
    let r = Rows::new();
    let form = json!({"inputs": {"text": [TEXT_1, "", TEXT_2], "image": [r.image_1, r.image_2, ""]}});
    check_json_form("inputs (columns)", form, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inputs_as_records_and_single_values() {
    let r = Rows::new();
    let form = json!({"inputs": [{"image": r.image_1, "text": TEXT_1}, {"image": r.image_2}, {"text": TEXT_2}]});
    check_json_form("inputs (records)", form, 3).await;
    let form = json!({"inputs": {"image": r.image_1, "text": TEXT_1}});
    check_json_form("inputs (single values)", form, 1).await;
}

/// A CSV field, quoted as pandas' to_csv() quotes it.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_with_and_without_the_index_column() {
    let r = Rows::new();
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let grpc = grpc_answers(&server).await;
    // What pandas' DataFrame.to_csv() writes (an unnamed index column first), and a plain header in the other
    // column order, with CRLF line ends and a base64 image broken into lines.
    let (t1, t2) = (csv_field(TEXT_1), csv_field(TEXT_2));
    let pandas = format!(",image,text\n0,{},{t1}\n1,{},\n2,,{t2}\n", r.image_1, r.image_2);
    let wrapped: Vec<String> =
        r.image_2.as_bytes().chunks(76).map(|c| String::from_utf8(c.to_vec()).unwrap()).collect();
    let plain = format!("text,image\r\n{t1},{}\r\n,\"{}\"\r\n{t2},\r\n", r.image_1, wrapped.join("\n"));
    for (what, body) in [("pandas to_csv", pandas), ("plain CSV", plain)] {
        for content_type in ["text/csv", "text/csv; charset=utf-8"] {
            let (status, answer) = invoke(&server, content_type, body.clone()).await;
            assert_eq!(status, 200, "{what}, {content_type}: {answer}");
            assert_predictions(&answer, &grpc[0], &format!("{what}, {content_type}"));
        }
    }
    // A row of the wrong width, named by its row.
    let (status, answer) = invoke(&server, "text/csv", "image,text\n,a\n,b,c\n").await;
    assert_eq!((status, answer["error_code"].as_str()), (400, Some("BAD_REQUEST")), "{answer}");
    assert_eq!(answer["message"], "row 1: has 3 values for 2 columns");
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// What the Python side does with MLflow's own client: wait for `/ping`, read `/version`, send a pandas
/// DataFrame (which the client turns into `dataframe_split`) with and without params, read the answer as the client
/// parses it (and as a DataFrame), and send a frame with a column the model does not have.
const MLFLOW_CLIENT: &str = r#"
import base64, json, sys
import pandas as pd
from mlflow.pyfunc.scoring_server.client import ScoringServerClient

host, port = sys.argv[1].rsplit(":", 1)
image_1, image_2 = (base64.b64encode(open(p, "rb").read()).decode() for p in sys.argv[2:4])
text_1, text_2 = sys.argv[4:6]
client = ScoringServerClient(host, int(port))
client.wait_server_ready(timeout=30)
frame = pd.DataFrame({"image": [image_1, image_2, None], "text": [text_1, "", text_2]})
answer = client.invoke(frame)
normalized = client.invoke(frame, params={"normalize": True})
as_frame = answer.get_predictions()
try:
    client.invoke(pd.DataFrame({"image": [image_1], "caption": ["a cat"]}))
    refused = None
except Exception as e:
    refused = str(e)
print(json.dumps({
    "version": client.get_version(),
    "predictions": answer["predictions"],
    "normalized": normalized["predictions"],
    "frame_columns": sorted(as_frame.columns),
    "frame_rows": len(as_frame),
    "refused": refused,
}))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn mlflows_own_client_gets_the_grpc_numbers() {
    let python = root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run dev/test.sh (it sets up the virtualenv)", python.display());
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let grpc = grpc_answers(&server).await;
    let images = fixtures_dir().join("images");
    let mut command = Command::new(python);
    command
        .arg("-c")
        .arg(MLFLOW_CLIENT)
        .arg(&server.http_addr)
        .arg(images.join("landscape_640x480.jpg"))
        .arg(images.join("portrait_480x640.png"))
        .args([TEXT_1, TEXT_2]);
    let out = tokio::task::spawn_blocking(move || command.output()).await.unwrap().expect("running python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the MLflow client failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("not JSON: {stdout}"));
    assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
    assert_predictions(&json!({"predictions": report["predictions"]}), &grpc[0], "MLflow client");
    assert_predictions(&json!({"predictions": report["normalized"]}), &grpc[1], "MLflow client, normalized");
    assert_eq!(report["frame_columns"], json!(["image_features", "text_features"]));
    assert_eq!(report["frame_rows"], 3);
    let refused = report["refused"].as_str().expect("the client raised for an unknown column");
    assert!(refused.contains("error code 400"), "{refused}");
    assert!(refused.contains(r#""error_code": "BAD_REQUEST""#) || refused.contains(r#""error_code":"BAD_REQUEST""#));
    assert!(refused.contains("unknown column") && refused.contains("MALFORMED_REQUEST"), "{refused}");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_come_in_mlflows_shape_with_clipserves_statuses() {
    let flags =
        ["--api-key", "k3y", "--max-items-per-request", "3", "--max-text-chars", "30", "--max-request-bytes", "200000"];
    let server = TestServer::start(&model_dir("tiny"), &flags).await;
    let url = format!("{}/invocations", server.http_url());
    let http = reqwest::Client::new();
    let send = |content_type: Option<&str>, body: Vec<u8>, key: Option<&str>| {
        let mut request = http.post(&url).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move {
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, serde_json::from_str::<Value>(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
        }
    };
    let text_row = br#"{"inputs": {"text": ["a cat"]}}"#.to_vec();
    let jpeg = b64(&image_bytes("landscape_640x480.jpg"));
    const JSON: Option<&str> = Some("application/json");
    const CSV: Option<&str> = Some("text/csv");
    const KEY: Option<&str> = Some("k3y");
    // (what, content type, body, API key, status, error_code, reason)
    type Case = (&'static str, Option<&'static str>, Vec<u8>, Option<&'static str>, u16, &'static str, &'static str);
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("no API key", JSON, text_row.clone(), None, 401, "UNAUTHENTICATED", "UNAUTHENTICATED"),
        ("not JSON", JSON, b"{\"inputs\": ".to_vec(), KEY, 400, "BAD_REQUEST", "MALFORMED_REQUEST"),
        ("no form", JSON, br#"{"data": [["a"]]}"#.to_vec(), KEY, 400, "BAD_REQUEST", "MALFORMED_REQUEST"),
        ("two forms", JSON, br#"{"inputs": {"text": ["a"]}, "instances": [{"text": "b"}]}"#.to_vec(), KEY, 400, "BAD_REQUEST", "MALFORMED_REQUEST"),
        ("bad base64", JSON, br#"{"dataframe_records": [{"text": "a"}, {"image": "!!not base64!!"}]}"#.to_vec(), KEY, 400, "INVALID_PARAMETER_VALUE", "INVALID_BASE64"),
        ("cut image", JSON, format!(r#"{{"instances": {{"image": ["{}"]}}}}"#, &jpeg[..400]).into_bytes(), KEY, 400, "INVALID_PARAMETER_VALUE", "INVALID_IMAGE"),
        ("empty row", CSV, b"image,text\n,a\n,\n".to_vec(), KEY, 400, "INVALID_PARAMETER_VALUE", "EMPTY_ITEM"),
        ("too many rows", JSON, br#"{"inputs": {"text": ["a", "b", "c", "d"]}}"#.to_vec(), KEY, 413, "BAD_REQUEST", "TOO_MANY_ITEMS"),
        ("too many CSV rows", CSV, b"text\na\nb\nc\nd\n".to_vec(), KEY, 413, "BAD_REQUEST", "TOO_MANY_ITEMS"),
        ("text too long", JSON, format!(r#"{{"dataframe_records": [{{"text": "{}"}}]}}"#, "x".repeat(31)).into_bytes(), KEY, 413, "INVALID_PARAMETER_VALUE", "TEXT_TOO_LONG"),
        ("body too large", CSV, format!("text\n{}\n", "x".repeat(200_001)).into_bytes(), KEY, 413, "BAD_REQUEST", "REQUEST_TOO_LARGE"),
        ("old format parameter", Some("application/json; format=pandas-split"), text_row.clone(), KEY, 415, "BAD_REQUEST", "MALFORMED_REQUEST"),
        ("other charset", Some("text/csv; charset=latin-1"), b"text\na\n".to_vec(), KEY, 415, "BAD_REQUEST", "MALFORMED_REQUEST"),
        ("form content type", Some("application/x-www-form-urlencoded"), text_row.clone(), KEY, 415, "BAD_REQUEST", "MALFORMED_REQUEST"),
        ("no content type", None, text_row.clone(), KEY, 415, "BAD_REQUEST", "MALFORMED_REQUEST"),
    ];
    for (what, content_type, body, key, status, code, reason) in cases {
        let (got, answer) = send(content_type, body, key).await;
        assert_eq!(got, status, "{what}: {answer}");
        assert_eq!(answer["error_code"], code, "{what}: {answer}");
        assert_eq!(answer["reason"], reason, "{what}: {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {answer}");
        assert_eq!(answer.as_object().unwrap().len(), 3, "{what}: {answer}");
    }
    // Errors that name a row name the right one.
    let (_, answer) =
        send(JSON, br#"{"dataframe_records": [{"text": "a"}, {"image": "!!not base64!!"}]}"#.to_vec(), KEY).await;
    assert!(answer["message"].as_str().unwrap().starts_with("row 1"), "{answer}");
    // And the key lets a request through.
    let (status, answer) = send(JSON, text_row, KEY).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(floats(&answer["predictions"][0]["text_features"]).len(), 512);
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_version_and_score_unchanged() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let get = |path: &str| reqwest::get(format!("{}{path}", server.http_url()));
    let ping = get("/ping").await.unwrap();
    assert_eq!(ping.status(), 200);
    assert_eq!(ping.headers()["content-type"], "application/json");
    assert_eq!(ping.text().await.unwrap(), "\n");
    let version = get("/version").await.unwrap();
    assert_eq!(version.status(), 200);
    assert_eq!(version.text().await.unwrap(), env!("CARGO_PKG_VERSION"));
    let health = get("/health").await.unwrap();
    assert_eq!((health.status().as_u16(), health.text().await.unwrap()), (200, r#"{"status":"ok"}"#.to_string()));

    // /score still answers the Azure shape: a bare list, and {"error", "reason"}.
    let grpc = grpc_answers(&server).await;
    let r = Rows::new();
    let body = json!({"input_data": {"columns": ["image", "text"], "index": [0, 1, 2],
        "data": [[r.image_1, TEXT_1], [r.image_2, ""], ["", TEXT_2]]}});
    let answer: Value = reqwest::Client::new()
        .post(format!("{}/score", server.http_url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(answer.is_array(), "{answer}");
    assert_predictions(&json!({ "predictions": answer }), &grpc[0], "/score");
    let refused = reqwest::Client::new()
        .post(format!("{}/score", server.http_url()))
        .json(&json!({"dataframe_records": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["reason"], "MALFORMED_REQUEST");
    assert!(refused["error"].is_string() && refused.get("error_code").is_none(), "{refused}");

    // The routes are counted under their own names.
    let metrics = server.metrics().await;
    assert!(metric_value(&metrics, r#"clipserve_requests_total{transport="http",rpc="ping",outcome="ok"}"#) >= 1.0);
}

/// Samples a process's resident memory every few milliseconds while `work` runs; the answer and the peak, in MiB.
async fn with_peak_rss<T>(pid: u32, work: impl std::future::Future<Output = T>) -> (T, f64) {
    let peak = RssPeak::start(pid);
    let out = work.await;
    (out, peak.peak_mib())
}

/// `head`, then `row` repeated (joined by `sep`) to about `bytes` bytes, then `tail`.
fn repeated(head: &str, row: &str, sep: &str, tail: &str, bytes: usize) -> Vec<u8> {
    let n = bytes / (row.len() + sep.len());
    let mut body = Vec::with_capacity(bytes + head.len() + tail.len());
    body.extend_from_slice(head.as_bytes());
    for i in 0..n {
        if i > 0 {
            body.extend_from_slice(sep.as_bytes());
        }
        body.extend_from_slice(row.as_bytes());
    }
    body.extend_from_slice(tail.as_bytes());
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_mb_bodies_of_every_form_are_refused_early_in_bounded_memory() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let pid = server.pid();
    let mb = 60 << 20;
    let cases = [
        (
            "dataframe_records",
            "application/json",
            repeated(r#"{"dataframe_records":["#, r#"{"text":"a"}"#, ",", "]}", mb),
            "TOO_MANY_ITEMS",
        ),
        (
            "instances",
            "application/json",
            repeated(r#"{"instances":["#, r#"{"text":"a"}"#, ",", "]}", mb),
            "TOO_MANY_ITEMS",
        ),
        ("inputs", "application/json", repeated(r#"{"inputs":{"text":["#, r#""a""#, ",", "]}}", mb), "TOO_MANY_ITEMS"),
        ("CSV rows", "text/csv", repeated("text\n", "a", "\n", "\n", mb), "TOO_MANY_ITEMS"),
        ("one CSV field", "text/csv", repeated("text\n", "a", "", "\n", mb), "TEXT_TOO_LONG"),
    ];
    // A first call, so that what the server keeps for good is there before the baseline.
    let (status, _) = invoke(&server, "text/csv", "text\na\n").await;
    assert_eq!(status, 200);
    for (what, content_type, body, reason) in cases {
        let baseline = rss_mib(pid);
        let started = std::time::Instant::now();
        let ((status, answer), peak) = with_peak_rss(pid, invoke(&server, content_type, body)).await;
        let elapsed = started.elapsed();
        eprintln!("{what}: 60 MiB body, {status} {reason} in {elapsed:?}; RSS {baseline:.0} MiB, peak {peak:.0} MiB");
        assert_eq!((status, answer["reason"].as_str()), (413, Some(reason)), "{what}: {answer}");
        assert!(elapsed < std::time::Duration::from_secs(5), "{what}: took {elapsed:?}");
        // The body's bytes (and, for one field, their copy in the CSV reader), not millions of parsed values.
        assert!(peak - baseline < 200.0, "{what}: memory grew from {baseline:.0} to {peak:.0} MiB");
    }
}
