//! Per-tenant limits, so that no tenant can fill or flood the etcd it shares with others.
//! Rates, concurrency, watches and leases are refused with etcd's own
//! `etcdserver: too many requests`; writes past a key or byte quota with etcd's
//! `etcdserver: mvcc: database space exceeded`. Reads and deletes are never refused by a
//! quota, so a tenant can always clean up.
//!
//! Usage is measured from etcd (a paged scan of the tenant's prefix at one revision, see
//! `usage`) and
//! kept current between measurements with the broker's own writes, whose effect is read
//! from the `prev_kv` etcd returns. The request path makes no etcd call for accounting,
//! except for a tenant's first write after start-up and for writes close to the quota.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tonic::Status;

use crate::config::{Limits, Rate, UsageRefresh};
use crate::error::EtcdError;
use crate::metrics::Metrics;
use crate::quota::Delta;
use crate::usage;
use crate::{Tenant, refuse};

/// Metrics label of every tenant that no rule names exactly, so that the number of
/// series stays bounded by the config.
pub const UNLISTED: &str = "unlisted";

/// A measurement older than this is redone before a write is refused, so that deletes
/// made through another broker replica are seen.
const REMEASURE_BEFORE_REFUSING: Duration = Duration::from_secs(2);
/// How often tenants without a quota are measured for Maintenance.Status at most: a scan
/// reads all their values, and they may be large.
const UNQUOTED_STATUS_INTERVAL: Duration = Duration::from_secs(300);
/// Keys looked up at once when a write near the quota needs the sizes it replaces
/// (etcd's default limit of operations per transaction).
const LOOKUP_MAX_KEYS: usize = 128;
/// Bound on remembered tenant states; past it those no tenant refers to are dropped.
const STATES_MAX: usize = 10_000;

/// Which rate a call counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Read,
    Write,
}

/// Why a limit refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    ReadRate,
    WriteRate,
    WriteBytes,
    Concurrency,
    Watches,
    Leases,
    Keys,
    Bytes,
}

impl Refusal {
    /// Label of `etcd_broker_limit_rejections_total` and of the audit line.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ReadRate => "read_rate",
            Refusal::WriteRate => "write_rate",
            Refusal::WriteBytes => "write_bytes",
            Refusal::Concurrency => "concurrency",
            Refusal::Watches => "watches",
            Refusal::Leases => "leases",
            Refusal::Keys => "keys",
            Refusal::Bytes => "bytes",
        }
    }

    /// What the client sees: what etcd answers when it is overloaded or full.
    pub fn error(self) -> EtcdError {
        match self {
            Refusal::Keys | Refusal::Bytes => EtcdError::NoSpace,
            _ => EtcdError::TooManyRequests,
        }
    }
}

/// A token bucket: `rate.per_second` tokens a second, at most `rate.burst` saved up.
/// The rate is passed on every call, so a reload changes it without losing the tokens.
#[derive(Debug, Default)]
pub struct Bucket {
    tokens: f64,
    /// `None` until first used: a new bucket starts full.
    last: Option<Instant>,
}

impl Bucket {
    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant, rate: Rate) -> bool {
        self.take_n(now, rate, 1)
    }

    /// Takes `n` tokens, owing what there is not, and says how long to wait before
    /// going on: the time the rate takes to pay the debt. Callers that all wait so go
    /// through at the rate, in turn.
    pub fn pace(&mut self, now: Instant, rate: Rate, n: u64) -> Duration {
        self.tokens = self.refill(now, rate) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate.per_second)
        }
    }

    /// Takes `n` tokens if there are as many, or a full bucket's worth if `n` is more
    /// than a burst: then the bucket owes the rest and refills from below zero, so over
    /// any span no more than the burst plus the rate times the span goes through, plus
    /// one call.
    pub fn take_n(&mut self, now: Instant, rate: Rate, n: u64) -> bool {
        let tokens = self.refill(now, rate);
        let n = n as f64;
        if tokens >= n.min(f64::from(rate.burst)) {
            self.tokens = tokens - n;
            true
        } else {
            self.tokens = tokens;
            false
        }
    }

    /// The tokens at `now`: what was left plus what the rate added since, at most a
    /// burst (a new bucket starts full).
    fn refill(&mut self, now: Instant, rate: Rate) -> f64 {
        let burst = f64::from(rate.burst);
        let tokens = match self.last {
            None => burst,
            Some(last) => {
                let refill = now.saturating_duration_since(last).as_secs_f64() * rate.per_second;
                (self.tokens + refill).min(burst)
            }
        };
        self.last = Some(now);
        tokens
    }
}

