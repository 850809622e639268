//! etcd-shim-broker: confines each pod's etcd calls to its tenant prefix.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use etcd_shim_broker::auth::StaticTokens;
use etcd_shim_broker::metrics::Metrics;
use etcd_shim_broker::upstream::Upstream;
use etcd_shim_broker::{Broker, BrokerConfig};
use etcd_shim_core::admin::{self, AdminState, Readiness};
use etcd_shim_core::logging::{self, LogFormat};
use etcd_shim_core::shutdown::Shutdown;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(name = "etcd-shim-broker", version, about)]
struct Args {
    /// Address for the gRPC API that shims call.
    #[arg(long, env = "ETCD_SHIM_BROKER_LISTEN", default_value = "0.0.0.0:2379")]
    listen: SocketAddr,
    /// Address for /metrics, /live and /ready.
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_ADMIN_LISTEN",
        default_value = "0.0.0.0:9380"
    )]
    admin_listen: SocketAddr,
    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,
    /// Development mode: a file of `<token> <namespace>/<serviceaccount>` lines.
    #[arg(long, env = "ETCD_SHIM_BROKER_STATIC_TOKENS_FILE")]
    static_tokens_file: PathBuf,
    /// Tenant `<ns>/<sa>` keys live under `<root><ns>/<sa>/`.
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_TENANT_PREFIX_ROOT",
        default_value = "/etcd-shim/tenants/"
    )]
    tenant_prefix_root: String,
    /// Broker-private prefix for lease ownership records.
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_LEASE_PREFIX",
        default_value = "/etcd-shim/leases/"
    )]
    lease_prefix: String,
    /// Client URLs that MemberList reports to clients calling the broker directly.
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_ADVERTISE_CLIENT_URLS",
        value_delimiter = ','
    )]
    advertise_client_urls: Vec<String>,
    /// How long open calls may take to finish after SIGTERM.
    #[arg(long, env = "ETCD_SHIM_BROKER_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime_secs)]
    drain_timeout: Duration,
    #[arg(long, env = "ETCD_SHIM_BROKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    /// Log filter in RUST_LOG syntax; empty means RUST_LOG or the default.
    #[arg(long, env = "ETCD_SHIM_BROKER_LOG_LEVEL", default_value = "")]
    log_level: String,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    etcd_shim_core::parse_duration(s)
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
    let tokens = StaticTokens::load(&args.static_tokens_file)?;
    tracing::warn!(
        tokens = tokens.len(),
        "static token file in use: development mode only"
    );
    let upstream = Upstream::new(&args.etcd_endpoints)?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let shutdown = Shutdown::new();
    let cfg = BrokerConfig {
        tenant_prefix_root: args.tenant_prefix_root,
        lease_prefix: args.lease_prefix,
        advertise_client_urls: args.advertise_client_urls,
    };
    let broker = Broker::new(&cfg, Arc::new(tokens), upstream, metrics, shutdown.token())?;

    let readiness = Readiness::new();
    readiness.register("etcd");
    let admin_listener = TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding admin address {}", args.admin_listen))?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tokio::spawn(admin::serve(
        admin_listener,
        AdminState {
            registry: Arc::new(registry),
            readiness: readiness.clone(),
        },
        shutdown.clone(),
    ));
    tokio::spawn(probe_loop(broker.clone(), readiness, shutdown.clone()));
    let signals = shutdown.clone();
    tokio::spawn(async move { signals.on_signal().await });

    let server = tokio::spawn(etcd_shim_broker::serve(listener, broker, shutdown.token()));
    shutdown.triggered().await;
    match tokio::time::timeout(args.drain_timeout, server).await {
        Ok(res) => res.context("server task")?.context("serving")?,
        Err(_) => tracing::warn!("drain deadline passed, exiting with calls still open"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Keeps the "etcd" readiness condition current.
async fn probe_loop(broker: Broker, readiness: Readiness, shutdown: Shutdown) {
    let mut last_ok = None;
    loop {
        let res = broker.probe_backend().await;
        let ok = res.is_ok();
        if last_ok != Some(ok) {
            match &res {
                Ok(version) => tracing::info!(%version, "etcd reachable"),
                Err(e) => tracing::warn!(error = %e, "etcd unreachable"),
            }
            last_ok = Some(ok);
        }
        readiness.set("etcd", res.map(|_| ()));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })) => {}
            _ = shutdown.triggered() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_defaults() {
        let a = Args::try_parse_from([
            "b",
            "--static-tokens-file",
            "/t",
            "--etcd-endpoints",
            "http://a:1,http://b:2",
        ])
        .unwrap();
        assert_eq!(a.etcd_endpoints, vec!["http://a:1", "http://b:2"]);
        assert_eq!(a.listen.port(), 2379);
        assert_eq!(a.admin_listen.port(), 9380);
        assert_eq!(a.drain_timeout, Duration::from_secs(10));
        assert!(
            Args::try_parse_from(["b"]).is_err(),
            "token file is required"
        );
    }
}
