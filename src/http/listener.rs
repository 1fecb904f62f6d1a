//! The listeners' connections (gRPC, HTTP, and the optional plaintext health listener), all served the same way:
//! a cap on open connections per listener, an accept loop that outlives accept errors (running out of file
//! descriptors included), optional TLS, and per-connection timeouts that neither `axum::serve` nor tonic's server
//! have.
//!
//! Each connection is served by hyper-util's connection builder (the HTTP listener: HTTP/1.1 and HTTP/2; the gRPC
//! listener: HTTP/2 only) and watched by its own task:
//! - TLS: the handshake must be done within `header_timeout` of the connection's opening; a client that speaks
//!   plaintext to a TLS listener is refused at once (the HTTP listener answers it 400 in plaintext first). ALPN
//!   offers h2 and http/1.1 on the HTTP listener, h2 on the gRPC listener.
//! - header timeout: a request's headers must be complete within `header_timeout` of their first byte (of the
//!   connection's opening, for its first request; for HTTP/2, the client's preface). Trickling bytes does not
//!   extend it.
//! - idle timeout: a connection with no request in flight and no bytes moving for `idle_timeout` is closed
//!   (HTTP/2: no stream open for that long, pings notwithstanding; GOAWAY first). A request is in flight until its
//!   response body has been sent, so a long gRPC stream keeps its connection busy.
//! - maximum age: after `max_age`, jittered by up to 10% either way per connection so that connections made
//!   together do not all go at once, the connection is asked to go away (HTTP/2 GOAWAY, which lets the calls in
//!   flight finish, sent at the first moment with no call in flight within a tenth of the age; HTTP/1.1:
//!   `connection: close` on the next response) and closed `age_grace` later whatever is left.
//! - HTTP/2 keepalive: a PING after `keepalive_interval` of quiet; a peer that does not answer within
//!   `keepalive_timeout` is gone and its connection closed.
//! - the body timeout is the HTTP handlers' (`HttpState::body_timeout`): they read the body themselves.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::{Error, Reason};
use crate::tls::{Alpn, Tls, TLS_HANDSHAKE_ERRORS};

/// Open connections, by `listener` (http, grpc).
pub const OPEN_CONNECTIONS: &str = "clipserve_open_connections";
/// Connections closed at once because the listener was at its cap, by `listener`.
pub const REFUSED_CONNECTIONS: &str = "clipserve_refused_connections_total";
/// Connections closed by a timeout, by `listener` and `timeout`: `header`, `idle`, `keepalive` (no answer to a
/// PING), `age` (asked to go away at their maximum age), `age_grace` (closed with calls still open, a grace period
/// after that).
pub const TIMED_OUT_CONNECTIONS: &str = "clipserve_timed_out_connections_total";
/// Failed accepts (e.g. out of file descriptors), by `listener`; each is retried after a short pause.
pub const ACCEPT_ERRORS: &str = "clipserve_accept_errors_total";

/// How long an HTTP/2 connection closed by a timeout gets to say goodbye (GOAWAY) before it is dropped.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);
/// Longest a connection past its age waits for a moment with no call in flight before it is asked to go away
/// anyway (at most a tenth of the age).
const MAX_GOAWAY_WAIT: Duration = Duration::from_secs(30);
/// File descriptors left to everything but the listeners' connections (model files, image URL fetches, logs).
const RESERVED_FDS: u64 = 256;

/// The limits on one listener's connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Open connections at most; past it new ones are closed at once.
    pub max_connections: usize,
    /// Time for a TLS handshake, and for a request's headers from their first byte.
    pub header_timeout: Duration,
    /// Time a connection may stay open with no request in flight and no traffic; None: no limit.
    pub idle_timeout: Option<Duration>,
    /// Age after which a connection is asked to go away (jittered per connection); None: no limit.
    pub max_age: Option<Duration>,
    /// Time the calls in flight get after `max_age` before the connection is closed under them.
    pub age_grace: Duration,
    /// HTTP/2 keepalive PING interval; None: no pings.
    pub keepalive_interval: Option<Duration>,
    /// Time a PING has to be answered.
    pub keepalive_timeout: Duration,
}

