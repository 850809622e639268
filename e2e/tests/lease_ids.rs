//! Lease IDs of the tenant's own: what a tenant sees is a keyed permutation of etcd's
//! real IDs, so it learns neither the member ID in their high bits nor how many requests
//! other tenants made between its grants; a chosen ID works as on etcd; lock keys carry
//! the tenant's IDs; and every broker replica with the same secret translates alike.

use std::collections::HashSet;

use anyhow::{Context, Result, ensure};
use etcd_client::{
    Client, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, LockOptions, PutOptions,
};
use etcd_shim_e2e::{Broker, PREFIX_A, Pod, TENANT_A, TwoTenants};

const SHIM: &str = "http://127.0.0.1:2379";

async fn connect() -> Result<Client> {
    Ok(Client::connect([SHIM], None).await?)
}

/// Lease IDs etcd holds, as its admin lists them.
fn real_leases(env: &TwoTenants) -> Result<HashSet<i64>> {
    let out = env.etcd.etcdctl(&["lease", "list"])?;
    ensure!(out.status.success(), "etcdctl lease list");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| i64::from_str_radix(l.trim(), 16).ok())
        .collect())
}

/// The steps between consecutive IDs.
fn steps(ids: &[i64]) -> Vec<i64> {
    ids.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect()
}

#[test]
fn lease_ids_show_no_counter_and_no_member_bits() -> Result<()> {
    let env = TwoTenants::start()?;
    // A and B grant in turn; each of B's grants advances etcd's counter between two of
    // A's.
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        seen_a.push(
            env.a
                .run(|| async { Ok(connect().await?.lease_grant(60, None).await?.id()) })?,
        );
        seen_b.push(
            env.b
                .run(|| async { Ok(connect().await?.lease_grant(60, None).await?.id()) })?,
        );
    }
    let real = real_leases(&env)?;
    ensure!(real.len() == 16, "etcd holds {} leases", real.len());
    // What a tenant would see with IDs passed through: one member ID in the high bits
    // and small, even steps.
    let mut sorted: Vec<i64> = real.iter().copied().collect();
    sorted.sort();
    let high: HashSet<i64> = sorted.iter().map(|id| id >> 40).collect();
    ensure!(
        high.len() == 1,
        "real IDs do not share a member prefix: {sorted:x?}"
    );
    ensure!(
        steps(&sorted).iter().all(|s| *s > 0 && *s < 1 << 16),
        "real IDs are not a counter: {sorted:x?}"
    );
    for (name, seen) in [("A", &seen_a), ("B", &seen_b)] {
        ensure!(
            seen.iter().all(|id| *id > 0 && !real.contains(id)),
            "{name} sees real IDs: {seen:x?}"
        );
        let high: HashSet<i64> = seen.iter().map(|id| id >> 40).collect();
        ensure!(high.len() >= 7, "{name}'s IDs share high bits: {seen:x?}");
        let small = steps(seen)
            .iter()
            .filter(|s| s.unsigned_abs() < 1 << 40)
            .count();
        ensure!(small <= 1, "{name}'s IDs step like a counter: {seen:x?}");
    }
    Ok(())
}

#[test]
fn a_chosen_lease_id_is_the_tenants_own_everywhere() -> Result<()> {
    let env = TwoTenants::start()?;
    const CHOSEN: i64 = 0x1234_5678;
    env.a.run(|| async {
        let mut c = connect().await?;
        let g = c
            .lease_grant(60, Some(LeaseGrantOptions::new().with_id(CHOSEN)))
            .await?;
        ensure!(g.id() == CHOSEN, "granted {:x}", g.id());
        c.put("leased", "v", Some(PutOptions::new().with_lease(CHOSEN)))
            .await?;
        let got = c.get("leased", None).await?;
        ensure!(
            got.kvs()[0].lease() == CHOSEN,
            "get shows lease {:x}",
            got.kvs()[0].lease()
        );
        let ttl = c
            .lease_time_to_live(CHOSEN, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await?;
        ensure!(
            ttl.id() == CHOSEN && ttl.ttl() > 0 && ttl.keys() == [b"leased".to_vec()],
            "time-to-live {ttl:?}"
        );
        let (mut keeper, mut stream) = c.lease_keep_alive(CHOSEN).await?;
        keeper.keep_alive().await?;
        let r = stream.message().await?.context("keep-alive answer")?;
        ensure!(r.id() == CHOSEN && r.ttl() > 0, "keep-alive {r:?}");
        let listed: Vec<i64> = c.leases().await?.leases().iter().map(|l| l.id()).collect();
        ensure!(listed == vec![CHOSEN], "lease list {listed:x?}");
        // A lock on it is named after the ID the tenant knows.
        let lock = c
            .lock("mylock", Some(LockOptions::new().with_lease(CHOSEN)))
            .await?;
        ensure!(
            lock.key() == format!("mylock/{CHOSEN:x}").as_bytes(),
            "lock key {:?}",
            String::from_utf8_lossy(lock.key())
        );
        let held = c
            .get("mylock/", Some(GetOptions::new().with_prefix()))
            .await?;
        ensure!(
            held.kvs().len() == 1 && held.kvs()[0].lease() == CHOSEN,
            "lock holders {:?}",
            held.kvs()
        );
        c.unlock(lock.key()).await?;
        Ok(())
    })?;
    // etcd holds another ID, attached to the key.
    let out = env
        .etcd
        .etcdctl(&["get", &format!("{PREFIX_A}leased"), "-w", "json"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let real_id: i64 = serde_json::from_str::<serde_json::Value>(&text)?["kvs"][0]["lease"]
        .as_i64()
        .context("lease in etcd's answer")?;
    ensure!(
        real_id != CHOSEN && real_id > 0,
        "etcd holds lease {real_id:x}"
    );

    // B asking for the same number gets a lease of its own; A's is untouched.
    env.b.run(|| async {
        let mut c = connect().await?;
        let g = c
            .lease_grant(60, Some(LeaseGrantOptions::new().with_id(CHOSEN)))
            .await?;
        ensure!(g.id() == CHOSEN, "B granted {:x}", g.id());
        c.lease_revoke(CHOSEN).await?;
        Ok(())
    })?;
    env.a.run(|| async {
        let mut c = connect().await?;
        ensure!(
            c.lease_time_to_live(CHOSEN, None).await?.ttl() > 0,
            "A's lease went with B's"
        );
        Ok(())
    })?;

    // A second broker replica with the same secret: A's pod on it sees the same IDs.
    let second = Broker::start(&[&env.etcd.url], &[("token-a2", TENANT_A)])?;
    let mut again = Pod::new()?;
    again.start_shim(second.port, "token-a2")?;
    again.run(|| async {
        let mut c = connect().await?;
        let got = c.get("leased", None).await?;
        ensure!(
            got.kvs().first().map(|kv| kv.lease()) == Some(CHOSEN),
            "the second replica shows {:?}",
            got.kvs()
        );
        let listed: Vec<i64> = c.leases().await?.leases().iter().map(|l| l.id()).collect();
        ensure!(
            listed == vec![CHOSEN],
            "second replica's lease list {listed:x?}"
        );
        c.lease_revoke(CHOSEN).await?;
        ensure!(
            c.get("leased", None).await?.kvs().is_empty(),
            "revoked lease's key"
        );
        Ok(())
    })?;
    Ok(())
}
