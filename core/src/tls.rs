//! TLS material with hot reload, for servers and for clients. Server side: a certificate
//! chain, its private key and an optional client CA bundle are read from PEM files,
//! validated, and turned into a `rustls::ServerConfig`. Client side (the broker's
//! connections to etcd): a CA bundle and an optional client certificate and key are
//! validated and handed out as PEM for the client library. Either is published on a
//! `tokio::sync::watch` channel: every new connection takes the latest one, and material
//! that fails validation never replaces material that works.
//!
//! The files are followed as [`crate::follow`] follows every file that changes (Secret
//! volumes swap a `..data` symlink; their directories are watched, events are debounced,
//! and a periodic re-check covers file systems that send no events at all).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{InconsistentKeys, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::follow::{self, Follow, Outcome, ReadError, StartError};

/// Why TLS material could not be loaded. Messages name the file so an operator can act,
/// and include the underlying error (no `source` chain, so it is printed once).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: no PEM certificate found", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: invalid PEM: {error}", path.display())]
    Pem {
        path: PathBuf,
        error: rustls_pki_types::pem::Error,
    },
    #[error("{}: unusable private key: {error}", path.display())]
    Key { path: PathBuf, error: rustls::Error },
    #[error("private key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: cannot read the certificate's validity: {reason}", path.display())]
    Validity { path: PathBuf, reason: String },
    #[error("{}: certificate expired at {}", path.display(), format_unix(*not_after))]
    Expired { path: PathBuf, not_after: i64 },
    #[error("{}: client CA bundle: {reason}", path.display())]
    ClientCa { path: PathBuf, reason: String },
    #[error("{}: CA bundle: {reason}", path.display())]
    Ca { path: PathBuf, reason: String },
    #[error("certificate {} does not chain to the CA bundle {}: {reason}", cert.display(), ca.display())]
    Untrusted {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error("{}: a client certificate and its key must be given together", path.display())]
    Unpaired { path: PathBuf },
    #[error("no TLS files given")]
    Nothing,
    #[error("building the TLS configuration: {0}")]
    Config(rustls::Error),
    #[error("the files kept changing while being read")]
    Unstable,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the serving material lives and how connections negotiate.
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for the leaf certificate.
    pub key: PathBuf,
    /// PEM bundle of CAs that client certificates must chain to. When set, clients must
    /// present a certificate; when unset, no client certificate is asked for.
    pub client_ca: Option<PathBuf>,
    /// ALPN protocols offered, in preference order.
    pub alpn: Vec<Vec<u8>>,
}

impl ServerTlsFiles {
    /// Certificate and key without client authentication, offering `h2` then `http/1.1`.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }

    pub fn with_client_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.client_ca = Some(path.into());
        self
    }

    pub fn with_alpn(mut self, protocols: &[&[u8]]) -> Self {
        self.alpn = protocols.iter().map(|p| p.to_vec()).collect();
        self
    }
}

impl Files for ServerTlsFiles {
    type Material = ServerTls;
    const WHAT: &'static str = "serving certificate";

    fn paths(&self) -> [Option<&Path>; 3] {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_deref()]
    }

    fn build(&self, raw: &RawFiles, now: i64) -> Result<ServerTls> {
        build(self, raw, now)
    }

    fn not_after(material: &ServerTls) -> i64 {
        material.not_after
    }
}

/// One validated set of serving material.
pub struct ServerTls {
    /// What connections are accepted with.
    config: Arc<ServerConfig>,
    /// The leaf certificate, so callers and tests can tell which material is in force.
    leaf: CertificateDer<'static>,
    /// The leaf's notAfter, for expiry metrics and alerts.
    not_after: i64,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("not_after", &format_unix(self.not_after))
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    pub fn leaf_certificate(&self) -> &CertificateDer<'static> {
        &self.leaf
    }

    /// The leaf certificate's notAfter as unix seconds.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after
    }
}

/// Reads and validates the files once.
pub fn load(files: &ServerTlsFiles) -> Result<ServerTls> {
    build(files, &read(files)?, unix_now())
}

/// A set of files that are read together and validated into one piece of material.
trait Files: Clone + Send + Sync + 'static {
    type Material: Send + Sync + 'static;
    /// What log lines call the material.
    const WHAT: &'static str;
    /// Certificate, key and CA bundle, each when configured.
    fn paths(&self) -> [Option<&Path>; 3];
    fn build(&self, raw: &RawFiles, now: i64) -> Result<Self::Material>;
    /// notAfter of the certificate the material is known by, unix seconds.
    fn not_after(material: &Self::Material) -> i64;

    /// The file log lines name: the certificate, or the CA bundle when there is none.
    fn shown(&self) -> PathBuf {
        self.paths()
            .into_iter()
            .flatten()
            .next()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }
}

