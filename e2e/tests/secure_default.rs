//! What "secure by default" promises a tenant, end to end: a service account that the
//! broker config does not list is refused with etcd's "permission denied", counted, and its
//! shim stays unready (saying why) until a rule admits it; a classic sidecar's postStart
//! hook holds the app as long; and a rotation of the broker's CA, delivered as the kubelet
//! delivers a projected ConfigMap, reaches a running shim without a restart and without a
//! failed call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use etcd_shim_e2e::tls::{SecretDir, TestCa};
use etcd_shim_e2e::{Broker, Etcd, Pod, http_get, pod::in_netns, replace_file, sample, wait_for};

/// The chart's default admission: only listed tenants, with default limits.
fn config(tenants: &[&str]) -> String {
    let mut c = String::from(
        "allowUnlisted: false\n\
         defaultLimits: {bytes: 256Mi, keys: 100000, readsPerSecond: 500, readBurst: 1000, \
         writesPerSecond: 100, writeBurst: 200, watches: 500, leases: 1000}\n\
         tenants:\n",
    );
    for ns in tenants {
        c.push_str(&format!("  - namespace: {ns}\n"));
    }
    c
}

fn shim_metrics(pod: &Pod) -> Result<String> {
    let (code, body) = in_netns(&pod.name, || http_get("127.0.0.1:9379", "/metrics"))??;
    ensure!(code == 200, "shim /metrics: HTTP {code}");
    Ok(body)
}

#[test]
fn an_unlisted_tenant_is_refused_and_its_shim_stays_unready_until_admitted() -> Result<()> {
    let etcd = Etcd::start()?;
    let broker = Broker::start_with_config(
        &[&etcd.url],
        &[("token-a", "team-a/app"), ("token-x", "stranger/app")],
        &config(&["team-a"]),
        &["--reload-interval", "1s"],
    )?;

    // The listed tenant works.
    let mut admitted = Pod::new()?;
    admitted.start_shim(broker.port, "token-a")?;
    assert_eq!(admitted.etcdctl_ok(&["put", "/k", "v"])?.trim(), "OK");

    // The unlisted one: its token is valid, but no rule admits it.
    let mut stranger = Pod::new()?;
    std::fs::write(stranger.token_file(), "token-x")?;
    let url = format!("http://{}:{}", stranger.host_ip, broker.port);
    stranger.spawn_shim(&["--broker", &url, "--broker-insecure-plaintext"])?;
    let why = wait_for(
        "the unlisted tenant's shim to say why it is not ready",
        Duration::from_secs(20),
        || {
            let (code, body) = stranger.shim_readiness().ok()?;
            (code == 503 && body.contains("does not admit this tenant")).then_some(body)
        },
    )?;
    assert!(why.contains("etcdserver: permission denied"), "{why}");
    let m = shim_metrics(&stranger)?;
    assert_eq!(sample(&m, "etcd_shim_ready"), Some(0.0), "{m}");
    assert_eq!(
        sample(&m, r#"etcd_shim_unready{reason="not_admitted"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"etcd_shim_unready{reason="token_refused"}"#),
        Some(0.0),
        "a valid token is not the reason: {m}"
    );

    // The app beside it gets etcd's own error, and the broker counts the refusal.
    let out = stranger.etcdctl(&["get", "/k", "--command-timeout=5s"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("etcdserver: permission denied"),
        "the unlisted tenant must be refused: {err}"
    );
    let refused = sample(
        &broker.metrics()?,
        r#"etcd_broker_policy_denials_total{reason="tenant_not_allowed"}"#,
    )
    .unwrap_or(0.0);
    assert!(refused >= 2.0, "probe and call are counted: {refused}");

    // It stays unready: a few more probe rounds change nothing.
    std::thread::sleep(Duration::from_secs(3));
    let (code, _) = stranger.shim_readiness()?;
    assert_eq!(code, 503, "still not ready");
    assert!(
        stranger.shim().is_running(),
        "the shim waits rather than exits"
    );
    let log = stranger.shim().log();
    assert!(
        log.contains("not ready") && log.contains("not_admitted"),
        "the log line names the reason: {log}"
    );

    // A rule admits it: ready within seconds, with no restart, and its data is its own.
    let path = broker.config_path().context("config path")?;
    replace_file(&path, &config(&["team-a", "stranger"]))?;
    let started = Instant::now();
    stranger.wait_shim_ready()?;
    println!("ready {:?} after the rule was added", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(
        stranger
            .etcdctl_ok(&["get", "/k", "--print-value-only"])?
            .trim(),
        "",
        "the admitted stranger does not see team-a's key"
    );
    let m = shim_metrics(&stranger)?;
    assert_eq!(sample(&m, "etcd_shim_ready"), Some(1.0), "{m}");
    assert_eq!(
        sample(&m, r#"etcd_shim_unready{reason="not_admitted"}"#),
        Some(0.0),
        "{m}"
    );
    Ok(())
}

/// Puts and gets through the shim until `stop`, one call at a time; returns (calls,
/// failures).
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
                let key = format!("/ca/{}", calls % 20);
                if let Err(e) = c.put(key.as_str(), calls.to_string(), None).await {
                    failures.push(format!("put: {e}"));
                }
                if let Err(e) = c.get(key.as_str(), None).await {
                    failures.push(format!("get: {e}"));
                }
                calls += 2;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, anyhow::Error>((calls, failures))
        })
    })?
}

