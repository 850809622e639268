//! Property test of tenant isolation: two tenants run random, seeded sequences of
//! operations at the same time against one real etcd (through their own shims and one
//! broker), with keys and range ends drawn from an alphabet made to cross prefixes
//! ("\0", "\xff", "/", "..", the other tenant's and the cluster's prefixes).
//!
//! Each tenant keeps a model of its own key space: as the only writer of its prefix, it
//! knows exactly what every read, delete, compare and watch must return. Any key of the
//! other tenant or of the cluster that leaks into a response breaks the model (and every
//! value carries its writer's name, so a leak is also visible by value). At the end, the
//! admin's direct view of etcd must hold exactly the two models under the two prefixes,
//! the untouched cluster tree, and nothing else.
//!
//! The seed is printed; rerun one with `ISOLATION_SEED=<seed>`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use etcd_client::proto::{PbKeyValue, PbRangeResponse, PbTxnOpResponse, PbTxnResponse};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, Error, EventType, GetOptions,
    LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use etcd_shim_e2e::{PREFIX_A, PREFIX_B, Pod, TwoTenants};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;

/// Operations per tenant.
const OPS: usize = 300;
/// Time after which a tenant stops early (a slow machine runs fewer operations rather
/// than timing out); the operations done are printed.
const OPS_BUDGET: Duration = Duration::from_secs(15);
/// Upper bound for one tenant's whole run, checks included.
const RUN_LIMIT: Duration = Duration::from_secs(28);

const REGISTRY: &[(&str, &str)] = &[
    ("/registry/secrets/kube-system/x", "cluster:secret"),
    ("/registry/pods/default/p", "cluster:pod"),
];

/// Key pieces: the extremes of the key space, path syntax, and other prefixes spelled out.
const PIECES: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"/",
    b"..",
    b"../",
    b"a",
    b"b",
    b"team-a",
    b"team-b",
    b"/etcd-shim/tenants/",
    b"/etcd-shim/tenants/team-b/app/",
    b"/etcd-shim/tenants/team-a/app/",
    b"/registry/",
];

fn show(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    match end {
        [] => k == key,
        [0] => k >= key,
        e => k >= key && k < e,
    }
}

/// clientv3's prefix end, to generate prefix ranges the way clients do.
fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    value: Vec<u8>,
    version: i64,
    lease: i64,
}

/// One change as a watcher must see it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Change {
    put: bool,
    key: Vec<u8>,
    value: Vec<u8>,
    /// The lease of a put, as the tenant sees it.
    lease: i64,
}

/// A compare the model can evaluate.
#[derive(Clone, Debug)]
enum Cmp {
    VersionGreaterZero,
    VersionIsZero,
    ValueIs(Vec<u8>),
}

/// A transaction's single write.
#[derive(Clone, Debug)]
enum Write {
    /// Key, value and lease (0 or the tenant's own).
    Put(Vec<u8>, Vec<u8>, i64),
    Delete(Vec<u8>, Vec<u8>),
}

/// One branch of a generated Txn: a read `(key, range_end)`, maybe a nested Txn (a
/// compare and a read), and a write.
type Branch = (
    (Vec<u8>, Vec<u8>),
    Option<((Vec<u8>, Vec<u8>, Cmp), (Vec<u8>, Vec<u8>))>,
    Write,
);

struct Tenant {
    name: &'static str,
    rng: StdRng,
    client: Client,
    model: BTreeMap<Vec<u8>, Entry>,
    log: Vec<Change>,
    seq: u64,
    own_lease: i64,
    /// The other tenant's lease, once it has published it.
    foreign_lease: Arc<Mutex<Option<i64>>>,
    ops_done: BTreeMap<&'static str, usize>,
}

impl Tenant {
    fn key(&mut self) -> Vec<u8> {
        let n = self.rng.random_range(1..=3);
        (0..n)
            .flat_map(|_| PIECES[self.rng.random_range(0..PIECES.len())].to_vec())
            .collect()
    }

