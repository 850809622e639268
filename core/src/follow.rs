//! One way to follow files that change while a process runs: certificates, keys and CA
//! bundles, the broker's config, issuer keys, the pod's token.
//!
//! Kubernetes updates a mounted Secret, ConfigMap or projected volume by writing a new
//! versioned directory and swapping a `..data` symlink beside the files; the files' inodes
//! never change. So the files' directories are watched, not the files. Change events are
//! only a hint: a burst of them is waited out briefly and read once, and a periodic re-read
//! catches what a file system does not report. The contents are compared with what was
//! last seen, so nothing is parsed or published again when nothing changed.
//!
//! Contents are parsed before they are published: a value on the channel has always passed
//! its parser, and broken contents (a missing file, bad PEM, a refused config) leave the
//! previous value in force, with one log line per distinct error.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Level;

/// Why the files could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the files kept changing while being read")]
    Unstable,
}

/// Why following could not start: the files as they are now are unusable.
#[derive(Debug, thiserror::Error)]
pub enum StartError<E> {
    #[error(transparent)]
    Read(ReadError),
    #[error("{0}")]
    Parse(E),
}

/// What one re-read found, for users that count reloads or log them.
#[derive(Debug)]
pub enum Outcome<'a, T, E> {
    /// New contents parsed, and their value is now the current one.
    Published(&'a Arc<T>),
    /// New contents did not parse; the previous value stays.
    Rejected(&'a E),
    /// The files could not be read; the previous value stays.
    Unreadable(&'a ReadError),
    /// Nothing new. Also reported after every timed re-read, so a user can check
    /// something that changes with time alone, such as a certificate's expiry.
    Unchanged,
}

type Parse<T, E> = Box<dyn FnMut(&[Vec<u8>]) -> Result<T, E> + Send>;
type Unreadable<T> = Box<dyn FnMut(&ReadError) -> T + Send>;
type NextRead<T> = Box<dyn Fn(&T) -> Duration + Send>;
type OnOutcome<T, E> = Box<dyn FnMut(Outcome<'_, T, E>) + Send>;

/// How to follow a set of files: which ones, how to turn their contents into a value, and
/// how eagerly to look. [`Follow::start`] loads them once and then keeps the value current.
pub struct Follow<T, E> {
    paths: Vec<PathBuf>,
    parse: Parse<T, E>,
    every: Duration,
    debounce: Duration,
    watch: bool,
    refusal: (Level, Cow<'static, str>),
    unreadable: Option<Unreadable<T>>,
    next_read: Option<NextRead<T>>,
    on_outcome: Option<OnOutcome<T, E>>,
}

impl<T, E> fmt::Debug for Follow<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follow")
            .field("paths", &self.paths)
            .field("every", &self.every)
            .field("debounce", &self.debounce)
            .field("watch", &self.watch)
            .finish_non_exhaustive()
    }
}

impl<T, E> Follow<T, E>
where
    T: Send + Sync + 'static,
    E: fmt::Display + Send + 'static,
{
    /// Follows `paths`, read together and handed to `parse` in the same order. By default
    /// the files are re-read every minute and on every change event in their directories.
    pub fn new<P: Into<PathBuf>>(
        paths: impl IntoIterator<Item = P>,
        parse: impl FnMut(&[Vec<u8>]) -> Result<T, E> + Send + 'static,
    ) -> Self {
        Self {
            paths: paths.into_iter().map(Into::into).collect(),
            parse: Box::new(parse),
            every: Duration::from_secs(60),
            debounce: Duration::from_millis(20),
            watch: true,
            refusal: (
                Level::WARN,
                Cow::Borrowed("cannot use the new contents; keeping the previous ones"),
            ),
            unreadable: None,
            next_read: None,
            on_outcome: None,
        }
    }

    /// Re-reads this often even without change events (file systems that send none,
    /// missed events).
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Quiet time after a change event before the files are read, so that one update
    /// (several events) is read once.
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Whether to watch the files' directories; off means timed re-reads only.
    pub fn watch(mut self, on: bool) -> Self {
        self.watch = on;
        self
    }

    /// The log line (and its level) for contents that are refused, written once per
    /// distinct error with the file and the error as fields.
    pub fn refusal(mut self, level: Level, message: impl Into<Cow<'static, str>>) -> Self {
        self.refusal = (level, message.into());
        self
    }

    /// What to publish when the files cannot be read, for users to whom a missing file is
    /// news (the shim is not ready without its token). Without it, unreadable files leave
    /// the previous value in force, and are an error at start.
    pub fn on_unreadable(mut self, f: impl FnMut(&ReadError) -> T + Send + 'static) -> Self {
        self.unreadable = Some(Box::new(f));
        self
    }

    /// How long to wait for the next timed re-read, given the current value; for values
    /// that say when they go stale (a token's expiry). Without it, [`Follow::every`].
    pub fn next_read(mut self, f: impl Fn(&T) -> Duration + Send + 'static) -> Self {
        self.next_read = Some(Box::new(f));
        self
    }

    /// Called after every re-read with what it found. Not called for the first load,
    /// which [`Follow::start`] returns.
    pub fn on_outcome(mut self, f: impl FnMut(Outcome<'_, T, E>) + Send + 'static) -> Self {
        self.on_outcome = Some(Box::new(f));
        self
    }

    /// Reads and parses the files now, failing if that does not give a value (start-up
    /// refuses broken files), then keeps the value current in a background task until
    /// `stop` is cancelled or every receiver is dropped. Must be called within a Tokio
    /// runtime.
    pub fn start(
        mut self,
        stop: CancellationToken,
    ) -> Result<watch::Receiver<Arc<T>>, StartError<E>> {
        // Watch before the first read, so that a swap between the two is not missed.
        let (events_tx, events) = mpsc::channel(1);
        let watcher = if self.watch {
            DirWatcher::new(&self.paths, events_tx)
        } else {
            None
        };
        let mut seen = Seen::default();
        let first = match read_together(&self.paths) {
            Ok(contents) => {
                seen.contents = Some(fingerprint(&contents));
                (self.parse)(&contents).map_err(StartError::Parse)?
            }
            Err(e) => match &mut self.unreadable {
                Some(f) => {
                    seen.error = Some(e.to_string());
                    f(&e)
                }
                None => return Err(StartError::Read(e)),
            },
        };
        let (tx, rx) = watch::channel(Arc::new(first));
        tokio::spawn(self.run(tx, events, watcher, seen, stop));
        Ok(rx)
    }

    async fn run(
        mut self,
        tx: watch::Sender<Arc<T>>,
        mut events: mpsc::Receiver<()>,
        // Kept alive for as long as the task runs; dropping it stops the watch.
        mut watcher: Option<DirWatcher>,
        mut seen: Seen,
        stop: CancellationToken,
    ) {
        loop {
            let wait = match &self.next_read {
                Some(f) => f(&tx.borrow()),
                None => self.every,
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(wait) => {}
                Some(()) = events.recv() => {
                    // A fixed wait (not "until quiet") stays bounded even when something
                    // else in the directory changes all the time.
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(self.debounce) => {}
                    }
                    while events.try_recv().is_ok() {}
                }
            }
            if let Some(w) = &mut watcher {
                w.rearm();
            }
            self.check(&tx, &mut seen);
        }
    }

    /// Reads the files once and publishes what is new and good.
    fn check(&mut self, tx: &watch::Sender<Arc<T>>, seen: &mut Seen) {
        let contents = match read_together(&self.paths) {
            Ok(contents) => contents,
            Err(e) => {
                let text = e.to_string();
                if seen.error.as_ref() == Some(&text) {
                    return report(&mut self.on_outcome, Outcome::Unchanged);
                }
                seen.error = Some(text);
                match &mut self.unreadable {
                    Some(f) => {
                        let value = Arc::new(f(&e));
                        // Whatever the files hold when they come back is news.
                        seen.contents = None;
                        tx.send_replace(value.clone());
                        report(&mut self.on_outcome, Outcome::Published(&value));
                    }
                    None => {
                        self.log_refusal(&e);
                        report(&mut self.on_outcome, Outcome::Unreadable(&e));
                    }
                }
                return;
            }
        };
        let fp = fingerprint(&contents);
        if seen.contents == Some(fp) {
            tracing::trace!(path = %self.shown().display(), "unchanged");
            seen.error = None;
            return report(&mut self.on_outcome, Outcome::Unchanged);
        }
        seen.contents = Some(fp);
        match (self.parse)(&contents) {
            Ok(value) => {
                seen.error = None;
                let value = Arc::new(value);
                tx.send_replace(value.clone());
                report(&mut self.on_outcome, Outcome::Published(&value));
            }
            Err(e) => {
                let text = e.to_string();
                if seen.error.as_ref() != Some(&text) {
                    self.log_refusal(&e);
                }
                seen.error = Some(text);
                report(&mut self.on_outcome, Outcome::Rejected(&e));
            }
        }
    }

    fn log_refusal(&self, error: &dyn fmt::Display) {
        let path = self.shown();
        let (level, message) = &self.refusal;
        match *level {
            Level::ERROR => {
                tracing::error!(path = %path.display(), error = %error, "{message}")
            }
            Level::WARN => tracing::warn!(path = %path.display(), error = %error, "{message}"),
            _ => tracing::info!(path = %path.display(), error = %error, "{message}"),
        }
    }

    /// The file log lines name: the first one.
    fn shown(&self) -> &Path {
        self.paths.first().map_or(Path::new(""), PathBuf::as_path)
    }
}

fn report<T, E>(hook: &mut Option<OnOutcome<T, E>>, outcome: Outcome<'_, T, E>) {
    if let Some(f) = hook {
        f(outcome);
    }
}

/// What the follower last saw, so that it acts on news only.
#[derive(Default)]
struct Seen {
    /// Fingerprint of the contents last parsed, good or bad: unchanged files are neither
    /// parsed nor reported again on every re-read. A fingerprint rather than the bytes,
    /// so that no extra copy of a private key is kept around.
    contents: Option<u64>,
    /// The error last reported, so that a file that stays broken is logged once.
    error: Option<String>,
}

fn fingerprint(contents: &[Vec<u8>]) -> u64 {
    let mut h = DefaultHasher::new();
    contents.hash(&mut h);
    h.finish()
}

/// Reads every file in `paths`. Several files are read until two passes agree: a
/// certificate and its key are separate files, so a read that straddles an update could
/// pair an old certificate with a new key; the symlink swap is atomic, so two identical
/// passes mean one consistent version.
pub fn read_together(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, ReadError> {
    let read = || {
        paths
            .iter()
            .map(|path| {
                std::fs::read(path).map_err(|error| ReadError::Io {
                    path: path.clone(),
                    error,
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let mut previous = read()?;
    if paths.len() < 2 {
        return Ok(previous);
    }
    for _ in 0..5 {
        let current = read()?;
        if current == previous {
            return Ok(current);
        }
        previous = current;
    }
    Err(ReadError::Unstable)
}

/// Whether `event` may mean a file changed. Opening, reading and closing a file without
/// writing it produce events too, and the follower causes those itself with every re-read:
/// reacting to them would re-read in a loop.
fn is_change(event: &notify::Event) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match event.kind {
        EventKind::Access(kind) => kind == AccessKind::Close(AccessMode::Write),
        _ => true,
    }
}

/// A watch on the files' directories that re-arms itself: a directory may not exist yet
/// when following starts (a volume mounted late), so every wake-up tries again.
struct DirWatcher {
    watcher: notify::RecommendedWatcher,
    /// Directories not watched yet.
    pending: Vec<PathBuf>,
}

impl DirWatcher {
    /// Watches the directories holding `paths`, sending on `events` on every change there
    /// (any change: a re-read is cheap, so which file changed is not sorted out). `None`,
    /// with a log line, if watching is impossible; timed re-reads still find changes then.
    fn new(paths: &[PathBuf], events: mpsc::Sender<()>) -> Option<Self> {
        let handler = move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|e| is_change(&e)) {
                // A full channel already holds a pending wake-up, which is all that matters.
                let _ = events.try_send(());
            }
        };
        let watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch files; re-reading periodically");
                return None;
            }
        };
        let mut w = Self {
            watcher,
            pending: dirs(paths).into_iter().collect(),
        };
        w.rearm();
        Some(w)
    }

    /// Tries again to watch the directories not watched yet.
    fn rearm(&mut self) {
        use notify::Watcher as _;
        let watcher = &mut self.watcher;
        self.pending.retain(|dir| {
            match watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => false,
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "directory not watchable yet");
                    true
                }
            }
        });
    }
}

