//! The shim's command line and its wiring: [`Args`] are its flags, [`run`] builds the
//! forwarder from them and serves until shutdown. `main.rs` only parses and maps the
//! exit code, so tests can run the shim in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::{Dialer, Endpoints, Forwarder, TokenSource, Trust};
use anyhow::Context;
use clap::Parser;
use etcd_shim_core::admin::{self, AdminState, Readiness};
use etcd_shim_core::logging::LogFormat;
use etcd_shim_core::shutdown::Shutdown;

#[derive(Debug, Parser)]
#[command(name = "etcd-shim", version, about, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Address the app's etcd client connects to.
    #[arg(long, env = "ETCD_SHIM_SHIM_LISTEN", default_value = "127.0.0.1:2379")]
    pub listen: SocketAddr,
    /// Address for /metrics, /live and /ready.
    #[arg(
        long,
        env = "ETCD_SHIM_SHIM_ADMIN_LISTEN",
        default_value = "0.0.0.0:9379"
    )]
    pub admin_listen: SocketAddr,
    /// The broker: `https://host:port`, or several comma-separated URLs of brokers to
    /// fail over between. A name that resolves to several addresses counts as several
    /// brokers. `http://` only with --broker-insecure-plaintext.
    #[arg(long, env = "ETCD_SHIM_SHIM_BROKER", required = true)]
    broker: Option<String>,
    /// PEM bundle of the CAs the broker's certificate must chain to; re-read for every
    /// new connection, so a rotated bundle applies without a restart.
    #[arg(
        long,
        env = "ETCD_SHIM_SHIM_BROKER_CA_FILE",
        conflicts_with = "broker_ca"
    )]
    broker_ca_file: Option<PathBuf>,
    /// The same bundle as PEM text (what the injector passes to injected shims).
    #[arg(long, env = "ETCD_SHIM_SHIM_BROKER_CA", hide_env_values = true)]
    broker_ca: Option<String>,
    /// Allow `http://` broker URLs: the pod's token and data cross the network in the
    /// clear. For local development only.
    #[arg(long, env = "ETCD_SHIM_SHIM_BROKER_INSECURE_PLAINTEXT")]
    broker_insecure_plaintext: bool,
    /// Longest wait for one broker address to accept a connection (and again for the
    /// TLS handshake) before the next address is tried.
    #[arg(long, env = "ETCD_SHIM_SHIM_BROKER_CONNECT_TIMEOUT", default_value = "1s", value_parser = etcd_shim_core::parse_duration)]
    broker_connect_timeout: Duration,
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
    pub log_format: LogFormat,
    /// Log filter in RUST_LOG syntax; empty means RUST_LOG or the default.
    #[arg(long, env = "ETCD_SHIM_SHIM_LOG_LEVEL", default_value = "")]
    pub log_level: String,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Wait until the shim running in this pod is ready (its /ready on the admin address
    /// answers 200), then exit 0; exit 1 after --timeout. For the classic sidecar's
    /// postStart hook, which holds back the application's container until it returns.
    WaitReady {
        /// Longest wait. No environment variable: only the hook's command line sets it,
        /// and the container's environment is the running shim's too.
        #[arg(long, default_value = "120s", value_parser = etcd_shim_core::parse_duration)]
        timeout: Duration,
    },
}

pub use etcd_shim_core::serve::Listeners;

/// Runs the shim on `listeners` until `shutdown` is triggered, then drains the app's
/// calls for up to `--drain-timeout`.
pub async fn run(args: Args, listeners: Listeners, shutdown: Shutdown) -> anyhow::Result<()> {
    let (target, dialer) = broker_dialer(&args)?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = crate::metrics::Metrics::new(&mut registry);
    let token = TokenSource::spawn(
        args.token_file.clone(),
        args.token_reload_interval,
        Some(metrics.clone()),
        shutdown.token(),
    );
    let Listeners {
        api: listener,
        admin: admin_listener,
    } = listeners;
    let advertise = listener.local_addr()?;
    let forwarder = Forwarder::new(target, dialer, token.clone(), advertise, metrics.clone());

    let readiness = Readiness::new();
    readiness.register("token");
    readiness.register("broker");
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
        metrics,
        shutdown.clone(),
    ));
    crate::serve(listener, forwarder, shutdown.clone()).await;
    shutdown.drain(args.drain_timeout).await;
    tracing::info!("stopped");
    Ok(())
}