#[test]
fn a_ca_rotation_reaches_a_running_shim_without_a_restart_or_a_failed_call() -> Result<()> {
    let etcd = Etcd::start()?;
    let mut pod = Pod::new()?;
    let names = [pod.host_ip.to_string()];
    let (old_ca, new_ca) = (TestCa::new("broker CA 1")?, TestCa::new("broker CA 2")?);
    let tokens = [("token-a", "team-a/app")];
    let cfg = config(&["team-a"]);

    // Two broker replicas, both serving certificates of the old CA.
    let mut secrets = Vec::new();
    let mut brokers = Vec::new();
    for _ in 0..2 {
        let (c, k) = old_ca.issue(&names)?;
        let secret = SecretDir::new(&c, &k)?;
        let args = secret.broker_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        brokers.push(Broker::start_with_config(
            &[&etcd.url],
            &tokens,
            &cfg,
            &args,
        )?);
        secrets.push(secret);
    }

    // The CA bundle as the injector mounts it: a ConfigMap projected by the kubelet.
    let mut bundle = SecretDir::with_files(&[("ca.crt", &old_ca.pem)])?;
    std::fs::write(pod.token_file(), "token-a")?;
    let urls = format!(
        "https://{}:{},https://{}:{}",
        pod.host_ip, brokers[0].port, pod.host_ip, brokers[1].port
    );
    let ca_file = bundle.path("ca.crt").display().to_string();
    pod.start_shim_with(&["--broker", &urls, "--broker-ca-file", &ca_file])?;
    let shim_pid = pod.shim().pid();

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (ns, stop) = (pod.name.clone(), stop.clone());
        std::thread::spawn(move || keep_calling(ns, stop))
    };
    std::thread::sleep(Duration::from_millis(500));

    // The rotation in webhook-certs' order: the bundle trusts both CAs first, then the
    // brokers serve certificates of the new CA, then the old CA leaves the bundle.
    bundle.publish_files(&[("ca.crt", &format!("{}{}", new_ca.pem, old_ca.pem))])?;
    let reloaded = |b: &Broker| {
        b.metrics()
            .ok()
            .and_then(|m| sample(&m, r#"etcd_broker_tls_reloads_total{outcome="success"}"#))
            .unwrap_or(0.0)
            >= 1.0
    };
    for (secret, broker) in secrets.iter_mut().zip(&brokers) {
        let (c, k) = new_ca.issue(&names)?;
        secret.publish(&c, &k)?;
        wait_for(
            "the new certificate in force",
            Duration::from_secs(20),
            || reloaded(broker).then_some(()),
        )?;
    }
    bundle.publish_files(&[("ca.crt", &new_ca.pem)])?;
    std::thread::sleep(Duration::from_millis(300));

    // The replica the shim uses is replaced, as a rollout does (SIGTERM: drain, then
    // exit). The running shim must open its next connection to the other one, and verify
    // it against the new bundle alone: the one it started with would refuse it.
    let connections = |b: &Broker| {
        b.metrics()
            .ok()
            .and_then(|m| sample(&m, "etcd_broker_shim_connections_open"))
            .unwrap_or(0.0)
    };
    let used = (0..2)
        .find(|&i| connections(&brokers[i]) > 0.0)
        .context("no broker holds the shim's connection")?;
    let mut replaced = brokers.remove(used);
    replaced.proc.stop();
    let remaining = &brokers[0];
    wait_for(
        "the shim on the other broker",
        Duration::from_secs(20),
        || (connections(remaining) > 0.0).then_some(()),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (calls, failures) = load
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    println!(
        "calls across the CA rotation and the broker switch: {calls}, failed: {}",
        failures.len()
    );
    ensure!(calls > 50, "too few calls to mean anything: {calls}");
    ensure!(failures.is_empty(), "failed calls: {failures:?}");

    ensure!(
        pod.shim().pid() == shim_pid && pod.shim().is_running(),
        "the shim was not restarted"
    );
    let log = pod.shim().log();
    ensure!(
        log.contains("broker CA bundle changed"),
        "the running shim read the rotated bundle: {log}"
    );
    let (code, body) = pod.shim_readiness()?;
    ensure!(code == 200, "still ready: {body}");
    Ok(())
}

/// The classic sidecar container as the injector writes it into a pod of namespace `late`.
fn classic_shim(broker_url: &str) -> Result<k8s_openapi::api::core::v1::Container> {
    use etcd_shim_injector::{Decision, InjectConfig, SidecarMode, mutate};
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "namespace": "late"},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    });
    let cfg = InjectConfig {
        broker_url: broker_url.to_owned(),
        mode: SidecarMode::Classic,
        ..InjectConfig::default()
    };
    let Decision::Patch(patch) = mutate(&serde_json::from_value(pod.clone())?, None, &cfg) else {
        anyhow::bail!("not injected");
    };
    json_patch::patch(&mut pod, &patch)?;
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(pod)?;
    let spec = pod.spec.context("spec")?;
    Ok(spec.containers[0].clone())
}

