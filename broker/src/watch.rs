//! Watch: one upstream stream per downstream stream, never shared, so watch ids, ordering,
//! fragmentation and progress notifications stay etcd's own. Create requests are confined
//! to the tenant prefix; events are stripped on the way back.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::proto::{PbWatchRequest, PbWatchRequestUnion, PbWatchResponse, PbWatchService};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::call::{self, Admit, Caller};
use crate::limits::{Class, TenantState};
use crate::metrics::Open;
use crate::outbox::Inbox;
use crate::upstream::UpstreamStream;
use crate::upstream::request_from;
use crate::{Broker, rewrite};

/// What a watcher that leaves its answers untaken too long is told as its stream ends;
/// ending it frees what it pinned in the broker and in etcd.
const SLOW_WATCHER: &str = "etcd-shim: watcher too slow to keep up";

#[tonic::async_trait]
impl PbWatchService for Broker {
    type WatchStream = Inbox<PbWatchResponse>;

    async fn watch(
        &self,
        req: Request<Streaming<PbWatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.call(
            "Watch",
            "Watch",
            Admit::Handler,
            req,
            |c, downstream| async move {
                let Caller { t, md } = c;

                let (tx, rx) = self.outbox(SLOW_WATCHER);
                let counted = Arc::new(Mutex::new(Counted {
                    state: t.state.clone(),
                    open: HashSet::new(),
                    pending: 0,
                    creates: VecDeque::new(),
                    compacted: HashSet::new(),
                }));

                // Pump client requests upstream before waiting for etcd's response headers: etcd
                // sends none until the first watch is created.
                let (up_tx, up_rx) = mpsc::channel::<PbWatchRequest>(16);
                let tenant = t.clone();
                let broker = self.clone();
                // Weak: the stream ends when the response pump is done, not when this one is.
                let local = tx.downgrade();
                let pending = counted.clone();
                let up_cancel = up_tx.downgrade();
                let create_md = md.clone();
                let (mut requests, done) = call::requests(downstream);
                call::spawn(async move {
                    while let Some(mut msg) = requests.next().await {
                        if let Some(PbWatchRequestUnion::CreateRequest(c)) = &mut msg.request_union
                        {
                            let admitted = tenant
                                .state
                                .take(&tenant.limits, Class::Read)
                                .and_then(|()| tenant.state.open_watch(&tenant.limits));
                            if let Err(r) = admitted {
                                // As etcd refuses one watch: created and canceled at once, with the
                                // reason; other watches on the stream go on.
                                let status = broker.limiter().refuse(&tenant, "Watch", r);
                                let resp = PbWatchResponse {
                                    header: broker.synthetic_header(),
                                    watch_id: -1,
                                    created: true,
                                    canceled: true,
                                    cancel_reason: status.message().to_owned(),
                                    ..Default::default()
                                };
                                match local.upgrade() {
                                    Some(tx) if tx.send(resp).await.is_ok() => continue,
                                    _ => break,
                                }
                            }
                            // A watch from below the tenant's compaction is created by etcd, so
                            // that watch ids stay etcd's own, and then cancelled as etcd cancels
                            // one from a compacted revision.
                            let compacted = if c.start_revision > 0 {
                                let rev = broker
                                    .compacted_revision(&tenant, &create_md)
                                    .await
                                    .unwrap_or_else(|_| tenant.state.compacted());
                                (c.start_revision < rev).then_some(rev)
                            } else {
                                None
                            };
                            {
                                let mut p = lock(&pending);
                                p.pending += 1;
                                p.creates.push_back(compacted);
                            }
                            rewrite::watch_range(&tenant.prefix, &mut c.key, &mut c.range_end);
                        }
                        if up_tx.send(msg).await.is_err() {
                            break;
                        }
                    }
                });

                let broker = self.clone();
                let shutdown = self.inner.shutdown.clone();
                let open = Open::new(&self.metrics().watch_streams);
                call::spawn(async move {
                    // Connected here rather than before answering the client: etcd sends its
                    // response headers only once a watch is created, and a stream whose first
                    // create the broker refused itself must still get its answer.
                    let connect = t.upstream.streaming::<_, PbWatchRequest, PbWatchResponse>(
                        "/etcdserverpb.Watch/Watch",
                        request_from(&md, ReceiverStream::new(up_rx)),
                    );
                    let Some(upstream) = UpstreamStream::open(connect, &tx, &shutdown).await else {
                        return;
                    };
                    upstream.relay(
                        tx,
                        shutdown,
                        (done, open),
                        move |mut resp: PbWatchResponse| {
                            let compacted = {
                                let mut c = lock(&counted);
                                if c.drops(&resp) {
                                    return (Duration::ZERO, answers([None, None]));
                                }
                                c.saw(&resp);
                                c.compacted_create(&resp)
                            };
                            broker.note(&resp.header);
                            rewrite::scrub_header(&mut resp.header);
                            if let Some(rev) = compacted {
                                let cancel = PbWatchResponse {
                                    header: resp.header,
                                    watch_id: resp.watch_id,
                                    canceled: true,
                                    compact_revision: rev,
                                    ..Default::default()
                                };
                                lock(&counted).saw(&cancel);
                                if let Some(up) = up_cancel.upgrade() {
                                    let mut req = PbWatchRequest {
                                        request_union: Some(PbWatchRequestUnion::CancelRequest(
                                            Default::default(),
                                        )),
                                    };
                                    if let Some(PbWatchRequestUnion::CancelRequest(c)) =
                                        &mut req.request_union
                                    {
                                        c.watch_id = resp.watch_id;
                                    }
                                    // Off the relay, which must not wait for etcd to take requests.
                                    tokio::spawn(async move { up.send(req).await });
                                }
                                return (Duration::ZERO, answers([Some(resp), Some(cancel)]));
                            }
                            crate::compaction::compact_events(
                                t.state.compacted(),
                                &mut resp.events,
                            );
                            let s = rewrite::watch_events(&t.prefix, &mut resp.events);
                            t.lease_ids.events(&mut resp.events);
                            broker.check_stripped(&t, "Watch", s);
                            let pace = t.state.pace_watch(&t.limits, resp.encoded_len());
                            (pace, answers([Some(resp), None]))
                        },
                    );
                });
                Ok(rx)
            },
        )
        .await
    }
}

