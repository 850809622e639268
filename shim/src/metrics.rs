//! The shim's Prometheus metrics (`etcd_shim_*`): every call by service, method and the
//! gRPC code the app saw, end-to-end latency of unary calls, open streams and connections.
//!
//! The code is read from the response's trailers as they pass, so nothing is buffered.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::grpc;

/// A known etcd method; anything else is counted as `unknown`, so a client cannot grow
/// the number of series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Method {
    pub service: &'static str,
    pub method: &'static str,
    /// Long-lived: counted as open streams, not in the latency histogram.
    pub streaming: bool,
}

const fn m(service: &'static str, method: &'static str, streaming: bool) -> Method {
    Method {
        service,
        method,
        streaming,
    }
}

const UNKNOWN: Method = m("unknown", "unknown", false);

/// Every method of etcd's v3 services, lock and election, and gRPC health.
const METHODS: &[(&str, Method)] = &[
    ("/etcdserverpb.KV/Range", m("KV", "Range", false)),
    ("/etcdserverpb.KV/Put", m("KV", "Put", false)),
    (
        "/etcdserverpb.KV/DeleteRange",
        m("KV", "DeleteRange", false),
    ),
    ("/etcdserverpb.KV/Txn", m("KV", "Txn", false)),
    ("/etcdserverpb.KV/Compact", m("KV", "Compact", false)),
    ("/etcdserverpb.KV/RangeStream", m("KV", "RangeStream", true)),
    ("/etcdserverpb.Watch/Watch", m("Watch", "Watch", true)),
    (
        "/etcdserverpb.Lease/LeaseGrant",
        m("Lease", "LeaseGrant", false),
    ),
    (
        "/etcdserverpb.Lease/LeaseRevoke",
        m("Lease", "LeaseRevoke", false),
    ),
    (
        "/etcdserverpb.Lease/LeaseKeepAlive",
        m("Lease", "LeaseKeepAlive", true),
    ),
    (
        "/etcdserverpb.Lease/LeaseTimeToLive",
        m("Lease", "LeaseTimeToLive", false),
    ),
    (
        "/etcdserverpb.Lease/LeaseLeases",
        m("Lease", "LeaseLeases", false),
    ),
    (
        "/etcdserverpb.Cluster/MemberList",
        m("Cluster", "MemberList", false),
    ),
    (
        "/etcdserverpb.Cluster/MemberAdd",
        m("Cluster", "MemberAdd", false),
    ),
    (
        "/etcdserverpb.Cluster/MemberRemove",
        m("Cluster", "MemberRemove", false),
    ),
    (
        "/etcdserverpb.Cluster/MemberUpdate",
        m("Cluster", "MemberUpdate", false),
    ),
    (
        "/etcdserverpb.Cluster/MemberPromote",
        m("Cluster", "MemberPromote", false),
    ),
    (
        "/etcdserverpb.Maintenance/Status",
        m("Maintenance", "Status", false),
    ),
    (
        "/etcdserverpb.Maintenance/Alarm",
        m("Maintenance", "Alarm", false),
    ),
    (
        "/etcdserverpb.Maintenance/Defragment",
        m("Maintenance", "Defragment", false),
    ),
    (
        "/etcdserverpb.Maintenance/Hash",
        m("Maintenance", "Hash", false),
    ),
    (
        "/etcdserverpb.Maintenance/HashKV",
        m("Maintenance", "HashKV", false),
    ),
    (
        "/etcdserverpb.Maintenance/Snapshot",
        m("Maintenance", "Snapshot", true),
    ),
    (
        "/etcdserverpb.Maintenance/MoveLeader",
        m("Maintenance", "MoveLeader", false),
    ),
    (
        "/etcdserverpb.Maintenance/Downgrade",
        m("Maintenance", "Downgrade", false),
    ),
    ("/v3lockpb.Lock/Lock", m("Lock", "Lock", false)),
    ("/v3lockpb.Lock/Unlock", m("Lock", "Unlock", false)),
    (
        "/v3electionpb.Election/Campaign",
        m("Election", "Campaign", false),
    ),
    (
        "/v3electionpb.Election/Proclaim",
        m("Election", "Proclaim", false),
    ),
    (
        "/v3electionpb.Election/Leader",
        m("Election", "Leader", false),
    ),
    (
        "/v3electionpb.Election/Observe",
        m("Election", "Observe", true),
    ),
    (
        "/v3electionpb.Election/Resign",
        m("Election", "Resign", false),
    ),
    ("/grpc.health.v1.Health/Check", m("Health", "Check", false)),
    ("/grpc.health.v1.Health/Watch", m("Health", "Watch", true)),
];

