//! Tenants (one per service account) and the leases they own.
//!
//! Lease ownership is recorded in etcd as a key under a broker-private prefix, attached to
//! the lease itself: it expires with the lease, and every broker replica sees it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::auth::Identity;
use crate::config::{
    BackendSpec, Base, ConfigError, ConfigFile, IMPLICIT_BACKEND, Limits, Match, PrefixChoice,
    Rule, UsageRefresh,
};
use crate::leaseid::{LeaseIds, LeaseSecrets};
use crate::limits::{States, TenantState, UNLISTED};
use crate::rewrite::Prefix;
use crate::upstream::{Connector, Upstream, client_files};

/// One tenant's view of etcd.
#[derive(Debug)]
pub struct Tenant {
    /// `<namespace>/<serviceaccount>`, used in logs and as the lease owner.
    pub name: String,
    /// Every key of the tenant lives under this.
    pub prefix: Prefix,
    /// Where the ownership records of the tenant's leases live.
    pub lease_prefix: Prefix,
    /// The tenant's lease IDs (see `leaseid`).
    pub lease_ids: LeaseIds,
    /// Where the tenant's compacted revision is recorded (see `compaction`).
    pub compaction_key: Vec<u8>,
    /// Name of the backend holding the tenant's keys.
    pub backend: Arc<str>,
    /// The etcd cluster holding the tenant's keys. Resolved once per call; a call that
    /// started before a reload finishes on the backend it started on.
    pub upstream: Arc<Upstream>,
    /// Limits under the config in force.
    pub limits: Arc<Limits>,
    /// When usage is measured again.
    pub refresh: UsageRefresh,
    /// Metrics label: the name if a rule names the tenant exactly, else `unlisted`.
    pub label: Arc<str>,
    /// Rates, counters and usage; shared by every `Tenant` of this prefix and backend,
    /// across reloads.
    pub state: Arc<TenantState>,
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

/// A backend the resolver can route to.
struct Backend {
    name: Arc<str>,
    /// What the connection pool was built from; `None` for the one from flags. Compared on
    /// reload so that unchanged backends keep their connections (and open watches).
    spec: Option<BackendSpec>,
    upstream: Arc<Upstream>,
}

/// One immutable routing table, built from a validated config. A reload builds a new
/// one and swaps it in whole, so a request never sees half of a config.
struct Routing {
    backends: Vec<Backend>,
    default_backend: usize,
    rules: Vec<(Rule, Option<(usize, PrefixChoice)>)>,
    allow_unlisted: bool,
    default_limits: Arc<Limits>,
    /// Each rule's limits (`defaultLimits` when it sets none), by rule index.
    rule_limits: Vec<Arc<Limits>>,
    refresh: UsageRefresh,
    /// identity -> its tenant, or `None` when refused. Lives and dies with this table.
    cache: Mutex<HashMap<Identity, Option<Arc<Tenant>>>>,
}

/// Maps identities to tenants, and caches them so the request path does not allocate.
pub struct TenantResolver {
    base: Base,
    /// Keys of the tenants' lease IDs.
    lease_secrets: LeaseSecrets,
    /// The backend made from flags; always routable as `default` unless a file redefines it.
    implicit: Arc<Upstream>,
    /// Whether the backend made from flags is dedicated to etcd-shim.
    implicit_dedicated: bool,
    current: RwLock<Arc<Routing>>,
    /// Per-tenant limit state; outlives routing tables.
    states: Arc<States>,
    /// Builds the connections of backends from the config file, with their credentials.
    connector: Connector,
    /// Broker replicas that share the tenants' per-replica limits.
    replicas: u32,
}

/// Bound on cached tenants; past it the cache starts over (tenants are cheap to rebuild).
const TENANT_CACHE_MAX: usize = 10_000;

impl TenantResolver {
    /// A resolver with no config file: every identity is a tenant under `root` on
    /// `upstream`.
    pub fn new(
        base: Base,
        lease_secrets: LeaseSecrets,
        upstream: Upstream,
    ) -> Result<Self, TenantConfigError> {
        let roots = [
            &base.tenant_prefix_root,
            &base.lease_prefix,
            &base.compaction_prefix,
        ];
        for p in roots {
            if !p.starts_with('/') || !p.ends_with('/') {
                return Err(TenantConfigError::BadPrefix(p.to_owned()));
            }
        }
        for (i, a) in roots.iter().enumerate() {
            for b in &roots[i + 1..] {
                if a.starts_with(b.as_str()) || b.starts_with(a.as_str()) {
                    return Err(TenantConfigError::Overlap(a.to_string(), b.to_string()));
                }
            }
        }
        let implicit = Arc::new(upstream);
        let routing = Routing {
            backends: vec![Backend {
                name: Arc::from(IMPLICIT_BACKEND),
                spec: None,
                upstream: implicit.clone(),
            }],
            default_backend: 0,
            rules: Vec::new(),
            allow_unlisted: true,
            default_limits: Arc::default(),
            rule_limits: Vec::new(),
            refresh: UsageRefresh::default(),
            cache: Mutex::default(),
        };
        Ok(Self {
            base,
            lease_secrets,
            implicit,
            implicit_dedicated: false,
            current: RwLock::new(Arc::new(routing)),
            states: Arc::default(),
            connector: Connector::default(),
            replicas: 1,
        })
    }

