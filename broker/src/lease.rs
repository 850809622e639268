//! Lease: grants are recorded as owned by the tenant; every other call on a lease the
//! tenant does not own behaves exactly as etcd does for a lease that does not exist.
//! IDs cross in the tenant's terms both ways (see `leaseid`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::proto::{
    PbLeaseGrantRequest, PbLeaseGrantResponse, PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse,
    PbLeaseLeasesRequest, PbLeaseLeasesResponse, PbLeaseRevokeRequest, PbLeaseRevokeResponse,
    PbLeaseService, PbLeaseStatus, PbLeaseTimeToLiveRequest, PbLeaseTimeToLiveResponse,
    PbRangeRequest, PbRangeResponse,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::call::{self, Admit, Caller};
use crate::limits::Class;
use crate::metrics::Open;
use crate::upstream::UpstreamStream;
use crate::upstream::request_from;
use crate::{Broker, Tenant, rewrite};

const SERVICE: &str = "Lease";

/// Bound on the IDs one keep-alive stream remembers; past it, answers fall back to the
/// current secret's IDs.
const KEEPALIVE_IDS_MAX: usize = 10_000;

#[tonic::async_trait]
impl PbLeaseService for Broker {
    async fn lease_grant(
        &self,
        req: Request<PbLeaseGrantRequest>,
    ) -> Result<Response<PbLeaseGrantResponse>, Status> {
        let admit = Admit::InFlight(Class::Write);
        self.call(SERVICE, "LeaseGrant", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            self.grant_as(&t, &md, r).await
        })
        .await
    }

    async fn lease_revoke(
        &self,
        req: Request<PbLeaseRevokeRequest>,
    ) -> Result<Response<PbLeaseRevokeResponse>, Status> {
        let admit = Admit::InFlight(Class::Write);
        self.call(SERVICE, "LeaseRevoke", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            let mut r = r;
            let id = self.real_lease(&t, "LeaseRevoke", r.id).await?;
            r.id = id;
            let mut resp: PbLeaseRevokeResponse = t
                .upstream
                .unary("/etcdserverpb.Lease/LeaseRevoke", request_from(&md, r))
                .await?
                .into_inner();
            self.inner.leases.forget(id, &t);
            t.state.lease_revoked();
            self.limiter().refresh_soon(&t);
            self.note(&resp.header);
            rewrite::scrub_header(&mut resp.header);
            Ok(resp)
        })
        .await
    }

    type LeaseKeepAliveStream = crate::outbox::Inbox<PbLeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<PbLeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        self.call(
            SERVICE,
            "LeaseKeepAlive",
            Admit::Handler,
            req,
            |c, downstream| async move {
                let Caller { t, md } = c;
                let (tx, rx) = self.outbox("etcd-shim: keep-alive reader too slow to keep up");
                let (up_tx, up_rx) = mpsc::channel::<PbLeaseKeepAliveRequest>(16);

                // Requests: owned leases go to etcd; for any other id, answer as etcd does for a
                // missing lease (TTL 0) without asking it.
                // The ID each real lease was last kept alive by, so that answers carry the ID the
                // client sent (one learnt before a secret rotation included).
                let sent: Arc<Mutex<HashMap<i64, i64>>> = Arc::default();
                let broker = self.clone();
                let tenant = t.clone();
                let local_tx = tx.clone();
                let asked = sent.clone();
                let (mut requests, done) = call::requests(downstream);
                call::spawn(async move {
                    while let Some(mut msg) = requests.next().await {
                        // Leases the caches know cost nothing; any other costs a Range on etcd,
                        // so it is charged to the tenant's read rate (a refusal ends the stream
                        // with etcd's "too many requests").
                        let known: Vec<(i64, Option<bool>)> = tenant
                            .lease_ids
                            .candidates(msg.id)
                            .map(|real| (real, broker.inner.leases.known(&tenant, real)))
                            .collect();
                        let owned =
                            if let Some((real, _)) = known.iter().find(|k| k.1 == Some(true)) {
                                Ok(Some(*real))
                            } else if known.iter().all(|k| k.1 == Some(false)) {
                                Ok(None)
                            } else if let Err(refused) =
                                broker
                                    .limiter()
                                    .rate(&tenant, Class::Read, "LeaseKeepAlive")
                            {
                                Err(refused)
                            } else {
                                broker.owned_lease(&tenant, msg.id).await
                            };
                        match owned {
                            Ok(Some(real)) => {
                                {
                                    let mut asked = asked.lock().unwrap_or_else(|e| e.into_inner());
                                    if asked.len() >= KEEPALIVE_IDS_MAX {
                                        asked.clear();
                                    }
                                    asked.insert(real, msg.id);
                                }
                                msg.id = real;
                                if up_tx.send(msg).await.is_err() {
                                    break;
                                }
                            }
                            Ok(None) => {
                                broker.metrics().denied("foreign_lease");
                                let resp = PbLeaseKeepAliveResponse {
                                    header: broker.synthetic_header(),
                                    id: msg.id,
                                    ttl: 0,
                                };
                                if local_tx.send(resp).await.is_err() {
                                    break;
                                }
                            }
                            Err(status) => {
                                local_tx.fail(status);
                                break;
                            }
                        }
                    }
                });

                // etcd sends the stream's response headers only once a request reaches it, so
                // waiting for them here would leave a client whose first keep-alive is for a
                // foreign lease without an answer. Answer the call at once; open etcd's stream
                // alongside.
                let broker = self.clone();
                let shutdown = self.inner.shutdown.clone();
                call::spawn(async move {
                    let open = t
                        .upstream
                        .streaming::<_, PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse>(
                            "/etcdserverpb.Lease/LeaseKeepAlive",
                            request_from(&md, ReceiverStream::new(up_rx)),
                        );
                    let Some(upstream) = UpstreamStream::open(open, &tx, &shutdown).await else {
                        return;
                    };
                    let open = Open::new(&broker.metrics().keepalive_streams);
                    upstream.relay(tx, shutdown, (done, open), move |mut resp| {
                        broker.note(&resp.header);
                        rewrite::scrub_header(&mut resp.header);
                        let known = sent
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&resp.id)
                            .copied();
                        resp.id = known.unwrap_or_else(|| t.lease_ids.seen(resp.id));
                        (Duration::ZERO, Some(resp))
                    });
                });
                Ok(rx)
            },
        )
        .await
    }

    async fn lease_time_to_live(
        &self,
        req: Request<PbLeaseTimeToLiveRequest>,
    ) -> Result<Response<PbLeaseTimeToLiveResponse>, Status> {
        let admit = Admit::InFlight(Class::Read);
        self.call(SERVICE, "LeaseTimeToLive", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            let mut r = r;
            let seen = r.id;
            let Some(real) = self.owned_lease(&t, seen).await? else {
                self.metrics().denied("foreign_lease");
                // etcd answers a missing lease with TTL -1, not an error.
                return Ok(PbLeaseTimeToLiveResponse {
                    header: self.synthetic_header(),
                    id: r.id,
                    ttl: -1,
                    granted_ttl: 0,
                    keys: Vec::new(),
                });
            };
            r.id = real;
            let mut resp: PbLeaseTimeToLiveResponse = t
                .upstream
                .unary("/etcdserverpb.Lease/LeaseTimeToLive", request_from(&md, r))
                .await?
                .into_inner();
            self.note(&resp.header);
            rewrite::scrub_header(&mut resp.header);
            resp.id = seen;
            // The ownership record is the broker's, not the tenant's: hide it quietly.
            resp.keys.retain(|k| !t.lease_prefix.contains(k));
            let s = rewrite::strip_keys(&t.prefix, &mut resp.keys);
            self.check_stripped(&t, "LeaseTimeToLive", s);
            Ok(resp)
        })
        .await
    }

    async fn lease_leases(
        &self,
        req: Request<PbLeaseLeasesRequest>,
    ) -> Result<Response<PbLeaseLeasesResponse>, Status> {
        let admit = Admit::InFlight(Class::Read);
        self.call(SERVICE, "LeaseLeases", admit, req, |c, _r| async move {
            let Caller { t, md } = c;
            // The tenant's leases are exactly its ownership records.
            let r = PbRangeRequest {
                key: t.lease_prefix.as_bytes().to_vec(),
                range_end: t.lease_prefix.end().to_vec(),
                keys_only: true,
                ..Default::default()
            };
            let resp: PbRangeResponse = t
                .upstream
                .unary("/etcdserverpb.KV/Range", request_from(&md, r))
                .await?
                .into_inner();
            self.note(&resp.header);
            let leases = resp
                .kvs
                .iter()
                .filter_map(|kv| t.lease_prefix.strip(&kv.key))
                .filter_map(|hex| std::str::from_utf8(hex).ok())
                .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
                .map(|id| PbLeaseStatus {
                    id: t.lease_ids.seen(id as i64),
                })
                .collect();
            let mut header = resp.header;
            rewrite::scrub_header(&mut header);
            Ok(PbLeaseLeasesResponse { header, leases })
        })
        .await
    }
}

