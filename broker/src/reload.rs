//! Follows a file that is replaced while the broker runs (a mounted ConfigMap or Secret).
//!
//! Kubernetes updates such volumes by swapping a `..data` symlink in the file's directory,
//! never by writing the file in place, so the directory is watched rather than the file.
//! Change events are only a hint: a periodic re-read catches what a file system does not
//! report, and the content is compared so that nothing is reloaded when nothing changed.

use std::path::PathBuf;
use std::time::Duration;

use etcd_shim_core::dirwatch::DirWatch;
use tokio_util::sync::CancellationToken;

/// Calls `on_change` with the file's new content (or why it cannot be read) each time it
/// differs from what was seen last, until `stop`. The first call is for the content at
/// start-up only if it differs from `initial`, the bytes the caller already loaded.
pub fn spawn<F>(
    path: PathBuf,
    every: Duration,
    initial: Option<Vec<u8>>,
    stop: CancellationToken,
    mut on_change: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut(Result<Vec<u8>, std::io::Error>) + Send + 'static,
{
    // Watch before the first comparison, so that a swap between the two is not missed.
    let mut watch = DirWatch::new(&path);
    tokio::spawn(async move {
        // What was last reported: the content, or the text of the read error (reported
        // once, not on every tick while the file stays missing).
        let mut last: Result<Vec<u8>, String> = initial.ok_or_else(String::new);
        loop {
            let next = std::fs::read(&path);
            let same = match (&last, &next) {
                (Ok(a), Ok(b)) => a == b,
                (Err(a), Err(b)) => *a == b.to_string(),
                _ => false,
            };
            if !same {
                last = match &next {
                    Ok(b) => Ok(b.clone()),
                    Err(e) => Err(e.to_string()),
                };
                on_change(next);
            }
            tokio::select! {
                changed = watch.wait(every) => if changed {
                    // A swap comes as a burst of events; let it finish before reading.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                },
                _ = stop.cancelled() => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn reports_changes_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = CancellationToken::new();
        let s = seen.clone();
        // The period is long: only the directory watch can report the write in time.
        let _task = spawn(
            path.clone(),
            Duration::from_secs(3600),
            Some(b"one".to_vec()),
            stop.clone(),
            move |r| {
                s.lock().unwrap().push(match r {
                    Ok(b) => String::from_utf8(b).unwrap(),
                    Err(_) => "error".into(),
                })
            },
        );
        std::fs::write(&path, "two").unwrap();
        let mut ok = false;
        for _ in 0..500 {
            if seen.lock().unwrap().as_slice() == ["two"] {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ok, "saw {:?}", seen.lock().unwrap());
        stop.cancel();
    }
}
