//! TLS on the agent link: the dispatcher's certificate and key — and, for mutual TLS, the
//! CA that signs agent certificates — read from PEM files and reloaded when they change.
//!
//! Invariants:
//! - A slow or silent client never blocks accepting: each handshake runs in a task of its
//!   own, bounded by [`HANDSHAKE_TIMEOUT`].
//! - Start-up with unreadable or mismatched files fails. A reload that fails keeps the
//!   previous configuration and says so in the log, so a half-written renewal never takes
//!   the link down.
//! - With `client_ca_file`, every connection presents a certificate chaining to that CA,
//!   and the credential's agent id is one of the certificate's DNS names
//!   ([`check_identity`]): a stolen credential without its certificate, or a certificate
//!   of one agent with the credential of another, gets nothing.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::Shared;

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval between checks of the certificate files.
pub const DEFAULT_RELOAD_INTERVAL_MS: u64 = 10_000;

/// `[tls]`: serve the agent link over TLS.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain the dispatcher presents, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM bundle of the CA(s) that sign agent certificates. Set, the link is mutual TLS:
    /// an agent must present a certificate from this CA whose DNS names include the agent
    /// id of its credential.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for a change (modification time and size); a
    /// change is picked up by the next connection.
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_interval_ms() -> u64 {
    DEFAULT_RELOAD_INTERVAL_MS
}

impl TlsConfig {
    fn files(&self) -> impl Iterator<Item = &Path> {
        [
            Some(&self.cert_file),
            Some(&self.key_file),
            self.client_ca_file.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
    }

    /// Modification time and size of each file: what a reload compares.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.files()
            .map(|p| {
                let meta = std::fs::metadata(p).ok()?;
                Some((meta.modified().ok()?, meta.len()))
            })
            .collect()
    }
}

/// The TLS configuration in force, swapped when its files change.
#[derive(Debug)]
pub struct TlsState {
    config: TlsConfig,
    current: RwLock<Current>,
    /// Changes of the files that took effect.
    pub reloads: AtomicU64,
    /// Changes of the files that could not be used (the previous ones stay in force).
    pub reload_failures: AtomicU64,
}

#[derive(Debug)]
struct Current {
    server: Arc<ServerConfig>,
    stamp: Vec<Option<(SystemTime, u64)>>,
}

impl TlsState {
    /// Reads the files; fails, naming the file, when one is missing or they do not fit.
    pub fn load(config: TlsConfig) -> anyhow::Result<Self> {
        if config.reload_interval_ms == 0 {
            bail!("tls.reload_interval_ms must be positive");
        }
        let stamp = config.stamp();
        let server = Arc::new(server_config(&config)?);
        Ok(Self {
            config,
            current: RwLock::new(Current { server, stamp }),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        })
    }

    /// Whether agents must present a client certificate.
    pub fn mutual(&self) -> bool {
        self.config.client_ca_file.is_some()
    }

    fn acceptor(&self) -> TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(current.server.clone())
    }

    /// Re-reads the files if any changed since the last read. Returns whether a new
    /// configuration took effect.
    fn reload_if_changed(&self) -> bool {
        let stamp = self.config.stamp();
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.stamp == stamp {
                return false;
            }
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        // Whatever happens, this version of the files has been looked at.
        current.stamp = stamp;
        match server_config(&self.config) {
            Ok(server) => {
                current.server = Arc::new(server);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(cert_file = %self.config.cert_file.display(), "TLS files changed; new connections use them");
                true
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    error = format!("{e:#}"),
                    "TLS files changed but cannot be used; keeping the previous ones"
                );
                false
            }
        }
    }

    /// Checks the files every `reload_interval_ms`, forever.
    pub async fn watch_files(self: Arc<Self>) {
        let interval = Duration::from_millis(self.config.reload_interval_ms);
        loop {
            tokio::time::sleep(interval).await;
            let state = self.clone();
            // File system calls block; keep them off the async workers.
            let _ = tokio::task::spawn_blocking(move || state.reload_if_changed()).await;
        }
    }
}

fn server_config(config: &TlsConfig) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .with_context(|| format!("tls.key_file {}", config.key_file.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &config.client_ca_file {
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs(ca_file)? {
                roots
                    .add(ca)
                    .with_context(|| format!("tls.client_ca_file {}", ca_file.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("tls.client_ca_file {}", ca_file.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "tls.cert_file {} and tls.key_file {} do not form a usable pair",
            config.cert_file.display(),
            config.key_file.display()
        )
    })?;
    // gRPC is HTTP/2; clients (tonic included) insist on negotiating it.
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(server)
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// Accepts TCP connections and hands each one on once its TLS handshake succeeds. Runs
/// until the returned stream is dropped (and the next connection arrives) or the task is
/// aborted.
pub fn incoming(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Arc<TlsState>,
) -> (
    ReceiverStream<io::Result<TlsStream<TcpStream>>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accepting an agent connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    failed => {
                        shared
                            .stats
                            .tls_handshake_failures
                            .fetch_add(1, Ordering::Relaxed);
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
                        };
                        tracing::info!(%peer, error, "agent TLS handshake failed");
                    }
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

/// Under mutual TLS: the client certificate must name `agent_id` among its DNS names.
/// `certs` is the chain the client presented (leaf first), already verified by the
/// handshake.
pub fn check_identity(certs: Option<&[CertificateDer<'_>]>, agent_id: &str) -> Result<(), Status> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or_else(|| Status::unauthenticated("mutual TLS is required: no client certificate"))?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| Status::unauthenticated(format!("client certificate unreadable: {e}")))?;
    let names: Vec<&str> = cert.valid_dns_names().collect();
    if names.contains(&agent_id) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "the client certificate names {names:?}, but the credential is agent {agent_id:?}"
        )))
    }
}
