//! Model worker threads: each takes batches from the batcher, runs them on its backend and answers their items;
//! a CUDA out-of-memory failure is retried in halves, a panic replaces the backend.

use std::cell::Cell;

use crate::batching::{Batch, Batcher, ImageInput, Job, TextInput};
use crate::error::{Error, Reason};
use crate::state::ServerState;
use crate::telemetry;

use super::backend::Backend;

/// True for a CUDA out-of-memory failure, which a smaller batch may avoid.
fn is_out_of_memory(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("out of memory") || text.contains("CUDA_ERROR_OUT_OF_MEMORY")
}

/// Runs `jobs` through `forward` and answers each of them. A CUDA out-of-memory failure is retried in halves
/// before it fails; any other failure fails exactly these jobs with INTERNAL. A panic is counted
/// (`clipserve_panics_total{stage="model"}`) and logged once, and `sick` is called before the jobs are answered, so
/// that readiness already says so when the callers hear of the failure. Returns true if `forward` panicked (the
/// backend may be left in a bad state and should be replaced).
fn run_jobs<T, F>(jobs: Vec<Job<T>>, modality: &'static str, forward: &mut F, sick: &dyn Fn()) -> bool
where
    F: FnMut(&[Job<T>]) -> anyhow::Result<Vec<Vec<f32>>>,
{
    let start = std::time::Instant::now();
    let n = jobs.len();
    let outcome = crate::prepare::guard("model", format_args!("a batch of {n} {modality}s"), || Ok(forward(&jobs)));
    metrics::histogram!(telemetry::INFERENCE_DURATION, "modality" => modality).record(start.elapsed().as_secs_f64());
    let (message, panicked) = match outcome {
        Ok(Ok(vectors)) if vectors.len() == jobs.len() => {
            metrics::counter!(telemetry::MODEL_ITEMS, "modality" => modality).increment(jobs.len() as u64);
            for (job, v) in jobs.into_iter().zip(vectors) {
                let _ = job.reply.send(Ok(v));
            }
            return false;
        }
        Ok(Err(e)) if jobs.len() > 1 && is_out_of_memory(&e) => {
            tracing::warn!(batch = jobs.len(), "out of memory; retrying the batch in halves");
            let mut first = jobs;
            let second = first.split_off(first.len() / 2);
            let a = run_jobs(first, modality, forward, sick);
            let b = run_jobs(second, modality, forward, sick);
            return a || b;
        }
        Ok(Ok(vectors)) => (format!("model returned {} embeddings for {} inputs", vectors.len(), jobs.len()), false),
        Ok(Err(e)) => (format!("model failure: {e:#}"), false),
        // Logged (with the panic's message) and counted by `guard`.
        Err(_) => (format!("model worker panicked while running a batch of {n} {modality}s (logged)"), true),
    };
    if panicked {
        sick();
    } else {
        tracing::error!(batch = jobs.len(), "{message}");
    }
    metrics::counter!(telemetry::MODEL_FAILURES, "modality" => modality).increment(1);
    for job in jobs {
        let _ = job.reply.send(Err(Error::new(Reason::ModelFailure, message.clone())));
    }
    panicked
}

/// Runs one batch on `backend`; true if the backend panicked (`sick` was called before its items were answered).
fn run_batch(batch: Batch, backend: &mut dyn Backend, sick: &dyn Fn()) -> bool {
    match batch {
        Batch::Images(jobs) => run_jobs(
            jobs,
            "image",
            &mut |jobs: &[Job<ImageInput>]| {
                let inputs: Vec<&[f32]> = jobs.iter().map(|j| j.input.pixels.as_slice()).collect();
                backend.encode_images(&inputs)
            },
            sick,
        ),
        Batch::Texts(jobs) => run_jobs(
            jobs,
            "text",
            &mut |jobs: &[Job<TextInput>]| {
                let inputs: Vec<&[i64]> = jobs.iter().map(|j| j.input.ids.as_slice()).collect();
                backend.encode_texts(&inputs)
            },
            sick,
        ),
    }
}

/// How a worker gets a fresh backend after a panic.
pub type BackendFactory = Box<dyn FnMut() -> anyhow::Result<Box<dyn Backend>> + Send>;

/// Attempts at replacing a backend after a panic before the worker gives up.
const RELOAD_ATTEMPTS: u32 = 3;

/// The worker loop: takes batches until the batcher is closed and drained. After a panic the backend is
/// replaced (the worker counts as unhealthy meanwhile); if it cannot be replaced, the worker keeps answering
/// its batches with INTERNAL so that nothing queued waits forever.
pub fn run_worker(batcher: &Batcher, mut backend: Box<dyn Backend>, mut factory: BackendFactory, health: &ServerState) {
    health.worker_up();
    // Unhealthy from the moment a panic is caught (before its callers are answered) until the backend is replaced.
    let sick = Cell::new(false);
    let mark_sick = || {
        if !sick.replace(true) {
            health.worker_down();
        }
    };
    while let Some(batch) = batcher.next_batch() {
        if !run_batch(batch, backend.as_mut(), &mark_sick) {
            continue;
        }
        tracing::error!("model worker panicked: replacing its model instance");
        let mut replaced = None;
        for attempt in 1..=RELOAD_ATTEMPTS {
            match factory() {
                Ok(b) => {
                    replaced = Some(b);
                    break;
                }
                Err(e) => {
                    tracing::error!(attempt, "reloading the model failed: {e:#}");
                    std::thread::sleep(std::time::Duration::from_millis(500 * attempt as u64));
                }
            }
        }
        match replaced {
            Some(b) => {
                backend = b;
                sick.set(false);
                health.worker_up();
                tracing::info!("model worker replaced its model instance");
            }
            None => {
                tracing::error!("model worker cannot reload its model; failing its batches");
                fail_forever(batcher);
                return;
            }
        }
    }
    health.worker_down();
}

/// Answers every batch INTERNAL until the batcher closes.
fn fail_forever(batcher: &Batcher) {
    let message = || Error::new(Reason::ModelFailure, "model worker failed and could not be restarted");
    while let Some(batch) = batcher.next_batch() {
        match batch {
            Batch::Images(jobs) => jobs.into_iter().for_each(|j| drop(j.reply.send(Err(message())))),
            Batch::Texts(jobs) => jobs.into_iter().for_each(|j| drop(j.reply.send(Err(message())))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::{BatcherConfig, ImageInput, JobReceiver, Reply, TextInput};
    use crate::error::Kind as ErrorKind;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Embeds each text as [sum of ids, batch size]; fails batches holding id 666; panics on id 999; reports CUDA
    /// out of memory for text batches larger than `max_texts`.
    struct Mock {
        max_texts: usize,
    }

    impl Backend for Mock {
        fn encode_images(&mut self, images: &[&[f32]]) -> anyhow::Result<Vec<Vec<f32>>> {
            Ok(images.iter().map(|p| vec![p.iter().sum(), images.len() as f32]).collect())
        }
        fn encode_texts(&mut self, texts: &[&[i64]]) -> anyhow::Result<Vec<Vec<f32>>> {
            if texts.iter().any(|t| t.contains(&999)) {
                panic!("boom");
            }
            anyhow::ensure!(!texts.iter().any(|t| t.contains(&666)), "bad batch");
            if texts.len() > self.max_texts {
                anyhow::bail!("CUDA out of memory. Tried to allocate 2.00 GiB");
            }
            Ok(texts.iter().map(|t| vec![t.iter().sum::<i64>() as f32, texts.len() as f32]).collect())
        }
    }

    fn batcher(max: usize) -> Arc<Batcher> {
        Arc::new(Batcher::new(BatcherConfig {
            max_batch_images: max,
            max_batch_texts: max,
            max_batch_delay: Duration::ZERO,
        }))
    }

    fn send_text(b: &Batcher, ids: Vec<i64>) -> JobReceiver {
        let (tx, rx) = Reply::channel();
        b.push_text(Job::new(TextInput { ids }, None, tx));
        rx
    }

    /// Runs a worker over everything queued (the batcher must be closed), counting backend replacements.
    fn work(b: &Batcher, max_texts: usize, reloads_fail: bool) -> (usize, usize) {
        let health = ServerState::default();
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        let factory: BackendFactory = Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            anyhow::ensure!(!reloads_fail, "no model today");
            Ok(Box::new(Mock { max_texts }) as Box<dyn Backend>)
        });
        run_worker(b, Box::new(Mock { max_texts }), factory, &health);
        (made.load(Ordering::SeqCst), health.healthy_workers())
    }

    #[test]
    fn queued_items_share_a_batch_and_each_gets_its_own_result() {
        let b = batcher(16);
        let rxs: Vec<_> = (0..5i64).map(|i| send_text(&b, vec![i, 10])).collect();
        let (tx, img_rx) = Reply::channel();
        b.push_image(Job::new(ImageInput { pixels: vec![1.5, 2.5] }, None, tx));
        b.close();
        work(&b, 64, false);
        for (i, rx) in rxs.into_iter().enumerate() {
            assert_eq!(rx.blocking_recv().unwrap().unwrap().vector, vec![i as f32 + 10.0, 5.0]);
        }
        assert_eq!(img_rx.blocking_recv().unwrap().unwrap().vector, vec![4.0, 1.0]);
    }

    #[test]
    fn a_failing_batch_fails_only_its_items_and_a_panic_replaces_the_backend() {
        let b = batcher(1); // one item per batch
        let bad = send_text(&b, vec![666]);
        let panicking = send_text(&b, vec![999]);
        let good = send_text(&b, vec![1]);
        b.close();
        let (replacements, healthy_after) = work(&b, 64, false);
        assert!(
            matches!(bad.blocking_recv().unwrap(), Err(e) if e.kind() == ErrorKind::Internal && e.message().contains("bad batch"))
        );
        assert!(
            matches!(panicking.blocking_recv().unwrap(), Err(e) if e.kind() == ErrorKind::Internal && e.message().contains("panicked"))
        );
        assert_eq!(good.blocking_recv().unwrap().unwrap().vector, vec![1.0, 1.0]);
        assert_eq!(replacements, 1, "the panicking backend is replaced once");
        assert_eq!(healthy_after, 0, "the worker has stopped");
    }

    #[test]
    fn a_worker_is_unhealthy_before_the_callers_of_its_panicking_batch_hear_of_it() {
        let b = batcher(1);
        let panicking = send_text(&b, vec![999]);
        let health = Arc::new(ServerState::default());
        let worker = {
            let (b, health) = (b.clone(), health.clone());
            std::thread::spawn(move || {
                // A slow reload: the worker stays unhealthy for a while after answering.
                let factory: BackendFactory = Box::new(|| {
                    std::thread::sleep(Duration::from_millis(300));
                    Ok(Box::new(Mock { max_texts: 64 }) as Box<dyn Backend>)
                });
                run_worker(&b, Box::new(Mock { max_texts: 64 }), factory, &health);
            })
        };
        assert!(panicking.blocking_recv().unwrap().is_err());
        assert_eq!(health.healthy_workers(), 0, "the failure was answered while the worker still counted as healthy");
        let later = send_text(&b, vec![5]);
        assert_eq!(later.blocking_recv().unwrap().unwrap().vector, vec![5.0, 1.0]);
        assert_eq!(health.healthy_workers(), 1, "healthy again once replaced");
        b.close();
        worker.join().unwrap();
        assert_eq!(health.healthy_workers(), 0);
    }

    #[test]
    fn out_of_memory_retries_in_halves() {
        let b = batcher(64);
        let rxs: Vec<_> = (0..10i64).map(|i| send_text(&b, vec![i])).collect();
        b.close();
        work(&b, 3, false); // batches of more than 3 run out of memory
        for (i, rx) in rxs.into_iter().enumerate() {
            let v = rx.blocking_recv().unwrap().unwrap().vector;
            assert_eq!(v[0], i as f32);
            assert!(v[1] <= 3.0, "ran in a batch of {}", v[1]);
        }
    }

    #[test]
    fn a_worker_that_cannot_reload_still_answers_everything() {
        let b = batcher(1);
        let panicking = send_text(&b, vec![999]);
        let later: Vec<_> = (0..3).map(|i| send_text(&b, vec![i])).collect();
        b.close();
        let (attempts, _) = work(&b, 64, true);
        assert_eq!(attempts, RELOAD_ATTEMPTS as usize);
        assert!(panicking.blocking_recv().unwrap().is_err());
        for rx in later {
            assert!(
                matches!(rx.blocking_recv().unwrap(), Err(e) if e.kind() == ErrorKind::Internal),
                "queued items are answered"
            );
        }
    }
}
