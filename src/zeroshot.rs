//! Zero-shot image classification: images scored against candidate labels, as transformers'
//! `zero-shot-image-classification` pipeline computes it for CLIP. Each label becomes a text through a hypothesis
//! template (`This is a photo of {}.` by default); an image's probabilities are the softmax over the labels of
//! `exp(logit_scale) x cosine(image, text)`, `logit_scale` being the checkpoint's own (`manifest.json`).
//!
//! Label embeddings are kept in a [`LabelCache`] bounded in bytes, keyed by the text the model embeds, so a label
//! set sent with every request is embedded once; concurrent requests that need the same new text wait for the
//! one computing it instead of computing it again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::batching::BudgetPermit;
use crate::engine::{Admission, EmbedOptions, Engine, ItemInput};
use crate::error::{Error, Reason};
use crate::telemetry;

/// The hypothesis template of transformers' zero-shot-image-classification pipeline.
pub const DEFAULT_TEMPLATE: &str = "This is a photo of {}.";

/// CLIP's logit scale (`exp(logit_scale)`) at the end of OpenAI's training, used for model directories exported
/// before `manifest.json` carried the checkpoint's own.
pub const DEFAULT_SCALE: f64 = 100.0;

/// A hypothesis template: the text around the one `{}` that a label replaces. As Python's `str.format` reads it,
/// `{{` and `}}` are literal braces; any other brace is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    prefix: String,
    suffix: String,
}

impl Template {
    /// Parses `template`, which must hold exactly one `{}`.
    pub fn parse(template: &str) -> Result<Template, Error> {
        let bad = |why: &str| {
            Error::new(
                Reason::InvalidLabels,
                format!(
                    "template {:?}: {why}; it must hold exactly one {{}}, replaced by each label ({{{{ and }}}} \
                     for literal braces)",
                    crate::error::truncate(template, 128)
                ),
            )
        };
        let (mut prefix, mut suffix) = (String::new(), String::new());
        let mut placeholder = false;
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            let out = if placeholder { &mut suffix } else { &mut prefix };
            match (c, chars.peek()) {
                ('{', Some('{')) | ('}', Some('}')) => {
                    chars.next();
                    out.push(c);
                }
                ('{', Some('}')) => {
                    chars.next();
                    if placeholder {
                        return Err(bad("more than one {}"));
                    }
                    placeholder = true;
                }
                ('{', _) => return Err(bad("a { that is neither {} nor {{")),
                ('}', _) => return Err(bad("a } that is not part of {} or }}")),
                _ => out.push(c),
            }
        }
        if !placeholder {
            return Err(bad("no {}"));
        }
        Ok(Template { prefix, suffix })
    }

    /// The text the model embeds for `label`.
    pub fn apply(&self, label: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + label.len() + self.suffix.len());
        s.push_str(&self.prefix);
        s.push_str(label);
        s.push_str(&self.suffix);
        s
    }
}

/// The labels of the Azure zero-shot request: the first row's text split at commas, each stripped of the
/// whitespace around it as Python's `str.strip()` strips it, the empty ones dropped (as the Azure endpoint's CLIP
/// scoring code does).
pub fn azure_labels(text: &str) -> Vec<String> {
    // Python's str.isspace() also counts the ASCII separators U+001C..U+001F, which Rust's is_whitespace does not.
    let space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    text.split(',').map(|l| l.trim_matches(space)).filter(|l| !l.is_empty()).map(str::to_string).collect()
}

/// A unit-length text embedding, shared between requests.
pub type Vector = Arc<[f32]>;

/// What one cache entry is counted as besides its key and vector (the map's and the list's share, the `Arc`).
const ENTRY_OVERHEAD: usize = 96;

/// Unit-length label embeddings by the text embedded, least recently used evicted first past a byte bound;
/// texts being computed are shared with the requests that need them meanwhile.
pub struct LabelCache {
    state: Mutex<CacheState>,
    max_bytes: usize,
}

