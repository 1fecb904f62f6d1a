//! The request path shared by every transport: validation, admission, CPU preprocessing, queueing, and the
//! assembly of each item's embeddings in request order.

use std::sync::Arc;
use std::time::Instant;

use crate::batching::{AdmissionControl, Batcher, BudgetPermit, Embedded, JobReceiver, MemoryBudget, Reply, Ticket};
use crate::cache::ContentCache;
use crate::error::{Error, Reason};
use crate::inputs::fetch::UrlFetcher;
use crate::inputs::image::{ImagePreprocessor, PreprocessMode};
use crate::inputs::text::ClipTokenizer;
use crate::prepare::{PrepareContext, Preparer, RequestWork, Unit, UnitInput};
use crate::state::ServerState;

pub use crate::inputs::ImageSource;

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
    /// Tokens the model read for the item's text (start and end tokens included); 0 without a text.
    pub text_tokens: u32,
    /// Where the item's time went; for an item with an image and a text, the timing of the one that finished
    /// last.
    pub timing: ItemTiming,
}

pub use crate::batching::{Admission, ItemTiming};

/// Limits enforced before any expensive work.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_items_per_request: usize,
    pub max_queued_items: usize,
    /// Longest item id, in bytes.
    pub max_id_bytes: usize,
    /// Image URLs of one request fetched at once.
    pub url_fetch_concurrency: usize,
    /// Time allowed for all the image URLs of one request.
    pub url_request_timeout: std::time::Duration,
    /// Bytes of request data held at once (bodies, messages, fetched images), across all connections.
    pub memory_budget_bytes: usize,
}

/// How one call is run.
pub struct EmbedOptions {
    /// Unit-length vectors instead of raw projections.
    pub normalize: bool,
    /// When the caller stops waiting.
    pub deadline: Option<Instant>,
    /// Reject at once or wait when the queue is full.
    pub admission: Admission,
    /// Answer as soon as one item fails (unary calls, where one bad item fails the call), instead of waiting for
    /// every item's result (streams).
    pub fail_fast: bool,
    /// The request's bytes held against the memory budget, released once its inputs are prepared.
    pub budget: BudgetPermit,
    /// Names an item in errors from its index and id (gRPC: `item 3 (id "a")`, HTTP: `row 3`).
    pub item_label: fn(usize, &str) -> String,
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
    /// `--preprocess`: exact or fast image preprocessing.
    pub image_mode: PreprocessMode,
    pub tokenizer: ClipTokenizer,
    pub fetcher: UrlFetcher,
    pub limits: Limits,
    /// Threads of the CPU pool; 0 means one per core.
    pub cpu_threads: usize,
    pub info: ModelInfo,
    /// The server's state (loaded, draining, model workers able to run), for readiness.
    pub state: Arc<ServerState>,
    /// Testing only: tokenizing exactly this text panics.
    pub inject_panic_on_text: Option<String>,
    /// Bytes of embeddings the content cache may hold; 0 disables it.
    pub cache_bytes: usize,
}

/// The shared request path.
pub struct Engine {
    preparer: Arc<Preparer>,
    admission: AdmissionControl,
    budget: Arc<MemoryBudget>,
    fetcher: Arc<UrlFetcher>,
    limits: Limits,
    state: Arc<ServerState>,
    info: ModelInfo,
    cache: Option<Arc<ContentCache>>,
}

/// The receivers of one item's jobs, or its validation error.
enum ItemWork {
    Failed(Error),
    Submitted { image: Option<JobReceiver>, text: Option<JobReceiver> },
}

/// An image URL of a request, waiting to be fetched.
struct UrlJob {
    index: usize,
    url: String,
    reply: Reply,
    ticket: Ticket,
}

