//! Per-tenant compaction across broker replicas: a compaction made through one broker
//! holds for the same tenant's calls through another, because the record is in etcd.

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{Client, Error, GetOptions, WatchOptions};
use etcd_shim_e2e::{Broker, Etcd, Pod, TENANT_A};
use tonic::Code;

const SHIM: &str = "http://127.0.0.1:2379";
const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

#[test]
fn a_second_broker_replica_enforces_the_compaction() -> Result<()> {
    let etcd = Etcd::start()?;
    let tokens = [("token-a", TENANT_A)];
    let one = Broker::start(&[&etcd.url], &tokens)?;
    let two = Broker::start(&[&etcd.url], &tokens)?;
    // Two pods of the same tenant, each through its own broker.
    let mut first = Pod::new()?;
    first.start_shim(one.port, "token-a")?;
    let mut second = Pod::new()?;
    second.start_shim(two.port, "token-a")?;

    let (old, compacted) = first.run(|| async {
        let mut c = Client::connect([SHIM], None).await?;
        let old = c
            .put("k", "v1", None)
            .await?
            .header()
            .context("header")?
            .revision();
        let now = c
            .put("k", "v2", None)
            .await?
            .header()
            .context("header")?
            .revision();
        c.compact(now, None).await?;
        Ok((old, now))
    })?;

    second.run(move || async move {
        let mut c = Client::connect([SHIM], None).await?;
        match c.get("k", Some(GetOptions::new().with_revision(old))).await {
            Err(Error::GRpcStatus(s))
                if s.code() == Code::OutOfRange && s.message() == COMPACTED => {}
            other => bail!("a read below the compaction through the other broker: {other:?}"),
        }
        let at = c
            .get("k", Some(GetOptions::new().with_revision(compacted)))
            .await?;
        ensure!(
            at.kvs()[0].value() == b"v2",
            "read at the compaction: {at:?}"
        );
        // The compaction is also known to the other broker for a later Compact.
        match c.compact(old, None).await {
            Err(Error::GRpcStatus(s)) if s.message() == COMPACTED => {}
            other => bail!("compacting below the compaction again: {other:?}"),
        }
        let mut w = c
            .watch("k", Some(WatchOptions::new().with_start_revision(old)))
            .await?;
        for _ in 0..2 {
            let r = tokio::time::timeout(std::time::Duration::from_secs(15), w.message())
                .await
                .context("watch response")??
                .context("watch ended")?;
            if r.canceled() {
                ensure!(r.compact_revision() == compacted, "{r:?}");
                return Ok(());
            }
        }
        bail!("the watch from below the compaction was not cancelled")
    })
}

/// A backend dedicated to etcd-shim is compacted for real, at the lowest revision its
/// tenants compacted, so the operator's defragmentation gives the space back.
#[test]
fn a_dedicated_backend_is_compacted_at_its_tenants_compaction() -> Result<()> {
    let etcd = Etcd::start()?;
    let tokens = [("token-a", TENANT_A)];
    let flags = ["--etcd-dedicated", "--dedicated-compaction-interval", "1s"];
    // Two replicas: one of them holds the compactor's seat.
    let one = Broker::start_with(&[&etcd.url], &tokens, &flags)?;
    let _two = Broker::start_with(&[&etcd.url], &tokens, &flags)?;
    let mut pod = Pod::new()?;
    pod.start_shim(one.port, "token-a")?;

    // History: one key rewritten with large values.
    let (old, compacted) = pod.run(|| async {
        let mut c = Client::connect([SHIM], None).await?;
        let value = vec![b'x'; 64 * 1024];
        let old = c
            .put("big", value.clone(), None)
            .await?
            .header()
            .context("header")?
            .revision();
        for _ in 0..60 {
            c.put("big", value.clone(), None).await?;
        }
        let now = c
            .get("big", None)
            .await?
            .header()
            .context("header")?
            .revision();
        c.compact(now, None).await?;
        Ok((old, now))
    })?;

    let url = etcd.url.clone();
    tokio::runtime::Runtime::new()?.block_on(async move {
        let mut c = Client::connect([url], None).await?;
        let before = c.status().await?.db_size();
        // etcd itself is compacted at the tenant's revision, not beyond it.
        let key = "/etcd-shim/tenants/team-a/app/big";
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match c.get(key, Some(GetOptions::new().with_revision(old))).await {
                Err(Error::GRpcStatus(s)) if s.message() == COMPACTED => break,
                Ok(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await
                }
                other => bail!("etcd was not compacted for the dedicated backend: {other:?}"),
            }
        }
        let at = c
            .get(key, Some(GetOptions::new().with_revision(compacted)))
            .await?;
        ensure!(
            at.kvs().len() == 1,
            "the tenant's compaction revision is gone from etcd"
        );
        // The operator's defragmentation now gives the history's space back.
        c.defragment().await?;
        let after = c.status().await?.db_size();
        ensure!(
            after < before / 2,
            "db size {before} before defragmentation, {after} after"
        );
        Ok(())
    })
}
