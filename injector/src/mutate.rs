//! The injection itself: a pure function from a pod (and, when known, its namespace's
//! labels) to a decision. No I/O happens here, so every rule is covered by unit tests and
//! the HTTP service only translates AdmissionReviews to and from it.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, EnvVar, ExecAction, HTTPGetAction,
    KeyToPath, Lifecycle, LifecycleHandler, Pod, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use crate::config::*;

/// What to do with a pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Admit the pod unchanged.
    Skip { reason: SkipReason },
    /// Admit the pod with the shim added.
    Patch(Patch),
    /// Refuse the pod: it asked for injection with settings that cannot work. Refusing
    /// tells the user which annotation is wrong; injecting a broken container would fail
    /// later with a message about a container they never wrote.
    Deny { reason: String },
}

/// Why a pod was admitted without the shim. The `as_str` names are metric label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The namespace is not labelled `etcd-shim.io/inject=enabled`.
    NamespaceNotEnabled,
    /// The pod is annotated `etcd-shim.io/inject: disabled`.
    OptedOut,
    /// The pod already carries `etcd-shim.io/status: injected` (a second webhook pass).
    AlreadyInjected,
    /// The pod already has a container or volume with the shim's name; adding ours would
    /// make it invalid.
    NameConflict,
    /// hostNetwork pods share the node's loopback: 127.0.0.1:2379 would be the node's.
    HostNetwork,
    /// No spec to add to (never sent by a real API server).
    NoSpec,
}

impl SkipReason {
    pub const ALL: [SkipReason; 6] = [
        SkipReason::NamespaceNotEnabled,
        SkipReason::OptedOut,
        SkipReason::AlreadyInjected,
        SkipReason::NameConflict,
        SkipReason::HostNetwork,
        SkipReason::NoSpec,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NamespaceNotEnabled => "namespace_not_enabled",
            SkipReason::OptedOut => "opted_out",
            SkipReason::AlreadyInjected => "already_injected",
            SkipReason::NameConflict => "name_conflict",
            SkipReason::HostNetwork => "host_network",
            SkipReason::NoSpec => "no_spec",
        }
    }

    /// A sentence for logs and for the warning shown to whoever created the pod.
    pub fn describe(self) -> &'static str {
        match self {
            SkipReason::NamespaceNotEnabled => {
                "namespace is not labelled etcd-shim.io/inject=enabled"
            }
            SkipReason::OptedOut => "pod is annotated etcd-shim.io/inject: disabled",
            SkipReason::AlreadyInjected => "pod is already injected",
            SkipReason::NameConflict => {
                "pod already has a container named etcd-shim or a volume named etcd-shim-token"
            }
            SkipReason::HostNetwork => {
                "hostNetwork pods are not injected: 127.0.0.1:2379 would be the node's loopback"
            }
            SkipReason::NoSpec => "pod has no spec",
        }
    }

    /// Skips worth telling the pod's creator about: they are in an opted-in namespace and
    /// did not ask to be left alone, yet get no shim.
    pub fn warrants_warning(self) -> bool {
        matches!(self, SkipReason::NameConflict | SkipReason::HostNetwork)
    }
}

