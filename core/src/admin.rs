//! Admin HTTP server on its own port: `/metrics` (Prometheus text format), `/live` (the
//! process is serving; never depends on a remote) and `/ready` (every readiness condition
//! holds; the body names the ones that do not).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::serve::Server;
use crate::shutdown::Shutdown;

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Named readiness conditions. A component is ready when every registered condition holds.
#[derive(Clone, Default)]
pub struct Readiness {
    /// Condition name -> `None` when it holds, or why it does not.
    conditions: Arc<Mutex<BTreeMap<&'static str, Option<String>>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a condition that does not hold until [`Readiness::set_ready`] is called.
    pub fn register(&self, name: &'static str) {
        self.lock()
            .entry(name)
            .or_insert_with(|| Some("not checked yet".into()));
    }

    pub fn set_ready(&self, name: &'static str) {
        self.lock().insert(name, None);
    }

    pub fn set_not_ready(&self, name: &'static str, reason: impl Into<String>) {
        self.lock().insert(name, Some(reason.into()));
    }

    /// Sets a condition from a result, keeping the error text as the reason.
    pub fn set(&self, name: &'static str, res: Result<(), String>) {
        match res {
            Ok(()) => self.set_ready(name),
            Err(reason) => self.set_not_ready(name, reason),
        }
    }

    /// `Ok` when ready, else the failing conditions as `name: reason` lines.
    pub fn check(&self) -> Result<(), String> {
        let failing: Vec<String> = self
            .lock()
            .iter()
            .filter_map(|(name, r)| r.as_ref().map(|r| format!("{name}: {r}")))
            .collect();
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing.join("\n"))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Option<String>>> {
        // A poisoned map still holds valid data: a panic elsewhere cannot leave it half-written.
        self.conditions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the admin server exposes.
#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub readiness: Readiness,
}

/// Serves the admin endpoints on `listener` until shutdown starts. Its connections are not
/// part of the drain: a scrape in flight at shutdown is not worth waiting for.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: Shutdown) {
    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    Server::new("admin", http)
        .serve(listener, shutdown.token(), move |io| {
            let state = state.clone();
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            (io, svc)
        })
        .await
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/live" | "/livez" | "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/ready" | "/readyz" => match state.readiness.check() {
            Ok(()) => text(StatusCode::OK, "ok\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        "/metrics" => {
            let mut body = String::new();
            if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &state.registry) {
                return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
            }
            // Scrapers that ask for OpenMetrics get it; everything else (older
            // Prometheus, promtool, curl) gets the classic text format.
            let wants_openmetrics = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            let (content_type, body) = if wants_openmetrics {
                (OPENMETRICS_CONTENT_TYPE, body)
            } else {
                (PROMETHEUS_CONTENT_TYPE, to_prometheus_text(&body))
            };
            Response::builder()
                .header(header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Converts OpenMetrics text to the Prometheus 0.0.4 text format: counter families are
/// declared under their `_total` sample name, `# EOF` and `# UNIT` are dropped, and types
/// the old format lacks become `untyped` or `gauge`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, help));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "counter" | "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
                "info" | "stateset" => (name.to_owned(), "gauge"),
                _ => (name.to_owned(), "untyped"),
            };
            if let Some((_, help)) = pending_help.take() {
                out.push_str(&format!("# HELP {name} {help}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some((name, help)) = pending_help.take() {
            out.push_str(&format!("# HELP {name} {help}\n"));
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reports_failing_conditions() {
        let r = Readiness::new();
        assert!(r.check().is_ok(), "no conditions means ready");
        r.register("token");
        r.register("broker");
        assert!(r.check().unwrap_err().contains("token: not checked yet"));
        r.set_ready("token");
        r.set_not_ready("broker", "connection refused");
        assert_eq!(r.check().unwrap_err(), "broker: connection refused");
        r.set("broker", Ok(()));
        assert!(r.check().is_ok());
        // Registering again must not reset a condition that already holds.
        r.register("broker");
        assert!(r.check().is_ok());
    }

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
        let mut reg = Registry::default();
        let c = Counter::<u64>::default();
        c.inc_by(3);
        reg.register("calls", "Calls made", c);
        reg.register("open", "Open things", Gauge::<i64>::default());
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &reg).unwrap();
        assert!(om.contains("# TYPE calls counter") && om.ends_with("# EOF\n"));
        let text = to_prometheus_text(&om);
        assert_eq!(
            text,
            "# HELP calls_total Calls made.\n# TYPE calls_total counter\ncalls_total 3\n\
             # HELP open Open things.\n# TYPE open gauge\nopen 0\n"
        );
    }
}
