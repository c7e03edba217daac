//! What defines a served version, and the name it goes by.

use k8s_openapi::api::core::v1::EnvVar;
use serde::Serialize;

use crate::api::{EngineResources, InferenceServiceSpec, ModelSpec};

/// The fields a revision is made of: the model, and the engine's image, arguments,
/// environment and resources. A change to any other field (port, probes, scheduling) applies
/// to the serving revision in place.
#[derive(Serialize)]
struct Served<'a> {
    model: &'a ModelSpec,
    image: &'a str,
    args: &'a [String],
    env: &'a [EnvVar],
    gpus: i32,
    gpu_resource: &'a str,
    resources: &'a Option<EngineResources>,
}

/// The revision's hash: 10 hex digits of the SHA-256 of its fields as JSON. Stable across
/// releases (unlike `std`'s hasher), since it names Deployments in the cluster.
pub fn revision_hash(spec: &InferenceServiceSpec) -> String {
    let e = &spec.engine;
    let served = Served {
        model: &spec.model,
        image: &e.image,
        args: &e.args,
        env: &e.env,
        gpus: e.gpus,
        gpu_resource: &e.gpu_resource,
        resources: &e.resources,
    };
    let json = serde_json::to_vec(&served).expect("plain data serialises");
    let digest = ring::digest::digest(&ring::digest::SHA256, &json);
    digest.as_ref()[..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{isvc_from_yaml, minimal_isvc_yaml};

    #[test]
    fn the_served_version_defines_a_revision_and_nothing_else_does() {
        let base = isvc_from_yaml(&minimal_isvc_yaml("a")).spec;
        let h = revision_hash(&base);
        assert_eq!(h.len(), 10);
        assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
        // The same on every call and every release: it names objects in the cluster.
        assert_eq!(h, revision_hash(&base.clone()));
        assert_eq!(
            h, "40dc32fc47",
            "the hash of a fixed spec must never change"
        );
        let changed = |f: &dyn Fn(&mut InferenceServiceSpec)| {
            let mut s = base.clone();
            f(&mut s);
            revision_hash(&s)
        };
        for served in [
            changed(&|s| s.engine.image = "engine:2".into()),
            changed(&|s| s.engine.args = vec!["--max-num-seqs".into(), "8".into()]),
            changed(&|s| s.model.uri = Some("hf://org/m@0e9e39f".into())),
            changed(&|s| s.engine.gpus = 2),
        ] {
            assert_ne!(served, h);
        }
        for same in [
            changed(&|s| s.engine.port = 9000),
            changed(&|s| s.engine.startup_timeout_seconds = 60),
            changed(&|s| s.engine.max_concurrency = 64),
        ] {
            assert_eq!(same, h);
        }
    }
}
