//! m. A rollout the cluster has no GPUs for: a blue-green candidate needs the stable's two
//! replicas, but the node has one GPU to spare. The stage waits `progressDeadlineSeconds`
//! (10 here) for the second, then the rollout fails with a Warning Event, the candidate is
//! scaled to 0 and its GPU given back, and the stable keeps serving every request.

use std::time::{Duration, Instant};

use anyhow::ensure;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;

use super::{Env, MODEL, policy, service};
use crate::support::eventually;
use crate::support::operator::{events, isvc};
use crate::support::traffic::Load;

const NS: &str = "m-deadline";
const ROLLOUT: &str =
    "  router: {replicas: 1}\n  rollout: {strategy: BlueGreen, progressDeadlineSeconds: 10}\n";

fn spec(image_suffix: &str) -> String {
    service("svc", NS, "two", 4, ROLLOUT).replace(
        &format!("image: {}", crate::support::operator::IMAGE),
        &format!("image: {}{image_suffix}", crate::support::operator::IMAGE),
    )
}

pub async fn run(env: &Env) -> anyhow::Result<String> {
    // Three GPUs: two for the stable, one for the candidate.
    env.prepare(NS, 3).await?;
    env.apply(
        NS,
        &policy(
            "two",
            "minReplicas: 2, maxReplicas: 2, intervalSeconds: 1, burst: {mode: Never}",
        ),
    )
    .await?;
    env.apply(NS, &spec("")).await?;
    let mut ctl = env.controller("ctl-m").await?;
    env.ready_pods(NS, 2, 1, Duration::from_secs(60)).await?;
    eventually(
        "status to list the first revision",
        Duration::from_secs(30),
        || async {
            let s = isvc(&env.client, NS, "svc").await?;
            Ok(s.status
                .and_then(|st| st.stable_revision)
                .filter(|r| r == "svc-engine"))
        },
    )
    .await?;
    let router = env.router_addr(NS)?;
    let load = Load::start(router, MODEL, 2, 5);
    let result = async {
        env.apply(NS, &spec("-v2")).await?;
        let changed = Instant::now();
        let (candidate, message) = eventually(
            "the rollout to fail at its deadline",
            Duration::from_secs(90),
            || async {
                let s = isvc(&env.client, NS, "svc").await?;
                let st = s.status.unwrap_or_default();
                Ok(st
                    .rollout
                    .filter(|r| r.phase.as_str() == "Failed")
                    .map(|r| (r.candidate, r.message)))
            },
        )
        .await?;
        let failed_after = changed.elapsed();
        ensure!(
            failed_after >= Duration::from_secs(10),
            "failed {failed_after:?} after the change, before its deadline"
        );
        ensure!(
            message.contains("had 1 of 2 replicas ready") && message.contains("into switch"),
            "{message}"
        );
        let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
        eventually(
            "the candidate to be scaled to 0",
            Duration::from_secs(20),
            || async {
                let d = deployments
                    .get(&candidate)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((d.spec.and_then(|s| s.replicas) == Some(0)).then_some(()))
            },
        )
        .await?;
        let warned = events(&env.client, NS, "svc", "RolloutFailed")
            .await
            .map_err(anyhow::Error::msg)?;
        ensure!(!warned.is_empty(), "no RolloutFailed Event");
        let s = isvc(&env.client, NS, "svc")
            .await
            .map_err(anyhow::Error::msg)?;
        let st = s.status.unwrap_or_default();
        ensure!(
            st.stable_revision.as_deref() == Some("svc-engine") && st.ready_replicas == Some(2),
            "stable {:?} with {:?} ready",
            st.stable_revision,
            st.ready_replicas
        );
        Ok(format!(
            "failed {:.0}s after the change (\"{message}\"); candidate scaled to 0, stable serving on 2",
            failed_after.as_secs_f64()
        ))
    }
    .await;
    let out = load.finish(result).await;
    ctl.stop().await;
    out
}
