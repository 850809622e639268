//! Lock and Election (etcd's v3lock and v3election services), and the deny-all Auth
//! service. `etcd-client` exports neither their request messages nor server traits, so
//! the messages are declared here from etcd's documented field numbers and the services
//! are routed by hand.
//!
//! Lock and election names are keys: they get the tenant prefix, returned keys are
//! stripped, and a lease named by a request must be the tenant's own.

use std::convert::Infallible;
use std::task::{Context, Poll};

use etcd_client::proto::{
    PbCampaignResponse, PbKeyValue, PbLeaderKey, PbLeaderResponse, PbLockResponse,
    PbProclaimResponse, PbResignResponse, PbResponseHeader,
};
use futures_util::future::BoxFuture;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;
use tower::service_fn;

use crate::error::EtcdError;
use crate::limits::Class;
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

impl Broker {
    fn prefix_leader(&self, t: &Tenant, leader: &mut Option<PbLeaderKey>) -> Result<i64, Status> {
        let l = leader.as_mut().ok_or(EtcdError::EmptyKey)?;
        // etcd's election server compares on the leader key, and refuses an empty one
        // as every empty key; prefixed, it would name the tenant's prefix itself.
        if l.key.is_empty() {
            return Err(empty_key_from_a_v3_server());
        }
        l.name = t.prefix.key(&l.name);
        l.key = t.prefix.key(&l.key);
        Ok(l.lease)
    }

    fn strip_leader(&self, t: &Tenant, leader: &mut Option<PbLeaderKey>) {
        if let Some(l) = leader {
            match (t.prefix.strip(&l.name), t.prefix.strip(&l.key)) {
                (Some(n), Some(k)) => {
                    l.name = n.to_vec();
                    l.key = k.to_vec();
                }
                _ => {
                    *leader = None;
                    self.check_stripped(t, "Election", rewrite_one());
                }
            }
        }
    }

    fn strip_kv_opt(&self, t: &Tenant, kv: &mut Option<PbKeyValue>) {
        let mut kvs: Vec<PbKeyValue> = kv.take().into_iter().collect();
        let s = rewrite::strip_kvs(&t.prefix, &mut kvs);
        self.check_stripped(t, "Election", s);
        *kv = kvs.pop();
    }

