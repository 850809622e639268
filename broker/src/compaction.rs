//! Per-tenant compaction. A tenant's Compact is validated as etcd validates it and
//! recorded as the tenant's compacted revision, in etcd under a broker-private key, so
//! every broker replica enforces it. Reads below that revision then get etcd's
//! compacted error, as on an etcd of the tenant's own, while every other tenant keeps its
//! history. The real etcd is never compacted for a tenant: on a shared etcd the cluster's
//! own compaction stays in charge, and a read below it gets etcd's own error.
//!
//! Range and Txn reads at a revision are guarded inside one etcd Txn (compare the record,
//! else run the read), so a compaction recorded by another replica is never missed and no
//! read costs a second round trip. Watches and streamed ranges read the record first.
//!
//! A backend marked dedicated to etcd-shim is compacted for real, by one broker replica at
//! a time (a lease-held seat at the record root), at the lowest revision its tenants have
//! recorded: no tenant that compacted loses history it has not given up.

use etcd_client::proto::{
    PbCompactionResponse, PbCompare, PbCompareTarget, PbEvent, PbRangeRequest, PbRangeResponse,
    PbTargetUnion, PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest, PbTxnRequestOp, PbTxnResponse,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::proto::{
    PbCompactionRequest, PbLeaseGrantRequest, PbLeaseGrantResponse, PbLeaseRevokeRequest,
    PbLeaseRevokeResponse, PbPutRequest,
};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::upstream::Upstream;

use crate::error::EtcdError;
use crate::upstream::request_from;
use crate::{Broker, Tenant};

/// etcd's `Compare.CompareResult.GREATER`.
const GREATER: i32 = 1;
/// etcd's `Compare.CompareResult.EQUAL`.
const EQUAL: i32 = 0;

/// Records hold the revision as 20 decimal digits, so that etcd's byte-wise value
/// compare orders them as numbers.
pub fn encode(rev: i64) -> Vec<u8> {
    format!("{:020}", rev.max(0)).into_bytes()
}

/// The revision of a record; 0 for one that is not a record (never written so).
pub fn decode(value: &[u8]) -> i64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// "The record is above `rev`": the tenant has compacted past a read at `rev`.
fn compacted_past(t: &Tenant, rev: i64) -> PbCompare {
    PbCompare {
        key: t.compaction_key.clone(),
        result: GREATER,
        target: PbCompareTarget::Value as i32,
        target_union: Some(PbTargetUnion::Value(encode(rev))),
        ..Default::default()
    }
}

fn read_record(t: &Tenant, serializable: bool) -> PbTxnRequestOp {
    PbTxnRequestOp {
        request: Some(PbTxnOpRequest::RequestRange(PbRangeRequest {
            key: t.compaction_key.clone(),
            serializable,
            ..Default::default()
        })),
    }
}

/// The record's revision from the answer of a guard that fired.
fn fired(resp: &PbTxnResponse) -> i64 {
    match resp.responses.first().and_then(|r| r.response.as_ref()) {
        Some(PbTxnOpResponse::ResponseRange(r)) => r.kvs.first().map_or(0, |kv| decode(&kv.value)),
        _ => 0,
    }
}

/// What etcd's physical compaction at `compacted` takes from watch events: the previous
/// version of a key changed exactly at the compacted revision was superseded by then, so
/// a watcher that reaches that event after the compaction gets it without `prev_kv`.
/// Every other previous version is either below the compaction (the watch itself is
/// compacted) or was live at it, and kept.
pub fn compact_events(compacted: i64, events: &mut [PbEvent]) {
    if compacted <= 0 {
        return;
    }
    for ev in events {
        if ev
            .kv
            .as_ref()
            .is_some_and(|kv| kv.mod_revision == compacted)
        {
            ev.prev_kv = None;
        }
    }
}

/// The lowest revision any range of a Txn reads at (0: all read the current revision).
pub fn txn_read_revision(r: &PbTxnRequest) -> i64 {
    r.success
        .iter()
        .chain(&r.failure)
        .filter_map(|op| match &op.request {
            Some(PbTxnOpRequest::RequestRange(r)) if r.revision > 0 => Some(r.revision),
            Some(PbTxnOpRequest::RequestTxn(t)) => Some(txn_read_revision(t)).filter(|&r| r > 0),
            _ => None,
        })
        .min()
        .unwrap_or(0)
}

impl Broker {
    /// Refuses at once a read below what this broker already knows is compacted.
    fn known_compacted(&self, t: &Tenant, rev: i64) -> Result<(), Status> {
        if rev > 0 && rev < t.state.compacted() {
            return Err(EtcdError::Compacted.into());
        }
        Ok(())
    }

    /// The tenant's compaction record as etcd has it now (linearizable): the answer's
    /// header carries the current revision, and this broker learns the compaction.
    async fn record(&self, t: &Tenant, md: &MetadataMap) -> Result<PbRangeResponse, Status> {
        let req = PbRangeRequest {
            key: t.compaction_key.clone(),
            ..Default::default()
        };
        let resp: PbRangeResponse = t
            .upstream
            .unary("/etcdserverpb.KV/Range", request_from(md, req))
            .await?
            .into_inner();
        self.note(&resp.header);
        t.state
            .saw_compacted(resp.kvs.first().map_or(0, |kv| decode(&kv.value)));
        Ok(resp)
    }

    /// The tenant's compacted revision, read from etcd (linearizable).
    pub(crate) async fn compacted_revision(
        &self,
        t: &Tenant,
        md: &MetadataMap,
    ) -> Result<i64, Status> {
        let resp = self.record(t, md).await?;
        Ok(resp.kvs.first().map_or(0, |kv| decode(&kv.value)))
    }

    /// Refuses a read at `rev` below the tenant's compaction, asking etcd when this broker
    /// does not know it already; for reads that cannot be guarded inside a Txn.
    pub(crate) async fn check_compacted(
        &self,
        t: &Tenant,
        md: &MetadataMap,
        rev: i64,
    ) -> Result<(), Status> {
        if rev <= 0 {
            return Ok(());
        }
        self.known_compacted(t, rev)?;
        if rev < self.compacted_revision(t, md).await? {
            return Err(EtcdError::Compacted.into());
        }
        Ok(())
    }

    /// Range, guarded against the tenant's compaction when it reads at a revision.
    pub(crate) async fn guarded_range(
        &self,
        t: &Tenant,
        md: &MetadataMap,
        r: PbRangeRequest,
    ) -> Result<PbRangeResponse, Status> {
        if r.revision <= 0 {
            return Ok(t
                .upstream
                .unary("/etcdserverpb.KV/Range", request_from(md, r))
                .await?
                .into_inner());
        }
        self.known_compacted(t, r.revision)?;
        let guard = PbTxnRequest {
            compare: vec![compacted_past(t, r.revision)],
            success: vec![read_record(t, r.serializable)],
            failure: vec![PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestRange(r)),
            }],
        };
        let resp = self.guarded(t, md, guard).await?;
        match resp.responses.into_iter().next().and_then(|r| r.response) {
            Some(PbTxnOpResponse::ResponseRange(mut range)) => {
                range.header = resp.header;
                Ok(range)
            }
            _ => Err(Status::internal(
                "etcd answered a guarded range without its range",
            )),
        }
    }

    /// Txn, guarded against the tenant's compaction when one of its ranges reads at a
    /// revision: the tenant's Txn runs nested in the guard's failure branch.
    pub(crate) async fn guarded_txn(
        &self,
        t: &Tenant,
        md: &MetadataMap,
        r: PbTxnRequest,
    ) -> Result<PbTxnResponse, Status> {
        let rev = txn_read_revision(&r);
        if rev <= 0 {
            return Ok(t
                .upstream
                .unary("/etcdserverpb.KV/Txn", request_from(md, r))
                .await?
                .into_inner());
        }
        self.known_compacted(t, rev)?;
        let guard = PbTxnRequest {
            compare: vec![compacted_past(t, rev)],
            success: vec![read_record(t, false)],
            failure: vec![PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestTxn(r)),
            }],
        };
        let resp = self.guarded(t, md, guard).await?;
        match resp.responses.into_iter().next().and_then(|r| r.response) {
            Some(PbTxnOpResponse::ResponseTxn(mut inner)) => {
                inner.header = resp.header;
                Ok(inner)
            }
            _ => Err(Status::internal(
                "etcd answered a guarded txn without its txn",
            )),
        }
    }

    /// Runs a guard; a guard that fired is the compacted error.
    async fn guarded(
        &self,
        t: &Tenant,
        md: &MetadataMap,
        guard: PbTxnRequest,
    ) -> Result<PbTxnResponse, Status> {
        let resp: PbTxnResponse = t
            .upstream
            .unary("/etcdserverpb.KV/Txn", request_from(md, guard))
            .await?
            .into_inner();
        if resp.succeeded {
            t.state.saw_compacted(fired(&resp));
            return Err(EtcdError::Compacted.into());
        }
        Ok(resp)
    }

    /// KV.Compact for one tenant: validated as etcd validates it, then recorded. The
    /// record only moves forward; concurrent compactions (from any replica) are settled by
    /// a compare on the record's own revision.
    pub(crate) async fn compact_tenant(
        &self,
        t: &Tenant,
        md: &MetadataMap,
        rev: i64,
    ) -> Result<PbCompactionResponse, Status> {
        for _ in 0..8 {
            let resp = self.record(t, md).await?;
            let current = resp.header.as_ref().map_or(0, |h| h.revision);
            let (compacted, seen) = resp
                .kvs
                .first()
                .map_or((0, 0), |kv| (decode(&kv.value), kv.mod_revision));
            // etcd's own order of checks: compacted first, then future.
            if rev <= compacted {
                return Err(EtcdError::Compacted.into());
            }
            if rev > current {
                return Err(EtcdError::FutureRev.into());
            }
            let record = PbTxnRequest {
                compare: vec![PbCompare {
                    key: t.compaction_key.clone(),
                    result: EQUAL,
                    target: PbCompareTarget::Mod as i32,
                    target_union: Some(PbTargetUnion::ModRevision(seen)),
                    ..Default::default()
                }],
                success: vec![PbTxnRequestOp {
                    request: Some(PbTxnOpRequest::RequestPut(PbPutRequest {
                        key: t.compaction_key.clone(),
                        value: encode(rev),
                        ..Default::default()
                    })),
                }],
                failure: Vec::new(),
            };
            let mut resp: PbTxnResponse = t
                .upstream
                .unary("/etcdserverpb.KV/Txn", request_from(md, record))
                .await?
                .into_inner();
            self.note(&resp.header);
            if resp.succeeded {
                t.state.saw_compacted(rev);
                tracing::info!(tenant = %t.name, revision = rev, "tenant compacted");
                crate::rewrite::scrub_header(&mut resp.header);
                return Ok(PbCompactionResponse {
                    header: resp.header,
                });
            }
            // Another compaction was recorded meanwhile; judge this one against it.
        }
        Err(Status::unavailable(
            "etcd-shim: too many concurrent compactions, try again",
        ))
    }
}