    fn end(&mut self, key: &[u8]) -> Vec<u8> {
        match self.rng.random_range(0..6) {
            0 => Vec::new(),
            1 => vec![0],
            2 => prefix_end(key),
            3 => b"\xff\xff".to_vec(),
            _ => self.key(),
        }
    }

    fn value(&mut self) -> Vec<u8> {
        self.seq += 1;
        format!("tenant-{}:{}", self.name, self.seq).into_bytes()
    }

    fn range(&self, key: &[u8], end: &[u8]) -> Vec<(Vec<u8>, Entry)> {
        self.model
            .iter()
            .filter(|(k, _)| in_range(k, key, end))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    fn holds(&self, key: &[u8], end: &[u8], cmp: &Cmp) -> bool {
        let kvs = self.range(key, end);
        match cmp {
            Cmp::ValueIs(v) => !kvs.is_empty() && kvs.iter().all(|(_, e)| &e.value == v),
            Cmp::VersionGreaterZero => !kvs.is_empty(),
            Cmp::VersionIsZero => kvs.is_empty(),
        }
    }

    /// Checks a response's key-values against the model's, key, value and lease.
    fn check_kvs(&self, what: &str, got: &[PbKeyValue], want: &[(Vec<u8>, Entry)]) -> Result<()> {
        for kv in got {
            ensure!(
                kv.value
                    .starts_with(format!("tenant-{}:", self.name).as_bytes()),
                "{what}: foreign value {:?} under {}",
                String::from_utf8_lossy(&kv.value),
                show(&kv.key)
            );
        }
        let got: Vec<(Vec<u8>, Vec<u8>, i64, i64)> = got
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone(), kv.version, kv.lease))
            .collect();
        let want: Vec<(Vec<u8>, Vec<u8>, i64, i64)> = want
            .iter()
            .map(|(k, e)| (k.clone(), e.value.clone(), e.version, e.lease))
            .collect();
        ensure!(
            got == want,
            "{what}: got {:?}, model has {:?}",
            got.iter().map(|g| show(&g.0)).collect::<Vec<_>>(),
            want.iter().map(|w| show(&w.0)).collect::<Vec<_>>()
        );
        Ok(())
    }

    fn check_range(
        &self,
        what: &str,
        r: &PbRangeResponse,
        key: &[u8],
        end: &[u8],
        limit: i64,
    ) -> Result<()> {
        let all = self.range(key, end);
        let want: Vec<_> = if limit > 0 {
            all.iter().take(limit as usize).cloned().collect()
        } else {
            all.clone()
        };
        self.check_kvs(what, &r.kvs, &want)?;
        ensure!(
            r.count == all.len() as i64,
            "{what}: count {} != {}",
            r.count,
            all.len()
        );
        ensure!(
            r.more == (want.len() < all.len()),
            "{what}: more {}",
            r.more
        );
        Ok(())
    }

    fn apply_put(&mut self, key: &[u8], value: &[u8], lease: i64) -> Option<Entry> {
        let prev = self.model.get(key).cloned();
        let version = prev.as_ref().map_or(1, |e| e.version + 1);
        self.model.insert(
            key.to_vec(),
            Entry {
                value: value.to_vec(),
                version,
                lease,
            },
        );
        self.log.push(Change {
            put: true,
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
        });
        prev
    }

    fn apply_delete(&mut self, key: &[u8], end: &[u8]) -> Vec<(Vec<u8>, Entry)> {
        let gone = self.range(key, end);
        for (k, _) in &gone {
            self.model.remove(k);
            self.log.push(Change {
                put: false,
                key: k.clone(),
                value: Vec::new(),
                lease: 0,
            });
        }
        gone
    }

    fn count(&mut self, op: &'static str) {
        *self.ops_done.entry(op).or_default() += 1;
    }

    async fn step(&mut self) -> Result<()> {
        match self.rng.random_range(0..100) {
            0..25 => self.put().await,
            25..50 => self.get().await,
            50..62 => self.delete().await,
            62..85 => self.txn().await,
            85..90 => self.empty_key().await,
            90..94 => self.foreign_lease().await,
            94..97 => self.own_lease_calls().await,
            _ => self.put_with_own_lease().await,
        }
    }

    async fn put(&mut self) -> Result<()> {
        self.count("put");
        let (key, value) = (self.key(), self.value());
        let r = self
            .client
            .put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_prev_key()),
            )
            .await?;
        let prev = self.apply_put(&key, &value, 0);
        let want: Vec<_> = prev.into_iter().map(|e| (key.clone(), e)).collect();
        self.check_kvs("put prev_kv", r.0.prev_kv.as_slice(), &want)
    }

    async fn put_with_own_lease(&mut self) -> Result<()> {
        self.count("put with own lease");
        let (key, value) = (self.key(), self.value());
        let lease = self.own_lease;
        let r = self
            .client
            .put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease).with_prev_key()),
            )
            .await?;
        let prev = self.apply_put(&key, &value, lease);
        let want: Vec<_> = prev.into_iter().map(|e| (key.clone(), e)).collect();
        self.check_kvs("leased put prev_kv", r.0.prev_kv.as_slice(), &want)
    }

    /// Lease calls on the tenant's own lease: every ID that comes back is the one it
    /// was granted, and the lease holds exactly the keys the model puts on it.
    async fn own_lease_calls(&mut self) -> Result<()> {
        self.count("own lease calls");
        let own = self.own_lease;
        let listed: Vec<i64> = self
            .client
            .leases()
            .await?
            .leases()
            .iter()
            .map(|l| l.id())
            .collect();
        ensure!(listed == vec![own], "lease list {listed:?}, own {own}");
        let ttl = self
            .client
            .lease_time_to_live(own, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await?;
        let mut keys: Vec<Vec<u8>> = ttl.keys().to_vec();
        keys.sort();
        let want: Vec<Vec<u8>> = self
            .model
            .iter()
            .filter(|(_, e)| e.lease == own)
            .map(|(k, _)| k.clone())
            .collect();
        ensure!(
            ttl.id() == own && ttl.ttl() > 0 && keys == want,
            "time-to-live of the own lease: id {} ttl {}, keys {:?}, model {:?}",
            ttl.id(),
            ttl.ttl(),
            keys.iter().map(|k| show(k)).collect::<Vec<_>>(),
            want.iter().map(|k| show(k)).collect::<Vec<_>>()
        );
        let (mut keeper, mut stream) = self.client.lease_keep_alive(own).await?;
        keeper.keep_alive().await?;
        let r = stream.message().await?.context("keep-alive stream ended")?;
        ensure!(r.id() == own && r.ttl() > 0, "keep-alive answer {r:?}");
        Ok(())
    }

    async fn get(&mut self) -> Result<()> {
        self.count("get");
        let key = self.key();
        let end = self.end(&key);
        let limit = if self.rng.random_bool(0.3) {
            self.rng.random_range(1..4)
        } else {
            0
        };
        let r = self
            .client
            .get(
                key.clone(),
                Some(GetOptions::new().with_range(end.clone()).with_limit(limit)),
            )
            .await?;
        self.check_range(
            &format!("get {} {}", show(&key), show(&end)),
            &r.0,
            &key,
            &end,
            limit,
        )
    }

    async fn delete(&mut self) -> Result<()> {
        self.count("delete");
        let key = self.key();
        let end = self.end(&key);
        let r = self
            .client
            .delete(
                key.clone(),
                Some(DeleteOptions::new().with_range(end.clone()).with_prev_key()),
            )
            .await?;
        let gone = self.apply_delete(&key, &end);
        let what = format!("delete {} {}", show(&key), show(&end));
        ensure!(
            r.0.deleted == gone.len() as i64,
            "{what}: deleted {} != {}",
            r.0.deleted,
            gone.len()
        );
        self.check_kvs(&what, &r.0.prev_kvs, &gone)
    }

    async fn empty_key(&mut self) -> Result<()> {
        self.count("empty key");
        let end = if self.rng.random_bool(0.5) {
            vec![0]
        } else {
            Vec::new()
        };
        match self
            .client
            .get(Vec::<u8>::new(), Some(GetOptions::new().with_range(end)))
            .await
        {
            Err(Error::GRpcStatus(s))
                if s.code() == Code::InvalidArgument
                    && s.message() == "etcdserver: key is not provided" =>
            {
                Ok(())
            }
            other => bail!("get of the empty key: {other:?}"),
        }
    }

    async fn foreign_lease(&mut self) -> Result<()> {
        let Some(id) = *self.foreign_lease.lock().unwrap_or_else(|e| e.into_inner()) else {
            return Ok(());
        };
        self.count("foreign lease");
        let not_found = |r: std::result::Result<(), Error>| match r {
            Err(Error::GRpcStatus(s))
                if s.code() == Code::NotFound
                    && s.message() == "etcdserver: requested lease not found" =>
            {
                Ok(())
            }
            other => Err(anyhow!("use of the other tenant's lease: {other:?}")),
        };
        let key = self.key();
        match self.rng.random_range(0..4) {
            0 => not_found(
                self.client
                    .put(key, "x", Some(PutOptions::new().with_lease(id)))
                    .await
                    .map(drop),
            ),
            1 => not_found(
                self.client
                    .txn(Txn::new().and_then([TxnOp::put(
                        key,
                        "x",
                        Some(PutOptions::new().with_lease(id)),
                    )]))
                    .await
                    .map(drop),
            ),
            2 => not_found(self.client.lease_revoke(id).await.map(drop)),
            _ => {
                let ttl = self.client.lease_time_to_live(id, None).await?;
                ensure!(
                    ttl.ttl() == -1,
                    "time-to-live of the other tenant's lease: {ttl:?}"
                );
                Ok(())
            }
        }
    }

    fn cmp(&mut self) -> (Vec<u8>, Vec<u8>, Cmp) {
        let key = self.key();
        let end = if self.rng.random_bool(0.5) {
            Vec::new()
        } else {
            self.end(&key)
        };
        let cmp = match self.rng.random_range(0..3) {
            0 => Cmp::VersionGreaterZero,
            1 => Cmp::VersionIsZero,
            _ => {
                // A value that exists somewhere in the model, or one that cannot.
                let v = self
                    .model
                    .values()
                    .nth(self.rng.random_range(0..=self.model.len()))
                    .map(|e| e.value.clone())
                    .unwrap_or_else(|| b"tenant-nobody".to_vec());
                Cmp::ValueIs(v)
            }
        };
        (key, end, cmp)
    }

    fn compare(key: &[u8], end: &[u8], cmp: &Cmp) -> Compare {
        let c = match cmp {
            Cmp::VersionGreaterZero => Compare::version(key.to_vec(), CompareOp::Greater, 0),
            Cmp::VersionIsZero => Compare::version(key.to_vec(), CompareOp::Equal, 0),
            Cmp::ValueIs(v) => Compare::value(key.to_vec(), CompareOp::Equal, v.clone()),
        };
        if end.is_empty() {
            c
        } else {
            c.with_range(end.to_vec())
        }
    }

    fn write(&mut self) -> Write {
        let key = self.key();
        if self.rng.random_bool(0.6) {
            let lease = if self.rng.random_bool(0.3) {
                self.own_lease
            } else {
                0
            };
            Write::Put(key, self.value(), lease)
        } else {
            let end = self.end(&key);
            Write::Delete(key, end)
        }
    }

    /// A transaction: compares, then in each branch a read, sometimes a nested read-only
    /// transaction, and one write (etcd refuses two writes to one key in a transaction).
    async fn txn(&mut self) -> Result<()> {
        self.count("txn");
        let cmps: Vec<_> = (0..self.rng.random_range(0..3))
            .map(|_| self.cmp())
            .collect();
        let mut branch = || {
            let read = {
                let k = self.key();
                let e = self.end(&k);
                (k, e)
            };
            let nested = self.rng.random_bool(0.4).then(|| {
                let c = self.cmp();
                let k = self.key();
                let e = self.end(&k);
                (c, (k, e))
            });
            (read, nested, self.write())
        };
        let success = branch();
        let failure = branch();
        let ops = |(read, nested, write): &Branch| {
            let mut ops = vec![TxnOp::get(
                read.0.clone(),
                Some(GetOptions::new().with_range(read.1.clone())),
            )];
            if let Some(((ck, ce, c), (rk, re))) = nested {
                ops.push(TxnOp::txn(
                    Txn::new()
                        .when([Self::compare(ck, ce, c)])
                        .and_then([TxnOp::get(
                            rk.clone(),
                            Some(GetOptions::new().with_range(re.clone())),
                        )])
                        .or_else([TxnOp::get(
                            rk.clone(),
                            Some(GetOptions::new().with_all_keys()),
                        )]),
                ));
            }
            ops.push(match write {
                Write::Put(k, v, lease) => TxnOp::put(
                    k.clone(),
                    v.clone(),
                    Some(PutOptions::new().with_prev_key().with_lease(*lease)),
                ),
                Write::Delete(k, e) => TxnOp::delete(
                    k.clone(),
                    Some(DeleteOptions::new().with_range(e.clone()).with_prev_key()),
                ),
            });
            ops
        };
        let txn = Txn::new()
            .when(
                cmps.iter()
                    .map(|(k, e, c)| Self::compare(k, e, c))
                    .collect::<Vec<_>>(),
            )
            .and_then(ops(&success))
            .or_else(ops(&failure));
        let r: PbTxnResponse = self.client.txn(txn).await?.0;

        let want_success = cmps.iter().all(|(k, e, c)| self.holds(k, e, c));
        ensure!(
            r.succeeded == want_success,
            "txn compares {cmps:?}: etcd says {}, the model {want_success}",
            r.succeeded
        );
        let (read, nested, write) = if r.succeeded { success } else { failure };
        let mut resps = r.responses.iter().map(|op| op.response.as_ref());
        let Some(Some(PbTxnOpResponse::ResponseRange(rr))) = resps.next() else {
            bail!("txn: first response is not a range: {r:?}");
        };
        self.check_range("txn read", rr, &read.0, &read.1, 0)?;
        if let Some(((ck, ce, c), (rk, re))) = &nested {
            let Some(Some(PbTxnOpResponse::ResponseTxn(t))) = resps.next() else {
                bail!("txn: nested response missing: {r:?}");
            };
            let want = self.holds(ck, ce, c);
            ensure!(
                t.succeeded == want,
                "nested compare {c:?} on {}: etcd {}, model {want}",
                show(ck),
                t.succeeded
            );
            let Some(Some(PbTxnOpResponse::ResponseRange(nr))) =
                t.responses.first().map(|o| o.response.as_ref())
            else {
                bail!("nested txn: no range response");
            };
            if t.succeeded {
                self.check_range("nested read", nr, rk, re, 0)?;
            } else {
                self.check_range("nested read of all keys", nr, b"\0", b"\0", 0)?;
            }
        }
        match (write, resps.next()) {
            (Write::Put(k, v, lease), Some(Some(PbTxnOpResponse::ResponsePut(p)))) => {
                let prev = self.apply_put(&k, &v, lease);
                let want: Vec<_> = prev.into_iter().map(|e| (k.clone(), e)).collect();
                self.check_kvs("txn put prev_kv", p.prev_kv.as_slice(), &want)
            }
            (Write::Delete(k, e), Some(Some(PbTxnOpResponse::ResponseDeleteRange(d)))) => {
                let gone = self.apply_delete(&k, &e);
                ensure!(
                    d.deleted == gone.len() as i64,
                    "txn delete: {} != {}",
                    d.deleted,
                    gone.len()
                );
                self.check_kvs("txn delete prev_kvs", &d.prev_kvs, &gone)
            }
            (w, got) => bail!("txn write {w:?} answered by {got:?}"),
        }
    }
}

