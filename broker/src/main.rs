//! etcd-shim-broker: confines each pod's etcd calls to its tenant prefix.

use std::process::ExitCode;

use clap::Parser;
use etcd_shim_broker::cli::{self, Args};

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match args.runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (format, level) = (args.log_format, args.log_level.clone());
    let (api, admin) = (args.listen, args.admin_listen);
    runtime.block_on(etcd_shim_core::process::main(
        format,
        &level,
        api,
        admin,
        |listeners, shutdown| cli::run(args, listeners, shutdown),
    ))
}