    /// Every tenant's limit state, to be scraped for the usage and limit series.
    pub fn states(&self) -> Arc<States> {
        self.states.clone()
    }

    /// Marks the backend made from flags as dedicated to etcd-shim (see `compaction`).
    pub fn with_dedicated_default(mut self, dedicated: bool) -> Self {
        self.implicit_dedicated = dedicated;
        self
    }

    /// Enforces `1/replicas` of each tenant's rate, concurrency and watch limits
    /// ([`Limits::per_replica`]), for a broker that is one of `replicas`.
    pub fn with_replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// The root under which tenants' compactions are recorded.
    pub fn compaction_root(&self) -> &str {
        &self.base.compaction_prefix
    }

    /// The backends in force that are dedicated to etcd-shim, so the broker compacts them.
    pub fn dedicated_backends(&self) -> Vec<(Arc<str>, Arc<Upstream>)> {
        self.routing()
            .backends
            .iter()
            .filter(|b| {
                b.spec
                    .as_ref()
                    .map_or(self.implicit_dedicated, |s| s.dedicated)
            })
            .map(|b| (b.name.clone(), b.upstream.clone()))
            .collect()
    }

    /// Reports the credential reloads of config-file backends through `connector`.
    pub fn with_connector(mut self, connector: Connector) -> Self {
        self.connector = connector;
        self
    }

    fn routing(&self) -> Arc<Routing> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Validates `file` and, if it holds, makes it the routing table for new calls.
    pub fn apply(&self, file: &ConfigFile) -> Result<(), ConfigError> {
        let plan = file.validate(&self.base)?;
        let old = self.routing();
        let mut backends = Vec::with_capacity(plan.backends.len() + 1);
        for spec in &plan.backends {
            let reused = old
                .backends
                .iter()
                .find(|b| b.spec.as_ref() == Some(spec))
                .map(|b| b.upstream.clone());
            let upstream = match reused {
                Some(u) => u,
                None => {
                    let u = Upstream::start(
                        &spec.name,
                        &spec.endpoints,
                        spec.tls.as_ref().map(client_files),
                        &self.connector,
                    )
                    .map_err(|e| ConfigError::Backend {
                        backend: spec.name.clone(),
                        error: e.to_string(),
                    })?;
                    tracing::info!(backend = %spec.name, endpoints = ?spec.endpoints, "backend connections (re)built");
                    Arc::new(u)
                }
            };
            backends.push(Backend {
                name: Arc::from(spec.name.as_str()),
                spec: Some(spec.clone()),
                upstream,
            });
        }
        if !backends.iter().any(|b| &*b.name == IMPLICIT_BACKEND) {
            backends.push(Backend {
                name: Arc::from(IMPLICIT_BACKEND),
                spec: None,
                upstream: self.implicit.clone(),
            });
        }
        let index = |name: &str| {
            backends
                .iter()
                .position(|b| &*b.name == name)
                .unwrap_or_else(|| unreachable!("validated backend name"))
        };
        let default_backend = index(&plan.default_backend);
        let default_limits = Arc::new(plan.default_limits.per_replica(self.replicas));
        let rule_limits: Vec<Arc<Limits>> = plan
            .rules
            .iter()
            .map(|r| match &r.limits {
                Some(l) => Arc::new(l.per_replica(self.replicas)),
                None => default_limits.clone(),
            })
            .collect();
        // Limit series for /metrics: each exactly named tenant (first rule wins), and one
        // for everyone else.
        let mut by_label: Vec<(Arc<str>, Arc<Limits>)> = Vec::new();
        for (r, l) in plan.rules.iter().zip(&rule_limits) {
            if let (Some(name), Some(_)) = (exact_name(r), &r.route)
                && !by_label.iter().any(|(n, _)| **n == *name)
            {
                by_label.push((Arc::from(name.as_str()), l.clone()));
            }
        }
        by_label.push((Arc::from(UNLISTED), default_limits.clone()));
        self.states.configure(by_label);
        let refresh = plan.usage_refresh;
        let rules = plan
            .rules
            .into_iter()
            .map(|r| {
                let route = r
                    .route
                    .as_ref()
                    .map(|route| (index(&route.backend), route.prefix.clone()));
                (r, route)
            })
            .collect();
        let routing = Routing {
            backends,
            default_backend,
            rules,
            allow_unlisted: plan.allow_unlisted,
            default_limits,
            rule_limits,
            refresh,
            cache: Mutex::default(),
        };
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routing);
        Ok(())
    }

