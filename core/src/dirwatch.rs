//! Change events for files that Kubernetes updates by swapping a `..data` symlink: the
//! file's inode never changes, so its directory is what is watched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// Whether `event` may mean a file changed. Opening, reading and closing a file without
/// writing it produce events too, and the watcher's owner causes those itself with every
/// re-read: reacting to them would re-read in a loop.
pub fn is_change(event: &notify::Event) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match event.kind {
        EventKind::Access(kind) => kind == AccessKind::Close(AccessMode::Write),
        _ => true,
    }
}

/// Watches the directory holding `path` and wakes `changed` on every change there (any
/// change: a re-read is cheap, so which file changed is not sorted out). `None`, with a
/// log line, if that is impossible for now: callers keep a periodic re-read and try again
/// later (the directory may be mounted after start).
fn watch_dir(path: &Path, changed: &Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let notify = changed.clone();
    let handler = move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|e| is_change(&e)) {
            notify.notify_one();
        }
    };
    let mut w = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files; re-reading periodically");
            return None;
        }
    };
    match w.watch(&dir, notify::RecursiveMode::NonRecursive) {
        Ok(()) => Some(w),
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "directory not watchable yet");
            None
        }
    }
}

/// A watch on a file's directory that re-arms itself: the directory may not exist yet
/// when the watch starts (a volume mounted late), so every wait tries again.
pub struct DirWatch {
    path: PathBuf,
    changed: Arc<Notify>,
    /// Kept alive while watching: dropping it stops the watch.
    watcher: Option<notify::RecommendedWatcher>,
}

impl DirWatch {
    /// Starts watching the directory of `path`, if it can be watched now.
    pub fn new(path: &Path) -> Self {
        let changed = Arc::new(Notify::new());
        let watcher = watch_dir(path, &changed);
        Self {
            path: path.to_owned(),
            changed,
            watcher,
        }
    }

    /// Waits for a change in the directory or for `timeout`, whichever comes first;
    /// true on a change.
    pub async fn wait(&mut self, timeout: Duration) -> bool {
        let changed = tokio::select! {
            _ = tokio::time::sleep(timeout) => false,
            _ = self.changed.notified() => true,
        };
        if self.watcher.is_none() {
            self.watcher = watch_dir(&self.path, &self.changed);
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_do_not_wake_and_writes_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "one").unwrap();
        let changed = Arc::new(Notify::new());
        let _watcher = watch_dir(&path, &changed).expect("a temporary directory is watchable");

        // What a reloader does on every wake-up: read the file (open, read, close).
        for _ in 0..20 {
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "one");
        }
        let woke = tokio::time::timeout(Duration::from_millis(500), changed.notified()).await;
        assert!(woke.is_err(), "reading the file must not count as a change");

        // A swap by rename, as Kubernetes volumes and editors do.
        let tmp = dir.path().join("token.tmp");
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(Duration::from_secs(10), changed.notified())
            .await
            .expect("a replaced file wakes the watcher");
    }
}
