//! Shared test fixtures.

use crate::api::InferenceService;

/// Parses an InferenceService from YAML, with the API server's schema defaults applied the way
/// serde applies them.
pub fn isvc_from_yaml(yaml: &str) -> InferenceService {
    serde_saphyr::from_str(yaml).expect("test InferenceService parses")
}

/// A valid service named `name` in namespace `ml` with uid `uid-<name>`.
pub fn minimal_isvc_yaml(name: &str) -> String {
    format!(
        r#"
apiVersion: spillway.dev/v1alpha1
kind: InferenceService
metadata: {{name: {name}, namespace: ml, uid: uid-{name}, generation: 1}}
spec:
  model: {{name: m}}
  engine: {{image: "engine:1", gpus: 1}}
"#
    )
}
