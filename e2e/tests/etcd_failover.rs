//! A three-member etcd cluster loses its leader under load: the broker moves calls to the
//! surviving members. Reads succeed after a bounded retry on Unavailable, the watch
//! resumes where it stopped, and the only failed writes are Unavailable ones (the
//! broker never repeats a write that may have reached etcd).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use etcd_client::{Client, WatchOptions};
use etcd_shim_e2e::pod::in_netns;
use etcd_shim_e2e::{Broker, EtcdCluster, Pod, wait_for};
use tonic::Code;

const SHIM: &str = "http://127.0.0.1:2379";
/// Attempts of one read before it counts as failed (100 ms apart).
const READ_ATTEMPTS: usize = 100;

#[derive(Debug, Default)]
struct Report {
    written: BTreeSet<String>,
    /// Failed writes by gRPC code, with the message.
    failed_writes: Vec<(Code, String)>,
    failed_reads: Vec<String>,
    /// Reads that needed more than one attempt.
    retried_reads: usize,
    watched: BTreeSet<String>,
    watch_restarts: usize,
}

fn code(e: &etcd_client::Error) -> Code {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.code(),
        _ => Code::Unknown,
    }
}

/// Keeps a watch on `load/` open, re-creating it after the last revision seen whenever
/// it fails (as clientv3 does), and records every key it sees.
async fn watch_all(
    mut c: Client,
    mut next_rev: i64,
    seen: Arc<Mutex<BTreeSet<String>>>,
    restarts: Arc<AtomicU64>,
) -> Result<()> {
    for _ in 0..100 {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next_rev);
        let mut watch = match c.watch("load/", Some(opts)).await {
            Ok(w) => w,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Ends on an error or the end of the stream; both mean: watch again.
        while let Ok(Some(resp)) = watch.message().await {
            let mut seen = seen.lock().unwrap();
            for kv in resp.events().iter().filter_map(|e| e.kv()) {
                seen.insert(String::from_utf8_lossy(kv.key()).into_owned());
                next_rev = next_rev.max(kv.mod_revision() + 1);
            }
        }
        restarts.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the watch failed 100 times")
}

async fn load(stop: Arc<AtomicBool>, progress: Arc<AtomicU64>) -> Result<Report> {
    let mut c = Client::connect([SHIM], None).await?;
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let restarts = Arc::new(AtomicU64::new(0));
    // The watch starts after the current revision, so it sees every write below even if
    // it is set up after the first of them.
    let rev = c
        .get("load/", None)
        .await?
        .header()
        .context("header")?
        .revision();
    let watcher = tokio::spawn(watch_all(
        c.clone(),
        rev + 1,
        seen.clone(),
        restarts.clone(),
    ));
    let mut report = Report::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && n < 200_000 {
        let key = format!("load/{n:06}");
        n += 1;
        match c.put(key.as_str(), "v", None).await {
            Ok(_) => {
                report.written.insert(key.clone());
            }
            Err(e) => {
                report.failed_writes.push((code(&e), e.to_string()));
                progress.store(n, Ordering::Relaxed);
                continue;
            }
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match c.get(key.as_str(), None).await {
                Ok(r) if r.kvs().len() == 1 => break,
                Ok(_) => {
                    report
                        .failed_reads
                        .push(format!("{key}: not found after a successful put"));
                    break;
                }
                Err(e) if code(&e) == Code::Unavailable && attempts < READ_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    report.failed_reads.push(format!("{key}: {e}"));
                    break;
                }
            }
        }
        if attempts > 1 {
            report.retried_reads += 1;
        }
        progress.store(n, Ordering::Relaxed);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline && !watcher.is_finished() {
        if seen.lock().unwrap().is_superset(&report.written) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watcher.abort();
    report.watched = std::mem::take(&mut *seen.lock().unwrap());
    report.watch_restarts = restarts.load(Ordering::Relaxed) as usize;
    Ok(report)
}

/// Index of the member that leads the cluster, asked of etcd itself.
fn leader(etcd: &EtcdCluster) -> Result<usize> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        for (i, url) in etcd.urls().iter().enumerate() {
            let mut c = Client::connect([url.as_str()], None).await?;
            let s = c.status().await?;
            if s.header().context("header")?.member_id() == s.leader() {
                return Ok(i);
            }
        }
        bail!("no member says it leads")
    })
}

#[test]
fn losing_the_leader_of_three_members_under_load() -> Result<()> {
    let mut etcd = EtcdCluster::start(3, None)?;
    let urls = etcd.urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let broker = Broker::start(&urls, &[("token-a", "team-a/app")])?;
    let mut pod = Pod::new()?;
    pod.start_shim(broker.port, "token-a")?;

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let ns = pod.name.clone();
    let (s, p) = (stop.clone(), progress.clone());
    let worker = std::thread::spawn(move || {
        in_netns(&ns, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(load(s, p))
        })?
    });
    let at_least = |n: u64| {
        wait_for(&format!("{n} writes"), Duration::from_secs(90), || {
            (progress.load(Ordering::Relaxed) >= n).then_some(())
        })
    };
    at_least(150)?;
    let victim = leader(&etcd)?;
    etcd.kill(victim);
    let at_kill = progress.load(Ordering::Relaxed);
    at_least(at_kill + 300)?;
    stop.store(true, Ordering::Relaxed);
    let report = worker
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;

    println!(
        "killed member {victim} (the leader) after {at_kill} writes; writes ok: {}, failed writes: {} {:?}; reads retried: {}, failed reads: {}; watch restarts: {}",
        report.written.len(),
        report.failed_writes.len(),
        report.failed_writes,
        report.retried_reads,
        report.failed_reads.len(),
        report.watch_restarts
    );
    assert!(
        report
            .failed_writes
            .iter()
            .all(|(c, _)| *c == Code::Unavailable),
        "writes may only fail with Unavailable: {:?}",
        report.failed_writes
    );
    assert!(report.failed_reads.is_empty(), "{:?}", report.failed_reads);
    let missing: Vec<_> = report.written.difference(&report.watched).collect();
    assert!(missing.is_empty(), "events never watched: {missing:?}");
    // Traffic after the loss really went through the surviving members.
    assert!(
        report.written.len() as u64 > at_kill,
        "writes succeeded after the kill"
    );
    Ok(())
}
