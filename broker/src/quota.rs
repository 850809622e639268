//! Quota arithmetic on etcd messages: how much a write can add to a tenant's keys and
//! bytes before it is sent, and how much it did add, read from the `prev_kv` etcd returns.
//! Pure functions, no I/O.
//!
//! A key-value pair counts as the key as the tenant names it (without the prefix) plus
//! the value. Requests and responses here are etcd's side of the rewrite (keys carry the
//! prefix), so sizes subtract `prefix_len`.

use std::collections::HashMap;

use etcd_client::proto::{
    PbDeleteResponse, PbKeyValue, PbPutRequest, PbPutResponse, PbTxnOpRequest, PbTxnOpResponse,
    PbTxnRequest, PbTxnRequestOp, PbTxnResponse,
};

/// A change in stored keys and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub keys: i64,
    pub bytes: i64,
}

impl Delta {
    pub const fn new(keys: i64, bytes: i64) -> Self {
        Self { keys, bytes }
    }

    pub fn plus(self, o: Delta) -> Delta {
        Delta::new(self.keys + o.keys, self.bytes + o.bytes)
    }

    pub fn minus(self, o: Delta) -> Delta {
        Delta::new(self.keys - o.keys, self.bytes - o.bytes)
    }

    /// The larger of each component: the worst of two branches.
    pub fn max(self, o: Delta) -> Delta {
        Delta::new(self.keys.max(o.keys), self.bytes.max(o.bytes))
    }

    /// Only the growth: what must be reserved against a quota.
    pub fn growth(self) -> Delta {
        Delta::new(self.keys.max(0), self.bytes.max(0))
    }

    pub fn is_growth(self) -> bool {
        self.keys > 0 || self.bytes > 0
    }
}

/// What a key of `key` (with prefix) and a value of `value_len` bytes count for.
pub fn size(prefix_len: usize, key: &[u8], value_len: usize) -> i64 {
    (key.len().saturating_sub(prefix_len) + value_len) as i64
}

pub fn kv_size(prefix_len: usize, kv: &PbKeyValue) -> i64 {
    size(prefix_len, &kv.key, kv.value.len())
}

/// Most a put can add: a new key of its size. A put that keeps the old value
/// (`ignore_value`) adds nothing, since etcd refuses it when the key is missing.
pub fn put_worst(prefix_len: usize, r: &PbPutRequest) -> Delta {
    put_exact(prefix_len, r, None)
}

/// What a put adds, given the size of the pair it replaces (`None`: a new key).
pub fn put_exact(prefix_len: usize, r: &PbPutRequest, old: Option<i64>) -> Delta {
    if r.ignore_value {
        return Delta::default();
    }
    let new = size(prefix_len, &r.key, r.value.len());
    match old {
        Some(o) => Delta::new(0, new - o),
        None => Delta::new(1, new),
    }
}

/// Most a transaction can add: the larger of its branches, nested transactions included.
/// Deletes are not subtracted: the worst case is that they delete nothing.
pub fn txn_worst(prefix_len: usize, r: &PbTxnRequest) -> Delta {
    txn_exact(prefix_len, r, &HashMap::new())
}

/// What a transaction adds at most, knowing the size of the existing pairs in `old`
/// (keys with prefix; a key missing from `old` is taken as new).
pub fn txn_exact(prefix_len: usize, r: &PbTxnRequest, old: &HashMap<Vec<u8>, i64>) -> Delta {
    let branch = |ops: &[PbTxnRequestOp]| {
        ops.iter().fold(Delta::default(), |acc, op| {
            acc.plus(match &op.request {
                Some(PbTxnOpRequest::RequestPut(p)) => {
                    put_exact(prefix_len, p, old.get(&p.key).copied())
                }
                Some(PbTxnOpRequest::RequestTxn(t)) => txn_exact(prefix_len, t, old),
                _ => Delta::default(),
            })
        })
    };
    branch(&r.success).max(branch(&r.failure))
}

/// Keys the transaction's puts write, nested ones included.
pub fn txn_put_keys(r: &PbTxnRequest, out: &mut Vec<Vec<u8>>) {
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(PbTxnOpRequest::RequestPut(p)) => out.push(p.key.clone()),
            Some(PbTxnOpRequest::RequestTxn(t)) => txn_put_keys(t, out),
            _ => {}
        }
    }
}

/// Whether a transaction can change anything (a put or delete in any branch).
pub fn txn_writes(r: &PbTxnRequest) -> bool {
    r.success
        .iter()
        .chain(&r.failure)
        .any(|op| match &op.request {
            Some(PbTxnOpRequest::RequestPut(_) | PbTxnOpRequest::RequestDeleteRange(_)) => true,
            Some(PbTxnOpRequest::RequestTxn(t)) => txn_writes(t),
            _ => false,
        })
}

/// For each operation of a transaction, what settling its response needs: whether the
/// client asked for `prev_kv` itself, and the size a put writes.
#[derive(Debug, Default, PartialEq)]
pub struct TxnAsked {
    success: Vec<OpAsked>,
    failure: Vec<OpAsked>,
}

