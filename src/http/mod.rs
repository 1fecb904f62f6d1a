//! The HTTP gateway: the Azure ML `/score` and MLflow `/invocations` requests on the same batching path as gRPC,
//! liveness, readiness and Prometheus metrics.

pub mod azure;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::batching::BudgetPermit;
use crate::engine::{Admission, EmbedOptions, Engine};
use crate::error::{Error, Reason};
use crate::metrics as m;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub engine: Arc<Engine>,
    pub metrics: PrometheusHandle,
    /// Largest request body accepted (413 past it).
    pub max_request_bytes: usize,
    /// Checked on the scoring routes.
    pub api_key: crate::error::ApiKey,
    /// Longest text cell, in characters (413 past it, found while the body is parsed).
    pub max_text_chars: usize,
}

/// The routes of the HTTP listener.
pub fn router(state: HttpState) -> Router {
    let limit = state.max_request_bytes;
    let scoring = Router::new()
        .route("/score", post(score))
        .route("/invocations", post(invocations))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(limit));
    Router::new()
        .route("/", get(live))
        .route("/health", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(scoring)
        .with_state(state)
}

/// Rejects scoring requests without the API key (when one is configured) before their body is read.
async fn authorize(
    State(state): State<HttpState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.api_key.check(header) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// An error as the gateway renders it: the status of API.md's table and `{"error": "..."}`.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(serde_json::json!({ "error": self.message(), "reason": self.reason().as_str() }))).into_response()
    }
}

async fn score(State(state): State<HttpState>, body: Result<Bytes, BytesRejection>) -> Response {
    embed_frame(&state, body, &["input_data", "dataframe_split"], "score").await
}

async fn invocations(State(state): State<HttpState>, body: Result<Bytes, BytesRejection>) -> Response {
    embed_frame(&state, body, &["dataframe_split", "input_data"], "invocations").await
}

async fn embed_frame(
    state: &HttpState,
    body: Result<Bytes, BytesRejection>,
    frame_keys: &[&str],
    rpc: &'static str,
) -> Response {
    let start = Instant::now();
    let result = run_frame(state, body, frame_keys).await;
    let response = match result {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => e.into_response(),
    };
    let status = response.status();
    let outcome = if status.is_success() { "ok" } else { status.as_str() };
    metrics::counter!(m::REQUESTS, "transport" => "http", "rpc" => rpc, "outcome" => outcome.to_string()).increment(1);
    metrics::histogram!(m::REQUEST_DURATION, "transport" => "http", "rpc" => rpc).record(start.elapsed().as_secs_f64());
    response
}

async fn run_frame(
    state: &HttpState,
    body: Result<Bytes, BytesRejection>,
    frame_keys: &[&str],
) -> Result<Vec<azure::ScoreRow>, Error> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::new(
                Reason::RequestTooLarge,
                format!("request body exceeds the limit of {} bytes", state.max_request_bytes),
            )
        } else {
            Error::new(Reason::MalformedRequest, format!("cannot read the request body: {rejection}"))
        }
    })?;
    let limits = azure::ParseLimits {
        max_items: state.engine.limits().max_items_per_request,
        max_text_chars: state.max_text_chars,
    };
    let request = azure::parse(&body, frame_keys, limits)?;
    let options = EmbedOptions {
        normalize: request.normalize,
        deadline: None,
        admission: Admission::Reject,
        fail_fast: true,
        budget: BudgetPermit::none(),
        item_label: |row, _| format!("row {row}"),
    };
    let results = state.engine.embed(request.items, options).await?;
    results.into_iter().map(|r| r.map(azure::ScoreRow::from)).collect()
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

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
