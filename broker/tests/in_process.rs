//! The broker run in-process, as `main` runs it, on `127.0.0.1:0` in front of a real
//! etcd, with no shim, no network namespace and no root: tenants call it directly with
//! their bearer tokens, as direct clients may. These tests cover what the broker decides
//! itself: quotas, lease ownership, compaction and the lock service.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use etcd_shim_broker::{Args, Listeners};
use etcd_shim_core::shutdown::Shutdown;
use etcd_shim_e2e::Etcd;

/// etcd, and the broker in front of it with tenants `team-a/app` and `team-b/app`.
struct Running {
    etcd: Etcd,
    grpc: SocketAddr,
    admin: SocketAddr,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<()>>,
    _dir: tempfile::TempDir,
}

/// Where team-a/app's keys live in etcd, under the default `--tenant-prefix-root`.
const A_PREFIX: &str = "/etcd-shim/tenants/team-a/app/";

const TOKENS: &str = "token-a team-a/app\ntoken-b team-b/app\n";

impl Running {
    async fn start(config: &str) -> Result<Self> {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await??;
        let dir = tempfile::tempdir()?;
        let tokens = write(dir.path(), "tokens", TOKENS)?;
        let config = write(dir.path(), "broker.yaml", config)?;
        let args = Args::try_parse_from([
            "etcd-shim-broker",
            "--static-tokens-file",
            &tokens,
            "--config",
            &config,
            "--etcd-endpoints",
            &etcd.url,
        ])?;
        let any = "127.0.0.1:0".parse()?;
        let listeners = Listeners::bind(any, any).await?;
        let (grpc, admin) = (listeners.api.local_addr()?, listeners.admin.local_addr()?);
        let shutdown = Shutdown::new();
        let task = tokio::spawn(etcd_shim_broker::run(args, listeners, shutdown.clone()));
        Ok(Self {
            etcd,
            grpc,
            admin,
            shutdown,
            task,
            _dir: dir,
        })
    }

    /// A client of the broker that sends `token` on every call.
    async fn client(&self, token: &str) -> Result<Client> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))?
            .connect()
            .await?;
        let bearer: http::HeaderValue = format!("Bearer {token}").parse()?;
        let with_token = tower::ServiceBuilder::new()
            .map_request(move |mut req: http::Request<tonic::body::Body>| {
                req.headers_mut().insert("authorization", bearer.clone());
                req
            })
            .service(channel);
        let custom = tower::util::BoxCloneSyncService::new(tower::ServiceExt::map_err(
            with_token,
            tower::BoxError::from,
        ));
        Ok(Client::from_channel(etcd_client::Channel::Custom(custom), None).await?)
    }

    /// A client of etcd itself, to see what the broker left there.
    async fn etcd(&self) -> Result<Client> {
        Ok(Client::connect([&self.etcd.url], None).await?)
    }

    /// The broker's `/metrics`.
    async fn metrics(&self) -> Result<String> {
        let addr = self.admin.to_string();
        let (code, body) =
            tokio::task::spawn_blocking(move || etcd_shim_e2e::http_get(&addr, "/metrics"))
                .await??;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        Ok(body)
    }

    /// Stops the broker as SIGTERM does, and checks that it stopped cleanly.
    async fn stop(self) -> Result<()> {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .context("the broker did not stop")???;
        Ok(())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p.display().to_string())
}

