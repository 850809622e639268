//! The broker config file: which etcd backends exist, which tenants go where, with what
//! prefix, and who is let in at all. See `docs/broker-config.md` for the format.
//!
//! Parsing and validation are pure (`ConfigFile::parse`, `ConfigFile::validate`), so every
//! rule is unit-tested. Following the file and applying it to a running broker is the
//! wiring's business (`cli`).
//!
//! YAML is read with `serde_norway`, the maintained fork of `serde_yaml` (which its author
//! has archived): same data model and API, still receiving fixes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Name of the backend made from `--etcd-endpoints`; a file may redefine it.
pub const IMPLICIT_BACKEND: &str = "default";

/// The file as written.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    /// etcd clusters tenants can be routed to, besides the implicit `default`.
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// Backend of tenants no rule routes elsewhere; `default` when unset.
    #[serde(default)]
    pub default_backend: Option<String>,
    /// Whether identities that match no rule get a tenant (under the default prefix root
    /// on the default backend). When false they are refused with "permission denied".
    #[serde(default = "yes")]
    pub allow_unlisted: bool,
    /// Tenant rules; the first rule that matches an identity decides.
    #[serde(default)]
    pub tenants: Vec<TenantRule>,
    /// Limits of every tenant whose rule sets none (unlisted tenants included).
    #[serde(default)]
    pub default_limits: Option<LimitsSpec>,
    /// How often a tenant's key and byte usage is measured from etcd while it writes
    /// (a duration such as `30s`); 30 s when unset.
    #[serde(default)]
    pub usage_refresh_interval: Option<String>,
    /// Writes through one broker after which a tenant's usage is measured again; 1000
    /// when unset.
    #[serde(default)]
    pub usage_refresh_writes: Option<u64>,
}

fn yes() -> bool {
    true
}

/// One etcd cluster.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendSpec {
    pub name: String,
    /// Client URLs (`http://host:port` or `https://host:port`).
    pub endpoints: Vec<String>,
    /// Client TLS material, as mounted file paths.
    #[serde(default)]
    pub tls: Option<BackendTls>,
    /// The etcd serves etcd-shim alone, so the broker compacts it itself, at the lowest
    /// revision its tenants have compacted (see `compaction`). Never set this for the
    /// cluster's own etcd, whose compaction is the cluster's.
    #[serde(default)]
    pub dedicated: bool,
}

/// Paths of a backend's TLS files. Checked to exist when the file is loaded.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendTls {
    /// CA bundle that signed etcd's serving certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate presented to etcd; needs `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// Which identities a rule is about, and what happens to them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantRule {
    /// Namespace name, or `*` (the default) for any.
    #[serde(default = "star")]
    pub namespace: String,
    /// Service-account name, or `*` (the default) for any.
    #[serde(default = "star")]
    pub service_account: String,
    /// `allow` (the default) or `deny`.
    #[serde(default)]
    pub action: Action,
    /// Backend serving the matched tenants; the default backend when unset.
    #[serde(default)]
    pub backend: Option<String>,
    /// The exact key prefix of the one tenant this rule names (both names exact).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Matched tenants live under `<prefixRoot><ns>/<sa>/` instead of the default root.
    #[serde(default)]
    pub prefix_root: Option<String>,
    /// Limits of each matched tenant, replacing `defaultLimits` as a whole.
    #[serde(default)]
    pub limits: Option<LimitsSpec>,
}

/// Per-tenant limits as written; every field left out is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsSpec {
    /// Sustained read calls per second (Range, read-only Txn, watch creation, ...).
    #[serde(default)]
    pub reads_per_second: Option<f64>,
    /// Reads allowed at once after a quiet spell; `readsPerSecond` rounded up when unset.
    #[serde(default)]
    pub read_burst: Option<u32>,
    /// Sustained write calls per second (Put, DeleteRange, Txn with writes, leases, ...).
    #[serde(default)]
    pub writes_per_second: Option<f64>,
    /// Writes allowed at once after a quiet spell; `writesPerSecond` rounded up when unset.
    #[serde(default)]
    pub write_burst: Option<u32>,
    /// Sustained bytes written per second (keys as the tenant names them plus values, of
    /// every put): bounds the history a tenant adds to etcd between compactions.
    #[serde(default)]
    pub write_bytes_per_second: Option<ByteSize>,
    /// Bytes that may be written at once after a quiet spell; `writeBytesPerSecond` when
    /// unset.
    #[serde(default)]
    pub write_bytes_burst: Option<ByteSize>,
    /// Sustained bytes of watch events sent to the tenant per second, over all its
    /// watches: bounds what its fan-out costs etcd and the broker. Delivery is paced to
    /// it, never refused.
    #[serde(default)]
    pub watch_bytes_per_second: Option<ByteSize>,
    /// Watch bytes that may go at once after a quiet spell; `watchBytesPerSecond` when
    /// unset.
    #[serde(default)]
    pub watch_bytes_burst: Option<ByteSize>,
    /// Unary calls in flight at once, per broker replica.
    #[serde(default)]
    pub concurrent_requests: Option<u32>,
    /// Watches open at once, per broker replica.
    #[serde(default)]
    pub watches: Option<u32>,
    /// Leases alive at once (counted in etcd, so across replicas).
    #[serde(default)]
    pub leases: Option<u32>,
    /// Keys stored under the tenant's prefix.
    #[serde(default)]
    pub keys: Option<u64>,
    /// Bytes of keys (as the tenant names them) plus values stored under the prefix: a
    /// number or a quantity such as `64Mi` or `1G`.
    #[serde(default)]
    pub bytes: Option<ByteSize>,
}

