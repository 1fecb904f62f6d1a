//! `clipserve embed` against real servers: a folder of 1000 generated images with corrupt files planted among
//! them; nothing lost, every embedding equal to the single-call one, failures in the errors file, and a second
//! run that resumes instead of starting over. Then what goes wrong: an image the server will never take (one
//! attempt, its reason in the errors file), no server to reach (a bounded wait and an error), inputs that cannot
//! be read (one errors line each), a message the server refuses (only the item that does not fit fails), and a
//! server killed mid-run (nothing lost, nothing twice).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
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

/// 1000 small PNG/JPEG images in nested folders, plus corrupt files; returns (good ids, corrupt ids).
fn make_folder(dir: &Path) -> (HashSet<String>, HashSet<String>) {
    let mut good = HashSet::new();
    for i in 0..1000u32 {
        let sub = format!("part{:02}", i / 100);
        std::fs::create_dir_all(dir.join(&sub)).unwrap();
        let img = image::RgbImage::from_fn(24 + i % 17, 20 + i % 13, |x, y| {
            image::Rgb([(i * 7 % 256) as u8, (x * 9 + i) as u8, (y * 11 + i / 3) as u8])
        });
        let (name, format) = if i % 3 == 0 {
            (format!("{sub}/img{i:04}.jpg"), image::ImageFormat::Jpeg)
        } else {
            (format!("{sub}/img{i:04}.png"), image::ImageFormat::Png)
        };
        img.save_with_format(dir.join(&name), format).unwrap();
        good.insert(name);
    }
    let truncated = std::fs::read(dir.join("part00/img0001.png")).unwrap();
    let corrupt: Vec<(&str, Vec<u8>)> = vec![
        ("part03/broken.png", truncated[..truncated.len() / 2].to_vec()),
        ("part05/not-really.jpg", b"just some text, not a JPEG".to_vec()),
        ("part07/empty.png", Vec::new()),
        ("garbage.webp", vec![0x17; 3000]),
        ("part09/page.gif", b"<html><body>hello</body></html>".to_vec()),
    ];
    let mut bad = HashSet::new();
    for (name, bytes) in corrupt {
        std::fs::write(dir.join(name), bytes).unwrap();
        bad.insert(name.to_string());
    }
    std::fs::write(dir.join("README.txt"), "not an image extension: skipped").unwrap();
    (good, bad)
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn embed_cli(servers: &str, input: &Path, output: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_clipserve"))
        .args(["embed", "--no-progress", "--batch", "16", "--window", "4", "--server", servers, "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "clipserve embed failed: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_images_through_two_servers() {
    let model = model_dir("tiny");
    let (a, b) = tokio::join!(TestServer::start(&model, &[]), TestServer::start(&model, &[]));
    let dir = temp_dir("bulk-in");
    let (good, bad) = make_folder(&dir);
    let out_dir = temp_dir("bulk-out");
    let output = out_dir.join("embeddings.jsonl");
    let errors = out_dir.join("embeddings.errors.jsonl");
    let servers = format!("{},{}", a.url(), b.url());

    embed_cli(&servers, &dir, &output);
    let records = lines(&output);
    let ids: HashSet<String> = records.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(records.len(), 1000, "one record per good image, no duplicates");
    assert_eq!(ids, good, "nothing lost");
    let failures = lines(&errors);
    let failed: HashSet<String> = failures.iter().map(|f| f["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(failed, bad, "the errors file holds exactly the corrupt files");
    assert!(failures.iter().all(|f| f["code"] == "INVALID_ARGUMENT"), "{failures:?}");
    // Both replicas took part.
    for s in [&a, &b] {
        assert!(s.metric(r#"clipserve_model_items_total{modality="image"}"#).await > 0.0, "a server got no work");
    }

    // Every embedding equals what a direct call returns for the same file.
    let by_id: HashMap<String, Vec<f32>> = records
        .iter()
        .map(|r| {
            let v = r["image_features"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            (r["id"].as_str().unwrap().to_string(), v)
        })
        .collect();
    let mut client = a.client().await;
    let mut names: Vec<&String> = good.iter().collect();
    names.sort();
    for chunk in names.chunks(100) {
        let items = chunk
            .iter()
            .map(|n| Item {
                id: n.to_string(),
                image: Some(Image::ImageBytes(std::fs::read(dir.join(n)).unwrap())),
                text: None,
            })
            .collect();
        let direct = client.embed(EmbedRequest { items, normalize: false }).await.unwrap().into_inner();
        for e in direct.embeddings {
            assert_close(&by_id[&e.id], &e.image_features, &e.id);
        }
    }

    // A second run resumes: nothing is sent again.
    let before = a.metric(r#"clipserve_model_items_total{modality="image"}"#).await
        + b.metric(r#"clipserve_model_items_total{modality="image"}"#).await;
    let log = embed_cli(&servers, &dir, &output);
    assert!(log.contains("embedded 0, failed 0, 1005 items already done"), "{log}");
    let after = a.metric(r#"clipserve_model_items_total{modality="image"}"#).await
        + b.metric(r#"clipserve_model_items_total{modality="image"}"#).await;
    assert_eq!(before, after, "a finished run was embedded again");
    assert_eq!(lines(&output).len(), 1000);

    // An interrupted run (its last 100 lines lost) redoes exactly those.
    let text = std::fs::read_to_string(&output).unwrap();
    let kept: Vec<&str> = text.lines().take(900).collect();
    std::fs::write(&output, kept.join("\n") + "\n").unwrap();
    let log = embed_cli(&servers, &dir, &output);
    assert!(log.contains("embedded 100, failed 0, 905 items already done"), "{log}");
    let again: HashSet<String> = lines(&output).iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(again, good);
    assert_eq!(lines(&output).len(), 1000);

    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn jsonl_input_with_texts_and_npy_output() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let dir = temp_dir("bulk-jsonl");
    std::fs::copy(fixtures_dir().join("images/landscape_640x480.jpg"), dir.join("cat.jpg")).unwrap();
    let input = dir.join("input.jsonl");
    std::fs::write(
        &input,
        [
            r#"{"id": "a", "image": "cat.jpg", "text": "a photo of a cat"}"#,
            r#"{"id": "b", "text": "just a text"}"#,
            r#"{"id": "c", "image": "missing.jpg"}"#,
            r#"{"id": "d"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = dir.join("npy");
    let status = Command::new(env!("CARGO_BIN_EXE_clipserve"))
        // The first replica is down: its share is retried and the live one does the work.
        .args(["embed", "--no-progress", "--format", "npy", "--server", "http://127.0.0.1:9"])
        .args(["--server", &server.url(), "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let npy = std::fs::read(out.join("text_embeddings.npy")).unwrap();
    assert_eq!(&npy[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let header = std::str::from_utf8(&npy[10..10 + header_len]).unwrap();
    assert!(header.contains("'shape': (2, 512)"), "{header}");
    assert_eq!(npy.len(), 10 + header_len + 2 * 512 * 4);
    assert_eq!(std::fs::read_to_string(out.join("text_ids.txt")).unwrap().lines().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(std::fs::read_to_string(out.join("image_ids.txt")).unwrap().trim(), "a");
    let failed: HashSet<String> =
        lines(&out.join("errors.jsonl")).iter().map(|f| f["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(failed, HashSet::from(["c".to_string(), "d".to_string()]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn parquet_output_holds_the_same_embeddings() {
    use arrow_array::{Array, FixedSizeListArray, Float32Array, StringArray};
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let dir = temp_dir("bulk-parquet");
    let input = dir.join("input.jsonl");
    std::fs::copy(fixtures_dir().join("images/gray_300x300.png"), dir.join("g.png")).unwrap();
    std::fs::write(&input, "{\"id\": \"x\", \"image\": \"g.png\"}\n{\"id\": \"y\", \"text\": \"a dog\"}\n").unwrap();
    let output = dir.join("out.parquet");
    let status = Command::new(env!("CARGO_BIN_EXE_clipserve"))
        .args(["embed", "--no-progress", "--format", "parquet", "--server", &server.url(), "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success());
    let file = std::fs::File::open(&output).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    let b = &batches[0];
    let ids = b.column_by_name("id").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
    // Fixed-size lists: one dimension for the whole column, so readers get a matrix.
    let images = b.column_by_name("image_features").unwrap().as_any().downcast_ref::<FixedSizeListArray>().unwrap();
    let texts = b.column_by_name("text_features").unwrap().as_any().downcast_ref::<FixedSizeListArray>().unwrap();
    assert_eq!((images.value_length(), texts.value_length()), (512, 512));
    let mut client = server.client().await;
    for row in 0..2 {
        let (image, text) = match ids.value(row) {
            "x" => (Some(Image::ImageBytes(std::fs::read(dir.join("g.png")).unwrap())), None),
            "y" => (None, Some("a dog".to_string())),
            other => panic!("unexpected id {other}"),
        };
        let want = client
            .embed(EmbedRequest { items: vec![Item { id: "w".into(), image, text }], normalize: false })
            .await
            .unwrap()
            .into_inner()
            .embeddings
            .remove(0);
        let (column, want, other) = if ids.value(row) == "x" {
            (images, want.image_features, texts)
        } else {
            (texts, want.text_features, images)
        };
        assert!(other.is_null(row), "only the asked-for modality is present");
        let values = column.value(row);
        let got = values.as_any().downcast_ref::<Float32Array>().unwrap().values().to_vec();
        assert_eq!(got.len(), 512);
        assert!(cosine(&got, &want) > 0.99999);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `clipserve embed` with these flags; returns its output and how long it took. A run that does not end
/// within two minutes is killed and fails the test.
fn embed_with(flags: &[&str], input: &Path, output: &Path) -> (Output, Duration) {
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_clipserve"))
        .args(["embed", "--no-progress"])
        .args(flags)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => (out, start.elapsed()),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("clipserve embed {flags:?} did not finish within 120 s");
        }
    }
}

/// The lines of a JSONL file (none if it does not exist).
fn lines_or_none(path: &Path) -> Vec<Value> {
    if path.exists() {
        lines(path)
    } else {
        Vec::new()
    }
}

/// The ids of a journal or errors file, as a list (so duplicates show).
fn ids(rows: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = rows.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

fn sorted(set: &HashSet<String>) -> Vec<String> {
    let mut v: Vec<String> = set.iter().cloned().collect();
    v.sort();
    v
}

fn save_image(path: &Path, seed: u32, size: u32) {
    image::RgbImage::from_fn(size, size, |x, y| {
        image::Rgb([(seed * 37 % 256) as u8, (x * 7 + seed) as u8, (y * 13 + seed * 3) as u8])
    })
    .save_with_format(path, image::ImageFormat::Png)
    .unwrap();
}

/// A PNG of noise: it compresses badly, so it is large for its size.
fn save_noise(path: &Path, size: u32) {
    let mut state = 0x2545_f491_u32;
    image::RgbImage::from_fn(size, size, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    })
    .save_with_format(path, image::ImageFormat::Png)
    .unwrap();
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", path.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_over_the_server_limit_fails_once_with_the_server_reason() {
    let server = TestServer::start(&model_dir("tiny"), &["--max-image-bytes", "20000"]).await;
    let dir = temp_dir("bulk-too-large");
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    save_image(&input.join("a.png"), 1, 32);
    save_image(&input.join("b.png"), 2, 40);
    save_noise(&input.join("big.png"), 200);
    assert!(std::fs::metadata(input.join("big.png")).unwrap().len() > 20_000);
    let output = dir.join("out.jsonl");

    // One item per message, so the server's message count is the number of attempts.
    let (out, took) = embed_with(&["--batch", "1", "--server", &server.url()], &input, &output);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(ids(&lines(&output)), ["a.png", "b.png"]);
    let failures = lines(&dir.join("out.errors.jsonl"));
    assert_eq!(failures.len(), 1, "{failures:?}");
    let f = &failures[0];
    assert_eq!(f["id"], "big.png");
    assert_eq!(f["code"], "RESOURCE_EXHAUSTED");
    assert_eq!(f["reason"], "IMAGE_TOO_LARGE");
    assert!(f["message"].as_str().unwrap().contains("20000"), "the server's own message: {f}");
    assert_eq!(server.metric("clipserve_stream_messages_total").await, 3.0, "each item sent exactly once");
    // Eight attempts with backoff would take more than 20 s.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_server_limit_fails_only_the_item_that_does_not_fit() {
    // The server refuses the whole message; the client finds which item it was and sends the others again.
    let server = TestServer::start(&model_dir("tiny"), &["--max-message-bytes", "60000"]).await;
    let dir = temp_dir("bulk-message-limit");
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let mut good = HashSet::new();
    for i in 0..10u32 {
        let name = format!("img{i:02}.png");
        save_image(&input.join(&name), i, 32);
        good.insert(name);
    }
    save_noise(&input.join("img04-big.png"), 200);
    assert!(std::fs::metadata(input.join("img04-big.png")).unwrap().len() > 60_000);
    let output = dir.join("out.jsonl");
    let (out, _) = embed_with(&["--batch", "8", "--server", &server.url()], &input, &output);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ids(&lines(&output)), sorted(&good), "every item that fits, once");
    let failures = lines(&dir.join("out.errors.jsonl"));
    assert_eq!(ids(&failures), ["img04-big.png"], "{failures:?}");
    assert_eq!(failures[0]["code"], "RESOURCE_EXHAUSTED");
    assert_eq!(failures[0]["reason"], "REQUEST_TOO_LARGE");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_reachable_server_is_an_error_within_bounded_time() {
    let dir = temp_dir("bulk-unreachable");
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    save_image(&input.join("a.png"), 1, 32);
    save_image(&input.join("b.png"), 2, 32);
    std::os::unix::fs::symlink(dir.join("nowhere.png"), input.join("dangling.png")).unwrap();
    // Two ports nothing listens on: bound, then closed.
    let closed: Vec<String> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        })
        .collect();
    let output = dir.join("out.jsonl");
    let (out, took) = embed_with(&["--retries", "3", "--server", &closed.join(",")], &input, &output);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(log.contains("the run did not finish") && log.contains("every server was given up"), "{log}");
    for url in &closed {
        assert!(log.contains(url.as_str()), "the message names {url}: {log}");
    }
    assert!(lines_or_none(&output).is_empty(), "no records");
    assert!(lines_or_none(&dir.join("out.errors.jsonl")).is_empty(), "nothing is failed when nothing was sent");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_unreadable_input_is_one_errors_line() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let dir = temp_dir("bulk-unreadable");
    let input = dir.join("in");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    let mut good = HashSet::new();
    for i in 0..12u32 {
        let name = if i % 2 == 0 { format!("img{i:02}.png") } else { format!("sub/img{i:02}.png") };
        save_image(&input.join(&name), i, 24 + i);
        good.insert(name);
    }
    // Named like images, but nothing can be read from them; (id, code, reason).
    let mut bad = vec![
        ("dangling.png", "NOT_FOUND", "INPUT_NOT_FOUND"),
        ("sub/loop.jpg", "UNKNOWN", "INPUT_UNREADABLE"),
        ("pipe.png", "INVALID_ARGUMENT", "INPUT_NOT_A_FILE"),
    ];
    std::os::unix::fs::symlink(dir.join("nowhere.png"), input.join("dangling.png")).unwrap();
    std::os::unix::fs::symlink("loop.jpg", input.join("sub/loop.jpg")).unwrap();
    mkfifo(&input.join("pipe.png"));
    // Unreadable by permissions, except for root (who reads it like any other image).
    save_image(&input.join("secret.png"), 99, 30);
    std::fs::set_permissions(input.join("secret.png"), std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        good.insert("secret.png".into());
    } else {
        bad.push(("secret.png", "PERMISSION_DENIED", "INPUT_UNREADABLE"));
    }
    // A good image reached through a symlink is embedded under the link's name.
    save_image(&dir.join("outside.png"), 7, 28);
    std::os::unix::fs::symlink(dir.join("outside.png"), input.join("linked.png")).unwrap();
    good.insert("linked.png".into());
    let output = dir.join("out.jsonl");
    let errors = dir.join("out.errors.jsonl");

    for run in 0..2 {
        let (out, _) = embed_with(&["--batch", "4", "--server", &server.url()], &input, &output);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        if run == 1 {
            assert!(log.contains("embedded 0, failed 0"), "a second run has nothing left to do: {log}");
        }
        assert_eq!(ids(&lines(&output)), sorted(&good), "every good image once");
        let failures = lines(&errors);
        let mut want: Vec<(String, String, String)> =
            bad.iter().map(|(i, c, r)| (i.to_string(), c.to_string(), r.to_string())).collect();
        want.sort();
        let mut got: Vec<(String, String, String)> = failures
            .iter()
            .map(|f| {
                let s = |k: &str| f[k].as_str().unwrap().to_string();
                (s("id"), s("code"), s("reason"))
            })
            .collect();
        got.sort();
        assert_eq!(got, want, "one errors line per unreadable input: {failures:?}");
    }

    // A JSONL list: a line that is not JSON and a missing file are one line each too.
    let list = dir.join("list.jsonl");
    std::fs::write(
        &list,
        "{\"id\": \"ok\", \"image\": \"in/img00.png\"}\n{oops\n{\"id\": \"missing\", \"image\": \"in/none.png\"}\n",
    )
    .unwrap();
    let list_out = dir.join("list-out.jsonl");
    let (out, _) = embed_with(&["--server", &server.url()], &list, &list_out);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ids(&lines(&list_out)), ["ok"]);
    let failures = lines(&dir.join("list-out.errors.jsonl"));
    assert_eq!(ids(&failures), ["list.jsonl:2", "missing"]);
    let reason = |id: &str| failures.iter().find(|f| f["id"] == id).unwrap()["reason"].clone();
    assert_eq!(reason("list.jsonl:2"), "INPUT_LINE_INVALID");
    assert_eq!(reason("missing"), "INPUT_NOT_FOUND");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_killed_mid_run_loses_nothing_and_writes_nothing_twice() {
    let model = model_dir("tiny");
    let (a, b) = tokio::join!(TestServer::start(&model, &[]), TestServer::start(&model, &[]));
    let dir = temp_dir("bulk-kill");
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let (mut good, mut bad) = (HashSet::new(), HashSet::new());
    for i in 0..600u32 {
        let name = format!("img{i:04}.png");
        match i % 40 {
            // Unreadable and corrupt items spread through the run, so that some are in flight at the kill.
            7 => std::os::unix::fs::symlink(dir.join("nowhere.png"), input.join(&name)).unwrap(),
            23 => std::fs::write(input.join(&name), b"not a png").unwrap(),
            _ => {
                save_image(&input.join(&name), i, 24 + i % 9);
                good.insert(name.clone());
                continue;
            }
        }
        bad.insert(name);
    }
    let output = dir.join("out.jsonl");
    let servers = format!("{},{}", a.url(), b.url());
    let child = Command::new(env!("CARGO_BIN_EXE_clipserve"))
        .args(["embed", "--no-progress", "--batch", "4", "--window", "4", "--server", &servers, "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the first server once the run is well under way.
    let deadline = Instant::now() + Duration::from_secs(120);
    let written = loop {
        let n = std::fs::read_to_string(&output).map(|t| t.lines().count()).unwrap_or(0);
        if n >= 100 {
            break n;
        }
        assert!(Instant::now() < deadline, "the run made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let a_messages = a.metric("clipserve_stream_messages_total").await;
    drop(a); // SIGKILL
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(a_messages > 0.0, "the killed server had taken part");
    assert!(written < good.len(), "the kill came mid-run ({written} written)");
    assert!(log.contains("stream broke"), "the kill broke a stream with messages in flight: {log}");

    let records = lines(&output);
    assert_eq!(records.len(), good.len(), "one record per good image");
    assert_eq!(ids(&records), sorted(&good), "every good image exactly once");
    let failures = lines(&dir.join("out.errors.jsonl"));
    assert_eq!(ids(&failures), sorted(&bad), "every bad input exactly once");
    assert!(b.metric(r#"clipserve_model_items_total{modality="image"}"#).await > 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}