struct CacheState {
    ready: lru::LruCache<Arc<str>, Vector>,
    bytes: usize,
    /// Texts some request is computing: their value arrives on the channel; a sender dropped without a value
    /// (the computation failed or its caller went away) sends the waiters back to look again.
    pending: HashMap<Arc<str>, watch::Receiver<Option<Vector>>>,
}

impl LabelCache {
    /// A cache holding at most `max_bytes` of entries (0 keeps none; concurrent requests still share work).
    pub fn new(max_bytes: usize) -> Self {
        LabelCache {
            state: Mutex::new(CacheState { ready: lru::LruCache::unbounded(), bytes: 0, pending: HashMap::new() }),
            max_bytes,
        }
    }

    /// Entries held, and the bytes they are counted as.
    pub fn usage(&self) -> (usize, usize) {
        let state = self.lock();
        (state.ready.len(), state.bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // Nothing in the critical sections panics; a poisoned lock still holds a consistent map.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry_bytes(key: &str, vector: &[f32]) -> usize {
        key.len() + std::mem::size_of_val(vector) + ENTRY_OVERHEAD
    }

    /// The embeddings of `texts`, in order. Texts neither cached nor being computed elsewhere are computed by one
    /// call of `compute`, given each distinct such text with the index of its first occurrence in `texts`, which
    /// returns their vectors in the same order.
    pub async fn get_or_compute<F, Fut>(&self, texts: &[String], compute: F) -> Result<Vec<Vector>, Error>
    where
        F: Fn(Vec<(usize, Arc<str>)>) -> Fut,
        Fut: Future<Output = Result<Vec<Vector>, Error>>,
    {
        // Distinct texts, each with the positions it fills.
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut distinct: Vec<(Arc<str>, Vec<usize>)> = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let d = *index.entry(text.as_str()).or_insert_with(|| {
                distinct.push((Arc::from(text.as_str()), Vec::new()));
                distinct.len() - 1
            });
            distinct[d].1.push(i);
        }
        let mut found: Vec<Option<Vector>> = vec![None; distinct.len()];
        let mut todo: Vec<usize> = (0..distinct.len()).collect();
        // Each round ends with every text found, or with some sent back because the request computing them failed
        // or went away; the next round then computes those itself.
        while !todo.is_empty() {
            let mut claim = Claim { cache: self, keys: Vec::new(), senders: Vec::new(), distinct: Vec::new() };
            let mut waits = Vec::new();
            let mut hits = 0u64;
            {
                let mut state = self.lock();
                for d in todo.drain(..) {
                    let key = &distinct[d].0;
                    if let Some(v) = state.ready.get(key) {
                        found[d] = Some(v.clone());
                        hits += 1;
                    } else if let Some(rx) = state.pending.get(key) {
                        waits.push((d, rx.clone()));
                    } else {
                        let (tx, rx) = watch::channel(None);
                        state.pending.insert(key.clone(), rx);
                        claim.keys.push(key.clone());
                        claim.senders.push(tx);
                        claim.distinct.push(d);
                    }
                }
            }
            metrics::counter!(telemetry::LABEL_CACHE_HITS).increment(hits);
            metrics::counter!(telemetry::LABEL_CACHE_MISSES).increment(claim.keys.len() as u64);
            let computing = async {
                if claim.keys.is_empty() {
                    return Ok(Vec::new());
                }
                let wanted = claim.distinct.iter().zip(&claim.keys).map(|(d, k)| (distinct[*d].1[0], k.clone()));
                let vectors = compute(wanted.collect()).await?;
                if vectors.len() != claim.keys.len() {
                    return Err(Error::new(Reason::ModelFailure, "the model returned the wrong number of embeddings"));
                }
                Ok(vectors)
            };
            let waiting = futures::future::join_all(waits.into_iter().map(|(d, mut rx)| async move {
                let value = rx.wait_for(Option::is_some).await.ok().and_then(|v| v.clone());
                (d, value)
            }));
            let (vectors, waited) = futures::try_join!(computing, async { Ok::<_, Error>(waiting.await) })?;
            for (&d, v) in claim.distinct.iter().zip(&vectors) {
                found[d] = Some(v.clone());
            }
            claim.complete(vectors);
            for (d, value) in waited {
                match value {
                    Some(v) => {
                        metrics::counter!(telemetry::LABEL_CACHE_HITS).increment(1);
                        found[d] = Some(v);
                    }
                    None => todo.push(d),
                }
            }
        }
        let mut out: Vec<Option<Vector>> = vec![None; texts.len()];
        for ((_, positions), v) in distinct.into_iter().zip(found) {
            let v = v.expect("every distinct text found");
            for p in positions {
                out[p] = Some(v.clone());
            }
        }
        Ok(out.into_iter().map(|v| v.expect("every text found")).collect())
    }

