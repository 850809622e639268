//! Tolerates what grpc-go tolerates in a request's `:authority`.
//!
//! etcdctl 3.4 dials maintenance calls (`endpoint status`, `defrag`) with the endpoint
//! URL itself as the authority (`http://127.0.0.1:2379`). etcd accepts that; the `h2`
//! crate resets the stream as malformed. So the shim reads the client's side of the
//! connection through [`AuthorityFix`]: every HTTP/2 header block is decoded, a malformed
//! authority is reduced to its `host:port` (or dropped), and the block is re-encoded
//! with one encoder per connection, which keeps the server's HPACK table in step. All
//! other frames pass through untouched; the write side is not touched at all.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The largest frame the server accepts unless it says otherwise (HTTP/2's default,
/// and what the shim's server advertises); re-encoded blocks are split to fit.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is not rewritten but passed on for the server to
/// refuse, so a client cannot make the shim buffer without bound.
const MAX_BLOCK: usize = 1 << 20;

/// A header block being collected across HEADERS and CONTINUATION frames.
struct Block {
    stream_id: u32,
    end_stream: bool,
    fragment: BytesMut,
    /// The original frames, replayed as they were if the block cannot be decoded.
    raw: BytesMut,
}

/// Rewrites the client-to-server byte stream of one HTTP/2 connection.
pub struct Rewriter {
    preface_left: usize,
    /// Payload bytes of a pass-through frame still to copy.
    passthrough_left: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// Once set, bytes flow unchanged: the connection's first header block needed no
    /// fix, or decoding failed (the connection is broken anyway).
    broken: bool,
    /// Whether a header block was seen: the first one decides for the connection.
    decided: bool,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self {
            preface_left: PREFACE_LEN,
            passthrough_left: 0,
            block: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            broken: false,
            decided: false,
        }
    }
}

impl Rewriter {
    /// Whether every byte from now on passes unchanged.
    pub fn passes_all(&self) -> bool {
        self.broken
    }

    /// Moves what it can from `input` to `output`; returns false when it needs more input.
    pub fn process(&mut self, input: &mut BytesMut, output: &mut BytesMut) -> bool {
        if input.is_empty() {
            return false;
        }
        if self.broken {
            output.put(input.split());
            return true;
        }
        if self.preface_left > 0 {
            let n = self.preface_left.min(input.len());
            output.put(input.split_to(n));
            self.preface_left -= n;
            return true;
        }
        if self.passthrough_left > 0 {
            let n = self.passthrough_left.min(input.len());
            output.put(input.split_to(n));
            self.passthrough_left -= n;
            return true;
        }
        if input.len() < FRAME_HEADER_LEN {
            return false;
        }
        let len =
            (usize::from(input[0]) << 16) | (usize::from(input[1]) << 8) | usize::from(input[2]);
        let kind = input[3];
        let flags = input[4];
        let stream_id = u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & 0x7fff_ffff;
        let is_header = kind == TYPE_HEADERS || (kind == TYPE_CONTINUATION && self.block.is_some());
        if !is_header || len > MAX_BLOCK {
            if self.block.is_some() {
                // A frame interleaved in a header block is a protocol error; hand
                // everything to the server unchanged and let it say so.
                self.give_up(output);
                return true;
            }
            output.put(input.split_to(FRAME_HEADER_LEN));
            self.passthrough_left = len;
            return true;
        }
        if input.len() < FRAME_HEADER_LEN + len {
            return false;
        }
        let frame = input.split_to(FRAME_HEADER_LEN + len);
        let mut payload = &frame[FRAME_HEADER_LEN..];
        if kind == TYPE_HEADERS {
            if self.block.is_some() {
                self.give_up(output);
                output.put(frame);
                return true;
            }
            let mut pad = 0;
            if flags & FLAG_PADDED != 0 {
                pad = payload.first().map_or(0, |p| usize::from(*p));
                payload = &payload[1.min(payload.len())..];
            }
            if flags & FLAG_PRIORITY != 0 {
                // Priority is advisory and h2 ignores it; it is not carried over.
                payload = &payload[5.min(payload.len())..];
            }
            if pad > payload.len() {
                self.broken = true;
                output.put(frame);
                return true;
            }
            payload = &payload[..payload.len() - pad];
            self.block = Some(Block {
                stream_id,
                end_stream: flags & FLAG_END_STREAM != 0,
                fragment: BytesMut::from(payload),
                raw: BytesMut::new(),
            });
        } else if let Some(b) = &mut self.block {
            b.fragment.extend_from_slice(payload);
        }
        let Some(b) = &mut self.block else {
            return true;
        };
        b.raw.extend_from_slice(&frame);
        if b.fragment.len() > MAX_BLOCK {
            self.give_up(output);
            return true;
        }
        if flags & FLAG_END_HEADERS != 0 {
            let b = self
                .block
                .take()
                .unwrap_or_else(|| unreachable!("block checked above"));
            self.finish(b, output);
        }
        true
    }

