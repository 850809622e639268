//! Harness for the end-to-end tests: real etcd, broker and shim processes; a pod is a
//! network namespace whose loopback the shim and its client share, with a veth pair to
//! reach the broker outside.
//!
//! Every process gets its own ports or namespace, so tests run in parallel. Waits are
//! bounded polls, never fixed sleeps.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Directory of the workspace's binaries: tests live in `target/<profile>/deps`, other
/// binaries (the benchmark) beside the ones they start, in `target/<profile>`.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("ETCD_SHIM_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable's directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary, with a clear message when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace binaries first (`cargo build --bins`; scripts/test does)",
        p.display()
    );
    p
}

/// The etcd release under test: `ETCD_SHIM_TEST_ETCD` (`3.5`, `3.6` or `3.7`; default
/// `3.6`), as `scripts/etcd` builds it from the Go module proxy.
pub fn etcd_version() -> String {
    std::env::var("ETCD_SHIM_TEST_ETCD").unwrap_or_else(|_| "3.6".into())
}

/// `etcd` or `etcdctl` of the release under test, from `.tools/etcd/<minor>/` in the
/// workspace (or `ETCD_SHIM_TEST_ETCD_DIR`), with a clear message when it was not built.
/// Every test takes its etcd from here, so one variable switches the whole suite.
pub fn etcd_tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("ETCD_SHIM_TEST_ETCD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../.tools/etcd")
                .join(etcd_version())
        });
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build it with `scripts/etcd dir {}` (scripts/setup does)",
        p.display(),
        etcd_version()
    );
    p
}

/// A command running `etcd` or `etcdctl` of the release under test.
pub fn etcd_command(name: &str) -> Command {
    Command::new(etcd_tool(name))
}

/// A port that was free a moment ago. Processes that cannot take a port as 0 need one.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Polls `f` until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// A child process killed when dropped; its output goes to a log file that is printed
/// when a test fails.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// The exit code once the process has exited (`None` while it runs or if a signal
    /// ended it).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to 20 s for `/ready` on the admin port to answer 200: `Ok(true)` then,
    /// `Ok(false)` if the process exited first.
    pub fn wait_ready(&mut self, what: &str, admin_port: u16) -> Result<bool> {
        wait_for(
            &format!("{what} to be ready"),
            Duration::from_secs(20),
            || {
                if !self.is_running() {
                    return Some(false);
                }
                http_get(&format!("127.0.0.1:{admin_port}"), "/ready")
                    .ok()
                    .filter(|(code, _)| *code == 200)
                    .map(|_| true)
            },
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for exit (bounded), then SIGKILL.
    pub fn stop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("----- last lines of {} -----", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A temporary directory for etcd's data, in memory where the machine has a tmpfs: the
/// tests are about what etcd answers, not its durability, and fsync on a busy disk can take
/// seconds, long enough for etcd to answer "request timed out".
fn data_dir() -> Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return Ok(dir);
    }
    Ok(tempfile::tempdir()?)
}

/// The flags of one etcd member serving `url` to clients and `peer_url` to `cluster`.
fn member_args(name: &str, data: &str, url: &str, peer_url: &str, cluster: &str) -> Vec<String> {
    [
        "--name",
        name,
        "--data-dir",
        data,
        "--listen-client-urls",
        url,
        "--advertise-client-urls",
        url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        cluster,
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
    ]
    .map(String::from)
    .to_vec()
}

/// A single-member etcd on loopback with its data in a temporary directory.
pub struct Etcd {
    pub url: String,
    pub proc: Proc,
    /// The exact command, to start it again on the same ports and data.
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// Starts etcd with extra flags; retries with new ports if one was taken meanwhile.
    pub fn start_with(extra: &[&str]) -> Result<Self> {
        let mut last = None;
        for _ in 0..5 {
            let dir = data_dir()?;
            let (client, peer) = (free_port(), free_port());
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let data = dir.path().join("data").display().to_string();
            let cluster = format!("e2e={peer_url}");
            let mut args = member_args("e2e", &data, &url, &peer_url, &cluster);
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut cmd = etcd_command("etcd");
            cmd.args(&args);
            let mut proc = Proc::spawn("etcd", cmd, dir.path())?;
            let ok = wait_for("etcd to serve", Duration::from_secs(20), || {
                if !proc.is_running() {
                    return Some(false);
                }
                http_get(&format!("127.0.0.1:{client}"), "/health")
                    .ok()
                    .filter(|(code, body)| *code == 200 && body.contains("true"))
                    .map(|_| true)
            });
            match ok {
                Ok(true) => {
                    return Ok(Self {
                        url,
                        proc,
                        args,
                        dir,
                    });
                }
                Ok(false) => last = Some(anyhow!("etcd exited early: {}", proc.log())),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("etcd did not start")))
    }

    /// Stops etcd (SIGTERM, as an operator would).
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Starts etcd again on the same ports and data, and waits until it serves.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.stop();
        let mut cmd = etcd_command("etcd");
        cmd.args(&self.args);
        self.proc = Proc::spawn("etcd-restarted", cmd, self.dir.path())?;
        let addr = self.url.trim_start_matches("http://").to_owned();
        wait_for("etcd to serve again", Duration::from_secs(20), || {
            http_get(&addr, "/health")
                .ok()
                .filter(|(c, b)| *c == 200 && b.contains("true"))
        })?;
        Ok(())
    }

    /// etcdctl against etcd itself (the cluster admin's view).
    pub fn etcdctl(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = etcd_command("etcdctl");
        cmd.args(["--endpoints", &self.url]).args(args);
        run_bounded(cmd, Duration::from_secs(30))
    }
}

