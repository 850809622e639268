//! The Kubernetes side of one run: read the Secret, let [`certs::plan`] decide what it
//! should hold, make every webhook of the MutatingWebhookConfiguration trust the resulting
//! CA bundle, then write the Secret. When nothing is due, only the two GETs are made.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, TestOperation};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::Status;
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use crate::certs::{self, Change, Material, Policy};

/// Label that marks the Secret as ours; a Secret without it is never overwritten.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "etcd-shim-webhook-certs";
/// Type of a created Secret; the kubelet and most tools know its `tls.crt`/`tls.key`.
pub const SECRET_TYPE: &str = "kubernetes.io/tls";
/// Rounds of read-decide-write before giving up when other writers keep changing the
/// objects; each round re-reads, so a single concurrent writer costs one extra round.
pub const MAX_ATTEMPTS: u32 = 5;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a run failed. Every message names the object and what was attempted, so the one
/// line a Job prints is enough to fix RBAC or installation problems.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server answered with an error status.
    #[error("cannot {verb} {object}: {reason}: {message}")]
    Api {
        verb: &'static str,
        object: String,
        /// Short form of the HTTP status: `forbidden`, `not found`, `server error`, ...
        reason: String,
        /// The API server's own message.
        message: String,
        /// HTTP status code.
        code: u16,
    },
    /// The request did not get an answer from the API server (connection, TLS, decoding).
    #[error("cannot {verb} {object}")]
    Request {
        verb: &'static str,
        object: String,
        #[source]
        source: kube::Error,
    },
    /// No Kubernetes client configuration (neither in-cluster nor a kubeconfig).
    #[error("cannot configure a Kubernetes client")]
    Client(#[source] kube::Error),
    /// The webhook configuration is installed by the Helm chart and must exist first.
    #[error(
        "MutatingWebhookConfiguration {name} not found: install the chart that creates it, \
         or pass --skip-missing-webhook to write only the Secret"
    )]
    WebhookMissing { name: String },
    /// The Secret exists but was not created by this tool.
    #[error(
        "Secret {object} exists without label {MANAGED_BY_LABEL}={MANAGED_BY}; \
         refusing to overwrite it"
    )]
    Unmanaged { object: String },
    /// Other writers changed the objects in every attempt.
    #[error("{object} kept changing concurrently; gave up after {attempts} attempts")]
    Contention { object: String, attempts: u32 },
    /// Encoding the caBundle for the patch failed.
    #[error("encoding the caBundle patch")]
    Encode(#[source] serde_json::Error),
    #[error(transparent)]
    Certs(#[from] certs::Error),
}

impl Error {
    /// Maps a kube error into one naming the object and the attempted verb.
    pub(crate) fn from_kube(verb: &'static str, object: &str, err: kube::Error) -> Self {
        match err {
            kube::Error::Api(status) => Self::Api {
                verb,
                object: object.to_string(),
                reason: reason_text(&status),
                message: if status.message.is_empty() {
                    format!("HTTP {}", status.code)
                } else {
                    status.message.clone()
                },
                code: status.code,
            },
            source => Self::Request {
                verb,
                object: object.to_string(),
                source,
            },
        }
    }

    /// HTTP status code of an API error.
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn reason_text(status: &Status) -> String {
    let text = match status.code {
        400 => "bad request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not found",
        409 => "conflict",
        422 => "invalid",
        429 => "too many requests",
        500..=599 => "server error",
        _ if !status.reason.is_empty() => return status.reason.clone(),
        code => return format!("HTTP {code}"),
    };
    text.to_string()
}

/// What one run works on.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the Secret (and of the injector Service).
    pub namespace: String,
    /// Name of the Secret that holds the certificates.
    pub secret_name: String,
    /// Name of the MutatingWebhookConfiguration whose caBundle is kept in sync; empty for a
    /// certificate no webhook serves (the broker's).
    pub webhook_name: String,
    /// Certificate names, validities and renewal rules.
    pub policy: Policy,
    /// Succeed (with a warning) when the webhook configuration does not exist yet.
    pub skip_missing_webhook: bool,
    /// ConfigMaps in opted-in namespaces that receive the CA bundle, written before the
    /// Secret (see `distribute`).
    pub ca_target: Option<crate::distribute::Target>,
}

impl Config {
    fn secret_object(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.secret_name)
    }

    fn webhook_object(&self) -> String {
        format!("MutatingWebhookConfiguration {}", self.webhook_name)
    }
}

