//! The request path shared by every transport: validation, admission, CPU preprocessing, queueing, and the
//! assembly of each item's embeddings in request order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::batching::{Batcher, ImageInput, Job, Reply, TextInput};
use crate::error::Error;
use crate::inputs::fetch::UrlFetcher;
use crate::inputs::image::{decode_base64, ImagePreprocessor};
use crate::inputs::text::ClipTokenizer;
use crate::metrics as m;
use crate::model::WorkerHealth;

/// Where an item's image comes from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// An encoded image file.
    Bytes(Vec<u8>),
    /// Base64 of an encoded image file.
    Base64(String),
    /// An http(s) URL.
    Url(String),
}

/// One item of a request, transport-independent.
#[derive(Debug, Clone, Default)]
pub struct ItemInput {
    pub id: String,
    pub image: Option<ImageSource>,
    pub text: Option<String>,
}

/// One item's embeddings: present for each modality the item asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemOutput {
    pub id: String,
    pub image_features: Option<Vec<f32>>,
    pub text_features: Option<Vec<f32>>,
}

/// What to do when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Answer RESOURCE_EXHAUSTED at once (unary calls).
    Reject,
    /// Wait for room (streams: backpressure instead of errors).
    Wait,
}

/// Limits enforced before any expensive work.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_items_per_request: usize,
    pub max_queued_items: usize,
    /// Image URLs of one request fetched at once.
    pub url_fetch_concurrency: usize,
}

/// Describes the served model (for `Info` and the logs).
#[derive(Debug, Clone, Default)]
pub struct ModelInfo {
    pub model_id: String,
    pub weights: String,
    pub embedding_dim: usize,
    pub device: String,
    pub dtype: String,
    pub context_length: usize,
    pub image_size: u32,
}

/// What an [`Engine`] is made of.
pub struct EngineParts {
    /// The queues the model workers take batches from.
    pub batcher: Arc<Batcher>,
    pub images: ImagePreprocessor,
    pub tokenizer: ClipTokenizer,
    pub fetcher: UrlFetcher,
    pub limits: Limits,
    /// Threads of the CPU pool; 0 means one per core.
    pub cpu_threads: usize,
    pub info: ModelInfo,
    /// The model workers' health, for readiness.
    pub workers: Arc<WorkerHealth>,
}

/// The shared request path.
pub struct Engine {
    batcher: Arc<Batcher>,
    cpu: rayon::ThreadPool,
    admission: Arc<Semaphore>,
    images: Arc<ImagePreprocessor>,
    tokenizer: Arc<ClipTokenizer>,
    fetcher: Arc<UrlFetcher>,
    limits: Limits,
    ready: AtomicBool,
    draining: AtomicBool,
    workers: Arc<WorkerHealth>,
    info: ModelInfo,
}

type Pending = oneshot::Receiver<Result<Vec<f32>, Error>>;

/// The receivers of one item's jobs, or its validation error.
enum ItemWork {
    Failed(Error),
    Pending { image: Option<Pending>, text: Option<Pending> },
}

impl Engine {
    /// An engine feeding the batcher of `parts`.
    pub fn new(parts: EngineParts) -> anyhow::Result<Self> {
        let EngineParts { batcher, images, tokenizer, fetcher, limits, cpu_threads, info, workers } = parts;
        anyhow::ensure!(limits.max_queued_items > 0, "--max-queued-items must be at least 1");
        let cpu = rayon::ThreadPoolBuilder::new()
            .num_threads(cpu_threads)
            .thread_name(|i| format!("preprocess-{i}"))
            .build()?;
        Ok(Engine {
            batcher,
            cpu,
            admission: Arc::new(Semaphore::new(limits.max_queued_items)),
            images: Arc::new(images),
            tokenizer: Arc::new(tokenizer),
            fetcher: Arc::new(fetcher),
            limits,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            workers,
            info,
        })
    }