    async fn check_lease(
        &self,
        t: &Tenant,
        method: &'static str,
        lease: i64,
    ) -> Result<(), Status> {
        if lease != 0 && !self.owns_lease(t, lease).await? {
            return Err(self.deny(Some(t), method, EtcdError::LeaseNotFound));
        }
        Ok(())
    }

    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<PbLockResponse>, Status> {
        let t = self.tenant(req.metadata()).await?;
        self.rate(&t, Class::Write, "Lock")?;
        let md = req.metadata().clone();
        let mut r = req.into_inner();
        if r.name.is_empty() {
            return Err(EtcdError::EmptyKey.into());
        }
        self.check_lease(&t, "Lock", r.lease).await?;
        r.name = t.prefix.key(&r.name);
        let mut resp: PbLockResponse = t
            .upstream
            .unary("/v3lockpb.Lock/Lock", request_from(&md, r))
            .await?
            .into_inner();
        self.note(&resp.header);
        rewrite::scrub_header(&mut resp.header);
        match t.prefix.strip(&resp.key) {
            Some(k) => resp.key = k.to_vec(),
            None => {
                resp.key.clear();
                self.check_stripped(&t, "Lock", rewrite_one());
            }
        }
        Ok(Response::new(resp))
    }

    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let t = self.tenant(req.metadata()).await?;
        self.rate(&t, Class::Write, "Unlock")?;
        let md = req.metadata().clone();
        let mut r = req.into_inner();
        // etcd's lock server deletes the key, and refuses an empty one as every empty
        // key; prefixed, it would delete the tenant's prefix itself.
        if r.key.is_empty() {
            return Err(empty_key_from_a_v3_server());
        }
        r.key = t.prefix.key(&r.key);
        let mut resp: UnlockResponse = t
            .upstream
            .unary("/v3lockpb.Lock/Unlock", request_from(&md, r))
            .await?
            .into_inner();
        self.note(&resp.header);
        rewrite::scrub_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<PbCampaignResponse>, Status> {
        let t = self.tenant(req.metadata()).await?;
        self.rate(&t, Class::Write, "Campaign")?;
        let md = req.metadata().clone();
        let mut r = req.into_inner();
        if r.name.is_empty() {
            return Err(EtcdError::EmptyKey.into());
        }
        self.check_lease(&t, "Campaign", r.lease).await?;
        r.name = t.prefix.key(&r.name);
        let mut resp: PbCampaignResponse = t
            .upstream
            .unary("/v3electionpb.Election/Campaign", request_from(&md, r))
            .await?
            .into_inner();
        self.note(&resp.header);
        rewrite::scrub_header(&mut resp.header);
        self.strip_leader(&t, &mut resp.leader);
        Ok(Response::new(resp))
    }

    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<PbProclaimResponse>, Status> {
        let t = self.tenant(req.metadata()).await?;
        self.rate(&t, Class::Write, "Proclaim")?;
        let md = req.metadata().clone();
        let mut r = req.into_inner();
        let lease = self.prefix_leader(&t, &mut r.leader)?;
        self.check_lease(&t, "Proclaim", lease).await?;
        let mut resp: PbProclaimResponse = t
            .upstream
            .unary("/v3electionpb.Election/Proclaim", request_from(&md, r))
            .await?
            .into_inner();
        self.note(&resp.header);
        rewrite::scrub_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<PbResignResponse>, Status> {
        let t = self.tenant(req.metadata()).await?;
        self.rate(&t, Class::Write, "Resign")?;
        let md = req.metadata().clone();
        let mut r = req.into_inner();
        let lease = self.prefix_leader(&t, &mut r.leader)?;
        self.check_lease(&t, "Resign", lease).await?;
        let mut resp: PbResignResponse = t
            .upstream
            .unary("/v3electionpb.Election/Resign", request_from(&md, r))
            .await?
            .into_inner();
        self.note(&resp.header);
        rewrite::scrub_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<PbLeaderResponse>, Status> {
        let t = self.tenant(req.metadata()).await?;
        self.rate(&t, Class::Read, "Leader")?;
        let md = req.metadata().clone();
        let mut r = req.into_inner();
        r.name = t.prefix.key(&r.name);
        let mut resp: PbLeaderResponse = t
            .upstream
            .unary("/v3electionpb.Election/Leader", request_from(&md, r))
            .await?
            .into_inner();
        self.note(&resp.header);
        rewrite::scrub_header(&mut resp.header);
        self.strip_kv_opt(&t, &mut resp.kv);
        Ok(Response::new(resp))
    }

    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<ReceiverStream<Result<PbLeaderResponse, Status>>>, Status> {
        let t = self.tenant(req.metadata()).await?;
        self.rate(&t, Class::Read, "Observe")?;
        let md = req.metadata().clone();
        let mut r = req.into_inner();
        r.name = t.prefix.key(&r.name);
        let upstream = t
            .upstream
            .server_streaming::<_, PbLeaderResponse>(
                "/v3electionpb.Election/Observe",
                request_from(&md, r),
            )
            .await?
            .into_inner();
        let broker = self.clone();
        let stream = upstream.relay(
            self.inner.shutdown.clone(),
            (),
            move |mut resp: PbLeaderResponse| {
                broker.note(&resp.header);
                rewrite::scrub_header(&mut resp.header);
                broker.strip_kv_opt(&t, &mut resp.kv);
                resp
            },
        );
        Ok(Response::new(stream))
    }
}

/// etcd's lock and election servers are clients of etcd's KV: they hand a refusal on
/// as an error of their own, which gRPC sends as Unknown with etcd's message.
fn empty_key_from_a_v3_server() -> Status {
    Status::unknown(EtcdError::EmptyKey.to_string())
}

fn rewrite_one() -> rewrite::Stripped {
    rewrite::Stripped { foreign: 1 }
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

/// `etcdserverpb.Auth`: every method is refused once the caller is authenticated, so
/// no request message needs decoding.
#[derive(Clone)]
pub struct AuthService(pub Broker);

impl NamedService for AuthService {
    const NAME: &'static str = "etcdserverpb.Auth";
}

impl tower_service::Service<http::Request<Body>> for AuthService {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<HttpResponse, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let b = self.0.clone();
        Box::pin(async move {
            let md = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
            let method = match req.uri().path().rsplit('/').next() {
                Some(m) => auth_method_name(m),
                None => "Auth",
            };
            let status = match b.refuse::<()>(&md, method).await {
                Err(s) => s,
                Ok(()) => Status::from(EtcdError::PermissionDenied),
            };
            Ok(status.into_http())
        })
    }
}

/// A static name for the audit line (labels must be `'static`).
fn auth_method_name(m: &str) -> &'static str {
    const NAMES: &[&str] = &[
        "AuthEnable",
        "AuthDisable",
        "AuthStatus",
        "Authenticate",
        "UserAdd",
        "UserGet",
        "UserList",
        "UserDelete",
        "UserChangePassword",
        "UserGrantRole",
        "UserRevokeRole",
        "RoleAdd",
        "RoleGet",
        "RoleList",
        "RoleDelete",
        "RoleGrantPermission",
        "RoleRevokePermission",
    ];
    NAMES.iter().find(|n| **n == m).copied().unwrap_or("Auth")
}