/// What one message from etcd becomes: up to two answers to the client.
fn answers(a: [Option<PbWatchResponse>; 2]) -> impl Iterator<Item = PbWatchResponse> + Send {
    a.into_iter().flatten()
}

/// The watches of one stream, counted against the tenant's cap until they end.
struct Counted {
    state: Arc<TenantState>,
    /// Watch ids etcd created and has not cancelled.
    open: HashSet<i64>,
    /// Create requests sent and not answered yet.
    pending: usize,
    /// For each create sent and not answered yet, in order: the tenant's compacted
    /// revision if the watch starts below it.
    creates: VecDeque<Option<i64>>,
    /// Watches the broker cancelled for the tenant's compaction: etcd's events and
    /// cancel confirmation for them are not the client's any more.
    compacted: HashSet<i64>,
}

impl Counted {
    /// Whether a response belongs to a watch the broker already cancelled.
    fn drops(&mut self, resp: &PbWatchResponse) -> bool {
        if resp.created || !self.compacted.contains(&resp.watch_id) {
            return false;
        }
        if resp.canceled {
            self.compacted.remove(&resp.watch_id);
        }
        true
    }

    /// For a create answered, the compacted revision to cancel the new watch with.
    fn compacted_create(&mut self, resp: &PbWatchResponse) -> Option<i64> {
        if !resp.created {
            return None;
        }
        let rev = self.creates.pop_front().flatten()?;
        if resp.canceled {
            return None;
        }
        self.compacted.insert(resp.watch_id);
        Some(rev)
    }

    fn saw(&mut self, resp: &PbWatchResponse) {
        if resp.created {
            self.pending = self.pending.saturating_sub(1);
            if resp.canceled {
                self.state.close_watches(1);
            } else {
                self.open.insert(resp.watch_id);
            }
        } else if resp.canceled && self.open.remove(&resp.watch_id) {
            self.state.close_watches(1);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.state.close_watches(self.open.len() + self.pending);
    }
}

fn lock(c: &Mutex<Counted>) -> MutexGuard<'_, Counted> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}
