//! Cluster sources: backends from the engine Service's EndpointSlices (a reflector), the config
//! from ConfigMap `<name>-router`, and the capacity state from the InferenceService status, all
//! watched through the API so changes apply within seconds. The conversions are pure.
//!
//! RBAC the router needs in its namespace: `get`, `list`, `watch` on
//! `discovery.k8s.io/endpointslices`, `configmaps` and `spillway.dev/inferenceservices`.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use super::config::{CONFIG_KEY, ClusterConfig, ConfigError, RouterConfig};
use super::sources;
use super::state::Shared;
use crate::api::{CAPACITY_EXHAUSTED, InferenceService};

/// The label EndpointSlices carry naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("ConfigMap has no {CONFIG_KEY:?} key")]
    MissingKey,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// `host:port` of every ready endpoint, sorted and without duplicates. An endpoint whose
/// readiness is unknown counts as ready (the API's documented reading); FQDN slices are skipped.
pub fn backends_from_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: u16,
) -> Vec<String> {
    let mut out: Vec<String> = slices
        .into_iter()
        .filter(|s| s.address_type == "IPv4" || s.address_type == "IPv6")
        .flat_map(|s| {
            let v6 = s.address_type == "IPv6";
            s.endpoints
                .iter()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .flat_map(move |e| {
                    e.addresses.iter().map(move |a| {
                        if v6 {
                            format!("[{a}]:{port}")
                        } else {
                            format!("{a}:{port}")
                        }
                    })
                })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether the controller reports capacity exhausted (`CapacityExhausted=True`).
pub fn capacity_exhausted(isvc: &InferenceService) -> bool {
    isvc.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == CAPACITY_EXHAUSTED && c.status == "True")
    })
}

/// The router config the controller rendered into the ConfigMap.
pub fn config_from_configmap(cm: &ConfigMap) -> Result<RouterConfig, ClusterError> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY))
        .ok_or(ClusterError::MissingKey)?;
    Ok(RouterConfig::from_yaml(text)?)
}

/// The ConfigMap the controller renders for a service.
pub fn configmap_name(inference_service: &str) -> String {
    format!("{inference_service}-router")
}

/// Starts the three watches; they retry with backoff for the life of the process.
pub fn spawn(client: Client, cluster: ClusterConfig, shared: Arc<Shared>) {
    let ns = cluster.namespace.clone();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let cfg = watcher::Config::default()
        .labels(&format!("{SERVICE_NAME_LABEL}={}", cluster.engine_service));
    let (reader, writer) = reflector::store();
    let port = cluster.engine_port;
    let s = shared.clone();
    tokio::spawn(
        reflector::reflector(writer, watcher::watcher(slices, cfg).default_backoff()).for_each(
            move |ev| {
                match ev {
                    // Recomputed from the whole store: deletions and relists included.
                    Ok(Event::Apply(_) | Event::Delete(_) | Event::InitDone) => {
                        let state = reader.state();
                        let b = backends_from_slices(state.iter().map(|a| a.as_ref()), port);
                        tracing::debug!(backends = b.len(), "engine endpoints changed");
                        s.set_backends(b);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "EndpointSlice watch error (retrying)"),
                }
                futures::future::ready(())
            },
        ),
    );

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let name = configmap_name(&cluster.inference_service);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let s = shared.clone();
    tokio::spawn(
        watcher::watcher(cms, cfg)
            .default_backoff()
            .applied_objects()
            .for_each(move |cm| {
                match cm.map_err(|e| e.to_string()) {
                    Ok(cm) => match config_from_configmap(&cm) {
                        Ok(c) => {
                            // Backends in a cluster come from EndpointSlices, not the file.
                            tracing::info!(configmap = %name, "router config applied");
                            sources::apply(&s, c, None);
                        }
                        Err(e) => sources::invalid(&s, &name, &e),
                    },
                    Err(e) => tracing::warn!(error = %e, "ConfigMap watch error (retrying)"),
                }
                futures::future::ready(())
            }),
    );

    let isvcs: Api<InferenceService> = Api::namespaced(client, &ns);
    let cfg =
        watcher::Config::default().fields(&format!("metadata.name={}", cluster.inference_service));
    tokio::spawn(
        watcher::watcher(isvcs, cfg)
            .default_backoff()
            .applied_objects()
            .for_each(move |isvc| {
                match isvc {
                    Ok(i) => shared.set_capacity_exhausted(capacity_exhausted(&i)),
                    Err(e) => {
                        tracing::warn!(error = %e, "InferenceService watch error (retrying)")
                    }
                }
                futures::future::ready(())
            }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn endpoint(addr: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![addr.into()],
            conditions: Some(EndpointConditions {
                ready,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(kind: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: kind.into(),
            endpoints,
            ..Default::default()
        }
    }

    #[test]
    fn ready_endpoints_of_every_slice_on_the_engine_port() {
        let a = slice(
            "IPv4",
            vec![
                endpoint("10.0.0.2", Some(true)),
                endpoint("10.0.0.3", Some(false)),
                endpoint("10.0.0.1", None),
            ],
        );
        let b = slice(
            "IPv6",
            vec![endpoint("fd00::1", Some(true)), endpoint("fd00::1", None)],
        );
        let c = slice("FQDN", vec![endpoint("engine.example", Some(true))]);
        let dup = slice("IPv4", vec![endpoint("10.0.0.2", Some(true))]);
        assert_eq!(
            backends_from_slices([&a, &b, &c, &dup], 8000),
            vec!["10.0.0.1:8000", "10.0.0.2:8000", "[fd00::1]:8000"]
        );
        assert!(backends_from_slices([], 8000).is_empty());
    }

    #[test]
    fn capacity_state_follows_the_condition() {
        let mut isvc: InferenceService = serde_json::from_value(serde_json::json!({
            "apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "x", "namespace": "ml"},
            "spec": {"model": {"name": "m"}, "engine": {"image": "e"}}
        }))
        .unwrap();
        assert!(!capacity_exhausted(&isvc));
        let cond = |status: &str| Condition {
            type_: CAPACITY_EXHAUSTED.into(),
            status: status.into(),
            reason: "AtMaxReplicas".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Default::default(),
            ),
        };
        isvc.status = Some(Default::default());
        isvc.status.as_mut().unwrap().conditions = vec![cond("True")];
        assert!(capacity_exhausted(&isvc));
        isvc.status.as_mut().unwrap().conditions = vec![cond("False")];
        assert!(!capacity_exhausted(&isvc));
    }

    #[test]
    fn config_from_the_rendered_configmap() {
        let mut cm = ConfigMap::default();
        assert!(matches!(
            config_from_configmap(&cm),
            Err(ClusterError::MissingKey)
        ));
        cm.data = Some(
            [(
                CONFIG_KEY.to_string(),
                "maxConcurrencyPerBackend: 8\nburst: {mode: Never}\n".to_string(),
            )]
            .into(),
        );
        let c = config_from_configmap(&cm).unwrap();
        assert_eq!(c.max_concurrency_per_backend, 8);
        assert_eq!(c.burst.mode, crate::api::BurstMode::Never);
        cm.data = Some([(CONFIG_KEY.to_string(), "queue: [".to_string())].into());
        assert!(matches!(
            config_from_configmap(&cm),
            Err(ClusterError::Config(_))
        ));
        assert_eq!(configmap_name("llama"), "llama-router");
    }
}