/// The lease ID secret of every broker the harness starts, unless a test passes its own.
pub const LEASE_ID_SECRET: &str = "etcd-shim e2e lease id secret";

/// The broker in the root namespace, on every address so pods reach it over their veth.
pub struct Broker {
    pub port: u16,
    pub admin_port: u16,
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    /// Holds the config file of [`Broker::start_with_config`] while the broker runs.
    pub config_dir: Option<tempfile::TempDir>,
}

impl Broker {
    /// Starts a broker for `etcd` that knows `tokens` as `(token, "<ns>/<sa>")`.
    pub fn start(etcd_urls: &[&str], tokens: &[(&str, &str)]) -> Result<Self> {
        Self::start_with(etcd_urls, tokens, &[])
    }

    pub fn start_with(etcd_urls: &[&str], tokens: &[(&str, &str)], extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let tokens_file = dir.path().join("tokens");
        let mut f = File::create(&tokens_file)?;
        for (t, who) in tokens {
            writeln!(f, "{t} {who}")?;
        }
        // One secret for every broker of a test, as the chart's Secret gives the replicas;
        // a test that wants another passes --lease-id-secret-file, which wins over this.
        let secret = dir.path().join("lease-id-secret");
        std::fs::write(&secret, format!("{LEASE_ID_SECRET}\n"))?;
        let mut last = None;
        for _ in 0..5 {
            let (port, admin_port) = (free_port(), free_port());
            let mut cmd = Command::new(bin("etcd-shim-broker"));
            cmd.env("ETCD_SHIM_BROKER_LEASE_ID_SECRET_FILE", &secret);
            cmd.args(["--listen", &format!("0.0.0.0:{port}")])
                .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
                .args(["--etcd-endpoints", &etcd_urls.join(",")])
                .arg("--static-tokens-file")
                .arg(&tokens_file)
                .args(extra)
                .env("RUST_LOG", "info,etcd_shim_broker=debug");
            let mut proc = Proc::spawn("broker", cmd, dir.path())?;
            match proc.wait_ready("broker", admin_port) {
                Ok(true) => {
                    return Ok(Self {
                        port,
                        admin_port,
                        proc,
                        dir,
                        config_dir: None,
                    });
                }
                Ok(false) => last = Some(anyhow!("broker exited: {}", proc.log())),
                Err(e) => last = Some(anyhow!("{e}: {}", proc.log())),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("broker did not start")))
    }

