//! The data path with the Rust `etcd-client` crate as the client, inside a pod.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LockOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use etcd_shim_e2e::{PREFIX_A, PREFIX_B, TwoTenants};
use tokio_stream::StreamExt;

const SHIM: &str = "http://127.0.0.1:2379";

async fn connect() -> Result<Client> {
    Ok(Client::connect([SHIM], None).await?)
}

#[test]
fn kv_txn_and_lease_flows() -> Result<()> {
    let env = TwoTenants::start()?;
    env.a.run(|| async {
        let mut c = connect().await?;
        c.put("k1", "v1", None).await?;
        c.put("k2", "v2", None).await?;
        c.put("z", "last", None).await?;
        let r = c.get("k1", None).await?;
        assert_eq!(r.kvs()[0].key(), b"k1");
        assert_eq!(r.kvs()[0].value(), b"v1");
        let r = c.get("k", Some(GetOptions::new().with_prefix())).await?;
        assert_eq!(r.count(), 2);
        let r = c.get("k2", Some(GetOptions::new().with_from_key())).await?;
        let keys: Vec<_> = r.kvs().iter().map(|kv| kv.key().to_vec()).collect();
        assert_eq!(keys, vec![b"k2".to_vec(), b"z".to_vec()]);
        // List with a limit, as the apiserver pages: exact count, `more` set.
        let r = c
            .get("", Some(GetOptions::new().with_from_key().with_limit(2)))
            .await?;
        assert_eq!((r.kvs().len(), r.count(), r.more()), (2, 3, true));

        // apiserver-shaped optimistic update.
        let rev = c.get("k1", None).await?.kvs()[0].mod_revision();
        let txn = Txn::new()
            .when([Compare::mod_revision("k1", CompareOp::Equal, rev)])
            .and_then([TxnOp::put("k1", "v1b", None)])
            .or_else([TxnOp::get("k1", None)]);
        assert!(c.txn(txn.clone()).await?.succeeded());
        let stale = c.txn(txn).await?;
        assert!(!stale.succeeded());

        // Leases.
        let lease = c.lease_grant(30, None).await?;
        c.put(
            "leased",
            "v",
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await?;
        let (mut keeper, mut stream) = c.lease_keep_alive(lease.id()).await?;
        keeper.keep_alive().await?;
        let ka = stream.message().await?.context("keep-alive response")?;
        assert!(ka.ttl() > 0);
        let ttl = c
            .lease_time_to_live(
                lease.id(),
                Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
            )
            .await?;
        assert_eq!(ttl.keys(), [b"leased".to_vec()]);
        let leases = c.leases().await?;
        assert_eq!(
            leases.leases().iter().map(|l| l.id()).collect::<Vec<_>>(),
            [lease.id()]
        );
        c.lease_revoke(lease.id()).await?;
        assert_eq!(c.get("leased", None).await?.count(), 0);

        let del = c
            .delete(
                "k",
                Some(
                    etcd_client::DeleteOptions::new()
                        .with_prefix()
                        .with_prev_key(),
                ),
            )
            .await?;
        assert_eq!(del.deleted(), 2);
        assert_eq!(del.prev_kvs()[0].key(), b"k1");
        let status = c.status().await?;
        assert!(!status.version().is_empty());
        let members = c.member_list().await?;
        assert_eq!(members.members()[0].client_urls(), [SHIM.to_owned()]);
        Ok(())
    })?;
    // Tenant B saw nothing; etcd holds A's remaining key under A's prefix.
    env.b.run(|| async {
        let mut c = connect().await?;
        assert_eq!(
            c.get("", Some(GetOptions::new().with_from_key()))
                .await?
                .count(),
            0
        );
        Ok(())
    })?;
    let raw = String::from_utf8(
        env.etcd
            .etcdctl(&["get", PREFIX_A, "--prefix", "--keys-only"])?
            .stdout,
    )?;
    assert_eq!(
        raw.split_whitespace().collect::<Vec<_>>(),
        [format!("{PREFIX_A}z")]
    );
    Ok(())
}

#[test]
fn watch_lock_and_election() -> Result<()> {
    let env = TwoTenants::start()?;
    env.a.run(|| async {
        let mut c = connect().await?;
        let mut watch = c
            .watch(
                "w/",
                Some(WatchOptions::new().with_prefix().with_prev_key()),
            )
            .await?;
        let created = watch.message().await?.context("created")?;
        assert!(created.created());
        c.put("w/a", "1", None).await?;
        c.put("w/a", "2", None).await?;
        c.delete("w/a", None).await?;
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let resp = watch.message().await?.context("watch ended")?;
            for ev in resp.events() {
                let kv = ev.kv().context("kv")?;
                let prev = ev.prev_kv().map(|p| p.value().to_vec());
                seen.push((
                    ev.event_type(),
                    kv.key().to_vec(),
                    kv.value().to_vec(),
                    prev,
                ));
            }
        }
        assert_eq!(
            seen[0],
            (EventType::Put, b"w/a".to_vec(), b"1".to_vec(), None)
        );
        assert_eq!(
            seen[1],
            (
                EventType::Put,
                b"w/a".to_vec(),
                b"2".to_vec(),
                Some(b"1".to_vec())
            )
        );
        assert_eq!(seen[2].0, EventType::Delete);
        assert_eq!(seen[2].3, Some(b"2".to_vec()));
        // Progress requests pass on the same stream (Kubernetes consistent reads).
        watch.request_progress().await?;
        let progress = tokio::time::timeout(Duration::from_secs(10), watch.message()).await??;
        assert!(progress.context("progress")?.events().is_empty());
        watch.cancel(created.watch_id()).await?;

        // Lock: the returned key is in the tenant's view.
        let lease = c.lease_grant(30, None).await?.id();
        let lock = c
            .lock("mylock", Some(LockOptions::new().with_lease(lease)))
            .await?;
        assert!(lock.key().starts_with(b"mylock/"), "{:?}", lock.key());
        // A second holder blocks until the first unlocks.
        let mut c2 = connect().await?;
        let lease2 = c2.lease_grant(30, None).await?.id();
        let waiter = tokio::spawn(async move {
            c2.lock("mylock", Some(LockOptions::new().with_lease(lease2)))
                .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "lock must be exclusive");
        c.unlock(lock.key()).await?;
        let second = tokio::time::timeout(Duration::from_secs(10), waiter).await???;
        assert!(second.key().starts_with(b"mylock/"));

        // Election.
        let l = c.lease_grant(30, None).await?.id();
        let camp = c.campaign("myelection", "p1", l).await?;
        let leader_key = camp.leader().context("leader key")?;
        assert_eq!(leader_key.name(), b"myelection");
        assert!(leader_key.key().starts_with(b"myelection/"));
        let leader = c.leader("myelection").await?;
        assert_eq!(leader.kv().context("leader kv")?.value(), b"p1");
        let mut observe = c.observe("myelection").await?;
        let seen = observe.next().await.context("observe")??;
        assert_eq!(seen.kv().context("observed kv")?.value(), b"p1");
        c.proclaim(
            "p1b",
            Some(etcd_client::ProclaimOptions::new().with_leader(leader_key.clone())),
        )
        .await?;
        let seen = observe.next().await.context("observe")??;
        assert_eq!(seen.kv().context("observed kv")?.value(), b"p1b");
        c.resign(Some(
            etcd_client::ResignOptions::new().with_leader(leader_key.clone()),
        ))
        .await?;
        Ok(())
    })?;
    let raw = String::from_utf8(
        env.etcd
            .etcdctl(&["get", "/etcd-shim/", "--prefix", "--keys-only"])?
            .stdout,
    )?;
    assert!(raw.contains(&format!("{PREFIX_A}mylock/")), "{raw}");
    assert!(!raw.contains(PREFIX_B), "{raw}");
    Ok(())
}

/// 10,000 writes while a watch is open: every event arrives once, in order.
#[test]
fn watch_survives_a_burst_of_ten_thousand_writes() -> Result<()> {
    const N: usize = 10_000;
    let env = TwoTenants::start()?;
    env.a.run(|| async {
        let mut c = connect().await?;
        let mut watch = c
            .watch("burst/", Some(WatchOptions::new().with_prefix()))
            .await?;
        assert!(watch.message().await?.context("created")?.created());
        // Writers: 16 at a time, each key written once, value = its index.
        let writer = {
            let c = c.clone();
            tokio::spawn(async move {
                let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
                let mut tasks = Vec::with_capacity(N);
                for i in 0..N {
                    let mut c = c.clone();
                    let permit = sem.clone().acquire_owned().await?;
                    tasks.push(tokio::spawn(async move {
                        let _permit = permit;
                        c.put(format!("burst/{i:05}"), i.to_string(), None).await
                    }));
                }
                for t in tasks {
                    t.await??;
                }
                anyhow::Ok(())
            })
        };
        let mut last_rev = 0;
        let mut seen = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while seen.len() < N {
            let resp = tokio::time::timeout_at(deadline, watch.message())
                .await
                .context("events stopped coming")??
                .context("watch ended")?;
            for ev in resp.events() {
                let kv = ev.kv().context("kv")?;
                if kv.mod_revision() <= last_rev {
                    bail!("event out of order: {} after {last_rev}", kv.mod_revision());
                }
                last_rev = kv.mod_revision();
                if !seen.insert(kv.key().to_vec()) {
                    bail!("event delivered twice: {:?}", kv.key_str());
                }
            }
        }
        writer.await??;
        // Nothing extra arrives afterwards.
        let extra = tokio::time::timeout(Duration::from_millis(300), watch.message()).await;
        assert!(
            extra.is_err(),
            "unexpected event after the burst: {extra:?}"
        );
        assert_eq!(seen.len(), N);
        Ok(())
    })
}

/// etcd's errors reach the client with etcd's exact code and message: the same calls
/// against etcd directly and through the shim fail identically.
#[test]
fn etcd_errors_pass_through_unchanged() -> Result<()> {
    let env = TwoTenants::start()?;
    // Make history, then compact it away directly on etcd (the broker never compacts).
    env.a.run(|| async {
        let mut c = connect().await?;
        for i in 0..5 {
            c.put("hist", i.to_string(), None).await?;
        }
        Ok(())
    })?;
    let direct_url = env.etcd.url.clone();
    let current = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut d = Client::connect([direct_url.as_str()], None).await?;
            let rev = d
                .get("x", None)
                .await?
                .header()
                .context("header")?
                .revision();
            d.compact(rev - 1, None).await?;
            anyhow::Ok(rev)
        })?
    };

    fn status(r: Result<impl std::fmt::Debug, etcd_client::Error>) -> (tonic::Code, String) {
        match r {
            Err(etcd_client::Error::GRpcStatus(s)) => (s.code(), s.message().to_owned()),
            other => panic!("expected a gRPC status, got {other:?}"),
        }
    }
    async fn failures(mut c: Client, current: i64) -> Result<Vec<(tonic::Code, String)>> {
        let big = vec![b'x'; 2 * 1024 * 1024 - 4096];
        Ok(vec![
            status(
                c.get("hist", Some(GetOptions::new().with_revision(2)))
                    .await,
            ),
            status(
                c.get(
                    "hist",
                    Some(GetOptions::new().with_revision(current + 1000)),
                )
                .await,
            ),
            status(c.put("big", big, None).await),
            status(c.lease_revoke(0x1234_5678).await),
            status(c.put("", "v", None).await),
        ])
    }
    let through_shim = env
        .a
        .run(move || async move { failures(connect().await?, current).await })?;
    let direct_url = env.etcd.url.clone();
    let direct = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            failures(Client::connect([direct_url.as_str()], None).await?, current).await
        })?;
    assert_eq!(through_shim, direct);
    let messages: Vec<&str> = direct.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(
        messages,
        [
            "etcdserver: mvcc: required revision has been compacted",
            "etcdserver: mvcc: required revision is a future revision",
            "etcdserver: request is too large",
            "etcdserver: requested lease not found",
            "etcdserver: key is not provided",
        ]
    );
    Ok(())
}
