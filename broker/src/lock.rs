//! Lock and Election (etcd's v3lock and v3election services), and the deny-all Auth
//! service. `etcd-client` exports neither their request messages nor server traits, so
//! the messages are declared here from etcd's documented field numbers and the services
//! are routed by hand.
//!
//! Both are served by the broker itself on top of the tenant's KV, with the recipes of
//! etcd's own servers (etcd's servers would write the real lease IDs into key names and
//! grant leases the broker never sees): names are keys in the tenant's terms, and every
//! write counts against its limits.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use etcd_client::proto::{
    PbCampaignResponse, PbCompare, PbCompareTarget, PbDeleteRequest, PbEvent, PbKeyValue,
    PbLeaderKey, PbLeaderResponse, PbLeaseGrantRequest, PbLockResponse, PbProclaimResponse,
    PbPutRequest, PbRangeRequest, PbResignResponse, PbResponseHeader, PbTargetUnion,
    PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest, PbTxnRequestOp, PbTxnResponse, PbWatchRequest,
    PbWatchRequestUnion, PbWatchResponse,
};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;
use tower::service_fn;

use crate::call::{self, Admit, Caller};
use crate::error::EtcdError;
use crate::limits::Class;
use crate::outbox::{Gone, Inbox, Outbox};
use crate::upstream::request_from;
use crate::{Broker, Tenant, rewrite};

/// `v3lockpb.LockRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LockRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub name: Vec<u8>,
    #[prost(int64, tag = "2")]
    pub lease: i64,
}

/// `v3lockpb.UnlockRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UnlockRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
}

/// `v3lockpb.UnlockResponse` (etcd-client exports it only under another name in some
/// versions; declaring it keeps this module self-contained).
#[derive(Clone, PartialEq, prost::Message)]
pub struct UnlockResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<PbResponseHeader>,
}

/// `v3electionpb.CampaignRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CampaignRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub name: Vec<u8>,
    #[prost(int64, tag = "2")]
    pub lease: i64,
    #[prost(bytes = "vec", tag = "3")]
    pub value: Vec<u8>,
}

/// `v3electionpb.LeaderRequest` (also the request of Observe).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaderRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub name: Vec<u8>,
}

/// `v3electionpb.ResignRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResignRequest {
    #[prost(message, optional, tag = "1")]
    pub leader: Option<PbLeaderKey>,
}

/// `v3electionpb.ProclaimRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProclaimRequest {
    #[prost(message, optional, tag = "1")]
    pub leader: Option<PbLeaderKey>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

type HttpResponse = http::Response<Body>;

fn unimplemented_method(path: &str) -> HttpResponse {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("", path));
    Status::unimplemented(format!("unknown method {method} for service {service}")).into_http()
}

/// Serves one unary method with `f`.
async fn unary<Req, Resp, F, Fut>(req: http::Request<Body>, f: F) -> HttpResponse
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnOnce(Request<Req>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<Resp>, Status>> + Send + 'static,
{
    let mut f = Some(f);
    let svc = service_fn(move |r: Request<Req>| {
        let f = f.take();
        async move {
            match f {
                Some(f) => f(r).await,
                None => Err(Status::internal("handler called twice")),
            }
        }
    });
    tonic::server::Grpc::new(ProstCodec::<Resp, Req>::default())
        .unary(svc, req)
        .await
}

/// The TTL of the lease etcd's lock and election servers grant when a request names
/// none (their session's default).
const SESSION_TTL: i64 = 60;

/// etcd's `RangeRequest.SortTarget.CREATE`.
const SORT_BY_CREATE: i32 = 2;
/// etcd's `RangeRequest.SortOrder.ASCEND` and `DESCEND`.
const ASCEND: i32 = 1;
const DESCEND: i32 = 2;
/// etcd's `Event.EventType.DELETE`.
const DELETE: i32 = 1;
/// etcd's `Compare.CompareResult.EQUAL`.
const EQUAL: i32 = 0;

/// `<name>/<lease in hex>`: the key etcd's recipes give a lock holder or a candidate.
fn session_key(name: &[u8], lease: i64) -> Vec<u8> {
    let mut k = name.to_vec();
    k.push(b'/');
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k
}

fn dir(name: &[u8]) -> Vec<u8> {
    let mut d = name.to_vec();
    d.push(b'/');
    d
}

fn op(request: PbTxnOpRequest) -> PbTxnRequestOp {
    PbTxnRequestOp {
        request: Some(request),
    }
}

fn put(key: &[u8], value: &[u8], lease: i64) -> PbTxnRequestOp {
    op(PbTxnOpRequest::RequestPut(PbPutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        lease,
        ..Default::default()
    }))
}

