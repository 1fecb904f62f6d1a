//! `clipserve serve`: builds the engine on the model, serves it over gRPC and HTTP, and shuts down gracefully on
//! a signal. [`run`] builds what needs no runtime; [`serve`] then runs the steps in order: bind, start both
//! transports, load the model, report readiness, wait for a signal, drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

use crate::auth::ApiKey;
use crate::batching::{Batcher, BatcherConfig};
use crate::config::ServeArgs;
use crate::engine::{Engine, EngineParts, Limits, ModelInfo};
use crate::grpc::compression::{Encoding, GrpcMessagesLayer};
use crate::grpc::deadline::GrpcDeadlineLayer;
use crate::grpc::EmbedderService;
use crate::http::listener::{ConnectionLimits, ListenerConfig};
use crate::inputs::fetch::{AddressPolicy, FetchConfig, UrlFetcher};
use crate::inputs::image::ImagePreprocessor;
use crate::inputs::text::ClipTokenizer;
use crate::model::faults::Faults;
use crate::model::{device, Manifest, ModelPool, PoolConfig};
use crate::pb;
use crate::pb::embedder_server::EmbedderServer;
use crate::state::{ServerState, Status};
use crate::telemetry::layer::RequestMetricsLayer;
use crate::tls::{Alpn, Tls, TlsFiles};
use crate::zeroshot::Classifier;

/// Connections the health listener takes at once (probes and scrapers).
const HEALTH_CONNECTIONS: usize = 64;

/// The gRPC service whose health `grpc.health.v1` reports.
type Embedder = EmbedderServer<EmbedderService>;

/// What [`run`] builds before the runtime starts, for [`serve`].
struct Parts {
    engine: Arc<Engine>,
    classifier: Arc<Classifier>,
    batcher: Arc<Batcher>,
    manifest: Manifest,
    pool_config: PoolConfig,
    state: Arc<ServerState>,
}

/// Runs the server until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    install_panic_hook();
    let manifest = load_manifest(&args)?;
    let pool_config = pool_config(&args)?;
    let state = Arc::new(ServerState::default());
    let batcher = Arc::new(Batcher::new(BatcherConfig {
        max_batch_images: args.max_batch_images.max(1),
        max_batch_texts: args.max_batch_texts.max(1),
        max_batch_delay: args.max_batch_delay,
    }));
    let engine = Arc::new(build_engine(&args, &manifest, &pool_config, batcher.clone(), state.clone())?);
    match engine.cache_capacity() {
        0 => tracing::info!("content cache disabled"),
        entries => tracing::info!(mib = args.cache_mb, entries, "content cache"),
    }
    let classifier = Arc::new(Classifier::new(engine.clone(), classifier_config(&args, &manifest)?));
    let parts = Parts { engine, classifier, batcher, manifest, pool_config, state };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(args, parts))
}

/// Panics in guarded work are caught, counted and logged once by the code that catches them; others go to the
/// default hook.
fn install_panic_hook() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !crate::prepare::in_guarded_work() {
            default_hook(info);
        }
    }));
}

/// The model directory's manifest, with a warning when its weights are random.
fn load_manifest(args: &ServeArgs) -> anyhow::Result<Manifest> {
    let manifest = Manifest::load(&args.model)?;
    if manifest.is_random() {
        tracing::warn!(
            weights = %manifest.weights,
            "model {} has RANDOM weights: its embeddings carry no meaning (export with hub access for the real ones)",
            manifest.model_id
        );
    }
    Ok(manifest)
}

/// Where and how the model runs: devices, workers, dtype, injected faults.
fn pool_config(args: &ServeArgs) -> anyhow::Result<PoolConfig> {
    Ok(PoolConfig {
        model_dir: args.model.clone(),
        devices: device::parse_devices(&args.device)?,
        workers_per_device: args.workers_per_device,
        fp16: args.fp16,
        torch_threads: args.torch_threads,
        faults: args.inject_faults.clone().map(|plan| Arc::new(Faults::new(plan))),
    })
}

/// The served model as `Info` reports it.
fn model_info(manifest: &Manifest, pool_config: &PoolConfig) -> ModelInfo {
    let devices = &pool_config.devices;
    ModelInfo {
        model_id: manifest.model_id.clone(),
        weights: manifest.weights.clone(),
        embedding_dim: manifest.embedding_dim,
        device: devices.iter().map(|d| device::device_name(*d)).collect::<Vec<_>>().join(","),
        dtype: pool_config.dtype_on(devices[0]).to_string(),
        context_length: manifest.context_length,
        image_size: manifest.image_size,
    }
}

