//! The pod's service-account token, read from its file and kept current: the kubelet
//! rewrites the file well before the token expires, so the shim re-reads it.
//!
//! The kubelet publishes a projected token by writing a new timestamped directory and
//! swapping the `..data` symlink beside the token file atomically; the file itself is
//! never modified in place. So the shim watches the token file's *directory*, re-reads
//! on any event there, and keeps a periodic re-read (and one just before the token's own
//! expiry) for file systems where change events never arrive.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use etcd_shim_core::follow::{Follow, Outcome, ReadError};
use etcd_shim_core::token::unverified_exp;
use http::HeaderValue;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// How long before the token's `exp` the shim re-reads the file anyway: the kubelet
/// rotates at 80% of the lifetime, so a fresh token is normally there by then.
const REFRESH_BEFORE_EXP: Duration = Duration::from_secs(60);
/// Shortest wait between two timed re-reads, so an expired token cannot spin the loop.
const MIN_WAIT: Duration = Duration::from_secs(1);

/// The current `authorization` header value, or why there is none.
#[derive(Clone)]
pub struct TokenSource {
    rx: watch::Receiver<Arc<Loaded>>,
}

/// What one read of the token file gave. A token that is missing or unusable is news
/// too (the shim is not ready without one), so it is published like a good one.
struct Loaded {
    header: Result<HeaderValue, Arc<str>>,
    /// The token's unverified `exp`, to schedule a re-read before it.
    expires: Option<SystemTime>,
}

impl TokenSource {
    /// Reads `path` now, then again whenever its directory changes, every `every`, and
    /// shortly before the token expires, until `stop` or until every clone of the source
    /// is dropped. Reloads and the expiry of the token in use go to `metrics`.
    pub fn spawn(
        path: PathBuf,
        every: Duration,
        metrics: Option<Arc<Metrics>>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        let report = move |changed: bool, next: &Loaded| {
            if let Some(m) = &metrics {
                m.token_read(changed, next.header.is_ok(), next.expires);
            }
        };
        // Whether the token in force is usable, to tell a rotation from a first load.
        let usable = Arc::new(AtomicBool::new(false));
        let on_outcome = {
            let (path, usable, report) = (path.clone(), usable.clone(), report.clone());
            move |outcome: Outcome<'_, Loaded, Infallible>| {
                if let Outcome::Published(next) = outcome {
                    let was_usable = usable.swap(next.header.is_ok(), Ordering::Relaxed);
                    log_change(&path, Some(was_usable), &next.header);
                    report(true, next);
                }
            }
        };
        let shown = path.clone();
        let unreadable = move |e: &ReadError| {
            let why = match e {
                ReadError::Io { error, .. } => error.to_string(),
                e => e.to_string(),
            };
            Loaded {
                header: Err(Arc::from(format!(
                    "cannot read token file {}: {why}",
                    shown.display()
                ))),
                expires: None,
            }
        };
        let parse = {
            let path = path.clone();
            move |contents: &[Vec<u8>]| Ok(parse(&path, &contents[0]))
        };
        let rx = Follow::new([&path], parse)
            .every(every)
            .on_unreadable(unreadable)
            .next_read(move |t: &Loaded| next_wait(every, t.expires, SystemTime::now()))
            .on_outcome(on_outcome)
            .start(stop)
            .expect("an unreadable file gives a value and parsing cannot fail");
        let first = rx.borrow().clone();
        usable.store(first.header.is_ok(), Ordering::Relaxed);
        log_change(&path, None, &first.header);
        report(false, &first);
        Self { rx }
    }

    /// A fixed token, for tests and tools.
    pub fn fixed(token: &str) -> Self {
        let (_tx, rx) = watch::channel(Arc::new(Loaded {
            header: header(token).map_err(Arc::from),
            expires: None,
        }));
        Self { rx }
    }

    pub fn current(&self) -> Result<HeaderValue, Arc<str>> {
        self.rx.borrow().header.clone()
    }
}

/// How long to sleep before the next timed re-read.
fn next_wait(every: Duration, expires: Option<SystemTime>, now: SystemTime) -> Duration {
    let before_exp = expires
        .and_then(|e| e.checked_sub(REFRESH_BEFORE_EXP))
        .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO));
    match before_exp {
        Some(d) => d.clamp(MIN_WAIT, every.max(MIN_WAIT)),
        None => every,
    }
}

