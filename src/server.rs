//! `clipserve serve`: wires the model, the engine and the gRPC service together, and runs them until a signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

use crate::auth::ApiKey;
use crate::batching::{Batcher, BatcherConfig};
use crate::config::ServeArgs;
use crate::engine::{Engine, EngineParts, Limits, ModelInfo};
use crate::grpc::EmbedderService;
use crate::inputs::fetch::{AddressPolicy, FetchConfig, UrlFetcher};
use crate::inputs::image::ImagePreprocessor;
use crate::inputs::text::ClipTokenizer;
use crate::metrics::layer::RequestMetricsLayer;
use crate::model::faults::Faults;
use crate::model::{device, Manifest, ModelPool, PoolConfig, WorkerHealth};
use crate::pb;
use crate::pb::embedder_server::EmbedderServer;

/// Runs the server until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Panics in guarded work are caught, counted and logged once by the code that catches them.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !crate::prepare::in_guarded_work() {
            default_hook(info);
        }
    }));
    let manifest = Manifest::load(&args.model)?;
    if manifest.is_random() {
        tracing::warn!(
            weights = %manifest.weights,
            "model {} has RANDOM weights: its embeddings carry no meaning (export with hub access for the real ones)",
            manifest.model_id
        );
    }
    let devices = device::parse_devices(&args.device)?;
    let faults = args.inject_faults.clone().map(|plan| Arc::new(Faults::new(plan)));
    let pool_config = PoolConfig {
        model_dir: args.model.clone(),
        devices: devices.clone(),
        workers_per_device: args.workers_per_device,
        fp16: args.fp16,
        torch_threads: args.torch_threads,
        faults: faults.clone(),
    };
    let info = ModelInfo {
        model_id: manifest.model_id.clone(),
        weights: manifest.weights.clone(),
        embedding_dim: manifest.embedding_dim,
        device: devices.iter().map(|d| device::device_name(*d)).collect::<Vec<_>>().join(","),
        dtype: pool_config.dtype_on(devices[0]).to_string(),
        context_length: manifest.context_length,
        image_size: manifest.image_size,
    };
    let tokenizer =
        ClipTokenizer::load(&args.model.join("tokenizer.json"), manifest.context_length, args.max_text_chars)?;
    let images = ImagePreprocessor {
        size: manifest.image_size,
        mean: manifest.image_mean,
        std: manifest.image_std,
        max_bytes: args.max_image_bytes,
        max_pixels: args.max_image_pixels,
        max_jpeg_scans: args.max_jpeg_scans,
    };
    let batcher = Arc::new(Batcher::new(BatcherConfig {
        max_batch_images: args.max_batch_images.max(1),
        max_batch_texts: args.max_batch_texts.max(1),
        max_batch_delay: args.max_batch_delay,
    }));
    let limits = Limits {
        max_items_per_request: args.max_items_per_request,
        max_queued_items: args.max_queued_items,
        max_id_bytes: args.max_id_bytes,
        url_fetch_concurrency: args.url_fetch_concurrency,
        url_request_timeout: args.url_request_timeout,
        memory_budget_bytes: args.memory_budget_bytes,
    };
    let fetcher = UrlFetcher::new(FetchConfig {
        policy: AddressPolicy { allow_private: args.allow_private_urls, allow: args.allow_url_cidrs.clone() },
        connect_timeout: args.url_connect_timeout,
        timeout: args.url_timeout,
        max_bytes: args.max_image_bytes,
    })?;
    if args.allow_private_urls {
        tracing::warn!("--allow-private-urls: image URLs may reach loopback and private networks");
    }
    let workers = Arc::new(WorkerHealth::default());
    let engine = Arc::new(Engine::new(EngineParts {
        batcher: batcher.clone(),
        images,
        tokenizer,
        fetcher,
        limits,
        cpu_threads: args.cpu_threads,
        info,
        workers: workers.clone(),
        inject_panic_on_text: args.inject_preprocess_panic.clone(),
    })?);
    let classifier = Arc::new(crate::zeroshot::Classifier::new(engine.clone(), classifier_config(&args, &manifest)?));
    if args.inject_preprocess_panic.is_some() {
        tracing::warn!("--inject-preprocess-panic is set: a text will panic on purpose (testing only)");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(args, engine, classifier, batcher, manifest, pool_config, workers))
}

