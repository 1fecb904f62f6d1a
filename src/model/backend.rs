//! The model backend: `model.pt` loaded on one device in one dtype, and the forward passes that turn prepared
//! inputs into embeddings.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tch::{CModule, Device, Kind, Tensor};

use super::{faults, staging, Manifest};

/// Runs forward passes. The TorchScript model implements it; batching tests use a mock.
pub trait Backend {
    /// Embeds preprocessed images (each `3 * size * size` normalized CHW floats); one vector per image.
    fn encode_images(&mut self, images: &[&[f32]]) -> anyhow::Result<Vec<Vec<f32>>>;
    /// Embeds tokenized texts (unpadded ids); one vector per text.
    fn encode_texts(&mut self, texts: &[&[i64]]) -> anyhow::Result<Vec<Vec<f32>>>;
}

/// `model.pt` loaded on one device.
pub struct TorchBackend {
    module: CModule,
    image_size: i64,
    pad_token_id: i64,
    /// The batch's host buffers (pinned on CUDA): each item is copied once, into its row.
    stager: staging::Stager,
}

impl TorchBackend {
    /// Loads `DIR/model.pt` onto `device`; float16 when `half` (CUDA only).
    pub fn load(dir: &Path, manifest: &Manifest, device: Device, half: bool) -> anyhow::Result<Self> {
        let path = dir.join("model.pt");
        let mut module =
            CModule::load_on_device(&path, device).with_context(|| format!("loading {}", path.display()))?;
        module.set_eval();
        if half {
            // The export keeps no integer buffers in the module, so converting every tensor is safe.
            module.to(device, Kind::Half, false);
        }
        Ok(TorchBackend {
            module,
            image_size: manifest.image_size as i64,
            pad_token_id: manifest.pad_token_id,
            stager: staging::Stager::new(device),
        })
    }

    fn run(&mut self, method: &str, inputs: &[Tensor]) -> anyhow::Result<Vec<Vec<f32>>> {
        let out = self.module.method_ts(method, inputs)?;
        let out = out.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
        // The blocking copy of the results follows the inputs' copy on the stream: the host buffers are free.
        self.stager.results_received();
        let (n, dim) = out.size2()?;
        let flat = Vec::<f32>::try_from(out.view(-1))?;
        anyhow::ensure!(flat.len() == (n * dim) as usize, "model returned {} values for {n}x{dim}", flat.len());
        Ok(flat.chunks_exact(dim as usize).map(<[f32]>::to_vec).collect())
    }
}

impl Backend for TorchBackend {
    fn encode_images(&mut self, images: &[&[f32]]) -> anyhow::Result<Vec<Vec<f32>>> {
        let pixels = self.stager.images(images, self.image_size)?;
        self.run("encode_image", &[pixels])
    }

    fn encode_texts(&mut self, texts: &[&[i64]]) -> anyhow::Result<Vec<Vec<f32>>> {
        // Pad only to the longest text of the batch: the text tower is causal and pools at the end token, so
        // the embeddings equal those of padding to the full context.
        let (ids, mask) = self.stager.texts(texts, self.pad_token_id)?;
        self.run("encode_text", &[ids, mask])
    }
}

/// A backend that fails on purpose as `--inject-faults` plans (tests only).
pub(super) struct FaultyBackend {
    pub(super) inner: Box<dyn Backend>,
    pub(super) faults: Arc<faults::Faults>,
}

impl Backend for FaultyBackend {
    fn encode_images(&mut self, images: &[&[f32]]) -> anyhow::Result<Vec<Vec<f32>>> {
        self.faults.before_forward_pass()?;
        self.inner.encode_images(images)
    }

    fn encode_texts(&mut self, texts: &[&[i64]]) -> anyhow::Result<Vec<Vec<f32>>> {
        self.faults.before_forward_pass()?;
        self.inner.encode_texts(texts)
    }
}

/// True when the model runs in float16 on `device`: asked for (`--fp16`) and a CUDA device (CPUs run float32).
pub fn runs_half(fp16: bool, device: Device) -> bool {
    fp16 && device.is_cuda()
}

/// One forward pass per modality, so the first request does not pay for lazy initialisation, and a check that
/// the model's output has the size the manifest promises.
pub(super) fn warm_up(backend: &mut dyn Backend, manifest: &Manifest) -> anyhow::Result<()> {
    let s = manifest.image_size as usize;
    let pixels = vec![0f32; 3 * s * s];
    let images = backend.encode_images(&[&pixels, &pixels])?;
    let texts = backend.encode_texts(&[&[49406, 320, 49407], &[49406, 49407]])?;
    for v in images.iter().chain(&texts) {
        anyhow::ensure!(
            v.len() == manifest.embedding_dim,
            "model returns {}-d embeddings, manifest says {}",
            v.len(),
            manifest.embedding_dim
        );
        anyhow::ensure!(v.iter().all(|x| x.is_finite()), "model returned non-finite values on warm-up");
    }
    Ok(())
}
