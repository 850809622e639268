//! The injection over recorded AdmissionReview requests (shared/fixtures/admission): the
//! patch is applied the way the API server applies it, and the resulting pod is checked
//! field by field against the shim contract.

use std::path::PathBuf;

use base64::Engine;
use etcd_shim_injector::review::{Outcome, review};
use etcd_shim_injector::{Decision, InjectConfig, SidecarMode, SkipReason, mutate};
use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use serde_json::{Value, json};

fn fixture(name: &str) -> Value {
    // The repository is checked out next to `shared/`: <dir>/main and <dir>/shared.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/admission")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn pod_json(review: &Value) -> Value {
    review["request"]["object"].clone()
}

fn pod(v: &Value) -> Pod {
    serde_json::from_value(v.clone()).unwrap()
}

fn config() -> InjectConfig {
    InjectConfig {
        image: "registry.example/etcd-shim:1.2.3".to_string(),
        broker_ca_configmap: Some("broker-ca".to_string()),
        ..InjectConfig::default()
    }
}

/// Runs the pure function and applies its patch with a JSON Patch implementation, as the
/// API server would.
fn inject(pod_value: &Value, cfg: &InjectConfig) -> Value {
    let Decision::Patch(patch) = mutate(&pod(pod_value), None, cfg) else {
        panic!("expected a patch");
    };
    let mut doc = pod_value.clone();
    json_patch::patch(&mut doc, &patch).expect("patch applies to the request's pod");
    doc
}

/// The shim container exactly as the contract says, written out independently of the
/// code that builds it.
fn expected_native_shim() -> Container {
    serde_json::from_value(json!({
        "name": "etcd-shim",
        "image": "registry.example/etcd-shim:1.2.3",
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "env": [
            {"name": "ETCD_SHIM_SHIM_LISTEN", "value": "127.0.0.1:2379"},
            {"name": "ETCD_SHIM_SHIM_ADMIN_LISTEN", "value": "0.0.0.0:9379"},
            {"name": "ETCD_SHIM_SHIM_BROKER", "value": "https://etcd-shim-broker.etcd-shim.svc:2379"},
            {"name": "ETCD_SHIM_SHIM_BROKER_CA_FILE", "value": "/var/run/secrets/etcd-shim/ca.crt"},
            {"name": "ETCD_SHIM_SHIM_TOKEN_FILE", "value": "/var/run/secrets/etcd-shim/token"},
            {"name": "ETCD_SHIM_SHIM_LOG_LEVEL", "value": "info"},
            {"name": "ETCD_SHIM_SHIM_LOG_FORMAT", "value": "plain"}
        ],
        "ports": [{"containerPort": 9379, "name": "shim-admin", "protocol": "TCP"}],
        "startupProbe": {
            "httpGet": {"path": "/ready", "port": "shim-admin", "scheme": "HTTP"},
            "periodSeconds": 1, "failureThreshold": 120, "timeoutSeconds": 1
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "shim-admin", "scheme": "HTTP"},
            "periodSeconds": 5, "failureThreshold": 3, "timeoutSeconds": 1
        },
        "livenessProbe": {
            "httpGet": {"path": "/live", "port": "shim-admin", "scheme": "HTTP"},
            "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 1
        },
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"}
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        },
        "volumeMounts": [
            {"name": "etcd-shim-token", "mountPath": "/var/run/secrets/etcd-shim", "readOnly": true}
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError"
    }))
    .unwrap()
}

fn expected_token_volume() -> Volume {
    serde_json::from_value(json!({
        "name": "etcd-shim-token",
        "projected": {"sources": [
            {"serviceAccountToken": {
                "audience": "etcd-shim",
                "expirationSeconds": 3600,
                "path": "token"
            }},
            {"configMap": {
                "name": "broker-ca",
                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                "optional": false
            }}
        ]}
    }))
    .unwrap()
}

fn names<'a>(items: impl IntoIterator<Item = &'a Container>) -> Vec<&'a str> {
    items.into_iter().map(|c| c.name.as_str()).collect()
}

