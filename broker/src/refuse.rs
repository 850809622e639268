//! Every refusal the broker makes itself, in one place: by policy (what the tenant may
//! not do at all) and by a limit (what it may not do now). Each is counted, written to
//! the audit log with tenant, method and reason, and answered in etcd's own words.

use tonic::{Request, Response, Status};

use crate::call::Admit;
use crate::error::EtcdError;
use crate::limits::Refusal;
use crate::metrics::Metrics;
use crate::{Broker, Tenant};

impl Broker {
    /// Counts and audits a refusal by policy, then returns it as a status.
    pub(crate) fn deny(
        &self,
        tenant: Option<&Tenant>,
        method: &'static str,
        err: EtcdError,
    ) -> Status {
        self.metrics().denied(err.reason());
        tracing::warn!(
            target: "etcd_shim_broker::audit",
            tenant = tenant.map(|t| t.name.as_str()).unwrap_or("-"),
            method,
            reason = err.reason(),
            "denied"
        );
        err.into()
    }

    /// Authenticates, then refuses: an unauthenticated caller learns nothing more.
    pub(crate) async fn refuse<Q, A>(
        &self,
        service: &'static str,
        method: &'static str,
        req: Request<Q>,
    ) -> Result<Response<A>, Status> {
        self.call(service, method, Admit::Handler, req, |c, _| async move {
            Err(self.deny(Some(&c.t), method, EtcdError::PermissionDenied))
        })
        .await
    }
}

/// Counts and audits a refusal by a limit, then returns it as etcd would say it.
pub(crate) fn by_limit(metrics: &Metrics, t: &Tenant, method: &'static str, r: Refusal) -> Status {
    metrics.limit_rejected(&t.label, r.reason());
    tracing::warn!(
        target: "etcd_shim_broker::audit",
        tenant = %t.name,
        method,
        reason = r.reason(),
        "refused by limit"
    );
    r.error().into()
}
