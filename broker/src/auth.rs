//! Who is calling: turns the bearer token a shim sends into a tenant identity.
//!
//! Authentication sits behind [`Authenticator`] so that the development mode (a static
//! token file) and Kubernetes identity share one request path.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use tonic::metadata::MetadataMap;

use crate::error::EtcdError;

/// A Kubernetes service account: the unit of tenancy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    /// Parses `<ns>/<sa>` or `system:serviceaccount:<ns>:<sa>`.
    pub fn parse(s: &str) -> Option<Self> {
        let (ns, sa) = match s.strip_prefix("system:serviceaccount:") {
            Some(rest) => rest.split_once(':')?,
            None => s.split_once('/')?,
        };
        let valid = |n: &str| {
            !n.is_empty() && !n.contains(['/', ':']) && n.bytes().all(|b| b.is_ascii_graphic())
        };
        (valid(ns) && valid(sa)).then(|| Identity {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        })
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// Verifies a bearer token.
pub trait Authenticator: Send + Sync + 'static {
    /// The identity behind `token`, or why it is refused.
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Identity, AuthError>>;
}

/// Why a call is not authenticated. Only logged and counted: the caller always sees
/// etcd's "invalid auth token".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("unknown token")]
    Unknown,
    /// The token was checked and refused (expired, wrong audience, not a service account).
    #[error("token rejected: {0}")]
    Rejected(String),
    /// The token could not be checked (API server unreachable or refusing the review):
    /// the call is refused all the same, failing closed.
    #[error("token verification failed: {0}")]
    Backend(String),
}

impl From<AuthError> for EtcdError {
    fn from(_: AuthError) -> Self {
        // The caller never learns why: etcd says the same for every bad token.
        EtcdError::InvalidAuthToken
    }
}

/// Reads `authorization: Bearer <token>` from request metadata.
pub fn bearer(md: &MetadataMap) -> Result<&str, AuthError> {
    let v = md
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::Missing)?;
    let token = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .ok_or(AuthError::Missing)?
        .trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

/// Development mode: a file of `<token> <namespace>/<serviceaccount>` lines (`#` starts a
/// comment). For local use and tests only; production uses Kubernetes identity.
#[derive(Clone, Debug, Default)]
pub struct StaticTokens {
    tokens: Arc<HashMap<String, Identity>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StaticTokensError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected `<token> <namespace>/<serviceaccount>`")]
    Syntax { path: String, line: usize },
}

impl StaticTokens {
    pub fn load(path: &Path) -> Result<Self, StaticTokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| StaticTokensError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|line| StaticTokensError::Syntax {
            path: path.display().to_string(),
            line,
        })
    }

    /// Parses the file body; on error returns the 1-based line number.
    pub fn parse(text: &str) -> Result<Self, usize> {
        let mut tokens = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(token), Some(who), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(i + 1);
            };
            let id = Identity::parse(who).ok_or(i + 1)?;
            tokens.insert(token.to_owned(), id);
        }
        Ok(Self {
            tokens: Arc::new(tokens),
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

impl Authenticator for StaticTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Identity, AuthError>> {
        let res = self.tokens.get(token).cloned().ok_or(AuthError::Unknown);
        Box::pin(std::future::ready(res))
    }
}

/// Bound on the answers a [`TokenCache`] keeps.
pub const TOKEN_CACHE_MAX: usize = 10_000;

/// SHA-256 of a token: what caches are keyed by, so that raw tokens are never kept.
pub type TokenHash = [u8; 32];

pub fn token_hash(token: &str) -> TokenHash {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Answers about tokens, each until a deadline, at most [`TOKEN_CACHE_MAX`] of them.
pub struct TokenCache<V> {
    entries: HashMap<TokenHash, (V, Instant)>,
}

impl<V> Default for TokenCache<V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }
}

impl<V: Clone> TokenCache<V> {
    pub fn get(&mut self, key: &TokenHash, now: Instant) -> Option<V> {
        match self.entries.get(key) {
            Some((v, until)) if *until > now => Some(v.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn put(&mut self, key: TokenHash, value: V, until: Instant, now: Instant) {
        if self.entries.len() >= TOKEN_CACHE_MAX {
            self.entries.retain(|_, (_, u)| *u > now);
            if self.entries.len() >= TOKEN_CACHE_MAX {
                // Everything is live: start over rather than grow. Costs one check per
                // active token.
                self.entries.clear();
            }
        }
        self.entries.insert(key, (value, until));
    }

    /// Forgets every answer (the keys they were checked against changed).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_cache_is_bounded_and_answers_until_the_deadline() {
        let mut c = TokenCache::default();
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(10);
        for i in 0..(TOKEN_CACHE_MAX + 5) {
            c.put(token_hash(&i.to_string()), i, later, now);
        }
        assert!(c.entries.len() <= TOKEN_CACHE_MAX);
        let key = token_hash("t");
        c.put(key, 7, later, now);
        assert_eq!(c.get(&key, now), Some(7));
        assert_eq!(c.get(&key, later), None, "past its deadline");
        c.put(key, 7, later, now);
        c.clear();
        assert_eq!(c.get(&key, now), None);
    }

    #[test]
    fn identity_parsing() {
        let id = Identity::parse("demo/default").unwrap();
        assert_eq!(id.to_string(), "demo/default");
        assert_eq!(
            Identity::parse("system:serviceaccount:demo:default"),
            Some(id)
        );
        for bad in [
            "",
            "demo",
            "/x",
            "x/",
            "a/b/c",
            "system:serviceaccount:a",
            "a b/c",
        ] {
            assert_eq!(Identity::parse(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn static_tokens() {
        let t = StaticTokens::parse("# dev tokens\ntok-a team-a/app\n\ntok-b team-b/app # b\n")
            .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.authenticate("tok-b").await.unwrap().to_string(),
            "team-b/app"
        );
        assert!(matches!(
            t.authenticate("nope").await,
            Err(AuthError::Unknown)
        ));
        assert_eq!(StaticTokens::parse("a b c\n").unwrap_err(), 1);
        assert_eq!(StaticTokens::parse("ok x/y\nbad\n").unwrap_err(), 2);
    }

    #[test]
    fn bearer_metadata() {
        let mut md = MetadataMap::new();
        assert!(matches!(bearer(&md), Err(AuthError::Missing)));
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert!(matches!(bearer(&md), Err(AuthError::Missing)));
        md.insert("authorization", "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer(&md).unwrap(), "abc.def");
    }
}
