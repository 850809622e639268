//! The broker's connections to etcd over mutual TLS: credentials rotated under load (to a
//! new CA) without a failed call, and broken replacements refused while traffic goes on.
//! etcd runs with `--client-cert-auth`, so every connection proves which certificate
//! the broker presents.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use etcd_client::{Client, WatchOptions};
use etcd_shim_e2e::pod::in_netns;
use etcd_shim_e2e::tls::SecretDir;
use etcd_shim_e2e::{Broker, EtcdCluster, EtcdTls, Pod, promtool_check, sample, wait_for};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    date_time_ymd,
};

const TENANT: &str = "team-a/app";
const SHIM: &str = "http://127.0.0.1:2379";

/// A CA that issues the test's certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, as PEM, and its notAfter.
struct Leaf {
    cert: String,
    key: String,
    not_after: i64,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(
        &self,
        name: &str,
        sans: &[&str],
        usages: &[ExtendedKeyUsagePurpose],
        not_after: (i32, u8, u8),
    ) -> Leaf {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = usages.to_vec();
        params.not_before = date_time_ymd(2019, 1, 1);
        params.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            not_after: params.not_after.unix_timestamp(),
        }
    }

    /// etcd's serving certificate (also used by etcd's gateway as a client).
    fn server(&self) -> Leaf {
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        self.issue(
            "etcd",
            &["127.0.0.1", "localhost"],
            &[ServerAuth, ClientAuth],
            (2090, 1, 1),
        )
    }

    /// A client certificate for the broker.
    fn client(&self, not_after: (i32, u8, u8)) -> Leaf {
        self.issue(
            "etcd-shim-broker",
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            not_after,
        )
    }
}

/// The broker's etcd client credentials, laid out like a mounted Kubernetes Secret.
struct SecretVolume(SecretDir);

impl SecretVolume {
    fn new(ca: &str, cert: &str, key: &str) -> Result<Self> {
        Ok(Self(SecretDir::with_files(&[
            ("ca.crt", ca),
            ("tls.crt", cert),
            ("tls.key", key),
        ])?))
    }

    /// Writes a new version and swaps `..data` with one rename, as the kubelet does.
    fn publish(&mut self, ca: &str, cert: &str, key: &str) -> Result<()> {
        self.0
            .publish_files(&[("ca.crt", ca), ("tls.crt", cert), ("tls.key", key)])
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path(name)
    }

    /// Broker flags that point at this volume.
    fn flags(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (flag, name) in [
            ("--etcd-ca-file", "ca.crt"),
            ("--etcd-cert-file", "tls.crt"),
            ("--etcd-key-file", "tls.key"),
        ] {
            v.push(flag.to_owned());
            v.push(self.path(name).display().to_string());
        }
        v
    }
}

/// etcd serving `server` and trusting client certificates of `trusted` (a PEM bundle).
fn etcd_files(dir: &Path, server: &Leaf, trusted: &str) -> Result<EtcdTls> {
    let tls = EtcdTls {
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        trusted_ca: dir.join("trusted-ca.crt"),
    };
    std::fs::write(&tls.cert, &server.cert)?;
    std::fs::write(&tls.key, &server.key)?;
    std::fs::write(&tls.trusted_ca, trusted)?;
    Ok(tls)
}

fn start_broker(etcd: &EtcdCluster, volume: &SecretVolume) -> Result<Broker> {
    let urls = etcd.urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let flags = volume.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Broker::start_with(&urls, &[("token-a", TENANT)], &flags)
}

fn metric(broker: &Broker, series: &str) -> Option<f64> {
    broker.metrics().ok().and_then(|m| sample(&m, series))
}

const RELOAD_OK: &str =
    r#"etcd_broker_credential_reloads_total{backend="default",outcome="success"}"#;
const RELOAD_FAILED: &str =
    r#"etcd_broker_credential_reloads_total{backend="default",outcome="failure"}"#;
const EXPIRY: &str =
    r#"etcd_broker_client_certificate_expiry_timestamp_seconds{backend="default"}"#;

/// What the load in the pod saw.
#[derive(Debug, Default)]
struct LoadReport {
    written: BTreeSet<String>,
    failed_writes: Vec<String>,
    failed_reads: Vec<String>,
    watched: BTreeSet<String>,
    watch_error: Option<String>,
}

