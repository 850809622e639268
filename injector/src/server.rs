//! The HTTPS webhook endpoint: `POST /mutate` over TLS from a reloadable acceptor. The
//! transport only reads a bounded body and hands it to [`crate::review::review`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::watch;

use etcd_shim_core::serve::Server;
use etcd_shim_core::shutdown::Shutdown;
use etcd_shim_core::tls::TlsAcceptorSource;

use crate::config::InjectConfig;
use crate::metrics::Metrics;
use crate::review::{Outcome, review};

/// Largest AdmissionReview accepted. A pod is at most ~1.5 MiB (etcd's request limit) and
/// a CREATE review carries it once, so 3 MiB leaves room without letting a client make
/// us buffer without bound.
pub const DEFAULT_MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// Request handling state shared by all connections.
#[derive(Clone, Debug)]
pub struct Webhook {
    /// Latest injection settings (the broker CA bundle can change while running).
    config: watch::Receiver<Arc<InjectConfig>>,
    metrics: Metrics,
    /// Bodies above this are answered 413 without being read further.
    max_body_bytes: usize,
}

impl Webhook {
    pub fn new(config: watch::Receiver<Arc<InjectConfig>>, metrics: Metrics) -> Self {
        Self {
            config,
            metrics,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// Settings that never change (tests).
    pub fn fixed(config: InjectConfig, metrics: Metrics) -> Self {
        let (tx, rx) = watch::channel(Arc::new(config));
        // The receiver keeps the value after the sender is gone.
        drop(tx);
        Self::new(rx, metrics)
    }

    pub fn with_max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// Answers one HTTP request. Generic over the body so tests can feed bodies without a
    /// connection.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if req.uri().path() != "/mutate" {
            return text(StatusCode::NOT_FOUND, "not found\n");
        }
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n");
        }
        let started = Instant::now();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body_bytes as u64) {
            return self.too_large(started);
        }
        // The declared length can be absent (chunked) or wrong: enforce while reading.
        let body = match Limited::new(req.into_body(), self.max_body_bytes)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return self.too_large(started);
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading admission request body failed");
                self.metrics
                    .record(Outcome::Invalid, started.elapsed().as_secs_f64());
                return text(StatusCode::BAD_REQUEST, "cannot read request body\n");
            }
        };
        let config = self.config.borrow().clone();
        let answer = review(&body, &config);
        self.metrics
            .record(answer.outcome, started.elapsed().as_secs_f64());
        let mut resp = Response::new(Full::new(Bytes::from(answer.body)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        resp
    }

    fn too_large(&self, started: Instant) -> Response<Full<Bytes>> {
        tracing::warn!(
            limit = self.max_body_bytes,
            "admission request body too large"
        );
        self.metrics
            .record(Outcome::Invalid, started.elapsed().as_secs_f64());
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "admission request body too large\n",
        )
    }
}

/// Serves the webhook on `listener` until shutdown starts; connections already open get a
/// graceful close and are tracked by `shutdown` for the drain.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptorSource,
    webhook: Webhook,
    shutdown: Shutdown,
) {
    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    Server::new("webhook", http)
        .tls(tls)
        .track(shutdown.tracker().clone())
        .serve(listener, shutdown.token(), move |io| {
            let webhook = webhook.clone();
            let svc = service_fn(move |req| {
                let webhook = webhook.clone();
                async move { Ok::<_, Infallible>(webhook.handle(req).await) }
            });
            (io, svc)
        })
        .await
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
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
    use prometheus_client::registry::Registry;

    fn webhook(limit: usize) -> Webhook {
        let metrics = Metrics::register(&mut Registry::default());
        Webhook::fixed(InjectConfig::default(), metrics).with_max_body_bytes(limit)
    }

    #[tokio::test]
    async fn body_over_the_limit_is_refused_even_without_a_length() {
        // No Content-Length header: the limit must hold while the body is read.
        let req = Request::post("/mutate")
            .body(Full::new(Bytes::from(vec![b' '; 2048])))
            .unwrap();
        let resp = webhook(1024).handle(req).await;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn declared_length_over_the_limit_is_refused_before_reading() {
        let req = Request::post("/mutate")
            .header(header::CONTENT_LENGTH, "4096")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let resp = webhook(1024).handle(req).await;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn only_post_to_mutate_is_served() {
        let get = Request::get("/mutate")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(
            webhook(1024).handle(get).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let other = Request::post("/validate")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(
            webhook(1024).handle(other).await.status(),
            StatusCode::NOT_FOUND
        );
    }
}
