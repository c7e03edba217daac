//! The engine's objects: its Deployment (the GPU pods) and the headless Service over them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use crate::api::{InferenceService, InferenceServiceSpec};
use crate::controller::names::{LABEL_REVISION, labels, selector_labels};

/// Seconds between startup probes; the failure threshold is sized from `startupTimeoutSeconds`.
const STARTUP_PERIOD_SECONDS: i32 = 10;
/// The engine Deployment, without `spec.replicas` (the autoscaler owns it).
pub(super) fn deployment(
    isvc: &InferenceService,
    metadata: ObjectMeta,
    revision: Option<&str>,
) -> Deployment {
    let name = isvc.name_any();
    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: None,
            selector: LabelSelector {
                match_labels: Some(revision_selector(&name, revision)),
                ..LabelSelector::default()
            },
            // Surge, never go below the ready count: the warm replica must survive a rollout.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            // Model load is slow; don't call a rollout stuck before a replica could possibly start.
            progress_deadline_seconds: Some(
                isvc.spec.engine.startup_timeout_seconds.saturating_add(600),
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some({
                        let mut l = labels(&name, "engine");
                        l.extend(revision_selector(&name, revision));
                        l
                    }),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(&isvc.spec)),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// Headless Service over the engine pods (the router reads its EndpointSlices).
/// The engine pods of one revision (`None`: of all, as the first revision selects them).
fn revision_selector(isvc_name: &str, revision: Option<&str>) -> BTreeMap<String, String> {
    let mut l = selector_labels(isvc_name, "engine");
    if let Some(hash) = revision {
        l.insert(LABEL_REVISION.into(), hash.into());
    }
    l
}

/// Headless Service over the engine pods of `revision` (`None`: every revision's).
pub(super) fn service(
    isvc: &InferenceService,
    metadata: ObjectMeta,
    revision: Option<&str>,
) -> Service {
    let name = isvc.name_any();
    Service {
        metadata,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(revision_selector(&name, revision)),
            ports: Some(vec![http_port(isvc.spec.engine.port)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn http_port(port: i32) -> ServicePort {
    ServicePort {
        name: Some("http".into()),
        port,
        target_port: Some(IntOrString::String("http".into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

fn pod_spec(spec: &InferenceServiceSpec) -> PodSpec {
    let e = &spec.engine;
    let probe = |period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(e.health_path.clone()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Probe::default()
    };
    // The startup probe gives model loading the whole startupTimeoutSeconds before liveness starts.
    let startup_failures =
        (e.startup_timeout_seconds + STARTUP_PERIOD_SECONDS - 1) / STARTUP_PERIOD_SECONDS;

    let mut env = vec![EnvVar {
        name: "SPILLWAY_MODEL_NAME".into(),
        value: Some(spec.model.name.clone()),
        ..EnvVar::default()
    }];
    if let Some(uri) = &spec.model.uri {
        env.push(EnvVar {
            name: "SPILLWAY_MODEL_URI".into(),
            value: Some(uri.clone()),
            ..EnvVar::default()
        });
    }
    // User env last: a user-set value of the same name wins.
    env.retain(|v| !e.env.iter().any(|u| u.name == v.name));
    env.extend(e.env.iter().cloned());

    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if e.gpus > 0 {
        limits.insert(e.gpu_resource.clone(), Quantity(e.gpus.to_string()));
    }
    if let Some(r) = &e.resources {
        if let Some(cpu) = &r.cpu {
            requests.insert("cpu".to_string(), cpu.clone());
        }
        if let Some(mem) = &r.memory {
            requests.insert("memory".to_string(), mem.clone());
            limits.insert("memory".to_string(), mem.clone());
        }
    }

    PodSpec {
        containers: vec![Container {
            name: "engine".into(),
            image: Some(e.image.clone()),
            args: (!e.args.is_empty()).then(|| e.args.clone()),
            env: Some(env),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: e.port,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]),
            resources: Some(ResourceRequirements {
                limits: (!limits.is_empty()).then_some(limits),
                requests: (!requests.is_empty()).then_some(requests),
                ..ResourceRequirements::default()
            }),
            startup_probe: Some(probe(STARTUP_PERIOD_SECONDS, startup_failures.max(1))),
            readiness_probe: Some(probe(5, 3)),
            liveness_probe: Some(probe(10, 6)),
            volume_mounts: Some(vec![VolumeMount {
                name: "dshm".into(),
                mount_path: "/dev/shm".into(),
                ..VolumeMount::default()
            }]),
            ..Container::default()
        }],
        // NCCL and PyTorch data loaders need a large shared-memory segment.
        volumes: Some(vec![Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        termination_grace_period_seconds: Some(e.termination_grace_period_seconds.into()),
        node_selector: (!e.node_selector.is_empty()).then(|| e.node_selector.clone()),
        tolerations: (!e.tolerations.is_empty()).then(|| e.tolerations.clone()),
        affinity: e.affinity.clone(),
        // Service env vars for every Service in the namespace are noise for an engine.
        enable_service_links: Some(false),
        ..PodSpec::default()
    }
}
