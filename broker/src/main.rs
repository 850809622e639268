//! etcd-shim-broker: confines each pod's etcd calls to its tenant prefix.

use clap::Parser;
use etcd_shim_broker::cli::{self, Args, Listeners};
use etcd_shim_core::logging;
use etcd_shim_core::shutdown::Shutdown;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = logging::init(args.log_format, &args.log_level) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let shutdown = Shutdown::new();
    let signals = shutdown.clone();
    tokio::spawn(async move { signals.on_signal().await });
    let res = match Listeners::bind(args.listen, args.admin_listen).await {
        Ok(listeners) => cli::run(args, listeners, shutdown).await,
        Err(e) => Err(e),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
