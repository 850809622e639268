//! The etcd reads behind a tenant's quotas: its keys and bytes counted by a paged scan of
//! its prefix at one revision, the sizes of the pairs a write would replace, and its live
//! leases counted from their ownership records. Only `limits` calls them, when its
//! numbers are missing, stale or close to a limit.

use std::collections::HashMap;

use etcd_client::proto::{
    PbRangeRequest, PbRangeResponse, PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest, PbTxnRequestOp,
    PbTxnResponse,
};
use tonic::{Code, Request, Status};

use crate::Tenant;
use crate::quota::{self, Delta};

/// Most keys per page when measuring a tenant.
const SCAN_PAGE: i64 = 1000;
/// Most bytes of one page: a page that would be larger is refused by its length before
/// the broker buffers it, and asked for again with fewer keys, so a tenant of large
/// values costs the broker no more memory than one of small values.
const SCAN_PAGE_BYTES: usize = 4 << 20;
/// Bound on pages per measurement (a billion keys): every loop ends.
const SCAN_MAX_PAGES: usize = 1_000_000;

/// Counts the tenant's keys and bytes at one revision, a page at a time. Returns the
/// revision and the counts. Retried from the start if etcd compacts that revision
/// meanwhile.
pub(crate) async fn scan(t: &Tenant) -> Result<(i64, Delta), Status> {
    let prefix_len = t.prefix.as_bytes().len();
    let mut last_err = None;
    for _attempt in 0..3 {
        let mut key = t.prefix.as_bytes().to_vec();
        let mut rev = 0;
        let mut total = Delta::default();
        let mut done = false;
        let mut page = SCAN_PAGE;
        for _page in 0..SCAN_MAX_PAGES {
            let req = PbRangeRequest {
                key: key.clone(),
                range_end: t.prefix.end().to_vec(),
                limit: page,
                revision: rev,
                ..Default::default()
            };
            // One pair is as large as etcd lets it be, so a page of one is not bounded.
            let bound = if page > 1 {
                SCAN_PAGE_BYTES
            } else {
                usize::MAX
            };
            let resp: PbRangeResponse = match t
                .upstream
                .unary_within("/etcdserverpb.KV/Range", Request::new(req), bound)
                .await
            {
                Ok(r) => r.into_inner(),
                Err(e) if crate::upstream::too_large(&e) => {
                    page = (page / 8).max(1);
                    continue;
                }
                Err(e) => {
                    last_err = Some(e);
                    break;
                }
            };
            page = (page * 2).min(SCAN_PAGE);
            if rev == 0 {
                rev = resp.header.as_ref().map_or(0, |h| h.revision);
            }
            for kv in &resp.kvs {
                total = total.plus(Delta::new(1, quota::kv_size(prefix_len, kv)));
            }
            match resp.kvs.last() {
                Some(kv) if resp.more => {
                    key = kv.key.clone();
                    key.push(0);
                }
                _ => {
                    done = true;
                    break;
                }
            }
        }
        if done {
            return Ok((rev, total));
        }
        match &last_err {
            Some(e) if e.code() == Code::OutOfRange => continue,
            _ => break,
        }
    }
    Err(last_err.unwrap_or_else(|| Status::unavailable("measuring tenant usage: too many keys")))
}

/// Sizes of the existing pairs among `keys` (with prefix), in one transaction.
pub(crate) async fn lookup_sizes(
    t: &Tenant,
    keys: Vec<Vec<u8>>,
) -> Result<HashMap<Vec<u8>, i64>, Status> {
    let prefix_len = t.prefix.as_bytes().len();
    let req = PbTxnRequest {
        success: keys
            .into_iter()
            .map(|key| PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestRange(PbRangeRequest {
                    key,
                    ..Default::default()
                })),
            })
            .collect(),
        ..Default::default()
    };
    let resp: PbTxnResponse = t
        .upstream
        .unary("/etcdserverpb.KV/Txn", Request::new(req))
        .await?
        .into_inner();
    let mut sizes = HashMap::new();
    for op in resp.responses {
        if let Some(PbTxnOpResponse::ResponseRange(r)) = op.response {
            for kv in r.kvs {
                let s = quota::kv_size(prefix_len, &kv);
                sizes.insert(kv.key, s);
            }
        }
    }
    Ok(sizes)
}

/// How many leases the tenant holds, counted from their ownership records in etcd.
pub(crate) async fn count_leases(t: &Tenant) -> Result<i64, Status> {
    let req = PbRangeRequest {
        key: t.lease_prefix.as_bytes().to_vec(),
        range_end: t.lease_prefix.end().to_vec(),
        count_only: true,
        ..Default::default()
    };
    let resp: PbRangeResponse = t
        .upstream
        .unary("/etcdserverpb.KV/Range", Request::new(req))
        .await?
        .into_inner();
    Ok(resp.count)
}
