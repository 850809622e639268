//! Dialing the broker: resolve every `--broker` URL, try the addresses in the
//! [`Selector`]'s order with a short timeout each, and, for `https://`, verify the broker's
//! certificate against the CA bundle file (followed as it changes, so a rotated bundle
//! applies to the next connection). Plugged into hyper's client as its connector, so the
//! client keeps one HTTP/2 connection and dials again only when that one is gone.

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use etcd_shim_core::follow::{Follow, Outcome, ReadError, StartError};
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::endpoint::{Candidate, Endpoints, Selector};

/// How long an address that failed stays at the back of the dial order.
const FAILURE_MEMORY: Duration = Duration::from_secs(5);

/// Why the CA bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("reading broker CA bundle {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("broker CA bundle {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

/// The CAs the broker's certificate must chain to: from a PEM file that may change, or
/// from PEM text given on the command line.
#[derive(Debug)]
pub struct Trust {
    /// The last good configuration; for a file, kept current while the `Trust` lives.
    current: watch::Receiver<Arc<ClientConfig>>,
}

impl Trust {
    /// Reads the bundle now; a missing or broken file is an error (startup refuses it).
    /// Then follows the file until the `Trust` is dropped: a broken replacement keeps the
    /// last good bundle. Must be called within a Tokio runtime.
    pub fn load(path: &Path) -> Result<Self, TrustError> {
        let shown = path.to_owned();
        let parse = move |contents: &[Vec<u8>]| client_config(&shown, &contents[0]);
        let on_outcome = {
            let path = path.to_owned();
            move |outcome: Outcome<'_, ClientConfig, TrustError>| {
                if let Outcome::Published(_) = outcome {
                    tracing::info!(path = %path.display(), "broker CA bundle changed; new connections use it");
                }
            }
        };
        let current = Follow::new([path], parse)
            .refusal(
                tracing::Level::WARN,
                "keeping the previous broker CA bundle",
            )
            .on_outcome(on_outcome)
            .start(CancellationToken::new())
            .map_err(|e| match e {
                StartError::Parse(e) => e,
                StartError::Read(ReadError::Io { path, error }) => TrustError::Read { path, error },
                StartError::Read(e) => TrustError::Invalid {
                    path: path.to_owned(),
                    reason: e.to_string(),
                },
            })?;
        Ok(Self { current })
    }

    /// A bundle given as PEM text (`what` names it in errors).
    pub fn from_pem(what: &str, pem: &str) -> Result<Self, TrustError> {
        let config = client_config(Path::new(what), pem.as_bytes())?;
        // The receiver keeps the value after the sender is gone.
        let (_, current) = watch::channel(Arc::new(config));
        Ok(Self { current })
    }

    /// The configuration for a new connection: the file's current bundle, or the last
    /// good one if the file is now unreadable or broken.
    fn config(&self) -> Arc<ClientConfig> {
        self.current.borrow().clone()
    }
}

fn client_config(path: &Path, pem: &[u8]) -> Result<ClientConfig, TrustError> {
    let invalid = |reason: String| TrustError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| invalid(e.to_string()))?;
        roots.add(cert).map_err(|e| invalid(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid("no certificate in the file".into()));
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Dials the broker for hyper's client. Cheap to clone; clones share the failure memory.
#[derive(Clone, Debug)]
pub struct Dialer {
    inner: Arc<DialerInner>,
}

#[derive(Debug)]
struct DialerInner {
    endpoints: Endpoints,
    /// `None` for plaintext (`http://`).
    trust: Option<Trust>,
    /// Per address, for the TCP connect and again for the TLS handshake.
    timeout: Duration,
    selector: Mutex<Selector>,
}

impl Dialer {
    pub fn new(endpoints: Endpoints, trust: Option<Trust>, timeout: Duration) -> Self {
        let offset = RandomState::new().hash_one(std::process::id()) as usize;
        Self {
            inner: Arc::new(DialerInner {
                endpoints,
                trust,
                timeout,
                selector: Mutex::new(Selector::new(FAILURE_MEMORY, offset)),
            }),
        }
    }

    fn selector(&self) -> std::sync::MutexGuard<'_, Selector> {
        self.inner
            .selector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves every endpoint; names that do not resolve are skipped (and logged).
    async fn candidates(&self) -> Result<Vec<Candidate>, String> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for (i, ep) in self.inner.endpoints.list.iter().enumerate() {
            match tokio::time::timeout(
                self.inner.timeout,
                tokio::net::lookup_host(ep.lookup_name()),
            )
            .await
            {
                Ok(Ok(addrs)) => out.extend(addrs.map(|addr| Candidate { addr, endpoint: i })),
                Ok(Err(e)) => errors.push(format!("resolving {}: {e}", ep.host)),
                Err(_) => errors.push(format!("resolving {}: timed out", ep.host)),
            }
        }
        if out.is_empty() {
            return Err(errors.join("; "));
        }
        for e in errors {
            tracing::warn!(error = %e, "broker name does not resolve");
        }
        Ok(out)
    }

    /// Connects to the first address in dial order that answers.
    pub async fn dial(&self) -> Result<BrokerIo, io::Error> {
        let candidates = self
            .candidates()
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e))?;
        let order = self.selector().order(&candidates, Instant::now());
        let mut errors = Vec::with_capacity(order.len());
        for c in order {
            match self.dial_one(c).await {
                Ok(io) => {
                    self.selector().succeeded(c.addr);
                    tracing::info!(broker = %c.addr, "connected to broker");
                    return Ok(io);
                }
                Err(e) => {
                    self.selector().failed(c.addr, Instant::now());
                    tracing::warn!(broker = %c.addr, error = %e, "cannot connect to broker");
                    errors.push(format!("{}: {e}", c.addr));
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("no broker reachable ({})", errors.join("; ")),
        ))
    }

    async fn dial_one(&self, c: Candidate) -> Result<BrokerIo, String> {
        let timeout = self.inner.timeout;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(c.addr))
            .await
            .map_err(|_| format!("connect timed out after {timeout:?}"))?
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let Some(trust) = &self.inner.trust else {
            return Ok(BrokerIo::new(Stream::Plain(tcp), c.addr));
        };
        let host = &self.inner.endpoints.list[c.endpoint].host;
        let name = ServerName::try_from(host.clone())
            .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?;
        let connector = TlsConnector::from(trust.config());
        let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| format!("TLS handshake timed out after {timeout:?}"))?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        Ok(BrokerIo::new(Stream::Tls(Box::new(tls)), c.addr))
    }
}