/// Every event a watch stream delivered, by watch id.
type Events = Arc<Mutex<BTreeMap<i64, Vec<Change>>>>;

/// Opens watches on one stream and drains it in the background.
async fn watch(c: &mut Client, ranges: &[(Vec<u8>, Vec<u8>)]) -> Result<(Vec<i64>, Events)> {
    let opts = |end: &[u8]| WatchOptions::new().with_range(end.to_vec()).with_prev_key();
    let mut stream: WatchStream = c
        .watch(ranges[0].0.clone(), Some(opts(&ranges[0].1)))
        .await?;
    let mut ids = Vec::new();
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .context("watch creation")??
            .context("watch stream ended")?;
        ensure!(r.created() && !r.canceled(), "watch create: {r:?}");
        ids.push(r.watch_id());
        match ranges.get(ids.len()) {
            Some((k, e)) => stream.watch(k.clone(), Some(opts(e))).await?,
            None => break,
        }
    }
    let events: Events = Arc::default();
    let sink = events.clone();
    tokio::spawn(async move {
        while let Ok(Some(r)) = stream.message().await {
            let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
            for e in r.events() {
                if let Some(kv) = e.kv() {
                    sink.entry(r.watch_id()).or_default().push(Change {
                        put: e.event_type() == EventType::Put,
                        key: kv.key().to_vec(),
                        value: if e.event_type() == EventType::Put {
                            kv.value().to_vec()
                        } else {
                            Vec::new()
                        },
                        lease: kv.lease(),
                    });
                }
            }
        }
    });
    Ok((ids, events))
}