#[test]
fn the_classic_sidecar_hook_holds_the_app_until_the_tenant_is_served() -> Result<()> {
    let etcd = Etcd::start()?;
    let broker = Broker::start_with_config(
        &[&etcd.url],
        &[("token-l", "late/app")],
        &config(&["team-a"]),
        &["--reload-interval", "1s"],
    )?;
    let pod = Pod::new()?;
    let shim = classic_shim(&format!("http://{}:{}", pod.host_ip, broker.port))?;
    std::fs::write(pod.token_file(), "token-l")?;
    let env: Vec<(String, String)> = shim
        .env
        .iter()
        .flatten()
        .map(|e| {
            let v = e.value.clone().unwrap_or_default();
            let v = if e.name == "ETCD_SHIM_SHIM_TOKEN_FILE" {
                pod.token_file().display().to_string()
            } else {
                v
            };
            (e.name.clone(), v)
        })
        .collect();
    let run = |name: &str, args: &[String]| {
        let mut cmd = pod.command(etcd_shim_e2e::bin("etcd-shim"));
        cmd.args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)));
        etcd_shim_e2e::Proc::spawn(name, cmd, pod.dir.path())
    };
    let mut sidecar = run("classic-shim", &[])?;

    // The postStart hook exactly as injected: it must not return while the broker refuses
    // the tenant, so the kubelet does not start the app container yet.
    let hook = shim
        .lifecycle
        .and_then(|l| l.post_start)
        .and_then(|h| h.exec)
        .and_then(|e| e.command)
        .context("postStart exec hook")?;
    ensure!(hook[0] == "/usr/local/bin/etcd-shim", "{hook:?}");
    let mut waiting = run("post-start", &hook[1..])?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(sidecar.is_running(), "shim exited: {}", sidecar.log());
    ensure!(
        waiting.is_running(),
        "the hook returned while the tenant is refused: {}",
        waiting.log()
    );

    // Admitted: the hook returns, successfully, within seconds.
    let path = broker.config_path().context("config path")?;
    replace_file(&path, &config(&["team-a", "late"]))?;
    let started = Instant::now();
    wait_for("the hook to return", Duration::from_secs(20), || {
        (!waiting.is_running()).then_some(())
    })?;
    println!("hook returned {:?} after admission", started.elapsed());
    ensure!(
        waiting.exit_code() == Some(0),
        "the hook must succeed, or the kubelet kills the container: {}",
        waiting.log()
    );
    let out = pod.etcdctl_ok(&["put", "/late", "ok"])?;
    ensure!(out.trim() == "OK", "{out}");
    sidecar.stop();
    Ok(())
}
