//! Identity end to end: service-account tokens rotated under a running shim, tenants per
//! service account, and the broker config file reloaded under load.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use base64::Engine as _;
use etcd_client::Client;
use etcd_shim_e2e::tls::SecretDir;
use etcd_shim_e2e::{Broker, Etcd, Pod, replace_file, sample, wait_for};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A service-account issuer key: signs tokens as the API server would, and publishes its
/// public half as a JWK.
struct IssuerKey {
    kid: String,
    pair: EcdsaKeyPair,
}

impl IssuerKey {
    fn new(kid: &str) -> Result<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("generating a key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("loading the key"))?;
        Ok(Self {
            kid: kid.to_owned(),
            pair,
        })
    }

    fn jwk(&self) -> serde_json::Value {
        let point = self.pair.public_key().as_ref();
        serde_json::json!({
            "use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256", "alg": "ES256",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        })
    }

    /// A projected token for `<ns>:<sa>` with audience `etcd-shim`, valid for an hour.
    fn token(&self, ns: &str, sa: &str) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let header = serde_json::json!({"alg": "ES256", "kid": self.kid});
        let claims = serde_json::json!({
            "aud": ["etcd-shim"], "iss": ISSUER, "iat": now, "nbf": now, "exp": now + 3600,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "0"}},
        });
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), signed.as_bytes())
            .map_err(|_| anyhow::anyhow!("signing"))?;
        Ok(format!("{signed}.{}", b64(sig.as_ref())))
    }
}

/// Replaces `path` atomically (write beside it, then rename), as operators are told to.
fn write_jwks(path: &Path, keys: &[&IssuerKey]) -> Result<()> {
    let doc = serde_json::json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
    replace_file(path, &doc.to_string())
}

/// Counter value of one series in a scrape; absent means 0.
fn counter(scrape: &str, series: &str) -> f64 {
    sample(scrape, series).unwrap_or(0.0)
}

/// Puts and gets through the pod's shim in a loop until `stop`, counting calls and
/// failures (with the last error).
struct Load {
    calls: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: std::thread::JoinHandle<Result<Option<String>>>,
}

impl Load {
    fn start(pod: &Pod) -> Result<Self> {
        let calls = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, f, s) = (calls.clone(), failures.clone(), stop.clone());
        let ns = pod.name.clone();
        let task = std::thread::spawn(move || {
            etcd_shim_e2e::pod::in_netns(&ns, move || -> Result<Option<String>> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let mut client = Client::connect(["http://127.0.0.1:2379"], None).await?;
                    let mut last_error = None;
                    let mut i = 0u64;
                    // Bounded: the test stops it long before this many calls.
                    while !s.load(Ordering::Relaxed) && i < 1_000_000 {
                        let key = format!("load/{}", i % 16);
                        let res = match i % 2 {
                            0 => client.put(key, i.to_string(), None).await.map(|_| ()),
                            _ => client.get(key, None).await.map(|_| ()),
                        };
                        c.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = res {
                            f.fetch_add(1, Ordering::Relaxed);
                            last_error = Some(e.to_string());
                        }
                        i += 1;
                    }
                    Ok(last_error)
                })
            })?
        });
        Ok(Self {
            calls,
            failures,
            stop,
            task,
        })
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Waits until `n` more calls have been made, so each phase of a test sees traffic.
    fn wait_calls(&self, n: u64) -> Result<()> {
        let target = self.calls() + n;
        wait_for("client calls", Duration::from_secs(30), || {
            (self.calls() >= target).then_some(())
        })
    }

    /// Stops the loop; returns (calls, failures, last error).
    fn finish(self) -> Result<(u64, u64, Option<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        let last = self
            .task
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        Ok((
            self.calls.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            last,
        ))
    }
}

