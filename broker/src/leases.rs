//! Who owns which lease. etcd's leases are cluster-wide, so the broker records each
//! grant under the tenant's lease prefix in etcd, and every call that names a lease
//! (Put, Txn, Revoke, TimeToLive, KeepAlive, Lock and Campaign sessions) asks here
//! first; a cache of owners in front of the records keeps that off etcd for leases in use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::proto::{PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse};
use tonic::{Request, Status};

use crate::Tenant;

/// A lease as the cache knows it: (backend name, lease id).
type LeaseKey = (Arc<str>, i64);

/// A lease a tenant was found not to own: (backend name, lease id, tenant name).
type MissingKey = (Arc<str>, i64, Arc<str>);

/// Cache of lease owners in front of the records in etcd.
#[derive(Default)]
pub struct LeaseOwners {
    /// (backend, lease id) -> owning tenant name. Only positive answers are cached: a
    /// lease seen as owned stays owned for its whole life (ids are never reused by etcd).
    /// The backend is part of the key because two etcd clusters can hand out one id.
    owners: Mutex<HashMap<LeaseKey, Arc<str>>>,
    /// (backend, lease id, tenant) -> until when the tenant is known not to own it.
    /// Consulted by keep-alives only ([`LeaseOwners::known`]), which a hostile tenant
    /// could otherwise send for unknown IDs at no cost, each one a Range on etcd.
    missing: Mutex<HashMap<MissingKey, Instant>>,
}

/// Bound on cached ownerships; past it the cache starts over and refills from etcd.
const LEASE_CACHE_MAX: usize = 100_000;

/// How long a lease found not owned is taken as not owned by keep-alives.
const MISSING_TTL: Duration = Duration::from_secs(5);

impl LeaseOwners {
    /// What the caches know: owned, recently found not owned, or nothing.
    pub fn known(&self, tenant: &Tenant, id: i64) -> Option<bool> {
        if id <= 0 {
            return Some(false);
        }
        if self.cached(id, tenant) {
            return Some(true);
        }
        let missing = self.missing.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tenant.backend.clone(), id, Arc::from(tenant.name.as_str()));
        missing
            .get(&key)
            .is_some_and(|until| *until > Instant::now())
            .then_some(false)
    }

    fn note_missing(&self, id: i64, tenant: &Tenant) {
        let mut missing = self.missing.lock().unwrap_or_else(|e| e.into_inner());
        if missing.len() >= LEASE_CACHE_MAX {
            let now = Instant::now();
            missing.retain(|_, until| *until > now);
            if missing.len() >= LEASE_CACHE_MAX {
                missing.clear();
            }
        }
        missing.insert(
            (tenant.backend.clone(), id, Arc::from(tenant.name.as_str())),
            Instant::now() + MISSING_TTL,
        );
    }

    pub(crate) fn cached(&self, id: i64, tenant: &Tenant) -> bool {
        let owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners
            .get(&(tenant.backend.clone(), id))
            .is_some_and(|o| **o == *tenant.name)
    }

    pub fn remember(&self, id: i64, tenant: &Tenant) {
        self.missing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(tenant.backend.clone(), id, Arc::from(tenant.name.as_str())));
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if owners.len() >= LEASE_CACHE_MAX {
            owners.clear();
        }
        owners.insert(
            (tenant.backend.clone(), id),
            Arc::from(tenant.name.as_str()),
        );
    }

    pub fn forget(&self, id: i64, tenant: &Tenant) {
        self.owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(tenant.backend.clone(), id));
    }

    /// Whether `tenant` owns lease `id`, from the cache or from etcd.
    pub async fn owns(&self, tenant: &Tenant, id: i64) -> Result<bool, Status> {
        if id == 0 {
            return Ok(false);
        }
        if self.cached(id, tenant) {
            return Ok(true);
        }
        // Linearizable: a lease granted through another replica a moment ago must be seen.
        let req = PbRangeRequest {
            key: tenant.lease_key(id),
            count_only: true,
            ..Default::default()
        };
        let resp: PbRangeResponse = tenant
            .upstream
            .unary("/etcdserverpb.KV/Range", Request::new(req))
            .await?
            .into_inner();
        let owned = resp.count > 0;
        if owned {
            self.remember(id, tenant);
        } else {
            self.note_missing(id, tenant);
        }
        Ok(owned)
    }

    /// Writes the ownership record of a freshly granted lease, attached to the lease.
    pub async fn record(&self, tenant: &Tenant, id: i64) -> Result<(), Status> {
        let req = PbPutRequest {
            key: tenant.lease_key(id),
            value: tenant.name.clone().into_bytes(),
            lease: id,
            ..Default::default()
        };
        let _: PbPutResponse = tenant
            .upstream
            .unary("/etcdserverpb.KV/Put", Request::new(req))
            .await?
            .into_inner();
        self.remember(id, tenant);
        Ok(())
    }

    /// The real lease the tenant means by `seen`, if it owns it: read under the current
    /// lease ID secret, then under earlier ones (see `leaseid`). `None` for leases of
    /// others and for missing ones, which the tenant cannot tell apart.
    pub async fn owned(&self, tenant: &Tenant, seen: i64) -> Result<Option<i64>, Status> {
        for real in tenant.lease_ids.candidates(seen) {
            if self.owns(tenant, real).await? {
                return Ok(Some(real));
            }
        }
        Ok(None)
    }
}
