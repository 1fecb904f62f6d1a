//! Batch staging: each prepared item is copied once, straight into its row of the batch's host tensor.
//!
//! A worker keeps one host buffer per input tensor (pixels; token ids and attention mask) and reuses it for every
//! batch, growing it when a larger batch comes. On the CPU the filled buffer is the model's input itself. On CUDA
//! the buffer is page-locked (pinned) host memory, so the copy to the device is a DMA that is queued without
//! blocking the worker (`non_blocking`); the blocking copy of the results back to the host, on the same stream,
//! orders after it, so the buffer is free again when a batch's results are in.

use tch::kind::Element;
use tch::{Device, Tensor};

/// How a worker stages its batches, decided by its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staging {
    /// Pageable host memory, moved with a blocking copy (a no-op on the CPU, where it is the model's input).
    Pageable,
    /// Pinned host memory and an asynchronous copy to the device (CUDA).
    Pinned,
}

impl Staging {
    /// Pinned staging on CUDA, pageable everywhere else.
    pub fn for_device(device: Device) -> Staging {
        if device.is_cuda() {
            Staging::Pinned
        } else {
            Staging::Pageable
        }
    }
}

/// One reusable host buffer, seen as a contiguous tensor of any shape that fits.
#[derive(Default)]
struct Buffer {
    tensor: Option<Tensor>,
    /// Elements the buffer holds.
    capacity: usize,
}

/// Elements a buffer of `current` elements is grown to when `needed` do not fit: at least twice as many, so a
/// ramp of batch sizes reallocates a handful of times, and exactly `needed` after a jump (most often to the
/// largest batch), so a buffer never holds more than twice the largest batch it served.
fn grown_capacity(needed: usize, current: usize) -> usize {
    needed.max(current.saturating_mul(2))
}

/// The host buffers of one model worker and the device they feed.
pub struct Stager {
    device: Device,
    staging: Staging,
    pixels: Buffer,
    ids: Buffer,
    mask: Buffer,
    /// True while an asynchronous copy out of a pinned buffer may still be running: set when one is queued,
    /// cleared once the batch's results have been copied back (which orders after it).
    copy_in_flight: bool,
}

impl Stager {
    /// Empty buffers for a worker on `device`; nothing is allocated before the first batch.
    pub fn new(device: Device) -> Stager {
        Stager {
            device,
            staging: Staging::for_device(device),
            pixels: Buffer::default(),
            ids: Buffer::default(),
            mask: Buffer::default(),
            copy_in_flight: false,
        }
    }

    /// How this worker stages batches.
    pub fn staging(&self) -> Staging {
        self.staging
    }

    /// A `[rows.len(), 3, size, size]` float tensor on the device, each image copied once into its row.
    pub fn images(&mut self, rows: &[&[f32]], size: i64) -> anyhow::Result<Tensor> {
        let per = (3 * size * size) as usize;
        for img in rows {
            anyhow::ensure!(img.len() == per, "image tensor of {} values, expected {per}", img.len());
        }
        let shape = [rows.len() as i64, 3, size, size];
        self.before_write();
        let host = fill(&mut self.pixels, &shape, self.staging, self.device, |out: &mut [f32]| {
            for (slot, img) in out.chunks_exact_mut(per).zip(rows) {
                slot.copy_from_slice(img);
            }
        })?;
        self.send(&host)
    }

    /// `[texts.len(), len]` token ids (each text padded with `pad` to the longest, `len`) and the matching
    /// attention mask, on the device.
    pub fn texts(&mut self, texts: &[&[i64]], pad: i64) -> anyhow::Result<(Tensor, Tensor)> {
        let len = texts.iter().map(|t| t.len()).max().unwrap_or(0);
        anyhow::ensure!(len > 0, "empty token sequence");
        let shape = [texts.len() as i64, len as i64];
        self.before_write();
        let ids = fill(&mut self.ids, &shape, self.staging, self.device, |out: &mut [i64]| {
            for (row, t) in out.chunks_exact_mut(len).zip(texts) {
                row[..t.len()].copy_from_slice(t);
                row[t.len()..].fill(pad);
            }
        })?;
        let mask = fill(&mut self.mask, &shape, self.staging, self.device, |out: &mut [i64]| {
            for (row, t) in out.chunks_exact_mut(len).zip(texts) {
                row[..t.len()].fill(1);
                row[t.len()..].fill(0);
            }
        })?;
        Ok((self.send(&ids)?, self.send(&mask)?))
    }

