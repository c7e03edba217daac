//! The router's objects: config, RBAC, PDB, key secrets, and its removal.

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
    let peers = parsed.peers.as_ref().unwrap();
    assert_eq!(
        (
            peers.shared.max_concurrency_per_backend,
            peers.replicas,
            parsed.max_concurrency_per_backend
        ),
        (Some(8), 2, 4),
        "8 slots shared by 2 routers as peers, 4 each when they hear no peer"
    );
    assert_eq!(
        parsed.burst.providers[0].api_key_file.as_deref(),
        Some(
            format!(
                "/etc/spillway/keys/{}",
                crate::router::config::key_path(&isvc.spec.burst.as_ref().unwrap().providers[0])
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
        "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/rolebindings/llama-router".to_string(),
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
