//! Prometheus metrics: names (with their units), buckets, and the recorder served on `GET /metrics`.

pub mod layer;

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Calls answered, by `transport` (grpc, http), `rpc` and `outcome` (gRPC: the final status's code name, `ok`,
/// `invalid_argument`, ...; a call abandoned before its status counts as `cancelled`. HTTP: `ok` or the status
/// code). Counted by [`layer::RequestMetricsLayer`].
pub const REQUESTS: &str = "clipserve_requests_total";
/// EmbedStream request messages taken from clients' streams for processing.
pub const STREAM_MESSAGES: &str = "clipserve_stream_messages_total";
/// Time from a call's arrival to its answer, by `transport` and `rpc`.
pub const REQUEST_DURATION: &str = "clipserve_request_duration_seconds";
/// Items waiting for a model worker, by `modality`.
pub const QUEUE_DEPTH: &str = "clipserve_queue_depth";
/// Items admitted and not yet answered (bounded by --max-queued-items).
pub const ADMITTED_ITEMS: &str = "clipserve_admitted_items";
/// Items per forward pass, by `modality`.
pub const BATCH_SIZE: &str = "clipserve_batch_size";
/// Time an item waited in its queue, by `modality`.
pub const QUEUE_DURATION: &str = "clipserve_queue_duration_seconds";
/// Decode + preprocess (images) or tokenize (texts) time per item, by `modality`.
pub const PREPROCESS_DURATION: &str = "clipserve_preprocess_duration_seconds";
/// Forward pass time per batch, by `modality`.
pub const INFERENCE_DURATION: &str = "clipserve_inference_duration_seconds";
/// Items that reached the model, by `modality`.
pub const MODEL_ITEMS: &str = "clipserve_model_items_total";
/// Items dropped before the model, by `reason` (deadline, cancelled).
pub const DROPPED_ITEMS: &str = "clipserve_dropped_items_total";
/// Batches that failed in the model (every item answered INTERNAL), by `modality`.
pub const MODEL_FAILURES: &str = "clipserve_model_failures_total";
/// Bytes of request data held against the memory budget (--memory-budget-bytes).
pub const BUDGET_BYTES: &str = "clipserve_memory_budget_held_bytes";
/// Panics caught and turned into INTERNAL answers, by `stage` (preprocess, tokenize, grpc, http).
pub const PANICS: &str = "clipserve_panics_total";
/// Item and call errors answered, by `reason` (README: "Errors").
pub const ERRORS: &str = "clipserve_errors_total";
/// Inputs answered from the content cache (or from an identical input in flight) without their own preprocessing
/// and forward pass, by `modality`.
pub const CACHE_HITS: &str = "clipserve_cache_hits_total";
/// Inputs looked up in the content cache and computed, by `modality`.
pub const CACHE_MISSES: &str = "clipserve_cache_misses_total";
/// Approximate bytes of embeddings held by the content cache (bounded by --cache-mb).
pub const CACHE_BYTES: &str = "clipserve_cache_bytes";
/// 1 once the model is loaded and warmed up and the server is not draining, else 0.
pub const READY: &str = "clipserve_ready";
/// Zero-shot label texts found in the label embedding cache (or computed meanwhile by another request).
pub const LABEL_CACHE_HITS: &str = "clipserve_label_cache_hits_total";
/// Zero-shot label texts embedded because the cache did not hold them.
pub const LABEL_CACHE_MISSES: &str = "clipserve_label_cache_misses_total";
/// Entries held by the label embedding cache.
pub const LABEL_CACHE_ENTRIES: &str = "clipserve_label_cache_entries";
/// Bytes the label embedding cache's entries are counted as (bounded by --label-cache-bytes).
pub const LABEL_CACHE_BYTES: &str = "clipserve_label_cache_bytes";

/// Installs the global recorder (once per process) and returns the handle that renders it.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let seconds: Vec<f64> = (0..20).map(|i| 0.0001 * 2f64.powi(i)).collect(); // 100us .. ~52s
    let sizes: Vec<f64> = (0..11).map(|i| 2f64.powi(i)).collect(); // 1 .. 1024
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sizes)?
        .install_recorder()?;
    describe();
    let upkeep = handle.clone();
    std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        upkeep.run_upkeep();
    })?;
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS, "Calls answered, by transport, rpc and outcome");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Time from a call's arrival to its answer");
    describe_counter!(STREAM_MESSAGES, "EmbedStream messages taken for processing");
    describe_gauge!(QUEUE_DEPTH, "Items waiting for a model worker, by modality");
    describe_gauge!(ADMITTED_ITEMS, "Items admitted and not yet answered");
    describe_histogram!(BATCH_SIZE, "Items per forward pass, by modality");
    describe_histogram!(QUEUE_DURATION, Unit::Seconds, "Time an item waited in its queue");
    describe_histogram!(PREPROCESS_DURATION, Unit::Seconds, "Decode and preprocess, or tokenize, per item");
    describe_histogram!(INFERENCE_DURATION, Unit::Seconds, "Forward pass time per batch");
    describe_counter!(MODEL_ITEMS, "Items that reached the model, by modality");
    describe_counter!(DROPPED_ITEMS, "Items dropped before the model, by reason");
    describe_counter!(MODEL_FAILURES, "Batches that failed in the model");
    describe_gauge!(READY, "1 while the server accepts work");
    describe_gauge!(BUDGET_BYTES, Unit::Bytes, "Bytes of request data held against the memory budget");
    describe_counter!(PANICS, "Panics caught and answered INTERNAL, by stage");
    describe_counter!(ERRORS, "Errors answered, by reason");
    describe_counter!(CACHE_HITS, "Inputs answered from the content cache, by modality");
    describe_counter!(CACHE_MISSES, "Inputs looked up in the content cache and computed, by modality");
    describe_gauge!(CACHE_BYTES, Unit::Bytes, "Approximate bytes of embeddings held by the content cache");
    describe_counter!(LABEL_CACHE_HITS, "Zero-shot label texts found in the label embedding cache");
    describe_counter!(LABEL_CACHE_MISSES, "Zero-shot label texts embedded because the cache did not hold them");
    describe_gauge!(LABEL_CACHE_ENTRIES, "Entries held by the label embedding cache");
    describe_gauge!(LABEL_CACHE_BYTES, Unit::Bytes, "Bytes held by the label embedding cache");
}

/// The outcome label of a gRPC code: `ok`, `invalid_argument`, ... (the code's name in snake case).
pub fn outcome(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}
