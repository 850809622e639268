//! The etcd-shim broker: authenticates each caller, confines it to its tenant's key
//! prefix on every etcd API, and forwards to etcd. It alone holds the etcd credentials.

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod jwt;
pub mod leaseid;
pub mod metrics;
pub mod rewrite;
pub mod server;
pub mod tokenreview;
pub mod upstream;

mod authapi;
mod call;
mod cluster;
mod compaction;
mod kv;
mod lease;
mod leases;
pub mod limits;
mod lock;
mod maintenance;
mod outbox;
pub mod quota;
mod refuse;
mod tenant;
mod usage;
mod watch;

pub use cli::{Args, Listeners, run};
pub use server::{BrokerConfig, serve, serve_tls};
pub use tenant::Tenant;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use etcd_client::proto::PbResponseHeader;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::auth::Authenticator;
use crate::error::EtcdError;
use crate::leases::LeaseOwners;
use crate::metrics::Metrics;
use crate::rewrite::Stripped;
use crate::tenant::TenantResolver;
use crate::upstream::Upstream;

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    /// Verifies the shim's bearer token.
    auth: Arc<dyn Authenticator>,
    /// Maps an identity to its prefix and backend; swapped whole on config reload.
    tenants: TenantResolver,
    /// Which tenant owns which lease.
    leases: LeaseOwners,
    /// Every tenant's limits, applied.
    limiter: limits::Limiter,
    metrics: Metrics,
    /// Client URLs the broker reports in MemberList for clients that talk to it directly.
    advertise_client_urls: Vec<String>,
    /// The newest revision seen from etcd; stamped on responses the broker makes up
    /// itself, so their headers look like etcd's.
    last_revision: AtomicI64,
    /// Ends long-lived streams when the broker shuts down.
    shutdown: tokio_util::sync::CancellationToken,
    /// How long a client may leave its stream's outbox full before the stream is ended.
    slow_client_timeout: std::time::Duration,
}

impl Broker {
    /// A broker whose every tenant lives on `upstream` (the backend named `default`)
    /// until a config file says otherwise ([`Broker::apply_config`]).
    pub fn new(
        cfg: &BrokerConfig,
        auth: Arc<dyn Authenticator>,
        upstream: Upstream,
        metrics: Metrics,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Self, tenant::TenantConfigError> {
        let tenants = TenantResolver::new(
            config::Base {
                tenant_prefix_root: cfg.tenant_prefix_root.clone(),
                lease_prefix: cfg.lease_prefix.clone(),
                compaction_prefix: cfg.compaction_prefix.clone(),
            },
            cfg.lease_secrets.clone(),
            upstream,
        )?
        .with_dedicated_default(cfg.etcd_dedicated)
        .with_replicas(cfg.replicas)
        .with_connector(upstream::Connector::new(metrics.clone(), shutdown.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                auth,
                tenants,
                leases: LeaseOwners::default(),
                limiter: limits::Limiter::new(metrics.clone()),
                metrics,
                advertise_client_urls: cfg.advertise_client_urls.clone(),
                last_revision: AtomicI64::new(0),
                shutdown,
                slow_client_timeout: cfg.slow_client_timeout,
            }),
        })
    }

    /// Registers the series of the state the broker owns (each tenant's usage and
    /// limits) under `etcd_broker_`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry
            .sub_registry_with_prefix("etcd_broker")
            .register_collector(Box::new(self.inner.tenants.states()));
    }

    /// Validates a config file's content and, if it holds, routes new calls by it;
    /// otherwise nothing changes.
    pub fn apply_config(&self, file: &config::ConfigFile) -> Result<(), config::ConfigError> {
        self.inner.tenants.apply(file)
    }

    /// Which tenant `id` is, under the config in force; `None` if refused.
    pub fn resolve(&self, id: &auth::Identity) -> Option<Arc<Tenant>> {
        self.inner.tenants.resolve(id)
    }

    /// The root under which tenants' compactions are recorded.
    pub(crate) fn compaction_root(&self) -> &str {
        self.inner.tenants.compaction_root()
    }

    /// The backends in force that are dedicated to etcd-shim.
    pub(crate) fn dedicated_backends(&self) -> Vec<(Arc<str>, Arc<Upstream>)> {
        self.inner.tenants.dedicated_backends()
    }

    pub(crate) fn limiter(&self) -> &limits::Limiter {
        &self.inner.limiter
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Authenticates the caller and resolves its tenant: once per call, so the rest of
    /// the call uses one prefix and one backend even if the config changes meanwhile.
    async fn tenant(&self, md: &MetadataMap) -> Result<Arc<Tenant>, Status> {
        let res = match auth::bearer(md) {
            Ok(token) => self.inner.auth.authenticate(token).await,
            Err(e) => Err(e),
        };
        match res {
            Ok(id) => match self.inner.tenants.resolve(&id) {
                Some(t) => Ok(t),
                None => {
                    self.metrics().denied("tenant_not_allowed");
                    tracing::warn!(
                        target: "etcd_shim_broker::audit",
                        identity = %id,
                        "denied: no tenant for this service account in the broker config"
                    );
                    Err(EtcdError::PermissionDenied.into())
                }
            },
            Err(e) => {
                self.metrics().auth_failures.inc();
                tracing::info!(reason = %e, "refused unauthenticated call");
                Err(EtcdError::from(e).into())
            }
        }
    }

    /// The outbox of a stream to a client; `slow` is what a client that stops reading
    /// is told when its stream is ended.
    fn outbox<T>(&self, slow: &'static str) -> (outbox::Outbox<T>, outbox::Inbox<T>) {
        outbox::outbox(
            outbox::BUDGET,
            self.inner.slow_client_timeout,
            slow,
            self.metrics().slow_clients.clone(),
        )
    }

    /// Records the revision of an etcd response header.
    fn note(&self, header: &Option<PbResponseHeader>) {
        if let Some(h) = header {
            self.inner
                .last_revision
                .fetch_max(h.revision, Ordering::Relaxed);
        }
    }

    /// A header for a response the broker answers itself.
    fn synthetic_header(&self) -> Option<PbResponseHeader> {
        Some(PbResponseHeader {
            cluster_id: rewrite::CLUSTER_ID,
            member_id: rewrite::MEMBER_ID,
            revision: self.inner.last_revision.load(Ordering::Relaxed),
            raft_term: rewrite::RAFT_TERM,
        })
    }

    /// Logs and counts keys dropped from a response because they were not the tenant's.
    fn check_stripped(&self, tenant: &Tenant, method: &'static str, s: Stripped) {
        if s.foreign > 0 {
            self.metrics().foreign_keys_dropped.inc_by(s.foreign as u64);
            tracing::error!(
                tenant = %tenant.name,
                method,
                dropped = s.foreign,
                "response held keys outside the tenant prefix; dropped them"
            );
        }
    }
}
