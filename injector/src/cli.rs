//! Command-line settings (every flag also an `ETCD_SHIM_INJECTOR_*` environment variable)
//! and the process wiring: TLS, webhook server, admin server, shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use etcd_shim_core::admin::{self, AdminState, Readiness};
use etcd_shim_core::logging::LogFormat;
use etcd_shim_core::parse_duration;
use etcd_shim_core::shutdown::Shutdown;
use etcd_shim_core::tls::{
    ReloadHook, ReloadOptions, ReloadOutcome, ServerTlsFiles, TlsAcceptorSource, format_unix,
};

use crate::config::{
    DEFAULT_BROKER_CA_CONFIGMAP, DEFAULT_BROKER_URL, DEFAULT_CPU_REQUEST, DEFAULT_MEMORY_LIMIT,
    DEFAULT_MEMORY_REQUEST, InjectConfig, SidecarMode, default_image,
};
use crate::metrics::Metrics;
use crate::server::{self, Webhook};

/// Readiness condition held while a valid, unexpired serving certificate is in force.
pub const CERT_READY: &str = "serving certificate loaded";

/// Readiness condition withdrawn when shutdown starts.
pub const SERVING_READY: &str = "serving";

/// How often the serving certificate's expiry is checked.
const RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Parser)]
#[command(
    name = "etcd-shim-injector",
    version,
    about = "Mutating admission webhook that adds the etcd-shim sidecar to pods"
)]
pub struct Args {
    /// Address of the HTTPS webhook endpoint.
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_LISTEN",
        default_value = "0.0.0.0:8443"
    )]
    pub listen: SocketAddr,

    /// Address of the admin endpoint (/metrics, /live, /ready).
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_ADMIN_LISTEN",
        default_value = "0.0.0.0:9381"
    )]
    pub admin_listen: SocketAddr,

    /// PEM serving certificate chain; reloaded when it changes.
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_TLS_CERT",
        default_value = "/etc/etcd-shim/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,

    /// PEM private key of the serving certificate; reloaded when it changes.
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_TLS_KEY",
        default_value = "/etc/etcd-shim/tls/tls.key"
    )]
    pub tls_key: PathBuf,

    /// Shim image injected into pods.
    #[arg(long, env = "ETCD_SHIM_INJECTOR_SHIM_IMAGE", default_value_t = default_image())]
    pub shim_image: String,

    /// Broker URL the shim connects to.
    #[arg(long, env = "ETCD_SHIM_INJECTOR_BROKER_URL", default_value = DEFAULT_BROKER_URL)]
    pub broker_url: String,

    /// ConfigMap, in each opted-in namespace, with the CA bundle (key ca.crt) the shim
    /// trusts for the broker. It is projected into the pod as a file that the kubelet
    /// refreshes, so a rotated bundle reaches running shims. Empty: none (http:// brokers).
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_BROKER_CA_CONFIGMAP",
        default_value = DEFAULT_BROKER_CA_CONFIGMAP
    )]
    pub broker_ca_configmap: String,

    /// UID and GID of the shim; empty leaves them unset for the platform to assign
    /// (OpenShift's restricted-v2 SCC).
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_SHIM_RUN_AS_USER",
        default_value = "65532"
    )]
    pub shim_run_as_user: String,

    /// Native sidecar (Kubernetes >= 1.29) or classic sidecar container.
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_SIDECAR_MODE",
        value_enum,
        default_value_t = SidecarMode::Native
    )]
    pub sidecar_mode: SidecarMode,

    /// Log filter given to the shim (RUST_LOG syntax).
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_SHIM_LOG_LEVEL",
        default_value = "info"
    )]
    pub shim_log_level: String,

    /// Log format given to the shim.
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_SHIM_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Plain
    )]
    pub shim_log_format: LogFormat,

    /// Shim CPU request.
    #[arg(long, env = "ETCD_SHIM_INJECTOR_SHIM_CPU_REQUEST", default_value = DEFAULT_CPU_REQUEST)]
    pub shim_cpu_request: String,

    /// Shim memory request.
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_SHIM_MEMORY_REQUEST",
        default_value = DEFAULT_MEMORY_REQUEST
    )]
    pub shim_memory_request: String,

    /// Shim memory limit.
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_SHIM_MEMORY_LIMIT",
        default_value = DEFAULT_MEMORY_LIMIT
    )]
    pub shim_memory_limit: String,

    /// Largest AdmissionReview body accepted, in bytes; larger ones get 413.
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_MAX_BODY_BYTES",
        default_value_t = server::DEFAULT_MAX_BODY_BYTES
    )]
    pub max_body_bytes: usize,

    /// After SIGTERM, keep serving (while /ready fails) this long so the API server stops
    /// sending requests here before the listener closes.
    #[arg(long, env = "ETCD_SHIM_INJECTOR_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// Longest wait for open connections after the listener closes.
    #[arg(long, env = "ETCD_SHIM_INJECTOR_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// The injector's own log filter (RUST_LOG syntax); empty uses RUST_LOG or the default.
    #[arg(long, env = "ETCD_SHIM_INJECTOR_LOG_LEVEL", default_value = "")]
    pub log_level: String,

    /// The injector's own log format.
    #[arg(
        long,
        env = "ETCD_SHIM_INJECTOR_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Plain
    )]
    pub log_format: LogFormat,
}