impl Engine {
    /// An engine feeding the batcher of `parts`.
    pub fn new(parts: EngineParts) -> anyhow::Result<Self> {
        let EngineParts {
            batcher,
            images,
            image_mode,
            tokenizer,
            fetcher,
            limits,
            cpu_threads,
            info,
            state,
            inject_panic_on_text,
            cache_bytes,
        } = parts;
        anyhow::ensure!(limits.max_queued_items > 0, "--max-queued-items must be at least 1");
        let cache = ContentCache::new(cache_bytes, info.embedding_dim);
        let context =
            PrepareContext { images, image_mode, tokenizer, batcher, inject_panic_on_text, cache: cache.clone() };
        let preparer = Preparer::start(cpu_threads, context)?;
        Ok(Engine {
            preparer: Arc::new(preparer),
            admission: AdmissionControl::new(limits.max_queued_items),
            budget: Arc::new(MemoryBudget::new(limits.memory_budget_bytes)),
            fetcher: Arc::new(fetcher),
            limits,
            state,
            info,
            cache,
        })
    }

    /// Most embeddings the content cache holds (0 when it is disabled).
    pub fn cache_capacity(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.capacity())
    }

    /// The served model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The memory budget for request data (bodies and messages are held against it while they are read).
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// The configured limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The server's state: loaded, draining, model workers able to run.
    pub fn state(&self) -> &ServerState {
        &self.state
    }

    /// True while new work is accepted (see [`crate::state::Status::is_ready`]).
    pub fn is_ready(&self) -> bool {
        self.state.is_ready()
    }

    /// Inputs admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
    }

    /// Resolves once no admitted input is left unfinished (graceful shutdown waits for it).
    pub async fn until_idle(&self) {
        self.admission.until_empty().await
    }

    /// Stops the preparation threads (after shutdown).
    pub fn close(&self) {
        self.preparer.close();
    }

    /// Embeds `items`. The outer error concerns the whole request (not ready, too many items, over capacity, or
    /// with `fail_fast` the first item that failed); the inner results are per item, in request order.
    pub async fn embed(
        &self,
        items: Vec<ItemInput>,
        options: EmbedOptions,
    ) -> Result<Vec<Result<ItemOutput, Error>>, Error> {
        let EmbedOptions { normalize, deadline, admission, fail_fast, budget, item_label } = options;
        if let Some(refused) = self.state.status().refusal() {
            return Err(refused);
        }
        if items.len() > self.limits.max_items_per_request {
            return Err(Error::new(
                Reason::TooManyItems,
                format!(
                    "request of {} items exceeds the limit of {} items per request",
                    items.len(),
                    self.limits.max_items_per_request
                ),
            ));
        }
        let checked: Vec<(ItemInput, Option<Error>)> = items
            .into_iter()
            .map(|i| {
                let e = self.check_item(&i).err();
                (i, e)
            })
            .collect();
        let inputs: usize = checked
            .iter()
            .filter(|(_, e)| e.is_none())
            .map(|(i, _)| i.image.is_some() as usize + i.text.is_some() as usize)
            .sum();
        let tickets = self.admission.admit(inputs, admission).await?;
        let collect = async {
            let (ids, work, urls, request) = self.submit(checked, tickets, deadline, budget);
            // Without URLs the request's work is owned by the CPU pool alone, which drops it (and its budget)
            // once every input is prepared.
            let _fetching = if urls.is_empty() {
                drop(request);
                None
            } else {
                Some(self.spawn_fetches(urls, request, deadline))
            };
            gather(ids, work, normalize, fail_fast.then_some(item_label)).await
        };
        match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), collect)
                .await
                .map_err(|_| Error::new(Reason::DeadlineExceeded, "deadline exceeded"))?,
            None => collect.await,
        }
    }

    /// Refuses an item that cannot be embedded, before anything is admitted for it.
    fn check_item(&self, item: &ItemInput) -> Result<(), Error> {
        if item.id.len() > self.limits.max_id_bytes {
            return Err(Error::new(
                Reason::IdTooLong,
                format!("id of {} bytes exceeds the limit of {} bytes", item.id.len(), self.limits.max_id_bytes),
            ));
        }
        if item.image.is_none() && item.text.is_none() {
            return Err(Error::new(Reason::EmptyItem, "item has neither an image nor a text"));
        }
        Ok(())
    }

    /// Hands each input with its ticket to the CPU pool (image URLs are returned, to be fetched first).
    #[allow(clippy::type_complexity)]
    fn submit(
        &self,
        items: Vec<(ItemInput, Option<Error>)>,
        tickets: Vec<Ticket>,
        deadline: Option<Instant>,
        budget: BudgetPermit,
    ) -> (Vec<String>, Vec<ItemWork>, Vec<UrlJob>, Arc<RequestWork>) {
        let request = RequestWork::new(deadline, budget);
        let mut tickets = tickets.into_iter();
        let mut units = Vec::new();
        let mut urls = Vec::new();
        let mut ids = Vec::with_capacity(items.len());
        let work = items
            .into_iter()
            .enumerate()
            .map(|(index, (item, refused))| {
                ids.push(item.id);
                if let Some(e) = refused {
                    return ItemWork::Failed(e);
                }
                let mut unit = |input: UnitInput| {
                    let (reply, rx) = Reply::channel();
                    let ticket = tickets.next().expect("one ticket per input");
                    match input {
                        UnitInput::Image(ImageSource::Url(url)) => urls.push(UrlJob { index, url, reply, ticket }),
                        input => {
                            units.push(Unit { index, input, reply, ticket, held: BudgetPermit::none(), key: None })
                        }
                    }
                    rx
                };
                let image = item.image.map(|source| unit(UnitInput::Image(source)));
                let text = item.text.map(|text| unit(UnitInput::Text(text)));
                ItemWork::Submitted { image, text }
            })
            .collect();
        request.expect(urls.len());
        self.preparer.add(&request, units);
        (ids, work, urls, request)
    }

    /// Fetches a request's image URLs (at most `url_fetch_concurrency` at once, all within
    /// `url_request_timeout`), handing each body to the CPU pool as soon as it has arrived. Stops when dropped.
    fn spawn_fetches(&self, urls: Vec<UrlJob>, request: Arc<RequestWork>, deadline: Option<Instant>) -> AbortOnDrop {
        use futures::StreamExt;
        let limit = Instant::now() + self.limits.url_request_timeout;
        let url_deadline = deadline.map_or(limit, |d| d.min(limit));
        let timeout = self.limits.url_request_timeout;
        let concurrency = self.limits.url_fetch_concurrency.max(1);
        let (preparer, fetcher, budget) = (self.preparer.clone(), self.fetcher.clone(), self.budget.clone());
        AbortOnDrop(tokio::spawn(async move {
            futures::stream::iter(urls)
                .for_each_concurrent(concurrency, |job| {
                    let (request, preparer, fetcher, budget) =
                        (request.clone(), preparer.clone(), fetcher.clone(), budget.clone());
                    async move {
                        let UrlJob { index, url, mut reply, ticket } = job;
                        if reply.is_closed() {
                            request.forget(&preparer);
                            return;
                        }
                        let started = Instant::now();
                        let fetch = fetcher.fetch(&url, &budget, Some(url_deadline));
                        let fetched = tokio::time::timeout_at(url_deadline.into(), fetch).await.unwrap_or_else(|_| {
                            Err(Error::new(
                                Reason::UrlFetchFailed,
                                format!("the image URLs of this request took longer than {timeout:?}"),
                            ))
                        });
                        reply.add_preprocess(started.elapsed());
                        match fetched {
                            Ok((bytes, held)) => {
                                let input = UnitInput::Image(ImageSource::Bytes(bytes));
                                let unit = Unit { index, input, reply, ticket, held, key: None };
                                preparer.add_expected(&request, unit);
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                                drop(ticket);
                                request.forget(&preparer);
                            }
                        }
                    }
                })
                .await
        }))
    }
}