/// A byte count written as a number or a Kubernetes-style quantity.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Number(u64),
    Quantity(String),
}

impl ByteSize {
    fn bytes(&self) -> Option<u64> {
        let s = match self {
            ByteSize::Number(n) => return Some(*n),
            ByteSize::Quantity(s) => s.trim(),
        };
        const UNITS: [(&str, u64); 8] = [
            ("Ki", 1 << 10),
            ("Mi", 1 << 20),
            ("Gi", 1 << 30),
            ("Ti", 1 << 40),
            ("k", 1_000),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
            ("T", 1_000_000_000_000),
        ];
        let (num, mult) = UNITS
            .iter()
            .find_map(|(u, m)| s.strip_suffix(u).map(|n| (n, *m)))
            .unwrap_or((s, 1));
        num.parse::<u64>().ok()?.checked_mul(mult)
    }
}

/// A validated rate: tokens per second into a bucket of `burst`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// Validated limits; `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    pub reads: Option<Rate>,
    pub writes: Option<Rate>,
    /// Bytes written; a token is a byte.
    pub write_bytes: Option<Rate>,
    /// Bytes of watch responses sent; a token is a byte.
    pub watch_bytes: Option<Rate>,
    pub concurrent_requests: Option<u32>,
    pub watches: Option<u32>,
    pub leases: Option<u32>,
    pub keys: Option<u64>,
    pub bytes: Option<u64>,
}

impl Limits {
    /// Whether writes are accounted against a key or byte quota.
    pub fn has_quota(&self) -> bool {
        self.keys.is_some() || self.bytes.is_some()
    }

    /// The share of these limits that one of `replicas` broker replicas enforces, so
    /// that together they allow no more than the limits: rates and bursts divided,
    /// concurrency and watches divided and rounded up (never below 1). Leases, keys and
    /// bytes are counted in etcd, across replicas, and stay whole.
    pub fn per_replica(&self, replicas: u32) -> Limits {
        let n = replicas.max(1);
        let share = |v: u32| v.div_ceil(n).max(1);
        let rate = |r: &Rate| Rate {
            per_second: r.per_second / f64::from(n),
            burst: share(r.burst),
        };
        Limits {
            reads: self.reads.as_ref().map(rate),
            writes: self.writes.as_ref().map(rate),
            write_bytes: self.write_bytes.as_ref().map(rate),
            watch_bytes: self.watch_bytes.as_ref().map(rate),
            concurrent_requests: self.concurrent_requests.map(share),
            watches: self.watches.map(share),
            ..self.clone()
        }
    }
}

