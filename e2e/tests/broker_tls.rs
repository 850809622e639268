//! Shim -> broker over TLS: etcdctl works through it, a shim that does not trust the
//! broker's CA refuses it (and says why on /ready), and the broker's serving certificate
//! rotates under load without a failed call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use etcd_shim_e2e::tls::{SecretDir, TestCa};
use etcd_shim_e2e::{Broker, Etcd, PREFIX_A, Pod, TENANT_A, pod::in_netns, sample, wait_for};

/// A shim in `pod` that trusts `ca_file` for the broker at `https://<host_ip>:<port>`.
fn shim_args(pod: &Pod, port: u16, ca_file: &std::path::Path) -> Vec<String> {
    vec![
        "--broker".into(),
        format!("https://{}:{port}", pod.host_ip),
        "--broker-ca-file".into(),
        ca_file.display().to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn etcdctl_works_over_tls_and_a_wrong_ca_is_refused() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut good = Pod::new()?;
    let mut wrong = Pod::new()?;
    let ca = TestCa::new("broker CA")?;
    let (cert, key) = ca.issue(&[good.host_ip.to_string(), wrong.host_ip.to_string()])?;
    let secret = SecretDir::new(&cert, &key)?;
    let broker = Broker::start_with(
        &[&etcd.url],
        &[("token-a", TENANT_A)],
        &strs(&secret.broker_args()),
    )?;

    std::fs::write(good.token_file(), "token-a")?;
    let ca_file = ca.write_pem(&good.dir.path().join("broker-ca.crt"))?;
    good.start_shim_with(&strs(&shim_args(&good, broker.port, &ca_file)))?;
    assert_eq!(good.etcdctl_ok(&["put", "/tls/k", "v"])?.trim(), "OK");
    assert_eq!(
        good.etcdctl_ok(&["get", "/tls/k", "--print-value-only"])?
            .trim(),
        "v"
    );
    // Under the tenant's prefix in etcd (the prefix is followed by the key's own "/").
    let raw = etcd.etcdctl(&["get", &format!("{PREFIX_A}/tls/k"), "--print-value-only"])?;
    assert_eq!(String::from_utf8(raw.stdout)?.trim(), "v");

    // The same broker, but the shim trusts another CA.
    std::fs::write(wrong.token_file(), "token-a")?;
    let other = TestCa::new("some other CA")?;
    let other_file = other.write_pem(&wrong.dir.path().join("broker-ca.crt"))?;
    wrong.spawn_shim(&strs(&shim_args(&wrong, broker.port, &other_file)))?;
    let why = wait_for(
        "the shim to report the broker's certificate",
        Duration::from_secs(20),
        || {
            let (code, body) = wrong.shim_readiness().ok()?;
            (code != 200 && body.contains("certificate")).then_some(body)
        },
    )?;
    println!("readiness of the shim with the wrong CA: {}", why.trim());
    assert!(why.contains("broker"), "{why}");
    assert!(
        wrong.shim().is_running(),
        "the shim keeps retrying rather than exiting"
    );
    let out = wrong.etcdctl(&["get", "/tls/k", "--command-timeout=3s"])?;
    assert!(
        !out.status.success(),
        "no data through a broker the shim does not trust"
    );
    let log = wrong.shim().log();
    assert!(
        log.contains("invalid peer certificate") || log.contains("UnknownIssuer"),
        "the shim's log names the problem: {log}"
    );
    Ok(())
}

#[test]
fn a_plaintext_broker_url_needs_the_explicit_flag() -> Result<()> {
    let mut pod = Pod::new()?;
    std::fs::write(pod.token_file(), "t")?;
    pod.spawn_shim(&["--broker", &format!("http://{}:1", pod.host_ip)])?;
    let log = wait_for("the shim to exit", Duration::from_secs(10), || {
        (!pod.shim().is_running()).then(|| pod.shim().log())
    })?;
    assert!(log.contains("--broker-insecure-plaintext"), "{log}");
    Ok(())
}

/// Puts and gets through the shim until `stop`, from inside the pod; returns
/// (calls, failures as messages).
fn keep_calling(ns: String, stop: Arc<AtomicBool>) -> Result<(u64, Vec<String>)> {
    in_netns(&ns.clone(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut c = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
            let (mut calls, mut failures) = (0u64, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let key = format!("/rot/{}", calls % 50);
                if let Err(e) = c.put(key.as_str(), calls.to_string(), None).await {
                    failures.push(format!("put: {e}"));
                }
                if let Err(e) = c.get(key.as_str(), None).await {
                    failures.push(format!("get: {e}"));
                }
                calls += 2;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok::<_, anyhow::Error>((calls, failures))
        })
    })?
}