impl Broker {
    /// Compacts the backends dedicated to etcd-shim every `interval`, until shutdown.
    pub async fn compact_dedicated(self, interval: Duration, shutdown: CancellationToken) {
        let me = replica_id();
        // The revision each backend was last compacted at, so an unchanged low is skipped.
        let mut done: HashMap<Arc<str>, i64> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            for (name, upstream) in self.dedicated_backends() {
                let last = done.get(&name).copied().unwrap_or(0);
                match self.compact_backend(&upstream, &me, interval, last).await {
                    Ok(Some(rev)) => {
                        done.insert(name, rev);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(
                        backend = %name,
                        error = e.message(),
                        "compacting a dedicated backend failed; trying again next round"
                    ),
                }
            }
        }
    }

    /// One round on one backend: take or keep the seat, then compact at the lowest
    /// recorded revision if it moved. The revision compacted at, if any.
    async fn compact_backend(
        &self,
        up: &Upstream,
        me: &str,
        interval: Duration,
        last: i64,
    ) -> Result<Option<i64>, Status> {
        let root = self.compaction_root().as_bytes().to_vec();
        if !lead(up, &root, me, interval).await? {
            return Ok(None);
        }
        let records: PbRangeResponse = up
            .unary(
                "/etcdserverpb.KV/Range",
                Request::new(PbRangeRequest {
                    range_end: crate::rewrite::prefix_end(&root),
                    key: root.clone(),
                    ..Default::default()
                }),
            )
            .await?
            .into_inner();
        let Some(low) = records
            .kvs
            .iter()
            .filter(|kv| kv.key != root)
            .map(|kv| decode(&kv.value))
            .filter(|&r| r > 0)
            .min()
        else {
            return Ok(None);
        };
        if low <= last {
            return Ok(None);
        }
        let compact = PbCompactionRequest {
            revision: low,
            physical: false,
        };
        match up
            .unary::<_, PbCompactionResponse>("/etcdserverpb.KV/Compact", Request::new(compact))
            .await
        {
            Ok(_) => {
                tracing::info!(revision = low, "compacted a dedicated backend");
                Ok(Some(low))
            }
            // Compacted there already (by an operator, or a replica that held the seat).
            Err(s) if s.message() == EtcdError::Compacted.to_string() => Ok(Some(low)),
            Err(s) => Err(s),
        }
    }
}