/// Raw file contents, read together; `None` for files not configured.
struct RawFiles {
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    ca: Option<Vec<u8>>,
}

impl RawFiles {
    /// Puts the contents of the configured files, in the order of [`Files::paths`], back
    /// in their places.
    fn new(files: &impl Files, contents: &[Vec<u8>]) -> Self {
        let mut contents = contents.iter();
        let [cert, key, ca] = files
            .paths()
            .map(|p| p.and_then(|_| contents.next().cloned()));
        Self { cert, key, ca }
    }
}

/// The configured files, in the order of [`Files::paths`].
fn configured(files: &impl Files) -> Vec<PathBuf> {
    files
        .paths()
        .into_iter()
        .flatten()
        .map(Path::to_path_buf)
        .collect()
}

/// Reads the configured files once, consistently (see [`follow::read_together`]).
fn read(files: &impl Files) -> Result<RawFiles> {
    let contents = follow::read_together(&configured(files))?;
    Ok(RawFiles::new(files, &contents))
}

impl From<ReadError> for Error {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io { path, error } => Error::Read { path, error },
            ReadError::Unstable => Error::Unstable,
        }
    }
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| Error::Pem {
            path: path.to_owned(),
            error,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn build(files: &ServerTlsFiles, raw: &RawFiles, now: i64) -> Result<ServerTls> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (certified, not_after) = certified_key(
        (&files.cert, raw.cert.as_deref().unwrap_or_default()),
        (&files.key, raw.key.as_deref().unwrap_or_default()),
        &provider,
        now,
    )?;
    let leaf = certified.cert[0].clone();

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(Error::Config)?;
    let builder = match (&files.client_ca, &raw.ca) {
        (Some(path), Some(pem)) => {
            builder.with_client_cert_verifier(client_verifier(path, pem, &provider)?)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = files.alpn.clone();
    Ok(ServerTls {
        config: Arc::new(config),
        leaf,
        not_after,
    })
}

/// Parses a certificate chain and its key, and checks that the leaf has not expired and
/// that the key is the leaf's. Returns the pair and the leaf's notAfter.
fn certified_key(
    (cert_path, cert_pem): (&Path, &[u8]),
    (key_path, key_pem): (&Path, &[u8]),
    provider: &CryptoProvider,
    now: i64,
) -> Result<(CertifiedKey, i64)> {
    let chain = parse_certs(cert_path, cert_pem)?;
    let not_after = cert_not_after(&chain[0]).map_err(|reason| Error::Validity {
        path: cert_path.to_owned(),
        reason,
    })?;
    if not_after <= now {
        return Err(Error::Expired {
            path: cert_path.to_owned(),
            not_after,
        });
    }

    let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| Error::Pem {
        path: key_path.to_owned(),
        error,
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|error| Error::Key {
            path: key_path.to_owned(),
            error,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        // Every key type the ring provider loads can report its public key, so this only
        // happens with exotic keys; rustls itself accepts them, and so do we.
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            tracing::warn!(key = %key_path.display(), "cannot check that the private key matches the certificate");
        }
        Err(_) => {
            return Err(Error::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
    }
    Ok((certified, not_after))
}

fn client_verifier(
    path: &Path,
    pem: &[u8],
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(path, pem)? {
        roots.add(cert).map_err(|e| Error::ClientCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::ClientCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// What a reload attempt did, for callers that count reloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// New material is in force.
    Reloaded { not_after: i64 },
    /// New material was broken; the previous material stays in force.
    Rejected { error: String },
}

/// Called after every reload attempt that found changed files.
pub type ReloadHook = Arc<dyn Fn(&ReloadOutcome) + Send + Sync>;

/// How the reloader reacts to changes.
#[derive(Clone)]
pub struct ReloadOptions {
    /// Quiet time after the last file event before the files are read, so one Secret
    /// update (several events) causes one reload.
    pub debounce: Duration,
    /// Re-read this often even without events (file systems without inotify, missed events).
    pub recheck_every: Duration,
    /// Watch the files' directories for changes. Off means periodic re-checks only.
    pub watch_files: bool,
    /// Optional observer, e.g. to feed Prometheus counters.
    pub on_reload: Option<ReloadHook>,
}

impl Default for ReloadOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(250),
            recheck_every: Duration::from_secs(60),
            watch_files: true,
            on_reload: None,
        }
    }
}

impl fmt::Debug for ReloadOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadOptions")
            .field("debounce", &self.debounce)
            .field("recheck_every", &self.recheck_every)
            .field("watch_files", &self.watch_files)
            .field("on_reload", &self.on_reload.is_some())
            .finish()
    }
}

/// Reload counts, readable at any time (metrics collectors, tests).
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Reloads that put new material in force (the initial load is not counted).
    ok: AtomicU64,
    /// Changed material that was rejected.
    errors: AtomicU64,
    /// notAfter of the certificate in force, unix seconds.
    not_after: AtomicI64,
}

