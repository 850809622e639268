//! Authentication by TokenReview: the API server says whether a token is valid for the
//! `etcd-shim` audience and whose it is. This sees revocation (a deleted pod or service
//! account ends its tokens), which local verification cannot.
//!
//! Answers are cached by a SHA-256 of the token (raw tokens are never kept) so that the
//! API server sees about one review per token, not one per etcd call: positive answers
//! until shortly before the token expires (capped), negative ones briefly. Concurrent
//! calls with the same new token share one review. When the API server cannot answer,
//! calls are refused (fail closed), logged and counted, and nothing is cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::auth::{AuthError, Authenticator, Identity, TokenCache, TokenHash, token_hash};
use crate::jwt;
use crate::metrics::Metrics;

/// Longest a positive answer is reused; bounds how long a revoked token keeps working.
pub const POSITIVE_TTL_MAX: Duration = Duration::from_secs(600);
/// A positive answer is dropped this long before the token's own expiry.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// How long a refusal is reused: long enough to absorb a retry storm from one bad pod,
/// short enough that a freshly created service account works at once.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);
type Outcome = Result<Identity, AuthError>;

/// Authenticates tokens with the API server's TokenReview.
#[derive(Clone)]
pub struct TokenReviewer {
    inner: Arc<Inner>,
}

struct Inner {
    api: Api<TokenReview>,
    /// The audience tokens must be minted for.
    audience: String,
    cache: Mutex<TokenCache<Outcome>>,
    /// Reviews under way, so concurrent calls with one token make one request.
    inflight: Mutex<HashMap<TokenHash, Shared<BoxFuture<'static, Outcome>>>>,
    metrics: Metrics,
}

/// How long an answer about `token` may be reused, if at all.
fn cache_for(outcome: &Outcome, token: &str, now: SystemTime) -> Option<Duration> {
    match outcome {
        Ok(_) => {
            // The API server vouched for the token; its exp is trusted only to shorten
            // the reuse, never to extend it past the cap.
            let exp = jwt::unverified_exp(token)?;
            let left = exp.checked_sub(EXPIRY_MARGIN)?.duration_since(now).ok()?;
            Some(left.min(POSITIVE_TTL_MAX)).filter(|d| !d.is_zero())
        }
        Err(AuthError::Backend(_)) => None,
        Err(_) => Some(NEGATIVE_TTL),
    }
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: &str, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                api: Api::all(client),
                audience: audience.to_owned(),
                cache: Mutex::default(),
                inflight: Mutex::default(),
                metrics,
            }),
        }
    }

    async fn check(&self, token: &str) -> Outcome {
        let key = token_hash(token);
        let cached = self
            .inner
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key, Instant::now());
        if let Some(o) = cached {
            self.inner.metrics.token_cache_hits.inc();
            return o;
        }
        let review = {
            let mut inflight = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Looked up again under the in-flight lock: a review that finished since the
            // first look wrote the cache before leaving the in-flight map.
            let cached = self
                .inner
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key, Instant::now());
            if let Some(o) = cached {
                self.inner.metrics.token_cache_hits.inc();
                return o;
            }
            inflight
                .entry(key)
                .or_insert_with(|| {
                    let inner = self.inner.clone();
                    let token = token.to_owned();
                    async move {
                        let outcome = inner.review(&token).await;
                        if let Some(ttl) = cache_for(&outcome, &token, SystemTime::now()) {
                            let now = Instant::now();
                            inner.cache.lock().unwrap_or_else(|e| e.into_inner()).put(
                                key,
                                outcome.clone(),
                                now + ttl,
                                now,
                            );
                        }
                        // After the cache write, so a new caller finds one or the other.
                        inner
                            .inflight
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&key);
                        outcome
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        review.await
    }
}

impl Inner {
    /// One TokenReview, and what it means for the broker.
    async fn review(&self, token: &str) -> Outcome {
        let req = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let resp = match self.api.create(&PostParams::default(), &req).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.token_review("error");
                tracing::warn!(error = %e, "TokenReview failed; refusing the call");
                return Err(AuthError::Backend(e.to_string()));
            }
        };
        let outcome = judge(&resp, &self.audience);
        self.metrics.token_review(if outcome.is_ok() {
            "authenticated"
        } else {
            "rejected"
        });
        outcome
    }
}

