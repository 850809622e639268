//! The little gRPC the shim speaks itself: framing a message it answers locally, and
//! trailers-only error responses. Everything else passes through as bytes.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};

/// gRPC status codes the shim produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    Unimplemented = 12,
    Unavailable = 14,
}

/// A body the shim makes itself: at most one data frame, then optional trailers.
#[derive(Debug, Default)]
pub struct LocalBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for LocalBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// Frames one encoded protobuf message (uncompressed).
pub fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

fn grpc_response(body: LocalBody) -> Response<LocalBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// A successful unary response carrying one framed message.
pub fn ok(framed: Bytes) -> Response<LocalBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    grpc_response(LocalBody {
        data: Some(framed),
        trailers: Some(trailers),
    })
}

/// A trailers-only error response.
pub fn error(code: Code, message: &str) -> Response<LocalBody> {
    let mut resp = grpc_response(LocalBody::default());
    resp.headers_mut().extend(status_trailers(code, message));
    resp
}

/// The broker's response body, passed through frame by frame. If the broker connection
/// breaks mid-stream the app gets trailers with Unavailable instead of a reset stream
/// (which gRPC clients report as Internal), so it retries reads and resumes watches the
/// way it would after any etcd failover. The call is never replayed.
#[derive(Debug)]
pub struct Relayed<B> {
    inner: B,
    /// Set once trailers were made up after an error; the body then ends.
    failed: bool,
}

impl<B> Relayed<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            failed: false,
        }
    }
}

impl<B> Body for Relayed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.failed = true;
                tracing::warn!(error = %e, "broker connection lost during a call");
                let message = format!("etcd-shim: broker connection lost: {e}");
                Poll::Ready(Some(Ok(Frame::trailers(status_trailers(
                    Code::Unavailable,
                    &message,
                )))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.failed {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

fn status_trailers(code: Code, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(code as u16));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    h
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII except `%` stays as is.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The gRPC status of a response: from the headers of a trailers-only response, or
/// from trailers.
pub fn status_of(headers: &HeaderMap) -> Option<u16> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The `grpc-message` of a response, percent-decoded (empty when there is none).
pub fn message_of(headers: &HeaderMap) -> String {
    let raw = headers
        .get("grpc-message")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            raw[i],
            raw.get(i + 1).copied().and_then(hex),
            raw.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn messages_are_percent_decoded() {
        let mut h = HeaderMap::new();
        assert_eq!(message_of(&h), "");
        h.insert(
            "grpc-message",
            HeaderValue::from_str(&percent_encode("etcdserver: 100% down\n")).unwrap(),
        );
        assert_eq!(message_of(&h), "etcdserver: 100% down\n");
    }

    #[test]
    fn framing() {
        assert_eq!(frame(b"ab").as_ref(), &[0, 0, 0, 0, 2, b'a', b'b']);
        assert_eq!(frame(b"").as_ref(), &[0, 0, 0, 0, 0]);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(
            percent_encode("broker: 100% down\n"),
            "broker: 100%25 down%0A"
        );
    }

    #[tokio::test]
    async fn ok_response_has_data_then_trailers() {
        let resp = ok(frame(b"x"));
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(status_of(&trailers), Some(0));
        assert_eq!(collected.to_bytes().as_ref(), &[0, 0, 0, 0, 1, b'x']);
    }

    /// A body that yields one data frame and then fails, like a broker that died.
    struct Breaks(u8);

    impl Body for Breaks {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0 += 1;
            Poll::Ready(Some(match self.0 {
                1 => Ok(Frame::data(Bytes::from_static(b"abc"))),
                _ => Err("connection reset"),
            }))
        }
    }

    #[tokio::test]
    async fn a_broken_broker_stream_ends_with_unavailable() {
        let collected = Relayed::new(Breaks(0)).collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(status_of(&trailers), Some(14));
        assert_eq!(
            trailers["grpc-message"],
            "etcd-shim: broker connection lost: connection reset"
        );
        assert_eq!(collected.to_bytes().as_ref(), b"abc");
    }

    #[test]
    fn error_is_trailers_only() {
        let resp = error(Code::Unavailable, "no broker");
        assert_eq!(status_of(resp.headers()), Some(14));
        assert_eq!(resp.headers()["grpc-message"], "no broker");
        assert!(resp.body().is_end_stream());
    }
}
