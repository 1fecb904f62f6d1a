//! The tonic service: protobuf <-> domain conversion, `Embed`, `EmbedStream`, `Info`, `Classify`.

pub mod codec;
pub mod compression;
pub mod deadline;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{Admission, EmbedOptions, Engine, ImageSource, ItemInput, ItemOutput};
use crate::error::Error;
use crate::model::faults::Faults;
use crate::pb;
use crate::pb::embedder_server::Embedder;
use crate::telemetry;
use crate::telemetry::layer::CallStart;
use crate::zeroshot::{Classification, Classifier, ClassifyOptions};

/// The `clipserve.v1.Embedder` service.
pub struct EmbedderService {
    engine: Arc<Engine>,
    classifier: Arc<Classifier>,
    stream_window: usize,
    closing: tokio::sync::watch::Receiver<bool>,
    faults: Option<Arc<Faults>>,
}

impl EmbedderService {
    /// A service over `engine` (and `classifier` for Classify), holding at most `stream_window` messages of one
    /// stream in flight. When `closing` turns true, open streams stop reading, finish the messages they hold, and
    /// end.
    pub fn new(
        engine: Arc<Engine>,
        classifier: Arc<Classifier>,
        stream_window: usize,
        closing: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        EmbedderService { engine, classifier, stream_window: stream_window.max(1), closing, faults: None }
    }

    /// The same service, failing on purpose as `--inject-faults` plans (tests only).
    pub fn with_faults(mut self, faults: Option<Arc<Faults>>) -> Self {
        self.faults = faults;
        self
    }
}

pin_project_lite::pin_project! {
    /// A handler's future whose panic becomes INTERNAL (INTERNAL_PANIC) for its call alone, counted in
    /// `clipserve_panics_total{stage="grpc"}` and logged once. Uncaught, it would end the task serving the call
    /// (and, for a stream, leave it to end as if it had succeeded).
    struct Guarded<F> {
        #[pin]
        inner: F,
        what: &'static str,
    }
}

impl<F, T> std::future::Future for Guarded<F>
where
    F: std::future::Future<Output = Result<T, Status>>,
{
    type Output = Result<T, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let inner = this.inner;
        match crate::prepare::guard("grpc", format_args!("a call to {}", this.what), || Ok(inner.poll(cx))) {
            Ok(poll) => poll,
            Err(e) => std::task::Poll::Ready(Err(Status::from(e))),
        }
    }
}

/// `future`, with its panics answered INTERNAL (see [`Guarded`]); `what` names the call in the log.
fn guarded<F, T>(what: &'static str, future: F) -> Guarded<F>
where
    F: std::future::Future<Output = Result<T, Status>>,
{
    Guarded { inner: future, what }
}

/// How much earlier than its `grpc-timeout` a call gives up. tonic's server enforces the same header itself from
/// the call's arrival and then answers CANCELLED ("Timeout expired"); giving up first, a millisecond (one tick of
/// the runtime's timer) early, answers DEADLINE_EXCEEDED with its reason instead, as API.md says.
const DEADLINE_MARGIN: Duration = Duration::from_millis(1);

/// The deadline of a call: its `grpc-timeout` counted from the call's arrival (stamped by the request metrics
/// layer; for a unary call that is before its message was read), less [`DEADLINE_MARGIN`].
pub fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
    let arrival = request.extensions().get::<CallStart>().map_or_else(Instant::now, |s| s.0);
    let timeout = timeout_from_metadata(request.metadata())?;
    arrival.checked_add(timeout.saturating_sub(DEADLINE_MARGIN))
}

/// Parses the `grpc-timeout` header (e.g. `250m`, `5S`).
pub fn timeout_from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    deadline::parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)
}

fn to_item(item: pb::Item) -> ItemInput {
    use pb::item::Image;
    ItemInput {
        id: item.id,
        image: item.image.map(|i| match i {
            Image::ImageBytes(b) => ImageSource::Bytes(b),
            Image::ImageUrl(u) => ImageSource::Url(u),
            Image::ImageBase64(s) => ImageSource::Base64(s),
        }),
        text: item.text,
    }
}

fn to_embedding(out: ItemOutput) -> pb::Embedding {
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let t = out.timing;
    pb::Embedding {
        id: out.id,
        image_features: out.image_features.unwrap_or_default(),
        text_features: out.text_features.unwrap_or_default(),
        error: None,
        timing: Some(pb::ItemTiming {
            queue_us: micros(t.queue),
            preprocess_us: micros(t.preprocess),
            inference_us: micros(t.inference),
            cached: t.cached,
        }),
    }
}

/// Names an item in error messages: its index and (the start of) its id.
fn item_label(index: usize, id: &str) -> String {
    format!("item {index} (id {:?})", crate::error::truncate(id, 64))
}