    /// Starts a broker that loads `config` (YAML) from a file with `--config`, as a
    /// mounted ConfigMap would be, plus any `extra` flags.
    pub fn start_with_config(
        etcd_urls: &[&str],
        tokens: &[(&str, &str)],
        config: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let config_dir = tempfile::tempdir()?;
        let path = config_dir.path().join("broker.yaml");
        std::fs::write(&path, config)?;
        let path = path.display().to_string();
        let mut args = vec!["--config", path.as_str()];
        args.extend_from_slice(extra);
        let mut broker = Self::start_with(etcd_urls, tokens, &args)?;
        broker.config_dir = Some(config_dir);
        Ok(broker)
    }

    /// The config file of [`Broker::start_with_config`].
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config_dir
            .as_ref()
            .map(|d| d.path().join("broker.yaml"))
    }

    pub fn metrics(&self) -> Result<String> {
        let (code, body) = http_get(&format!("127.0.0.1:{}", self.admin_port), "/metrics")?;
        if code != 200 {
            bail!("metrics: HTTP {code}");
        }
        Ok(body)
    }
}

/// Replaces `path` by a rename, as an editor or a ConfigMap update does: a reader sees
/// the old content or the new, never half of it.
pub fn replace_file(path: &Path, content: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Runs a command with a deadline, killing it if it overruns.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let dir = tempfile::tempdir()?;
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: std::fs::read(&out_path)?,
        stderr: std::fs::read(&err_path)?,
    })
}

/// A minimal HTTP/1.0 GET, enough for health and metrics endpoints.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

pub mod pod;
pub use pod::Pod;
pub mod tls;

/// `promtool` from PATH or from the project's `.tools` (scripts/setup puts it there).
pub fn promtool() -> PathBuf {
    let local =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/prometheus/usr/bin/promtool");
    if local.exists() {
        return local;
    }
    PathBuf::from("promtool")
}

/// Runs `promtool check metrics` over a scrape; returns its complaints, if any.
pub fn promtool_check(scrape: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (scripts/setup installs it into .tools)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(scrape.as_bytes())?;
    let out = child.wait_with_output()?;
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !complaints.trim().is_empty() {
        bail!("promtool check metrics: {complaints}");
    }
    Ok(())
}

/// The value of one sample in a Prometheus text scrape (`name{labels}` exactly as printed).
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// Two tenants, each in its own pod with its own shim, one broker, one etcd.
pub struct TwoTenants {
    pub etcd: Etcd,
    pub broker: Broker,
    pub a: Pod,
    pub b: Pod,
}

/// Tenant A's identity and where its keys live in etcd.
pub const TENANT_A: &str = "team-a/app";
pub const PREFIX_A: &str = "/etcd-shim/tenants/team-a/app/";
pub const TENANT_B: &str = "team-b/app";
pub const PREFIX_B: &str = "/etcd-shim/tenants/team-b/app/";

impl TwoTenants {
    pub fn start() -> Result<Self> {
        Self::start_with_config(None)
    }

    /// Like [`TwoTenants::start`], with the broker loading `config` (YAML) if given.
    pub fn start_with_config(config: Option<&str>) -> Result<Self> {
        Self::start_with(config, &[])
    }

    /// Like [`TwoTenants::start_with_config`], with extra broker flags.
    pub fn start_with(config: Option<&str>, broker_args: &[&str]) -> Result<Self> {
        let etcd = Etcd::start()?;
        let tokens = [("token-a", TENANT_A), ("token-b", TENANT_B)];
        let broker = match config {
            Some(c) => Broker::start_with_config(&[&etcd.url], &tokens, c, broker_args)?,
            None => Broker::start_with(&[&etcd.url], &tokens, broker_args)?,
        };
        let mut a = Pod::new()?;
        a.start_shim(broker.port, "token-a")?;
        let mut b = Pod::new()?;
        b.start_shim(broker.port, "token-b")?;
        Ok(Self { etcd, broker, a, b })
    }
}

/// Files an etcd member serves TLS with: its certificate and key, and the CA bundle that
/// client certificates must chain to (`--client-cert-auth`). The files are read when
/// etcd starts, so a test rewrites them and restarts a member to change what it trusts.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trusted_ca: PathBuf,
}

