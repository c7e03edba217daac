//! Reconcile against a mocked API server (tower-test): each test scripts the API server's
//! replies and asserts the exact requests and bodies the controller sends.

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

#[tokio::test]
async fn new_service_creates_engine_services_and_status() {
    let Harness { ctx, mut api, .. } = harness(true);
    let isvc = with_policy_ref("llama", "fast");
    let reconciler = tokio::spawn(reconcile(Arc::new(isvc.clone()), ctx));

    api.expect(
        Method::GET,
        &format!("{SPILLWAY}/scalingpolicies/fast"),
        StatusCode::OK,
        policy_json(
            "fast",
            json!({"minReplicas": 1, "maxReplicas": 8, "launch": {"replicas": 3}}),
        ),
    )
    .await;
    api.not_found(&format!("{NS}/deployments/llama-engine"))
        .await;
    let created = expect_engine_created(&mut api, &isvc, 3).await;
    assert_eq!(
        created.body["metadata"]["ownerReferences"][0]["uid"],
        "uid-llama"
    );
    assert_eq!(
        created.body["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );

    let (engine_svc, client_svc) = expect_services_applied(&mut api, "llama").await;
    for s in [&engine_svc, &client_svc] {
        assert_server_side_apply(s);
        assert_eq!(
            s.body["metadata"]["ownerReferences"][0]["kind"],
            "InferenceService"
        );
    }
    assert_eq!(engine_svc.body["spec"]["clusterIP"], "None");
    assert_eq!(client_svc.body["spec"]["ports"][0]["port"], 80);

    let status = api
        .expect_status(&format!("{SPILLWAY}/inferenceservices/llama/status"), &isvc)
        .await;
    assert_server_side_apply(&status);
    let s = &status.body["status"];
    assert_eq!(s["observedGeneration"], 1);
    assert_eq!(s["url"], "http://llama.ml.svc.cluster.local");
    // Just created: no pod exists yet (the Deployment's own status arrives with the next pass).
    assert_eq!(s["replicas"], 0);
    assert_eq!(s["readyReplicas"], 0);
    assert_eq!(condition(s, "Ready")["status"], "False");
    assert_eq!(condition(s, "Ready")["reason"], "NoReplicas");
    assert_eq!(condition(s, "Degraded")["status"], "False");

    let action = reconciler.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(super::reconcile::RESYNC));
    let events = api.done().await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["reason"], "Created");
}