/// A watch on an empty range is created and canceled at once, with etcd's reason.
async fn empty_watch_is_refused(c: &mut Client, key: &[u8], end: &[u8]) -> Result<()> {
    let opts = WatchOptions::new().with_range(end.to_vec());
    let mut stream = c.watch(key.to_vec(), Some(opts)).await?;
    let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .context("empty watch range: no answer")??
        .context("empty watch range: stream ended")?;
    ensure!(
        r.created() && r.canceled() && r.cancel_reason() == "mvcc: watcher range is empty",
        "watch ({}, {}) on an empty range: {r:?}",
        show(key),
        show(end)
    );
    Ok(())
}

/// Summary of one tenant's run.
struct Outcome {
    model: BTreeMap<Vec<u8>, Entry>,
    ops: BTreeMap<&'static str, usize>,
    /// The tenant's lease as it saw it.
    own_lease: i64,
}

fn run_tenant(
    pod: &Pod,
    name: &'static str,
    seed: u64,
    own_slot: Arc<Mutex<Option<i64>>>,
    foreign_slot: Arc<Mutex<Option<i64>>>,
) -> Result<Outcome> {
    pod.run(move || async move {
        bounded(RUN_LIMIT, async move {
            let mut client = Client::connect(["http://127.0.0.1:2379"], None).await?;
            let own_lease = client.lease_grant(600, None).await?.id();
            *own_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(own_lease);
            let mut t = Tenant {
                name,
                rng: StdRng::seed_from_u64(seed),
                client: client.clone(),
                model: BTreeMap::new(),
                log: Vec::new(),
                seq: 0,
                own_lease,
                foreign_lease: foreign_slot,
                ops_done: BTreeMap::new(),
            };
            // One watch on everything, one on a random range, open for the whole run.
            // etcd refuses a watch on an empty range (end at or before the key); such a
            // draw must be refused the same way, and then another range is drawn.
            let random_range = loop {
                let k = t.key();
                let e = t.end(&k);
                if matches!(e.as_slice(), [] | [0]) || k < e {
                    break (k, e);
                }
                empty_watch_is_refused(&mut client, &k, &e).await?;
            };
            let ranges = vec![(b"\0".to_vec(), b"\0".to_vec()), random_range];
            let (ids, events) = watch(&mut client, &ranges).await?;

            let started = Instant::now();
            for i in 0..OPS {
                if started.elapsed() > OPS_BUDGET {
                    eprintln!("tenant {name}: stopped after {i} operations ({OPS_BUDGET:?})");
                    break;
                }
                t.step().await.with_context(|| format!("tenant {name}, operation {i}"))?;
            }
            // A last write every watch range holds: the key the random range starts at.
            let (last, value) = (ranges[1].0.clone(), t.value());
            client.put(last.clone(), value.clone(), None).await?;
            t.apply_put(&last, &value, 0);

            let deadline = Instant::now() + Duration::from_secs(15);
            for (id, (k, e)) in ids.iter().zip(&ranges) {
                let want: Vec<Change> = t.log.iter().filter(|c| in_range(&c.key, k, e)).cloned().collect();
                loop {
                    let got = events.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned().unwrap_or_default();
                    if got.len() >= want.len() {
                        ensure!(
                            got == want,
                            "tenant {name}: watch ({}, {}) saw {} events, want {}; first difference at {:?}",
                            show(k),
                            show(e),
                            got.len(),
                            want.len(),
                            got.iter().zip(&want).position(|(g, w)| g != w)
                        );
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "tenant {name}: watch ({}, {}) saw {} of {} events",
                        show(k),
                        show(e),
                        got.len(),
                        want.len()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Ok(Outcome {
                model: t.model,
                ops: t.ops_done,
                own_lease,
            })
        })
        .await
    })
}

async fn bounded<T>(limit: Duration, f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| anyhow!("run did not finish within {limit:?}"))?
}

fn admin_dump(env: &TwoTenants) -> Result<BTreeMap<Vec<u8>, PbKeyValue>> {
    let url = env.etcd.url.clone();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let mut c = Client::connect([url], None).await?;
            let r = c
                .get(
                    b"\0".to_vec(),
                    Some(GetOptions::new().with_range(b"\0".to_vec())),
                )
                .await?;
            Ok(r.0.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect())
        })
}