    fn give_up(&mut self, output: &mut BytesMut) {
        if let Some(b) = self.block.take() {
            output.put(b.raw);
        }
        self.broken = true;
    }

    fn finish(&mut self, b: Block, output: &mut BytesMut) {
        let headers = match self.decoder.decode(&b.fragment) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = ?e, "undecodable header block; passing the connection through");
                output.put(b.raw);
                self.broken = true;
                return;
            }
        };
        // A client names one authority for all calls of a connection (grpc-go does), so
        // when the first block's is fine, the rest of the connection passes unchanged and
        // costs no decoding; the block goes out as it came, which keeps the server's
        // HPACK table in step with the client's.
        if !self.decided {
            self.decided = true;
            if !headers.iter().any(|(n, v)| is_malformed_authority(n, v)) {
                output.put(b.raw);
                self.broken = true;
                return;
            }
        }
        let headers = fix_authority(headers);
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut chunks = block.chunks(MAX_FRAME).peekable();
        let mut first = true;
        if block.is_empty() {
            write_frame(
                output,
                TYPE_HEADERS,
                end_flags(b.end_stream, true),
                b.stream_id,
                &[],
            );
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let (kind, flags) = if first {
                (TYPE_HEADERS, end_flags(b.end_stream, last))
            } else {
                (TYPE_CONTINUATION, if last { FLAG_END_HEADERS } else { 0 })
            };
            write_frame(output, kind, flags, b.stream_id, chunk);
            first = false;
        }
    }
}

fn end_flags(end_stream: bool, end_headers: bool) -> u8 {
    (if end_stream { FLAG_END_STREAM } else { 0 })
        | (if end_headers { FLAG_END_HEADERS } else { 0 })
}

fn write_frame(out: &mut BytesMut, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.put_slice(&len.to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id);
    out.put_slice(payload);
}

fn is_malformed_authority(name: &[u8], value: &[u8]) -> bool {
    name == b":authority" && http::uri::Authority::try_from(value).is_err()
}

/// Keeps a valid authority; turns `scheme://host:port/...` into `host:port`; drops
/// anything else (a request may omit the authority).
fn fix_authority(mut headers: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
    headers.retain_mut(|(name, value)| {
        if !is_malformed_authority(name, value) {
            return true;
        }
        let rest = match value.windows(3).position(|w| w == b"://") {
            Some(i) => &value[i + 3..],
            None => value.as_slice(),
        };
        let host = rest.split(|b| *b == b'/').next().unwrap_or(&[]);
        if !host.is_empty() && http::uri::Authority::try_from(host).is_ok() {
            *value = host.to_vec();
            true
        } else {
            false
        }
    });
    headers
}

pin_project_lite::pin_project! {
    /// An I/O stream whose read side goes through a [`Rewriter`].
    pub struct AuthorityFix<T> {
        #[pin]
        inner: T,
        rewriter: Rewriter,
        input: BytesMut,
        output: BytesMut,
        eof: bool,
    }
}

