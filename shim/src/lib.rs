//! The etcd-shim sidecar: serves plaintext etcd v3 gRPC on the pod's loopback and
//! tunnels every call, as bytes, to the broker over one multiplexed HTTP/2 connection,
//! with the pod's token. It decodes nothing but the path, so its memory does not grow
//! with traffic.

pub mod authority;
pub mod cli;
pub mod connect;
pub mod endpoint;
pub mod grpc;
pub mod metrics;
pub mod token;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prost::Message;
use tokio::net::TcpListener;

use etcd_shim_core::error_chain;
use etcd_shim_core::serve::Server;
use etcd_shim_core::shutdown::Shutdown;

pub use connect::{Dialer, Trust};
pub mod ready;
pub use endpoint::Endpoints;
pub use token::TokenSource;

/// What the app may have sent as credentials; the shim's own token replaces them.
const APP_AUTH_HEADERS: &[&str] = &["authorization", "token"];

/// The response body: the broker's or one the shim made, metered either way.
pub type ShimBody = metrics::Metered<Either<grpc::Relayed<Incoming>, grpc::LocalBody>>;

/// Forwards calls to the broker.
#[derive(Clone)]
pub struct Forwarder {
    inner: Arc<ForwarderInner>,
}

struct ForwarderInner {
    client: Client<Dialer, Incoming>,
    /// Empty-bodied client for the shim's own health probes.
    probe_client: Client<Dialer, Full<Bytes>>,
    target: Endpoints,
    token: TokenSource,
    /// The MemberList answer, framed once: one member whose client URL is this shim.
    member_list: Bytes,
    metrics: Arc<metrics::Metrics>,
}

