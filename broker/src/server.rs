//! The broker's gRPC server: every etcd service plus `grpc.health.v1.Health`, with
//! etcd's message limits and keepalive tolerance, over plaintext h2c or over TLS with a
//! certificate that is reloaded while serving.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::proto::{
    PbClusterServer, PbKvServer, PbLeaseServer, PbMaintenanceServer, PbStatusRequest,
    PbStatusResponse, PbWatchServer,
};
use etcd_shim_core::tls::TlsAcceptorSource;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Server;
use tonic::transport::server::{Connected, Router};

use crate::Broker;
use crate::authapi::AuthService;
use crate::lock::{ElectionService, LockService};

/// etcd's gRPC receive limit (1.5 MiB request + 512 KiB overhead) plus room for the
/// tenant prefix, so that oversized requests reach etcd and clients see etcd's own
/// "request is too large".
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024 + 64 * 1024;

/// Settings of the broker that are not about transport.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Tenant `<ns>/<sa>` lives under `<root><ns>/<sa>/`.
    pub tenant_prefix_root: String,
    /// Lease ownership records live under `<lease_prefix><ns>/<sa>/<id>`.
    pub lease_prefix: String,
    /// A tenant's compacted revision is recorded at `<compaction_prefix>` followed by its
    /// prefix without the leading `/`.
    pub compaction_prefix: String,
    /// The etcd of `--etcd-endpoints` serves etcd-shim alone, so the broker compacts it.
    pub etcd_dedicated: bool,
    /// Client URLs reported by MemberList to clients that call the broker directly.
    pub advertise_client_urls: Vec<String>,
    /// Keys of the tenants' lease IDs (see `leaseid`); every replica must share them.
    pub lease_secrets: crate::leaseid::LeaseSecrets,
    /// How long a client may leave a stream's answers untaken (its outbox full) before
    /// the broker ends the stream and cancels what feeds it.
    pub slow_client_timeout: Duration,
    /// Broker replicas serving the same tenants: each enforces this share of their rate,
    /// concurrency and watch limits.
    pub replicas: u32,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            tenant_prefix_root: "/etcd-shim/tenants/".into(),
            lease_prefix: "/etcd-shim/leases/".into(),
            compaction_prefix: "/etcd-shim/compactions/".into(),
            etcd_dedicated: false,
            advertise_client_urls: Vec::new(),
            lease_secrets: crate::leaseid::LeaseSecrets::ephemeral(),
            slow_client_timeout: Duration::from_secs(30),
            replicas: 1,
        }
    }
}

/// A client that connects and never finishes the TLS handshake must not hold a task
/// forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the broker's gRPC API in plaintext on `listener` until `shutdown` is cancelled,
/// then waits for open calls (streams end by themselves on shutdown).
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "broker listening (plaintext)");
    }
    // The builder's tcp_nodelay applies only to listeners tonic binds itself. Without it,
    // Nagle holds a response's last frames until the shim's delayed ACK (40 ms) arrives.
    let open = broker.metrics().connections.clone();
    let incoming = TcpListenerStream::new(listener).map(move |conn| {
        conn.map(|tcp| {
            let _ = tcp.set_nodelay(true);
            Counted::new(tcp, &open)
        })
    });
    router(broker)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// Like [`serve`], over TLS: every new connection is accepted with the latest good
/// certificate from `tls`, so a rotated certificate applies without dropping the
/// connections already open.
pub async fn serve_tls(
    listener: TcpListener,
    tls: TlsAcceptorSource,
    broker: Broker,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "broker listening (TLS)");
    }
    let open = broker.metrics().connections.clone();
    let incoming = tls_incoming(listener, tls, shutdown.clone())
        .map(move |conn| conn.map(|tls| Counted::new(tls, &open)));
    router(broker)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// Accepts connections and completes their handshakes off the accept loop, so one slow
/// client cannot hold up the others.
fn tls_incoming(
    listener: TcpListener,
    tls: TlsAcceptorSource,
    shutdown: CancellationToken,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Usually out of file descriptors; pausing lets connections end
                        // instead of spinning on the same error.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            // Taken per connection: a reloaded certificate applies from the next one on.
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A connection counted in a gauge while it is open.
struct Counted<IO> {
    io: IO,
    open: Gauge,
}

impl<IO> Counted<IO> {
    fn new(io: IO, open: &Gauge) -> Self {
        open.inc();
        Self {
            io,
            open: open.clone(),
        }
    }
}

impl<IO> Drop for Counted<IO> {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How long a call refused for a limit (ResourceExhausted: too many requests, or a full
/// quota) waits before it is answered. A client looping on refusals then spends a
/// connection's worth of calls per this span, not per round trip: without it, a tenant
/// retrying 1 MiB puts at once made the shim and the broker receive and decode a hundred
/// MiB a second to refuse them, on CPU its neighbours share.
const REFUSAL_HOLD: Duration = Duration::from_millis(500);

/// Holds every answer with gRPC status ResourceExhausted for [`REFUSAL_HOLD`].
#[derive(Clone)]
struct HoldRefusals<S> {
    inner: S,
}

#[derive(Clone)]
struct HoldRefusalsLayer;

impl<S> tower::Layer<S> for HoldRefusalsLayer {
    type Service = HoldRefusals<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HoldRefusals { inner }
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for HoldRefusals<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let answer = self.inner.call(req);
        Box::pin(async move {
            let resp = answer.await?;
            // A refusal is trailers-only: its status is in the headers.
            let exhausted = resp
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == b"8");
            if exhausted {
                tokio::time::sleep(REFUSAL_HOLD).await;
            }
            Ok(resp)
        })
    }
}

/// Every service the broker serves, with etcd's limits.
fn router(
    broker: Broker,
) -> Router<tower::layer::util::Stack<HoldRefusalsLayer, tower::layer::util::Identity>> {
    // etcd reports the empty service name as SERVING; so does the broker.
    let (_reporter, health) = tonic_health::server::health_reporter();
    let b = broker;
    Server::builder()
        .tcp_nodelay(true)
        // Answer the client's keepalive pings and send our own to find dead shims.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(u32::MAX))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .layer(HoldRefusalsLayer)
        .add_service(
            PbKvServer::new(b.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            PbWatchServer::new(b.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            PbLeaseServer::new(b.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            PbMaintenanceServer::new(b.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(PbClusterServer::new(b.clone()))
        .add_service(AuthService(b.clone()))
        .add_service(LockService(b.clone()))
        .add_service(ElectionService(b.clone()))
        .add_service(health)
}

impl Broker {
    /// Whether the default backend's etcd answers; used for readiness. Other backends
    /// only concern the tenants routed to them, so they do not make the broker unready.
    pub async fn probe_backend(&self) -> Result<String, String> {
        let resp: PbStatusResponse = self
            .inner
            .tenants
            .default_upstream()
            .unary(
                "/etcdserverpb.Maintenance/Status",
                Request::new(PbStatusRequest {}),
            )
            .await
            .map_err(|s| format!("etcd: {}", s.message()))?
            .into_inner();
        self.note(&resp.header);
        Ok(resp.version)
    }
}