/// Decides whether and how to inject the shim into `pod`.
///
/// `namespace_labels` is `None` when the caller does not know them: an AdmissionRequest
/// does not carry namespace labels, and the webhook's `namespaceSelector` already limits
/// requests to opted-in namespaces. When they are known, they are checked too.
pub fn mutate(
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
    cfg: &InjectConfig,
) -> Decision {
    if let Some(labels) = namespace_labels
        && labels.get(NAMESPACE_LABEL).map(String::as_str) != Some(NAMESPACE_LABEL_ENABLED)
    {
        return skip(SkipReason::NamespaceNotEnabled);
    }
    let annotations = pod.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    if annotation(STATUS_ANNOTATION) == Some(STATUS_INJECTED) {
        return skip(SkipReason::AlreadyInjected);
    }
    if annotation(INJECT_ANNOTATION) == Some(INJECT_DISABLED) {
        return skip(SkipReason::OptedOut);
    }
    let Some(spec) = pod.spec.as_ref() else {
        return skip(SkipReason::NoSpec);
    };
    if spec.host_network == Some(true) {
        return skip(SkipReason::HostNetwork);
    }
    let container_taken = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == CONTAINER_NAME);
    let volume_taken = spec
        .volumes
        .iter()
        .flatten()
        .any(|v| v.name == TOKEN_VOLUME);
    if container_taken || volume_taken {
        return skip(SkipReason::NameConflict);
    }

    let shim = match Settings::resolve(cfg, &annotation) {
        Ok(s) => s,
        Err(reason) => return Decision::Deny { reason },
    };
    let container = match serde_json::to_value(shim_container(&shim)) {
        Ok(v) => v,
        Err(e) => {
            return Decision::Deny {
                reason: format!("etcd-shim: internal error building the sidecar: {e}"),
            };
        }
    };
    let volume = match serde_json::to_value(token_volume(&shim)) {
        Ok(v) => v,
        Err(e) => {
            return Decision::Deny {
                reason: format!("etcd-shim: internal error building the token volume: {e}"),
            };
        }
    };

    let mut new_annotations = vec![(STATUS_ANNOTATION, STATUS_INJECTED.to_string())];
    // In classic mode the shim becomes containers[0], which kubectl would otherwise pick for
    // `logs` and `exec`. A choice the pod already made is kept.
    if shim.mode == SidecarMode::Classic
        && annotation(DEFAULT_CONTAINER_ANNOTATION).is_none()
        && let Some(app) = spec.containers.first()
    {
        new_annotations.push((DEFAULT_CONTAINER_ANNOTATION, app.name.clone()));
    }

    let mut ops = Vec::with_capacity(4);
    // The annotation map, the volume list and the container lists may all be absent; JSON
    // Patch cannot add below a missing parent, so create the whole member in that case.
    // ("add" on an existing empty member replaces it, which is also what we want.)
    match annotations {
        Some(a) if !a.is_empty() => {
            for (key, value) in new_annotations {
                ops.push(add(&["metadata", "annotations", key], Value::from(value)));
            }
        }
        _ => ops.push(add(
            &["metadata", "annotations"],
            Value::Object(
                new_annotations
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), Value::from(v)))
                    .collect(),
            ),
        )),
    }
    ops.push(match spec.volumes.as_deref() {
        Some([_, ..]) => add(&["spec", "volumes", "-"], volume),
        _ => add(&["spec", "volumes"], Value::Array(vec![volume])),
    });
    // First position: a native sidecar must start before the other init containers (they
    // may already talk to etcd), and a classic one should at least be started first.
    ops.push(match shim.mode {
        SidecarMode::Native => match spec.init_containers.as_deref() {
            Some([_, ..]) => add(&["spec", "initContainers", "0"], container),
            _ => add(&["spec", "initContainers"], Value::Array(vec![container])),
        },
        SidecarMode::Classic => match spec.containers.as_slice() {
            [_, ..] => add(&["spec", "containers", "0"], container),
            [] => add(&["spec", "containers"], Value::Array(vec![container])),
        },
    });
    Decision::Patch(Patch(ops))
}

fn skip(reason: SkipReason) -> Decision {
    Decision::Skip { reason }
}

/// An "add" operation; the pointer escapes `/` in tokens as `~1` (and `~` as `~0`), which
/// annotation keys like `etcd-shim.io/status` need.
fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

/// The injector's defaults with the pod's override annotations applied and checked.
struct Settings<'a> {
    cfg: &'a InjectConfig,
    image: String,
    log_level: String,
    cpu_request: String,
    memory_request: String,
    memory_limit: String,
    mode: SidecarMode,
}

