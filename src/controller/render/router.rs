//! Pure rendering of a service's router: Deployment, ConfigMap (never secrets), the least RBAC
//! it needs, and a PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecretProjection,
    SecurityContext, ServiceAccount, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::api::{InferenceService, ScalingPolicySpec};
use crate::controller::names::{engine_name, labels, router_name, selector_labels};
use crate::router::config::{self as router_config, CONFIG_KEY, KEYS_DIR, PEER_PORT, ROUTER_PORT};

/// Every object of a service's router.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterObjects {
    pub config_map: ConfigMap,
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub deployment: Deployment,
    pub pdb: PodDisruptionBudget,
}

/// Where the router's ConfigMap is mounted.
const CONFIG_DIR: &str = "/etc/spillway/router";
/// How long a terminating router goes on accepting: about what endpoint updates take to reach
/// every node's proxy.
const SHUTDOWN_DELAY_SECONDS: u64 = 5;

/// Renders the router objects. `meta` builds owned metadata (name, namespace, labels, owner).
pub fn render(
    isvc: &InferenceService,
    policy: &ScalingPolicySpec,
    router_image: &str,
    namespace: &str,
    owner: &OwnerReference,
) -> RouterObjects {
    let name = isvc.metadata.name.clone().unwrap_or_default();
    let router = router_name(&name);
    let engine = engine_name(&name);
    let meta = || ObjectMeta {
        name: Some(router.clone()),
        namespace: Some(namespace.to_string()),
        labels: Some(labels(&name, "router")),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };

    let config = router_config::render(isvc, policy, &engine);
    let config_map = ConfigMap {
        metadata: meta(),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_string(),
            serde_saphyr::to_string(&config).expect("router config serialises"),
        )])),
        ..ConfigMap::default()
    };

    let service_account = ServiceAccount {
        metadata: meta(),
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    };

    // Only what the router reads: its engines' EndpointSlices, its own ConfigMap and its own
    // InferenceService (for the capacity state). No Secrets: keys arrive as mounted files.
    let rule = |group: &str, resource: &str, names: Option<Vec<String>>| PolicyRule {
        api_groups: Some(vec![group.to_string()]),
        resources: Some(vec![resource.to_string()]),
        resource_names: names,
        verbs: vec!["get".into(), "list".into(), "watch".into()],
        ..PolicyRule::default()
    };
    let role = Role {
        metadata: meta(),
        rules: Some(vec![
            rule("discovery.k8s.io", "endpointslices", None),
            rule("", "configmaps", Some(vec![router.clone()])),
            rule(
                crate::api::GROUP,
                "inferenceservices",
                Some(vec![name.clone()]),
            ),
        ]),
    };
    let role_binding = RoleBinding {
        metadata: meta(),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: router.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: router.clone(),
            namespace: Some(namespace.to_string()),
            ..Subject::default()
        }]),
    };

    // One projected volume with each provider's key as a file named after the provider and its
    // Secret (see `router_config::key_path`).
    // `optional`: a missing Secret must not keep the router (and local serving) from starting;
    // the controller reports it as Degraded/SecretNotFound instead.
    let providers = isvc
        .spec
        .burst
        .as_ref()
        .map(|b| b.providers.as_slice())
        .unwrap_or_default();
    let key_volume = (!providers.is_empty()).then(|| Volume {
        name: "provider-keys".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(
                providers
                    .iter()
                    .map(|p| VolumeProjection {
                        secret: Some(SecretProjection {
                            name: p.api_key_secret_ref.name.clone(),
                            items: Some(vec![KeyToPath {
                                key: p.api_key_secret_ref.key.clone(),
                                path: router_config::key_path(p),
                                ..KeyToPath::default()
                            }]),
                            optional: Some(true),
                        }),
                        ..VolumeProjection::default()
                    })
                    .collect(),
            ),
            default_mode: Some(0o400),
        }),
        ..Volume::default()
    });

    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        ..Probe::default()
    };
    let deployment = Deployment {
        metadata: meta(),
        spec: Some(DeploymentSpec {
            replicas: Some(isvc.spec.router.replicas.max(1)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name, "router")),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&name, "router")),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(router.clone()),
                    containers: vec![Container {
                        name: "router".into(),
                        image: Some(router_image.to_string()),
                        // The mounted ConfigMap gives the first config; its `cluster` section then
                        // makes the router watch the ConfigMap, EndpointSlices and status itself.
                        args: Some(vec![
                            "router".into(),
                            "--config".into(),
                            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
                            // Connections keep coming until the Service's endpoints drop the pod.
                            "--shutdown-delay-seconds".into(),
                            SHUTDOWN_DELAY_SECONDS.to_string(),
                        ]),
                        // The pod name is the router's name among its peers.
                        env: Some(
                            [
                                ("POD_NAMESPACE", "metadata.namespace"),
                                ("POD_NAME", "metadata.name"),
                            ]
                            .into_iter()
                            .map(|(name, path)| EnvVar {
                                name: name.into(),
                                value_from: Some(EnvVarSource {
                                    field_ref: Some(ObjectFieldSelector {
                                        field_path: path.into(),
                                        ..ObjectFieldSelector::default()
                                    }),
                                    ..EnvVarSource::default()
                                }),
                                ..EnvVar::default()
                            })
                            .collect(),
                        ),
                        ports: Some(vec![
                            ContainerPort {
                                name: Some("http".into()),
                                container_port: ROUTER_PORT.into(),
                                protocol: Some("TCP".into()),
                                ..ContainerPort::default()
                            },
                            // Reports between the service's routers (`router::exchange`).
                            ContainerPort {
                                name: Some("peers".into()),
                                container_port: PEER_PORT.into(),
                                protocol: Some("UDP".into()),
                                ..ContainerPort::default()
                            },
                        ]),
                        readiness_probe: Some(probe("/readyz")),
                        liveness_probe: Some(probe("/healthz")),
                        resources: Some(ResourceRequirements {
                            requests: Some(BTreeMap::from([
                                ("cpu".to_string(), Quantity("100m".into())),
                                ("memory".to_string(), Quantity("64Mi".into())),
                            ])),
                            limits: Some(BTreeMap::from([(
                                "memory".to_string(),
                                Quantity("512Mi".into()),
                            )])),
                            ..ResourceRequirements::default()
                        }),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            run_as_non_root: Some(true),
                            capabilities: Some(Capabilities {
                                drop: Some(vec!["ALL".into()]),
                                ..Capabilities::default()
                            }),
                            ..SecurityContext::default()
                        }),
                        volume_mounts: Some(
                            std::iter::once(VolumeMount {
                                name: "config".into(),
                                mount_path: CONFIG_DIR.into(),
                                read_only: Some(true),
                                ..VolumeMount::default()
                            })
                            .chain(key_volume.as_ref().map(|v| VolumeMount {
                                name: v.name.clone(),
                                mount_path: KEYS_DIR.into(),
                                read_only: Some(true),
                                ..VolumeMount::default()
                            }))
                            .collect(),
                        ),
                        ..Container::default()
                    }],
                    volumes: Some(
                        std::iter::once(Volume {
                            name: "config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: router.clone(),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        })
                        .chain(key_volume)
                        .collect(),
                    ),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    // Above the router's delay and 300 s drain, so streams in flight finish on a
                    // rollout.
                    termination_grace_period_seconds: Some(330),
                    enable_service_links: Some(false),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    };

    let pdb = PodDisruptionBudget {
        metadata: meta(),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&name, "router")),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    };

    RouterObjects {
        config_map,
        service_account,
        role,
        role_binding,
        deployment,
        pdb,
    }
}
