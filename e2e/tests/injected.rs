//! "The injected spec runs": the shim container the injector adds to a real pod spec,
//! started exactly as written (command, env, probe port, mounts mapped to temporary
//! directories), works through the broker for an etcdctl beside it in the same pod.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use etcd_shim_e2e::{Broker, Etcd, Pod, bin, http_get, pod::in_netns, wait_for};
use etcd_shim_injector::{Decision, InjectConfig, mutate};
use k8s_openapi::api::core::v1::{Container, Pod as K8sPod};

fn fixture(name: &str) -> Result<serde_json::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/admission")
        .join(name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Runs the injector over the fixture's pod and returns the patched pod's shim container.
fn injected_shim(broker_url: &str) -> Result<(Container, K8sPod)> {
    let review = fixture("wardle-apiserver.json")?;
    let mut pod_json = review["request"]["object"].clone();
    let pod: K8sPod = serde_json::from_value(pod_json.clone())?;
    let cfg = InjectConfig {
        broker_url: broker_url.to_owned(),
        ..InjectConfig::default()
    };
    let Decision::Patch(patch) = mutate(&pod, None, &cfg) else {
        bail!("the wardle pod was not injected");
    };
    json_patch::patch(&mut pod_json, &patch)?;
    let patched: K8sPod = serde_json::from_value(pod_json)?;
    let spec = patched.spec.clone().context("spec")?;
    let shim = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == "etcd-shim")
        .cloned()
        .context("no etcd-shim container in the patched pod")?;
    Ok((shim, patched))
}

#[test]
fn the_injected_shim_container_runs_and_serves_etcdctl() -> Result<()> {
    let etcd = Etcd::start()?;
    let broker = Broker::start(&[&etcd.url], &[("wardle-token", "wardle/wardle-apiserver")])?;
    let pod = Pod::new()?;
    let broker_url = format!("http://{}:{}", pod.host_ip, broker.port);
    let (shim, patched) = injected_shim(&broker_url)?;

    // Mounts become directories of the test; the token volume holds the pod's token.
    let root = tempfile::tempdir()?;
    let mut env: Vec<(String, String)> = Vec::new();
    let mounts = shim.volume_mounts.clone().unwrap_or_default();
    let map_path = |value: &str| -> String {
        for m in &mounts {
            if let Some(rest) = value.strip_prefix(&m.mount_path) {
                return format!("{}{rest}", root.path().join(&m.name).display());
            }
        }
        value.to_owned()
    };
    for m in &mounts {
        std::fs::create_dir_all(root.path().join(&m.name))?;
    }
    let token_volume = mounts
        .iter()
        .find(|m| m.mount_path == "/var/run/secrets/etcd-shim")
        .context("token mount")?;
    std::fs::write(
        root.path().join(&token_volume.name).join("token"),
        "wardle-token",
    )?;
    for e in shim.env.iter().flatten() {
        let value = e
            .value
            .clone()
            .with_context(|| format!("env {} has no literal value", e.name))?;
        env.push((e.name.clone(), map_path(&value)));
    }
    // The projected volume really is a service-account token with the broker's audience.
    let volumes = patched
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let token_source = volumes
        .iter()
        .find(|v| v.name == token_volume.name)
        .and_then(|v| v.projected.as_ref())
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s.iter().find_map(|s| s.service_account_token.clone()))
        .context("projected service-account token volume")?;
    assert_eq!(token_source.audience.as_deref(), Some("etcd-shim"));

    // The command: the container's, or the image's entrypoint (the shim binary).
    let mut argv: Vec<String> = shim.command.clone().unwrap_or_default();
    argv.extend(shim.args.clone().unwrap_or_default());
    let mut cmd = pod.command(bin("etcd-shim"));
    if let Some((first, rest)) = argv.split_first() {
        assert!(first.ends_with("etcd-shim"), "unexpected command {argv:?}");
        cmd.args(rest);
    }
    cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    let mut proc = etcd_shim_e2e::Proc::spawn("injected-shim", cmd, root.path())?;

    // The startup/readiness probe the injector wrote, asked the way the kubelet would.
    let probe = shim
        .startup_probe
        .as_ref()
        .or(shim.readiness_probe.as_ref())
        .and_then(|p| p.http_get.clone())
        .context("http probe")?;
    let port = match probe.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => p,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(ref name) => shim
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .context("named probe port")?,
    };
    let path = probe.path.clone().unwrap_or_else(|| "/".into());
    let ns = pod.name.clone();
    wait_for("the injected shim's probe", Duration::from_secs(20), || {
        if !proc.is_running() {
            return Some(Err(anyhow::anyhow!("shim exited: {}", proc.log())));
        }
        let (ns, path) = (ns.clone(), path.clone());
        let res = in_netns(&ns, move || http_get(&format!("127.0.0.1:{port}"), &path)).ok()?;
        matches!(res, Ok((200, _))).then_some(Ok(()))
    })??;

    // The prefix is followed by the tenant's own key, leading "/" included.
    assert_eq!(
        pod.etcdctl_ok(&["put", "/registry/flunders/x", "y"])?
            .trim(),
        "OK"
    );
    assert_eq!(
        pod.etcdctl_ok(&["get", "/registry/flunders/x", "--print-value-only"])?
            .trim(),
        "y"
    );
    let raw = etcd.etcdctl(&[
        "get",
        "/etcd-shim/tenants/wardle/wardle-apiserver//registry/flunders/x",
        "--print-value-only",
    ])?;
    assert_eq!(String::from_utf8(raw.stdout)?.trim(), "y");
    proc.stop();
    Ok(())
}