impl LimitsSpec {
    /// Checks the values; `at` names the block in messages.
    pub fn validate(&self, at: &str) -> Result<Limits, ConfigError> {
        let bad = |error: String| ConfigError::BadLimit {
            at: at.to_owned(),
            error,
        };
        // `names`: the fields of the rate and of its burst.
        let rate = |names: (&str, &str), rate: Option<f64>, burst: Option<u32>| match (rate, burst)
        {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(bad(format!("{} needs {}", names.1, names.0))),
            (Some(r), burst) => {
                if !r.is_finite() || r <= 0.0 {
                    return Err(bad(format!(
                        "{} must be a positive number (leave it out for no limit)",
                        names.0
                    )));
                }
                let burst = match burst {
                    Some(0) => return Err(bad(format!("{} must be at least 1", names.1))),
                    Some(b) => b,
                    None => r.ceil().min(u32::MAX as f64) as u32,
                };
                Ok(Some(Rate {
                    per_second: r,
                    burst: burst.max(1),
                }))
            }
        };
        if self.concurrent_requests == Some(0) {
            return Err(bad(
                "concurrentRequests must be at least 1 (use action: deny to refuse a tenant)"
                    .into(),
            ));
        }
        let size = |what: &str, b: &Option<ByteSize>| match b {
            None => Ok(None),
            Some(b) => b.bytes().map(Some).ok_or_else(|| {
                bad(format!(
                    "{what} {b:?} is neither a number nor a quantity like 64Mi"
                ))
            }),
        };
        let bytes = size("bytes", &self.bytes)?;
        let per_second = size("writeBytesPerSecond", &self.write_bytes_per_second)?;
        let burst = size("writeBytesBurst", &self.write_bytes_burst)?;
        // As the call rates, in bytes: the same checks, the same default burst.
        let as_u32 = |b: u64| b.min(u64::from(u32::MAX)) as u32;
        let write_bytes = rate(
            ("writeBytesPerSecond", "writeBytesBurst"),
            per_second.map(|b| b as f64),
            burst.map(as_u32),
        )?;
        let watch_bytes = rate(
            ("watchBytesPerSecond", "watchBytesBurst"),
            size("watchBytesPerSecond", &self.watch_bytes_per_second)?.map(|b| b as f64),
            size("watchBytesBurst", &self.watch_bytes_burst)?.map(as_u32),
        )?;
        Ok(Limits {
            reads: rate(
                ("readsPerSecond", "readBurst"),
                self.reads_per_second,
                self.read_burst,
            )?,
            writes: rate(
                ("writesPerSecond", "writeBurst"),
                self.writes_per_second,
                self.write_burst,
            )?,
            write_bytes,
            watch_bytes,
            concurrent_requests: self.concurrent_requests,
            watches: self.watches,
            leases: self.leases,
            keys: self.keys,
            bytes,
        })
    }
}

fn star() -> String {
    "*".into()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// Why a config file is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {error}")]
    Read { path: String, error: String },
    #[error("not a valid broker config: {0}")]
    Syntax(String),
    #[error("backend {0:?} is defined twice")]
    DuplicateBackend(String),
    #[error("backend name {0:?} is empty or holds characters other than [a-z0-9-_.]")]
    BadBackendName(String),
    #[error("backend {0:?} has no endpoints")]
    NoEndpoints(String),
    #[error("backend {backend:?}: endpoint {endpoint:?} is not an http:// or https:// URL")]
    BadEndpoint { backend: String, endpoint: String },
    #[error("backend {backend:?}: {what} file {path:?} does not exist")]
    MissingFile {
        backend: String,
        what: &'static str,
        path: String,
    },
    #[error("backend {backend:?}: {error}")]
    Backend { backend: String, error: String },
    #[error("backend {0:?}: tls cert and key must be given together")]
    CertWithoutKey(String),
    #[error("defaultBackend {0:?} is not a defined backend")]
    UnknownDefaultBackend(String),
    #[error("tenant rule {rule}: backend {backend:?} is not defined")]
    UnknownBackend { rule: usize, backend: String },
    #[error("tenant rule {rule}: {value:?} is neither \"*\" nor a valid name")]
    BadName { rule: usize, value: String },
    #[error("tenant rule {rule}: a deny rule takes no backend, prefix, prefixRoot or limits")]
    DenyWithRoute { rule: usize },
    #[error(
        "tenant rule {rule}: prefix needs an exact namespace and serviceAccount (use prefixRoot)"
    )]
    PrefixOnWildcard { rule: usize },
    #[error("tenant rule {rule}: give prefix or prefixRoot, not both")]
    PrefixAndRoot { rule: usize },
    #[error("prefix {0:?} must start and end with \"/\"")]
    BadPrefix(String),
    #[error("prefixes overlap: {0} and {1}")]
    Overlap(String, String),
    #[error("{at}: {error}")]
    BadLimit { at: String, error: String },
}

/// Settings that come from flags and that the file builds on.
#[derive(Clone, Debug)]
pub struct Base {
    /// Default root of tenant prefixes.
    pub tenant_prefix_root: String,
    /// Root of the broker's lease ownership records; no tenant prefix may overlap it.
    pub lease_prefix: String,
    /// Root of the tenants' compaction records; no tenant prefix may overlap it.
    pub compaction_prefix: String,
}

/// A validated config: what the tenant resolver executes. Backends are referred to by
/// index into `backends`.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Backends defined in the file (the implicit one is not listed unless redefined).
    pub backends: Vec<BackendSpec>,
    /// The default backend's name.
    pub default_backend: String,
    pub allow_unlisted: bool,
    pub rules: Vec<Rule>,
    /// Limits of tenants whose rule sets none.
    pub default_limits: Limits,
    /// How usage is kept current.
    pub usage_refresh: UsageRefresh,
}

