//! Writing to the API server as spillway does: server-side apply under its field managers
//! (reconcile's, and the autoscaler's, which alone owns the engine's `spec.replicas`), status
//! the same way, and Events.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::InferenceService;

/// Server-side apply field manager of everything reconcile writes.
pub const FIELD_MANAGER: &str = "spillway";
/// Field manager that owns the engine Deployment's `spec.replicas` (the autoscaler's).
pub const REPLICAS_FIELD_MANAGER: &str = "spillway-autoscaler";

/// The one server-side apply helper: every owned object is written through it.
pub async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
}

/// Server-side applies `status` (only the fields it holds) under `manager`.
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    status: &impl Serialize,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
}

/// Records an Event on a service. Best effort: failing to record one must not fail the caller.
pub async fn publish_event(
    recorder: &Recorder,
    isvc: &InferenceService,
    type_: EventType,
    reason: &str,
    note: String,
    action: &str,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    match recorder.publish(&ev, &isvc.object_ref(&())).await {
        Ok(()) => {}
        // The namespace is going, with the service and its Events.
        Err(e) if namespace_terminating(&e) => {
            tracing::debug!(error = %e, "no event: the namespace is being deleted")
        }
        Err(e) => tracing::warn!(error = %e, "publishing an event failed"),
    }
}

/// Whether the API server refused to create an object because its namespace is being deleted
/// (kube-rs keeps no status causes, so the message tells).
pub fn namespace_terminating(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(a) if a.code == 403 && a.message.contains("because it is being terminated"))
}

/// Sets the engine Deployment's replicas with server-side apply under the autoscaler's field
/// manager (which alone owns `spec.replicas`); returns the Deployment as written.
pub async fn patch_replicas(
    client: &Client,
    ns: &str,
    name: &str,
    replicas: i32,
) -> Result<Deployment, kube::Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let body = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": replicas},
    });
    api.patch(
        name,
        &PatchParams::apply(REPLICAS_FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
}
