//! The processes under test: one etcd, etcd's own grpc-proxy with a namespace, and a
//! broker with one shim in front of it. All on loopback, on free ports.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use etcd_shim_e2e::{Broker, Etcd, Proc, bin, free_port, http_get, wait_for};

/// Token and tenant of the benchmark's shim.
pub const TOKEN: &str = "bench-token";
pub const TENANT: &str = "bench/default";

/// Where a client connects, and which process serves it (none for direct etcd: its
/// memory is not the question).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: &'static str,
    pub url: String,
}

pub const DIRECT: &str = "direct etcd";
pub const PROXY: &str = "etcd grpc-proxy";
pub const SHIM: &str = "etcd-shim";

pub struct Stack {
    pub etcd: Etcd,
    pub proxy: Proc,
    pub proxy_url: String,
    pub broker: Broker,
    pub shim: Proc,
    pub shim_url: String,
    /// Holds the shim's token file and logs.
    _dir: tempfile::TempDir,
}

impl Stack {
    pub fn start() -> Result<Self> {
        let etcd = Etcd::start().context("starting etcd")?;
        let dir = tempfile::tempdir()?;
        let (proxy, proxy_url) = start_proxy(&etcd.url, dir.path())?;
        let broker = Broker::start_with(&[&etcd.url], &[(TOKEN, TENANT)], QUIET)
            .context("starting the broker")?;
        let (shim, shim_url) = start_shim(broker.port, TOKEN, "shim", dir.path())?;
        Ok(Self {
            etcd,
            proxy,
            proxy_url,
            broker,
            shim,
            shim_url,
            _dir: dir,
        })
    }

    /// The three endpoints, in the order they are first measured.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        vec![
            Endpoint {
                name: DIRECT,
                url: self.etcd.url.clone(),
            },
            Endpoint {
                name: PROXY,
                url: self.proxy_url.clone(),
            },
            Endpoint {
                name: SHIM,
                url: self.shim_url.clone(),
            },
        ]
    }

    /// Fails if any process died during the run, so no figure comes from a dead server.
    pub fn check_alive(&mut self) -> Result<()> {
        for (name, p) in [
            ("etcd", &mut self.etcd.proc),
            ("grpc-proxy", &mut self.proxy),
            ("broker", &mut self.broker.proc),
            ("shim", &mut self.shim),
        ] {
            if !p.is_running() {
                bail!("{name} exited during the benchmark: {}", p.log());
            }
        }
        Ok(())
    }
}

/// Logging as in production (warnings only): per-request debug logs would be measured too.
pub const QUIET: &[&str] = &["--log-level", "warn"];

fn start_proxy(etcd_url: &str, dir: &Path) -> Result<(Proc, String)> {
    let port = free_port();
    let mut cmd = etcd_shim_e2e::etcd_command("etcd");
    cmd.args(["grpc-proxy", "start", "--namespace=/tenant/"])
        .arg(format!(
            "--endpoints={}",
            etcd_url.trim_start_matches("http://")
        ))
        .arg(format!("--listen-addr=127.0.0.1:{port}"))
        // Since 3.6 the proxy dials itself at this address, 127.0.0.1:23790 unless told.
        .arg(format!("--advertise-client-url=127.0.0.1:{port}"));
    let mut proc = Proc::spawn("grpc-proxy", cmd, dir)?;
    let addr = format!("127.0.0.1:{port}");
    wait_for("grpc-proxy to serve", Duration::from_secs(20), || {
        if !proc.is_running() {
            return Some(false);
        }
        http_get(&addr, "/health").ok().map(|_| true)
    })?;
    if !proc.is_running() {
        bail!("grpc-proxy exited: {}", proc.log());
    }
    Ok((proc, format!("http://{addr}")))
}

/// A shim on a free loopback port for `broker_port`, presenting `token`; `name` names its
/// token and log files in `dir`.
pub fn start_shim(broker_port: u16, token: &str, name: &str, dir: &Path) -> Result<(Proc, String)> {
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, token)?;
    let (port, admin) = (free_port(), free_port());
    let mut cmd = Command::new(bin("etcd-shim"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        // Plaintext on loopback, as the direct and grpc-proxy endpoints are measured.
        .args(["--broker", &format!("http://127.0.0.1:{broker_port}")])
        .arg("--broker-insecure-plaintext")
        .arg("--token-file")
        .arg(&token_file)
        .args(QUIET);
    let mut proc = Proc::spawn(name, cmd, dir)?;
    if !proc.wait_ready(name, admin)? {
        bail!("shim exited: {}", proc.log());
    }
    Ok((proc, format!("http://127.0.0.1:{port}")))
}