/// When a tenant's usage is measured again from etcd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageRefresh {
    /// At most this old while the tenant writes.
    pub interval: Duration,
    /// After this many writes through one broker.
    pub writes: u64,
}

impl Default for UsageRefresh {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            writes: 1000,
        }
    }
}

/// A validated rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub namespace: Match,
    pub service_account: Match,
    pub route: Option<Route>,
    /// The rule's own limits; `None` means `defaultLimits`.
    pub limits: Option<Limits>,
}

/// Where an allowed tenant goes; `None` in [`Rule::route`] means deny.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub backend: String,
    pub prefix: PrefixChoice,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrefixChoice {
    /// `<root><ns>/<sa>/`, with the base root when `None`.
    Root(Option<String>),
    /// Exactly this prefix.
    Exact(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    Any,
    Exact(String),
}

impl Match {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Match::Any => true,
            Match::Exact(n) => n == name,
        }
    }
}

impl ConfigFile {
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        // Refused rather than read as "no settings": a file caught half-written (truncated
        // by a non-atomic editor) would otherwise drop every deny rule for a moment.
        if text.trim().is_empty() {
            return Err(ConfigError::Syntax(
                "the file is empty (write `{}` for all defaults)".into(),
            ));
        }
        serde_norway::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        Self::parse(&text)
    }

    /// Checks everything that can be checked without connecting anywhere.
    pub fn validate(&self, base: &Base) -> Result<Plan, ConfigError> {
        let mut names: Vec<&str> = Vec::new();
        for b in &self.backends {
            let valid_name = !b.name.is_empty()
                && b.name
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c));
            if !valid_name {
                return Err(ConfigError::BadBackendName(b.name.clone()));
            }
            if names.contains(&b.name.as_str()) {
                return Err(ConfigError::DuplicateBackend(b.name.clone()));
            }
            names.push(&b.name);
            if b.endpoints.is_empty() {
                return Err(ConfigError::NoEndpoints(b.name.clone()));
            }
            for e in &b.endpoints {
                let ok = e.parse::<http::Uri>().ok().is_some_and(|u| {
                    matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                });
                if !ok {
                    return Err(ConfigError::BadEndpoint {
                        backend: b.name.clone(),
                        endpoint: e.clone(),
                    });
                }
            }
            if let Some(tls) = &b.tls {
                if tls.cert.is_some() != tls.key.is_some() {
                    return Err(ConfigError::CertWithoutKey(b.name.clone()));
                }
                for (what, p) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
                    if let Some(p) = p
                        && !p.exists()
                    {
                        return Err(ConfigError::MissingFile {
                            backend: b.name.clone(),
                            what,
                            path: p.display().to_string(),
                        });
                    }
                }
            }
        }
        if !names.contains(&IMPLICIT_BACKEND) {
            names.push(IMPLICIT_BACKEND);
        }
        let default_backend = self
            .default_backend
            .clone()
            .unwrap_or_else(|| IMPLICIT_BACKEND.to_owned());
        if !names.contains(&default_backend.as_str()) {
            return Err(ConfigError::UnknownDefaultBackend(default_backend));
        }

        // Every prefix that keys can live under, to check that none overlaps another.
        let mut prefixes = vec![
            Claimed::root(&base.tenant_prefix_root, "the default tenant prefix root"),
            Claimed::exact(&base.lease_prefix, "the lease record prefix"),
            Claimed::exact(&base.compaction_prefix, "the compaction record prefix"),
        ];
        let mut rules = Vec::with_capacity(self.tenants.len());
        for (i, r) in self.tenants.iter().enumerate() {
            // Rules are numbered from 1 in messages, as an operator counts them.
            let rule = i + 1;
            let namespace = name_match(&r.namespace, rule)?;
            let service_account = name_match(&r.service_account, rule)?;
            let route = match r.action {
                Action::Deny => {
                    if r.backend.is_some()
                        || r.prefix.is_some()
                        || r.prefix_root.is_some()
                        || r.limits.is_some()
                    {
                        return Err(ConfigError::DenyWithRoute { rule });
                    }
                    None
                }
                Action::Allow => {
                    let backend = r.backend.clone().unwrap_or_else(|| default_backend.clone());
                    if !names.contains(&backend.as_str()) {
                        return Err(ConfigError::UnknownBackend { rule, backend });
                    }
                    let prefix = match (&r.prefix, &r.prefix_root) {
                        (Some(_), Some(_)) => return Err(ConfigError::PrefixAndRoot { rule }),
                        (Some(p), None) => {
                            if namespace == Match::Any || service_account == Match::Any {
                                return Err(ConfigError::PrefixOnWildcard { rule });
                            }
                            prefixes.push(Claimed::exact(p, &format!("tenant rule {rule} prefix")));
                            PrefixChoice::Exact(p.clone())
                        }
                        (None, Some(root)) => {
                            prefixes.push(Claimed::root(
                                root,
                                &format!("tenant rule {rule} prefixRoot"),
                            ));
                            PrefixChoice::Root(Some(root.clone()))
                        }
                        (None, None) => PrefixChoice::Root(None),
                    };
                    Some(Route { backend, prefix })
                }
            };
            let limits = match &r.limits {
                Some(l) => Some(l.validate(&format!("tenant rule {rule} limits"))?),
                None => None,
            };
            rules.push(Rule {
                namespace,
                service_account,
                route,
                limits,
            });
        }
        check_prefixes(&prefixes)?;
        let default_limits = match &self.default_limits {
            Some(l) => l.validate("defaultLimits")?,
            None => Limits::default(),
        };
        let mut usage_refresh = UsageRefresh::default();
        if let Some(i) = &self.usage_refresh_interval {
            usage_refresh.interval = etcd_shim_core::parse_duration(i)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| ConfigError::BadLimit {
                    at: "usageRefreshInterval".into(),
                    error: format!("{i:?} is not a positive duration such as 30s"),
                })?;
        }
        if let Some(w) = self.usage_refresh_writes {
            if w == 0 {
                return Err(ConfigError::BadLimit {
                    at: "usageRefreshWrites".into(),
                    error: "must be at least 1".into(),
                });
            }
            usage_refresh.writes = w;
        }
        Ok(Plan {
            backends: self.backends.clone(),
            default_backend,
            allow_unlisted: self.allow_unlisted,
            rules,
            default_limits,
            usage_refresh,
        })
    }
}

