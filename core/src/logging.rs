//! Tracing setup: one call at the top of every binary.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// Default filter when neither `--log-level` nor `RUST_LOG` says otherwise.
pub const DEFAULT_FILTER: &str = "warn,etcd_shim=info,etcd_shim_core=info,etcd_shim_broker=info,etcd_shim_injector=info,etcd_shim_webhook_certs=info";

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax; an empty filter falls
/// back to `RUST_LOG`, then to [`DEFAULT_FILTER`].
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = if !filter.is_empty() {
        EnvFilter::try_new(filter)?
    } else {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    res.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}