    /// The served model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Marks the model loaded and warmed up.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// True once the model is loaded and warmed up, while at least one model worker is able to run batches, until
    /// draining starts.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.is_draining() && self.workers.healthy() > 0
    }

    /// True once graceful shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Refuses new work from now on (graceful shutdown); work already admitted completes.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Items admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.limits.max_queued_items - self.admission.available_permits()
    }

    /// Embeds `items`. The outer error concerns the whole request (not ready, too many items, over capacity);
    /// the inner results are per item, in request order.
    pub async fn embed(
        &self,
        items: Vec<ItemInput>,
        normalize: bool,
        deadline: Option<Instant>,
        admission: Admission,
    ) -> Result<Vec<Result<ItemOutput, Error>>, Error> {
        if !self.is_ready() {
            return Err(if self.is_draining() {
                Error::Unavailable("server is shutting down".into())
            } else if self.ready.load(Ordering::SeqCst) {
                Error::Unavailable("no model worker is available right now".into())
            } else {
                Error::Unavailable("model is not loaded yet".into())
            });
        }
        if items.len() > self.limits.max_items_per_request {
            return Err(Error::TooLarge(format!(
                "request of {} items exceeds the limit of {} items per request",
                items.len(),
                self.limits.max_items_per_request
            )));
        }
        let jobs: usize = items.iter().map(|i| i.image.is_some() as usize + i.text.is_some() as usize).sum();
        let _permit = self.admit(jobs, admission).await?;

        let ids: Vec<String> = items.iter().map(|i| i.id.clone()).collect();

        let collect = async {
            let items = self.fetch_urls(items).await;
            let work = self.submit(items, deadline);
            let mut out = Vec::with_capacity(work.len());
            for (id, w) in ids.into_iter().zip(work) {
                out.push(match w {
                    ItemWork::Failed(e) => Err(e),
                    ItemWork::Pending { image, text } => {
                        let image = match image {
                            Some(rx) => Some(await_job(rx).await),
                            None => None,
                        };
                        let text = match text {
                            Some(rx) => Some(await_job(rx).await),
                            None => None,
                        };
                        assemble(id, image, text, normalize)
                    }
                });
            }
            out
        };
        match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), collect)
                .await
                .map_err(|_| Error::DeadlineExceeded("deadline exceeded".into())),
            None => Ok(collect.await),
        }
    }

    async fn admit(&self, jobs: usize, admission: Admission) -> Result<Option<AdmittedItems>, Error> {
        if jobs == 0 {
            return Ok(None);
        }
        if jobs > self.limits.max_queued_items {
            return Err(Error::TooLarge(format!(
                "request of {jobs} inputs exceeds the queue capacity of {}",
                self.limits.max_queued_items
            )));
        }
        let n = jobs as u32;
        let permit = match admission {
            Admission::Reject => self.admission.clone().try_acquire_many_owned(n).map_err(|_| {
                Error::Overloaded(format!(
                    "server over capacity ({} inputs queued); retry later",
                    self.limits.max_queued_items
                ))
            })?,
            Admission::Wait => self
                .admission
                .clone()
                .acquire_many_owned(n)
                .await
                .map_err(|_| Error::Unavailable("server is shutting down".into()))?,
        };
        metrics::gauge!(m::ADMITTED_ITEMS).increment(jobs as f64);
        Ok(Some(AdmittedItems { _permit: permit, count: jobs }))
    }

    /// Downloads the images given as URLs (at most `url_fetch_concurrency` at once), in item order.
    async fn fetch_urls(&self, items: Vec<ItemInput>) -> Vec<Result<ItemInput, Error>> {
        use futures::StreamExt;
        let fetches = items.into_iter().map(|mut item| async move {
            if let Some(ImageSource::Url(url)) = &item.image {
                let bytes = self.fetcher.fetch(url).await.map_err(|e| e.context("image"))?;
                item.image = Some(ImageSource::Bytes(bytes));
            }
            Ok(item)
        });
        futures::stream::iter(fetches).buffered(self.limits.url_fetch_concurrency.max(1)).collect().await
    }

    /// Validates the items and hands their work to the CPU pool, which queues it for the model.
    fn submit(&self, items: Vec<Result<ItemInput, Error>>, deadline: Option<Instant>) -> Vec<ItemWork> {
        let mut images: Vec<(ImageSource, Reply)> = Vec::new();
        let mut texts: Vec<(String, Reply)> = Vec::new();
        let work = items
            .into_iter()
            .map(|item| {
                let item = match item {
                    Ok(item) => item,
                    Err(e) => return ItemWork::Failed(e),
                };
                if item.image.is_none() && item.text.is_none() {
                    return ItemWork::Failed(Error::InvalidArgument("item has neither an image nor a text".into()));
                }
                let image = item.image.map(|source| {
                    let (tx, rx) = oneshot::channel();
                    images.push((source, tx));
                    rx
                });
                let text = item.text.map(|text| {
                    let (tx, rx) = oneshot::channel();
                    texts.push((text, tx));
                    rx
                });
                ItemWork::Pending { image, text }
            })
            .collect();
        let (pre, tok) = (self.images.clone(), self.tokenizer.clone());
        let prepare_image = move |source: ImageSource| {
            let pixels = match source {
                ImageSource::Bytes(b) => pre.preprocess(&b),
                ImageSource::Base64(s) => decode_base64(&s).and_then(|b| pre.preprocess(&b)),
                ImageSource::Url(_) => Err(Error::Internal("image URL was not fetched".into())),
            }?;
            Ok(ImageInput { pixels })
        };
        let batcher = self.batcher.clone();
        self.spawn_groups(images, IMAGE_GROUP, deadline, "image", prepare_image, move |jobs| batcher.push_images(jobs));
        let batcher = self.batcher.clone();
        let prepare_text = move |text: String| tok.encode(&text).map(|ids| TextInput { ids });
        self.spawn_groups(texts, TEXT_GROUP, deadline, "text", prepare_text, move |jobs| batcher.push_texts(jobs));
        work
    }

    /// Prepares inputs on the CPU pool in groups: the items of a group are prepared in parallel, then queued
    /// together, so a request's items can share one forward pass instead of trickling into the queue one by one.
    /// An input that fails to prepare is answered at once; one whose caller has gone is skipped.
    fn spawn_groups<I, T, P, Q>(
        &self,
        mut work: Vec<(I, Reply)>,
        group_size: usize,
        deadline: Option<Instant>,
        modality: &'static str,
        prepare: P,
        queue: Q,
    ) where
        I: Send + 'static,
        T: Send + 'static,
        P: Fn(I) -> Result<T, Error> + Send + Sync + Clone + 'static,
        Q: Fn(Vec<Job<T>>) + Send + Clone + 'static,
    {
        use rayon::prelude::*;
        while !work.is_empty() {
            let rest = work.split_off(work.len().min(group_size));
            let group = std::mem::replace(&mut work, rest);
            let (prepare, queue) = (prepare.clone(), queue.clone());
            self.cpu.spawn(move || {
                let jobs: Vec<Job<T>> = group
                    .into_par_iter()
                    .filter_map(|(input, tx)| {
                        if tx.is_closed() {
                            metrics::counter!(m::DROPPED_ITEMS, "reason" => "cancelled").increment(1);
                            return None;
                        }
                        let start = Instant::now();
                        let prepared = prepare(input);
                        metrics::histogram!(m::PREPROCESS_DURATION, "modality" => modality)
                            .record(start.elapsed().as_secs_f64());
                        match prepared {
                            Ok(input) => Some(Job::new(input, deadline, tx)),
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                None
                            }
                        }
                    })
                    .collect();
                if !jobs.is_empty() {
                    queue(jobs);
                }
            });
        }
    }
}

