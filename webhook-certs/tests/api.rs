//! The reconcile flow against a fake API server behind `kube::Client`'s transport: it keeps
//! one Secret and one MutatingWebhookConfiguration, answers with the objects and `Status`
//! bodies a real API server sends (resourceVersion checks, 404/409/422), applies JSON
//! patches, and records every request so tests can assert exactly what was called.

use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use bytes::Bytes;
use clap::Parser;
use etcd_shim_webhook_certs::certs::{self, Change, Material, Reason};
use etcd_shim_webhook_certs::reconcile::{
    self, Config, Error, MANAGED_BY, MANAGED_BY_LABEL, MAX_ATTEMPTS, Report, SecretWrite,
};
use etcd_shim_webhook_certs::{Args, run_periodic};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

const NS: &str = "etcd-shim";
const SECRET: &str = "etcd-shim-injector-tls";
const WEBHOOK: &str = "etcd-shim-injector";
const SECRETS_PATH: &str = "/api/v1/namespaces/etcd-shim/secrets";
const SECRET_PATH: &str = "/api/v1/namespaces/etcd-shim/secrets/etcd-shim-injector-tls";
const WEBHOOK_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/etcd-shim-injector";
const HOOK_NAMES: [&str; 2] = ["inject.etcd-shim.io", "inject-classic.etcd-shim.io"];
const SERVICE_NAMES: [&str; 4] = [
    "etcd-shim-injector",
    "etcd-shim-injector.etcd-shim",
    "etcd-shim-injector.etcd-shim.svc",
    "etcd-shim-injector.etcd-shim.svc.cluster.local",
];

/// One request as the fake API server saw it, with the status it answered.
#[derive(Clone, Debug)]
struct Call {
    method: Method,
    path: String,
    content_type: Option<String>,
    body: Value,
    code: u16,
}

/// Something that happens once, before the fake answers a matching request.
enum Fault {
    /// Answer with this `Status`.
    Fail { code: u16, status: Value },
    /// Another writer updates the Secret first (its resourceVersion moves on).
    SecretWrittenByOther,
    /// Another writer creates the Secret first, with this material.
    SecretCreatedByOther(Material),
    /// Another writer reorders the webhooks list first.
    WebhooksReordered,
}

#[derive(Default)]
struct State {
    secret: Option<Value>,
    webhook: Option<Value>,
    resource_version: u64,
    calls: Vec<Call>,
    faults: Vec<(Method, &'static str, Fault)>,
    /// Namespaces the label selector matches (the fake does not evaluate selectors).
    namespaces: Vec<Value>,
    /// ConfigMaps by `namespace/name`.
    configmaps: std::collections::BTreeMap<String, Value>,
}

fn status(code: u16, reason: &str, message: &str, details: Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    })
}

fn secret_details() -> Value {
    json!({"name": SECRET, "kind": "secrets"})
}

fn webhook_details() -> Value {
    json!({"name": WEBHOOK, "group": "admissionregistration.k8s.io", "kind": "mutatingwebhookconfigurations"})
}

fn forbidden(verb: &str, resource: &str, name: &str, group: &str, namespaced: bool) -> Value {
    let plural = if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    };
    let scope = if namespaced {
        format!(" in the namespace \"{NS}\"")
    } else {
        " at the cluster scope".to_string()
    };
    status(
        403,
        "Forbidden",
        &format!(
            "{plural} \"{name}\" is forbidden: User \"system:serviceaccount:etcd-shim:etcd-shim-webhook-certs\" \
             cannot {verb} resource \"{resource}\" in API group \"{group}\"{scope}"
        ),
        json!({"name": name, "group": group, "kind": resource}),
    )
}

fn internal_error() -> Value {
    status(
        500,
        "InternalError",
        "Internal error occurred: etcdserver: request timed out",
        json!({"causes": [{"message": "etcdserver: request timed out"}]}),
    )
}

impl State {
    fn next_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    /// Stores `obj` as the API server would: new resourceVersion, uid and creation time on
    /// create, new resourceVersion on update.
    fn persist(&mut self, mut obj: Value, created: bool) -> Value {
        let version = self.next_version();
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("object has metadata");
        meta.insert("resourceVersion".into(), json!(version));
        if created {
            meta.insert(
                "uid".into(),
                json!(format!(
                    "6f1d3c2a-0000-4000-8000-{:012}",
                    self.resource_version
                )),
            );
            meta.insert("creationTimestamp".into(), json!("2025-06-01T10:00:00Z"));
        }
        obj
    }

