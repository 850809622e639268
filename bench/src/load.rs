//! The workloads: the same etcd-client code, connections and concurrency against every
//! endpoint. Each operation is timed from the client's side.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::stats::{Cost, Sample};
use crate::usage::{self, Counters};

/// Keys read and written at random.
const KEYS: usize = 1000;
/// Keys a paged list returns, and its page size (the apiserver's default limit is 500).
const LIST_KEYS: usize = 1000;
const PAGE: i64 = 500;
/// Object-sized values.
const VALUE: usize = 256;
/// Keys each Txn task cycles through; each task owns its own, as apiserver objects.
const TXN_KEYS_PER_TASK: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    /// Range of one key, the same every time.
    GetOne {
        serializable: bool,
    },
    /// Range of one random key out of `KEYS`.
    GetRandom {
        serializable: bool,
    },
    /// Create if mod_revision == 0, else update if mod_revision == the last seen one.
    Txn,
    /// The whole `list/` prefix in pages of `PAGE`, pinned to the first page's revision.
    List,
}

/// A workload: an operation at a concurrency.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub name: &'static str,
    pub op: Op,
    pub concurrency: usize,
}

pub fn workloads() -> Vec<Workload> {
    let w = |name, op, concurrency| Workload {
        name,
        op,
        concurrency,
    };
    let lin = false;
    let ser = true;
    vec![
        w("put c1", Op::Put, 1),
        w("put c100", Op::Put, 100),
        w(
            "range one key, linearizable, c1",
            Op::GetOne { serializable: lin },
            1,
        ),
        w(
            "range one key, linearizable, c100",
            Op::GetOne { serializable: lin },
            100,
        ),
        w(
            "range one key, serializable, c1",
            Op::GetOne { serializable: ser },
            1,
        ),
        w(
            "range one key, serializable, c100",
            Op::GetOne { serializable: ser },
            100,
        ),
        w(
            "range random key, linearizable, c1",
            Op::GetRandom { serializable: lin },
            1,
        ),
        w(
            "range random key, linearizable, c100",
            Op::GetRandom { serializable: lin },
            100,
        ),
        w(
            "range random key, serializable, c1",
            Op::GetRandom { serializable: ser },
            1,
        ),
        w(
            "range random key, serializable, c100",
            Op::GetRandom { serializable: ser },
            100,
        ),
        w("txn create/update c1", Op::Txn, 1),
        w("txn create/update c100", Op::Txn, 100),
        w("list 1000 keys, pages of 500, c10", Op::List, 10),
    ]
}

/// `connections` clients to one endpoint, each its own HTTP/2 connection.
pub async fn connect(url: &str, connections: usize) -> Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(30));
        clients.push(
            Client::connect([url], Some(opts))
                .await
                .with_context(|| format!("connecting to {url}"))?,
        );
    }
    Ok(clients)
}

