//! Reconcile against a mocked API server (tower-test): each test scripts the API server's
//! replies and asserts the exact requests and bodies the controller sends.
//!
//! One file per feature; the harness they share is here.

mod autoscaler;
mod leader;
mod reconcile;
mod router_objects;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::metrics::Metrics;
use super::reconcile::{Context, Settings, reconcile, reconcile_policy};
use crate::api::{InferenceService, InferenceServiceStatus, ScalingPolicy};
use crate::test_support::{ApiServer, Seen, isvc_from_yaml, minimal_isvc_yaml};

struct Harness {
    ctx: Arc<Context>,
    api: ApiServer,
    _leader: watch::Sender<bool>,
    services: reflector::store::Writer<InferenceService>,
    /// The owned Deployments' cache (empty unless a test fills it).
    deployments: reflector::store::Writer<k8s_openapi::api::apps::v1::Deployment>,
}

fn harness(leader: bool) -> Harness {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let (leader_tx, leader_rx) = watch::channel(leader);
    let writer = reflector::store::Writer::<InferenceService>::default();
    let (owned, deployments) = super::owned::OwnedObjects::for_tests();
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "spillway-controller".into(),
                instance: Some("test".into()),
            },
        ),
        metrics: Arc::new(Metrics::default()),
        settings: Settings {
            cluster_domain: "cluster.local".into(),
            router_image: "spillway:test".into(),
        },
        leader: leader_rx,
        failures: Default::default(),
        services: writer.as_reader(),
        policies: reflector::store::Writer::<ScalingPolicy>::default().as_reader(),
        owned,
    });
    Harness {
        ctx,
        api: ApiServer {
            handle,
            events: Vec::new(),
        },
        _leader: leader_tx,
        services: writer,
        deployments,
    }
}

const NS: &str = "/apis/apps/v1/namespaces/ml";

const CORE: &str = "/api/v1/namespaces/ml";

const SPILLWAY: &str = "/apis/spillway.dev/v1alpha1/namespaces/ml";

fn with_policy_ref(name: &str, policy: &str) -> InferenceService {
    let mut isvc = isvc_from_yaml(&minimal_isvc_yaml(name));
    isvc.spec.scaling_policy_ref = Some(crate::api::PolicyRef {
        name: policy.into(),
    });
    isvc
}

fn policy_json(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "spillway.dev/v1alpha1", "kind": "ScalingPolicy",
           "metadata": {"name": name, "namespace": "ml", "generation": 1}, "spec": spec})
}

/// A Deployment as the API server would return it: owned by `isvc`, with the given replicas.
fn deployment_json(isvc: &InferenceService, replicas: i32, ready: i32) -> Value {
    let mut d = serde_json::to_value(
        super::render::render(&super::render::RenderInput {
            isvc,
            policy: &crate::api::ScalingPolicySpec::default(),
            router_image: "spillway:test",
            revision: None,
        })
        .unwrap()
        .engine_deployment,
    )
    .unwrap();
    d["spec"]["replicas"] = json!(replicas);
    // Each replica count the autoscaler set was a spec change.
    d["metadata"]["generation"] = json!(replicas + 1);
    d["status"] = json!({"replicas": replicas, "readyReplicas": ready});
    d
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:#}"))
}

/// Expects the engine Deployment to be created: server-side applied by `spillway` without
/// replicas, then its replicas set once by `spillway-autoscaler`. Returns the first apply.
async fn expect_engine_created(
    api: &mut ApiServer,
    isvc: &InferenceService,
    replicas: i32,
) -> Seen {
    let path = format!("{NS}/deployments/llama-engine");
    let applied = api
        .expect(
            Method::PATCH,
            &path,
            StatusCode::CREATED,
            deployment_json(isvc, 0, 0),
        )
        .await;
    assert_server_side_apply(&applied);
    assert!(
        applied.body["spec"].get("replicas").is_none(),
        "spillway never owns replicas"
    );
    let scaled = api
        .expect(
            Method::PATCH,
            &path,
            StatusCode::OK,
            deployment_json(isvc, replicas, 0),
        )
        .await;
    assert!(
        scaled.query.contains("fieldManager=spillway-autoscaler")
            && scaled.query.contains("force=true"),
        "{}",
        scaled.query
    );
    assert_eq!(scaled.body["spec"], json!({"replicas": replicas}));
    applied
}

/// Expects the engine Deployment to exist (owned) and be applied; returns the apply.
async fn expect_engine_applied(
    api: &mut ApiServer,
    isvc: &InferenceService,
    replicas: i32,
    ready: i32,
) -> Seen {
    let path = format!("{NS}/deployments/llama-engine");
    api.expect(
        Method::GET,
        &path,
        StatusCode::OK,
        deployment_json(isvc, replicas, ready),
    )
    .await;
    api.expect(
        Method::PATCH,
        &path,
        StatusCode::OK,
        deployment_json(isvc, replicas, ready),
    )
    .await
}

/// Expects the two Services to be absent and applied, in order.
async fn expect_services_applied(api: &mut ApiServer, name: &str) -> (Seen, Seen) {
    api.not_found(&format!("{CORE}/services/{name}-engine"))
        .await;
    let engine = api
        .expect(
            Method::PATCH,
            &format!("{CORE}/services/{name}-engine"),
            StatusCode::OK,
            Value::Null,
        )
        .await;
    api.not_found(&format!("{CORE}/services/{name}")).await;
    let client = api
        .expect(
            Method::PATCH,
            &format!("{CORE}/services/{name}"),
            StatusCode::OK,
            Value::Null,
        )
        .await;
    // No router (the fixture disables it): one look for a router this service owned before.
    api.not_found(&format!("{NS}/deployments/{name}-router"))
        .await;
    (engine, client)
}

fn assert_server_side_apply(seen: &Seen) {
    assert_eq!(seen.content_type, "application/apply-patch+yaml");
    assert!(
        seen.query.contains("fieldManager=spillway") && seen.query.contains("force=true"),
        "{}",
        seen.query
    );
}

/// One reconcile pass over an engine Deployment that the cache holds at `generation`, with
/// nothing else owned, expecting it to be written or not.
async fn pass_over_engine(h: &mut Harness, isvc: &InferenceService, generation: i64, write: bool) {
    let path = format!("{NS}/deployments/llama-engine");
    let mut live = deployment_json(isvc, 1, 1);
    live["metadata"]["generation"] = json!(generation);
    live["metadata"]["uid"] = json!("uid-engine");
    let cached: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(live.clone()).unwrap();
    h.deployments
        .apply_watcher_event(&watcher::Event::Apply(cached));
    let r = tokio::spawn(reconcile(Arc::new(isvc.clone()), h.ctx.clone()));
    if write {
        let seen = h
            .api
            .expect(Method::PATCH, &path, StatusCode::OK, live)
            .await;
        assert_server_side_apply(&seen);
        assert!(
            seen.body["spec"].get("replicas").is_none(),
            "never replicas"
        );
        // The write fails if the object was replaced since it was found.
        assert_eq!(seen.body["metadata"]["uid"], "uid-engine");
    }
    expect_services_applied(&mut h.api, "llama").await;
    h.api
        .expect_status(&format!("{SPILLWAY}/inferenceservices/llama/status"), isvc)
        .await;
    r.await.unwrap().unwrap();
}