    fn answer(
        &mut self,
        method: &Method,
        path: &str,
        content_type: Option<&str>,
        body: &Value,
    ) -> (u16, Value) {
        if let Some(i) = self
            .faults
            .iter()
            .position(|(m, p, _)| m == method && *p == path)
        {
            let (_, _, fault) = self.faults.remove(i);
            match fault {
                Fault::Fail { code, status } => return (code, status),
                Fault::SecretWrittenByOther => {
                    let mut other = self.secret.clone().expect("a Secret to write over");
                    other["metadata"]["annotations"] = json!({"touched-by": "someone-else"});
                    self.secret = Some(self.persist(other, false));
                }
                Fault::SecretCreatedByOther(material) => {
                    let obj = secret_json(&material, true);
                    self.secret = Some(self.persist(obj, true));
                }
                Fault::WebhooksReordered => {
                    let hooks = self.webhook.as_mut().expect("a webhook configuration")["webhooks"]
                        .as_array_mut()
                        .expect("webhooks list");
                    hooks.reverse();
                    let obj = self.webhook.take().expect("webhook configuration");
                    self.webhook = Some(self.persist(obj, false));
                }
            }
        }

        let secret_not_found = || {
            (
                404,
                status(
                    404,
                    "NotFound",
                    &format!("secrets \"{SECRET}\" not found"),
                    secret_details(),
                ),
            )
        };
        if let Some(answer) = self.answer_configmaps(method, path, body) {
            return answer;
        }
        match (method.clone(), path) {
            (Method::GET, SECRET_PATH) => match &self.secret {
                Some(obj) => (200, obj.clone()),
                None => secret_not_found(),
            },
            (Method::POST, SECRETS_PATH) => {
                if self.secret.is_some() {
                    return (
                        409,
                        status(
                            409,
                            "AlreadyExists",
                            &format!("secrets \"{SECRET}\" already exists"),
                            secret_details(),
                        ),
                    );
                }
                let stored = self.persist(body.clone(), true);
                self.secret = Some(stored.clone());
                (201, stored)
            }
            (Method::PUT, SECRET_PATH) => {
                let Some(current) = &self.secret else {
                    return secret_not_found();
                };
                if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return (
                        409,
                        status(
                            409,
                            "Conflict",
                            &format!(
                                "Operation cannot be fulfilled on secrets \"{SECRET}\": the object has been \
                                 modified; please apply your changes to the latest version and try again"
                            ),
                            secret_details(),
                        ),
                    );
                }
                let mut obj = body.clone();
                obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
                obj["metadata"]["creationTimestamp"] =
                    current["metadata"]["creationTimestamp"].clone();
                let stored = self.persist(obj, false);
                self.secret = Some(stored.clone());
                (200, stored)
            }
            (Method::GET, WEBHOOK_PATH) => match &self.webhook {
                Some(obj) => (200, obj.clone()),
                None => (
                    404,
                    status(
                        404,
                        "NotFound",
                        &format!(
                            "mutatingwebhookconfigurations.admissionregistration.k8s.io \"{WEBHOOK}\" not found"
                        ),
                        webhook_details(),
                    ),
                ),
            },
            (Method::PATCH, WEBHOOK_PATH)
                if content_type == Some("application/json-patch+json") =>
            {
                let Some(current) = &self.webhook else {
                    return (404, status(404, "NotFound", "not found", webhook_details()));
                };
                let patch: json_patch::Patch =
                    serde_json::from_value(body.clone()).expect("request body is a JSON patch");
                let mut doc = current.clone();
                match json_patch::patch(&mut doc, &patch) {
                    Ok(()) => {
                        let stored = self.persist(doc, false);
                        self.webhook = Some(stored.clone());
                        (200, stored)
                    }
                    Err(e) => (
                        422,
                        status(
                            422,
                            "Invalid",
                            &format!(
                                "the server rejected our request due to an error in our request ({e})"
                            ),
                            json!({}),
                        ),
                    ),
                }
            }
            _ => (
                405,
                status(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                    json!({}),
                ),
            ),
        }
    }
}

impl State {
    /// Namespaces and ConfigMaps, for the CA bundle copies; `None` for other paths.
    fn answer_configmaps(
        &mut self,
        method: &Method,
        path: &str,
        body: &Value,
    ) -> Option<(u16, Value)> {
        if path == "/api/v1/namespaces" && method == Method::GET {
            return Some((
                200,
                json!({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {}, "items": self.namespaces}),
            ));
        }
        let rest = path.strip_prefix("/api/v1/namespaces/")?;
        let (ns, rest) = rest.split_once('/')?;
        let rest = rest.strip_prefix("configmaps")?;
        let not_found = |name: &str| {
            (
                404,
                status(
                    404,
                    "NotFound",
                    &format!("configmaps \"{name}\" not found"),
                    json!({"name": name, "kind": "configmaps"}),
                ),
            )
        };
        Some(match (method.clone(), rest.strip_prefix('/')) {
            (Method::GET, Some(name)) => match self.configmaps.get(&format!("{ns}/{name}")) {
                Some(cm) => (200, cm.clone()),
                None => not_found(name),
            },
            (Method::POST, None) => {
                let key = format!("{ns}/{}", body["metadata"]["name"].as_str().unwrap());
                let stored = self.persist(body.clone(), true);
                self.configmaps.insert(key, stored.clone());
                (201, stored)
            }
            (Method::PUT, Some(name)) => {
                let key = format!("{ns}/{name}");
                let Some(current) = self.configmaps.get(&key) else {
                    return Some(not_found(name));
                };
                assert_eq!(
                    body["metadata"]["resourceVersion"], current["metadata"]["resourceVersion"],
                    "updates carry the resourceVersion read"
                );
                let stored = self.persist(body.clone(), false);
                self.configmaps.insert(key, stored.clone());
                (200, stored)
            }
            _ => return None,
        })
    }
}