/// One listener: its name (the `listener` label of the connection metrics), limits, TLS and protocols.
#[derive(Clone)]
pub struct ListenerConfig {
    /// `http`, `grpc` or `health`.
    pub name: &'static str,
    pub limits: ConnectionLimits,
    /// TLS (and mutual TLS) for every connection; None: plaintext.
    pub tls: Option<Arc<Tls>>,
    /// The protocols spoken: [`Alpn::Grpc`] is HTTP/2 only.
    pub protocols: Alpn,
}

/// Raises the soft limit on open files to the hard limit, and fits the two connection caps under it (with room for
/// everything else), so that one listener full of connections cannot leave the other without descriptors.
/// Returns the caps to use.
pub fn fit_file_limit(http: usize, grpc: usize) -> (usize, usize) {
    let Some(limit) = raise_file_limit() else { return (http, grpc) };
    let room = limit.saturating_sub(RESERVED_FDS).max(limit / 2) as usize;
    if http.saturating_add(grpc) <= room {
        return (http, grpc);
    }
    let scale = |n: usize| ((n as u128 * room as u128) / (http as u128 + grpc as u128)).max(1) as usize;
    let (h, g) = (scale(http), scale(grpc));
    tracing::warn!(
        open_files = limit,
        "--max-http-connections {http} and --max-grpc-connections {grpc} do not fit under the open-file limit of \
         {limit}: using {h} and {g}"
    );
    (h, g)
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit; the soft limit now in force, if it could be read.
fn raise_file_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            } else {
                tracing::warn!(soft = limit.rlim_cur, hard = limit.rlim_max, "could not raise the open-file limit");
            }
        }
        Some(if limit.rlim_cur == libc::RLIM_INFINITY { u64::MAX } else { limit.rlim_cur as u64 })
    }
}

/// One listener's cap on open connections.
#[derive(Clone)]
struct Slots {
    listener: &'static str,
    permits: Arc<Semaphore>,
    cap: usize,
}

/// An accepted connection's place under its listener's cap, given back when the connection is dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    listener: &'static str,
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_CONNECTIONS, "listener" => self.listener).decrement(1.0);
    }
}

impl Slots {
    fn new(listener: &'static str, cap: usize) -> Self {
        let cap = cap.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        metrics::gauge!(OPEN_CONNECTIONS, "listener" => listener).set(0.0);
        Slots { listener, permits: Arc::new(Semaphore::new(cap)), cap }
    }

    fn try_take(&self) -> Option<Slot> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        metrics::gauge!(OPEN_CONNECTIONS, "listener" => self.listener).increment(1.0);
        Some(Slot { _permit: permit, listener: self.listener })
    }

    /// Waits until every connection has closed.
    async fn all_closed(&self) {
        let _ = self.permits.acquire_many(self.cap as u32).await;
    }
}

/// Accepts connections for one listener, within its cap.
struct Acceptor {
    listener: TcpListener,
    slots: Slots,
    /// Written (best effort) to a connection refused for the cap before it is closed.
    refusal: &'static [u8],
    last_warning: Option<std::time::Instant>,
    unreported: u64,
}

impl Acceptor {
    /// The next connection that fits under the cap. Connections past the cap are closed at once; failed accepts
    /// are counted, logged (at most once a second) and retried after a pause that grows to a second, so a
    /// listener that runs out of descriptors recovers as soon as some are free again.
    async fn next(&mut self) -> (TcpStream, Slot) {
        let listener = self.slots.listener;
        let mut pause = Duration::from_millis(5);
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    pause = Duration::from_millis(5);
                    if let Some(slot) = self.slots.try_take() {
                        let _ = stream.set_nodelay(true);
                        return (stream, slot);
                    }
                    metrics::counter!(REFUSED_CONNECTIONS, "listener" => listener).increment(1);
                    let cap = self.slots.cap;
                    self.warn(|n| {
                        tracing::warn!(listener, %peer, "connection refused: {cap} connections open already ({n} refused)")
                    });
                    if !self.refusal.is_empty() {
                        let _ = stream.try_write(self.refusal);
                    }
                }
                Err(e) if is_per_connection(&e) => {}
                Err(e) => {
                    metrics::counter!(ACCEPT_ERRORS, "listener" => listener).increment(1);
                    self.warn(
                        |n| tracing::warn!(listener, error = %e, "accept failed ({n} times); retrying in {pause:?}"),
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Runs `log` with the number of events since the last report, at most once a second.
    fn warn(&mut self, log: impl FnOnce(u64)) {
        self.unreported += 1;
        let now = std::time::Instant::now();
        if self.last_warning.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            log(self.unreported);
            self.unreported = 0;
            self.last_warning = Some(now);
        }
    }
}

/// Accept errors that concern one connection only (it was reset before it could be accepted).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
}

