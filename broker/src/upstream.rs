//! Calls to etcd. Uses tonic's generic gRPC client on etcd's method paths, since the
//! generated clients are not exported, and decodes responses of any size etcd sends.
//!
//! A backend is a pool with one connection per etcd member. Each call goes to the next
//! member that is not known to be down; a call that could not even connect moves on to
//! the next member (nothing was sent, so this is safe for writes too), while a call that
//! may have reached etcd is never repeated: it ends with Unavailable and the client
//! decides. With TLS, the client credentials are followed on disk; new material builds a
//! new pool that new calls take, while calls and streams already running keep the pool
//! they started on until they end.

use std::error::Error as _;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use etcd_shim_core::tls::{
    ClientTls, ClientTlsFiles, ClientTlsSource, ReloadHook, ReloadOptions, ReloadOutcome,
};
use http::uri::PathAndQuery;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::client::Grpc;
use tonic::metadata::MetadataMap;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::{Metrics, Name, UpstreamLabels};
use crate::outbox::{Gone, Outbox};

/// Metadata that a downstream call carries and etcd must see too: `hasleader` makes
/// etcd refuse watches when it has no leader, `grpc-timeout` bounds the call.
const FORWARDED_METADATA: &[&str] = &["hasleader", "grpc-timeout"];

/// How long a member that failed is skipped after its first failure; doubled per further
/// failure up to [`MAX_DOWN`], reset by a success.
const FIRST_DOWN: Duration = Duration::from_millis(500);
const MAX_DOWN: Duration = Duration::from_secs(30);

/// Connections to one etcd cluster. Cheap to clone; the credential reloader stops with
/// the last clone.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The pool new calls use; replaced whole when the credentials change.
    current: watch::Receiver<Arc<Pool>>,
    /// Stops the credential reloader when the last clone is dropped.
    _stop: Option<Arc<DropGuard>>,
    /// Where the time etcd takes for each unary call is recorded.
    timing: Option<Timing>,
}

/// The backend's name and the histograms its calls are timed in.
#[derive(Clone)]
struct Timing {
    backend: Name,
    latency: Family<UpstreamLabels, Histogram>,
}

impl std::fmt::Debug for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timing")
            .field("backend", &self.backend)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid etcd endpoint {endpoint:?}: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("no etcd endpoints given")]
    NoEndpoints,
    #[error("etcd endpoint {0:?} is not https://, but TLS files are given")]
    PlaintextWithTls(String),
    #[error("etcd endpoint {0:?} is https:// and needs a CA bundle")]
    HttpsWithoutCa(String),
    #[error("etcd client TLS: {0}")]
    Tls(#[from] etcd_shim_core::tls::Error),
}

/// What every backend's credentials are reloaded and reported with.
#[derive(Clone, Default)]
pub struct Connector {
    /// Where credential reloads and certificate expiry are reported.
    metrics: Option<Metrics>,
    /// Stops every backend's reloader (broker shutdown).
    stop: CancellationToken,
}

impl Connector {
    pub fn new(metrics: Metrics, stop: CancellationToken) -> Self {
        Self {
            metrics: Some(metrics),
            stop,
        }
    }
}

/// The client TLS files of a backend, as the config file names them.
pub fn client_files(tls: &crate::config::BackendTls) -> ClientTlsFiles {
    ClientTlsFiles {
        ca: tls.ca.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
    }
}

impl Upstream {
    /// Plaintext connections to every endpoint, made lazily, so the broker starts while
    /// etcd is still down.
    pub fn new(endpoints: &[String]) -> Result<Self, UpstreamError> {
        let pool = Pool::build(endpoints, None)?;
        let (_tx, current) = watch::channel(Arc::new(pool));
        // The receiver keeps the last value after the sender is gone.
        Ok(Self {
            current,
            _stop: None,
            timing: None,
        })
    }

    /// Records the latency of each unary call as `backend`'s, if `connector` has metrics.
    fn timed(mut self, backend: &str, connector: &Connector) -> Self {
        self.timing = connector.metrics.as_ref().map(|m| Timing {
            backend: Name(Arc::from(backend)),
            latency: m.upstream_latency.clone(),
        });
        self
    }

