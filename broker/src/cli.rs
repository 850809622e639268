//! The broker's command line and its wiring: [`Args`] are its flags, [`run`] builds the
//! broker from them and serves until shutdown. `main.rs` only parses and maps the exit
//! code, so tests run the broker in-process, as an operator would start it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{Authenticator, StaticTokens};
use crate::config;
use crate::jwt::{self, Jwks, JwtVerifier};
use crate::leaseid::LeaseSecrets;
use crate::metrics::Metrics;
use crate::metrics::Reloaded;
use crate::tokenreview::TokenReviewer;
use crate::upstream::{Connector, Upstream};
use crate::{Broker, BrokerConfig};
use anyhow::Context;
use clap::Parser;
use etcd_shim_core::admin::{self, AdminState, Readiness};
use etcd_shim_core::follow::{Follow, Outcome, ReadError, StartError};
use etcd_shim_core::logging::LogFormat;
use etcd_shim_core::shutdown::Shutdown;
use etcd_shim_core::tls::ClientTlsFiles;
use etcd_shim_core::tls::{
    ReloadHook, ReloadOptions, ReloadOutcome, ServerTlsFiles, TlsAcceptorSource,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "etcd-shim-broker", version, about)]
pub struct Args {
    /// Address for the gRPC API that shims call. Served over TLS with --tls-cert-file
    /// and --tls-key-file; without them in plaintext h2c, for local development only
    /// (shims then need --broker-insecure-plaintext).
    #[arg(long, env = "ETCD_SHIM_BROKER_LISTEN", default_value = "0.0.0.0:2379")]
    pub listen: SocketAddr,
    /// PEM certificate chain the gRPC port serves; reloaded when it changes (new
    /// connections get the new one; broken material is refused and the old one stays).
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_TLS_CERT_FILE",
        requires = "tls_key_file"
    )]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file; reloaded with it.
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_TLS_KEY_FILE",
        requires = "tls_cert_file"
    )]
    tls_key_file: Option<PathBuf>,

    /// Address for /metrics, /live and /ready. Loopback unless told otherwise: /metrics
    /// shows the usage of the tenants the config names, which other tenants must not
    /// read. In a pod, listen on 0.0.0.0 for the kubelet's probes and let a NetworkPolicy
    /// admit only the monitoring namespace to the port (the Helm chart does both).
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_ADMIN_LISTEN",
        default_value = "127.0.0.1:9380"
    )]
    pub admin_listen: SocketAddr,
    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,
    /// CA bundle (PEM) that etcd's serving certificate must chain to; required for
    /// https:// endpoints. Like the certificate and key it is followed on disk: new
    /// valid files are used for new connections without failing calls in flight.
    #[arg(long, env = "ETCD_SHIM_BROKER_ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM chain) presented to etcd; needs --etcd-key-file. It must
    /// chain to --etcd-ca-file, match the key and not be expired, or it is refused (the
    /// previous one stays in force after start-up).
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_ETCD_CERT_FILE",
        requires = "etcd_key_file"
    )]
    etcd_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert-file.
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_ETCD_KEY_FILE",
        requires = "etcd_cert_file"
    )]
    etcd_key_file: Option<PathBuf>,
    /// How shims are authenticated. Default: `static` when --static-tokens-file is
    /// given, otherwise `tokenreview`.
    #[arg(long, env = "ETCD_SHIM_BROKER_AUTH_MODE", value_enum)]
    auth_mode: Option<AuthMode>,
    /// Development mode: a file of `<token> <namespace>/<serviceaccount>` lines.
    #[arg(long, env = "ETCD_SHIM_BROKER_STATIC_TOKENS_FILE")]
    static_tokens_file: Option<PathBuf>,
    /// The audience shims' projected tokens are minted for.
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_TOKEN_AUDIENCE",
        default_value = "etcd-shim"
    )]
    token_audience: String,
    /// jwks mode: the service-account issuer's key set (JSON Web Key Set) as a file,
    /// reloaded when it changes. Without it the keys are read from the API server's
    /// /openid/v1/jwks.
    #[arg(long, env = "ETCD_SHIM_BROKER_JWKS_FILE")]
    jwks_file: Option<PathBuf>,
    /// jwks mode: the cluster's service-account issuer (the `iss` of its tokens, the API
    /// server's --service-account-issuer).
    #[arg(long, env = "ETCD_SHIM_BROKER_ISSUER")]
    issuer: Option<String>,
    /// Broker config file (backends, tenant rules); reloaded when it changes. Without
    /// it every tenant lives under --tenant-prefix-root on --etcd-endpoints.
    #[arg(long, env = "ETCD_SHIM_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// How often the config and key files are re-read even without a change event
    /// (and how often keys are refreshed from the API server).
    #[arg(long, env = "ETCD_SHIM_BROKER_RELOAD_INTERVAL", default_value = "30s", value_parser = etcd_shim_core::parse_duration)]
    reload_interval: Duration,
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
    /// Broker-private prefix for the tenants' compaction records.
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_COMPACTION_PREFIX",
        default_value = "/etcd-shim/compactions/"
    )]
    compaction_prefix: String,
    /// The etcd of --etcd-endpoints serves etcd-shim alone: the broker compacts it at the
    /// lowest revision its tenants compacted. Never for the cluster's own etcd.
    #[arg(long, env = "ETCD_SHIM_BROKER_ETCD_DEDICATED")]
    etcd_dedicated: bool,
    /// How often a dedicated backend is compacted (by one broker replica at a time).
    #[arg(long, env = "ETCD_SHIM_BROKER_DEDICATED_COMPACTION_INTERVAL", default_value = "5m", value_parser = etcd_shim_core::parse_duration)]
    dedicated_compaction_interval: Duration,
    /// Client URLs that MemberList reports to clients calling the broker directly.
    #[arg(
        long,
        env = "ETCD_SHIM_BROKER_ADVERTISE_CLIENT_URLS",
        value_delimiter = ','
    )]
    advertise_client_urls: Vec<String>,
    /// File with the secret that keys the lease IDs tenants see, one per line: the
    /// current secret first, then earlier ones still accepted (docs/semantics.md says how
    /// to rotate). Every replica must read the same file. Without it each process makes
    /// up its own, so lease IDs change when it restarts and replicas disagree.
    #[arg(long, env = "ETCD_SHIM_BROKER_LEASE_ID_SECRET_FILE")]
    lease_id_secret_file: Option<PathBuf>,
    /// How long a client may leave a stream's answers untaken (Watch, LeaseKeepAlive,
    /// RangeStream, Observe) before the broker ends the stream with Unavailable, frees
    /// what it held and cancels the etcd stream behind it.
    #[arg(long, env = "ETCD_SHIM_BROKER_SLOW_CLIENT_TIMEOUT", default_value = "30s", value_parser = etcd_shim_core::parse_duration)]
    slow_client_timeout: Duration,
    /// Broker replicas serving the same tenants (the Deployment's replica count). Each
    /// enforces 1/N of every tenant's rate, concurrency and watch limits, so that
    /// together they allow the limits and no more; leases, keys and bytes are counted in
    /// etcd and need no division. See docs/broker-config.md#limits-across-replicas.
    #[arg(long, env = "ETCD_SHIM_BROKER_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    replicas: u32,
    /// Threads that serve calls; 0 (the default) means one per CPU. 1 runs the whole
    /// broker on one thread, which costs less CPU per call (no call moves between
    /// threads), but one thread falls behind sooner when the node's CPU is contended.
    #[arg(long, env = "ETCD_SHIM_BROKER_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// How long open calls may take to finish after SIGTERM.
    #[arg(long, env = "ETCD_SHIM_BROKER_DRAIN_TIMEOUT", default_value = "10s", value_parser = etcd_shim_core::parse_duration)]
    drain_timeout: Duration,
    #[arg(long, env = "ETCD_SHIM_BROKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Log filter in RUST_LOG syntax; empty means RUST_LOG or the default.
    #[arg(long, env = "ETCD_SHIM_BROKER_LOG_LEVEL", default_value = "")]
    pub log_level: String,
}

