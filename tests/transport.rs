//! The transport, over the wire: TLS and mutual TLS on both listeners with certificates made here (accepted,
//! refused without a client certificate or with one from another CA, plaintext refused, ALPN, the API key over
//! TLS), certificates rotated while a stream is open, compressed gRPC requests (gzip, deflate, zstd; answered in
//! their encoding; a message that inflates past the limit refused quickly with bounded memory), connections
//! recycled at their maximum age with no call failing, and the plaintext health listener.

mod common;
#[path = "support/raw_h2.rs"]
mod raw_h2;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clipserve::pb::embedder_client::EmbedderClient;
use clipserve::pb::{item::Image, EmbedRequest, EmbedResponse, InfoRequest, Item};
use common::*;
use futures::StreamExt;
use raw_h2::RawConnection;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::Code;

// ---------------------------------------------------------------------------------------------------------------
// Certificates

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    fn server(&self) -> Leaf {
        self.leaf("clipserve", vec!["localhost".into(), "127.0.0.1".into()], ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate.
    fn client(&self, name: &str) -> Leaf {
        self.leaf(name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, name: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }
}

/// A folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("clipserve-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn arg(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The TLS files of a server: `cert.pem`, `key.pem` and `client-ca.pem` in `dir`, as links into `dir/..data/`
/// (the layout of a Kubernetes Secret volume, whose updates swap `..data` at once).
fn write_secret(dir: &TempDir, version: u32, server: &Leaf, client_ca: &Ca) {
    let data = format!("..{version}");
    std::fs::create_dir_all(dir.path(&data)).unwrap();
    std::fs::write(dir.path(&data).join("cert.pem"), &server.cert).unwrap();
    std::fs::write(dir.path(&data).join("key.pem"), &server.key).unwrap();
    std::fs::write(dir.path(&data).join("client-ca.pem"), client_ca.pem()).unwrap();
    let link = dir.path("..data.new");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&data, &link).unwrap();
    std::fs::rename(&link, dir.path("..data")).unwrap();
    for file in ["cert.pem", "key.pem", "client-ca.pem"] {
        if std::fs::symlink_metadata(dir.path(file)).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(file), dir.path(file)).unwrap();
        }
    }
}

fn tls_flags(dir: &TempDir, mutual: bool) -> Vec<String> {
    let mut flags = vec!["--tls-cert".into(), dir.arg("cert.pem"), "--tls-key".into(), dir.arg("key.pem")];
    if mutual {
        flags.extend(["--tls-client-ca".into(), dir.arg("client-ca.pem")]);
    }
    flags.extend(["--health-addr".into(), "127.0.0.1:0".into()]);
    flags
}

async fn start(flags: &[String]) -> TestServer {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestServer::start(&model_dir("tiny"), &flags).await
}

/// A gRPC channel over TLS to `addr` trusting `ca`, with `identity` as client certificate.
async fn tls_channel(addr: &str, ca: &Ca, identity: Option<&Leaf>) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

fn client(channel: Channel) -> EmbedderClient<Channel> {
    EmbedderClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(usize::MAX)
}

fn text_request(id: &str, text: &str) -> EmbedRequest {
    EmbedRequest { items: vec![Item { id: id.into(), image: None, text: Some(text.into()) }], normalize: false }
}

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

/// An Embed call of one text over `channel`: the embedding's length, or the status.
async fn embed_text(channel: Channel, key: Option<&str>) -> Result<usize, tonic::Status> {
    let message = text_request("t", "a photo of a cat");
    let request = match key {
        Some(key) => with_key(message, key),
        None => tonic::Request::new(message),
    };
    let reply = client(channel).embed(request).await?.into_inner();
    Ok(reply.embeddings[0].text_features.len())
}

/// Whether an Embed call over `channel` (if it connected) was served.
async fn served(channel: Result<Channel, tonic::transport::Error>, key: Option<&str>) -> bool {
    match channel {
        Ok(channel) => embed_text(channel, key).await.is_ok(),
        Err(_) => false,
    }
}