fn name_match(v: &str, rule: usize) -> Result<Match, ConfigError> {
    if v == "*" {
        return Ok(Match::Any);
    }
    // Kubernetes names are DNS labels or subdomains; anything else can never match and is
    // most likely a typo such as a glob.
    let valid = !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
    if valid {
        Ok(Match::Exact(v.to_owned()))
    } else {
        Err(ConfigError::BadName {
            rule,
            value: v.to_owned(),
        })
    }
}

/// A prefix some keys live under.
struct Claimed {
    prefix: String,
    /// A root holds `<ns>/<sa>/` below it: two equal roots never mix tenants, because
    /// the suffix differs; any other overlap does.
    is_root: bool,
    what: String,
}

impl Claimed {
    fn root(p: &str, what: &str) -> Self {
        Self {
            prefix: p.to_owned(),
            is_root: true,
            what: what.to_owned(),
        }
    }

    fn exact(p: &str, what: &str) -> Self {
        Self {
            prefix: p.to_owned(),
            is_root: false,
            what: what.to_owned(),
        }
    }
}

fn check_prefixes(all: &[Claimed]) -> Result<(), ConfigError> {
    for c in all {
        if !c.prefix.starts_with('/') || !c.prefix.ends_with('/') {
            return Err(ConfigError::BadPrefix(c.prefix.clone()));
        }
    }
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            let overlap = a.prefix.starts_with(&b.prefix) || b.prefix.starts_with(&a.prefix);
            let harmless = a.is_root && b.is_root && a.prefix == b.prefix;
            if overlap && !harmless {
                return Err(ConfigError::Overlap(
                    format!("{} {:?}", a.what, a.prefix),
                    format!("{} {:?}", b.what, b.prefix),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Base {
        Base {
            tenant_prefix_root: "/etcd-shim/tenants/".into(),
            lease_prefix: "/etcd-shim/leases/".into(),
            compaction_prefix: "/etcd-shim/compactions/".into(),
        }
    }

    fn check(yaml: &str) -> Result<Plan, ConfigError> {
        ConfigFile::parse(yaml)?.validate(&base())
    }

    #[test]
    fn replicas_share_the_per_replica_limits_and_not_the_counted_ones() {
        let spec: LimitsSpec = serde_norway::from_str(
            "{readsPerSecond: 100, readBurst: 9, writesPerSecond: 10, concurrentRequests: 5, watches: 1, leases: 3, keys: 7, bytes: 1Mi}",
        )
        .unwrap();
        let whole = spec.validate("defaultLimits").unwrap();
        assert_eq!(whole.per_replica(1), whole);
        let half = whole.per_replica(2);
        let reads = half.reads.as_ref().unwrap();
        assert_eq!((reads.per_second, reads.burst), (50.0, 5));
        let writes = half.writes.as_ref().unwrap();
        assert_eq!((writes.per_second, writes.burst), (5.0, 5));
        assert_eq!((half.concurrent_requests, half.watches), (Some(3), Some(1)));
        assert_eq!(
            (half.leases, half.keys, half.bytes),
            (Some(3), Some(7), Some(1 << 20))
        );
        // Two replicas never allow more than the whole, give or take one per replica.
        assert!(2 * half.concurrent_requests.unwrap() <= whole.concurrent_requests.unwrap() + 1);
        assert_eq!(whole.per_replica(0), whole);
    }

    #[test]
    fn backends_are_shared_unless_marked_dedicated() {
        let plan = check(
            r#"
backends:
  - name: own
    endpoints: ["http://10.0.0.5:2379"]
    dedicated: true
  - name: main
    endpoints: ["http://10.0.0.6:2379"]
"#,
        )
        .unwrap();
        let dedicated: Vec<_> = plan
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.dedicated))
            .collect();
        assert_eq!(dedicated, [("own", true), ("main", false)]);
    }

    #[test]
    fn full_example_parses() {
        let plan = check(
            r#"
backends:
  - name: dedicated
    endpoints: ["http://10.0.0.5:2379", "http://10.0.0.6:2379"]
defaultBackend: default
allowUnlisted: false
tenants:
  - namespace: team-a
    serviceAccount: apiserver
    backend: dedicated
    prefix: /team-a/
  - namespace: team-b
    prefixRoot: /team-b-tenants/
  - namespace: sandbox
    action: deny
  - serviceAccount: metrics-server
"#,
        )
        .unwrap();
        assert!(!plan.allow_unlisted);
        assert_eq!(plan.default_backend, "default");
        assert_eq!(plan.rules.len(), 4);
        assert_eq!(
            plan.rules[0].route,
            Some(Route {
                backend: "dedicated".into(),
                prefix: PrefixChoice::Exact("/team-a/".into())
            })
        );
        assert_eq!(plan.rules[1].service_account, Match::Any);
        assert_eq!(plan.rules[2].route, None);
        assert_eq!(plan.rules[3].namespace, Match::Any);
        assert_eq!(
            plan.rules[3].route,
            Some(Route {
                backend: "default".into(),
                prefix: PrefixChoice::Root(None)
            })
        );
    }

    #[test]
    fn empty_mapping_is_the_defaults_and_empty_file_is_refused() {
        let plan = check("{}").unwrap();
        assert!(plan.allow_unlisted);
        assert!(plan.rules.is_empty());
        assert_eq!(plan.default_backend, "default");
        assert!(matches!(check(" \n"), Err(ConfigError::Syntax(_))));
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "x").unwrap();
        let ca = ca.display().to_string();
        type Case = (&'static str, String, fn(&ConfigError) -> bool);
        let cases: Vec<Case> = vec![
            (
                "unknown backend",
                "tenants: [{namespace: a, backend: nope}]".into(),
                |e| matches!(e, ConfigError::UnknownBackend { rule: 1, .. }),
            ),
            (
                "unknown default backend",
                "defaultBackend: nope".into(),
                |e| matches!(e, ConfigError::UnknownDefaultBackend(_)),
            ),
            (
                "duplicate backend",
                "backends: [{name: x, endpoints: [http://a:1]}, {name: x, endpoints: [http://b:1]}]".into(),
                |e| matches!(e, ConfigError::DuplicateBackend(_)),
            ),
            (
                "no endpoints",
                "backends: [{name: x, endpoints: []}]".into(),
                |e| matches!(e, ConfigError::NoEndpoints(_)),
            ),
            (
                "bad endpoint",
                "backends: [{name: x, endpoints: ['unix:///run/etcd.sock']}]".into(),
                |e| matches!(e, ConfigError::BadEndpoint { .. }),
            ),
            (
                "missing tls file",
                format!("backends: [{{name: x, endpoints: [https://a:1], tls: {{ca: {ca}, cert: /nonexistent/c.crt, key: /nonexistent/c.key}}}}]"),
                |e| matches!(e, ConfigError::MissingFile { what: "cert", .. }),
            ),
            (
                "cert without key",
                format!("backends: [{{name: x, endpoints: [https://a:1], tls: {{cert: {ca}}}}}]"),
                |e| matches!(e, ConfigError::CertWithoutKey(_)),
            ),
            (
                "prefix without slashes",
                "tenants: [{namespace: a, serviceAccount: b, prefix: team-a}]".into(),
                |e| matches!(e, ConfigError::BadPrefix(_)),
            ),
            (
                "prefix not ending in slash",
                "tenants: [{namespace: a, serviceAccount: b, prefix: /team-a}]".into(),
                |e| matches!(e, ConfigError::BadPrefix(_)),
            ),
            (
                "overlapping tenant prefixes",
                "tenants: [{namespace: a, serviceAccount: b, prefix: /x/}, {namespace: c, serviceAccount: d, prefix: /x/y/}]".into(),
                |e| matches!(e, ConfigError::Overlap(..)),
            ),
            (
                "the same prefix twice",
                "tenants: [{namespace: a, serviceAccount: b, prefix: /x/}, {namespace: c, serviceAccount: d, prefix: /x/}]".into(),
                |e| matches!(e, ConfigError::Overlap(..)),
            ),
            (
                "prefix inside the default root",
                "tenants: [{namespace: a, serviceAccount: b, prefix: /etcd-shim/tenants/other/}]".into(),
                |e| matches!(e, ConfigError::Overlap(..)),
            ),
            (
                "prefix over the lease records",
                "tenants: [{namespace: a, serviceAccount: b, prefix: /etcd-shim/}]".into(),
                |e| matches!(e, ConfigError::Overlap(..)),
            ),
            (
                "prefix root inside the lease records",
                "tenants: [{namespace: a, prefixRoot: /etcd-shim/leases/x/}]".into(),
                |e| matches!(e, ConfigError::Overlap(..)),
            ),
            (
                "nested prefix roots",
                "tenants: [{namespace: a, prefixRoot: /r/}, {namespace: b, prefixRoot: /r/a/}]".into(),
                |e| matches!(e, ConfigError::Overlap(..)),
            ),
            (
                "prefix on a wildcard rule",
                "tenants: [{namespace: a, prefix: /a/}]".into(),
                |e| matches!(e, ConfigError::PrefixOnWildcard { rule: 1 }),
            ),
            (
                "prefix and root",
                "tenants: [{namespace: a, serviceAccount: b, prefix: /a/, prefixRoot: /r/}]".into(),
                |e| matches!(e, ConfigError::PrefixAndRoot { .. }),
            ),
            (
                "deny with a backend",
                "tenants: [{namespace: a, action: deny, backend: default}]".into(),
                |e| matches!(e, ConfigError::DenyWithRoute { .. }),
            ),
            (
                "glob name",
                "tenants: [{namespace: 'team-*'}]".into(),
                |e| matches!(e, ConfigError::BadName { .. }),
            ),
            (
                "unknown field",
                "tenant: []".into(),
                |e| matches!(e, ConfigError::Syntax(_)),
            ),
            (
                "unknown action",
                "tenants: [{namespace: a, action: maybe}]".into(),
                |e| matches!(e, ConfigError::Syntax(_)),
            ),
        ];
        for (name, yaml, ok) in cases {
            match check(&yaml) {
                Err(e) if ok(&e) => {}
                other => panic!("{name}: got {other:?}"),
            }
        }
    }

    #[test]
    fn allowed_layouts() {
        // Equal roots never mix tenants; a root beside the default one is fine; an https
        // backend with existing TLS files is accepted (TLS itself is wired elsewhere).
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.crt", "tls.crt", "tls.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let d = dir.path().display();
        let yaml = format!(
            r#"
backends:
  - name: tls
    endpoints: [https://etcd.example:2379]
    tls: {{ca: {d}/ca.crt, cert: {d}/tls.crt, key: {d}/tls.key}}
tenants:
  - {{namespace: a, prefixRoot: /r/}}
  - {{namespace: b, prefixRoot: /r/, backend: tls}}
  - {{namespace: c, prefixRoot: /etcd-shim/tenants/}}
  - {{namespace: d, serviceAccount: x, prefix: /d-x/}}
  - {{namespace: d, serviceAccount: y, prefix: /d-y/}}
"#
        );
        let plan = check(&yaml).unwrap();
        assert_eq!(plan.rules.len(), 5);
    }

    #[test]
    fn limits_parse_with_defaults_and_per_rule() {
        let plan = check(
            r#"
defaultLimits:
  readsPerSecond: 100
  writesPerSecond: 20.5
  writeBurst: 40
  concurrentRequests: 16
  watches: 50
  leases: 100
  keys: 10000
  bytes: 64Mi
usageRefreshInterval: 10s
usageRefreshWrites: 50
tenants:
  - namespace: team-a
    serviceAccount: api
    limits: {bytes: 1048576, keys: 10}
  - namespace: team-b
"#,
        )
        .unwrap();
        let d = &plan.default_limits;
        assert_eq!(
            d.reads,
            Some(Rate {
                per_second: 100.0,
                burst: 100
            })
        );
        assert_eq!(
            d.writes,
            Some(Rate {
                per_second: 20.5,
                burst: 40
            })
        );
        assert_eq!(d.concurrent_requests, Some(16));
        assert_eq!((d.watches, d.leases), (Some(50), Some(100)));
        assert_eq!((d.keys, d.bytes), (Some(10_000), Some(64 << 20)));
        // A rule's limits replace the defaults as a whole: unset there is unlimited.
        let a = plan.rules[0].limits.as_ref().unwrap();
        assert_eq!((a.keys, a.bytes, a.reads), (Some(10), Some(1 << 20), None));
        assert!(a.has_quota());
        assert_eq!(plan.rules[1].limits, None, "defaults apply");
        assert_eq!(
            plan.usage_refresh,
            UsageRefresh {
                interval: Duration::from_secs(10),
                writes: 50
            }
        );
        // Nothing set: unlimited, default refresh.
        let plan = check("{}").unwrap();
        assert_eq!(plan.default_limits, Limits::default());
        assert!(!plan.default_limits.has_quota());
        assert_eq!(plan.usage_refresh, UsageRefresh::default());
        // A fractional rate gets a burst of at least one.
        let plan = check("defaultLimits: {writesPerSecond: 0.2}").unwrap();
        assert_eq!(plan.default_limits.writes.unwrap().burst, 1);
    }

    #[test]
    fn byte_quantities() {
        for (text, bytes) in [
            ("'1024'", Some(1024)),
            ("2Ki", Some(2048)),
            ("3Gi", Some(3 << 30)),
            ("5M", Some(5_000_000)),
            ("1k", Some(1000)),
            ("12", Some(12)),
        ] {
            let plan = check(&format!("defaultLimits: {{bytes: {text}}}"));
            assert_eq!(
                plan.map(|p| p.default_limits.bytes).ok(),
                Some(bytes),
                "{text}"
            );
        }
        for text in ["1.5Mi", "lots", "-3", "1Pi", "''"] {
            assert!(
                check(&format!("defaultLimits: {{bytes: {text}}}")).is_err(),
                "{text}"
            );
        }
    }

    #[test]
    fn limit_refusals() {
        let bad = |yaml: &str| match check(yaml) {
            Err(ConfigError::BadLimit { at, error }) => format!("{at}: {error}"),
            other => panic!("{yaml}: got {other:?}"),
        };
        assert!(bad("defaultLimits: {readBurst: 5}").contains("readBurst needs readsPerSecond"));
        assert!(bad("defaultLimits: {writesPerSecond: 5, writeBurst: 0}").contains("at least 1"));
        assert!(bad("defaultLimits: {readsPerSecond: 0}").contains("positive"));
        assert!(bad("defaultLimits: {readsPerSecond: -1}").contains("positive"));
        assert!(bad("defaultLimits: {readsPerSecond: .nan}").contains("positive"));
        assert!(bad("defaultLimits: {concurrentRequests: 0}").contains("concurrentRequests"));
        assert!(bad("defaultLimits: {bytes: huge}").contains("quantity"));
        assert!(
            bad("tenants: [{namespace: a, limits: {writeBurst: 2}}]")
                .starts_with("tenant rule 1 limits:")
        );
        assert!(bad("usageRefreshInterval: soon").starts_with("usageRefreshInterval"));
        assert!(bad("usageRefreshInterval: 0s").starts_with("usageRefreshInterval"));
        assert!(bad("usageRefreshWrites: 0").starts_with("usageRefreshWrites"));
        // Negative counts and unknown fields are not even the right shape.
        for yaml in [
            "defaultLimits: {keys: -1}",
            "defaultLimits: {watches: -5}",
            "defaultLimits: {readBurst: -5, readsPerSecond: 1}",
            "defaultLimits: {qps: 5}",
        ] {
            assert!(matches!(check(yaml), Err(ConfigError::Syntax(_))), "{yaml}");
        }
        assert!(matches!(
            check("tenants: [{namespace: a, action: deny, limits: {keys: 1}}]"),
            Err(ConfigError::DenyWithRoute { rule: 1 })
        ));
        // Zero watches, leases, keys or bytes are allowed: a tenant that may hold none.
        let plan = check("defaultLimits: {watches: 0, leases: 0, keys: 0, bytes: 0}").unwrap();
        assert_eq!(plan.default_limits.keys, Some(0));
    }
}
