//! The model: TorchScript loading, device and dtype handling, and the worker threads that run batches.

pub mod device;
pub mod manifest;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use tch::{CModule, Device, Kind, Tensor};

use crate::batching::{Batch, Batcher, Job};
use crate::error::Error;
use crate::metrics as m;

pub use manifest::Manifest;

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
    device: Device,
    image_size: i64,
    pad_token_id: i64,
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
        Ok(TorchBackend { module, device, image_size: manifest.image_size as i64, pad_token_id: manifest.pad_token_id })
    }

    fn run(&self, method: &str, inputs: &[Tensor]) -> anyhow::Result<Vec<Vec<f32>>> {
        let out = self.module.method_ts(method, inputs)?;
        let out = out.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
        let (n, dim) = out.size2()?;
        let flat = Vec::<f32>::try_from(out.view(-1))?;
        anyhow::ensure!(flat.len() == (n * dim) as usize, "model returned {} values for {n}x{dim}", flat.len());
        Ok(flat.chunks_exact(dim as usize).map(<[f32]>::to_vec).collect())
    }
}

impl Backend for TorchBackend {
    fn encode_images(&mut self, images: &[&[f32]]) -> anyhow::Result<Vec<Vec<f32>>> {
        let s = self.image_size;
        let per = (3 * s * s) as usize;
        let mut flat = Vec::with_capacity(images.len() * per);
        for img in images {
            anyhow::ensure!(img.len() == per, "image tensor of {} values, expected {per}", img.len());
            flat.extend_from_slice(img);
        }
        let pixels = Tensor::from_slice(&flat).view([images.len() as i64, 3, s, s]).to_device(self.device);
        self.run("encode_image", &[pixels])
    }

    fn encode_texts(&mut self, texts: &[&[i64]]) -> anyhow::Result<Vec<Vec<f32>>> {
        // Pad only to the longest text of the batch: the text tower is causal and pools at the end token, so
        // the embeddings equal those of padding to the full context.
        let len = texts.iter().map(|t| t.len()).max().unwrap_or(0);
        anyhow::ensure!(len > 0, "empty token sequence");
        let mut ids = Vec::with_capacity(texts.len() * len);
        let mut mask = Vec::with_capacity(texts.len() * len);
        for t in texts {
            ids.extend_from_slice(t);
            ids.extend(std::iter::repeat_n(self.pad_token_id, len - t.len()));
            mask.extend(std::iter::repeat_n(1i64, t.len()));
            mask.extend(std::iter::repeat_n(0i64, len - t.len()));
        }
        let shape = [texts.len() as i64, len as i64];
        let ids = Tensor::from_slice(&ids).view(shape).to_device(self.device);
        let mask = Tensor::from_slice(&mask).view(shape).to_device(self.device);
        self.run("encode_text", &[ids, mask])
    }
}

/// Sends each job its embedding, or every job of the batch the batch's error.
fn deliver<T>(jobs: Vec<Job<T>>, result: std::thread::Result<anyhow::Result<Vec<Vec<f32>>>>, modality: &'static str) {
    let error = match result {
        Ok(Ok(vectors)) if vectors.len() == jobs.len() => {
            for (job, v) in jobs.into_iter().zip(vectors) {
                let _ = job.reply.send(Ok(v));
            }
            return;
        }
        Ok(Ok(vectors)) => format!("model returned {} embeddings for {} inputs", vectors.len(), jobs.len()),
        Ok(Err(e)) => format!("model failure: {e:#}"),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            format!("model worker panicked: {what}")
        }
    };
    tracing::error!("{error}");
    metrics::counter!(m::MODEL_FAILURES, "modality" => modality).increment(1);
    for job in jobs {
        let _ = job.reply.send(Err(Error::Internal(error.clone())));
    }
}

/// The worker loop: takes batches until the batcher is closed and drained.
pub fn run_worker(batcher: &Batcher, backend: &mut dyn Backend) {
    while let Some(batch) = batcher.next_batch() {
        match batch {
            Batch::Images(jobs) => {
                let inputs: Vec<&[f32]> = jobs.iter().map(|j| j.input.pixels.as_slice()).collect();
                let result = timed("image", inputs.len(), || backend.encode_images(&inputs));
                drop(inputs);
                deliver(jobs, result, "image");
            }
            Batch::Texts(jobs) => {
                let inputs: Vec<&[i64]> = jobs.iter().map(|j| j.input.ids.as_slice()).collect();
                let result = timed("text", inputs.len(), || backend.encode_texts(&inputs));
                drop(inputs);
                deliver(jobs, result, "text");
            }
        }
    }
}

/// Runs one forward pass, catching a panic, and records its duration and item count.
fn timed<F>(modality: &'static str, items: usize, forward: F) -> std::thread::Result<anyhow::Result<Vec<Vec<f32>>>>
where
    F: FnOnce() -> anyhow::Result<Vec<Vec<f32>>>,
{
    let start = std::time::Instant::now();
    let result = catch_unwind(AssertUnwindSafe(forward));
    metrics::histogram!(m::INFERENCE_DURATION, "modality" => modality).record(start.elapsed().as_secs_f64());
    metrics::counter!(m::MODEL_ITEMS, "modality" => modality).increment(items as u64);
    result
}

/// Where and how the model runs.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub model_dir: PathBuf,
    pub devices: Vec<Device>,
    pub workers_per_device: usize,
    pub fp16: bool,
    pub torch_threads: usize,
}

