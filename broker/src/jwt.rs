//! Local verification of service-account tokens against the cluster issuer's public keys
//! (a JWKS, as served by the API server at `/openid/v1/jwks`), so that authentication
//! does not need a TokenReview round trip per new token.
//!
//! Signatures are checked with `ring`, which the TLS stack already links: RS256 and ES256
//! are all the Kubernetes issuer uses, and a JWT library would bring a second crypto
//! backend (aws-lc, or the RustCrypto `rsa` crate) into the broker for that.
//!
//! Local verification cannot see revocation (a deleted pod or service account): tokens
//! stay valid until they expire. TokenReview mode does not have that limit.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use etcd_shim_core::follow::{Follow, Outcome, StartError};
use futures_util::future::BoxFuture;
use ring::signature;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, Authenticator, Identity, TokenCache, token_hash};
use crate::metrics::{Metrics, Reloaded};

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a well-formed JWT")]
    Malformed,
    #[error("unsupported signing algorithm {0:?}")]
    Algorithm(String),
    #[error("signed by an unknown key")]
    UnknownKey,
    #[error("bad signature")]
    Signature,
    #[error("issuer {0:?} is not the configured one")]
    Issuer(String),
    #[error("audience does not include the configured one")]
    Audience,
    #[error("expired")]
    Expired,
    #[error("not valid yet")]
    NotYetValid,
    #[error("subject is not a service account")]
    Subject,
}

impl From<JwtError> for AuthError {
    fn from(e: JwtError) -> Self {
        AuthError::Rejected(e.to_string())
    }
}

/// Errors loading a key set.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("not a JWKS document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no RS256 or ES256 key in the key set")]
    NoUsableKey,
}

/// Decodes one base64url part of a JWT (padding tolerated).
pub fn b64(part: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()
}

pub use etcd_shim_core::token::unverified_exp;

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, want: &str) -> bool {
        match self {
            Audience::None => false,
            Audience::One(a) => a == want,
            Audience::Many(v) => v.iter().any(|a| a == want),
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: String,
    #[serde(default)]
    sub: String,
    #[serde(default)]
    aud: Audience,
    exp: Option<i64>,
    nbf: Option<i64>,
}

/// One public key from the set.
#[derive(Debug, Clone)]
enum PublicKey {
    /// RSA modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// An uncompressed P-256 point: 0x04 || x || y.
    P256(Vec<u8>),
}

/// A parsed key set: the keys ring can verify with, by `kid`.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: Vec<(Option<String>, PublicKey)>,
}

#[derive(Deserialize)]
struct JwkDoc {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(rename = "use", default)]
    use_: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