impl<'a> Settings<'a> {
    fn resolve<'p>(
        cfg: &'a InjectConfig,
        annotation: &impl Fn(&str) -> Option<&'p str>,
    ) -> Result<Self, String> {
        let text = |key: &str, default: &str| -> Result<String, String> {
            match annotation(key) {
                None => Ok(default.to_string()),
                Some(v) if !v.is_empty() && !v.chars().any(|c| c.is_whitespace()) => {
                    Ok(v.to_string())
                }
                Some(v) => Err(format!(
                    "etcd-shim: annotation {key}: {v:?} must be non-empty and contain no spaces"
                )),
            }
        };
        let quantity = |key: &str, default: &str| -> Result<String, String> {
            match annotation(key) {
                None => Ok(default.to_string()),
                Some(v) if is_quantity(v) => Ok(v.to_string()),
                Some(v) => Err(format!(
                    "etcd-shim: annotation {key}: {v:?} is not a resource quantity (like 10m or 64Mi)"
                )),
            }
        };
        let mode = match annotation(MODE_ANNOTATION) {
            None => cfg.mode,
            Some(v) => SidecarMode::parse(v).ok_or_else(|| {
                format!("etcd-shim: annotation {MODE_ANNOTATION}: {v:?} must be native or classic")
            })?,
        };
        Ok(Self {
            cfg,
            image: text(IMAGE_ANNOTATION, &cfg.image)?,
            log_level: text(LOG_LEVEL_ANNOTATION, &cfg.log_level)?,
            cpu_request: quantity(CPU_REQUEST_ANNOTATION, &cfg.cpu_request)?,
            memory_request: quantity(MEMORY_REQUEST_ANNOTATION, &cfg.memory_request)?,
            memory_limit: quantity(MEMORY_LIMIT_ANNOTATION, &cfg.memory_limit)?,
            mode,
        })
    }

    /// The ConfigMap to project as the broker's CA bundle: only for a TLS broker.
    fn broker_ca_configmap(&self) -> Option<&str> {
        if self.plaintext() {
            return None;
        }
        self.cfg.broker_ca_configmap.as_deref()
    }

    /// An `http://` broker: the operator chose plaintext explicitly (the chart only renders
    /// one behind a value named as dangerous).
    fn plaintext(&self) -> bool {
        self.cfg.broker_url.starts_with("http://")
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(SHIM_ADMIN_PORT_NAME.to_string()),
            scheme: Some("HTTP".to_string()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

/// The shim container. Its env, port and mount are the contract the shim binary reads.
fn shim_container(s: &Settings<'_>) -> Container {
    let native = s.mode == SidecarMode::Native;
    let mut env_vars = vec![
        env("ETCD_SHIM_SHIM_LISTEN", SHIM_LISTEN),
        env("ETCD_SHIM_SHIM_ADMIN_LISTEN", SHIM_ADMIN_LISTEN),
        env("ETCD_SHIM_SHIM_BROKER", &s.cfg.broker_url),
    ];
    if s.broker_ca_configmap().is_some() {
        env_vars.push(env(
            "ETCD_SHIM_SHIM_BROKER_CA_FILE",
            &format!("{TOKEN_DIR}/{BROKER_CA_FILE}"),
        ));
    }
    // The shim refuses plaintext unless told; an operator who configured an http://
    // broker (a development cluster) has said so already.
    if s.plaintext() {
        env_vars.push(env("ETCD_SHIM_SHIM_BROKER_INSECURE_PLAINTEXT", "true"));
    }
    env_vars.extend([
        env(
            "ETCD_SHIM_SHIM_TOKEN_FILE",
            &format!("{TOKEN_DIR}/{TOKEN_FILE}"),
        ),
        env("ETCD_SHIM_SHIM_LOG_LEVEL", &s.log_level),
        env(
            "ETCD_SHIM_SHIM_LOG_FORMAT",
            log_format_name(s.cfg.log_format),
        ),
    ]);
    Container {
        name: CONTAINER_NAME.to_string(),
        image: Some(s.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_string()),
        // What makes an init container a native sidecar: it keeps running (and is
        // restarted) alongside the application instead of having to exit.
        restart_policy: native.then(|| "Always".to_string()),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            container_port: SHIM_ADMIN_PORT,
            name: Some(SHIM_ADMIN_PORT_NAME.to_string()),
            protocol: Some("TCP".to_string()),
            ..Default::default()
        }]),
        // A native sidecar's startup probe holds back the application containers until
        // the shim can reach the broker, so the application's first etcd call works.
        // Two minutes of patience before the kubelet restarts the shim.
        startup_probe: native.then(|| http_probe("/ready", 1, 120)),
        // Classic mode has no startup probe that gates the app; but the kubelet starts
        // regular containers in order and waits for each one's postStart hook first, so a
        // hook that returns once the shim is ready holds back the application the same way.
        // It gives up (and the kubelet restarts the shim) after the same two minutes.
        lifecycle: (!native).then(|| Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        SHIM_BINARY.to_string(),
                        "wait-ready".to_string(),
                        "--timeout=120s".to_string(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity(s.cpu_request.clone())),
                ("memory".to_string(), Quantity(s.memory_request.clone())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity(s.memory_limit.clone()),
            )])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: s.cfg.run_as_user,
            run_as_group: s.cfg.run_as_user,
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME.to_string(),
            mount_path: TOKEN_DIR.to_string(),
            read_only: Some(true),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Default::default()
    }
}