#[test]
fn the_serving_certificate_rotates_without_a_failed_call() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut pod = Pod::new()?;
    let names = [pod.host_ip.to_string()];
    let (old_ca, new_ca) = (TestCa::new("old CA")?, TestCa::new("new CA")?);
    let (cert1, key1) = old_ca.issue(&names)?;
    let mut secret = SecretDir::new(&cert1, &key1)?;
    let broker = Broker::start_with(
        &[&etcd.url],
        &[("token-a", TENANT_A)],
        &strs(&secret.broker_args()),
    )?;
    let not_after = |m: &str| sample(m, "etcd_broker_tls_certificate_not_after_seconds");
    let reloads = |m: &str, outcome: &str| {
        sample(
            m,
            &format!("etcd_broker_tls_reloads_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let m = broker.metrics()?;
    let first_expiry = not_after(&m).context("expiry metric")?;
    assert!(first_expiry > 0.0);

    std::fs::write(pod.token_file(), "token-a")?;
    let old_file = old_ca.write_pem(&pod.dir.path().join("old-ca.crt"))?;
    let new_file = new_ca.write_pem(&pod.dir.path().join("new-ca.crt"))?;
    pod.start_shim_with(&strs(&shim_args(&pod, broker.port, &old_file)))?;

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (ns, stop) = (pod.name.clone(), stop.clone());
        std::thread::spawn(move || keep_calling(ns, stop))
    };
    // Let the client get going, then rotate to a certificate from another CA.
    std::thread::sleep(Duration::from_millis(300));
    // A certificate whose key does not match is refused; the old one stays.
    let (cert2, key2) = new_ca.issue(&names)?;
    let (_, stray_key) = new_ca.issue(&names)?;
    secret.publish(&cert2, &stray_key)?;
    wait_for(
        "the broken material to be refused",
        Duration::from_secs(20),
        || {
            let m = broker.metrics().ok()?;
            (reloads(&m, "failure") >= 1.0).then_some(())
        },
    )?;
    secret.publish(&cert2, &key2)?;
    wait_for(
        "the new certificate to be in force",
        Duration::from_secs(20),
        || {
            let m = broker.metrics().ok()?;
            (reloads(&m, "success") >= 1.0).then_some(())
        },
    )?;
    // The open connection keeps working a while after the swap.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (calls, failures) = load
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    println!(
        "calls during the rotation: {calls}, failed: {}",
        failures.len()
    );
    ensure!(calls > 20, "too few calls to mean anything: {calls}");
    ensure!(
        failures.is_empty(),
        "failed calls during rotation: {failures:?}"
    );
    let m = broker.metrics()?;
    assert_eq!(reloads(&m, "success"), 1.0);
    assert_eq!(reloads(&m, "failure"), 1.0);
    assert!(not_after(&m) > Some(0.0));

    // New connections see the new certificate: a shim that trusts only the new CA
    // works, one that trusts only the old CA is refused.
    pod.start_shim_with(&strs(&shim_args(&pod, broker.port, &new_file)))?;
    assert_eq!(pod.etcdctl_ok(&["put", "/rot/after", "yes"])?.trim(), "OK");
    pod.spawn_shim(&strs(&shim_args(&pod, broker.port, &old_file)))?;
    wait_for(
        "a shim trusting only the old CA to be refused",
        Duration::from_secs(20),
        || {
            let (code, body) = pod.shim_readiness().ok()?;
            (code != 200 && body.contains("certificate")).then_some(())
        },
    )?;
    if pod.shim().log().contains("connected to broker") {
        bail!("the old CA still reached the broker: {}", pod.shim().log());
    }
    Ok(())
}