fn get(key: &[u8]) -> PbTxnRequestOp {
    op(PbTxnOpRequest::RequestRange(PbRangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }))
}

fn delete(key: &[u8]) -> PbTxnRequestOp {
    op(PbTxnOpRequest::RequestDeleteRange(PbDeleteRequest {
        key: key.to_vec(),
        ..Default::default()
    }))
}

/// The oldest (`ASCEND`) or newest (`DESCEND`) key created under `dir`, at most at
/// `max_create` (0: any).
fn by_create(dir: &[u8], order: i32, max_create: i64) -> PbTxnRequestOp {
    op(PbTxnOpRequest::RequestRange(PbRangeRequest {
        key: dir.to_vec(),
        range_end: rewrite::prefix_end(dir),
        sort_target: SORT_BY_CREATE,
        sort_order: order,
        limit: 1,
        max_create_revision: max_create,
        ..Default::default()
    }))
}

fn created_at(key: &[u8], rev: i64) -> PbCompare {
    PbCompare {
        key: key.to_vec(),
        result: EQUAL,
        target: PbCompareTarget::Create as i32,
        target_union: Some(PbTargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

/// The keys of the `i`th response of a transaction.
fn kvs(resp: &mut PbTxnResponse, i: usize) -> Vec<PbKeyValue> {
    match resp.responses.get_mut(i).and_then(|r| r.response.as_mut()) {
        Some(PbTxnOpResponse::ResponseRange(r)) => std::mem::take(&mut r.kvs),
        _ => Vec::new(),
    }
}

/// etcd's lock and election servers are clients of etcd's KV: what KV refuses reaches
/// their caller as Unknown with etcd's message. A connection lost or a deadline passed
/// stays what it is.
fn from_v3_server(s: Status) -> Status {
    match s.code() {
        Code::Unknown | Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => s,
        _ => Status::unknown(s.message().to_owned()),
    }
}

fn missing_leader() -> Status {
    Status::unknown("\"leader\" field must be provided")
}

fn not_leader() -> Status {
    Status::unknown("election: not leader")
}

/// Runs `work` in a task of its own that a dropped call (the client gave up) cancels
/// through the token it gets, so the work can clean up after itself as etcd's servers do
/// when their context ends.
async fn detached<T, F, Fut>(work: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<T, Status>> + Send + 'static,
{
    let token = CancellationToken::new();
    let _cancel_on_drop = token.clone().drop_guard();
    match call::spawn(work(token)).await {
        Ok(res) => res,
        Err(e) => Err(Status::internal(format!("lock task failed: {e}"))),
    }
}

/// Lock and Election, served on top of the tenant's KV with the recipes etcd's own
/// servers use, so every key they write is the tenant's (lease IDs in its terms), counts
/// against its quota, and every lease they grant is recorded and capped as its own.
impl Broker {
    /// The lease a session runs on: the one asked for, or for 0 a fresh one of etcd's
    /// session TTL (etcd's servers never keep it alive).
    async fn session_lease(&self, t: &Tenant, md: &MetadataMap, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let r = PbLeaseGrantRequest {
            ttl: SESSION_TTL,
            id: 0,
        };
        Ok(self.grant_as(t, md, r).await?.id)
    }

    async fn kv(
        &self,
        t: &Arc<Tenant>,
        md: &MetadataMap,
        txn: PbTxnRequest,
        method: &'static str,
    ) -> Result<PbTxnResponse, Status> {
        self.txn_as(t, md, txn, method)
            .await
            .map_err(from_v3_server)
    }

    /// Waits until every key under `dir` created at or before `max_create` is gone
    /// (etcd's `waitDeletes`); the header of the read that found none.
    async fn wait_deletes(
        &self,
        t: &Arc<Tenant>,
        md: &MetadataMap,
        dir: &[u8],
        max_create: i64,
        method: &'static str,
    ) -> Result<Option<PbResponseHeader>, Status> {
        loop {
            let read = PbTxnRequest {
                success: vec![by_create(dir, DESCEND, max_create)],
                ..Default::default()
            };
            let mut resp = self.kv(t, md, read, method).await?;
            let Some(last) = kvs(&mut resp, 0).pop() else {
                return Ok(resp.header);
            };
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            let mut w = self.watch_keys(t, md, &last.key, Vec::new(), rev).await?;
            loop {
                let (_, events) = w.next().await?;
                if events.iter().any(|e| e.r#type == DELETE) {
                    break;
                }
            }
        }
    }

    /// A watch of the tenant's `key` (to `range_end`, both in its terms) from `rev`.
    async fn watch_keys(
        &self,
        t: &Arc<Tenant>,
        md: &MetadataMap,
        key: &[u8],
        range_end: Vec<u8>,
        rev: i64,
    ) -> Result<KeyWatch, Status> {
        let (mut key, mut range_end) = (key.to_vec(), range_end);
        rewrite::watch_range(&t.prefix, &mut key, &mut range_end);
        let mut create = PbWatchRequestUnion::CreateRequest(Default::default());
        if let PbWatchRequestUnion::CreateRequest(c) = &mut create {
            c.key = key;
            c.range_end = range_end;
            c.start_revision = rev;
        }
        let (requests, rx) = mpsc::channel(1);
        let _ = requests.try_send(PbWatchRequest {
            request_union: Some(create),
        });
        let stream = t
            .upstream
            .streaming::<_, PbWatchRequest, PbWatchResponse>(
                "/etcdserverpb.Watch/Watch",
                request_from(md, ReceiverStream::new(rx)),
            )
            .await?
            .into_inner();
        Ok(KeyWatch {
            tenant: t.clone(),
            _requests: requests,
            stream,
            shutdown: self.inner.shutdown.clone(),
        })
    }

    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<PbLockResponse>, Status> {
        let admit = Admit::Rate(Class::Write);
        self.call(LOCK, "Lock", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            let broker = self.clone();
            detached(move |cancelled| async move { broker.lock_as(&t, &md, r, cancelled).await })
                .await
        })
        .await
    }

    /// etcd's mutex: queue under `<name>/` by create revision, hold the lock when first.
    async fn lock_as(
        &self,
        t: &Arc<Tenant>,
        md: &MetadataMap,
        r: LockRequest,
        cancelled: CancellationToken,
    ) -> Result<PbLockResponse, Status> {
        let lease = self
            .session_lease(t, md, r.lease)
            .await
            .map_err(from_v3_server)?;
        let dir = dir(&r.name);
        let key = session_key(&r.name, lease);
        let acquire = PbTxnRequest {
            compare: vec![created_at(&key, 0)],
            success: vec![put(&key, b"", lease), by_create(&dir, ASCEND, 0)],
            failure: vec![get(&key), by_create(&dir, ASCEND, 0)],
        };
        let mut resp = self.kv(t, md, acquire, "Lock").await?;
        let mut mine = resp.header.as_ref().map_or(0, |h| h.revision);
        if !resp.succeeded {
            mine = kvs(&mut resp, 0).first().map_or(0, |kv| kv.create_revision);
        }
        let owner = kvs(&mut resp, 1);
        if owner.first().is_none_or(|o| o.create_revision == mine) {
            return Ok(PbLockResponse {
                header: resp.header,
                key,
            });
        }
        let waited = tokio::select! {
            w = self.wait_deletes(t, md, &dir, mine - 1, "Lock") => w,
            _ = cancelled.cancelled() => Err(Status::cancelled("context canceled")),
        };
        let unlock = || async {
            let txn = PbTxnRequest {
                success: vec![delete(&key)],
                ..Default::default()
            };
            let _ = self.kv(t, &MetadataMap::new(), txn, "Lock").await;
        };
        if let Err(e) = waited {
            unlock().await;
            return Err(e);
        }
        // The lease may have expired while waiting: the lock is held only if the key is.
        let check = PbTxnRequest {
            success: vec![get(&key)],
            ..Default::default()
        };
        let mut held = match self.kv(t, md, check, "Lock").await {
            Ok(held) => held,
            Err(e) => {
                unlock().await;
                return Err(e);
            }
        };
        if kvs(&mut held, 0).is_empty() {
            return Err(Status::unknown("mutex: session is expired"));
        }
        Ok(PbLockResponse {
            header: held.header,
            key,
        })
    }

    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let admit = Admit::Rate(Class::Write);
        self.call(LOCK, "Unlock", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            let txn = PbTxnRequest {
                success: vec![delete(&r.key)],
                ..Default::default()
            };
            let resp = self.kv(&t, &md, txn, "Unlock").await?;
            Ok(UnlockResponse {
                header: resp.header,
            })
        })
        .await
    }

    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<PbCampaignResponse>, Status> {
        let admit = Admit::Rate(Class::Write);
        self.call(ELECTION, "Campaign", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            let broker = self.clone();
            detached(
                move |cancelled| async move { broker.campaign_as(&t, &md, r, cancelled).await },
            )
            .await
        })
        .await
    }

    /// etcd's election: a candidate key under `<name>/`; the leader is the oldest.
    async fn campaign_as(
        &self,
        t: &Arc<Tenant>,
        md: &MetadataMap,
        r: CampaignRequest,
        cancelled: CancellationToken,
    ) -> Result<PbCampaignResponse, Status> {
        let lease = self
            .session_lease(t, md, r.lease)
            .await
            .map_err(from_v3_server)?;
        let dir = dir(&r.name);
        let key = session_key(&r.name, lease);
        let enter = PbTxnRequest {
            compare: vec![created_at(&key, 0)],
            success: vec![put(&key, &r.value, lease)],
            failure: vec![get(&key)],
        };
        let mut resp = self.kv(t, md, enter, "Campaign").await?;
        let mut rev = resp.header.as_ref().map_or(0, |h| h.revision);
        let leader = |rev| PbLeaderKey {
            name: r.name.clone(),
            key: key.clone(),
            rev,
            lease,
        };
        if !resp.succeeded {
            let held = kvs(&mut resp, 0);
            let kv = held.first();
            rev = kv.map_or(0, |kv| kv.create_revision);
            if kv.is_some_and(|kv| kv.value != r.value)
                && let Err(e) = self.proclaim_as(t, md, &leader(rev), &r.value).await
            {
                let _ = self.resign_as(t, md, &leader(rev)).await;
                return Err(e);
            }
        }
        let waited = tokio::select! {
            w = self.wait_deletes(t, md, &dir, rev - 1, "Campaign") => w,
            _ = cancelled.cancelled() => {
                // The client gave up: leave the election, as etcd's server does.
                let _ = self.resign_as(t, &MetadataMap::new(), &leader(rev)).await;
                return Err(Status::cancelled("context canceled"));
            }
        };
        waited?;
        Ok(PbCampaignResponse {
            header: resp.header,
            leader: Some(leader(rev)),
        })
    }

    /// Sets the leader's value if `leader` still leads (etcd's `Proclaim`).
    async fn proclaim_as(
        &self,
        t: &Arc<Tenant>,
        md: &MetadataMap,
        leader: &PbLeaderKey,
        value: &[u8],
    ) -> Result<Option<PbResponseHeader>, Status> {
        let txn = PbTxnRequest {
            compare: vec![created_at(&leader.key, leader.rev)],
            success: vec![put(&leader.key, value, leader.lease)],
            ..Default::default()
        };
        let resp = self.kv(t, md, txn, "Proclaim").await?;
        if !resp.succeeded {
            return Err(not_leader());
        }
        Ok(resp.header)
    }

    /// Deletes the leader's key if `leader` still leads (etcd's `Resign`).
    async fn resign_as(
        &self,
        t: &Arc<Tenant>,
        md: &MetadataMap,
        leader: &PbLeaderKey,
    ) -> Result<Option<PbResponseHeader>, Status> {
        let txn = PbTxnRequest {
            compare: vec![created_at(&leader.key, leader.rev)],
            success: vec![delete(&leader.key)],
            ..Default::default()
        };
        Ok(self.kv(t, md, txn, "Resign").await?.header)
    }

    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<PbProclaimResponse>, Status> {
        let admit = Admit::Rate(Class::Write);
        self.call(ELECTION, "Proclaim", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            let leader = r.leader.ok_or_else(missing_leader)?;
            let header = self.proclaim_as(&t, &md, &leader, &r.value).await?;
            Ok(PbProclaimResponse { header })
        })
        .await
    }

    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<PbResignResponse>, Status> {
        let admit = Admit::Rate(Class::Write);
        self.call(ELECTION, "Resign", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            let leader = r.leader.ok_or_else(missing_leader)?;
            let header = self.resign_as(&t, &md, &leader).await?;
            Ok(PbResignResponse { header })
        })
        .await
    }

    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<PbLeaderResponse>, Status> {
        let admit = Admit::Rate(Class::Read);
        self.call(ELECTION, "Leader", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            let (header, kv) = self.current_leader(&t, &md, &r.name).await?;
            match kv {
                Some(kv) => Ok(PbLeaderResponse {
                    header,
                    kv: Some(kv),
                }),
                None => Err(Status::unknown("election: no leader")),
            }
        })
        .await
    }

    /// The oldest candidate of election `name`, if any.
    async fn current_leader(
        &self,
        t: &Arc<Tenant>,
        md: &MetadataMap,
        name: &[u8],
    ) -> Result<(Option<PbResponseHeader>, Option<PbKeyValue>), Status> {
        let read = PbTxnRequest {
            success: vec![by_create(&dir(name), ASCEND, 0)],
            ..Default::default()
        };
        let mut resp = self.kv(t, md, read, "Leader").await?;
        let kv = kvs(&mut resp, 0).into_iter().next();
        Ok((resp.header, kv))
    }

    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<Inbox<PbLeaderResponse>>, Status> {
        let admit = Admit::Rate(Class::Read);
        self.call(ELECTION, "Observe", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            let name = r.name;
            let (tx, rx) = self.outbox("etcd-shim: observer too slow to keep up");
            let broker = self.clone();
            call::spawn(async move {
                let end = tokio::select! {
                    end = broker.observe_as(&t, &md, &name, &tx) => end,
                    _ = tx.closed() => Ok(()),
                };
                if let Err(status) = end {
                    tx.fail(status);
                }
            });
            Ok(rx)
        })
        .await
    }

    /// etcd's `observe`: the leader, then each of its new values, then the next leader,
    /// until the client goes away. Ends the stream for a client that does not read, as
    /// a slow watcher's.
    async fn observe_as(
        &self,
        t: &Arc<Tenant>,
        md: &MetadataMap,
        name: &[u8],
        tx: &Outbox<PbLeaderResponse>,
    ) -> Result<(), Status> {
        let send = |header, kv| async move {
            let resp = PbLeaderResponse {
                header,
                kv: Some(kv),
            };
            tx.send(resp).await.map_err(|gone| {
                if gone == Gone::Slow {
                    tracing::warn!(tenant = %t.name, "observer too slow, ending its stream");
                }
                // The stream is over either way; this ends the recipe.
                Status::cancelled("")
            })
        };
        let dir = dir(name);
        loop {
            let (header, kv) = self.current_leader(t, md, name).await?;
            let (header, kv) = match kv {
                Some(kv) => (header, kv),
                None => {
                    // Wait for the first candidate to appear.
                    let rev = header.as_ref().map_or(0, |h| h.revision);
                    let end = rewrite::prefix_end(&dir);
                    let mut w = self.watch_keys(t, md, &dir, end, rev).await?;
                    loop {
                        let (mut h, events) = w.next().await?;
                        if let Some(kv) = events
                            .into_iter()
                            .find(|e| e.r#type != DELETE)
                            .and_then(|e| e.kv)
                        {
                            if let Some(h) = h.as_mut() {
                                h.revision = kv.mod_revision;
                            }
                            break (h, kv);
                        }
                    }
                }
            };
            let rev = header.as_ref().map_or(0, |h| h.revision);
            let key = kv.key.clone();
            send(header, kv).await?;
            let mut w = self.watch_keys(t, md, &key, Vec::new(), rev + 1).await?;
            'leader: loop {
                let (h, events) = w.next().await?;
                for e in events {
                    if e.r#type == DELETE {
                        break 'leader;
                    }
                    if let Some(kv) = e.kv {
                        send(h, kv).await?;
                    }
                }
            }
        }
    }
}

