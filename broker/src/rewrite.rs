//! Key rewriting between a tenant's view and etcd's: requests get the tenant prefix in
//! front of every key, responses get it stripped. Pure functions, no I/O.
//!
//! Validation happens before rewriting and matches etcd's own (an empty key is refused),
//! because after prefixing no key is empty any more and etcd could not tell.

use etcd_client::proto::{
    PbCompare, PbDeleteRequest, PbEvent, PbKeyValue, PbPutRequest, PbRangeRequest,
    PbResponseHeader, PbResponseOp, PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest, PbTxnRequestOp,
    PbTxnResponse,
};

use crate::error::EtcdError;

/// A tenant's key prefix. Always non-empty and ending in `/`, so that no tenant's prefix
/// is a byte-prefix of another's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    bytes: Vec<u8>,
    /// `prefix_end(bytes)`, computed once: every open-ended range is clamped to it.
    end: Vec<u8>,
}

impl Prefix {
    /// Builds a prefix; `None` when it is empty or does not end in `/`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Option<Self> {
        let bytes = bytes.into();
        if bytes.last() != Some(&b'/') {
            return None;
        }
        let end = prefix_end(&bytes);
        Some(Self { bytes, end })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The smallest key greater than every key under the prefix.
    pub fn end(&self) -> &[u8] {
        &self.end
    }

    /// `P + key`.
    pub fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len() + key.len());
        out.extend_from_slice(&self.bytes);
        out.extend_from_slice(key);
        out
    }

    /// Rewrites a range end: empty stays empty (single key), `"\0"` (every key from
    /// `key` on) becomes the end of the prefix, anything else gets the prefix.
    pub fn range_end(&self, range_end: &[u8]) -> Vec<u8> {
        match range_end {
            [] => Vec::new(),
            [0] => self.end.clone(),
            e => self.key(e),
        }
    }

    /// Strips the prefix; `None` when the key is not under it.
    pub fn strip<'a>(&self, key: &'a [u8]) -> Option<&'a [u8]> {
        key.strip_prefix(self.bytes.as_slice())
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        key.starts_with(&self.bytes)
    }
}

/// clientv3's `GetPrefixRangeEnd`: increment the last byte below 0xff and cut after it;
/// a key of only 0xff bytes has no end, which etcd spells `"\0"`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Synthetic identity stamped on every response header, so no client learns the real
/// cluster's ids or raft term.
pub use etcd_shim_core::ids::{CLUSTER_ID, MEMBER_ID, RAFT_TERM};

/// Replaces the identifying fields of a header; the revision is global and passes through.
pub fn scrub_header(header: &mut Option<PbResponseHeader>) {
    if let Some(h) = header {
        h.cluster_id = CLUSTER_ID;
        h.member_id = MEMBER_ID;
        h.raft_term = RAFT_TERM;
    }
}

fn require_key(key: &[u8]) -> Result<(), EtcdError> {
    if key.is_empty() {
        Err(EtcdError::EmptyKey)
    } else {
        Ok(())
    }
}

pub fn range_request(p: &Prefix, req: &mut PbRangeRequest) -> Result<(), EtcdError> {
    require_key(&req.key)?;
    req.range_end = p.range_end(&req.range_end);
    req.key = p.key(&req.key);
    Ok(())
}

pub fn put_request(p: &Prefix, req: &mut PbPutRequest) -> Result<(), EtcdError> {
    require_key(&req.key)?;
    req.key = p.key(&req.key);
    Ok(())
}

pub fn delete_request(p: &Prefix, req: &mut PbDeleteRequest) -> Result<(), EtcdError> {
    require_key(&req.key)?;
    req.range_end = p.range_end(&req.range_end);
    req.key = p.key(&req.key);
    Ok(())
}