impl Args {
    /// Injection settings from the flags, checked.
    pub fn inject_config(&self) -> anyhow::Result<InjectConfig> {
        for (flag, value) in [
            ("--shim-cpu-request", &self.shim_cpu_request),
            ("--shim-memory-request", &self.shim_memory_request),
            ("--shim-memory-limit", &self.shim_memory_limit),
        ] {
            anyhow::ensure!(
                crate::config::is_quantity(value),
                "{flag}: {value:?} is not a resource quantity"
            );
        }
        let tls = self.broker_url.starts_with("https://");
        anyhow::ensure!(
            tls || self.broker_url.starts_with("http://"),
            "--broker-url: {:?} must start with https:// (or http:// for plaintext)",
            self.broker_url
        );
        let ca = self.broker_ca_configmap.trim();
        anyhow::ensure!(
            !tls || !ca.is_empty(),
            "--broker-ca-configmap: an https:// broker needs the ConfigMap with its CA bundle"
        );
        let run_as_user = match self.shim_run_as_user.trim() {
            "" => None,
            uid => Some(
                uid.parse::<i64>()
                    .ok()
                    .filter(|u| *u > 0)
                    .with_context(|| {
                        format!("--shim-run-as-user: {uid:?} is not a non-root UID")
                    })?,
            ),
        };
        Ok(InjectConfig {
            image: self.shim_image.clone(),
            broker_url: self.broker_url.clone(),
            broker_ca_configmap: (!ca.is_empty()).then(|| ca.to_string()),
            run_as_user,
            log_level: self.shim_log_level.clone(),
            log_format: self.shim_log_format,
            mode: self.sidecar_mode,
            cpu_request: self.shim_cpu_request.clone(),
            memory_request: self.shim_memory_request.clone(),
            memory_limit: self.shim_memory_limit.clone(),
        })
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Runs the injector until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let readiness = Readiness::new();
    readiness.register(CERT_READY);
    readiness.register(SERVING_READY);

    let config = args.inject_config()?;
    let (_config_tx, config_rx) = watch::channel(Arc::new(config));

    let hook_metrics = metrics.clone();
    let hook: ReloadHook = Arc::new(move |outcome: &ReloadOutcome| match outcome {
        ReloadOutcome::Reloaded { not_after } => {
            hook_metrics.record_tls_reload(true);
            hook_metrics.set_cert_not_after(*not_after);
        }
        ReloadOutcome::Rejected { .. } => hook_metrics.record_tls_reload(false),
    });
    let tls = TlsAcceptorSource::start(
        ServerTlsFiles::new(&args.tls_cert, &args.tls_key),
        ReloadOptions {
            on_reload: Some(hook),
            ..ReloadOptions::default()
        },
        shutdown.token(),
    )
    .context("loading the serving certificate")?;
    metrics.set_cert_not_after(tls.stats().not_after_unix());
    readiness.set_ready(CERT_READY);

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let admin_listener = TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding {}", args.admin_listen))?;

    // Waits for the signal apart from `shutdown`, which is only triggered after the
    // delay: until then requests are still served while /ready says no.
    let signal = Shutdown::new();
    let health = tokio::spawn(watch_health(tls.clone(), readiness.clone(), signal.clone()));
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        AdminState {
            registry: Arc::new(registry),
            readiness: readiness.clone(),
        },
        shutdown.clone(),
    ));
    let webhook = Webhook::new(config_rx, metrics).with_max_body_bytes(args.max_body_bytes);
    let server = tokio::spawn(server::serve(listener, tls, webhook, shutdown.clone()));
    readiness.set_ready(SERVING_READY);

    signal.on_signal().await;
    let _ = health.await;
    readiness.set_not_ready(SERVING_READY, "shutting down");
    tokio::time::sleep(args.shutdown_delay).await;
    shutdown.trigger();
    let _ = server.await;
    let _ = admin.await;
    if !shutdown.drain(args.drain_timeout).await {
        tracing::warn!("some webhook connections were still open at the drain deadline");
    }
    tracing::info!("injector stopped");
    Ok(())
}

