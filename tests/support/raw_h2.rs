//! A gRPC client over one bare HTTP/2 connection. Unlike tonic's channel it does not enforce `grpc-timeout`
//! itself (so a test sees the server's own answer to a deadline), and the test can cut the connection at once, as
//! a client process that exits does.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use clipserve::pb::embedder_client::EmbedderClient;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// One HTTP/2 connection to a server.
pub struct RawConnection {
    send: SendRequest<tonic::body::Body>,
    /// The same socket, to shut it down under the connection's feet (hyper runs the connection on a task of its
    /// own that lives as long as a stream is open).
    socket: std::net::TcpStream,
    origin: http::Uri,
}

impl RawConnection {
    /// Connects to `addr` (`HOST:PORT`).
    pub async fn connect(addr: &str) -> RawConnection {
        let addr_owned = addr.to_string();
        let stream = tokio::task::spawn_blocking(move || std::net::TcpStream::connect(addr_owned))
            .await
            .unwrap()
            .expect("connecting");
        stream.set_nodelay(true).unwrap();
        stream.set_nonblocking(true).unwrap();
        let socket = stream.try_clone().unwrap();
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let (send, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        RawConnection { send, socket, origin: format!("http://{addr}").parse().unwrap() }
    }

    /// An Embedder client on this connection.
    pub fn client(&self) -> EmbedderClient<RawChannel> {
        EmbedderClient::with_origin(RawChannel(self.send.clone()), self.origin.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Sends one request as it is (a hand-made gRPC call, for instance) and returns the response's head and body.
    pub async fn request(&self, request: http::Request<tonic::body::Body>) -> http::Response<hyper::body::Incoming> {
        let mut send = self.send.clone();
        send.ready().await.expect("connection ready");
        send.send_request(request).await.expect("sending the request")
    }

    /// Closes the connection now, with every call on it.
    pub fn cut(self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// The connection as a tower service for tonic's generated client.
#[derive(Clone)]
pub struct RawChannel(SendRequest<tonic::body::Body>);

impl tower_service::Service<http::Request<tonic::body::Body>> for RawChannel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}