/// Rewrites every compare and every operation of a transaction, nested ones included.
/// Compares may name an empty key (etcd accepts that: it matches no key); under the
/// prefix it still matches nothing, since a tenant can never create the key `P`.
pub fn txn_request(p: &Prefix, req: &mut PbTxnRequest) -> Result<(), EtcdError> {
    // Validate the whole tree first so a bad op deep inside leaves the request untouched
    // and the error is the one etcd would give.
    validate_txn(req)?;
    rewrite_txn(p, req);
    Ok(())
}

fn validate_txn(req: &PbTxnRequest) -> Result<(), EtcdError> {
    // etcd checks the compares before the ops, at every level of nesting.
    for c in &req.compare {
        require_key(&c.key)?;
    }
    for op in req.success.iter().chain(&req.failure) {
        match &op.request {
            Some(PbTxnOpRequest::RequestRange(r)) => require_key(&r.key)?,
            Some(PbTxnOpRequest::RequestPut(r)) => require_key(&r.key)?,
            Some(PbTxnOpRequest::RequestDeleteRange(r)) => require_key(&r.key)?,
            Some(PbTxnOpRequest::RequestTxn(t)) => validate_txn(t)?,
            None => {}
        }
    }
    Ok(())
}

fn rewrite_txn(p: &Prefix, req: &mut PbTxnRequest) {
    for c in &mut req.compare {
        compare(p, c);
    }
    for op in req.success.iter_mut().chain(req.failure.iter_mut()) {
        rewrite_op(p, op);
    }
}

fn compare(p: &Prefix, c: &mut PbCompare) {
    c.range_end = p.range_end(&c.range_end);
    c.key = p.key(&c.key);
}

fn rewrite_op(p: &Prefix, op: &mut PbTxnRequestOp) {
    match &mut op.request {
        Some(PbTxnOpRequest::RequestRange(r)) => {
            r.range_end = p.range_end(&r.range_end);
            r.key = p.key(&r.key);
        }
        Some(PbTxnOpRequest::RequestPut(r)) => r.key = p.key(&r.key),
        Some(PbTxnOpRequest::RequestDeleteRange(r)) => {
            r.range_end = p.range_end(&r.range_end);
            r.key = p.key(&r.key);
        }
        Some(PbTxnOpRequest::RequestTxn(t)) => rewrite_txn(p, t),
        None => {}
    }
}

/// The lease fields of a transaction's puts, nested ones included, so the caller can
/// check that the tenant owns each lease and put in the real one.
pub fn txn_leases<'a>(req: &'a mut PbTxnRequest, out: &mut Vec<&'a mut i64>) {
    for op in req.success.iter_mut().chain(req.failure.iter_mut()) {
        match &mut op.request {
            Some(PbTxnOpRequest::RequestPut(r)) if r.lease != 0 => out.push(&mut r.lease),
            Some(PbTxnOpRequest::RequestTxn(t)) => txn_leases(t, out),
            _ => {}
        }
    }
}

/// Rewrites a watch range the way etcd reads it: an empty key means `"\0"`, the
/// smallest key.
pub fn watch_range(p: &Prefix, key: &mut Vec<u8>, range_end: &mut Vec<u8>) {
    if key.is_empty() {
        key.push(0);
    }
    *range_end = p.range_end(range_end);
    *key = p.key(key);
}

/// Counts keys that were dropped from a response because they were not under the
/// caller's prefix. Every such key is a bug somewhere; the caller logs and counts it.
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Stripped {
    pub foreign: usize,
}

impl Stripped {
    fn merge(&mut self, other: Stripped) {
        self.foreign += other.foreign;
    }
}

/// Strips the prefix from one key-value; `false` when it is foreign and must be dropped.
fn strip_kv(p: &Prefix, kv: &mut PbKeyValue) -> bool {
    match p.strip(&kv.key) {
        Some(k) => {
            kv.key = k.to_vec();
            true
        }
        None => false,
    }
}

fn strip_opt_kv(p: &Prefix, kv: &mut Option<PbKeyValue>) -> Stripped {
    let mut s = Stripped::default();
    if let Some(inner) = kv
        && !strip_kv(p, inner)
    {
        *kv = None;
        s.foreign += 1;
    }
    s
}

