//! Request outcomes of both transports, counted in one place: a tower layer around the whole gRPC server and the
//! HTTP router, so that what the handlers never see (API key refusals from the gRPC interceptor and the HTTP
//! middleware, unknown methods, calls the client abandons) is counted too.
//!
//! `clipserve_requests_total{transport,rpc,outcome}` and `clipserve_request_duration_seconds{transport,rpc}` are
//! recorded once per call, from its arrival at the layer to its outcome:
//! - gRPC: the `grpc-status` of the answer, in the response headers for a trailers-only answer (an error before
//!   any message), else in the trailers at the end of the body. A stream's outcome is its final status. A call
//!   whose answer is dropped before its status was sent (the client went away, or the server's own `grpc-timeout`
//!   handling gave up on it) counts as `cancelled`. The rpc label is the method name (`Embed`, `EmbedStream`,
//!   `Info`, `Check`, ...), `other` for a path that names no served method.
//! - HTTP: `ok` for a 2xx status, else the status code (`400`, `401`, ...), when the response starts; the rpc
//!   label is the matched route without its slash (`score`, `invocations`, `ready`, `root` for `/`), `unmatched`
//!   for a path without a route.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use metrics::SharedString;

use crate::telemetry;

/// When a call arrived at the server, as the layer saw it: put in the request's extensions (and so in tonic's
/// `Request::extensions()`), for deadlines that count from the call's arrival.
#[derive(Debug, Clone, Copy)]
pub struct CallStart(pub Instant);

/// Which listener a layer counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Http => "http",
        }
    }
}

/// The layer: `tonic::transport::Server::builder().layer(RequestMetricsLayer::grpc())` and
/// `router.layer(RequestMetricsLayer::http())`.
#[derive(Debug, Clone, Copy)]
pub struct RequestMetricsLayer {
    transport: Transport,
}

impl RequestMetricsLayer {
    /// Counts gRPC calls by method and final `grpc-status`.
    pub fn grpc() -> Self {
        RequestMetricsLayer { transport: Transport::Grpc }
    }

    /// Counts HTTP requests by route and status.
    pub fn http() -> Self {
        RequestMetricsLayer { transport: Transport::Http }
    }
}

impl<S> tower_layer::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics { inner, transport: self.transport }
    }
}

/// The service the layer makes.
#[derive(Debug, Clone)]
pub struct RequestMetrics<S> {
    inner: S,
    transport: Transport,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for RequestMetrics<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let start = Instant::now();
        let rpc = match self.transport {
            Transport::Grpc => grpc_method(request.uri().path()),
            Transport::Http => http_route(&request),
        };
        request.extensions_mut().insert(CallStart(start));
        let call = Call { transport: self.transport, rpc, start, done: false };
        ResponseFuture { inner: self.inner.call(request), call: Some(call) }
    }
}