/// An HTTPS client trusting `ca`, with `identity` as client certificate; `localhost` is `addr`.
fn https_client(addr: &str, ca: &Ca, identity: Option<&Leaf>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .resolve("localhost", addr.parse().unwrap())
        .timeout(Duration::from_secs(20));
    if let Some(leaf) = identity {
        builder =
            builder.identity(reqwest::Identity::from_pem(format!("{}{}", leaf.key, leaf.cert).as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

const ONE_ROW: &str = r#"{"input_data":{"columns":["image","text"],"data":[["","a photo of a cat"]]}}"#;

/// Waits up to 10 s for a metric to reach `at_least`; its last value.
async fn wait_metric(server: &TestServer, sample: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = server.metric(sample).await;
        if value >= at_least || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The protocol a TLS client offering `alpn` gets from `addr` (None: no protocol agreed), or the handshake error.
async fn negotiated(addr: &str, ca: &Ca, identity: &Leaf, alpn: &[&[u8]]) -> Result<Option<Vec<u8>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(identity.cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(identity.key.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls =
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.map_err(|e| e.to_string())?;
    // TLS 1.3: a refused client certificate shows on the first read, not in the handshake.
    let protocol = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let _ = tls.shutdown().await;
    Ok(protocol)
}

// ---------------------------------------------------------------------------------------------------------------
// TLS and mutual TLS

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_admits_clients_of_the_ca_on_both_listeners_and_refuses_the_others() {
    let (server_ca, client_ca, other_ca) = (Ca::new("server CA"), Ca::new("client CA"), Ca::new("another CA"));
    let dir = TempDir::new("mtls");
    write_secret(&dir, 1, &server_ca.server(), &client_ca);
    let mut flags = tls_flags(&dir, true);
    flags.extend(["--api-key".into(), "s3cret".into()]);
    let server = start(&flags).await;
    let (grpc, http) = (server.grpc_addr.clone(), server.http_addr.clone());
    let alice = client_ca.client("alice");

    // gRPC: a client of the CA, with the API key, is served; without the key it is refused as before.
    let channel = tls_channel(&grpc, &server_ca, Some(&alice)).await.expect("mutual TLS connection");
    assert_eq!(embed_text(channel.clone(), Some("s3cret")).await.unwrap(), 512);
    let status = embed_text(channel.clone(), None).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let info = client(channel).info(with_key(InfoRequest {}, "s3cret")).await.unwrap().into_inner();
    assert_eq!(info.embedding_dim, 512);

    // Refused: no client certificate, one from another CA, plaintext.
    let key = Some("s3cret");
    assert!(!served(tls_channel(&grpc, &server_ca, None).await, key).await, "no client certificate");
    let mallory = other_ca.client("mallory");
    assert!(!served(tls_channel(&grpc, &server_ca, Some(&mallory)).await, key).await, "a certificate of another CA");
    let plaintext = Channel::from_shared(format!("http://{grpc}")).unwrap().connect_timeout(Duration::from_secs(5));
    assert!(!served(plaintext.connect().await, key).await, "plaintext");
    // A client that does not trust the server's CA refuses the server.
    assert!(!served(tls_channel(&grpc, &other_ca, Some(&alice)).await, key).await);

    // HTTPS: the same, and the API key still applies.
    let https = https_client(&http, &server_ca, Some(&alice));
    let url = format!("https://localhost:{}", http.rsplit(':').next().unwrap());
    let score = |client: &reqwest::Client, key: Option<&str>| {
        let mut request = client.post(format!("{url}/score")).header("content-type", "application/json").body(ONE_ROW);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let response = score(&https, Some("s3cret")).await.expect("HTTPS with a client certificate");
    assert_eq!(response.status(), 200);
    let rows: serde_json::Value = response.json().await.unwrap();
    assert_eq!(rows[0]["text_features"].as_array().unwrap().len(), 512);
    assert_eq!(score(&https, None).await.unwrap().status(), 401);
    assert_eq!(https.get(format!("{url}/ready")).send().await.unwrap().status(), 200);
    assert!(score(&https_client(&http, &server_ca, None), Some("s3cret")).await.is_err(), "no client certificate");
    assert!(score(&https_client(&http, &server_ca, Some(&mallory)), Some("s3cret")).await.is_err(), "other CA");
    // Plain HTTP to the TLS listener is told to use https.
    let plain = reqwest::Client::new().get(format!("http://{http}/ready")).send().await.unwrap();
    assert_eq!(plain.status(), 400);
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body["reason"], "MALFORMED_REQUEST");
    assert!(body["error"].as_str().unwrap().contains("https"), "{body}");

    // ALPN: h2 and http/1.1 on the HTTP listener, h2 only on the gRPC listener.
    let h2: &[u8] = b"h2";
    let h1: &[u8] = b"http/1.1";
    assert_eq!(negotiated(&http, &server_ca, &alice, &[h2, h1]).await.unwrap().as_deref(), Some(h2));
    assert_eq!(negotiated(&http, &server_ca, &alice, &[h1]).await.unwrap().as_deref(), Some(h1));
    assert_eq!(negotiated(&grpc, &server_ca, &alice, &[h2, h1]).await.unwrap().as_deref(), Some(h2));
    assert!(negotiated(&grpc, &server_ca, &alice, &[h1]).await.is_err(), "the gRPC listener speaks only h2");

    // The health listener answers probes in plaintext, and nothing else; the refusals were counted.
    let health = server.health_addr.clone().unwrap();
    assert_eq!(reqwest::get(format!("http://{health}/ready")).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(format!("http://{health}/health")).await.unwrap().status(), 200);
    let scoring = reqwest::Client::new().post(format!("http://{health}/score")).body(ONE_ROW).send().await.unwrap();
    assert_eq!(scoring.status(), 404);
    let m = server.metrics().await;
    let errors = |listener: &str, error: &str| {
        metric_value(&m, &format!(r#"clipserve_tls_handshake_errors_total{{listener="{listener}",error="{error}"}}"#))
    };
    assert!(errors("grpc", "client_certificate") >= 1.0, "{m}");
    assert!(errors("grpc", "plaintext") >= 1.0, "{m}");
    assert!(errors("http", "client_certificate") >= 2.0, "{m}");
    assert!(errors("http", "plaintext") >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_without_a_client_ca_serves_any_client_that_trusts_the_server() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("unused client CA"));
    let dir = TempDir::new("tls");
    write_secret(&dir, 1, &server_ca.server(), &client_ca);
    let server = start(&tls_flags(&dir, false)).await;
    let channel = tls_channel(&server.grpc_addr, &server_ca, None).await.expect("TLS connection");
    assert_eq!(embed_text(channel, None).await.unwrap(), 512);
    let https = https_client(&server.http_addr, &server_ca, None);
    let url = format!("https://localhost:{}/score", server.http_addr.rsplit(':').next().unwrap());
    let response = https.post(url).header("content-type", "application/json").body(ONE_ROW).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // A client that does not trust the server's CA does not connect.
    assert!(!served(tls_channel(&server.grpc_addr, &client_ca, None).await, None).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_rotate_while_a_stream_stays_open() {
    let (ca1, ca2) = (Ca::new("server CA 1"), Ca::new("server CA 2"));
    let (clients1, clients2) = (Ca::new("client CA 1"), Ca::new("client CA 2"));
    let (alice, bob) = (clients1.client("alice"), clients2.client("bob"));
    let dir = TempDir::new("rotation");
    write_secret(&dir, 1, &ca1.server(), &clients1);
    let mut flags = tls_flags(&dir, true);
    flags.extend(["--tls-reload-interval".into(), "100ms".into()]);
    let server = start(&flags).await;
    let grpc = server.grpc_addr.clone();

    // A stream, open across the rotation.
    let channel = tls_channel(&grpc, &ca1, Some(&alice)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<EmbedRequest>(4);
    let mut answers = client(channel.clone()).embed_stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let ask = |i: usize| {
        let tx = tx.clone();
        async move { tx.send(text_request(&format!("m{i}"), &format!("message {i}"))).await.unwrap() }
    };
    ask(0).await;
    let first: EmbedResponse = answers.message().await.unwrap().unwrap();
    assert_eq!(first.embeddings[0].text_features.len(), 512);

    // cert-manager renews: a new certificate from another CA, and clients now need the new client CA. The
    // Secret volume swaps all three files at once.
    write_secret(&dir, 2, &ca2.server(), &clients2);
    let reloads = r#"clipserve_tls_reloads_total{outcome="ok"}"#;
    assert_eq!(wait_metric(&server, reloads, 1.0).await, 1.0, "the new files were not loaded");

    // The open stream and its connection go on.
    ask(1).await;
    let second = answers.message().await.unwrap().unwrap();
    assert_eq!(second.embeddings[0].id, "m1");
    assert_eq!(embed_text(channel.clone(), None).await.unwrap(), 512, "a new call on the old connection");
    // New connections get the new certificate and the new client CA.
    assert!(!served(tls_channel(&grpc, &ca1, Some(&alice)).await, None).await, "trusting only the old CA");
    assert!(!served(tls_channel(&grpc, &ca2, Some(&alice)).await, None).await, "a client of the old client CA");
    let fresh = tls_channel(&grpc, &ca2, Some(&bob)).await.expect("a client of the new CAs");
    assert_eq!(embed_text(fresh.clone(), None).await.unwrap(), 512);

    // A broken file (cut short while written) keeps the certificate in use, and is logged and counted.
    let errors = r#"clipserve_tls_reloads_total{outcome="error"}"#;
    std::fs::write(dir.path("cert.pem"), "-----BEGIN CERTIFICATE-----\nMIIB").unwrap();
    assert_eq!(wait_metric(&server, errors, 1.0).await, 1.0, "the broken file was not noticed");
    let later = tls_channel(&grpc, &ca2, Some(&bob)).await.expect("the certificate in use stays");
    assert_eq!(embed_text(later, None).await.unwrap(), 512);
    let mut logged = false;
    while let Ok(line) = server.log.try_recv() {
        logged |= line.contains("do not load") && line.contains("ERROR");
    }
    assert!(logged, "the failed reload was not logged as an error");
    ask(2).await;
    assert_eq!(answers.message().await.unwrap().unwrap().embeddings[0].id, "m2");

    // Written again in place, whole: loaded.
    let renewed = ca2.server();
    std::fs::write(dir.path("key.pem"), &renewed.key).unwrap();
    std::fs::write(dir.path("cert.pem"), &renewed.cert).unwrap();
    assert!(wait_metric(&server, reloads, 2.0).await >= 2.0);
    let renewed_channel = tls_channel(&grpc, &ca2, Some(&bob)).await.expect("after the in-place renewal");
    assert_eq!(embed_text(renewed_channel, None).await.unwrap(), 512);

    // The stream ends well, every message answered, on its first connection.
    ask(3).await;
    drop(tx);
    let mut ids = Vec::new();
    while let Some(answer) = answers.message().await.expect("the stream ended with an error") {
        ids.push(answer.embeddings[0].id.clone());
    }
    assert_eq!(ids, ["m3"]);
    assert_eq!(
        server.metric(r#"clipserve_requests_total{transport="grpc",rpc="EmbedStream",outcome="ok"}"#).await,
        1.0
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Compression

fn image_and_text() -> EmbedRequest {
    EmbedRequest {
        items: vec![
            Item { id: "img".into(), image: Some(Image::ImageBytes(image_bytes("landscape_640x480.jpg"))), text: None },
            Item { id: "txt".into(), image: None, text: Some("a photo of a cat".into()) },
        ],
        normalize: false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compressed_requests_are_answered_in_their_encoding() {
    let server = TestServer::start(&model_dir("tiny"), &[]).await;
    let channel = server.channel().await;
    let plain = client(channel.clone()).embed(image_and_text()).await.unwrap();
    assert!(plain.metadata().get("grpc-encoding").is_none(), "an uncompressed call is answered uncompressed");
    let plain = plain.into_inner();

    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Zstd, CompressionEncoding::Deflate] {
        let mut c = client(channel.clone()).send_compressed(encoding).accept_compressed(encoding);
        let reply = c.embed(image_and_text()).await.unwrap_or_else(|s| panic!("{encoding:?}: {s:?}"));
        let answered = reply.metadata().get("grpc-encoding").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(answered.as_deref(), Some(encoding.to_string().as_str()), "{encoding:?}");
        let reply = reply.into_inner();
        for (a, b) in reply.embeddings.iter().zip(&plain.embeddings) {
            assert_eq!(a.id, b.id);
            assert_close(&a.image_features, &b.image_features, &format!("{encoding:?} image"));
            assert_close(&a.text_features, &b.text_features, &format!("{encoding:?} text"));
        }
    }
    // A client that accepts gzip but sends uncompressed is answered uncompressed.
    let reply = client(channel.clone()).accept_compressed(CompressionEncoding::Gzip).embed(image_and_text()).await;
    assert!(reply.unwrap().metadata().get("grpc-encoding").is_none());

    // A gzip stream: every message answered, in order.
    let mut c =
        client(channel.clone()).send_compressed(CompressionEncoding::Gzip).accept_compressed(CompressionEncoding::Gzip);
    let messages: Vec<_> = (0..5).map(|i| text_request(&format!("s{i}"), &format!("text number {i}"))).collect();
    let answers: Vec<EmbedResponse> =
        c.embed_stream(futures::stream::iter(messages)).await.unwrap().into_inner().map(|a| a.unwrap()).collect().await;
    let ids: Vec<_> = answers.iter().map(|a| a.embeddings[0].id.as_str()).collect();
    assert_eq!(ids, ["s0", "s1", "s2", "s3", "s4"]);

    let m = server.metrics().await;
    let count = |e: &str| metric_value(&m, &format!(r#"clipserve_grpc_decompressed_messages_total{{encoding="{e}"}}"#));
    assert_eq!((count("gzip"), count("zstd"), count("deflate")), (6.0, 1.0, 1.0), "{m}");

    // An encoding the server does not know is refused, naming those it takes.
    let connection = RawConnection::connect(&server.grpc_addr).await;
    let response = connection.request(raw_call(&server.grpc_addr, "snappy", 0, b"")).await;
    let status = status_of(response).await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let accepted = status.metadata().get("grpc-accept-encoding").unwrap().to_str().unwrap().to_string();
    for name in ["gzip", "zstd", "deflate"] {
        assert!(accepted.contains(name), "{accepted}");
    }
}

/// A hand-made unary Embed call carrying one message with the compressed flag `flag` and `payload`, sent with
/// `grpc-encoding: encoding`.
fn raw_call(addr: &str, encoding: &str, flag: u8, payload: &[u8]) -> http::Request<tonic::body::Body> {
    let mut body = Vec::with_capacity(payload.len() + 5);
    body.push(flag);
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(payload);
    http::Request::post(format!("http://{addr}/clipserve.v1.Embedder/Embed"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", encoding)
        .header("grpc-accept-encoding", "gzip,identity")
        .body(tonic::body::Body::new(http_body_util::Full::new(Bytes::from(body))))
        .unwrap()
}

/// The gRPC status of a response: in its headers (trailers-only) or its trailers.
async fn status_of(response: http::Response<hyper::body::Incoming>) -> tonic::Status {
    use http_body_util::BodyExt;
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let collected = response.into_body().collect().await.expect("the response body");
    let trailers = collected.trailers().expect("trailers").clone();
    tonic::Status::from_header_map(&trailers).expect("a grpc-status")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compressed_message_that_inflates_past_the_limit_is_refused_quickly_with_bounded_memory() {
    const LIMIT: usize = 16 << 20;
    let server = TestServer::start(&model_dir("tiny"), &["--max-message-bytes", &LIMIT.to_string()]).await;
    let addr = server.grpc_addr.clone();
    let is_too_large = |status: &tonic::Status| {
        status.code() == Code::ResourceExhausted
            && clipserve::error::status_reason(status).as_deref() == Some("REQUEST_TOO_LARGE")
    };

    // A bomb: 64 gzip members of 16 MiB of zeros, 1 GiB inflated from about 1 MiB. Each member's length trailer
    // says 16 MiB, within the limit: only inflating finds it out.
    let bomb = Bytes::from(gzip(&vec![0u8; LIMIT]).repeat(64));
    assert!(bomb.len() < 2 << 20, "{}", bomb.len());
    let before = rss_mib(server.pid());
    let peak = RssPeak::start(server.pid());
    let started = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (addr, bomb) = (addr.clone(), bomb.clone());
            tokio::spawn(async move {
                let connection = RawConnection::connect(&addr).await;
                let sent = Instant::now();
                let status = status_of(connection.request(raw_call(&addr, "gzip", 1, &bomb)).await).await;
                (status, sent.elapsed())
            })
        })
        .collect();
    for call in calls {
        let (status, took) = call.await.unwrap();
        assert!(is_too_large(&status), "{status:?}");
        assert!(status.message().contains("inflates past the limit"), "{}", status.message());
        assert!(took < Duration::from_secs(5), "refused after {took:?}");
    }
    let grown = peak.peak_mib() - before;
    eprintln!("4 bombs of 1 GiB each refused in {:?}; peak RSS growth {grown:.0} MiB", started.elapsed());
    // Inflated whole they would take 4 GiB; each stops at the 16 MiB limit.
    assert!(grown < 400.0, "RSS grew by {grown:.0} MiB");

    // The same over a tonic client, and zstd; an uncompressed message over the limit gets the same reason.
    let channel = server.channel().await;
    let big = text_request("big", &"x".repeat(LIMIT + 1));
    for encoding in [Some(CompressionEncoding::Gzip), Some(CompressionEncoding::Zstd), None] {
        let mut c = client(channel.clone());
        if let Some(e) = encoding {
            c = c.send_compressed(e);
        }
        let status = c.embed(big.clone()).await.unwrap_err();
        assert!(is_too_large(&status), "{encoding:?}: {status:?}");
    }
    // In a stream: the messages before it are answered, then the stream ends with the refusal.
    let mut c = client(channel.clone()).send_compressed(CompressionEncoding::Gzip);
    let messages = vec![text_request("ok", "fine"), big.clone(), text_request("never", "read")];
    let mut answers = c.embed_stream(futures::stream::iter(messages)).await.unwrap().into_inner();
    assert_eq!(answers.message().await.unwrap().unwrap().embeddings[0].id, "ok");
    let status = answers.message().await.unwrap_err();
    assert!(is_too_large(&status), "{status:?}");

    // A compressed message that is not gzip at all is the client's error.
    let connection = RawConnection::connect(&addr).await;
    let status = status_of(connection.request(raw_call(&addr, "gzip", 1, b"this is not gzip")).await).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(clipserve::error::status_reason(&status).as_deref(), Some("MALFORMED_REQUEST"));

    // Still serving.
    assert_eq!(embed_text(channel, None).await.unwrap(), 512);
}

// ---------------------------------------------------------------------------------------------------------------
// Connection age

/// An HTTP server on loopback that answers every request with `body` (an image) after `delay`.
async fn slow_image_server(body: Vec<u8>, delay: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Arc::new(body);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                tokio::time::sleep(delay).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: image/jpeg\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            });
        }
    });
    format!("http://{addr}/slow.jpg")
}

/// A grpcio client (gRPC's C core, which like grpc-go and grpc-java sends again, transparently, a call that a
/// GOAWAY refused before it was sent): two threads of unary calls and a stream of 8 messages, 250 ms apart, for
/// `seconds`. Prints `{"ok", "failed", "streamed"}`.
const GRPCIO_LOAD: &str = r#"
import importlib, json, subprocess, sys, threading, time
addr, seconds, proto, out = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto}", f"--python_out={out}",
                f"--grpc_python_out={out}", f"{proto}/clipserve/v1/clipserve.proto"], check=True)
sys.path.insert(0, out)
import grpc
pb = importlib.import_module("clipserve.v1.clipserve_pb2")
rpc = importlib.import_module("clipserve.v1.clipserve_pb2_grpc")
stub = rpc.EmbedderStub(grpc.insecure_channel(addr))
stub.Info(pb.InfoRequest(), timeout=30)
stop = time.monotonic() + seconds
lock = threading.Lock()
result = {"ok": 0, "failed": [], "streamed": 0}
def unary():
    while time.monotonic() < stop:
        try:
            stub.Embed(pb.EmbedRequest(items=[pb.Item(id="u", text="a photo of a dog")]), timeout=30)
            with lock:
                result["ok"] += 1
        except grpc.RpcError as e:
            with lock:
                result["failed"].append(f"{e.code().name}: {e.details()}")
        time.sleep(0.01)
def stream():
    def messages():
        for i in range(8):
            time.sleep(0.25)
            yield pb.EmbedRequest(items=[pb.Item(id=f"s{i}", text="a paced message")])
    try:
        for _ in stub.EmbedStream(messages(), timeout=30):
            result["streamed"] += 1
    except grpc.RpcError as e:
        with lock:
            result["failed"].append(f"stream {e.code().name}: {e.details()}")
threads = [threading.Thread(target=unary) for _ in range(2)] + [threading.Thread(target=stream)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(result))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn connections_are_recycled_at_their_maximum_age_without_failing_a_call() {
    let server = TestServer::start(
        &model_dir("tiny"),
        &["--max-connection-age", "1s", "--max-connection-age-grace", "5s", "--allow-private-urls"],
    )
    .await;
    let started = Instant::now();
    let run_for = Duration::from_secs(5);

    // A grpcio client under steady load.
    let grpcio = {
        let dir = TempDir::new("grpcio-load");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let args = vec![
            "-c".to_string(),
            GRPCIO_LOAD.to_string(),
            server.grpc_addr.clone(),
            run_for.as_secs_f64().to_string(),
            root.join("proto").display().to_string(),
            dir.0.display().to_string(),
        ];
        let python = root.join(".venv/bin/python");
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(python).args(args).output().expect("running python");
            drop(dir);
            out
        })
    };
    // Unary calls over one tonic channel (it reconnects when asked to go away). tonic does not send again a call
    // it queued just as a GOAWAY arrived and never sent (CANCELLED, "connection closed"): such a call is retried
    // once, as its callers must; nothing else may fail.
    let channel = server.channel().await;
    let tonic_calls = {
        let channel = channel.clone();
        tokio::spawn(async move {
            let (mut ok, mut resent, mut failed) = (0, 0, Vec::new());
            while started.elapsed() < run_for {
                let call = || {
                    let channel = channel.clone();
                    async move { client(channel).embed(text_request("t", "a photo of a dog")).await }
                };
                match call().await {
                    Ok(_) => ok += 1,
                    Err(s) if s.code() == Code::Cancelled && format!("{s:?}").contains("connection closed") => {
                        resent += 1;
                        match call().await {
                            Ok(_) => ok += 1,
                            Err(s) => failed.push(s),
                        }
                    }
                    Err(s) => failed.push(s),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, resent, failed)
        })
    };
    // HTTP calls on one keep-alive client.
    let http = {
        let url = format!("{}/score", server.http_url());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut ok, mut failed) = (0, Vec::new());
            while started.elapsed() < run_for {
                let response = client.post(&url).header("content-type", "application/json").body(ONE_ROW).send().await;
                match response {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(format!("status {}", r.status())),
                    Err(e) => failed.push(format!("{e:?}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failed)
        })
    };
    // A unary call in flight when its connection's age comes: its image takes 1.5 s to fetch.
    let slow_url = slow_image_server(image_bytes("exact_224x224.jpg"), Duration::from_millis(1500)).await;
    let slow = {
        let channel = Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
        tokio::spawn(async move {
            let item = Item { id: "slow".into(), image: Some(Image::ImageUrl(slow_url)), text: None };
            client(channel).embed(EmbedRequest { items: vec![item], normalize: false }).await
        })
    };
    // A stream on a fresh connection that lasts about 2.5 s: past the connection's age, within its grace.
    let within_grace = {
        let channel = Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
        let opened = Instant::now();
        tokio::spawn(async move { (paced_stream(channel, 10, Duration::from_millis(250)).await, opened.elapsed()) })
    };
    // One that would last 8 s: past age and grace (0.9 to 1.1 s, then 5 s), it is cut.
    let beyond_grace = {
        let channel = Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
        let opened = Instant::now();
        tokio::spawn(async move { (paced_stream(channel, 32, Duration::from_millis(250)).await, opened.elapsed()) })
    };

    let reply = slow.await.unwrap().expect("the call in flight at the connection's age");
    assert_eq!(reply.into_inner().embeddings[0].image_features.len(), 512);
    let ((answered, ending), lasted) = within_grace.await.unwrap();
    assert_eq!(answered, 10, "{ending:?} after {lasted:?}");
    assert!(ending.is_ok(), "{ending:?} after {lasted:?}");
    let ((answered, ending), lasted) = beyond_grace.await.unwrap();
    assert!(ending.is_err() && answered < 32, "answered {answered}, {ending:?} after {lasted:?}");
    assert!(lasted >= Duration::from_millis(5500) && lasted < Duration::from_millis(7500), "cut after {lasted:?}");

    let out = grpcio.await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let load: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(load["failed"], serde_json::json!([]), "grpcio calls failed: {load}");
    assert!(load["ok"].as_u64().unwrap() > 20, "{load}");
    assert_eq!(load["streamed"], 8, "{load}");
    let (tonic_ok, resent, failures) = tonic_calls.await.unwrap();
    assert!(failures.is_empty(), "{} tonic calls failed: {failures:?}", failures.len());
    let (http_ok, http_failures) = http.await.unwrap();
    assert!(http_failures.is_empty(), "{} HTTP calls failed: {http_failures:?}", http_failures.len());
    let m = server.metrics().await;
    let aged = |listener: &str, timeout: &str| {
        metric_value(
            &m,
            &format!(r#"clipserve_timed_out_connections_total{{listener="{listener}",timeout="{timeout}"}}"#),
        )
    };
    eprintln!(
        "grpcio: {} calls, 0 failed; tonic: {tonic_ok} calls, {resent} sent again; HTTP: {http_ok} calls; connections \
         aged: grpc {}, http {}; cut after the grace: {}",
        load["ok"],
        aged("grpc", "age"),
        aged("http", "age"),
        aged("grpc", "age_grace")
    );
    // The two unary channels alone had a new connection about every second.
    assert!(aged("grpc", "age") >= 8.0, "{m}");
    assert!(aged("http", "age") >= 3.0, "{m}");
    assert_eq!(aged("grpc", "age_grace"), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_go_away_and_silent_peers_are_found_by_keepalive() {
    let server = TestServer::start(
        &model_dir("tiny"),
        &["--max-connection-idle", "2s", "--http2-keepalive-interval", "300ms", "--http2-keepalive-timeout", "300ms"],
    )
    .await;
    let sample =
        |timeout: &str| format!(r#"clipserve_timed_out_connections_total{{listener="grpc",timeout="{timeout}"}}"#);

    // A peer that opens an HTTP/2 connection and then goes silent (as one behind a NAT that forgot it): the
    // server's PINGs go unanswered and the connection is closed within interval + timeout.
    let mut silent = tokio::net::TcpStream::connect(&server.grpc_addr).await.unwrap();
    silent.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    silent.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // an empty SETTINGS frame
    let opened = Instant::now();
    // What the server sends is read (its SETTINGS and PINGs) but never answered.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut sink = [0u8; 4096];
        while matches!(silent.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    let after = opened.elapsed();
    assert!(closed.is_ok(), "the silent peer's connection was not closed");
    assert!(after >= Duration::from_millis(500) && after < Duration::from_secs(2), "closed after {after:?}");
    assert_eq!(wait_metric(&server, &sample("keepalive"), 1.0).await, 1.0);

    // A client with nothing in flight for the idle limit is asked to go away; its channel reconnects for the
    // next call. It answered every PING meanwhile: keepalive did not close it.
    let channel = server.channel().await;
    assert_eq!(embed_text(channel.clone(), None).await.unwrap(), 512);
    assert_eq!(wait_metric(&server, &sample("idle"), 1.0).await, 1.0, "the idle connection stayed open");
    assert_eq!(embed_text(channel, None).await.unwrap(), 512);
    assert_eq!(server.metric(&sample("keepalive")).await, 1.0);
}

/// A stream of `n` messages, one every `pace`: how many were answered, and how it ended.
async fn paced_stream(channel: Channel, n: usize, pace: Duration) -> (usize, Result<(), tonic::Status>) {
    let messages = futures::stream::iter(0..n).then(move |i| async move {
        tokio::time::sleep(pace).await;
        text_request(&format!("p{i}"), "a paced message")
    });
    let mut answers = match client(channel).embed_stream(messages).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (0, Err(status)),
    };
    let mut answered = 0;
    loop {
        match answers.message().await {
            Ok(Some(_)) => answered += 1,
            Ok(None) => return (answered, Ok(())),
            Err(status) => return (answered, Err(status)),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Other clients: Python's grpcio (mutual TLS and gzip), and `clipserve embed` (mutual TLS)

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_and_clipserve_embed_clients_embed_over_mutual_tls() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
    let dir = TempDir::new("grpcio");
    write_secret(&dir, 1, &server_ca.server(), &client_ca);
    let carol = client_ca.client("carol");
    for (file, pem) in
        [("ca.pem", server_ca.pem()), ("carol.pem", carol.cert.clone()), ("carol.key", carol.key.clone())]
    {
        std::fs::write(dir.path(file), pem).unwrap();
    }
    let images = dir.path("images");
    std::fs::create_dir_all(&images).unwrap();
    for name in ["exact_224x224.jpg", "gray_300x300.png"] {
        std::fs::write(images.join(name), image_bytes(name)).unwrap();
    }
    let server = start(&tls_flags(&dir, true)).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = dir.path("out.jsonl");
    let args = [
        "examples/python_client/embed_folder.py".to_string(),
        "--server".into(),
        server.grpc_addr.clone(),
        "--tls-ca".into(),
        dir.arg("ca.pem"),
        "--tls-cert".into(),
        dir.arg("carol.pem"),
        "--tls-key".into(),
        dir.arg("carol.key"),
        "--tls-server-name".into(),
        "localhost".into(),
        "--compression".into(),
        "gzip".into(),
        "--images".into(),
        images.display().to_string(),
        // Long enough that compressing it pays (grpcio sends a message uncompressed when it would not shrink).
        "--text".into(),
        "a photo of a cat, ".repeat(200),
        "--out".into(),
        out.display().to_string(),
        "--timeout".into(),
        "60".into(),
    ];
    let python = root.join(".venv/bin/python");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python).args(args).current_dir(root).output().expect("running python")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "embed_folder.py failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);

    // The same numbers as a Rust client over mutual TLS without compression.
    let channel = tls_channel(&server.grpc_addr, &server_ca, Some(&carol)).await.unwrap();
    for row in &rows {
        let id = row["id"].as_str().unwrap();
        let item = match row["kind"].as_str().unwrap() {
            "image" => Item { id: id.into(), image: Some(Image::ImageBytes(image_bytes(id))), text: None },
            _ => Item { id: id.into(), image: None, text: Some(row["text"].as_str().unwrap().into()) },
        };
        let reply = client(channel.clone()).embed(EmbedRequest { items: vec![item], normalize: false }).await.unwrap();
        let e = &reply.into_inner().embeddings[0];
        let theirs: Vec<f32> =
            row["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let ours = if e.image_features.is_empty() { &e.text_features } else { &e.image_features };
        assert_close(&theirs, ours, id);
    }
    // The text came compressed (the images, already compressed, may not have been).
    let m = server.metrics().await;
    assert!(metric_value(&m, r#"clipserve_grpc_decompressed_messages_total{encoding="gzip"}"#) >= 1.0, "{m}");

    // The bulk client, to `localhost` (resolved to an address, the certificate checked against the name).
    let port = server.grpc_addr.rsplit(':').next().unwrap().to_string();
    let bulk = |identity: bool, output: PathBuf| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_clipserve"));
        command.args(["embed", "--no-progress", "--retries", "1", "--server", &format!("https://localhost:{port}")]);
        command.arg("--tls-ca").arg(dir.path("ca.pem"));
        if identity {
            command.arg("--tls-cert").arg(dir.path("carol.pem")).arg("--tls-key").arg(dir.path("carol.key"));
        }
        command.arg("--input").arg(&images).arg("--output").arg(output);
        command.output().unwrap()
    };
    let out = dir.path("bulk.jsonl");
    let run = bulk(true, out.clone());
    assert!(run.status.success(), "clipserve embed failed: {}", String::from_utf8_lossy(&run.stderr));
    let embedded: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(embedded.len(), 2);
    for row in &embedded {
        let id = row["id"].as_str().unwrap();
        let python = rows.iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("{id} not in {rows:?}"));
        let a: Vec<f32> =
            row["image_features"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let b: Vec<f32> = python["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_close(&a, &b, id);
    }
    // Without its certificate it is refused: nothing is embedded, each image is in the errors (or the run fails).
    let refused = bulk(false, dir.path("refused.jsonl"));
    let log = String::from_utf8_lossy(&refused.stderr);
    let written = std::fs::read_to_string(dir.path("refused.jsonl")).unwrap_or_default();
    assert_eq!(written.lines().count(), 0, "{log}");
    let errors = std::fs::read_to_string(dir.path("refused.errors.jsonl")).unwrap_or_default();
    eprintln!("clipserve embed without a client certificate: {}; errors:\n{errors}", refused.status);
    assert!(!refused.status.success() || errors.lines().count() == 2, "{log}\n{errors}");
}
