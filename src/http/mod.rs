//! The HTTP gateway: the Azure ML `/score` and MLflow `/invocations` requests (answered as the embeddings or the
//! zero-shot classification endpoint, `--azure-task`) and the OpenAI embeddings API (`/v1/embeddings`,
//! `/v1/models`) on the same batching path as gRPC, liveness, readiness (and MLflow's `/ping` and `/version`) and
//! Prometheus metrics.

pub mod azure;
pub mod listener;
pub mod mlflow;
pub mod openai;
mod panic;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::HttpBody;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::batching::BudgetPermit;
use crate::config::AzureTask;
use crate::engine::{Admission, EmbedOptions, Engine};
use crate::error::{Error, Reason};
use crate::telemetry::layer::CallStart;
use crate::timing::Stages;
use crate::zeroshot::{Classifier, ClassifyOptions};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub engine: Arc<Engine>,
    /// Zero-shot classification, for the `zero-shot-image-classification` flavour.
    pub classifier: Arc<Classifier>,
    /// What `/score` and `/invocations` answer.
    pub azure_task: AzureTask,
    pub metrics: PrometheusHandle,
    /// Largest request body accepted (413 past it).
    pub max_request_bytes: usize,
    /// Checked on the scoring routes.
    pub api_key: crate::auth::ApiKey,
    /// Longest text cell, in characters (413 past it, found while the body is parsed).
    pub max_text_chars: usize,
    /// Time allowed to receive a whole request body (408 past it).
    pub body_timeout: Duration,
    /// How long a body waits for room in the memory budget before it is refused (429).
    pub budget_wait: Duration,
}

/// The routes of the HTTP listener. A panic in a handler answers that call with 500 INTERNAL_PANIC.
pub fn router(state: HttpState) -> Router {
    use axum::middleware::from_fn_with_state;
    use tower::layer::layer_fn;
    let score = Router::new()
        .route("/score", post(score))
        .route_layer(from_fn_with_state((state.clone(), Protocol::Azure), authorize));
    let invocations = Router::new()
        .route("/invocations", post(invocations))
        .route_layer(from_fn_with_state((state.clone(), Protocol::Mlflow), authorize))
        .route_layer(layer_fn(|inner| panic::CatchPanic(inner, mlflow::error_response)));
    // OpenAI's routes answer every error in OpenAI's shape, the API key's and a caught panic's included.
    openai::created();
    let openai = Router::new()
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{*id}", get(openai::model))
        .route_layer(from_fn_with_state(state.clone(), openai::authorize))
        .route_layer(layer_fn(|inner| panic::CatchPanic(inner, openai::error_response)));
    Router::new()
        .route("/", get(live))
        .route("/health", get(live))
        .route("/ready", get(ready))
        .route("/ping", get(ping))
        .route("/version", get(version))
        .route("/metrics", get(prometheus_metrics))
        .merge(score)
        .merge(invocations)
        .merge(openai)
        .with_state(state)
        .layer(layer_fn(|inner| panic::CatchPanic(inner, Error::into_response)))
}

/// The routes of the plaintext health listener (`--health-addr`): liveness, readiness and metrics, nothing that
/// scores.
pub fn probe_router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(live))
        .route("/health", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(prometheus_metrics))
        .with_state(state)
        .layer(tower::layer::layer_fn(|inner| panic::CatchPanic(inner, Error::into_response)))
}

/// Rejects scoring requests without the API key (when one is configured) before their body is read.
async fn authorize(
    State((state, protocol)): State<(HttpState, Protocol)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.api_key.check(header) {
        Ok(()) => next.run(request).await,
        Err(e) => protocol.fail(e.into()),
    }
}

/// The protocol of a scoring route: how its body is read and its answers and errors are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// `/score`: the Azure ML `input_data` JSON; a bare list of rows; errors `{"error", "reason"}`.
    Azure,
    /// `/invocations`: MLflow's JSON forms and CSV; `{"predictions": rows}`; errors
    /// `{"error_code", "message", "reason"}`.
    Mlflow,
}