/// What a TokenReview answer means: authenticated, for our audience, by a service account.
fn judge(resp: &TokenReview, audience: &str) -> Outcome {
    let Some(status) = &resp.status else {
        return Err(AuthError::Rejected("TokenReview without status".into()));
    };
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return Err(AuthError::Rejected(why.to_owned()));
    }
    // An API server that ignored spec.audiences would vouch for tokens minted for itself.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        return Err(AuthError::Rejected(format!(
            "token is not for audience {audience:?}"
        )));
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or("");
    jwt::service_account(username)
        .ok_or_else(|| AuthError::Rejected(format!("{username:?} is not a service account")))
}

impl Authenticator for TokenReviewer {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Identity, AuthError>> {
        Box::pin(self.check(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::json;
    use tower_test::mock;

    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    fn reviewer() -> (TokenReviewer, Handle, Metrics) {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        (
            TokenReviewer::new(client, "etcd-shim", metrics.clone()),
            handle,
            metrics,
        )
    }

    /// A JWT-shaped token (unsigned: the API server is mocked) expiring in `secs`.
    fn token(secs: u64) -> String {
        let enc = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let exp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + secs;
        format!(
            "{}.{}.c2ln",
            enc(json!({"alg": "RS256", "kid": "k"})),
            enc(json!({"aud": ["etcd-shim"], "exp": exp, "sub": "system:serviceaccount:demo:app"}))
        )
    }

    /// Answers the next request with `status` and `body`, after checking it is the
    /// TokenReview the broker must send.
    async fn answer(handle: &mut Handle, token: &str, status: StatusCode, body: serde_json::Value) {
        let (req, send) = handle.next_request().await.expect("a request");
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(
            req.uri().path(),
            "/apis/authentication.k8s.io/v1/tokenreviews"
        );
        let sent: serde_json::Value =
            serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!(sent["kind"], "TokenReview");
        assert_eq!(sent["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(sent["spec"]["token"], token);
        assert_eq!(sent["spec"]["audiences"], json!(["etcd-shim"]));
        let resp = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string().into_bytes()))
            .unwrap();
        send.send_response(resp);
    }

    /// What the API server answers for a valid bound pod token.
    fn authenticated(token: &str, audiences: serde_json::Value) -> serde_json::Value {
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": {"token": token, "audiences": ["etcd-shim"]},
            "status": {
                "authenticated": true,
                "user": {
                    "username": "system:serviceaccount:demo:app",
                    "uid": "7d2e3f4a-1b2c-4d5e-8f9a-0b1c2d3e4f5a",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:demo", "system:authenticated"],
                    "extra": {
                        "authentication.kubernetes.io/credential-id": ["JTI=4c1f2d7e-0a9b-4e3c-8d2f-1b6a5c4d3e2f"],
                        "authentication.kubernetes.io/node-name": ["node-1"],
                        "authentication.kubernetes.io/node-uid": ["1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"],
                        "authentication.kubernetes.io/pod-name": ["app-0"],
                        "authentication.kubernetes.io/pod-uid": ["0b7c4a1e-5d3f-4c1a-9f7e-2a6b8c9d0e1f"]
                    }
                },
                "audiences": audiences
            }
        })
    }

