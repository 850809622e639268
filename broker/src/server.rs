//! The broker's gRPC server: every etcd service plus `grpc.health.v1.Health`, with
//! etcd's message limits and keepalive tolerance, over plaintext h2c or over TLS with a
//! certificate that is reloaded while serving.

use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::proto::{
    PbClusterServer, PbKvServer, PbLeaseServer, PbMaintenanceServer, PbStatusRequest,
    PbStatusResponse, PbWatchServer,
};
use etcd_shim_core::serve::Server;
use etcd_shim_core::tls::TlsAcceptorSource;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Request;
use tonic::service::{RecoverError, RecoverErrorLayer, Routes};

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

/// Serves the broker's gRPC API in plaintext on `listener` until `shutdown` is cancelled,
/// then waits for open calls (streams end by themselves on shutdown).
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    run(Server::new("broker", http2()), listener, broker, shutdown).await;
    Ok(())
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
    let server = Server::new("broker", http2()).tls(tls);
    run(server, listener, broker, shutdown).await;
    Ok(())
}

/// Accepts until shutdown, then waits for every connection to close. The gauge counts a
/// connection once its handshake is done.
async fn run(server: Server, listener: TcpListener, broker: Broker, shutdown: CancellationToken) {
    let open = broker.metrics().connections.clone();
    let connections = TaskTracker::new();
    let svc = service(broker);
    server
        // Without it, Nagle holds a response's last frames until the shim's delayed ACK
        // (40 ms) arrives.
        .nodelay()
        .count_open(open)
        .track(connections.clone())
        .serve(listener, shutdown, move |io| {
            (io, TowerToHyperService::new(svc.clone()))
        })
        .await;
    connections.close();
    connections.wait().await;
}

/// HTTP/2 only, with etcd's keepalive tolerance and room for many streams: the settings
/// tonic's server applied from the broker's builder before it served connections itself.
fn http2() -> auto::Builder<TokioExecutor> {
    let mut http = auto::Builder::new(TokioExecutor::new()).http2_only();
    http.http2()
        .timer(TokioTimer::new())
        .initial_connection_window_size(8 << 20)
        .initial_stream_window_size(4 << 20)
        .max_concurrent_streams(u32::MAX)
        // Answer the client's keepalive pings and send our own to find dead shims.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .adaptive_window(false)
        .max_pending_accept_reset_streams(None)
        .max_local_error_reset_streams(None)
        .max_frame_size(None);
    http
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

/// Every service the broker serves, with etcd's limits, behind the layers tonic's server
/// put around them: errors become gRPC statuses and a client's `grpc-timeout` ends its
/// call here as well as at etcd.
fn service(broker: Broker) -> BrokerService {
    // etcd reports the empty service name as SERVING; so does the broker.
    let (_reporter, health) = tonic_health::server::health_reporter();
    let b = broker;
    let routes = Routes::new(
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
    .prepare();
    tower::ServiceBuilder::new()
        .layer(RecoverErrorLayer::new())
        .layer_fn(GrpcTimeout)
        .layer(HoldRefusalsLayer)
        .service(routes)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

type BrokerService = RecoverError<GrpcTimeout<HoldRefusals<Routes>>>;

/// Ends a call when the client's `grpc-timeout` runs out, answering CANCELLED ("Timeout
/// expired") as tonic's server does.
#[derive(Clone)]
struct GrpcTimeout<S>(S);

impl<S, B> tower::Service<http::Request<B>> for GrpcTimeout<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = futures_util::future::BoxFuture<'static, Result<S::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| parse_grpc_timeout(v.to_str().ok()?));
        let answer = self.0.call(req);
        Box::pin(async move {
            match deadline {
                None => answer.await.map_err(Into::into),
                Some(d) => match tokio::time::timeout(d, answer).await {
                    Ok(res) => res.map_err(Into::into),
                    Err(_) => Err(tonic::TimeoutExpired(()).into()),
                },
            }
        })
    }
}

/// gRPC's `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
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

#[cfg(test)]
mod tests {
    use super::parse_grpc_timeout;
    use std::time::Duration;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "5", "5s", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