/// How the Secret was written in a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SecretWrite {
    /// Already right; not written.
    #[default]
    Unchanged,
    Created,
    Updated,
}

/// What one run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Changes to the stored certificates (empty if none were due).
    pub changes: Vec<Change>,
    pub secret: SecretWrite,
    /// Webhooks whose caBundle was patched.
    pub patched_webhooks: Vec<String>,
    /// The webhook configuration did not exist and `skip_missing_webhook` was set.
    pub webhook_missing: bool,
    /// Namespaces whose CA bundle ConfigMap was created or updated.
    pub ca_configmaps: Vec<String>,
}

impl Report {
    /// True when the run made no write call.
    pub fn is_unchanged(&self) -> bool {
        self.secret == SecretWrite::Unchanged
            && self.patched_webhooks.is_empty()
            && self.ca_configmaps.is_empty()
    }
}

/// One run at the current time.
pub async fn reconcile(client: Client, config: &Config) -> Result<Report> {
    reconcile_at(client, config, OffsetDateTime::now_utc()).await
}

/// One run as if the time were `now`.
///
/// The caBundle is patched before the Secret is written: the injector starts serving a new
/// certificate only after the kubelet refreshes the mounted Secret, and by then the API
/// server already trusts its CA. The other order would leave a window, unbounded if the
/// patch failed, in which the webhook presents a certificate the API server rejects.
pub async fn reconcile_at(client: Client, config: &Config, now: OffsetDateTime) -> Result<Report> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let secret_object = config.secret_object();
    let webhook_object = config.webhook_object();

    for attempt in 1..=MAX_ATTEMPTS {
        let secret = secrets
            .get_opt(&config.secret_name)
            .await
            .map_err(|e| Error::from_kube("get", &secret_object, e))?;
        if let Some(secret) = &secret
            && !is_managed(secret)
        {
            return Err(Error::Unmanaged {
                object: format!("{}/{}", config.namespace, config.secret_name),
            });
        }
        let stored = secret
            .as_ref()
            .map(|s| Material::from_data(&secret_bytes(s)));
        let plan = certs::plan(stored.as_ref(), &config.policy, now)?;
        let mut report = Report {
            changes: plan.changes.clone(),
            ..Report::default()
        };

        let webhook = if config.webhook_name.is_empty() {
            None
        } else {
            webhooks
                .get_opt(&config.webhook_name)
                .await
                .map_err(|e| Error::from_kube("get", &webhook_object, e))?
        };
        match webhook {
            None if config.webhook_name.is_empty() => {}
            None if config.skip_missing_webhook => {
                warn!(
                    webhook = %config.webhook_name,
                    "webhook configuration not found; writing only the Secret, a later run patches the caBundle"
                );
                report.webhook_missing = true;
            }
            None => {
                return Err(Error::WebhookMissing {
                    name: config.webhook_name.clone(),
                });
            }
            Some(webhook) => {
                if let Some((patch, names)) =
                    ca_bundle_patch(&webhook, plan.material.ca_crt.as_bytes())?
                {
                    let res = webhooks
                        .patch(
                            &config.webhook_name,
                            &PatchParams::default(),
                            &Patch::<()>::Json(patch),
                        )
                        .await;
                    match res {
                        Ok(_) => {
                            info!(webhook = %config.webhook_name, webhooks = ?names, "patched caBundle");
                            report.patched_webhooks = names;
                        }
                        // A failed `test` operation (422): the webhooks list changed between
                        // our GET and PATCH, so the indexes may be wrong. Read again.
                        Err(kube::Error::Api(status)) if status.code == 422 => {
                            debug!(attempt, message = %status.message, "webhook list changed, retrying");
                            continue;
                        }
                        Err(e) => return Err(Error::from_kube("patch", &webhook_object, e)),
                    }
                }
            }
        }

        if let Some(target) = &config.ca_target {
            report.ca_configmaps =
                crate::distribute::distribute(client.clone(), target, &plan.material.ca_crt)
                    .await?;
        }

        if plan.is_unchanged() {
            return Ok(report);
        }
        for change in &plan.changes {
            info!(secret = %secret_object, %change, "certificate change");
        }
        let written = match secret {
            None => secrets
                .create(&PostParams::default(), &new_secret(config, &plan.material))
                .await
                .map(|_| SecretWrite::Created)
                .map_err(|e| ("create", e)),
            Some(secret) => secrets
                .replace(
                    &config.secret_name,
                    &PostParams::default(),
                    &updated_secret(secret, &plan.material),
                )
                .await
                .map(|_| SecretWrite::Updated)
                .map_err(|e| ("update", e)),
        };
        match written {
            Ok(write) => {
                report.secret = write;
                return Ok(report);
            }
            // Someone else created or updated the Secret since our GET (the update carries
            // our resourceVersion, so it cannot overwrite their write). Decide again from
            // what they wrote.
            Err((verb, kube::Error::Api(status))) if status.code == 409 => {
                info!(attempt, secret = %secret_object, verb, "Secret changed concurrently, reading it again");
            }
            Err((verb, e)) => return Err(Error::from_kube(verb, &secret_object, e)),
        }
    }
    Err(Error::Contention {
        object: secret_object,
        attempts: MAX_ATTEMPTS,
    })
}