impl ReloadStats {
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// notAfter of the certificate in force, unix seconds.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }
}

/// The latest good material of one kind, kept current by a reloader. Cheap to clone.
#[derive(Debug)]
pub struct Source<M> {
    /// Always holds validated material; only the reloader sends.
    current: watch::Receiver<Arc<M>>,
    /// Shared with the reloader, which updates it.
    stats: Arc<ReloadStats>,
}

impl<M> Clone for Source<M> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
            stats: self.stats.clone(),
        }
    }
}

impl<M> Source<M> {
    /// Loads `files` now (failing if they are not usable) and keeps them current in a
    /// background task until `stop` is cancelled or every clone of the source is dropped.
    /// Must be called within a Tokio runtime.
    fn start_with<F: Files<Material = M>>(
        files: F,
        options: ReloadOptions,
        stop: CancellationToken,
    ) -> Result<Self> {
        let (current, stats) = start_reloader(files, options, stop)?;
        Ok(Self { current, stats })
    }

    /// The material in force.
    pub fn current(&self) -> Arc<M> {
        self.current.borrow().clone()
    }

    pub fn stats(&self) -> &Arc<ReloadStats> {
        &self.stats
    }

    /// A receiver that wakes up whenever new material is put in force.
    pub fn subscribe(&self) -> watch::Receiver<Arc<M>> {
        self.current.clone()
    }
}

/// Hands out acceptors built from the latest good material; servers keep one and call
/// [`TlsAcceptorSource::acceptor`] per connection.
pub type TlsAcceptorSource = Source<ServerTls>;

impl Source<ServerTls> {
    /// Material that never changes (tests, one-off tools).
    pub fn fixed(tls: ServerTls) -> Self {
        let stats = ReloadStats::default();
        stats.not_after.store(tls.not_after, Ordering::Relaxed);
        let (tx, rx) = watch::channel(Arc::new(tls));
        // The receiver keeps the last value after the sender is gone.
        drop(tx);
        Self {
            current: rx,
            stats: Arc::new(stats),
        }
    }

    /// See [`Source::start_with`].
    pub fn start(
        files: ServerTlsFiles,
        options: ReloadOptions,
        stop: CancellationToken,
    ) -> Result<Self> {
        Self::start_with(files, options, stop)
    }

    /// An acceptor for one new connection, using the latest good configuration.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current().config.clone())
    }
}

/// Where a client's material lives: the CA bundle that the server's certificate must
/// chain to, and the certificate and key the client presents (both or neither).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// PEM bundle of CAs trusted for the server's certificate.
    pub ca: Option<PathBuf>,
    /// PEM certificate chain presented to the server, leaf first.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert`.
    pub key: Option<PathBuf>,
}

impl Files for ClientTlsFiles {
    type Material = ClientTls;
    const WHAT: &'static str = "client certificate";

    fn paths(&self) -> [Option<&Path>; 3] {
        [
            self.cert.as_deref(),
            self.key.as_deref(),
            self.ca.as_deref(),
        ]
    }

    fn build(&self, raw: &RawFiles, now: i64) -> Result<ClientTls> {
        build_client(self, raw, now)
    }

    fn not_after(material: &ClientTls) -> i64 {
        material.not_after
    }
}

/// One validated set of client material, as PEM for the client library to parse.
pub struct ClientTls {
    /// The CA bundle, as read.
    ca: Option<Vec<u8>>,
    /// Certificate chain and key, as read.
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// notAfter of the client certificate or, without one, of the first CA to expire.
    not_after: i64,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .field("not_after", &format_unix(self.not_after))
            .finish()
    }
}

impl ClientTls {
    /// The CA bundle (PEM) the server's certificate must chain to.
    pub fn ca_pem(&self) -> Option<&[u8]> {
        self.ca.as_deref()
    }

    /// The client certificate chain and its private key (PEM), if one is presented.
    pub fn identity_pem(&self) -> Option<(&[u8], &[u8])> {
        self.identity
            .as_ref()
            .map(|(c, k)| (c.as_slice(), k.as_slice()))
    }

    /// notAfter of the client certificate (of the earliest CA without one), unix seconds.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after
    }
}

/// Reads and validates client material once.
pub fn load_client(files: &ClientTlsFiles) -> Result<ClientTls> {
    build_client(files, &read(files)?, unix_now())
}

