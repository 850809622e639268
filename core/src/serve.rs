//! The one accept loop every etcd-shim server runs: accept with back-off, an optional TLS
//! handshake off the loop, then HTTP over hyper-util with a graceful close at shutdown.
//!
//! Each component keeps its own protocol settings (the [`auto::Builder`] it passes in),
//! its own service, and can wrap each connection's stream (the shim's `:authority` fix)
//! or count open connections in a gauge.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls::TlsAcceptorSource;

/// A client that connects and never finishes the TLS handshake must not hold a task
/// forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// First pause after a failed accept; it doubles up to [`MAX_ACCEPT_BACKOFF`] while
/// accepts keep failing. Out of file descriptors, retrying at once only spins: the pause
/// lets open connections end and free some.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// How one server accepts and serves its connections.
pub struct Server {
    /// Names the server in logs ("admin", "shim", "broker", "webhook").
    name: &'static str,
    http: auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptorSource>,
    handshake_timeout: Duration,
    nodelay: bool,
    open: Option<Gauge>,
    tracker: TaskTracker,
}

impl Server {
    /// A plaintext server speaking what `http` is set up for.
    pub fn new(name: &'static str, http: auto::Builder<TokioExecutor>) -> Self {
        Self {
            name,
            http,
            tls: None,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            nodelay: false,
            open: None,
            tracker: TaskTracker::new(),
        }
    }

    /// Completes a TLS handshake on every connection first, with the acceptor current at
    /// accept time, so a reloaded certificate applies from the next connection on.
    pub fn tls(mut self, tls: TlsAcceptorSource) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets TCP_NODELAY on accepted sockets: without it, Nagle holds a response's last
    /// frames until the peer's delayed ACK arrives.
    pub fn nodelay(mut self) -> Self {
        self.nodelay = true;
        self
    }

    /// Counts connections in `open` from the end of the handshake until they close.
    pub fn count_open(mut self, open: Gauge) -> Self {
        self.open = Some(open);
        self
    }

    /// Spawns connection tasks on `tracker`, so a drain can wait for them.
    pub fn track(mut self, tracker: TaskTracker) -> Self {
        self.tracker = tracker;
        self
    }

    /// Accepts on `listener` until `shutdown` is cancelled, serving each connection with
    /// what `connection` makes of its stream: the stream to speak HTTP over (the same one,
    /// or a wrapper) and the service that answers its requests.
    ///
    /// Returns once accepting has stopped and the listener is closed. Open connections
    /// are then told to finish: HTTP/2 ones get a GOAWAY, idle HTTP/1 keep-alives close,
    /// and requests in flight go on. They run on the tracker, for the caller to wait on
    /// up to its drain deadline.
    pub async fn serve<F, IO, S, B>(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
        connection: F,
    ) where
        F: Fn(Stream) -> (IO, S) + Send + Sync + 'static,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Ok(addr) = listener.local_addr() {
            let tls = self.tls.is_some();
            tracing::info!(server = self.name, %addr, tls, "listening");
        }
        self.serve_from(listener, shutdown, connection).await
    }

    async fn serve_from<L, F, IO, S, B>(
        self,
        mut listener: L,
        shutdown: CancellationToken,
        connection: F,
    ) where
        L: Accept,
        F: Fn(Stream) -> (IO, S) + Send + Sync + 'static,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let name = self.name;
        let shared = Arc::new(Shared {
            name,
            http: self.http,
            handshake_timeout: self.handshake_timeout,
            open: self.open,
            connection,
        });
        let graceful = GracefulShutdown::new();
        let mut backoff = MIN_ACCEPT_BACKOFF;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = poll_fn(|cx| listener.poll_accept(cx)) => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => {
                    backoff = MIN_ACCEPT_BACKOFF;
                    a
                }
                // The peer gave up before we took the connection: nothing is wrong here.
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!(server = name, error = %e, "connection closed before accept");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(server = name, error = %e, retry_in = ?backoff, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            };
            if self.nodelay {
                let _ = tcp.set_nodelay(true);
            }
            // Taken at accept time: a reloaded certificate applies from the next one on.
            let acceptor = self.tls.as_ref().map(|tls| tls.acceptor());
            let shared = shared.clone();
            let watcher = graceful.watcher();
            let shutdown = shutdown.clone();
            self.tracker.spawn(async move {
                let stream = match acceptor {
                    None => Stream::Plain(tcp),
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(shared.handshake_timeout, acceptor.accept(tcp));
                        // A connection still in its handshake at shutdown has sent no
                        // request yet: it is dropped rather than served.
                        let done = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            done = handshake => done,
                        };
                        match done {
                            Ok(Ok(s)) => Stream::Tls(Box::new(s)),
                            Ok(Err(e)) => {
                                tracing::debug!(server = shared.name, %peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(server = shared.name, %peer, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let _open = shared.open.as_ref().map(|g| OpenGuard::new(g.clone()));
                let (io, svc) = (shared.connection)(stream);
                let conn = shared.http.serve_connection(TokioIo::new(io), svc);
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(server = shared.name, %peer, error = %e, "connection ended with an error");
                }
            });
        }
        // Closes the listening socket now: new clients are refused instead of hanging.
        drop(listener);
        // Sent as soon as the tracker runs this; it then waits for the watched connections.
        self.tracker.spawn(graceful.shutdown());
    }
}

/// What every connection task of one server shares.
struct Shared<F> {
    name: &'static str,
    http: auto::Builder<TokioExecutor>,
    handshake_timeout: Duration,
    open: Option<Gauge>,
    connection: F,
}