/// Writes the keys the reads and the list need, through the endpoint (so under its
/// namespace).
pub async fn seed(clients: &[Client]) -> Result<()> {
    let mut set = JoinSet::new();
    for t in 0..50usize {
        let mut c = clients[t % clients.len()].clone();
        set.spawn(async move {
            for i in (t..KEYS.max(LIST_KEYS)).step_by(50) {
                if i < KEYS {
                    c.put(key(i), value(), None).await?;
                }
                if i < LIST_KEYS {
                    c.put(format!("list/{i:05}"), value(), None).await?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

fn key(i: usize) -> String {
    format!("k/{i:05}")
}

fn value() -> Vec<u8> {
    vec![b'v'; VALUE]
}

/// Per-task state: its random source and, for Txn, the revisions it last saw.
struct Task {
    id: usize,
    rng: StdRng,
    n: usize,
    revs: HashMap<String, i64>,
}

/// Runs `w` with clients spread round-robin over the tasks: a warm-up, then `duration`
/// measured. Operations started in the measured window count; throughput is over the
/// time until the last of them finished. Every task completes at least one measured
/// operation, so an overloaded endpoint shows as slow rather than as missing.
/// Runs `w` on `clients`, and measures what the processes `serving` spent on it (CPU and
/// context switches per operation).
pub async fn run(
    w: Workload,
    clients: &[Client],
    serving: &[u32],
    warmup: Duration,
    duration: Duration,
) -> Result<Sample> {
    let read = || {
        serving
            .iter()
            .map(|&pid| usage::counters(pid))
            .collect::<Result<Vec<_>>>()
    };
    let before = read()?;
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut set = JoinSet::new();
    for id in 0..w.concurrency {
        let mut client = clients[id % clients.len()].clone();
        set.spawn(async move {
            let mut task = Task {
                id,
                rng: StdRng::seed_from_u64(id as u64),
                n: 0,
                revs: HashMap::new(),
            };
            let mut lat = Vec::new();
            let mut last = measure_from;
            loop {
                let t0 = Instant::now();
                if t0 >= end && !lat.is_empty() {
                    break;
                }
                one(w.op, &mut client, &mut task).await?;
                if t0 >= measure_from {
                    last = Instant::now();
                    lat.push((last - t0).as_nanos() as u64);
                }
                task.n += 1;
            }
            anyhow::Ok((lat, last, task.n as u64))
        });
    }
    let mut all = Vec::new();
    let mut last = measure_from + duration;
    let mut total = 0u64;
    while let Some(r) = set.join_next().await {
        let (lat, done, n) = r??;
        all.extend(lat);
        last = last.max(done);
        total += n;
    }
    // Over the whole run, warm-up included, divided by every operation it did: on a
    // loaded machine this task may wake late, so counters read at the edges of the
    // measuring window could miss the work.
    let spent: Vec<Counters> = read()?
        .into_iter()
        .zip(before)
        .map(|(a, b)| a - b)
        .collect();
    let mut sample = Sample::from_latencies(all, last - measure_from);
    let ops = total.max(1) as f64;
    for (cost, c) in sample.cost.iter_mut().zip(spent) {
        *cost = Cost {
            cpu_us: c.cpu_ns as f64 / 1e3 / ops,
            switches: c.switches as f64 / ops,
        };
    }
    Ok(sample)
}

async fn one(op: Op, c: &mut Client, t: &mut Task) -> Result<()> {
    match op {
        Op::Put => {
            let k = key(t.rng.random_range(0..KEYS));
            c.put(k, value(), None).await?;
        }
        Op::GetOne { serializable } => {
            let r = c.get(key(0), Some(get_opts(serializable))).await?;
            ensure!(r.kvs().len() == 1, "range of a seeded key found nothing");
        }
        Op::GetRandom { serializable } => {
            let k = key(t.rng.random_range(0..KEYS));
            let r = c.get(k, Some(get_opts(serializable))).await?;
            ensure!(r.kvs().len() == 1, "range of a seeded key found nothing");
        }
        Op::Txn => {
            let k = format!("txn/{}/{}", t.id, t.n % TXN_KEYS_PER_TASK);
            let rev = t.revs.get(&k).copied().unwrap_or(0);
            let txn = Txn::new()
                .when([Compare::mod_revision(k.clone(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(k.clone(), value(), None)])
                .or_else([TxnOp::get(k.clone(), None)]);
            let r = c.txn(txn).await?;
            let seen = if r.succeeded() {
                r.header().map(|h| h.revision()).unwrap_or(0)
            } else {
                // Someone (an earlier round) wrote it: retry from what etcd holds, as the
                // apiserver's GuaranteedUpdate does.
                match r.op_responses().first() {
                    Some(TxnOpResponse::Get(g)) => {
                        g.kvs().first().map(|kv| kv.mod_revision()).unwrap_or(0)
                    }
                    _ => bail!("txn else-branch answered without a range response"),
                }
            };
            t.revs.insert(k, seen);
        }
        Op::List => {
            let mut from = b"list/".to_vec();
            let mut rev = 0;
            let mut got = 0;
            for _ in 0..LIST_KEYS as i64 / PAGE + 2 {
                // Revision 0 (the first page) means "latest".
                let o = GetOptions::new()
                    .with_range("list0")
                    .with_limit(PAGE)
                    .with_revision(rev);
                let r = c.get(from.clone(), Some(o)).await?;
                if rev == 0 {
                    rev = r.header().map(|h| h.revision()).unwrap_or(0);
                }
                got += r.kvs().len();
                match r.kvs().last() {
                    Some(last) if r.more() => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => break,
                }
            }
            ensure!(got == LIST_KEYS, "paged list returned {got} keys");
        }
    }
    Ok(())
}

fn get_opts(serializable: bool) -> GetOptions {
    if serializable {
        GetOptions::new().with_serializable()
    } else {
        GetOptions::new()
    }
}

/// Nanoseconds since the Unix epoch: written into watched values so each receiver can
/// tell how long delivery took (sender and receivers share this process's clock).
pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Watch fan-out: `watchers` watch streams on one key, spread over the clients; one
/// writer puts `rate` times a second for `duration`. Ops are delivered events; latency
/// is from just before the put to the event's arrival.
pub async fn watch_fanout(
    clients: &[Client],
    watchers: usize,
    rate: u32,
    duration: Duration,
) -> Result<Sample> {
    const KEY: &str = "fanout";
    let puts = (rate as f64 * duration.as_secs_f64()).round().max(1.0) as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(watchers.max(1));
    let mut set = JoinSet::new();
    for i in 0..watchers {
        let mut client = clients[i % clients.len()].clone();
        let stop = stop.clone();
        let ready = ready_tx.clone();
        set.spawn(async move {
            let mut stream = client.watch(KEY, None).await?;
            let created = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .context("watch not created within 30 s")??;
            ensure!(
                created.is_some_and(|r| r.created()),
                "first watch response was not `created`"
            );
            let _ = ready.send(()).await;
            let mut lat = Vec::new();
            while lat.len() < puts && !stop.load(Ordering::Relaxed) {
                let msg = match tokio::time::timeout(Duration::from_millis(200), stream.message())
                    .await
                {
                    Err(_) => continue,
                    Ok(m) => m?,
                };
                let Some(resp) = msg else { break };
                let now = now_nanos();
                for ev in resp.events() {
                    if let Some(sent) = ev.kv().and_then(|kv| stamp(kv.value())) {
                        lat.push(now.saturating_sub(sent));
                    }
                }
            }
            anyhow::Ok(lat)
        });
    }
    drop(ready_tx);
    for n in 0..watchers {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .with_context(|| format!("only {n} of {watchers} watchers were created"))?;
    }

    let mut writer = clients[0].clone();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let began = Instant::now();
    for _ in 0..puts {
        tick.tick().await;
        writer
            .put(KEY, now_nanos().to_string(), None)
            .await
            .context("fan-out writer put")?;
    }
    let written = began.elapsed();
    // Watchers finish once they have every event; late ones get a bounded grace period,
    // and what has not arrived by then counts as not delivered.
    let grace = Instant::now() + Duration::from_secs(5);
    let mut all = Vec::new();
    loop {
        let left = grace.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, set.join_next()).await {
            Ok(Some(r)) => all.extend(r??),
            Ok(None) => break,
            Err(_) => {
                // Each watcher checks the flag at least every 200 ms.
                stop.store(true, Ordering::Relaxed);
                while let Some(r) = set.join_next().await {
                    all.extend(r??);
                }
                break;
            }
        }
    }
    Ok(Sample::from_latencies(all, written))
}

/// The send time a watched value carries.
pub fn stamp(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}
