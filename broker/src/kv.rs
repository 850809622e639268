//! KV: Range, Put, DeleteRange, Txn under the tenant prefix, with lease IDs in the
//! tenant's terms (see `leaseid`); Compact is the tenant's own (see `compaction`).

use etcd_client::proto::{
    PbCompactionRequest, PbCompactionResponse, PbDeleteRequest, PbDeleteResponse, PbKvService,
    PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbRangeStreamResponse,
    PbTxnRequest, PbTxnResponse,
};
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::call::{Admit, Caller};
use crate::error::EtcdError;
use crate::limits::{Class, Reservation};
use crate::upstream::request_from;
use crate::{Broker, Tenant, quota, rewrite};

const SERVICE: &str = "KV";

#[tonic::async_trait]
impl PbKvService for Broker {
    async fn range(
        &self,
        req: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        self.call(
            SERVICE,
            "Range",
            Admit::InFlight(Class::Read),
            req,
            |c, mut r| async move {
                rewrite::range_request(&c.t.prefix, &mut r)?;
                let mut resp = self.guarded_range(&c.t, &c.md, r).await?;
                self.note(&resp.header);
                let s = rewrite::range_response(&c.t.prefix, &mut resp.header, &mut resp.kvs);
                self.check_stripped(&c.t, "Range", s);
                c.t.lease_ids.kvs(&mut resp.kvs);
                Ok(resp)
            },
        )
        .await
    }

    type RangeStreamStream = crate::outbox::Inbox<PbRangeStreamResponse>;

    /// etcd 3.7's streaming Range: forwarded, every chunk's keys stripped as Range's.
    /// An etcd without it answers Unimplemented itself, in its own words, and clients
    /// (the apiserver) fall back to Range.
    async fn range_stream(
        &self,
        req: Request<PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        // The stream counts as in flight until it ends, so it holds its own permit.
        self.call(
            SERVICE,
            "RangeStream",
            Admit::Handler,
            req,
            |c, mut r| async move {
                let Caller { t, md } = c;
                let permit = self.limiter().admit(&t, Class::Read, "RangeStream")?;
                rewrite::range_request(&t.prefix, &mut r)?;
                self.check_compacted(&t, &md, r.revision).await?;
                let upstream = t
                    .upstream
                    .server_streaming::<_, PbRangeStreamResponse>(
                        "/etcdserverpb.KV/RangeStream",
                        request_from(&md, r),
                    )
                    .await?
                    .into_inner();
                let broker = self.clone();
                let (tx, rx) = self.outbox("etcd-shim: range stream reader too slow to keep up");
                upstream.relay(
                    tx,
                    self.inner.shutdown.clone(),
                    permit,
                    move |mut chunk: PbRangeStreamResponse| {
                        if let Some(resp) = chunk.range_response.as_mut() {
                            broker.note(&resp.header);
                            let s =
                                rewrite::range_response(&t.prefix, &mut resp.header, &mut resp.kvs);
                            broker.check_stripped(&t, "RangeStream", s);
                            t.lease_ids.kvs(&mut resp.kvs);
                        }
                        (Duration::ZERO, Some(chunk))
                    },
                );
                Ok(rx)
            },
        )
        .await
    }

    async fn put(&self, req: Request<PbPutRequest>) -> Result<Response<PbPutResponse>, Status> {
        self.call(
            SERVICE,
            "Put",
            Admit::InFlight(Class::Write),
            req,
            |c, r| async move { self.put_as(&c.t, &c.md, r, "Put").await },
        )
        .await
    }

    async fn delete_range(
        &self,
        req: Request<PbDeleteRequest>,
    ) -> Result<Response<PbDeleteResponse>, Status> {
        let admit = Admit::InFlight(Class::Write);
        self.call(SERVICE, "DeleteRange", admit, req, |c, mut r| async move {
            let Caller { t, md } = c;
            rewrite::delete_request(&t.prefix, &mut r)?;
            let resv = self.limiter().track(&t);
            let asked = r.prev_kv;
            r.prev_kv |= resv.tracks();
            let mut resp: PbDeleteResponse = match t
                .upstream
                .unary("/etcdserverpb.KV/DeleteRange", request_from(&md, r))
                .await
            {
                Ok(resp) => resp.into_inner(),
                Err(e) => {
                    resv.release();
                    return Err(e);
                }
            };
            self.note(&resp.header);
            if resv.tracks() {
                let pl = t.prefix.as_bytes().len();
                let d = quota::delete_settle(pl, asked, &mut resp);
                resv.settle(revision(&resp.header), d);
                self.limiter().refresh_soon(&t);
            }
            let s = rewrite::range_response(&t.prefix, &mut resp.header, &mut resp.prev_kvs);
            self.check_stripped(&t, "DeleteRange", s);
            t.lease_ids.kvs(&mut resp.prev_kvs);
            Ok(resp)
        })
        .await
    }

    async fn txn(&self, req: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        let class = if quota::txn_writes(req.get_ref()) {
            Class::Write
        } else {
            Class::Read
        };
        self.call(
            SERVICE,
            "Txn",
            Admit::InFlight(class),
            req,
            |c, r| async move { self.txn_as(&c.t, &c.md, r, "Txn").await },
        )
        .await
    }

