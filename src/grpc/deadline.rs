//! A call's `grpc-timeout`, enforced on the part of it before its answer starts (for a unary call, reading its
//! message included): a call that has not answered by then gets DEADLINE_EXCEEDED with its reason, so that a
//! client that trickles its message cannot hold a call open past its own deadline. The handlers give up a little
//! earlier themselves (`deadline_of`), so this only answers for what they do not watch.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response};

use crate::error::{Error, Reason};

/// Parses a `grpc-timeout` value (e.g. `250m`, `5S`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(timeout)
}

/// The layer, around the gRPC routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcDeadlineLayer;

impl<S> tower_layer::Layer<S> for GrpcDeadlineLayer {
    type Service = GrpcDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcDeadline { inner }
    }
}

/// The service the layer makes.
#[derive(Debug, Clone)]
pub struct GrpcDeadline<S> {
    inner: S,
}

impl<S, B> tower_service::Service<Request<B>> for GrpcDeadline<S>
where
    S: tower_service::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let timeout = request.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let call = self.inner.call(request);
        Box::pin(async move {
            let Some(timeout) = timeout else { return call.await };
            match tokio::time::timeout(timeout, call).await {
                Ok(answer) => answer,
                Err(_) => {
                    let e = Error::new(Reason::DeadlineExceeded, "the call's deadline (grpc-timeout) passed");
                    Ok(tonic::Status::from(e).into_http())
                }
            }
        })
    }
}