impl tower_service::Service<Uri> for Dialer {
    type Response = BrokerIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<BrokerIo, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    /// The URI is the pool's key only; where to go is the dialer's business.
    fn call(&mut self, _: Uri) -> Self::Future {
        let d = self.clone();
        Box::pin(async move { d.dial().await })
    }
}

/// A connection to a broker.
type Stream = etcd_shim_core::serve::Stream<TlsStream<TcpStream>>;

/// One connection to a broker, plaintext or TLS.
pub struct BrokerIo {
    io: TokioIo<Stream>,
    /// The broker's address, for logs and tests.
    peer: SocketAddr,
}

impl BrokerIo {
    fn new(stream: Stream, peer: SocketAddr) -> Self {
        Self {
            io: TokioIo::new(stream),
            peer,
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The certificate the broker presented, if this is a TLS connection.
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        match self.io.inner() {
            Stream::Plain(_) => None,
            Stream::Tls(t) => t
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned()),
        }
    }
}

impl std::fmt::Debug for BrokerIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tls = matches!(self.io.inner(), Stream::Tls(_));
        f.debug_struct("BrokerIo")
            .field("peer", &self.peer)
            .field("tls", &tls)
            .finish()
    }
}

impl Connection for BrokerIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for BrokerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for BrokerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_shim_core::tls::{ServerTlsFiles, TlsAcceptorSource, load};
    use rcgen::{CertificateParams, Issuer, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn ca() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A TLS server on 127.0.0.1 for `names`, answering "ok" to every connection.
    async fn tls_server(ca: &Ca, names: &[&str], dir: &Path) -> SocketAddr {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let source =
            TlsAcceptorSource::fixed(load(&ServerTlsFiles::new(c, k).with_alpn(&[b"h2"])).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = source.acceptor();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.write_all(b"ok").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    async fn read_all(io: BrokerIo) -> Vec<u8> {
        let Stream::Tls(mut tls) = io.io.into_inner() else {
            panic!("expected TLS")
        };
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn verifies_the_broker_and_skips_dead_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let good = ca();
        let server = tls_server(&good, &["127.0.0.1"], dir.path()).await;
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, &good.pem).unwrap();
        let dead = closed_port();
        let urls = format!("https://{dead},https://{server}");
        let dialer = Dialer::new(
            Endpoints::parse(&urls).unwrap(),
            Some(Trust::load(&ca_file).unwrap()),
            Duration::from_secs(1),
        );
        for _ in 0..3 {
            let io = dialer.dial().await.expect("the live broker is reached");
            assert_eq!(io.peer(), server);
            assert!(io.peer_certificate().is_some());
            assert_eq!(read_all(io).await, b"ok");
        }
        // The dead address was tried at most once, then held back.
        assert_eq!(
            dialer.selector().order(
                &[
                    Candidate {
                        addr: dead,
                        endpoint: 0
                    },
                    Candidate {
                        addr: server,
                        endpoint: 1
                    }
                ],
                Instant::now()
            )[0]
            .addr,
            server
        );

        // A bundle without the broker's CA: refused, with the reason, once it is read.
        let other = ca();
        std::fs::write(&ca_file, &other.pem).unwrap();
        let mut err = String::new();
        for _ in 0..500 {
            match dialer.dial().await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => {
                    err = e.to_string();
                    break;
                }
            }
        }
        assert!(
            err.contains("TLS handshake") && err.contains("certificate"),
            "{err}"
        );

        // Unreadable later: the last good bundle (now the wrong one) stays.
        std::fs::write(&ca_file, "garbage").unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(dialer.dial().await.is_err());
        std::fs::write(&ca_file, &good.pem).unwrap();
        let mut ok = false;
        for _ in 0..500 {
            if dialer.dial().await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ok, "the good bundle is back in force");
    }

    #[tokio::test]
    async fn the_name_in_the_url_must_be_in_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let good = ca();
        let server = tls_server(&good, &["broker.example"], dir.path()).await;
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, &good.pem).unwrap();
        let dialer = Dialer::new(
            Endpoints::parse(&format!("https://{server}")).unwrap(),
            Some(Trust::load(&ca_file).unwrap()),
            Duration::from_secs(1),
        );
        let err = dialer.dial().await.unwrap_err().to_string();
        assert!(err.contains("certificate"), "{err}");
    }

    #[test]
    fn a_bundle_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.crt");
        std::fs::write(&f, "no pem here").unwrap();
        let err = Trust::load(&f).unwrap_err().to_string();
        assert!(err.contains("no certificate"), "{err}");
        assert!(Trust::load(&dir.path().join("absent")).is_err());
    }
}