    /// The default backend's connections (for readiness probes).
    pub fn default_upstream(&self) -> Arc<Upstream> {
        let r = self.routing();
        r.backends[r.default_backend].upstream.clone()
    }

    /// The tenant of `id`, or `None` when the config refuses it.
    pub fn resolve(&self, id: &Identity) -> Option<Arc<Tenant>> {
        let routing = self.routing();
        let mut cache = routing.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(id) {
            return t.clone();
        }
        if cache.len() >= TENANT_CACHE_MAX {
            cache.clear();
        }
        let t = routing.decide(id).map(|(backend, prefix, rule)| {
            let name = id.to_string();
            let (label, limits): (Arc<str>, _) = match rule {
                Some(i) => (
                    match exact_name(&routing.rules[i].0) {
                        Some(n) => Arc::from(n.as_str()),
                        None => Arc::from(UNLISTED),
                    },
                    routing.rule_limits[i].clone(),
                ),
                None => (Arc::from(UNLISTED), routing.default_limits.clone()),
            };
            let b = &routing.backends[backend];
            // Identity parsing guarantees neither part is empty or holds "/", and config
            // validation that prefixes end in "/" and do not overlap, so no tenant's
            // prefix is a byte-prefix of another's.
            let prefix = match prefix {
                PrefixChoice::Exact(p) => p.clone(),
                PrefixChoice::Root(root) => {
                    let root = root.as_deref().unwrap_or(&self.base.tenant_prefix_root);
                    format!("{root}{name}/")
                }
            };
            let state = self
                .states
                .state(&b.name, prefix.as_bytes(), &label, &limits);
            // Prefixes start with "/", so the record sits right under the root.
            let compaction_key = [
                self.base.compaction_prefix.as_bytes(),
                &prefix.as_bytes()[1..],
            ]
            .concat();
            let lease_ids = self.lease_secrets.for_tenant(prefix.as_bytes());
            Arc::new(Tenant {
                lease_ids,
                prefix: Prefix::new(prefix.into_bytes())
                    .unwrap_or_else(|| unreachable!("prefix ends in /")),
                lease_prefix: Prefix::new(
                    format!("{}{name}/", self.base.lease_prefix).into_bytes(),
                )
                .unwrap_or_else(|| unreachable!("prefix ends in /")),
                compaction_key,
                name,
                backend: b.name.clone(),
                upstream: b.upstream.clone(),
                limits,
                refresh: routing.refresh,
                label,
                state,
            })
        });
        cache.insert(id.clone(), t.clone());
        t
    }
}

impl Routing {
    /// Which backend and prefix `id` gets and by which rule, or `None` if it is refused.
    fn decide(&self, id: &Identity) -> Option<(usize, &PrefixChoice, Option<usize>)> {
        const DEFAULT_ROOT: PrefixChoice = PrefixChoice::Root(None);
        for (i, (rule, route)) in self.rules.iter().enumerate() {
            if rule.namespace.matches(&id.namespace)
                && rule.service_account.matches(&id.service_account)
            {
                return route.as_ref().map(|(b, p)| (*b, p, Some(i)));
            }
        }
        self.allow_unlisted
            .then_some((self.default_backend, &DEFAULT_ROOT, None))
    }
}

