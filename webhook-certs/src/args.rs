//! Command-line flags. Every flag is also read from an environment variable
//! `ETCD_SHIM_WEBHOOK_CERTS_<SETTING>`, which is how the Helm Job sets them.

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use etcd_shim_core::logging::LogFormat;

use crate::certs::Policy;
use crate::distribute::Target;
use crate::reconcile::Config;

/// Where Kubernetes puts the pod's own namespace for in-cluster clients.
pub const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// Namespace used outside a pod when no flag says otherwise.
pub const DEFAULT_NAMESPACE: &str = "etcd-shim";

/// Creates the injector webhook's CA and serving certificate, stores them in a Secret and
/// keeps the webhook configuration's caBundle in sync; renews them when due.
#[derive(Clone, Debug, Parser)]
#[command(name = "etcd-shim-webhook-certs", version, about)]
pub struct Args {
    /// Namespace of the injector Service and the Secret [default: the pod's own namespace,
    /// else etcd-shim].
    #[arg(long, env = "ETCD_SHIM_WEBHOOK_CERTS_NAMESPACE")]
    pub namespace: Option<String>,

    /// Name of the injector's Service; the serving certificate covers its DNS names.
    #[arg(
        long,
        env = "ETCD_SHIM_WEBHOOK_CERTS_SERVICE",
        default_value = "etcd-shim-injector"
    )]
    pub service: String,

    /// Cluster DNS domain, for the `<svc>.<ns>.svc.<domain>` name (empty to leave it out).
    #[arg(
        long,
        env = "ETCD_SHIM_WEBHOOK_CERTS_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,

    /// Secret that holds tls.crt, tls.key, ca.crt and ca.key.
    #[arg(
        long,
        env = "ETCD_SHIM_WEBHOOK_CERTS_SECRET",
        default_value = "etcd-shim-injector-tls"
    )]
    pub secret: String,

    /// MutatingWebhookConfiguration whose webhooks get the CA bundle as caBundle; empty for
    /// a certificate that no webhook serves (the broker's).
    #[arg(
        long,
        env = "ETCD_SHIM_WEBHOOK_CERTS_WEBHOOK",
        default_value = "etcd-shim-injector"
    )]
    pub webhook: String,

    /// Lifetime of a new CA (units s, m, h, d; e.g. 3650d).
    #[arg(
        long,
        env = "ETCD_SHIM_WEBHOOK_CERTS_CA_VALIDITY",
        default_value = "3650d",
        value_parser = parse_duration
    )]
    pub ca_validity: Duration,

    /// Lifetime of a new serving certificate (never longer than the CA's remaining one).
    #[arg(
        long,
        env = "ETCD_SHIM_WEBHOOK_CERTS_SERVING_VALIDITY",
        default_value = "365d",
        value_parser = parse_duration
    )]
    pub serving_validity: Duration,

    /// Renew a certificate once less than this fraction of its lifetime is left
    /// (`1/3` or `0.33`).
    #[arg(
        long,
        env = "ETCD_SHIM_WEBHOOK_CERTS_RENEW_FRACTION",
        default_value = "1/3",
        value_parser = parse_fraction
    )]
    pub renew_fraction: f64,

    /// After a CA rotation, how long the previous CA stays in the bundle so that injector
    /// pods still serving the old certificate remain trusted.
    #[arg(
        long,
        env = "ETCD_SHIM_WEBHOOK_CERTS_CA_OVERLAP",
        default_value = "24h",
        value_parser = parse_duration
    )]
    pub ca_overlap: Duration,

    /// If the MutatingWebhookConfiguration does not exist, write the Secret, warn and
    /// succeed instead of failing (for a pre-install hook; a later run patches it).
    #[arg(long, env = "ETCD_SHIM_WEBHOOK_CERTS_SKIP_MISSING_WEBHOOK")]
    pub skip_missing_webhook: bool,

    /// ConfigMap that receives the CA bundle (key ca.crt) in every namespace matching
    /// --ca-namespace-selector, so injected shims can mount it; unset writes none.
    #[arg(long, env = "ETCD_SHIM_WEBHOOK_CERTS_CA_CONFIGMAP")]
    pub ca_configmap: Option<String>,

    /// Label selector of the namespaces that get the --ca-configmap.
    #[arg(
        long,
        env = "ETCD_SHIM_WEBHOOK_CERTS_CA_NAMESPACE_SELECTOR",
        default_value = "etcd-shim.io/inject=enabled"
    )]
    pub ca_namespace_selector: String,

    /// Keep running and reconcile every INTERVAL (e.g. 12h); without it, run once and exit.
    #[arg(long, env = "ETCD_SHIM_WEBHOOK_CERTS_INTERVAL", value_parser = parse_duration)]
    pub interval: Option<Duration>,

    /// Log line format.
    #[arg(
        long,
        env = "ETCD_SHIM_WEBHOOK_CERTS_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Plain
    )]
    pub log_format: LogFormat,

    /// Log filter in RUST_LOG syntax; empty uses RUST_LOG, then the project default.
    #[arg(long, env = "ETCD_SHIM_WEBHOOK_CERTS_LOG_LEVEL", default_value = "")]
    pub log_level: String,
}