/// Validates client material: every file parses, the certificate has not expired, the key
/// is the certificate's, and the certificate chains to the CA bundle (when both are given),
/// as the server will check. Servers that trust another CA for clients than the one that
/// signed their own certificate need that CA in the bundle too.
fn build_client(files: &ClientTlsFiles, raw: &RawFiles, now: i64) -> Result<ClientTls> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut not_after = None;
    let ca = match (&files.ca, &raw.ca) {
        (Some(path), Some(pem)) => {
            let certs = parse_certs(path, pem)?;
            let mut earliest = i64::MAX;
            for cert in &certs {
                let t = cert_not_after(cert).map_err(|reason| Error::Validity {
                    path: path.clone(),
                    reason,
                })?;
                earliest = earliest.min(t);
            }
            not_after = Some(earliest);
            Some((path, pem))
        }
        _ => None,
    };
    let identity = match (&files.cert, &raw.cert, &files.key, &raw.key) {
        (Some(cert_path), Some(cert_pem), Some(key_path), Some(key_pem)) => {
            let (certified, leaf_not_after) =
                certified_key((cert_path, cert_pem), (key_path, key_pem), &provider, now)?;
            if let Some((ca_path, ca_pem)) = ca {
                let verifier =
                    client_verifier(ca_path, ca_pem, &provider).map_err(|e| match e {
                        Error::ClientCa { path, reason } => Error::Ca { path, reason },
                        e => e,
                    })?;
                verifier
                    .verify_client_cert(
                        &certified.cert[0],
                        &certified.cert[1..],
                        rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
                            now.max(0) as u64,
                        )),
                    )
                    .map_err(|e| Error::Untrusted {
                        cert: cert_path.clone(),
                        ca: ca_path.clone(),
                        reason: e.to_string(),
                    })?;
            }
            not_after = Some(leaf_not_after);
            Some((cert_pem.clone(), key_pem.clone()))
        }
        (Some(path), _, None, _) | (None, _, Some(path), _) => {
            return Err(Error::Unpaired { path: path.clone() });
        }
        _ => None,
    };
    let Some(not_after) = not_after else {
        return Err(Error::Nothing);
    };
    Ok(ClientTls {
        ca: ca.map(|(_, pem)| pem.clone()),
        identity,
        not_after,
    })
}

/// Hands out the latest good client material; a client builds its connections from
/// [`Source::current`] and rebuilds them when [`Source::subscribe`] reports new material.
pub type ClientTlsSource = Source<ClientTls>;

impl Source<ClientTls> {
    /// See [`Source::start_with`].
    pub fn start(
        files: ClientTlsFiles,
        options: ReloadOptions,
        stop: CancellationToken,
    ) -> Result<Self> {
        Self::start_with(files, options, stop)
    }
}

/// The receiving end of a reloader: the material in force, and the reload counts.
type Published<M> = (watch::Receiver<Arc<M>>, Arc<ReloadStats>);

/// Loads `files` now (failing if they are not usable) and follows them until `stop` is
/// cancelled or every receiver is dropped.
fn start_reloader<F: Files>(
    files: F,
    options: ReloadOptions,
    stop: CancellationToken,
) -> Result<Published<F::Material>> {
    let stats = Arc::new(ReloadStats::default());
    let shown = files.shown();
    let parse = {
        let files = files.clone();
        move |contents: &[Vec<u8>]| files.build(&RawFiles::new(&files, contents), unix_now())
    };
    let on_outcome = {
        let stats = stats.clone();
        let shown = shown.clone();
        move |outcome: Outcome<'_, F::Material, Error>| {
            let outcome = match outcome {
                Outcome::Published(material) => {
                    let not_after = F::not_after(material);
                    stats.not_after.store(not_after, Ordering::Relaxed);
                    stats.ok.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        cert = %shown.display(),
                        not_after = %format_unix(not_after),
                        "new {} in force",
                        F::WHAT
                    );
                    ReloadOutcome::Reloaded { not_after }
                }
                Outcome::Rejected(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    ReloadOutcome::Rejected {
                        error: e.to_string(),
                    }
                }
                // Missing files are normal for a moment during some update schemes; the
                // next event or re-check tries again, and the old material stays.
                Outcome::Unreadable(_) => return,
                Outcome::Unchanged => return warn_if_expired::<F>(&stats, &shown),
            };
            if let Some(hook) = &options.on_reload {
                hook(&outcome);
            }
        }
    };
    let current = Follow::new(configured(&files), parse)
        .every(options.recheck_every)
        .debounce(options.debounce)
        .watch(options.watch_files)
        .refusal(
            tracing::Level::ERROR,
            format!(
                "rejected new TLS material; the previous {} stays in force",
                F::WHAT
            ),
        )
        .on_outcome(on_outcome)
        .start(stop)
        .map_err(|e| match e {
            StartError::Read(e) => e.into(),
            StartError::Parse(e) => e,
        })?;
    let not_after = F::not_after(&current.borrow());
    stats.not_after.store(not_after, Ordering::Relaxed);
    tracing::info!(
        cert = %shown.display(),
        not_after = %format_unix(not_after),
        "{} loaded",
        F::WHAT
    );
    Ok((current, stats))
}