/// The real ID of the one lease a tenant holds, from its ownership record in etcd.
fn real_lease(dump: &BTreeMap<Vec<u8>, PbKeyValue>, records: &str) -> Result<i64> {
    let ids: Vec<i64> = dump
        .keys()
        .filter_map(|k| k.strip_prefix(records.as_bytes()))
        .filter_map(|hex| i64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok())
        .collect();
    match ids[..] {
        [id] => Ok(id),
        _ => bail!("lease records under {records}: {ids:x?}"),
    }
}

/// Checks that the admin's view holds exactly `model` under `prefix`, with the real
/// lease where the tenant put its own (`own`, as it sees it).
fn check_space(
    dump: &BTreeMap<Vec<u8>, PbKeyValue>,
    prefix: &str,
    name: &str,
    model: &BTreeMap<Vec<u8>, Entry>,
    (own, real): (i64, i64),
) -> Result<()> {
    ensure!(
        own != real,
        "tenant {name} sees its lease by its real ID {real:x}"
    );
    let got: BTreeMap<Vec<u8>, (Vec<u8>, i64)> = dump
        .iter()
        .filter_map(|(k, kv)| {
            Some((
                k.strip_prefix(prefix.as_bytes())?.to_vec(),
                (kv.value.clone(), kv.lease),
            ))
        })
        .collect();
    let want: BTreeMap<Vec<u8>, (Vec<u8>, i64)> = model
        .iter()
        .map(|(k, e)| {
            let lease = if e.lease == own { real } else { e.lease };
            (k.clone(), (e.value.clone(), lease))
        })
        .collect();
    if got != want {
        let leases: Vec<_> = got
            .iter()
            .filter(|(k, g)| want.get(*k).is_some_and(|w| w.1 != g.1))
            .map(|(k, g)| format!("{} has lease {:x}", show(k), g.1))
            .collect();
        ensure!(
            leases.is_empty(),
            "tenant {name}'s leases in etcd: {leases:?}"
        );
        let extra: Vec<_> = got
            .keys()
            .filter(|k| !want.contains_key(*k))
            .map(|k| show(k))
            .collect();
        let missing: Vec<_> = want
            .keys()
            .filter(|k| !got.contains_key(*k))
            .map(|k| show(k))
            .collect();
        bail!(
            "tenant {name}'s space in etcd differs from its model: extra {extra:?}, missing {missing:?}"
        );
    }
    for (k, (v, _)) in &got {
        ensure!(
            v.starts_with(format!("tenant-{name}:").as_bytes()),
            "{} holds {:?}",
            show(k),
            String::from_utf8_lossy(v)
        );
    }
    Ok(())
}