impl Args {
    /// The run configuration, resolving the namespace from the pod when not given.
    pub fn config(&self) -> Config {
        self.config_with_namespace_file(Path::new(POD_NAMESPACE_FILE))
    }

    /// Like [`Args::config`], reading the pod namespace from `namespace_file`.
    pub fn config_with_namespace_file(&self, namespace_file: &Path) -> Config {
        let namespace = resolve_namespace(self.namespace.as_deref(), namespace_file);
        let dns_names = Policy::service_dns_names(&self.service, &namespace, &self.cluster_domain);
        Config {
            policy: Policy {
                common_name: format!("{}.{namespace}.svc", self.service),
                ca_name: format!("{}-ca", self.service),
                dns_names,
                ca_validity: to_time(self.ca_validity),
                serving_validity: to_time(self.serving_validity),
                renew_fraction: self.renew_fraction,
                ca_overlap: to_time(self.ca_overlap),
            },
            namespace,
            secret_name: self.secret.clone(),
            webhook_name: self.webhook.clone(),
            skip_missing_webhook: self.skip_missing_webhook,
            ca_target: self
                .ca_configmap
                .as_deref()
                .filter(|n| !n.is_empty())
                .map(|configmap| Target {
                    configmap: configmap.to_string(),
                    namespace_selector: self.ca_namespace_selector.clone(),
                }),
        }
    }
}

