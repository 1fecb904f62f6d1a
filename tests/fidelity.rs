//! How far `--preprocess fast` is from the exact path: over the photo-like set of dev/make_test_photos.py
//! (61 images: 57 JPEGs of many sizes and aspect ratios, gray, 4:2:0 / 4:2:2 / 4:4:4, progressive, qualities
//! 60 to 98, one CMYK; PNG and WebP), the largest difference of a normalised pixel and the cosine between the
//! embeddings the full-size ViT-B/32 (seeded random weights) gives the two tensors. Prints the worst figures (the
//! README and dev/BENCHMARKS.md quote them) and checks their bounds; what the fast path does not decode scaled
//! (other formats, CMYK, JPEGs whose short side is under twice the model's input) must come out identical.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use clipserve::inputs::image::{never_stop, ImagePreprocessor, PreprocessMode};
use clipserve::model::{Backend, Manifest, TorchBackend};
use common::*;
use serde_json::Value;

/// The photo set, made (once, whichever test asks first) by the generator next to the other test data.
fn photos() -> (PathBuf, Vec<Value>) {
    static PHOTOS: std::sync::OnceLock<(PathBuf, Vec<Value>)> = std::sync::OnceLock::new();
    PHOTOS.get_or_init(make_photos).clone()
}

fn make_photos() -> (PathBuf, Vec<Value>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/test-photos");
    let script = root.join("dev/make_test_photos.py");
    let manifest = dir.join("manifest.json");
    let stale = match (std::fs::metadata(&manifest), std::fs::metadata(&script)) {
        (Ok(m), Ok(s)) => m.modified().unwrap() < s.modified().unwrap(),
        _ => true,
    };
    if stale {
        let python = root.join(".venv/bin/python");
        let status = Command::new(&python).arg(&script).arg("--out").arg(&dir).status().unwrap_or_else(|e| {
            panic!("{}: {e}. The virtualenv is made by deploy/setup.sh (dev/test.sh runs it)", python.display())
        });
        assert!(status.success(), "{} failed", script.display());
    }
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    (dir, m["images"].as_array().unwrap().clone())
}

struct Case {
    file: String,
    /// A JPEG the fast path decodes scaled: not CMYK, short side at least twice the model's input (rounded up).
    fast_path: bool,
    exact: Vec<f32>,
    fast: Vec<f32>,
}

