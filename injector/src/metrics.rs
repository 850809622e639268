//! The injector's Prometheus metrics: admissions by outcome, skips by reason, latency, and
//! the serving certificate's reloads and expiry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::mutate::SkipReason;
use crate::review::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Handles to every metric; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    admissions: Family<OutcomeLabel, Counter>,
    skips: Family<ReasonLabel, Counter>,
    duration: Histogram,
    tls_reloads: Family<OutcomeLabel, Counter>,
    cert_not_after: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            admissions: Family::default(),
            skips: Family::default(),
            duration: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            tls_reloads: Family::default(),
            cert_not_after: Gauge::default(),
        };
        // Every label value exists from the start, so rate() and alerts see zeros rather
        // than missing series.
        for outcome in Outcome::LABELS {
            let _ = m.admissions.get_or_create(&OutcomeLabel { outcome });
        }
        for reason in SkipReason::ALL {
            let _ = m.skips.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            });
        }
        for outcome in ["success", "failure"] {
            let _ = m.tls_reloads.get_or_create(&OutcomeLabel { outcome });
        }
        registry.register(
            "etcd_shim_injector_admissions",
            "Admission requests answered, by outcome",
            m.admissions.clone(),
        );
        registry.register(
            "etcd_shim_injector_skips",
            "Pods admitted without the shim, by reason",
            m.skips.clone(),
        );
        registry.register(
            "etcd_shim_injector_admission_duration_seconds",
            "Time to answer one admission request, body read to response",
            m.duration.clone(),
        );
        registry.register(
            "etcd_shim_injector_tls_reloads",
            "Serving certificate reloads after a file change, by outcome",
            m.tls_reloads.clone(),
        );
        registry.register(
            "etcd_shim_injector_tls_certificate_not_after_seconds",
            "Expiry of the serving certificate in force, unix seconds",
            m.cert_not_after.clone(),
        );
        m
    }

    pub fn record(&self, outcome: Outcome, seconds: f64) {
        self.admissions
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
        if let Outcome::Skipped(reason) = outcome {
            self.skips
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc();
        }
        self.duration.observe(seconds);
    }

    pub fn record_tls_reload(&self, ok: bool) {
        let outcome = if ok { "success" } else { "failure" };
        self.tls_reloads
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn set_cert_not_after(&self, unix_seconds: i64) {
        self.cert_not_after.set(unix_seconds);
    }
}