/// Errors about one connection, not the listener: retrying at once is right.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A source of connections; a trait so tests can make accept fail on purpose.
trait Accept: Send {
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>>;
}

impl Accept for TcpListener {
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        TcpListener::poll_accept(self, cx)
    }
}

/// Decrements the gauge however the connection task ends.
struct OpenGuard(Gauge);

impl OpenGuard {
    fn new(open: Gauge) -> Self {
        open.inc();
        Self(open)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A component's two ports, bound before it starts, so that tests can bind
/// `127.0.0.1:0` and read the addresses back.
#[derive(Debug)]
pub struct Listeners {
    /// Where the component serves its API (the broker's gRPC, the shim's etcd).
    pub api: TcpListener,
    /// `/metrics`, `/live` and `/ready`.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `api` and `admin`; an error names the address that could not be bound.
    pub async fn bind(api: SocketAddr, admin: SocketAddr) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let api_listener = TcpListener::bind(api)
            .await
            .with_context(|| format!("binding {api}"))?;
        let admin = TcpListener::bind(admin)
            .await
            .with_context(|| format!("binding admin address {admin}"))?;
        Ok(Self {
            api: api_listener,
            admin,
        })
    }
}

/// A TCP connection in the clear or under TLS: an accepted one (after the handshake, if
/// the server has TLS), or with `T` the client's side, a dialled one.
pub enum Stream<T = TlsStream<TcpStream>> {
    Plain(TcpStream),
    Tls(Box<T>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{Notify, mpsc};

    fn http() -> auto::Builder<TokioExecutor> {
        auto::Builder::new(TokioExecutor::new())
    }

    /// Sends one HTTP/1.1 request and reads the answer until the server closes.
    async fn get(addr: SocketAddr, close: bool) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let conn = if close { "close" } else { "keep-alive" };
        s.write_all(format!("GET / HTTP/1.1\r\nhost: x\r\nconnection: {conn}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_a_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let open = Gauge::default();
        let server = Server::new("test", http()).count_open(open.clone());
        let task = tokio::spawn(server.serve(listener, token.clone(), |io| {
            let svc = service_fn(|_req| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
            });
            (io, svc)
        }));
        let answer = get(addr, true).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hello"), "{answer}");
        token.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_finishes_requests_in_flight() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let open = Gauge::default();
        let (entered_tx, mut entered) = mpsc::unbounded_channel();
        let release = Arc::new(Notify::new());
        let server = Server::new("test", http())
            .track(tracker.clone())
            .count_open(open.clone());
        let released = release.clone();
        let task = tokio::spawn(server.serve(listener, token.clone(), move |io| {
            let entered_tx = entered_tx.clone();
            let released = released.clone();
            let svc = service_fn(move |_req| {
                let entered_tx = entered_tx.clone();
                let released = released.clone();
                async move {
                    let _ = entered_tx.send(());
                    released.notified().await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
                }
            });
            (io, svc)
        }));
        // Keep-alive: only the shutdown may close this connection.
        let client = tokio::spawn(get(addr, false));
        entered.recv().await.unwrap();
        assert_eq!(open.get(), 1);

        token.cancel();
        task.await.unwrap();
        // The listener is closed: a new client is refused, not left waiting.
        assert!(TcpStream::connect(addr).await.is_err());
        assert!(!client.is_finished());

        release.notify_one();
        let answer = client.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        tracker.close();
        tracker.wait().await;
        assert_eq!(open.get(), 0);
    }

    /// Fails every accept with the given error, counting the calls.
    struct Failing {
        calls: Arc<AtomicUsize>,
        raw_os_error: i32,
    }

    impl Accept for Failing {
        fn poll_accept(
            &mut self,
            _cx: &mut Context<'_>,
        ) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Err(io::Error::from_raw_os_error(self.raw_os_error)))
        }
    }

    async fn accepts_in(raw_os_error: i32, span: Duration) -> usize {
        let calls = Arc::new(AtomicUsize::new(0));
        let listener = Failing {
            calls: calls.clone(),
            raw_os_error,
        };
        let token = CancellationToken::new();
        let server = Server::new("test", http());
        let task = tokio::spawn(server.serve_from(listener, token.clone(), |io| {
            let svc = service_fn(|_req| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            });
            (io, svc)
        }));
        tokio::time::sleep(span).await;
        token.cancel();
        task.await.unwrap();
        calls.load(Ordering::SeqCst)
    }

    /// Out of file descriptors, every accept fails at once; without a pause the loop
    /// would never yield. With time paused, the test's own sleep only ends if the loop
    /// waits, and the count of tries shows the doubling: 10 ms + 20 + ... + 640 = 1.27 s
    /// for the first 8 tries, then one a second.
    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_instead_of_spinning() {
        const EMFILE: i32 = 24;
        const ENFILE: i32 = 23;
        let tries = accepts_in(EMFILE, Duration::from_secs(10)).await;
        assert!((9..=18).contains(&tries), "{tries} accepts in 10 s");
        let tries = accepts_in(ENFILE, Duration::from_millis(35)).await;
        assert_eq!(tries, 3, "tries at 0, 10 and 30 ms");
    }

    /// A connection aborted before it was taken says nothing about the listener: the
    /// next accept follows at once, and the pause after a real failure starts over.
    #[test]
    fn aborted_connections_are_not_listener_errors() {
        assert!(is_connection_error(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        assert!(!is_connection_error(&io::Error::from_raw_os_error(24)));
    }
}