/// What a connection refused for the cap on the HTTP listener reads before it is closed.
fn http_refusal() -> &'static [u8] {
    static REFUSAL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    REFUSAL.get_or_init(|| {
        let e = Error::new(Reason::QueueFull, "server has too many open connections; retry later");
        let body = serde_json::json!({ "error": e.message(), "reason": e.reason().as_str() }).to_string();
        format!(
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             retry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
}

/// What a plaintext client of a TLS HTTP listener reads before its connection is closed.
fn plaintext_refusal() -> &'static [u8] {
    static REFUSAL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    REFUSAL.get_or_init(|| {
        let e = Error::new(Reason::MalformedRequest, "this listener speaks TLS: use https://");
        let body = serde_json::json!({ "error": e.message(), "reason": e.reason().as_str() }).to_string();
        format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets each connection finish its
/// requests (graceful shutdown) and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ListenerConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let slots = Slots::new(config.name, config.limits.max_connections);
    // A plaintext HTTP client refused for the cap is told why; a TLS or gRPC client could not read it.
    let refusal = if config.protocols == Alpn::Http && config.tls.is_none() { http_refusal() } else { b"" };
    let mut acceptor = Acceptor { listener, slots: slots.clone(), refusal, last_warning: None, unreported: 0 };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The watcher below times headers from their first byte; hyper's own timer would start at the end of the
    // previous response (an idle timeout in disguise).
    builder.http1().header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    if let Some(interval) = config.limits.keepalive_interval {
        builder.http2().keep_alive_interval(interval).keep_alive_timeout(config.limits.keepalive_timeout);
    }
    if config.protocols == Alpn::Grpc {
        builder = builder.http2_only();
    }
    let builder = Arc::new(builder);
    let config = Arc::new(config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            (stream, slot) = acceptor.next() => {
                let connection = connection(builder.clone(), stream, app.clone(), config.clone(), stop_rx.clone());
                tokio::spawn(async move {
                    connection.await;
                    drop(slot);
                });
            }
        }
    }
    drop(acceptor);
    let _ = stop_tx.send(true);
    slots.all_closed().await;
    Ok(())
}

/// One accepted connection: its TLS handshake, if the listener has TLS, then its requests.
async fn connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    app: Router,
    config: Arc<ListenerConfig>,
    stop: watch::Receiver<bool>,
) {
    let Some(tls) = &config.tls else {
        return serve_connection(builder, stream, app, &config, stop).await;
    };
    let listener = config.name;
    let peer = stream.peer_addr().ok();
    let handshake = async {
        // A TLS client opens with a handshake record (content type 22); anything else is plaintext.
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(1) if first[0] == 0x16 => {}
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {
                if config.protocols == Alpn::Http {
                    refuse_plaintext(stream).await;
                }
                return Err(Some("plaintext"));
            }
        }
        tls.acceptor(config.protocols).accept(stream).await.map_err(|e| {
            tracing::debug!(listener, ?peer, error = %e, "TLS handshake failed");
            Some(crate::tls::handshake_error_kind(&e))
        })
    };
    let error = match tokio::time::timeout(config.limits.header_timeout, handshake).await {
        Ok(Ok(stream)) => return serve_connection(builder, stream, app, &config, stop).await,
        Ok(Err(None)) => return, // closed before saying anything
        Ok(Err(Some(error))) => error,
        Err(_) => "timeout",
    };
    metrics::counter!(TLS_HANDSHAKE_ERRORS, "listener" => listener, "error" => error).increment(1);
}