/// Strips a list of key-values in place, dropping foreign ones.
pub fn strip_kvs(p: &Prefix, kvs: &mut Vec<PbKeyValue>) -> Stripped {
    let before = kvs.len();
    kvs.retain_mut(|kv| strip_kv(p, kv));
    Stripped {
        foreign: before - kvs.len(),
    }
}

pub fn range_response(
    p: &Prefix,
    header: &mut Option<PbResponseHeader>,
    kvs: &mut Vec<PbKeyValue>,
) -> Stripped {
    scrub_header(header);
    strip_kvs(p, kvs)
}

pub fn put_response(
    p: &Prefix,
    header: &mut Option<PbResponseHeader>,
    prev_kv: &mut Option<PbKeyValue>,
) -> Stripped {
    scrub_header(header);
    strip_opt_kv(p, prev_kv)
}

pub fn txn_response(p: &Prefix, resp: &mut PbTxnResponse) -> Stripped {
    scrub_header(&mut resp.header);
    let mut s = Stripped::default();
    for op in &mut resp.responses {
        s.merge(response_op(p, op));
    }
    s
}

fn response_op(p: &Prefix, op: &mut PbResponseOp) -> Stripped {
    match &mut op.response {
        Some(PbTxnOpResponse::ResponseRange(r)) => range_response(p, &mut r.header, &mut r.kvs),
        Some(PbTxnOpResponse::ResponsePut(r)) => put_response(p, &mut r.header, &mut r.prev_kv),
        Some(PbTxnOpResponse::ResponseDeleteRange(r)) => {
            range_response(p, &mut r.header, &mut r.prev_kvs)
        }
        Some(PbTxnOpResponse::ResponseTxn(t)) => txn_response(p, t),
        None => Stripped::default(),
    }
}

/// Strips watch events; an event whose key is foreign is dropped whole, and a foreign
/// `prev_kv` is removed from an otherwise valid event.
pub fn watch_events(p: &Prefix, events: &mut Vec<PbEvent>) -> Stripped {
    let before = events.len();
    let mut s = Stripped::default();
    events.retain_mut(|ev| {
        let keep = match &mut ev.kv {
            Some(kv) => strip_kv(p, kv),
            None => true,
        };
        if keep {
            s.merge(strip_opt_kv(p, &mut ev.prev_kv));
        }
        keep
    });
    s.foreign += before - events.len();
    s
}

