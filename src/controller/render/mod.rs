//! Pure rendering: an InferenceService (and its policy) in, the objects it owns out.
//! No client, no clock: every function here is a plain function over plain data. The engine's
//! objects are in `engine`, the router's in [`router`]; this module puts them together.

mod engine;
pub mod router;

pub use router::RouterObjects;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::names::{LABEL_REVISION, engine_name, labels, selector_labels};
use crate::api::{InferenceService, ScalingPolicySpec};
use crate::rollout::drive::Revision;

/// The client Service's port.
pub const CLIENT_PORT: i32 = 80;

/// What rendering needs besides the InferenceService itself.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderInput<'a> {
    pub isvc: &'a InferenceService,
    /// The effective scaling policy (its burst settings go into the router config).
    pub policy: &'a ScalingPolicySpec,
    /// Image of the per-service router.
    pub router_image: &'a str,
    /// The revision that serves what the spec says (`rollout::drive::plan`); `None`: the
    /// service's first, `<name>-engine`.
    pub revision: Option<&'a Revision>,
}

/// Every object a service owns, rendered.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// The Deployment of the revision the spec describes, without `spec.replicas` (the
    /// autoscaler owns it).
    pub engine_deployment: Deployment,
    /// Headless Service `<name>-engine` over every engine pod of the service (the router
    /// reads its EndpointSlices).
    pub engine_service: Service,
    /// Headless Service over that revision's pods alone, unless it is the first revision (the
    /// router gives its addresses to it rather than to `<name>-engine`).
    pub revision_service: Option<Service>,
    /// The stable client Service `<name>`: to the router, or to the engines without one.
    pub client_service: Service,
    /// The router's objects, unless `router.enabled` is false.
    pub router: Option<RouterObjects>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("InferenceService has no namespace")]
    NoNamespace,
    #[error("InferenceService has no uid yet (not read from the API server)")]
    NoUid,
    #[error("serialising an owned object: {0}")]
    Serialize(String),
}

/// Renders every owned object.
pub fn render(input: &RenderInput<'_>) -> Result<Rendered, RenderError> {
    let isvc = input.isvc;
    let owner = owner_reference(isvc)?;
    let ns = isvc.namespace().ok_or(RenderError::NoNamespace)?;
    let name = isvc.name_any();
    let engine = engine_name(&name);

    let meta = |obj_name: &str, component: &str| ObjectMeta {
        name: Some(obj_name.to_string()),
        namespace: Some(ns.clone()),
        labels: Some(labels(&name, component)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };

    let engine_service = engine::service(isvc, meta(&engine, "engine"), None);
    let (engine_deployment, revision_service) = match input.revision {
        Some(r) if r.name != engine => {
            let mut m = meta(&r.name, "engine");
            m.labels
                .get_or_insert_with(Default::default)
                .insert(LABEL_REVISION.into(), r.hash.clone());
            (
                engine::deployment(isvc, m.clone(), Some(&r.hash)),
                Some(engine::service(isvc, m, Some(&r.hash))),
            )
        }
        _ => (
            engine::deployment(isvc, meta(&engine, "engine"), None),
            None,
        ),
    };

    let router = isvc
        .spec
        .router
        .enabled
        .then(|| router::render(isvc, input.policy, input.router_image, &ns, &owner));
    // Both the router and engine containers name their port "http".
    let client_service = Service {
        metadata: meta(&name, "endpoint"),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(
                &name,
                if router.is_some() { "router" } else { "engine" },
            )),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: CLIENT_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };

    Ok(Rendered {
        engine_deployment,
        engine_service,
        revision_service,
        client_service,
        router,
    })
}

/// A controller ownerReference, so deleting the service garbage-collects what it owns.
pub fn owner_reference(isvc: &InferenceService) -> Result<OwnerReference, RenderError> {
    isvc.controller_owner_ref(&()).ok_or(RenderError::NoUid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::names::{
        LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME, is_owned_by, service_url,
    };
    use crate::test_support::isvc_from_yaml;
    use k8s_openapi::api::core::v1::Container;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    const ISVC: &str = r#"
apiVersion: spillway.dev/v1alpha1
kind: InferenceService
metadata: {name: llama-8b, namespace: ml, uid: uid-1, generation: 1}
spec:
  model: {name: meta-llama/Llama-3.1-8B-Instruct, uri: "s3://models/llama@sha256:abc"}
  engine:
    image: registry.internal/engine:1.4.2
    args: ["--max-num-seqs", "64"]
    env: [{name: HF_HOME, value: /cache}, {name: SPILLWAY_MODEL_NAME, value: override}]
    port: 8001
    gpus: 2
    gpuResource: amd.com/gpu
    resources: {cpu: "8", memory: 64Gi}
    nodeSelector: {pool: gpu}
    tolerations: [{key: gpu, operator: Exists, effect: NoSchedule}]
    affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: zone, operator: In, values: [a]}]}]}}}
    startupTimeoutSeconds: 1205
