//! `manifest.json` of a model directory (see API.md).

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

/// What the export script wrote about the model.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub model_id: String,
    /// `"pretrained:<source>"` or `"random-init:seed=<n>"`.
    pub weights: String,
    pub embedding_dim: usize,
    pub image_size: u32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub context_length: usize,
    /// dtype of the weights in `model.pt`.
    pub dtype: String,
    #[serde(default = "default_pad")]
    pub pad_token_id: i64,
    /// The checkpoint's `CLIPModel.logit_scale` (natural log): zero-shot logits are `exp(logit_scale) x cosine`.
    /// Absent from model directories exported before zero-shot classification was served.
    #[serde(default)]
    pub logit_scale: Option<f64>,
}

fn default_pad() -> i64 {
    49407
}

impl Manifest {
    /// Reads and checks `DIR/manifest.json`.
    pub fn load(dir: &Path) -> anyhow::Result<Manifest> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        anyhow::ensure!(m.embedding_dim > 0, "{}: embedding_dim must be positive", path.display());
        anyhow::ensure!(m.image_size > 0, "{}: image_size must be positive", path.display());
        anyhow::ensure!(m.context_length >= 2, "{}: context_length must be at least 2", path.display());
        anyhow::ensure!(m.image_std.iter().all(|s| *s > 0.0), "{}: image_std must be positive", path.display());
        if let Some(scale) = m.logit_scale {
            anyhow::ensure!(
                scale.is_finite() && scale.exp().is_finite(),
                "{}: logit_scale must be a finite number whose exponential is finite",
                path.display()
            );
        }
        Ok(m)
    }

    /// True when the weights are seeded random numbers rather than a trained checkpoint.
    pub fn is_random(&self) -> bool {
        self.weights.starts_with("random-init")
    }
}
