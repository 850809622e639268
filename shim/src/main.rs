//! etcd-shim: the sidecar. Plaintext etcd v3 gRPC on the pod's loopback, tunnelled to the
//! broker with the pod's service-account token.

use clap::Parser;
use etcd_shim::cli::{self, Args, Command};

// One thread: a sidecar forwarding bytes for one app needs less than a core, and every
// extra worker thread costs the pod memory (its stack and its own malloc arena) and
// competes with the app for the pod's CPU. File reads still go to tokio's blocking pool.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(Command::WaitReady { timeout }) = args.command {
        let addr = etcd_shim::ready::probe_address(args.admin_listen);
        return match etcd_shim::ready::wait_ready(addr, timeout) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("etcd-shim: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let (format, level) = (args.log_format, args.log_level.clone());
    let (api, admin) = (args.listen, args.admin_listen);
    etcd_shim_core::process::main(format, &level, api, admin, |listeners, shutdown| {
        cli::run(args, listeners, shutdown)
    })
    .await
}