impl Protocol {
    /// The answer to a call: its rows, made in one place for both protocols ([`run_frame`]), as this protocol
    /// wraps them.
    fn answer<R: serde::Serialize>(self, rows: Vec<R>) -> Response {
        match self {
            Protocol::Azure => Json(rows).into_response(),
            Protocol::Mlflow => Json(mlflow::Predictions { predictions: rows }).into_response(),
        }
    }

    /// The answer to a call that failed.
    fn fail(self, failure: Failure) -> Response {
        let mut response = match self {
            Protocol::Azure => failure.error.into_response(),
            Protocol::Mlflow => mlflow::error_response(failure.error),
        };
        if let Some(status) = failure.status {
            *response.status_mut() = status;
        }
        if failure.close {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// A scoring call that failed: the error, the status when it is not the one of the error's kind (408, 415), and
/// whether the connection is closed after the answer (when the body was not read to its end).
struct Failure {
    error: Error,
    status: Option<StatusCode>,
    close: bool,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure { error, status: None, close: false }
    }
}

/// An error as the gateway renders it: the status of API.md's table and `{"error": "...", "reason": "..."}`.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(serde_json::json!({ "error": self.message(), "reason": self.reason().as_str() }))).into_response()
    }
}

/// `response` with a call's timings in its headers (see [`crate::timing`]): the call's own time since `arrival`,
/// and its items' stages when they are known.
fn with_timing(mut response: Response, arrival: Instant, stages: Option<&Stages>) -> Response {
    for (name, value) in crate::timing::headers(arrival, stages) {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// When the metrics layer saw the call arrive (now, without it).
fn arrival(request: &Request) -> Instant {
    request.extensions().get::<CallStart>().map_or_else(Instant::now, |s| s.0)
}

const SCORE_KEYS: &[&str] = &["input_data", "dataframe_split"];

async fn score(State(state): State<HttpState>, request: Request) -> Response {
    embed_frame(&state, request, Protocol::Azure).await
}

async fn invocations(State(state): State<HttpState>, request: Request) -> Response {
    embed_frame(&state, request, Protocol::Mlflow).await
}

async fn embed_frame(state: &HttpState, request: Request, protocol: Protocol) -> Response {
    // Counted (clipserve_requests_total) by the request metrics layer around the router.
    let arrival = arrival(&request);
    match run_frame(state, request, protocol).await {
        Ok((rows, stages)) => with_timing(protocol.answer(rows), arrival, stages.as_ref()),
        Err(failure) => protocol.fail(failure),
    }
}

/// How a scoring body is parsed.
#[derive(Debug, Clone, Copy)]
enum BodyKind {
    Azure,
    MlflowJson,
    MlflowCsv,
}

/// Runs a scoring call: reads and parses its body, embeds its rows, and makes the answer's rows (one per row, in
/// row order, only the keys the row asked for), whatever the protocol, with the stages of its items' time when
/// they are known.
async fn run_frame(
    state: &HttpState,
    request: Request,
    protocol: Protocol,
) -> Result<(Vec<azure::AnswerRow>, Option<Stages>), Failure> {
    let kind = match protocol {
        Protocol::Azure => BodyKind::Azure,
        // The body is not read when its type is refused: the connection closes after the answer.
        Protocol::Mlflow => match mlflow::media(request.headers().get(header::CONTENT_TYPE)) {
            Ok(mlflow::Media::Json) => BodyKind::MlflowJson,
            Ok(mlflow::Media::Csv) => BodyKind::MlflowCsv,
            Err(error) => return Err(Failure { error, status: Some(StatusCode::UNSUPPORTED_MEDIA_TYPE), close: true }),
        },
    };
    let (body, budget) = read_body(state, request).await?;
    let limits = azure::ParseLimits {
        max_items: state.engine.limits().max_items_per_request,
        max_text_chars: state.max_text_chars,
    };
    // The zero-shot endpoint's own sample request leaves the text out of the rows after the first.
    let rows = match state.azure_task {
        AzureTask::Embeddings => azure::RowWidth::Exact,
        AzureTask::ZeroShotImageClassification => azure::RowWidth::AtMost,
    };
    let request = parse_body(body, kind, limits, rows).await?;
    Ok(answer_rows(state, request, budget).await?)
}

/// The answer's rows for a parsed request, one per row in row order, as the configured flavour answers them, and
/// the stages of the items' time (embeddings; the zero-shot flavour reports only the call's total).
pub async fn answer_rows(
    state: &HttpState,
    request: azure::ScoreRequest,
    budget: BudgetPermit,
) -> Result<(Vec<azure::AnswerRow>, Option<Stages>), Error> {
    let item_label = |row: usize, _: &str| format!("row {row}");
    match state.azure_task {
        AzureTask::Embeddings => {
            let options = EmbedOptions {
                normalize: request.normalize,
                deadline: None,
                admission: Admission::Reject,
                fail_fast: true,
                budget,
                item_label,
            };
            let outputs =
                state.engine.embed(request.items, options).await?.into_iter().collect::<Result<Vec<_>, _>>()?;
            let stages = Stages::of(outputs.iter().map(|o| &o.timing));
            Ok((outputs.into_iter().map(|o| azure::AnswerRow::Embeddings(o.into())).collect(), Some(stages)))
        }
        AzureTask::ZeroShotImageClassification => {
            let mut items = request.items;
            // The labels are the first row's text, comma-separated; the other rows' texts are not used.
            let labels = match items.first() {
                None => return Err(Error::new(Reason::InvalidLabels, "the request has no rows, so no labels")),
                Some(first) => crate::zeroshot::azure_labels(first.text.as_deref().unwrap_or("")),
            };
            if labels.is_empty() {
                return Err(Error::new(
                    Reason::InvalidLabels,
                    "row 0: the text column of the first row must hold the comma-separated labels; it holds none",
                ));
            }
            for item in &mut items {
                item.text = None;
            }
            let options = ClassifyOptions { deadline: None, budget, item_label };
            let answers = state.classifier.classify(items, &labels, None, options).await?;
            let labels = azure::Labels(labels.into());
            let rows = answers
                .into_iter()
                .map(|a| azure::AnswerRow::ZeroShot(azure::ZeroShotRow { probs: a.probs, labels: labels.clone() }))
                .collect();
            Ok((rows, None))
        }
    }
}

/// The smallest step by which a body of unknown length is charged to the memory budget.
const BUDGET_STEP: usize = 64 << 10;

/// Reads a request body within its limits: 413 at once when its declared length is over `max_request_bytes`, or
/// as soon as the bytes received pass it; 408 when it takes longer than `body_timeout`. Its bytes are held against
/// the memory budget before they are read (429 if there is no room within `budget_wait`); the permit is returned
/// with the body, to be held until the request's inputs are prepared.
async fn read_body(state: &HttpState, request: Request) -> Result<(Vec<u8>, BudgetPermit), Failure> {
    let max = state.max_request_bytes;
    let deadline = Instant::now() + state.body_timeout;
    let too_large =
        || refuse(Error::new(Reason::RequestTooLarge, format!("request body exceeds the limit of {max} bytes")));
    let body = request.into_body();
    let declared = body.size_hint().exact().and_then(|n| usize::try_from(n).ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let budget = state.engine.budget();
    let charge = |bytes: usize| {
        let wait = (Instant::now() + state.budget_wait).min(deadline);
        async move { budget.acquire(bytes, Admission::Wait, Some(wait)).await.map_err(refuse) }
    };
    let mut held = declared.unwrap_or(0);
    let mut permit = if held > 0 { charge(held).await? } else { BudgetPermit::none() };
    let mut bytes = Vec::with_capacity(held);
    let mut chunks = body.into_data_stream();
    loop {
        let chunk = match tokio::time::timeout_at(deadline.into(), chunks.next()).await {
            Err(_) => return Err(timed_out(state.body_timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(refuse(bad_body(e))),
            Ok(Some(Ok(chunk))) => chunk,
        };
        let len = bytes.len() + chunk.len();
        if len > max {
            return Err(too_large());
        }
        if len > held {
            // A body of unknown length is charged in doubling steps, before the bytes are kept.
            let want = len.max(held * 2).max(BUDGET_STEP).min(max);
            permit.merge(charge(want - held).await?);
            bytes.reserve_exact(want - bytes.len());
            held = want;
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok((bytes, permit))
}

fn bad_body(e: axum::Error) -> Error {
    Error::new(Reason::MalformedRequest, format!("cannot read the request body: {e}"))
}

/// An error answered before the body was read to its end: the connection is closed after it.
fn refuse(error: Error) -> Failure {
    Failure { error, status: None, close: true }
}

/// 408 for a body that did not arrive in time.
fn timed_out(limit: Duration) -> Failure {
    let e = Error::new(Reason::MalformedRequest, format!("the request body did not arrive within {limit:?}"));
    Failure { status: Some(StatusCode::REQUEST_TIMEOUT), ..refuse(e) }
}

/// Bodies up to this size are parsed on the runtime; larger ones on a blocking thread.
const PARSE_INLINE_BYTES: usize = 256 << 10;

/// Parses a body (a panic in the parser answers INTERNAL_PANIC). The body is freed once parsed.
async fn parse_body(
    body: Vec<u8>,
    kind: BodyKind,
    limits: azure::ParseLimits,
    rows: azure::RowWidth,
) -> Result<azure::ScoreRequest, Error> {
    let inline = body.len() <= PARSE_INLINE_BYTES;
    let parse = move || {
        let mut body = body;
        crate::prepare::guard("http", "a request body", || match kind {
            BodyKind::Azure => azure::parse_rows(&body, SCORE_KEYS, limits, rows),
            BodyKind::MlflowJson => mlflow::parse_json_rows(&mut body, limits, rows),
            BodyKind::MlflowCsv => mlflow::parse_csv(&body, limits),
        })
    };
    if inline {
        return parse();
    }
    tokio::task::spawn_blocking(parse)
        .await
        .unwrap_or_else(|_| Err(Error::new(Reason::ShuttingDown, "server is shutting down")))
}

/// Runs `f` on a body: on the runtime when it is small, else on a blocking thread.
async fn off_runtime<T: Send + 'static>(
    body: Vec<u8>,
    f: impl FnOnce(Vec<u8>) -> T + Send + 'static,
) -> Result<T, Error> {
    if body.len() <= PARSE_INLINE_BYTES {
        return Ok(f(body));
    }
    tokio::task::spawn_blocking(move || f(body))
        .await
        .map_err(|_| Error::new(Reason::ShuttingDown, "server is shutting down"))
}

/// Liveness: 200 while the process serves.
async fn live() -> impl IntoResponse {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], r#"{"status":"ok"}"#)
}

/// Readiness: 200 once the model is loaded and warmed up, 503 before and while draining.
async fn ready(State(state): State<HttpState>) -> impl IntoResponse {
    let (code, body) = if state.engine.is_ready() {
        (StatusCode::OK, r#"{"status":"ready"}"#)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"not ready"}"#)
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

/// MLflow's health check: 200 and a newline once the model is loaded and warmed up (MLflow's own server only
/// listens once its model is loaded), 503 before and while draining.
async fn ping(State(state): State<HttpState>) -> impl IntoResponse {
    let code = if state.engine.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], "\n")
}

/// The server's version, as MLflow's `/version` answers its own: the bare version string.
async fn version() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], env!("CARGO_PKG_VERSION"))
}

async fn prometheus_metrics(State(state): State<HttpState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