/// A tenant's keys and bytes as this broker knows them.
#[derive(Debug, Default)]
pub struct Usage {
    /// Last measurement plus this broker's writes since; `None` until first measured.
    used: Option<Delta>,
    /// Growth of writes sent to etcd and not answered yet.
    reserved: Delta,
    measured_at: Option<Instant>,
    /// Writes through this broker since the last measurement.
    writes_since: u64,
    /// Something changed that the writes did not tell (a cancelled call, a revoked lease).
    dirty: bool,
    /// While a measurement runs: this broker's writes with their revisions, so those the
    /// scan did not see (revision after the scan's) are added on top of it.
    during_scan: Option<Vec<(i64, Delta)>>,
    /// Counts finished measurements, so concurrent callers measure once.
    generation: u64,
}

/// Which quota a write would break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    Keys,
    Bytes,
}

impl Usage {
    pub fn used(&self) -> Option<Delta> {
        self.used
    }

    /// Reserves the growth of a write if it fits under the limits. A write that does not
    /// grow anything always fits, even over quota.
    pub fn try_reserve(
        &mut self,
        inc: Delta,
        keys: Option<u64>,
        bytes: Option<u64>,
    ) -> Result<Delta, Exceeded> {
        let g = inc.growth();
        let used = self.used.unwrap_or_default();
        let over = |limit: Option<u64>, used: i64, reserved: i64, grow: i64| {
            limit.is_some_and(|l| grow > 0 && used + reserved + grow > l as i64)
        };
        if over(keys, used.keys, self.reserved.keys, g.keys) {
            return Err(Exceeded::Keys);
        }
        if over(bytes, used.bytes, self.reserved.bytes, g.bytes) {
            return Err(Exceeded::Bytes);
        }
        self.reserved = self.reserved.plus(g);
        Ok(g)
    }

    pub fn release(&mut self, held: Delta) {
        self.reserved = self.reserved.minus(held);
    }

    /// Adds what a write at revision `rev` did.
    pub fn apply(&mut self, rev: i64, d: Delta) {
        self.writes_since += 1;
        if let Some(u) = &mut self.used {
            *u = u.plus(d).max(Delta::default());
        }
        if let Some(log) = &mut self.during_scan {
            log.push((rev, d));
        }
    }

    pub fn begin_scan(&mut self) {
        self.during_scan = Some(Vec::new());
    }

    /// A scan at revision `rev` counted `measured`.
    pub fn finish_scan(&mut self, rev: i64, measured: Delta, now: Instant) {
        let later = self
            .during_scan
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|(r, _)| *r > rev)
            .fold(Delta::default(), |acc, (_, d)| acc.plus(d));
        self.used = Some(measured.plus(later).max(Delta::default()));
        self.measured_at = Some(now);
        self.writes_since = 0;
        self.dirty = false;
        self.generation += 1;
    }

    pub fn abort_scan(&mut self) {
        self.during_scan = None;
    }

    /// Whether the numbers should be measured again.
    pub fn stale(&self, now: Instant, refresh: &UsageRefresh) -> bool {
        self.dirty
            || self.writes_since >= refresh.writes
            || self
                .measured_at
                .is_none_or(|at| now.saturating_duration_since(at) >= refresh.interval)
    }

    fn older_than(&self, now: Instant, age: Duration) -> bool {
        self.measured_at
            .is_none_or(|at| now.saturating_duration_since(at) >= age)
    }
}

