//! Calls to etcd. Uses tonic's generic gRPC client on etcd's method paths, since the
//! generated clients are not exported, and decodes responses of any size etcd sends.

use std::time::Duration;

use http::uri::PathAndQuery;
use tonic::client::Grpc;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

/// Metadata that a downstream call carries and etcd must see too: `hasleader` makes
/// etcd refuse watches when it has no leader, `grpc-timeout` bounds the call.
const FORWARDED_METADATA: &[&str] = &["hasleader", "grpc-timeout"];

/// A connection pool to one etcd cluster.
#[derive(Clone, Debug)]
pub struct Upstream {
    channel: Channel,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid etcd endpoint {endpoint:?}: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("no etcd endpoints given")]
    NoEndpoints,
}

impl Upstream {
    /// Connects lazily to every endpoint and balances across them, so the broker starts
    /// while etcd is still down and moves off a dead member.
    pub fn new(endpoints: &[String]) -> Result<Self, UpstreamError> {
        if endpoints.is_empty() {
            return Err(UpstreamError::NoEndpoints);
        }
        let mut eps = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let ep = Endpoint::from_shared(e.clone())
                .map_err(|source| UpstreamError::Endpoint {
                    endpoint: e.clone(),
                    source,
                })?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
                .initial_stream_window_size(Some(4 << 20))
                .initial_connection_window_size(Some(8 << 20));
            eps.push(ep);
        }
        let channel = if eps.len() == 1 {
            eps.remove(0).connect_lazy()
        } else {
            Channel::balance_list(eps.into_iter())
        };
        Ok(Self { channel })
    }

    fn grpc(&self) -> Grpc<Channel> {
        Grpc::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    pub async fn unary<Req, Resp>(
        &self,
        path: &'static str,
        req: Request<Req>,
    ) -> Result<Response<Resp>, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.grpc();
        grpc.ready().await.map_err(unavailable)?;
        grpc.unary(req, PathAndQuery::from_static(path), ProstCodec::default())
            .await
            .map_err(clean)
    }

    pub async fn server_streaming<Req, Resp>(
        &self,
        path: &'static str,
        req: Request<Req>,
    ) -> Result<Response<Streaming<Resp>>, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.grpc();
        grpc.ready().await.map_err(unavailable)?;
        grpc.server_streaming(req, PathAndQuery::from_static(path), ProstCodec::default())
            .await
            .map_err(clean)
    }

    pub async fn streaming<S, Req, Resp>(
        &self,
        path: &'static str,
        req: Request<S>,
    ) -> Result<Response<Streaming<Resp>>, Status>
    where
        S: tokio_stream::Stream<Item = Req> + Send + 'static,
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.grpc();
        grpc.ready().await.map_err(unavailable)?;
        grpc.streaming(req, PathAndQuery::from_static(path), ProstCodec::default())
            .await
            .map_err(clean)
    }
}

/// Keeps etcd's code and message, byte-identical, and nothing else: clientv3 matches
/// errors by message, and etcd's response metadata must not leak to tenants.
pub fn clean(s: Status) -> Status {
    Status::new(s.code(), s.message().to_owned())
}

fn unavailable(e: tonic::transport::Error) -> Status {
    Status::unavailable(format!("etcd is unreachable: {e}"))
}

/// Wraps `msg` in a request that carries the forwarded metadata of `from`.
pub fn request_from<T>(from: &MetadataMap, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    for key in FORWARDED_METADATA {
        if let Some(v) = from.get(*key) {
            req.metadata_mut().insert(*key, v.clone());
        }
    }
    req
}
