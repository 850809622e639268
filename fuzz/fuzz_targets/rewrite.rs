//! Fuzzes the broker's key rewriting (`etcd_shim_broker::rewrite`): arbitrary requests,
//! nested transactions and responses, under arbitrary tenant prefixes.
//!
//! Beyond "no panic", it checks the confinement invariant the isolation policy rests on:
//! every rewritten key lies in `[prefix, prefix.end())`, every non-empty range end lies in
//! `(prefix, prefix.end()]`, a refused request is left untouched, and every key left in a
//! stripped response came from a key under the prefix (in order, with the dropped ones
//! counted).

#![no_main]

use arbitrary::Arbitrary;
use etcd_client::proto::{
    PbCompare, PbDeleteRequest, PbDeleteResponse, PbEvent, PbKeyValue, PbPutRequest, PbPutResponse,
    PbRangeRequest, PbRangeResponse, PbResponseHeader, PbResponseOp, PbTxnOpRequest,
    PbTxnOpResponse, PbTxnRequest, PbTxnRequestOp, PbTxnResponse,
};
use etcd_shim_broker::error::EtcdError;
use etcd_shim_broker::rewrite::{self, Prefix};
use libfuzzer_sys::fuzz_target;

/// Deeper transactions than prost decodes (its recursion limit is 100) never reach the
/// broker; a smaller bound keeps inputs meaningful.
const MAX_DEPTH: usize = 12;

/// Bytes with a bias towards the keys that matter for confinement.
#[derive(Arbitrary, Debug, Clone)]
enum Bytes {
    Raw(Vec<u8>),
    Special(u8),
    /// A special key followed by raw bytes.
    Joined(u8, Vec<u8>),
}

const SPECIAL: &[&[u8]] = &[
    b"",
    b"\0",
    b"\0\0",
    b"\xff",
    b"\xff\xff",
    b"/",
    b"..",
    b"../",
    b"../../",
    b"0",
    b"/etcd-shim/tenants/",
    b"/etcd-shim/tenants/ns/b/",
    b"/etcd-shim/leases/",
    b"/registry/",
];