"#;

    fn rendered() -> Rendered {
        let isvc = isvc_from_yaml(ISVC);
        render(&RenderInput {
            isvc: &isvc,
            policy: &ScalingPolicySpec::default(),
            router_image: "spillway:test",
            revision: None,
        })
        .unwrap()
    }

    fn engine_container(r: &Rendered) -> Container {
        r.engine_deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .clone()
    }

    /// A candidate revision gets a Deployment and a Service of its own, selecting its pods by
    /// their revision label; the first revision keeps `<name>-engine` and its selector (which
    /// can never change), and no Service of its own.
    #[test]
    fn a_revision_selects_its_own_pods_and_the_first_keeps_its_selector() {
        let isvc = isvc_from_yaml(ISVC);
        let rev = Revision {
            name: "llama-8b-1a2b3c".into(),
            hash: "1a2b3c4d5e".into(),
        };
        let r = render(&RenderInput {
            isvc: &isvc,
            policy: &ScalingPolicySpec::default(),
            router_image: "spillway:test",
            revision: Some(&rev),
        })
        .unwrap();
        let d = &r.engine_deployment;
        assert_eq!(d.metadata.name.as_deref(), Some("llama-8b-1a2b3c"));
        let spec = d.spec.as_ref().unwrap();
        let selector = spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(
            selector.get(LABEL_REVISION).map(String::as_str),
            Some("1a2b3c4d5e")
        );
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
        let svc = r.revision_service.as_ref().expect("its own Service");
        assert_eq!(svc.metadata.name.as_deref(), Some("llama-8b-1a2b3c"));
        assert_eq!(svc.spec.as_ref().unwrap().selector.as_ref(), Some(selector));
        // `<name>-engine` still selects every engine pod.
        let broad = r
            .engine_service
            .spec
            .as_ref()
            .unwrap()
            .selector
            .as_ref()
            .unwrap();
        assert_eq!(broad.get(LABEL_REVISION), None);

        let first = Revision {
            name: "llama-8b-engine".into(),
            hash: "1a2b3c4d5e".into(),
        };
        let r = render(&RenderInput {
            isvc: &isvc,
            policy: &ScalingPolicySpec::default(),
            router_image: "spillway:test",
            revision: Some(&first),
        })
        .unwrap();
        assert_eq!(
            r,
            rendered(),
            "the first revision renders as before revisions"
        );
    }

    #[test]
    fn engine_deployment_leaves_replicas_to_the_autoscaler() {
        let r = rendered();
        let spec = r.engine_deployment.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, None);
        assert_eq!(
            r.engine_deployment.metadata.name.as_deref(),
            Some("llama-8b-engine")
        );
        assert_eq!(
            r.engine_deployment.metadata.namespace.as_deref(),
            Some("ml")
        );
        let ru = spec
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .as_ref()
            .unwrap();
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
    }

    #[test]
    fn gpu_limit_under_configured_resource_name_and_resources() {
        let c = engine_container(&rendered());
        let res = c.resources.unwrap();
        let limits = res.limits.unwrap();
        assert_eq!(limits.get("amd.com/gpu"), Some(&Quantity("2".into())));
        assert!(!limits.contains_key("nvidia.com/gpu"));
        assert_eq!(limits.get("memory"), Some(&Quantity("64Gi".into())));
        assert!(
            !limits.contains_key("cpu"),
            "no CPU limit: engines must not be throttled"
        );
        let requests = res.requests.unwrap();
        assert_eq!(requests.get("cpu"), Some(&Quantity("8".into())));
    }

    #[test]
    fn zero_gpus_sets_no_gpu_limit() {
        let mut isvc = isvc_from_yaml(ISVC);
        isvc.spec.engine.gpus = 0;
        isvc.spec.engine.resources = None;
        let r = render(&RenderInput {
            isvc: &isvc,
            policy: &ScalingPolicySpec::default(),
            router_image: "spillway:test",
            revision: None,
        })
        .unwrap();
        assert_eq!(engine_container(&r).resources.unwrap().limits, None);
    }

    #[test]
    fn shm_probes_and_grace_period() {
        let r = rendered();
        let pod = r.engine_deployment.spec.unwrap().template.spec.unwrap();
        let vol = &pod.volumes.as_ref().unwrap()[0];
        assert_eq!(
            vol.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
        let c = &pod.containers[0];
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/dev/shm");
        let startup = c.startup_probe.as_ref().unwrap();
        // 1205 s at 10 s per probe: 121 failures, so the full timeout is covered.
        assert_eq!(startup.failure_threshold, Some(121));
        assert_eq!(startup.period_seconds, Some(10));
        assert_eq!(
            startup.http_get.as_ref().unwrap().path.as_deref(),
            Some("/health")
        );
        assert!(c.readiness_probe.is_some());
        assert_eq!(pod.termination_grace_period_seconds, Some(120));
    }

    #[test]
    fn image_args_env_port_and_placement_pass_through() {
        let r = rendered();
        let pod = r.engine_deployment.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.internal/engine:1.4.2"));
        assert_eq!(
            c.args.as_ref().unwrap(),
            &vec!["--max-num-seqs".to_string(), "64".into()]
        );
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8001);
        let env = c.env.as_ref().unwrap();
        let get = |n: &str| {
            env.iter()
                .filter(|v| v.name == n)
                .map(|v| v.value.clone().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            get("SPILLWAY_MODEL_NAME"),
            vec!["override"],
            "user env wins, no duplicates"
        );
        assert_eq!(
            get("SPILLWAY_MODEL_URI"),
            vec!["s3://models/llama@sha256:abc"]
        );
        assert_eq!(get("HF_HOME"), vec!["/cache"]);
        assert_eq!(
            pod.node_selector.unwrap().get("pool").map(String::as_str),
            Some("gpu")
        );
        assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("gpu"));
        assert!(pod.affinity.unwrap().node_affinity.is_some());
    }

    #[test]
    fn labels_and_controller_owner_reference_on_every_object() {
        let r = rendered();
        for meta in [
            &r.engine_deployment.metadata,
            &r.engine_service.metadata,
            &r.client_service.metadata,
        ] {
            let l = meta.labels.as_ref().unwrap();
            assert_eq!(l[LABEL_NAME], "spillway");
            assert_eq!(l[LABEL_INSTANCE], "llama-8b");
            assert_eq!(l[LABEL_MANAGED_BY], "spillway");
            assert!(l.contains_key(LABEL_COMPONENT));
            let owners = meta.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "InferenceService");
            assert_eq!(owners[0].api_version, "spillway.dev/v1alpha1");
            assert_eq!(owners[0].uid, "uid-1");
            assert_eq!(owners[0].controller, Some(true));
        }
    }

    #[test]
    fn services_headless_engine_and_client_endpoint() {
        let r = rendered();
        let es = r.engine_service.spec.unwrap();
        assert_eq!(es.cluster_ip.as_deref(), Some("None"));
        assert_eq!(es.ports.unwrap()[0].port, 8001);
        let cs = r.client_service.spec.unwrap();
        assert_eq!(r.client_service.metadata.name.as_deref(), Some("llama-8b"));
        assert_eq!(cs.ports.as_ref().unwrap()[0].port, 80);
        // With the router (the default), clients reach it; without, the engines.
        assert_eq!(cs.selector.unwrap()[LABEL_COMPONENT], "router");
        assert!(r.router.is_some());
        let mut isvc = isvc_from_yaml(ISVC);
        isvc.spec.router.enabled = false;
        let direct = render(&RenderInput {
            isvc: &isvc,
            policy: &ScalingPolicySpec::default(),
            router_image: "spillway:test",
            revision: None,
        })
        .unwrap();
        assert!(direct.router.is_none());
        assert_eq!(
            direct.client_service.spec.unwrap().selector.unwrap()[LABEL_COMPONENT],
            "engine"
        );
        assert_eq!(
            service_url("llama-8b", "ml", "cluster.local"),
            "http://llama-8b.ml.svc.cluster.local"
        );
    }

    #[test]
    fn selector_matches_pod_labels() {
        let r = rendered();
        let spec = r.engine_deployment.spec.unwrap();
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        for (k, v) in spec.selector.match_labels.unwrap() {
            assert_eq!(pod_labels.get(&k), Some(&v));
        }
    }

    #[test]
    fn ownership_is_by_uid() {
        let isvc = isvc_from_yaml(ISVC);
        let r = rendered();
        assert!(is_owned_by(&r.engine_deployment.metadata, &isvc));
        let mut other = isvc.clone();
        other.metadata.uid = Some("uid-2".into());
        assert!(!is_owned_by(&r.engine_deployment.metadata, &other));
        assert!(!is_owned_by(&ObjectMeta::default(), &isvc));
    }

    #[test]
    fn no_uid_is_an_error_not_a_panic() {
        let mut isvc = isvc_from_yaml(ISVC);
        isvc.metadata.uid = None;
        let err = render(&RenderInput {
            isvc: &isvc,
            policy: &ScalingPolicySpec::default(),
            router_image: "spillway:test",
            revision: None,
        })
        .unwrap_err();
        assert_eq!(err, RenderError::NoUid);
    }
}
