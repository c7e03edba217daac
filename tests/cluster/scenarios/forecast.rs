//! i. A forecast in Advisory (`predictive: {mode: Advisory}`): once a minute of demand is kept,
//! `ScalingActive` says each tick what the forecast asks for, and nothing is scaled for it (the
//! load, 4 requests on an engine of 4 slots, asks the reactive signals for nothing more).

use std::time::{Duration, Instant};

use anyhow::ensure;

use super::{Env, MODEL, policy, service};
use crate::support::eventually;
use crate::support::operator::{engine_replicas, isvc};
use crate::support::traffic::Load;

const NS: &str = "i-forecast";

pub async fn run(env: &Env) -> anyhow::Result<String> {
    env.prepare(NS, 2).await?;
    env.apply(
        NS,
        &policy(
            "fc",
            "minReplicas: 1, maxReplicas: 2, intervalSeconds: 2, predictive: {mode: Advisory, horizonSeconds: 60}",
        ),
    )
    .await?;
    env.apply(
        NS,
        &service("svc", NS, "fc", 4, "  router: {replicas: 1}\n"),
    )
    .await?;
    let mut ctl = env.controller("ctl-i").await?;
    env.ready_pods(NS, 1, 1, Duration::from_secs(60)).await?;
    let router = env.router_addr(NS)?;
    let load = Load::start(router, MODEL, 3, 20);
    let started = Instant::now();
    let result = async {
        let message = eventually(
            "ScalingActive to report the forecast",
            Duration::from_secs(100),
            || async {
                let s = isvc(&env.client, NS, "svc").await?;
                let c = s
                    .status
                    .as_ref()
                    .and_then(|st| st.conditions.iter().find(|c| c.type_ == "ScalingActive"))
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                Ok(c.contains("forecast: ").then_some(c))
            },
        )
        .await?;
        ensure!(message.contains("in 60s"), "{message}");
        let replicas = engine_replicas(&env.client, NS, "svc")
            .await
            .map_err(anyhow::Error::msg)?;
        ensure!(replicas == 1, "Advisory forecast scaled to {replicas}");
        Ok(format!(
            "forecast reported {:.0}s after the load began (\"{}\"); replicas held at 1",
            started.elapsed().as_secs_f64(),
            message.rsplit("; ").next().unwrap_or_default()
        ))
    }
    .await;
    let out = load.finish(result).await;
    ctl.stop().await;
    out
}