    /// Connections for `backend`, over TLS when `tls` is given. The files are loaded and
    /// validated now (an error if they are unusable), then followed: valid new material
    /// is used for new connections, broken material is refused with a log line and
    /// `etcd_broker_credential_reloads_total{outcome="failure"}`.
    pub fn start(
        backend: &str,
        endpoints: &[String],
        tls: Option<ClientTlsFiles>,
        connector: &Connector,
    ) -> Result<Self, UpstreamError> {
        let Some(files) = tls else {
            if let Some(e) = endpoints.iter().find(|e| e.starts_with("https://")) {
                return Err(UpstreamError::HttpsWithoutCa(e.clone()));
            }
            return Ok(Self::new(endpoints)?.timed(backend, connector));
        };
        if let Some(e) = endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(UpstreamError::PlaintextWithTls(e.clone()));
        }
        if files.ca.is_none() {
            let first = endpoints.first().ok_or(UpstreamError::NoEndpoints)?;
            return Err(UpstreamError::HttpsWithoutCa(first.clone()));
        }
        let stop = connector.stop.child_token();
        let options = ReloadOptions {
            on_reload: connector
                .metrics
                .clone()
                .map(|m| reload_hook(m, backend.to_owned())),
            ..ReloadOptions::default()
        };
        let source = ClientTlsSource::start(files.clone(), options, stop.clone())?;
        let material = source.current();
        let pool = Pool::build(endpoints, Some(&material))?;
        if let Some(m) = &connector.metrics {
            m.credential_expiry(backend, material.not_after_unix());
        }
        let (tx, current) = watch::channel(Arc::new(pool));
        tokio::spawn(follow(
            backend.to_owned(),
            endpoints.to_vec(),
            files.cert.or(files.ca).unwrap_or_default(),
            source,
            tx,
            stop.clone(),
        ));
        Ok(Self {
            current,
            _stop: Some(Arc::new(stop.drop_guard())),
            timing: None,
        }
        .timed(backend, connector))
    }

    fn pool(&self) -> Arc<Pool> {
        self.current.borrow().clone()
    }

    pub async fn unary<Req, Resp>(
        &self,
        path: &'static str,
        req: Request<Req>,
    ) -> Result<Response<Resp>, Status>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.unary_within(path, req, usize::MAX).await
    }

    /// Like [`Upstream::unary`], for an answer of at most `max_bytes`: a larger one is
    /// refused from its length, before any of it is buffered ([`too_large`]).
    pub async fn unary_within<Req, Resp>(
        &self,
        path: &'static str,
        req: Request<Req>,
        max_bytes: usize,
    ) -> Result<Response<Resp>, Status>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let (md, _, msg) = req.into_parts();
        let pool = self.pool();
        let started = Instant::now();
        let res = pool
            .call(Kind::Unary, |channel| {
                let req = Request::from_parts(md.clone(), Default::default(), msg.clone());
                Some(async move {
                    let mut grpc = grpc(channel).max_decoding_message_size(max_bytes);
                    grpc.ready().await.map_err(not_sent)?;
                    grpc.unary(req, PathAndQuery::from_static(path), ProstCodec::default())
                        .await
                })
            })
            .await
            .map(|(_, resp)| resp);
        if let Some(t) = &self.timing {
            // The method is the path's last segment: "/etcdserverpb.KV/Range" -> "Range".
            let method = path.rsplit('/').next().unwrap_or(path);
            t.latency
                .get_or_create(&UpstreamLabels {
                    backend: t.backend.clone(),
                    method,
                })
                .observe(started.elapsed().as_secs_f64());
        }
        res
    }

    pub async fn server_streaming<Req, Resp>(
        &self,
        path: &'static str,
        req: Request<Req>,
    ) -> Result<Response<UpstreamStream<Resp>>, Status>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let (md, _, msg) = req.into_parts();
        let pool = self.pool();
        let (member, resp) = pool
            .call(Kind::Stream, |channel| {
                let req = Request::from_parts(md.clone(), Default::default(), msg.clone());
                Some(async move {
                    let mut grpc = grpc(channel);
                    grpc.ready().await.map_err(not_sent)?;
                    grpc.server_streaming(
                        req,
                        PathAndQuery::from_static(path),
                        ProstCodec::default(),
                    )
                    .await
                })
            })
            .await?;
        Ok(wrap(resp, pool, member))
    }

    pub async fn streaming<S, Req, Resp>(
        &self,
        path: &'static str,
        req: Request<S>,
    ) -> Result<Response<UpstreamStream<Resp>>, Status>
    where
        S: tokio_stream::Stream<Item = Req> + Send + 'static,
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let (md, _, body) = req.into_parts();
        // The body can be sent only once. It sits in a slot that the first poll empties, so
        // after a failed attempt a still-full slot proves nothing was sent.
        let slot = Arc::new(Mutex::new(Some(Box::pin(body))));
        let pool = self.pool();
        let (member, resp) = pool
            .call(Kind::Stream, |channel| {
                if slot.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
                    // A failed attempt started sending; it may have reached etcd.
                    return None;
                }
                let req = Request::from_parts(
                    md.clone(),
                    Default::default(),
                    Handoff {
                        slot: slot.clone(),
                        taken: None,
                    },
                );
                Some(async move {
                    let mut grpc = grpc(channel);
                    grpc.ready().await.map_err(not_sent)?;
                    grpc.streaming(req, PathAndQuery::from_static(path), ProstCodec::default())
                        .await
                })
            })
            .await?;
        Ok(wrap(resp, pool, member))
    }
}

