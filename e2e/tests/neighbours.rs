//! Noisy neighbours: what one tenant does with its own streams must not slow another.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use etcd_client::{Client, WatchOptions};
use etcd_shim_e2e::{Pod, TwoTenants};

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
/// DEADLINE_EXCEEDED for as long as the streams stayed open.
#[test]
fn watches_that_are_never_read_do_not_stall_a_neighbours_calls() -> Result<()> {
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
        Ok(())
    })
}