impl Method {
    pub fn of_path(path: &str) -> Method {
        if path.starts_with("/etcdserverpb.Auth/") {
            // Every Auth method is refused the same way; one series is enough.
            return m("Auth", "any", false);
        }
        METHODS
            .iter()
            .find(|(p, _)| *p == path)
            .map_or(UNKNOWN, |(_, m)| *m)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: &'static str,
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: &'static str,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    streams: Family<MethodLabels, Gauge>,
    pub connections: Gauge,
    pub broker_errors: Counter,
    token_reloads: Family<OutcomeLabels, Counter>,
    token_expiry: Gauge,
    ready: Gauge,
    unready: Family<ReasonLabels, Gauge>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.5, 14))
            }),
            streams: Family::default(),
            connections: Gauge::default(),
            broker_errors: Counter::default(),
            token_reloads: Family::default(),
            token_expiry: Gauge::default(),
            ready: Gauge::default(),
            unready: Family::default(),
        };
        for reason in crate::Unready::ALL {
            let _ = m.unready.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            });
        }
        for outcome in ["success", "failure"] {
            let _ = m.token_reloads.get_or_create(&OutcomeLabels { outcome });
        }
        let r = registry.sub_registry_with_prefix("etcd_shim");
        r.register(
            "requests",
            "Calls from the app, by service, method and the gRPC code it received",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "End-to-end time of unary calls, broker and etcd included",
            m.latency.clone(),
        );
        r.register(
            "streams_open",
            "Streaming calls (watch, keep-alive) currently open",
            m.streams.clone(),
        );
        r.register(
            "connections_open",
            "Client connections currently open",
            m.connections.clone(),
        );
        r.register(
            "broker_errors",
            "Calls that failed because the broker could not be reached",
            m.broker_errors.clone(),
        );
        r.register(
            "token_reloads",
            "Changes of the token file after start-up, by outcome (failure: no usable token, calls go out without one)",
            m.token_reloads.clone(),
        );
        r.register(
            "token_expiry_timestamp_seconds",
            "When the token in use expires (its exp claim, unix seconds); 0 without a token or exp",
            m.token_expiry.clone(),
        );
        r.register(
            "ready",
            "1 while the broker serves this pod's tenant (the readiness probe passes), else 0",
            m.ready.clone(),
        );
        r.register(
            "unready",
            "1 for the reason the shim is not ready (no_token, token_refused, not_admitted, broker_unreachable, broker_unavailable, other), 0 for the others",
            m.unready.clone(),
        );
        Arc::new(m)
    }

    /// Records the outcome of a readiness probe.
    pub fn set_readiness(&self, why_not: Option<crate::Unready>) {
        self.ready.set(i64::from(why_not.is_none()));
        for reason in crate::Unready::ALL {
            self.unready
                .get_or_create(&ReasonLabels {
                    reason: reason.as_str(),
                })
                .set(i64::from(why_not == Some(reason)));
        }
    }

    /// Records a token read: `changed` after start-up counts as a reload, by outcome;
    /// `expires` is the exp of the token now in use, if any.
    pub fn token_read(&self, changed: bool, ok: bool, expires: Option<SystemTime>) {
        if changed {
            let outcome = if ok { "success" } else { "failure" };
            self.token_reloads
                .get_or_create(&OutcomeLabels { outcome })
                .inc();
        }
        let exp = expires
            .filter(|_| ok)
            .and_then(|e| e.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        self.token_expiry.set(exp);
    }

    /// Starts accounting for one call; the returned guard records it when it ends.
    pub fn start(self: &Arc<Self>, method: Method) -> Call {
        if method.streaming {
            self.streams(method).inc();
        }
        Call {
            metrics: self.clone(),
            method,
            started: Instant::now(),
            code: None,
        }
    }

    fn streams(&self, method: Method) -> Gauge {
        self.streams
            .get_or_create(&MethodLabels {
                service: method.service,
                method: method.method,
            })
            .clone()
    }
}