/// Aborts a spawned task when dropped (the caller has gone).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for each item's results and assembles them in request order; with `fail_fast`, returns the first
/// failure as soon as it happens (dropping the rest cancels their remaining work).
async fn gather(
    ids: Vec<String>,
    work: Vec<ItemWork>,
    normalize: bool,
    fail_fast: Option<fn(usize, &str) -> String>,
) -> Result<Vec<Result<ItemOutput, Error>>, Error> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut pending: FuturesUnordered<_> = ids
        .into_iter()
        .zip(work)
        .enumerate()
        .map(|(index, (id, w))| async move {
            let label = fail_fast.map(|name| name(index, &id));
            let result = match w {
                ItemWork::Failed(e) => Err(e),
                ItemWork::Submitted { image, text } => {
                    let image = async {
                        match image {
                            Some(rx) => Some(await_job(rx).await),
                            None => None,
                        }
                    };
                    let text = async {
                        match text {
                            Some(rx) => Some(await_job(rx).await),
                            None => None,
                        }
                    };
                    let (image, text) = futures::join!(image, text);
                    assemble(id, image, text, normalize)
                }
            };
            (
                index,
                result.map_err(|e| match label {
                    Some(label) => e.context(label),
                    None => e,
                }),
            )
        })
        .collect();
    let mut out: Vec<Option<Result<ItemOutput, Error>>> = (0..pending.len()).map(|_| None).collect();
    while let Some((index, mut result)) = pending.next().await {
        if fail_fast.is_some() {
            result = Ok(result?);
        }
        out[index] = Some(result);
    }
    Ok(out.into_iter().map(|r| r.expect("every item answered")).collect())
}