/// Tells a plaintext HTTP client of a TLS listener to use https, then closes. What it sent is read first (up to
/// 64 KiB), so that closing does not reset the connection before the answer is read.
async fn refuse_plaintext(mut stream: TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    let mut read = 0;
    while read < 64 << 10 {
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => read += n,
            _ => break,
        }
    }
    if stream.write_all(plaintext_refusal()).await.is_ok() {
        let _ = stream.shutdown().await;
        // Until the client has read the answer and closed its side.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// Drives one connection: its requests, its timeouts and age, and its part in the graceful shutdown.
async fn serve_connection<IO>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: IO,
    app: Router,
    config: &ListenerConfig,
    mut stop: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let listener = config.name;
    let limits = &config.limits;
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { io, activity: activity.clone(), sniffed: 0 });
    let service = hyper::service::service_fn({
        let activity = activity.clone();
        move |request: hyper::Request<Incoming>| {
            let in_flight = activity.begin_request();
            let app = app.clone();
            async move {
                let response = tower::ServiceExt::oneshot(app, request.map(Body::new)).await;
                // In flight until the response body has been sent (or dropped): a stream is a call in progress.
                response.map(|r| r.map(|body| Body::new(InFlightBody { body, _in_flight: in_flight })))
            }
        }
    });
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    let mut stopping = false;
    // When this connection reaches its (jittered) age.
    let mut goaway_at = limits.max_age.map(|age| Instant::now() + jittered(age));
    // Once the age is reached: when the client is asked to go away at the latest, and when the connection is
    // closed whatever is left.
    let mut goaway_by: Option<Instant> = None;
    let mut close_at: Option<Instant> = None;
    let later = || Instant::now() + Duration::from_secs(3600);
    loop {
        // Past its age, the client is asked to go away at a moment the connection has no call in flight, if one
        // comes soon (`goaway_by`): clients built on hyper (tonic's channel among them) fail, without sending it,
        // a call they queued just as a GOAWAY arrived on a connection with calls open, and do not retry it. An idle
        // HTTP/1.1 connection is closed with the next response (`connection: close`) rather than under a request
        // the client may be sending at that moment.
        if let (Some(by), false) = (goaway_by, stopping) {
            let idle = activity.in_flight.load(Ordering::SeqCst) == 0;
            let ready = match activity.protocol() {
                Protocol::Http1 => !idle,
                _ => idle || Instant::now() >= by,
            };
            if ready {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
        let pending_goaway = !stopping && goaway_by.is_some_and(|by| by > Instant::now());
        let deadline = activity.deadline(limits);
        let wake = deadline.map_or_else(later, |(at, _)| at);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    if e.downcast_ref::<hyper::Error>().is_some_and(|e| e.is_timeout()) {
                        metrics::counter!(TIMED_OUT_CONNECTIONS, "listener" => listener, "timeout" => "keepalive")
                            .increment(1);
                    }
                    tracing::debug!(listener, error = %e, "connection ended with an error");
                }
                return;
            }
            // The only value ever sent is `true`.
            _ = stop.changed(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = activity.changed.notified() => {}
            _ = tokio::time::sleep_until(goaway_at.unwrap_or_else(later)), if goaway_at.is_some() => {
                goaway_at = None;
                metrics::counter!(TIMED_OUT_CONNECTIONS, "listener" => listener, "timeout" => "age").increment(1);
                tracing::debug!(listener, "connection reached its maximum age: asking the client to go away");
                let age = limits.max_age.unwrap_or_default();
                goaway_by = Some(Instant::now() + (age / 10).min(MAX_GOAWAY_WAIT));
                close_at = Some(Instant::now() + limits.age_grace);
            }
            // Time to ask anyway (HTTP/2); an idle HTTP/1.1 connection waits for its next request.
            _ = tokio::time::sleep_until(goaway_by.unwrap_or_else(later)), if pending_goaway => {}
            _ = tokio::time::sleep_until(close_at.unwrap_or_else(later)), if close_at.is_some() => {
                metrics::counter!(TIMED_OUT_CONNECTIONS, "listener" => listener, "timeout" => "age_grace")
                    .increment(1);
                tracing::debug!(listener, "closing a connection whose calls outlived the maximum age's grace period");
                return;
            }
            _ = tokio::time::sleep_until(wake), if deadline.is_some() => {
                let Some((at, timeout)) = activity.deadline(limits) else { continue };
                if at > Instant::now() {
                    continue;
                }
                metrics::counter!(TIMED_OUT_CONNECTIONS, "listener" => listener, "timeout" => timeout).increment(1);
                tracing::debug!(listener, timeout, "closing a connection");
                if activity.protocol() == Protocol::Http2 && !stopping {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(GOAWAY_GRACE, connection.as_mut()).await;
                }
                return;
            }
        }
    }
}