#[derive(Debug, PartialEq)]
enum OpAsked {
    Other,
    Put {
        asked: bool,
        size: i64,
        ignore_value: bool,
    },
    Delete {
        asked: bool,
    },
    Txn(TxnAsked),
}

/// Asks etcd for `prev_kv` on every put and delete of the transaction, remembering which
/// ones the client asked for.
pub fn txn_ask_prev(prefix_len: usize, r: &mut PbTxnRequest) -> TxnAsked {
    let branch = |ops: &mut Vec<PbTxnRequestOp>| {
        ops.iter_mut()
            .map(|op| match &mut op.request {
                Some(PbTxnOpRequest::RequestPut(p)) => {
                    let asked = std::mem::replace(&mut p.prev_kv, true);
                    OpAsked::Put {
                        asked,
                        size: size(prefix_len, &p.key, p.value.len()),
                        ignore_value: p.ignore_value,
                    }
                }
                Some(PbTxnOpRequest::RequestDeleteRange(d)) => OpAsked::Delete {
                    asked: std::mem::replace(&mut d.prev_kv, true),
                },
                Some(PbTxnOpRequest::RequestTxn(t)) => OpAsked::Txn(txn_ask_prev(prefix_len, t)),
                _ => OpAsked::Other,
            })
            .collect()
    };
    TxnAsked {
        success: branch(&mut r.success),
        failure: branch(&mut r.failure),
    }
}

/// What a put did, from etcd's answer; drops `prev_kv` unless the client asked for it.
pub fn put_settle(
    prefix_len: usize,
    size: i64,
    ignore_value: bool,
    asked: bool,
    resp: &mut PbPutResponse,
) -> Delta {
    let d = match (&resp.prev_kv, ignore_value) {
        (_, true) => Delta::default(),
        (Some(prev), false) => Delta::new(0, size - kv_size(prefix_len, prev)),
        (None, false) => Delta::new(1, size),
    };
    if !asked {
        resp.prev_kv = None;
    }
    d
}

/// What a delete did. Bytes are known only when etcd returned the deleted pairs.
pub fn delete_settle(prefix_len: usize, asked: bool, resp: &mut PbDeleteResponse) -> Delta {
    let bytes: i64 = resp.prev_kvs.iter().map(|kv| kv_size(prefix_len, kv)).sum();
    if !asked {
        resp.prev_kvs.clear();
    }
    Delta::new(-resp.deleted, -bytes)
}

/// What a transaction did (the branch etcd took); drops what the client did not ask for.
pub fn txn_settle(prefix_len: usize, asked: &TxnAsked, resp: &mut PbTxnResponse) -> Delta {
    let ops = if resp.succeeded {
        &asked.success
    } else {
        &asked.failure
    };
    let mut total = Delta::default();
    for (a, r) in ops.iter().zip(resp.responses.iter_mut()) {
        let d = match (a, &mut r.response) {
            (
                OpAsked::Put {
                    asked,
                    size,
                    ignore_value,
                },
                Some(PbTxnOpResponse::ResponsePut(p)),
            ) => put_settle(prefix_len, *size, *ignore_value, *asked, p),
            (OpAsked::Delete { asked }, Some(PbTxnOpResponse::ResponseDeleteRange(d))) => {
                delete_settle(prefix_len, *asked, d)
            }
            (OpAsked::Txn(inner), Some(PbTxnOpResponse::ResponseTxn(t))) => {
                txn_settle(prefix_len, inner, t)
            }
            _ => Delta::default(),
        };
        total = total.plus(d);
    }
    total
}

#[cfg(test)]
mod tests {
    use etcd_client::proto::{PbDeleteRequest, PbResponseOp};

    use super::*;

    const P: &[u8] = b"/t/a/";
    const PL: usize = P.len();

    fn key(k: &str) -> Vec<u8> {
        [P, k.as_bytes()].concat()
    }

    fn put(k: &str, v: &str) -> PbPutRequest {
        PbPutRequest {
            key: key(k),
            value: v.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    fn put_op(k: &str, v: &str) -> PbTxnRequestOp {
        PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestPut(put(k, v))),
        }
    }

