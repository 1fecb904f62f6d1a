//! `clipserve embed` against two real servers: a folder of 1000 generated images with corrupt files planted
//! among them; nothing lost, every embedding equal to the single-call one, failures in the errors file, and a
//! second run that resumes instead of starting over.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

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
    assert!(log.contains("0 to embed"), "{log}");
    let after = a.metric(r#"clipserve_model_items_total{modality="image"}"#).await
        + b.metric(r#"clipserve_model_items_total{modality="image"}"#).await;
    assert_eq!(before, after, "a finished run was embedded again");
    assert_eq!(lines(&output).len(), 1000);

    // An interrupted run (its last 100 lines lost) redoes exactly those.
    let text = std::fs::read_to_string(&output).unwrap();
    let kept: Vec<&str> = text.lines().take(900).collect();
    std::fs::write(&output, kept.join("\n") + "\n").unwrap();
    let log = embed_cli(&servers, &dir, &output);
    assert!(log.contains("100 to embed"), "{log}");
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
    use arrow_array::{Array, Float32Array, ListArray, StringArray};
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
    let images = b.column_by_name("image_features").unwrap().as_any().downcast_ref::<ListArray>().unwrap();
    let texts = b.column_by_name("text_features").unwrap().as_any().downcast_ref::<ListArray>().unwrap();
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
