//! j. A latency objective (`targets.timeToFirstTokenMilliseconds: {p95: 300}`): streamed
//! requests queue in the router for a slot of the one ready engine, so time to first token
//! reads seconds while the demand signals ask for nothing (their targets are set out of reach).
//! The autoscaler scales up on time to first token alone, says so in `status.decisions`, and
//! shows the measured p95 in `status.metrics`.

use std::time::{Duration, Instant};

use anyhow::ensure;

use super::{Env, MODEL, policy, service};
use crate::support::eventually;
use crate::support::operator::{engine_replicas, isvc};
use crate::support::traffic::Load;

const NS: &str = "j-latency";

pub async fn run(env: &Env) -> anyhow::Result<String> {
    env.prepare(NS, 3).await?;
    env.apply(
        NS,
        &policy(
            "ttft",
            "minReplicas: 1, maxReplicas: 3, intervalSeconds: 2, targets: {queueDepthPerReplica: 1000, gpuMemoryUtilization: 1.0, timeToFirstTokenMilliseconds: {p95: 300, windowSeconds: 20}}, scaleDown: {stabilizationWindowSeconds: 600}, burst: {mode: Never}",
        ),
    )
    .await?;
    env.apply(
        NS,
        &service(
            "svc",
            NS,
            "ttft",
            2,
            "  router: {replicas: 1, queueLimit: 100, queueTimeoutSeconds: 60}\n",
        ),
    )
    .await?;
    let mut ctl = env.controller("ctl-j").await?;
    env.ready_pods(NS, 1, 1, Duration::from_secs(60)).await?;
    let router = env.router_addr(NS)?;
    // 6 clients on 2 slots, 10 tokens at 20/s each: about a second of queueing per request.
    let load = Load::streaming(router, MODEL, 6, 10);
    let started = Instant::now();
    let result = async {
        let (signal, p95) = eventually(
            "a scale-up driven by time to first token",
            Duration::from_secs(90),
            || async {
                let s = isvc(&env.client, NS, "svc").await?;
                let st = s.status.unwrap_or_default();
                let scaled = st
                    .decisions
                    .iter()
                    .find(|d| d.to > d.from)
                    .map(|d| (d.signal.clone().unwrap_or_default(), d.reason.clone()));
                let p95 = st
                    .metrics
                    .and_then(|m| m.time_to_first_token_milliseconds)
                    .and_then(|t| t.p95);
                Ok(scaled.zip(p95))
            },
        )
        .await?;
        ensure!(signal.0 == "TimeToFirstToken", "scaled by {signal:?}");
        ensure!(p95 > 300, "measured p95 {p95} ms");
        let replicas = engine_replicas(&env.client, NS, "svc")
            .await
            .map_err(anyhow::Error::msg)?;
        ensure!(replicas > 1, "replicas {replicas}");
        Ok(format!(
            "scaled to {replicas} by TimeToFirstToken {:.0}s after the load began (\"{}\"); status p95 {p95} ms",
            started.elapsed().as_secs_f64(),
            signal.1
        ))
    }
    .await;
    let out = load.finish(result).await;
    ctl.stop().await;
    out
}
