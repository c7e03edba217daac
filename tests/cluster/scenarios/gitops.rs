//! g. GitOps: re-applying the same InferenceService with server-side apply under another
//! field manager (what `kubectl apply --server-side` or Argo CD does) changes nothing the
//! controller or the autoscaler owns: no fight, no new engine or router generation, no pod
//! restarted. And drift is repaired: an owned object edited by hand is put back, one deleted by
//! hand is recreated.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::ensure;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::Value;

use super::{Env, policy, service};
use crate::support::eventually;
use crate::support::operator::InferenceService;

const NS: &str = "g-gitops";
const INTERVAL: u64 = 2;

/// Generation of every Deployment and uid of every pod in the namespace.
async fn fingerprint(env: &Env) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for d in Api::<Deployment>::namespaced(env.client.clone(), NS)
        .list(&ListParams::default())
        .await?
    {
        let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or_default();
        out.insert(
            format!("deployment/{}", d.name_any()),
            format!(
                "generation {:?}, replicas {replicas}",
                d.metadata.generation
            ),
        );
    }
    for p in Api::<Pod>::namespaced(env.client.clone(), NS)
        .list(&ListParams::default())
        .await?
    {
        out.insert(format!("pod/{}", p.name_any()), p.uid().unwrap_or_default());
    }
    Ok(out)
}

pub async fn run(env: &Env) -> anyhow::Result<String> {
    env.prepare(NS, 2).await?;
    env.apply(
        NS,
        &policy(
            "p",
            &format!("minReplicas: 1, maxReplicas: 2, intervalSeconds: {INTERVAL}"),
        ),
    )
    .await?;
    let yaml = service("svc", NS, "p", 4, "");
    env.apply(NS, &yaml).await?;
    let mut ctl = env.controller("ctl-g").await?;
    env.ready_pods(NS, 1, 2, Duration::from_secs(60)).await?;
    // Let the controller and the autoscaler settle (status written, first decisions made).
    tokio::time::sleep(Duration::from_secs(3 * INTERVAL)).await;
    let api: Api<InferenceService> = Api::namespaced(env.client.clone(), NS);
    let generation = api.get("svc").await?.metadata.generation;
    let before = fingerprint(env).await?;

    // Argo CD syncs the same manifest under its own manager, without forcing conflicts, and
    // repeats the sync.
    let doc: Value = serde_saphyr::from_str(&yaml)?;
    for _ in 0..2 {
        let sync = PatchParams::apply("argocd-controller");
        api.patch("svc", &sync, &Patch::Apply(&doc)).await?;
        tokio::time::sleep(Duration::from_secs(3 * INTERVAL)).await;
    }

    let after = fingerprint(env).await?;
    let isvc = api.get("svc").await?;
    let repaired = drift(env).await;
    ctl.stop().await;
    repaired?;
    ensure!(
        isvc.metadata.generation == generation,
        "the service's generation moved: {generation:?} -> {:?}",
        isvc.metadata.generation
    );
    ensure!(
        before == after,
        "owned objects changed:\nbefore {before:#?}\nafter {after:#?}"
    );
    let managers: Vec<String> = isvc
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    ensure!(
        managers.iter().any(|m| m == "argocd-controller"),
        "the sync left no trace: {managers:?}"
    );
    Ok(format!(
        "two syncs by another manager: {} deployments and pods unchanged; a hand edit and a deletion repaired",
        after.len()
    ))
}

/// Someone edits the router's ConfigMap and deletes the client Service: both come back.
async fn drift(env: &Env) -> anyhow::Result<()> {
    let maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), NS);
    let rendered = maps.get("svc-router").await?.data;
    let edit = serde_json::json!({"data": {"router.yaml": "listen: 0.0.0.0:9999\n"}});
    maps.patch("svc-router", &PatchParams::default(), &Patch::Merge(&edit))
        .await?;
    let services: Api<Service> = Api::namespaced(env.client.clone(), NS);
    services.delete("svc", &Default::default()).await?;
    eventually(
        "the edited ConfigMap put back",
        Duration::from_secs(20),
        || async {
            let data = maps
                .get("svc-router")
                .await
                .map_err(|e| e.to_string())?
                .data;
            Ok((data == rendered).then_some(()))
        },
    )
    .await?;
    eventually(
        "the deleted Service recreated",
        Duration::from_secs(20),
        || async {
            Ok(services
                .get_opt("svc")
                .await
                .map_err(|e| e.to_string())?
                .map(|_| ()))
        },
    )
    .await
}