/// Zero-shot classification's settings: the flags, and the logit scale of the model directory.
fn classifier_config(args: &ServeArgs, manifest: &Manifest) -> anyhow::Result<crate::zeroshot::ClassifierConfig> {
    use crate::zeroshot::{Template, DEFAULT_SCALE};
    let default_template = Template::parse(&args.zero_shot_template)
        .map_err(|e| anyhow::anyhow!("--zero-shot-template: {}", e.message()))?;
    anyhow::ensure!(args.max_labels > 0, "--max-labels must be at least 1");
    let scale = match manifest.logit_scale {
        Some(logit_scale) => logit_scale.exp(),
        None => {
            tracing::warn!(
                model = %args.model.display(),
                "manifest.json has no logit_scale (exported before zero-shot classification was served): zero-shot \
                 probabilities use CLIP's trained scale of {DEFAULT_SCALE}, right for OpenAI's checkpoints; \
                 re-export the model (deploy/export_model.py) to use the checkpoint's own"
            );
            DEFAULT_SCALE
        }
    };
    tracing::info!(scale, template = %args.zero_shot_template, azure_task = ?args.azure_task, "zero-shot classification");
    Ok(crate::zeroshot::ClassifierConfig {
        scale,
        max_labels: args.max_labels,
        default_template,
        cache_bytes: args.label_cache_bytes,
    })
}

