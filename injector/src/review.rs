//! AdmissionReview in, AdmissionReview out. Turns any request body into an answer (never
//! an error): requests for other kinds or operations are allowed untouched, unreadable
//! ones get an error response that still carries the request's uid when it can be found.

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use serde::Serialize;
use serde_json::Value;

use crate::config::InjectConfig;
use crate::mutate::{Decision, SkipReason, mutate};

const API_VERSION_V1: &str = "admission.k8s.io/v1";
const API_VERSION_V1BETA1: &str = "admission.k8s.io/v1beta1";

/// How a request was answered, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Pod admitted with the shim patch.
    Injected,
    /// Pod admitted unchanged.
    Skipped(SkipReason),
    /// Not a pod CREATE: admitted without looking.
    Ignored,
    /// Pod refused because of an invalid override annotation.
    Denied,
    /// The request could not be read.
    Invalid,
}

impl Outcome {
    pub const LABELS: [&'static str; 5] = ["injected", "skipped", "ignored", "denied", "invalid"];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped(_) => "skipped",
            Outcome::Ignored => "ignored",
            Outcome::Denied => "denied",
            Outcome::Invalid => "invalid",
        }
    }
}

/// A serialized answer plus what it decided.
#[derive(Debug)]
pub struct Answer {
    pub outcome: Outcome,
    /// JSON AdmissionReview with `response` set.
    pub body: Vec<u8>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: ResponseOut,
}

/// The AdmissionResponse fields we send. Written out here rather than taken from `kube`,
/// because the API server expects `patch` as a base64 string.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct ResponseOut {
    uid: String,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// The part of metav1.Status the API server reads from a denial.
#[derive(Serialize)]
struct StatusOut {
    code: u16,
    message: String,
}

/// Answers one AdmissionReview body.
pub fn review(body: &[u8], cfg: &InjectConfig) -> Answer {
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return invalid(
                API_VERSION_V1,
                String::new(),
                format!("malformed AdmissionReview JSON: {e}"),
            );
        }
    };
    // Found before typed parsing so that even a request that fails it gets its uid back
    // and the API server can match the answer.
    let uid = value
        .pointer("/request/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let api_version = match value.get("apiVersion").and_then(Value::as_str) {
        Some(v @ (API_VERSION_V1 | API_VERSION_V1BETA1)) => v.to_string(),
        other => {
            return invalid(
                API_VERSION_V1,
                uid,
                format!("expected apiVersion {API_VERSION_V1}, got {other:?}"),
            );
        }
    };
    if value.get("kind").and_then(Value::as_str) != Some("AdmissionReview") {
        return invalid(
            &api_version,
            uid,
            "expected kind AdmissionReview".to_string(),
        );
    }
    let review: AdmissionReview<DynamicObject> = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            return invalid(&api_version, uid, format!("malformed AdmissionReview: {e}"));
        }
    };
    let Some(request) = review.request else {
        return invalid(
            &api_version,
            uid,
            "AdmissionReview has no request".to_string(),
        );
    };
    if !is_pod_create(&request) {
        return answer(&api_version, Outcome::Ignored, allow(uid));
    }
    let pod = match request.object.as_ref().map(pod_from) {
        Some(Ok(pod)) => pod,
        Some(Err(e)) => return invalid(&api_version, uid, format!("unreadable pod: {e}")),
        None => {
            return invalid(
                &api_version,
                uid,
                "CREATE request without object".to_string(),
            );
        }
    };
    let namespace = request.namespace.as_deref().unwrap_or_default();
    // Controllers create pods with generateName only; the name is assigned after admission.
    let name = pod
        .metadata
        .name
        .as_deref()
        .or(pod.metadata.generate_name.as_deref())
        .unwrap_or_default();

    match mutate(&pod, None, cfg) {
        Decision::Patch(patch) => {
            let json = match serde_json::to_vec(&patch) {
                Ok(j) => j,
                Err(e) => return invalid(&api_version, uid, format!("serializing patch: {e}")),
            };
            tracing::info!(%namespace, pod = %name, %uid, dry_run = request.dry_run, "injecting etcd-shim");
            let response = ResponseOut {
                patch: Some(base64::engine::general_purpose::STANDARD.encode(json)),
                patch_type: Some("JSONPatch"),
                ..allow(uid)
            };
            answer(&api_version, Outcome::Injected, response)
        }
        Decision::Skip { reason } => {
            tracing::debug!(%namespace, pod = %name, %uid, reason = reason.describe(), "not injecting");
            let mut response = allow(uid);
            if reason.warrants_warning() {
                response
                    .warnings
                    .push(format!("etcd-shim: {}", reason.describe()));
            }
            answer(&api_version, Outcome::Skipped(reason), response)
        }
        Decision::Deny { reason } => {
            tracing::info!(%namespace, pod = %name, %uid, %reason, "refusing pod");
            let response = ResponseOut {
                uid,
                allowed: false,
                status: Some(StatusOut {
                    code: 400,
                    message: reason,
                }),
                ..Default::default()
            };
            answer(&api_version, Outcome::Denied, response)
        }
    }
}

/// Only pod creation is ours; updates cannot add containers, and subresources (binding,
/// ephemeralcontainers, ...) are other objects.
fn is_pod_create(request: &AdmissionRequest<DynamicObject>) -> bool {
    request.operation == Operation::Create
        && request.kind.group.is_empty()
        && request.kind.kind == "Pod"
        && request.resource.resource == "pods"
        && request
            .sub_resource
            .as_deref()
            .unwrap_or_default()
            .is_empty()
}

fn pod_from(object: &DynamicObject) -> Result<Pod, serde_json::Error> {
    serde_json::to_value(object).and_then(serde_json::from_value)
}

fn allow(uid: String) -> ResponseOut {
    ResponseOut {
        uid,
        allowed: true,
        ..Default::default()
    }
}

fn invalid(api_version: &str, uid: String, message: String) -> Answer {
    tracing::warn!(%uid, %message, "invalid admission request");
    let response = ResponseOut {
        uid,
        allowed: false,
        status: Some(StatusOut { code: 400, message }),
        ..Default::default()
    };
    answer(api_version, Outcome::Invalid, response)
}

fn answer(api_version: &str, outcome: Outcome, response: ResponseOut) -> Answer {
    let out = ReviewOut {
        api_version,
        kind: "AdmissionReview",
        response,
    };
    // Plain strings, booleans and numbers: serialization cannot fail, but if it ever did
    // the caller must still get a body.
    let body = serde_json::to_vec(&out).unwrap_or_else(|_| {
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"","allowed":false}}"#.to_vec()
    });
    Answer { outcome, body }
}
