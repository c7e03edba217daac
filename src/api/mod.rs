//! The spillway API: group `spillway.dev`, version `v1alpha1`.

mod conditions;
mod endpoints;
mod inference_service;
pub mod labels;
/// Whether the served version is pinned.
pub mod pinning;
mod request_classes;
mod rollout;
mod scaling_policy;

pub use conditions::*;
pub use endpoints::*;
pub use inference_service::*;
pub use request_classes::*;
pub use rollout::*;
pub use scaling_policy::*;

use schemars::{Schema, SchemaGenerator, json_schema};

/// The API group of every spillway resource.
pub const GROUP: &str = "spillway.dev";

/// `conditions` as a list-map keyed by `type`, so the reconciler and the autoscaler can each
/// own their own conditions under server-side apply without overwriting the other's.
pub(crate) fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema =
        generator.subschema_for::<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema.insert("maxItems".into(), 16.into());
    schema
}

/// An object stored as given (e.g. a full Affinity): keeps the CRD small while the
/// API server still checks it where it lands, in the Deployment.
pub(crate) fn preserve_unknown_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}