fn grpc(channel: Channel) -> Grpc<Channel> {
    Grpc::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

fn wrap<T>(
    resp: Response<Streaming<T>>,
    pool: Arc<Pool>,
    member: usize,
) -> Response<UpstreamStream<T>> {
    let (md, inner, ext) = resp.into_parts();
    Response::from_parts(
        md,
        UpstreamStream {
            inner,
            pool,
            member,
        },
        ext,
    )
}

/// Keeps a backend's pool in step with its credentials until `stop`.
async fn follow(
    backend: String,
    endpoints: Vec<String>,
    shown: PathBuf,
    source: ClientTlsSource,
    tx: watch::Sender<Arc<Pool>>,
    stop: CancellationToken,
) {
    let mut changes = source.subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        let material = changes.borrow_and_update().clone();
        match Pool::build(&endpoints, Some(&material)) {
            Ok(pool) => {
                // Calls already running hold the old pool and finish on it; it is dropped
                // with the last of them.
                tx.send_replace(Arc::new(pool));
                tracing::info!(%backend, cert = %shown.display(), "new etcd connections use the new client credentials");
            }
            Err(e) => {
                tracing::error!(%backend, error = %e, "cannot build etcd connections from the new credentials; keeping the previous ones");
            }
        }
    }
}

/// Counts reloads of `backend`'s credentials and tracks the expiry of those in force.
fn reload_hook(metrics: Metrics, backend: String) -> ReloadHook {
    Arc::new(move |outcome: &ReloadOutcome| match outcome {
        ReloadOutcome::Reloaded { not_after } => {
            metrics.credential_reloaded(&backend, true);
            metrics.credential_expiry(&backend, *not_after);
        }
        ReloadOutcome::Rejected { .. } => metrics.credential_reloaded(&backend, false),
    })
}

/// One connection per member, built from one set of credentials.
#[derive(Debug)]
struct Pool {
    members: Vec<Member>,
    /// Round-robin position, so load spreads over the members.
    next: AtomicUsize,
    /// Origin of the members' `down_until` times.
    epoch: Instant,
}

/// The flow-control window of each stream from etcd: what etcd may send for one stream
/// before the broker reads it. A stream whose client stops reading holds this much, and
/// its outbox ([`crate::outbox::BUDGET`]), until it is ended as slow.
pub const STREAM_WINDOW: u32 = 256 << 10;
/// The window of the connection that carries the streams: large enough that streams
/// whose clients stopped reading (each holding [`STREAM_WINDOW`]) would have to number
/// 4,096 before etcd had to stop sending for the others, far above any tenant's watches.
const STREAMS_CONNECTION_WINDOW: u32 = 1 << 30;

/// Which of a member's connections a call goes on.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Unary,
    Stream,
}

#[derive(Debug)]
struct Member {
    endpoint: String,
    /// Unary calls.
    channel: Channel,
    /// Streams (Watch, LeaseKeepAlive, Observe, RangeStream), on a connection of their
    /// own: data etcd sent for a stream whose client does not read holds the flow-control
    /// window of its connection until the stream ends, and must not hold up anyone's
    /// unary calls. Its streams' windows are small and the connection's is not, so such
    /// a stream holds at most [`STREAM_WINDOW`] and never the connection.
    streams: Channel,
    /// Failures in a row; sets how long the member is skipped.
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the member is tried only after the others.
    down_until: AtomicU64,
}

