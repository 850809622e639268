//! A pod: a network namespace with loopback up and a veth pair to the root namespace.
//!
//! Namespaces are numbered by slots held with file locks, so concurrent test processes
//! never pick the same name or subnet, and a crashed test's slot is reused (its leftover
//! namespace is deleted first).

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{Proc, bin, etcd_tool, http_get, run_bounded, wait_for};

const SLOTS: u32 = 200;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub struct Pod {
    pub name: String,
    /// The root namespace's end of the veth: how the pod reaches the broker.
    pub host_ip: Ipv4Addr,
    pub pod_ip: Ipv4Addr,
    pub dir: tempfile::TempDir,
    shim: Option<Proc>,
    /// Shims started so far, so each one gets its own log file.
    spawn_count: u32,
    _slot: File,
}

impl Pod {
    pub fn new() -> Result<Self> {
        let lock_dir = std::env::temp_dir().join("etcd-shim-e2e-slots");
        std::fs::create_dir_all(&lock_dir)?;
        for slot in 1..=SLOTS {
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(lock_dir.join(format!("{slot}.lock")))?;
            if f.try_lock().is_err() {
                continue;
            }
            return Self::create(slot, f);
        }
        bail!("all {SLOTS} pod slots are taken")
    }

    fn create(slot: u32, lock: File) -> Result<Self> {
        let name = format!("esh{slot}");
        let (host_if, pod_if) = (format!("esh{slot}h"), format!("esh{slot}p"));
        // Leftovers of a test that died holding this slot.
        let _ = ip(&["netns", "del", &name]);
        let _ = ip(&["link", "del", &host_if]);
        let (hi, lo) = ((slot >> 6) as u8, ((slot & 63) << 2) as u8);
        let host_ip = Ipv4Addr::new(10, 213, hi, lo + 1);
        let pod_ip = Ipv4Addr::new(10, 213, hi, lo + 2);
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &pod_if,
        ])?;
        ip(&["link", "set", &pod_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{pod_ip}/30"),
            "dev",
            &pod_if,
        ])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", &pod_if, "up"])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        Ok(Self {
            name,
            host_ip,
            pod_ip,
            dir: tempfile::tempdir()?,
            shim: None,
            spawn_count: 0,
            _slot: lock,
        })
    }

    /// A command that runs inside the pod.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// Starts a shim on the pod's 127.0.0.1:2379 with `token`, and waits until it is
    /// ready (token loaded, broker answering).
    pub fn start_shim(&mut self, broker_port: u16, token: &str) -> Result<()> {
        std::fs::write(self.token_file(), token)?;
        self.start_shim_reading(broker_port, &self.token_file())
    }

    /// Starts a shim like [`Pod::start_shim`] whose token is whatever `token_file` holds,
    /// for tests that lay the file out (and rotate it) as the kubelet does.
    pub fn start_shim_reading(&mut self, broker_port: u16, token_file: &Path) -> Result<()> {
        let broker = format!("http://{}:{broker_port}", self.host_ip);
        self.start_shim_at(
            token_file,
            &["--broker", &broker, "--broker-insecure-plaintext"],
        )
    }

    /// Starts a shim with the given flags (plus listen, admin and token defaults).
    pub fn start_shim_with(&mut self, args: &[&str]) -> Result<()> {
        self.start_shim_at(&self.token_file(), args)
    }

    fn start_shim_at(&mut self, token_file: &Path, args: &[&str]) -> Result<()> {
        self.spawn_shim_at(token_file, args)?;
        self.wait_shim_ready()
    }

    /// Starts a shim like [`Pod::start_shim_with`] without waiting for it to be ready
    /// (for shims that must not become ready). A shim already running is killed first.
    pub fn spawn_shim(&mut self, args: &[&str]) -> Result<()> {
        self.spawn_shim_at(&self.token_file(), args)
    }

    fn spawn_shim_at(&mut self, token_file: &Path, args: &[&str]) -> Result<()> {
        if let Some(mut old) = self.shim.take() {
            old.kill();
        }
        let mut cmd = self.command(bin("etcd-shim"));
        cmd.args([
            "--listen",
            "127.0.0.1:2379",
            "--admin-listen",
            "127.0.0.1:9379",
        ])
        .arg("--token-file")
        .arg(token_file)
        .args(["--token-reload-interval", "200ms"])
        .args(args)
        .env("RUST_LOG", "info,etcd_shim=debug");
        self.spawn_count += 1;
        let name = format!("shim-{}-{}", self.name, self.spawn_count);
        self.shim = Some(Proc::spawn(&name, cmd, self.dir.path())?);
        Ok(())
    }

    /// Waits until the shim answers /ready with 200 (token loaded, broker answering).
    pub fn wait_shim_ready(&mut self) -> Result<()> {
        let ns = self.name.clone();
        let proc = self.shim.as_mut().context("no shim started")?;
        wait_for("shim to be ready", Duration::from_secs(20), || {
            if !proc.is_running() {
                return Some(Err(anyhow::anyhow!("shim exited: {}", proc.log())));
            }
            let ready = in_netns(&ns, || http_get("127.0.0.1:9379", "/ready")).ok()?;
            matches!(ready, Ok((200, _))).then_some(Ok(()))
        })?
    }

    /// Starts a shim with a token the broker refuses, and waits until it says so: it stays
    /// unready, with the reason in `/ready`, which this returns.
    pub fn start_refused_shim(&mut self, broker_port: u16, token: &str) -> Result<String> {
        std::fs::write(self.token_file(), token)?;
        let broker = format!("http://{}:{broker_port}", self.host_ip);
        self.spawn_shim(&["--broker", &broker, "--broker-insecure-plaintext"])?;
        let (_, why) = wait_for(
            "the shim to report the refused token",
            Duration::from_secs(20),
            || {
                self.shim_readiness()
                    .ok()
                    .filter(|(code, body)| *code == 503 && body.contains("refused the pod's token"))
            },
        )?;
        Ok(why)
    }

    /// The shim's `/ready` answer: status code and body (the failing conditions).
    pub fn shim_readiness(&self) -> Result<(u16, String)> {
        in_netns(&self.name, || http_get("127.0.0.1:9379", "/ready"))?
    }

    pub fn shim(&mut self) -> &mut Proc {
        self.shim.as_mut().expect("shim started")
    }

    /// `etcdctl` inside the pod, against the shim.
    pub fn etcdctl(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.command(etcd_tool("etcdctl"));
        cmd.args(["--endpoints", "http://127.0.0.1:2379"])
            .args(args);
        run_bounded(cmd, Duration::from_secs(30))
    }

    /// `etcdctl` that must succeed; returns its stdout.
    pub fn etcdctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.etcdctl(args)?;
        if !out.status.success() {
            bail!(
                "etcdctl {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// A background `etcdctl` in the pod (watch, lock, elect...).
    pub fn etcdctl_spawn(&self, name: &str, args: &[&str]) -> Result<Proc> {
        let mut cmd = self.command(etcd_tool("etcdctl"));
        cmd.args(["--endpoints", "http://127.0.0.1:2379"])
            .args(args);
        Proc::spawn(name, cmd, self.dir.path())
    }

    /// Runs an async block on a thread inside the pod's network namespace, so every
    /// socket it opens (an etcd-client connection to 127.0.0.1:2379) is the pod's.
    pub fn run<F, Fut, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>>,
        T: Send + 'static,
    {
        let ns = self.name.clone();
        in_netns(&ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(f())
        })?
    }

    /// A connected etcd-client inside the pod.
    pub fn client_url(&self) -> &'static str {
        "http://127.0.0.1:2379"
    }
}

/// Runs `f` on a new thread that has joined network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let fd = File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(mut s) = self.shim.take() {
            s.kill();
        }
        // Deleting the namespace deletes the veth pair with it.
        let _ = ip(&["netns", "del", &self.name]);
    }
}
