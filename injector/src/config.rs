//! What gets injected: the names, annotations and defaults that make up the contract
//! between the injector, the shim binary and the people who annotate their pods.

use etcd_shim_core::logging::LogFormat;

/// Namespace label that opts every pod of the namespace in.
pub const NAMESPACE_LABEL: &str = "etcd-shim.io/inject";
/// Value of [`NAMESPACE_LABEL`] that opts in.
pub const NAMESPACE_LABEL_ENABLED: &str = "enabled";
/// Pod annotation that opts one pod out when set to [`INJECT_DISABLED`].
pub const INJECT_ANNOTATION: &str = "etcd-shim.io/inject";
pub const INJECT_DISABLED: &str = "disabled";
/// Pod annotation set on injected pods; its presence makes injection idempotent.
pub const STATUS_ANNOTATION: &str = "etcd-shim.io/status";
pub const STATUS_INJECTED: &str = "injected";

/// Per-pod overrides of the injector's defaults.
pub const IMAGE_ANNOTATION: &str = "etcd-shim.io/image";
pub const LOG_LEVEL_ANNOTATION: &str = "etcd-shim.io/log-level";
pub const CPU_REQUEST_ANNOTATION: &str = "etcd-shim.io/cpu-request";
pub const MEMORY_REQUEST_ANNOTATION: &str = "etcd-shim.io/memory-request";
pub const MEMORY_LIMIT_ANNOTATION: &str = "etcd-shim.io/memory-limit";
pub const MODE_ANNOTATION: &str = "etcd-shim.io/mode";

/// Name of the injected container.
pub const CONTAINER_NAME: &str = "etcd-shim";
/// Name of the projected token volume.
pub const TOKEN_VOLUME: &str = "etcd-shim-token";
/// Where the token volume is mounted in the shim.
pub const TOKEN_DIR: &str = "/var/run/secrets/etcd-shim";
/// File inside [`TOKEN_DIR`]; the shim reads `TOKEN_DIR/TOKEN_FILE`.
pub const TOKEN_FILE: &str = "token";
/// Audience the broker accepts; tokens for other audiences (the API server's) are useless
/// to it, and ours are useless to the API server.
pub const TOKEN_AUDIENCE: &str = "etcd-shim";
/// One hour: the kubelet refreshes the file at 80% of this.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// The shim's etcd endpoint: the pod's loopback only.
pub const SHIM_LISTEN: &str = "127.0.0.1:2379";
/// The shim's admin endpoint; all interfaces so the kubelet can probe it.
pub const SHIM_ADMIN_LISTEN: &str = "0.0.0.0:9379";
pub const SHIM_ADMIN_PORT: i32 = 9379;
pub const SHIM_ADMIN_PORT_NAME: &str = "shim-admin";
/// Non-root user and group of the shim (the distroless "nonroot" ids).
pub const SHIM_UID: i64 = 65532;
/// Where the image puts the shim binary; the classic sidecar's postStart hook runs it.
pub const SHIM_BINARY: &str = "/usr/local/bin/etcd-shim";
/// File in [`TOKEN_DIR`] holding the broker's CA bundle, projected from a ConfigMap of the
/// pod's namespace into the token volume, so the kubelet refreshes it in place and the
/// shim's next broker connection uses a rotated bundle.
pub const BROKER_CA_FILE: &str = "ca.crt";
/// Key of the bundle in that ConfigMap (what webhook-certs and cert-manager's trust-manager
/// write).
pub const BROKER_CA_KEY: &str = "ca.crt";
/// Pod annotation that makes `kubectl logs`/`exec` pick the application, not the shim,
/// when the shim is the first regular container (classic mode).
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

pub const DEFAULT_BROKER_URL: &str = "https://etcd-shim-broker.etcd-shim.svc:2379";
/// ConfigMap (in each opted-in namespace) with the broker's CA bundle.
pub const DEFAULT_BROKER_CA_CONFIGMAP: &str = "etcd-shim-broker-ca";
pub const DEFAULT_CPU_REQUEST: &str = "10m";
pub const DEFAULT_MEMORY_REQUEST: &str = "16Mi";
pub const DEFAULT_MEMORY_LIMIT: &str = "64Mi";