/// The directories where `paths` may change: each one's parent and, for a path that is a
/// symlink to a file elsewhere, the directory it resolves to. A Secret volume's targets
/// live in versioned subdirectories of the mount, which come and go; the mount itself
/// already sees the `..data` swap, so those are left out.
fn dirs(paths: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    for path in paths {
        let Some(parent) = parent_dir(path) else {
            continue;
        };
        if let (Ok(resolved), Ok(real_parent)) =
            (std::fs::canonicalize(path), std::fs::canonicalize(&parent))
            && let Some(target_dir) = parent_dir(&resolved)
            && !target_dir.starts_with(&real_parent)
        {
            dirs.insert(target_dir);
        }
        dirs.insert(parent);
    }
    dirs
}

fn parent_dir(path: &Path) -> Option<PathBuf> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Some(PathBuf::from(".")),
        Some(p) => Some(p.to_owned()),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Polls `cond` every 10 ms for up to 10 s.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    /// Text that must not be "bad".
    fn text(contents: &[Vec<u8>]) -> Result<String, String> {
        let t = String::from_utf8_lossy(&contents[0]).into_owned();
        if t == "bad" {
            Err(format!("{t:?} is refused"))
        } else {
            Ok(t)
        }
    }

    /// What the outcome hook saw, one word per re-read that found something.
    type Seen = Arc<Mutex<Vec<String>>>;

    fn recording() -> (
        Seen,
        impl FnMut(Outcome<'_, String, String>) + Send + 'static,
    ) {
        let seen = Seen::default();
        let sink = seen.clone();
        let hook = move |o: Outcome<'_, String, String>| {
            let word = match o {
                Outcome::Published(v) => format!("published {v}"),
                Outcome::Rejected(e) => format!("rejected {e}"),
                Outcome::Unreadable(_) => "unreadable".into(),
                Outcome::Unchanged => return,
            };
            sink.lock().unwrap().push(word);
        };
        (seen, hook)
    }

    /// Lays out a volume as the kubelet does: `..<version>/f`, `..data -> ..<version>`,
    /// `f -> ..data/f`, and swaps `..data` with one rename.
    fn publish(dir: &Path, version: u32, content: &str) {
        let name = format!("..2025_01_01_00_00_{version:02}.{version}");
        std::fs::create_dir(dir.join(&name)).unwrap();
        std::fs::write(dir.join(&name).join("f"), content).unwrap();
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        let link = dir.join("f");
        if !link.exists() {
            std::os::unix::fs::symlink("..data/f", &link).unwrap();
        }
    }

    #[tokio::test]
    async fn publishes_a_change_and_keeps_the_old_value_on_broken_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let (seen, hook) = recording();
        let stop = CancellationToken::new();
        // The period is long: only the directory watch can report the writes in time.
        let mut rx = Follow::new([&path], text)
            .every(Duration::from_secs(3600))
            .on_outcome(hook)
            .start(stop.clone())
            .unwrap();
        assert_eq!(**rx.borrow_and_update(), "one");

        std::fs::write(&path, "two").unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("a write is published")
            .unwrap();
        assert_eq!(**rx.borrow_and_update(), "two");

        std::fs::write(&path, "bad").unwrap();
        eventually("the broken contents are rejected", || {
            seen.lock().unwrap().len() == 2
        })
        .await;
        std::fs::remove_file(&path).unwrap();
        eventually("the missing file is noticed", || {
            seen.lock().unwrap().len() == 3
        })
        .await;
        assert!(!rx.has_changed().unwrap(), "nothing broken is published");
        assert_eq!(**rx.borrow(), "two");

        std::fs::write(&path, "three").unwrap();
        eventually("good contents after broken ones go through", || {
            **rx.borrow() == "three"
        })
        .await;
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "published two",
                "rejected \"bad\" is refused",
                "unreadable",
                "published three"
            ]
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_data_symlink_swap_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), 1, "first");
        let stop = CancellationToken::new();
        let mut rx = Follow::new([dir.path().join("f")], text)
            .every(Duration::from_secs(3600))
            .start(stop.clone())
            .unwrap();
        assert_eq!(**rx.borrow_and_update(), "first");
        publish(dir.path(), 2, "second");
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("the swap is published")
            .unwrap();
        assert_eq!(**rx.borrow(), "second");
        stop.cancel();
    }

    #[tokio::test]
    async fn unchanged_bytes_are_not_published_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "same").unwrap();
        let rereads = Arc::new(Mutex::new(0));
        let (seen, mut hook) = recording();
        let count = rereads.clone();
        let stop = CancellationToken::new();
        let rx = Follow::new([&path], text)
            .every(Duration::from_millis(20))
            .on_outcome(move |o| {
                if matches!(o, Outcome::Unchanged) {
                    *count.lock().unwrap() += 1;
                }
                hook(o)
            })
            .start(stop.clone())
            .unwrap();
        // Rewritten with the same bytes, and re-read many times.
        std::fs::write(&path, "same").unwrap();
        eventually("several re-reads", || *rereads.lock().unwrap() >= 5).await;
        assert!(!rx.has_changed().unwrap());
        assert!(seen.lock().unwrap().is_empty(), "{seen:?}");
        stop.cancel();
    }

    #[tokio::test]
    async fn timed_rereads_find_changes_without_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let stop = CancellationToken::new();
        let rx = Follow::new([&path], text)
            .every(Duration::from_millis(50))
            .watch(false)
            .start(stop.clone())
            .unwrap();
        std::fs::write(&path, "two").unwrap();
        eventually("the timed re-read finds the change", || {
            **rx.borrow() == "two"
        })
        .await;
        stop.cancel();
    }

    #[tokio::test]
    async fn start_refuses_broken_or_missing_files_unless_told_what_to_publish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "bad").unwrap();
        let err = Follow::new([&path], text)
            .start(CancellationToken::new())
            .unwrap_err();
        assert!(matches!(err, StartError::Parse(_)), "{err}");
        let absent = dir.path().join("absent");
        let err = Follow::new([&absent], text)
            .start(CancellationToken::new())
            .unwrap_err();
        assert!(err.to_string().starts_with("reading "), "{err}");

        // A user to whom a missing file is news gets a value for it, then the file.
        let stop = CancellationToken::new();
        let rx = Follow::new([&absent], text)
            .every(Duration::from_millis(20))
            .on_unreadable(|_| "missing".to_string())
            .start(stop.clone())
            .unwrap();
        assert_eq!(**rx.borrow(), "missing");
        std::fs::write(&absent, "here").unwrap();
        eventually("the file is read once there", || **rx.borrow() == "here").await;
        std::fs::remove_file(&absent).unwrap();
        eventually("its absence is published", || **rx.borrow() == "missing").await;
        stop.cancel();
    }

    #[tokio::test]
    async fn stops_when_cancelled_or_when_nobody_listens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        // The parser holds `alive` for as long as the task runs.
        let follow = |alive: Arc<()>| {
            Follow::new([&path], move |c: &[Vec<u8>]| {
                let _ = &alive;
                text(c)
            })
            .every(Duration::from_millis(20))
        };
        let alive = Arc::new(());
        let stop = CancellationToken::new();
        let rx = follow(alive.clone()).start(stop.clone()).unwrap();
        stop.cancel();
        eventually("the task ends on cancel", || Arc::strong_count(&alive) == 1).await;
        drop(rx);

        let rx = follow(alive.clone())
            .start(CancellationToken::new())
            .unwrap();
        let second = rx.clone();
        drop(rx);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(Arc::strong_count(&alive), 2, "one receiver is still there");
        drop(second);
        eventually("the task ends with its last receiver", || {
            Arc::strong_count(&alive) == 1
        })
        .await;
    }

    #[test]
    fn several_files_are_read_together_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "A").unwrap();
        std::fs::write(&b, "B").unwrap();
        assert_eq!(
            read_together(&[a.clone(), b.clone()]).unwrap(),
            [b"A".to_vec(), b"B".to_vec()]
        );
        std::fs::remove_file(&b).unwrap();
        let err = read_together(&[a, b.clone()]).unwrap_err();
        assert!(
            matches!(&err, ReadError::Io { path, .. } if *path == b),
            "{err}"
        );
    }

    #[tokio::test]
    async fn reads_do_not_wake_and_writes_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "one").unwrap();
        let (tx, mut events) = mpsc::channel(1);
        let _watcher = DirWatcher::new(std::slice::from_ref(&path), tx)
            .expect("a temporary directory is watchable");

        // What the follower does on every wake-up: read the file (open, read, close).
        for _ in 0..20 {
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "one");
        }
        let woke = tokio::time::timeout(Duration::from_millis(500), events.recv()).await;
        assert!(woke.is_err(), "reading the file must not count as a change");

        // A swap by rename, as Kubernetes volumes and editors do.
        let tmp = dir.path().join("token.tmp");
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("a replaced file wakes the watcher");
    }

    #[tokio::test]
    async fn a_directory_mounted_late_is_watched_once_there() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("mount");
        let path = dir.join("f");
        let (tx, mut events) = mpsc::channel(1);
        let mut watcher = DirWatcher::new(std::slice::from_ref(&path), tx).unwrap();
        assert_eq!(watcher.pending, std::slice::from_ref(&dir));
        std::fs::create_dir(&dir).unwrap();
        watcher.rearm();
        assert!(watcher.pending.is_empty());
        std::fs::write(&path, "x").unwrap();
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("the directory is watched once it exists");
    }
}