/// The request path shared by both transports: input preparation, limits, URL fetching, feeding `batcher`.
fn build_engine(
    args: &ServeArgs,
    manifest: &Manifest,
    pool_config: &PoolConfig,
    batcher: Arc<Batcher>,
    state: Arc<ServerState>,
) -> anyhow::Result<Engine> {
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
    if args.inject_preprocess_panic.is_some() {
        tracing::warn!("--inject-preprocess-panic is set: a text will panic on purpose (testing only)");
    }
    Engine::new(EngineParts {
        batcher,
        images,
        image_mode: args.preprocess,
        tokenizer,
        fetcher,
        limits,
        cpu_threads: args.cpu_threads,
        info: model_info(manifest, pool_config),
        state,
        inject_panic_on_text: args.inject_preprocess_panic.clone(),
        cache_bytes: crate::cache::mib(args.cache_mb),
    })
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

/// The signals graceful shutdown sends the transports.
struct Shutdown {
    /// Open streams stop reading, answer what they hold and end.
    closing: watch::Sender<bool>,
    /// The listeners stop accepting and the servers finish.
    stop: watch::Sender<bool>,
}

impl Shutdown {
    fn new() -> Self {
        Shutdown { closing: watch::Sender::new(false), stop: watch::Sender::new(false) }
    }

    /// Resolves once the servers are told to stop.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

/// The bound listeners: gRPC, HTTP, and the optional health listener (`--health-addr`).
struct Listeners {
    grpc: TcpListener,
    http: TcpListener,
    health: Option<TcpListener>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    health_addr: Option<SocketAddr>,
}

/// A server task: it ends only when told to stop, or on failure.
type ServerTask = JoinHandle<anyhow::Result<()>>;

async fn serve(args: ServeArgs, parts: Parts) -> anyhow::Result<()> {
    let metrics = install_metrics()?;
    let listeners = bind(&args).await?;
    let (grpc_addr, http_addr, health_addr) = (listeners.grpc_addr, listeners.http_addr, listeners.health_addr);
    let tls = load_tls(&args)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<Embedder>().await;
    let shutdown = Shutdown::new();
    let api_key = ApiKey::new(args.api_key.clone());
    let (max_http, max_grpc) =
        crate::http::listener::fit_file_limit(args.max_http_connections, args.max_grpc_connections);
    let grpc_config = listener_config(&args, &tls, "grpc", max_grpc, nonzero(args.max_connection_idle), Alpn::Grpc);
    let mut grpc_server =
        spawn_grpc(&args, &parts, listeners.grpc, grpc_config, health_service, api_key.clone(), &shutdown)?;
    let http_state = http_state(&args, &parts, metrics, api_key);
    if let Some(listener) = listeners.health {
        let config =
            listener_config(&args, &tls, "health", HEALTH_CONNECTIONS, Some(args.http_idle_timeout), Alpn::Http);
        let app = crate::http::probe_router(http_state.clone()).layer(RequestMetricsLayer::http());
        tokio::spawn(crate::http::listener::serve(listener, app, config, shutdown.stopped()));
    }
    let http_config = listener_config(&args, &tls, "http", max_http, Some(args.http_idle_timeout), Alpn::Http);
    let mut http_server = spawn_http(http_state, listeners.http, http_config, &shutdown);
    // The one line scripts and tests look for.
    match health_addr {
        Some(health) => eprintln!("listening grpc={grpc_addr} http={http_addr} health={health}"),
        None => eprintln!("listening grpc={grpc_addr} http={http_addr}"),
    }
    tracing::info!(
        %grpc_addr, %http_addr, model = %args.model.display(), preprocess = args.preprocess.name(),
        "serving; loading the model"
    );

    let Some(pool) = load_model(&parts).await? else {
        tracing::info!("signal received while loading; exiting");
        return Ok(());
    };
    parts.state.set_loaded();
    let info = parts.engine.info();
    tracing::info!(
        model_id = %info.model_id, weights = %info.weights, device = %info.device, dtype = %info.dtype,
        "ready"
    );
    let reporter = tokio::spawn(report_health(parts.state.subscribe(), health.clone()));

    tokio::select! {
        result = &mut grpc_server => return server_stopped("gRPC", result),
        result = &mut http_server => return server_stopped("HTTP", result),
        _ = shutdown_signal() => {}
    }

    // Graceful shutdown: not ready at once (listeners stay open so probes see 503 / NOT_SERVING and new work gets
    // UNAVAILABLE), admitted work finishes and is delivered, then open streams end and the listeners close.
    let deadline = tokio::time::Instant::now() + args.shutdown_timeout;
    tracing::info!(timeout = ?args.shutdown_timeout, in_flight = parts.engine.in_flight(), "shutting down: draining");
    parts.state.start_draining();
    reporter.abort();
    health.set_not_serving::<Embedder>().await;
    metrics::gauge!(crate::telemetry::READY).set(0.0);
    let _ = tokio::time::timeout_at(deadline, parts.engine.until_idle()).await;
    stop_servers(&shutdown, &mut grpc_server, &mut http_server, deadline, &parts.engine).await;
    parts.batcher.close();
    parts.engine.close();
    let join = tokio::task::spawn_blocking(move || pool.join());
    let _ = tokio::time::timeout_at(deadline.max(tokio::time::Instant::now() + Duration::from_secs(1)), join).await;
    tracing::info!("stopped");
    Ok(())
}

/// Installs the Prometheus recorder; the gauges and counters an autoscaler or dashboard reads exist from the start
/// (queue depth before the first request).
fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let metrics = crate::telemetry::install()?;
    metrics::gauge!(crate::telemetry::READY).set(0.0);
    metrics::gauge!(crate::telemetry::ADMITTED_ITEMS).set(0.0);
    for modality in ["image", "text"] {
        metrics::gauge!(crate::telemetry::QUEUE_DEPTH, "modality" => modality).set(0.0);
    }
    metrics::counter!(crate::telemetry::LABEL_CACHE_HITS).absolute(0);
    metrics::counter!(crate::telemetry::LABEL_CACHE_MISSES).absolute(0);
    metrics::gauge!(crate::telemetry::LABEL_CACHE_ENTRIES).set(0.0);
    metrics::gauge!(crate::telemetry::LABEL_CACHE_BYTES).set(0.0);
    Ok(metrics)
}

/// Binds the listeners (port 0 picks a free port).
async fn bind(args: &ServeArgs) -> anyhow::Result<Listeners> {
    let grpc = TcpListener::bind(args.grpc_addr).await.with_context(|| format!("binding {}", args.grpc_addr))?;
    let http = TcpListener::bind(args.http_addr).await.with_context(|| format!("binding {}", args.http_addr))?;
    let health = match args.health_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?),
        None => None,
    };
    Ok(Listeners {
        grpc_addr: grpc.local_addr()?,
        http_addr: http.local_addr()?,
        health_addr: health.as_ref().map(TcpListener::local_addr).transpose()?,
        grpc,
        http,
        health,
    })
}

