//! Watch: one upstream stream per downstream stream, never shared, so watch ids, ordering,
//! fragmentation and progress notifications stay etcd's own. Create requests are confined
//! to the tenant prefix; events are stripped on the way back.

use std::time::Duration;

use etcd_client::proto::{PbWatchRequest, PbWatchRequestUnion, PbWatchResponse, PbWatchService};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::upstream::request_from;
use crate::{Broker, rewrite};

/// Responses buffered for a downstream watcher before the broker stops reading etcd.
const WATCH_BUFFER: usize = 64;
/// How long a watcher may refuse to take a response before its stream is ended; keeps
/// a stuck client from pinning memory in the broker and in etcd.
const SLOW_WATCHER_TIMEOUT: Duration = Duration::from_secs(30);

#[tonic::async_trait]
impl PbWatchService for Broker {
    type WatchStream = ReceiverStream<Result<PbWatchResponse, Status>>;

    async fn watch(
        &self,
        req: Request<Streaming<PbWatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let t = self.tenant(req.metadata()).await?;
        let md = req.metadata().clone();
        let mut downstream = req.into_inner();

        // Pump client requests upstream before waiting for etcd's response headers: etcd
        // sends none until the first watch is created.
        let (up_tx, up_rx) = mpsc::channel::<PbWatchRequest>(16);
        let tenant = t.clone();
        tokio::spawn(async move {
            while let Some(Ok(mut msg)) = downstream.next().await {
                if let Some(PbWatchRequestUnion::CreateRequest(c)) = &mut msg.request_union {
                    rewrite::watch_range(&tenant.prefix, &mut c.key, &mut c.range_end);
                }
                if up_tx.send(msg).await.is_err() {
                    break;
                }
            }
        });

        let mut upstream = t
            .upstream
            .streaming::<_, PbWatchRequest, PbWatchResponse>(
                "/etcdserverpb.Watch/Watch",
                request_from(&md, ReceiverStream::new(up_rx)),
            )
            .await?
            .into_inner();

        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let broker = self.clone();
        let shutdown = self.inner.shutdown.clone();
        broker.metrics().watch_streams.inc();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = upstream.message() => m,
                    _ = shutdown.cancelled() => {
                        let _ = tx.try_send(Err(Status::unavailable("etcd-shim broker is shutting down")));
                        break;
                    }
                    _ = tx.closed() => break,
                };
                match msg {
                    Ok(Some(mut resp)) => {
                        broker.note(&resp.header);
                        rewrite::scrub_header(&mut resp.header);
                        let s = rewrite::watch_events(&t.prefix, &mut resp.events);
                        broker.check_stripped(&t, "Watch", s);
                        match tx.send_timeout(Ok(resp), SLOW_WATCHER_TIMEOUT).await {
                            Ok(()) => {}
                            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                                tracing::warn!(tenant = %t.name, "watcher too slow, ending its stream");
                                let _ = tx.try_send(Err(Status::unavailable(
                                    "etcd-shim: watcher too slow to keep up",
                                )));
                                break;
                            }
                            Err(mpsc::error::SendTimeoutError::Closed(_)) => break,
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        // etcd's own status, byte-identical.
                        let _ = tx.send(Err(crate::upstream::clean(status))).await;
                        break;
                    }
                }
            }
            broker.metrics().watch_streams.dec();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
