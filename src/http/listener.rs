//! The two listeners' connections: a cap on open connections per listener, an accept loop that outlives accept
//! errors (running out of file descriptors included), and on the HTTP listener the header and idle timeouts that
//! `axum::serve` does not have.
//!
//! HTTP connections are served by hyper-util's connection builder (HTTP/1.1, and HTTP/2 with prior knowledge, as
//! `axum::serve` did), each watched by its own task:
//! - header timeout: a request's headers must be complete within `header_timeout` of their first byte (of the
//!   connection's opening, for its first request). Trickling bytes does not extend it.
//! - idle timeout: a connection with no request being handled and no bytes moving for `idle_timeout` is closed
//!   (HTTP/2: no stream open for that long, pings notwithstanding).
//! - the body timeout is the handlers' (`HttpState::body_timeout`): they read the body themselves.
//!
//! gRPC connections go to tonic through [`grpc_incoming`], which holds each one's place under the cap and closes
//! connections that send nothing within the header timeout.

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
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::error::{Error, Reason};

/// Open connections, by `listener` (http, grpc).
pub const OPEN_CONNECTIONS: &str = "clipserve_open_connections";
/// Connections closed at once because the listener was at its cap, by `listener`.
pub const REFUSED_CONNECTIONS: &str = "clipserve_refused_connections_total";
/// Connections closed by a timeout, by `listener` and `timeout` (header, idle).
pub const TIMED_OUT_CONNECTIONS: &str = "clipserve_timed_out_connections_total";
/// Failed accepts (e.g. out of file descriptors), by `listener`; each is retried after a short pause.
pub const ACCEPT_ERRORS: &str = "clipserve_accept_errors_total";

/// How long an HTTP/2 connection closed by a timeout gets to say goodbye (GOAWAY) before it is dropped.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);
/// File descriptors left to everything but the listeners' connections (model files, image URL fetches, logs).
const RESERVED_FDS: u64 = 256;

/// The limits on one listener's connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Open connections at most; past it new ones are closed at once.
    pub max_connections: usize,
    /// Time for a request's headers, from their first byte (gRPC: for a new connection's first bytes).
    pub header_timeout: Duration,
    /// Time a connection may stay open with no request in flight and no traffic (HTTP only).
    pub idle_timeout: Duration,
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

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets each connection finish its
/// requests (graceful shutdown) and returns once all are closed.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let slots = Slots::new("http", limits.max_connections);
    let mut acceptor =
        Acceptor { listener, slots: slots.clone(), refusal: http_refusal(), last_warning: None, unreported: 0 };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The watcher below times headers from their first byte; hyper's own timer would start at the end of the
    // previous response (an idle timeout in disguise).
    builder.http1().header_read_timeout(None);
    let builder = Arc::new(builder);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            (stream, slot) = acceptor.next() => {
                let connection = serve_connection(builder.clone(), stream, app.clone(), limits.clone(), stop_rx.clone());
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

/// Drives one HTTP connection: its requests, its timeouts, and its part in the graceful shutdown.
async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { io: stream, activity: activity.clone(), sniffed: 0 });
    let service = hyper::service::service_fn({
        let activity = activity.clone();
        move |request: hyper::Request<Incoming>| {
            let in_flight = activity.begin_request();
            let app = app.clone();
            async move {
                let response = tower::ServiceExt::oneshot(app, request.map(Body::new)).await;
                drop(in_flight);
                response
            }
        }
    });
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    let mut stopping = false;
    loop {
        let deadline = activity.deadline(&limits);
        let wake = deadline.map_or_else(|| Instant::now() + Duration::from_secs(3600), |(at, _)| at);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            // The only value ever sent is `true`.
            _ = stop.changed(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = activity.changed.notified() => {}
            _ = tokio::time::sleep_until(wake), if deadline.is_some() => {
                let Some((at, timeout)) = activity.deadline(&limits) else { continue };
                if at > Instant::now() {
                    continue;
                }
                metrics::counter!(TIMED_OUT_CONNECTIONS, "listener" => "http", "timeout" => timeout).increment(1);
                tracing::debug!(timeout, "closing an HTTP connection");
                if activity.protocol() == Protocol::Http2 && !stopping {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(GOAWAY_GRACE, connection.as_mut()).await;
                }
                return;
            }
        }
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
            return Some((self.at(idle_since) + limits.idle_timeout, "idle"));
        }
        match self.first_read.load(Ordering::SeqCst) {
            NEVER => {
                let quiet_since = idle_since.max(self.last_write.load(Ordering::SeqCst));
                Some((self.at(quiet_since) + limits.idle_timeout, "idle"))
            }
            first => Some((self.at(first) + limits.header_timeout, "header")),
        }
    }
}

/// An HTTP connection's socket, reporting its reads and writes to the connection's [`Activity`].
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
    /// Bytes of the HTTP/2 preface matched so far.
    sniffed: usize,
}

impl Watched {
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

impl AsyncRead for Watched {
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

impl AsyncWrite for Watched {
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

/// The gRPC listener's connections for tonic's `serve_with_incoming_shutdown`: each holds its place under the cap
/// until tonic drops it. Accept errors never reach tonic (they are retried here).
pub fn grpc_incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl futures::Stream<Item = Result<GrpcConnection, io::Error>> + Send {
    let acceptor = Acceptor {
        listener,
        slots: Slots::new("grpc", limits.max_connections),
        refusal: b"",
        last_warning: None,
        unreported: 0,
    };
    futures::stream::unfold(acceptor, move |mut acceptor| {
        let first_bytes = limits.header_timeout;
        async move {
            let (io, slot) = acceptor.next().await;
            let deadline = Box::pin(tokio::time::sleep(first_bytes));
            Some((Ok(GrpcConnection { io, first_bytes: Some(deadline), _slot: slot }), acceptor))
        }
    })
}

/// A gRPC connection: closed if it sends nothing within the header timeout of its opening.
pub struct GrpcConnection {
    io: TcpStream,
    first_bytes: Option<Pin<Box<Sleep>>>,
    _slot: Slot,
}

impl tonic::transport::server::Connected for GrpcConnection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for GrpcConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => {
                if let Some(deadline) = &mut this.first_bytes {
                    if deadline.as_mut().poll(cx).is_ready() {
                        this.first_bytes = None;
                        metrics::counter!(TIMED_OUT_CONNECTIONS, "listener" => "grpc", "timeout" => "header")
                            .increment(1);
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no bytes in time")));
                    }
                }
                Poll::Pending
            }
            ready => {
                if buf.filled().len() > before {
                    this.first_bytes = None;
                }
                ready
            }
        }
    }
}

impl AsyncWrite for GrpcConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
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
