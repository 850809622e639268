//! Tenants (one per service account) and the leases they own.
//!
//! Lease ownership is recorded in etcd as a key under a broker-private prefix, attached to
//! the lease itself: it expires with the lease, and every broker replica sees it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use etcd_client::proto::{PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse};
use tonic::{Request, Status};

use crate::auth::Identity;
use crate::rewrite::Prefix;
use crate::upstream::Upstream;

/// One tenant's view of etcd.
#[derive(Debug)]
pub struct Tenant {
    /// `<namespace>/<serviceaccount>`, used in logs and as the lease owner.
    pub name: String,
    /// Every key of the tenant lives under this.
    pub prefix: Prefix,
    /// Where the ownership records of the tenant's leases live.
    pub lease_prefix: Prefix,
}

impl Tenant {
    /// The ownership record of one lease.
    pub fn lease_key(&self, id: i64) -> Vec<u8> {
        self.lease_prefix.key(format!("{id:016x}").as_bytes())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TenantConfigError {
    #[error("{0:?} must start and end with \"/\"")]
    BadPrefix(String),
    #[error("tenant prefix root {0:?} and lease prefix {1:?} overlap")]
    Overlap(String, String),
}

/// Maps identities to tenants, and caches them so the request path does not allocate.
pub struct TenantResolver {
    root: String,
    lease_root: String,
    cache: Mutex<HashMap<Identity, Arc<Tenant>>>,
}

/// Bound on cached tenants; past it the cache starts over (tenants are cheap to rebuild).
const TENANT_CACHE_MAX: usize = 10_000;

impl TenantResolver {
    pub fn new(root: &str, lease_root: &str) -> Result<Self, TenantConfigError> {
        for p in [root, lease_root] {
            if !p.starts_with('/') || !p.ends_with('/') {
                return Err(TenantConfigError::BadPrefix(p.to_owned()));
            }
        }
        if root.starts_with(lease_root) || lease_root.starts_with(root) {
            return Err(TenantConfigError::Overlap(
                root.to_owned(),
                lease_root.to_owned(),
            ));
        }
        Ok(Self {
            root: root.to_owned(),
            lease_root: lease_root.to_owned(),
            cache: Mutex::default(),
        })
    }

    pub fn resolve(&self, id: &Identity) -> Arc<Tenant> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(id) {
            return t.clone();
        }
        if cache.len() >= TENANT_CACHE_MAX {
            cache.clear();
        }
        let name = id.to_string();
        // Identity parsing guarantees neither part is empty or holds "/", so the
        // prefixes end in "/" and no tenant's prefix is a byte-prefix of another's.
        let prefix = Prefix::new(format!("{}{name}/", self.root).into_bytes())
            .unwrap_or_else(|| unreachable!("prefix ends in /"));
        let lease_prefix = Prefix::new(format!("{}{name}/", self.lease_root).into_bytes())
            .unwrap_or_else(|| unreachable!("prefix ends in /"));
        let t = Arc::new(Tenant {
            name,
            prefix,
            lease_prefix,
        });
        cache.insert(id.clone(), t.clone());
        t
    }
}

/// Cache of lease owners in front of the records in etcd.
#[derive(Default)]
pub struct LeaseOwners {
    /// lease id -> owning tenant name. Only positive answers are cached: a lease seen as
    /// owned stays owned for its whole life (ids are never reused by etcd).
    owners: Mutex<HashMap<i64, Arc<str>>>,
}

/// Bound on cached ownerships; past it the cache starts over and refills from etcd.
const LEASE_CACHE_MAX: usize = 100_000;

impl LeaseOwners {
    fn cached(&self, id: i64, tenant: &Tenant) -> bool {
        let owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners.get(&id).is_some_and(|o| **o == *tenant.name)
    }

    pub fn remember(&self, id: i64, tenant: &Tenant) {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if owners.len() >= LEASE_CACHE_MAX {
            owners.clear();
        }
        owners.insert(id, Arc::from(tenant.name.as_str()));
    }

    pub fn forget(&self, id: i64) {
        self.owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Whether `tenant` owns lease `id`, from the cache or from etcd.
    pub async fn owns(&self, up: &Upstream, tenant: &Tenant, id: i64) -> Result<bool, Status> {
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
        let resp: PbRangeResponse = up
            .unary("/etcdserverpb.KV/Range", Request::new(req))
            .await?
            .into_inner();
        let owned = resp.count > 0;
        if owned {
            self.remember(id, tenant);
        }
        Ok(owned)
    }

    /// Writes the ownership record of a freshly granted lease, attached to the lease.
    pub async fn record(&self, up: &Upstream, tenant: &Tenant, id: i64) -> Result<(), Status> {
        let req = PbPutRequest {
            key: tenant.lease_key(id),
            value: tenant.name.clone().into_bytes(),
            lease: id,
            ..Default::default()
        };
        let _: PbPutResponse = up
            .unary("/etcdserverpb.KV/Put", Request::new(req))
            .await?
            .into_inner();
        self.remember(id, tenant);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolver_builds_disjoint_prefixes() {
        let r = TenantResolver::new("/etcd-shim/tenants/", "/etcd-shim/leases/").unwrap();
        let a = r.resolve(&Identity::parse("ns/a").unwrap());
        let ab = r.resolve(&Identity::parse("ns/ab").unwrap());
        assert_eq!(a.prefix.as_bytes(), b"/etcd-shim/tenants/ns/a/");
        assert!(!ab.prefix.as_bytes().starts_with(a.prefix.as_bytes()));
        assert_eq!(
            a.lease_key(0x1f),
            b"/etcd-shim/leases/ns/a/000000000000001f"
        );
        assert!(Arc::ptr_eq(
            &a,
            &r.resolve(&Identity::parse("ns/a").unwrap())
        ));
    }

    #[test]
    fn resolver_rejects_bad_roots() {
        assert!(matches!(
            TenantResolver::new("/x", "/l/"),
            Err(TenantConfigError::BadPrefix(_))
        ));
        assert!(matches!(
            TenantResolver::new("/x/", "/x/leases/"),
            Err(TenantConfigError::Overlap(..))
        ));
    }

    #[test]
    fn lease_cache_is_per_tenant() {
        let r = TenantResolver::new("/t/", "/l/").unwrap();
        let a = r.resolve(&Identity::parse("n/a").unwrap());
        let b = r.resolve(&Identity::parse("n/b").unwrap());
        let owners = LeaseOwners::default();
        owners.remember(7, &a);
        assert!(owners.cached(7, &a));
        assert!(!owners.cached(7, &b));
        owners.forget(7);
        assert!(!owners.cached(7, &a));
    }
}