impl Pool {
    fn build(endpoints: &[String], tls: Option<&ClientTls>) -> Result<Self, UpstreamError> {
        if endpoints.is_empty() {
            return Err(UpstreamError::NoEndpoints);
        }
        let mut members = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let bad = |source| UpstreamError::Endpoint {
                endpoint: e.clone(),
                source,
            };
            let mut ep = Endpoint::from_shared(e.clone())
                .map_err(bad)?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            if let Some(tls) = tls {
                let mut config = ClientTlsConfig::new();
                if let Some(ca) = tls.ca_pem() {
                    config = config.ca_certificate(Certificate::from_pem(ca));
                }
                if let Some((cert, key)) = tls.identity_pem() {
                    config = config.identity(Identity::from_pem(cert, key));
                }
                ep = ep.tls_config(config).map_err(bad)?;
            }
            let unary = ep
                .clone()
                .initial_stream_window_size(Some(4 << 20))
                .initial_connection_window_size(Some(8 << 20));
            let streams = ep
                .initial_stream_window_size(Some(STREAM_WINDOW))
                .initial_connection_window_size(Some(STREAMS_CONNECTION_WINDOW));
            members.push(Member {
                endpoint: e.clone(),
                channel: unary.connect_lazy(),
                streams: streams.connect_lazy(),
                failures: AtomicU32::new(0),
                down_until: AtomicU64::new(0),
            });
        }
        Ok(Self {
            members,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Runs `attempt` on members in turn: the ones not known to be down first, in
    /// round-robin order, then the others. Moves on only when an attempt sent nothing
    /// (and `attempt` can go again: `None` means it cannot); returns the answer and which
    /// member gave it.
    async fn call<T, F, Fut>(&self, kind: Kind, mut attempt: F) -> Result<(usize, T), Status>
    where
        F: FnMut(Channel) -> Option<Fut>,
        Fut: Future<Output = Result<T, Status>>,
    {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        // Decided once, so that no member is tried twice in one call. (Members past the
        // 64th count as up.)
        let mut down = 0u64;
        for (i, m) in self.members.iter().enumerate().take(64) {
            if m.down_until.load(Ordering::Relaxed) > now {
                down |= 1 << i;
            }
        }
        let mut last = None;
        'members: for skipped in [false, true] {
            for i in 0..n {
                let index = (start + i) % n;
                let m = &self.members[index];
                if (index < 64 && down & (1 << index) != 0) != skipped {
                    continue;
                }
                let channel = match kind {
                    Kind::Unary => &m.channel,
                    Kind::Stream => &m.streams,
                };
                let Some(fut) = attempt(channel.clone()) else {
                    break 'members;
                };
                match fut.await {
                    Ok(v) => {
                        m.succeeded();
                        return Ok((index, v));
                    }
                    Err(s) if never_sent(&s) => {
                        tracing::debug!(endpoint = %m.endpoint, error = %s.message(), "etcd member unreachable; trying the next one");
                        self.failed(m);
                        last = Some(s);
                    }
                    Err(s) => {
                        if blames_member(&s) {
                            self.failed(m);
                        } else {
                            m.succeeded();
                        }
                        return Err(clean(s));
                    }
                }
            }
        }
        Err(last
            .map(clean)
            .unwrap_or_else(|| Status::unavailable("etcd is unreachable")))
    }

    fn failed(&self, m: &Member) {
        let failures = m.failures.fetch_add(1, Ordering::Relaxed).min(16);
        let down = FIRST_DOWN.saturating_mul(1 << failures).min(MAX_DOWN);
        if failures == 0 {
            tracing::warn!(endpoint = %m.endpoint, "etcd member unreachable; moving calls to the other members");
        }
        m.down_until
            .store(self.now_ms() + down.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Member {
    fn succeeded(&self) {
        if self.failures.swap(0, Ordering::Relaxed) > 0 {
            tracing::info!(endpoint = %self.endpoint, "etcd member reachable again");
            self.down_until.store(0, Ordering::Relaxed);
        }
    }
}

/// Messages of a streaming response from etcd. Holds the pool it was opened on, so the
/// connection stays up for as long as the stream is read, whatever the credentials
/// in force meanwhile.
#[derive(Debug)]
pub struct UpstreamStream<T> {
    inner: Streaming<T>,
    pool: Arc<Pool>,
    member: usize,
}

impl<T> UpstreamStream<T> {
    /// The next message, `None` at the end, or the error that ended the stream
    /// (Unavailable when the connection failed rather than etcd answering).
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        self.inner.message().await.map_err(|s| {
            if blames_member(&s) {
                self.pool.failed(&self.pool.members[self.member]);
            }
            clean(s)
        })
    }
}

impl<T: Send + 'static> UpstreamStream<T> {
    /// Opens a stream to etcd with `open`, unless the client goes away or the broker
    /// shuts down first; `None` then, the client told why (etcd's refusal, or the
    /// broker stopping).
    pub async fn open<U>(
        open: impl Future<Output = Result<Response<Self>, Status>>,
        tx: &Outbox<U>,
        shutdown: &CancellationToken,
    ) -> Option<Self> {
        tokio::select! {
            opened = open => match opened {
                Ok(resp) => Some(resp.into_inner()),
                Err(status) => {
                    tx.fail(status);
                    None
                }
            },
            _ = shutdown.cancelled() => {
                tx.fail(shutting_down());
                None
            }
            _ = tx.closed() => None,
        }
    }

    /// Relays the stream to a client through `tx` until it ends, the client goes away
    /// or stops reading, or the broker shuts down. Each message becomes what `each`
    /// makes of it: the answers to send, none to drop it, and how long to wait before
    /// sending them (pacing). The first error ends the relay, as it ends a gRPC stream.
    /// `hold` (a concurrency permit, a gauge's count) lives as long as the relay.
    pub fn relay<U, I, H>(
        mut self,
        tx: Outbox<U>,
        shutdown: CancellationToken,
        hold: H,
        mut each: impl FnMut(T) -> (Duration, I) + Send + 'static,
    ) where
        U: prost::Message + Send + 'static,
        I: IntoIterator<Item = U> + Send,
        I::IntoIter: Send,
        H: Send + 'static,
    {
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let _hold = hold;
            let stopped = || async {
                tokio::select! {
                    _ = shutdown.cancelled() => tx.fail(shutting_down()),
                    _ = tx.closed() => {}
                }
            };
            loop {
                let msg = tokio::select! {
                    m = self.message() => m,
                    _ = stopped() => break,
                };
                let (wait, answers) = match msg {
                    Ok(Some(m)) => each(m),
                    Ok(None) => break,
                    Err(status) => {
                        tx.fail(status);
                        break;
                    }
                };
                if !wait.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stopped() => break,
                    }
                }
                for answer in answers {
                    match tx.send(answer).await {
                        Ok(()) => {}
                        Err(Gone::Slow) => {
                            tracing::warn!("client too slow to keep up, ending its stream");
                            return;
                        }
                        Err(Gone::Closed) => return,
                    }
                }
            }
        }));
    }
}

