//! etcd-shim-broker: confines each pod's etcd calls to its tenant prefix.

use clap::Parser;
use etcd_shim_broker::cli::{self, Args};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let (format, level) = (args.log_format, args.log_level.clone());
    let (api, admin) = (args.listen, args.admin_listen);
    etcd_shim_core::process::main(format, &level, api, admin, |listeners, shutdown| {
        cli::run(args, listeners, shutdown)
    })
    .await
}
