//! Noisy neighbours: what one tenant does with its own streams must not slow another.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use etcd_client::{Client, WatchOptions};
use etcd_shim_e2e::{Pod, TwoTenants, http_get, sample, wait_for};

const SHIM: &str = "http://127.0.0.1:2379";

/// 16 MB in puts of 100 KB, each one an event for every watcher.
async fn write_big() -> Result<()> {
    let mut c = Client::connect([SHIM], None).await?;
    let value = vec![b'x'; 100 << 10];
    for i in 0..160 {
        let put = c.put(format!("big/{}", i % 8), value.clone(), None);
        tokio::time::timeout(Duration::from_secs(5), put)
            .await
            .with_context(|| format!("A's put {i}, from its other pod, stalled for 5 s"))??;
    }
    Ok(())
}

/// Found by a security review: a tenant opened a few watch streams, never read them and
/// then wrote large values. What etcd sent for them, read but not forwarded, held the
/// broker's one HTTP/2 connection to etcd, so every other tenant's Range got
/// DEADLINE_EXCEEDED for as long as the streams stayed open. With unary calls on a
/// connection of their own, the streams still held the one that carries everyone's
/// watches.
#[test]
fn watches_that_are_never_read_do_not_stall_a_neighbours_calls_or_watches() -> Result<()> {
    let env = TwoTenants::start()?;
    // A second pod of tenant A writes: the watchers' own pod connection is theirs to
    // stall, as a client's own connection to etcd is.
    let mut writer = Pod::new()?;
    writer.start_shim(env.broker.port, "token-a")?;
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    std::thread::scope(|s| -> Result<()> {
        // Dropped on every way out of this closure, which lets the writer go.
        let _release = stop_tx;
        let a = &env.a;
        s.spawn(move || {
            let done = ready_tx.clone();
            let res = a.run(move || async move {
                let mut c = Client::connect([SHIM], None).await?;
                // Three streams on everything the writes below touch, never read.
                let mut held = Vec::new();
                for _ in 0..3 {
                    let opts = WatchOptions::new().with_prefix();
                    held.push(c.watch("big/", Some(opts)).await?);
                }
                let _ = done.send(Ok(()));
                // Hold the streams, unread, until the neighbour is done.
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                drop(held);
                Ok(())
            });
            if let Err(e) = res {
                let _ = ready_tx.send(Err(e));
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("the watches never opened")??;
        // B watches its own key from before A's streams fill up.
        let (b_tx, b_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let b_pod = &env.b;
        let b_watch = s.spawn(move || {
            b_pod.run(move || async move {
                let mut c = Client::connect([SHIM], None).await?;
                let mut events = c.watch("w", None).await?;
                let created = events.message().await?;
                ensure!(
                    created.is_some_and(|r| r.created()),
                    "B's watch was not created"
                );
                let _ = b_tx.send(Ok(()));
                let _ = tokio::task::spawn_blocking(move || go_rx.recv()).await;
                c.put("w", "1", None).await?;
                let started = Instant::now();
                let got = tokio::time::timeout(Duration::from_secs(3), events.message())
                    .await
                    .context("B's watch event stalled for 3 s")??;
                ensure!(
                    got.is_some_and(|r| !r.events().is_empty()),
                    "B's watch ended"
                );
                Ok(started.elapsed())
            })
        });
        b_rx.recv_timeout(Duration::from_secs(30))
            .context("B's watch never opened")??;
        writer.run(write_big)?;
        // The neighbour, while those streams sit full.
        let worst = env.b.run(|| async {
            let mut c = Client::connect([SHIM], None).await?;
            let mut worst = Duration::ZERO;
            for i in 0..20 {
                let started = Instant::now();
                tokio::time::timeout(Duration::from_secs(3), c.get(format!("k{i}"), None))
                    .await
                    .with_context(|| format!("B's get {i} stalled for 3 s"))??;
                worst = worst.max(started.elapsed());
            }
            Ok(worst)
        });
        let worst = worst?;
        println!("neighbour's slowest get while A's streams were full: {worst:?}");
        ensure!(
            worst < Duration::from_secs(1),
            "B's slowest get took {worst:?}"
        );
        let _ = go_tx.send(());
        let delivered = b_watch.join().expect("B's watcher panicked")?;
        println!("neighbour's watch event while A's streams were full: {delivered:?}");
        ensure!(
            delivered < Duration::from_secs(1),
            "B's watch event took {delivered:?}"
        );
        Ok(())
    })
}

/// A watcher whose client stops reading is ended once it has left its answers untaken
/// for `--slow-client-timeout`: what the broker held for it is dropped, etcd's watch
/// behind it is cancelled, and the client, when it reads again, is told Unavailable (as
/// etcd ends a watcher that cannot keep up) so that it can watch again from where it was.
#[test]
fn a_watcher_that_stops_reading_is_ended_and_its_etcd_watch_cancelled() -> Result<()> {
    let env = TwoTenants::start_with(None, &["--slow-client-timeout", "2s"])?;
    let mut writer = Pod::new()?;
    writer.start_shim(env.broker.port, "token-a")?;
    let etcd_watchers = || -> Result<f64> {
        let addr = env.etcd.url.trim_start_matches("http://");
        let (_, scrape) = http_get(addr, "/metrics")?;
        sample(&scrape, "etcd_debugging_mvcc_watcher_total").context("etcd's watcher gauge")
    };
    let broker_sample = |series: &str| -> Result<f64> {
        sample(&env.broker.metrics()?, series).with_context(|| format!("no {series}"))
    };
    let before = etcd_watchers()?;
    let (read_tx, read_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    std::thread::scope(|s| -> Result<()> {
        let _release = read_tx;
        let a = &env.a;
        let watcher = s.spawn(move || {
            a.run(move || async move {
                let mut c = Client::connect([SHIM], None).await?;
                let opts = WatchOptions::new().with_prefix();
                let mut events = c.watch("big/", Some(opts)).await?;
                let _ = ready_tx.send(Ok(()));
                let _ = tokio::task::spawn_blocking(move || read_rx.recv()).await;
                // Reading again: what was already on its way, then the end.
                let mut got = 0;
                loop {
                    let next = tokio::time::timeout(Duration::from_secs(10), events.message())
                        .await
                        .context("the ended watch neither delivered nor ended in 10 s")?;
                    match next {
                        Ok(Some(_)) => got += 1,
                        Ok(None) => anyhow::bail!("the watch ended with no status after {got}"),
                        Err(etcd_client::Error::GRpcStatus(st)) => return Ok((got, st)),
                        Err(e) => return Err(e.into()),
                    }
                }
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("the watch never opened")??;
        wait_for("etcd to show A's watch", Duration::from_secs(10), || {
            (etcd_watchers().ok()? > before).then_some(())
        })?;
        writer.run(write_big)?;
        wait_for(
            "the broker to end the unread stream",
            Duration::from_secs(30),
            || {
                let ended = broker_sample("etcd_broker_slow_client_streams_ended_total").ok()?;
                let open = broker_sample("etcd_broker_watch_streams_open").ok()?;
                (ended >= 1.0 && open == 0.0).then_some(())
            },
        )?;
        wait_for(
            "etcd to cancel the watch behind it",
            Duration::from_secs(10),
            || (etcd_watchers().ok()? <= before).then_some(()),
        )?;
        drop(_release);
        let (got, status) = watcher.join().expect("watcher panicked")?;
        println!("the slow watcher got {got} responses, then {status:?}");
        ensure!(
            status.code() == tonic::Code::Unavailable,
            "the slow watcher was told {status:?}"
        );
        ensure!(
            status.message() == "etcd-shim: watcher too slow to keep up",
            "the slow watcher was told {:?}",
            status.message()
        );
        Ok(())
    })
}

/// Peak resident memory of a process, in MiB.
fn peak_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    Ok(kib / 1024.0)
}

/// Found by a security review: Status for a tenant without a quota measured its data in
/// pages of 1,000 values, so a tenant of large values made the broker hold hundreds of
/// MiB for one page. Pages are now bounded in bytes.
#[test]
fn status_of_a_tenant_of_large_values_costs_the_broker_little_memory() -> Result<()> {
    let env = TwoTenants::start()?;
    const VALUES: usize = 150;
    env.a.run(|| async {
        let mut c = Client::connect([SHIM], None).await?;
        let value = vec![b'v'; 1 << 20];
        for i in 0..VALUES {
            c.put(format!("large/{i:04}"), value.clone(), None).await?;
        }
        Ok(())
    })?;
    let before = peak_mib(env.broker.proc.pid())?;
    let db_size = env.a.run(|| async {
        let mut c = Client::connect([SHIM], None).await?;
        Ok(c.status().await?.db_size())
    })?;
    let after = peak_mib(env.broker.proc.pid())?;
    println!("broker peak memory {before:.1} MiB before Status, {after:.1} MiB after");
    // The tenant's own size still comes out right.
    ensure!(
        db_size >= (VALUES << 20) as i64,
        "Status reported {db_size} bytes for {VALUES} MiB of values"
    );
    ensure!(
        after - before < 48.0,
        "Status made the broker's peak memory grow from {before:.1} to {after:.1} MiB"
    );
    Ok(())
}
