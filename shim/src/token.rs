//! The pod's service-account token, read from its file and kept current: the kubelet
//! rewrites the file well before the token expires, so the shim re-reads it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::watch;

/// The current `authorization` header value, or why there is none.
#[derive(Clone)]
pub struct TokenSource {
    rx: watch::Receiver<Result<HeaderValue, Arc<str>>>,
}

impl TokenSource {
    /// Reads `path` now, then again every `every` in the background until `stop`.
    pub fn spawn(
        path: PathBuf,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(read(&path));
        log_change(&path, None, &rx.borrow());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => return,
                }
                let next = read(&path);
                tx.send_if_modified(|cur| {
                    let changed = match (&*cur, &next) {
                        (Ok(a), Ok(b)) => a != b,
                        (Err(a), Err(b)) => a != b,
                        _ => true,
                    };
                    if changed {
                        log_change(&path, Some(cur), &next);
                        *cur = next.clone();
                    }
                    changed
                });
            }
        });
        (Self { rx }, task)
    }

    /// A fixed token, for tests and tools.
    pub fn fixed(token: &str) -> Self {
        let (_tx, rx) = watch::channel(header(token).map_err(Arc::from));
        Self { rx }
    }

    pub fn current(&self) -> Result<HeaderValue, Arc<str>> {
        self.rx.borrow().clone()
    }
}

fn read(path: &Path) -> Result<HeaderValue, Arc<str>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Arc::from(format!("cannot read token file {}: {e}", path.display())))?;
    header(text.trim()).map_err(|e| Arc::from(format!("token file {}: {e}", path.display())))
}

fn header(token: &str) -> Result<HeaderValue, String> {
    if token.is_empty() {
        return Err("token is empty".into());
    }
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "token holds characters not allowed in a header".to_string())?;
    // Keeps the value out of debug output and HPACK's dynamic table.
    v.set_sensitive(true);
    Ok(v)
}

fn log_change(
    path: &Path,
    old: Option<&Result<HeaderValue, Arc<str>>>,
    new: &Result<HeaderValue, Arc<str>>,
) {
    match (old, new) {
        (_, Err(e)) => tracing::warn!(error = %e, "no usable token"),
        (Some(Ok(_)), Ok(_)) => tracing::info!(path = %path.display(), "token rotated"),
        (_, Ok(_)) => tracing::info!(path = %path.display(), "token loaded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_and_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let stop = tokio_util::sync::CancellationToken::new();
        let (src, _task) =
            TokenSource::spawn(path.clone(), Duration::from_millis(10), stop.clone());
        assert!(
            src.current()
                .unwrap_err()
                .contains("cannot read token file")
        );

        std::fs::write(&path, "abc\n").unwrap();
        let mut seen = None;
        for _ in 0..500 {
            if let Ok(v) = src.current() {
                seen = Some(v);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let v = seen.expect("token picked up");
        assert_eq!(v.to_str().unwrap(), "Bearer abc");
        assert!(v.is_sensitive());
        stop.cancel();
    }

    #[test]
    fn bad_tokens() {
        assert!(header("").is_err());
        assert!(header("a\nb").is_err());
    }
}
