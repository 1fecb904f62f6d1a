//! The request path shared by every transport: validation, admission, CPU preprocessing, queueing, and the
//! assembly of each item's embeddings in request order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::batching::{Batcher, ImageInput, Job, TextInput};
use crate::error::Error;
use crate::inputs::image::{decode_base64, ImagePreprocessor};
use crate::inputs::text::ClipTokenizer;

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

/// The shared request path.
pub struct Engine {
    batcher: Arc<Batcher>,
    cpu: rayon::ThreadPool,
    admission: Arc<Semaphore>,
    images: Arc<ImagePreprocessor>,
    tokenizer: Arc<ClipTokenizer>,
    limits: Limits,
    ready: AtomicBool,
    draining: AtomicBool,
    info: ModelInfo,
}

type Pending = oneshot::Receiver<Result<Vec<f32>, Error>>;

/// The receivers of one item's jobs, or its validation error.
enum ItemWork {
    Failed(Error),
    Pending { image: Option<Pending>, text: Option<Pending> },
}

impl Engine {
    /// An engine feeding `batcher`; `cpu_threads` = 0 means one per core.
    pub fn new(
        batcher: Arc<Batcher>,
        images: ImagePreprocessor,
        tokenizer: ClipTokenizer,
        limits: Limits,
        cpu_threads: usize,
        info: ModelInfo,
    ) -> anyhow::Result<Self> {
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
            limits,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
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

    /// True once the model is loaded and warmed up, until draining starts.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }

    /// Refuses new work from now on (graceful shutdown); work already admitted completes.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
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
            return Err(if self.draining.load(Ordering::SeqCst) {
                Error::Unavailable("server is shutting down".into())
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
        let work: Vec<ItemWork> = items.into_iter().map(|item| self.submit(item, deadline)).collect();

        let collect = async {
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

    async fn admit(&self, jobs: usize, admission: Admission) -> Result<Option<OwnedSemaphorePermit>, Error> {
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
        Ok(Some(permit))
    }

    /// Validates one item and hands its work to the CPU pool, which queues it for the model.
    fn submit(&self, item: ItemInput, deadline: Option<Instant>) -> ItemWork {
        if item.image.is_none() && item.text.is_none() {
            return ItemWork::Failed(Error::InvalidArgument("item has neither an image nor a text".into()));
        }
        let image = match item.image {
            None => None,
            Some(ImageSource::Url(_)) => {
                return ItemWork::Failed(Error::InvalidArgument(
                    "image URLs are not supported by this server; send image_bytes or image_base64".into(),
                ))
            }
            Some(source) => {
                let (tx, rx) = oneshot::channel();
                let (pre, batcher) = (self.images.clone(), self.batcher.clone());
                self.cpu.spawn(move || {
                    if tx.is_closed() {
                        return; // the caller has gone
                    }
                    let pixels = match source {
                        ImageSource::Bytes(b) => pre.preprocess(&b),
                        ImageSource::Base64(s) => decode_base64(&s).and_then(|b| pre.preprocess(&b)),
                        ImageSource::Url(_) => unreachable!("refused above"),
                    };
                    match pixels {
                        Ok(pixels) => batcher.push_image(Job::new(ImageInput { pixels }, deadline, tx)),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
                Some(rx)
            }
        };
        let text = item.text.map(|text| {
            let (tx, rx) = oneshot::channel();
            let (tok, batcher) = (self.tokenizer.clone(), self.batcher.clone());
            self.cpu.spawn(move || {
                if tx.is_closed() {
                    return;
                }
                match tok.encode(&text) {
                    Ok(ids) => batcher.push_text(Job::new(TextInput { ids }, deadline, tx)),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
            rx
        });
        ItemWork::Pending { image, text }
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
