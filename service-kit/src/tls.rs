//! TLS on the listeners: a rustls server configuration rebuilt when its certificate, key or
//! client CA files change (new connections get the new certificate, no restart), optional
//! client-certificate verification (mutual TLS), and the accept loop that hands tonic
//! plaintext or TLS connections with a bounded handshake time and a connection cap.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// TLS options of a listener, flattened into each service's command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain served on the listener; with `--tls-key`, turns TLS on.
    /// Reloaded when the file changes.
    #[arg(long = "tls-cert", env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long = "tls-key", env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM bundle of the CAs that sign client certificates: turns on mutual TLS.
    #[arg(long = "tls-client-ca", env = "TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// With `--tls-client-ca`: `required` refuses connections without a valid client
    /// certificate; `optional` verifies one when offered (callers without one must then
    /// authenticate with a bearer token).
    #[arg(
        long = "tls-client-auth",
        env = "TLS_CLIENT_AUTH",
        default_value = "required",
        value_parser = ["required", "optional"]
    )]
    pub tls_client_auth: String,
}

impl TlsArgs {
    /// The server TLS configuration, or `None` when TLS is off.
    pub fn server(&self) -> anyhow::Result<Option<Arc<ServerTls>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(Arc::new(ServerTls::load(
                cert.clone(),
                key.clone(),
                self.tls_client_ca.clone(),
                self.tls_client_auth != "optional",
            )?))),
            _ => Ok(None),
        }
    }
}

/// The crypto provider of every TLS configuration in the workspace.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("cannot read certificates from {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("bad certificate in {}: {e}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", path.display());
    Ok(certs)
}

/// Reads a PEM private key (without ever printing it).
pub fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|_| anyhow::anyhow!("cannot read a private key from {}", path.display()))
}

/// A root store holding every certificate of a PEM bundle.
pub fn read_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| anyhow::anyhow!("bad CA certificate in {}: {e}", path.display()))?;
    }
    Ok(roots)
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(paths: &[&Path]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// A server TLS configuration that follows its files.
#[derive(Debug)]
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    client_required: bool,
    current: ArcSwap<ServerConfig>,
    stamp: Mutex<(Stamp, Instant)>,
}

/// How often, at most, the files are looked at (on new connections).
const RELOAD_CHECK: Duration = Duration::from_millis(500);

impl ServerTls {
    /// Loads the files; an unreadable or mismatched certificate and key is an error.
    pub fn load(
        cert: PathBuf,
        key: PathBuf,
        client_ca: Option<PathBuf>,
        client_required: bool,
    ) -> anyhow::Result<Self> {
        let this = Self {
            current: ArcSwap::from_pointee(build(
                &cert,
                &key,
                client_ca.as_deref(),
                client_required,
            )?),
            stamp: Mutex::new((Stamp::new(), Instant::now())),
            cert,
            key,
            client_ca,
            client_required,
        };
        *this.lock() = (this.stamp_now(), Instant::now());
        Ok(this)
    }

    /// Whether client certificates are verified.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Stamp, Instant)> {
        self.stamp.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stamp_now(&self) -> Stamp {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        if let Some(ca) = &self.client_ca {
            paths.push(ca);
        }
        stamp(&paths)
    }

    /// The configuration for a new connection, rebuilt first if a file changed. A file
    /// that fails to load keeps the previous configuration (with a warning).
    pub fn config(&self) -> Arc<ServerConfig> {
        let changed = {
            let mut guard = self.lock();
            if guard.1.elapsed() < RELOAD_CHECK {
                None
            } else {
                guard.1 = Instant::now();
                let now = self.stamp_now();
                (now != guard.0).then(|| {
                    guard.0 = now.clone();
                    now
                })
            }
        };
        if changed.is_some() {
            match build(
                &self.cert,
                &self.key,
                self.client_ca.as_deref(),
                self.client_required,
            ) {
                Ok(config) => {
                    self.current.store(Arc::new(config));
                    tracing::info!(cert = %self.cert.display(), "tls certificate reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tls files changed but do not load; keeping the previous certificate")
                }
            }
        }
        self.current.load_full()
    }
}

