//! A panic in an HTTP handler answers that call only: 500 with reason INTERNAL_PANIC, counted in
//! `clipserve_panics_total{stage="http"}` and logged once (the panic hook stays quiet for guarded work).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};

use crate::error::Error;
use crate::prepare::guard;

/// Runs every call of the wrapped service, and every poll of its answer, under [`guard`]; the error of a call that
/// panicked is written by the second field (each protocol writes its errors in its own shape).
#[derive(Clone)]
pub struct CatchPanic<S>(pub S, pub fn(Error) -> Response);

impl<S> tower::Service<Request> for CatchPanic<S>
where
    S: tower::Service<Request, Error = Infallible>,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Guarded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let what = format!("{} {}", request.method(), request.uri().path());
        let mut future = None;
        match guard("http", &what, || {
            future = Some(Box::pin(self.0.call(request)));
            Ok(())
        }) {
            Ok(()) => Guarded { future, answer: None, what, render: self.1 },
            Err(e) => Guarded { future: None, answer: Some((self.1)(e)), what, render: self.1 },
        }
    }
}

/// The answer of a guarded call.
pub struct Guarded<F> {
    future: Option<Pin<Box<F>>>,
    /// The answer to a call that panicked before it returned its future.
    answer: Option<Response>,
    /// The request, for the log.
    what: String,
    render: fn(Error) -> Response,
}

impl<F, R> Future for Guarded<F>
where
    F: Future<Output = Result<R, Infallible>>,
    R: IntoResponse,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(answer) = this.answer.take() {
            return Poll::Ready(Ok(answer));
        }
        let Some(future) = this.future.as_mut() else {
            panic!("a guarded HTTP call was polled after it answered");
        };
        let mut polled = Poll::Pending;
        let result = guard("http", &this.what, || {
            polled = future.as_mut().poll(cx);
            Ok(())
        });
        match (result, polled) {
            (Err(e), _) => {
                this.future = None;
                Poll::Ready(Ok((this.render)(e)))
            }
            (Ok(()), Poll::Ready(Ok(r))) => {
                this.future = None;
                Poll::Ready(Ok(r.into_response()))
            }
            (Ok(()), Poll::Pending) => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_for_its_call_only() {
        async fn boom() -> &'static str {
            let items: Vec<u8> = Vec::new();
            if items.is_empty() {
                panic!("handler bug");
            }
            "unreachable"
        }
        let app = axum::Router::new()
            .route("/boom", get(boom))
            .route("/fine", get(|| async { "fine" }))
            .layer(tower::layer::layer_fn(|inner| CatchPanic(inner, Error::into_response)));
        let call = |path: &str| {
            let request = Request::builder().uri(path).body(Body::empty()).unwrap();
            app.clone().oneshot(request)
        };
        let response = call("/boom").await.unwrap();
        assert_eq!(response.status(), 500);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["reason"], "INTERNAL_PANIC", "{body}");
        assert!(body["error"].as_str().unwrap().contains("GET /boom"), "{body}");
        let response = call("/fine").await.unwrap();
        assert_eq!(response.status(), 200);
    }
}
