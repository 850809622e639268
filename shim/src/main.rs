//! etcd-shim: the sidecar. Plaintext etcd v3 gRPC on the pod's loopback, tunnelled to the
//! broker with the pod's service-account token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use etcd_shim::{BrokerTarget, Forwarder, TokenSource};
use etcd_shim_core::admin::{self, AdminState, Readiness};
use etcd_shim_core::logging::{self, LogFormat};
use etcd_shim_core::shutdown::Shutdown;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(name = "etcd-shim", version, about)]
struct Args {
    /// Address the app's etcd client connects to.
    #[arg(long, env = "ETCD_SHIM_SHIM_LISTEN", default_value = "127.0.0.1:2379")]
    listen: SocketAddr,
    /// Address for /metrics, /live and /ready.
    #[arg(
        long,
        env = "ETCD_SHIM_SHIM_ADMIN_LISTEN",
        default_value = "0.0.0.0:9379"
    )]
    admin_listen: SocketAddr,
    /// The broker's URL: `http://host:port` (plaintext) or `https://host:port`.
    #[arg(long, env = "ETCD_SHIM_SHIM_BROKER")]
    broker: String,
    /// The pod's projected service-account token (audience etcd-shim).
    #[arg(
        long,
        env = "ETCD_SHIM_SHIM_TOKEN_FILE",
        default_value = "/var/run/secrets/etcd-shim/token"
    )]
    token_file: PathBuf,
    /// How often the token file is re-read.
    #[arg(long, env = "ETCD_SHIM_SHIM_TOKEN_RELOAD_INTERVAL", default_value = "10s", value_parser = etcd_shim_core::parse_duration)]
    token_reload_interval: Duration,
    /// How long open calls may take to finish after SIGTERM.
    #[arg(long, env = "ETCD_SHIM_SHIM_DRAIN_TIMEOUT", default_value = "10s", value_parser = etcd_shim_core::parse_duration)]
    drain_timeout: Duration,
    #[arg(long, env = "ETCD_SHIM_SHIM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    /// Log filter in RUST_LOG syntax; empty means RUST_LOG or the default.
    #[arg(long, env = "ETCD_SHIM_SHIM_LOG_LEVEL", default_value = "")]
    log_level: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = logging::init(args.log_format, &args.log_level) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = BrokerTarget::parse(&args.broker).map_err(anyhow::Error::msg)?;
    if target.scheme == http::uri::Scheme::HTTPS {
        anyhow::bail!(
            "TLS to the broker is not supported by this build yet; use an http:// broker URL"
        );
    }
    let shutdown = Shutdown::new();
    let (token, _) = TokenSource::spawn(
        args.token_file.clone(),
        args.token_reload_interval,
        shutdown.token(),
    );
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let advertise = listener.local_addr()?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = etcd_shim::metrics::Metrics::new(&mut registry);
    let forwarder = Forwarder::new(target, token.clone(), advertise, metrics);

    let readiness = Readiness::new();
    readiness.register("token");
    readiness.register("broker");
    let admin_listener = TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding admin address {}", args.admin_listen))?;
    tokio::spawn(admin::serve(
        admin_listener,
        AdminState {
            registry: Arc::new(registry),
            readiness: readiness.clone(),
        },
        shutdown.clone(),
    ));
    tokio::spawn(readiness_loop(
        forwarder.clone(),
        token,
        readiness,
        shutdown.clone(),
    ));
    let signals = shutdown.clone();
    tokio::spawn(async move { signals.on_signal().await });

    etcd_shim::serve(listener, forwarder, shutdown.clone()).await;
    shutdown.drain(args.drain_timeout).await;
    tracing::info!("stopped");
    Ok(())
}

/// Ready means: a token is at hand and the broker answers its health check.
async fn readiness_loop(
    forwarder: Forwarder,
    token: TokenSource,
    readiness: Readiness,
    shutdown: Shutdown,
) {
    let mut last: Option<Result<(), String>> = None;
    loop {
        readiness.set(
            "token",
            token.current().map(|_| ()).map_err(|e| e.to_string()),
        );
        let res = forwarder.probe().await;
        if last.as_ref().map(|l| l.is_ok()) != Some(res.is_ok()) {
            match &res {
                Ok(()) => tracing::info!("broker reachable"),
                Err(e) => tracing::warn!(error = %e, "broker not reachable"),
            }
        }
        readiness.set("broker", res.clone());
        let wait = if res.is_ok() { 5 } else { 1 };
        last = Some(res);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
            _ = shutdown.triggered() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        let a = Args::try_parse_from(["etcd-shim", "--broker", "http://b:2379"]).unwrap();
        assert_eq!(a.listen, "127.0.0.1:2379".parse().unwrap());
        assert_eq!(a.admin_listen.port(), 9379);
        assert_eq!(
            a.token_file,
            PathBuf::from("/var/run/secrets/etcd-shim/token")
        );
        assert!(
            Args::try_parse_from(["etcd-shim"]).is_err(),
            "broker is required"
        );
    }
}
