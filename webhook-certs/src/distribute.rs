//! Copies the CA bundle into a ConfigMap in every namespace that opted in to etcd-shim, so
//! that injected shims can mount it: a pod can only mount ConfigMaps of its own namespace.
//!
//! Used for the broker's serving certificate: the shim re-reads the mounted file for every
//! new broker connection, so a rotated bundle reaches running pods without a restart. The
//! bundle is written here before the Secret that the broker serves from, for the same reason
//! the webhook's caBundle is patched first: clients must trust a new CA before any server
//! presents a certificate from it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use tracing::{info, warn};

use crate::reconcile::{Error, MANAGED_BY, MANAGED_BY_LABEL, Result};

/// Key of the bundle in each ConfigMap; the shim is pointed at `<mount>/ca.crt`.
pub const BUNDLE_KEY: &str = "ca.crt";

/// Where the bundle goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Name of the ConfigMap written in each selected namespace.
    pub configmap: String,
    /// Label selector of the namespaces (`etcd-shim.io/inject=enabled`).
    pub namespace_selector: String,
}

/// What to do in one namespace, given the ConfigMap found there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The ConfigMap already holds exactly the bundle.
    Keep,
    Create,
    /// Ours, with another bundle: replace its data.
    Update,
    /// Someone else's ConfigMap of that name: never overwritten.
    Foreign,
}

/// Decides what to do with `found` so that it holds `bundle`.
pub fn action(found: Option<&ConfigMap>, bundle: &str) -> Action {
    let Some(cm) = found else {
        return Action::Create;
    };
    let managed = cm
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY);
    if !managed {
        return Action::Foreign;
    }
    let current = cm.data.as_ref().and_then(|d| d.get(BUNDLE_KEY));
    if current.map(String::as_str) == Some(bundle) {
        Action::Keep
    } else {
        Action::Update
    }
}

fn configmap(name: &str, namespace: &str, bundle: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            BUNDLE_KEY.to_string(),
            bundle.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

/// Writes `bundle` into the target ConfigMap of every selected namespace that does not hold
/// it yet; returns the namespaces written. Terminating namespaces are skipped (they refuse
/// creates); any other failure ends the run before the Secret is written.
pub async fn distribute(client: Client, target: &Target, bundle: &str) -> Result<Vec<String>> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let selected = namespaces
        .list(&ListParams::default().labels(&target.namespace_selector))
        .await
        .map_err(|e| {
            Error::from_kube(
                "list",
                &format!("Namespaces {}", target.namespace_selector),
                e,
            )
        })?;
    let mut written = Vec::new();
    for ns in selected.items {
        let Some(name) = ns.metadata.name.clone() else {
            continue;
        };
        let terminating = ns
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Terminating");
        if terminating {
            continue;
        }
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
        let object = format!("ConfigMap {name}/{}", target.configmap);
        let found = api
            .get_opt(&target.configmap)
            .await
            .map_err(|e| Error::from_kube("get", &object, e))?;
        match action(found.as_ref(), bundle) {
            Action::Keep => {}
            Action::Foreign => {
                warn!(configmap = %object, "exists without label {MANAGED_BY_LABEL}={MANAGED_BY}; not overwriting it");
            }
            Action::Create => {
                api.create(
                    &PostParams::default(),
                    &configmap(&target.configmap, &name, bundle),
                )
                .await
                .map_err(|e| Error::from_kube("create", &object, e))?;
                info!(configmap = %object, "created CA bundle");
                written.push(name);
            }
            Action::Update => {
                let mut cm = found.unwrap_or_default();
                cm.metadata.managed_fields = None;
                cm.data
                    .get_or_insert_default()
                    .insert(BUNDLE_KEY.to_string(), bundle.to_string());
                api.replace(&target.configmap, &PostParams::default(), &cm)
                    .await
                    .map_err(|e| Error::from_kube("update", &object, e))?;
                info!(configmap = %object, "updated CA bundle");
                written.push(name);
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(labels: &[(&str, &str)], bundle: Option<&str>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            data: bundle.map(|b| BTreeMap::from([(BUNDLE_KEY.to_string(), b.to_string())])),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn only_our_configmaps_are_written_and_only_when_stale() {
        let ours = [(MANAGED_BY_LABEL, MANAGED_BY)];
        assert_eq!(action(None, "A"), Action::Create);
        assert_eq!(action(Some(&found(&ours, Some("A"))), "A"), Action::Keep);
        assert_eq!(action(Some(&found(&ours, Some("B"))), "A"), Action::Update);
        assert_eq!(action(Some(&found(&ours, None)), "A"), Action::Update);
        assert_eq!(action(Some(&found(&[], Some("B"))), "A"), Action::Foreign);
        assert_eq!(
            action(Some(&found(&[(MANAGED_BY_LABEL, "Helm")], Some("B"))), "A"),
            Action::Foreign
        );
    }

    #[test]
    fn a_new_configmap_is_labelled_as_ours() {
        let cm = configmap("etcd-shim-broker-ca", "team-a", "PEM");
        assert_eq!(action(Some(&cm), "PEM"), Action::Keep);
        assert_eq!(cm.metadata.namespace.as_deref(), Some("team-a"));
    }
}
