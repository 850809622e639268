//! The `etcd-shim-injector` binary: parse flags, start logging, run the webhook.

use clap::Parser;
use etcd_shim_injector::Args;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = etcd_shim_core::logging::init(args.log_format, &args.log_level) {
        eprintln!("etcd-shim-injector: {e:#}");
        return std::process::ExitCode::from(2);
    }
    match etcd_shim_injector::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "etcd-shim-injector failed");
            std::process::ExitCode::FAILURE
        }
    }
}