#[test]
fn random_operations_of_two_tenants_stay_confined() -> Result<()> {
    let seed = match std::env::var("ISOLATION_SEED") {
        Ok(s) => s.parse().context("ISOLATION_SEED")?,
        Err(_) => rand::random::<u64>(),
    };
    eprintln!("isolation_property seed: {seed} (rerun with ISOLATION_SEED={seed})");

    let env = TwoTenants::start()?;
    for (k, v) in REGISTRY {
        let out = env.etcd.etcdctl(&["put", k, v])?;
        ensure!(out.status.success(), "admin put {k}");
    }
    let registry_before: Vec<_> = admin_dump(&env)?
        .into_iter()
        .filter(|(k, _)| k.starts_with(b"/registry/"))
        .collect();

    let (lease_a, lease_b) = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None)));
    let (a, b) = std::thread::scope(|s| {
        let (la, lb) = (lease_a.clone(), lease_b.clone());
        let a = s.spawn(|| run_tenant(&env.a, "a", seed, la, lb));
        let (la, lb) = (lease_a.clone(), lease_b.clone());
        let b = s.spawn(|| {
            run_tenant(
                &env.b,
                "b",
                seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1),
                lb,
                la,
            )
        });
        (a.join(), b.join())
    });
    let a = a
        .map_err(|_| anyhow!("tenant a's thread panicked"))?
        .with_context(|| format!("seed {seed}"))?;
    let b = b
        .map_err(|_| anyhow!("tenant b's thread panicked"))?
        .with_context(|| format!("seed {seed}"))?;
    eprintln!("tenant a ran {:?}; tenant b ran {:?}", a.ops, b.ops);
    ensure!(
        a.ops.contains_key("foreign lease") || b.ops.contains_key("foreign lease"),
        "no foreign lease was tried"
    );

    let dump = admin_dump(&env)?;
    for k in dump.keys() {
        ensure!(
            k.starts_with(PREFIX_A.as_bytes())
                || k.starts_with(PREFIX_B.as_bytes())
                || k.starts_with(b"/etcd-shim/leases/team-a/app/")
                || k.starts_with(b"/etcd-shim/leases/team-b/app/")
                || k.starts_with(b"/registry/"),
            "seed {seed}: key {} is outside both tenants",
            show(k)
        );
    }
    let real_a = real_lease(&dump, "/etcd-shim/leases/team-a/app/")?;
    let real_b = real_lease(&dump, "/etcd-shim/leases/team-b/app/")?;
    check_space(&dump, PREFIX_A, "a", &a.model, (a.own_lease, real_a))
        .with_context(|| format!("seed {seed}"))?;
    check_space(&dump, PREFIX_B, "b", &b.model, (b.own_lease, real_b))
        .with_context(|| format!("seed {seed}"))?;
    let registry_after: Vec<_> = dump
        .into_iter()
        .filter(|(k, _)| k.starts_with(b"/registry/"))
        .collect();
    ensure!(
        registry_after == registry_before,
        "seed {seed}: the cluster's tree changed"
    );
    Ok(())
}