impl Broker {
    /// LeaseGrant as the tenant asked it, the ID in its terms both ways; the caller has
    /// admitted it. Lock and Campaign grant their sessions' leases through it too.
    pub(crate) async fn grant_as(
        &self,
        t: &Tenant,
        md: &MetadataMap,
        mut r: PbLeaseGrantRequest,
    ) -> Result<PbLeaseGrantResponse, Status> {
        // A chosen ID is one in the tenant's terms. Taken by anyone, etcd refuses it as
        // it refuses any taken ID; as the tenant's IDs are keyed, that tells nothing
        // about whose it is.
        r.id = t.lease_ids.real(r.id);
        let slot = self.limiter().lease_slot(t).await?;
        let mut resp: PbLeaseGrantResponse = t
            .upstream
            .unary("/etcdserverpb.Lease/LeaseGrant", request_from(md, r))
            .await?
            .into_inner();
        self.note(&resp.header);
        if let Err(e) = self.inner.leases.record(t, resp.id).await {
            // Without its record the lease would be unusable: give it back.
            let revoke = PbLeaseRevokeRequest { id: resp.id };
            let _ = t
                .upstream
                .unary::<_, PbLeaseRevokeResponse>(
                    "/etcdserverpb.Lease/LeaseRevoke",
                    Request::new(revoke),
                )
                .await;
            return Err(e);
        }
        slot.keep();
        resp.id = t.lease_ids.seen(resp.id);
        rewrite::scrub_header(&mut resp.header);
        Ok(resp)
    }
}
