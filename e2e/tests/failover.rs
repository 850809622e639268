//! Two brokers behind one shim: the broker in use is killed (SIGKILL) under load, the
//! shim moves to the other, a watch through the shim misses no event, and writes resume.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use etcd_shim_e2e::tls::{SecretDir, TestCa};
use etcd_shim_e2e::{Broker, Etcd, Pod, TENANT_A, pod::in_netns, sample, wait_for};

/// When each put succeeded, and each failed attempt with its error.
type WriteLog = (Vec<Instant>, Vec<(Instant, String)>);

/// Writes `/w/<n>` = n for n in 0..total through the shim, retrying a failed put until
/// it succeeds; `done` counts successes. Returns when each put succeeded, and the errors.
fn write_all(ns: String, total: u64, done: Arc<AtomicU64>) -> Result<WriteLog> {
    in_netns(&ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut c = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
            let (mut ok_at, mut errors) = (Vec::new(), Vec::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut n = 0;
            while n < total {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "writes did not finish: {errors:?}"
                );
                let put = c.put(key(n), n.to_string(), None);
                match tokio::time::timeout(Duration::from_secs(5), put).await {
                    Ok(Ok(_)) => {
                        ok_at.push(Instant::now());
                        n += 1;
                        done.store(n, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok(Err(e)) => {
                        errors.push((Instant::now(), e.to_string()));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(_) => errors.push((Instant::now(), "timed out".into())),
                }
            }
            Ok((ok_at, errors))
        })
    })?
}

fn key(n: u64) -> String {
    format!("/w/{n:05}")
}

/// Keys of the PUT events in `etcdctl watch` output (`PUT`, key, value per event).
fn watched_keys(out: &str) -> Vec<String> {
    let lines: Vec<&str> = out.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[0] == "PUT")
        .map(|w| w[1].to_owned())
        .collect()
}

#[test]
fn the_shim_fails_over_to_the_other_broker_without_losing_watch_events() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut pod = Pod::new()?;
    let ca = TestCa::new("broker CA")?;
    let (cert, key_pem) = ca.issue(&[pod.host_ip.to_string()])?;
    let secret = SecretDir::new(&cert, &key_pem)?;
    let tls_args = secret.broker_args();
    let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    let tokens = [("token-a", TENANT_A)];
    let mut brokers = [
        Broker::start_with(&[&etcd.url], &tokens, &tls_args)?,
        Broker::start_with(&[&etcd.url], &tokens, &tls_args)?,
    ];
    std::fs::write(pod.token_file(), "token-a")?;
    let ca_file = ca.write_pem(&pod.dir.path().join("broker-ca.crt"))?;
    let urls = brokers
        .iter()
        .map(|b| format!("https://{}:{}", pod.host_ip, b.port))
        .collect::<Vec<_>>()
        .join(",");
    pod.start_shim_with(&[
        "--broker",
        &urls,
        "--broker-ca-file",
        &ca_file.display().to_string(),
    ])?;

    let watch = pod.etcdctl_spawn("watch", &["watch", "--prefix", "/w/"])?;
    let watches = |b: &Broker| {
        b.metrics()
            .ok()
            .and_then(|m| sample(&m, "etcd_broker_watch_streams_open"))
            .unwrap_or(0.0)
    };
    let victim = wait_for(
        "the watch to reach a broker",
        Duration::from_secs(20),
        || brokers.iter().position(|b| watches(b) >= 1.0),
    )?;
    let survivor = 1 - victim;
    println!("watch on broker {victim}; killing it under load");

    let total = 300;
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (ns, done) = (pod.name.clone(), done.clone());
        std::thread::spawn(move || write_all(ns, total, done))
    };
    wait_for("writes to get going", Duration::from_secs(30), || {
        (done.load(Ordering::Relaxed) >= 100).then_some(())
    })?;
    let killed_at = Instant::now();
    brokers[victim].proc.kill();
    let (ok_at, errors) = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;

    let first_after = ok_at
        .iter()
        .find(|t| **t > killed_at)
        .context("no write succeeded after the kill")?;
    let longest = ok_at
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    println!(
        "failover: first write after the kill {:?} later; longest gap between writes {:?}; {} failed attempts: {:?}",
        *first_after - killed_at,
        longest,
        errors.len(),
        errors.iter().map(|(_, e)| e).collect::<Vec<_>>()
    );

    // The watch resumed on the surviving broker and saw every write exactly in order.
    wait_for(
        "the watch to move to the other broker",
        Duration::from_secs(20),
        || (watches(&brokers[survivor]) >= 1.0).then_some(()),
    )?;
    let last = key(total - 1);
    let out = wait_for(
        "the watch to see the last write",
        Duration::from_secs(20),
        || {
            let log = watch.log();
            log.contains(&last).then_some(log)
        },
    )?;
    let mut seen = watched_keys(&out);
    // A put that failed after reaching etcd was written again with the same value.
    seen.dedup();
    let written: Vec<String> = (0..total).map(key).collect();
    ensure!(
        seen == written,
        "the watch missed or reordered events: {} seen, {} written; first difference at {:?}",
        seen.len(),
        written.len(),
        seen.iter().zip(&written).position(|(a, b)| a != b)
    );
    assert!(pod.shim().is_running());
    Ok(())
}