/// `age` jittered by up to 10% either way, as gRPC servers do, so that connections opened together (a client
/// fleet started at once, or reconnecting after an outage) do not all go away at the same moment.
fn jittered(age: Duration) -> Duration {
    age.mul_f64(rand::random_range(0.9..=1.1))
}

pin_project_lite::pin_project! {
    /// A response body that holds its request's place among the connection's requests in flight until it is
    /// done (sent or dropped).
    struct InFlightBody {
        #[pin]
        body: Body,
        _in_flight: InFlight,
    }
}

impl http_body::Body for InFlightBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Protocol {
    Unknown = 0,
    Http1 = 1,
    Http2 = 2,
}

const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const NEVER: u64 = u64::MAX;

/// What the timeouts of one HTTP connection are computed from. Times are microseconds since `start`.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    /// When the last request in flight finished (or the connection opened).
    idle_since: AtomicU64,
    /// The first byte read while no request was in flight (the start of a request's headers), or NEVER.
    first_read: AtomicU64,
    last_write: AtomicU64,
    protocol: AtomicU8,
    /// Wakes the watcher when a deadline may have moved earlier.
    changed: Notify,
}

/// A request being handled; dropped when its handler has answered.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        if a.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            a.idle_since.store(a.now(), Ordering::SeqCst);
            a.changed.notify_one();
        }
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            // A new connection's first request is timed from the connection's opening.
            first_read: AtomicU64::new(0),
            last_write: AtomicU64::new(0),
            protocol: AtomicU8::new(Protocol::Unknown as u8),
            changed: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn at(&self, micros: u64) -> Instant {
        self.start + Duration::from_micros(micros)
    }

    fn protocol(&self) -> Protocol {
        match self.protocol.load(Ordering::Relaxed) {
            1 => Protocol::Http1,
            2 => Protocol::Http2,
            _ => Protocol::Unknown,
        }
    }

    fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.first_read.store(NEVER, Ordering::SeqCst);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    fn on_read(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0 && self.first_read.load(Ordering::SeqCst) == NEVER {
            self.first_read.store(self.now(), Ordering::SeqCst);
            self.changed.notify_one();
        }
    }

    /// When the connection is to be closed if nothing changes, and which timeout that is; None while a request is
    /// being handled.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, &'static str)> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let idle_since = self.idle_since.load(Ordering::SeqCst);
        if self.protocol() == Protocol::Http2 {
            return limits.idle_timeout.map(|idle| (self.at(idle_since) + idle, "idle"));
        }
        match self.first_read.load(Ordering::SeqCst) {
            NEVER => {
                let quiet_since = idle_since.max(self.last_write.load(Ordering::SeqCst));
                limits.idle_timeout.map(|idle| (self.at(quiet_since) + idle, "idle"))
            }
            first => Some((self.at(first) + limits.header_timeout, "header")),
        }
    }
}

/// A connection's socket (or TLS stream), reporting its reads and writes to the connection's [`Activity`].
struct Watched<IO> {
    io: IO,
    activity: Arc<Activity>,
    /// Bytes of the HTTP/2 preface matched so far.
    sniffed: usize,
}

impl<IO> Watched<IO> {
    fn sniff(&mut self, bytes: &[u8]) {
        let a = &self.activity;
        if a.protocol() != Protocol::Unknown {
            return;
        }
        let want = &HTTP2_PREFACE[self.sniffed..];
        let n = bytes.len().min(want.len());
        if bytes[..n] != want[..n] {
            a.protocol.store(Protocol::Http1 as u8, Ordering::Relaxed);
        } else {
            self.sniffed += n;
            if self.sniffed == HTTP2_PREFACE.len() {
                a.protocol.store(Protocol::Http2 as u8, Ordering::Relaxed);
                a.changed.notify_one();
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.sniff(&buf.filled()[before..]);
            this.activity.on_read();
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.last_write.store(this.activity.now(), Ordering::SeqCst);
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.last_write.store(this.activity.now(), Ordering::SeqCst);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