impl Forwarder {
    pub fn new(
        target: Endpoints,
        dialer: Dialer,
        token: TokenSource,
        advertise: SocketAddr,
        metrics: Arc<metrics::Metrics>,
    ) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            // Find a dead broker connection quickly instead of waiting for TCP.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            .http2_keep_alive_while_idle(true)
            .http2_initial_stream_window_size(1 << 20)
            .http2_initial_connection_window_size(4 << 20)
            .http2_adaptive_window(false)
            .pool_idle_timeout(Duration::from_secs(300));
        let client = builder.build(dialer.clone());
        let probe_client = builder.build(dialer);
        Self {
            inner: Arc::new(ForwarderInner {
                client,
                probe_client,
                target,
                token,
                member_list: member_list(advertise),
                metrics,
            }),
        }
    }

    fn uri(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let mut b = Uri::builder()
            .scheme(self.inner.target.scheme.clone())
            .authority(self.inner.target.authority.clone());
        if let Some(pq) = pq {
            b = b.path_and_query(pq.clone());
        }
        b.build()
    }

    /// Handles one call from the app, metered.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ShimBody> {
        let mut call = self
            .inner
            .metrics
            .start(metrics::Method::of_path(req.uri().path()));
        let resp = self.forward(req).await;
        // A trailers-only response carries its status in the headers.
        call.observe(resp.headers());
        resp.map(|body| metrics::Metered::new(body, call))
    }

    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.inner.metrics
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
    ) -> Response<Either<grpc::Relayed<Incoming>, grpc::LocalBody>> {
        let path = req.uri().path();
        if path == "/etcdserverpb.Cluster/MemberList" {
            return grpc::ok(self.inner.member_list.clone()).map(Either::Right);
        }
        let token = match self.inner.token.current() {
            Ok(t) => t,
            Err(why) => {
                return grpc::error(
                    grpc::Code::Unavailable,
                    &format!("etcd-shim: no service-account token: {why}"),
                )
                .map(Either::Right);
            }
        };
        let (mut parts, body) = req.into_parts();
        parts.uri = match self.uri(parts.uri.path_and_query()) {
            Ok(u) => u,
            Err(e) => {
                return grpc::error(grpc::Code::Unimplemented, &format!("bad path: {e}"))
                    .map(Either::Right);
            }
        };
        for h in APP_AUTH_HEADERS {
            parts.headers.remove(*h);
        }
        parts.headers.remove(http::header::HOST);
        parts.headers.insert(http::header::AUTHORIZATION, token);
        match self
            .inner
            .client
            .request(Request::from_parts(parts, body))
            .await
        {
            Ok(resp) => resp.map(|b| Either::Left(grpc::Relayed::new(b))),
            Err(e) => {
                self.inner.metrics.broker_errors.inc();
                tracing::warn!(error = %error_chain(&e), "broker call failed");
                grpc::error(
                    grpc::Code::Unavailable,
                    &format!("etcd-shim: broker unavailable: {}", error_chain(&e)),
                )
                .map(Either::Right)
            }
        }
    }

    /// Makes one authenticated call that the broker answers only for an admitted tenant,
    /// and only by asking etcd: Maintenance.Alarm GET, which `etcdctl endpoint health`
    /// makes too. So the pod is ready only when it can really use etcd: the broker accepts
    /// its token, admits its tenant, and reaches etcd. The calls show in the broker's
    /// request metrics under `Alarm`, apart from the app's reads.
    pub async fn probe(&self) -> Result<(), NotReady> {
        let token = self
            .inner
            .token
            .current()
            .map_err(|e| NotReady::new(Unready::NoToken, format!("no token: {e}")))?;
        let other = |e: String| NotReady::new(Unready::Other, e);
        let uri = self
            .uri(Some(&PathAndQuery::from_static(
                "/etcdserverpb.Maintenance/Alarm",
            )))
            .map_err(|e| other(e.to_string()))?;
        let req = Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .header(http::header::AUTHORIZATION, token)
            // AlarmRequest { action: GET } is all defaults: an empty message.
            .body(Full::new(grpc::frame(&[])))
            .map_err(|e| other(e.to_string()))?;
        let unreachable = |why: String| NotReady::new(Unready::BrokerUnreachable, why);
        let resp =
            tokio::time::timeout(Duration::from_secs(3), self.inner.probe_client.request(req))
                .await
                .map_err(|_| unreachable("broker did not answer within 3s".to_string()))?
                .map_err(|e| unreachable(format!("broker unreachable: {}", error_chain(&e))))?;
        let (code, message): (u16, String) = match grpc::status_of(resp.headers()) {
            Some(code) => (code, grpc::message_of(resp.headers())),
            None => {
                let collected = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| unreachable(format!("broker: {e}")))?;
                let trailers = collected.trailers();
                (
                    trailers.and_then(grpc::status_of).unwrap_or(2),
                    trailers.map(grpc::message_of).unwrap_or_default(),
                )
            }
        };
        probe_verdict(code, &message)
    }
}

/// Why the shim is not ready. The `as_str` names are the `reason` label of the
/// `etcd_shim_unready` metric, so a dashboard tells a missing RBAC binding (token refused)
/// from a tenant missing in the broker config (not admitted) from a network problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unready {
    /// The token file is missing, empty or unreadable.
    NoToken,
    /// The broker does not accept the token (Unauthenticated): wrong audience, expired,
    /// or the broker may not review tokens (its system:auth-delegator binding).
    TokenRefused,
    /// The token is valid but the broker config admits no tenant for it
    /// (PermissionDenied).
    NotAdmitted,
    /// No connection to the broker: DNS, network policy, TLS (an untrusted certificate).
    BrokerUnreachable,
    /// The broker answered Unavailable: it cannot reach etcd.
    BrokerUnavailable,
    /// Any other answer.
    Other,
}

impl Unready {
    pub const ALL: [Unready; 6] = [
        Unready::NoToken,
        Unready::TokenRefused,
        Unready::NotAdmitted,
        Unready::BrokerUnreachable,
        Unready::BrokerUnavailable,
        Unready::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Unready::NoToken => "no_token",
            Unready::TokenRefused => "token_refused",
            Unready::NotAdmitted => "not_admitted",
            Unready::BrokerUnreachable => "broker_unreachable",
            Unready::BrokerUnavailable => "broker_unavailable",
            Unready::Other => "other",
        }
    }
}