#[tokio::test]
async fn missing_policy_degrades_then_recovers_when_it_appears() {
    let Harness { ctx, mut api, .. } = harness(true);
    let mut isvc = with_policy_ref("llama", "fast");

    // Pass 1: no policy. The service still gets its engine, on defaults (1 replica).
    let r = tokio::spawn(reconcile(Arc::new(isvc.clone()), ctx.clone()));
    api.not_found(&format!("{SPILLWAY}/scalingpolicies/fast"))
        .await;
    api.not_found(&format!("{NS}/deployments/llama-engine"))
        .await;
    expect_engine_created(&mut api, &isvc, 1).await;
    expect_services_applied(&mut api, "llama").await;
    let status = api
        .expect_status(&format!("{SPILLWAY}/inferenceservices/llama/status"), &isvc)
        .await;
    let d = condition(&status.body["status"], "Degraded");
    assert_eq!(
        (d["status"].as_str(), d["reason"].as_str()),
        (Some("True"), Some("PolicyNotFound"))
    );
    assert!(d["message"].as_str().unwrap().contains("\"fast\""));
    r.await.unwrap().unwrap();
    assert!(
        api.events
            .iter()
            .any(|e| e["reason"] == "PolicyNotFound" && e["type"] == "Warning")
    );

    // The API server stored that status.
    isvc.status = Some(
        serde_json::from_value::<InferenceServiceStatus>(status.body["status"].clone()).unwrap(),
    );

    // Pass 2: the policy exists now (the ScalingPolicy watch triggers this pass).
    let r = tokio::spawn(reconcile(Arc::new(isvc.clone()), ctx.clone()));
    api.expect(
        Method::GET,
        &format!("{SPILLWAY}/scalingpolicies/fast"),
        StatusCode::OK,
        policy_json("fast", json!({"minReplicas": 2, "maxReplicas": 8})),
    )
    .await;
    let applied = expect_engine_applied(&mut api, &isvc, 1, 1).await;
    assert_server_side_apply(&applied);
    assert!(
        applied.body["spec"].get("replicas").is_none(),
        "reconcile must never write replicas"
    );
    expect_services_applied(&mut api, "llama").await;
    let status = api
        .expect_status(&format!("{SPILLWAY}/inferenceservices/llama/status"), &isvc)
        .await;
    let s = &status.body["status"];
    assert_eq!(condition(s, "Degraded")["status"], "False");
    assert_eq!(condition(s, "Degraded")["reason"], "AsExpected");
    assert_eq!(condition(s, "Ready")["status"], "True");
    r.await.unwrap().unwrap();
    api.done().await;
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

/// A pass writes an owned object only when the rendering or the object changed since the
/// last write: a rollout's status updates or the resync cost no write. (`pass_over_engine`
/// fails on a write it did not expect, or a missing one.)
#[tokio::test]
async fn an_object_is_written_again_only_when_it_changed() {
    let mut h = harness(true);
    let isvc = isvc_from_yaml(&minimal_isvc_yaml("llama"));
    // First sight of an existing Deployment (a restart): applied once.
    pass_over_engine(&mut h, &isvc, 5, true).await;
    // Unchanged since: not written, not even read.
    pass_over_engine(&mut h, &isvc, 5, false).await;
    // Someone changed its spec (the generation moved): written again.
    pass_over_engine(&mut h, &isvc, 6, true).await;
    // A new rendering (the service's spec changed): written again.
    let mut changed = isvc.clone();
    changed.spec.engine.args = vec!["--max-num-seqs".into(), "32".into()];
    pass_over_engine(&mut h, &changed, 6, true).await;
    h.api.done().await;
}

#[tokio::test]
async fn invalid_spec_changes_nothing_and_says_why() {
    let Harness { ctx, mut api, .. } = harness(true);
    // As if the CRD's validation had been bypassed (an old CRD, or a client that skipped it).
    let mut isvc = isvc_from_yaml(&minimal_isvc_yaml("llama"));
    isvc.spec.engine.gpus = -1;
    let r = tokio::spawn(reconcile(Arc::new(isvc.clone()), ctx));

    api.not_found(&format!("{NS}/deployments/llama-engine"))
        .await;
    let status = api
        .expect_status(&format!("{SPILLWAY}/inferenceservices/llama/status"), &isvc)
        .await;
    let s = &status.body["status"];
    assert_eq!(condition(s, "Degraded")["reason"], "InvalidSpec");
    assert!(
        condition(s, "Degraded")["message"]
            .as_str()
            .unwrap()
            .contains("engine.gpus -1 must be >= 0")
    );
    assert_eq!(condition(s, "Ready")["reason"], "InvalidSpec");
    // No retry loop: the next pass comes with the next spec change.
    assert_eq!(r.await.unwrap().unwrap(), Action::await_change());
    let events = api.done().await;
    assert!(
        events.iter().any(|e| e["reason"] == "InvalidSpec"),
        "{events:#?}"
    );
}

#[tokio::test]
async fn replicas_changed_by_someone_else_are_left_alone() {
    let Harness { ctx, mut api, .. } = harness(true);
    let isvc = isvc_from_yaml(&minimal_isvc_yaml("llama"));
    let r = tokio::spawn(reconcile(Arc::new(isvc.clone()), ctx));

    let applied = expect_engine_applied(&mut api, &isvc, 7, 5).await;
    assert_server_side_apply(&applied);
    assert!(
        applied.body["spec"].get("replicas").is_none(),
        "apply must not mention replicas: {:#}",
        applied.body
    );
    expect_services_applied(&mut api, "llama").await;
    let status = api
        .expect_status(&format!("{SPILLWAY}/inferenceservices/llama/status"), &isvc)
        .await;
    assert_eq!(status.body["status"]["replicas"], 7);
    assert_eq!(status.body["status"]["readyReplicas"], 5);
    r.await.unwrap().unwrap();
    api.done().await;
}

#[tokio::test]
async fn an_object_owned_by_someone_else_is_not_overwritten() {
    let Harness { ctx, mut api, .. } = harness(true);
    let isvc = isvc_from_yaml(&minimal_isvc_yaml("llama"));
    let r = tokio::spawn(reconcile(Arc::new(isvc.clone()), ctx));

    expect_engine_applied(&mut api, &isvc, 1, 1).await;
    api.not_found(&format!("{CORE}/services/llama-engine"))
        .await;
    api.expect(
        Method::PATCH,
        &format!("{CORE}/services/llama-engine"),
        StatusCode::OK,
        Value::Null,
    )
    .await;
    // A user's own Service named like our client Service: read, never patched.
    api.expect(
        Method::GET,
        &format!("{CORE}/services/llama"),
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "llama", "namespace": "ml"}}),
    )
    .await;
    api.not_found(&format!("{NS}/deployments/llama-router"))
        .await;
    let status = api
        .expect_status(&format!("{SPILLWAY}/inferenceservices/llama/status"), &isvc)
        .await;
    let d = condition(&status.body["status"], "Degraded");
    assert_eq!(d["reason"], "ObjectConflict");
    assert!(d["message"].as_str().unwrap().contains("Service ml/llama"));
    r.await.unwrap().unwrap();
    api.done().await;
}

