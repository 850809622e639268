//! The real webhook server on 127.0.0.1:0 with a generated certificate, driven by real TLS
//! clients over HTTP/1.1 and HTTP/2.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Pod;
use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

use etcd_shim_core::shutdown::Shutdown;
use etcd_shim_core::tls::{ReloadOptions, ServerTlsFiles, TlsAcceptorSource};
use etcd_shim_injector::InjectConfig;
use etcd_shim_injector::metrics::Metrics;
use etcd_shim_injector::server::{self, Webhook};

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/admission")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

struct TestServer {
    addr: std::net::SocketAddr,
    client_tls: Arc<rustls::ClientConfig>,
    registry: Arc<Registry>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
    /// Holds the certificate files for the server's lifetime.
    _dir: tempfile::TempDir,
}

impl TestServer {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![
            "localhost".to_string(),
            "etcd-shim-injector.etcd-shim.svc".to_string(),
        ])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
        let cert_path = dir.path().join("tls.crt");
        let key_path = dir.path().join("tls.key");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();

        let shutdown = Shutdown::new();
        let tls = TlsAcceptorSource::start(
            ServerTlsFiles::new(cert_path, key_path),
            ReloadOptions::default(),
            shutdown.token(),
        )
        .unwrap();
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let webhook = Webhook::fixed(InjectConfig::default(), metrics);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(server::serve(listener, tls, webhook, shutdown.clone()));

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_cert.pem().as_bytes()).unwrap())
            .unwrap();
        let client_tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        Self {
            addr,
            client_tls: Arc::new(client_tls),
            registry: Arc::new(registry),
            shutdown,
            task,
            _dir: dir,
        }
    }

    async fn connect(&self, alpn: &[u8]) -> TlsStream<TcpStream> {
        let mut config = (*self.client_tls).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        tls
    }

    /// One request on a fresh HTTP/1.1 connection.
    async fn http1(&self, method: &str, path: &str, body: Vec<u8>) -> (StatusCode, Bytes) {
        let io = TokioIo::new(self.connect(b"http/1.1").await);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    async fn post(&self, body: Vec<u8>) -> (StatusCode, Value) {
        let (status, bytes) = self.http1("POST", "/mutate", body).await;
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {bytes:?}"));
        (status, json)
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

fn decode_patch(response: &Value) -> json_patch::Patch {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch is base64 text"))
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn fixtures_are_answered_over_https() {
    let server = TestServer::start().await;
    for (name, injected) in [
        ("wardle-apiserver.json", true),
        ("busy-apiserver.json", true),
        ("no-automount-dryrun.json", true),
        ("hostnetwork.json", false),
        ("opted-out.json", false),
    ] {
        let request = fixture(name);
        let (status, body) = server.post(serde_json::to_vec(&request).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{name}");
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1", "{name}");
        assert_eq!(body["kind"], "AdmissionReview", "{name}");
        let response = &body["response"];
        assert_eq!(response["uid"], request["request"]["uid"], "{name}");
        assert_eq!(response["allowed"], true, "{name}");
        if injected {
            assert_eq!(response["patchType"], "JSONPatch", "{name}");
            let mut doc = request["request"]["object"].clone();
            json_patch::patch(&mut doc, &decode_patch(response)).unwrap();
            let pod: Pod = serde_json::from_value(doc).unwrap();
            let spec = pod.spec.unwrap();
            let shim = &spec.init_containers.as_ref().unwrap()[0];
            assert_eq!(shim.name, "etcd-shim", "{name}");
            assert_eq!(shim.restart_policy.as_deref(), Some("Always"), "{name}");
            assert!(
                spec.volumes
                    .iter()
                    .flatten()
                    .any(|v| v.name == "etcd-shim-token"),
                "{name}"
            );
        } else {
            assert!(response.get("patch").is_none(), "{name}");
        }
    }
    let metrics = server.metrics();
    for line in [
        r#"etcd_shim_injector_admissions_total{outcome="injected"} 3"#,
        r#"etcd_shim_injector_admissions_total{outcome="skipped"} 2"#,
        r#"etcd_shim_injector_skips_total{reason="host_network"} 1"#,
        r#"etcd_shim_injector_skips_total{reason="opted_out"} 1"#,
        r#"etcd_shim_injector_admissions_total{outcome="invalid"} 0"#,
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    // What a scraper gets from the admin port passes promtool's checks and lints.
    etcd_shim_e2e::promtool_check(&etcd_shim_core::admin::to_prometheus_text(&metrics)).unwrap();
}

#[tokio::test]
async fn bad_and_foreign_requests_always_get_an_answer() {
    let server = TestServer::start().await;

    let (status, body) = server.post(b"{ this is not json".to_vec()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"]["allowed"], false);
    assert_eq!(body["response"]["status"]["code"], 400);
    assert!(
        body["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed")
    );

    let mut deployment = fixture("wardle-apiserver.json");
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    deployment["request"]["resource"] =
        json!({"group": "apps", "version": "v1", "resource": "deployments"});
    deployment["request"]["object"] =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}});
    let (status, body) = server.post(serde_json::to_vec(&deployment).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"]["allowed"], true);
    assert_eq!(body["response"]["uid"], deployment["request"]["uid"]);
    assert!(body["response"].get("patch").is_none());

    let mut update = fixture("wardle-apiserver.json");
    update["request"]["operation"] = json!("UPDATE");
    let (_, body) = server.post(serde_json::to_vec(&update).unwrap()).await;
    assert_eq!(body["response"]["allowed"], true);
    assert!(body["response"].get("patch").is_none());

    let (status, _) = server.http1("GET", "/mutate", Vec::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = server.http1("POST", "/nothing-here", Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let metrics = server.metrics();
    assert!(
        metrics.contains(r#"etcd_shim_injector_admissions_total{outcome="invalid"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"etcd_shim_injector_admissions_total{outcome="ignored"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn huge_body_is_refused_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    // HTTP/2 (what API servers usually negotiate) lets the server answer before reading
    // the whole body without tearing down the connection.
    let io = TokioIo::new(server.connect(b"h2").await);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let huge = vec![b' '; 4 * 1024 * 1024];
    let req = Request::post("https://localhost/mutate")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(huge)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Same connection, normal request: still answered.
    let request = fixture("no-automount-dryrun.json");
    let req = Request::post("https://localhost/mutate")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&request).unwrap(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["response"]["uid"], request["request"]["uid"]);
    assert_eq!(body["response"]["allowed"], true);
    assert_eq!(body["response"]["patchType"], "JSONPatch");
}

#[tokio::test]
async fn dry_run_request_gets_the_patch() {
    let server = TestServer::start().await;
    let request = fixture("no-automount-dryrun.json");
    assert_eq!(request["request"]["dryRun"], true);
    let (status, body) = server.post(serde_json::to_vec(&request).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let mut doc = request["request"]["object"].clone();
    json_patch::patch(&mut doc, &decode_patch(&body["response"])).unwrap();
    assert_eq!(
        doc["metadata"]["annotations"]["etcd-shim.io/status"],
        "injected"
    );
    assert_eq!(doc["spec"]["automountServiceAccountToken"], false);
    assert_eq!(doc["spec"]["volumes"][0]["name"], "etcd-shim-token");
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let server = TestServer::start().await;
    let (status, _) = server
        .post(serde_json::to_vec(&fixture("opted-out.json")).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    server.shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(server.shutdown.drain(Duration::from_secs(5)).await);
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "listener is closed"
    );
}
