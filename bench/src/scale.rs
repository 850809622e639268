//! Broker scale: many shims on one broker, each with one watch and a trickle of writes.
//!
//! Each shim is simulated by what the broker sees of it: one HTTP/2 connection with its
//! own bearer token, speaking the same etcd gRPC (a Watch stream and KV/Put calls) that a
//! shim forwards. A thousand real shim processes would measure the machine more than the
//! broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use etcd_client::WatchOptions;
use etcd_client::proto::{PbPutRequest, PbPutResponse, PbWatchRequest, PbWatchResponse};
use etcd_shim_e2e::Broker;
use http::uri::PathAndQuery;
use rand::Rng;
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::client::Grpc;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

use crate::load::{now_nanos, stamp};
use crate::stack::QUIET;
use crate::stats::percentile;
use crate::usage;

#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    pub shims: usize,
    pub broker_idle_rss_kib: u64,
    pub broker_rss_kib: u64,
    pub rss_per_shim_kib: f64,
    /// CPU the broker used per shim, in thousandths of a core.
    pub cpu_millicores_per_shim: f64,
    pub broker_cpu_cores: f64,
    pub deliveries: u64,
    pub expected: u64,
    /// Writes the broker answered with an error (e.g. etcd timing out under load).
    pub failed_writes: u64,
    pub watch_p50_ms: f64,
    pub watch_p99_ms: f64,
}

/// Starts a fresh broker for `shims` tenants, connects them, and measures for `window`
/// while each writes its own key every `trickle` and watches it.
pub async fn run(
    etcd_url: &str,
    shims: usize,
    trickle: Duration,
    window: Duration,
) -> Result<ScaleResult> {
    let tokens: Vec<(String, String)> = (0..shims)
        .map(|i| (format!("scale-token-{i}"), format!("scale-{i}/default")))
        .collect();
    let url = etcd_url.to_owned();
    let owned = tokens.clone();
    let mut broker = tokio::task::spawn_blocking(move || {
        let refs: Vec<(&str, &str)> = owned
            .iter()
            .map(|(t, w)| (t.as_str(), w.as_str()))
            .collect();
        Broker::start_with(&[&url], &refs, QUIET)
    })
    .await??;
    let pid = broker.proc.pid();
    // Let start-up allocations settle before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = usage::rss(pid)?.now_kib;
    let target = format!("http://127.0.0.1:{}", broker.port);

    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(shims.max(1));
    let mut set = JoinSet::new();
    // Connect in waves so the broker sees a ramp, not a thundering herd.
    let gate = Arc::new(tokio::sync::Semaphore::new(50));
    for (i, (token, _)) in tokens.iter().enumerate() {
        let (target, token, stop, ready, gate) = (
            target.clone(),
            token.clone(),
            stop.clone(),
            ready_tx.clone(),
            gate.clone(),
        );
        set.spawn(async move {
            let permit = gate.acquire_owned().await?;
            let shim = SimShim::connect(&target, &token).await?;
            let (mut events, _requests) = shim.watch(format!("w/{i}")).await?;
            drop(permit);
            let _ = ready.send(()).await;
            // Writes and deliveries run side by side; deliveries are matched by stamp.
            let writer = {
                let shim = shim.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let first = rand::rng().random_range(0..trickle.as_millis().max(1) as u64);
                    tokio::time::sleep(Duration::from_millis(first)).await;
                    let mut tick = tokio::time::interval(trickle);
                    let (mut sent, mut failed) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        // A failed write is a result (the broker or etcd is overloaded),
                        // not a reason to stop measuring.
                        match shim.put(format!("w/{i}"), now_nanos().to_string()).await {
                            Ok(()) => sent += 1,
                            Err(_) => failed += 1,
                        }
                    }
                    anyhow::Ok((sent, failed))
                })
            };
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let msg = match tokio::time::timeout(Duration::from_millis(200), events.message())
                    .await
                {
                    Err(_) => continue,
                    Ok(m) => m,
                };
                let Ok(Some(resp)) = msg else { break };
                let now = now_nanos();
                for ev in resp.events {
                    if let Some(sent) = ev.kv.and_then(|kv| stamp(&kv.value)) {
                        lat.push(now.saturating_sub(sent));
                    }
                }
            }
            let (sent, failed) = writer.await??;
            anyhow::Ok((sent, failed, lat))
        });
    }
    drop(ready_tx);
    for n in 0..shims {
        tokio::time::timeout(Duration::from_secs(120), ready_rx.recv())
            .await
            .ok()
            .flatten()
            .ok_or_else(|| anyhow!("only {n} of {shims} simulated shims connected and watched"))?;
    }
    // Measure in steady state: after every shim is connected and its first write is due.
    tokio::time::sleep(trickle).await;
    let cpu0 = usage::cpu_seconds(pid)?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let cpu = usage::cpu_seconds(pid)? - cpu0;
    let elapsed = t0.elapsed().as_secs_f64();
    let rss = usage::rss(pid)?.now_kib;
    stop.store(true, Ordering::Relaxed);
    let (mut sent, mut failed, mut lat) = (0u64, 0u64, Vec::new());
    while let Some(r) = set.join_next().await {
        let (s, f, l) = r??;
        sent += s;
        failed += f;
        lat.extend(l);
    }
    ensure!(
        broker.proc.is_running(),
        "broker exited: {}",
        broker.proc.log()
    );
    broker.proc.stop();
    lat.sort_unstable();
    let cores = cpu / elapsed;
    Ok(ScaleResult {
        shims,
        broker_idle_rss_kib: idle,
        broker_rss_kib: rss,
        rss_per_shim_kib: rss.saturating_sub(idle) as f64 / shims as f64,
        cpu_millicores_per_shim: cores * 1000.0 / shims as f64,
        broker_cpu_cores: cores,
        deliveries: lat.len() as u64,
        expected: sent,
        failed_writes: failed,
        watch_p50_ms: percentile(&lat, 0.50) as f64 / 1e6,
        watch_p99_ms: percentile(&lat, 0.99) as f64 / 1e6,
    })
}