/// Runs one request message whose bytes are held by `budget`: per-item results, in order.
async fn run_request(
    engine: &Engine,
    request: pb::EmbedRequest,
    deadline: Option<Instant>,
    admission: Admission,
    budget: crate::batching::BudgetPermit,
) -> Result<Vec<Result<ItemOutput, Error>>, Error> {
    let items = request.items.into_iter().map(to_item).collect();
    let options = EmbedOptions {
        normalize: request.normalize,
        deadline,
        admission,
        fail_fast: admission == Admission::Reject,
        budget,
        item_label,
    };
    engine.embed(items, options).await
}

type EmbedStreamOut = Pin<Box<dyn Stream<Item = Result<pb::EmbedResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Embedder for EmbedderService {
    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        guarded("Embed", async {
            if let Some(faults) = &self.faults {
                faults.before_embed_call();
            }
            self.embed_unary(request).await
        })
        .await
    }

    type EmbedStreamStream = EmbedStreamOut;

    async fn embed_stream(
        &self,
        request: Request<Streaming<pb::EmbedRequest>>,
    ) -> Result<Response<Self::EmbedStreamStream>, Status> {
        let deadline = deadline_of(&request);
        let inbound = request.into_inner();
        let engine = self.engine.clone();
        let window = self.stream_window;
        let mut closing = self.closing.clone();
        let (tx, rx) = mpsc::channel::<Result<pb::EmbedResponse, Status>>(window);
        let failed = tx.clone();
        let work = async move {
            // On shutdown the stream stops reading; what it already holds is answered, then it ends.
            let closed = Box::pin(async move {
                let _ = closing.wait_for(|c| *c).await;
            });
            // The next message is read only while the memory budget has room: past it, streams stop reading
            // (backpressure through HTTP/2 flow control) instead of decoding and holding more.
            let gated = futures::stream::unfold((inbound, engine.clone()), next_within_budget);
            // `buffered` keeps at most `window` messages in flight and yields their answers in order; it reads
            // no further from the client while the window is full.
            let mut answers = Box::pin(gated)
                .take_until(closed)
                .map(|message| {
                    let engine = engine.clone();
                    async move {
                        let message = message?;
                        metrics::counter!(telemetry::STREAM_MESSAGES).increment(1);
                        // The message's bytes are held against the budget until its inputs are prepared.
                        let size = prost::Message::encoded_len(&message);
                        let budget = engine.budget().acquire(size, Admission::Wait, deadline).await;
                        Ok::<_, Status>(stream_answer(&engine, message, deadline, budget).await)
                    }
                })
                .buffered(window);
            loop {
                let answer = tokio::select! {
                    // The client has gone: dropping `answers` cancels the work in flight.
                    _ = tx.closed() => break,
                    answer = answers.next() => match answer {
                        Some(a) => a,
                        None => break,
                    },
                };
                let end = answer.is_err();
                if tx.send(answer).await.is_err() || end {
                    break;
                }
            }
            Ok(())
        };
        tokio::spawn(async move {
            // A panic ends the stream with INTERNAL rather than as if it had succeeded.
            if let Err(status) = guarded("EmbedStream", work).await {
                let _ = failed.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn info(&self, _request: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        guarded("Info", async {
            let info = self.engine.info();
            Ok(Response::new(pb::InfoResponse {
                model_id: info.model_id.clone(),
                weights: info.weights.clone(),
                embedding_dim: info.embedding_dim as i32,
                device: info.device.clone(),
                dtype: info.dtype.clone(),
                context_length: info.context_length as i32,
                image_size: info.image_size as i32,
            }))
        })
        .await
    }

    async fn classify(&self, request: Request<pb::ClassifyRequest>) -> Result<Response<pb::ClassifyResponse>, Status> {
        guarded("Classify", self.classify_unary(request)).await
    }
}

impl EmbedderService {
    async fn embed_unary(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let deadline = deadline_of(&request);
        let arrival = request.extensions().get::<CallStart>().map_or_else(Instant::now, |s| s.0);
        let request = request.into_inner();
        let size = prost::Message::encoded_len(&request);
        let budget = self.engine.budget().acquire(size, Admission::Reject, deadline).await?;
        // One bad item fails the whole call (fail_fast), with the kind of its error.
        let results = run_request(&self.engine, request, deadline, Admission::Reject, budget).await?;
        let outputs = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        let stages = crate::timing::Stages::of(outputs.iter().map(|o| &o.timing));
        let mut response =
            Response::new(pb::EmbedResponse { embeddings: outputs.into_iter().map(to_embedding).collect() });
        // The call's timings as TEI sends them, in the response headers (the items' own are in their `timing`).
        for (name, value) in crate::timing::headers(arrival, Some(&stages)) {
            if let Ok(value) = value.parse() {
                response.metadata_mut().insert(name, value);
            }
        }
        Ok(response)
    }
}

impl EmbedderService {
    async fn classify_unary(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let size = prost::Message::encoded_len(&request);
        let budget = self.engine.budget().acquire(size, Admission::Reject, deadline).await?;
        let pb::ClassifyRequest { images, labels, template } = request;
        let images = images.into_iter().map(to_item).collect();
        let options = ClassifyOptions { deadline, budget, item_label };
        let answers = self.classifier.classify(images, &labels, template.as_deref(), options).await?;
        Ok(Response::new(pb::ClassifyResponse {
            classifications: answers.into_iter().map(to_classification).collect(),
            scale: self.classifier.scale() as f32,
        }))
    }
}

fn to_classification(c: Classification) -> pb::Classification {
    pb::Classification { id: c.id, probs: c.probs, scores: c.scores }
}

type Inbound = (Streaming<pb::EmbedRequest>, Arc<Engine>);

/// The next message of a stream, read once the memory budget has room.
async fn next_within_budget((mut inbound, engine): Inbound) -> Option<(Result<pb::EmbedRequest, Status>, Inbound)> {
    engine.budget().wait_for_room().await;
    let message = inbound.next().await?;
    Some((message, (inbound, engine)))
}

/// One stream message's answer: each item its embedding or its own error; a message-level failure (e.g. too
/// many items) becomes the error of each of its items, so the stream goes on.
async fn stream_answer(
    engine: &Engine,
    message: pb::EmbedRequest,
    deadline: Option<Instant>,
    budget: Result<crate::batching::BudgetPermit, Error>,
) -> pb::EmbedResponse {
    // The ids are kept for the answer; the message's bytes move on to the CPU pool.
    let ids: Vec<String> = message.items.iter().map(|i| i.id.clone()).collect();
    let results = match budget {
        Ok(budget) => run_request(engine, message, deadline, Admission::Wait, budget).await,
        Err(e) => Err(e),
    };
    let embeddings = match results {
        Ok(results) => results
            .into_iter()
            .zip(ids)
            .enumerate()
            .map(|(index, (r, id))| match r {
                Ok(out) => to_embedding(out),
                Err(e) => {
                    let e = e.context(item_label(index, &id));
                    error_embedding(id, e)
                }
            })
            .collect(),
        Err(e) => ids.into_iter().map(|id| error_embedding(id, e.clone())).collect(),
    };
    pb::EmbedResponse { embeddings }
}

fn error_embedding(id: String, e: Error) -> pb::Embedding {
    pb::Embedding {
        id,
        image_features: Vec::new(),
        text_features: Vec::new(),
        error: Some(pb::ItemError {
            code: e.grpc_code() as i32,
            message: e.message().into_owned(),
            reason: e.reason().as_str().to_string(),
        }),
        timing: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;

    #[test]
    fn grpc_timeout_header() {
        let mut m = MetadataMap::new();
        assert!(timeout_from_metadata(&m).is_none());
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(timeout_from_metadata(&m), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(timeout_from_metadata(&m), Some(Duration::from_secs(2)));
        m.insert("grpc-timeout", "7u".parse().unwrap());
        assert_eq!(timeout_from_metadata(&m), Some(Duration::from_micros(7)));
        m.insert("grpc-timeout", "xx".parse().unwrap());
        assert!(timeout_from_metadata(&m).is_none());
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_internal_panic_for_its_call_only() {
        let panicking = guarded("Test", async {
            tokio::task::yield_now().await; // panic on a later poll, as a handler deep in its work would
            if std::hint::black_box(true) {
                panic!("boom");
            }
            Ok::<u32, Status>(1)
        });
        let status = panicking.await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(crate::error::status_reason(&status).as_deref(), Some("INTERNAL_PANIC"));
        assert!(!status.message().contains("boom"), "the panic's text is logged, not sent: {}", status.message());
        assert_eq!(guarded("Test", async { Ok::<u32, Status>(2) }).await.unwrap(), 2);
    }

    #[test]
    fn the_deadline_counts_from_the_calls_arrival() {
        let mut request = Request::new(());
        assert!(deadline_of(&request).is_none());
        request.metadata_mut().insert("grpc-timeout", "250m".parse().unwrap());
        let arrival = Instant::now() - Duration::from_millis(100);
        request.extensions_mut().insert(CallStart(arrival));
        assert_eq!(deadline_of(&request), Some(arrival + Duration::from_millis(249)));
        // Without the layer's stamp: from now.
        let mut request = Request::new(());
        request.metadata_mut().insert("grpc-timeout", "250m".parse().unwrap());
        let d = deadline_of(&request).unwrap() - Instant::now();
        assert!(d <= Duration::from_millis(249) && d > Duration::from_millis(200));
    }
}