fn is_managed(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

fn secret_bytes(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

fn secret_data(material: &Material) -> BTreeMap<String, ByteString> {
    material
        .to_data()
        .into_iter()
        .map(|(k, v)| (k, ByteString(v)))
        .collect()
}

fn new_secret(config: &Config, material: &Material) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(config.secret_name.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.to_string()),
        data: Some(secret_data(material)),
        ..Secret::default()
    }
}

/// The stored Secret with new data. Everything else (labels, annotations, owner references,
/// resourceVersion) is sent back as read: a PUT replaces the whole object, and the
/// resourceVersion makes the API server refuse it if someone wrote in between.
fn updated_secret(mut secret: Secret, material: &Material) -> Secret {
    // Omitted managedFields are kept by the server; echoing them back is pointless.
    secret.metadata.managed_fields = None;
    let mut data = secret.data.take().unwrap_or_default();
    data.extend(secret_data(material));
    secret.data = Some(data);
    secret
}

/// An RFC 6902 patch setting `caBundle` on every webhook that does not trust exactly the
/// bundle, with the names of those webhooks; `None` if all already do.
///
/// Why JSON patch: a JSON merge patch replaces the whole `webhooks` list, so it would have
/// to resend every field of every webhook and would drop fields this client does not know.
/// A strategic merge patch keyed by webhook name would work on current API servers, but its
/// outcome depends on the server's schema and cannot be checked without one. JSON patch
/// names exactly `clientConfig.caBundle`, and a `test` of each webhook's name makes the
/// patch fail (422) instead of hitting the wrong webhook if the list changed since the GET.
fn ca_bundle_patch(
    webhook: &MutatingWebhookConfiguration,
    bundle_pem: &[u8],
) -> Result<Option<(json_patch::Patch, Vec<String>)>> {
    let wanted = certs::bundle_set(bundle_pem);
    let bundle = serde_json::to_value(ByteString(bundle_pem.to_vec())).map_err(Error::Encode)?;
    let mut ops = Vec::new();
    let mut names = Vec::new();
    for (i, hook) in webhook.webhooks.iter().flatten().enumerate() {
        let current = hook
            .client_config
            .ca_bundle
            .as_ref()
            .and_then(|b| certs::bundle_set(&b.0));
        if current.is_some() && current == wanted {
            continue;
        }
        let index = i.to_string();
        ops.push(PatchOperation::Test(TestOperation {
            path: PointerBuf::from_tokens(["webhooks", index.as_str(), "name"]),
            value: serde_json::Value::String(hook.name.clone()),
        }));
        // `add` also replaces an existing member, and unlike `replace` does not fail when
        // the chart left caBundle out.
        ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["webhooks", index.as_str(), "clientConfig", "caBundle"]),
            value: bundle.clone(),
        }));
        names.push(hook.name.clone());
    }
    Ok((!ops.is_empty()).then_some((json_patch::Patch(ops), names)))
}