/// One call being counted; counted `cancelled` if dropped before its outcome was known.
struct Call {
    transport: Transport,
    rpc: SharedString,
    start: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, outcome: impl Into<SharedString>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let transport = self.transport.as_str();
        metrics::counter!(telemetry::REQUESTS, "transport" => transport, "rpc" => self.rpc.clone(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!(telemetry::REQUEST_DURATION, "transport" => transport, "rpc" => self.rpc.clone())
            .record(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(telemetry::outcome(tonic::Code::Cancelled));
    }
}

pin_project_lite::pin_project! {
    /// The inner service's response future, counting the call once the response has started.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let Some(mut call) = this.call.take() else {
            panic!("ResponseFuture polled after completion");
        };
        Poll::Ready(match result {
            Ok(response) => {
                let pending = match call.transport {
                    // A trailers-only answer: the status is in the headers and the body is empty.
                    Transport::Grpc => match grpc_status(response.headers()) {
                        Some(code) => {
                            call.finish(telemetry::outcome(code));
                            None
                        }
                        None => Some(call),
                    },
                    Transport::Http => {
                        call.finish(http_outcome(response.status()));
                        None
                    }
                };
                Ok(response.map(|inner| CountedBody { inner, call: pending }))
            }
            Err(e) => {
                // The server turns a service error into an answer of its own (gRPC: a status; HTTP: a 500).
                call.finish(match call.transport {
                    Transport::Grpc => telemetry::outcome(tonic::Code::Internal),
                    Transport::Http => "500",
                });
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its call when the status arrives in the trailers (gRPC), or as cancelled when
    /// it is dropped before.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(mut call) = this.call.take() {
            match &frame {
                Some(Ok(frame)) => match frame.trailers_ref() {
                    Some(trailers) => call.finish(grpc_status(trailers).map_or("unknown", telemetry::outcome)),
                    None => *this.call = Some(call),
                },
                Some(Err(_)) => call.finish(telemetry::outcome(tonic::Code::Internal)),
                // The body ended without a status: the client cannot tell how the call went.
                None => call.finish(telemetry::outcome(tonic::Code::Unknown)),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers.get("grpc-status").map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

fn http_outcome(status: http::StatusCode) -> SharedString {
    if status.is_success() {
        SharedString::const_str("ok")
    } else {
        SharedString::from(status.as_str().to_string())
    }
}

/// The route a request matched, as the rpc label.
fn http_route<B>(request: &http::Request<B>) -> SharedString {
    match request.extensions().get::<axum::extract::MatchedPath>() {
        Some(path) => match path.as_str().trim_start_matches('/') {
            "" => SharedString::const_str("root"),
            route => SharedString::from(route.to_string()),
        },
        None => SharedString::const_str("unmatched"),
    }
}

/// The method name of a served gRPC method's path (`/clipserve.v1.Embedder/Embed` -> `Embed`), `other` for any
/// other path, so that clients cannot grow the label set.
fn grpc_method(path: &str) -> SharedString {
    match grpc_methods().get(path) {
        Some(name) => SharedString::from(name.clone()),
        None => SharedString::const_str("other"),
    }
}

/// Every method of the services the server registers, by path, read from their descriptors (so that a method
/// added to the proto is labelled without a change here).
fn grpc_methods() -> &'static HashMap<String, Arc<str>> {
    static METHODS: OnceLock<HashMap<String, Arc<str>>> = OnceLock::new();
    METHODS.get_or_init(|| {
        use prost::Message as _;
        let sets = [
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut methods = HashMap::new();
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else { continue };
            for file in set.file {
                let package = file.package().to_string();
                for service in file.service {
                    let service_path = match package.as_str() {
                        "" => service.name().to_string(),
                        package => format!("{package}.{}", service.name()),
                    };
                    for method in service.method {
                        methods.insert(format!("/{service_path}/{}", method.name()), Arc::from(method.name()));
                    }
                }
            }
        }
        methods
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_method_labels() {
        assert_eq!(&*grpc_method("/clipserve.v1.Embedder/Embed"), "Embed");
        assert_eq!(&*grpc_method("/clipserve.v1.Embedder/EmbedStream"), "EmbedStream");
        assert_eq!(&*grpc_method("/clipserve.v1.Embedder/Info"), "Info");
        assert_eq!(&*grpc_method("/grpc.health.v1.Health/Check"), "Check");
        assert_eq!(&*grpc_method("/grpc.health.v1.Health/Watch"), "Watch");
        assert_eq!(&*grpc_method("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), "ServerReflectionInfo");
        assert_eq!(&*grpc_method("/clipserve.v1.Embedder/NoSuchMethod"), "other");
        assert_eq!(&*grpc_method("/x.Y/Embed"), "other");
        assert_eq!(&*grpc_method("/"), "other");
    }

    #[test]
    fn grpc_status_values() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(tonic::Code::Ok));
        h.insert("grpc-status", "16".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(tonic::Code::Unauthenticated));
        h.insert("grpc-status", "junk".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(tonic::Code::Unknown));
    }
}