impl<T> AuthorityFix<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            rewriter: Rewriter::default(),
            input: BytesMut::with_capacity(MAX_FRAME + FRAME_HEADER_LEN),
            output: BytesMut::with_capacity(MAX_FRAME + FRAME_HEADER_LEN),
            eof: false,
        }
    }
}

impl<T: AsyncRead> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.input.is_empty() && this.rewriter.passes_all() {
                // Nothing left to look at: read straight into the caller's buffer, and
                // give back the connection's own buffers.
                if this.input.capacity() > 0 {
                    *this.input = BytesMut::new();
                    *this.output = BytesMut::new();
                }
                return this.inner.as_mut().poll_read(cx, buf);
            }
            if this.rewriter.process(this.input, this.output) {
                continue;
            }
            if *this.eof {
                // Whatever is left is an incomplete frame: hand it over as it is.
                if !this.input.is_empty() {
                    let rest = this.input.split();
                    this.output.put(rest);
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            if this.input.capacity() - this.input.len() < 4096 {
                this.input.reserve(MAX_FRAME + FRAME_HEADER_LEN);
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                this.inner.as_mut(),
                cx,
                this.input
            ))?;
            if n == 0 {
                *this.eof = true;
            }
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn headers_frame(
        enc: &mut loona_hpack::Encoder<'static>,
        stream: u32,
        authority: &[u8],
        flags: u8,
    ) -> Vec<u8> {
        let block = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/etcdserverpb.Maintenance/Status"),
            (b":authority", authority),
            (b"te", b"trailers"),
        ]);
        let mut out = BytesMut::new();
        write_frame(
            &mut out,
            TYPE_HEADERS,
            flags | FLAG_END_HEADERS,
            stream,
            &block,
        );
        out.to_vec()
    }

    /// Feeds `input` one byte at a time, the hardest split, and returns the output.
    fn run(input: &[u8]) -> Vec<u8> {
        let mut rw = Rewriter::default();
        let mut inbuf = BytesMut::new();
        let mut out = BytesMut::new();
        for b in input {
            inbuf.put_u8(*b);
            while rw.process(&mut inbuf, &mut out) {}
        }
        out.to_vec()
    }

    /// Splits server-side input into (kind, flags, stream, payload) frames after the preface.
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&b[..PREFACE_LEN], PREFACE);
        b = &b[PREFACE_LEN..];
        let mut v = Vec::new();
        while !b.is_empty() {
            let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            v.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        v
    }

    #[test]
    fn malformed_authority_becomes_host_port_and_the_rest_passes() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(&mut enc, 1, b"http://127.0.0.1:2379", 0));
        // A DATA frame with END_STREAM, then a second request reusing the dynamic table.
        input.extend([0, 0, 5, 0, FLAG_END_STREAM, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
        input.extend(headers_frame(
            &mut enc,
            3,
            b"127.0.0.1:2379",
            FLAG_END_STREAM,
        ));
        let out = run(&input);
        let fs = frames(&out);
        assert_eq!(fs.len(), 3);
        let mut dec = loona_hpack::Decoder::new();
        let h1 = dec.decode(&fs[0].3).unwrap();
        assert!(h1.contains(&(b":authority".to_vec(), b"127.0.0.1:2379".to_vec())));
        assert!(h1.contains(&(
            b":path".to_vec(),
            b"/etcdserverpb.Maintenance/Status".to_vec()
        )));
        assert_eq!(
            (fs[0].0, fs[0].1, fs[0].2),
            (TYPE_HEADERS, FLAG_END_HEADERS, 1)
        );
        assert_eq!(fs[1], (0, FLAG_END_STREAM, 1, vec![0; 5]));
        let h2 = dec.decode(&fs[2].3).unwrap();
        assert!(h2.contains(&(b":authority".to_vec(), b"127.0.0.1:2379".to_vec())));
        assert_eq!(fs[2].1, FLAG_END_HEADERS | FLAG_END_STREAM);
    }

    #[test]
    fn a_connection_with_a_good_authority_passes_unchanged() {
        // Blocks spelled as no encoder of the shim would: literals never indexed, no
        // Huffman coding. Re-encoding them would change their bytes.
        let literal = |name_index: u8, value: &[u8]| {
            let mut v = vec![0x10 | name_index, value.len() as u8];
            v.extend_from_slice(value);
            v
        };
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        block.extend(literal(4, b"/etcdserverpb.KV/Range"));
        block.extend(literal(1, b"127.0.0.1:2379"));
        let mut input = BytesMut::from(PREFACE);
        for stream in [1u8, 3] {
            write_frame(
                &mut input,
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                stream.into(),
                &block,
            );
            input.extend_from_slice(&[0, 0, 5, 0, FLAG_END_STREAM, 0, 0, 0, stream, 0, 0, 0, 0, 0]);
        }
        // A later malformed authority is not looked at: the first block decided.
        let mut enc = loona_hpack::Encoder::new();
        input.extend(headers_frame(
            &mut enc,
            5,
            b"http://127.0.0.1:2379",
            FLAG_END_STREAM,
        ));
        assert_eq!(
            run(&input),
            input.to_vec(),
            "byte for byte: nothing decoded and encoded again"
        );
    }

    #[tokio::test]
    async fn the_stream_reads_the_same_after_the_first_block() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        for stream in [1, 3, 5] {
            input.extend(headers_frame(&mut enc, stream, b"127.0.0.1:2379", 0));
            input.extend([
                0,
                0,
                5,
                0,
                FLAG_END_STREAM,
                0,
                0,
                0,
                stream as u8,
                1,
                2,
                3,
                4,
                5,
            ]);
        }
        let (mut client, server) = tokio::io::duplex(64);
        let writer = {
            let input = input.clone();
            tokio::spawn(async move {
                client.write_all(&input).await.unwrap();
            })
        };
        let mut fixed = AuthorityFix::new(server);
        let mut got = Vec::new();
        fixed.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, input);
        assert!(fixed.rewriter.passes_all());
    }

    #[test]
    fn unusable_authority_is_dropped() {
        let h = fix_authority(vec![
            (b":authority".to_vec(), b"#x y".to_vec()),
            (b"a".to_vec(), b"b".to_vec()),
        ]);
        assert_eq!(h, vec![(b"a".to_vec(), b"b".to_vec())]);
        let h = fix_authority(vec![(
            b":authority".to_vec(),
            b"https://[::1]:2379/path".to_vec(),
        )]);
        assert_eq!(h[0].1, b"[::1]:2379");
    }

    #[test]
    fn continuation_padding_and_priority_are_folded() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([(&b":authority"[..], &b"http://h:1"[..]), (b":path", b"/p")]);
        let (a, b) = block.split_at(3);
        let mut input = PREFACE.to_vec();
        // HEADERS with PADDED (2 bytes of padding) and PRIORITY, no END_HEADERS.
        let mut payload = vec![2u8];
        payload.extend([0, 0, 0, 0, 16]);
        payload.extend(a);
        payload.extend([0, 0]);
        let mut f = BytesMut::new();
        write_frame(
            &mut f,
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY,
            5,
            &payload,
        );
        write_frame(&mut f, TYPE_CONTINUATION, FLAG_END_HEADERS, 5, b);
        input.extend(f);
        let fs = frames(&run(&input));
        assert_eq!(fs.len(), 1);
        assert_eq!(
            (fs[0].0, fs[0].1, fs[0].2),
            (TYPE_HEADERS, FLAG_END_HEADERS, 5)
        );
        let h = loona_hpack::Decoder::new().decode(&fs[0].3).unwrap();
        assert_eq!(h[0], (b":authority".to_vec(), b"h:1".to_vec()));
    }

    #[test]
    fn garbage_passes_through_unchanged() {
        let mut input = PREFACE.to_vec();
        let mut f = BytesMut::new();
        write_frame(
            &mut f,
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff],
        );
        write_frame(&mut f, 0, 0, 1, b"tail");
        input.extend(f);
        assert_eq!(run(&input), input);
    }
}