/// Flag or env first, then the pod's namespace file, then [`DEFAULT_NAMESPACE`].
pub fn resolve_namespace(flag: Option<&str>, namespace_file: &Path) -> String {
    if let Some(ns) = flag.map(str::trim).filter(|ns| !ns.is_empty()) {
        return ns.to_string();
    }
    std::fs::read_to_string(namespace_file)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

/// `parse_duration` caps values far below `time::Duration`'s range, so this never saturates.
fn to_time(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// Longest accepted duration: 1000 years keeps every date arithmetic far from overflow.
const MAX_DURATION_SECS: u64 = 1000 * 365 * 86_400;

/// Parses a duration as every etcd-shim flag does (`etcd_shim_core::parse_duration`:
/// `90d`, `12h`, `1h30m`, `45s`). Zero is rejected: every duration here is a lifetime or
/// a period.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = etcd_shim_core::parse_duration(text)?;
    if d.is_zero() {
        return Err(format!(
            "invalid duration {:?}: must be more than zero",
            text.trim()
        ));
    }
    if d.as_secs() > MAX_DURATION_SECS {
        return Err(format!(
            "invalid duration {:?}: longer than 1000 years",
            text.trim()
        ));
    }
    Ok(d)
}

/// Parses `1/3` or `0.33`; the value must lie strictly between 0 and 1.
pub fn parse_fraction(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let value = match text.split_once('/') {
        Some((num, den)) => {
            let num: f64 = num
                .trim()
                .parse()
                .map_err(|_| format!("invalid fraction {text:?}"))?;
            let den: f64 = den
                .trim()
                .parse()
                .map_err(|_| format!("invalid fraction {text:?}"))?;
            num / den
        }
        None => text
            .parse()
            .map_err(|_| format!("invalid fraction {text:?}"))?,
    };
    if value > 0.0 && value < 1.0 {
        Ok(value)
    } else {
        Err(format!("fraction {text:?} must be between 0 and 1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // clap also reads ETCD_SHIM_WEBHOOK_CERTS_* for unset flags; nothing sets them in
    // tests (changing the environment of a running test process is unsafe).
    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("etcd-shim-webhook-certs").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.service, "etcd-shim-injector");
        assert_eq!(args.secret, "etcd-shim-injector-tls");
        assert_eq!(args.webhook, "etcd-shim-injector");
        assert_eq!(args.cluster_domain, "cluster.local");
        assert_eq!(args.ca_validity, Duration::from_secs(3650 * 86_400));
        assert_eq!(args.serving_validity, Duration::from_secs(365 * 86_400));
        assert!((args.renew_fraction - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(args.ca_overlap, Duration::from_secs(24 * 3600));
        assert_eq!(args.interval, None);
        assert!(!args.skip_missing_webhook);
        assert_eq!(args.log_format, LogFormat::Plain);
        assert_eq!(args.config().ca_target, None, "no ConfigMaps unless asked");
    }

    #[test]
    fn broker_certificate_without_webhook_and_with_distributed_bundle() {
        let args = parse(&[
            "--namespace",
            "sys",
            "--service",
            "etcd-shim-broker",
            "--secret",
            "etcd-shim-broker-tls",
            "--webhook",
            "",
            "--ca-configmap",
            "etcd-shim-broker-ca",
        ])
        .unwrap();
        let config = args.config_with_namespace_file(Path::new("/nonexistent"));
        assert_eq!(config.webhook_name, "");
        assert_eq!(
            config.ca_target,
            Some(Target {
                configmap: "etcd-shim-broker-ca".into(),
                namespace_selector: "etcd-shim.io/inject=enabled".into(),
            })
        );
        assert_eq!(config.policy.common_name, "etcd-shim-broker.sys.svc");
    }

    #[test]
    fn every_flag_has_its_env_var() {
        use clap::CommandFactory;
        let command = Args::command();
        let mut checked = 0;
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let wanted = format!(
                "ETCD_SHIM_WEBHOOK_CERTS_{}",
                id.to_uppercase().replace('-', "_")
            );
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(wanted.as_str()),
                "--{id}"
            );
            checked += 1;
        }
        assert_eq!(checked, 15);
    }

    #[test]
    fn every_flag_parses() {
        let args = parse(&[
            "--namespace",
            "sys",
            "--service",
            "inj",
            "--cluster-domain",
            "corp.example",
            "--secret",
            "inj-tls",
            "--webhook",
            "inj-hook",
            "--ca-validity",
            "730d",
            "--serving-validity",
            "90d",
            "--renew-fraction",
            "0.25",
            "--ca-overlap",
            "1h30m",
            "--skip-missing-webhook",
            "--interval",
            "12h",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ])
        .unwrap();
        assert_eq!(args.serving_validity, Duration::from_secs(90 * 86_400));
        assert_eq!(args.ca_overlap, Duration::from_secs(5400));
        assert_eq!(args.interval, Some(Duration::from_secs(12 * 3600)));
        assert!(args.skip_missing_webhook);
        assert_eq!(args.log_format, LogFormat::Json);
        assert_eq!(args.log_level, "debug");

        let config = args.config_with_namespace_file(Path::new("/nonexistent"));
        assert_eq!(config.namespace, "sys");
        assert_eq!(config.secret_name, "inj-tls");
        assert_eq!(config.webhook_name, "inj-hook");
        assert!(config.skip_missing_webhook);
        assert_eq!(
            config.policy.dns_names,
            ["inj", "inj.sys", "inj.sys.svc", "inj.sys.svc.corp.example"]
        );
        assert_eq!(config.policy.common_name, "inj.sys.svc");
        assert_eq!(config.policy.ca_validity, time::Duration::days(730));
        assert_eq!(config.policy.renew_fraction, 0.25);
    }

    #[test]
    fn bad_values_are_rejected() {
        for bad in [
            &["--ca-validity", "0d"][..],
            &["--serving-validity", "1x"],
            &["--interval", "ten"],
            &["--renew-fraction", "1"],
            &["--renew-fraction", "3/2"],
            &["--renew-fraction", "x"],
            &["--log-format", "xml"],
            &["--no-such-flag"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn namespace_comes_from_flag_then_pod_file_then_default() {
        let dir = std::env::temp_dir().join(format!("webhook-certs-ns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("namespace");
        std::fs::write(&file, "from-pod\n").unwrap();
        assert_eq!(resolve_namespace(Some("flag"), &file), "flag");
        assert_eq!(resolve_namespace(None, &file), "from-pod");
        assert_eq!(resolve_namespace(Some(" "), &file), "from-pod");
        assert_eq!(
            resolve_namespace(None, &dir.join("missing")),
            DEFAULT_NAMESPACE
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("1d12h"), Ok(Duration::from_secs(36 * 3600)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        for bad in ["", "d", "-5d", "0s", "1000000d", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fractions() {
        assert_eq!(parse_fraction("1/4"), Ok(0.25));
        assert_eq!(parse_fraction("0.5"), Ok(0.5));
        for bad in ["0", "1", "1/0", "2/3/4", "-0.5", "NaN"] {
            assert!(parse_fraction(bad).is_err(), "{bad:?}");
        }
    }
}