/// Most images prepared and queued together.
const IMAGE_GROUP: usize = 32;
/// Most texts tokenized and queued together.
const TEXT_GROUP: usize = 256;

/// Queue capacity held by one request; released (and the gauge lowered) when the request is answered or dropped.
struct AdmittedItems {
    _permit: OwnedSemaphorePermit,
    count: usize,
}

impl Drop for AdmittedItems {
    fn drop(&mut self) {
        metrics::gauge!(m::ADMITTED_ITEMS).decrement(self.count as f64);
    }
}

async fn await_job(rx: Pending) -> Result<Vec<f32>, Error> {
    rx.await.unwrap_or_else(|_| Err(Error::Internal("the item was dropped before it was embedded".into())))
}

fn assemble(
    id: String,
    image: Option<Result<Vec<f32>, Error>>,
    text: Option<Result<Vec<f32>, Error>>,
    normalize: bool,
) -> Result<ItemOutput, Error> {
    let finish = |r: Option<Result<Vec<f32>, Error>>, what: &str| -> Result<Option<Vec<f32>>, Error> {
        match r {
            None => Ok(None),
            Some(Ok(mut v)) => {
                if normalize {
                    l2_normalize(&mut v);
                }
                Ok(Some(v))
            }
            Some(Err(e)) => Err(e.context(what)),
        }
    };
    Ok(ItemOutput { image_features: finish(image, "image")?, text_features: finish(text, "text")?, id })
}

/// Scales `v` to unit length (left as it is if it is all zeros).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    if norm > 0.0 {
        for x in v {
            *x = (*x as f64 / norm) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_gives_unit_length() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0, 0.0];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0, 0.0]);
    }

    #[test]
    fn an_item_error_names_its_modality() {
        let r = assemble("a".into(), Some(Err(Error::InvalidArgument("bad".into()))), None, false);
        assert_eq!(r, Err(Error::InvalidArgument("image: bad".into())));
        let ok = assemble("b".into(), None, Some(Ok(vec![2.0, 0.0])), true).unwrap();
        assert_eq!(ok.text_features, Some(vec![1.0, 0.0]));
        assert_eq!(ok.image_features, None);
    }
}
