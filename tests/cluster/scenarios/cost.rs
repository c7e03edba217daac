//! l. Cost-aware scaling (`cost: {mode: Active}`) on real routers' spend: an overload the
//! router spills to a priced provider. While a GPU costs far more an hour than the provider
//! charges for its share, the spilled demand buys no replica, `ScalingActive` says what a
//! replica would need to be worth it and `Bursting` says why the providers serve; once the policy's GPU price drops, the same spill scales
//! up within a few intervals.

use std::time::{Duration, Instant};

use anyhow::ensure;

use super::{Env, MODEL, policy, service, start_provider};
use crate::support::eventually;
use crate::support::operator::{condition, engine_replicas, isvc};
use crate::support::traffic::{Load, metric};

const NS: &str = "l-cost";
const KEY: &str = "sk-tier-cost-key";
const REQUESTS: &str = "spillway_router_requests_total";

fn cost_policy(gpu_hour_price: &str) -> String {
    policy(
        "cost",
        &format!(
            "minReplicas: 1, maxReplicas: 2, intervalSeconds: 2, scaleDown: {{stabilizationWindowSeconds: 600}}, burst: {{mode: Saturated}}, cost: {{mode: Active, gpuHourPrice: \"{gpu_hour_price}\"}}"
        ),
    )
}

pub async fn run(env: &Env) -> anyhow::Result<String> {
    env.prepare(NS, 2).await?;
    let (mut provider, port) = start_provider(env, NS, KEY).await?;
    env.apply(NS, &cost_policy("1000.00")).await?;
    env.apply(
        NS,
        &service(
            "svc",
            NS,
            "cost",
            2,
            &format!(
                "  router: {{enabled: true, replicas: 1, queueLimit: 100, queueTimeoutSeconds: 30}}\n  burst:\n    providers:\n    - {{name: fake, url: \"http://127.0.0.1:{port}/v1\", model: provider-model, apiKeySecretRef: {{name: provider-key, key: api-key}}, maxConcurrency: 32, timeoutSeconds: 30, pricing: {{inputPerMillionTokens: 1.0, outputPerMillionTokens: 1.0}}}}\n"
            ),
        ),
    )
    .await?;
    let mut ctl = env.controller("ctl-l").await?;
    env.ready_pods(NS, 1, 1, Duration::from_secs(60)).await?;
    let router = env.router_addr(NS)?;
    // Two slots; six clients: four are spilled at once to the provider.
    let load = Load::start(router.clone(), MODEL, 6, 40);
    let result = async {
        let said = eventually(
            "ScalingActive to weigh the GPUs against the provider",
            Duration::from_secs(60),
            || async {
                let s = isvc(&env.client, NS, "svc").await?;
                let message = s
                    .status
                    .iter()
                    .flat_map(|st| &st.conditions)
                    .find(|c| c.type_ == "ScalingActive")
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                Ok(message
                    .contains("cost: replicas worth their GPUs 1 ")
                    .then_some(message))
            },
        )
        .await?;
        // The spill goes on for ten intervals and buys nothing (the overload of scenario b
        // scales up within two).
        let before = metric(&router, REQUESTS, &[("destination", "fake")]).await?;
        tokio::time::sleep(Duration::from_secs(20)).await;
        let after = metric(&router, REQUESTS, &[("destination", "fake")]).await?;
        ensure!(after > before, "nothing spilled: {before} -> {after}");
        let replicas = engine_replicas(&env.client, NS, "svc")
            .await
            .map_err(anyhow::Error::msg)?;
        ensure!(
            replicas == 1,
            "scaled to {replicas} although the GPU costs more"
        );
        let held = isvc(&env.client, NS, "svc")
            .await
            .map_err(anyhow::Error::msg)?;
        let bursting = condition(&held, "Bursting").unwrap_or_default();
        ensure!(
            bursting == ("True".into(), "CheaperThanGpus".into()),
            "Bursting is {bursting:?}"
        );
        // GPUs get cheap: the same spill is worth a replica.
        env.apply(NS, &cost_policy("0.0001")).await?;
        let cheap = Instant::now();
        let took = eventually(
            "a scale-up once GPUs are cheap",
            Duration::from_secs(30),
            || async {
                let r = engine_replicas(&env.client, NS, "svc").await?;
                Ok((r == 2).then(|| cheap.elapsed()))
            },
        )
        .await?;
        let s = isvc(&env.client, NS, "svc")
            .await
            .map_err(anyhow::Error::msg)?;
        let up = s
            .status
            .unwrap_or_default()
            .decisions
            .into_iter()
            .find(|d| d.to == 2)
            .map(|d| d.reason)
            .unwrap_or_default();
        ensure!(up.contains("spilled to providers"), "{up}");
        Ok(format!(
            "held at 1 for 20 s while {} requests spilled (\"{}\"); scaled to 2 {:.1}s after the GPU price dropped",
            after - before,
            said.rsplit("; ").next().unwrap_or_default(),
            took.as_secs_f64()
        ))
    }
    .await;
    let out = load.finish(result).await;
    ctl.stop().await;
    provider.stop(Duration::from_secs(2)).await;
    out
}