/// One shim as the broker sees it: an HTTP/2 connection carrying its bearer token.
#[derive(Clone)]
struct SimShim {
    grpc: Grpc<Channel>,
    auth: MetadataValue<tonic::metadata::Ascii>,
}

type Requests = tokio::sync::mpsc::Sender<PbWatchRequest>;

impl SimShim {
    async fn connect(url: &str, token: &str) -> Result<Self> {
        let channel = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .with_context(|| format!("connecting to the broker at {url}"))?;
        Ok(Self {
            grpc: Grpc::new(channel),
            auth: format!("Bearer {token}").parse()?,
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("authorization", self.auth.clone());
        req
    }

    async fn put(&self, key: String, value: String) -> Result<()> {
        let mut grpc = self.grpc.clone();
        grpc.ready().await?;
        let req = self.request(PbPutRequest {
            key: key.into_bytes(),
            value: value.into_bytes(),
            ..Default::default()
        });
        let _: tonic::Response<PbPutResponse> = grpc
            .unary(
                req,
                PathAndQuery::from_static("/etcdserverpb.KV/Put"),
                ProstCodec::default(),
            )
            .await?;
        Ok(())
    }

    /// Opens a Watch stream on `key` and waits for it to be created. The request sender is
    /// returned so the stream stays open.
    async fn watch(&self, key: String) -> Result<(tonic::Streaming<PbWatchResponse>, Requests)> {
        let (tx, rx) = tokio::sync::mpsc::channel::<PbWatchRequest>(4);
        tx.send(WatchOptions::new().with_key(key).into()).await?;
        let mut grpc = self.grpc.clone();
        grpc.ready().await?;
        let req = self.request(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut stream = grpc
            .streaming(
                req,
                PathAndQuery::from_static("/etcdserverpb.Watch/Watch"),
                ProstCodec::default(),
            )
            .await?
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .context("watch not created within 30 s")??;
        ensure!(
            first.is_some_and(|r: PbWatchResponse| r.created),
            "first watch response was not `created`"
        );
        Ok((stream, tx))
    }
}