    /// Stores computed entries and evicts the least recently used ones past the byte bound.
    fn insert(&self, state: &mut CacheState, key: Arc<str>, vector: Vector) {
        let bytes = Self::entry_bytes(&key, &vector);
        if bytes > self.max_bytes {
            return;
        }
        if let Some(old) = state.ready.put(key.clone(), vector) {
            state.bytes -= Self::entry_bytes(&key, &old);
        }
        state.bytes += bytes;
        while state.bytes > self.max_bytes {
            let Some((k, v)) = state.ready.pop_lru() else { break };
            state.bytes -= Self::entry_bytes(&k, &v);
        }
        metrics::gauge!(telemetry::LABEL_CACHE_BYTES).set(state.bytes as f64);
        metrics::gauge!(telemetry::LABEL_CACHE_ENTRIES).set(state.ready.len() as f64);
    }
}

/// The texts one request has undertaken to compute. Dropped before [`Claim::complete`] (an error, or the caller
/// gone), it withdraws them, which sends the requests waiting for them back to look again.
struct Claim<'a> {
    cache: &'a LabelCache,
    keys: Vec<Arc<str>>,
    senders: Vec<watch::Sender<Option<Vector>>>,
    /// The request's own index of each text.
    distinct: Vec<usize>,
}

impl Claim<'_> {
    fn complete(mut self, vectors: Vec<Vector>) {
        let keys = std::mem::take(&mut self.keys);
        let senders = std::mem::take(&mut self.senders);
        {
            let mut state = self.cache.lock();
            for (key, v) in keys.iter().zip(&vectors) {
                state.pending.remove(key);
                self.cache.insert(&mut state, key.clone(), v.clone());
            }
        }
        for (tx, v) in senders.into_iter().zip(vectors) {
            tx.send_replace(Some(v));
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut state = self.cache.lock();
        for key in &self.keys {
            state.pending.remove(key);
        }
        // The senders drop after this, with no value: the waiters look again and find nothing pending.
    }
}

/// One image's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub id: String,
    /// Softmax over the labels of `scale x scores`, in label order.
    pub probs: Vec<f32>,
    /// Cosine similarity with each label's text, in label order.
    pub scores: Vec<f32>,
}

/// How one classification call is run.
pub struct ClassifyOptions {
    /// When the caller stops waiting.
    pub deadline: Option<Instant>,
    /// The request's bytes held against the memory budget, released once its images are prepared.
    pub budget: BudgetPermit,
    /// Names an image in errors from its index and id (gRPC: `item 3 (id "a")`, HTTP: `row 3`).
    pub item_label: fn(usize, &str) -> String,
}

/// What a [`Classifier`] is configured with.
#[derive(Debug, Clone)]
pub struct ClassifierConfig {
    /// `exp(logit_scale)`: the factor cosines are multiplied by before the softmax.
    pub scale: f64,
    /// Most labels in one request.
    pub max_labels: usize,
    /// The template of requests that name none.
    pub default_template: Template,
    /// Bound of the label embedding cache, in bytes.
    pub cache_bytes: usize,
}