const LOCK: &str = "Lock";
const ELECTION: &str = "Election";

/// One of the broker's own watches on a tenant's keys, for the lock and election
/// recipes; events come out in the tenant's terms.
struct KeyWatch {
    tenant: Arc<Tenant>,
    /// Keeps the request side open; closing it would end the watch.
    _requests: mpsc::Sender<PbWatchRequest>,
    stream: crate::upstream::UpstreamStream<PbWatchResponse>,
    shutdown: CancellationToken,
}

impl KeyWatch {
    /// The next events, with their header.
    async fn next(&mut self) -> Result<(Option<PbResponseHeader>, Vec<PbEvent>), Status> {
        loop {
            let msg = tokio::select! {
                m = self.stream.message() => m?,
                _ = self.shutdown.cancelled() => return Err(crate::upstream::shutting_down()),
            };
            let Some(mut resp) = msg else {
                return Err(Status::unknown("lost watcher waiting for delete"));
            };
            if resp.canceled {
                return Err(if resp.compact_revision > 0 {
                    from_v3_server(EtcdError::Compacted.into())
                } else {
                    Status::unknown(resp.cancel_reason)
                });
            }
            if resp.events.is_empty() {
                continue;
            }
            let t = &self.tenant;
            crate::compaction::compact_events(t.state.compacted(), &mut resp.events);
            let _ = rewrite::watch_events(&t.prefix, &mut resp.events);
            t.lease_ids.events(&mut resp.events);
            rewrite::scrub_header(&mut resp.header);
            return Ok((resp.header, resp.events));
        }
    }
}

