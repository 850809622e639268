//! Fairness: a well-behaved tenant's latency alone and beside an aggressive tenant, both
//! through shims on one broker that gives every tenant the Helm chart's `defaultLimits`
//! (the scene of e2e/tests/fairness.rs, measured instead of asserted).
//!
//! The scene runs on an etcd, broker and shims of its own: the aggressor leaves gigabytes
//! of history behind, which would weigh on whatever runs after it on the shared etcd.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use etcd_client::{Client, ResignOptions, WatchOptions};
use etcd_shim_e2e::{Broker, Etcd, Proc};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::load;
use crate::stack::{QUIET, start_shim};
use crate::stats::Sample;

/// `defaultLimits` of charts/etcd-shim/values.yaml.
pub const CHART_LIMITS: &str = "defaultLimits: {bytes: 256Mi, keys: 100000, readsPerSecond: 500, \
     readBurst: 1000, writesPerSecond: 100, writeBurst: 200, writeBytesPerSecond: 1Mi, \
     writeBytesBurst: 16Mi, watchBytesPerSecond: 4Mi, watchBytesBurst: 16Mi, watches: 500, \
     leases: 1000}\n";
/// The well-behaved tenant's rounds per second, each a put and a get of a small value.
pub const ROUNDS_PER_SEC: u64 = 50;
/// A p99 alone below this counts as this in the ratio, as in the e2e test: twice a
/// millisecond is within one scheduling delay on a shared two-core machine.
pub const FLOOR_MS: f64 = 2.0;
/// No call waits longer; a call of the well-behaved tenant that does is an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const PUT_TASKS: usize = 4;
const STORM_TASKS: usize = 8;

#[derive(Debug, Clone, Serialize)]
pub struct FairnessResult {
    pub workload: String,
    pub aggressor: String,
    pub alone: Sample,
    pub beside: Sample,
    /// p99 beside over max(p99 alone, the floor).
    pub ratio: f64,
    /// Failed or timed-out calls of the well-behaved tenant alone, and beside.
    pub errors_alone: u64,
    pub errors: u64,
    /// What the aggressor got done meanwhile.
    pub aggressor_puts: u64,
    pub aggressor_put_mib: u64,
    pub aggressor_refused: u64,
    pub aggressor_watch_messages: u64,
}

#[derive(Default)]
struct Counts {
    puts: AtomicU64,
    put_bytes: AtomicU64,
    refused: AtomicU64,
    watch_messages: AtomicU64,
    watchers_open: AtomicU64,
}

impl Counts {
    async fn call<T>(
        &self,
        fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Option<T> {
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(etcd_client::Error::GRpcStatus(s)))
                if s.code() == tonic::Code::ResourceExhausted =>
            {
                self.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => None,
        }
    }
}