/// The shim image that matches this injector's release.
pub fn default_image() -> String {
    format!("ghcr.io/etcd-shim/etcd-shim:{}", env!("CARGO_PKG_VERSION"))
}

/// How the shim runs next to the application.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarMode {
    /// Init container with `restartPolicy: Always` (Kubernetes >= 1.29): started and ready
    /// before the application, stopped after it.
    #[default]
    Native,
    /// First regular container, for clusters without native sidecars. A postStart hook
    /// that waits for the shim's readiness holds back the containers after it (the kubelet
    /// starts them in order, each after the previous one's postStart hook returns).
    Classic,
}

impl SidecarMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SidecarMode::Native => "native",
            SidecarMode::Classic => "classic",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "native" => Some(SidecarMode::Native),
            "classic" => Some(SidecarMode::Classic),
            _ => None,
        }
    }
}

/// Injector-wide defaults for the shim container. Pod annotations override some of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectConfig {
    /// Shim image reference.
    pub image: String,
    /// Broker URL the shim connects to.
    pub broker_url: String,
    /// ConfigMap of the pod's namespace holding the CA bundle the shim trusts for the
    /// broker (key [`BROKER_CA_KEY`]); projected as a file, never copied into the spec.
    /// Unused for an `http://` broker.
    pub broker_ca_configmap: Option<String>,
    /// Shim log filter (`RUST_LOG` syntax).
    pub log_level: String,
    /// Shim log format.
    pub log_format: LogFormat,
    /// Native or classic sidecar.
    pub mode: SidecarMode,
    /// Shim CPU request (Kubernetes quantity).
    pub cpu_request: String,
    /// Shim memory request (Kubernetes quantity).
    pub memory_request: String,
    /// Shim memory limit (Kubernetes quantity). No CPU limit: throttling a proxy on the
    /// data path hurts latency more than it protects the node.
    pub memory_limit: String,
    /// UID and GID the shim runs as; `None` leaves them to the platform (OpenShift's
    /// restricted-v2 SCC assigns one from the namespace's range and refuses fixed ones).
    pub run_as_user: Option<i64>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: default_image(),
            broker_url: DEFAULT_BROKER_URL.to_string(),
            broker_ca_configmap: Some(DEFAULT_BROKER_CA_CONFIGMAP.to_string()),
            log_level: "info".to_string(),
            log_format: LogFormat::Plain,
            mode: SidecarMode::Native,
            cpu_request: DEFAULT_CPU_REQUEST.to_string(),
            memory_request: DEFAULT_MEMORY_REQUEST.to_string(),
            memory_limit: DEFAULT_MEMORY_LIMIT.to_string(),
            run_as_user: Some(SHIM_UID),
        }
    }
}

/// The name the shim's `--log-format` flag expects.
pub fn log_format_name(format: LogFormat) -> &'static str {
    match format {
        LogFormat::Plain => "plain",
        LogFormat::Json => "json",
    }
}

/// Whether `s` is a Kubernetes resource quantity (`100m`, `16Mi`, `1.5`, `2e3`). Checked
/// here so a typo in an annotation gets a clear denial naming the annotation instead of a
/// pod validation error about a container the user never wrote.
pub fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits_end = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = !number.is_empty()
        && number != "."
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = match suffix {
        "" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => true,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        _ => suffix
            .strip_prefix(['e', 'E'])
            .map(|exp| {
                let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                !exp.is_empty() && exp.chars().all(|c| c.is_ascii_digit())
            })
            .unwrap_or(false),
    };
    number_ok && suffix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in [
            "10m", "16Mi", "1", "0.5", "1.5Gi", "2e3", "1E-2", "+1k", ".5",
        ] {
            assert!(is_quantity(ok), "{ok} should be a quantity");
        }
        for bad in [
            "", "abc", "10 m", "16MB", "1.2.3", "Mi", "1e", "-", ".", "10mi",
        ] {
            assert!(!is_quantity(bad), "{bad} should not be a quantity");
        }
    }

    #[test]
    fn default_image_follows_the_crate_version() {
        assert_eq!(
            default_image(),
            format!("ghcr.io/etcd-shim/etcd-shim:{}", env!("CARGO_PKG_VERSION"))
        );
    }
}
