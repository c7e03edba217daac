//! Cluster sources: backends from the engine Services' EndpointSlices (a reflector), the config
//! from ConfigMap `<name>-router`, and the capacity state and revision weights from the
//! InferenceService status, all
//! watched through the API so changes apply within seconds. The conversions are pure.
//!
//! RBAC the router needs in its namespace: `get`, `list`, `watch` on
//! `discovery.k8s.io/endpointslices`, `configmaps` and `spillway.dev/inferenceservices`.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use super::config::{CONFIG_KEY, ClusterConfig, ConfigError, RouterConfig};
use super::revisions::{Listed, Route};
use super::sources;
use super::state::RouterState;
use crate::api::labels::{LABEL_COMPONENT, LABEL_INSTANCE};
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

/// An endpoint address with a port (an IPv6 one bracketed).
fn host_port(ip: &str, v6: bool, port: u16) -> String {
    if v6 {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// `host:port` of every endpoint `keep` keeps, sorted and without duplicates (FQDN slices are
/// skipped).
fn addresses<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: u16,
    keep: impl Fn(&Endpoint) -> bool + Copy,
) -> Vec<String> {
    let mut out: Vec<String> = slices
        .into_iter()
        .filter(|s| s.address_type == "IPv4" || s.address_type == "IPv6")
        .flat_map(|s| {
            let v6 = s.address_type == "IPv6";
            s.endpoints
                .iter()
                .filter(move |e| keep(e))
                .flat_map(move |e| e.addresses.iter().map(move |a| host_port(a, v6, port)))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `host:port` of every ready endpoint, sorted and without duplicates. An endpoint whose
/// readiness is unknown counts as ready (the API's documented reading).
pub fn backends_from_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: u16,
) -> Vec<String> {
    addresses(slices, port, |e| {
        e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
    })
}

/// The peer routers' report addresses: every router pod listed but this one (`own`, its pod
/// name), ready or not, one address each (IPv4 first: a dual-stack pod is one router). A
/// router starting or draining still has requests on the engines, so it counts as long as it
/// is listed.
pub fn peers_from_slices<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: u16,
    own: &str,
) -> Vec<String> {
    let mut slices: Vec<&EndpointSlice> = slices
        .into_iter()
        .filter(|s| s.address_type == "IPv4" || s.address_type == "IPv6")
        .collect();
    slices.sort_by_key(|s| s.address_type != "IPv4");
    let mut pods = std::collections::BTreeMap::new();
    for s in slices {
        for e in &s.endpoints {
            let pod = e.target_ref.as_ref().and_then(|r| r.name.clone());
            let Some(ip) = e.addresses.first().filter(|_| pod.as_deref() != Some(own)) else {
                continue;
            };
            let addr = host_port(ip, s.address_type == "IPv6", port);
            // An endpoint without a pod is a router of its own.
            pods.entry(pod.unwrap_or_else(|| ip.clone()))
                .or_insert(addr);
        }
    }
    let mut out: Vec<String> = pods.into_values().collect();
    out.sort();
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
pub fn spawn(client: Client, cluster: ClusterConfig, state: Arc<RouterState>) {
    spawn_endpoints(client.clone(), &cluster, state.clone());
    spawn_config(client.clone(), &cluster, state.clone());
    spawn_capacity(client, &cluster, state);
}

/// Ready engine addresses by Service name (every revision's Service, and `<name>-engine`
/// over them all), and the pod behind each (see `router::revisions`).
pub fn engines_by_service<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: u16,
) -> Listed {
    let mut by: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    let mut pods = BTreeMap::new();
    for s in slices {
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        by.entry(svc.clone()).or_default().push(s);
        let v6 = s.address_type == "IPv6";
        for e in &s.endpoints {
            let Some(pod) = e.target_ref.as_ref().and_then(|r| r.name.clone()) else {
                continue;
            };
            for a in &e.addresses {
                pods.insert(host_port(a, v6, port), pod.clone());
            }
        }
    }
    Listed {
        by_service: by
            .into_iter()
            .map(|(svc, s)| (svc, backends_from_slices(s, port)))
            .collect(),
        pods,
    }
}

/// The revisions taking requests, by weight, as the controller publishes them; empty before
/// it lists any (an older controller): then every engine of `<name>-engine` serves.
pub fn routes(isvc: &InferenceService) -> Vec<Route> {
    isvc.status
        .iter()
        .flat_map(|s| &s.revisions)
        .map(|r| Route {
            name: r.name.as_str().into(),
            weight: r.weight.clamp(0, 100) as u32,
            shadow: r.shadow_percent.clamp(0, 100) as u32,
        })
        .collect()
}

/// Backends from the EndpointSlices of the service's engine Services (found by the labels
/// the controller puts on them, which their slices carry too).
pub fn spawn_endpoints(
    client: Client,
    cluster: &ClusterConfig,
    state: Arc<RouterState>,
) -> tokio::task::JoinHandle<()> {
    let port = cluster.engine_port;
    let broad = cluster.engine_service.clone();
    state.set_synced(false);
    let selector = format!(
        "{LABEL_INSTANCE}={},{LABEL_COMPONENT}=engine",
        cluster.inference_service
    );
    watch_slices(client, cluster, &selector, move |slices, listed| {
        let by = engines_by_service(slices, port);
        tracing::debug!(services = by.by_service.len(), "engine endpoints changed");
        state.set_engine_addrs(broad.clone(), by);
        if listed && !state.endpoints_listed() {
            tracing::info!("engine endpoints listed");
            state.set_synced(true);
        }
    })
}

/// Peer routers from the client Service's EndpointSlices (the routers behind it), but this
/// one (`own`, its pod name); reports go to their `port`.
pub fn spawn_peers(
    client: Client,
    cluster: &ClusterConfig,
    state: Arc<RouterState>,
    own: String,
    port: u16,
) -> tokio::task::JoinHandle<()> {
    watch_slices(
        client,
        cluster,
        &format!("{SERVICE_NAME_LABEL}={}", cluster.router_service),
        move |slices, _| {
            let peers = peers_from_slices(slices, port, &own);
            tracing::debug!(peers = peers.len(), "peer routers changed");
            state.set_peers(&peers);
        },
    )
}

/// Calls `changed` with every EndpointSlice `selector` selects whenever one changes, and
/// whether they have been listed once.
fn watch_slices(
    client: Client,
    cluster: &ClusterConfig,
    selector: &str,
    changed: impl Fn(&mut dyn Iterator<Item = &EndpointSlice>, bool) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let slices: Api<EndpointSlice> = Api::namespaced(client, &cluster.namespace);
    let cfg = watcher::Config::default().labels(selector);
    let (reader, writer) = reflector::store();
    tokio::spawn(
        reflector::reflector(writer, watcher::watcher(slices, cfg).default_backoff()).for_each(
            move |ev| {
                match ev {
                    // Recomputed from the whole store: deletions and relists included.
                    Ok(e @ (Event::Apply(_) | Event::Delete(_) | Event::InitDone)) => {
                        let stored = reader.state();
                        changed(
                            &mut stored.iter().map(|a| a.as_ref()),
                            matches!(e, Event::InitDone),
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "EndpointSlice watch error (retrying)"),
                }
                futures::future::ready(())
            },
        ),
    )
}

/// The config from ConfigMap `<name>-router`.
pub fn spawn_config(
    client: Client,
    cluster: &ClusterConfig,
    state: Arc<RouterState>,
) -> tokio::task::JoinHandle<()> {
    let cms: Api<ConfigMap> = Api::namespaced(client, &cluster.namespace);
    let name = configmap_name(&cluster.inference_service);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    tokio::spawn(
        watcher::watcher(cms, cfg)
            .default_backoff()
            .applied_objects()
            .for_each(move |cm| {
                match cm {
                    Ok(cm) => match config_from_configmap(&cm) {
                        Ok(c) => {
                            // Backends in a cluster come from EndpointSlices, not the file.
                            tracing::info!(configmap = %name, "router config applied");
                            sources::apply(&state, c, None);
                        }
                        Err(e) => sources::invalid(&state, &name, &e),
                    },
                    Err(e) => tracing::warn!(error = %e, "ConfigMap watch error (retrying)"),
                }
                futures::future::ready(())
            }),
    )
}

/// The capacity state from the InferenceService's `CapacityExhausted` condition.
pub fn spawn_capacity(
    client: Client,
    cluster: &ClusterConfig,
    state: Arc<RouterState>,
) -> tokio::task::JoinHandle<()> {
    state.set_routes_known(false);
    let isvcs: Api<InferenceService> = Api::namespaced(client, &cluster.namespace);
    let cfg =
        watcher::Config::default().fields(&format!("metadata.name={}", cluster.inference_service));
    tokio::spawn(
        watcher::watcher(isvcs, cfg)
            .default_backoff()
            .applied_objects()
            .for_each(move |isvc| {
                match isvc {
                    Ok(i) => {
                        state.set_capacity_exhausted(capacity_exhausted(&i));
                        state.set_routes(routes(&i));
                        state.set_routes_known(true);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "InferenceService watch error (retrying)")
                    }
                }
                futures::future::ready(())
            }),
    )
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

    /// Every router pod but this one, ready or not, one address each (a dual-stack pod's
    /// IPv4 one), on the peers' port.
    #[test]
    fn peers_are_the_other_router_pods_one_address_each() {
        let pod = |addr: &str, name: &str, ready: Option<bool>| Endpoint {
            target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                name: Some(name.into()),
                ..Default::default()
            }),
            ..endpoint(addr, ready)
        };
        let v4 = slice(
            "IPv4",
            vec![
                pod("10.0.0.1", "r-self", Some(true)),
                pod("10.0.0.2", "r-b", Some(true)),
                pod("10.0.0.3", "r-starting", Some(false)),
            ],
        );
        let v6 = slice(
            "IPv6",
            vec![
                pod("fd00::2", "r-b", Some(true)),
                pod("fd00::9", "r-v6", None),
            ],
        );
        assert_eq!(
            peers_from_slices([&v6, &v4], 8081, "r-self"),
            vec!["10.0.0.2:8081", "10.0.0.3:8081", "[fd00::9]:8081"]
        );
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
    fn engines_are_grouped_by_service_and_routes_come_from_status() {
        let mut a = slice("IPv4", vec![endpoint("10.0.0.1", Some(true))]);
        a.metadata.labels =
            Some([(SERVICE_NAME_LABEL.to_string(), "llama-engine".to_string())].into());
        let mut b = slice(
            "IPv4",
            vec![
                endpoint("10.0.0.2", Some(true)),
                endpoint("10.0.0.3", Some(false)),
            ],
        );
        b.metadata.labels =
            Some([(SERVICE_NAME_LABEL.to_string(), "llama-1a2b3c".to_string())].into());
        b.endpoints[0].target_ref = Some(k8s_openapi::api::core::v1::ObjectReference {
            kind: Some("Pod".into()),
            name: Some("llama-1a2b3c-7f6d5c4b3-9zz8k".into()),
            ..Default::default()
        });
        let unlabelled = slice("IPv4", vec![endpoint("10.0.0.9", Some(true))]);
        let by = engines_by_service([&a, &b, &unlabelled], 8000);
        assert_eq!(
            by.pods,
            BTreeMap::from([(
                "10.0.0.2:8000".to_string(),
                "llama-1a2b3c-7f6d5c4b3-9zz8k".to_string()
            )])
        );
        assert_eq!(
            by.by_service,
            BTreeMap::from([
                (
                    "llama-1a2b3c".to_string(),
                    vec!["10.0.0.2:8000".to_string()]
                ),
                (
                    "llama-engine".to_string(),
                    vec!["10.0.0.1:8000".to_string()]
                ),
            ])
        );
        let mut isvc: InferenceService = serde_json::from_value(serde_json::json!({
            "apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "llama", "namespace": "ml"},
            "spec": {"model": {"name": "m"}, "engine": {"image": "e"}},
        }))
        .unwrap();
        assert!(routes(&isvc).is_empty(), "no revisions listed: no routes");
        isvc.status = Some(
            serde_json::from_value(serde_json::json!({"revisions": [
                {"name": "llama-engine", "hash": "a", "role": "Stable", "weight": 90},
                {"name": "llama-1a2b3c", "hash": "b", "role": "Candidate", "weight": 10},
            ]}))
            .unwrap(),
        );
        let r = routes(&isvc);
        assert_eq!(r.len(), 2);
        assert_eq!((&*r[1].name, r[1].weight), ("llama-1a2b3c", 10));
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

    /// Plays the API server for one watch: answers the list, then the watch with `events`
    /// (JSON lines), and returns the query strings it saw.
    async fn serve_watch(
        handle: &mut tower_test::mock::Handle<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >,
        path: &str,
        list: serde_json::Value,
        events: &[serde_json::Value],
    ) -> Vec<String> {
        let mut queries = Vec::new();
        for reply in [
            list.to_string(),
            events.iter().map(|e| format!("{e}\n")).collect::<String>(),
        ] {
            let (req, send) =
                tokio::time::timeout(std::time::Duration::from_secs(5), handle.next_request())
                    .await
                    .expect("no request from the watcher")
                    .expect("client dropped");
            assert_eq!(req.uri().path(), path);
            queries.push(req.uri().query().unwrap_or_default().to_string());
            send.send_response(
                http::Response::builder()
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(reply.into_bytes()))
                    .unwrap(),
            );
        }
        queries
    }

    fn test_cluster() -> ClusterConfig {
        ClusterConfig {
            namespace: "ml".into(),
            inference_service: "llama".into(),
            engine_service: "llama-engine".into(),
            engine_port: 8000,
            router_service: "llama".into(),
            model: "m".into(),
        }
    }

    async fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn endpoint_slices_watched_through_the_api_become_backends() {
        let (svc, mut handle) = tower_test::mock::pair();
        let client = Client::new(svc, "ml");
        let state = RouterState::new(
            RouterConfig::from_yaml("{}").unwrap(),
            vec!["1.1.1.1:1".into()],
            Default::default(),
        );
        let task = spawn_endpoints(client, &test_cluster(), state.clone());
        assert!(!state.synced(), "ready before the endpoints were listed");
        let slice = |ips: &[&str], rv: &str| {
            serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "llama-engine-abc", "namespace": "ml", "resourceVersion": rv,
                    "labels": {"kubernetes.io/service-name": "llama-engine"}},
                "addressType": "IPv4",
                "endpoints": ips.iter().map(|ip| serde_json::json!({"addresses": [ip], "conditions": {"ready": true}})).collect::<Vec<_>>(),
            })
        };
        let list = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
            "metadata": {"resourceVersion": "1"},
            "items": [slice(&["10.0.0.1"], "1")],
        });
        let modified = serde_json::json!({"type": "MODIFIED", "object": slice(&["10.0.0.1", "10.0.0.2"], "2")});
        let queries = serve_watch(
            &mut handle,
            "/apis/discovery.k8s.io/v1/namespaces/ml/endpointslices",
            list,
            &[modified],
        )
        .await;
        assert!(
            queries
                .iter()
                .all(|q| q.contains("labelSelector=app.kubernetes.io%2Finstance%3Dllama%2Capp.kubernetes.io%2Fcomponent%3Dengine")),
            "{queries:?}"
        );
        wait_until("both endpoints are backends", || {
            state.backends() == ["10.0.0.1:8000", "10.0.0.2:8000"]
        })
        .await;
        assert!(state.synced());
        task.abort();
    }

    #[tokio::test]
    async fn the_capacity_state_is_watched_through_the_api() {
        let (svc, mut handle) = tower_test::mock::pair();
        let client = Client::new(svc, "ml");
        let state = RouterState::new(
            RouterConfig::from_yaml("{}").unwrap(),
            vec![],
            Default::default(),
        );
        let task = spawn_capacity(client, &test_cluster(), state.clone());
        let isvc = |exhausted: &str, rv: &str| {
            serde_json::json!({
                "apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceService",
                "metadata": {"name": "llama", "namespace": "ml", "resourceVersion": rv},
                "spec": {"model": {"name": "m"}, "engine": {"image": "e"}},
                "status": {"conditions": [{"type": "CapacityExhausted", "status": exhausted, "reason": "AtMaxReplicas",
                           "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
            })
        };
        let list = serde_json::json!({
            "apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceServiceList",
            "metadata": {"resourceVersion": "1"}, "items": [isvc("True", "1")],
        });
        let modified = serde_json::json!({"type": "MODIFIED", "object": isvc("False", "2")});
        let metric = |s: &RouterState| {
            s.metrics
                .render()
                .lines()
                .any(|l| l == "spillway_router_capacity_exhausted 1")
        };
        let queries = serve_watch(
            &mut handle,
            "/apis/spillway.dev/v1alpha1/namespaces/ml/inferenceservices",
            list,
            &[],
        )
        .await;
        assert!(
            queries
                .iter()
                .all(|q| q.contains("fieldSelector=metadata.name%3Dllama")),
            "{queries:?}"
        );
        wait_until("exhausted from the list", || metric(&state)).await;
        // The re-watch after the empty watch response carries the change.
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(
            http::Response::builder()
                .body(kube::client::Body::from(
                    format!("{modified}\n").into_bytes(),
                ))
                .unwrap(),
        );
        wait_until("no longer exhausted", || !metric(&state)).await;
        task.abort();
    }
}
