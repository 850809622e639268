//! etcd-shim-webhook-certs: creates a CA and a serving certificate for the injector's
//! Service, stores them in a Secret, keeps the MutatingWebhookConfiguration's caBundle in
//! sync, and renews both when a third of their lifetime is left. Runs once (a Helm hook Job)
//! or periodically.

pub mod args;
pub mod certs;
pub mod distribute;
pub mod reconcile;

use std::future::Future;
use std::time::Duration;

use etcd_shim_core::shutdown::Shutdown;
use kube::Client;
use tracing::{error, info};

pub use args::Args;
pub use reconcile::{Config, Error, Report};

/// Runs as the flags say: one reconcile, or one every `--interval` until SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<(), Error> {
    let config = args.config();
    let client = Client::try_default().await.map_err(Error::Client)?;
    match args.interval {
        None => {
            let report = reconcile::reconcile(client, &config).await?;
            log_report(&config, &report, true);
            Ok(())
        }
        Some(interval) => {
            let shutdown = Shutdown::new();
            let signals = shutdown.clone();
            tokio::spawn(async move { signals.on_signal().await });
            run_periodic(client, &config, interval, shutdown.triggered()).await;
            Ok(())
        }
    }
}

/// Reconciles now and then every `interval` until `stop` resolves. A failed pass is logged
/// and retried at the next tick rather than ending the process: the certificates stay valid
/// for a long time after renewal is due, so a transient API error costs nothing.
pub async fn run_periodic(
    client: Client,
    config: &Config,
    interval: Duration,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    info!(interval = ?interval, "reconciling periodically");
    loop {
        match reconcile::reconcile(client.clone(), config).await {
            // Every pass that changes nothing says so only at debug level: the broker's
            // certificate loop runs every minute.
            Ok(report) => log_report(config, &report, false),
            Err(err) => {
                error!(error = %error_chain(&err), "reconcile failed, retrying at the next interval")
            }
        }
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

fn log_report(config: &Config, report: &Report, once: bool) {
    if report.is_unchanged() && !once {
        tracing::debug!(
            secret = %config.secret_name,
            namespace = %config.namespace,
            "certificates valid and trusted everywhere; nothing changed"
        );
    } else if report.is_unchanged() {
        info!(
            secret = %config.secret_name,
            namespace = %config.namespace,
            "certificates valid and caBundle up to date; nothing changed"
        );
    } else {
        info!(
            secret = %config.secret_name,
            namespace = %config.namespace,
            written = ?report.secret,
            patched_webhooks = ?report.patched_webhooks,
            ca_configmaps = report.ca_configmaps.len(),
            "certificates reconciled"
        );
    }
}

pub use etcd_shim_core::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn layer(text: &'static str, source: Option<Layer>) -> Layer {
        Layer {
            text,
            source: source.map(Box::new),
        }
    }

    #[test]
    fn error_chain_is_one_line_without_repeats() {
        let err = layer(
            "cannot get Secret a/b",
            Some(layer(
                "client error: connection refused",
                Some(layer("connection refused", None)),
            )),
        );
        assert_eq!(
            error_chain(&err),
            "cannot get Secret a/b: client error: connection refused"
        );
        let multi_line = layer("first\nsecond", Some(layer("cause", None)));
        assert_eq!(error_chain(&multi_line), "first second: cause");
    }
}