impl Jwks {
    /// Parses a JWKS document, keeping the signing keys it can use and skipping others
    /// (an issuer may publish keys of kinds the broker never needs).
    pub fn parse(doc: &[u8]) -> Result<Self, JwksError> {
        let doc: JwkDoc = serde_json::from_slice(doc)?;
        let mut keys = Vec::new();
        for k in doc.keys {
            if k.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let key = match (k.kty.as_str(), k.alg.as_deref()) {
                ("RSA", None | Some("RS256")) => {
                    match (k.n.as_deref().and_then(b64), k.e.as_deref().and_then(b64)) {
                        (Some(n), Some(e)) if !n.is_empty() && !e.is_empty() => {
                            PublicKey::Rsa { n, e }
                        }
                        _ => continue,
                    }
                }
                ("EC", None | Some("ES256")) if k.crv.as_deref() == Some("P-256") => {
                    match (k.x.as_deref().and_then(b64), k.y.as_deref().and_then(b64)) {
                        (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                            let mut p = Vec::with_capacity(65);
                            p.push(0x04);
                            p.extend_from_slice(&x);
                            p.extend_from_slice(&y);
                            PublicKey::P256(p)
                        }
                        _ => continue,
                    }
                }
                _ => continue,
            };
            keys.push((k.kid, key));
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(Self { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks the signature of `signed` (`header.payload`) with the key `kid` names, or
    /// with every key of the algorithm's type when the token names none.
    fn verify(
        &self,
        alg: &str,
        kid: Option<&str>,
        signed: &[u8],
        sig: &[u8],
    ) -> Result<(), JwtError> {
        let mut tried = false;
        for (k_kid, key) in &self.keys {
            if let (Some(want), Some(have)) = (kid, k_kid.as_deref())
                && want != have
            {
                continue;
            }
            let ok = match (alg, key) {
                ("RS256", PublicKey::Rsa { n, e }) => signature::RsaPublicKeyComponents { n, e }
                    .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, sig)
                    .is_ok(),
                ("ES256", PublicKey::P256(point)) => {
                    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                        .verify(signed, sig)
                        .is_ok()
                }
                // The key type must match the algorithm: never let the token choose how a
                // key is used.
                _ => continue,
            };
            tried = true;
            if ok {
                return Ok(());
            }
        }
        Err(if tried {
            JwtError::Signature
        } else {
            JwtError::UnknownKey
        })
    }
}

/// Verifies tokens locally; the key set can be replaced while it serves.
pub struct JwtVerifier {
    /// The `iss` every accepted token carries (the cluster's service-account issuer).
    issuer: String,
    /// The audience a token must be minted for (`etcd-shim`).
    audience: String,
    /// The current key set; replaced whole on reload.
    keys: RwLock<Arc<Jwks>>,
    /// Where each verification's outcome is counted.
    metrics: Option<Metrics>,
    /// Tokens verified already, each until it expires (as `verify` would find it), so a
    /// pod's every call does not pay for a signature check; emptied when the keys change.
    verified: Mutex<TokenCache<Identity>>,
}

impl JwtVerifier {
    pub fn new(issuer: &str, audience: &str, keys: Jwks) -> Self {
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            keys: RwLock::new(Arc::new(keys)),
            metrics: None,
            verified: Mutex::default(),
        }
    }

    /// Counts every verification in `etcd_broker_local_token_verifications_total`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn set_keys(&self, keys: Jwks) {
        self.put_keys(Arc::new(keys));
    }

    fn put_keys(&self, keys: Arc<Jwks>) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        // A token signed by a key that is gone must fail from now on.
        self.cache().clear();
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TokenCache<Identity>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`JwtVerifier::verify`], answered from the tokens verified already when it can be.
    fn authenticate_at(
        &self,
        token: &str,
        now: SystemTime,
        clock: Instant,
    ) -> Result<Identity, JwtError> {
        let key = token_hash(token);
        if let Some(id) = self.cache().get(&key, clock) {
            if let Some(m) = &self.metrics {
                m.token_cache_hits.inc();
            }
            return Ok(id);
        }
        let res = self.verify(token, now);
        if let Some(m) = &self.metrics {
            m.local_verification(res.is_ok());
        }
        if let Ok(id) = &res
            // Verified, so its exp can be trusted: the token is good until then.
            && let Some(left) = unverified_exp(token)
                .and_then(|exp| (exp + LEEWAY).duration_since(now).ok())
        {
            self.cache().put(key, id.clone(), clock + left, clock);
        }
        res
    }