#[derive(Clone, Default)]
struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl FakeApi {
    fn with_webhook() -> Self {
        let api = Self::default();
        {
            let mut state = api.state.lock().unwrap();
            let obj = webhook_json();
            state.webhook = Some(state.persist(obj, true));
        }
        api
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// A client whose every request is answered by this fake.
    fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes: Bytes = body.collect().await.expect("request body").to_bytes();
                let body = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).expect("request body is JSON")
                };
                let content_type = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let path = parts.uri.path().to_string();
                let mut state = state.lock().unwrap();
                let (code, answer) =
                    state.answer(&parts.method, &path, content_type.as_deref(), &body);
                state.calls.push(Call {
                    method: parts.method,
                    path,
                    content_type,
                    body,
                    code,
                });
                let response = Response::builder()
                    .status(code)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap();
                send.send_response(response);
            }
        });
        Client::new(service, "default")
    }

    fn fail_next(&self, method: Method, path: &'static str, code: u16, status: Value) {
        self.state()
            .faults
            .push((method, path, Fault::Fail { code, status }));
    }

    fn before_next(&self, method: Method, path: &'static str, fault: Fault) {
        self.state().faults.push((method, path, fault));
    }

    /// The calls made so far, as `METHOD path`, and forgets them.
    fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().calls)
    }

    fn seed_secret(&self, material: &Material) {
        let mut state = self.state();
        let mut obj = secret_json(material, true);
        obj["metadata"]["annotations"] = json!({"meta.helm.sh/release-name": "etcd-shim"});
        obj["metadata"]["ownerReferences"] = json!([]);
        state.secret = Some(state.persist(obj, true));
    }

    fn secret(&self) -> Option<Secret> {
        self.state()
            .secret
            .clone()
            .map(|v| serde_json::from_value(v).expect("stored Secret decodes"))
    }

    fn material(&self) -> Material {
        let secret = self.secret().expect("a Secret is stored");
        let data = secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        Material::from_data(&data)
    }

    fn set_ca_bundle(&self, index: usize, bundle: Option<&str>) {
        let mut state = self.state();
        let hook = &mut state.webhook.as_mut().unwrap()["webhooks"][index]["clientConfig"];
        match bundle {
            Some(pem) => {
                hook["caBundle"] =
                    serde_json::to_value(ByteString(pem.as_bytes().to_vec())).unwrap()
            }
            None => {
                hook.as_object_mut().unwrap().remove("caBundle");
            }
        }
    }

    /// Each webhook's caBundle, decoded.
    fn ca_bundles(&self) -> Vec<Option<Vec<u8>>> {
        let obj = self.state().webhook.clone().expect("webhook configuration");
        let mwc: MutatingWebhookConfiguration = serde_json::from_value(obj).unwrap();
        mwc.webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|h| h.client_config.ca_bundle.map(|b| b.0))
            .collect()
    }
}

fn secret_json(material: &Material, managed: bool) -> Value {
    let data: serde_json::Map<String, Value> = material
        .to_data()
        .into_iter()
        .map(|(k, v)| (k, serde_json::to_value(ByteString(v)).unwrap()))
        .collect();
    let labels = if managed {
        json!({MANAGED_BY_LABEL: MANAGED_BY})
    } else {
        json!({"app.kubernetes.io/name": "something-else"})
    };
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": NS, "labels": labels},
        "type": "kubernetes.io/tls",
        "data": data,
    })
}

/// The configuration as the Helm chart installs it, before any caBundle is set.
fn webhook_json() -> Value {
    let hook = |name: &str, path: &str| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"namespace": NS, "name": "etcd-shim-injector", "path": path, "port": 443}},
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "namespaceSelector": {"matchLabels": {"etcd-shim.io/inject": "enabled"}},
            "objectSelector": {"matchExpressions": [{"key": "app.kubernetes.io/part-of", "operator": "NotIn", "values": ["etcd-shim"]}]},
            "reinvocationPolicy": "Never",
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "*"}],
            "sideEffects": "None",
            "timeoutSeconds": 10,
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK, "generation": 1, "labels": {"app.kubernetes.io/name": "etcd-shim"}},
        "webhooks": [hook(HOOK_NAMES[0], "/mutate"), hook(HOOK_NAMES[1], "/mutate-classic")],
    })
}

fn config() -> Config {
    Args::try_parse_from(["etcd-shim-webhook-certs", "--namespace", NS])
        .unwrap()
        .config()
}

fn skip_missing_config() -> Config {
    Args::try_parse_from([
        "etcd-shim-webhook-certs",
        "--namespace",
        NS,
        "--skip-missing-webhook",
    ])
    .unwrap()
    .config()
}

/// Certificates as a run at `at` would have written them.
fn material_issued_at(at: OffsetDateTime) -> Material {
    certs::plan(None, &config().policy, at).unwrap().material
}

fn summary(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .map(|c| format!("{} {} {}", c.method, c.path, c.code))
        .collect()
}

fn one_cert(pem_text: &str) -> certs::CertInfo {
    let mut certs = certs::parse_bundle(pem_text.as_bytes()).expect("PEM certificates");
    assert_eq!(certs.len(), 1, "expected one certificate");
    certs.remove(0)
}

fn bundle_ders(pem_text: &[u8]) -> Vec<Vec<u8>> {
    certs::parse_bundle(pem_text)
        .expect("PEM certificates")
        .into_iter()
        .map(|c| c.der)
        .collect()
}

