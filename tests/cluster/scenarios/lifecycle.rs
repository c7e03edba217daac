//! f. Deleting an InferenceService garbage-collects every object it owned; deleting its
//! ScalingPolicy gives `Degraded/PolicyNotFound` and no scale-down, and the service recovers
//! when the policy is back. A service on a tagged image and no model URI is `Pinned=False`.

use std::time::Duration;

use anyhow::ensure;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use super::{Env, policy, service};
use crate::support::eventually;
use crate::support::operator::{InferenceService, condition, engine_replicas, isvc};
use spillway::api::{BurstMode, ScalingPolicy};
use spillway::router::config::{CONFIG_KEY, RouterConfig};

const NS: &str = "f-lifecycle";
const INTERVAL: u64 = 2;

/// The burst mode in the router ConfigMap of service `kept`.
async fn router_burst_mode(client: &Client) -> anyhow::Result<BurstMode> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get("kept-router")
        .await?;
    let text = cm
        .data
        .and_then(|d| d.get(CONFIG_KEY).cloned())
        .unwrap_or_default();
    Ok(RouterConfig::from_yaml(&text)?.burst.mode)
}

/// Names of the objects of kind `K` in the namespace that belong to service `name`.
async fn owned<K>(client: &Client, name: &str) -> Result<Vec<String>, String>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={name}"));
    let list = Api::<K>::namespaced(client.clone(), NS)
        .list(&lp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                K::kind(&()),
                o.meta().name.clone().unwrap_or_default()
            )
        })
        .collect())
}

async fn all_owned(client: &Client, name: &str) -> Result<Vec<String>, String> {
    let mut out = owned::<Deployment>(client, name).await?;
    out.extend(owned::<Service>(client, name).await?);
    out.extend(owned::<ConfigMap>(client, name).await?);
    out.extend(owned::<ServiceAccount>(client, name).await?);
    out.extend(owned::<Role>(client, name).await?);
    out.extend(owned::<RoleBinding>(client, name).await?);
    out.extend(owned::<PodDisruptionBudget>(client, name).await?);
    out.extend(owned::<Pod>(client, name).await?);
    Ok(out)
}

pub async fn run(env: &Env) -> anyhow::Result<String> {
    env.prepare(NS, 4).await?;
    env.apply(
        NS,
        &policy("p", &format!("minReplicas: 2, maxReplicas: 4, intervalSeconds: {INTERVAL}, scaleDown: {{stabilizationWindowSeconds: 0}}")),
    )
    .await?;
    env.apply(NS, &service("doomed", NS, "p", 4, "")).await?;
    env.apply(NS, &service("kept", NS, "p", 4, "")).await?;
    let mut ctl = env.controller("ctl-f").await?;
    env.ready_pods(NS, 4, 4, Duration::from_secs(60)).await?;

    // Garbage collection of everything `doomed` owned.
    let before = all_owned(&env.client, "doomed")
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(
        before.len() >= 9,
        "expected the owned objects and pods, found {before:?}"
    );
    Api::<InferenceService>::namespaced(env.client.clone(), NS)
        .delete("doomed", &DeleteParams::default())
        .await?;
    eventually(
        "everything doomed owned to be gone",
        Duration::from_secs(60),
        || async {
            let left = all_owned(&env.client, "doomed").await?;
            if left.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!("left: {left:?}"))
            }
        },
    )
    .await?;

    // The policy goes: Degraded/PolicyNotFound, replicas hold (the defaults would allow 1).
    Api::<ScalingPolicy>::namespaced(env.client.clone(), NS)
        .delete("p", &DeleteParams::default())
        .await?;
    eventually(
        "Degraded=True/PolicyNotFound",
        Duration::from_secs(10),
        || async {
            let s = isvc(&env.client, NS, "kept").await?;
            Ok(
                (condition(&s, "Degraded") == Some(("True".into(), "PolicyNotFound".into())))
                    .then_some(()),
            )
        },
    )
    .await?;
    for _ in 0..(3 * INTERVAL * 2) {
        let r = engine_replicas(&env.client, NS, "kept")
            .await
            .map_err(anyhow::Error::msg)?;
        ensure!(
            r == 2,
            "replicas went 2 -> {r} while the policy was missing"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Nor does anything burst meanwhile: the missing policy may have said Never.
    let mode = router_burst_mode(&env.client).await?;
    ensure!(
        mode == BurstMode::Never,
        "the router bursts ({mode:?}) while its policy is missing"
    );
    // It comes back: the service recovers by itself.
    env.apply(
        NS,
        &policy(
            "p",
            &format!("minReplicas: 2, maxReplicas: 4, intervalSeconds: {INTERVAL}"),
        ),
    )
    .await?;
    eventually(
        "Degraded=False once the policy is back",
        Duration::from_secs(10),
        || async {
            let s = isvc(&env.client, NS, "kept").await?;
            Ok(condition(&s, "Degraded")
                .is_some_and(|(st, _)| st == "False")
                .then_some(()))
        },
    )
    .await?;
    // The test image has a tag, no digest, and the model no URI: a warning, nothing more.
    let s = isvc(&env.client, NS, "kept")
        .await
        .map_err(anyhow::Error::msg)?;
    let pinned = condition(&s, "Pinned");
    ensure!(
        pinned == Some(("False".into(), "NotPinned".into())),
        "Pinned is {pinned:?}"
    );
    ctl.stop().await;
    Ok(format!(
        "{} owned objects and pods garbage-collected; PolicyNotFound held 2 replicas and cleared; Pinned=False/NotPinned",
        before.len()
    ))
}