/// Strips a list of bare keys (LeaseTimeToLive), dropping foreign ones.
pub fn strip_keys(p: &Prefix, keys: &mut Vec<Vec<u8>>) -> Stripped {
    let before = keys.len();
    keys.retain_mut(|k| match p.strip(k) {
        Some(s) => {
            *k = s.to_vec();
            true
        }
        None => false,
    });
    Stripped {
        foreign: before - keys.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::proto::{PbDeleteResponse, PbPutResponse, PbRangeResponse};

    /// (key, range_end) in the tenant's view, then in etcd's.
    type Case = (&'static [u8], &'static [u8], &'static [u8], &'static [u8]);

    fn p() -> Prefix {
        Prefix::new(b"/t/a/".to_vec()).unwrap()
    }

    fn kv(key: &[u8]) -> PbKeyValue {
        PbKeyValue {
            key: key.to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn prefix_must_end_in_slash() {
        assert!(Prefix::new(b"".to_vec()).is_none());
        assert!(Prefix::new(b"/t/a".to_vec()).is_none());
        assert_eq!(p().end(), b"/t/a0");
    }

    #[test]
    fn prefix_end_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a", b"b"),
            (b"/t/", b"/t0"),
            (b"a\xff", b"b"),
            (b"a\xff\xff", b"b"),
            (b"\xfe\xff", b"\xff"),
            (b"\xff", b"\0"),
            (b"\xff\xff", b"\0"),
            (b"", b"\0"),
        ];
        for (input, want) in cases {
            assert_eq!(prefix_end(input), *want, "prefix_end({input:?})");
        }
    }

    #[test]
    fn range_request_table() {
        // (key, range_end) in the tenant's view -> etcd's view.
        let cases: &[Case] = &[
            (b"k", b"", b"/t/a/k", b""),
            (b"k", b"\0", b"/t/a/k", b"/t/a0"),
            (b"\0", b"\0", b"/t/a/\0", b"/t/a0"),
            (b"a", b"b", b"/t/a/a", b"/t/a/b"),
            // A range end "past" the prefix in the tenant's view stays inside it.
            (b"a", b"\xff\xff", b"/t/a/a", b"/t/a/\xff\xff"),
            (b"k", b"\x01", b"/t/a/k", b"/t/a/\x01"),
        ];
        for (k, e, wk, we) in cases {
            let mut r = PbRangeRequest {
                key: k.to_vec(),
                range_end: e.to_vec(),
                limit: 7,
                ..Default::default()
            };
            range_request(&p(), &mut r).unwrap();
            assert_eq!(
                (r.key.as_slice(), r.range_end.as_slice()),
                (*wk, *we),
                "{k:?} {e:?}"
            );
            assert!(r.key.as_slice() >= p().as_bytes() && r.key.as_slice() < p().end());
            if !r.range_end.is_empty() {
                assert!(r.range_end.as_slice() <= p().end(), "range end escapes");
            }
            assert_eq!(r.limit, 7, "other fields untouched");
        }
    }

    #[test]
    fn empty_keys_are_refused_like_etcd() {
        let mut r = PbRangeRequest::default();
        assert_eq!(range_request(&p(), &mut r), Err(EtcdError::EmptyKey));
        let mut r = PbPutRequest::default();
        assert_eq!(put_request(&p(), &mut r), Err(EtcdError::EmptyKey));
        let mut r = PbDeleteRequest {
            range_end: b"\0".to_vec(),
            ..Default::default()
        };
        assert_eq!(delete_request(&p(), &mut r), Err(EtcdError::EmptyKey));
        assert!(r.range_end == b"\0", "a refused request is left untouched");
    }

    #[test]
    fn prefix_with_trailing_ff_bytes() {
        let q = Prefix::new(b"/t/\xff\xff/".to_vec()).unwrap();
        assert_eq!(q.end(), b"/t/\xff\xff0");
        let mut r = PbDeleteRequest {
            key: b"\xff".to_vec(),
            range_end: b"\0".to_vec(),
            ..Default::default()
        };
        delete_request(&q, &mut r).unwrap();
        assert_eq!(r.key, b"/t/\xff\xff/\xff");
        assert_eq!(r.range_end, b"/t/\xff\xff0");
    }

    fn put_op(key: &[u8], lease: i64) -> PbTxnRequestOp {
        PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestPut(PbPutRequest {
                key: key.to_vec(),
                lease,
                ..Default::default()
            })),
        }
    }

    fn range_op(key: &[u8], end: &[u8]) -> PbTxnRequestOp {
        PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestRange(PbRangeRequest {
                key: key.to_vec(),
                range_end: end.to_vec(),
                ..Default::default()
            })),
        }
    }

    fn nested_txn() -> PbTxnRequest {
        PbTxnRequest {
            compare: vec![PbCompare {
                key: b"c".to_vec(),
                range_end: b"\0".to_vec(),
                ..Default::default()
            }],
            success: vec![
                put_op(b"s", 5),
                PbTxnRequestOp {
                    request: Some(PbTxnOpRequest::RequestTxn(PbTxnRequest {
                        compare: vec![PbCompare {
                            key: b"inner".to_vec(),
                            ..Default::default()
                        }],
                        success: vec![range_op(b"x", b"\0"), put_op(b"y", 9)],
                        failure: vec![PbTxnRequestOp {
                            request: Some(PbTxnOpRequest::RequestDeleteRange(PbDeleteRequest {
                                key: b"d".to_vec(),
                                range_end: b"e".to_vec(),
                                ..Default::default()
                            })),
                        }],
                    })),
                },
            ],
            failure: vec![range_op(b"f", b"")],
        }
    }

    #[test]
    fn txn_rewrites_every_level() {
        let mut t = nested_txn();
        txn_request(&p(), &mut t).unwrap();
        assert_eq!(t.compare[0].key, b"/t/a/c");
        assert_eq!(t.compare[0].range_end, b"/t/a0");
        let Some(PbTxnOpRequest::RequestPut(put)) = &t.success[0].request else {
            panic!("put");
        };
        assert_eq!(put.key, b"/t/a/s");
        let Some(PbTxnOpRequest::RequestTxn(inner)) = &t.success[1].request else {
            panic!("txn");
        };
        assert_eq!(inner.compare[0].key, b"/t/a/inner");
        assert_eq!(inner.compare[0].range_end, b"");
        let Some(PbTxnOpRequest::RequestRange(r)) = &inner.success[0].request else {
            panic!("range");
        };
        assert_eq!(
            (r.key.as_slice(), r.range_end.as_slice()),
            (&b"/t/a/x"[..], &b"/t/a0"[..])
        );
        let Some(PbTxnOpRequest::RequestDeleteRange(d)) = &inner.failure[0].request else {
            panic!("delete");
        };
        assert_eq!(
            (d.key.as_slice(), d.range_end.as_slice()),
            (&b"/t/a/d"[..], &b"/t/a/e"[..])
        );
        let Some(PbTxnOpRequest::RequestRange(f)) = &t.failure[0].request else {
            panic!("range");
        };
        assert_eq!(f.key, b"/t/a/f");

        let mut txn = nested_txn();
        let mut leases = Vec::new();
        txn_leases(&mut txn, &mut leases);
        assert_eq!(leases.iter().map(|l| **l).collect::<Vec<_>>(), vec![5, 9]);
    }

    #[test]
    fn txn_with_empty_key_deep_inside_is_refused_untouched() {
        let mut t = nested_txn();
        if let Some(PbTxnOpRequest::RequestTxn(inner)) = &mut t.success[1].request {
            inner.success.push(put_op(b"", 0));
        }
        let before = t.clone();
        assert_eq!(txn_request(&p(), &mut t), Err(EtcdError::EmptyKey));
        assert_eq!(t, before);
    }

    #[test]
    fn txn_compares_with_an_empty_key_are_refused_like_etcd() {
        // At the top, and in a nested txn.
        let mut top = nested_txn();
        top.compare.push(PbCompare::default());
        let mut deep = nested_txn();
        if let Some(PbTxnOpRequest::RequestTxn(inner)) = &mut deep.success[1].request {
            inner.compare.push(PbCompare::default());
        }
        for mut t in [top, deep] {
            let before = t.clone();
            assert_eq!(txn_request(&p(), &mut t), Err(EtcdError::EmptyKey));
            assert_eq!(t, before);
        }
    }

    #[test]
    fn watch_range_table() {
        let cases: &[Case] = &[
            (b"", b"", b"/t/a/\0", b""),
            (b"", b"\0", b"/t/a/\0", b"/t/a0"),
            (b"k", b"", b"/t/a/k", b""),
            (b"k", b"l", b"/t/a/k", b"/t/a/l"),
        ];
        for (k, e, wk, we) in cases {
            let (mut k2, mut e2) = (k.to_vec(), e.to_vec());
            watch_range(&p(), &mut k2, &mut e2);
            assert_eq!((k2.as_slice(), e2.as_slice()), (*wk, *we), "{k:?} {e:?}");
        }
    }

    #[test]
    fn responses_are_stripped_and_foreign_keys_dropped() {
        let header = Some(PbResponseHeader {
            cluster_id: 11,
            member_id: 12,
            revision: 99,
            raft_term: 13,
        });
        let mut r = PbRangeResponse {
            header,
            kvs: vec![kv(b"/t/a/x"), kv(b"/t/b/secret"), kv(b"/t/a/y")],
            more: false,
            count: 3,
        };
        let s = range_response(&p(), &mut r.header, &mut r.kvs);
        assert_eq!(s.foreign, 1);
        let keys: Vec<_> = r.kvs.iter().map(|kv| kv.key.clone()).collect();
        assert_eq!(keys, vec![b"x".to_vec(), b"y".to_vec()]);
        let h = r.header.unwrap();
        assert_eq!(
            (h.cluster_id, h.member_id, h.raft_term, h.revision),
            (CLUSTER_ID, MEMBER_ID, RAFT_TERM, 99)
        );

        let mut put = PbPutResponse {
            header: None,
            prev_kv: Some(kv(b"/registry/secrets/x")),
        };
        assert_eq!(
            put_response(&p(), &mut put.header, &mut put.prev_kv).foreign,
            1
        );
        assert!(put.prev_kv.is_none());

        let mut del = PbDeleteResponse {
            header: None,
            deleted: 2,
            prev_kvs: vec![kv(b"/t/a/1"), kv(b"/t/a/2")],
        };
        assert_eq!(
            range_response(&p(), &mut del.header, &mut del.prev_kvs).foreign,
            0
        );
        assert_eq!(del.prev_kvs[1].key, b"2");
    }

    #[test]
    fn txn_responses_are_stripped_recursively() {
        let inner = PbTxnResponse {
            header: Some(PbResponseHeader::default()),
            succeeded: true,
            responses: vec![PbResponseOp {
                response: Some(PbTxnOpResponse::ResponseRange(PbRangeResponse {
                    header: None,
                    kvs: vec![kv(b"/t/a/deep"), kv(b"/other")],
                    more: false,
                    count: 2,
                })),
            }],
        };
        let mut t = PbTxnResponse {
            header: Some(PbResponseHeader::default()),
            succeeded: true,
            responses: vec![
                PbResponseOp {
                    response: Some(PbTxnOpResponse::ResponsePut(PbPutResponse {
                        header: None,
                        prev_kv: Some(kv(b"/t/a/p")),
                    })),
                },
                PbResponseOp {
                    response: Some(PbTxnOpResponse::ResponseTxn(inner)),
                },
            ],
        };
        assert_eq!(txn_response(&p(), &mut t).foreign, 1);
        let Some(PbTxnOpResponse::ResponsePut(put)) = &t.responses[0].response else {
            panic!()
        };
        assert_eq!(put.prev_kv.as_ref().unwrap().key, b"p");
        let Some(PbTxnOpResponse::ResponseTxn(inner)) = &t.responses[1].response else {
            panic!()
        };
        assert_eq!(inner.header.as_ref().unwrap().member_id, MEMBER_ID);
        let Some(PbTxnOpResponse::ResponseRange(r)) = &inner.responses[0].response else {
            panic!()
        };
        assert_eq!(r.kvs.len(), 1);
        assert_eq!(r.kvs[0].key, b"deep");
    }

    #[test]
    fn watch_events_and_lease_keys() {
        let mut events = vec![
            PbEvent {
                r#type: 0,
                kv: Some(kv(b"/t/a/w")),
                prev_kv: Some(kv(b"/t/a/w")),
            },
            PbEvent {
                r#type: 1,
                kv: Some(kv(b"/t/b/w")),
                prev_kv: None,
            },
            PbEvent {
                r#type: 0,
                kv: Some(kv(b"/t/a/z")),
                prev_kv: Some(kv(b"/x")),
            },
        ];
        assert_eq!(watch_events(&p(), &mut events).foreign, 2);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].kv.as_ref().unwrap().key, b"w");
        assert_eq!(events[0].prev_kv.as_ref().unwrap().key, b"w");
        assert!(events[1].prev_kv.is_none());

        let mut keys = vec![b"/t/a/l".to_vec(), b"/etcd-shim/leases/x".to_vec()];
        assert_eq!(strip_keys(&p(), &mut keys).foreign, 1);
        assert_eq!(keys, vec![b"l".to_vec()]);
    }
}
