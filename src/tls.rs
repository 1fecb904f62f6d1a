//! TLS for both listeners (rustls, with ring): the server's certificate and key and, for mutual TLS, the CA that
//! client certificates must be signed by, read from PEM files and reloaded when the files change.
//!
//! Each load builds fresh rustls server configurations (one per listener: their ALPN lists differ) and swaps them
//! in; a handshake uses the configuration current when it starts, so open connections keep theirs and are never
//! dropped by a reload. The files are checked every `--tls-reload-interval` by their metadata (size, modification
//! time, device and inode, following symlinks, so the atomic symlink swap of a Kubernetes Secret volume is a
//! change, and so is cert-manager rewriting a file in place). A change that does not load (a file missing or cut
//! short, not PEM, a key that does not match the certificate) keeps the configuration in use, is logged and
//! counted, and is tried again when the files change again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Reloads of the TLS files, by `outcome` (`ok`, `error`).
pub const TLS_RELOADS: &str = "clipserve_tls_reloads_total";
/// Connections refused before any request, by `listener` and `error`: `plaintext` (not a TLS client),
/// `client_certificate` (mutual TLS: none, or not signed by the client CA), `timeout` (no handshake within the
/// header timeout), `handshake` (any other TLS failure).
pub const TLS_HANDSHAKE_ERRORS: &str = "clipserve_tls_handshake_errors_total";

/// The PEM files TLS is served from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// The private key of that certificate.
    pub key: PathBuf,
    /// The CA(s) client certificates must chain to (mutual TLS); None lets any client connect.
    pub client_ca: Option<PathBuf>,
}

/// Which listener a configuration is for: they differ in the protocols offered through ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// The HTTP listener: HTTP/2 and HTTP/1.1.
    Http,
    /// The gRPC listener: HTTP/2 only.
    Grpc,
}

/// The configurations in use, one per listener.
struct Configs {
    http: Arc<ServerConfig>,
    grpc: Arc<ServerConfig>,
}

/// What a file looked like when it was last loaded (or tried): changes of any of it trigger a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stamp {
    Present { len: u64, modified: Option<SystemTime>, dev: u64, ino: u64 },
    Unreadable(std::io::ErrorKind),
}

/// The server's TLS: current configurations and the files they come from.
pub struct Tls {
    files: TlsFiles,
    configs: RwLock<Configs>,
    /// The stamps of the files as of the last load attempt.
    stamps: Mutex<Vec<Stamp>>,
}

impl Tls {
    /// Loads the files; an error here (start-up) is fatal, unlike one on a reload.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<Tls>> {
        let stamps = stamps(&files);
        let configs = build(&files)?;
        Ok(Arc::new(Tls { files, configs: RwLock::new(configs), stamps: Mutex::new(stamps) }))
    }

    /// Whether client certificates are required.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// An acceptor with the configuration in use now, for one new connection.
    pub fn acceptor(&self, alpn: Alpn) -> TlsAcceptor {
        let configs = self.configs.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(match alpn {
            Alpn::Http => configs.http.clone(),
            Alpn::Grpc => configs.grpc.clone(),
        })
    }

    /// Reloads the files if they changed since the last attempt. None when nothing changed; else whether the new
    /// files are now in use (on an error the previous configuration stays).
    pub fn reload_if_changed(&self) -> Option<anyhow::Result<()>> {
        let now = stamps(&self.files);
        {
            let mut last = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
            if *last == now {
                return None;
            }
            *last = now;
        }
        Some(build(&self.files).map(|configs| {
            *self.configs.write().unwrap_or_else(|e| e.into_inner()) = configs;
        }))
    }

    /// Checks the files every `interval` for as long as the server runs, reloading them when they change.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(10)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let tls = self.clone();
            // Reading files may block (network file systems): off the runtime.
            let Ok(outcome) = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await else { continue };
            match outcome {
                None => {}
                Some(Ok(())) => {
                    metrics::counter!(TLS_RELOADS, "outcome" => "ok").increment(1);
                    tracing::info!(cert = %self.files.cert.display(), "TLS files changed: reloaded");
                }
                Some(Err(e)) => {
                    metrics::counter!(TLS_RELOADS, "outcome" => "error").increment(1);
                    tracing::error!(
                        cert = %self.files.cert.display(),
                        "TLS files changed but do not load ({e:#}); the certificate in use stays"
                    );
                }
            }
        }
    }
}

fn stamps(files: &TlsFiles) -> Vec<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let paths = [Some(&files.cert), Some(&files.key), files.client_ca.as_ref()];
    paths
        .into_iter()
        .flatten()
        .map(|p| match std::fs::metadata(p) {
            Ok(m) => Stamp::Present { len: m.len(), modified: m.modified().ok(), dev: m.dev(), ino: m.ino() },
            Err(e) => Stamp::Unreadable(e.kind()),
        })
        .collect()
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The certificates of a PEM file (other PEM sections are skipped).
fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a valid PEM file", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate (PEM `BEGIN CERTIFICATE`) in it", path.display());
    Ok(certs)
}

/// Builds both listeners' configurations from the files.
fn build(files: &TlsFiles) -> anyhow::Result<Configs> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&files.cert)?;
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("{}: no private key (PKCS#8, PKCS#1 or SEC1 PEM) in it", files.key.display()))?;
    let certified = CertifiedKey::from_der(chain, key, &provider).with_context(|| {
        format!("{} and {} do not make a usable certificate and key", files.cert.display(), files.key.display())
    })?;
    let resolver = Arc::new(SingleCertAndKey::from(Arc::new(certified)));
    let verifier = match &files.client_ca {
        None => None,
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path)? {
                roots.add(cert).with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .with_context(|| format!("{}: not a usable client CA", path.display()))?;
            Some(verifier)
        }
    };
    let config = |alpn: Alpn| -> anyhow::Result<Arc<ServerConfig>> {
        let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = match &verifier {
            Some(v) => builder.with_client_cert_verifier(v.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = match alpn {
            Alpn::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::Grpc => vec![b"h2".to_vec()],
        };
        Ok(Arc::new(config))
    };
    Ok(Configs { http: config(Alpn::Http)?, grpc: config(Alpn::Grpc)? })
}

/// The label of a failed handshake for [`TLS_HANDSHAKE_ERRORS`].
pub fn handshake_error_kind(e: &std::io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return "handshake";
    };
    match tls {
        rustls::Error::NoCertificatesPresented
        | rustls::Error::InvalidCertificate(_)
        | rustls::Error::InvalidCertRevocationList(_) => "client_certificate",
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => "plaintext",
        _ => "handshake",
    }
}