async fn await_job(rx: JobReceiver) -> Result<Embedded, Error> {
    rx.await.unwrap_or_else(|_| Err(Error::new(Reason::ModelFailure, "the item was dropped before it was embedded")))
}

fn assemble(
    id: String,
    image: Option<Result<Embedded, Error>>,
    text: Option<Result<Embedded, Error>>,
    normalize: bool,
) -> Result<ItemOutput, Error> {
    let finish = |r: Option<Result<Embedded, Error>>, what: &str| -> Result<Option<Embedded>, Error> {
        match r {
            None => Ok(None),
            Some(Ok(mut e)) => {
                if normalize {
                    l2_normalize(&mut e.vector);
                }
                Ok(Some(e))
            }
            Some(Err(e)) => Err(e.context(what)),
        }
    };
    let (image, text) = (finish(image, "image")?, finish(text, "text")?);
    // The item was ready when both of its inputs were: its timing is that of the one that took longer.
    let timing = match (&image, &text) {
        (Some(i), Some(t)) if t.timing.total() > i.timing.total() => {
            ItemTiming { cached: i.timing.cached && t.timing.cached, ..t.timing }
        }
        (Some(i), Some(t)) => ItemTiming { cached: i.timing.cached && t.timing.cached, ..i.timing },
        (Some(one), None) | (None, Some(one)) => one.timing,
        (None, None) => ItemTiming::default(),
    };
    Ok(ItemOutput {
        text_tokens: text.as_ref().map_or(0, |t| t.tokens),
        image_features: image.map(|e| e.vector),
        text_features: text.map(|e| e.vector),
        timing,
        id,
    })
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

    fn embedded(vector: Vec<f32>, tokens: u32, queue_ms: u64, cached: bool) -> Embedded {
        let timing = ItemTiming { queue: std::time::Duration::from_millis(queue_ms), cached, ..Default::default() };
        Embedded { vector, tokens, timing }
    }

    #[test]
    fn an_item_error_names_its_modality() {
        let r = assemble("a".into(), Some(Err(Error::new(Reason::InvalidImage, "bad"))), None, false);
        assert_eq!(r, Err(Error::new(Reason::InvalidImage, "image: bad")));
        let ok = assemble("b".into(), None, Some(Ok(embedded(vec![2.0, 0.0], 4, 1, false))), true).unwrap();
        assert_eq!(ok.text_features, Some(vec![1.0, 0.0]));
        assert_eq!((ok.image_features, ok.text_tokens), (None, 4));
    }

    #[test]
    fn an_item_with_two_inputs_takes_the_timing_of_the_slower() {
        let image = Some(Ok(embedded(vec![1.0], 0, 9, true)));
        let text = Some(Ok(embedded(vec![1.0], 5, 3, false)));
        let both = assemble("c".into(), image, text, false).unwrap();
        assert_eq!(both.timing.queue, std::time::Duration::from_millis(9));
        assert!(!both.timing.cached, "cached only when both inputs were");
        assert_eq!(both.text_tokens, 5);
    }
}
