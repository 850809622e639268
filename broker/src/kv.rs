//! KV: Range, Put, DeleteRange, Txn under the tenant prefix; Compact is absorbed because
//! compaction is cluster-wide.

use std::time::Instant;

use etcd_client::proto::{
    PbCompactionRequest, PbCompactionResponse, PbDeleteRequest, PbDeleteResponse, PbKvService,
    PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbRangeStreamResponse,
    PbTxnRequest, PbTxnResponse,
};
use tonic::{Request, Response, Status};

use crate::error::EtcdError;
use crate::upstream::request_from;
use crate::{Broker, rewrite};

const SERVICE: &str = "KV";

#[tonic::async_trait]
impl PbKvService for Broker {
    async fn range(
        &self,
        req: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        let started = Instant::now();
        let res = async {
            let t = self.tenant(req.metadata()).await?;
            let md = req.metadata().clone();
            let mut r = req.into_inner();
            rewrite::range_request(&t.prefix, &mut r)?;
            let mut resp: PbRangeResponse = t
                .upstream
                .unary("/etcdserverpb.KV/Range", request_from(&md, r))
                .await?
                .into_inner();
            self.note(&resp.header);
            let s = rewrite::range_response(&t.prefix, &mut resp.header, &mut resp.kvs);
            self.check_stripped(&t, "Range", s);
            Ok(Response::new(resp))
        }
        .await;
        self.metrics().observe(SERVICE, "Range", started, &res);
        res
    }

    type RangeStreamStream = tokio_stream::Empty<Result<PbRangeStreamResponse, Status>>;

    async fn range_stream(
        &self,
        _req: Request<PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        // Not in the etcd versions the broker targets; answer as such an etcd does.
        Err(Status::unimplemented(
            "unknown method RangeStream for service etcdserverpb.KV",
        ))
    }

    async fn put(&self, req: Request<PbPutRequest>) -> Result<Response<PbPutResponse>, Status> {
        let started = Instant::now();
        let res = async {
            let t = self.tenant(req.metadata()).await?;
            let md = req.metadata().clone();
            let mut r = req.into_inner();
            rewrite::put_request(&t.prefix, &mut r)?;
            if r.lease != 0 && !self.owns_lease(&t, r.lease).await? {
                return Err(self.deny(Some(&t), "Put", EtcdError::LeaseNotFound));
            }
            let mut resp: PbPutResponse = t
                .upstream
                .unary("/etcdserverpb.KV/Put", request_from(&md, r))
                .await?
                .into_inner();
            self.note(&resp.header);
            let s = rewrite::put_response(&t.prefix, &mut resp.header, &mut resp.prev_kv);
            self.check_stripped(&t, "Put", s);
            Ok(Response::new(resp))
        }
        .await;
        self.metrics().observe(SERVICE, "Put", started, &res);
        res
    }

    async fn delete_range(
        &self,
        req: Request<PbDeleteRequest>,
    ) -> Result<Response<PbDeleteResponse>, Status> {
        let started = Instant::now();
        let res = async {
            let t = self.tenant(req.metadata()).await?;
            let md = req.metadata().clone();
            let mut r = req.into_inner();
            rewrite::delete_request(&t.prefix, &mut r)?;
            let mut resp: PbDeleteResponse = t
                .upstream
                .unary("/etcdserverpb.KV/DeleteRange", request_from(&md, r))
                .await?
                .into_inner();
            self.note(&resp.header);
            let s = rewrite::range_response(&t.prefix, &mut resp.header, &mut resp.prev_kvs);
            self.check_stripped(&t, "DeleteRange", s);
            Ok(Response::new(resp))
        }
        .await;
        self.metrics()
            .observe(SERVICE, "DeleteRange", started, &res);
        res
    }

    async fn txn(&self, req: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        let started = Instant::now();
        let res = async {
            let t = self.tenant(req.metadata()).await?;
            let md = req.metadata().clone();
            let mut r = req.into_inner();
            rewrite::txn_request(&t.prefix, &mut r)?;
            let mut leases = Vec::new();
            rewrite::txn_leases(&r, &mut leases);
            for lease in leases {
                if !self.owns_lease(&t, lease).await? {
                    return Err(self.deny(Some(&t), "Txn", EtcdError::LeaseNotFound));
                }
            }
            let mut resp: PbTxnResponse = t
                .upstream
                .unary("/etcdserverpb.KV/Txn", request_from(&md, r))
                .await?
                .into_inner();
            self.note(&resp.header);
            let s = rewrite::txn_response(&t.prefix, &mut resp);
            self.check_stripped(&t, "Txn", s);
            Ok(Response::new(resp))
        }
        .await;
        self.metrics().observe(SERVICE, "Txn", started, &res);
        res
    }

    /// Compaction would remove history from every tenant, so it is never forwarded. The
    /// answer is what etcd would say: success, or a future-revision error.
    async fn compact(
        &self,
        req: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        let started = Instant::now();
        let res = async {
            let t = self.tenant(req.metadata()).await?;
            let md = req.metadata().clone();
            // The current revision, from a range over a key no tenant can create.
            let probe = PbRangeRequest {
                key: t.prefix.as_bytes().to_vec(),
                count_only: true,
                ..Default::default()
            };
            let mut resp: PbRangeResponse = t
                .upstream
                .unary("/etcdserverpb.KV/Range", request_from(&md, probe))
                .await?
                .into_inner();
            self.note(&resp.header);
            let current = resp.header.as_ref().map_or(0, |h| h.revision);
            if req.get_ref().revision > current {
                return Err(EtcdError::FutureRev.into());
            }
            self.metrics().denied("compact_absorbed");
            rewrite::scrub_header(&mut resp.header);
            Ok(Response::new(PbCompactionResponse {
                header: resp.header,
            }))
        }
        .await;
        self.metrics().observe(SERVICE, "Compact", started, &res);
        res
    }
}

impl Broker {
    /// Whether the tenant owns the lease (false for leases of others and for missing ones).
    pub(crate) async fn owns_lease(&self, t: &crate::Tenant, id: i64) -> Result<bool, Status> {
        self.inner.leases.owns(t, id).await
    }
}