/// Checks the broker flags against each other and builds the dialer.
fn broker_dialer(args: &Args) -> anyhow::Result<(Endpoints, Dialer)> {
    let target =
        Endpoints::parse(args.broker.as_deref().unwrap_or_default()).context("--broker")?;
    let trust = if target.is_tls() {
        match (&args.broker_ca_file, &args.broker_ca) {
            (Some(path), _) => Some(Trust::load(path)?),
            (None, Some(pem)) => Some(Trust::from_pem("--broker-ca", pem)?),
            (None, None) => anyhow::bail!(
                "an https:// broker needs --broker-ca-file (the CA bundle the broker's certificate chains to)"
            ),
        }
    } else if args.broker_insecure_plaintext {
        tracing::warn!(
            "talking to the broker in plaintext (--broker-insecure-plaintext): development only"
        );
        None
    } else {
        anyhow::bail!(
            "refusing plaintext http:// to the broker: the pod's token would cross the network in the clear; \
             use https:// with --broker-ca-file, or pass --broker-insecure-plaintext for local development"
        );
    };
    tracing::info!(
        brokers = target.list.len(),
        tls = target.is_tls(),
        "broker endpoints configured"
    );
    Ok((
        target.clone(),
        Dialer::new(target, trust, args.broker_connect_timeout),
    ))
}

/// Ready means: a token is at hand, and the broker answers an etcd call made with it for
/// this pod's tenant (see `Forwarder::probe`). Each change is logged once, with the reason,
/// and the reason is also the `etcd_shim_unready` metric.
async fn readiness_loop(
    forwarder: Forwarder,
    token: TokenSource,
    readiness: Readiness,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: Shutdown,
) {
    let mut last: Option<Result<(), crate::Unready>> = None;
    loop {
        readiness.set(
            "token",
            token.current().map(|_| ()).map_err(|e| e.to_string()),
        );
        let res = forwarder.probe().await;
        let outcome = res.as_ref().map(|_| ()).map_err(|e| e.reason);
        if last != Some(outcome) {
            match &res {
                Ok(()) => tracing::info!("ready: the broker serves this pod"),
                Err(e) => tracing::warn!(reason = e.reason.as_str(), detail = %e, "not ready"),
            }
        }
        metrics.set_readiness(outcome.err());
        let res = res.map_err(|e| e.to_string());
        readiness.set("broker", res.clone());
        let wait = if res.is_ok() { 5 } else { 1 };
        last = Some(outcome);
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
    fn broker_flags_are_checked_together() {
        let args = |extra: &[&str]| {
            let mut v = vec!["etcd-shim"];
            v.extend_from_slice(extra);
            Args::try_parse_from(v).unwrap()
        };
        let err = |a: Args| format!("{:#}", broker_dialer(&a).unwrap_err());
        let e = err(args(&["--broker", "http://b:2379"]));
        assert!(e.contains("--broker-insecure-plaintext"), "{e}");
        assert!(
            broker_dialer(&args(&[
                "--broker",
                "http://b:1",
                "--broker-insecure-plaintext"
            ]))
            .is_ok()
        );
        let e = err(args(&["--broker", "https://b:2379"]));
        assert!(e.contains("--broker-ca-file"), "{e}");
        let e = err(args(&[
            "--broker",
            "https://b:2379",
            "--broker-ca-file",
            "/absent/ca.crt",
        ]));
        assert!(e.contains("/absent/ca.crt"), "{e}");
        let e = err(args(&["--broker", "https://a:1,http://b:2"]));
        assert!(e.contains("mix"), "{e}");
        assert!(
            Args::try_parse_from([
                "etcd-shim",
                "--broker",
                "https://b:1",
                "--broker-ca-file",
                "f",
                "--broker-ca",
                "x"
            ])
            .is_err(),
            "a file and text are exclusive"
        );
    }

    #[test]
    fn flags() {
        let a = Args::try_parse_from(["etcd-shim", "--broker", "http://b:2379"]).unwrap();
        assert_eq!(a.broker_connect_timeout, Duration::from_secs(1));
        assert!(!a.broker_insecure_plaintext);
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

    #[test]
    fn wait_ready_needs_no_broker() {
        let a = Args::try_parse_from(["etcd-shim", "wait-ready", "--timeout=30s"]).unwrap();
        assert!(matches!(
            a.command,
            Some(Command::WaitReady { timeout }) if timeout == Duration::from_secs(30)
        ));
        let a =
            Args::try_parse_from(["etcd-shim", "--admin-listen", "0.0.0.0:19379", "wait-ready"])
                .unwrap();
        assert_eq!(a.admin_listen.port(), 19379);
    }
}