async fn serve(
    args: ServeArgs,
    engine: Arc<Engine>,
    classifier: Arc<crate::zeroshot::Classifier>,
    batcher: Arc<Batcher>,
    manifest: Manifest,
    pool_config: PoolConfig,
    workers: Arc<WorkerHealth>,
) -> anyhow::Result<()> {
    let metrics = crate::metrics::install()?;
    // Gauges exist from the start (an autoscaler reads queue depth before the first request).
    metrics::gauge!(crate::metrics::READY).set(0.0);
    metrics::gauge!(crate::metrics::ADMITTED_ITEMS).set(0.0);
    for modality in ["image", "text"] {
        metrics::gauge!(crate::metrics::QUEUE_DEPTH, "modality" => modality).set(0.0);
    }
    metrics::counter!(crate::metrics::LABEL_CACHE_HITS).absolute(0);
    metrics::counter!(crate::metrics::LABEL_CACHE_MISSES).absolute(0);
    metrics::gauge!(crate::metrics::LABEL_CACHE_ENTRIES).set(0.0);
    metrics::gauge!(crate::metrics::LABEL_CACHE_BYTES).set(0.0);
    let (max_http, max_grpc) =
        crate::http::listener::fit_file_limit(args.max_http_connections, args.max_grpc_connections);
    let connection_limits = |max_connections| crate::http::listener::ConnectionLimits {
        max_connections,
        header_timeout: args.http_header_timeout,
        idle_timeout: args.http_idle_timeout,
    };
    let listener = TcpListener::bind(args.grpc_addr).await.with_context(|| format!("binding {}", args.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    let http_listener =
        TcpListener::bind(args.http_addr).await.with_context(|| format!("binding {}", args.http_addr))?;
    let http_addr = http_listener.local_addr()?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<EmbedderServer<EmbedderService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let api_key = ApiKey::new(args.api_key.clone());
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let embedder = InterceptedService::new(
        EmbedderServer::new(
            EmbedderService::new(engine.clone(), classifier.clone(), args.stream_window, closing_rx)
                .with_faults(pool_config.faults.clone()),
        )
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes),
        crate::auth::grpc_interceptor(api_key.clone()),
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut grpc_server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(RequestMetricsLayer::grpc())
            .add_service(health_service)
            .add_service(reflection)
            .add_service(embedder)
            .serve_with_incoming_shutdown(
                crate::http::listener::grpc_incoming(listener, connection_limits(max_grpc)),
                stopped(stop_rx.clone()),
            ),
    );
    let app = crate::http::router(crate::http::HttpState {
        engine: engine.clone(),
        classifier,
        azure_task: args.azure_task,
        metrics,
        max_request_bytes: args.max_request_bytes,
        api_key,
        max_text_chars: args.max_text_chars,
        body_timeout: args.http_body_timeout,
        budget_wait: args.http_budget_wait,
    })
    .layer(RequestMetricsLayer::http());
    let mut http_server = tokio::spawn(crate::http::listener::serve_http(
        http_listener,
        app,
        connection_limits(max_http),
        stopped(stop_rx),
    ));
    // The one line scripts and tests look for.
    eprintln!("listening grpc={grpc_addr} http={http_addr}");
    tracing::info!(%grpc_addr, %http_addr, model = %args.model.display(), "serving; loading the model");

    // Load and warm up the model off the runtime; health turns SERVING once every worker is ready.
    let loading = {
        let (batcher, workers) = (batcher.clone(), workers.clone());
        tokio::task::spawn_blocking(move || ModelPool::start(&pool_config, &manifest, batcher, workers))
    };
    let pool = tokio::select! {
        loaded = loading => loaded.context("model loader")?.context("loading the model")?,
        _ = shutdown_signal() => {
            tracing::info!("signal received while loading; exiting");
            return Ok(());
        }
    };
    engine.set_ready();
    let info = engine.info();
    tracing::info!(
        model_id = %info.model_id, weights = %info.weights, device = %info.device, dtype = %info.dtype,
        "ready"
    );
    // Health follows the engine: SERVING while it accepts work (workers alive, not draining).
    let reporter = {
        let (engine, health) = (engine.clone(), health.clone());
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let serving = engine.is_ready();
                if last != Some(serving) {
                    if serving {
                        health.set_serving::<EmbedderServer<EmbedderService>>().await;
                    } else {
                        health.set_not_serving::<EmbedderServer<EmbedderService>>().await;
                    }
                    metrics::gauge!(crate::metrics::READY).set(if serving { 1.0 } else { 0.0 });
                    last = Some(serving);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    tokio::select! {
        result = &mut grpc_server => {
            result.context("gRPC server task")?.context("gRPC server")?;
            anyhow::bail!("gRPC server stopped unexpectedly");
        }
        result = &mut http_server => {
            result.context("HTTP server task")?.context("HTTP server")?;
            anyhow::bail!("HTTP server stopped unexpectedly");
        }
        _ = shutdown_signal() => {}
    }

    // Graceful shutdown: not ready at once (listeners stay open so probes see 503 / NOT_SERVING and new work gets
    // UNAVAILABLE), admitted work finishes and is delivered, then open streams end and the listeners close.
    let deadline = tokio::time::Instant::now() + args.shutdown_timeout;
    tracing::info!(timeout = ?args.shutdown_timeout, in_flight = engine.in_flight(), "shutting down: draining");
    engine.start_draining();
    reporter.abort();
    health.set_not_serving::<EmbedderServer<EmbedderService>>().await;
    metrics::gauge!(crate::metrics::READY).set(0.0);
    while engine.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = closing_tx.send(true);
    let _ = stop_tx.send(true);
    let servers = async {
        let _ = (&mut grpc_server).await;
        let _ = (&mut http_server).await;
    };
    if tokio::time::timeout_at(deadline, servers).await.is_err() {
        tracing::warn!(in_flight = engine.in_flight(), "shutdown timeout reached with calls still open; exiting");
        grpc_server.abort();
        http_server.abort();
    }
    batcher.close();
    engine.close();
    let join = tokio::task::spawn_blocking(move || pool.join());
    let _ = tokio::time::timeout_at(deadline.max(tokio::time::Instant::now() + Duration::from_secs(1)), join).await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
