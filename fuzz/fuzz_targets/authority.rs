//! Fuzzes the shim's HTTP/2 header-block rewriting (`etcd_shim::authority::Rewriter`):
//! arbitrary client byte streams, cut into arbitrary reads.
//!
//! Beyond "no panic and no endless loop", it checks that the rewriter is a function of
//! the byte stream alone: fed the same bytes in one read or in many, it writes the same
//! bytes and keeps the same bytes back. A client cannot choose how the kernel splits its
//! writes, so anything else would make the shim's behaviour depend on timing. And once
//! the rewriter says it passes everything, what follows comes out as it went in.

#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use etcd_shim::authority::Rewriter;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// The client's bytes; the first 24 are taken as the connection preface.
    stream: Vec<u8>,
    /// Sizes of the reads the stream arrives in (0 counts as 1); the last one repeats.
    reads: Vec<u16>,
}

/// Runs the stream through a rewriter in reads of the given sizes; returns what it wrote,
/// what it kept back and whether it ended passing everything.
fn run(stream: &[u8], reads: &[u16]) -> (BytesMut, BytesMut, bool) {
    let mut rw = Rewriter::default();
    let mut input = BytesMut::new();
    let mut output = BytesMut::new();
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let n = reads
            .get(i)
            .or(reads.last())
            .map_or(stream.len(), |&n| usize::from(n).max(1));
        let end = (at + n).min(stream.len());
        input.extend_from_slice(&stream[at..end]);
        at = end;
        i += 1;
        let passing = rw.passes_all();
        let before = output.len();
        let fed = input.clone();
        let mut steps = 0usize;
        while rw.process(&mut input, &mut output) {
            steps += 1;
            // Every step moves at least a byte or a frame: more steps than bytes is a loop.
            assert!(steps <= 2 * fed.len() + 2, "process() keeps returning true");
        }
        if passing {
            assert_eq!(
                &output[before..],
                &fed[..],
                "bytes changed after passes_all()"
            );
            assert!(input.is_empty(), "bytes held back after passes_all()");
        }
    }
    (output, input, rw.passes_all())
}

fuzz_target!(|input: Input| {
    if input.stream.len() > 1 << 16 {
        return;
    }
    let whole = run(&input.stream, &[]);
    let pieces = run(&input.stream, &input.reads);
    assert_eq!(
        whole, pieces,
        "the output depends on how the stream was read"
    );
});