    fn keys(&self) -> Arc<Jwks> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Verifies `token` as of `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Identity, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = serde_json::from_slice(&b64(h).ok_or(JwtError::Malformed)?)
            .map_err(|_| JwtError::Malformed)?;
        if header.alg != "RS256" && header.alg != "ES256" {
            return Err(JwtError::Algorithm(header.alg));
        }
        let sig = b64(s).ok_or(JwtError::Malformed)?;
        let signed_len = h.len() + 1 + p.len();
        self.keys().verify(
            &header.alg,
            header.kid.as_deref(),
            &token.as_bytes()[..signed_len],
            &sig,
        )?;

        // Claims are only looked at once the signature holds.
        let claims: Claims = serde_json::from_slice(&b64(p).ok_or(JwtError::Malformed)?)
            .map_err(|_| JwtError::Malformed)?;
        if claims.iss != self.issuer {
            return Err(JwtError::Issuer(claims.iss));
        }
        if !claims.aud.contains(&self.audience) {
            return Err(JwtError::Audience);
        }
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let leeway = LEEWAY.as_secs() as i64;
        match claims.exp {
            Some(exp) if now <= exp.saturating_add(leeway) => {}
            _ => return Err(JwtError::Expired),
        }
        if claims
            .nbf
            .is_some_and(|nbf| now < nbf.saturating_sub(leeway))
        {
            return Err(JwtError::NotYetValid);
        }
        service_account(&claims.sub).ok_or(JwtError::Subject)
    }

    /// Loads the key set from `path` now, failing if the file is unusable, then keeps it
    /// in step with the file until `stop`. A file that does not parse is refused with a
    /// log line and a metric; the previous keys stay in use.
    pub fn follow_file(
        self: &Arc<Self>,
        path: PathBuf,
        every: Duration,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, StartError<JwksError>> {
        let shown = path.display().to_string();
        let on_outcome = move |outcome: Outcome<'_, Jwks, JwksError>| match outcome {
            Outcome::Published(keys) => {
                tracing::info!(path = %shown, keys = keys.len(), "issuer keys reloaded");
                metrics.reloaded(Reloaded::Jwks, true);
            }
            Outcome::Rejected(_) | Outcome::Unreadable(_) => {
                metrics.reloaded(Reloaded::Jwks, false);
            }
            Outcome::Unchanged => {}
        };
        let mut keys = Follow::new([path], |contents: &[Vec<u8>]| Jwks::parse(&contents[0]))
            .every(every)
            .refusal(
                tracing::Level::ERROR,
                "issuer keys not reloaded; keeping the previous keys",
            )
            .on_outcome(on_outcome)
            .start(stop)?;
        self.put_keys(keys.borrow_and_update().clone());
        let me = self.clone();
        // Ends when following does, at `stop`.
        Ok(tokio::spawn(async move {
            while keys.changed().await.is_ok() {
                let next = keys.borrow_and_update().clone();
                me.put_keys(next);
            }
        }))
    }

    /// Keeps the key set in step with the API server's `/openid/v1/jwks` until `stop`.
    pub fn follow_api_server(
        self: &Arc<Self>,
        client: kube::Client,
        every: Duration,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => return,
                }
                match fetch_jwks(&client).await {
                    Ok(keys) => {
                        tracing::debug!(keys = keys.len(), "issuer keys refreshed");
                        me.set_keys(keys);
                        metrics.reloaded(Reloaded::Jwks, true);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "issuer keys not refreshed; keeping the previous keys");
                        metrics.reloaded(Reloaded::Jwks, false);
                    }
                }
            }
        })
    }
}

/// Reads the issuer's keys from the API server (readable by every authenticated client
/// through the `system:service-account-issuer-discovery` role).
pub async fn fetch_jwks(client: &kube::Client) -> Result<Jwks, String> {
    let req = http::Request::get("/openid/v1/jwks")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    let text = client.request_text(req).await.map_err(|e| e.to_string())?;
    Jwks::parse(text.as_bytes()).map_err(|e| e.to_string())
}

impl Authenticator for JwtVerifier {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Identity, AuthError>> {
        let res = self
            .authenticate_at(token, SystemTime::now(), Instant::now())
            .map_err(AuthError::from);
        Box::pin(std::future::ready(res))
    }
}

/// The identity behind a `system:serviceaccount:<ns>:<sa>` username; `None` for every
/// other user (in particular for `<ns>/<sa>`, which is a valid name for a human user).
pub fn service_account(username: &str) -> Option<Identity> {
    username
        .strip_prefix("system:serviceaccount:")
        .and_then(|_| Identity::parse(username))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair};

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    const AUD: &str = "etcd-shim";

    fn enc(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// A test signer and the JWKS that publishes its public key.
    enum Signer {
        Ec(EcdsaKeyPair),
        Rsa(RsaKeyPair),
    }

    impl Signer {
        fn ec() -> (Self, serde_json::Value) {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            let kp = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
            let point = kp.public_key().as_ref();
            let jwk = serde_json::json!({
                "use": "sig", "kty": "EC", "kid": "ec-1", "crv": "P-256", "alg": "ES256",
                "x": enc(&point[1..33]), "y": enc(&point[33..65]),
            });
            (Signer::Ec(kp), jwk)
        }

        fn rsa() -> (Self, serde_json::Value) {
            let der = base64::engine::general_purpose::STANDARD
                .decode(RSA_TEST_KEY_PKCS1.split_whitespace().collect::<String>())
                .unwrap();
            let kp = RsaKeyPair::from_der(&der).unwrap();
            let c: signature::RsaPublicKeyComponents<Vec<u8>> = kp.public().into();
            let jwk = serde_json::json!({
                "use": "sig", "kty": "RSA", "kid": "rsa-1", "alg": "RS256",
                "n": enc(&c.n), "e": enc(&c.e),
            });
            (Signer::Rsa(kp), jwk)
        }

        fn sign(&self, claims: &serde_json::Value) -> String {
            let (alg, kid) = match self {
                Signer::Ec(_) => ("ES256", "ec-1"),
                Signer::Rsa(_) => ("RS256", "rsa-1"),
            };
            let header = serde_json::json!({"alg": alg, "kid": kid});
            let signed = format!(
                "{}.{}",
                enc(header.to_string().as_bytes()),
                enc(claims.to_string().as_bytes())
            );
            let rng = SystemRandom::new();
            let sig = match self {
                Signer::Ec(kp) => kp.sign(&rng, signed.as_bytes()).unwrap().as_ref().to_vec(),
                Signer::Rsa(kp) => {
                    let mut sig = vec![0; kp.public().modulus_len()];
                    kp.sign(
                        &signature::RSA_PKCS1_SHA256,
                        &rng,
                        signed.as_bytes(),
                        &mut sig,
                    )
                    .unwrap();
                    sig
                }
            };
            format!("{signed}.{}", enc(&sig))
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// Claims as the kubelet's projected token carries them.
    fn claims() -> serde_json::Value {
        let n = now();
        serde_json::json!({
            "aud": [AUD], "exp": n + 3600, "iat": n, "nbf": n, "iss": ISS,
            "sub": "system:serviceaccount:demo:app",
            "kubernetes.io": {
                "namespace": "demo",
                "pod": {"name": "app-0", "uid": "0b7c4a1e-5d3f-4c1a-9f7e-2a6b8c9d0e1f"},
                "serviceaccount": {"name": "app", "uid": "7d2e3f4a-1b2c-4d5e-8f9a-0b1c2d3e4f5a"},
            },
        })
    }

    fn verifier(jwks: serde_json::Value) -> JwtVerifier {
        let keys = Jwks::parse(jwks.to_string().as_bytes()).unwrap();
        JwtVerifier::new(ISS, AUD, keys)
    }

    #[test]
    fn table() {
        let (ec, ec_jwk) = Signer::ec();
        let (rsa, rsa_jwk) = Signer::rsa();
        let (other, _) = Signer::ec();
        let v = verifier(serde_json::json!({"keys": [ec_jwk, rsa_jwk]}));
        let with = |k: &str, val: serde_json::Value| {
            let mut c = claims();
            c[k] = val;
            c
        };
        let tamper = |t: String| {
            let (rest, sig) = t.rsplit_once('.').unwrap();
            let mut sig = b64(sig).unwrap();
            sig[5] ^= 1;
            format!("{rest}.{}", enc(&sig))
        };
        let n = now();
        let cases: Vec<(&str, String, Result<&str, JwtError>)> = vec![
            ("ES256 valid", ec.sign(&claims()), Ok("demo/app")),
            ("RS256 valid", rsa.sign(&claims()), Ok("demo/app")),
            (
                "aud as a string",
                ec.sign(&with("aud", AUD.into())),
                Ok("demo/app"),
            ),
            (
                "within leeway",
                ec.sign(&with("exp", (n - 5).into())),
                Ok("demo/app"),
            ),
            (
                "expired",
                ec.sign(&with("exp", (n - 120).into())),
                Err(JwtError::Expired),
            ),
            (
                "no exp",
                ec.sign(&with("exp", serde_json::Value::Null)),
                Err(JwtError::Expired),
            ),
            (
                "not yet valid",
                rsa.sign(&with("nbf", (n + 600).into())),
                Err(JwtError::NotYetValid),
            ),
            (
                "wrong issuer",
                ec.sign(&with("iss", "https://evil.example".into())),
                Err(JwtError::Issuer("https://evil.example".into())),
            ),
            (
                "wrong audience",
                ec.sign(&with(
                    "aud",
                    serde_json::json!(["https://kubernetes.default.svc"]),
                )),
                Err(JwtError::Audience),
            ),
            (
                "not a service account",
                ec.sign(&with("sub", "alice".into())),
                Err(JwtError::Subject),
            ),
            (
                "slash form is not a username",
                ec.sign(&with("sub", "demo/app".into())),
                Err(JwtError::Subject),
            ),
            (
                "tampered ES256 signature",
                tamper(ec.sign(&claims())),
                Err(JwtError::Signature),
            ),
            (
                "tampered RS256 signature",
                tamper(rsa.sign(&claims())),
                Err(JwtError::Signature),
            ),
            (
                "unknown key",
                other.sign(&claims()),
                Err(JwtError::Signature),
            ),
            ("garbage", "a.b".into(), Err(JwtError::Malformed)),
        ];
        for (name, token, want) in cases {
            let got = v.verify(&token, SystemTime::now()).map(|id| id.to_string());
            assert_eq!(got, want.map(str::to_owned), "{name}");
        }

        // A token whose payload is swapped keeps a signature that no longer matches.
        let good = ec.sign(&claims());
        let evil = ec.sign(&with(
            "sub",
            "system:serviceaccount:kube-system:admin".into(),
        ));
        let mut g: Vec<&str> = good.split('.').collect();
        g[1] = evil.split('.').nth(1).unwrap();
        assert_eq!(
            v.verify(&g.join("."), SystemTime::now()),
            Err(JwtError::Signature)
        );
    }

    #[test]
    fn a_verified_token_is_remembered_until_it_expires_or_the_keys_change() {
        let (signer, jwk) = Signer::ec();
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        let v = verifier(serde_json::json!({"keys": [jwk]})).with_metrics(metrics.clone());
        let token = signer.sign(&claims());
        let (wall, clock) = (SystemTime::now(), Instant::now());
        let verified = |m: &Metrics| {
            m.local_verifications
                .get_or_create(&crate::metrics::OutcomeLabels {
                    outcome: "accepted",
                })
                .get()
        };
        for _ in 0..3 {
            assert_eq!(
                v.authenticate_at(&token, wall, clock).unwrap().to_string(),
                "demo/app"
            );
        }
        assert_eq!(verified(&metrics), 1, "verified once");
        assert_eq!(metrics.token_cache_hits.get(), 2);

        // Past exp and the leeway the token is checked again, and refused.
        let late = Duration::from_secs(3600) + LEEWAY + Duration::from_secs(1);
        assert!(matches!(
            v.authenticate_at(&token, wall + late, clock + late),
            Err(JwtError::Expired)
        ));

        // A key set without the token's key: remembered tokens are forgotten.
        assert!(v.authenticate_at(&token, wall, clock).is_ok());
        let (_, other) = Signer::rsa();
        v.set_keys(
            Jwks::parse(serde_json::json!({"keys": [other]}).to_string().as_bytes()).unwrap(),
        );
        assert!(matches!(
            v.authenticate_at(&token, wall, clock),
            Err(JwtError::UnknownKey)
        ));
    }

    #[test]
    fn algorithm_must_fit_the_key() {
        let (ec, ec_jwk) = Signer::ec();
        let v = verifier(serde_json::json!({"keys": [ec_jwk]}));
        let t = ec.sign(&claims());
        let (_, rest) = t.split_once('.').unwrap();
        for alg in ["none", "HS256", "RS256"] {
            let h = enc(serde_json::json!({"alg": alg, "kid": "ec-1"})
                .to_string()
                .as_bytes());
            let res = v.verify(&format!("{h}.{rest}"), SystemTime::now());
            assert!(res.is_err(), "{alg} accepted");
        }
    }

    #[test]
    fn jwks_parsing() {
        assert!(matches!(Jwks::parse(b"{}"), Err(JwksError::Json(_))));
        assert!(matches!(
            Jwks::parse(br#"{"keys":[]}"#),
            Err(JwksError::NoUsableKey)
        ));
        // Keys of other kinds are skipped, not fatal.
        let (_, ec_jwk) = Signer::ec();
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
            ec_jwk,
        ]});
        assert_eq!(Jwks::parse(doc.to_string().as_bytes()).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn key_file_is_followed() {
        let (old, old_jwk) = Signer::ec();
        let (new, new_jwk) = Signer::rsa();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let first = serde_json::json!({"keys": [old_jwk]})
            .to_string()
            .into_bytes();
        std::fs::write(&path, &first).unwrap();
        let v = Arc::new(JwtVerifier::new(ISS, AUD, Jwks::parse(&first).unwrap()));
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        let stop = CancellationToken::new();
        let _task = v
            .follow_file(
                path.clone(),
                Duration::from_millis(20),
                metrics.clone(),
                stop.clone(),
            )
            .unwrap();
        assert!(v.verify(&old.sign(&claims()), SystemTime::now()).is_ok());

        // A broken file is refused and the old keys stay.
        std::fs::write(&path, "{not json").unwrap();
        let mut failed = false;
        for _ in 0..500 {
            if metrics.reload_count(Reloaded::Jwks, false) > 0 {
                failed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(failed, "broken key file noticed");
        assert!(v.verify(&old.sign(&claims()), SystemTime::now()).is_ok());

        std::fs::write(&path, serde_json::json!({"keys": [new_jwk]}).to_string()).unwrap();
        let mut swapped = false;
        for _ in 0..500 {
            if v.verify(&new.sign(&claims()), SystemTime::now()).is_ok() {
                swapped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(swapped, "new key picked up");
        assert!(v.verify(&old.sign(&claims()), SystemTime::now()).is_err());
        stop.cancel();
    }

    /// A 2048-bit RSA key (PKCS#1 DER, base64) made for these tests only: ring can sign
    /// with RSA but cannot generate RSA keys.
    const RSA_TEST_KEY_PKCS1: &str = "
MIIEpAIBAAKCAQEAqhV+rKEqRsLrHzbQT0o9AjrDjh8ZRuqnYzRfR2cWkM2YHs9U9WgkDpLaiYVD
+6NlPiVwI4yTFz2H6eoDU6szSCgC2vXlXHA4Bz5NdcrxK/fD1xU/U0l1YFL17S3+mT9MBCF6GUeq
Asm2M21frYFcvkNAySYKdPQhDnWtuZAw+CPqXoVY2kGY7tHBtfCSnjteD8r+dERfBykgWz+K2EBy
SDfYVmHFFbuJ9OQRGZa6bO5Cfkz2TiqT8YaIMBfO1gSVmY+IsBR5Es068BrxoTLo5JpTqzcY3Cu7
SwZsnKitU5kGQaM8pV99PZSB6qdUcyStFyv1mJiZfOrTZB972P/RNQIDAQABAoIBAA6owJy/XUXx
CdPMZSLYWq7FAtLOgl623ctymZ2tWGgNmEVbiE6IdccdyCEfL89R82lqT6J4vLq9jmfOSBAfitF2
xVw64lRXxbR2HbX/0k6AUcxJZAZZJ/kv3UtecfmiV3ppqjzgjNolqYMAM8VgB27MnBpaIX+YBPta
kCkUsOvKBJn3mjgUXv0mG7KTSHvIHCRs5KgF1qvJrtvlzvedcqfBq6JC/xPzZXONLC6M8fo32Rmz
3xfrky50QmTUvwC8K/pOG17v3oyfWZF76qSP8nc/5/E8cM4AfK9qpIQJE1s6/UhxHHNDsxqTbdhr
2e6tqf24TJpiht50yO/f67/3HWECgYEA4HeGDQEvHJxA6fnDbtraO6cRUdUlrpI64DAs14C0U4S3
m1FdkCrBkx9BTfqiTShbcv1FcJ8uDiEIrV4DPlNVvGvIauJ6+XAV31oarhJX+vMZoW48yMyaVJA2
ik1KwnW9nsmxen0Yxr8EIuANiI5PrvdAsxyB9loqInPriffbDsUCgYEAwfo0VkOBnIufGnaKUY7T
GXTY5bVITvyQCu8ma/Dlu1GGSzVYoDJnmhvJy9ufoOeUxILdvqmV4xAJEUVIK70G4FFrZlx8/ecF
TXP82+h5k7iynAYqmepM3cWPpLt6UQINsCUlc+o5U4WWW3e/0/uC3Kjp3N1vBp4oKmS1fdDJ37EC
gYEAr8pLTFH6EGD6oYK+IEn7ES6U7M6NtTrGKx7vb1JXZvUQSe4d5TLm6I5YuXYot158yAA76qhv
DBeo0QVIav4erfKHQdXe0wyJxKKvNFYfWuQZ1YgcyHEcCE/stsEzZDmLaBizCqd/yN59ocZwMtqo
4vC2Vc9kpIcWamb4NtPKVbUCgYB643cqu2OueGnYiwa/+prUQslyZXGk0K60rqOJuLjh/hj1Jpu6
CZTG9hnW85Fij7QY9stike9qRWtpLJo3U266x/ohhDCPbj9WvUeRTetP4bAN1n5AukXuLc39z+QC
1Ck10aKzl8yvlC8YTXoS4wEZqE1YZlSDPck2akzso0xxUQKBgQCMvv/uflaZAdS2FfnHZdKP8N9w
UKtq0rKnyluoDIpBpkrT/H6km0LHXFiWffNLbAIlzDoelnKeqI8PWNMWlXK88HtMkI39Uga7rSR+
3y06cQqCx3l/KdwQR+o4Xl8EKWiIFIo1LACFsI1F6x+zqQXFlGaLUF0g/yW+4DJ6e3EQoA==
";
}