#[test]
fn fast_preprocessing_stays_close_to_exact() {
    let (dir, images) = photos();
    assert!(images.len() >= 50, "{} images", images.len());
    let model = model_dir("vit-b32");
    let manifest = Manifest::load(&model).unwrap();
    let pre = ImagePreprocessor {
        size: manifest.image_size,
        mean: manifest.image_mean,
        std: manifest.image_std,
        max_bytes: 64 << 20,
        max_pixels: 100_000_000,
        max_jpeg_scans: 100,
    };
    let cases: Vec<Case> = images
        .iter()
        .map(|img| {
            let file = img["file"].as_str().unwrap().to_string();
            let bytes = std::fs::read(dir.join(&file)).unwrap();
            let run =
                |mode| pre.preprocess_mode_until(&bytes, mode, &never_stop).unwrap_or_else(|e| panic!("{file}: {e}"));
            let short = img["width"].as_u64().unwrap().min(img["height"].as_u64().unwrap());
            let fast_path = img["format"] == "jpeg" && img["mode"] != "CMYK" && short.div_ceil(2) >= pre.size as u64;
            Case { exact: run(PreprocessMode::Exact), fast: run(PreprocessMode::Fast), file, fast_path }
        })
        .collect();

    // What the fast path leaves alone (other formats, CMYK, JPEGs too small to scale) comes out identical.
    for c in cases.iter().filter(|c| !c.fast_path) {
        assert!(c.exact == c.fast, "{}: fast differs from exact although it is not a JPEG it scales", c.file);
    }
    assert!(cases.iter().filter(|c| !c.fast_path).count() >= 10);

    let _no_grad = tch::no_grad_guard();
    let mut backend = TorchBackend::load(&model, &manifest, tch::Device::Cpu, false).unwrap();
    let mut embed = |tensors: Vec<&[f32]>| -> Vec<Vec<f32>> {
        tensors.chunks(16).flat_map(|chunk| backend.encode_images(chunk).unwrap()).collect()
    };
    let jpegs: Vec<&Case> = cases.iter().filter(|c| c.fast_path).collect();
    let exact = embed(jpegs.iter().map(|c| c.exact.as_slice()).collect());
    let fast = embed(jpegs.iter().map(|c| c.fast.as_slice()).collect());

    let mut worst_pixel = (0f32, String::new());
    let mut worst_cosine = (1f64, String::new());
    let (mut mean_abs, mut values) = (0f64, 0usize);
    eprintln!("{:<28} {:>9} {:>10} {:>10}", "image", "max diff", "mean diff", "cosine");
    for (i, c) in jpegs.iter().enumerate() {
        let diffs = c.exact.iter().zip(&c.fast).map(|(a, b)| (a - b).abs());
        let max = diffs.clone().fold(0f32, f32::max);
        let sum: f64 = diffs.map(f64::from).sum();
        mean_abs += sum;
        values += c.exact.len();
        let cos = cosine(&exact[i], &fast[i]);
        eprintln!("{:<28} {max:>9.4} {:>10.5} {cos:>10.6}", c.file, sum / c.exact.len() as f64);
        if max > worst_pixel.0 {
            worst_pixel = (max, c.file.clone());
        }
        if cos < worst_cosine.0 {
            worst_cosine = (cos, c.file.clone());
        }
    }
    eprintln!(
        "fast vs exact over the {} JPEGs it decodes scaled ({} images in all, the others identical): worst max \
         pixel difference {:.4} ({}), mean absolute \
         difference {:.5}, worst embedding cosine {:.6} ({}), model vit-b32 with {}",
        jpegs.len(),
        cases.len(),
        worst_pixel.0,
        worst_pixel.1,
        mean_abs / values as f64,
        worst_cosine.0,
        worst_cosine.1,
        manifest.weights
    );
    let summary = serde_json::json!({
        "images": cases.len(),
        "jpegs_scaled": jpegs.len(),
        "worst_max_pixel_difference": worst_pixel.0,
        "worst_max_pixel_difference_image": worst_pixel.1,
        "mean_absolute_difference": mean_abs / values as f64,
        "worst_cosine": worst_cosine.0,
        "worst_cosine_image": worst_cosine.1,
        "model": "vit-b32",
        "weights": manifest.weights,
    });
    // dev/benchmark.py quotes it in dev/BENCHMARKS.md.
    std::fs::write(dir.join("fidelity.json"), serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    // The fast path really is another decode on the JPEGs it scales (which cannot give the same pixels) ...
    assert!(jpegs.len() >= 40, "{} JPEGs scaled", jpegs.len());
    for c in &jpegs {
        assert!(c.exact != c.fast, "{}: the fast path gave the exact pixels", c.file);
    }
    // ... whose pixels stay close: the normalised range is about 4 units wide (1/255 of it is 0.015).
    assert!(worst_pixel.0 < 1.0, "worst pixel difference {} on {}", worst_pixel.0, worst_pixel.1);
    assert!(mean_abs / (values as f64) < 0.05, "mean absolute difference {}", mean_abs / values as f64);
    assert!(worst_cosine.0 > 0.99, "worst cosine {} on {}", worst_cosine.0, worst_cosine.1);
}

/// `serve --preprocess fast` is wired to the pipeline: a JPEG it scales embeds a little differently from the exact
/// server, a PNG identically.
#[tokio::test(flavor = "multi_thread")]
async fn the_server_flag_selects_the_mode() {
    let (dir, _) = photos();
    let jpeg = std::fs::read(dir.join("photo_1280x960_0.jpg")).unwrap();
    let png = std::fs::read(dir.join("photo_800x600.png")).unwrap();
    let mut answers = Vec::new();
    for mode in ["exact", "fast"] {
        let server = TestServer::start(&model_dir("tiny"), &["--preprocess", mode]).await;
        let mut client = server.client().await;
        let items = [("jpeg", &jpeg), ("png", &png)]
            .iter()
            .map(|(id, bytes)| clipserve::pb::Item {
                id: id.to_string(),
                image: Some(clipserve::pb::item::Image::ImageBytes(bytes.to_vec())),
                text: None,
            })
            .collect();
        let r = client.embed(clipserve::pb::EmbedRequest { items, normalize: false }).await.unwrap().into_inner();
        answers.push(r.embeddings.into_iter().map(|e| e.image_features).collect::<Vec<_>>());
    }
    let (exact, fast) = (&answers[0], &answers[1]);
    assert_ne!(exact[0], fast[0], "the JPEG went through the same pipeline in both modes");
    assert!(cosine(&exact[0], &fast[0]) > 0.999, "cosine {}", cosine(&exact[0], &fast[0]));
    assert_eq!(exact[1], fast[1], "a PNG is preprocessed alike in both modes");
}

/// `clipserve bench --preprocess` times both modes and reports per-core rates and stages.
#[test]
fn bench_preprocess_reports_both_modes() {
    let (dir, _) = photos();
    let image = dir.join("photo_640x480_0.jpg");
    let json = std::env::temp_dir().join(format!("clipserve-bench-preprocess-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_clipserve"))
        .args(["bench", "--preprocess"])
        .arg(&image)
        .args(["--duration", "300ms", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("exact: geometric mean") && stdout.contains("fast: geometric mean"), "{stdout}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (r, mode) in results.iter().zip(["exact", "fast"]) {
        assert_eq!(r["mode"], mode);
        assert!(r["images"].as_u64().unwrap() > 0 && r["images_per_second"].as_f64().unwrap() > 0.0, "{r}");
        let stages = &r["stages_ms"];
        for stage in ["decode", "resize", "normalize"] {
            assert!(stages[stage].as_f64().unwrap() > 0.0, "{mode} {stage}: {stages}");
        }
    }
    // A file that is not an image is an error, not a rate.
    let out = Command::new(env!("CARGO_BIN_EXE_clipserve"))
        .args(["bench", "--preprocess", "Cargo.toml", "--duration", "100ms"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a supported image"), "{:?}", out);
}
