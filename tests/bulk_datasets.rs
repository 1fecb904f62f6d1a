//! `clipserve embed` on datasets as img2dataset writes them, into clip-retrieval's layout: webdataset shards and
//! Parquet files with corrupt members among good ones (every good item once, every bad one once in the errors,
//! the arrays read back with numpy and the metadata with pyarrow equal to direct Embed calls), two `--shard`
//! processes over two servers (their union is the input, nothing twice), a client killed with SIGKILL and run
//! again (nothing lost, nothing twice, the same partitions as an uninterrupted run), and a server name whose
//! addresses change during the run.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Cursor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clipserve::pb::{item::Image, EmbedRequest, Item};
use common::*;
use serde_json::Value;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("clipserve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A small image, PNG or JPEG, different for every seed.
fn image(seed: u32, jpeg: bool) -> Vec<u8> {
    let img = image::RgbImage::from_fn(20 + seed % 13, 18 + seed % 7, |x, y| {
        image::Rgb([(seed * 37 % 256) as u8, (x * 7 + seed) as u8, (y * 13 + seed * 3) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    let format = if jpeg { image::ImageFormat::Jpeg } else { image::ImageFormat::Png };
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// What an item holds, to embed it directly.
#[derive(Clone, Debug)]
struct Expected {
    image: Option<Vec<u8>>,
    text: Option<String>,
}

/// A dataset: the good items by key, and the bad keys with the reason each must fail with.
#[derive(Default)]
struct Dataset {
    good: BTreeMap<String, Expected>,
    bad: BTreeMap<String, String>,
}

impl Dataset {
    fn good_keys(&self) -> Vec<String> {
        self.good.keys().cloned().collect()
    }
    fn bad_keys(&self) -> Vec<String> {
        self.bad.keys().cloned().collect()
    }
}

/// Writes a tar of `members` (name, bytes).
fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap();
}

/// Webdataset shard `shard` of `n` samples (jpg or png, txt, json), every `bad_every`-th sample's image corrupt.
fn good_shard(dir: &Path, shard: u32, n: u32, bad_every: u32, data: &mut Dataset) -> PathBuf {
    let mut members = Vec::new();
    for i in 0..n {
        let key = format!("{shard:05}{i:04}");
        let seed = shard * 1000 + i;
        let text = format!("sample {i} of shard {shard}");
        let mut img = image(seed, i % 2 == 0);
        if bad_every > 0 && i % bad_every == bad_every - 1 {
            img.truncate(img.len() / 3);
            data.bad.insert(key.clone(), "INVALID_IMAGE".into());
        } else {
            data.good.insert(key.clone(), Expected { image: Some(img.clone()), text: Some(text.clone()) });
        }
        let ext = if i % 2 == 0 { "jpg" } else { "png" };
        members.push((format!("{key}.{ext}"), img));
        members.push((format!("{key}.txt"), text.into_bytes()));
        members.push((
            format!("{key}.json"),
            format!(r#"{{"url": "http://example.com/{key}", "key": "{key}"}}"#).into_bytes(),
        ));
    }
    let path = dir.join(format!("{shard:05}.tar"));
    write_tar(&path, &members);
    path
}

/// Runs `clipserve embed` with these flags; a run that does not end within two minutes is killed and fails the
/// test.
fn embed_cli(flags: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_clipserve"))
        .args(["embed", "--no-progress"])
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out,
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("clipserve embed {flags:?} did not finish within 120 s");
        }
    }
}

fn ok(out: &Output) -> String {
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "clipserve embed failed: {log}");
    log
}

/// Reads a clip-retrieval folder with numpy and pyarrow (the project virtualenv): per partition its metadata
/// columns, each array's dtype, shape and values, and its errors; and the hidden files left.
const READ_LAYOUT: &str = r#"
import glob, json, os, sys
import numpy as np
import pyarrow.parquet as pq

root = sys.argv[1]
parts = {}
for m in glob.glob(os.path.join(root, "metadata", "metadata_*.parquet")):
    n = int(os.path.basename(m)[len("metadata_"):-len(".parquet")])
    t = pq.read_table(m)
    part = {c: t.column(c).to_pylist() for c in t.column_names}
    part["columns"] = t.column_names
    for name in ("img_emb", "text_emb"):
        p = os.path.join(root, name, f"{name}_{n}.npy")
        if os.path.exists(p):
            a = np.load(p)
            part[name] = {"dtype": str(a.dtype), "shape": list(a.shape), "values": a.astype(np.float64).tolist()}
    e = os.path.join(root, "errors", f"errors_{n}.jsonl")
    part["errors"] = [json.loads(l) for l in open(e)] if os.path.exists(e) else []
    parts[n] = part
hidden = [f for d in ("img_emb", "text_emb", "metadata", "errors") for f in os.listdir(os.path.join(root, d)) if f.startswith(".")]
print(json.dumps({"partitions": parts, "hidden": hidden}))
"#;

/// The layout of `dir` as numpy and pyarrow read it: partitions by number, and the hidden files left.
fn read_layout(dir: &Path) -> (BTreeMap<u64, Value>, Vec<String>) {
    let python = root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run dev/test.sh", python.display());
    let out = Command::new(python).arg("-c").arg(READ_LAYOUT).arg(dir).output().unwrap();
    assert!(out.status.success(), "reading the layout: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let parts = v["partitions"].as_object().unwrap().iter().map(|(k, v)| (k.parse().unwrap(), v.clone())).collect();
    let hidden = v["hidden"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()).collect();
    (parts, hidden)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// Every key of the layout's metadata, and every id of its errors, as lists (duplicates show).
fn keys_and_errors(parts: &BTreeMap<u64, Value>) -> (Vec<String>, Vec<String>) {
    let mut keys: Vec<String> = parts.values().flat_map(|p| strings(&p["key"])).collect();
    let mut errors: Vec<String> = parts
        .values()
        .flat_map(|p| p["errors"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()))
        .collect();
    keys.sort();
    errors.sort();
    (keys, errors)
}

/// Checks every partition: its arrays align with its metadata (one row each, zeros where the modality is
/// absent), the dtype is `dtype`, and each row equals a direct Embed call on the same input (within the
/// precision of `dtype`). Failures carry the reason `data` expects.
async fn check_against_direct_calls(server: &TestServer, parts: &BTreeMap<u64, Value>, data: &Dataset, dtype: &str) {
    let mut rows = Vec::new(); // (key, image row, text row)
    for (n, p) in parts {
        let keys = strings(&p["key"]);
        for name in ["img_emb", "text_emb"] {
            if let Some(a) = p.get(name) {
                assert_eq!(a["dtype"], dtype, "partition {n} {name}");
                assert_eq!(
                    a["shape"],
                    serde_json::json!([keys.len(), 512]),
                    "partition {n} {name}: one row per metadata row"
                );
            }
        }
        let row = |name: &str, i: usize| -> Option<Vec<f32>> {
            p.get(name).map(|a| a["values"][i].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        };
        for (i, key) in keys.iter().enumerate() {
            let want = &data.good[key];
            assert_eq!(p["has_image"][i], want.image.is_some(), "{key}");
            assert_eq!(p["has_text"][i], want.text.is_some(), "{key}");
            assert_eq!(p["caption"][i].as_str(), want.text.as_deref(), "{key}");
            rows.push((key.clone(), row("img_emb", i), row("text_emb", i)));
        }
        for e in p["errors"].as_array().unwrap() {
            let id = e["id"].as_str().unwrap();
            assert_eq!(e["reason"].as_str(), data.bad.get(id).map(String::as_str), "{e}");
        }
    }
    let mut client = server.client().await;
    for chunk in rows.chunks(32) {
        let items = chunk
            .iter()
            .map(|(key, _, _)| {
                let want = &data.good[key];
                Item { id: key.clone(), image: want.image.clone().map(Image::ImageBytes), text: want.text.clone() }
            })
            .collect();
        let direct = client.embed(EmbedRequest { items, normalize: false }).await.unwrap().into_inner().embeddings;
        for ((key, image, text), e) in chunk.iter().zip(direct) {
            for (got, want, what) in [(image, &e.image_features, "image"), (text, &e.text_features, "text")] {
                match got {
                    Some(got) if want.is_empty() => assert!(got.iter().all(|x| *x == 0.0), "{key} {what}: zeros"),
                    Some(got) if dtype == "float16" => {
                        // Half precision: 11 significant bits.
                        for (g, w) in got.iter().zip(want) {
                            assert!((g - w).abs() <= w.abs() * 1e-3 + 1e-4, "{key} {what}: {g} vs {w}");
                        }
                    }
                    Some(got) => assert_close(got, want, &format!("{key} {what}")),
                    None => assert!(want.is_empty(), "{key}: the {what} array is missing"),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn webdataset_shards_with_corrupt_members_to_the_clip_retrieval_layout() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let dir = temp_dir("wds-layout");
    let shards = dir.join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let mut data = Dataset::default();

    // Shard 0: 20 good samples with corrupt images among them, a text-only sample and one with neither.
    let mut members = Vec::new();
    for i in 0..20u32 {
        let key = format!("00000{i:04}");
        let mut img = image(i, i % 3 == 0);
        if i == 7 || i == 13 {
            img = b"this is not an image".to_vec();
            data.bad.insert(key.clone(), "UNSUPPORTED_IMAGE_FORMAT".into());
        } else if i == 15 {
            img.truncate(img.len() / 2);
            data.bad.insert(key.clone(), "INVALID_IMAGE".into());
        } else {
            data.good.insert(key.clone(), Expected { image: Some(img.clone()), text: Some(format!("caption {i}")) });
        }
        members.push((format!("{key}.{}", if i % 3 == 0 { "jpg" } else { "png" }), img));
        members.push((format!("{key}.txt"), format!("caption {i}").into_bytes()));
        if i == 4 {
            members.push(("000000004b.txt".to_string(), b"a text with no image".to_vec()));
            data.good.insert("000000004b".into(), Expected { image: None, text: Some("a text with no image".into()) });
            members.push(("000000004c.json".to_string(), b"{}".to_vec()));
            data.bad.insert("000000004c".into(), "INPUT_EMPTY".into());
        }
    }
    write_tar(&shards.join("00000.tar"), &members);
    // Shard 1: images only, no texts.
    let mut members = Vec::new();
    for i in 0..15u32 {
        let key = format!("00001{i:04}");
        let img = image(100 + i, false);
        data.good.insert(key.clone(), Expected { image: Some(img.clone()), text: None });
        members.push((format!("{key}.webp.png"), Vec::new())); // not an image member of this key: skipped
        members.push((format!("{key}.png"), img));
    }
    write_tar(&shards.join("00001.tar"), &members);
    // Shard 2 is missing (a failed download): one error, named after the file.
    let missing = shards.join("00002.tar").display().to_string();
    data.bad.insert(missing.clone(), "INPUT_NOT_FOUND".into());
    // Shard 3: cut short in the middle of a member: what precedes is embedded, the sample cut fails.
    let full = good_shard(&dir, 3, 12, 0, &mut Dataset::default());
    let bytes = std::fs::read(&full).unwrap();
    let cut_at = {
        // The header of sample 10's image, plus a few bytes of its data.
        let mut archive = tar::Archive::new(bytes.as_slice());
        let e = archive
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .find(|e| e.path().unwrap().to_str().unwrap().starts_with("000030010."))
            .unwrap();
        e.raw_file_position() as usize + 5
    };
    std::fs::write(shards.join("00003.tar"), &bytes[..cut_at]).unwrap();
    let mut shard3 = Dataset::default();
    good_shard(&dir, 3, 10, 0, &mut shard3);
    data.good.extend(shard3.good);
    data.bad.insert("000030010".into(), "INPUT_UNREADABLE".into());

    let out = dir.join("out");
    let input = format!("{}/{{00000..00003}}.tar", shards.display());
    let flags =
        ["--format", "clip-retrieval", "--batch", "4", "--server", &server.url(), "--input", &input, "--output"];
    let run = |flags: &[&str]| {
        let mut f: Vec<&str> = flags.to_vec();
        f.push(out.to_str().unwrap());
        embed_cli(&f)
    };
    let log = ok(&run(&flags));
    assert!(log.contains("4 webdataset shards, 4 partitions, 4 for this process (0 already complete)"), "{log}");
    let (parts, hidden) = read_layout(&out);
    assert!(hidden.is_empty(), "temporary files left: {hidden:?}");
    assert_eq!(parts.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
    let (keys, errors) = keys_and_errors(&parts);
    assert_eq!(keys, data.good_keys(), "every good sample once");
    assert_eq!(errors, data.bad_keys(), "every bad sample once in the errors");
    // Rows in input order within a partition, and the metadata columns clip-retrieval readers expect.
    assert_eq!(strings(&parts[&1]["key"]), (0..15).map(|i| format!("00001{i:04}")).collect::<Vec<_>>());
    assert_eq!(strings(&parts[&0]["columns"]), ["key", "caption", "url", "has_image", "has_text"]);
    assert!(parts[&1].get("text_emb").is_none(), "no text array for a shard without texts");
    assert_eq!(parts[&2]["key"].as_array().unwrap().len(), 0, "the missing shard is an empty partition");
    assert_eq!(parts[&2]["errors"][0]["code"], "NOT_FOUND");
    assert_eq!(parts[&3]["errors"][0]["code"], "DATA_LOSS");
    assert_eq!(parts[&3]["url"][0], "http://example.com/000030000", "the url of the sample's json");
    check_against_direct_calls(&server, &parts, &data, "float16").await;

    // A rerun finds every partition complete and sends nothing.
    let messages = server.metric("clipserve_stream_messages_total").await;
    let log = ok(&run(&flags));
    assert!(log.contains("embedded 0, failed 0, 4 partitions already done"), "{log}");
    assert_eq!(server.metric("clipserve_stream_messages_total").await, messages);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn parquet_files_with_bytes_base64_and_corrupt_rows() {
    use arrow_array::builder::{BinaryBuilder, Int64Builder, StringBuilder};
    use arrow_array::{ArrayRef, RecordBatch};
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let dir = temp_dir("parquet-layout");
    let mut data = Dataset::default();
    let write = |path: &Path, columns: Vec<(&str, ArrayRef)>| {
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let props = parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(8)).build();
        let mut w =
            parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), Some(props))
                .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    };
    // a.parquet: string keys, image bytes, captions; a corrupt image, a row with neither, a text-only row.
    let (mut key, mut jpg, mut caption) = (StringBuilder::new(), BinaryBuilder::new(), StringBuilder::new());
    for i in 0..25u32 {
        let k = format!("a{i:03}");
        key.append_value(&k);
        let img = image(500 + i, i % 2 == 1);
        let text = format!("row {i}");
        match i {
            6 => {
                jpg.append_value(&img[..img.len() / 2]);
                caption.append_value(&text);
                data.bad.insert(k, "INVALID_IMAGE".into());
            }
            11 => {
                jpg.append_null();
                caption.append_null();
                data.bad.insert(k, "INPUT_EMPTY".into());
            }
            17 => {
                jpg.append_null();
                caption.append_value(&text);
                data.good.insert(k, Expected { image: None, text: Some(text) });
            }
            _ => {
                jpg.append_value(&img);
                caption.append_value(&text);
                data.good.insert(k, Expected { image: Some(img), text: Some(text) });
            }
        }
    }
    write(
        &dir.join("a.parquet"),
        vec![
            ("key", Arc::new(key.finish()) as ArrayRef),
            ("jpg", Arc::new(jpg.finish()) as ArrayRef),
            ("caption", Arc::new(caption.finish()) as ArrayRef),
        ],
    );
    // b.parquet: integer keys, base64 images (one a data: URI, one not base64 at all), no captions.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (mut key, mut jpg) = (Int64Builder::new(), StringBuilder::new());
    for i in 0..10i64 {
        key.append_value(9000 + i);
        let img = image(700 + i as u32, false);
        match i {
            3 => {
                jpg.append_value("%%% not base64 %%%");
                data.bad.insert((9000 + i).to_string(), "INVALID_BASE64".into());
                continue;
            }
            5 => jpg.append_value(format!("data:image/png;base64,{}", b64.encode(&img))),
            _ => jpg.append_value(b64.encode(&img)),
        }
        data.good.insert((9000 + i).to_string(), Expected { image: Some(img), text: None });
    }
    write(
        &dir.join("b.parquet"),
        vec![("key", Arc::new(key.finish()) as ArrayRef), ("jpg", Arc::new(jpg.finish()) as ArrayRef)],
    );

    let out = dir.join("out");
    let input = format!("{}/*.parquet", dir.display());
    let log = ok(&embed_cli(&[
        "--format",
        "clip-retrieval",
        "--dtype",
        "float32",
        "--partition-size",
        "10",
        "--image-column",
        "jpg",
        "--server",
        &server.url(),
        "--input",
        &input,
        "--output",
        out.to_str().unwrap(),
    ]));
    // a.parquet: rows 0-9, 10-19, 20-24; b.parquet: rows 0-9.
    assert!(log.contains("2 Parquet files, 4 partitions"), "{log}");
    let (parts, hidden) = read_layout(&out);
    assert!(hidden.is_empty(), "{hidden:?}");
    assert_eq!(parts.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
    let (keys, errors) = keys_and_errors(&parts);
    assert_eq!(keys, data.good_keys());
    assert_eq!(errors, data.bad_keys());
    assert_eq!(strings(&parts[&2]["key"]), ["a020", "a021", "a022", "a023", "a024"]);
    check_against_direct_calls(&server, &parts, &data, "float32").await;

    // A column named by a flag that is not there stops the run before anything is sent.
    let out = embed_cli(&[
        "--image-column",
        "png",
        "--server",
        &server.url(),
        "--input",
        &input,
        "--output",
        dir.join("x").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no column \"png\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_shard_processes_over_two_servers_split_the_work() {
    let model = model_dir("tiny");
    let (a, b) = tokio::join!(TestServer::start(&model, &[]), TestServer::start(&model, &[]));
    let dir = temp_dir("wds-shards");
    let mut data = Dataset::default();
    for s in 0..6 {
        good_shard(&dir, s, 12, 5, &mut data);
    }
    let out = dir.join("out");
    // By name: `localhost` goes through the resolver, like a Kubernetes Service.
    let port = |s: &TestServer| s.grpc_addr.rsplit_once(':').unwrap().1.to_string();
    let servers = format!("http://localhost:{},http://localhost:{}", port(&a), port(&b));
    let input = format!("{}/{{00000..00005}}.tar", dir.display());
    let args = |shard: &str| -> Vec<String> {
        // One message in flight per server, so that neither server can take a whole process's share at once.
        let base = ["--format", "clip-retrieval", "--batch", "4", "--window", "1", "--shard", shard];
        base.into_iter()
            .chain(["--server", &servers, "--input", &input])
            .map(|s| s.to_string())
            .chain(["--output".to_string(), out.display().to_string()])
            .collect()
    };
    let (first, second) = (args("0/2"), args("1/2"));
    let (r0, r1) = tokio::join!(
        tokio::task::spawn_blocking(move || embed_cli(&first.iter().map(String::as_str).collect::<Vec<_>>())),
        tokio::task::spawn_blocking(move || embed_cli(&second.iter().map(String::as_str).collect::<Vec<_>>())),
    );
    let (log0, log1) = (ok(&r0.unwrap()), ok(&r1.unwrap()));
    assert!(log0.contains("6 partitions, 3 for this process"), "{log0}");
    assert!(log1.contains("6 partitions, 3 for this process"), "{log1}");
    let (parts, hidden) = read_layout(&out);
    assert!(hidden.is_empty(), "{hidden:?}");
    assert_eq!(parts.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5]);
    let (keys, errors) = keys_and_errors(&parts);
    assert_eq!(keys, data.good_keys(), "the union is the input, nothing twice");
    assert_eq!(errors, data.bad_keys());
    for (s, name) in [(&a, "a"), (&b, "b")] {
        assert!(s.metric("clipserve_stream_messages_total").await > 0.0, "server {name} got no work");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_killed_mid_run_then_run_again_loses_nothing_and_doubles_nothing() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let dir = temp_dir("wds-kill");
    let shards = dir.join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let mut data = Dataset::default();
    for s in 0..16 {
        good_shard(&shards, s, 24, 7, &mut data);
    }
    let input = format!("{}/{{00000..00015}}.tar", shards.display());
    let flags = |out: &Path| -> Vec<String> {
        // Small messages, one in flight: a run long enough to be killed in the middle.
        [
            "--no-progress",
            "--format",
            "clip-retrieval",
            "--batch",
            "2",
            "--window",
            "1",
            "--server",
            &server.url(),
            "--input",
            &input,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(["--output".to_string(), out.display().to_string()])
        .collect()
    };
    let killed = dir.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_clipserve"))
        .arg("embed")
        .args(flags(&killed))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let complete = |out: &Path| {
        std::fs::read_dir(out.join("metadata"))
            .map(|d| d.filter_map(Result::ok).filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while complete(&killed) < 3 {
        assert!(Instant::now() < deadline, "the run made no progress");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done_at_kill = complete(&killed);
    assert!(done_at_kill < 16, "the kill came mid-run ({done_at_kill} partitions complete)");

    let log = ok(&embed_cli(&flags(&killed).iter().map(String::as_str).collect::<Vec<_>>()[1..]));
    assert!(log.contains(&format!("({done_at_kill} already complete)")), "{log}");
    assert!(
        log.contains(&format!("{done_at_kill} partitions already done, {} partitions written", 16 - done_at_kill)),
        "{log}"
    );
    let (parts, hidden) = read_layout(&killed);
    assert!(hidden.is_empty(), "what the killed run left is gone: {hidden:?}");
    let (keys, errors) = keys_and_errors(&parts);
    assert_eq!(keys, data.good_keys(), "every good item once");
    assert_eq!(errors, data.bad_keys(), "every bad item once");

    // The same partitions as a run that was never interrupted: same keys in the same order, same errors.
    let whole = dir.join("whole");
    ok(&embed_cli(&flags(&whole).iter().map(String::as_str).collect::<Vec<_>>()[1..]));
    let (reference, _) = read_layout(&whole);
    assert_eq!(reference.len(), 16);
    for (n, p) in &reference {
        assert_eq!(parts[n]["key"], p["key"], "partition {n}");
        assert_eq!(parts[n]["errors"], p["errors"], "partition {n}");
        assert_eq!(parts[n]["img_emb"]["shape"], p["img_emb"]["shape"], "partition {n}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_name_with_several_addresses_gets_a_stream_per_address_and_follows_them() {
    let model = model_dir("tiny");
    let (a, b, c) =
        tokio::join!(TestServer::start(&model, &[]), TestServer::start(&model, &[]), TestServer::start(&model, &[]));
    let addr = |s: &TestServer| -> SocketAddr { s.grpc_addr.parse().unwrap() };
    // What the name resolves to, changed by the test as a headless Service's endpoints change.
    let addresses = Arc::new(Mutex::new(vec![addr(&a), addr(&b)]));
    let lookups = Arc::new(Mutex::new(HashSet::new()));
    let resolver: clipserve::client::embed::Resolver = {
        let (addresses, lookups) = (addresses.clone(), lookups.clone());
        Arc::new(move |host, port| {
            lookups.lock().unwrap().insert((host, port));
            let now = addresses.lock().unwrap().clone();
            Box::pin(async move { Ok(now) })
        })
    };
    let dir = temp_dir("wds-dns");
    let mut data = Dataset::default();
    for s in 0..4 {
        good_shard(&dir, s, 150, 0, &mut data);
    }
    let output = dir.join("out.jsonl");
    let argv = [
        "clipserve",
        "embed",
        "--no-progress",
        "--batch",
        "2",
        "--window",
        "2",
        "--resolve-interval",
        "100ms",
        "--server",
        "http://pods.test:50051",
        "--input",
        &format!("{}/{{00000..00003}}.tar", dir.display()),
        "--output",
        output.to_str().unwrap(),
    ];
    let args = match <clipserve::cli::Cli as clap::Parser>::parse_from(argv).command {
        clipserve::cli::Command::Embed(a) => a,
        _ => unreachable!(),
    };
    let run = tokio::spawn(clipserve::client::embed::embed(args, resolver));
    let lines = |p: &Path| std::fs::read_to_string(p).map(|t| t.lines().count()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while lines(&output) < 60 {
        assert!(Instant::now() < deadline, "the run made no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The first two leave the name, a third joins: the streams to a and b drain and end, c takes the rest.
    *addresses.lock().unwrap() = vec![addr(&c)];
    let switched_at = lines(&output);
    let summary = tokio::time::timeout(Duration::from_secs(120), run).await.expect("the run ended").unwrap().unwrap();
    assert!(switched_at < data.good.len(), "the switch came mid-run");
    assert_eq!(summary.embedded as usize, data.good.len());
    assert_eq!(summary.failed, 0);
    let records: Vec<Value> =
        std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut ids: Vec<String> = records.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    assert_eq!(ids, data.good_keys(), "every item once");
    assert_eq!(lookups.lock().unwrap().iter().cloned().collect::<Vec<_>>(), [("pods.test".to_string(), 50051)]);
    let (ma, mb, mc) = (
        a.metric("clipserve_stream_messages_total").await,
        b.metric("clipserve_stream_messages_total").await,
        c.metric("clipserve_stream_messages_total").await,
    );
    assert!(ma > 0.0 && mb > 0.0, "both first addresses got streams: {ma} {mb}");
    assert!(mc > 0.0, "the address that joined got a stream: {mc}");
    let _ = std::fs::remove_dir_all(&dir);
}