/// The TLS configuration of `--tls-cert` and `--tls-key` (and `--tls-client-ca`), reloaded when the files change;
/// None for plaintext.
fn load_tls(args: &ServeArgs) -> anyhow::Result<Option<Arc<Tls>>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        tracing::info!("plaintext on both listeners (no --tls-cert)");
        return Ok(None);
    };
    let files = TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: args.tls_client_ca.clone() };
    let tls = Tls::load(files).context("loading the TLS files")?;
    tokio::spawn(tls.clone().watch(args.tls_reload_interval));
    if tls.mutual() {
        tracing::info!("TLS on both listeners; clients need a certificate of the client CA");
    } else {
        tracing::info!("TLS on both listeners");
    }
    Ok(Some(tls))
}

/// How the listener `name` serves its connections: caps, timeouts, age, keepalive, and TLS (never on the health
/// listener).
fn listener_config(
    args: &ServeArgs,
    tls: &Option<Arc<Tls>>,
    name: &'static str,
    max_connections: usize,
    idle_timeout: Option<Duration>,
    protocols: Alpn,
) -> ListenerConfig {
    ListenerConfig {
        name,
        limits: ConnectionLimits {
            max_connections,
            header_timeout: args.http_header_timeout,
            idle_timeout,
            max_age: nonzero(args.max_connection_age),
            age_grace: args.max_connection_age_grace,
            keepalive_interval: nonzero(args.http2_keepalive_interval),
            keepalive_timeout: args.http2_keepalive_timeout,
        },
        tls: if name == "health" { None } else { tls.clone() },
        protocols,
    }
}