#[tokio::test]
async fn unchanged_status_is_not_rewritten() {
    let Harness { ctx, mut api, .. } = harness(true);
    let mut isvc = isvc_from_yaml(&minimal_isvc_yaml("llama"));
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
    let desired = super::status::reconcile_status(
        &isvc,
        Some(super::status::EngineReplicas {
            replicas: 1,
            ready: 1,
        }),
        &[],
        "http://llama.ml.svc.cluster.local".into(),
        &now,
    );
    isvc.status = Some(InferenceServiceStatus {
        observed_generation: desired.observed_generation,
        conditions: desired.conditions,
        replicas: desired.replicas,
        ready_replicas: desired.ready_replicas,
        url: Some(desired.url),
        ..Default::default()
    });
    let r = tokio::spawn(reconcile(Arc::new(isvc.clone()), ctx));
    expect_engine_applied(&mut api, &isvc, 1, 1).await;
    expect_services_applied(&mut api, "llama").await;
    r.await.unwrap().unwrap();
    // done() fails on any further request, so a status write here would fail the test.
    let events = api.done().await;
    assert!(events.is_empty());
}

#[tokio::test]
async fn apply_failure_is_reported_and_backs_off() {
    let Harness { ctx, mut api, .. } = harness(true);
    let isvc = isvc_from_yaml(&minimal_isvc_yaml("llama"));
    let r = tokio::spawn(reconcile(Arc::new(isvc.clone()), ctx.clone()));
    api.not_found(&format!("{NS}/deployments/llama-engine"))
        .await;
    api.expect(
        Method::PATCH,
        &format!("{NS}/deployments/llama-engine"),
        StatusCode::FORBIDDEN,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "quota exceeded"}),
    )
    .await;
    // What still serves is read again for the status.
    api.not_found(&format!("{NS}/deployments/llama-engine"))
        .await;
    let status = api
        .expect_status(&format!("{SPILLWAY}/inferenceservices/llama/status"), &isvc)
        .await;
    assert_eq!(
        condition(&status.body["status"], "Degraded")["reason"],
        "ApplyFailed"
    );
    let err = r.await.unwrap().unwrap_err();
    assert_eq!(err.metric_reason(), "apply");
    // The error policy doubles the delay per consecutive failure.
    let obj = Arc::new(isvc);
    let first = super::reconcile::error_policy(obj.clone(), &err, ctx.clone());
    let second = super::reconcile::error_policy(obj, &err, ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(1)));
    assert_eq!(second, Action::requeue(Duration::from_secs(2)));
    assert!(ctx.metrics.encode().contains("reason=\"apply\"} 2"));
    let events = api.done().await;
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "ApplyFailed" && e["type"] == "Warning")
    );
}