impl PoolConfig {
    /// `float16` or `float32`: what runs on `device`.
    pub fn dtype_on(&self, device: Device) -> &'static str {
        if self.half_on(device) {
            "float16"
        } else {
            "float32"
        }
    }

    fn half_on(&self, device: Device) -> bool {
        self.fp16 && device.is_cuda()
    }
}

/// The model worker threads, one model instance each.
pub struct ModelPool {
    handles: Vec<JoinHandle<()>>,
}

impl ModelPool {
    /// Starts every worker, each loading and warming up its own model instance; returns once all are ready, or
    /// with the first failure.
    pub fn start(config: &PoolConfig, manifest: &Manifest, batcher: Arc<Batcher>) -> anyhow::Result<ModelPool> {
        anyhow::ensure!(config.workers_per_device > 0, "--workers-per-device must be at least 1");
        if config.torch_threads > 0 {
            tch::set_num_threads(config.torch_threads as i32);
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let mut handles = Vec::new();
        for &device in &config.devices {
            for index in 0..config.workers_per_device {
                let name = format!("model-{}-{index}", device::device_name(device));
                let (config, manifest, batcher, ready) =
                    (config.clone(), manifest.clone(), batcher.clone(), ready_tx.clone());
                let handle = std::thread::Builder::new().name(name.clone()).spawn(move || {
                    // Grad mode is per thread: this thread only ever runs inference.
                    let _no_grad = tch::no_grad_guard();
                    let loaded = TorchBackend::load(&config.model_dir, &manifest, device, config.half_on(device))
                        .and_then(|mut b| warm_up(&mut b, &manifest).map(|_| b));
                    let mut backend = match loaded {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = ready.send(Err(e.context(format!("worker {name}"))));
                            return;
                        }
                    };
                    tracing::info!(worker = %name, dtype = config.dtype_on(device), "model worker ready");
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    run_worker(&batcher, &mut backend);
                })?;
                handles.push(handle);
            }
        }
        drop(ready_tx);
        for _ in 0..handles.len() {
            ready_rx.recv().context("a model worker exited during start-up")??;
        }
        Ok(ModelPool { handles })
    }

    /// Waits for every worker to finish (after the batcher is closed and drained).
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// One forward pass per modality, so the first request does not pay for lazy initialisation, and a check that
/// the model's output has the size the manifest promises.
fn warm_up(backend: &mut TorchBackend, manifest: &Manifest) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::{BatcherConfig, ImageInput, TextInput};
    use std::time::Duration;
    use tokio::sync::oneshot;

    /// Embeds each text as [sum of ids, batch size]; fails batches holding id 666; panics on id 999.
    struct Mock;
    impl Backend for Mock {
        fn encode_images(&mut self, images: &[&[f32]]) -> anyhow::Result<Vec<Vec<f32>>> {
            Ok(images.iter().map(|p| vec![p.iter().sum(), images.len() as f32]).collect())
        }
        fn encode_texts(&mut self, texts: &[&[i64]]) -> anyhow::Result<Vec<Vec<f32>>> {
            if texts.iter().any(|t| t.contains(&999)) {
                panic!("boom");
            }
            anyhow::ensure!(!texts.iter().any(|t| t.contains(&666)), "bad batch");
            Ok(texts.iter().map(|t| vec![t.iter().sum::<i64>() as f32, texts.len() as f32]).collect())
        }
    }

    fn batcher() -> Arc<Batcher> {
        Arc::new(Batcher::new(BatcherConfig {
            max_batch_images: 16,
            max_batch_texts: 16,
            max_batch_delay: Duration::ZERO,
        }))
    }

    #[test]
    fn queued_items_share_a_batch_and_each_gets_its_own_result() {
        let b = batcher();
        let mut rxs = Vec::new();
        for i in 0..5i64 {
            let (tx, rx) = oneshot::channel();
            b.push_text(Job::new(TextInput { ids: vec![i, 10] }, None, tx));
            rxs.push(rx);
        }
        let (tx, img_rx) = oneshot::channel();
        b.push_image(Job::new(ImageInput { pixels: vec![1.5, 2.5] }, None, tx));
        b.close();
        run_worker(&b, &mut Mock);
        for (i, rx) in rxs.into_iter().enumerate() {
            assert_eq!(rx.blocking_recv().unwrap().unwrap(), vec![i as f32 + 10.0, 5.0]);
        }
        assert_eq!(img_rx.blocking_recv().unwrap().unwrap(), vec![4.0, 1.0]);
    }

    #[test]
    fn a_failing_or_panicking_batch_fails_only_its_items_and_the_worker_goes_on() {
        // One item per batch, so each of the three runs on its own.
        let b =
            Batcher::new(BatcherConfig { max_batch_images: 1, max_batch_texts: 1, max_batch_delay: Duration::ZERO });
        let send = |ids: Vec<i64>| {
            let (tx, rx) = oneshot::channel();
            b.push_text(Job::new(TextInput { ids }, None, tx));
            rx
        };
        let bad = send(vec![666]);
        let panicking = send(vec![999]);
        let good = send(vec![1]);
        b.close();
        run_worker(&b, &mut Mock);
        assert!(matches!(bad.blocking_recv().unwrap(), Err(Error::Internal(m)) if m.contains("bad batch")));
        assert!(matches!(panicking.blocking_recv().unwrap(), Err(Error::Internal(m)) if m.contains("panicked")));
        assert_eq!(good.blocking_recv().unwrap().unwrap(), vec![1.0, 1.0]);
    }
}