/// `d`, or None for zero (a zero duration turns the setting off).
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Starts the gRPC server: health, reflection and the Embedder service behind the API key. Served per connection
/// like the HTTP listener (see http::listener), so that TLS, connection age, idle and keepalive are the same on both.
fn spawn_grpc(
    args: &ServeArgs,
    parts: &Parts,
    listener: TcpListener,
    config: ListenerConfig,
    health_service: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    api_key: ApiKey,
    shutdown: &Shutdown,
) -> anyhow::Result<ServerTask> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let service = EmbedderService::new(
        parts.engine.clone(),
        parts.classifier.clone(),
        args.stream_window,
        shutdown.closing.subscribe(),
    )
    .with_faults(parts.pool_config.faults.clone());
    let mut embedder_server = EmbedderServer::new(service)
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    // Requests are decompressed before tonic sees them (GrpcMessagesLayer); answers are compressed by tonic in the
    // encoding the layer leaves in `grpc-accept-encoding`. Accepting here only makes tonic list the encodings when it
    // refuses another one.
    for encoding in Encoding::ALL {
        embedder_server = embedder_server.accept_compressed(encoding.tonic()).send_compressed(encoding.tonic());
    }
    let embedder = InterceptedService::new(embedder_server, crate::auth::grpc_interceptor(api_key));
    let app = tonic::service::Routes::new(health_service)
        .add_service(reflection)
        .add_service(embedder)
        .prepare()
        .into_axum_router()
        .layer(GrpcMessagesLayer::new(args.max_message_bytes))
        .layer(GrpcDeadlineLayer)
        .layer(RequestMetricsLayer::grpc());
    let server = crate::http::listener::serve(listener, app, config, shutdown.stopped());
    Ok(tokio::spawn(async move { server.await.context("gRPC listener") }))
}

/// What the HTTP routes share.
fn http_state(args: &ServeArgs, parts: &Parts, metrics: PrometheusHandle, api_key: ApiKey) -> crate::http::HttpState {
    crate::http::HttpState {
        engine: parts.engine.clone(),
        classifier: parts.classifier.clone(),
        azure_task: args.azure_task,
        metrics,
        max_request_bytes: args.max_request_bytes,
        api_key,
        max_text_chars: args.max_text_chars,
        body_timeout: args.http_body_timeout,
        budget_wait: args.http_budget_wait,
    }
}

/// Starts the HTTP gateway: Azure ML, MLflow and OpenAI scoring, health, readiness and metrics.
fn spawn_http(
    state: crate::http::HttpState,
    listener: TcpListener,
    config: ListenerConfig,
    shutdown: &Shutdown,
) -> ServerTask {
    let app = crate::http::router(state).layer(RequestMetricsLayer::http());
    let server = crate::http::listener::serve(listener, app, config, shutdown.stopped());
    tokio::spawn(async move { server.await.context("HTTP listener") })
}

/// Loads and warms up the model off the runtime, every worker of the pool; `None` when a signal came first.
async fn load_model(parts: &Parts) -> anyhow::Result<Option<ModelPool>> {
    let loading = {
        let (config, manifest) = (parts.pool_config.clone(), parts.manifest.clone());
        let (batcher, state) = (parts.batcher.clone(), parts.state.clone());
        tokio::task::spawn_blocking(move || ModelPool::start(&config, &manifest, batcher, state))
    };
    tokio::select! {
        loaded = loading => Ok(Some(loaded.context("model loader")?.context("loading the model")?)),
        _ = shutdown_signal() => Ok(None),
    }
}

/// Makes gRPC health and the `clipserve_ready` gauge follow the server's state: SERVING while it accepts work
/// (loaded, a model worker able to run, not draining). Woken by each change of the state, not by a timer.
async fn report_health(mut status: watch::Receiver<Status>, health: tonic_health::server::HealthReporter) {
    let mut last = None;
    loop {
        let serving = status.borrow_and_update().is_ready();
        if last != Some(serving) {
            if serving {
                health.set_serving::<Embedder>().await;
            } else {
                health.set_not_serving::<Embedder>().await;
            }
            metrics::gauge!(crate::telemetry::READY).set(if serving { 1.0 } else { 0.0 });
            last = Some(serving);
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// A server task that ended before shutdown: its error, or an error saying it stopped.
fn server_stopped(which: &str, result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    result.with_context(|| format!("{which} server task"))??;
    anyhow::bail!("{which} server stopped unexpectedly")
}

/// Ends open streams and stops both listeners; past `deadline` the servers are aborted with calls still open.
async fn stop_servers(
    shutdown: &Shutdown,
    grpc_server: &mut ServerTask,
    http_server: &mut ServerTask,
    deadline: tokio::time::Instant,
    engine: &Engine,
) {
    let _ = shutdown.closing.send(true);
    let _ = shutdown.stop.send(true);
    let servers = async {
        let _ = (&mut *grpc_server).await;
        let _ = (&mut *http_server).await;
    };
    if tokio::time::timeout_at(deadline, servers).await.is_err() {
        tracing::warn!(in_flight = engine.in_flight(), "shutdown timeout reached with calls still open; exiting");
        grpc_server.abort();
        http_server.abort();
    }
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