/// One member of an [`EtcdCluster`].
pub struct EtcdMember {
    pub name: String,
    /// Client URL (`http://` or `https://`).
    pub url: String,
    /// Plain-HTTP address of `/health` and `/metrics`, reachable whatever the TLS setup.
    pub metrics_addr: String,
    /// The exact command, to start the member again on the same ports and data.
    args: Vec<String>,
    pub proc: Option<Proc>,
}

/// An etcd cluster of one or more members on loopback, plaintext or serving TLS with
/// client-certificate authentication; data in a temporary directory.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    tls: Option<EtcdTls>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one is healthy; retries with new
    /// ports if one was taken meanwhile.
    pub fn start(size: usize, tls: Option<EtcdTls>) -> Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(size, tls.clone()) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("etcd cluster did not start")))
    }

    fn try_start(size: usize, tls: Option<EtcdTls>) -> Result<Self> {
        let dir = data_dir()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ports: Vec<(u16, u16, u16)> = (0..size)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer, _))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(size);
        for (i, (client, peer, metrics)) in ports.into_iter().enumerate() {
            let name = format!("m{i}");
            let url = format!("{scheme}://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let metrics_addr = format!("127.0.0.1:{metrics}");
            let data = dir.path().join(&name).display().to_string();
            let mut args = member_args(&name, &data, &url, &peer_url, &initial_cluster);
            args.extend(
                [
                    "--initial-cluster-token",
                    "e2e",
                    "--listen-metrics-urls",
                    &format!("http://{metrics_addr}"),
                ]
                .map(String::from),
            );
            if let Some(t) = &tls {
                args.push("--client-cert-auth".into());
                for (flag, path) in [
                    ("--trusted-ca-file", &t.trusted_ca),
                    ("--cert-file", &t.cert),
                    ("--key-file", &t.key),
                ] {
                    args.push(flag.into());
                    args.push(path.display().to_string());
                }
            }
            members.push(EtcdMember {
                name,
                url,
                metrics_addr,
                args,
                proc: None,
            });
        }
        let mut cluster = Self { members, tls, dir };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        for i in 0..size {
            cluster.wait_healthy(i)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        let mut cmd = etcd_command("etcd");
        cmd.args(&m.args);
        m.proc = Some(Proc::spawn(&m.name, cmd, self.dir.path())?);
        Ok(())
    }

    /// Waits until member `i` reports itself healthy (it has a leader).
    pub fn wait_healthy(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        let addr = m.metrics_addr.clone();
        let proc = m.proc.as_mut().context("member not running")?;
        let healthy = wait_for("etcd member to be healthy", Duration::from_secs(30), || {
            if !proc.is_running() {
                return Some(false);
            }
            http_get(&addr, "/health")
                .ok()
                .filter(|(code, body)| *code == 200 && body.contains("true"))
                .map(|_| true)
        })?;
        if !healthy {
            bail!("etcd {} exited: {}", m.name, proc.log());
        }
        Ok(())
    }

    /// Client URLs of every member.
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.url.clone()).collect()
    }

    /// SIGKILL member `i`, as a crash or a lost node would.
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.members[i].proc.as_mut() {
            p.kill();
        }
    }

    /// Stops member `i` and starts it again on the same ports and data (re-reading its
    /// TLS files), then waits until it is healthy.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        if let Some(p) = self.members[i].proc.as_mut() {
            p.stop();
        }
        self.spawn(i)?;
        self.wait_healthy(i)
    }

    /// etcdctl against the whole cluster directly, with the given client credentials
    /// (`(ca, cert, key)`) when it serves TLS.
    pub fn etcdctl_as(
        &self,
        creds: Option<(&Path, &Path, &Path)>,
        args: &[&str],
    ) -> Result<Output> {
        let mut cmd = etcd_command("etcdctl");
        cmd.args(["--endpoints", &self.urls().join(",")]).args([
            "--dial-timeout",
            "3s",
            "--command-timeout",
            "5s",
        ]);
        if let Some((ca, cert, key)) = creds {
            cmd.arg("--cacert")
                .arg(ca)
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key);
        }
        cmd.args(args);
        run_bounded(cmd, Duration::from_secs(30))
    }

    /// The TLS files the members serve with.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }
}