    /// Compaction of the tenant's own history (see `compaction`): etcd's validation and
    /// errors, recorded per tenant; never forwarded, since etcd's compaction is
    /// cluster-wide.
    async fn compact(
        &self,
        req: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        let admit = Admit::InFlight(Class::Write);
        self.call(SERVICE, "Compact", admit, req, |c, r| async move {
            self.compact_tenant(&c.t, &c.md, r.revision).await
        })
        .await
    }
}

fn revision(h: &Option<etcd_client::proto::PbResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

impl Broker {
    /// Put, as the tenant asked it (keys and leases in its terms), under `method`'s name
    /// in refusals; the caller has admitted it.
    pub(crate) async fn put_as(
        &self,
        t: &Arc<Tenant>,
        md: &MetadataMap,
        mut r: PbPutRequest,
        method: &'static str,
    ) -> Result<PbPutResponse, Status> {
        rewrite::put_request(&t.prefix, &mut r)?;
        if r.lease != 0 {
            r.lease = self.real_lease(t, method, r.lease).await?;
        }
        let pl = t.prefix.as_bytes().len();
        let resv = self
            .limiter()
            .reserve(
                t,
                method,
                quota::put_worst(pl, &r),
                || vec![r.key.clone()],
                |old| quota::put_exact(pl, &r, old.get(&r.key).copied()),
            )
            .await?;
        // etcd's prev_kv tells what the put replaced; the client gets it only if asked.
        let (asked, size, ignore_value) = (
            r.prev_kv,
            quota::size(pl, &r.key, r.value.len()),
            r.ignore_value,
        );
        r.prev_kv |= resv.tracks();
        let mut resp: PbPutResponse = match t
            .upstream
            .unary("/etcdserverpb.KV/Put", request_from(md, r))
            .await
        {
            Ok(resp) => resp.into_inner(),
            Err(e) => {
                resv.release();
                return Err(e);
            }
        };
        self.note(&resp.header);
        if resv.tracks() {
            let d = quota::put_settle(pl, size, ignore_value, asked, &mut resp);
            resv.settle(revision(&resp.header), d);
            self.limiter().refresh_soon(t);
        }
        let s = rewrite::put_response(&t.prefix, &mut resp.header, &mut resp.prev_kv);
        self.check_stripped(t, method, s);
        t.lease_ids.kvs(resp.prev_kv.as_mut_slice());
        Ok(resp)
    }

    /// Txn, as the tenant asked it, under `method`'s name in refusals; the caller has
    /// admitted it.
    pub(crate) async fn txn_as(
        &self,
        t: &Arc<Tenant>,
        md: &MetadataMap,
        mut r: PbTxnRequest,
        method: &'static str,
    ) -> Result<PbTxnResponse, Status> {
        let writes = quota::txn_writes(&r);
        rewrite::txn_request(&t.prefix, &mut r)?;
        let mut leases = Vec::new();
        rewrite::txn_leases(&mut r, &mut leases);
        for lease in leases {
            *lease = self.real_lease(t, method, *lease).await?;
        }
        let pl = t.prefix.as_bytes().len();
        let resv = if writes {
            self.limiter()
                .reserve(
                    t,
                    method,
                    quota::txn_worst(pl, &r),
                    || {
                        let mut keys = Vec::new();
                        quota::txn_put_keys(&r, &mut keys);
                        keys
                    },
                    |old| quota::txn_exact(pl, &r, old),
                )
                .await?
        } else {
            Reservation::none()
        };
        let asked = resv.tracks().then(|| quota::txn_ask_prev(pl, &mut r));
        let mut resp = match self.guarded_txn(t, md, r).await {
            Ok(resp) => resp,
            Err(e) => {
                resv.release();
                return Err(e);
            }
        };
        self.note(&resp.header);
        if let Some(asked) = &asked {
            let d = quota::txn_settle(pl, asked, &mut resp);
            resv.settle(revision(&resp.header), d);
            self.limiter().refresh_soon(t);
        }
        let s = rewrite::txn_response(&t.prefix, &mut resp);
        self.check_stripped(t, method, s);
        t.lease_ids.txn(&mut resp);
        Ok(resp)
    }

    /// The real lease the tenant means by `seen`, if it owns it (see `leases`); anything
    /// else is refused as a lease etcd does not know.
    pub(crate) async fn real_lease(
        &self,
        t: &Tenant,
        method: &'static str,
        seen: i64,
    ) -> Result<i64, Status> {
        match self.owned_lease(t, seen).await? {
            Some(real) => Ok(real),
            None => Err(self.deny(Some(t), method, EtcdError::LeaseNotFound)),
        }
    }

    /// [`Broker::real_lease`] without the refusal: `None` when the tenant owns no such
    /// lease.
    pub(crate) async fn owned_lease(&self, t: &Tenant, seen: i64) -> Result<Option<i64>, Status> {
        self.inner.leases.owned(t, seen).await
    }
}
