//! One way in for every call: [`Broker::call`] authenticates the caller and resolves its
//! tenant, lets the call in under the tenant's limits, serves it inside a span that names
//! the tenant and the method, then counts, times and logs how it ended.
//!
//! Handlers only say what is particular to them: the service and method names (once),
//! how the call is admitted, and what it does for its tenant.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio_stream::{Stream, StreamExt as _};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::limits::Class;
use crate::metrics::{self, Name};
use crate::{Broker, Tenant};

/// How a call is let in under its tenant's limits.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Admit {
    /// As one call in flight for as long as it runs, and one token of the class's rate.
    InFlight(Class),
    /// One token of the class's rate only: the call may wait for long (for a lock, or for
    /// an election), so it is not counted in flight.
    Rate(Class),
    /// By the handler: it refuses some calls before any limit is charged, or holds its
    /// permit for longer than the call (a stream that outlives it).
    Handler,
}

/// Who makes the call: the tenant it was resolved to, and the call's metadata (etcd
/// sees the client's deadline and other headers, never its token).
pub(crate) struct Caller {
    pub t: Arc<Tenant>,
    pub md: MetadataMap,
}

impl Broker {
    /// Serves one call of `service`/`method` with `serve`, given the caller and the
    /// request's message.
    pub(crate) async fn call<Q, A, F, Fut>(
        &self,
        service: &'static str,
        method: &'static str,
        admit: Admit,
        req: Request<Q>,
        serve: F,
    ) -> Result<Response<A>, Status>
    where
        F: FnOnce(Caller, Q) -> Fut,
        Fut: Future<Output = Result<A, Status>>,
    {
        let started = Instant::now();
        let span = tracing::info_span!("call", service, method, tenant = tracing::field::Empty);
        let (md, _, msg) = req.into_parts();
        let mut tenant: Option<Arc<Tenant>> = None;
        let res = async {
            let t = self.tenant(&md).await?;
            tracing::Span::current().record("tenant", t.name.as_str());
            tenant = Some(t.clone());
            let _permit = match admit {
                Admit::InFlight(class) => Some(self.limiter().admit(&t, class, method)?),
                Admit::Rate(class) => {
                    self.limiter().rate(&t, class, method)?;
                    None
                }
                Admit::Handler => None,
            };
            serve(Caller { t, md }, msg).await
        }
        .instrument(span.clone())
        .await;

        let code = res.as_ref().err().map_or(Code::Ok, Status::code);
        let elapsed = started.elapsed();
        // The request log: who called what and how it ended, never keys or values.
        span.in_scope(|| {
            tracing::debug!(
                target: "etcd_shim_broker::request",
                tenant = tenant.as_ref().map_or("-", |t| t.name.as_str()),
                service,
                method,
                code = metrics::code_name(code),
                micros = elapsed.as_micros() as u64,
                "request"
            )
        });
        let label = tenant.map_or_else(
            || Name(Arc::from(metrics::NO_TENANT)),
            |t| Name(t.label.clone()),
        );
        self.metrics()
            .observe(service, method, label, code, elapsed);
        res.map(Response::new)
    }
}

/// The client's requests on a stream, until the first error or until the stream's
/// answers end: the guard goes with the response side, and dropping it ends the requests
/// too, so that the etcd stream they feed ends as well (its request side would otherwise
/// stay open for as long as the client may still send).
pub(crate) fn requests<T: Send + 'static>(
    downstream: Streaming<T>,
) -> (
    Pin<Box<dyn Stream<Item = T> + Send>>,
    tokio_util::sync::DropGuard,
) {
    let done = tokio_util::sync::CancellationToken::new();
    let guard = done.clone().drop_guard();
    let requests = futures_util::stream::unfold((downstream, done), |(mut d, done)| async move {
        let next = tokio::select! {
            next = d.next() => next,
            _ = done.cancelled() => None,
        };
        match next {
            Some(Ok(msg)) => Some((msg, (d, done))),
            _ => None,
        }
    });
    (Box::pin(requests), guard)
}

/// Spawns work a call leaves behind (a stream's pumps, a lock wait), in the call's span
/// so that its log lines name the tenant and the method too.
pub(crate) fn spawn<F>(work: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(work.in_current_span())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;
    use crate::auth::StaticTokens;
    use crate::metrics::{Metrics, RequestLabels};

    /// Log output kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn broker(metrics: &Metrics) -> Broker {
        let tokens = StaticTokens::parse("t0k3n team-a/app\n").unwrap();
        Broker::new(
            &crate::BrokerConfig::default(),
            Arc::new(tokens),
            crate::upstream::Upstream::new(&["http://127.0.0.1:1".into()]).unwrap(),
            metrics.clone(),
            tokio_util::sync::CancellationToken::new(),
        )
        .unwrap()
    }

    fn with_token<T>(msg: T, token: &str) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    }

    fn requests(m: &Metrics, tenant: &str, code: &'static str) -> u64 {
        m.requests
            .get_or_create(&RequestLabels {
                tenant: Name(Arc::from(tenant)),
                service: "Lock",
                method: "Lock",
                code,
            })
            .get()
    }

    #[test]
    fn what_a_call_logs_names_its_tenant_and_method_and_the_call_is_counted() {
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        rt.block_on(async {
            let b = broker(&metrics);
            let served = b
                .call(
                    "Lock",
                    "Lock",
                    Admit::Handler,
                    with_token(7u8, "t0k3n"),
                    |c, msg| async move {
                        assert_eq!(msg, 7);
                        assert_eq!(c.t.name, "team-a/app");
                        assert!(c.md.get("authorization").is_some());
                        tracing::warn!("while serving");
                        spawn(async { tracing::warn!("left behind by the call") })
                            .await
                            .unwrap();
                        Ok(msg + 1)
                    },
                )
                .await;
            assert_eq!(served.unwrap().into_inner(), 8);
            let refused = b
                .call(
                    "Lock",
                    "Lock",
                    Admit::Handler,
                    with_token(7u8, "wrong"),
                    |_, _| async { panic!("served a caller with a refused token") },
                )
                .await
                .map(|_: Response<()>| ());
            assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);
        });

        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        for what in ["while serving", "left behind by the call"] {
            let line = text
                .lines()
                .find(|l| l.contains(what))
                .unwrap_or_else(|| panic!("no line {what:?} in:\n{text}"));
            for field in [
                "service=\"Lock\"",
                "method=\"Lock\"",
                "tenant=\"team-a/app\"",
            ] {
                assert!(line.contains(field), "{field} missing from {line:?}");
            }
        }
        assert_eq!(requests(&metrics, "unlisted", "OK"), 1);
        assert_eq!(requests(&metrics, metrics::NO_TENANT, "Unauthenticated"), 1);
    }
}