/// How the broker verifies the shims' bearer tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AuthMode {
    /// A file of fixed tokens: development and tests only.
    Static,
    /// Ask the API server (TokenReview); sees revoked tokens. Needs RBAC to create
    /// tokenreviews.
    Tokenreview,
    /// Verify signatures locally against the issuer's keys; no API call per token.
    Jwks,
}

impl Args {
    /// The runtime `--worker-threads` asks for: tokio's single-threaded one for 1, its
    /// multi-threaded one otherwise.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = match self.worker_threads {
            1 => tokio::runtime::Builder::new_current_thread(),
            0 => tokio::runtime::Builder::new_multi_thread(),
            n => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(n);
                b
            }
        };
        builder.enable_all().build()
    }

    /// The default backend's client TLS files, if any is given.
    fn etcd_tls(&self) -> Option<ClientTlsFiles> {
        let files = ClientTlsFiles {
            ca: self.etcd_ca_file.clone(),
            cert: self.etcd_cert_file.clone(),
            key: self.etcd_key_file.clone(),
        };
        (files != ClientTlsFiles::default()).then_some(files)
    }

    /// The auth mode in force, after checking the flags it needs are there.
    fn auth_mode(&self) -> Result<AuthMode, String> {
        let mode = self
            .auth_mode
            .unwrap_or(if self.static_tokens_file.is_some() {
                AuthMode::Static
            } else {
                AuthMode::Tokenreview
            });
        match mode {
            AuthMode::Static if self.static_tokens_file.is_none() => {
                Err("--auth-mode static needs --static-tokens-file".into())
            }
            AuthMode::Jwks if self.issuer.is_none() => {
                Err("--auth-mode jwks needs --issuer".into())
            }
            m => Ok(m),
        }
    }
}