/// `<ns>/<sa>` when the rule names exactly one service account.
fn exact_name(r: &Rule) -> Option<String> {
    match (&r.namespace, &r.service_account) {
        (Match::Exact(ns), Match::Exact(sa)) => Some(format!("{ns}/{sa}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::LeaseOwners;

    fn upstream(port: u16) -> Upstream {
        Upstream::new(&[format!("http://127.0.0.1:{port}")]).unwrap()
    }

    fn base(root: &str, leases: &str) -> Base {
        Base {
            tenant_prefix_root: root.into(),
            lease_prefix: leases.into(),
            compaction_prefix: "/etcd-shim/compactions/".into(),
        }
    }

    fn resolver() -> TenantResolver {
        TenantResolver::new(
            base("/etcd-shim/tenants/", "/etcd-shim/leases/"),
            LeaseSecrets::ephemeral(),
            upstream(1),
        )
        .unwrap()
    }

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap()
    }

    fn apply(r: &TenantResolver, yaml: &str) -> Result<(), ConfigError> {
        r.apply(&ConfigFile::parse(yaml)?)
    }

    #[tokio::test]
    async fn resolver_builds_disjoint_prefixes() {
        let r = resolver();
        let a = r.resolve(&id("ns/a")).unwrap();
        let ab = r.resolve(&id("ns/ab")).unwrap();
        assert_eq!(a.prefix.as_bytes(), b"/etcd-shim/tenants/ns/a/");
        assert!(!ab.prefix.as_bytes().starts_with(a.prefix.as_bytes()));
        assert_eq!(
            a.lease_key(0x1f),
            b"/etcd-shim/leases/ns/a/000000000000001f"
        );
        assert_eq!(&*a.backend, "default");
        assert!(Arc::ptr_eq(&a, &r.resolve(&id("ns/a")).unwrap()));
    }

    #[tokio::test]
    async fn two_service_accounts_of_one_namespace_are_two_tenants() {
        let r = resolver();
        let a = r.resolve(&id("team/api")).unwrap();
        let b = r.resolve(&id("team/api-v2")).unwrap();
        assert_ne!(a.prefix.as_bytes(), b.prefix.as_bytes());
        for (x, y) in [(&a, &b), (&b, &a)] {
            assert!(!x.prefix.as_bytes().starts_with(y.prefix.as_bytes()));
            assert!(
                !x.lease_prefix
                    .as_bytes()
                    .starts_with(y.lease_prefix.as_bytes())
            );
        }
        // Also when a rule sends the whole namespace elsewhere.
        apply(&r, "tenants: [{namespace: team, prefixRoot: /teams/}]").unwrap();
        let a = r.resolve(&id("team/api")).unwrap();
        let b = r.resolve(&id("team/api-v2")).unwrap();
        assert_eq!(a.prefix.as_bytes(), b"/teams/team/api/");
        assert_eq!(b.prefix.as_bytes(), b"/teams/team/api-v2/");
    }

    #[test]
    fn resolver_rejects_bad_roots() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _g = rt.enter();
        assert!(matches!(
            TenantResolver::new(base("/x", "/l/"), LeaseSecrets::ephemeral(), upstream(1)),
            Err(TenantConfigError::BadPrefix(_))
        ));
        assert!(matches!(
            TenantResolver::new(
                base("/x/", "/x/leases/"),
                LeaseSecrets::ephemeral(),
                upstream(1)
            ),
            Err(TenantConfigError::Overlap(..))
        ));
    }

    #[tokio::test]
    async fn rules_route_allow_and_deny() {
        let r = resolver();
        apply(
            &r,
            r#"
backends:
  - {name: second, endpoints: ["http://127.0.0.1:2"]}
allowUnlisted: false
tenants:
  - {namespace: team-a, serviceAccount: api, backend: second, prefix: /team-a/}
  - {namespace: team-a, action: deny}
  - {namespace: team-b}
  - {serviceAccount: metrics, backend: second}
"#,
        )
        .unwrap();
        let a = r.resolve(&id("team-a/api")).unwrap();
        assert_eq!(a.prefix.as_bytes(), b"/team-a/");
        assert_eq!(&*a.backend, "second");
        // Lease records stay under the broker's own prefix whatever the key prefix.
        assert_eq!(
            a.lease_key(1),
            b"/etcd-shim/leases/team-a/api/0000000000000001"
        );
        assert!(r.resolve(&id("team-a/other")).is_none(), "deny rule");
        let b = r.resolve(&id("team-b/x")).unwrap();
        assert_eq!(b.prefix.as_bytes(), b"/etcd-shim/tenants/team-b/x/");
        assert_eq!(&*b.backend, "default");
        assert_eq!(&*r.resolve(&id("any/metrics")).unwrap().backend, "second");
        assert!(r.resolve(&id("team-c/x")).is_none(), "unlisted");
        // Denials are cached like tenants and answered the same way again.
        assert!(r.resolve(&id("team-c/x")).is_none());
    }

    #[tokio::test]
    async fn reload_keeps_unchanged_backends_and_rebuilds_changed_ones() {
        let r = resolver();
        let implicit = r.default_upstream();
        let two = "backends: [{name: a, endpoints: ['http://127.0.0.1:2']}, {name: b, endpoints: ['http://127.0.0.1:3']}]\ntenants: [{namespace: x, backend: a}, {namespace: y, backend: b}]";
        apply(&r, two).unwrap();
        let xa = r.resolve(&id("x/s")).unwrap();
        let yb = r.resolve(&id("y/s")).unwrap();
        apply(&r, &two.replace("127.0.0.1:3", "127.0.0.1:4")).unwrap();
        let xa2 = r.resolve(&id("x/s")).unwrap();
        let yb2 = r.resolve(&id("y/s")).unwrap();
        assert!(
            Arc::ptr_eq(&xa.upstream, &xa2.upstream),
            "unchanged backend kept"
        );
        assert!(
            !Arc::ptr_eq(&yb.upstream, &yb2.upstream),
            "changed backend rebuilt"
        );
        assert!(Arc::ptr_eq(&implicit, &r.default_upstream()));

        // A refused config leaves the table as it was.
        let err = apply(&r, "tenants: [{namespace: x, backend: gone}]").unwrap_err();
        assert!(matches!(err, ConfigError::UnknownBackend { .. }));
        assert!(Arc::ptr_eq(&r.resolve(&id("x/s")).unwrap(), &xa2));
    }

    #[tokio::test]
    async fn default_backend_can_move() {
        let r = resolver();
        apply(
            &r,
            "backends: [{name: main, endpoints: ['http://127.0.0.1:2']}]\ndefaultBackend: main",
        )
        .unwrap();
        assert_eq!(&*r.resolve(&id("n/s")).unwrap().backend, "main");
        assert!(!Arc::ptr_eq(
            &r.default_upstream(),
            &r.routing().backends[1].upstream
        ));
    }

    #[tokio::test]
    async fn limits_labels_and_state_follow_the_config() {
        let r = resolver();
        let yaml = "defaultLimits: {keys: 5}\ntenants: [{namespace: n, serviceAccount: named, limits: {keys: 7}}, {namespace: w}]";
        apply(&r, yaml).unwrap();
        let named = r.resolve(&id("n/named")).unwrap();
        let wild = r.resolve(&id("w/x")).unwrap();
        let other = r.resolve(&id("o/x")).unwrap();
        assert_eq!((&*named.label, named.limits.keys), ("n/named", Some(7)));
        assert_eq!((&*wild.label, wild.limits.keys), (UNLISTED, Some(5)));
        assert_eq!((&*other.label, other.limits.keys), (UNLISTED, Some(5)));
        assert!(
            !Arc::ptr_eq(&wild.state, &other.state),
            "one state per tenant"
        );
        // A reload changes the limits but keeps the state (rates, counters, usage).
        apply(&r, &yaml.replace("keys: 7", "keys: 9")).unwrap();
        let again = r.resolve(&id("n/named")).unwrap();
        assert_eq!(again.limits.keys, Some(9));
        assert!(Arc::ptr_eq(&named.state, &again.state));
        // Moving the tenant to another prefix starts a new count.
        apply(
            &r,
            "tenants: [{namespace: n, serviceAccount: named, prefix: /elsewhere/}]",
        )
        .unwrap();
        let moved = r.resolve(&id("n/named")).unwrap();
        assert!(!Arc::ptr_eq(&named.state, &moved.state));
        assert_eq!(moved.limits.keys, None);
    }

    #[tokio::test]
    async fn lease_cache_is_per_tenant_and_backend() {
        let r = resolver();
        apply(
            &r,
            "backends: [{name: other, endpoints: ['http://127.0.0.1:2']}]\ntenants: [{namespace: m, backend: other}]",
        )
        .unwrap();
        let a = r.resolve(&id("n/a")).unwrap();
        let b = r.resolve(&id("n/b")).unwrap();
        let owners = LeaseOwners::default();
        owners.remember(7, &a);
        assert!(owners.cached(7, &a));
        assert!(!owners.cached(7, &b));
        // The same tenant name on another backend is another lease space.
        apply(
            &r,
            "backends: [{name: other, endpoints: ['http://127.0.0.1:2']}]\ntenants: [{namespace: n, backend: other}]",
        )
        .unwrap();
        let moved = r.resolve(&id("n/a")).unwrap();
        assert!(!owners.cached(7, &moved));
        owners.forget(7, &a);
        assert!(!owners.cached(7, &a));
    }
}