/// What one broker replica tracks for one tenant (one prefix on one backend). Outlives
/// config reloads, so new limits apply to the usage already counted.
#[derive(Debug)]
pub struct TenantState {
    /// Metrics label; follows the config.
    label: Mutex<Arc<str>>,
    /// Limits in force, for the metrics.
    limits: Mutex<Arc<Limits>>,
    reads: Mutex<Bucket>,
    writes: Mutex<Bucket>,
    write_bytes: Mutex<Bucket>,
    watch_bytes: Mutex<Bucket>,
    in_flight: AtomicU32,
    /// Watches open or being created through this broker.
    watches: AtomicI64,
    /// Leases alive, counted in etcd and kept current with this broker's grants and
    /// revokes; -1 until counted.
    leases: AtomicI64,
    usage: Mutex<Usage>,
    /// One measurement at a time.
    measuring: tokio::sync::Mutex<()>,
    /// A background measurement is running.
    background: AtomicBool,
    /// The tenant's compacted revision as this broker last saw it in etcd: a lower bound
    /// that lets reads below it be refused without asking etcd (see `compaction`).
    compacted: AtomicI64,
}

impl TenantState {
    /// The highest compacted revision of the tenant seen so far (0: none).
    pub fn compacted(&self) -> i64 {
        self.compacted.load(Ordering::Relaxed)
    }

    /// Notes a compacted revision read from etcd or just recorded there.
    pub fn saw_compacted(&self, rev: i64) {
        self.compacted.fetch_max(rev, Ordering::Relaxed);
    }

    fn new(label: Arc<str>, limits: Arc<Limits>) -> Self {
        Self {
            label: Mutex::new(label),
            limits: Mutex::new(limits),
            reads: Mutex::default(),
            writes: Mutex::default(),
            write_bytes: Mutex::default(),
            watch_bytes: Mutex::default(),
            in_flight: AtomicU32::new(0),
            watches: AtomicI64::new(0),
            leases: AtomicI64::new(-1),
            compacted: AtomicI64::new(0),
            usage: Mutex::default(),
            measuring: tokio::sync::Mutex::new(()),
            background: AtomicBool::new(false),
        }
    }

    fn usage(&self) -> MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a token from the rate of `class`.
    pub fn take(&self, limits: &Limits, class: Class) -> Result<(), Refusal> {
        let (bucket, rate, refusal) = match class {
            Class::Read => (&self.reads, limits.reads, Refusal::ReadRate),
            Class::Write => (&self.writes, limits.writes, Refusal::WriteRate),
        };
        let Some(rate) = rate else { return Ok(()) };
        let ok = bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(Instant::now(), rate);
        if ok { Ok(()) } else { Err(refusal) }
    }

    /// Takes `bytes` from the rate of bytes written.
    pub fn take_bytes(&self, limits: &Limits, bytes: u64) -> Result<(), Refusal> {
        let Some(rate) = limits.write_bytes else {
            return Ok(());
        };
        let ok = self
            .write_bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_n(Instant::now(), rate, bytes);
        if ok { Ok(()) } else { Err(Refusal::WriteBytes) }
    }

    /// How long to hold a watch response of `bytes` so that the tenant's watches together
    /// stay within its watch byte rate.
    pub fn pace_watch(&self, limits: &Limits, bytes: usize) -> Duration {
        let Some(rate) = limits.watch_bytes else {
            return Duration::ZERO;
        };
        self.watch_bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pace(Instant::now(), rate, bytes as u64)
    }