/// Zero-shot classification on top of the [`Engine`]'s batching: images and label texts go through the same
/// queues as embedding requests.
pub struct Classifier {
    engine: Arc<Engine>,
    cache: LabelCache,
    config: ClassifierConfig,
}

impl Classifier {
    /// A classifier over `engine`.
    pub fn new(engine: Arc<Engine>, config: ClassifierConfig) -> Self {
        Classifier { engine, cache: LabelCache::new(config.cache_bytes), config }
    }

    /// The factor cosines are multiplied by before the softmax.
    pub fn scale(&self) -> f64 {
        self.config.scale
    }

    /// The label embedding cache.
    pub fn cache(&self) -> &LabelCache {
        &self.cache
    }

    /// Classifies each image of `images` (each must have an image and no text) against `labels`, a template
    /// (`None`: the configured default) turning each label into the text embedded. One bad image or label fails
    /// the call, the error naming it; the answers are in image order.
    pub async fn classify(
        &self,
        images: Vec<ItemInput>,
        labels: &[String],
        template: Option<&str>,
        options: ClassifyOptions,
    ) -> Result<Vec<Classification>, Error> {
        let ClassifyOptions { deadline, budget, item_label } = options;
        self.check_labels(labels)?;
        let parsed;
        let template = match template {
            Some(t) => {
                parsed = Template::parse(t)?;
                &parsed
            }
            None => &self.config.default_template,
        };
        for (index, item) in images.iter().enumerate() {
            if item.text.is_some() {
                let e = Error::new(Reason::MalformedRequest, "an image to classify must not carry a text");
                return Err(e.context(item_label(index, &item.id)));
            }
            if item.image.is_none() {
                return Err(Error::new(Reason::EmptyItem, "no image to classify").context(item_label(index, &item.id)));
            }
        }
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let prompts: Vec<String> = labels.iter().map(|l| template.apply(l)).collect();
        let texts = self.cache.get_or_compute(&prompts, |wanted| self.embed_texts(wanted, deadline));
        let embed_options = EmbedOptions {
            normalize: true,
            deadline,
            admission: Admission::Reject,
            fail_fast: true,
            budget,
            item_label,
        };
        let images =
            async { self.engine.embed(images, embed_options).await?.into_iter().collect::<Result<Vec<_>, _>>() };
        let (texts, images) = futures::try_join!(texts, images)?;
        let images: Vec<(String, Vec<f32>)> =
            images.into_iter().map(|o| (o.id, o.image_features.expect("an image item has image features"))).collect();
        let scale = self.config.scale;
        // Scoring costs images x labels x dimensions multiply-adds: large calls run off the async runtime.
        let work = images.len() * texts.len() * texts.first().map_or(0, |t| t.len());
        let score = move || images.into_iter().map(|(id, image)| classify_one(id, &image, &texts, scale)).collect();
        if work < SCORE_INLINE_WORK {
            return Ok(score());
        }
        tokio::task::spawn_blocking(score)
            .await
            .map_err(|_| Error::new(Reason::InternalPanic, "scoring the images against the labels failed"))
    }

    /// Refuses a label list that cannot be used, before any work.
    fn check_labels(&self, labels: &[String]) -> Result<(), Error> {
        if labels.is_empty() {
            return Err(Error::new(Reason::InvalidLabels, "no labels to classify the images against"));
        }
        if labels.len() > self.config.max_labels {
            return Err(Error::new(
                Reason::TooManyLabels,
                format!("{} labels exceed the limit of {} labels", labels.len(), self.config.max_labels),
            ));
        }
        if let Some(i) = labels.iter().position(String::is_empty) {
            return Err(Error::new(Reason::InvalidLabels, format!("label {i} is empty")));
        }
        Ok(())
    }

