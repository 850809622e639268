//! Entry point: parse flags, start logging, run, turn failure into one line and exit 1.

use std::process::ExitCode;

use clap::Parser;
use etcd_shim_webhook_certs::{Args, error_chain, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(err) = etcd_shim_core::logging::init(args.log_format, &args.log_level) {
        eprintln!("error: {err:#}");
        return ExitCode::FAILURE;
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}
