//! Pool start-up: one model worker thread per device and worker slot, each loading and warming up its own model
//! instance; the pool is ready once every worker is.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use tch::Device;

use super::backend::{runs_half, warm_up, Backend, FaultyBackend, TorchBackend};
use super::worker::{run_worker, BackendFactory};
use super::{device, faults, Manifest};
use crate::batching::Batcher;
use crate::state::ServerState;

/// Where and how the model runs.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub model_dir: PathBuf,
    pub devices: Vec<Device>,
    pub workers_per_device: usize,
    pub fp16: bool,
    pub torch_threads: usize,
    /// Faults to inject (`--inject-faults`, tests only).
    pub faults: Option<Arc<faults::Faults>>,
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
        runs_half(self.fp16, device)
    }
}

/// The model worker threads, one model instance each.
pub struct ModelPool {
    handles: Vec<JoinHandle<()>>,
}

impl ModelPool {
    /// Starts every worker, each loading and warming up its own model instance; returns once all are ready, or
    /// with the first failure.
    pub fn start(
        config: &PoolConfig,
        manifest: &Manifest,
        batcher: Arc<Batcher>,
        health: Arc<ServerState>,
    ) -> anyhow::Result<ModelPool> {
        anyhow::ensure!(config.workers_per_device > 0, "--workers-per-device must be at least 1");
        if config.torch_threads > 0 {
            tch::set_num_threads(config.torch_threads as i32);
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let mut handles = Vec::new();
        for &device in &config.devices {
            for index in 0..config.workers_per_device {
                let name = format!("model-{}-{index}", device::device_name(device));
                let (config, manifest, batcher, ready, health) =
                    (config.clone(), manifest.clone(), batcher.clone(), ready_tx.clone(), health.clone());
                let handle = std::thread::Builder::new().name(name.clone()).spawn(move || {
                    // Grad mode is per thread: this thread only ever runs inference.
                    let _no_grad = tch::no_grad_guard();
                    let mut loaded = false; // the first call loads; later ones reload after a panic
                    let mut factory: BackendFactory = Box::new(move || {
                        if let (true, Some(faults)) = (loaded, &config.faults) {
                            faults.before_reload()?;
                        }
                        let mut b = TorchBackend::load(&config.model_dir, &manifest, device, config.half_on(device))?;
                        warm_up(&mut b, &manifest)?;
                        loaded = true;
                        Ok(match &config.faults {
                            Some(faults) => Box::new(FaultyBackend { inner: Box::new(b), faults: faults.clone() }),
                            None => Box::new(b) as Box<dyn Backend>,
                        })
                    });
                    let backend = match factory() {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = ready.send(Err(e.context(format!("worker {name}"))));
                            return;
                        }
                    };
                    tracing::info!(worker = %name, "model worker ready");
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    run_worker(&batcher, backend, factory, &health);
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