fn parse(path: &Path, contents: &[u8]) -> Loaded {
    let Ok(text) = std::str::from_utf8(contents) else {
        return Loaded {
            header: Err(Arc::from(format!(
                "token file {}: not UTF-8",
                path.display()
            ))),
            expires: None,
        };
    };
    let token = text.trim();
    Loaded {
        header: header(token).map_err(|e| Arc::from(format!("token file {}: {e}", path.display()))),
        expires: unverified_exp(token),
    }
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

/// Logs a new token state; `was_usable` is `None` for the first load.
fn log_change(path: &Path, was_usable: Option<bool>, new: &Result<HeaderValue, Arc<str>>) {
    match (was_usable, new) {
        (_, Err(e)) => tracing::warn!(error = %e, "no usable token"),
        (Some(true), Ok(_)) => tracing::info!(path = %path.display(), "token rotated"),
        (_, Ok(_)) => tracing::info!(path = %path.display(), "token loaded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use std::time::UNIX_EPOCH;

    /// Polls until `src` holds `want` (as a bearer header), for at most 5 s.
    async fn wait_for(src: &TokenSource, want: &str) -> bool {
        let want = format!("Bearer {want}");
        for _ in 0..500 {
            if src
                .current()
                .is_ok_and(|v| v.to_str().is_ok_and(|s| s == want))
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn jwt_with_exp(exp: u64) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(&format!(r#"{{"aud":["etcd-shim"],"exp":{exp}}}"#))
        )
    }

    /// The value of `series` in the shim's metrics text, 0 if absent.
    fn sample(registry: &prometheus_client::registry::Registry, series: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    #[tokio::test]
    async fn reads_and_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let stop = tokio_util::sync::CancellationToken::new();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut registry);
        let src = TokenSource::spawn(
            path.clone(),
            Duration::from_millis(10),
            Some(metrics),
            stop.clone(),
        );
        assert!(
            src.current()
                .unwrap_err()
                .contains("cannot read token file")
        );

        std::fs::write(&path, "abc\n").unwrap();
        assert!(wait_for(&src, "abc").await, "token picked up");
        assert!(src.current().unwrap().is_sensitive());
        let reloads = |outcome: &str| {
            sample(
                &registry,
                &format!("etcd_shim_token_reloads_total{{outcome=\"{outcome}\"}}"),
            )
        };
        assert_eq!(reloads("success"), 1.0);
        let expiry = || sample(&registry, "etcd_shim_token_expiry_timestamp_seconds");
        assert_eq!(expiry(), 0.0, "no exp claim, no expiry");

        let jwt = jwt_with_exp(2_000_000_000);
        std::fs::write(&path, &jwt).unwrap();
        assert!(wait_for(&src, &jwt).await, "rotated token picked up");
        assert_eq!(reloads("success"), 2.0);
        assert_eq!(expiry(), 2_000_000_000.0);

        // Removing the file makes the shim not ready again, with a reason; no crash.
        std::fs::remove_file(&path).unwrap();
        let mut gone = false;
        for _ in 0..500 {
            if src.current().is_err() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone, "missing token reported");
        assert_eq!(reloads("failure"), 1.0);
        assert_eq!(expiry(), 0.0, "no token, no expiry");
        stop.cancel();
    }

    /// Lays out a projected volume as the kubelet does: `..<ts>/token`, `..data -> ..<ts>`,
    /// `token -> ..data/token`.
    fn publish(dir: &Path, generation: &str, token: &str) {
        let ts = dir.join(format!("..{generation}"));
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("token"), token).unwrap();
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..{generation}"), &tmp).unwrap();
        // rename(2) over the old link is the atomic swap the kubelet relies on.
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        let link = dir.join("token");
        if !link.exists() {
            std::os::unix::fs::symlink("..data/token", &link).unwrap();
        }
    }

    #[tokio::test]
    async fn follows_an_atomic_data_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), "2025_01_01_00_00_00.1", "first");
        let stop = tokio_util::sync::CancellationToken::new();
        // The periodic re-read is an hour away: only the directory watch can see the swap.
        let src = TokenSource::spawn(
            dir.path().join("token"),
            Duration::from_secs(3600),
            None,
            stop.clone(),
        );
        assert!(wait_for(&src, "first").await);

        publish(dir.path(), "2025_01_01_00_48_00.2", "second");
        assert!(wait_for(&src, "second").await, "rotation picked up");
        stop.cancel();
    }

    #[test]
    fn exp_schedules_an_early_reread() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(r#"{"aud":["etcd-shim"],"exp":2000000000}"#)
        );
        let exp = unverified_exp(&token).unwrap();
        assert_eq!(exp, UNIX_EPOCH + Duration::from_secs(2_000_000_000));
        assert_eq!(unverified_exp("not-a-jwt"), None);
        assert_eq!(unverified_exp("a.!!!.c"), None);

        let every = Duration::from_secs(300);
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        // Far from expiry: the period wins.
        let far = now + Duration::from_secs(3600);
        assert_eq!(next_wait(every, Some(far), now), every);
        // Near expiry: wake up a minute before exp.
        let near = now + Duration::from_secs(100);
        assert_eq!(next_wait(every, Some(near), now), Duration::from_secs(40));
        // Already expired: retry, but not in a busy loop.
        assert_eq!(next_wait(every, Some(now), now), MIN_WAIT);
        assert_eq!(next_wait(every, None, now), every);
    }

    #[test]
    fn bad_tokens() {
        assert!(header("").is_err());
        assert!(header("a\nb").is_err());
    }
}