/// Takes the compactor's seat (the record root's key, held by a lease), or keeps it when
/// this replica holds it: one replica compacts a backend at a time, and a replica that
/// dies frees the seat when its lease expires.
async fn lead(up: &Upstream, seat: &[u8], me: &str, interval: Duration) -> Result<bool, Status> {
    let ttl = (interval.as_secs() * 3).max(10) as i64;
    let lease: PbLeaseGrantResponse = up
        .unary(
            "/etcdserverpb.Lease/LeaseGrant",
            Request::new(PbLeaseGrantRequest { ttl, id: 0 }),
        )
        .await?
        .into_inner();
    let sit = PbTxnRequestOp {
        request: Some(PbTxnOpRequest::RequestPut(PbPutRequest {
            key: seat.to_vec(),
            value: me.as_bytes().to_vec(),
            lease: lease.id,
            ..Default::default()
        })),
    };
    let mine = PbCompare {
        key: seat.to_vec(),
        result: EQUAL,
        target: PbCompareTarget::Value as i32,
        target_union: Some(PbTargetUnion::Value(me.as_bytes().to_vec())),
        ..Default::default()
    };
    let free = PbCompare {
        key: seat.to_vec(),
        result: EQUAL,
        target: PbCompareTarget::Create as i32,
        target_union: Some(PbTargetUnion::CreateRevision(0)),
        ..Default::default()
    };
    for compare in [mine, free] {
        let r: PbTxnResponse = up
            .unary(
                "/etcdserverpb.KV/Txn",
                Request::new(PbTxnRequest {
                    compare: vec![compare],
                    success: vec![sit.clone()],
                    failure: Vec::new(),
                }),
            )
            .await?
            .into_inner();
        if r.succeeded {
            // The lease the seat held before has no key left and expires by itself.
            return Ok(true);
        }
    }
    let _ = up
        .unary::<_, PbLeaseRevokeResponse>(
            "/etcdserverpb.Lease/LeaseRevoke",
            Request::new(PbLeaseRevokeRequest { id: lease.id }),
        )
        .await;
    Ok(false)
}

/// Tells this broker process from its replicas in the compactor's seat.
fn replica_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{host}/{}/{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_order_as_numbers() {
        let revs = [0, 1, 9, 10, 99, 100, 12345, i64::MAX];
        for w in revs.windows(2) {
            assert!(encode(w[0]) < encode(w[1]), "{} < {}", w[0], w[1]);
        }
        for r in revs {
            assert_eq!(decode(&encode(r)), r);
        }
        assert_eq!(decode(b"not a number"), 0);
    }

    #[test]
    fn the_lowest_revision_read_in_a_txn_counts() {
        let range = |revision| PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestRange(PbRangeRequest {
                key: b"k".to_vec(),
                revision,
                ..Default::default()
            })),
        };
        let nested = PbTxnRequest {
            failure: vec![range(3)],
            ..Default::default()
        };
        let txn = PbTxnRequest {
            success: vec![range(0), range(7)],
            failure: vec![PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestTxn(nested)),
            }],
            ..Default::default()
        };
        assert_eq!(txn_read_revision(&txn), 3);
        assert_eq!(txn_read_revision(&PbTxnRequest::default()), 0);
    }
}
