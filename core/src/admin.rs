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
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

/// Serves the admin endpoints on `listener` until shutdown starts.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: Shutdown) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin server listening");
    }
    let token = shutdown.token();
    loop {
        let (stream, _) = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = token.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
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
            match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
                Ok(()) => Response::builder()
                    .header(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default(),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
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
}
