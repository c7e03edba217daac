//! Names, labels and ownership of the objects a service owns: what rendering writes, and what
//! reconcile, the caches and the autoscaler find them by.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;

use crate::api::InferenceService;

pub use crate::api::labels::*;

/// Selects the owned objects of every service (the controller's watches filter on it).
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=spillway";

/// The engine Deployment and its headless Service.
pub fn engine_name(isvc_name: &str) -> String {
    format!("{isvc_name}-engine")
}

/// The router's Deployment, ConfigMap, ServiceAccount, Role, RoleBinding and PDB.
pub fn router_name(isvc_name: &str) -> String {
    format!("{isvc_name}-router")
}

/// The URL clients call.
pub fn service_url(name: &str, namespace: &str, cluster_domain: &str) -> String {
    format!("http://{name}.{namespace}.svc.{cluster_domain}")
}

/// Standard labels on every owned object.
pub fn labels(isvc_name: &str, component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(isvc_name, component);
    l.insert(LABEL_NAME.into(), "spillway".into());
    l.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    l
}

/// The immutable subset used in selectors (a Deployment's selector can never change).
pub(crate) fn selector_labels(isvc_name: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_INSTANCE.to_string(), isvc_name.to_string()),
        (LABEL_COMPONENT.to_string(), component.to_string()),
    ])
}

/// Whether `meta` carries a controller ownerReference to `owner` (by uid).
pub fn is_owned_by(meta: &ObjectMeta, owner: &InferenceService) -> bool {
    let uid = owner.meta().uid.as_deref();
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && Some(r.uid.as_str()) == uid)
}
