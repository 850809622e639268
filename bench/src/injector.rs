//! The injector's admission latency: the real `etcd-shim-injector` binary, serving a
//! certificate made for the run, answers AdmissionReview requests for pod CREATE sent over
//! HTTPS at a constant rate. The load is open loop: each request goes out at a fixed time
//! whether or not earlier ones have been answered (the sender never waits for an answer),
//! so a server that falls behind shows it in the tail instead of slowing the sender down.
//! Latency counts from the moment a request is handed to its connection, which includes
//! any wait for an HTTP/2 stream; how late the sender itself was against its schedule
//! (the 1 ms timer, a busy machine) is reported apart as the schedule lag.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use etcd_shim_e2e::tls::TestCa;
use etcd_shim_e2e::{Proc, bin, free_port};

use crate::stack::QUIET;
use crate::stats::percentile;
use crate::usage;

/// Keep-alive HTTP/2 connections to the webhook, requests spread over them round-robin:
/// as a few API server replicas, each holding one connection to the webhook service.
pub const CONNECTIONS: usize = 4;
/// The longest webhook timeout the API server allows: a later answer is an error.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Stands for the request's uid in the serialized template.
const UID_PLACEHOLDER: &str = "00000000-0000-4000-8000-uidplacehold";

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct InjectorResult {
    /// Requests per second asked for, and for how long.
    pub rate: u32,
    pub duration_secs: f64,
    pub connections: usize,
    pub sent: u64,
    /// Correct answers per second over the run (the time the requests were due, or until
    /// the last answer if that came later).
    pub achieved_per_sec: f64,
    /// Latency of correct answers, from when each request was sent.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// How far behind its schedule the sender sent: p99 and largest. Large values mean
    /// the load generator, not the injector, missed the rate.
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    /// Requests without a correct answer: transport errors, timeouts, a status other than
    /// 200, or a review that is not allowed or carries no JSONPatch.
    pub errors: u64,
    /// The injector's resident memory after start-up, and its high-water mark after the run.
    pub rss_idle_kib: u64,
    pub rss_hwm_kib: u64,
    /// CPU the injector used during the run, in cores (CPU seconds per second).
    pub cpu_cores: f64,
}

/// The injector process, listening on loopback with its own serving certificate.
pub struct Injector {
    proc: Proc,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    /// Holds the certificate files and the log.
    _dir: tempfile::TempDir,
}

impl Injector {
    /// Starts the binary and waits for its `/ready`.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new("etcd-shim-bench CA")?;
        let (cert, key) = ca.issue(&["localhost".into()])?;
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert_path, cert)?;
        std::fs::write(&key_path, key)?;

        let (port, admin) = (free_port(), free_port());
        let mut cmd = Command::new(bin("etcd-shim-injector"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .args(QUIET);
        let mut proc = Proc::spawn("injector", cmd, dir.path())?;
        if !proc.wait_ready("injector", admin)? {
            bail!("injector exited: {}", proc.log());
        }

        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes())?)?;
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            proc,
            addr: ([127, 0, 0, 1], port).into(),
            tls: Arc::new(tls),
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Fails if the injector died, so no figure comes from a dead server.
    pub fn check_alive(&mut self) -> Result<()> {
        if !self.proc.is_running() {
            bail!("injector exited during the benchmark: {}", self.proc.log());
        }
        Ok(())
    }

    /// One TLS connection speaking HTTP/2, as the API server negotiates it.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(ServerName::try_from("localhost")?, tcp)
            .await
            .context("TLS handshake with the injector")?;
        ensure!(
            tls.get_ref().1.alpn_protocol() == Some(b"h2"),
            "the injector did not negotiate HTTP/2"
        );
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