#[test]
fn token_rotated_by_symlink_swap_drops_no_call() -> Result<()> {
    let etcd = Etcd::start()?;
    let old_key = IssuerKey::new("old")?;
    let new_key = IssuerKey::new("new")?;
    let keys_dir = tempfile::tempdir()?;
    let jwks = keys_dir.path().join("jwks.json");
    write_jwks(&jwks, &[&old_key, &new_key])?;
    let broker = Broker::start_with(
        &[&etcd.url],
        &[],
        &[
            "--auth-mode",
            "jwks",
            "--issuer",
            ISSUER,
            "--jwks-file",
            &jwks.display().to_string(),
            "--reload-interval",
            "200ms",
        ],
    )?;

    let mut pod = Pod::new()?;
    // A projected token volume: the kubelet swaps `..data` atomically.
    let mut token_dir = SecretDir::with_files(&[("token", &old_key.token("rot", "app")?)])?;
    pod.start_shim_reading(broker.port, &token_dir.path("token"))?;

    let load = Load::start(&pod)?;
    load.wait_calls(200)?;

    // The kubelet rotates the token; the shim must pick it up without a failed call.
    token_dir.publish_files(&[("token", &new_key.token("rot", "app")?)])?;
    wait_for(
        "the shim to load the new token",
        Duration::from_secs(10),
        || pod.shim().log().contains("token rotated").then_some(()),
    )?;
    load.wait_calls(200)?;

    // Retire the old key: from now on only the new token is accepted, so calls keep
    // succeeding only because the shim really sends the new one.
    let before = counter(
        &broker.metrics()?,
        "etcd_broker_jwks_reloads_total{outcome=\"success\"}",
    );
    write_jwks(&jwks, &[&new_key])?;
    wait_for(
        "the broker to reload its keys",
        Duration::from_secs(10),
        || {
            let m = broker.metrics().ok()?;
            (counter(&m, "etcd_broker_jwks_reloads_total{outcome=\"success\"}") > before)
                .then_some(())
        },
    )?;
    load.wait_calls(200)?;
    let (calls, failures, last) = load.finish()?;
    println!("{calls} calls across the rotation, {failures} failed");
    assert_eq!(failures, 0, "failed calls; last error: {last:?}");

    // And the old token really is refused now: a second pod still holding it gets
    // etcd's "invalid auth token".
    let mut stale = Pod::new()?;
    stale.start_refused_shim(broker.port, &old_key.token("rot", "app")?)?;
    let out = stale.etcdctl(&["get", "load/0"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("etcdserver: invalid auth token"),
        "the retired token must be refused: {err}"
    );
    // Every call was authenticated locally: each token verified against the keys of its
    // time, then remembered until it expires or the keys change (the new token is
    // verified again after the old key is retired).
    let m = broker.metrics()?;
    let verified = |outcome: &str| {
        counter(
            &m,
            &format!("etcd_broker_local_token_verifications_total{{outcome=\"{outcome}\"}}"),
        )
    };
    let remembered = counter(&m, "etcd_broker_token_cache_hits_total");
    assert!(verified("accepted") + remembered >= calls as f64, "{m}");
    assert!(
        verified("accepted") >= 3.0,
        "old token, new token, new token under the new keys: {m}"
    );
    assert!(verified("rejected") >= 1.0, "{m}");
    Ok(())
}

#[test]
fn two_service_accounts_of_one_namespace_get_separate_prefixes() -> Result<()> {
    let etcd = Etcd::start()?;
    let broker = Broker::start(
        &[&etcd.url],
        &[
            ("tok-api", "shared/apiserver"),
            ("tok-metrics", "shared/metrics"),
        ],
    )?;
    let mut api = Pod::new()?;
    api.start_shim(broker.port, "tok-api")?;
    let mut metrics = Pod::new()?;
    metrics.start_shim(broker.port, "tok-metrics")?;

    api.etcdctl_ok(&["put", "config", "from-apiserver"])?;
    metrics.etcdctl_ok(&["put", "config", "from-metrics"])?;
    assert_eq!(
        api.etcdctl_ok(&["get", "config", "--print-value-only"])?
            .trim(),
        "from-apiserver"
    );
    assert_eq!(
        metrics
            .etcdctl_ok(&["get", "", "--from-key", "--keys-only"])?
            .trim(),
        "config",
        "each service account sees one key: its own"
    );

    let out = etcd.etcdctl(&["get", "/etcd-shim/tenants/shared/", "--prefix"])?;
    let all = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(
        lines,
        [
            "/etcd-shim/tenants/shared/apiserver/config",
            "from-apiserver",
            "/etcd-shim/tenants/shared/metrics/config",
            "from-metrics",
        ]
    );
    Ok(())
}

/// The value of `key` in `etcd`, read directly.
fn read_direct(etcd: &Etcd, key: &str) -> Result<Option<String>> {
    let out = etcd.etcdctl(&["get", key, "--print-value-only"])?;
    if !out.status.success() {
        bail!("etcdctl get: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v = String::from_utf8(out.stdout)?;
    Ok((!v.trim().is_empty()).then(|| v.trim().to_owned()))
}

#[test]
fn config_reload_routes_a_tenant_to_a_second_etcd_and_a_broken_file_changes_nothing() -> Result<()>
{
    let main = Etcd::start()?;
    let second = Etcd::start()?;
    let cfg_dir = tempfile::tempdir()?;
    let cfg = cfg_dir.path().join("broker.yaml");
    replace_file(&cfg, "{}\n")?;
    let broker = Broker::start_with(
        &[&main.url],
        &[("tok", "team/app")],
        &[
            "--config",
            &cfg.display().to_string(),
            "--reload-interval",
            "200ms",
        ],
    )?;
    let mut pod = Pod::new()?;
    pod.start_shim(broker.port, "tok")?;
    let key = "/etcd-shim/tenants/team/app/where";

    pod.etcdctl_ok(&["put", "where", "main"])?;
    assert_eq!(read_direct(&main, key)?.as_deref(), Some("main"));
    assert_eq!(read_direct(&second, key)?, None);

    let routed = format!(
        "backends:\n  - name: second\n    endpoints: [\"{}\"]\ntenants:\n  - namespace: team\n    serviceAccount: app\n    backend: second\n",
        second.url
    );
    replace_file(&cfg, &routed)?;
    // Calls keep working throughout; once the reload lands, writes go to the second etcd.
    wait_for(
        "the tenant to move to the second etcd",
        Duration::from_secs(10),
        || {
            pod.etcdctl_ok(&["put", "where", "second"]).ok()?;
            (read_direct(&second, key).ok()?.as_deref() == Some("second")).then_some(())
        },
    )?;
    assert_eq!(
        read_direct(&main, key)?.as_deref(),
        Some("main"),
        "the main etcd no longer gets the tenant's writes"
    );
    assert_eq!(
        pod.etcdctl_ok(&["get", "where", "--print-value-only"])?
            .trim(),
        "second",
        "reads follow the route too"
    );

    // A broken file (a rule naming a backend that does not exist) is refused and the
    // routing stays as it was.
    let failures = |m: &str| counter(m, "etcd_broker_config_reloads_total{outcome=\"failure\"}");
    let before = failures(&broker.metrics()?);
    replace_file(
        &cfg,
        "tenants:\n  - namespace: team\n    backend: nowhere\n",
    )?;
    wait_for(
        "the broken config to be refused",
        Duration::from_secs(10),
        || (failures(&broker.metrics().ok()?) > before).then_some(()),
    )?;
    pod.etcdctl_ok(&["put", "where", "still-second"])?;
    assert_eq!(read_direct(&second, key)?.as_deref(), Some("still-second"));
    assert_eq!(read_direct(&main, key)?.as_deref(), Some("main"));
    assert!(
        broker
            .proc
            .log()
            .contains("broker config refused; keeping the previous config"),
        "the refusal is logged"
    );
    Ok(())
}