fn volume_names(p: &Pod) -> Vec<&str> {
    p.spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect()
}

fn status_annotation(p: &Pod) -> Option<&str> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("etcd-shim.io/status"))
        .map(String::as_str)
}

#[test]
fn wardle_apiserver_gets_a_native_sidecar() {
    let before = pod_json(&fixture("wardle-apiserver.json"));
    let after = pod(&inject(&before, &config()));
    let original = pod(&before);
    let spec = after.spec.as_ref().unwrap();

    assert_eq!(status_annotation(&after), Some("injected"));
    assert_eq!(
        spec.init_containers.as_deref(),
        Some(&[expected_native_shim()][..])
    );
    // The application container is untouched.
    assert_eq!(spec.containers, original.spec.as_ref().unwrap().containers);
    assert_eq!(
        volume_names(&after),
        ["kube-api-access-x7k2p", "etcd-shim-token"]
    );
    assert_eq!(spec.volumes.as_ref().unwrap()[1], expected_token_volume());
    // Pods from controllers have generateName and no name; both stay as they were.
    assert_eq!(after.metadata.name, None);
    assert_eq!(
        after.metadata.generate_name.as_deref(),
        Some("wardle-server-7d9c6b5f4d-")
    );
}

#[test]
fn busy_apiserver_keeps_its_init_containers_volumes_and_annotations_in_order() {
    let before = pod_json(&fixture("busy-apiserver.json"));
    let original = pod(&before);
    let after = pod(&inject(&before, &config()));
    let spec = after.spec.as_ref().unwrap();
    let original_spec = original.spec.as_ref().unwrap();

    let inits = spec.init_containers.as_ref().unwrap();
    assert_eq!(names(inits), ["etcd-shim", "fix-audit-permissions"]);
    assert_eq!(inits[0], expected_native_shim());
    assert_eq!(inits[1], original_spec.init_containers.as_ref().unwrap()[0]);
    assert_eq!(spec.containers, original_spec.containers);
    assert_eq!(
        volume_names(&after),
        [
            "config",
            "serving-cert",
            "audit-dir",
            "kube-api-access-q9w8e",
            "etcd-shim-token"
        ]
    );
    assert_eq!(
        spec.volumes.as_ref().unwrap()[..4],
        original_spec.volumes.as_ref().unwrap()[..]
    );
    let annotations = after.metadata.annotations.as_ref().unwrap();
    assert_eq!(annotations.len(), 2);
    assert_eq!(
        annotations["kubectl.kubernetes.io/default-container"],
        "apiserver"
    );
    assert_eq!(annotations["etcd-shim.io/status"], "injected");
    // The pod-level securityContext (runAsUser 1001) is not the shim's: it sets its own.
    assert_eq!(spec.security_context, original_spec.security_context);
}

#[test]
fn busy_apiserver_patch_escapes_the_annotation_key() {
    let before = pod_json(&fixture("busy-apiserver.json"));
    let Decision::Patch(patch) = mutate(&pod(&before), None, &config()) else {
        panic!("expected a patch");
    };
    let ops = serde_json::to_value(&patch).unwrap();
    assert_eq!(
        ops[0],
        json!({"op": "add", "path": "/metadata/annotations/etcd-shim.io~1status", "value": "injected"})
    );
    assert_eq!(ops[1]["path"], "/spec/volumes/-");
    assert_eq!(ops[2]["path"], "/spec/initContainers/0");
}

#[test]
fn no_automount_pod_still_gets_the_projected_token() {
    let before = pod_json(&fixture("no-automount-dryrun.json"));
    let after = pod(&inject(&before, &config()));
    let spec = after.spec.as_ref().unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    // The empty volume list is replaced by one holding the token volume.
    assert_eq!(
        spec.volumes.as_deref(),
        Some(&[expected_token_volume()][..])
    );
    assert_eq!(
        spec.init_containers.as_deref(),
        Some(&[expected_native_shim()][..])
    );
    assert_eq!(after.metadata.name.as_deref(), Some("wardle-debug"));
}

