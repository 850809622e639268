//! Adversarial isolation suite: tenant A attacks through every etcd RPC while tenant B
//! holds data, leases, locks and watches, and the cluster's own `/registry/...` tree sits in
//! the same etcd. Each test checks that A's attempt fails the way the isolation policy in
//! docs/architecture.md says, with etcd's exact code and message, and that everything that
//! is not A's is byte-for-byte unchanged in the cluster admin's direct view of etcd.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use etcd_client::proto::{PbKeyValue, PbLeaseKeepAliveRequest, PbTxnOpResponse, PbTxnResponse};
use etcd_client::{
    AlarmAction, AlarmType, Client, CompactionOptions, Compare, CompareOp, ConnectOptions,
    DeleteOptions, DowngradeOptions, Error, EventType, GetOptions, LeaderKey, LeaseGrantOptions,
    LeaseTimeToLiveOptions, LockOptions, ProclaimOptions, PutOptions, ResignOptions, SortOrder,
    SortTarget, Txn, TxnOp, WatchOptions, WatchResponse, WatchStream,
};
use etcd_shim_e2e::{PREFIX_A, PREFIX_B, Pod, TwoTenants, run_bounded, wait_for};
use tonic::Code;

/// Where pod-local clients find their shim.
const SHIM: &str = "http://127.0.0.1:2379";
/// Where the broker keeps tenant A's lease ownership records.
const LEASES_A: &str = "/etcd-shim/leases/team-a/app/";

const PERMISSION_DENIED: &str = "etcdserver: permission denied";
const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
const EMPTY_KEY: &str = "etcdserver: key is not provided";
const INVALID_TOKEN: &str = "etcdserver: invalid auth token";
const FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
/// Where the broker records tenant A's compacted revision.
const COMPACTION_A: &str = "/etcd-shim/compactions/etcd-shim/tenants/team-a/app/";

/// The cluster's own data, written by the admin straight to etcd.
const REGISTRY: &[(&str, &str)] = &[
    ("/registry/secrets/kube-system/x", "cluster:secret"),
    ("/registry/pods/default/p", "cluster:pod"),
    ("/registry/configmaps/kube-system/cm", "cluster:cm"),
];

/// Tenant B's keys (in B's view), chosen to sit exactly where A's probes go: the smallest
/// and largest keys, relative paths, and keys that spell A's and the cluster's prefixes.
const B_KEYS: &[&[u8]] = &[
    b"secret",
    b"\0",
    b"\xff",
    b"\xff\xff",
    b"a",
    b"../x",
    b"../../../registry/secrets/kube-system/x",
    b"/registry/secrets/kube-system/x",
    b"/etcd-shim/tenants/team-a/app/secret",
    b"zz",
];

/// Every value a tenant writes carries its name, so a leak is visible in any response.
fn value_of(tenant: &str, key: &[u8]) -> Vec<u8> {
    let mut v = format!("{tenant}:").into_bytes();
    v.extend_from_slice(key);
    v
}

fn show(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

/// `(key, value, mod_revision, lease)` of every key, as the cluster admin sees it.
type Dump = BTreeMap<Vec<u8>, (Vec<u8>, i64, i64)>;

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Runs `f` with a client connected straight to etcd (the admin's view, no broker).
fn admin<T, F, Fut>(env: &TwoTenants, f: F) -> Result<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let url = env.etcd.url.clone();
    runtime()?.block_on(async move {
        let c = Client::connect([url], None).await?;
        within("admin call", f(c)).await?
    })
}

/// Runs `f` inside `pod` with a client connected to the pod's shim.
fn in_pod<T, F, Fut>(pod: &Pod, f: F) -> Result<T>
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    pod.run(move || async move {
        let c = Client::connect([SHIM], None).await?;
        within("pod call", f(c)).await?
    })
}

/// Bounds a future so that a hung call fails the test instead of hanging it.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(25), fut)
        .await
        .map_err(|_| anyhow!("{what}: no answer within 25s"))
}

async fn dump_with(mut c: Client) -> Result<Dump> {
    let r = c
        .get(
            b"\0".to_vec(),
            Some(GetOptions::new().with_range(b"\0".to_vec())),
        )
        .await?;
    Ok(r.0
        .kvs
        .into_iter()
        .map(|kv| (kv.key, (kv.value, kv.mod_revision, kv.lease)))
        .collect())
}

fn dump(env: &TwoTenants) -> Result<Dump> {
    admin(env, dump_with)
}