pub use etcd_shim_core::serve::Listeners;

/// Runs the broker on `listeners` until `shutdown` is triggered, then drains calls for
/// up to `--drain-timeout`. Errors are what stops it from starting (flags, files,
/// credentials) or from serving.
pub async fn run(args: Args, listeners: Listeners, shutdown: Shutdown) -> anyhow::Result<()> {
    let mode = args.auth_mode().map_err(anyhow::Error::msg)?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let tls = serving_tls(&args, &metrics, &shutdown)?;
    let upstream = Upstream::start(
        config::IMPLICIT_BACKEND,
        &args.etcd_endpoints,
        args.etcd_tls(),
        &Connector::new(metrics.clone(), shutdown.token()),
    )
    .context("etcd connections (--etcd-endpoints, --etcd-*-file)")?;
    let auth = authenticator(&args, mode, &metrics, &shutdown).await?;
    let cfg = BrokerConfig {
        tenant_prefix_root: args.tenant_prefix_root.clone(),
        lease_prefix: args.lease_prefix.clone(),
        compaction_prefix: args.compaction_prefix.clone(),
        etcd_dedicated: args.etcd_dedicated,
        advertise_client_urls: args.advertise_client_urls.clone(),
        lease_secrets: match &args.lease_id_secret_file {
            Some(path) => LeaseSecrets::from_file(path)?,
            None => {
                tracing::warn!(
                    "no --lease-id-secret-file: lease IDs are this process's own, so they \
                     change when it restarts and differ between replicas"
                );
                LeaseSecrets::ephemeral()
            }
        },
        slow_client_timeout: args.slow_client_timeout,
        replicas: args.replicas,
    };
    let broker = Broker::new(&cfg, auth, upstream, metrics, shutdown.token())?;
    broker.register_metrics(&mut registry);
    // The file is followed for as long as this receiver is held.
    let _config = match &args.config {
        Some(path) => {
            // A broken file at start-up is fatal: starting without its deny rules could let
            // in tenants the operator meant to keep out.
            let followed = follow_config(
                broker.clone(),
                path.clone(),
                args.reload_interval,
                shutdown.token(),
            )
            .with_context(|| format!("broker config {}", path.display()))?;
            let file = followed.borrow().clone();
            tracing::info!(
                path = %path.display(),
                backends = file.backends.len(),
                rules = file.tenants.len(),
                "broker config loaded"
            );
            Some(followed)
        }
        None => None,
    };

    let readiness = Readiness::new();
    readiness.register("etcd");
    let Listeners {
        api: listener,
        admin: admin_listener,
    } = listeners;
    tokio::spawn(admin::serve(
        admin_listener,
        AdminState {
            registry: Arc::new(registry),
            readiness: readiness.clone(),
        },
        shutdown.clone(),
    ));
    tokio::spawn(probe_loop(broker.clone(), readiness, shutdown.clone()));
    tokio::spawn(
        broker
            .clone()
            .compact_dedicated(args.dedicated_compaction_interval, shutdown.token()),
    );
    let server = match tls {
        Some(tls) => tokio::spawn(crate::serve_tls(listener, tls, broker, shutdown.token())),
        None => {
            tracing::warn!("serving gRPC in plaintext (no --tls-cert-file): development only");
            tokio::spawn(crate::serve(listener, broker, shutdown.token()))
        }
    };
    shutdown.triggered().await;
    match tokio::time::timeout(args.drain_timeout, server).await {
        Ok(res) => res.context("server task")?.context("serving")?,
        Err(_) => tracing::warn!("drain deadline passed, exiting with calls still open"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Loads the gRPC port's serving certificate, if configured, and keeps it current.
fn serving_tls(
    args: &Args,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<TlsAcceptorSource>> {
    let (Some(cert), Some(key)) = (&args.tls_cert_file, &args.tls_key_file) else {
        return Ok(None);
    };
    let files = ServerTlsFiles::new(cert, key).with_alpn(&[b"h2"]);
    let m = metrics.clone();
    let hook: ReloadHook = Arc::new(move |outcome: &ReloadOutcome| match outcome {
        ReloadOutcome::Reloaded { not_after } => {
            m.reloaded(Reloaded::Tls, true);
            m.tls_not_after.set(*not_after);
        }
        ReloadOutcome::Rejected { .. } => m.reloaded(Reloaded::Tls, false),
    });
    let tls = TlsAcceptorSource::start(
        files,
        ReloadOptions {
            on_reload: Some(hook),
            recheck_every: args.reload_interval,
            ..ReloadOptions::default()
        },
        shutdown.token(),
    )
    .context("broker serving certificate")?;
    metrics.tls_not_after.set(tls.stats().not_after_unix());
    // Both outcomes show up in a scrape from the start, at zero.
    for ok in [true, false] {
        metrics.reload_count(Reloaded::Tls, ok);
    }
    Ok(Some(tls))
}

/// Builds the authenticator for `mode`, with whatever background reloading it needs.
async fn authenticator(
    args: &Args,
    mode: AuthMode,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> anyhow::Result<Arc<dyn Authenticator>> {
    Ok(match mode {
        AuthMode::Static => {
            let path = args
                .static_tokens_file
                .as_deref()
                .context("--static-tokens-file")?;
            let tokens = StaticTokens::load(path)?;
            tracing::warn!(
                tokens = tokens.len(),
                "static token file in use: development mode only"
            );
            Arc::new(tokens)
        }
        AuthMode::Tokenreview => {
            let client = kube::Client::try_default()
                .await
                .context("Kubernetes client for TokenReview (in-cluster or kubeconfig)")?;
            tracing::info!(audience = %args.token_audience, "authenticating shims by TokenReview");
            Arc::new(TokenReviewer::new(
                client,
                &args.token_audience,
                metrics.clone(),
            ))
        }
        AuthMode::Jwks => {
            let issuer = args.issuer.as_deref().context("--issuer")?;
            let verifier = match &args.jwks_file {
                Some(path) => {
                    let v = Arc::new(
                        JwtVerifier::new(issuer, &args.token_audience, Jwks::default())
                            .with_metrics(metrics.clone()),
                    );
                    v.follow_file(
                        path.clone(),
                        args.reload_interval,
                        metrics.clone(),
                        shutdown.token(),
                    )
                    .with_context(|| format!("issuer keys {}", path.display()))?;
                    v
                }
                None => {
                    let client = kube::Client::try_default().await.context(
                        "Kubernetes client for the issuer keys (in-cluster or kubeconfig)",
                    )?;
                    let keys = jwt::fetch_jwks(&client)
                        .await
                        .map_err(anyhow::Error::msg)
                        .context("reading the issuer keys from /openid/v1/jwks")?;
                    let v = Arc::new(
                        JwtVerifier::new(issuer, &args.token_audience, keys)
                            .with_metrics(metrics.clone()),
                    );
                    v.follow_api_server(
                        client,
                        args.reload_interval,
                        metrics.clone(),
                        shutdown.token(),
                    );
                    v
                }
            };
            tracing::info!(%issuer, audience = %args.token_audience, "verifying shim tokens locally");
            verifier
        }
    })
}

/// Applies the file at `path` to `broker` now, failing if it is refused (start-up must not
/// go on without its deny rules), then re-applies it whenever it changes (directory watch
/// plus a re-read every `every`) until `stop` or until the returned receiver is dropped.
/// Applying is the validation: the broker refuses a file without changing anything, so a
/// refused file leaves the running config as it was, with an error log line and
/// `etcd_broker_config_reloads_total{outcome="failure"}`.
fn follow_config(
    broker: Broker,
    path: PathBuf,
    every: Duration,
    stop: CancellationToken,
) -> Result<watch::Receiver<Arc<config::ConfigFile>>, config::ConfigError> {
    let shown = path.display().to_string();
    let metrics = broker.metrics().clone();
    let apply = move |contents: &[Vec<u8>]| {
        let text = std::str::from_utf8(&contents[0])
            .map_err(|e| config::ConfigError::Syntax(e.to_string()))?;
        let file = config::ConfigFile::parse(text)?;
        broker.apply_config(&file)?;
        Ok(file)
    };
    let on_outcome = {
        let shown = shown.clone();
        move |outcome: Outcome<'_, config::ConfigFile, config::ConfigError>| match outcome {
            Outcome::Published(_) => {
                tracing::info!(path = %shown, "broker config reloaded");
                metrics.reloaded(Reloaded::Config, true);
            }
            Outcome::Rejected(_) | Outcome::Unreadable(_) => {
                metrics.reloaded(Reloaded::Config, false);
            }
            Outcome::Unchanged => {}
        }
    };
    Follow::new([&path], apply)
        .every(every)
        .refusal(
            tracing::Level::ERROR,
            "broker config refused; keeping the previous config",
        )
        .on_outcome(on_outcome)
        .start(stop)
        .map_err(|e| match e {
            StartError::Parse(e) => e,
            StartError::Read(e) => config::ConfigError::Read {
                path: shown,
                error: match e {
                    ReadError::Io { error, .. } => error.to_string(),
                    e => e.to_string(),
                },
            },
        })
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
        // Found by a security review: the admin port, and with it every named tenant's
        // usage, was open to the pod network by default.
        assert!(a.admin_listen.ip().is_loopback(), "{}", a.admin_listen);
        assert_eq!(a.drain_timeout, Duration::from_secs(10));
        assert_eq!(
            a.auth_mode(),
            Ok(AuthMode::Static),
            "a token file means static"
        );
        assert_eq!(a.token_audience, "etcd-shim");
        assert_eq!(a.reload_interval, Duration::from_secs(30));
        assert_eq!(a.config, None);
        assert_eq!(
            a.tls_cert_file, None,
            "plaintext unless a certificate is given"
        );
        assert_eq!(
            a.etcd_tls(),
            None,
            "plaintext to etcd unless a TLS file is given"
        );
    }

    #[test]
    fn tls_flags_go_together() {
        let parse = |extra: &[&str]| {
            let mut v = vec!["b", "--static-tokens-file", "/t"];
            v.extend_from_slice(extra);
            Args::try_parse_from(v)
        };
        let a = parse(&["--tls-cert-file", "/c", "--tls-key-file", "/k"]).unwrap();
        assert_eq!(a.tls_cert_file.as_deref(), Some(std::path::Path::new("/c")));
        assert_eq!(a.tls_key_file.as_deref(), Some(std::path::Path::new("/k")));
        assert!(
            parse(&["--tls-cert-file", "/c"]).is_err(),
            "a key is needed"
        );
        assert!(
            parse(&["--tls-key-file", "/k"]).is_err(),
            "a certificate is needed"
        );
    }

    #[test]
    fn etcd_tls_flags() {
        let a = Args::try_parse_from([
            "b",
            "--etcd-endpoints",
            "https://a:2379",
            "--etcd-ca-file",
            "/s/ca.crt",
            "--etcd-cert-file",
            "/s/tls.crt",
            "--etcd-key-file",
            "/s/tls.key",
        ])
        .unwrap();
        assert_eq!(
            a.etcd_tls(),
            Some(ClientTlsFiles {
                ca: Some("/s/ca.crt".into()),
                cert: Some("/s/tls.crt".into()),
                key: Some("/s/tls.key".into()),
            })
        );
        let ca_only = Args::try_parse_from(["b", "--etcd-ca-file", "/s/ca.crt"]).unwrap();
        assert_eq!(ca_only.etcd_tls().unwrap().cert, None);
        assert!(
            Args::try_parse_from(["b", "--etcd-cert-file", "/s/tls.crt"]).is_err(),
            "a certificate needs its key"
        );
        assert!(Args::try_parse_from(["b", "--etcd-key-file", "/s/tls.key"]).is_err());
    }

    #[test]
    fn auth_mode_selection() {
        let mode = |args: &[&str]| {
            let mut v = vec!["b"];
            v.extend_from_slice(args);
            Args::try_parse_from(v).unwrap().auth_mode()
        };
        assert_eq!(mode(&[]), Ok(AuthMode::Tokenreview));
        assert_eq!(
            mode(&["--auth-mode", "tokenreview", "--token-audience", "x"]),
            Ok(AuthMode::Tokenreview)
        );
        assert!(mode(&["--auth-mode", "static"]).is_err());
        assert!(mode(&["--auth-mode", "jwks"]).is_err(), "issuer required");
        assert_eq!(
            mode(&[
                "--auth-mode",
                "jwks",
                "--issuer",
                "https://k",
                "--jwks-file",
                "/k.json"
            ]),
            Ok(AuthMode::Jwks)
        );
        assert!(Args::try_parse_from(["b", "--auth-mode", "oidc"]).is_err());
        let a = Args::try_parse_from(["b", "--config", "/etc/etcd-shim/broker.yaml"]).unwrap();
        assert_eq!(
            a.config.as_deref(),
            Some(std::path::Path::new("/etc/etcd-shim/broker.yaml"))
        );
    }

    /// Polls `f` every 10 ms for at most 5 s.
    async fn eventually(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..500 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn reload_follows_the_file_and_keeps_the_old_config_when_broken() {
        use crate::auth::{Identity, StaticTokens};
        use crate::metrics::Metrics;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.yaml");
        let first = "backends: [{name: second, endpoints: ['http://127.0.0.1:2']}]\ntenants: [{namespace: a, backend: second}]\n";
        std::fs::write(&path, first).unwrap();
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        let broker = Broker::new(
            &BrokerConfig::default(),
            Arc::new(StaticTokens::default()),
            Upstream::new(&["http://127.0.0.1:1".into()]).unwrap(),
            metrics.clone(),
            CancellationToken::new(),
        )
        .unwrap();
        let stop = CancellationToken::new();
        // A long period: the directory watch must notice the writes.
        let _config = follow_config(
            broker.clone(),
            path.clone(),
            Duration::from_secs(3600),
            stop.clone(),
        )
        .unwrap();
        let backend = |who: &str| {
            broker
                .resolve(&Identity::parse(who).unwrap())
                .map(|t| t.backend.to_string())
        };
        assert_eq!(backend("a/x").as_deref(), Some("second"));
        assert_eq!(backend("b/x").as_deref(), Some("default"));

        // Broken: overlapping prefixes. Refused, counted, old config still routes.
        std::fs::write(
            &path,
            "tenants: [{namespace: a, serviceAccount: x, prefix: /p/}, {namespace: b, serviceAccount: x, prefix: /p/q/}]",
        )
        .unwrap();
        assert!(eventually(|| metrics.reload_count(Reloaded::Config, false) == 1).await);
        assert_eq!(backend("a/x").as_deref(), Some("second"));

        // Not even YAML: refused too.
        std::fs::write(&path, "tenants: [unclosed").unwrap();
        assert!(eventually(|| metrics.reload_count(Reloaded::Config, false) == 2).await);
        assert_eq!(backend("a/x").as_deref(), Some("second"));

        // A new rule is picked up: b goes to the second backend, c is denied.
        std::fs::write(
            &path,
            "backends: [{name: second, endpoints: ['http://127.0.0.1:2']}]\ntenants: [{namespace: a, backend: second}, {namespace: b, backend: second}, {namespace: c, action: deny}]\n",
        )
        .unwrap();
        assert!(eventually(|| backend("b/x").as_deref() == Some("second")).await);
        assert_eq!(backend("c/x"), None);
        assert_eq!(metrics.reload_count(Reloaded::Config, true), 1);
        stop.cancel();
    }
}