fn message(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_owned(),
        e => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_quota_settles_to_what_etcd_holds() -> Result<()> {
    let b = Running::start(
        "tenants:\n- namespace: team-a\n  serviceAccount: app\n  limits: {keys: 3}\n",
    )
    .await?;
    let mut a = b.client("token-a").await?;
    for k in ["k1", "k2", "k3"] {
        a.put(k, "v", None).await?;
    }
    // Rewriting a key adds none.
    a.put("k3", "again", None).await?;
    let refused = a.put("k4", "v", None).await.unwrap_err();
    assert_eq!(
        message(refused),
        "etcdserver: mvcc: database space exceeded"
    );
    // A delete makes room, as etcd reports it gone.
    a.delete("k1", None).await?;
    a.put("k4", "v", None).await?;
    // A Txn that rewrites a key fits; one that adds a key does not.
    let rewrite = Txn::new().and_then([TxnOp::put("k4", "v2", None)]);
    assert!(a.txn(rewrite).await?.succeeded());
    let add = Txn::new().and_then([TxnOp::put("k5", "v", None)]);
    let refused = a.txn(add).await.unwrap_err();
    assert_eq!(
        message(refused),
        "etcdserver: mvcc: database space exceeded"
    );
    // The other tenant has no limits and is not held by this one's usage.
    let mut other = b.client("token-b").await?;
    for i in 0..5 {
        other.put(format!("k{i}"), "v", None).await?;
    }
    let held = b
        .etcd()
        .await?
        .get("", Some(GetOptions::new().with_all_keys().with_keys_only()))
        .await?;
    let under_a = held
        .kvs()
        .iter()
        .filter(|kv| kv.key().starts_with(A_PREFIX.as_bytes()))
        .count();
    assert_eq!(under_a, 3, "{:?}", held.kvs());
    b.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_its_granters_alone() -> Result<()> {
    let b = Running::start("tenants: []\n").await?;
    let mut a = b.client("token-a").await?;
    let mut other = b.client("token-b").await?;
    let lease = a.lease_grant(60, None).await?.id();
    a.put("mine", "v", Some(PutOptions::new().with_lease(lease)))
        .await?;

    let seen = other.lease_time_to_live(lease, None).await?;
    assert_eq!(seen.ttl(), -1, "another tenant's lease looks missing");
    let put = other
        .put("k", "v", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap_err();
    assert_eq!(message(put), "etcdserver: requested lease not found");
    let revoke = other.lease_revoke(lease).await.unwrap_err();
    assert_eq!(message(revoke), "etcdserver: requested lease not found");
    assert!(other.leases().await?.leases().is_empty());
    // As for a lease etcd does not have: the client reads the TTL 0 answer as that.
    let kept = other.lease_keep_alive(lease).await.map(|_| ()).unwrap_err();
    assert!(kept.to_string().contains("lease not found"), "{kept}");

    // The granter still has it, with its key.
    let live = a.lease_time_to_live(lease, None).await?;
    assert!(live.ttl() > 0);
    assert_eq!(
        a.leases()
            .await?
            .leases()
            .iter()
            .map(|l| l.id())
            .collect::<Vec<_>>(),
        vec![lease]
    );
    a.lease_revoke(lease).await?;
    assert!(a.get("mine", None).await?.kvs().is_empty());
    b.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_is_the_tenants_own_and_etcd_keeps_its_history() -> Result<()> {
    let b = Running::start("tenants: []\n").await?;
    let mut a = b.client("token-a").await?;
    let mut other = b.client("token-b").await?;
    let first = a.put("k", "1", None).await?.header().unwrap().revision();
    let theirs_at = other
        .put("k", "b1", None)
        .await?
        .header()
        .unwrap()
        .revision();
    let second = a.put("k", "2", None).await?.header().unwrap().revision();
    a.compact(second, None).await?;

    let old = a
        .get("k", Some(GetOptions::new().with_revision(first)))
        .await
        .unwrap_err();
    assert_eq!(
        message(old),
        "etcdserver: mvcc: required revision has been compacted"
    );
    let again = a.compact(first, None).await.unwrap_err();
    assert_eq!(
        message(again),
        "etcdserver: mvcc: required revision has been compacted"
    );
    // Neither the other tenant nor etcd lost any history.
    let theirs = other
        .get("k", Some(GetOptions::new().with_revision(theirs_at)))
        .await?;
    assert_eq!(theirs.kvs()[0].value(), b"b1");
    let real = b
        .etcd()
        .await?
        .get(
            format!("{A_PREFIX}k"),
            Some(GetOptions::new().with_revision(first)),
        )
        .await?;
    assert_eq!(real.kvs()[0].value(), b"1");
    b.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_service_queues_per_tenant_and_counts_its_calls() -> Result<()> {
    let b = Running::start("tenants:\n- namespace: team-a\n  serviceAccount: app\n").await?;
    let mut a = b.client("token-a").await?;
    let mut other = b.client("token-b").await?;
    let held = a.lock("l", None).await?;
    // The same name is another lock for another tenant.
    let theirs = other.lock("l", None).await?;
    // A second holder of the tenant's own lock waits for the first.
    let mut second = b.client("token-a").await?;
    let waiting = tokio::spawn(async move { second.lock("l", None).await });
    // Queued once its key is under the lock's name, behind the holder's.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a
        .get(
            "l/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count()
        < 2
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the second locker never queued"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!waiting.is_finished(), "took a held lock");
    a.unlock(held.key()).await?;
    let next = tokio::time::timeout(Duration::from_secs(10), waiting).await???;
    assert!(next.key().starts_with(b"l/"));
    other.unlock(theirs.key()).await?;
    // A lock holder's key is the tenant's: the other tenant cannot release it.
    let unlock = other.unlock(next.key()).await?;
    assert!(unlock.header().is_some());
    let still = a
        .txn(Txn::new().when([Compare::create_revision(next.key(), CompareOp::Greater, 0)]))
        .await?;
    assert!(still.succeeded(), "another tenant released the lock");

    let scrape = b.metrics().await?;
    let series = |method: &str| {
        format!(
            "etcd_broker_requests_total{{tenant=\"team-a/app\",service=\"Lock\",method=\"{method}\",code=\"OK\"}}"
        )
    };
    assert_eq!(
        etcd_shim_e2e::sample(&scrape, &series("Lock")),
        Some(2.0),
        "{scrape}"
    );
    assert_eq!(
        etcd_shim_e2e::sample(&scrape, &series("Unlock")),
        Some(1.0),
        "{scrape}"
    );
    b.stop().await
}