async fn run(api: &FakeApi, config: &Config) -> Result<Report, Error> {
    reconcile::reconcile(api.client(), config).await
}

fn get_get() -> Vec<String> {
    vec![
        format!("GET {SECRET_PATH} 200"),
        format!("GET {WEBHOOK_PATH} 200"),
    ]
}

#[tokio::test]
async fn first_run_creates_the_secret_and_patches_every_webhook() {
    let api = FakeApi::with_webhook();
    let report = run(&api, &config()).await.unwrap();

    let calls = api.take_calls();
    assert_eq!(
        summary(&calls),
        [
            format!("GET {SECRET_PATH} 404"),
            format!("GET {WEBHOOK_PATH} 200"),
            format!("PATCH {WEBHOOK_PATH} 200"),
            format!("POST {SECRETS_PATH} 201"),
        ]
    );
    assert_eq!(report.secret, SecretWrite::Created);
    assert_eq!(report.patched_webhooks, HOOK_NAMES);
    assert_eq!(
        report.changes,
        [
            Change::CaIssued(Reason::Missing),
            Change::ServingIssued(Reason::Missing)
        ]
    );

    // The patch: a JSON patch that checks each webhook's name and sets its caBundle.
    let patch = &calls[2];
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/json-patch+json")
    );
    let ops = patch.body.as_array().unwrap();
    assert_eq!(ops.len(), 4);
    for (i, name) in HOOK_NAMES.iter().enumerate() {
        assert_eq!(
            ops[2 * i],
            json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": name})
        );
        assert_eq!(ops[2 * i + 1]["op"], "add");
        assert_eq!(
            ops[2 * i + 1]["path"],
            format!("/webhooks/{i}/clientConfig/caBundle")
        );
    }
    let patched_bundle: ByteString = serde_json::from_value(ops[1]["value"].clone()).unwrap();

    // The created Secret.
    let created = &calls[3].body;
    assert_eq!(created["metadata"]["name"], SECRET);
    assert_eq!(created["metadata"]["namespace"], NS);
    assert_eq!(created["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
    assert_eq!(created["type"], "kubernetes.io/tls");
    let keys: Vec<&String> = created["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["ca.crt", "ca.key", "tls.crt", "tls.key"]);

    let material = api.material();
    let serving = one_cert(&material.tls_crt);
    assert_eq!(serving.dns_names, SERVICE_NAMES);
    assert!(!serving.is_ca);
    // The CA the API server now trusts is the one in the Secret and signed the serving cert.
    assert_eq!(patched_bundle.0, material.ca_crt.as_bytes());
    let ca = one_cert(std::str::from_utf8(&patched_bundle.0).unwrap());
    assert!(ca.is_ca);
    assert!(certs::signed_by(&serving.der, &ca.der));
    for bundle in api.ca_bundles() {
        assert_eq!(bundle.as_deref(), Some(material.ca_crt.as_bytes()));
    }
}

#[tokio::test]
async fn second_run_only_reads() {
    let api = FakeApi::with_webhook();
    run(&api, &config()).await.unwrap();
    let before = api.material();
    let version = api.secret().unwrap().metadata.resource_version;
    api.take_calls();

    let report = run(&api, &config()).await.unwrap();
    assert!(report.is_unchanged(), "{report:?}");
    assert!(report.changes.is_empty());
    assert_eq!(summary(&api.take_calls()), get_get());
    assert_eq!(api.material(), before);
    assert_eq!(api.secret().unwrap().metadata.resource_version, version);
}

#[tokio::test]
async fn near_expiry_serving_certificate_is_renewed_by_the_same_ca() {
    let now = OffsetDateTime::now_utc();
    // Issued 300 days ago with a 365-day lifetime: 65 days left, less than a third.
    let old = material_issued_at(now - Duration::days(300));
    let api = FakeApi::with_webhook();
    api.seed_secret(&old);
    api.set_ca_bundle(0, Some(&old.ca_crt));
    api.set_ca_bundle(1, Some(&old.ca_crt));
    let version = api.secret().unwrap().metadata.resource_version.unwrap();
    api.take_calls();

    let report = run(&api, &config()).await.unwrap();
    let calls = api.take_calls();
    assert_eq!(
        summary(&calls),
        [get_get(), vec![format!("PUT {SECRET_PATH} 200")]].concat()
    );
    assert!(matches!(
        report.changes.as_slice(),
        [Change::ServingIssued(Reason::RenewalDue { .. })]
    ));
    assert_eq!(report.secret, SecretWrite::Updated);
    assert!(report.patched_webhooks.is_empty());

    // The update carries the version it read, and keeps what other tools put on the Secret.
    let put = &calls[2].body;
    assert_eq!(put["metadata"]["resourceVersion"], version.as_str());
    assert_eq!(
        put["metadata"]["annotations"]["meta.helm.sh/release-name"],
        "etcd-shim"
    );
    assert_eq!(put["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);

    let new = api.material();
    assert_eq!(new.ca_crt, old.ca_crt);
    assert_eq!(new.ca_key, old.ca_key);
    assert_ne!(new.tls_crt, old.tls_crt);
    assert_ne!(new.tls_key, old.tls_key);
    let serving = one_cert(&new.tls_crt);
    assert!(certs::signed_by(&serving.der, &one_cert(&old.ca_crt).der));
    assert_eq!(serving.dns_names, SERVICE_NAMES);
    assert!(serving.not_before <= now && serving.not_after > now + Duration::days(364));
}

#[tokio::test]
async fn ca_rotation_trusts_both_cas_then_drops_the_old_one() {
    let now = OffsetDateTime::now_utc();
    // A 3650-day CA issued 2435 days ago has 1215 days left, less than a third; its serving
    // certificate was renewed three days ago, when the CA was not due yet.
    let issued = material_issued_at(now - Duration::days(2435));
    let old = certs::plan(Some(&issued), &config().policy, now - Duration::days(3))
        .unwrap()
        .material;
    assert_eq!(old.ca_crt, issued.ca_crt);
    let old_ca = one_cert(&old.ca_crt);
    let api = FakeApi::with_webhook();
    api.seed_secret(&old);
    api.set_ca_bundle(0, Some(&old.ca_crt));
    api.set_ca_bundle(1, Some(&old.ca_crt));
    api.take_calls();

    let report = reconcile::reconcile_at(api.client(), &config(), now)
        .await
        .unwrap();
    // The webhook trusts the new CA before the Secret that the injector serves from changes.
    assert_eq!(
        summary(&api.take_calls()),
        [
            get_get(),
            vec![
                format!("PATCH {WEBHOOK_PATH} 200"),
                format!("PUT {SECRET_PATH} 200")
            ]
        ]
        .concat()
    );
    // Only the bundle changes at first: the injector keeps serving the old CA's
    // certificate while every copy of the bundle learns the new CA.
    assert!(matches!(
        report.changes.as_slice(),
        [Change::CaIssued(Reason::RenewalDue { .. })]
    ));
    let rotated = api.material();
    let bundle = bundle_ders(rotated.ca_crt.as_bytes());
    assert_eq!(bundle.len(), 2);
    assert_ne!(bundle[0], old_ca.der);
    assert_eq!(bundle[1], old_ca.der, "the old CA stays trusted");
    assert_eq!(rotated.tls_crt, old.tls_crt);
    assert_ne!(rotated.ca_key, old.ca_key);
    for trusted in api.ca_bundles() {
        assert_eq!(bundle_ders(&trusted.unwrap()), bundle);
    }

    // Half-way through the overlap the serving certificate moves to the new CA; the
    // bundle, already right everywhere, is not touched.
    let report = reconcile::reconcile_at(api.client(), &config(), now + Duration::hours(13))
        .await
        .unwrap();
    assert_eq!(report.changes, [Change::ServingIssued(Reason::NewCa)]);
    assert_eq!(
        summary(&api.take_calls()),
        [get_get(), vec![format!("PUT {SECRET_PATH} 200")]].concat()
    );
    let switched = api.material();
    assert!(certs::signed_by(
        &one_cert(&switched.tls_crt).der,
        &bundle[0]
    ));
    assert_eq!(switched.ca_crt, rotated.ca_crt);

    // Within the overlap nothing else changes.
    reconcile::reconcile_at(api.client(), &config(), now + Duration::hours(23))
        .await
        .unwrap();
    assert_eq!(summary(&api.take_calls()), get_get());

    // After it, the old CA leaves both the Secret and the webhooks.
    let report = reconcile::reconcile_at(api.client(), &config(), now + Duration::hours(25))
        .await
        .unwrap();
    assert_eq!(report.changes, [Change::PreviousCaDropped { count: 1 }]);
    assert_eq!(
        summary(&api.take_calls()),
        [
            get_get(),
            vec![
                format!("PATCH {WEBHOOK_PATH} 200"),
                format!("PUT {SECRET_PATH} 200")
            ]
        ]
        .concat()
    );
    let trimmed = api.material();
    assert_eq!(bundle_ders(trimmed.ca_crt.as_bytes()), [bundle[0].clone()]);
    assert_eq!(trimmed.tls_crt, switched.tls_crt);
    for trusted in api.ca_bundles() {
        assert_eq!(bundle_ders(&trusted.unwrap()), [bundle[0].clone()]);
    }
}

#[tokio::test]
async fn stale_ca_bundle_alone_is_patched() {
    let now = OffsetDateTime::now_utc();
    let current = material_issued_at(now);
    let api = FakeApi::with_webhook();
    api.seed_secret(&current);
    // A chart upgrade re-applied the second webhook without a caBundle.
    api.set_ca_bundle(0, Some(&current.ca_crt));
    api.set_ca_bundle(1, None);
    api.take_calls();

    let report = run(&api, &config()).await.unwrap();
    let calls = api.take_calls();
    assert_eq!(
        summary(&calls),
        [get_get(), vec![format!("PATCH {WEBHOOK_PATH} 200")]].concat()
    );
    assert_eq!(report.secret, SecretWrite::Unchanged);
    assert_eq!(report.patched_webhooks, [HOOK_NAMES[1]]);
    let ops = calls[2].body.as_array().unwrap();
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[0]["path"], "/webhooks/1/name");
    assert_eq!(ops[1]["path"], "/webhooks/1/clientConfig/caBundle");
    assert_eq!(api.material(), current);
}

#[tokio::test]
async fn corrupt_secret_contents_are_regenerated() {
    let now = OffsetDateTime::now_utc();
    let good = material_issued_at(now);
    let api = FakeApi::with_webhook();
    api.seed_secret(&Material {
        ca_key: "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n".into(),
        tls_crt: "garbage".into(),
        ..good
    });
    api.take_calls();

    let report = run(&api, &config()).await.unwrap();
    assert!(matches!(
        report.changes.as_slice(),
        [
            Change::CaIssued(Reason::Unusable(_)),
            Change::ServingIssued(_)
        ]
    ));
    assert_eq!(
        summary(&api.take_calls()),
        [
            get_get(),
            vec![
                format!("PATCH {WEBHOOK_PATH} 200"),
                format!("PUT {SECRET_PATH} 200")
            ]
        ]
        .concat()
    );
    let fixed = api.material();
    let bundle = bundle_ders(fixed.ca_crt.as_bytes());
    assert!(certs::signed_by(&one_cert(&fixed.tls_crt).der, &bundle[0]));
    // And the next run is quiet again.
    run(&api, &config()).await.unwrap();
    assert_eq!(summary(&api.take_calls()), get_get());
}

#[tokio::test]
async fn forbidden_update_names_the_secret_and_the_reason() {
    let old = material_issued_at(OffsetDateTime::now_utc() - Duration::days(300));
    let api = FakeApi::with_webhook();
    api.seed_secret(&old);
    api.set_ca_bundle(0, Some(&old.ca_crt));
    api.set_ca_bundle(1, Some(&old.ca_crt));
    api.fail_next(
        Method::PUT,
        SECRET_PATH,
        403,
        forbidden("update", "secrets", SECRET, "", true),
    );

    let err = run(&api, &config()).await.unwrap_err();
    assert_eq!(err.code(), Some(403));
    assert_eq!(
        err.to_string(),
        "cannot update Secret etcd-shim/etcd-shim-injector-tls: forbidden: secrets \"etcd-shim-injector-tls\" \
         is forbidden: User \"system:serviceaccount:etcd-shim:etcd-shim-webhook-certs\" cannot update \
         resource \"secrets\" in API group \"\" in the namespace \"etcd-shim\""
    );
    assert_eq!(api.material(), old);
}

#[tokio::test]
async fn forbidden_get_of_the_secret_is_reported() {
    let api = FakeApi::with_webhook();
    api.fail_next(
        Method::GET,
        SECRET_PATH,
        403,
        forbidden("get", "secrets", SECRET, "", true),
    );
    let err = run(&api, &config()).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot get Secret etcd-shim/etcd-shim-injector-tls: forbidden: secrets"),
        "{err}"
    );
    assert_eq!(
        summary(&api.take_calls()),
        [format!("GET {SECRET_PATH} 403")]
    );
}

#[tokio::test]
async fn server_error_on_the_webhook_writes_nothing() {
    let api = FakeApi::with_webhook();
    api.fail_next(Method::GET, WEBHOOK_PATH, 500, internal_error());
    let err = run(&api, &config()).await.unwrap_err();
    assert_eq!(err.code(), Some(500));
    assert_eq!(
        err.to_string(),
        "cannot get MutatingWebhookConfiguration etcd-shim-injector: server error: \
         Internal error occurred: etcdserver: request timed out"
    );
    assert_eq!(
        summary(&api.take_calls()),
        [
            format!("GET {SECRET_PATH} 404"),
            format!("GET {WEBHOOK_PATH} 500")
        ]
    );
    assert!(api.secret().is_none());
}

#[tokio::test]
async fn forbidden_patch_leaves_the_secret_unwritten() {
    let api = FakeApi::with_webhook();
    api.fail_next(
        Method::PATCH,
        WEBHOOK_PATH,
        403,
        forbidden(
            "patch",
            "mutatingwebhookconfigurations",
            WEBHOOK,
            "admissionregistration.k8s.io",
            false,
        ),
    );
    let err = run(&api, &config()).await.unwrap_err();
    assert!(
        err.to_string().starts_with(
            "cannot patch MutatingWebhookConfiguration etcd-shim-injector: forbidden: \
             mutatingwebhookconfigurations.admissionregistration.k8s.io \"etcd-shim-injector\" is forbidden"
        ),
        "{err}"
    );
    // No serving certificate exists that the API server would not trust.
    assert!(api.secret().is_none());
}

#[tokio::test]
async fn update_conflict_is_retried_from_a_fresh_read() {
    let old = material_issued_at(OffsetDateTime::now_utc() - Duration::days(300));
    let api = FakeApi::with_webhook();
    api.seed_secret(&old);
    api.set_ca_bundle(0, Some(&old.ca_crt));
    api.set_ca_bundle(1, Some(&old.ca_crt));
    api.before_next(Method::PUT, SECRET_PATH, Fault::SecretWrittenByOther);
    api.take_calls();

    let report = run(&api, &config()).await.unwrap();
    let calls = api.take_calls();
    assert_eq!(
        summary(&calls),
        [
            get_get(),
            vec![format!("PUT {SECRET_PATH} 409")],
            get_get(),
            vec![format!("PUT {SECRET_PATH} 200")],
        ]
        .concat()
    );
    assert_eq!(report.secret, SecretWrite::Updated);
    // The retry was based on the other writer's version and kept its change.
    let secret = api.secret().unwrap();
    assert_eq!(
        secret
            .metadata
            .annotations
            .unwrap()
            .get("touched-by")
            .map(String::as_str),
        Some("someone-else")
    );
    let new = api.material();
    assert!(certs::signed_by(
        &one_cert(&new.tls_crt).der,
        &one_cert(&old.ca_crt).der
    ));
    assert_ne!(new.tls_crt, old.tls_crt);
}

#[tokio::test]
async fn endless_conflicts_give_up() {
    let old = material_issued_at(OffsetDateTime::now_utc() - Duration::days(300));
    let api = FakeApi::with_webhook();
    api.seed_secret(&old);
    api.set_ca_bundle(0, Some(&old.ca_crt));
    api.set_ca_bundle(1, Some(&old.ca_crt));
    for _ in 0..MAX_ATTEMPTS {
        api.before_next(Method::PUT, SECRET_PATH, Fault::SecretWrittenByOther);
    }
    let err = run(&api, &config()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Contention {
                attempts: MAX_ATTEMPTS,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "Secret etcd-shim/etcd-shim-injector-tls kept changing concurrently; gave up after {MAX_ATTEMPTS} attempts"
        )
    );
    let puts = api
        .take_calls()
        .iter()
        .filter(|c| c.method == Method::PUT)
        .count();
    assert_eq!(puts, MAX_ATTEMPTS as usize);
}

#[tokio::test]
async fn concurrent_create_is_adopted_and_trusted() {
    let theirs = material_issued_at(OffsetDateTime::now_utc());
    let api = FakeApi::with_webhook();
    api.before_next(
        Method::POST,
        SECRETS_PATH,
        Fault::SecretCreatedByOther(theirs.clone()),
    );

    let report = run(&api, &config()).await.unwrap();
    assert_eq!(
        summary(&api.take_calls()),
        [
            format!("GET {SECRET_PATH} 404"),
            format!("GET {WEBHOOK_PATH} 200"),
            format!("PATCH {WEBHOOK_PATH} 200"),
            format!("POST {SECRETS_PATH} 409"),
            format!("GET {SECRET_PATH} 200"),
            format!("GET {WEBHOOK_PATH} 200"),
            format!("PATCH {WEBHOOK_PATH} 200"),
        ]
    );
    assert_eq!(report.secret, SecretWrite::Unchanged);
    // The other writer's certificates stay, and the webhooks trust their CA, not ours.
    assert_eq!(api.material(), theirs);
    for trusted in api.ca_bundles() {
        assert_eq!(trusted.as_deref(), Some(theirs.ca_crt.as_bytes()));
    }
}

#[tokio::test]
async fn reordered_webhooks_fail_the_patch_test_and_are_retried() {
    let api = FakeApi::with_webhook();
    api.before_next(Method::PATCH, WEBHOOK_PATH, Fault::WebhooksReordered);
    let report = run(&api, &config()).await.unwrap();
    assert_eq!(
        summary(&api.take_calls()),
        [
            format!("GET {SECRET_PATH} 404"),
            format!("GET {WEBHOOK_PATH} 200"),
            format!("PATCH {WEBHOOK_PATH} 422"),
            format!("GET {SECRET_PATH} 404"),
            format!("GET {WEBHOOK_PATH} 200"),
            format!("PATCH {WEBHOOK_PATH} 200"),
            format!("POST {SECRETS_PATH} 201"),
        ]
    );
    assert_eq!(report.patched_webhooks, [HOOK_NAMES[1], HOOK_NAMES[0]]);
    let material = api.material();
    for trusted in api.ca_bundles() {
        assert_eq!(trusted.as_deref(), Some(material.ca_crt.as_bytes()));
    }
}

#[tokio::test]
async fn missing_webhook_configuration_fails_clearly() {
    let api = FakeApi::default();
    let err = run(&api, &config()).await.unwrap_err();
    assert!(matches!(err, Error::WebhookMissing { .. }));
    let text = err.to_string();
    assert!(
        text.starts_with("MutatingWebhookConfiguration etcd-shim-injector not found"),
        "{text}"
    );
    assert!(text.contains("--skip-missing-webhook"), "{text}");
    assert_eq!(
        summary(&api.take_calls()),
        [
            format!("GET {SECRET_PATH} 404"),
            format!("GET {WEBHOOK_PATH} 404")
        ]
    );
    assert!(api.secret().is_none());
}

#[tokio::test]
async fn missing_webhook_configuration_can_be_skipped() {
    let api = FakeApi::default();
    let report = run(&api, &skip_missing_config()).await.unwrap();
    assert!(report.webhook_missing);
    assert_eq!(report.secret, SecretWrite::Created);
    assert_eq!(
        summary(&api.take_calls()),
        [
            format!("GET {SECRET_PATH} 404"),
            format!("GET {WEBHOOK_PATH} 404"),
            format!("POST {SECRETS_PATH} 201"),
        ]
    );

    // Once the chart has created it, the next run patches it and leaves the Secret alone.
    {
        let mut state = api.state();
        let obj = webhook_json();
        state.webhook = Some(state.persist(obj, true));
    }
    let before = api.material();
    let report = run(&api, &skip_missing_config()).await.unwrap();
    assert_eq!(report.patched_webhooks, HOOK_NAMES);
    assert_eq!(report.secret, SecretWrite::Unchanged);
    assert_eq!(api.material(), before);
    for trusted in api.ca_bundles() {
        assert_eq!(trusted.as_deref(), Some(before.ca_crt.as_bytes()));
    }
}

#[tokio::test]
async fn secret_of_another_owner_is_not_touched() {
    let api = FakeApi::with_webhook();
    {
        let mut state = api.state();
        let obj = secret_json(&Material::default(), false);
        state.secret = Some(state.persist(obj, true));
    }
    api.take_calls();
    let err = run(&api, &config()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Secret etcd-shim/etcd-shim-injector-tls exists without label \
         app.kubernetes.io/managed-by=etcd-shim-webhook-certs; refusing to overwrite it"
    );
    assert_eq!(
        summary(&api.take_calls()),
        [format!("GET {SECRET_PATH} 200")]
    );
}

#[tokio::test(start_paused = true)]
async fn periodic_mode_keeps_going_after_a_failed_pass() {
    let api = FakeApi::with_webhook();
    api.fail_next(Method::GET, SECRET_PATH, 500, internal_error());
    let client = api.client();
    // Passes at 0 h (fails), 1 h (creates everything) and 2 h (reads only); stop at 2.5 h.
    run_periodic(
        client,
        &config(),
        StdDuration::from_secs(3600),
        tokio::time::sleep(StdDuration::from_secs(9000)),
    )
    .await;
    assert_eq!(
        summary(&api.take_calls()),
        [
            vec![format!("GET {SECRET_PATH} 500")],
            vec![
                format!("GET {SECRET_PATH} 404"),
                format!("GET {WEBHOOK_PATH} 200"),
                format!("PATCH {WEBHOOK_PATH} 200"),
                format!("POST {SECRETS_PATH} 201"),
            ],
            get_get(),
        ]
        .concat()
    );
}

#[tokio::test]
async fn ca_bundle_reaches_opted_in_namespaces_before_the_secret() {
    let api = FakeApi::with_webhook();
    {
        let mut state = api.state();
        state.namespaces = vec![
            json!({"metadata": {"name": "team-a", "labels": {"etcd-shim.io/inject": "enabled"}}, "status": {"phase": "Active"}}),
            json!({"metadata": {"name": "team-b", "labels": {"etcd-shim.io/inject": "enabled"}}, "status": {"phase": "Active"}}),
            json!({"metadata": {"name": "going", "labels": {"etcd-shim.io/inject": "enabled"}}, "status": {"phase": "Terminating"}}),
            json!({"metadata": {"name": "theirs", "labels": {"etcd-shim.io/inject": "enabled"}}, "status": {"phase": "Active"}}),
        ];
        let stale = json!({"metadata": {"name": "broker-ca", "namespace": "team-b",
            "labels": {MANAGED_BY_LABEL: MANAGED_BY}}, "data": {"ca.crt": "old"}});
        let stale = state.persist(stale, true);
        state.configmaps.insert("team-b/broker-ca".into(), stale);
        let foreign = json!({"metadata": {"name": "broker-ca", "namespace": "theirs"}, "data": {"ca.crt": "mine"}});
        let foreign = state.persist(foreign, true);
        state.configmaps.insert("theirs/broker-ca".into(), foreign);
    }
    let config = Args::try_parse_from([
        "etcd-shim-webhook-certs",
        "--namespace",
        NS,
        "--ca-configmap",
        "broker-ca",
    ])
    .unwrap()
    .config();
    let report = run(&api, &config).await.unwrap();
    assert_eq!(report.ca_configmaps, ["team-a", "team-b"]);
    let bundle = api.material().ca_crt;
    {
        let state = api.state();
        for ns in ["team-a", "team-b"] {
            assert_eq!(
                state.configmaps[&format!("{ns}/broker-ca")]["data"]["ca.crt"],
                json!(bundle),
                "{ns}"
            );
        }
        assert_eq!(
            state.configmaps["theirs/broker-ca"]["data"]["ca.crt"],
            "mine"
        );
        assert!(!state.configmaps.contains_key("going/broker-ca"));
    }
    // Every copy is written before the Secret the server presents.
    let calls = summary(&api.take_calls());
    let secret_write = calls
        .iter()
        .position(|c| c.starts_with("POST") && c.contains("/secrets"))
        .unwrap();
    let last_copy = calls
        .iter()
        .rposition(|c| c.contains("/configmaps") && !c.starts_with("GET"))
        .unwrap();
    assert!(last_copy < secret_write, "{calls:?}");

    // Nothing due: nothing written.
    let report = run(&api, &config).await.unwrap();
    assert!(report.is_unchanged(), "{report:?}");
    assert!(api.take_calls().iter().all(|c| c.method == Method::GET));
}

#[tokio::test]
async fn without_a_webhook_only_the_secret_is_written() {
    let api = FakeApi::default();
    let config = Args::try_parse_from([
        "etcd-shim-webhook-certs",
        "--namespace",
        NS,
        "--webhook",
        "",
    ])
    .unwrap()
    .config();
    let report = run(&api, &config).await.unwrap();
    assert_eq!(report.secret, SecretWrite::Created);
    assert!(!report.webhook_missing);
    let calls = summary(&api.take_calls());
    assert_eq!(
        calls,
        [
            format!("GET {SECRET_PATH} 404"),
            format!("POST {SECRETS_PATH} 201")
        ]
    );
}