fn build(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    client_required: bool,
) -> anyhow::Result<ServerConfig> {
    let chain = read_certs(cert)?;
    let key = read_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(read_roots(ca)?), provider());
            let verifier = if client_required {
                verifier.build()?
            } else {
                verifier.allow_unauthenticated().build()?
            };
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| anyhow::anyhow!("certificate and key do not match: {e}"))?;
    // h2 for gRPC; http/1.1 for HTTP faces (OFREP) whose clients may not speak HTTP/2.
    // A gRPC listener still serves HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// What a handler can learn about the connection a call came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The verified client certificate chain (mutual TLS), leaf first.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

enum Io {
    Plain(TcpStream),
    /// Writes are gathered until HTTP/2 flushes: rustls makes one record (and the stream one
    /// write to the socket) per write it is given, and HTTP/2 writes every frame on its
    /// own, so unbuffered a small gRPC answer became several records and system calls.
    Tls(Box<tokio::io::BufWriter<TlsStream<TcpStream>>>),
}

/// Bytes gathered before they go to TLS (larger writes go straight through).
const TLS_WRITE_BUFFER: usize = 16 * 1024;

/// An accepted connection, plaintext or TLS, holding its slot under the connection cap.
pub struct Conn {
    io: Io,
    info: ConnInfo,
    _slot: OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Open connections at most; further clients wait in the kernel's backlog.
    pub max_connections: usize,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
}

/// Accepts connections until `stop`, completing TLS handshakes concurrently (a slow or
/// silent client never holds up others), and yields them to the server.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    limits: AcceptLimits,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(accept_loop(listener, tls, limits, stop, tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The accept loop of [`incoming`]: at most `limits.max_connections` open at once (a
/// connection holds its slot until it closes), each sent to `tx` in plaintext or handed to
/// a task of its own for the TLS handshake. Ends with `stop` or when the server is gone.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    limits: AcceptLimits,
    stop: CancellationToken,
    tx: tokio::sync::mpsc::Sender<io::Result<Conn>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let slot = tokio::select! {
            () = stop.cancelled() => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (socket, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small unary messages: do not wait to coalesce packets (without this a client
        // sending one call at a time waits ~40 ms per call for the delayed ACK).
        if let Err(e) = socket.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let Some(tls) = tls.clone() else {
            let conn = Conn {
                io: Io::Plain(socket),
                info: ConnInfo {
                    remote: Some(remote),
                    peer_certs: None,
                },
                _slot: slot,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
            continue;
        };
        tokio::spawn(handshake(
            tls,
            socket,
            remote,
            slot,
            limits.handshake_timeout,
            tx.clone(),
        ));
    }
}

/// Completes the TLS handshake of `socket` within `timeout` and sends the connection to
/// `tx`; a failed or timed-out handshake is logged (at debug) and frees its `slot`.
async fn handshake(
    tls: Arc<ServerTls>,
    socket: TcpStream,
    remote: SocketAddr,
    slot: OwnedSemaphorePermit,
    timeout: Duration,
    tx: tokio::sync::mpsc::Sender<io::Result<Conn>>,
) {
    let acceptor = TlsAcceptor::from(tls.config());
    match tokio::time::timeout(timeout, acceptor.accept(socket)).await {
        Ok(Ok(stream)) => {
            let peer_certs = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.to_vec()));
            let conn = Conn {
                io: Io::Tls(Box::new(tokio::io::BufWriter::with_capacity(
                    TLS_WRITE_BUFFER,
                    stream,
                ))),
                info: ConnInfo {
                    remote: Some(remote),
                    peer_certs,
                },
                _slot: slot,
            };
            let _ = tx.send(Ok(conn)).await;
        }
        Ok(Err(e)) => {
            tracing::debug!(peer = %remote, error = %e, "tls handshake failed")
        }
        Err(_) => tracing::debug!(peer = %remote, "tls handshake timed out"),
    }
}