/// The processes of the scene: etcd, a broker with the chart's limits, one shim for the
/// well-behaved tenant and three for the aggressor (its pods).
struct Scene {
    _etcd: Etcd,
    _broker: Broker,
    _shims: Vec<Proc>,
    good: String,
    bad: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Scene {
    fn start() -> Result<Self> {
        // The aggressor's puts leave history faster than etcd's default 2 GiB quota holds
        // for long without compaction; the quota is raised so the scene measures latency.
        let etcd = Etcd::start_with(&["--quota-backend-bytes", "8589934592"])?;
        let broker = Broker::start_with_config(
            &[&etcd.url],
            &[("good-token", "good/app"), ("bad-token", "bad/app")],
            CHART_LIMITS,
            QUIET,
        )?;
        let dir = tempfile::tempdir()?;
        let (shim, good) = start_shim(broker.port, "good-token", "shim-good", dir.path())?;
        let mut shims = vec![shim];
        let mut bad = Vec::new();
        for i in 0..3 {
            let (shim, url) = start_shim(
                broker.port,
                "bad-token",
                &format!("shim-bad-{i}"),
                dir.path(),
            )?;
            shims.push(shim);
            bad.push(url);
        }
        Ok(Self {
            _etcd: etcd,
            _broker: broker,
            _shims: shims,
            good,
            bad,
            _dir: dir,
        })
    }
}

/// Runs the scene: the well-behaved tenant for `duration` alone, then for `duration`
/// beside the aggressor with `watchers` slow watch streams.
pub async fn run(duration: Duration, watchers: usize) -> Result<FairnessResult> {
    let scene = tokio::task::spawn_blocking(Scene::start)
        .await?
        .context("starting the fairness scene")?;
    let (alone, errors_alone) = well_behaved(&scene.good, "alone", duration).await?;

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = JoinSet::new();
    for t in 0..PUT_TASKS {
        let mut c = connect(&scene.bad[0]).await?;
        let (counts, stop) = (counts.clone(), stop.clone());
        set.spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let size = if n.is_multiple_of(2) {
                    512 << 10
                } else {
                    1 << 20
                };
                let key = format!("big/{}", (t * 16 + n) % 64);
                if counts
                    .call(c.put(key, vec![b'x'; size], None))
                    .await
                    .is_some()
                {
                    counts.puts.fetch_add(1, Ordering::Relaxed);
                    counts.put_bytes.fetch_add(size as u64, Ordering::Relaxed);
                }
                n += 1;
            }
        });
    }
    let watch_client = connect(&scene.bad[1]).await?;
    for _ in 0..watchers {
        let mut c = watch_client.clone();
        let (counts, stop) = (counts.clone(), stop.clone());
        set.spawn(async move {
            let pause = Duration::from_millis(500);
            let mut opened = false;
            while !stop.load(Ordering::Relaxed) {
                let opts = WatchOptions::new().with_prefix();
                let Some(mut stream) = counts.call(c.watch("big/", Some(opts))).await else {
                    tokio::time::sleep(pause).await;
                    continue;
                };
                if !opened {
                    counts.watchers_open.fetch_add(1, Ordering::Relaxed);
                    opened = true;
                }
                // One message, then a pause: slow, but well within the broker's timeout
                // for clients that stop reading.
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(pause, stream.message()).await {
                        Err(_) => continue,
                        Ok(Ok(Some(_))) => {
                            counts.watch_messages.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => break,
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        });
    }
    for t in 0..STORM_TASKS {
        let mut c = connect(&scene.bad[2]).await?;
        let (counts, stop) = (counts.clone(), stop.clone());
        set.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Some(lease) = counts.call(c.lease_grant(10, None)).await else {
                    continue;
                };
                let id = lease.id();
                if t % 2 == 1 {
                    let name = format!("elect/{}", t % 4);
                    if let Some(won) = counts.call(c.campaign(name, "candidate", id)).await
                        && let Some(leader) = won.leader().cloned()
                    {
                        let resign = c.resign(Some(ResignOptions::new().with_leader(leader)));
                        let _ = counts.call(resign).await;
                    }
                }
                let _ = counts.call(c.lease_revoke(id)).await;
            }
        });
    }
    // In full swing: every watcher open and the puts flowing (bounded, so a scene that
    // cannot get there is measured as it is).
    let swing = Instant::now() + Duration::from_secs(20);
    while Instant::now() < swing
        && (counts.watchers_open.load(Ordering::Relaxed) < watchers as u64
            || counts.puts.load(Ordering::Relaxed) < 20)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = (
        counts.puts.load(Ordering::Relaxed),
        counts.put_bytes.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.watch_messages.load(Ordering::Relaxed),
    );
    let beside = well_behaved(&scene.good, "beside", duration).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = set.join_next().await {
        r?;
    }
    let (beside, errors) = beside?;
    let ratio = beside.p99_ms / alone.p99_ms.max(FLOOR_MS);
    Ok(FairnessResult {
        workload: format!(
            "{ROUNDS_PER_SEC} rounds/s of a put and a get of 11 bytes, one client, for {duration:?}"
        ),
        aggressor: format!(
            "{PUT_TASKS} tasks putting 512 KiB and 1 MiB values, {watchers} watch streams on \
             them reading a message every 0.5 s, {} lease grant/revoke and {} election \
             campaign/resign loops, from 3 shims, at full speed",
            STORM_TASKS / 2,
            STORM_TASKS / 2
        ),
        alone,
        beside,
        ratio,
        errors_alone,
        errors,
        aggressor_puts: counts.puts.load(Ordering::Relaxed) - before.0,
        aggressor_put_mib: (counts.put_bytes.load(Ordering::Relaxed) - before.1) >> 20,
        aggressor_refused: counts.refused.load(Ordering::Relaxed) - before.2,
        aggressor_watch_messages: counts.watch_messages.load(Ordering::Relaxed) - before.3,
    })
}

async fn connect(url: &str) -> Result<Client> {
    let mut c = load::connect(url, 1).await?;
    Ok(c.remove(0))
}

/// The well-behaved tenant's paced rounds for `duration`: latencies of every call that
/// succeeded, and how many failed or took over `CALL_TIMEOUT`.
async fn well_behaved(url: &str, phase: &str, duration: Duration) -> Result<(Sample, u64)> {
    let mut c = connect(url).await?;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / ROUNDS_PER_SEC));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut lat, mut errors) = (Vec::new(), 0u64);
    let began = Instant::now();
    let mut i = 0usize;
    while began.elapsed() < duration {
        tick.tick().await;
        let key = format!("{phase}/{}", i % 100);
        i += 1;
        let t = Instant::now();
        match tokio::time::timeout(CALL_TIMEOUT, c.put(key.clone(), "small value", None)).await {
            Ok(Ok(_)) => lat.push(t.elapsed().as_nanos() as u64),
            _ => errors += 1,
        }
        let t = Instant::now();
        match tokio::time::timeout(CALL_TIMEOUT, c.get(key, None)).await {
            Ok(Ok(r)) if r.count() == 1 => lat.push(t.elapsed().as_nanos() as u64),
            _ => errors += 1,
        }
    }
    Ok((Sample::from_latencies(lat, began.elapsed()), errors))
}