/// Deleting a namespace deletes the owned objects before the service: reconcile must not
/// fight the deletion by recreating them (the API server refuses anyway), nor report it.
#[tokio::test]
async fn a_namespace_being_deleted_is_not_fought() {
    let Harness { ctx, mut api, .. } = harness(true);
    let isvc = isvc_from_yaml(&minimal_isvc_yaml("llama"));
    let r = tokio::spawn(reconcile(Arc::new(isvc), ctx));
    api.not_found(&format!("{NS}/deployments/llama-engine"))
        .await;
    let refused = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
        "message": "deployments.apps \"llama-engine\" is forbidden: unable to create new content in namespace ml because it is being terminated"});
    api.expect(
        Method::PATCH,
        &format!("{NS}/deployments/llama-engine"),
        StatusCode::FORBIDDEN,
        refused,
    )
    .await;
    assert_eq!(r.await.unwrap().unwrap(), Action::await_change());
    let events = api.done().await;
    assert!(
        events.is_empty(),
        "no status write, no Warning: {events:#?}"
    );
}

#[tokio::test]
async fn deletion_needs_no_requests() {
    let Harness { ctx, api, .. } = harness(true);
    let mut isvc = isvc_from_yaml(&minimal_isvc_yaml("llama"));
    isvc.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::now(),
    ));
    // ownerReferences let the garbage collector remove everything; reconcile has nothing to do.
    assert_eq!(
        reconcile(Arc::new(isvc), ctx).await.unwrap(),
        Action::await_change()
    );
    assert!(api.done().await.is_empty());
}