/// What a client whose stream the broker ends on shutdown is told: etcd's own words for
/// a stopping server (Unavailable, so clientv3 resumes watches on another endpoint).
pub fn shutting_down() -> Status {
    Status::unavailable("etcdserver: server stopped")
}

/// A request body handed over through a shared slot on its first poll; see
/// [`Upstream::streaming`].
struct Handoff<S> {
    slot: Arc<Mutex<Option<Pin<Box<S>>>>>,
    taken: Option<Pin<Box<S>>>,
}

impl<S: tokio_stream::Stream> tokio_stream::Stream for Handoff<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.taken.is_none() {
            let body = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            self.taken = body;
        }
        match self.taken.as_mut() {
            Some(s) => s.as_mut().poll_next(cx),
            // Another attempt took the body; this one has nothing to send.
            None => Poll::Ready(None),
        }
    }
}

impl<S> Unpin for Handoff<S> {}

/// Whether a call of [`Upstream::unary_within`] was refused for an answer above its bound
/// (tonic's words for it; etcd's own OutOfRange errors say otherwise).
pub fn too_large(s: &Status) -> bool {
    s.code() == Code::OutOfRange
        && s.message()
            .starts_with("Error, decoded message length too large")
}

/// Whether a call failed before anything was sent: connecting failed (refused, timed
/// out, TLS handshake refused), so the request never left the broker.
fn never_sent(s: &Status) -> bool {
    let mut source = s.source();
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() || e.is::<NotSent>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether a status was made from a transport failure rather than sent by etcd (etcd's
/// own statuses come from response headers and carry no source error).
fn is_transport(s: &Status) -> bool {
    s.source().is_some()
}

/// Whether a failure says the member is unwell. The client's own deadline running out
/// (`grpc-timeout`, which the broker's client enforces) says nothing about the member:
/// counting it would let one tenant mark members down for everyone.
fn blames_member(s: &Status) -> bool {
    is_transport(s) && !matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled)
}

/// Marks a channel that would not take the call.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NotSent(tonic::transport::Error);

fn not_sent(e: tonic::transport::Error) -> Status {
    let mut s = Status::unavailable(format!("etcd is unreachable: {e}"));
    s.set_source(Arc::new(NotSent(e)));
    s
}

/// Keeps etcd's code and message, byte-identical, and nothing else: clientv3 matches
/// errors by message, and etcd's response metadata must not leak to tenants. A call that
/// failed in transport (etcd unreachable, connection lost) becomes Unavailable, which
/// clients retry for reads and resume watches on.
pub fn clean(s: Status) -> Status {
    if is_transport(&s) && !matches!(s.code(), Code::Cancelled | Code::DeadlineExceeded) {
        let message = s.message();
        if message.starts_with("etcd is unreachable") {
            return Status::unavailable(message.to_owned());
        }
        return Status::unavailable(format!("etcd is unreachable: {message}"));
    }
    Status::new(s.code(), s.message().to_owned())
}

/// Wraps `msg` in a request that carries the forwarded metadata of `from`.
pub fn request_from<T>(from: &MetadataMap, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    for key in FORWARDED_METADATA {
        if let Some(v) = from.get(*key) {
            req.metadata_mut().insert(*key, v.clone());
        }
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_member_failures_mark_a_member_down() {
        let with_source = |mut s: Status| {
            s.set_source(Arc::new(std::io::Error::other("underneath")));
            s
        };
        // A connection that broke blames the member.
        assert!(blames_member(&with_source(Status::unknown(
            "connection reset"
        ))));
        // The client's own grpc-timeout running out, or the client going away, does not:
        // a tenant could otherwise send tiny deadlines and mark members down for all.
        assert!(!blames_member(&with_source(Status::deadline_exceeded(
            "Timeout expired"
        ))));
        assert!(!blames_member(&with_source(Status::cancelled("gone"))));
        // etcd's own answers carry no source error.
        assert!(!blames_member(&Status::unavailable(
            "etcdserver: request timed out"
        )));
    }

    #[test]
    fn transport_failures_become_unavailable_and_etcd_errors_pass_through() {
        let etcd = Status::new(
            Code::FailedPrecondition,
            "etcdserver: requested lease not found",
        );
        let cleaned = clean(etcd);
        assert_eq!(cleaned.code(), Code::FailedPrecondition);
        assert_eq!(cleaned.message(), "etcdserver: requested lease not found");
        assert!(!never_sent(&cleaned));

        let mut broken = Status::unknown("connection reset");
        broken.set_source(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(!never_sent(&broken), "may have reached etcd");
        let cleaned = clean(broken);
        assert_eq!(cleaned.code(), Code::Unavailable);
        assert_eq!(cleaned.message(), "etcd is unreachable: connection reset");
        assert!(cleaned.source().is_none());
    }

    #[tokio::test]
    async fn a_refused_connection_moves_on_to_the_next_member() {
        // Nothing listens on a port just freed; the second member does not exist either,
        // so every attempt is refused and the call ends with Unavailable after trying both.
        let dead = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let up = Upstream::new(&[dead(), dead()]).unwrap();
        let err = up
            .unary::<_, etcd_client::proto::PbStatusResponse>(
                "/etcdserverpb.Maintenance/Status",
                Request::new(etcd_client::proto::PbStatusRequest {}),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        let pool = up.pool();
        assert!(
            pool.members
                .iter()
                .all(|m| m.failures.load(Ordering::Relaxed) == 1),
            "both members tried once and marked down"
        );
    }

    #[tokio::test]
    async fn https_needs_a_ca_and_tls_needs_https() {
        let c = Connector::default();
        let e = Upstream::start("b", &["https://127.0.0.1:1".into()], None, &c).unwrap_err();
        assert!(matches!(e, UpstreamError::HttpsWithoutCa(_)), "{e}");
        let files = ClientTlsFiles {
            ca: Some("/nonexistent/ca.crt".into()),
            ..Default::default()
        };
        let e = Upstream::start("b", &["http://127.0.0.1:1".into()], Some(files.clone()), &c)
            .unwrap_err();
        assert!(matches!(e, UpstreamError::PlaintextWithTls(_)), "{e}");
        let e = Upstream::start("b", &["https://127.0.0.1:1".into()], Some(files), &c).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.crt"), "{e}");
    }
}