/// One call in flight. Records its outcome once: when the code is known, or when the
/// call is dropped without one (the app or the broker went away: `Canceled`).
pub struct Call {
    metrics: Arc<Metrics>,
    method: Method,
    started: Instant,
    code: Option<u16>,
}

impl Call {
    /// Sets the outcome from headers or trailers carrying `grpc-status`.
    pub fn observe(&mut self, headers: &HeaderMap) {
        if self.code.is_none() {
            self.code = grpc::status_of(headers);
        }
    }

    pub fn has_code(&self) -> bool {
        self.code.is_some()
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let code = self.code.map_or("Canceled", code_name);
        let method = self.method;
        // The request log: what the app called and how it ended, never keys or values.
        tracing::debug!(
            target: "etcd_shim::request",
            service = method.service,
            method = method.method,
            code,
            micros = self.started.elapsed().as_micros() as u64,
            "request"
        );
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                service: method.service,
                method: method.method,
                code,
            })
            .inc();
        if method.streaming {
            self.metrics.streams(method).dec();
        } else {
            self.metrics
                .latency
                .get_or_create(&MethodLabels {
                    service: method.service,
                    method: method.method,
                })
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

fn code_name(code: u16) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    NAMES.get(usize::from(code)).copied().unwrap_or("Unknown")
}

pin_project_lite::pin_project! {
    /// A response body that records its call when the trailers (or the end) pass.
    pub struct Metered<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B> Metered<B> {
    pub fn new(inner: B, call: Call) -> Self {
        Self {
            inner,
            call: Some(call),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Metered<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(t), Some(call)) = (frame.trailers_ref(), this.call.as_mut()) {
                    call.observe(t);
                    // Recorded now, not when the connection gets round to dropping us.
                    this.call.take();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                this.call.take();
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(reg: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, reg).unwrap();
        s
    }

    #[test]
    fn paths_map_to_a_bounded_set() {
        assert_eq!(Method::of_path("/etcdserverpb.KV/Range").method, "Range");
        assert!(Method::of_path("/etcdserverpb.Watch/Watch").streaming);
        assert_eq!(
            Method::of_path("/etcdserverpb.Auth/UserAdd").service,
            "Auth"
        );
        assert_eq!(Method::of_path("/made.up/Thing"), UNKNOWN);
    }

    #[test]
    fn calls_are_recorded_once_with_their_code() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        let mut call = m.start(Method::of_path("/etcdserverpb.KV/Put"));
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "7".parse().unwrap());
        call.observe(&t);
        drop(call);
        let watch = m.start(Method::of_path("/etcdserverpb.Watch/Watch"));
        let out = scrape(&reg);
        assert!(
            out.contains(
                r#"etcd_shim_requests_total{service="KV",method="Put",code="PermissionDenied"} 1"#
            ),
            "{out}"
        );
        assert!(
            out.contains(r#"etcd_shim_streams_open{service="Watch",method="Watch"} 1"#),
            "{out}"
        );
        drop(watch);
        let out = scrape(&reg);
        assert!(
            out.contains(r#"etcd_shim_streams_open{service="Watch",method="Watch"} 0"#),
            "{out}"
        );
        assert!(
            out.contains(
                r#"etcd_shim_requests_total{service="Watch",method="Watch",code="Canceled"} 1"#
            ),
            "{out}"
        );
    }

    #[test]
    fn readiness_names_one_reason_at_a_time() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        let out = scrape(&reg);
        assert!(
            out.contains("etcd_shim_ready 0"),
            "not ready before a probe: {out}"
        );
        m.set_readiness(Some(crate::Unready::NotAdmitted));
        let out = scrape(&reg);
        assert!(
            out.contains(r#"etcd_shim_unready{reason="not_admitted"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"etcd_shim_unready{reason="token_refused"} 0"#),
            "{out}"
        );
        m.set_readiness(None);
        let out = scrape(&reg);
        assert!(out.contains("etcd_shim_ready 1"), "{out}");
        assert!(
            out.contains(r#"etcd_shim_unready{reason="not_admitted"} 0"#),
            "{out}"
        );
    }
}