#[tokio::test]
async fn a_standby_replica_never_writes() {
    let Harness { ctx, api, .. } = harness(false);
    let isvc = isvc_from_yaml(&minimal_isvc_yaml("llama"));
    let action = reconcile(Arc::new(isvc), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert!(api.done().await.is_empty());
}

#[tokio::test]
async fn policy_status_counts_its_services() {
    let Harness {
        ctx,
        mut api,
        mut services,
        ..
    } = harness(true);
    for (name, policy) in [("a", "fast"), ("b", "fast"), ("c", "batch")] {
        services.apply_watcher_event(&watcher::Event::Apply(with_policy_ref(name, policy)));
    }
    let policy: ScalingPolicy = serde_json::from_value(policy_json("fast", json!({}))).unwrap();
    let r = tokio::spawn(reconcile_policy(Arc::new(policy.clone()), ctx));
    let status = api
        .expect_status(&format!("{SPILLWAY}/scalingpolicies/fast/status"), &policy)
        .await;
    assert_server_side_apply(&status);
    assert_eq!(status.body["status"]["services"], 2);
    assert_eq!(status.body["status"]["conditions"][0]["type"], "Valid");
    assert_eq!(status.body["status"]["conditions"][0]["status"], "True");
    r.await.unwrap().unwrap();
    api.done().await;
}

mod leader_election {
    use super::*;
    use crate::controller::leader::{LeaseConfig, try_acquire_or_renew};
    use k8s_openapi::api::coordination::v1::Lease;

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/spillway-system/leases";

    fn setup() -> (kube::Api<Lease>, ApiServer, LeaseConfig) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = kube::Api::namespaced(Client::new(svc, "default"), "spillway-system");
        let cfg = LeaseConfig::new(
            "spillway-controller".into(),
            "spillway-system".into(),
            "pod-a".into(),
        );
        (
            api,
            ApiServer {
                handle,
                events: Vec::new(),
            },
            cfg,
        )
    }

    fn lease(holder: &str, renewed: jiff::Timestamp, transitions: i32) -> Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "spillway-controller", "namespace": "spillway-system", "resourceVersion": "41"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                        "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                        "leaseTransitions": transitions}})
    }

    #[tokio::test]
    async fn creates_a_missing_lease() {
        let (leases, mut api, cfg) = setup();
        let round = tokio::spawn(async move { try_acquire_or_renew(&leases, &cfg).await });
        api.not_found(&format!("{LEASES}/spillway-controller"))
            .await;
        let created = api
            .expect(Method::POST, LEASES, StatusCode::CREATED, Value::Null)
            .await;
        assert_eq!(created.body["spec"]["holderIdentity"], "pod-a");
        assert!(round.await.unwrap().unwrap().held);
    }

    #[tokio::test]
    async fn follows_a_live_lease_without_writing() {
        let (leases, mut api, cfg) = setup();
        let round = tokio::spawn(async move { try_acquire_or_renew(&leases, &cfg).await });
        api.expect(
            Method::GET,
            &format!("{LEASES}/spillway-controller"),
            StatusCode::OK,
            lease("pod-b", jiff::Timestamp::now(), 2),
        )
        .await;
        assert!(!round.await.unwrap().unwrap().held);
        api.done().await;
    }

    #[tokio::test]
    async fn takes_over_an_expired_lease_with_optimistic_concurrency() {
        let (leases, mut api, cfg) = setup();
        let round = tokio::spawn(async move { try_acquire_or_renew(&leases, &cfg).await });
        let stale = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60);
        api.expect(
            Method::GET,
            &format!("{LEASES}/spillway-controller"),
            StatusCode::OK,
            lease("pod-b", stale, 2),
        )
        .await;
        let put = api
            .expect(
                Method::PUT,
                &format!("{LEASES}/spillway-controller"),
                StatusCode::OK,
                Value::Null,
            )
            .await;
        assert_eq!(
            put.body["metadata"]["resourceVersion"], "41",
            "the write must be conditional on what was read"
        );
        assert_eq!(put.body["spec"]["holderIdentity"], "pod-a");
        assert_eq!(put.body["spec"]["leaseTransitions"], 3);
        assert!(round.await.unwrap().unwrap().held);
    }

    #[tokio::test]
    async fn losing_the_race_is_not_leadership() {
        let (leases, mut api, cfg) = setup();
        let round = tokio::spawn(async move { try_acquire_or_renew(&leases, &cfg).await });
        let stale = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60);
        api.expect(
            Method::GET,
            &format!("{LEASES}/spillway-controller"),
            StatusCode::OK,
            lease("pod-b", stale, 2),
        )
        .await;
        // Another candidate wrote first: the API server rejects our stale resourceVersion.
        api.expect(
            Method::PUT,
            &format!("{LEASES}/spillway-controller"),
            StatusCode::CONFLICT,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        )
        .await;
        assert!(!round.await.unwrap().unwrap().held);
    }
}

mod router_objects {
    use super::*;

    fn with_router_and_burst() -> InferenceService {
        isvc_from_yaml(
            r#"
apiVersion: spillway.dev/v1alpha1
kind: InferenceService
metadata: {name: llama, namespace: ml, uid: uid-llama, generation: 1}
spec:
  model: {name: m}
  engine: {image: "engine:1", maxConcurrency: 8}
  burst:
    providers:
    - {name: together, url: "https://api.together.xyz/v1", model: turbo, apiKeySecretRef: {name: together-key, key: api-key}}
"#,
        )
    }

    /// Expects `GET` (absent) then a server-side apply of `path`; returns the applied body.
    async fn absent_then_applied(api: &mut ApiServer, path: &str) -> Seen {
        api.not_found(path).await;
        let seen = api
            .expect(Method::PATCH, path, StatusCode::OK, Value::Null)
            .await;
        assert_server_side_apply(&seen);
        assert_eq!(
            seen.body["metadata"]["ownerReferences"][0]["uid"],
            "uid-llama"
        );
        seen
    }