    /// Called once a batch's results are on the host: the copies out of the buffers are complete.
    pub fn results_received(&mut self) {
        self.copy_in_flight = false;
    }

    /// Waits for an asynchronous copy that a failed batch may have left running before its buffer is rewritten.
    fn before_write(&mut self) {
        if self.copy_in_flight {
            if let Device::Cuda(index) = self.device {
                tch::Cuda::synchronize(index as i64);
            }
            self.copy_in_flight = false;
        }
    }

    fn send(&mut self, host: &Tensor) -> anyhow::Result<Tensor> {
        match self.staging {
            Staging::Pinned => {
                self.copy_in_flight = true;
                Ok(host.f_to_device_(self.device, host.kind(), true, false)?)
            }
            Staging::Pageable if self.device == Device::Cpu => Ok(host.shallow_clone()),
            Staging::Pageable => Ok(host.f_to_device_(self.device, host.kind(), false, false)?),
        }
    }
}

/// Views `buffer` as a contiguous host tensor of `shape`, growing it (pinned for [`Staging::Pinned`]) when
/// too small, and lets `write` fill every element of it.
fn fill<T: Element>(
    buffer: &mut Buffer,
    shape: &[i64],
    staging: Staging,
    device: Device,
    write: impl FnOnce(&mut [T]),
) -> anyhow::Result<Tensor> {
    let numel = shape.iter().product::<i64>() as usize;
    anyhow::ensure!(numel > 0, "empty batch");
    if buffer.capacity < numel || buffer.tensor.as_ref().is_some_and(|t| t.kind() != T::KIND) {
        buffer.tensor = None; // the old buffer goes back before the new one is taken
        let capacity = grown_capacity(numel, buffer.capacity);
        let mut tensor = Tensor::f_empty([capacity as i64], (T::KIND, Device::Cpu))?;
        if staging == Staging::Pinned {
            tensor = tensor.f_pin_memory(device)?;
        }
        buffer.tensor = Some(tensor);
        buffer.capacity = capacity;
    }
    let tensor = buffer.tensor.as_ref().expect("allocated above");
    let data = tensor.data_ptr() as *mut T;
    anyhow::ensure!(!data.is_null(), "host buffer without storage");
    // SAFETY: the tensor is a contiguous CPU tensor of `capacity >= numel` elements of type T (its kind is
    // T::KIND), owned by this buffer; nothing else reads or writes it meanwhile: the worker owns its stager,
    // the tensors handed to the model from an earlier batch are dropped once its results are in, and an
    // asynchronous copy out of it has completed (`Stager::before_write`).
    let slice = unsafe { std::slice::from_raw_parts_mut(data, numel) };
    write(slice);
    Ok(tensor.f_narrow(0, 0, numel as i64)?.f_view(shape)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The assembly this module replaced: every item appended to one vector, then copied into a tensor.
    fn concatenated(rows: &[&[f32]], size: i64) -> Tensor {
        let mut flat = Vec::new();
        for r in rows {
            flat.extend_from_slice(r);
        }
        Tensor::from_slice(&flat).view([rows.len() as i64, 3, size, size])
    }

    fn image(seed: usize, per: usize) -> Vec<f32> {
        (0..per).map(|i| ((seed * 7919 + i) % 1013) as f32 / 101.0 - 5.0).collect()
    }

    #[test]
    fn cuda_is_staged_in_pinned_memory_and_everything_else_in_pageable_memory() {
        assert_eq!(Staging::for_device(Device::Cuda(0)), Staging::Pinned);
        assert_eq!(Staging::for_device(Device::Cuda(3)), Staging::Pinned);
        assert_eq!(Staging::for_device(Device::Cpu), Staging::Pageable);
        assert_eq!(Stager::new(Device::Cpu).staging(), Staging::Pageable);
        assert_eq!(Stager::new(Device::Cuda(1)).staging(), Staging::Pinned);
    }

    #[test]
    fn images_land_in_their_slots_in_order_and_equal_the_concatenated_batch() {
        let size = 8;
        let per = (3 * size * size) as usize;
        let mut stager = Stager::new(Device::Cpu);
        // Growing, shrinking and growing again: the reused buffer must never leak a previous batch's rows.
        for n in [2usize, 5, 1, 3, 9, 4] {
            let owned: Vec<Vec<f32>> = (0..n).map(|i| image(i + 10 * n, per)).collect();
            let rows: Vec<&[f32]> = owned.iter().map(Vec::as_slice).collect();
            let staged = stager.images(&rows, size).unwrap();
            assert_eq!(staged.size(), vec![n as i64, 3, size, size]);
            assert_eq!(staged.kind(), Kind::Float);
            assert_eq!(staged.device(), Device::Cpu);
            assert!(staged.is_contiguous());
            assert!(!staged.is_pinned(Device::Cpu), "no pinned memory on the CPU path");
            for (i, row) in owned.iter().enumerate() {
                let slot = Vec::<f32>::try_from(staged.get(i as i64).view(-1)).unwrap();
                assert_eq!(&slot, row, "batch of {n}: row {i}");
            }
            assert!(staged.equal(&concatenated(&rows, size)), "batch of {n}");
            stager.results_received();
        }
        // 2 images, then 5 (over twice 2), then 10 (twice 5, for the 9), then reused.
        assert_eq!(stager.pixels.capacity, 10 * per, "grown a few times, then reused");
    }

    #[test]
    fn buffers_grow_geometrically_and_never_past_twice_the_largest_batch() {
        assert_eq!(grown_capacity(10, 0), 10);
        assert_eq!(grown_capacity(11, 10), 20);
        assert_eq!(grown_capacity(256, 2), 256, "a jump to the largest batch allocates just that");
        let mut capacity = 0;
        for needed in 1..=1000 {
            if capacity < needed {
                capacity = grown_capacity(needed, capacity);
            }
            assert!(capacity >= needed && capacity < 2 * needed, "{capacity} for {needed}");
        }
    }

    #[test]
    fn the_cpu_staged_batch_is_the_buffer_itself_one_copy_per_item() {
        let size = 4;
        let per = (3 * size * size) as usize;
        let mut stager = Stager::new(Device::Cpu);
        let a = image(1, per);
        let b = image(2, per);
        let staged = stager.images(&[&a, &b], size).unwrap();
        let buffer = stager.pixels.tensor.as_ref().unwrap().data_ptr();
        assert_eq!(staged.data_ptr(), buffer, "the model reads the staging buffer, no further copy");
        drop(staged);
        let again = stager.images(&[&b], size).unwrap();
        assert_eq!(again.data_ptr(), buffer, "the buffer is reused");
    }

    #[test]
    fn texts_are_padded_to_the_longest_with_a_matching_mask() {
        let mut stager = Stager::new(Device::Cpu);
        let texts: [&[i64]; 3] = [&[49406, 320, 1929, 49407], &[49406, 49407], &[49406, 7, 49407]];
        let (ids, mask) = stager.texts(&texts, 49407).unwrap();
        assert_eq!(ids.size(), vec![3, 4]);
        assert_eq!((ids.kind(), mask.kind()), (Kind::Int64, Kind::Int64));
        let ids = Vec::<i64>::try_from(ids.view(-1)).unwrap();
        let mask = Vec::<i64>::try_from(mask.view(-1)).unwrap();
        assert_eq!(ids, [49406, 320, 1929, 49407, 49406, 49407, 49407, 49407, 49406, 7, 49407, 49407]);
        assert_eq!(mask, [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0]);
        // A later, shorter batch reuses the buffers and is not disturbed by what they held.
        let (ids, mask) = stager.texts(&[&[49406, 5, 49407]], 49407).unwrap();
        assert_eq!(Vec::<i64>::try_from(ids.view(-1)).unwrap(), [49406, 5, 49407]);
        assert_eq!(Vec::<i64>::try_from(mask.view(-1)).unwrap(), [1, 1, 1]);
    }

    #[test]
    fn bad_inputs_are_refused_before_anything_is_written() {
        let mut stager = Stager::new(Device::Cpu);
        let short = vec![0f32; 10];
        let err = stager.images(&[&short], 4).unwrap_err().to_string();
        assert!(err.contains("expected 48"), "{err}");
        assert!(stager.images(&[], 4).is_err(), "an empty batch");
        assert!(stager.texts(&[&[]], 0).is_err(), "an empty token sequence");
        assert!(stager.pixels.tensor.is_none(), "nothing was allocated for refused batches");
    }

    /// Through the tiny test model: the staged batches give the very embeddings of the assembly they replaced.
    #[test]
    fn the_model_sees_the_same_batch_as_before() {
        use crate::model::{Backend, Manifest, TorchBackend};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-models/tiny");
        if !dir.join("model.pt").exists() {
            // The one test here that needs the exported test model: one line naming the command that makes it.
            // Straight to the process's stderr: the test harness captures eprintln!, and would drop it on exit.
            use std::io::Write;
            let message = "is missing: run dev/test.sh (it exports the test models, then runs cargo test)";
            let _ = writeln!(std::io::stderr(), "{} {message}", dir.display());
            std::process::exit(2);
        }
        let _no_grad = tch::no_grad_guard();
        let manifest = Manifest::load(&dir).unwrap();
        let mut backend = TorchBackend::load(&dir, &manifest, Device::Cpu, false).unwrap();
        let module = tch::CModule::load_on_device(dir.join("model.pt"), Device::Cpu).unwrap();
        let size = manifest.image_size as i64;
        let per = (3 * size * size) as usize;
        let owned: Vec<Vec<f32>> = (0..5).map(|i| image(i, per)).collect();
        let rows: Vec<&[f32]> = owned.iter().map(Vec::as_slice).collect();
        let old = module.method_ts("encode_image", &[concatenated(&rows, size)]).unwrap();
        let old = Vec::<f32>::try_from(old.contiguous().view(-1)).unwrap();
        let new: Vec<f32> = backend.encode_images(&rows).unwrap().concat();
        assert_eq!(new, old, "image embeddings differ from the concatenated batch's");
        // Twice more, a smaller batch in between, through the reused buffer.
        let _ = backend.encode_images(&rows[..2]).unwrap();
        assert_eq!(backend.encode_images(&rows).unwrap().concat(), old);
        let texts: [&[i64]; 2] = [&[49406, 320, 1929, 49407], &[49406, 49407]];
        let ids = Tensor::from_slice(&[49406i64, 320, 1929, 49407, 49406, 49407, 49407, 49407]).view([2, 4]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 0, 0]).view([2, 4]);
        let old = module.method_ts("encode_text", &[ids, mask]).unwrap();
        let old = Vec::<f32>::try_from(old.contiguous().view(-1)).unwrap();
        assert_eq!(backend.encode_texts(&texts).unwrap().concat(), old, "text embeddings differ");
    }

    /// Batch assembly at batch 64, before (concatenate, then copy into a tensor) and after (one copy into the
    /// reused buffer). `cargo test --release --lib staging -- --ignored --nocapture`
    #[test]
    #[ignore = "a micro-benchmark, run by hand"]
    fn micro_benchmark_batch_64() {
        use std::time::Instant;
        let size = 224;
        let per = (3 * size * size) as usize;
        let owned: Vec<Vec<f32>> = (0..64).map(|i| image(i, per)).collect();
        let rows: Vec<&[f32]> = owned.iter().map(Vec::as_slice).collect();
        let rounds = 200;
        let time = |name: &str, f: &mut dyn FnMut() -> Tensor| {
            let _ = f();
            let mut samples = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let t0 = Instant::now();
                let t = f();
                samples.push(t0.elapsed().as_secs_f64() * 1e3);
                drop(t);
            }
            samples.sort_by(f64::total_cmp);
            let median = samples[rounds / 2];
            let gb = (64 * per * 4) as f64 / 1e9;
            eprintln!("{name}: median {median:.2} ms per batch of 64 ({:.1} GB/s of pixels)", gb / (median / 1e3));
            median
        };
        let before = time("before: concatenate + Tensor::from_slice", &mut || concatenated(&rows, size));
        let mut fresh = Buffer::default();
        let after_fresh = time("after, a fresh tensor per batch", &mut || {
            fresh = Buffer::default();
            fill(&mut fresh, &[64, 3, size, size], Staging::Pageable, Device::Cpu, |out: &mut [f32]| {
                for (slot, img) in out.chunks_exact_mut(per).zip(&rows) {
                    slot.copy_from_slice(img);
                }
            })
            .unwrap()
        });
        let mut stager = Stager::new(Device::Cpu);
        let after = time("after: one copy into the reused buffer", &mut || stager.images(&rows, size).unwrap());
        eprintln!("speed-up: {:.2}x (fresh tensor: {:.2}x)", before / after, before / after_fresh);
    }
}