    /// Counts a call in flight until the permit drops.
    pub fn enter(self: &Arc<Self>, limits: &Limits) -> Result<Permit, Refusal> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if limits.concurrent_requests.is_some_and(|max| before >= max) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Concurrency);
        }
        Ok(Permit(self.clone()))
    }

    /// Counts one more watch, if the cap allows it.
    pub fn open_watch(&self, limits: &Limits) -> Result<(), Refusal> {
        let before = self.watches.fetch_add(1, Ordering::AcqRel);
        if limits.watches.is_some_and(|max| before >= i64::from(max)) {
            self.watches.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Watches);
        }
        Ok(())
    }

    pub fn close_watches(&self, n: usize) {
        self.watches.fetch_sub(n as i64, Ordering::AcqRel);
    }

    /// A lease of the tenant was revoked through this broker.
    pub fn lease_revoked(&self) {
        let _ = self
            .leases
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 0).then_some(n - 1)
            });
        // Its keys went with it.
        self.usage().dirty = true;
    }
}

/// A call in flight; dropping it ends the call for the concurrency limit.
pub struct Permit(Arc<TenantState>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Growth of a write held against the quota until etcd answers. Dropped without an
/// answer (the call was cancelled), it marks the usage for measuring again, since the
/// write may or may not have happened.
pub struct Reservation {
    state: Option<Arc<TenantState>>,
    held: Delta,
}

impl Reservation {
    /// Nothing to account: the tenant has no quota, or the call writes nothing.
    pub(crate) fn none() -> Self {
        Self {
            state: None,
            held: Delta::default(),
        }
    }

    /// Whether etcd should be asked for `prev_kv` to learn what the write did.
    pub fn tracks(&self) -> bool {
        self.state.is_some()
    }

    /// etcd answered: the write at revision `rev` did `d`.
    pub fn settle(mut self, rev: i64, d: Delta) {
        if let Some(s) = self.state.take() {
            let mut u = s.usage();
            u.release(self.held);
            u.apply(rev, d);
        }
    }

    /// etcd refused the write: nothing changed.
    pub fn release(mut self) {
        if let Some(s) = self.state.take() {
            s.usage().release(self.held);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(s) = self.state.take() {
            let mut u = s.usage();
            u.release(self.held);
            u.dirty = true;
        }
    }
}

/// A lease counted against the cap; given back unless the grant succeeds.
pub struct LeaseSlot {
    state: Option<Arc<TenantState>>,
}

impl LeaseSlot {
    pub fn keep(mut self) {
        self.state = None;
    }
}

impl Drop for LeaseSlot {
    fn drop(&mut self) {
        if let Some(s) = self.state.take() {
            s.leases.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A tenant's keys live under one prefix on one backend.
type StateKey = (Arc<str>, Vec<u8>);

/// Every tenant state of this broker, by backend and prefix; also what /metrics shows.
#[derive(Debug, Default)]
pub struct States {
    map: Mutex<HashMap<StateKey, Arc<TenantState>>>,
    /// Limits by metrics label as the config sets them, for the limit series.
    configured: RwLock<Vec<(Arc<str>, Arc<Limits>)>>,
}

impl States {
    /// The state of the tenant with `prefix` on `backend`, made on first use; takes the
    /// label and limits of the config in force.
    pub fn state(
        &self,
        backend: &Arc<str>,
        prefix: &[u8],
        label: &Arc<str>,
        limits: &Arc<Limits>,
    ) -> Arc<TenantState> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= STATES_MAX {
            map.retain(|_, s| Arc::strong_count(s) > 1);
        }
        let s = map
            .entry((backend.clone(), prefix.to_vec()))
            .or_insert_with(|| Arc::new(TenantState::new(label.clone(), limits.clone())))
            .clone();
        *s.label.lock().unwrap_or_else(|e| e.into_inner()) = label.clone();
        *s.limits.lock().unwrap_or_else(|e| e.into_inner()) = limits.clone();
        s
    }

    /// Records the limits of a new config: one entry per label.
    pub fn configure(&self, by_label: Vec<(Arc<str>, Arc<Limits>)>) {
        *self.configured.write().unwrap_or_else(|e| e.into_inner()) = by_label;
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantResourceLabels {
    tenant: String,
    resource: &'static str,
}

/// Sums per label, computed at scrape time so the request path keeps no metric state.
impl Collector for States {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let usage = Family::<TenantResourceLabels, Gauge>::default();
        let states: Vec<Arc<TenantState>> = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for s in states {
            let tenant = s
                .label
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .to_string();
            let add = |resource: &'static str, v: i64| {
                usage
                    .get_or_create(&TenantResourceLabels {
                        tenant: tenant.clone(),
                        resource,
                    })
                    .inc_by(v);
            };
            add(
                "requests_in_flight",
                i64::from(s.in_flight.load(Ordering::Relaxed)),
            );
            add("watches", s.watches.load(Ordering::Relaxed));
            let leases = s.leases.load(Ordering::Relaxed);
            if leases >= 0 {
                add("leases", leases);
            }
            if let Some(u) = s.usage().used() {
                add("keys", u.keys);
                add("bytes", u.bytes);
            }
        }
        let limit =
            Family::<TenantResourceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for (label, l) in self
            .configured
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let set = |resource: &'static str, v: Option<f64>| {
                if let Some(v) = v {
                    limit
                        .get_or_create(&TenantResourceLabels {
                            tenant: label.to_string(),
                            resource,
                        })
                        .set(v);
                }
            };
            set("reads_per_second", l.reads.map(|r| r.per_second));
            set("writes_per_second", l.writes.map(|r| r.per_second));
            set(
                "write_bytes_per_second",
                l.write_bytes.map(|r| r.per_second),
            );
            set(
                "watch_bytes_per_second",
                l.watch_bytes.map(|r| r.per_second),
            );
            set("requests_in_flight", l.concurrent_requests.map(f64::from));
            set("watches", l.watches.map(f64::from));
            set("leases", l.leases.map(f64::from));
            set("keys", l.keys.map(|v| v as f64));
            set("bytes", l.bytes.map(|v| v as f64));
        }
        usage.encode(encoder.encode_descriptor(
            "tenant_usage",
            "What each tenant uses (keys and bytes as last measured plus this broker's writes; watches and requests on this broker; leases alive), by tenant (named by a config rule, or unlisted) and resource",
            None,
            usage.metric_type(),
        )?)?;
        limit.encode(encoder.encode_descriptor(
            "tenant_limit",
            "Limits in force by tenant (named by a config rule, or unlisted) and resource; absent means unlimited",
            None,
            limit.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Applies every tenant's limits: lets calls in under their concurrency and rates, holds
/// writes against their quotas (measuring usage through `usage` when due), and counts
/// leases against their cap. Refusals are counted and audited by `refuse`, in etcd's
/// words.
#[derive(Clone)]
pub(crate) struct Limiter {
    metrics: Metrics,
}

impl Limiter {
    pub(crate) fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }

    /// Counts and audits a refusal by a limit, then returns it as etcd would say it.
    pub(crate) fn refuse(&self, t: &Tenant, method: &'static str, r: Refusal) -> Status {
        refuse::by_limit(&self.metrics, t, method, r)
    }

    /// Lets a call in under the tenant's concurrency and rate limits; the permit counts
    /// the call as in flight until dropped.
    pub(crate) fn admit(
        &self,
        t: &Tenant,
        class: Class,
        method: &'static str,
    ) -> Result<Permit, Status> {
        let permit = t
            .state
            .enter(&t.limits)
            .map_err(|r| self.refuse(t, method, r))?;
        t.state
            .take(&t.limits, class)
            .map_err(|r| self.refuse(t, method, r))?;
        Ok(permit)
    }

    /// Takes a token from the tenant's rate only, for calls that may block for long (a
    /// lock wait) and so are not counted as in flight.
    pub(crate) fn rate(
        &self,
        t: &Tenant,
        class: Class,
        method: &'static str,
    ) -> Result<(), Status> {
        t.state
            .take(&t.limits, class)
            .map_err(|r| self.refuse(t, method, r))
    }

    /// Holds the growth of a write against the tenant's quota, or refuses it with
    /// etcd's "database space exceeded". `worst` is the most the write can add; near the
    /// quota, the sizes of the pairs it replaces (`keys`) are looked up and `exact`
    /// computes what it adds given them.
    pub(crate) async fn reserve(
        &self,
        t: &Arc<Tenant>,
        method: &'static str,
        worst: Delta,
        keys: impl FnOnce() -> Vec<Vec<u8>>,
        exact: impl FnOnce(&HashMap<Vec<u8>, i64>) -> Delta,
    ) -> Result<Reservation, Status> {
        // Every byte written is history until etcd compacts, whether or not it grows
        // the tenant's live data; `worst` counts each put whole.
        t.state
            .take_bytes(&t.limits, worst.bytes.max(0) as u64)
            .map_err(|r| self.refuse(t, method, r))?;
        if !t.limits.has_quota() {
            return Ok(Reservation::none());
        }
        if t.state.usage().used().is_none() {
            self.measure(t).await?;
        }
        self.refresh_soon(t);
        let attempt = |inc: Delta| {
            t.state
                .usage()
                .try_reserve(inc, t.limits.keys, t.limits.bytes)
                .map(|held| Reservation {
                    state: Some(t.state.clone()),
                    held,
                })
        };
        let mut exceeded = match attempt(worst) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        // Before refusing: deletes through another replica may have made room...
        if t.state
            .usage()
            .older_than(Instant::now(), REMEASURE_BEFORE_REFUSING)
        {
            self.measure(t).await?;
            match attempt(worst) {
                Ok(r) => return Ok(r),
                Err(e) => exceeded = e,
            }
        }
        // ...and the write may replace pairs rather than add new ones.
        let mut keys = keys();
        keys.sort();
        keys.dedup();
        if !keys.is_empty() && keys.len() <= LOOKUP_MAX_KEYS {
            let old = usage::lookup_sizes(t, keys).await?;
            match attempt(exact(&old)) {
                Ok(r) => return Ok(r),
                Err(e) => exceeded = e,
            }
        }
        let r = match exceeded {
            Exceeded::Keys => Refusal::Keys,
            Exceeded::Bytes => Refusal::Bytes,
        };
        Err(self.refuse(t, method, r))
    }

    /// Accounting for a write that cannot grow usage (a delete).
    pub(crate) fn track(&self, t: &Tenant) -> Reservation {
        if t.limits.has_quota() {
            Reservation {
                state: Some(t.state.clone()),
                held: Delta::default(),
            }
        } else {
            Reservation::none()
        }
    }

    /// After a write: measures again in the background if the numbers are due.
    pub(crate) fn refresh_soon(&self, t: &Arc<Tenant>) {
        if !t.limits.has_quota() || !t.state.usage().stale(Instant::now(), &t.refresh) {
            return;
        }
        if t.state.background.swap(true, Ordering::AcqRel) {
            return;
        }
        let limiter = self.clone();
        let t = t.clone();
        tokio::spawn(async move {
            if let Err(e) = limiter.measure(&t).await {
                tracing::warn!(tenant = %t.name, error = %e.message(), "measuring tenant usage failed; will retry");
            }
            t.state.background.store(false, Ordering::Release);
        });
    }

    /// The tenant's keys and bytes for Maintenance.Status, measured if due.
    pub(crate) async fn usage_for_status(&self, t: &Tenant) -> Result<Delta, Status> {
        let mut refresh = t.refresh;
        if !t.limits.has_quota() {
            refresh.interval = refresh.interval.max(UNQUOTED_STATUS_INTERVAL);
            // Writes of tenants without a quota are not counted, only measured.
            refresh.writes = u64::MAX;
        }
        if t.state.usage().stale(Instant::now(), &refresh) {
            self.measure(t).await?;
        }
        Ok(t.state.usage().used().unwrap_or_default())
    }

    /// Measures the tenant's usage from etcd; concurrent callers share one scan.
    async fn measure(&self, t: &Tenant) -> Result<(), Status> {
        let generation = t.state.usage().generation;
        let _one = t.state.measuring.lock().await;
        if t.state.usage().generation != generation {
            return Ok(());
        }
        t.state.usage().begin_scan();
        let res = usage::scan(t).await;
        let mut u = t.state.usage();
        match res {
            Ok((rev, measured)) => {
                u.finish_scan(rev, measured, Instant::now());
                tracing::debug!(tenant = %t.name, keys = measured.keys, bytes = measured.bytes, rev, "tenant usage measured");
                Ok(())
            }
            Err(e) => {
                u.abort_scan();
                Err(e)
            }
        }
    }

    /// Counts a lease to be granted against the cap. At the cap, the leases alive are
    /// counted again in etcd first, since leases expire without the broker seeing it.
    pub(crate) async fn lease_slot(&self, t: &Tenant) -> Result<LeaseSlot, Status> {
        let Some(max) = t.limits.leases.map(i64::from) else {
            return Ok(LeaseSlot { state: None });
        };
        let known = t.state.leases.load(Ordering::Acquire);
        if known < 0 || known >= max {
            t.state
                .leases
                .store(usage::count_leases(t).await?, Ordering::Release);
        }
        if t.state.leases.fetch_add(1, Ordering::AcqRel) >= max {
            t.state.leases.fetch_sub(1, Ordering::AcqRel);
            return Err(self.refuse(t, "LeaseGrant", Refusal::Leases));
        }
        Ok(LeaseSlot {
            state: Some(t.state.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn pacing_lets_callers_through_at_the_rate_in_turn() {
        let now = Instant::now();
        let r = rate(100.0, 100);
        let mut b = Bucket::default();
        // A full bucket lets the burst go at once; then each caller waits for its share.
        assert_eq!(b.pace(now, r, 100), Duration::ZERO);
        assert_eq!(b.pace(now, r, 50), Duration::from_millis(500));
        assert_eq!(b.pace(now, r, 50), Duration::from_secs(1));
        // Time pays the debt back.
        assert_eq!(b.pace(now + Duration::from_secs(2), r, 100), Duration::ZERO);
    }

    #[test]
    fn bucket_starts_full_refills_and_caps_at_burst() {
        let mut b = Bucket::default();
        let t0 = Instant::now();
        let r = rate(10.0, 3);
        assert!((0..3).all(|_| b.take(t0, r)), "a full burst at once");
        assert!(!b.take(t0, r), "then empty");
        // 100 ms at 10/s is one token.
        assert!(b.take(t0 + Duration::from_millis(100), r));
        assert!(!b.take(t0 + Duration::from_millis(100), r));
        // A long pause refills to the burst, no more.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(later, r)).count(), 3);
        // Over one simulated second at a steady pace, about the rate gets through.
        let mut b = Bucket::default();
        let start = t0 + Duration::from_secs(120);
        let ok = (0..1000)
            .filter(|i| b.take(start + Duration::from_millis(*i), rate(50.0, 5)))
            .count();
        assert!((50..=56).contains(&ok), "{ok}");
    }

    #[test]
    fn bucket_keeps_tokens_when_the_rate_changes() {
        let mut b = Bucket::default();
        let t0 = Instant::now();
        assert!(b.take(t0, rate(1.0, 10)));
        // A lower burst clamps what was saved; a higher one does not invent tokens.
        assert_eq!((0..20).filter(|_| b.take(t0, rate(1.0, 4))).count(), 4);
        assert!(!b.take(t0, rate(1.0, 100)));
    }

    fn measured(keys: i64, bytes: i64) -> Usage {
        let mut u = Usage::default();
        u.begin_scan();
        u.finish_scan(10, Delta::new(keys, bytes), Instant::now());
        u
    }

    #[test]
    fn quota_reserves_growth_and_refuses_past_the_limit() {
        let mut u = measured(8, 900);
        let held = u
            .try_reserve(Delta::new(1, 50), Some(10), Some(1000))
            .unwrap();
        assert_eq!(held, Delta::new(1, 50));
        // In flight counts: 900 + 50 + 60 > 1000.
        assert_eq!(
            u.try_reserve(Delta::new(1, 60), Some(10), Some(1000)),
            Err(Exceeded::Bytes)
        );
        let held2 = u
            .try_reserve(Delta::new(1, 40), Some(10), Some(1000))
            .unwrap();
        // Exactly at the limit: no new key, no growth.
        assert_eq!(
            u.try_reserve(Delta::new(1, 0), Some(10), None),
            Err(Exceeded::Keys)
        );
        // Shrinking or same-size writes always pass, even at the limit.
        assert_eq!(
            u.try_reserve(Delta::new(0, -10), Some(10), Some(1000)),
            Ok(Delta::default())
        );
        u.release(held2);
        u.release(held);
        u.apply(11, Delta::new(1, 50));
        assert_eq!(u.used(), Some(Delta::new(9, 950)));
        assert!(
            u.try_reserve(Delta::new(1, 60), Some(10), Some(1000))
                .is_err()
        );
        // A delete makes room again at once.
        u.apply(12, Delta::new(-1, -100));
        assert!(
            u.try_reserve(Delta::new(1, 60), Some(10), Some(1000))
                .is_ok()
        );
        // Unlimited means unlimited.
        assert!(u.try_reserve(Delta::new(1000, 1 << 40), None, None).is_ok());
    }

    #[test]
    fn scan_adds_only_writes_it_did_not_see() {
        let mut u = measured(0, 0);
        u.apply(5, Delta::new(1, 10));
        u.begin_scan();
        // Answered during the scan: one before its revision (seen by it), one after.
        u.apply(19, Delta::new(1, 7));
        u.apply(21, Delta::new(1, 3));
        u.finish_scan(20, Delta::new(2, 17), Instant::now());
        assert_eq!(u.used(), Some(Delta::new(3, 20)));
        assert_eq!(u.writes_since, 0);
        // A failed scan keeps the estimate.
        u.begin_scan();
        u.apply(22, Delta::new(-1, -3));
        u.abort_scan();
        assert_eq!(u.used(), Some(Delta::new(2, 17)));
        // Never below zero, whatever deletes report.
        u.apply(23, Delta::new(-10, -1000));
        assert_eq!(u.used(), Some(Delta::new(0, 0)));
    }

    #[test]
    fn staleness() {
        let refresh = UsageRefresh {
            interval: Duration::from_secs(30),
            writes: 3,
        };
        let now = Instant::now();
        assert!(Usage::default().stale(now, &refresh), "never measured");
        let mut u = Usage::default();
        u.finish_scan(1, Delta::default(), now);
        assert!(!u.stale(now, &refresh));
        assert!(u.stale(now + Duration::from_secs(30), &refresh));
        for rev in 2..5 {
            u.apply(rev, Delta::new(1, 1));
        }
        assert!(u.stale(now, &refresh), "after 3 writes");
        u.finish_scan(5, Delta::default(), now);
        u.dirty = true;
        assert!(u.stale(now, &refresh));
    }

    #[test]
    fn refusals_speak_etcd() {
        for r in [
            Refusal::ReadRate,
            Refusal::WriteRate,
            Refusal::Concurrency,
            Refusal::Watches,
            Refusal::Leases,
        ] {
            assert_eq!(r.error(), EtcdError::TooManyRequests);
        }
        assert_eq!(Refusal::Keys.error(), EtcdError::NoSpace);
        assert_eq!(Refusal::Bytes.error(), EtcdError::NoSpace);
    }

    #[test]
    fn concurrency_and_watch_caps() {
        let s = Arc::new(TenantState::new(Arc::from("t"), Arc::default()));
        let limits = Limits {
            concurrent_requests: Some(2),
            watches: Some(1),
            ..Default::default()
        };
        let a = s.enter(&limits).unwrap();
        let _b = s.enter(&limits).unwrap();
        assert_eq!(s.enter(&limits).err(), Some(Refusal::Concurrency));
        drop(a);
        assert!(s.enter(&limits).is_ok());
        s.open_watch(&limits).unwrap();
        assert_eq!(s.open_watch(&limits), Err(Refusal::Watches));
        s.close_watches(1);
        assert!(s.open_watch(&limits).is_ok());
    }
}
