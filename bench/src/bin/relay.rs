//! The floors the benchmark measures beside etcd-shim: hops that do nothing but relay,
//! so each figure has beside it what any proxy of that shape costs at least.
//!
//!   etcd-shim-bench-relay tcp LISTEN UPSTREAM   copies bytes both ways, one upstream
//!                                               connection per client connection
//!   etcd-shim-bench-relay h2 LISTEN UPSTREAM    terminates HTTP/2 and sends each request
//!                                               on over one shared HTTP/2 connection,
//!                                               bodies and trailers streamed, untouched
//!
//! Both run on one thread, as the shim and the broker do, with the flow-control windows
//! the broker uses, and TCP_NODELAY on every socket.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage: etcd-shim-bench-relay tcp|h2 LISTEN UPSTREAM";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, upstream] = &args[..] else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let run = async {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        match mode.as_str() {
            "tcp" => tcp(listener, upstream).await,
            "h2" => h2(listener, upstream).await,
            other => bail!("unknown mode {other:?}; {USAGE}"),
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn tcp(listener: TcpListener, upstream: &str) -> Result<()> {
    loop {
        let (mut down, _) = listener.accept().await?;
        let upstream = upstream.to_owned();
        tokio::spawn(async move {
            let Ok(mut up) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = (down.set_nodelay(true), up.set_nodelay(true));
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
        });
    }
}

async fn h2(listener: TcpListener, upstream: &str) -> Result<()> {
    let tcp = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connecting to {upstream}"))?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .handshake(TokioIo::new(tcp))
        .await?;
    tokio::spawn(conn);
    let authority = upstream.to_owned();
    loop {
        let (down, _) = listener.accept().await?;
        down.set_nodelay(true)?;
        let sender = sender.clone();
        let authority = authority.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                forward(sender.clone(), authority.clone(), req)
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(8 << 20)
                .max_concurrent_streams(u32::MAX)
                .serve_connection(TokioIo::new(down), svc)
                .await;
        });
    }
}

async fn forward(
    mut sender: SendRequest<Incoming>,
    authority: String,
    mut req: Request<Incoming>,
) -> Result<hyper::Response<Incoming>, hyper::Error> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    if let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
    {
        *req.uri_mut() = uri;
    }
    sender.send_request(req).await
}
