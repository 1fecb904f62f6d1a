//! Parity with Hugging Face `transformers` on the same weights: tokenizer ids, preprocessed pixels, and the
//! embeddings the server returns over gRPC (CPU, float32).

mod common;

use clipserve::inputs::image::ImagePreprocessor;
use clipserve::inputs::text::ClipTokenizer;
use clipserve::model::Manifest;
use clipserve::pb::{item::Image, EmbedRequest, Item};
use common::*;

#[test]
fn tokenizer_ids_match_transformers() {
    let f = fixtures();
    let texts: Vec<&str> = f["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert!(texts.len() >= 50, "fixtures hold {} texts", texts.len());
    let dir = model_dir("tiny");
    let tok = ClipTokenizer::load(&dir.join("tokenizer.json"), 77, 1 << 20).unwrap();
    let expected = &f["models"]["tiny"]["token_ids"];
    let mut mismatches = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let ids = tok.encode(text).unwrap();
        let want: Vec<i64> = expected[i].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        assert!(ids.len() <= 77 && ids[0] == 49406 && *ids.last().unwrap() == 49407, "{text:?}: {ids:?}");
        if ids != want {
            mismatches.push(format!("{text:?}: got {ids:?}, want {want:?}"));
        }
    }
    assert!(mismatches.is_empty(), "{} of {} texts differ:\n{}", mismatches.len(), texts.len(), mismatches.join("\n"));
}

#[test]
fn preprocessing_matches_clip_image_processor() {
    let f = fixtures();
    let manifest = Manifest::load(&model_dir("tiny")).unwrap();
    let pre = ImagePreprocessor {
        size: manifest.image_size,
        mean: manifest.image_mean,
        std: manifest.image_std,
        max_bytes: 64 << 20,
        max_pixels: 100_000_000,
        max_jpeg_scans: 100,
    };
    let images = f["images"].as_array().unwrap();
    assert!(images.len() >= 8);
    let mut worst = (0f32, String::new());
    for img in images {
        let file = img["file"].as_str().unwrap();
        let ours = pre.preprocess(&image_bytes(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let raw = std::fs::read(fixtures_dir().join("pixels").join(format!("{file}.f32"))).unwrap();
        let want: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(ours.len(), want.len(), "{file}");
        let max_diff = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{file}: max abs pixel difference {max_diff:.5}");
        if max_diff > worst.0 {
            worst = (max_diff, file.to_string());
        }
    }
    eprintln!("worst pixel difference: {:.5} ({})", worst.0, worst.1);
    assert!(worst.0 <= 0.02, "pixel difference {} on {} exceeds 0.02", worst.0, worst.1);
}

/// Embeds every fixture image and text through the server and compares with `transformers`.
async fn embeddings_match(model: &str) {
    let f = fixtures();
    let server = TestServer::start(&model_dir(model), &[]).await;
    let mut client = server.client().await;
    let images = f["images"].as_array().unwrap();
    let texts = f["texts"].as_array().unwrap();
    let mut items: Vec<Item> = images
        .iter()
        .map(|img| {
            let file = img["file"].as_str().unwrap();
            Item { id: file.into(), image: Some(Image::ImageBytes(image_bytes(file))), text: None }
        })
        .collect();
    items.extend(texts.iter().enumerate().map(|(i, t)| Item {
        id: format!("text-{i}"),
        image: None,
        text: Some(t.as_str().unwrap().to_string()),
    }));
    let response = client.embed(EmbedRequest { items, normalize: false }).await.expect("Embed").into_inner();
    assert_eq!(response.embeddings.len(), images.len() + texts.len());

    let want_images = matrix(&f["models"][model]["image_features"]);
    let want_texts = matrix(&f["models"][model]["text_features"]);
    let mut worst_image = 1f64;
    for (i, img) in images.iter().enumerate() {
        let e = &response.embeddings[i];
        assert_eq!(e.id, img["file"].as_str().unwrap());
        assert_eq!(e.image_features.len(), 512);
        assert!(e.text_features.is_empty());
        worst_image = worst_image.min(cosine(&e.image_features, &want_images[i]));
    }
    let mut worst_text = 1f64;
    for (i, want) in want_texts.iter().enumerate() {
        let e = &response.embeddings[images.len() + i];
        assert_eq!(e.id, format!("text-{i}"));
        assert_eq!(e.text_features.len(), 512);
        assert!(e.image_features.is_empty());
        worst_text = worst_text.min(cosine(&e.text_features, want));
    }
    eprintln!("{model}: worst image cosine {worst_image:.7}, worst text cosine {worst_text:.7}");
    assert!(worst_image >= 0.9999, "{model}: image cosine {worst_image}");
    assert!(worst_text >= 0.9999, "{model}: text cosine {worst_text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_match_transformers_tiny() {
    embeddings_match("tiny").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_match_transformers_vit_b32() {
    embeddings_match("vit-b32").await;
}