/// Periodic check: the serving certificate in force must not be expired (readiness).
async fn watch_health(tls: TlsAcceptorSource, readiness: Readiness, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tick.tick() => {}
        }
        let not_after = tls.current().not_after_unix();
        if not_after <= unix_now() {
            readiness.set_not_ready(
                CERT_READY,
                format!("serving certificate expired at {}", format_unix(not_after)),
            );
        } else {
            readiness.set_ready(CERT_READY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_contract() {
        let args = Args::try_parse_from(["etcd-shim-injector"]).unwrap();
        assert_eq!(args.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(args.admin_listen, "0.0.0.0:9381".parse().unwrap());
        assert_eq!(
            args.broker_url,
            "https://etcd-shim-broker.etcd-shim.svc:2379"
        );
        assert_eq!(args.sidecar_mode, SidecarMode::Native);
        assert_eq!(args.shim_image, default_image());
        assert_eq!(args.max_body_bytes, 3 * 1024 * 1024);
        assert_eq!(args.shutdown_delay, Duration::from_secs(5));
        let cfg = args.inject_config().unwrap();
        assert_eq!(
            cfg.broker_ca_configmap.as_deref(),
            Some("etcd-shim-broker-ca")
        );
        assert_eq!(cfg.run_as_user, Some(65532));
        assert_eq!(cfg.cpu_request, "10m");
        assert_eq!(cfg.memory_request, "16Mi");
        assert_eq!(cfg.memory_limit, "64Mi");
    }

    #[test]
    fn flags_are_parsed() {
        let args = Args::try_parse_from([
            "etcd-shim-injector",
            "--listen",
            "127.0.0.1:18443",
            "--sidecar-mode",
            "classic",
            "--shim-image",
            "registry.example/shim:dev",
            "--shim-log-format",
            "json",
            "--shim-memory-limit",
            "128Mi",
            "--drain-timeout",
            "250ms",
        ])
        .unwrap();
        assert_eq!(args.listen, "127.0.0.1:18443".parse().unwrap());
        assert_eq!(args.sidecar_mode, SidecarMode::Classic);
        assert_eq!(args.drain_timeout, Duration::from_millis(250));
        let cfg = args.inject_config().unwrap();
        assert_eq!(cfg.image, "registry.example/shim:dev");
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.memory_limit, "128Mi");
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(
            Args::try_parse_from(["etcd-shim-injector", "--sidecar-mode", "sideways"]).is_err()
        );
        assert!(Args::try_parse_from(["etcd-shim-injector", "--listen", "nowhere"]).is_err());
        assert!(
            Args::try_parse_from(["etcd-shim-injector", "--drain-timeout", "3 parsecs"]).is_err()
        );
        let args =
            Args::try_parse_from(["etcd-shim-injector", "--shim-cpu-request", "lots"]).unwrap();
        let err = args.inject_config().unwrap_err().to_string();
        assert!(err.contains("--shim-cpu-request"), "{err}");
    }

    #[test]
    fn tls_needs_a_ca_configmap_and_ids_may_be_left_unset() {
        let parse = |extra: &[&str]| {
            let mut v = vec!["etcd-shim-injector"];
            v.extend_from_slice(extra);
            Args::try_parse_from(v).unwrap().inject_config()
        };
        let err = parse(&["--broker-ca-configmap", ""])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--broker-ca-configmap"), "{err}");
        let cfg = parse(&[
            "--broker-url",
            "http://b.dev.svc:2379",
            "--broker-ca-configmap",
            "",
        ])
        .unwrap();
        assert_eq!(cfg.broker_ca_configmap, None);
        let err = parse(&["--broker-url", "b.dev.svc:2379"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("https://"), "{err}");

        assert_eq!(
            parse(&["--shim-run-as-user", ""]).unwrap().run_as_user,
            None
        );
        assert_eq!(
            parse(&["--shim-run-as-user", "1000"]).unwrap().run_as_user,
            Some(1000)
        );
        for bad in ["0", "root", "-1"] {
            let flag = format!("--shim-run-as-user={bad}");
            let err = parse(&[&flag]).unwrap_err().to_string();
            assert!(err.contains("--shim-run-as-user"), "{bad}: {err}");
        }
    }
}