    #[tokio::test]
    async fn router_config_rbac_and_pdb_are_applied_and_a_missing_secret_degrades() {
        let Harness { ctx, mut api, .. } = harness(true);
        let isvc = with_router_and_burst();
        let r = tokio::spawn(reconcile(Arc::new(isvc.clone()), ctx));

        api.not_found(&format!("{NS}/deployments/llama-engine"))
            .await;
        expect_engine_created(&mut api, &isvc, 1).await;
        absent_then_applied(&mut api, &format!("{CORE}/services/llama-engine")).await;
        // The provider's Secret is missing: looked up by name (metadata only), never listed.
        api.not_found(&format!("{CORE}/secrets/together-key")).await;
        let cm = absent_then_applied(&mut api, &format!("{CORE}/configmaps/llama-router")).await;
        let config = cm.body["data"]["router.yaml"].as_str().unwrap();
        let parsed = crate::router::config::RouterConfig::from_yaml(config).unwrap();
        assert_eq!(
            parsed.max_concurrency_per_backend, 4,
            "8 slots shared by 2 routers"
        );
        assert_eq!(
            parsed.burst.providers[0].api_key_file.as_deref(),
            Some(
                format!(
                    "/etc/spillway/keys/{}",
                    crate::router::config::key_path(
                        &isvc.spec.burst.as_ref().unwrap().providers[0]
                    )
                )
                .as_str()
            )
        );
        assert!(
            !config.contains("together-key"),
            "no Secret name or value in the ConfigMap"
        );
        absent_then_applied(&mut api, &format!("{CORE}/serviceaccounts/llama-router")).await;
        let role = absent_then_applied(
            &mut api,
            "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/roles/llama-router",
        )
        .await;
        let rules = role.body["rules"].as_array().unwrap();
        assert!(
            rules
                .iter()
                .all(|r| r["verbs"] == json!(["get", "list", "watch"])),
            "read-only"
        );
        assert!(
            !rules.iter().any(|r| r["resources"][0] == "secrets"),
            "the router never reads Secrets"
        );
        absent_then_applied(
            &mut api,
            "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/rolebindings/llama-router",
        )
        .await;
        let dep = absent_then_applied(&mut api, &format!("{NS}/deployments/llama-router")).await;
        assert_eq!(dep.body["spec"]["replicas"], 2);
        let pod = &dep.body["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "llama-router");
        assert_eq!(pod["containers"][0]["image"], "spillway:test");
        assert_eq!(
            pod["containers"][0]["args"],
            json!([
                "router",
                "--config",
                "/etc/spillway/router/router.yaml",
                "--shutdown-delay-seconds",
                "5"
            ])
        );
        assert_eq!(pod["volumes"][0]["configMap"]["name"], "llama-router");
        let keys = &pod["volumes"][1]["projected"]["sources"][0]["secret"];
        assert_eq!(
            (keys["name"].as_str(), keys["optional"].as_bool()),
            (Some("together-key"), Some(true))
        );
        // Projected where the ConfigMap tells the router to read it.
        let file = parsed.burst.providers[0].api_key_file.as_deref().unwrap();
        assert_eq!(
            format!(
                "/etc/spillway/keys/{}",
                keys["items"][0]["path"].as_str().unwrap()
            ),
            file
        );
        absent_then_applied(
            &mut api,
            "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/llama-router",
        )
        .await;
        let svc = absent_then_applied(&mut api, &format!("{CORE}/services/llama")).await;
        assert_eq!(
            svc.body["spec"]["selector"]["app.kubernetes.io/component"],
            "router"
        );

        let status = api
            .expect_status(&format!("{SPILLWAY}/inferenceservices/llama/status"), &isvc)
            .await;
        let d = condition(&status.body["status"], "Degraded");
        assert_eq!(d["reason"], "SecretNotFound");
        assert!(d["message"].as_str().unwrap().contains("together-key"));
        // Secrets are not watched: the next look comes soon, not at the 5-minute resync.
        assert_eq!(
            r.await.unwrap().unwrap(),
            Action::requeue(crate::controller::reconcile::SECRET_RECHECK)
        );
        api.done().await;
    }

    /// An object from before the CRD rejected more routers than engine slots is reconciled
    /// in full, not frozen as invalid, and says what is wrong.
    #[tokio::test]
    async fn more_routers_than_engine_slots_degrades_but_everything_is_applied() {
        let Harness { ctx, mut api, .. } = harness(true);
        let isvc = isvc_from_yaml(
            r#"
apiVersion: spillway.dev/v1alpha1
kind: InferenceService
metadata: {name: llama, namespace: ml, uid: uid-llama, generation: 1}
spec:
  model: {name: m}
  engine: {image: "engine:1", maxConcurrency: 1}
"#,
        );
        let r = tokio::spawn(reconcile(Arc::new(isvc.clone()), ctx));
        api.not_found(&format!("{NS}/deployments/llama-engine"))
            .await;
        expect_engine_created(&mut api, &isvc, 1).await;
        absent_then_applied(&mut api, &format!("{CORE}/services/llama-engine")).await;
        let cm = absent_then_applied(&mut api, &format!("{CORE}/configmaps/llama-router")).await;
        let config = cm.body["data"]["router.yaml"].as_str().unwrap();
        let parsed = crate::router::config::RouterConfig::from_yaml(config).unwrap();
        assert_eq!(parsed.max_concurrency_per_backend, 1, "one slot each");
        for path in [
            format!("{CORE}/serviceaccounts/llama-router"),
            "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/roles/llama-router".into(),
            "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/rolebindings/llama-router".into(),
            format!("{NS}/deployments/llama-router"),
            "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/llama-router".into(),
            format!("{CORE}/services/llama"),
        ] {
            absent_then_applied(&mut api, &path).await;
        }
        let status = api
            .expect_status(&format!("{SPILLWAY}/inferenceservices/llama/status"), &isvc)
            .await;
        let d = condition(&status.body["status"], "Degraded");
        assert_eq!(d["reason"], "RouterReplicasOverLimit");
        assert!(
            d["message"]
                .as_str()
                .unwrap()
                .contains("engine.maxConcurrency"),
            "{d}"
        );
        r.await.unwrap().unwrap();
        api.done().await;
    }

    #[tokio::test]
    async fn disabling_the_router_removes_it_and_points_clients_at_the_engines() {
        let Harness { ctx, mut api, .. } = harness(true);
        let isvc = isvc_from_yaml(&minimal_isvc_yaml("llama")); // router.enabled: false
        let r = tokio::spawn(reconcile(Arc::new(isvc.clone()), ctx));
        expect_engine_applied(&mut api, &isvc, 1, 1).await;
        absent_then_applied(&mut api, &format!("{CORE}/services/llama-engine")).await;
        // Clients go back to the engines first...
        let svc = absent_then_applied(&mut api, &format!("{CORE}/services/llama")).await;
        assert_eq!(
            svc.body["spec"]["selector"]["app.kubernetes.io/component"],
            "engine"
        );
        // ...then a router this service owned is deleted, its Deployment last (so a removal cut
        // short is finished by the next pass).
        let mut router = deployment_json(&isvc, 2, 2);
        router["metadata"]["name"] = json!("llama-router");
        api.expect(
            Method::GET,
            &format!("{NS}/deployments/llama-router"),
            StatusCode::OK,
            router,
        )
        .await;
        for path in [
            "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/llama-router".to_string(),
            "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/rolebindings/llama-router"
                .to_string(),
            "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/roles/llama-router".to_string(),
            format!("{CORE}/serviceaccounts/llama-router"),
            format!("{CORE}/configmaps/llama-router"),
            format!("{NS}/deployments/llama-router"),
        ] {
            api.expect(
                Method::DELETE,
                &path,
                StatusCode::OK,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            )
            .await;
        }
        api.expect_status(&format!("{SPILLWAY}/inferenceservices/llama/status"), &isvc)
            .await;
        r.await.unwrap().unwrap();
        let events = api.done().await;
        assert!(events.iter().any(|e| e["reason"] == "RouterRemoved"));
    }
}