#[test]
fn host_network_pod_is_skipped() {
    let p = pod(&pod_json(&fixture("hostnetwork.json")));
    assert_eq!(
        mutate(&p, None, &config()),
        Decision::Skip {
            reason: SkipReason::HostNetwork
        }
    );
}

#[test]
fn opted_out_pod_is_skipped() {
    let p = pod(&pod_json(&fixture("opted-out.json")));
    assert_eq!(
        mutate(&p, None, &config()),
        Decision::Skip {
            reason: SkipReason::OptedOut
        }
    );
}

#[test]
fn a_second_pass_changes_nothing() {
    for name in [
        "wardle-apiserver.json",
        "busy-apiserver.json",
        "no-automount-dryrun.json",
    ] {
        for mode in [SidecarMode::Native, SidecarMode::Classic] {
            let cfg = InjectConfig { mode, ..config() };
            let once = inject(&pod_json(&fixture(name)), &cfg);
            assert_eq!(
                mutate(&pod(&once), None, &cfg),
                Decision::Skip {
                    reason: SkipReason::AlreadyInjected
                },
                "{name} {mode:?}"
            );
        }
    }
}

#[test]
fn classic_mode_puts_the_shim_first_among_containers() {
    let cfg = InjectConfig {
        mode: SidecarMode::Classic,
        ..config()
    };
    let before = pod_json(&fixture("busy-apiserver.json"));
    let original = pod(&before);
    let after = pod(&inject(&before, &cfg));
    let spec = after.spec.as_ref().unwrap();
    assert_eq!(names(&spec.containers), ["etcd-shim", "apiserver"]);
    let mut expected = expected_native_shim();
    expected.restart_policy = None;
    expected.startup_probe = None;
    expected.lifecycle = Some(
        serde_json::from_value(json!({"postStart": {"exec": {"command": [
            "/usr/local/bin/etcd-shim", "wait-ready", "--timeout=120s"
        ]}}}))
        .unwrap(),
    );
    assert_eq!(spec.containers[0], expected);
    assert_eq!(
        after.metadata.annotations.as_ref().unwrap()["kubectl.kubernetes.io/default-container"],
        "apiserver"
    );
    assert_eq!(
        spec.init_containers,
        original.spec.as_ref().unwrap().init_containers
    );
}

fn decode(answer: &[u8]) -> Value {
    serde_json::from_slice(answer).expect("answer is JSON")
}

#[test]
fn reviews_answer_every_fixture() {
    let cases = [
        ("wardle-apiserver.json", Outcome::Injected),
        ("busy-apiserver.json", Outcome::Injected),
        ("no-automount-dryrun.json", Outcome::Injected),
        (
            "hostnetwork.json",
            Outcome::Skipped(SkipReason::HostNetwork),
        ),
        ("opted-out.json", Outcome::Skipped(SkipReason::OptedOut)),
    ];
    for (name, expected) in cases {
        let request = fixture(name);
        let answer = review(&serde_json::to_vec(&request).unwrap(), &config());
        assert_eq!(answer.outcome, expected, "{name}");
        let body = decode(&answer.body);
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1", "{name}");
        assert_eq!(body["kind"], "AdmissionReview", "{name}");
        let response = &body["response"];
        assert_eq!(response["uid"], request["request"]["uid"], "{name}");
        assert_eq!(response["allowed"], true, "{name}");
        if expected == Outcome::Injected {
            assert_eq!(response["patchType"], "JSONPatch", "{name}");
            let patch_bytes = base64::engine::general_purpose::STANDARD
                .decode(
                    response["patch"]
                        .as_str()
                        .expect("patch is a base64 string"),
                )
                .unwrap();
            let patch: json_patch::Patch = serde_json::from_slice(&patch_bytes).unwrap();
            let mut doc = pod_json(&request);
            json_patch::patch(&mut doc, &patch).unwrap();
            assert_eq!(status_annotation(&pod(&doc)), Some("injected"), "{name}");
        } else {
            assert!(response.get("patch").is_none(), "{name}");
            assert!(response.get("patchType").is_none(), "{name}");
        }
    }
}

