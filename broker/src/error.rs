//! The one place where the broker's own refusals become gRPC statuses, in etcd's exact
//! codes and wording: clientv3 maps errors by their message string, so a client must not
//! be able to tell a refusal by the broker from one by etcd.
//!
//! Errors that come from etcd itself are never built here: they pass through untouched.

use tonic::{Code, Status};

/// A refusal the broker answers itself.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: too many requests")]
    TooManyRequests,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: no leader")]
    NoLeader,
}

impl EtcdError {
    /// The gRPC code etcd uses for this error.
    pub fn code(&self) -> Code {
        match self {
            EtcdError::EmptyKey | EtcdError::UserEmpty => Code::InvalidArgument,
            EtcdError::LeaseNotFound => Code::NotFound,
            EtcdError::PermissionDenied => Code::PermissionDenied,
            EtcdError::InvalidAuthToken => Code::Unauthenticated,
            EtcdError::FutureRev | EtcdError::Compacted => Code::OutOfRange,
            EtcdError::TooManyRequests | EtcdError::NoSpace => Code::ResourceExhausted,
            EtcdError::Timeout | EtcdError::NoLeader => Code::Unavailable,
        }
    }

    /// A short, stable label for metrics and audit lines.
    pub fn reason(&self) -> &'static str {
        match self {
            EtcdError::EmptyKey => "empty_key",
            EtcdError::LeaseNotFound => "foreign_lease",
            EtcdError::PermissionDenied => "permission_denied",
            EtcdError::InvalidAuthToken => "invalid_token",
            EtcdError::UserEmpty => "user_empty",
            EtcdError::FutureRev => "future_revision",
            EtcdError::Compacted => "compacted",
            EtcdError::TooManyRequests => "too_many_requests",
            EtcdError::NoSpace => "no_space",
            EtcdError::Timeout => "timeout",
            EtcdError::NoLeader => "no_leader",
        }
    }
}

impl From<EtcdError> for Status {
    fn from(e: EtcdError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_etcd_wording() {
        let cases = [
            (
                EtcdError::EmptyKey,
                Code::InvalidArgument,
                "etcdserver: key is not provided",
            ),
            (
                EtcdError::LeaseNotFound,
                Code::NotFound,
                "etcdserver: requested lease not found",
            ),
            (
                EtcdError::PermissionDenied,
                Code::PermissionDenied,
                "etcdserver: permission denied",
            ),
            (
                EtcdError::InvalidAuthToken,
                Code::Unauthenticated,
                "etcdserver: invalid auth token",
            ),
            (
                EtcdError::FutureRev,
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
            ),
            (
                EtcdError::NoSpace,
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
            ),
            (
                EtcdError::TooManyRequests,
                Code::ResourceExhausted,
                "etcdserver: too many requests",
            ),
        ];
        for (err, code, msg) in cases {
            let s = Status::from(err);
            assert_eq!((s.code(), s.message()), (code, msg));
        }
    }
}