/// Writes `load/<n>` one after another and reads each back, with a watch on `load/` open
/// all along, until `stop`; then waits (bounded) for the watch to catch up. Counts every
/// finished write in `progress`.
async fn load(stop: Arc<AtomicBool>, progress: Arc<AtomicU64>) -> Result<LoadReport> {
    let mut c = Client::connect([SHIM], None).await?;
    let mut watch = c
        .watch("load/", Some(WatchOptions::new().with_prefix()))
        .await?;
    ensure!(
        watch.message().await?.context("watch created")?.created(),
        "first watch response is the creation"
    );
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let watch_error = Arc::new(Mutex::new(None));
    let watcher = {
        let (seen, watch_error) = (seen.clone(), watch_error.clone());
        tokio::spawn(async move {
            loop {
                match watch.message().await {
                    Ok(Some(resp)) => {
                        let mut seen = seen.lock().unwrap();
                        for kv in resp.events().iter().filter_map(|e| e.kv()) {
                            seen.insert(String::from_utf8_lossy(kv.key()).into_owned());
                        }
                    }
                    Ok(None) => {
                        *watch_error.lock().unwrap() = Some("watch ended".to_owned());
                        return;
                    }
                    Err(e) => {
                        *watch_error.lock().unwrap() = Some(e.to_string());
                        return;
                    }
                }
            }
        })
    };
    let mut report = LoadReport::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && n < 200_000 {
        let key = format!("load/{n:06}");
        match c.put(key.as_str(), n.to_string(), None).await {
            Ok(_) => {
                report.written.insert(key.clone());
                match c.get(key.as_str(), None).await {
                    Ok(r) if r.kvs().len() == 1 => {}
                    Ok(_) => report.failed_reads.push(format!("{key}: not found")),
                    Err(e) => report.failed_reads.push(format!("{key}: {e}")),
                }
            }
            Err(e) => report.failed_writes.push(format!("{key}: {e}")),
        }
        n += 1;
        progress.store(n, Ordering::Relaxed);
    }
    // Everything written must arrive on the watch; give it a bounded time to catch up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline && !watcher.is_finished() {
        if seen.lock().unwrap().is_superset(&report.written) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watcher.abort();
    report.watched = std::mem::take(&mut *seen.lock().unwrap());
    report.watch_error = watch_error.lock().unwrap().take();
    Ok(report)
}

/// Runs [`load`] in `pod` on a thread of its own.
fn start_load(
    pod: &Pod,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    std::thread::JoinHandle<Result<LoadReport>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let ns = pod.name.clone();
    let (s, p) = (stop.clone(), progress.clone());
    let worker = std::thread::spawn(move || {
        in_netns(&ns, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(load(s, p))
        })?
    });
    (stop, progress, worker)
}

fn wait_for_progress(progress: &AtomicU64, at_least: u64) -> Result<()> {
    wait_for(
        &format!("{at_least} writes"),
        Duration::from_secs(60),
        || (progress.load(Ordering::Relaxed) >= at_least).then_some(()),
    )
}

/// A put and a get through the shim that must succeed; retried (bounded) while the
/// broker reconnects, when `retry` says so.
fn put_get(pod: &Pod, key: &str, value: &str) -> Result<()> {
    pod.etcdctl_ok(&["put", key, value])?;
    let got = pod.etcdctl_ok(&["get", key, "--print-value-only"])?;
    ensure!(got.trim() == value, "read back {got:?}, wanted {value:?}");
    Ok(())
}

fn put_get_eventually(pod: &Pod, key: &str, value: &str) -> Result<()> {
    wait_for("traffic through the shim", Duration::from_secs(30), || {
        put_get(pod, key, value).ok()
    })
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p)
}

