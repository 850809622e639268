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
    /// The processes between the client and etcd, client side first: what each costs
    /// per request is measured.
    pub serving: Vec<u32>,
}

pub const DIRECT: &str = "direct etcd";
pub const PROXY: &str = "etcd grpc-proxy";
pub const SHIM: &str = "etcd-shim";
/// The floors: hops that only relay (`etcd-shim-bench-relay`), what any proxy of that
/// shape costs at least. etcd-shim today is two HTTP/2 hops (shim, broker).
pub const TCP_RELAY: &str = "floor: TCP relay";
pub const H2_RELAY: &str = "floor: HTTP/2 relay";
pub const TCP_H2_RELAYS: &str = "floor: TCP + HTTP/2 relays";
pub const TWO_H2_RELAYS: &str = "floor: 2 HTTP/2 relays";
/// The endpoints that are floors, in the order they are listed.
pub const FLOORS: [&str; 4] = [TCP_RELAY, H2_RELAY, TCP_H2_RELAYS, TWO_H2_RELAYS];

pub struct Stack {
    pub etcd: Etcd,
    pub proxy: Proc,
    pub proxy_url: String,
    pub broker: Broker,
    pub shim: Proc,
    pub shim_url: String,
    /// The floors, each a chain of relays in front of etcd, client side first.
    pub floors: Vec<(&'static str, Vec<Relay>)>,
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
        let etcd_addr = etcd.url.trim_start_matches("http://").to_owned();
        let mut floors = Vec::new();
        for (f, (name, modes)) in [
            (TCP_RELAY, &["tcp"][..]),
            (H2_RELAY, &["h2"]),
            (TCP_H2_RELAYS, &["tcp", "h2"]),
            (TWO_H2_RELAYS, &["h2", "h2"]),
        ]
        .into_iter()
        .enumerate()
        {
            // Started etcd side first, so each relay has its upstream.
            let mut chain = Vec::new();
            let mut upstream = etcd_addr.clone();
            for (i, mode) in modes.iter().enumerate().rev() {
                let relay = Relay::start(
                    mode,
                    &upstream,
                    &format!("floor-{f}-relay-{i}-{mode}"),
                    dir.path(),
                )
                .with_context(|| format!("starting the {mode} relay of {name}"))?;
                upstream = relay.addr.clone();
                chain.insert(0, relay);
            }
            floors.push((name, chain));
        }
        Ok(Self {
            etcd,
            proxy,
            proxy_url,
            broker,
            shim,
            shim_url,
            floors,
            _dir: dir,
        })
    }

    /// Every endpoint, in the order they are first measured.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut endpoints = vec![
            Endpoint {
                name: DIRECT,
                url: self.etcd.url.clone(),
                serving: vec![],
            },
            Endpoint {
                name: PROXY,
                url: self.proxy_url.clone(),
                serving: vec![self.proxy.pid()],
            },
            Endpoint {
                name: SHIM,
                url: self.shim_url.clone(),
                serving: vec![self.shim.pid(), self.broker.proc.pid()],
            },
        ];
        for (name, chain) in &self.floors {
            endpoints.push(Endpoint {
                name,
                url: format!("http://{}", chain[0].addr),
                serving: chain.iter().map(|r| r.proc.pid()).collect(),
            });
        }
        endpoints
    }

    /// Fails if any process died during the run, so no figure comes from a dead server.
    pub fn check_alive(&mut self) -> Result<()> {
        for (name, p) in [
            ("etcd", &mut self.etcd.proc),
            ("grpc-proxy", &mut self.proxy),
            ("broker", &mut self.broker.proc),
            ("shim", &mut self.shim),
        ]
        .into_iter()
        .chain(
            self.floors
                .iter_mut()
                .flat_map(|(_, chain)| chain.iter_mut().map(|r| ("relay", &mut r.proc))),
        ) {
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

/// One `etcd-shim-bench-relay` process: `tcp` or `h2` from a free loopback port to
/// `upstream`.
pub struct Relay {
    pub proc: Proc,
    pub addr: String,
}

impl Relay {
    fn start(mode: &str, upstream: &str, name: &str, dir: &Path) -> Result<Self> {
        let addr = format!("127.0.0.1:{}", free_port());
        let exe = std::env::current_exe()?.with_file_name("etcd-shim-bench-relay");
        let mut cmd = Command::new(&exe);
        cmd.args([mode, &addr, upstream]);
        let mut proc =
            Proc::spawn(name, cmd, dir).with_context(|| format!("running {}", exe.display()))?;
        wait_for("the relay to listen", Duration::from_secs(10), || {
            if !proc.is_running() {
                return Some(false);
            }
            std::net::TcpStream::connect(&addr).ok().map(|_| true)
        })?;
        if !proc.is_running() {
            bail!("relay exited: {}", proc.log());
        }
        Ok(Self { proc, addr })
    }
}