    /// Embeds label texts (unit length), at most `--max-items-per-request` per engine call. `wanted` holds each
    /// text with the index of its label, which names it in errors.
    async fn embed_texts(
        &self,
        wanted: Vec<(usize, Arc<str>)>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Vector>, Error> {
        let per_call = self.engine.limits().max_items_per_request.max(1);
        let calls = wanted.chunks(per_call).map(|chunk| {
            let items: Vec<ItemInput> = chunk
                .iter()
                .map(|(label, text)| ItemInput { id: label.to_string(), image: None, text: Some(text.to_string()) })
                .collect();
            let options = EmbedOptions {
                normalize: true,
                deadline,
                admission: Admission::Reject,
                fail_fast: true,
                budget: BudgetPermit::none(),
                item_label: |_, label| format!("label {label}"),
            };
            async move {
                let outputs = self.engine.embed(items, options).await?;
                outputs
                    .into_iter()
                    .map(|o| Ok(Vector::from(o?.text_features.expect("a text item has text features"))))
                    .collect::<Result<Vec<_>, Error>>()
            }
        });
        let chunks = futures::future::try_join_all(calls).await?;
        Ok(chunks.into_iter().flatten().collect())
    }
}

/// Below this many multiply-adds, scoring runs on the async runtime (about a millisecond).
const SCORE_INLINE_WORK: usize = 1 << 20;

/// One image's cosines with the (unit-length) label texts, and the softmax of `scale` times them.
fn classify_one(id: String, image: &[f32], texts: &[Vector], scale: f64) -> Classification {
    let cosines: Vec<f64> =
        texts.iter().map(|t| t.iter().zip(image).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()).collect();
    Classification { id, probs: softmax(&cosines, scale), scores: cosines.iter().map(|c| *c as f32).collect() }
}

/// The softmax of `scale x values`, computed in f64 from the largest value down (so it cannot overflow).
pub fn softmax(values: &[f64], scale: f64) -> Vec<f32> {
    let max = values.iter().map(|v| v * scale).fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = values.iter().map(|v| (v * scale - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| (e / sum) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_read_as_python_formats_them() {
        let t = Template::parse(DEFAULT_TEMPLATE).unwrap();
        assert_eq!(t.apply("cat"), "This is a photo of cat.");
        assert_eq!(Template::parse("{}").unwrap().apply("a dog"), "a dog");
        assert_eq!(Template::parse("{{{}}} and {{x}}").unwrap().apply("y"), "{y} and {x}");
        for bad in ["", "no placeholder", "{} and {}", "{0}", "{label}", "a { b {}", "a } b {}", "{{}}"] {
            let e = Template::parse(bad).unwrap_err();
            assert_eq!(e.reason(), Reason::InvalidLabels, "{bad:?}");
            assert!(e.message().contains("exactly one {}"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn azure_labels_are_split_stripped_and_empty_ones_dropped() {
        assert_eq!(
            azure_labels("water_bottle, milk_bottle, carton, can"),
            ["water_bottle", "milk_bottle", "carton", "can"]
        );
        assert_eq!(azure_labels(" a red car ,\tdog\n, ,,cat"), ["a red car", "dog", "cat"]);
        assert_eq!(azure_labels("\u{1f}x\u{a0}, y\u{3000}"), ["x", "y"]);
        assert_eq!(azure_labels("dup, dup"), ["dup", "dup"]);
        assert!(azure_labels(" , ,").is_empty());
        assert!(azure_labels("").is_empty());
    }

    #[test]
    fn softmax_matches_the_definition_and_does_not_overflow() {
        let p = softmax(&[0.1, 0.2, 0.3], 100.0);
        let e: Vec<f64> = [10.0f64, 20.0, 30.0].iter().map(|x| x.exp()).collect();
        let s: f64 = e.iter().sum();
        for (a, b) in p.iter().zip(&e) {
            assert!((*a as f64 - b / s).abs() < 1e-7);
        }
        let big = softmax(&[1.0, 1.0], 1e6);
        assert_eq!(big, vec![0.5, 0.5]);
        assert_eq!(softmax(&[0.3], 100.0), vec![1.0]);
    }

    fn vector(x: f32) -> Vector {
        Vector::from(vec![x; 4])
    }

    #[tokio::test]
    async fn the_cache_computes_each_text_once_and_evicts_past_its_bound() {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let compute = |wanted: Vec<(usize, Arc<str>)>| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok(wanted.iter().map(|(i, _)| vector(*i as f32)).collect()) }
        };
        let entry = LabelCache::entry_bytes("a", &[0.0; 4]);
        let cache = LabelCache::new(3 * entry);
        let texts: Vec<String> = ["a", "b", "a", "c"].iter().map(|s| s.to_string()).collect();
        let got = cache.get_or_compute(&texts, compute).await.unwrap();
        // One call for the three distinct texts; the repeated one gets the first occurrence's vector.
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(got.iter().map(|v| v[0]).collect::<Vec<_>>(), [0.0, 1.0, 0.0, 3.0]);
        assert_eq!(cache.usage(), (3, 3 * entry));
        // All cached: no call.
        cache.get_or_compute(&texts, compute).await.unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A fourth text evicts the least recently used: "a" (the second call used a, b, c in that order).
        let d = vec!["d".to_string()];
        cache.get_or_compute(&d, compute).await.unwrap();
        assert_eq!(cache.usage(), (3, 3 * entry));
        assert!(cache.lock().ready.peek("a").is_none(), "the least recently used entry was kept");
        // Nothing is kept with a bound of 0.
        let none = LabelCache::new(0);
        none.get_or_compute(&texts, compute).await.unwrap();
        assert_eq!(none.usage(), (0, 0));
    }

    #[tokio::test]
    async fn concurrent_requests_share_a_computation_and_a_failure_is_not_shared() {
        let cache = Arc::new(LabelCache::new(1 << 20));
        let (release, released) = watch::channel(false);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let slow = |released: watch::Receiver<bool>, calls: Arc<std::sync::atomic::AtomicUsize>, fail: bool| {
            move |wanted: Vec<(usize, Arc<str>)>| {
                let mut released = released.clone();
                calls.fetch_add(wanted.len(), std::sync::atomic::Ordering::SeqCst);
                async move {
                    let _ = released.wait_for(|r| *r).await;
                    if fail {
                        return Err(Error::new(Reason::QueueFull, "full"));
                    }
                    Ok(wanted.iter().map(|_| vector(7.0)).collect())
                }
            }
        };
        let texts: Vec<String> = vec!["x".into(), "y".into()];
        // The first request fails after the others started waiting for it: they compute the texts themselves.
        let first = {
            let (cache, texts, f) = (cache.clone(), texts.clone(), slow(released.clone(), calls.clone(), true));
            tokio::spawn(async move { cache.get_or_compute(&texts, f).await })
        };
        tokio::task::yield_now().await;
        while cache.lock().pending.len() < 2 {
            tokio::task::yield_now().await;
        }
        let others: Vec<_> = (0..4)
            .map(|_| {
                let (cache, texts, f) = (cache.clone(), texts.clone(), slow(released.clone(), calls.clone(), false));
                tokio::spawn(async move { cache.get_or_compute(&texts, f).await })
            })
            .collect();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        release.send_replace(true);
        assert_eq!(first.await.unwrap().unwrap_err().reason(), Reason::QueueFull);
        for o in others {
            assert!(o.await.unwrap().unwrap().iter().all(|v| v[0] == 7.0));
        }
        // Two texts computed by the failed request, then once more by one of the others.
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert!(cache.lock().pending.is_empty());
        assert_eq!(cache.usage().0, 2);
    }
}