/// A failed probe: its reason and what the broker or the connection said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReady {
    pub reason: Unready,
    pub detail: String,
}

impl NotReady {
    fn new(reason: Unready, detail: String) -> Self {
        Self { reason, detail }
    }
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Whether a probe's gRPC status means the pod can use etcd, and if not, why. A tenant
/// over its rate limit is still admitted, so it stays ready rather than flapping.
fn probe_verdict(code: u16, message: &str) -> Result<(), NotReady> {
    let (reason, detail) = match code {
        0 | 8 => return Ok(()),
        16 => (
            Unready::TokenRefused,
            format!("the broker refused the pod's token: {message}"),
        ),
        7 => (
            Unready::NotAdmitted,
            format!("the broker does not admit this tenant: {message}"),
        ),
        14 => (
            Unready::BrokerUnavailable,
            format!("the broker cannot serve: {message}"),
        ),
        c => (
            Unready::Other,
            format!("the broker answered grpc-status {c}: {message}"),
        ),
    };
    Err(NotReady::new(reason, detail))
}

/// The framed MemberList response: the shim is the whole cluster, at its own address,
/// so clients that sync endpoints keep calling it.
fn member_list(advertise: SocketAddr) -> Bytes {
    use etcd_client::proto::{PbMember, PbMemberListResponse, PbResponseHeader};
    let ip = if advertise.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        advertise.ip()
    };
    let url = format!("http://{}", SocketAddr::new(ip, advertise.port()));
    let resp = PbMemberListResponse {
        header: Some(PbResponseHeader {
            cluster_id: etcd_shim_core::ids::CLUSTER_ID,
            member_id: etcd_shim_core::ids::MEMBER_ID,
            revision: 0,
            raft_term: etcd_shim_core::ids::RAFT_TERM,
        }),
        members: vec![PbMember {
            id: etcd_shim_core::ids::MEMBER_ID,
            name: "etcd-shim".into(),
            peer_ur_ls: Vec::new(),
            client_ur_ls: vec![url],
            is_learner: false,
        }],
    };
    grpc::frame(&resp.encode_to_vec())
}

/// Serves the etcd API on `listener` until shutdown starts; connections then get a
/// GOAWAY and are tracked so the caller can drain them.
pub async fn serve(listener: TcpListener, forwarder: Forwarder, shutdown: Shutdown) {
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http2_only();
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(u32::MAX)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20);
    let open = forwarder.metrics().connections.clone();
    Server::new("shim", http)
        .nodelay()
        .count_open(open)
        .track(shutdown.tracker().clone())
        .serve(listener, shutdown.token(), move |io| {
            let forwarder = forwarder.clone();
            let svc = service_fn(move |req| {
                let f = forwarder.clone();
                async move { Ok::<_, Infallible>(f.handle(req).await) }
            });
            (authority::AuthorityFix::new(io), svc)
        })
        .await
}

#[cfg(test)]
mod probe_tests {
    use super::probe_verdict;

    #[test]
    fn only_an_admitted_tenant_is_ready() {
        assert!(probe_verdict(0, "").is_ok());
        // Throttled, but admitted: readiness must not flap with the rate limit.
        assert!(probe_verdict(8, "etcdserver: too many requests").is_ok());
        let why = |c, m| probe_verdict(c, m).unwrap_err();
        let e = why(16, "etcdserver: invalid auth token");
        assert!(e.detail.contains("refused the pod's token"), "{e}");
        assert_eq!(e.reason.as_str(), "token_refused");
        let e = why(7, "etcdserver: permission denied");
        assert!(e.detail.contains("does not admit"), "{e}");
        assert_eq!(e.reason.as_str(), "not_admitted");
        let e = why(14, "etcd is unreachable");
        assert!(e.detail.contains("cannot serve"), "{e}");
        assert_eq!(e.reason.as_str(), "broker_unavailable");
        assert_eq!(why(3, "").reason.as_str(), "other");
    }
}