/// Says so, at every re-check, while the material in force has expired.
fn warn_if_expired<F: Files>(stats: &ReloadStats, shown: &Path) {
    let not_after = stats.not_after_unix();
    if not_after <= unix_now() {
        tracing::error!(
            cert = %shown.display(),
            not_after = %format_unix(not_after),
            "the {} in force has expired and no valid replacement was found",
            F::WHAT
        );
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The notAfter of a DER certificate, as unix seconds. Signature checks are the peer's
/// business.
fn cert_not_after(der: &[u8]) -> Result<i64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`, for log lines and error messages.
pub fn format_unix(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} (unix seconds)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, Issuer, KeyPair, date_time_ymd};
    use std::fs;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA plus a way to mint leaf certificates from it.
    struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    impl TestCa {
        fn new() -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Self {
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// Returns (cert PEM, key PEM, notAfter unix seconds).
        fn leaf(&self, expires: (i32, u8, u8)) -> (String, String, i64) {
            let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            params.not_before = date_time_ymd(2019, 1, 1);
            params.not_after = date_time_ymd(expires.0, expires.1, expires.2);
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (
                cert.pem(),
                key.serialize_pem(),
                params.not_after.unix_timestamp(),
            )
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn loads_valid_material_and_reads_not_after() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let (cert, key, not_after) = ca.leaf((2090, 3, 4));
        let files = ServerTlsFiles::new(
            write(dir.path(), "tls.crt", &cert),
            write(dir.path(), "tls.key", &key),
        )
        .with_client_ca(write(dir.path(), "ca.crt", &ca.pem));
        let tls = load(&files).expect("valid material loads");
        assert_eq!(tls.not_after_unix(), not_after);
        assert_eq!(format_unix(not_after), "2090-03-04T00:00:00Z");
        assert_eq!(
            tls.config().alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let expected = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(tls.leaf_certificate(), &expected);
    }

    #[test]
    fn rejects_key_of_another_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let (cert, _, _) = ca.leaf((2090, 1, 1));
        let (_, other_key, _) = ca.leaf((2090, 1, 1));
        let files = ServerTlsFiles::new(
            write(dir.path(), "tls.crt", &cert),
            write(dir.path(), "tls.key", &other_key),
        );
        let err = load(&files).unwrap_err();
        assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn rejects_expired_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let (cert, key, _) = ca.leaf((2020, 1, 1));
        let files = ServerTlsFiles::new(
            write(dir.path(), "tls.crt", &cert),
            write(dir.path(), "tls.key", &key),
        );
        let err = load(&files).unwrap_err();
        assert!(matches!(err, Error::Expired { .. }), "{err}");
        assert!(
            err.to_string().contains("expired at 2020-01-01T00:00:00Z"),
            "{err}"
        );
    }

    #[test]
    fn rejects_garbage_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let files = ServerTlsFiles::new(
            write(dir.path(), "tls.crt", "not a certificate"),
            write(dir.path(), "tls.key", "not a key"),
        );
        assert!(matches!(load(&files), Err(Error::NoCertificate { .. })));
        let files =
            ServerTlsFiles::new(dir.path().join("absent.crt"), dir.path().join("absent.key"));
        assert!(matches!(load(&files), Err(Error::Read { .. })));
    }

    #[test]
    fn not_after_reads_both_certificate_time_forms() {
        let ca = TestCa::new();
        // Until 2049 a certificate's times are UTCTime, from 2050 GeneralizedTime.
        for (date, unix) in [
            ((2049, 12, 31), 2_524_521_600),
            ((2050, 1, 1), 2_524_608_000),
        ] {
            let (pem, _, _) = ca.leaf(date);
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(cert_not_after(&der), Ok(unix), "{date:?}");
        }
        let err = cert_not_after(b"\x30\x03\x02\x01").unwrap_err();
        assert!(err.starts_with("not a valid X.509 certificate"), "{err}");
        assert_eq!(format_unix(951_868_800), "2000-03-01T00:00:00Z");
        assert_eq!(format_unix(-1), "1969-12-31T23:59:59Z");
    }

    /// A directory laid out like a Kubernetes Secret volume: versioned directories, a
    /// `..data` symlink to the current one, and top-level symlinks through `..data`.
    struct SecretVolume {
        root: tempfile::TempDir,
        version: u32,
    }

    impl SecretVolume {
        fn new(cert: &str, key: &str) -> Self {
            let mut v = Self {
                root: tempfile::tempdir().unwrap(),
                version: 0,
            };
            v.publish(cert, key);
            for name in ["tls.crt", "tls.key"] {
                std::os::unix::fs::symlink(format!("..data/{name}"), v.root.path().join(name))
                    .unwrap();
            }
            v
        }

        /// Writes a new version and swaps `..data` with one rename, as the kubelet does.
        fn publish(&mut self, cert: &str, key: &str) {
            self.version += 1;
            let dir_name = format!("..2025_01_01_00_00_{:02}.{}", self.version, self.version);
            let dir = self.root.path().join(&dir_name);
            fs::create_dir(&dir).unwrap();
            fs::write(dir.join("tls.crt"), cert).unwrap();
            fs::write(dir.join("tls.key"), key).unwrap();
            let tmp = self.root.path().join("..data_tmp");
            std::os::unix::fs::symlink(&dir_name, &tmp).unwrap();
            fs::rename(&tmp, self.root.path().join("..data")).unwrap();
        }

        fn files(&self) -> ServerTlsFiles {
            ServerTlsFiles::new(
                self.root.path().join("tls.crt"),
                self.root.path().join("tls.key"),
            )
        }
    }

    /// Polls `cond` every 20 ms for up to 10 s.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    /// Completes a TLS handshake against `source` and returns the leaf the server presented.
    async fn served_leaf(source: &TlsAcceptorSource, ca_pem: &str) -> CertificateDer<'static> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = source.acceptor();
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(server_io).await.unwrap();
            tls.write_all(b"ok").await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, client_io).await.unwrap();
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.unwrap();
        assert_eq!(buf, b"ok");
        server.await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    fn recording_hook() -> (ReloadHook, Arc<std::sync::Mutex<Vec<ReloadOutcome>>>) {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        let hook: ReloadHook =
            Arc::new(move |o: &ReloadOutcome| sink.lock().unwrap().push(o.clone()));
        (hook, seen)
    }

    #[tokio::test]
    async fn symlink_swap_is_picked_up_and_served() {
        let ca = TestCa::new();
        let (cert1, key1, not_after1) = ca.leaf((2090, 1, 1));
        let (cert2, key2, not_after2) = ca.leaf((2091, 1, 1));
        let mut volume = SecretVolume::new(&cert1, &key1);
        let stop = CancellationToken::new();
        let (hook, seen) = recording_hook();
        let options = ReloadOptions {
            debounce: Duration::from_millis(50),
            on_reload: Some(hook),
            ..ReloadOptions::default()
        };
        let source = TlsAcceptorSource::start(volume.files(), options, stop.clone()).unwrap();
        assert_eq!(source.current().not_after_unix(), not_after1);
        let leaf1 = CertificateDer::from_pem_slice(cert1.as_bytes()).unwrap();
        assert_eq!(served_leaf(&source, &ca.pem).await, leaf1);

        volume.publish(&cert2, &key2);
        eventually("the new certificate is in force", || {
            source.current().not_after_unix() == not_after2
        })
        .await;
        let leaf2 = CertificateDer::from_pem_slice(cert2.as_bytes()).unwrap();
        assert_eq!(served_leaf(&source, &ca.pem).await, leaf2);
        assert_eq!(source.stats().ok(), 1);
        assert_eq!(source.stats().errors(), 0);
        assert_eq!(source.stats().not_after_unix(), not_after2);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![ReloadOutcome::Reloaded {
                not_after: not_after2
            }]
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn broken_replacement_keeps_the_old_material() {
        let ca = TestCa::new();
        let (cert1, key1, not_after1) = ca.leaf((2090, 1, 1));
        let (cert2, _, _) = ca.leaf((2091, 1, 1));
        let (expired, expired_key, _) = ca.leaf((2020, 6, 1));
        let (cert3, key3, not_after3) = ca.leaf((2092, 1, 1));
        let mut volume = SecretVolume::new(&cert1, &key1);
        let stop = CancellationToken::new();
        let (hook, seen) = recording_hook();
        let options = ReloadOptions {
            debounce: Duration::from_millis(50),
            on_reload: Some(hook),
            ..ReloadOptions::default()
        };
        let source = TlsAcceptorSource::start(volume.files(), options, stop.clone()).unwrap();

        // A certificate paired with the wrong key.
        volume.publish(&cert2, &key1);
        eventually("the mismatched pair is rejected", || {
            source.stats().errors() == 1
        })
        .await;
        // An expired certificate with its own key.
        volume.publish(&expired, &expired_key);
        eventually("the expired certificate is rejected", || {
            source.stats().errors() == 2
        })
        .await;
        assert_eq!(source.current().not_after_unix(), not_after1);
        assert_eq!(source.stats().ok(), 0);
        let leaf1 = CertificateDer::from_pem_slice(cert1.as_bytes()).unwrap();
        assert_eq!(served_leaf(&source, &ca.pem).await, leaf1);
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 2);
            assert!(
                matches!(&seen[0], ReloadOutcome::Rejected { error } if error.contains("does not match")),
                "{seen:?}"
            );
            assert!(
                matches!(&seen[1], ReloadOutcome::Rejected { error } if error.contains("expired")),
                "{seen:?}"
            );
        }

        // A good replacement after the broken ones still goes through.
        volume.publish(&cert3, &key3);
        eventually("the good replacement is in force", || {
            source.current().not_after_unix() == not_after3
        })
        .await;
        assert_eq!(source.stats().ok(), 1);
        stop.cancel();
    }

    #[tokio::test]
    async fn files_symlinked_from_another_directory_are_watched_there() {
        let ca = TestCa::new();
        let (cert1, key1, _) = ca.leaf((2090, 1, 1));
        let (cert2, key2, not_after2) = ca.leaf((2091, 1, 1));
        let links = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        let cert = write(store.path(), "tls.crt", &cert1);
        let key = write(store.path(), "tls.key", &key1);
        std::os::unix::fs::symlink(&cert, links.path().join("tls.crt")).unwrap();
        std::os::unix::fs::symlink(&key, links.path().join("tls.key")).unwrap();
        let stop = CancellationToken::new();
        let options = ReloadOptions {
            debounce: Duration::from_millis(50),
            ..ReloadOptions::default()
        };
        let files = ServerTlsFiles::new(links.path().join("tls.crt"), links.path().join("tls.key"));
        let source = TlsAcceptorSource::start(files, options, stop.clone()).unwrap();
        // Only the store directory sees these renames.
        write(store.path(), "new.crt", &cert2);
        write(store.path(), "new.key", &key2);
        fs::rename(store.path().join("new.key"), &key).unwrap();
        fs::rename(store.path().join("new.crt"), &cert).unwrap();
        eventually("the change in the link target's directory is seen", || {
            source.current().not_after_unix() == not_after2
        })
        .await;
        stop.cancel();
    }

    #[tokio::test]
    async fn periodic_recheck_works_without_events() {
        // Without file events (watching off, as on file systems that send none) a change
        // must still be found by the periodic re-check.
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let (cert1, key1, _) = ca.leaf((2090, 1, 1));
        let (cert2, key2, not_after2) = ca.leaf((2091, 1, 1));
        let files = ServerTlsFiles::new(
            write(dir.path(), "tls.crt", &cert1),
            write(dir.path(), "tls.key", &key1),
        );
        let stop = CancellationToken::new();
        let options = ReloadOptions {
            debounce: Duration::from_millis(10),
            recheck_every: Duration::from_millis(100),
            watch_files: false,
            on_reload: None,
        };
        let source = TlsAcceptorSource::start(files.clone(), options, stop.clone()).unwrap();
        // Write both files to a side name and rename, so no half-written file is read.
        write(dir.path(), "new.crt", &cert2);
        write(dir.path(), "new.key", &key2);
        fs::rename(dir.path().join("new.key"), &files.key).unwrap();
        fs::rename(dir.path().join("new.crt"), &files.cert).unwrap();
        eventually("the periodic re-check finds the change", || {
            source.current().not_after_unix() == not_after2
        })
        .await;
        stop.cancel();
    }

    #[tokio::test]
    async fn fixed_source_serves_its_material() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let (cert, key, not_after) = ca.leaf((2090, 1, 1));
        let files = ServerTlsFiles::new(
            write(dir.path(), "tls.crt", &cert),
            write(dir.path(), "tls.key", &key),
        );
        let source = TlsAcceptorSource::fixed(load(&files).unwrap());
        assert_eq!(source.stats().not_after_unix(), not_after);
        let leaf = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(served_leaf(&source, &ca.pem).await, leaf);
    }

    /// Name, CA bundle, certificate, key, and what loading them gives.
    type Case = (
        &'static str,
        Option<PathBuf>,
        Option<PathBuf>,
        Option<PathBuf>,
        Want,
    );

    /// What a client validation case expects.
    enum Want {
        Ok(i64),
        Err(&'static str),
    }

    #[test]
    fn client_material_validation() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let other_ca = TestCa::new();
        let (cert, key, not_after) = ca.leaf((2090, 3, 4));
        let (_, other_key, _) = ca.leaf((2090, 1, 1));
        let (expired, expired_key, _) = ca.leaf((2020, 1, 1));
        let (foreign, foreign_key, foreign_not_after) = other_ca.leaf((2091, 1, 1));
        let both_cas = format!("{}{}", ca.pem, other_ca.pem);
        let f = |name: &str, text: &str| Some(write(dir.path(), name, text));
        // CA bundle, certificate, key, expected outcome.
        let cases: Vec<Case> = vec![
            (
                "good",
                f("ca1", &ca.pem),
                f("c1", &cert),
                f("k1", &key),
                Want::Ok(not_after),
            ),
            (
                "certificate of another CA, trusted through a bundle of both",
                f("ca2", &both_cas),
                f("c2", &foreign),
                f("k2", &foreign_key),
                Want::Ok(foreign_not_after),
            ),
            (
                "CA only (server authentication, no client certificate)",
                f("ca3", &ca.pem),
                None,
                None,
                // rcgen's default notAfter, which the test CA keeps.
                Want::Ok(CertificateParams::default().not_after.unix_timestamp()),
            ),
            (
                "mismatched key",
                f("ca4", &ca.pem),
                f("c4", &cert),
                f("k4", &other_key),
                Want::Err("does not match"),
            ),
            (
                "expired certificate",
                f("ca5", &ca.pem),
                f("c5", &expired),
                f("k5", &expired_key),
                Want::Err("expired at 2020-01-01T00:00:00Z"),
            ),
            (
                "wrong CA",
                f("ca6", &ca.pem),
                f("c6", &foreign),
                f("k6", &foreign_key),
                Want::Err("does not chain to the CA bundle"),
            ),
            (
                "garbage certificate",
                f("ca7", &ca.pem),
                f("c7", "garbage"),
                f("k7", &key),
                Want::Err("no PEM certificate found"),
            ),
            (
                "garbage key",
                f("ca8", &ca.pem),
                f("c8", &cert),
                f(
                    "k8",
                    "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
                ),
                Want::Err("invalid PEM"),
            ),
            (
                "garbage CA",
                f("ca9", "garbage"),
                f("c9", &cert),
                f("k9", &key),
                Want::Err("no PEM certificate found"),
            ),
            (
                "certificate without key",
                f("ca10", &ca.pem),
                f("c10", &cert),
                None,
                Want::Err("must be given together"),
            ),
            ("nothing", None, None, None, Want::Err("no TLS files given")),
        ];
        for (name, ca_path, cert_path, key_path, want) in cases {
            let files = ClientTlsFiles {
                ca: ca_path,
                cert: cert_path.clone(),
                key: key_path,
            };
            match (load_client(&files), want) {
                (Ok(tls), Want::Ok(expected)) => {
                    assert_eq!(tls.not_after_unix(), expected, "{name}");
                    assert_eq!(tls.identity_pem().is_some(), cert_path.is_some(), "{name}");
                }
                (Err(e), Want::Err(text)) => {
                    assert!(e.to_string().contains(text), "{name}: {e}");
                }
                (Ok(_), Want::Err(text)) => panic!("{name}: accepted, wanted {text:?}"),
                (Err(e), Want::Ok(_)) => panic!("{name}: refused: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn client_source_swaps_to_new_material_and_keeps_old_on_garbage() {
        let ca = TestCa::new();
        let (cert1, key1, not_after1) = ca.leaf((2090, 1, 1));
        let (cert2, key2, not_after2) = ca.leaf((2091, 1, 1));
        let mut volume = SecretVolume::new(&cert1, &key1);
        let files = ClientTlsFiles {
            ca: None,
            cert: Some(volume.root.path().join("tls.crt")),
            key: Some(volume.root.path().join("tls.key")),
        };
        let stop = CancellationToken::new();
        let (hook, seen) = recording_hook();
        let options = ReloadOptions {
            debounce: Duration::from_millis(50),
            on_reload: Some(hook),
            ..ReloadOptions::default()
        };
        let source = ClientTlsSource::start(files, options, stop.clone()).unwrap();
        let mut changes = source.subscribe();
        assert_eq!(source.current().not_after_unix(), not_after1);
        volume.publish(&cert2, "garbage");
        eventually("the garbage key is rejected", || {
            source.stats().errors() == 1
        })
        .await;
        assert_eq!(source.current().not_after_unix(), not_after1);
        assert!(!changes.has_changed().unwrap(), "nothing new published");
        volume.publish(&cert2, &key2);
        tokio::time::timeout(Duration::from_secs(10), changes.changed())
            .await
            .expect("new material published")
            .unwrap();
        assert_eq!(changes.borrow().not_after_unix(), not_after2);
        let (published_cert, _) = source
            .current()
            .identity_pem()
            .map(|(c, k)| (c.to_vec(), k.to_vec()))
            .unwrap();
        assert_eq!(published_cert, cert2.as_bytes());
        assert!(matches!(
            &seen.lock().unwrap()[..],
            [
                ReloadOutcome::Rejected { .. },
                ReloadOutcome::Reloaded { .. }
            ]
        ));
        stop.cancel();
    }
}