impl Bytes {
    fn get(&self) -> Vec<u8> {
        let special = |i: &u8| SPECIAL[*i as usize % SPECIAL.len()].to_vec();
        match self {
            Bytes::Raw(b) => b.clone(),
            Bytes::Special(i) => special(i),
            Bytes::Joined(i, b) => [special(i), b.clone()].concat(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum PrefixIn {
    Tenant,
    TrailingFf,
    Root,
    Raw(Vec<u8>),
}

impl PrefixIn {
    fn build(&self) -> Prefix {
        let bytes = match self {
            PrefixIn::Tenant => b"/etcd-shim/tenants/ns/a/".to_vec(),
            PrefixIn::TrailingFf => b"/t/\xff\xff/".to_vec(),
            PrefixIn::Root => b"/".to_vec(),
            PrefixIn::Raw(b) => {
                let mut b = b.clone();
                if b.last() != Some(&b'/') {
                    b.push(b'/');
                }
                b
            }
        };
        Prefix::new(bytes).expect("a prefix ending in / is valid")
    }
}

#[derive(Arbitrary, Debug)]
struct RangeIn {
    key: Bytes,
    end: Bytes,
    limit: i64,
    revision: i64,
    count_only: bool,
}

impl RangeIn {
    fn build(&self) -> PbRangeRequest {
        PbRangeRequest {
            key: self.key.get(),
            range_end: self.end.get(),
            limit: self.limit,
            revision: self.revision,
            count_only: self.count_only,
            ..Default::default()
        }
    }
}

#[derive(Arbitrary, Debug)]
struct PutIn {
    key: Bytes,
    value: Vec<u8>,
    lease: i64,
    prev_kv: bool,
}

impl PutIn {
    fn build(&self) -> PbPutRequest {
        PbPutRequest {
            key: self.key.get(),
            value: self.value.clone(),
            lease: self.lease,
            prev_kv: self.prev_kv,
            ..Default::default()
        }
    }
}

#[derive(Arbitrary, Debug)]
struct DeleteIn {
    key: Bytes,
    end: Bytes,
    prev_kv: bool,
}

impl DeleteIn {
    fn build(&self) -> PbDeleteRequest {
        PbDeleteRequest {
            key: self.key.get(),
            range_end: self.end.get(),
            prev_kv: self.prev_kv,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum OpIn {
    Range(RangeIn),
    Put(PutIn),
    Delete(DeleteIn),
    Txn(Box<TxnIn>),
    Empty,
}

#[derive(Arbitrary, Debug)]
struct CompareIn {
    key: Bytes,
    end: Bytes,
    target: u8,
    result: u8,
}

#[derive(Arbitrary, Debug)]
struct TxnIn {
    compare: Vec<CompareIn>,
    success: Vec<OpIn>,
    failure: Vec<OpIn>,
}

impl TxnIn {
    fn build(&self, depth: usize) -> PbTxnRequest {
        let ops = |ops: &[OpIn]| {
            ops.iter()
                .filter_map(|op| {
                    let request = match op {
                        OpIn::Range(r) => Some(PbTxnOpRequest::RequestRange(r.build())),
                        OpIn::Put(p) => Some(PbTxnOpRequest::RequestPut(p.build())),
                        OpIn::Delete(d) => Some(PbTxnOpRequest::RequestDeleteRange(d.build())),
                        OpIn::Txn(t) if depth < MAX_DEPTH => {
                            Some(PbTxnOpRequest::RequestTxn(t.build(depth + 1)))
                        }
                        OpIn::Txn(_) => return None,
                        OpIn::Empty => None,
                    };
                    Some(PbTxnRequestOp { request })
                })
                .collect()
        };
        PbTxnRequest {
            compare: self
                .compare
                .iter()
                .map(|c| PbCompare {
                    key: c.key.get(),
                    range_end: c.end.get(),
                    target: i32::from(c.target % 5),
                    result: i32::from(c.result % 4),
                    ..Default::default()
                })
                .collect(),
            success: ops(&self.success),
            failure: ops(&self.failure),
        }
    }
}

/// A key in a response: under the prefix (the prefix is put in front) or raw.
#[derive(Arbitrary, Debug)]
struct KvIn {
    under: bool,
    key: Bytes,
    value: Vec<u8>,
}

impl KvIn {
    fn build(&self, p: &Prefix) -> PbKeyValue {
        let key = if self.under {
            p.key(&self.key.get())
        } else {
            self.key.get()
        };
        PbKeyValue {
            key,
            value: self.value.clone(),
            create_revision: 3,
            mod_revision: 4,
            version: 1,
            lease: 0,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum RespOpIn {
    Range(Vec<KvIn>),
    Put(Option<KvIn>),
    Delete(Vec<KvIn>),
    Txn(Vec<RespOpIn>),
    Empty,
}

#[derive(Arbitrary, Debug)]
struct EventIn {
    delete: bool,
    kv: Option<KvIn>,
    prev_kv: Option<KvIn>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    prefix: PrefixIn,
    range: RangeIn,
    put: PutIn,
    delete: DeleteIn,
    txn: TxnIn,
    watch_key: Bytes,
    watch_end: Bytes,
    range_resp: Vec<KvIn>,
    put_resp: Option<KvIn>,
    txn_resp: Vec<RespOpIn>,
    events: Vec<EventIn>,
    lease_keys: Vec<KvIn>,
    header: (u64, u64, i64, u64),
    prefix_end_of: Vec<u8>,
}

// ---------------------------------------------------------------------------------------
// Request invariants
// ---------------------------------------------------------------------------------------

fn check_key(p: &Prefix, key: &[u8], what: &str) {
    assert!(
        key >= p.as_bytes() && key < p.end(),
        "{what}: key {key:?} escapes prefix {:?}",
        p.as_bytes()
    );
}

fn check_range(p: &Prefix, key: &[u8], end: &[u8], what: &str) {
    check_key(p, key, what);
    if !end.is_empty() {
        assert!(
            end > p.as_bytes() && end <= p.end(),
            "{what}: range end {end:?} escapes prefix {:?}",
            p.as_bytes()
        );
    }
}

/// What the rewrite of `(key, end)` must be, by the key-rewriting rules of docs/architecture.md.
fn expected(p: &Prefix, key: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let end = match end {
        [] => Vec::new(),
        [0] => p.end().to_vec(),
        e => p.key(e),
    };
    (p.key(key), end)
}

/// Whether etcd refuses the transaction for an empty key: in a compare or an op, at any
/// level of nesting.
fn has_empty_op_key(t: &PbTxnRequest) -> bool {
    t.compare.iter().any(|c| c.key.is_empty())
        || t.success
            .iter()
            .chain(&t.failure)
            .any(|op| match &op.request {
                Some(PbTxnOpRequest::RequestRange(r)) => r.key.is_empty(),
                Some(PbTxnOpRequest::RequestPut(r)) => r.key.is_empty(),
                Some(PbTxnOpRequest::RequestDeleteRange(r)) => r.key.is_empty(),
                Some(PbTxnOpRequest::RequestTxn(t)) => has_empty_op_key(t),
                None => false,
            })
}

fn leases(t: &PbTxnRequest, out: &mut Vec<i64>) {
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(PbTxnOpRequest::RequestPut(r)) if r.lease != 0 => out.push(r.lease),
            Some(PbTxnOpRequest::RequestTxn(t)) => leases(t, out),
            _ => {}
        }
    }
}

/// Walks an original and a rewritten transaction side by side.
fn check_txn(p: &Prefix, before: &PbTxnRequest, after: &PbTxnRequest) {
    assert_eq!(before.compare.len(), after.compare.len());
    for (b, a) in before.compare.iter().zip(&after.compare) {
        check_range(p, &a.key, &a.range_end, "compare");
        assert_eq!(
            (a.key.clone(), a.range_end.clone()),
            expected(p, &b.key, &b.range_end)
        );
        assert_eq!((a.target, a.result), (b.target, b.result));
    }
    let ops = |b: &[PbTxnRequestOp], a: &[PbTxnRequestOp]| {
        assert_eq!(b.len(), a.len());
        for (b, a) in b.iter().zip(a) {
            match (&b.request, &a.request) {
                (Some(PbTxnOpRequest::RequestRange(b)), Some(PbTxnOpRequest::RequestRange(a))) => {
                    check_range(p, &a.key, &a.range_end, "txn range");
                    assert_eq!(
                        (a.key.clone(), a.range_end.clone()),
                        expected(p, &b.key, &b.range_end)
                    );
                    assert_eq!((a.limit, a.revision), (b.limit, b.revision));
                }
                (Some(PbTxnOpRequest::RequestPut(b)), Some(PbTxnOpRequest::RequestPut(a))) => {
                    check_key(p, &a.key, "txn put");
                    assert_eq!(a.key, p.key(&b.key));
                    assert_eq!((&a.value, a.lease), (&b.value, b.lease));
                }
                (
                    Some(PbTxnOpRequest::RequestDeleteRange(b)),
                    Some(PbTxnOpRequest::RequestDeleteRange(a)),
                ) => {
                    check_range(p, &a.key, &a.range_end, "txn delete");
                    assert_eq!(
                        (a.key.clone(), a.range_end.clone()),
                        expected(p, &b.key, &b.range_end)
                    );
                }
                (Some(PbTxnOpRequest::RequestTxn(b)), Some(PbTxnOpRequest::RequestTxn(a))) => {
                    check_txn(p, b, a)
                }
                (None, None) => {}
                (b, a) => panic!("op changed kind: {b:?} -> {a:?}"),
            }
        }
    };
    ops(&before.success, &after.success);
    ops(&before.failure, &after.failure);
}

fn requests(p: &Prefix, input: &Input) {
    let orig = input.range.build();
    let mut r = orig.clone();
    match rewrite::range_request(p, &mut r) {
        Ok(()) => {
            assert!(!orig.key.is_empty());
            check_range(p, &r.key, &r.range_end, "range");
            assert_eq!(
                (r.key.clone(), r.range_end.clone()),
                expected(p, &orig.key, &orig.range_end)
            );
            assert_eq!(
                (r.limit, r.revision, r.count_only),
                (orig.limit, orig.revision, orig.count_only)
            );
        }
        Err(e) => {
            assert_eq!(e, EtcdError::EmptyKey);
            assert!(orig.key.is_empty(), "non-empty key refused");
            assert_eq!(r, orig, "refused range request was changed");
        }
    }

    let orig = input.put.build();
    let mut r = orig.clone();
    match rewrite::put_request(p, &mut r) {
        Ok(()) => {
            check_key(p, &r.key, "put");
            assert_eq!(r.key, p.key(&orig.key));
            assert_eq!((&r.value, r.lease), (&orig.value, orig.lease));
        }
        Err(e) => {
            assert_eq!(e, EtcdError::EmptyKey);
            assert!(orig.key.is_empty());
            assert_eq!(r, orig);
        }
    }

    let orig = input.delete.build();
    let mut r = orig.clone();
    match rewrite::delete_request(p, &mut r) {
        Ok(()) => {
            check_range(p, &r.key, &r.range_end, "delete");
            assert_eq!(
                (r.key.clone(), r.range_end.clone()),
                expected(p, &orig.key, &orig.range_end)
            );
        }
        Err(e) => {
            assert_eq!(e, EtcdError::EmptyKey);
            assert!(orig.key.is_empty());
            assert_eq!(r, orig);
        }
    }

    let orig = input.txn.build(0);
    let mut t = orig.clone();
    match rewrite::txn_request(p, &mut t) {
        Ok(()) => {
            assert!(!has_empty_op_key(&orig), "empty key inside a txn accepted");
            check_txn(p, &orig, &t);
        }
        Err(e) => {
            assert_eq!(e, EtcdError::EmptyKey);
            assert!(has_empty_op_key(&orig), "valid txn refused");
            assert_eq!(t, orig, "refused txn was changed");
        }
    }
    let mut want = Vec::new();
    leases(&orig, &mut want);
    let mut copy = orig.clone();
    let mut got = Vec::new();
    rewrite::txn_leases(&mut copy, &mut got);
    let got: Vec<i64> = got.into_iter().map(|l| *l).collect();
    assert_eq!(got, want, "leases of a txn");

    let (mut key, mut end) = (input.watch_key.get(), input.watch_end.get());
    let want_key: &[u8] = if key.is_empty() { b"\0" } else { &key };
    let want = expected(p, want_key, &end);
    rewrite::watch_range(p, &mut key, &mut end);
    check_range(p, &key, &end, "watch");
    assert_eq!((key, end), want);
}

// ---------------------------------------------------------------------------------------
// Response invariants
// ---------------------------------------------------------------------------------------

/// What a stripped list must hold: the keys under the prefix, stripped, in order.
fn kept(p: &Prefix, kvs: &[PbKeyValue]) -> (Vec<PbKeyValue>, usize) {
    let mut out = Vec::new();
    let mut foreign = 0;
    for kv in kvs {
        match p.strip(&kv.key) {
            Some(k) => out.push(PbKeyValue {
                key: k.to_vec(),
                ..kv.clone()
            }),
            None => foreign += 1,
        }
    }
    (out, foreign)
}

fn check_header(h: &Option<PbResponseHeader>, revision: i64) {
    let h = h.as_ref().expect("header kept");
    assert_eq!(
        (h.cluster_id, h.member_id, h.raft_term, h.revision),
        (
            rewrite::CLUSTER_ID,
            rewrite::MEMBER_ID,
            rewrite::RAFT_TERM,
            revision
        ),
        "header not scrubbed, or revision changed"
    );
}

fn build_resp_ops(p: &Prefix, ops: &[RespOpIn], depth: usize) -> Vec<PbResponseOp> {
    ops.iter()
        .filter_map(|op| {
            let response = match op {
                RespOpIn::Range(kvs) => Some(PbTxnOpResponse::ResponseRange(PbRangeResponse {
                    header: None,
                    kvs: kvs.iter().map(|kv| kv.build(p)).collect(),
                    more: false,
                    count: kvs.len() as i64,
                })),
                RespOpIn::Put(kv) => Some(PbTxnOpResponse::ResponsePut(PbPutResponse {
                    header: None,
                    prev_kv: kv.as_ref().map(|kv| kv.build(p)),
                })),
                RespOpIn::Delete(kvs) => {
                    Some(PbTxnOpResponse::ResponseDeleteRange(PbDeleteResponse {
                        header: None,
                        deleted: kvs.len() as i64,
                        prev_kvs: kvs.iter().map(|kv| kv.build(p)).collect(),
                    }))
                }
                RespOpIn::Txn(inner) if depth < MAX_DEPTH => {
                    Some(PbTxnOpResponse::ResponseTxn(PbTxnResponse {
                        header: Some(PbResponseHeader::default()),
                        succeeded: true,
                        responses: build_resp_ops(p, inner, depth + 1),
                    }))
                }
                RespOpIn::Txn(_) => return None,
                RespOpIn::Empty => None,
            };
            Some(PbResponseOp { response })
        })
        .collect()
}

/// Checks a stripped txn response against the original; returns the foreign keys seen.
fn check_txn_resp(p: &Prefix, before: &PbTxnResponse, after: &PbTxnResponse) -> usize {
    assert_eq!(before.responses.len(), after.responses.len());
    let mut foreign = 0;
    for (b, a) in before.responses.iter().zip(&after.responses) {
        match (&b.response, &a.response) {
            (Some(PbTxnOpResponse::ResponseRange(b)), Some(PbTxnOpResponse::ResponseRange(a))) => {
                let (want, f) = kept(p, &b.kvs);
                assert_eq!(a.kvs, want);
                foreign += f;
            }
            (Some(PbTxnOpResponse::ResponsePut(b)), Some(PbTxnOpResponse::ResponsePut(a))) => {
                let (want, f) = kept(p, b.prev_kv.as_slice());
                assert_eq!(a.prev_kv.as_slice(), want.as_slice());
                foreign += f;
            }
            (
                Some(PbTxnOpResponse::ResponseDeleteRange(b)),
                Some(PbTxnOpResponse::ResponseDeleteRange(a)),
            ) => {
                let (want, f) = kept(p, &b.prev_kvs);
                assert_eq!(a.prev_kvs, want);
                foreign += f;
            }
            (Some(PbTxnOpResponse::ResponseTxn(b)), Some(PbTxnOpResponse::ResponseTxn(a))) => {
                if let Some(h) = &b.header {
                    check_header(&a.header, h.revision);
                }
                foreign += check_txn_resp(p, b, a);
            }
            (None, None) => {}
            (b, a) => panic!("response op changed kind: {b:?} -> {a:?}"),
        }
    }
    foreign
}

fn responses(p: &Prefix, input: &Input) {
    let (cluster_id, member_id, revision, raft_term) = input.header;
    let header = Some(PbResponseHeader {
        cluster_id,
        member_id,
        revision,
        raft_term,
    });

    let kvs: Vec<PbKeyValue> = input.range_resp.iter().map(|kv| kv.build(p)).collect();
    let (want, foreign) = kept(p, &kvs);
    let (mut h, mut got) = (header, kvs);
    let s = rewrite::range_response(p, &mut h, &mut got);
    check_header(&h, revision);
    assert_eq!(got, want, "range response");
    assert_eq!(s.foreign, foreign, "foreign keys counted");

    let prev: Option<PbKeyValue> = input.put_resp.as_ref().map(|kv| kv.build(p));
    let (want, foreign) = kept(p, prev.as_slice());
    let (mut h, mut got) = (header, prev);
    let s = rewrite::put_response(p, &mut h, &mut got);
    check_header(&h, revision);
    assert_eq!(got.as_slice(), want.as_slice(), "put response");
    assert_eq!(s.foreign, foreign);

    let before = PbTxnResponse {
        header,
        succeeded: true,
        responses: build_resp_ops(p, &input.txn_resp, 0),
    };
    let mut after = before.clone();
    let s = rewrite::txn_response(p, &mut after);
    check_header(&after.header, revision);
    let foreign = check_txn_resp(p, &before, &after);
    assert_eq!(s.foreign, foreign, "foreign keys counted in a txn");

    let events: Vec<PbEvent> = input
        .events
        .iter()
        .map(|e| PbEvent {
            r#type: i32::from(e.delete),
            kv: e.kv.as_ref().map(|kv| kv.build(p)),
            prev_kv: e.prev_kv.as_ref().map(|kv| kv.build(p)),
        })
        .collect();
    let mut want = Vec::new();
    let mut foreign = 0;
    for e in &events {
        let kv = match &e.kv {
            Some(kv) => match p.strip(&kv.key) {
                Some(k) => Some(PbKeyValue {
                    key: k.to_vec(),
                    ..kv.clone()
                }),
                None => {
                    foreign += 1;
                    continue;
                }
            },
            None => None,
        };
        let (prev, f) = kept(p, e.prev_kv.as_slice());
        foreign += f;
        want.push(PbEvent {
            r#type: e.r#type,
            kv,
            prev_kv: prev.into_iter().next(),
        });
    }
    let mut got = events;
    let s = rewrite::watch_events(p, &mut got);
    assert_eq!(got, want, "watch events");
    assert_eq!(s.foreign, foreign);

    let keys: Vec<Vec<u8>> = input.lease_keys.iter().map(|kv| kv.build(p).key).collect();
    let want: Vec<Vec<u8>> = keys
        .iter()
        .filter_map(|k| p.strip(k).map(<[u8]>::to_vec))
        .collect();
    let mut got = keys.clone();
    let s = rewrite::strip_keys(p, &mut got);
    assert_eq!(got, want, "lease keys");
    assert_eq!(s.foreign, keys.len() - want.len());
    // Every key handed back came from a key under the prefix.
    for k in &got {
        assert!(keys.contains(&p.key(k)), "stripped key {k:?} has no origin");
    }
}

fn prefix_end(input: &[u8]) {
    let end = rewrite::prefix_end(input);
    if input.iter().all(|b| *b == 0xff) {
        assert_eq!(end, b"\0", "no end for {input:?}");
    } else {
        assert!(end.as_slice() > input, "end {end:?} <= {input:?}");
        let mut longest = input.to_vec();
        longest.extend_from_slice(&[0xff; 8]);
        assert!(end > longest, "end {end:?} inside the prefix {input:?}");
        assert!(!end.is_empty() && end.len() <= input.len());
    }
}

fuzz_target!(|input: Input| {
    let p = input.prefix.build();
    assert!(p.as_bytes().ends_with(b"/") && p.end() > p.as_bytes());
    requests(&p, &input);
    responses(&p, &input);
    prefix_end(&input.prefix_end_of);
});