/// Everything in etcd that tenant A has no business changing.
fn not_a(d: &Dump) -> Dump {
    d.iter()
        .filter(|(k, _)| {
            !k.starts_with(PREFIX_A.as_bytes())
                && !k.starts_with(LEASES_A.as_bytes())
                && k.as_slice() != COMPACTION_A.as_bytes()
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Asserts a call failed with exactly etcd's status code and message.
fn expect_status<T: std::fmt::Debug>(
    what: &str,
    res: std::result::Result<T, Error>,
    code: Code,
    msg: &str,
) -> Result<()> {
    match res {
        Err(Error::GRpcStatus(s)) if s.code() == code && s.message() == msg => Ok(()),
        Err(Error::GRpcStatus(s)) => bail!(
            "{what}: expected {code:?} {msg:?}, got {:?} {:?}",
            s.code(),
            s.message()
        ),
        other => bail!("{what}: expected {code:?} {msg:?}, got {other:?}"),
    }
}

/// etcd's range semantics in one tenant's view: an empty end is the single key, `"\0"`
/// means every key from `key` on.
fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    match end {
        [] => k == key,
        [0] => k >= key,
        e => k >= key && k < e,
    }
}

/// Every key-value anywhere in a transaction response, nested ones included.
fn txn_kvs(resp: &PbTxnResponse, out: &mut Vec<PbKeyValue>) {
    for op in &resp.responses {
        match &op.response {
            Some(PbTxnOpResponse::ResponseRange(r)) => out.extend(r.kvs.iter().cloned()),
            Some(PbTxnOpResponse::ResponsePut(r)) => out.extend(r.prev_kv.iter().cloned()),
            Some(PbTxnOpResponse::ResponseDeleteRange(r)) => out.extend(r.prev_kvs.iter().cloned()),
            Some(PbTxnOpResponse::ResponseTxn(t)) => txn_kvs(t, out),
            None => {}
        }
    }
}

/// Two tenants plus the data A attacks: the cluster's tree and B's keys.
struct Fixture {
    env: TwoTenants,
    /// What A must leave alone, as it was before A acted.
    before: Dump,
}

impl Fixture {
    fn start() -> Result<Self> {
        let env = TwoTenants::start()?;
        for (k, v) in REGISTRY {
            let out = env.etcd.etcdctl(&["put", k, v])?;
            ensure!(out.status.success(), "admin put {k}: {out:?}");
        }
        in_pod(&env.b, |mut c| async move {
            for k in B_KEYS {
                c.put(k.to_vec(), value_of("tenant-b", k), None).await?;
            }
            Ok(())
        })?;
        let before = not_a(&dump(&env)?);
        // The fixture itself must have landed where the design says.
        for k in B_KEYS {
            let mut raw = PREFIX_B.as_bytes().to_vec();
            raw.extend_from_slice(k);
            ensure!(before.contains_key(&raw), "B's {} not in etcd", show(k));
        }
        for (k, _) in REGISTRY {
            ensure!(before.contains_key(k.as_bytes()), "{k} not in etcd");
        }
        Ok(Self { env, before })
    }

    /// Takes the reference view again (after B did more on purpose).
    fn rebase(&mut self) -> Result<()> {
        self.before = not_a(&dump(&self.env)?);
        Ok(())
    }

    /// Asserts that nothing outside A's own keys changed, and that nothing was created
    /// outside `/etcd-shim/` and the cluster's tree.
    fn check_others_untouched(&self) -> Result<()> {
        let all = dump(&self.env)?;
        for k in all.keys() {
            ensure!(
                k.starts_with(b"/etcd-shim/") || REGISTRY.iter().any(|(r, _)| k == r.as_bytes()),
                "unexpected key {} in etcd",
                show(k)
            );
        }
        let now = not_a(&all);
        if now != self.before {
            let gone: Vec<_> = self
                .before
                .keys()
                .filter(|k| !now.contains_key(*k))
                .map(|k| show(k))
                .collect();
            let changed: Vec<_> = now
                .iter()
                .filter(|(k, v)| self.before.get(*k) != Some(v))
                .map(|(k, _)| show(k))
                .collect();
            bail!("data outside tenant A changed: gone {gone:?}, new or changed {changed:?}");
        }
        Ok(())
    }

    /// A's keys as the admin sees them, with the prefix taken off.
    fn a_keys(&self) -> Result<Vec<Vec<u8>>> {
        Ok(dump(&self.env)?
            .keys()
            .filter_map(|k| k.strip_prefix(PREFIX_A.as_bytes()))
            .map(<[u8]>::to_vec)
            .collect())
    }
}

fn keys_of(kvs: &[PbKeyValue]) -> Vec<Vec<u8>> {
    kvs.iter().map(|kv| kv.key.clone()).collect()
}

fn check_values_are_a(what: &str, kvs: &[PbKeyValue]) -> Result<()> {
    for kv in kvs {
        ensure!(
            kv.value == value_of("tenant-a", &kv.key),
            "{what}: {} carries {:?}, not A's value",
            show(&kv.key),
            String::from_utf8_lossy(&kv.value)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// KV: ranges, writes, deletes, transactions
// ---------------------------------------------------------------------------------------

/// A's own keys for the KV tests: spread over the key space so every probe range holds
/// some of A's keys next to B's.
const A_KEYS: &[&[u8]] = &[b"\x01", b"b", b"mine", b"z", b"\xfe"];

#[test]
fn open_ended_ranges_return_only_own_keys() -> Result<()> {
    let fx = Fixture::start()?;
    let rev_before_a = admin(&fx.env, |mut c| async move {
        Ok(c.get("x", None).await?.0.header.map_or(0, |h| h.revision))
    })?;
    in_pod(&fx.env.a, move |mut c| async move {
        for k in A_KEYS {
            c.put(k.to_vec(), value_of("tenant-a", k), None).await?;
        }
        let own: Vec<Vec<u8>> = {
            let mut v: Vec<_> = A_KEYS.iter().map(|k| k.to_vec()).collect();
            v.sort();
            v
        };
        // (what, key, range_end) exactly as they go on the wire.
        let cases: &[(&str, &[u8], &[u8])] = &[
            ("every key from \\0", b"\0", b"\0"),
            ("prefix of the empty key (clientv3 spelling)", b"\0", b"\0"),
            ("range end beyond the prefix", b"\0", b"\xff\xff"),
            (
                "range end of many \\xff",
                b"\0",
                b"\xff\xff\xff\xff\xff\xff",
            ),
            ("from a middle key", b"a", b"\0"),
            ("from \\xff", b"\xff", b"\0"),
            ("single key \\0", b"\0", b""),
            ("single key B has", b"secret", b""),
            (
                "B's prefix literally",
                PREFIX_B.as_bytes(),
                b"/etcd-shim/tenants/team-b/app0",
            ),
            (
                "B's key literally",
                b"/etcd-shim/tenants/team-b/app/secret",
                b"",
            ),
            ("the tenants root", b"/etcd-shim/", b"/etcd-shim0"),
            ("the whole slash space", b"/", b"0"),
            ("cluster registry", b"/registry/", b"/registry0"),
            ("registry secret", b"/registry/secrets/kube-system/x", b""),
            ("relative path up", b"../", b"..0"),
            ("relative path to B", b"../team-b/app/secret", b""),
            ("relative path to registry", b"../../../registry/", b"\0"),
            ("lease records", b"/etcd-shim/leases/", b"\0"),
            ("inverted range", b"\xff", b"\x01"),
        ];
        for (what, key, end) in cases {
            let r = c
                .get(
                    key.to_vec(),
                    Some(GetOptions::new().with_range(end.to_vec())),
                )
                .await
                .with_context(|| format!("get {what}"))?
                .0;
            let want: Vec<Vec<u8>> = own
                .iter()
                .filter(|k| in_range(k, key, end))
                .cloned()
                .collect();
            ensure!(
                keys_of(&r.kvs) == want,
                "{what}: got {:?}, want {:?}",
                r.kvs.iter().map(|kv| show(&kv.key)).collect::<Vec<_>>(),
                want.iter().map(|k| show(k)).collect::<Vec<_>>()
            );
            ensure!(
                r.count == want.len() as i64,
                "{what}: count {} leaks",
                r.count
            );
            ensure!(!r.more, "{what}: more=true");
            check_values_are_a(what, &r.kvs)?;

            // Counting, limiting and sorting must not reveal anything either.
            let n = c
                .get(
                    key.to_vec(),
                    Some(GetOptions::new().with_range(end.to_vec()).with_count_only()),
                )
                .await?
                .0
                .count;
            ensure!(n == want.len() as i64, "{what}: count_only {n}");
            let top = c
                .get(
                    key.to_vec(),
                    Some(
                        GetOptions::new()
                            .with_range(end.to_vec())
                            .with_limit(1)
                            .with_sort(SortTarget::Key, SortOrder::Descend),
                    ),
                )
                .await?
                .0;
            ensure!(
                keys_of(&top.kvs) == want.last().cloned().into_iter().collect::<Vec<_>>(),
                "{what}: descending limit 1 gave {:?}",
                top.kvs.iter().map(|kv| show(&kv.key)).collect::<Vec<_>>()
            );
            ensure!(top.more == (want.len() > 1), "{what}: more flag leaks");
        }

        // An old revision holds B's and the cluster's data, never A's view of it.
        let old = c
            .get(
                b"\0".to_vec(),
                Some(
                    GetOptions::new()
                        .with_range(b"\0".to_vec())
                        .with_revision(rev_before_a),
                ),
            )
            .await?
            .0;
        ensure!(
            old.kvs.is_empty() && old.count == 0,
            "old revision: {:?}",
            old.kvs
        );

        // Keys-only and the empty key itself.
        expect_status(
            "get of the empty key",
            c.get("", None).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        )?;
        expect_status(
            "from-key range of the empty key",
            c.get("", Some(GetOptions::new().with_range(b"\0".to_vec())))
                .await,
            Code::InvalidArgument,
            EMPTY_KEY,
        )?;
        Ok(())
    })?;
    // etcd itself answers the empty key the same way.
    admin(&fx.env, |mut c| async move {
        expect_status(
            "etcd's own answer",
            c.get("", None).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        )
    })?;
    fx.check_others_untouched()
}

#[test]
fn writes_to_tricky_keys_stay_under_own_prefix() -> Result<()> {
    let fx = Fixture::start()?;
    let tricky: Vec<Vec<u8>> = B_KEYS
        .iter()
        .map(|k| k.to_vec())
        .chain([
            b"../team-b/app/secret".to_vec(),
            b"/etcd-shim/tenants/team-b/app/secret".to_vec(),
            b"/etcd-shim/leases/team-b/app/0000000000000001".to_vec(),
            b"/registry/pods/default/p".to_vec(),
            b"..".to_vec(),
            b"/".to_vec(),
        ])
        .collect();
    let keys = tricky.clone();
    in_pod(&fx.env.a, move |mut c| async move {
        for k in &keys {
            // The same key exists for B (or the cluster), but not for A: no previous value.
            let r = c
                .put(
                    k.clone(),
                    value_of("tenant-a", k),
                    Some(PutOptions::new().with_prev_key()),
                )
                .await?
                .0;
            ensure!(
                r.prev_kv.is_none(),
                "put {} returned a previous value {:?}",
                show(k),
                r.prev_kv
            );
        }
        for k in &keys {
            let r = c.get(k.clone(), None).await?.0;
            ensure!(
                keys_of(&r.kvs) == vec![k.clone()],
                "get {}: {:?}",
                show(k),
                r.kvs
            );
            check_values_are_a("read back", &r.kvs)?;
        }
        // Overwriting returns A's own previous value, never B's.
        let r = c
            .put(
                "secret",
                value_of("tenant-a", b"secret"),
                Some(PutOptions::new().with_prev_key()),
            )
            .await?
            .0;
        check_values_are_a("prev_kv", r.prev_kv.as_slice())?;
        expect_status(
            "put of the empty key",
            c.put("", "v", None).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        )?;
        Ok(())
    })?;
    let mut want = tricky;
    want.sort();
    want.dedup();
    ensure!(fx.a_keys()? == want, "A's keys in etcd: {:?}", fx.a_keys()?);
    fx.check_others_untouched()
}

#[test]
fn delete_of_everything_deletes_only_own_keys() -> Result<()> {
    let fx = Fixture::start()?;
    in_pod(&fx.env.a, |mut c| async move {
        // Keys A does not have, but B and the cluster do: nothing to delete.
        let misses: &[(&str, &[u8], &[u8])] = &[
            ("B's key by name", b"secret", b""),
            (
                "B's prefix literally",
                PREFIX_B.as_bytes(),
                b"/etcd-shim/tenants/team-b/app0",
            ),
            ("registry", b"/registry/", b"/registry0"),
            ("relative path", b"../", b"..0"),
            ("everything, no keys yet", b"\0", b"\0"),
            ("range end past the prefix", b"\0", b"\xff\xff\xff"),
        ];
        for (what, key, end) in misses {
            let r = c
                .delete(
                    key.to_vec(),
                    Some(
                        DeleteOptions::new()
                            .with_range(end.to_vec())
                            .with_prev_key(),
                    ),
                )
                .await?
                .0;
            ensure!(
                r.deleted == 0 && r.prev_kvs.is_empty(),
                "{what}: deleted {} {:?}",
                r.deleted,
                r.prev_kvs
            );
        }
        for k in A_KEYS {
            c.put(k.to_vec(), value_of("tenant-a", k), None).await?;
        }
        // "Delete everything", spelled the ways clients spell it.
        let r = c
            .delete(
                b"\0".to_vec(),
                Some(
                    DeleteOptions::new()
                        .with_range(b"\xff\xff".to_vec())
                        .with_prev_key(),
                ),
            )
            .await?
            .0;
        let mut want: Vec<Vec<u8>> = A_KEYS.iter().map(|k| k.to_vec()).collect();
        want.sort();
        ensure!(r.deleted == A_KEYS.len() as i64, "deleted {}", r.deleted);
        ensure!(keys_of(&r.prev_kvs) == want, "prev_kvs {:?}", r.prev_kvs);
        check_values_are_a("prev_kvs", &r.prev_kvs)?;
        for k in A_KEYS {
            c.put(k.to_vec(), value_of("tenant-a", k), None).await?;
        }
        let r = c
            .delete("", Some(DeleteOptions::new().with_prefix()))
            .await?
            .0;
        ensure!(
            r.deleted == A_KEYS.len() as i64,
            "prefix delete deleted {}",
            r.deleted
        );
        for k in A_KEYS {
            c.put(k.to_vec(), value_of("tenant-a", k), None).await?;
        }
        let r = c
            .delete("", Some(DeleteOptions::new().with_all_keys()))
            .await?
            .0;
        ensure!(
            r.deleted == A_KEYS.len() as i64,
            "all-keys delete deleted {}",
            r.deleted
        );
        expect_status(
            "delete from the empty key",
            c.delete("", Some(DeleteOptions::new().with_range(b"\0".to_vec())))
                .await,
            Code::InvalidArgument,
            EMPTY_KEY,
        )?;
        Ok(())
    })?;
    ensure!(fx.a_keys()?.is_empty(), "A's keys left: {:?}", fx.a_keys()?);
    fx.check_others_untouched()?;
    // B still reads its data through its own shim.
    in_pod(&fx.env.b, |mut c| async move {
        let r = c
            .get(
                b"\0".to_vec(),
                Some(GetOptions::new().with_range(b"\0".to_vec())),
            )
            .await?
            .0;
        ensure!(r.count == B_KEYS.len() as i64, "B sees {} keys", r.count);
        Ok(())
    })
}

#[test]
fn txn_compares_and_ops_see_only_own_keys() -> Result<()> {
    let fx = Fixture::start()?;
    let nested_empty_key = || {
        Txn::new().and_then([TxnOp::txn(
            Txn::new().and_then([TxnOp::txn(Txn::new().and_then([TxnOp::put("", "v", None)]))]),
        )])
    };
    let empty_compare = || {
        Txn::new()
            .when([Compare::version("", CompareOp::Greater, 0)])
            .and_then([TxnOp::put("mine", "v", None)])
    };
    in_pod(&fx.env.a, move |mut c| async move {
        c.put("mine", value_of("tenant-a", b"mine"), None).await?;
        // Each compare holds in B's space (or the cluster's) but not in A's.
        let compares: Vec<(&str, Compare)> = vec![
            (
                "value of B's key",
                Compare::value("secret", CompareOp::Equal, value_of("tenant-b", b"secret")),
            ),
            (
                "version of B's key",
                Compare::version("secret", CompareOp::Greater, 0),
            ),
            (
                "B's key literally",
                Compare::version(format!("{PREFIX_B}secret"), CompareOp::Greater, 0),
            ),
            (
                "registry key",
                Compare::version("/registry/secrets/kube-system/x", CompareOp::Greater, 0),
            ),
            (
                "relative path",
                Compare::version("../team-b/app/secret", CompareOp::Greater, 0),
            ),
            (
                "range compare over B's keys",
                Compare::version("n", CompareOp::Greater, 0).with_range(b"\xff\xff\xff".to_vec()),
            ),
            (
                "create revision of \\xff",
                Compare::create_revision(b"\xff".to_vec(), CompareOp::Greater, 0),
            ),
        ];
        for (what, cmp) in compares {
            let r = c
                .txn(
                    Txn::new()
                        .when([cmp])
                        .and_then([TxnOp::get(
                            b"\0".to_vec(),
                            Some(GetOptions::new().with_range(b"\0".to_vec())),
                        )])
                        .or_else([TxnOp::get("secret", None)]),
                )
                .await?
                .0;
            ensure!(!r.succeeded, "{what}: compare held");
            let mut kvs = Vec::new();
            txn_kvs(&r, &mut kvs);
            ensure!(kvs.is_empty(), "{what}: failure branch read {:?}", kvs);
        }
        // A compare over "every key" holds exactly for A's own key set.
        let r = c
            .txn(
                Txn::new()
                    .when([Compare::version(b"\0".to_vec(), CompareOp::Equal, 1)
                        .with_range(b"\0".to_vec())])
                    .and_then([TxnOp::put("flag", value_of("tenant-a", b"flag"), None)]),
            )
            .await?
            .0;
        ensure!(
            r.succeeded,
            "A's only key has version 1, the compare over all keys must hold"
        );

        // Nested transactions: every level reads, deletes and overwrites only A's keys.
        let inner = Txn::new()
            .when([Compare::version("secret", CompareOp::Equal, 0)])
            .and_then([
                TxnOp::get(
                    b"\0".to_vec(),
                    Some(GetOptions::new().with_range(b"\xff\xff\xff".to_vec())),
                ),
                TxnOp::delete(
                    "x",
                    Some(
                        DeleteOptions::new()
                            .with_range(b"\0".to_vec())
                            .with_prev_key(),
                    ),
                ),
                TxnOp::txn(Txn::new().and_then([
                    TxnOp::get("", Some(GetOptions::new().with_all_keys())),
                    TxnOp::put(
                        "../team-b/app/secret",
                        value_of("tenant-a", b"../team-b/app/secret"),
                        Some(PutOptions::new().with_prev_key()),
                    ),
                ])),
            ]);
        let r = c
            .txn(Txn::new().and_then([
                TxnOp::put(
                    "n1",
                    value_of("tenant-a", b"n1"),
                    Some(PutOptions::new().with_prev_key()),
                ),
                TxnOp::txn(inner),
                TxnOp::delete("secret", Some(DeleteOptions::new().with_prev_key())),
            ]))
            .await?
            .0;
        ensure!(r.succeeded);
        let Some(PbTxnOpResponse::ResponseTxn(inner)) = &r.responses[1].response else {
            bail!("nested txn response missing: {r:?}");
        };
        ensure!(inner.succeeded, "A has no \"secret\": version 0 must hold");
        let mut kvs = Vec::new();
        txn_kvs(&r, &mut kvs);
        ensure!(!kvs.is_empty(), "nested reads saw nothing");
        check_values_are_a("nested txn", &kvs)?;
        let Some(PbTxnOpResponse::ResponseDeleteRange(d)) = &r.responses[2].response else {
            bail!("delete response missing");
        };
        ensure!(d.deleted == 0, "deleted B's \"secret\"");

        expect_status(
            "empty key three levels deep",
            c.txn(nested_empty_key()).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        )?;
        expect_status(
            "compare on an empty key",
            c.txn(empty_compare()).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        )?;
        Ok(())
    })?;
    admin(&fx.env, move |mut c| async move {
        expect_status(
            "etcd's own answer",
            c.txn(nested_empty_key()).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        )?;
        expect_status(
            "etcd's own answer to a compare on an empty key",
            c.txn(empty_compare()).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        )
    })?;
    fx.check_others_untouched()
}

/// Unlock and Proclaim with an empty key get etcd's own `key is not provided`, with the
/// Unknown code etcd's lock and election servers give it.
async fn empty_lock_and_leader_keys_are_refused(c: &mut Client, lease: i64) -> Result<()> {
    expect_status(
        "unlock of an empty key",
        c.unlock("").await,
        Code::Unknown,
        EMPTY_KEY,
    )?;
    let empty = LeaderKey::new().with_name("myelection").with_lease(lease);
    expect_status(
        "proclaim with an empty leader key",
        c.proclaim("v", Some(ProclaimOptions::new().with_leader(empty)))
            .await,
        Code::Unknown,
        EMPTY_KEY,
    )
}

// ---------------------------------------------------------------------------------------
// Watch
// ---------------------------------------------------------------------------------------

/// One event as a watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    watch_id: i64,
    put: bool,
    key: Vec<u8>,
    value: Vec<u8>,
    prev_value: Option<Vec<u8>>,
}

async fn next_response(s: &mut WatchStream) -> Result<WatchResponse> {
    match tokio::time::timeout(Duration::from_secs(15), s.message()).await {
        Ok(Ok(Some(r))) => Ok(r),
        Ok(Ok(None)) => bail!("watch stream ended"),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => bail!("no watch response within 15s"),
    }
}

fn seen(r: &WatchResponse) -> Vec<Seen> {
    r.events()
        .iter()
        .filter_map(|e| {
            let kv = e.kv()?;
            Some(Seen {
                watch_id: r.watch_id(),
                put: e.event_type() == EventType::Put,
                key: kv.key().to_vec(),
                value: kv.value().to_vec(),
                prev_value: e.prev_kv().map(|p| p.value().to_vec()),
            })
        })
        .collect()
}

/// Opens one watch per `(key, range_end)` on a single stream and returns the stream with
/// the watch ids in the same order.
async fn open_watches(
    c: &mut Client,
    ranges: &[(Vec<u8>, Vec<u8>)],
    start_revision: i64,
) -> Result<(WatchStream, Vec<i64>)> {
    let opts = |end: &[u8]| {
        let o = WatchOptions::new().with_range(end.to_vec()).with_prev_key();
        if start_revision > 0 {
            o.with_start_revision(start_revision)
        } else {
            o
        }
    };
    let (first_key, first_end) = &ranges[0];
    let mut stream = c.watch(first_key.clone(), Some(opts(first_end))).await?;
    let mut ids = Vec::new();
    let mut pending = Vec::new();
    let mut next = 1;
    loop {
        let r = next_response(&mut stream).await?;
        ensure!(!r.canceled(), "watch canceled: {}", r.cancel_reason());
        if r.created() {
            ids.push(r.watch_id());
            if next < ranges.len() {
                let (k, e) = &ranges[next];
                stream.watch(k.clone(), Some(opts(e))).await?;
                next += 1;
            } else {
                break;
            }
        }
        pending.extend(seen(&r));
    }
    ensure!(
        pending.is_empty() || start_revision > 0,
        "events before any write: {pending:?}"
    );
    Ok((stream, ids))
}

/// Reads events until every watcher has seen as many events as `want` holds for it.
async fn collect(
    stream: &mut WatchStream,
    want: &BTreeMap<i64, usize>,
) -> Result<BTreeMap<i64, Vec<Seen>>> {
    let mut got: BTreeMap<i64, Vec<Seen>> = want.keys().map(|id| (*id, Vec::new())).collect();
    while want.iter().any(|(id, n)| got[id].len() < *n) {
        let r = next_response(stream)
            .await
            .with_context(|| format!("waiting for events; so far {got:?}"))?;
        ensure!(
            !r.canceled(),
            "watch {} canceled: {}",
            r.watch_id(),
            r.cancel_reason()
        );
        for s in seen(&r) {
            got.entry(s.watch_id).or_default().push(s);
        }
    }
    Ok(got)
}

/// The watch key A writes last; every watcher's range holds at least one of A's markers
/// after B's writes, and etcd delivers each watcher's events in revision order, so a
/// leaked event of B would show up before A's markers.
fn a_markers() -> Vec<Vec<u8>> {
    vec![
        b"/registry/a-marker".to_vec(),
        format!("{PREFIX_B}a-marker").into_bytes(),
        b"../a-marker".to_vec(),
        b"secret".to_vec(),
        b"\0".to_vec(),
        b"\xff-a".to_vec(),
        b"zz-end".to_vec(),
    ]
}

/// etcd reads an empty watch key as `"\0"`.
fn watch_in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    let key: &[u8] = if key.is_empty() { b"\0" } else { key };
    in_range(k, key, end)
}

#[test]
fn watches_on_everything_see_only_own_events_while_b_writes() -> Result<()> {
    let fx = Fixture::start()?;
    let env = &fx.env;
    // (key, range_end) as sent on the wire.
    let ranges: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"\0".to_vec(), b"\0".to_vec()),
        (b"".to_vec(), b"\0".to_vec()),
        (b"".to_vec(), b"".to_vec()),
        (b"a".to_vec(), b"\xff\xff".to_vec()),
        (
            PREFIX_B.as_bytes().to_vec(),
            b"/etcd-shim/tenants/team-b/app0".to_vec(),
        ),
        (b"/registry/".to_vec(), b"/registry0".to_vec()),
        (b"../".to_vec(), b"..0".to_vec()),
        (b"secret".to_vec(), b"".to_vec()),
        (b"\xff".to_vec(), b"\0".to_vec()),
    ];
    let b_writes: Vec<Vec<u8>> = vec![
        b"secret".to_vec(),
        b"\0".to_vec(),
        b"\xff-b".to_vec(),
        format!("{PREFIX_B}b").into_bytes(),
        b"/registry/b".to_vec(),
        b"../b".to_vec(),
        b"zz".to_vec(),
    ];

    let (a_ready_tx, a_ready_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (b_ready_tx, b_ready_rx) = tokio::sync::oneshot::channel::<()>();

    std::thread::scope(|s| -> Result<()> {
        let a_ranges = ranges.clone();
        let a = s.spawn(move || {
            in_pod(&env.a, move |mut c| async move {
                let (mut stream, ids) = open_watches(&mut c, &a_ranges, 0).await?;
                let _ = a_ready_tx.send(());
                go_rx.await?;
                let markers = a_markers();
                for k in &markers {
                    c.put(k.clone(), value_of("tenant-a", k), None).await?;
                }
                let want: BTreeMap<i64, usize> = ids
                    .iter()
                    .zip(&a_ranges)
                    .map(|(id, (k, e))| {
                        (
                            *id,
                            markers.iter().filter(|m| watch_in_range(m, k, e)).count(),
                        )
                    })
                    .collect();
                let got = collect(&mut stream, &want).await?;
                Ok((ids, got))
            })
        });
        // B's writes, its delete of "a", and its end marker.
        let b_events = b_writes.len() + 2;
        let b = s.spawn(move || {
            in_pod(&env.b, move |mut c| async move {
                let (mut stream, ids) =
                    open_watches(&mut c, &[(b"\0".to_vec(), b"\0".to_vec())], 0).await?;
                let _ = b_ready_tx.send(());
                let want = BTreeMap::from([(ids[0], b_events)]);
                let got = collect(&mut stream, &want).await?;
                Ok(got.into_values().next().unwrap_or_default())
            })
        });
        a_ready_rx
            .blocking_recv()
            .context("A's watches did not start")?;
        b_ready_rx
            .blocking_recv()
            .context("B's watch did not start")?;

        // B and the cluster write while A watches everything it can name.
        let writes = b_writes.clone();
        in_pod(&env.b, move |mut c| async move {
            for k in &writes {
                c.put(k.clone(), value_of("tenant-b", k), None).await?;
            }
            c.delete("a", None).await?;
            Ok(())
        })?;
        let out =
            env.etcd
                .etcdctl(&["put", "/registry/secrets/kube-system/live", "cluster:live"])?;
        ensure!(out.status.success());
        go_tx
            .send(())
            .map_err(|_| anyhow!("A's pod thread is gone"))?;
        let (ids, got) = a.join().map_err(|_| anyhow!("A's thread panicked"))??;

        let markers = a_markers();
        for (id, (k, e)) in ids.iter().zip(&ranges) {
            let keys: Vec<Vec<u8>> = got[id].iter().map(|s| s.key.clone()).collect();
            let want: Vec<Vec<u8>> = markers
                .iter()
                .filter(|m| watch_in_range(m, k, e))
                .cloned()
                .collect();
            ensure!(
                keys == want,
                "watch ({}, {}) saw {:?}, want {:?}",
                show(k),
                show(e),
                keys.iter().map(|k| show(k)).collect::<Vec<_>>(),
                want.iter().map(|k| show(k)).collect::<Vec<_>>()
            );
            for s in &got[id] {
                ensure!(
                    s.put && s.value == value_of("tenant-a", &s.key),
                    "foreign event {s:?}"
                );
                ensure!(
                    s.prev_value.is_none(),
                    "A's markers are new keys, yet prev_kv {s:?}"
                );
            }
        }

        // B's own watch is untouched: it saw exactly B's writes and none of A's markers,
        // which came in between.
        in_pod(&env.b, |mut c| async move {
            c.put("b-end", value_of("tenant-b", b"b-end"), None).await?;
            Ok(())
        })?;
        let b_seen = b.join().map_err(|_| anyhow!("B's thread panicked"))??;
        let b_keys: Vec<Vec<u8>> = b_seen.iter().map(|s| s.key.clone()).collect();
        let mut expected = b_writes.clone();
        expected.push(b"a".to_vec());
        expected.push(b"b-end".to_vec());
        ensure!(
            b_keys == expected,
            "B's watch saw {:?}",
            b_keys.iter().map(|k| show(k)).collect::<Vec<_>>()
        );
        for s in &b_seen {
            let want_put = s.key != b"a";
            ensure!(s.put == want_put, "B's event {s:?}");
            if s.put {
                ensure!(
                    s.value == value_of("tenant-b", &s.key),
                    "B's watch saw {s:?}"
                );
            }
        }
        Ok(())
    })?;

    // Replaying history from revision 1 shows A's writes only, though B's and the
    // cluster's writes are older.
    in_pod(&env.a, move |mut c| async move {
        let (mut stream, ids) =
            open_watches(&mut c, &[(b"\0".to_vec(), b"\0".to_vec())], 1).await?;
        let markers = a_markers();
        let got = collect(&mut stream, &BTreeMap::from([(ids[0], markers.len())])).await?;
        let keys: Vec<Vec<u8>> = got[&ids[0]].iter().map(|s| s.key.clone()).collect();
        ensure!(
            keys == markers,
            "history replay: {:?}",
            keys.iter().map(|k| show(k)).collect::<Vec<_>>()
        );
        Ok(())
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------------------

#[test]
fn leases_of_another_tenant_behave_as_missing() -> Result<()> {
    let mut fx = Fixture::start()?;
    let b_lease = in_pod(&fx.env.b, |mut c| async move {
        let id = c.lease_grant(120, None).await?.id();
        c.put(
            "leased",
            value_of("tenant-b", b"leased"),
            Some(PutOptions::new().with_lease(id)),
        )
        .await?;
        Ok(id)
    })?;
    fx.rebase()?;

    let a_lease = in_pod(&fx.env.a, move |mut c| async move {
        expect_status(
            "revoke B's lease",
            c.lease_revoke(b_lease).await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        )?;

        let ttl = c
            .lease_time_to_live(b_lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await?;
        ensure!(
            (ttl.id(), ttl.ttl(), ttl.granted_ttl(), ttl.keys().len()) == (b_lease, -1, 0, 0),
            "time-to-live of B's lease: {ttl:?}"
        );

        // On a live keep-alive stream of A's own lease, B's id is answered with TTL 0.
        let own = c.lease_grant(60, None).await?.id();
        let (mut keeper, mut stream) = c.lease_keep_alive(own).await?;
        keeper
            .sender
            .send(PbLeaseKeepAliveRequest { id: b_lease })
            .await
            .map_err(|_| anyhow!("keep-alive stream closed"))?;
        let r = stream.message().await?.context("keep-alive stream ended")?;
        ensure!(
            (r.id(), r.ttl()) == (b_lease, 0),
            "keep-alive of B's lease: {r:?}"
        );
        keeper.keep_alive().await?;
        let r = stream.message().await?.context("keep-alive stream ended")?;
        ensure!(
            r.id() == own && r.ttl() > 0,
            "own keep-alive after B's: {r:?}"
        );

        expect_status(
            "put with B's lease",
            c.put(
                "k",
                value_of("tenant-a", b"k"),
                Some(PutOptions::new().with_lease(b_lease)),
            )
            .await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        )?;
        expect_status(
            "txn put with B's lease",
            c.txn(Txn::new().and_then([TxnOp::put(
                "k",
                "v",
                Some(PutOptions::new().with_lease(b_lease)),
            )]))
            .await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        )?;
        expect_status(
            "nested txn put with B's lease, in the failure branch",
            c.txn(
                Txn::new().or_else([TxnOp::txn(Txn::new().and_then([TxnOp::put(
                    "k",
                    "v",
                    Some(PutOptions::new().with_lease(b_lease)),
                )]))]),
            )
            .await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        )?;
        expect_status(
            "lock with B's lease",
            c.lock("l", Some(LockOptions::new().with_lease(b_lease)))
                .await,
            Code::Unknown,
            LEASE_NOT_FOUND,
        )?;
        expect_status(
            "campaign with B's lease",
            c.campaign("e", "v", b_lease).await,
            Code::Unknown,
            LEASE_NOT_FOUND,
        )?;
        let forged = LeaderKey::new()
            .with_name("e")
            .with_key("e/1")
            .with_rev(1)
            .with_lease(b_lease);
        expect_status(
            "proclaim with B's lease",
            c.proclaim(
                "v",
                Some(ProclaimOptions::new().with_leader(forged.clone())),
            )
            .await,
            Code::Unknown,
            LEASE_NOT_FOUND,
        )?;
        // Resigning a leadership one does not hold does nothing, as on etcd.
        c.resign(Some(ResignOptions::new().with_leader(forged)))
            .await?;
        // A chosen ID is one of A's own: the number B sees for its lease gives A another
        // lease, and asking for it twice gets etcd's answer for a taken ID.
        let chosen = c
            .lease_grant(60, Some(LeaseGrantOptions::new().with_id(b_lease)))
            .await?;
        ensure!(
            chosen.id() == b_lease,
            "chosen ID came back as {}",
            chosen.id()
        );
        expect_status(
            "grant of a chosen ID that is taken",
            c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(b_lease)))
                .await,
            Code::FailedPrecondition,
            "etcdserver: lease already exists",
        )?;
        c.lease_revoke(b_lease).await?;
        let listed: Vec<i64> = c.leases().await?.leases().iter().map(|l| l.id()).collect();
        ensure!(listed == vec![own], "A's lease list {listed:?}");
        Ok(own)
    })?;

    // The same calls against etcd itself, for a lease that does not exist: the broker's
    // answers above are indistinguishable from these.
    admin(&fx.env, |mut c| async move {
        let missing = 0x0bad_1ea5e;
        expect_status(
            "etcd: revoke",
            c.lease_revoke(missing).await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        )?;
        let ttl = c.lease_time_to_live(missing, None).await?;
        ensure!(ttl.ttl() == -1, "etcd: time-to-live {ttl:?}");
        match c.lease_keep_alive(missing).await {
            Err(Error::LeaseKeepAliveError(_)) => Ok(()),
            other => bail!("etcd: keep-alive {other:?}"),
        }
    })?;

    // B's lease is alive, still B's, and still carries its key.
    in_pod(&fx.env.b, move |mut c| async move {
        let ttl = c
            .lease_time_to_live(b_lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await?;
        ensure!(
            ttl.ttl() > 0 && ttl.keys() == [b"leased".to_vec()],
            "B's lease: {ttl:?}"
        );
        let listed: Vec<i64> = c.leases().await?.leases().iter().map(|l| l.id()).collect();
        ensure!(
            listed == vec![b_lease],
            "B's lease list {listed:?} (A's is {a_lease})"
        );
        let (_keeper, _stream) = c.lease_keep_alive(b_lease).await?;
        Ok(())
    })?;
    // In etcd, the key B attached carries the real lease (not the ID B sees), and it lives.
    admin(&fx.env, move |mut c| async move {
        let raw = [PREFIX_B.as_bytes(), b"leased"].concat();
        let kv = c.get(raw, None).await?.kvs().first().cloned();
        let real = kv.context("B's leased key is gone")?.lease();
        ensure!(real != b_lease, "etcd holds the ID B sees, {b_lease:x}");
        ensure!(
            c.lease_time_to_live(real, None).await?.ttl() > 0,
            "B's lease is gone"
        );
        Ok(())
    })?;
    fx.check_others_untouched()
}

/// A keep-alive stream whose first request names a lease the tenant does not own must be
/// answered at once with TTL 0, as etcd answers for a missing lease (clientv3 and
/// etcd-client then report the lease as expired); it must not hang.
#[test]
fn keep_alive_of_a_foreign_lease_as_first_request_answers_ttl_0() -> Result<()> {
    let fx = Fixture::start()?;
    let b_lease = in_pod(&fx.env.b, |mut c| async move {
        Ok(c.lease_grant(120, None).await?.id())
    })?;
    // etcd itself, for a lease that does not exist: an immediate answer with TTL 0, which
    // etcd-client turns into LeaseKeepAliveError.
    admin(&fx.env, |mut c| async move {
        match tokio::time::timeout(Duration::from_secs(5), c.lease_keep_alive(0x0bad_1ea5e)).await {
            Ok(Err(Error::LeaseKeepAliveError(_))) => Ok(()),
            other => bail!("etcd: keep-alive of a missing lease: {other:?}"),
        }
    })?;
    in_pod(&fx.env.a, move |mut c| async move {
        match tokio::time::timeout(Duration::from_secs(5), c.lease_keep_alive(b_lease)).await {
            Ok(Err(Error::LeaseKeepAliveError(_))) => Ok(()),
            Ok(other) => bail!("keep-alive of B's lease: {other:?}"),
            Err(_) => bail!(
                "keep-alive of B's lease as the first request of a stream got no answer in 5s \
                 (the broker waits for etcd's response headers, which etcd sends only after \
                 a request reaches it, before it returns the stream)"
            ),
        }
    })?;
    in_pod(&fx.env.b, move |mut c| async move {
        ensure!(
            c.lease_time_to_live(b_lease, None).await?.ttl() > 0,
            "B's lease is gone"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Compaction and cluster-wide operations
// ---------------------------------------------------------------------------------------

#[test]
fn compaction_is_the_tenants_own() -> Result<()> {
    let mut fx = Fixture::start()?;
    let (r1, r2) = in_pod(&fx.env.b, |mut c| async move {
        let r1 = c
            .put("hist", value_of("tenant-b", b"hist"), None)
            .await?
            .0
            .header
            .context("header")?
            .revision;
        let r2 = c
            .put("hist", value_of("tenant-b", b"hist2"), None)
            .await?
            .0
            .header
            .context("header")?
            .revision;
        Ok((r1, r2))
    })?;
    fx.rebase()?;
    let (old, current) = in_pod(&fx.env.a, |mut c| async move {
        let old = c
            .put("mine", "v1", None)
            .await?
            .0
            .header
            .context("header")?
            .revision;
        c.put("mine", "v2", None).await?;
        let current = c.get("x", None).await?.0.header.context("header")?.revision;
        expect_status(
            "compact in the future",
            c.compact(current + 1000, None).await,
            Code::OutOfRange,
            FUTURE_REV,
        )?;
        c.compact(current, Some(CompactionOptions::new().with_physical()))
            .await
            .context("compact")?;
        // As on etcd: the same revision again, or an older one, is already compacted.
        for rev in [current, old] {
            expect_status(
                "compact again",
                c.compact(rev, None).await,
                Code::OutOfRange,
                COMPACTED,
            )?;
        }
        // Every read below the compaction gets etcd's error; at it, the data is there.
        expect_status(
            "range below the compaction",
            c.get("mine", Some(GetOptions::new().with_revision(old)))
                .await,
            Code::OutOfRange,
            COMPACTED,
        )?;
        let at = c
            .get("mine", Some(GetOptions::new().with_revision(current)))
            .await?;
        ensure!(
            at.kvs()[0].value() == b"v2",
            "range at the compaction: {at:?}"
        );
        expect_status(
            "txn range below the compaction",
            c.txn(Txn::new().and_then([TxnOp::get(
                "mine",
                Some(GetOptions::new().with_revision(old)),
            )]))
            .await,
            Code::OutOfRange,
            COMPACTED,
        )?;
        // A watch from below it is created, then cancelled with the compaction revision.
        let mut w = c
            .watch("mine", Some(WatchOptions::new().with_start_revision(old)))
            .await?;
        let mut r = next_response(&mut w).await?;
        if r.created() && !r.canceled() {
            r = next_response(&mut w).await?;
        }
        ensure!(
            r.canceled() && r.compact_revision() == current && r.events().is_empty(),
            "watch from below the compaction: {r:?}"
        );
        Ok((old, current))
    })?;
    ensure!(current >= r2 && old > r2);
    // The real etcd kept its history; the compaction is one record the broker keeps.
    admin(&fx.env, move |mut c| async move {
        let hist = c
            .get(
                format!("{PREFIX_B}hist"),
                Some(GetOptions::new().with_revision(r1)),
            )
            .await?;
        ensure!(
            hist.kvs()[0].value() == value_of("tenant-b", b"hist"),
            "etcd lost revision {r1}"
        );
        let record = c.get(COMPACTION_A, None).await?;
        ensure!(
            record.kvs().first().map(|kv| kv.value().to_vec())
                == Some(format!("{current:020}").into_bytes()),
            "compaction record: {record:?}"
        );
        Ok(())
    })?;
    // B still reads and watches from before A's compaction.
    in_pod(&fx.env.b, move |mut c| async move {
        let old = c
            .get("hist", Some(GetOptions::new().with_revision(r1)))
            .await?;
        ensure!(old.kvs().len() == 1 && old.kvs()[0].value() == value_of("tenant-b", b"hist"));
        let mut w = c
            .watch("hist", Some(WatchOptions::new().with_start_revision(r1)))
            .await?;
        let mut values = Vec::new();
        while values.len() < 2 {
            let r = next_response(&mut w).await?;
            ensure!(
                !r.canceled() && r.compact_revision() == 0,
                "B's watch: {r:?}"
            );
            values.extend(seen(&r).into_iter().map(|s| s.value));
        }
        ensure!(
            values
                == [
                    value_of("tenant-b", b"hist"),
                    value_of("tenant-b", b"hist2")
                ]
        );
        Ok(())
    })?;
    fx.check_others_untouched()
}

#[test]
fn cluster_wide_operations_are_denied() -> Result<()> {
    let fx = Fixture::start()?;
    let (member_id, members) = admin(&fx.env, |mut c| async move {
        let m = c.member_list().await?;
        Ok((m.members()[0].id(), format!("{:?}", m.members())))
    })?;
    in_pod(&fx.env.a, move |mut c| async move {
        let d = |what: &str, r: std::result::Result<_, Error>| {
            expect_status(
                what,
                r.map(|_: ()| ()),
                Code::PermissionDenied,
                PERMISSION_DENIED,
            )
        };
        d("defragment", c.defragment().await.map(drop))?;
        d("hash", c.hash().await.map(drop))?;
        d("hash kv", c.hash_kv(0).await.map(drop))?;
        match c.snapshot().await {
            Err(e) => d("snapshot", Err(e))?,
            Ok(mut s) => d("snapshot stream", s.message().await.map(drop))?,
        }
        d("move leader", c.move_leader(member_id).await.map(drop))?;
        d(
            "downgrade",
            c.maintenance_client()
                .downgrade(DowngradeOptions::Validate("3.4.0".into()))
                .await
                .map(drop),
        )?;
        d(
            "alarm activate",
            c.alarm(AlarmAction::Activate, AlarmType::Nospace, None)
                .await
                .map(drop),
        )?;
        d(
            "alarm deactivate",
            c.alarm(AlarmAction::Deactivate, AlarmType::Nospace, None)
                .await
                .map(drop),
        )?;
        d(
            "member add",
            c.member_add(["http://10.99.0.1:2380"], None)
                .await
                .map(drop),
        )?;
        d("member remove", c.member_remove(member_id).await.map(drop))?;
        d(
            "member update",
            c.member_update(member_id, vec!["http://10.99.0.1:2380".to_owned()])
                .await
                .map(drop),
        )?;
        d(
            "member promote",
            c.member_promote(member_id).await.map(drop),
        )?;
        d("auth enable", c.auth_enable().await.map(drop))?;
        d("auth disable", c.auth_disable().await.map(drop))?;
        d("user add", c.user_add("root", "pw", None).await.map(drop))?;
        d("user list", c.user_list().await.map(drop))?;
        d("role add", c.role_add("root").await.map(drop))?;
        // Logging in is an Auth call as well.
        d(
            "authenticate",
            Client::connect([SHIM], Some(ConnectOptions::new().with_user("root", "pw")))
                .await
                .map(drop),
        )?;

        // Alarm GET is allowed (etcdctl endpoint health needs it) and shows no alarm.
        let alarms = c.alarm(AlarmAction::Get, AlarmType::None, None).await?;
        ensure!(
            alarms.alarms().is_empty(),
            "{} alarms",
            alarms.alarms().len()
        );
        Ok(())
    })?;
    // The cluster is as it was: one member, no alarm, no auth (plain calls still work).
    admin(&fx.env, move |mut c| async move {
        let m = c.member_list().await?;
        ensure!(
            format!("{:?}", m.members()) == members,
            "members changed: {:?}",
            m.members()
        );
        let alarms = c.alarm(AlarmAction::Get, AlarmType::None, None).await?;
        ensure!(
            alarms.alarms().is_empty(),
            "{} alarms raised",
            alarms.alarms().len()
        );
        c.put("/registry/probe", "x", None).await?;
        c.delete("/registry/probe", None).await?;
        Ok(())
    })?;
    fx.check_others_untouched()
}

#[test]
fn status_member_list_and_headers_are_synthetic() -> Result<()> {
    let fx = Fixture::start()?;
    let real = admin(&fx.env, |mut c| async move {
        let s = c.status().await?;
        let h = s.header().context("header")?;
        Ok((
            s.version().to_owned(),
            s.leader(),
            h.cluster_id(),
            h.member_id(),
        ))
    })?;
    let (version, real_leader, real_cluster, real_member) = real.clone();
    let (rev, ids) = in_pod(&fx.env.a, move |mut c| async move {
        let s = c.status().await?;
        ensure!(
            s.version() == version,
            "version {} vs etcd's {version}",
            s.version()
        );
        // The size is the tenant's own live keys and values, never the cluster's.
        let own: i64 = c
            .get("", Some(GetOptions::new().with_all_keys()))
            .await?
            .kvs()
            .iter()
            .map(|kv| (kv.key().len() + kv.value().len()) as i64)
            .sum();
        ensure!(s.db_size() == own, "db size {} vs own {own}", s.db_size());
        ensure!(s.leader() != real_leader, "real leader id leaked");
        let h = s.header().context("header")?;
        let ids = (h.cluster_id(), h.member_id());
        ensure!(
            ids.0 != real_cluster && ids.1 != real_member,
            "status header ids leaked"
        );

        let m = c.member_list().await?;
        ensure!(m.members().len() == 1, "members {:?}", m.members());
        let only = &m.members()[0];
        ensure!(
            only.client_urls() == [SHIM.to_owned()],
            "client urls {:?}",
            only.client_urls()
        );
        ensure!(
            only.id() != real_member && only.peer_urls().is_empty(),
            "member {only:?}"
        );

        // Every response header carries the same synthetic ids and etcd's real revision.
        let mut headers = Vec::new();
        headers.push((
            "put",
            c.put("h", value_of("tenant-a", b"h"), None).await?.0.header,
        ));
        headers.push(("get", c.get("h", None).await?.0.header));
        headers.push(("txn", c.txn(Txn::new()).await?.0.header));
        headers.push(("lease grant", c.lease_grant(10, None).await?.0.header));
        // etcd 3.4 sends Alarm responses without a header; one that has one is scrubbed.
        if let Some(h) = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await?
            .0
            .header
        {
            headers.push(("alarm", Some(h)));
        }
        headers.push(("member list", m.0.header));
        let mut w = c.watch("h", None).await?;
        headers.push(("watch", next_response(&mut w).await?.0.header));
        for (what, h) in headers {
            let h = h.with_context(|| format!("{what}: no header"))?;
            ensure!(
                (h.cluster_id, h.member_id) == ids,
                "{what}: header ids {h:?}"
            );
        }
        // The last call: nothing is written between it and the admin's read below.
        let rev = c
            .get("h", None)
            .await?
            .header()
            .context("header")?
            .revision();
        Ok((rev, ids))
    })?;
    // The revision is etcd's own.
    let direct_rev = admin(&fx.env, |mut c| async move {
        Ok(c.get("x", None)
            .await?
            .header()
            .context("header")?
            .revision())
    })?;
    ensure!(
        direct_rev == rev,
        "revision {rev} through the shim, {direct_rev} in etcd"
    );
    let b_ids = in_pod(&fx.env.b, move |mut c| async move {
        let h = c.get("x", None).await?.0.header.context("header")?;
        ensure!(h.revision == direct_rev, "B's revision {}", h.revision);
        Ok((h.cluster_id, h.member_id))
    })?;
    ensure!(b_ids == ids, "tenants see different synthetic ids");
    fx.check_others_untouched()
}

// ---------------------------------------------------------------------------------------
// Lock and Election
// ---------------------------------------------------------------------------------------

#[test]
fn locks_and_elections_of_the_same_name_are_separate() -> Result<()> {
    let mut fx = Fixture::start()?;
    let (b_lock_key, b_leader) = in_pod(&fx.env.b, |mut c| async move {
        let lease = c.lease_grant(120, None).await?.id();
        let lock = c
            .lock("mylock", Some(LockOptions::new().with_lease(lease)))
            .await?;
        let leader = c
            .campaign("myelection", value_of("tenant-b", b"leader"), lease)
            .await?
            .leader()
            .cloned()
            .context("no leader key")?;
        c.campaign("b-only", value_of("tenant-b", b"b-only"), lease)
            .await?;
        Ok((lock.key().to_vec(), leader))
    })?;
    ensure!(
        b_lock_key.starts_with(b"mylock/"),
        "B's lock key {}",
        show(&b_lock_key)
    );
    fx.rebase()?;
    let raw_b_lock = [PREFIX_B.as_bytes(), &b_lock_key].concat();

    let (lock_key, raw) = (b_lock_key.clone(), raw_b_lock.clone());
    let leader = b_leader.clone();
    in_pod(&fx.env.a, move |mut c| async move {
        let lease = c.lease_grant(120, None).await?.id();
        // B holds "mylock"; A's lock of that name is another lock and is granted at once.
        let mine = tokio::time::timeout(
            Duration::from_secs(10),
            c.lock("mylock", Some(LockOptions::new().with_lease(lease))),
        )
        .await
        .context("A's lock waited for B's")??;
        ensure!(mine.key() != lock_key.as_slice(), "A got B's lock key");
        // A sees no lock holder but itself.
        let holders = c
            .get("mylock/", Some(GetOptions::new().with_prefix()))
            .await?;
        ensure!(
            holders.kvs().len() == 1 && holders.kvs()[0].key() == mine.key(),
            "lock holders {:?}",
            holders.kvs()
        );
        // Unlocking B's key, by B's name for it or by its raw key, does nothing to B.
        c.unlock(lock_key.clone()).await?;
        c.unlock(raw.clone()).await?;

        // The election B leads does not exist for A.
        match c.leader("myelection").await {
            Err(Error::GRpcStatus(s)) => {
                ensure!(s.message().contains("no leader"), "leader: {s:?}")
            }
            other => bail!("A sees a leader of B's election: {other:?}"),
        }
        // Observing the name of B's other election: etcd answers once a leader exists in
        // the observer's space, and the first leader shown must be A's own candidate.
        let mut oc = c.clone();
        let observed = tokio::spawn(async move {
            let mut s = oc.observe("b-only").await?;
            s.message().await
        });
        let my_leader = tokio::time::timeout(
            Duration::from_secs(10),
            c.campaign("myelection", value_of("tenant-a", b"leader"), lease),
        )
        .await
        .context("A's campaign waited for B's leader")??
        .leader()
        .cloned()
        .context("no leader key")?;
        let l = c.leader("myelection").await?;
        ensure!(
            l.kv().map(|kv| kv.value()) == Some(&value_of("tenant-a", b"leader")[..]),
            "leader {l:?}"
        );
        c.campaign("b-only", value_of("tenant-a", b"b-only"), lease)
            .await?;
        let first = tokio::time::timeout(Duration::from_secs(10), observed)
            .await
            .context("observe gave nothing")???
            .context("observe ended")?;
        ensure!(
            first.kv().map(|kv| kv.value()) == Some(&value_of("tenant-a", b"b-only")[..]),
            "observe showed {first:?}"
        );

        // Proclaiming or resigning with B's leader key (and A's own lease) touches only A.
        let forged = LeaderKey::new()
            .with_name(leader.name().to_vec())
            .with_key(leader.key().to_vec())
            .with_rev(leader.rev())
            .with_lease(lease);
        let r = c
            .proclaim(
                value_of("tenant-a", b"forged"),
                Some(ProclaimOptions::new().with_leader(forged.clone())),
            )
            .await;
        ensure!(r.is_err(), "proclaim with B's leader key succeeded: {r:?}");
        c.resign(Some(ResignOptions::new().with_leader(forged)))
            .await?;
        let l = c.leader("myelection").await?;
        ensure!(
            l.kv().map(|kv| kv.key()) == Some(my_leader.key()),
            "A's leadership changed: {l:?}"
        );
        // An empty lock or leader key would name A's prefix itself; etcd refuses both.
        empty_lock_and_leader_keys_are_refused(&mut c, lease).await?;
        Ok(())
    })?;
    admin(&fx.env, |mut c| async move {
        let lease = c.lease_grant(60, None).await?.id();
        empty_lock_and_leader_keys_are_refused(&mut c, lease).await
    })?;

    // B still holds its lock and leads its election with its own value.
    in_pod(&fx.env.b, move |mut c| async move {
        let l = c.leader("myelection").await?;
        ensure!(
            l.kv().map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
                == Some((b_leader.key().to_vec(), value_of("tenant-b", b"leader"))),
            "B's leader {l:?}"
        );
        let l = c.leader("b-only").await?;
        ensure!(l.kv().map(|kv| kv.value()) == Some(&value_of("tenant-b", b"b-only")[..]));
        let held = c.get(b_lock_key.clone(), None).await?;
        ensure!(held.kvs().len() == 1, "B's lock key is gone");
        Ok(())
    })?;
    ensure!(
        dump(&fx.env)?.contains_key(&raw_b_lock),
        "B's lock key is gone from etcd"
    );
    fx.check_others_untouched()
}

// ---------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------

#[test]
fn a_shim_with_a_wrong_token_gets_nothing() -> Result<()> {
    let fx = Fixture::start()?;
    let before = dump(&fx.env)?;
    let mut pod = Pod::new()?;
    // The shim is not ready, and says why: the broker refuses its token.
    let why = pod.start_refused_shim(fx.env.broker.port, "not-a-known-token")?;
    println!("readiness with a refused token: {}", why.trim());
    in_pod(&pod, |mut c| async move {
        let u = |what: &str, r: std::result::Result<(), Error>| {
            expect_status(what, r, Code::Unauthenticated, INVALID_TOKEN)
        };
        u("get", c.get("secret", None).await.map(drop))?;
        u(
            "get everything",
            c.get("", Some(GetOptions::new().with_all_keys()))
                .await
                .map(drop),
        )?;
        u("put", c.put("k", "v", None).await.map(drop))?;
        u(
            "delete",
            c.delete("", Some(DeleteOptions::new().with_all_keys()))
                .await
                .map(drop),
        )?;
        u(
            "txn",
            c.txn(Txn::new().and_then([TxnOp::put("k", "v", None)]))
                .await
                .map(drop),
        )?;
        u("compact", c.compact(1, None).await.map(drop))?;
        match c.watch("", Some(WatchOptions::new().with_all_keys())).await {
            Err(e) => u("watch", Err(e))?,
            Ok(mut w) => u("watch stream", w.message().await.map(drop))?,
        }
        u("lease grant", c.lease_grant(10, None).await.map(drop))?;
        u("lease revoke", c.lease_revoke(1).await.map(drop))?;
        u(
            "lease time-to-live",
            c.lease_time_to_live(1, None).await.map(drop),
        )?;
        u("lease list", c.leases().await.map(drop))?;
        u("status", c.status().await.map(drop))?;
        u(
            "alarm get",
            c.alarm(AlarmAction::Get, AlarmType::None, None)
                .await
                .map(drop),
        )?;
        u("defragment", c.defragment().await.map(drop))?;
        u(
            "member add",
            c.member_add(["http://10.99.0.1:2380"], None)
                .await
                .map(drop),
        )?;
        u("auth enable", c.auth_enable().await.map(drop))?;
        u("lock", c.lock("l", None).await.map(drop))?;
        u("leader", c.leader("e").await.map(drop))?;
        Ok(())
    })?;
    // A client that reaches the broker directly, without any token, fares no better.
    let broker = format!("http://127.0.0.1:{}", fx.env.broker.port);
    runtime()?.block_on(async move {
        let mut c = Client::connect([broker], None).await?;
        expect_status(
            "direct get",
            c.get("secret", None).await,
            Code::Unauthenticated,
            INVALID_TOKEN,
        )?;
        expect_status(
            "direct status",
            c.status().await,
            Code::Unauthenticated,
            INVALID_TOKEN,
        )?;
        anyhow::Ok(())
    })?;
    ensure!(
        dump(&fx.env)? == before,
        "an unauthenticated caller changed etcd"
    );
    // Once the broker accepts its (rotated) token, the shim is ready within seconds.
    std::fs::write(pod.token_file(), "token-a")?;
    wait_for(
        "the shim to be ready with an accepted token",
        Duration::from_secs(10),
        || pod.shim_readiness().ok().filter(|(code, _)| *code == 200),
    )?;
    Ok(())
}

/// A gRPC frame of a `RangeRequest` for one key (field 1, bytes), encoded by hand so the
/// request can go out with headers of the attacker's choosing.
fn range_request_frame(key: &[u8]) -> Vec<u8> {
    assert!(key.len() < 128, "one-byte length");
    let mut msg = vec![0x0a, key.len() as u8];
    msg.extend_from_slice(key);
    let mut frame = vec![0];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    frame
}

#[test]
fn an_app_cannot_present_another_tenants_token() -> Result<()> {
    let fx = Fixture::start()?;
    in_pod(&fx.env.a, |mut c| async move {
        c.put("secret", value_of("tenant-a", b"secret"), None)
            .await?;
        Ok(())
    })?;
    let a = &fx.env.a;
    let req = a.dir.path().join("range.bin");
    let resp = a.dir.path().join("range.out");
    std::fs::write(&req, range_request_frame(b"secret"))?;
    for headers in [
        &["authorization: Bearer token-b"][..],
        &["token: token-b"][..],
        &["authorization: Bearer token-b", "token: token-b"][..],
    ] {
        let mut cmd = a.command("curl");
        cmd.args(["-sS", "--http2-prior-knowledge", "-X", "POST"])
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        cmd.arg("--data-binary")
            .arg(format!("@{}", req.display()))
            .arg("-o")
            .arg(&resp)
            .arg(format!("{SHIM}/etcdserverpb.KV/Range"));
        let out = run_bounded(cmd, Duration::from_secs(20))?;
        ensure!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body = std::fs::read(&resp)?;
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        ensure!(
            has(&value_of("tenant-a", b"secret")) && !has(b"tenant-b"),
            "with {headers:?} the app got {}",
            show(&body)
        );
    }
    fx.check_others_untouched()
}
