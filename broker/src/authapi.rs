//! `etcdserverpb.Auth`: etcd's users and roles are the cluster's, so every method is
//! refused, once the caller is authenticated, as etcd refuses a user without permission.
//! No request message needs decoding for that.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Extensions, Request, Status};

use crate::Broker;
use crate::error::EtcdError;

const SERVICE: &str = "Auth";

/// The `etcdserverpb.Auth` service.
#[derive(Clone)]
pub struct AuthService(pub Broker);

impl NamedService for AuthService {
    const NAME: &'static str = "etcdserverpb.Auth";
}

impl tower_service::Service<http::Request<Body>> for AuthService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let b = self.0.clone();
        Box::pin(async move {
            let (parts, _) = req.into_parts();
            let md = MetadataMap::from_headers(parts.headers);
            let method = match parts.uri.path().rsplit('/').next() {
                Some(m) => auth_method_name(m),
                None => "Auth",
            };
            let req = Request::from_parts(md, Extensions::default(), ());
            let status = match b.refuse::<(), ()>(SERVICE, method, req).await {
                Err(s) => s,
                Ok(_) => Status::from(EtcdError::PermissionDenied),
            };
            Ok(status.into_http())
        })
    }
}

/// A static name for the audit line (labels must be `'static`).
fn auth_method_name(m: &str) -> &'static str {
    const NAMES: &[&str] = &[
        "AuthEnable",
        "AuthDisable",
        "AuthStatus",
        "Authenticate",
        "UserAdd",
        "UserGet",
        "UserList",
        "UserDelete",
        "UserChangePassword",
        "UserGrantRole",
        "UserRevokeRole",
        "RoleAdd",
        "RoleGet",
        "RoleList",
        "RoleDelete",
        "RoleGrantPermission",
        "RoleRevokePermission",
    ];
    NAMES.iter().find(|n| **n == m).copied().unwrap_or("Auth")
}
