//! The flags of `clipserve serve`. Every one can also be set through an environment variable `CLIPSERVE_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::duration::parse_duration;

/// Flags of `clipserve serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model directory written by deploy/export_model.py (model.pt, tokenizer.json, manifest.json).
    #[arg(long, env = "CLIPSERVE_MODEL")]
    pub model: PathBuf,

    /// gRPC listen address; port 0 picks a free port (the chosen address is logged on the `listening` line).
    #[arg(long, env = "CLIPSERVE_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// HTTP listen address (health, readiness, metrics); port 0 picks a free port.
    #[arg(long, env = "CLIPSERVE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Devices to run the model on: cpu, cuda, cuda:N, a comma-separated list (cuda:0,cuda:1), or auto
    /// (every visible GPU, else cpu).
    #[arg(long, env = "CLIPSERVE_DEVICE", default_value = "auto")]
    pub device: String,

    /// Model worker threads per device, each with its own copy of the model.
    #[arg(long, env = "CLIPSERVE_WORKERS_PER_DEVICE", default_value_t = 1)]
    pub workers_per_device: usize,

    /// Run the model in float16 on CUDA devices (CPU always runs float32).
    #[arg(long, env = "CLIPSERVE_FP16", default_value_t = true, action = clap::ArgAction::Set)]
    pub fp16: bool,

    /// Most images in one forward pass.
    #[arg(long, env = "CLIPSERVE_MAX_BATCH_IMAGES", default_value_t = 256)]
    pub max_batch_images: usize,

    /// Most texts in one forward pass.
    #[arg(long, env = "CLIPSERVE_MAX_BATCH_TEXTS", default_value_t = 1024)]
    pub max_batch_texts: usize,

    /// How long a free worker may wait for a batch to fill (e.g. "2ms"); 0 never waits while work is queued.
    #[arg(long, env = "CLIPSERVE_MAX_BATCH_DELAY", default_value = "0ms", value_parser = parse_duration)]
    pub max_batch_delay: Duration,

    /// Most items (images plus texts) admitted and not yet answered; past it unary calls get RESOURCE_EXHAUSTED
    /// at once and streams wait.
    #[arg(long, env = "CLIPSERVE_MAX_QUEUED_ITEMS", default_value_t = 4096)]
    pub max_queued_items: usize,

    /// Most items in one request message.
    #[arg(long, env = "CLIPSERVE_MAX_ITEMS_PER_REQUEST", default_value_t = 1024)]
    pub max_items_per_request: usize,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "CLIPSERVE_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub max_message_bytes: usize,

    /// Largest encoded image, in bytes.
    #[arg(long, env = "CLIPSERVE_MAX_IMAGE_BYTES", default_value_t = 20 << 20)]
    pub max_image_bytes: usize,

    /// Most pixels (width x height) an image may claim; checked from its header before decoding.
    #[arg(long, env = "CLIPSERVE_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,

    /// Most scans a JPEG may have (progressive JPEGs have about 10; decoding cost grows with scans x pixels).
    #[arg(long, env = "CLIPSERVE_MAX_JPEG_SCANS", default_value_t = 100)]
    pub max_jpeg_scans: u32,

    /// Longest item id, in bytes (INVALID_ARGUMENT beyond it).
    #[arg(long, env = "CLIPSERVE_MAX_ID_BYTES", default_value_t = 1024)]
    pub max_id_bytes: usize,

    /// Longest text, in characters (texts are truncated to the model's 77 tokens anyway).
    #[arg(long, env = "CLIPSERVE_MAX_TEXT_CHARS", default_value_t = 16_384)]
    pub max_text_chars: usize,

    /// Request messages of one EmbedStream processed at once; the stream reads no further until one completes.
    #[arg(long, env = "CLIPSERVE_STREAM_WINDOW", default_value_t = 16)]
    pub stream_window: usize,

    /// What POST /score and /invocations answer: `embeddings` (image and text features, as the Azure ML CLIP
    /// embeddings endpoint) or `zero-shot-image-classification` (each row's image scored against the
    /// comma-separated labels of the first row's text column, as the Azure ML zero-shot endpoint).
    #[arg(long, env = "CLIPSERVE_AZURE_TASK", value_enum, default_value_t = AzureTask::Embeddings)]
    pub azure_task: AzureTask,

    /// Most labels in one zero-shot request (gRPC Classify and the zero-shot /score); past it 413 /
    /// RESOURCE_EXHAUSTED (TOO_MANY_LABELS).
    #[arg(long, env = "CLIPSERVE_MAX_LABELS", default_value_t = 1024)]
    pub max_labels: usize,

    /// How a zero-shot label becomes the text the model embeds: `{}` is replaced by the label. The default is the
    /// one of transformers' zero-shot-image-classification pipeline; `{}` embeds the labels as they are, as the
    /// Azure ML zero-shot endpoint does. gRPC Classify requests may name their own.
    #[arg(long, env = "CLIPSERVE_ZERO_SHOT_TEMPLATE", default_value = crate::zeroshot::DEFAULT_TEMPLATE)]
    pub zero_shot_template: String,

    /// Bytes of zero-shot label embeddings kept for reuse (about 2.2 KB per label for 512-d embeddings; the
    /// least recently used go first); 0 keeps none.
    #[arg(long, env = "CLIPSERVE_LABEL_CACHE_BYTES", default_value_t = 64 << 20)]
    pub label_cache_bytes: usize,

    /// Allow image URLs that resolve to loopback, private, link-local and other non-public addresses
    /// (tests and closed networks only).
    #[arg(long, env = "CLIPSERVE_ALLOW_PRIVATE_URLS")]
    pub allow_private_urls: bool,

    /// Address ranges image URLs may reach although they are not public, e.g. 10.1.2.0/24 (repeatable).
    #[arg(long = "allow-url-cidr", env = "CLIPSERVE_ALLOW_URL_CIDR", value_delimiter = ',')]
    pub allow_url_cidrs: Vec<ipnet::IpNet>,

    /// Connect timeout for image URLs.
    #[arg(long, env = "CLIPSERVE_URL_CONNECT_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub url_connect_timeout: Duration,

    /// Total time allowed to fetch one image URL, redirects and body included.
    #[arg(long, env = "CLIPSERVE_URL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub url_timeout: Duration,

    /// Total time allowed for all the image URLs of one request (each URL also has --url-timeout).
    #[arg(long, env = "CLIPSERVE_URL_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub url_request_timeout: Duration,

    /// Bytes of request data held at once across all connections: HTTP bodies being read and parsed, gRPC
    /// messages and stream messages waiting for the queue, fetched image bodies. Streams wait (backpressure)
    /// and unary calls get RESOURCE_EXHAUSTED / 429 (MEMORY_BUDGET_EXHAUSTED) past it.
    #[arg(long, env = "CLIPSERVE_MEMORY_BUDGET_BYTES", default_value_t = 1 << 30)]
    pub memory_budget_bytes: usize,

    /// Image URLs of one request fetched at once.
    #[arg(long, env = "CLIPSERVE_URL_FETCH_CONCURRENCY", default_value_t = 8)]
    pub url_fetch_concurrency: usize,

    /// Largest HTTP request body, in bytes (larger ones get 413).
    #[arg(long, env = "CLIPSERVE_MAX_REQUEST_BYTES", default_value_t = 64 << 20)]
    pub max_request_bytes: usize,

    /// Time a client has to send a request's headers on the HTTP listener, from their first byte (from the opening
    /// of the connection for its first request); the connection is closed past it. On the gRPC listener, the time
    /// a new connection has to send its first bytes. With TLS, also the time a handshake may take.
    #[arg(long, env = "CLIPSERVE_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// Time a client has to send a whole request body to /score or /invocations (408 past it).
    #[arg(long, env = "CLIPSERVE_HTTP_BODY_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub http_body_timeout: Duration,

    /// An HTTP connection with no request in flight and no traffic for this long is closed (keep-alive between
    /// requests; HTTP/2 connections with no open stream).
    #[arg(long, env = "CLIPSERVE_HTTP_IDLE_TIMEOUT", default_value = "75s", value_parser = parse_duration)]
    pub http_idle_timeout: Duration,

    /// How long an HTTP request body waits for room in the memory budget before it is refused with 429
    /// (MEMORY_BUDGET_EXHAUSTED).
    #[arg(long, env = "CLIPSERVE_HTTP_BUDGET_WAIT", default_value = "5s", value_parser = parse_duration)]
    pub http_budget_wait: Duration,

    /// Most connections open at once on the HTTP listener; past it new connections get 429 and are closed. Both
    /// caps are lowered at start if together they do not fit under the open-file limit.
    #[arg(long, env = "CLIPSERVE_MAX_HTTP_CONNECTIONS", default_value_t = 4096)]
    pub max_http_connections: usize,

    /// Most connections open at once on the gRPC listener; past it new connections are closed at once.
    #[arg(long, env = "CLIPSERVE_MAX_GRPC_CONNECTIONS", default_value_t = 4096)]
    pub max_grpc_connections: usize,

    /// Serve TLS on both listeners with this certificate chain (PEM, the server's certificate first); needs
    /// --tls-key. The files are watched (see --tls-reload-interval): a renewed certificate is used for new
    /// connections without dropping open ones. Without it both listeners speak plaintext (h2c for gRPC), as meshes
    /// whose sidecars encrypt expect.
    #[arg(long, env = "CLIPSERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    #[arg(long, env = "CLIPSERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: refuse clients (on both listeners) that do not present a certificate signed by one of these CA
    /// certificates (PEM). Needs --tls-cert.
    #[arg(long, env = "CLIPSERVE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// How often the TLS files are checked for changes (size, modification time, inode). A change that does not
    /// load (unreadable, not PEM, key not matching the certificate) keeps the certificate in use and is logged.
    #[arg(long, env = "CLIPSERVE_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,

    /// A plaintext listener for probes and scrapers that cannot speak (mutual) TLS: GET /health, /ready and
    /// /metrics only, never the scoring routes. Off unless set.
    #[arg(long, env = "CLIPSERVE_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,

    /// Connections on both listeners are asked to go away (HTTP/2 GOAWAY, at the first moment with no call in
    /// flight within a tenth of the age; HTTP/1.1: `connection: close` on the next response) after about this
    /// long, so that clients reconnect and spread over replicas added since. Each connection's age is jittered by
    /// up to 10% either way; 0 never recycles.
    #[arg(long, env = "CLIPSERVE_MAX_CONNECTION_AGE", default_value = "5m", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// Time calls in flight on a connection past its --max-connection-age get to finish before it is closed.
    #[arg(long, env = "CLIPSERVE_MAX_CONNECTION_AGE_GRACE", default_value = "1h", value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,

    /// A gRPC connection with no call in flight for this long is asked to go away (GOAWAY); 0 never. (HTTP
    /// connections have --http-idle-timeout.)
    #[arg(long, env = "CLIPSERVE_MAX_CONNECTION_IDLE", default_value = "5m", value_parser = parse_duration)]
    pub max_connection_idle: Duration,

    /// HTTP/2 keepalive: on both listeners, a PING is sent on a connection that has been quiet this long; 0 sends
    /// none.
    #[arg(long, env = "CLIPSERVE_HTTP2_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// A connection whose peer does not answer a keepalive PING within this long is closed.
    #[arg(long, env = "CLIPSERVE_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub http2_keepalive_timeout: Duration,

    /// Require this API key: `Authorization: Bearer KEY` on /score, /invocations and /v1/*, `authorization: Bearer
    /// KEY` metadata on gRPC Embedder calls. Liveness, readiness, metrics and gRPC health stay open.
    #[arg(long, env = "CLIPSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Mebibytes of embeddings the content cache keeps (least recently used first out), keyed by a hash of each
    /// image's bytes or text, so repeated inputs skip preprocessing and the model; identical inputs in flight at
    /// once are computed once. An entry of 512 floats costs about 2.2 KB. 0 disables the cache.
    #[arg(long, env = "CLIPSERVE_CACHE_MB", default_value_t = 64)]
    pub cache_mb: usize,
    /// Image preprocessing: exact (the default) or fast (several times faster on large JPEG photos, pixels
    /// slightly different: the README gives the measured distance).
    #[arg(long, env = "CLIPSERVE_PREPROCESS", value_enum, default_value = "exact")]
    pub preprocess: crate::inputs::image::PreprocessMode,

    /// Threads decoding, preprocessing and tokenizing; 0 means one per core.
    #[arg(long, env = "CLIPSERVE_CPU_THREADS", default_value_t = 0)]
    pub cpu_threads: usize,

    /// On SIGTERM/SIGINT, how long in-flight work may take to finish before the process exits anyway.
    #[arg(long, env = "CLIPSERVE_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Threads libtorch may use inside one CPU forward pass; 0 leaves libtorch's default (one per core).
    #[arg(long, env = "CLIPSERVE_TORCH_THREADS", default_value_t = 0)]
    pub torch_threads: usize,

    /// Testing only: tokenizing exactly this text panics, so that the panic handling of the preprocessing pool
    /// can be tested over the wire. Never set in production.
    #[arg(long, hide = true)]
    pub inject_preprocess_panic: Option<String>,

    /// Tests only: makes the server fail on purpose (model panics, errors and stalls, failed reloads, panicking
    /// handlers), as src/model/faults.rs describes. Hidden, and deliberately without an environment variable.
    #[arg(long, hide = true, value_parser = crate::model::faults::FaultPlan::parse)]
    pub inject_faults: Option<crate::model::faults::FaultPlan>,
}

/// What the Azure ML routes (`/score`, `/invocations`) answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AzureTask {
    /// `[{"image_features": [...], "text_features": [...]}, ...]`: the embeddings endpoint.
    Embeddings,
    /// `[{"probs": [...], "labels": [...]}, ...]`: the zero-shot image classification endpoint.
    ZeroShotImageClassification,
}