    fn del_op(k: &str) -> PbTxnRequestOp {
        PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestDeleteRange(PbDeleteRequest {
                key: key(k),
                ..Default::default()
            })),
        }
    }

    fn kv(k: &str, v: &str) -> PbKeyValue {
        PbKeyValue {
            key: key(k),
            value: v.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn sizes_leave_out_the_prefix() {
        assert_eq!(size(PL, &key("abc"), 10), 13);
        assert_eq!(kv_size(PL, &kv("k", "vv")), 3);
        // A key shorter than the prefix cannot happen; it must not underflow either.
        assert_eq!(size(PL, b"/t", 1), 1);
    }

    #[test]
    fn put_worst_and_exact() {
        assert_eq!(put_worst(PL, &put("k", "12345")), Delta::new(1, 6));
        assert_eq!(put_exact(PL, &put("k", "12345"), Some(3)), Delta::new(0, 3));
        assert_eq!(put_exact(PL, &put("k", "1"), Some(10)), Delta::new(0, -8));
        let mut keep = put("k", "");
        keep.ignore_value = true;
        assert_eq!(put_worst(PL, &keep), Delta::default());
    }

    #[test]
    fn txn_worst_takes_the_larger_branch_and_nests() {
        let nested = PbTxnRequest {
            success: vec![put_op("n1", "1234567890")],
            failure: vec![],
            ..Default::default()
        };
        let t = PbTxnRequest {
            success: vec![put_op("a", "1"), del_op("b")],
            failure: vec![
                put_op("c", "12"),
                put_op("d", "12"),
                PbTxnRequestOp {
                    request: Some(PbTxnOpRequest::RequestTxn(nested)),
                },
            ],
            ..Default::default()
        };
        // success: (1, 2); failure: (2, 6) + nested (1, 12).
        assert_eq!(txn_worst(PL, &t), Delta::new(3, 18));
        let mut keys = Vec::new();
        txn_put_keys(&t, &mut keys);
        assert_eq!(keys, vec![key("a"), key("c"), key("d"), key("n1")]);
        let old = HashMap::from([(key("c"), 3), (key("n1"), 20)]);
        // failure: c replaces 3 with 3 (0, 0), d new (1, 3), n1 shrinks (0, -8).
        assert_eq!(
            txn_exact(PL, &t, &old),
            Delta::new(1, 3).max(Delta::new(1, 2))
        );
        assert!(txn_writes(&t));
        assert!(!txn_writes(&PbTxnRequest::default()));
    }

    #[test]
    fn put_settle_reads_prev_kv_and_hides_it_unless_asked() {
        let mut resp = PbPutResponse {
            prev_kv: Some(kv("k", "old-value")),
            ..Default::default()
        };
        assert_eq!(
            put_settle(PL, 4, false, false, &mut resp),
            Delta::new(0, -6)
        );
        assert_eq!(resp.prev_kv, None);
        let mut resp = PbPutResponse::default();
        assert_eq!(put_settle(PL, 4, false, true, &mut resp), Delta::new(1, 4));
        let mut resp = PbPutResponse {
            prev_kv: Some(kv("k", "v")),
            ..Default::default()
        };
        assert_eq!(put_settle(PL, 4, true, true, &mut resp), Delta::default());
        assert!(resp.prev_kv.is_some(), "asked for, so kept");
    }

    #[test]
    fn delete_settle_counts_keys_and_bytes() {
        let mut resp = PbDeleteResponse {
            deleted: 2,
            prev_kvs: vec![kv("a", "123"), kv("bb", "1")],
            ..Default::default()
        };
        assert_eq!(delete_settle(PL, false, &mut resp), Delta::new(-2, -7));
        assert!(resp.prev_kvs.is_empty());
    }

    #[test]
    fn txn_settle_follows_the_branch_taken() {
        let mut t = PbTxnRequest {
            success: vec![put_op("a", "12345"), del_op("b")],
            failure: vec![put_op("c", "1")],
            ..Default::default()
        };
        if let Some(PbTxnOpRequest::RequestPut(p)) = &mut t.success[0].request {
            p.prev_kv = true;
        }
        let asked = txn_ask_prev(PL, &mut t);
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(PbTxnOpRequest::RequestPut(p)) => assert!(p.prev_kv),
                Some(PbTxnOpRequest::RequestDeleteRange(d)) => assert!(d.prev_kv),
                _ => unreachable!(),
            }
        }
        let mut resp = PbTxnResponse {
            succeeded: true,
            responses: vec![
                PbResponseOp {
                    response: Some(PbTxnOpResponse::ResponsePut(PbPutResponse {
                        prev_kv: Some(kv("a", "1")),
                        ..Default::default()
                    })),
                },
                PbResponseOp {
                    response: Some(PbTxnOpResponse::ResponseDeleteRange(PbDeleteResponse {
                        deleted: 1,
                        prev_kvs: vec![kv("b", "1234")],
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        };
        // a: 6 replaces 2 -> (0, 4); b: (-1, -5).
        assert_eq!(txn_settle(PL, &asked, &mut resp), Delta::new(-1, -1));
        match &resp.responses[0].response {
            Some(PbTxnOpResponse::ResponsePut(p)) => assert!(p.prev_kv.is_some(), "asked"),
            _ => unreachable!(),
        }
        match &resp.responses[1].response {
            Some(PbTxnOpResponse::ResponseDeleteRange(d)) => assert!(d.prev_kvs.is_empty()),
            _ => unreachable!(),
        }
        let mut failed = PbTxnResponse {
            succeeded: false,
            responses: vec![PbResponseOp {
                response: Some(PbTxnOpResponse::ResponsePut(PbPutResponse::default())),
            }],
            ..Default::default()
        };
        assert_eq!(txn_settle(PL, &asked, &mut failed), Delta::new(1, 2));
    }
}
