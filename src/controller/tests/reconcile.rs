//! Reconciling services and policies against a mocked API: what is applied, when, and what is left alone.

use super::*;

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
    assert_eq!(
        action,
        Action::requeue(crate::controller::reconcile::RESYNC)
    );
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
    let desired = crate::controller::status::reconcile_status(
        &isvc,
        Some(crate::controller::status::EngineReplicas {
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
    let first = crate::controller::reconcile::error_policy(obj.clone(), &err, ctx.clone());
    let second = crate::controller::reconcile::error_policy(obj, &err, ctx.clone());
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
