//! The HTTP listener: liveness, readiness and Prometheus metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::engine::Engine;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub engine: Arc<Engine>,
    pub metrics: PrometheusHandle,
}

/// The routes of the HTTP listener.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(live))
        .route("/health", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
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