#[test]
fn rotation_to_a_new_ca_under_load_fails_no_call() -> Result<()> {
    let old = Ca::new("e2e old CA");
    let new = Ca::new("e2e new CA");
    let dir = tempfile::tempdir()?;
    // etcd trusts both CAs for clients while the broker rotates.
    let both = format!("{}{}", new.pem, old.pem);
    let etcd_tls = etcd_files(dir.path(), &old.server(), &both)?;
    let mut etcd = EtcdCluster::start(1, Some(etcd_tls.clone()))?;
    let client_old = old.client((2090, 1, 1));
    let mut volume = SecretVolume::new(&old.pem, &client_old.cert, &client_old.key)?;
    let broker = start_broker(&etcd, &volume)?;
    assert_eq!(metric(&broker, EXPIRY), Some(client_old.not_after as f64));
    let mut pod = Pod::new()?;
    pod.start_shim(broker.port, "token-a")?;

    let (stop, progress, worker) = start_load(&pod);
    wait_for_progress(&progress, 100)?;
    // The new Secret: a client certificate from the new CA, and a CA bundle that still
    // holds the old CA, which signed the serving certificate etcd has now.
    let client_new = new.client((2091, 1, 1));
    volume.publish(&both, &client_new.cert, &client_new.key)?;
    wait_for(
        "the broker to load the new credentials",
        Duration::from_secs(30),
        || (metric(&broker, RELOAD_OK) == Some(1.0)).then_some(()),
    )?;
    let at_rotation = progress.load(Ordering::Relaxed);
    wait_for_progress(&progress, at_rotation + 200)?;
    stop.store(true, Ordering::Relaxed);
    let report = worker
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;

    println!(
        "writes: {} ({} before the new credentials were in force), failed writes: {}, failed reads: {}, watched: {}",
        report.written.len(),
        at_rotation,
        report.failed_writes.len(),
        report.failed_reads.len(),
        report.watched.len()
    );
    assert!(
        report.failed_writes.is_empty(),
        "{:?}",
        report.failed_writes
    );
    assert!(report.failed_reads.is_empty(), "{:?}", report.failed_reads);
    assert_eq!(report.watch_error, None, "the watch stayed open");
    let missing: Vec<_> = report.written.difference(&report.watched).collect();
    assert!(missing.is_empty(), "events never watched: {missing:?}");
    assert_eq!(metric(&broker, EXPIRY), Some(client_new.not_after as f64));
    assert_eq!(metric(&broker, RELOAD_FAILED), None);

    // etcd now trusts only the new CA and serves a certificate from it: the old client
    // certificate is refused, so traffic that flows proves the broker's new
    // connections present the new certificate.
    let server_new = new.server();
    std::fs::write(&etcd_tls.cert, &server_new.cert)?;
    std::fs::write(&etcd_tls.key, &server_new.key)?;
    std::fs::write(&etcd_tls.trusted_ca, &new.pem)?;
    etcd.restart(0)?;
    let ca = write(dir.path(), "bundle.crt", &both)?;
    let old_cert = write(dir.path(), "old.crt", &client_old.cert)?;
    let old_key = write(dir.path(), "old.key", &client_old.key)?;
    let refused = etcd.etcdctl_as(Some((&ca, &old_cert, &old_key)), &["get", "x"])?;
    assert!(
        !refused.status.success(),
        "etcd must refuse the old certificate now"
    );
    put_get_eventually(&pod, "after-restart", "0")?;
    for i in 1..=20 {
        put_get(&pod, "after-restart", &i.to_string())?;
    }
    Ok(())
}

#[test]
fn broken_credentials_are_refused_and_traffic_goes_on() -> Result<()> {
    let ca = Ca::new("e2e CA");
    let dir = tempfile::tempdir()?;
    let mut etcd = EtcdCluster::start(1, Some(etcd_files(dir.path(), &ca.server(), &ca.pem)?))?;
    let good = ca.client((2090, 1, 1));
    let mut volume = SecretVolume::new(&ca.pem, &good.cert, &good.key)?;
    let broker = start_broker(&etcd, &volume)?;
    let mut pod = Pod::new()?;
    pod.start_shim(broker.port, "token-a")?;
    put_get(&pod, "k", "start")?;

    let other = ca.client((2091, 1, 1));
    let expired = ca.client((2020, 1, 1));
    let foreign = Ca::new("e2e unrelated CA").client((2091, 1, 1));
    let cases = [
        ("mismatched key", (&other.cert, &good.key), "does not match"),
        (
            "expired certificate",
            (&expired.cert, &expired.key),
            "expired at 2020-01-01T00:00:00Z",
        ),
        (
            "certificate of another CA",
            (&foreign.cert, &foreign.key),
            "does not chain to the CA bundle",
        ),
        (
            "garbage",
            (&"garbage".to_owned(), &good.key),
            "no PEM certificate found",
        ),
    ];
    for (n, (what, (cert, key), reason)) in cases.into_iter().enumerate() {
        volume.publish(&ca.pem, cert, key)?;
        let failures = (n + 1) as f64;
        wait_for(
            &format!("{what} to be refused"),
            Duration::from_secs(30),
            || (metric(&broker, RELOAD_FAILED) == Some(failures)).then_some(()),
        )?;
        let log = broker.proc.log();
        let line = log
            .lines()
            .rfind(|l| l.contains("rejected new TLS material") && l.contains(reason))
            .with_context(|| format!("{what}: no log line saying {reason:?}"))?;
        // The line names the file an operator has to fix.
        assert!(
            line.contains(&volume.path("tls.crt").display().to_string()),
            "{what}: {line}"
        );
        put_get(&pod, "k", &format!("after {what}"))?;
    }
    assert_eq!(metric(&broker, RELOAD_OK), None);
    assert_eq!(metric(&broker, EXPIRY), Some(good.not_after as f64));
    promtool_check(&broker.metrics()?)?;

    // Connections made after the refusals still use the good credentials.
    etcd.restart(0)?;
    put_get_eventually(&pod, "k", "after restart")?;
    Ok(())
}
