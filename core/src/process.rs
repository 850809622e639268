//! What a component's `main` does around its `run`: logging, signals, ports and the exit
//! code, the same way for every component that serves an API and an admin port.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use crate::logging::{self, LogFormat};
use crate::serve::Listeners;
use crate::shutdown::Shutdown;

/// Starts logging (exit code 2 if the filter or format is unusable), wires SIGTERM and
/// SIGINT to the shutdown, binds `api` and `admin`, and runs `run` on them. An error
/// from binding or from `run` is logged and printed, and the exit code is 1.
pub async fn main<F, Fut>(
    log_format: LogFormat,
    log_level: &str,
    api: SocketAddr,
    admin: SocketAddr,
    run: F,
) -> ExitCode
where
    F: FnOnce(Listeners, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    if let Err(e) = logging::init(log_format, log_level) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let shutdown = Shutdown::new();
    let signals = shutdown.clone();
    tokio::spawn(async move { signals.on_signal().await });
    let res = match Listeners::bind(api, admin).await {
        Ok(listeners) => run(listeners, shutdown).await,
        Err(e) => Err(e),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