/// Sends `rate` reviews per second for `duration` and summarises the answers.
pub async fn run(injector: &mut Injector, rate: u32, duration: Duration) -> Result<InjectorResult> {
    ensure!(rate > 0, "the injector rate must be at least 1 request/s");
    let pid = injector.pid();
    let rss_idle_kib = usage::rss(pid)?.now_kib;
    let mut senders = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        senders.push(injector.connect().await?);
    }
    let template = serde_json::to_string(&review())?;
    let body = |uid: &str| Bytes::from(template.replacen(UID_PLACEHOLDER, uid, 1));
    // One unmeasured review per connection: whatever the first request on a connection
    // sets up is not the steady state.
    for (i, s) in senders.iter().enumerate() {
        let uid = uid(u64::MAX - i as u64);
        exchange(s.clone(), body(&uid), &uid)
            .await
            .context("warm-up review")?;
    }

    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let total = ((f64::from(rate) * duration.as_secs_f64()).round() as u64).max(1);
    let cpu_before = usage::cpu_seconds(pid)?;
    let start = Instant::now();
    // Burst: a tick that comes late (a busy machine) is made up at once, so the schedule,
    // not the server's pace, decides when requests go out.
    let mut tick = tokio::time::interval_at(start.into(), period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    let mut outcomes = Vec::with_capacity(total as usize);
    let mut lags = Vec::with_capacity(total as usize);
    for i in 0..total {
        tick.tick().await;
        let sent_at = Instant::now();
        lags.push((sent_at - (start + period * i as u32)).as_nanos() as u64);
        let sender = senders[i as usize % senders.len()].clone();
        let uid = uid(i);
        let body = body(&uid);
        tasks.spawn(async move {
            let r = tokio::time::timeout(TIMEOUT, exchange(sender, body, &uid)).await;
            let done = Instant::now();
            let r = r.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {TIMEOUT:?}")));
            (r, done - sent_at, done)
        });
        while let Some(o) = tasks.try_join_next() {
            outcomes.push(o?);
        }
    }
    while let Some(o) = tasks.join_next().await {
        outcomes.push(o?);
    }
    let cpu = usage::cpu_seconds(pid)? - cpu_before;
    let rss_hwm_kib = usage::rss(pid)?.peak_kib;
    injector.check_alive()?;

    let mut nanos = Vec::with_capacity(outcomes.len());
    let mut errors = 0u64;
    let mut first_error = None;
    let mut last = start;
    for (r, latency, done) in outcomes {
        match r {
            Ok(()) => {
                nanos.push(latency.as_nanos() as u64);
                last = last.max(done);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("injector: {errors} of {total} reviews failed; the first: {e:#}");
    }
    nanos.sort_unstable();
    lags.sort_unstable();
    let window = (last - start).max(period * total as u32).as_secs_f64();
    let wall = start.elapsed().as_secs_f64().max(1e-9);
    let ms = |n: u64| n as f64 / 1e6;
    Ok(InjectorResult {
        rate,
        duration_secs: duration.as_secs_f64(),
        connections: CONNECTIONS,
        sent: total,
        achieved_per_sec: nanos.len() as f64 / window,
        p50_ms: ms(percentile(&nanos, 0.50)),
        p99_ms: ms(percentile(&nanos, 0.99)),
        max_ms: ms(nanos.last().copied().unwrap_or(0)),
        lag_p99_ms: ms(percentile(&lags, 0.99)),
        lag_max_ms: ms(lags.last().copied().unwrap_or(0)),
        errors,
        rss_idle_kib,
        rss_hwm_kib,
        cpu_cores: cpu / wall,
    })
}

/// A distinct, UUID-shaped uid per request: the answer must carry it back.
fn uid(i: u64) -> String {
    format!("00000000-0000-4000-8000-{:012x}", i & 0xffff_ffff_ffff)
}

/// One review on one connection, checked as the API server would use it: HTTP 200, the
/// request's uid, allowed, and a JSONPatch to apply.
async fn exchange(mut sender: SendRequest<Full<Bytes>>, body: Bytes, uid: &str) -> Result<()> {
    sender.ready().await?;
    // The API server appends its timeout to the configured path.
    let req = Request::post("https://localhost/mutate?timeout=10s")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json")
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    ensure!(
        status == StatusCode::OK,
        "HTTP {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    let review: Value = serde_json::from_slice(&bytes).context("the answer is not JSON")?;
    let r = &review["response"];
    ensure!(r["uid"] == uid, "answer for uid {} to {uid}", r["uid"]);
    ensure!(r["allowed"] == true, "not allowed: {}", r["status"]);
    ensure!(
        r["patchType"] == "JSONPatch" && r["patch"].as_str().is_some_and(|p| !p.is_empty()),
        "no JSONPatch in {r}"
    );
    Ok(())
}

/// An AdmissionReview for a pod CREATE as the API server sends it when a ReplicaSet
/// (from a Deployment) makes a pod: generateName, no name yet, an application container
/// and a metrics sidecar, the service account token volume the admission chain has added.
/// The namespace is one the webhook's namespaceSelector lets through (labelled
/// `etcd-shim.io/inject=enabled`); the review itself carries no namespace labels.
fn review() -> Value {
    let (ns, rs) = ("payments", "ledger-api-5f7c9d8b6d");
    let probe = |path: &str, port: u16| {
        json!({
            "httpGet": {"path": path, "port": port, "scheme": "HTTPS"},
            "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3
        })
    };
    let token_mount = json!({
        "name": "kube-api-access-m4t9z",
        "readOnly": true,
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"
    });
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": format!("{rs}-"),
            "namespace": ns,
            "labels": {"app.kubernetes.io/name": "ledger-api", "pod-template-hash": "5f7c9d8b6d"},
            "annotations": {"kubectl.kubernetes.io/default-container": "api"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                "uid": "9a4e1c7b-3d2f-4e8a-b5c6-0f1e2d3c4b5a",
                "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "serviceAccountName": "ledger-api",
            "serviceAccount": "ledger-api",
            "containers": [
                {
                    "name": "api",
                    "image": "registry.example/ledger-apiserver:v2.4.1",
                    "imagePullPolicy": "IfNotPresent",
                    "args": [
                        "--etcd-servers=http://127.0.0.1:2379",
                        "--etcd-prefix=/registry/ledger.example.com",
                        "--secure-port=8443",
                        "--cert-dir=/var/run/apiserver/certs"
                    ],
                    "ports": [{"name": "https", "containerPort": 8443, "protocol": "TCP"}],
                    "resources": {
                        "requests": {"cpu": "200m", "memory": "256Mi"},
                        "limits": {"memory": "512Mi"}
                    },
                    "readinessProbe": probe("/readyz", 8443),
                    "livenessProbe": probe("/livez", 8443),
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "volumeMounts": [token_mount.clone()]
                },
                {
                    "name": "metrics-exporter",
                    "image": "registry.example/metrics-exporter:v0.9.0",
                    "imagePullPolicy": "IfNotPresent",
                    "args": ["--listen=:9102", "--scrape=https://127.0.0.1:8443/metrics"],
                    "ports": [{"name": "metrics", "containerPort": 9102, "protocol": "TCP"}],
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "volumeMounts": [token_mount]
                }
            ],
            "volumes": [{
                "name": "kube-api-access-m4t9z",
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        {"downwardAPI": {"items": [{
                            "path": "namespace",
                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}
                        }]}}
                    ]
                }
            }],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "securityContext": {"runAsNonRoot": true},
            "terminationGracePeriodSeconds": 30,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ]
        },
        "status": {}
    });
    let gvk = json!({"group": "", "version": "v1", "kind": "Pod"});
    let gvr = json!({"group": "", "version": "v1", "resource": "pods"});
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": UID_PLACEHOLDER,
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "namespace": ns,
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "4d3c2b1a-0f9e-4d8c-a7b6-5e4d3c2b1a09",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_distinct_and_uuid_shaped() {
        let (a, b) = (uid(0), uid(1));
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(
            a.split('-').map(str::len).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert_eq!(UID_PLACEHOLDER.len(), 36);
    }

    #[test]
    fn the_template_holds_the_placeholder_once() {
        let text = serde_json::to_string(&review()).unwrap();
        assert_eq!(text.matches(UID_PLACEHOLDER).count(), 1);
        let v: Value = serde_json::from_str(&text.replacen(UID_PLACEHOLDER, &uid(7), 1)).unwrap();
        assert_eq!(v["request"]["uid"], uid(7));
        assert_eq!(
            v["request"]["object"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