/// `v3lockpb.Lock`.
#[derive(Clone)]
pub struct LockService(pub Broker);

impl NamedService for LockService {
    const NAME: &'static str = "v3lockpb.Lock";
}

impl tower_service::Service<http::Request<Body>> for LockService {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<HttpResponse, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let b = self.0.clone();
        Box::pin(async move {
            let resp = match req.uri().path() {
                "/v3lockpb.Lock/Lock" => unary(req, move |r| async move { b.lock(r).await }).await,
                "/v3lockpb.Lock/Unlock" => {
                    unary(req, move |r| async move { b.unlock(r).await }).await
                }
                p => unimplemented_method(p),
            };
            Ok(resp)
        })
    }
}

/// `v3electionpb.Election`.
#[derive(Clone)]
pub struct ElectionService(pub Broker);

impl NamedService for ElectionService {
    const NAME: &'static str = "v3electionpb.Election";
}

impl tower_service::Service<http::Request<Body>> for ElectionService {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<HttpResponse, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let b = self.0.clone();
        Box::pin(async move {
            let resp = match req.uri().path() {
                "/v3electionpb.Election/Campaign" => {
                    unary(req, move |r| async move { b.campaign(r).await }).await
                }
                "/v3electionpb.Election/Proclaim" => {
                    unary(req, move |r| async move { b.proclaim(r).await }).await
                }
                "/v3electionpb.Election/Resign" => {
                    unary(req, move |r| async move { b.resign(r).await }).await
                }
                "/v3electionpb.Election/Leader" => {
                    unary(req, move |r| async move { b.leader(r).await }).await
                }
                "/v3electionpb.Election/Observe" => {
                    let svc = service_fn(move |r: Request<LeaderRequest>| {
                        let b = b.clone();
                        async move { b.observe(r).await }
                    });
                    tonic::server::Grpc::new(
                        ProstCodec::<PbLeaderResponse, LeaderRequest>::default(),
                    )
                    .server_streaming(svc, req)
                    .await
                }
                p => unimplemented_method(p),
            };
            Ok(resp)
        })
    }
}
