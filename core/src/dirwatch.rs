//! Change events for files that Kubernetes updates by swapping a `..data` symlink: the
//! file's inode never changes, so its directory is what is watched.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Notify;

/// Watches the directory holding `path` and wakes `changed` on any event there (a re-read
/// is cheap, so events are not sorted out). `None`, with a log line, if that is impossible
/// for now: callers keep a periodic re-read and try again later (the directory may be
/// mounted after start).
pub fn watch_dir(path: &Path, changed: &Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let notify = changed.clone();
    let handler = move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
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
