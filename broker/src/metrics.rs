//! The broker's Prometheus metrics (`etcd_broker_*`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::Code;

/// Tenant label of a call refused before its tenant was known (no valid token, or no
/// rule admits the service account).
pub const NO_TENANT: &str = "none";

/// A label value shared without copying: tenant and backend names come from the config
/// and label every call.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(&self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub tenant: Name,
    pub service: &'static str,
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub tenant: Name,
    pub service: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub backend: Name,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantReasonLabels {
    pub tenant: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendOutcomeLabels {
    pub backend: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

/// Handles to every broker metric; clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<MethodLabels, Histogram>,
    /// Time etcd took to answer the broker's unary calls, by backend and method.
    pub upstream_latency: Family<UpstreamLabels, Histogram>,
    /// Connections from shims currently open; a shim holds one for its calls and one for
    /// its readiness probe.
    pub connections: Gauge,
    pub auth_failures: Counter,
    pub denials: Family<ReasonLabels, Counter>,
    pub foreign_keys_dropped: Counter,
    pub watch_streams: Gauge,
    pub keepalive_streams: Gauge,
    /// Streams ended because their client left the answers untaken too long.
    pub slow_clients: Counter,
    /// Config file reloads by outcome (`success`, `failure`).
    pub config_reloads: Family<OutcomeLabels, Counter>,
    /// Issuer key set reloads by outcome (`success`, `failure`).
    pub jwks_reloads: Family<OutcomeLabels, Counter>,
    /// TokenReviews sent, by outcome (`authenticated`, `rejected`, `error`).
    pub token_reviews: Family<OutcomeLabels, Counter>,
    /// Authentications answered from the token cache.
    pub token_cache_hits: Counter,
    /// Tokens verified against the issuer's keys, by outcome (`accepted`, `rejected`).
    pub local_verifications: Family<OutcomeLabels, Counter>,
    /// Serving certificate reloads by outcome (`success`, `failure`).
    pub tls_reloads: Family<OutcomeLabels, Counter>,
    /// notAfter of the serving certificate in force, unix seconds; 0 without TLS.
    pub tls_not_after: Gauge,
    /// Calls refused by a tenant limit, by tenant label and reason.
    pub limit_rejections: Family<TenantReasonLabels, Counter>,
    /// etcd client credential reloads by backend and outcome (`success`, `failure`).
    /// Backends are bounded by the config file, so labelling by them is safe.
    pub credential_reloads: Family<BackendOutcomeLabels, Counter>,
    /// notAfter (unix seconds) of the etcd client certificate in force, by backend.
    pub credential_expiry: Family<BackendLabels, Gauge>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            connections: Gauge::default(),
            auth_failures: Counter::default(),
            denials: Family::default(),
            foreign_keys_dropped: Counter::default(),
            watch_streams: Gauge::default(),
            keepalive_streams: Gauge::default(),
            slow_clients: Counter::default(),
            config_reloads: Family::default(),
            jwks_reloads: Family::default(),
            token_reviews: Family::default(),
            token_cache_hits: Counter::default(),
            local_verifications: Family::default(),
            tls_reloads: Family::default(),
            tls_not_after: Gauge::default(),
            limit_rejections: Family::default(),
            credential_reloads: Family::default(),
            credential_expiry: Family::default(),
        };
        // Outcomes exist from the start, so rate() and alerts see zeros rather than
        // missing series.
        for family in [&m.config_reloads, &m.jwks_reloads, &m.tls_reloads] {
            for outcome in ["success", "failure"] {
                let _ = family.get_or_create(&OutcomeLabels { outcome });
            }
        }
        for outcome in ["authenticated", "rejected", "error"] {
            let _ = m.token_reviews.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["accepted", "rejected"] {
            let _ = m
                .local_verifications
                .get_or_create(&OutcomeLabels { outcome });
        }
        let r = registry.sub_registry_with_prefix("etcd_broker");
        r.register(
            "requests",
            "etcd calls served on every service, refusals included (a stream counts once, as it opens), by tenant (named by a config rule, unlisted, or none when refused before it was known), service, method and gRPC code",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time to serve an etcd call (a stream: until it is open), etcd included, by tenant, service and method",
            m.latency.clone(),
        );
        r.register(
            "upstream_request_duration_seconds",
            "Time etcd took to answer a unary call of the broker, by backend and method (errors included)",
            m.upstream_latency.clone(),
        );
        r.register(
            "shim_connections_open",
            "Connections from shims currently open (a shim holds two: one for calls, one for its readiness probe)",
            m.connections.clone(),
        );
        r.register(
            "auth_failures",
            "Calls refused because the bearer token was missing or invalid",
            m.auth_failures.clone(),
        );
        r.register(
            "policy_denials",
            "Calls refused by the isolation policy, by reason",
            m.denials.clone(),
        );
        r.register(
            "foreign_keys_dropped",
            "Keys outside the caller's prefix removed from responses (should stay 0)",
            m.foreign_keys_dropped.clone(),
        );
        r.register(
            "watch_streams_open",
            "Watch streams currently open",
            m.watch_streams.clone(),
        );
        r.register(
            "lease_keepalive_streams_open",
            "Lease keep-alive streams currently open",
            m.keepalive_streams.clone(),
        );
        r.register(
            "slow_client_streams_ended",
            "Streams (Watch, LeaseKeepAlive, RangeStream, Observe) ended because their client left the answers untaken for --slow-client-timeout",
            m.slow_clients.clone(),
        );
        r.register(
            "config_reloads",
            "Broker config file loads after start-up, by outcome; on failure the old config stays",
            m.config_reloads.clone(),
        );
        r.register(
            "jwks_reloads",
            "Service-account issuer key set reloads, by outcome; on failure the old keys stay",
            m.jwks_reloads.clone(),
        );
        r.register(
            "token_reviews",
            "TokenReviews sent to the API server, by outcome (error: the call was refused)",
            m.token_reviews.clone(),
        );
        r.register(
            "local_token_verifications",
            "Tokens verified locally against the service-account issuer's keys, by outcome",
            m.local_verifications.clone(),
        );
        r.register(
            "token_cache_hits",
            "Authentications answered from the broker's token cache (TokenReview answers, or tokens verified locally already)",
            m.token_cache_hits.clone(),
        );
        r.register(
            "tls_reloads",
            "Serving certificate reloads after a file change, by outcome; on failure the old certificate stays",
            m.tls_reloads.clone(),
        );
        r.register(
            "tls_certificate_not_after_seconds",
            "Expiry of the serving certificate in force, unix seconds (0: plaintext)",
            m.tls_not_after.clone(),
        );
        r.register(
            "limit_rejections",
            "Calls refused by a tenant limit, by tenant (named by a config rule, or unlisted) and reason",
            m.limit_rejections.clone(),
        );
        r.register(
            "credential_reloads",
            "etcd client certificate reloads by backend and outcome; on failure the old credentials stay",
            m.credential_reloads.clone(),
        );
        r.register(
            "client_certificate_expiry_timestamp_seconds",
            "When the etcd client certificate in force expires (the CA bundle's first expiry without one), by backend",
            m.credential_expiry.clone(),
        );
        m
    }

    /// Counts one refusal by a tenant limit.
    pub fn limit_rejected(&self, tenant: &str, reason: &'static str) {
        self.limit_rejections
            .get_or_create(&TenantReasonLabels {
                tenant: tenant.to_owned(),
                reason,
            })
            .inc();
    }

    /// Counts one reload of `backend`'s etcd credentials.
    pub fn credential_reloaded(&self, backend: &str, ok: bool) {
        let outcome = if ok { "success" } else { "failure" };
        self.credential_reloads
            .get_or_create(&BackendOutcomeLabels {
                backend: backend.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Records when the credentials `backend` uses expire.
    pub fn credential_expiry(&self, backend: &str, not_after_unix: i64) {
        self.credential_expiry
            .get_or_create(&BackendLabels {
                backend: backend.to_owned(),
            })
            .set(not_after_unix);
    }

    fn reload_family(&self, what: Reloaded) -> &Family<OutcomeLabels, Counter> {
        match what {
            Reloaded::Config => &self.config_reloads,
            Reloaded::Jwks => &self.jwks_reloads,
            Reloaded::Tls => &self.tls_reloads,
        }
    }

    /// Counts one reload of `what`.
    pub fn reloaded(&self, what: Reloaded, ok: bool) {
        let outcome = if ok { "success" } else { "failure" };
        self.reload_family(what)
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// How many reloads of `what` ended `ok` so far (for tests and diagnostics).
    pub fn reload_count(&self, what: Reloaded, ok: bool) -> u64 {
        let outcome = if ok { "success" } else { "failure" };
        self.reload_family(what)
            .get_or_create(&OutcomeLabels { outcome })
            .get()
    }

    pub fn token_review(&self, outcome: &'static str) {
        self.token_reviews
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn local_verification(&self, ok: bool) {
        let outcome = if ok { "accepted" } else { "rejected" };
        self.local_verifications
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn denied(&self, reason: &'static str) {
        self.denials.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Records one finished call of `tenant`.
    pub fn observe(
        &self,
        service: &'static str,
        method: &'static str,
        tenant: Name,
        code: Code,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                tenant: tenant.clone(),
                service,
                method,
                code: code_name(code),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                tenant,
                service,
                method,
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// Counts one open stream in a gauge for as long as it lives.
pub struct Open(Gauge);

impl Open {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// 100 µs to about 15 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.5, 14))
}

/// Files the broker reloads while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reloaded {
    Config,
    Jwks,
    /// The gRPC port's serving certificate.
    Tls,
}

/// gRPC code names as other gRPC servers label them.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}