#[test]
fn host_network_skip_warns_the_creator() {
    let answer = review(
        &serde_json::to_vec(&fixture("hostnetwork.json")).unwrap(),
        &config(),
    );
    let warnings = &decode(&answer.body)["response"]["warnings"];
    assert!(
        warnings[0].as_str().unwrap().contains("hostNetwork"),
        "{warnings}"
    );
}

#[test]
fn dry_run_request_is_patched_like_any_other() {
    let request = fixture("no-automount-dryrun.json");
    assert_eq!(request["request"]["dryRun"], true);
    let mut real = request.clone();
    real["request"]["dryRun"] = json!(false);
    let dry = decode(&review(&serde_json::to_vec(&request).unwrap(), &config()).body);
    let wet = decode(&review(&serde_json::to_vec(&real).unwrap(), &config()).body);
    assert_eq!(dry["response"]["allowed"], true);
    assert!(dry["response"]["patch"].is_string());
    assert_eq!(dry["response"]["patch"], wet["response"]["patch"]);
}

#[test]
fn other_kinds_and_operations_are_allowed_untouched() {
    let base = fixture("wardle-apiserver.json");
    let mut update = base.clone();
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = update["request"]["object"].clone();
    let mut binding = base.clone();
    binding["request"]["subResource"] = json!("binding");
    let mut deployment = base.clone();
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    deployment["request"]["resource"] =
        json!({"group": "apps", "version": "v1", "resource": "deployments"});
    deployment["request"]["object"] = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {}
    });
    let mut delete = base.clone();
    delete["request"]["operation"] = json!("DELETE");
    delete["request"]["object"] = Value::Null;
    delete["request"]["oldObject"] = base["request"]["object"].clone();

    for (what, request) in [
        ("update", update),
        ("binding", binding),
        ("deployment", deployment),
        ("delete", delete),
    ] {
        let answer = review(&serde_json::to_vec(&request).unwrap(), &config());
        assert_eq!(answer.outcome, Outcome::Ignored, "{what}");
        let body = decode(&answer.body);
        assert_eq!(body["response"]["uid"], base["request"]["uid"], "{what}");
        assert_eq!(body["response"]["allowed"], true, "{what}");
        assert!(body["response"].get("patch").is_none(), "{what}");
    }
}

#[test]
fn unreadable_requests_get_an_error_answer() {
    let uid = "2c0d4a56-8e1f-4b7a-9c3d-5e6f7a8b9c01";
    let mut no_object = fixture("wardle-apiserver.json");
    no_object["request"]["object"] = Value::Null;
    let mut bad_pod = fixture("wardle-apiserver.json");
    bad_pod["request"]["object"]["spec"]["containers"] = json!("not a list");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", b"{\"apiVersion\": ".to_vec(), ""),
        ("empty", Vec::new(), ""),
        ("json array", b"[1, 2]".to_vec(), ""),
        (
            "wrong kind",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod"}"#.to_vec(),
            "",
        ),
        (
            "no request",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            "",
        ),
        (
            "create without object",
            serde_json::to_vec(&no_object).unwrap(),
            uid,
        ),
        ("malformed pod", serde_json::to_vec(&bad_pod).unwrap(), uid),
    ];
    for (what, body, expected_uid) in cases {
        let answer = review(&body, &config());
        assert_eq!(answer.outcome, Outcome::Invalid, "{what}");
        let out = decode(&answer.body);
        assert_eq!(out["kind"], "AdmissionReview", "{what}");
        assert_eq!(out["response"]["uid"], expected_uid, "{what}");
        assert_eq!(out["response"]["allowed"], false, "{what}");
        assert_eq!(out["response"]["status"]["code"], 400, "{what}");
        assert!(
            !out["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .is_empty(),
            "{what}"
        );
    }
}