    fn status_body(code: u16, reason: &str, message: &str) -> serde_json::Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": {"group": "authentication.k8s.io", "kind": "tokenreviews"},
            "code": code
        })
    }

    #[tokio::test]
    async fn authenticated_then_cached() {
        let (r, mut handle, metrics) = reviewer();
        let t = token(3600);
        let server = {
            let t = t.clone();
            tokio::spawn(async move {
                answer(
                    &mut handle,
                    &t,
                    StatusCode::CREATED,
                    authenticated(&t, json!(["etcd-shim"])),
                )
                .await;
                // Dropping the handle makes any further request fail: a second success
                // can only come from the cache.
            })
        };
        let id = r.authenticate(&t).await.unwrap();
        assert_eq!(id.to_string(), "demo/app");
        server.await.unwrap();
        let again = r.authenticate(&t).await.unwrap();
        assert_eq!(again, id);
        assert_eq!(metrics.token_cache_hits.get(), 1);
    }

    #[tokio::test]
    async fn unauthenticated_is_refused_and_briefly_cached() {
        let (r, mut handle, metrics) = reviewer();
        let t = token(3600);
        let body = json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": {"token": t, "audiences": ["etcd-shim"]},
            "status": {"user": {}, "error": "[invalid bearer token, service account token has expired]"}
        });
        let server = {
            let t = t.clone();
            tokio::spawn(async move { answer(&mut handle, &t, StatusCode::CREATED, body).await })
        };
        let err = r.authenticate(&t).await.unwrap_err();
        assert!(
            matches!(&err, AuthError::Rejected(m) if m.contains("expired")),
            "{err}"
        );
        server.await.unwrap();
        assert!(matches!(
            r.authenticate(&t).await,
            Err(AuthError::Rejected(_))
        ));
        assert_eq!(metrics.token_cache_hits.get(), 1);
    }

    #[tokio::test]
    async fn wrong_audience_is_refused() {
        let (r, mut handle, _) = reviewer();
        let t = token(3600);
        let server = {
            let t = t.clone();
            tokio::spawn(async move {
                let body =
                    authenticated(&t, json!(["https://kubernetes.default.svc.cluster.local"]));
                answer(&mut handle, &t, StatusCode::CREATED, body).await
            })
        };
        let err = r.authenticate(&t).await.unwrap_err();
        assert!(
            matches!(&err, AuthError::Rejected(m) if m.contains("audience")),
            "{err}"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn users_that_are_not_service_accounts_are_refused() {
        let (r, mut handle, _) = reviewer();
        let t = token(3600);
        let server = {
            let t = t.clone();
            tokio::spawn(async move {
                let mut body = authenticated(&t, json!(["etcd-shim"]));
                // A user named like a tenant must not become one.
                body["status"]["user"]["username"] = json!("demo/app");
                answer(&mut handle, &t, StatusCode::CREATED, body).await
            })
        };
        assert!(matches!(
            r.authenticate(&t).await,
            Err(AuthError::Rejected(_))
        ));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn api_server_errors_fail_closed_and_are_not_cached() {
        let (r, mut handle, metrics) = reviewer();
        let t = token(3600);
        let server = {
            let t = t.clone();
            tokio::spawn(async move {
                let forbidden = status_body(
                    403,
                    "Forbidden",
                    "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:etcd-shim:broker\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
                );
                answer(&mut handle, &t, StatusCode::FORBIDDEN, forbidden).await;
                let internal = status_body(
                    500,
                    "InternalError",
                    "Internal error occurred: etcdserver: request timed out",
                );
                answer(&mut handle, &t, StatusCode::INTERNAL_SERVER_ERROR, internal).await;
                answer(
                    &mut handle,
                    &t,
                    StatusCode::CREATED,
                    authenticated(&t, json!(["etcd-shim"])),
                )
                .await;
            })
        };
        let e1 = r.authenticate(&t).await.unwrap_err();
        assert!(
            matches!(&e1, AuthError::Backend(m) if m.contains("forbidden")),
            "{e1}"
        );
        let e2 = r.authenticate(&t).await.unwrap_err();
        assert!(matches!(e2, AuthError::Backend(_)), "{e2}");
        // Errors were not cached: the third call asks again and succeeds.
        assert!(r.authenticate(&t).await.is_ok());
        server.await.unwrap();
        let errors = metrics
            .token_reviews
            .get_or_create(&crate::metrics::OutcomeLabels { outcome: "error" })
            .get();
        assert_eq!(errors, 2);
        assert_eq!(metrics.token_cache_hits.get(), 0);
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_review() {
        let (r, mut handle, _) = reviewer();
        let t = token(3600);
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let r = r.clone();
                let t = t.clone();
                tokio::spawn(async move { r.authenticate(&t).await })
            })
            .collect();
        answer(
            &mut handle,
            &t,
            StatusCode::CREATED,
            authenticated(&t, json!(["etcd-shim"])),
        )
        .await;
        drop(handle);
        for c in calls {
            assert_eq!(c.await.unwrap().unwrap().to_string(), "demo/app");
        }
    }

    #[test]
    fn cache_lifetimes() {
        let now = SystemTime::now();
        let id: Outcome = Ok(Identity::parse("a/b").unwrap());
        // Capped for long-lived tokens, shortened near expiry, none when about to expire.
        assert_eq!(cache_for(&id, &token(7200), now), Some(POSITIVE_TTL_MAX));
        let d = cache_for(&id, &token(120), now).unwrap();
        assert!(
            d <= Duration::from_secs(90) && d > Duration::from_secs(80),
            "{d:?}"
        );
        assert_eq!(cache_for(&id, &token(10), now), None);
        assert_eq!(cache_for(&id, "opaque", now), None);
        assert_eq!(
            cache_for(&Err(AuthError::Rejected("x".into())), "t", now),
            Some(NEGATIVE_TTL)
        );
        assert_eq!(
            cache_for(&Err(AuthError::Backend("x".into())), "t", now),
            None
        );
    }
}