/// The projected volume: the token and, for a TLS broker, the CA bundle. Projected tokens
/// are independent of `automountServiceAccountToken`, so pods that turn automount off still
/// get one. The ConfigMap is not optional: until it exists the kubelet keeps the pod in
/// ContainerCreating, which is clearer than a shim that cannot verify the broker.
fn token_volume(s: &Settings<'_>) -> Volume {
    let mut sources = vec![VolumeProjection {
        service_account_token: Some(ServiceAccountTokenProjection {
            audience: Some(TOKEN_AUDIENCE.to_string()),
            expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
            path: TOKEN_FILE.to_string(),
        }),
        ..Default::default()
    }];
    if let Some(name) = s.broker_ca_configmap() {
        sources.push(VolumeProjection {
            config_map: Some(ConfigMapProjection {
                name: name.to_string(),
                items: Some(vec![KeyToPath {
                    key: BROKER_CA_KEY.to_string(),
                    path: BROKER_CA_FILE.to_string(),
                    mode: None,
                }]),
                optional: Some(false),
            }),
            ..Default::default()
        });
    }
    Volume {
        name: TOKEN_VOLUME.to_string(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(sources),
            default_mode: None,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn minimal() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"generateName": "app-", "namespace": "ns"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        })
    }

    fn with_annotations(annotations: Value) -> Value {
        let mut v = minimal();
        v["metadata"]["annotations"] = annotations;
        v
    }

    fn patch_of(decision: Decision) -> Patch {
        match decision {
            Decision::Patch(p) => p,
            other => panic!("expected a patch, got {other:?}"),
        }
    }

    fn paths(patch: &Patch) -> Vec<String> {
        patch.0.iter().map(|op| op.path().to_string()).collect()
    }

    /// Applies the decision's patch and returns the injected container.
    fn injected(pod_json: Value, cfg: &InjectConfig) -> (Value, Container) {
        let patch = patch_of(mutate(&pod(pod_json.clone()), None, cfg));
        let mut doc = pod_json;
        json_patch::patch(&mut doc, &patch).unwrap();
        let p = pod(doc.clone());
        let spec = p.spec.unwrap();
        let shim = spec
            .init_containers
            .into_iter()
            .flatten()
            .chain(spec.containers)
            .find(|c| c.name == CONTAINER_NAME)
            .expect("shim container present");
        (doc, shim)
    }

    fn env_value<'c>(c: &'c Container, name: &str) -> Option<&'c str> {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
    }

    #[test]
    fn missing_annotations_volumes_and_init_containers_are_created() {
        let patch = patch_of(mutate(&pod(minimal()), None, &InjectConfig::default()));
        assert_eq!(
            paths(&patch),
            [
                "/metadata/annotations",
                "/spec/volumes",
                "/spec/initContainers"
            ]
        );
    }

    #[test]
    fn annotation_key_is_escaped_and_existing_annotations_kept() {
        let v = with_annotations(json!({"team": "storage"}));
        let patch = patch_of(mutate(&pod(v.clone()), None, &InjectConfig::default()));
        assert_eq!(
            paths(&patch)[0],
            "/metadata/annotations/etcd-shim.io~1status"
        );
        let (doc, _) = injected(v, &InjectConfig::default());
        assert_eq!(
            doc["metadata"]["annotations"],
            json!({"team": "storage", "etcd-shim.io/status": "injected"})
        );
    }

    #[test]
    fn overrides_from_annotations_apply() {
        let v = with_annotations(json!({
            "etcd-shim.io/image": "registry.example/shim:debug",
            "etcd-shim.io/log-level": "debug",
            "etcd-shim.io/cpu-request": "50m",
            "etcd-shim.io/memory-request": "32Mi",
            "etcd-shim.io/memory-limit": "128Mi",
            "etcd-shim.io/mode": "classic"
        }));
        let (doc, shim) = injected(v, &InjectConfig::default());
        assert_eq!(shim.image.as_deref(), Some("registry.example/shim:debug"));
        assert_eq!(env_value(&shim, "ETCD_SHIM_SHIM_LOG_LEVEL"), Some("debug"));
        let res = shim.resources.unwrap();
        let requests = res.requests.unwrap();
        assert_eq!(requests["cpu"], Quantity("50m".into()));
        assert_eq!(requests["memory"], Quantity("32Mi".into()));
        assert_eq!(res.limits.unwrap()["memory"], Quantity("128Mi".into()));
        // Classic: first regular container, no sidecar restart policy, no startup probe.
        assert_eq!(doc["spec"]["containers"][0]["name"], "etcd-shim");
        assert_eq!(doc["spec"]["containers"][1]["name"], "app");
        assert!(doc["spec"].get("initContainers").is_none());
        assert_eq!(shim.restart_policy, None);
        assert_eq!(shim.startup_probe, None);
        assert!(shim.readiness_probe.is_some() && shim.liveness_probe.is_some());
    }

    #[test]
    fn classic_mode_from_config() {
        let cfg = InjectConfig {
            mode: SidecarMode::Classic,
            ..InjectConfig::default()
        };
        let patch = patch_of(mutate(&pod(minimal()), None, &cfg));
        assert_eq!(paths(&patch)[2], "/spec/containers/0");
    }

    #[test]
    fn invalid_overrides_are_denied_naming_the_annotation() {
        for (key, value) in [
            ("etcd-shim.io/mode", "sideways"),
            ("etcd-shim.io/cpu-request", "a lot"),
            ("etcd-shim.io/memory-request", "16MB"),
            ("etcd-shim.io/memory-limit", ""),
            ("etcd-shim.io/image", ""),
            ("etcd-shim.io/log-level", "info debug"),
        ] {
            let v = with_annotations(json!({ key: value }));
            match mutate(&pod(v), None, &InjectConfig::default()) {
                Decision::Deny { reason } => assert!(reason.contains(key), "{key}: {reason}"),
                other => panic!("{key}={value:?} should be denied, got {other:?}"),
            }
        }
    }

    #[test]
    fn namespace_labels_are_checked_when_known() {
        let p = pod(minimal());
        let cfg = InjectConfig::default();
        let off = BTreeMap::from([("team".to_string(), "a".to_string())]);
        assert_eq!(
            mutate(&p, Some(&off), &cfg),
            Decision::Skip {
                reason: SkipReason::NamespaceNotEnabled
            }
        );
        let disabled = BTreeMap::from([(NAMESPACE_LABEL.to_string(), "disabled".to_string())]);
        assert!(matches!(
            mutate(&p, Some(&disabled), &cfg),
            Decision::Skip { .. }
        ));
        let on = BTreeMap::from([(NAMESPACE_LABEL.to_string(), "enabled".to_string())]);
        assert!(matches!(mutate(&p, Some(&on), &cfg), Decision::Patch(_)));
        assert!(matches!(mutate(&p, None, &cfg), Decision::Patch(_)));
    }

    #[test]
    fn only_the_disabled_value_opts_out() {
        let cfg = InjectConfig::default();
        let out = pod(with_annotations(json!({"etcd-shim.io/inject": "disabled"})));
        assert_eq!(
            mutate(&out, None, &cfg),
            Decision::Skip {
                reason: SkipReason::OptedOut
            }
        );
        let explicit = pod(with_annotations(json!({"etcd-shim.io/inject": "enabled"})));
        assert!(matches!(mutate(&explicit, None, &cfg), Decision::Patch(_)));
    }

    #[test]
    fn existing_shim_names_are_not_duplicated() {
        let cfg = InjectConfig::default();
        let mut v = minimal();
        v["spec"]["containers"][0]["name"] = json!("etcd-shim");
        assert_eq!(
            mutate(&pod(v), None, &cfg),
            Decision::Skip {
                reason: SkipReason::NameConflict
            }
        );
        let mut v = minimal();
        v["spec"]["volumes"] = json!([{"name": "etcd-shim-token", "emptyDir": {}}]);
        assert_eq!(
            mutate(&pod(v), None, &cfg),
            Decision::Skip {
                reason: SkipReason::NameConflict
            }
        );
    }

    /// The volume sources of the injected token volume.
    fn token_sources(doc: &Value) -> Vec<Value> {
        doc["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == TOKEN_VOLUME)
            .expect("token volume")["projected"]["sources"]
            .as_array()
            .unwrap()
            .clone()
    }

    #[test]
    fn broker_ca_is_a_projected_file_never_an_env_var() {
        let (doc, shim) = injected(minimal(), &InjectConfig::default());
        assert!(
            shim.env.iter().flatten().all(|e| !e
                .value
                .as_deref()
                .unwrap_or("")
                .contains("BEGIN CERTIFICATE")),
            "no certificate text in the environment"
        );
        assert_eq!(env_value(&shim, "ETCD_SHIM_SHIM_BROKER_CA"), None);
        assert_eq!(
            env_value(&shim, "ETCD_SHIM_SHIM_BROKER_CA_FILE"),
            Some("/var/run/secrets/etcd-shim/ca.crt")
        );
        // The file comes from the namespace's ConfigMap, in the mounted token volume.
        let sources = token_sources(&doc);
        assert_eq!(
            sources[1]["configMap"],
            json!({"name": "etcd-shim-broker-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}], "optional": false})
        );
        let mount = &shim.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.name.as_str(), mount.mount_path.as_str()),
            (TOKEN_VOLUME, "/var/run/secrets/etcd-shim")
        );

        let cfg = InjectConfig {
            broker_ca_configmap: Some("my-ca".into()),
            ..InjectConfig::default()
        };
        let (doc, _) = injected(minimal(), &cfg);
        assert_eq!(token_sources(&doc)[1]["configMap"]["name"], "my-ca");
    }

    #[test]
    fn a_plaintext_broker_gets_no_ca_bundle() {
        let cfg = InjectConfig {
            broker_url: "http://broker.dev.svc:2379".into(),
            ..InjectConfig::default()
        };
        let (doc, shim) = injected(minimal(), &cfg);
        assert_eq!(token_sources(&doc).len(), 1, "token only");
        assert_eq!(env_value(&shim, "ETCD_SHIM_SHIM_BROKER_CA_FILE"), None);
    }

    #[test]
    fn classic_mode_points_kubectl_at_the_app_and_holds_it_until_the_shim_is_ready() {
        let cfg = InjectConfig {
            mode: SidecarMode::Classic,
            ..InjectConfig::default()
        };
        let (doc, shim) = injected(minimal(), &cfg);
        assert_eq!(
            doc["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
            "app"
        );
        let hook = shim
            .lifecycle
            .and_then(|l| l.post_start)
            .and_then(|h| h.exec)
            .and_then(|e| e.command)
            .expect("a postStart exec hook");
        assert_eq!(
            hook,
            ["/usr/local/bin/etcd-shim", "wait-ready", "--timeout=120s"]
        );

        // With other annotations present the key is added beside them; a choice the pod
        // made is kept.
        let v = with_annotations(json!({"team": "storage"}));
        let (doc, _) = injected(v, &cfg);
        assert_eq!(
            doc["metadata"]["annotations"],
            json!({"team": "storage", "etcd-shim.io/status": "injected", "kubectl.kubernetes.io/default-container": "app"})
        );
        let v = with_annotations(json!({"kubectl.kubernetes.io/default-container": "sidecar"}));
        let (doc, _) = injected(v, &cfg);
        assert_eq!(
            doc["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
            "sidecar"
        );
    }

    #[test]
    fn native_mode_needs_neither_hook_nor_default_container() {
        let (doc, shim) = injected(minimal(), &InjectConfig::default());
        assert_eq!(
            doc["metadata"]["annotations"],
            json!({"etcd-shim.io/status": "injected"})
        );
        assert!(shim.lifecycle.is_none());
        assert!(shim.startup_probe.is_some());
    }

    #[test]
    fn ids_can_be_left_to_the_platform() {
        let (_, shim) = injected(minimal(), &InjectConfig::default());
        let sc = shim.security_context.unwrap();
        assert_eq!(
            (sc.run_as_user, sc.run_as_group),
            (Some(65532), Some(65532))
        );
        let cfg = InjectConfig {
            run_as_user: None,
            ..InjectConfig::default()
        };
        let (doc, shim) = injected(minimal(), &cfg);
        let sc = shim.security_context.unwrap();
        assert_eq!((sc.run_as_user, sc.run_as_group), (None, None));
        assert_eq!(sc.run_as_non_root, Some(true), "still never root");
        let json = serde_json::to_string(&doc).unwrap();
        assert!(
            !json.contains("runAsUser") && !json.contains("runAsGroup"),
            "{json}"
        );
    }

    #[test]
    fn plaintext_is_allowed_only_for_an_http_broker() {
        let (_, shim) = injected(minimal(), &InjectConfig::default());
        assert_eq!(
            env_value(&shim, "ETCD_SHIM_SHIM_BROKER_INSECURE_PLAINTEXT"),
            None
        );
        let cfg = InjectConfig {
            broker_url: "http://broker.dev.svc:2379".into(),
            ..InjectConfig::default()
        };
        let (_, shim) = injected(minimal(), &cfg);
        assert_eq!(
            env_value(&shim, "ETCD_SHIM_SHIM_BROKER_INSECURE_PLAINTEXT"),
            Some("true")
        );
    }

    #[test]
    fn pod_without_spec_is_skipped() {
        let p = pod(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}));
        assert_eq!(
            mutate(&p, None, &InjectConfig::default()),
            Decision::Skip {
                reason: SkipReason::NoSpec
            }
        );
    }
}
