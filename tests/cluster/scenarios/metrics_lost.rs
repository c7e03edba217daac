//! c. The engines' metrics vanish (their processes killed): replicas hold, `ScalingActive=False`
//! with reason `MetricsUnavailable`, and no scale-down, although the policy would now allow one.

use std::time::{Duration, Instant};

use anyhow::ensure;

use super::{Env, policy, service};
use crate::support::eventually;
use crate::support::operator::{condition, engine_replicas, isvc};

const NS: &str = "c-metrics-lost";
const INTERVAL: u64 = 1;

pub async fn run(env: &Env) -> anyhow::Result<String> {
    env.prepare(NS, 2).await?;
    let p = |min: u32| {
        policy(
            "p",
            &format!(
                "minReplicas: {min}, maxReplicas: 4, intervalSeconds: {INTERVAL}, scaleDown: {{stabilizationWindowSeconds: 0}}"
            ),
        )
    };
    env.apply(NS, &p(2)).await?;
    env.apply(NS, &service("svc", NS, "p", 4, "")).await?;
    let mut ctl = env.controller("ctl-c").await?;
    env.ready_pods(NS, 2, 2, Duration::from_secs(60)).await?;
    eventually("ScalingActive=True", Duration::from_secs(20), || async {
        let s = isvc(&env.client, NS, "svc").await?;
        Ok(condition(&s, "ScalingActive")
            .is_some_and(|(st, _)| st == "True")
            .then_some(()))
    })
    .await?;

    // Both engines die; their pods stay Ready until the readiness probe has failed three times
    // (5 s apart), as with a kubelet. Idle engines read as zero would now scale down to 1.
    for pod in env.pods(NS, "engine") {
        env.kubelet.kill(NS, &pod.name).await?;
    }
    env.apply(NS, &p(1)).await?;
    let killed = Instant::now();
    let reported =
        eventually(
            "ScalingActive=False/MetricsUnavailable",
            Duration::from_secs(10),
            || async {
                let s = isvc(&env.client, NS, "svc").await?;
                let c = condition(&s, "ScalingActive");
                Ok((c == Some(("False".into(), "MetricsUnavailable".into())))
                    .then(|| killed.elapsed()))
            },
        )
        .await?;
    // Through the rest of the probe window and after the pods turn unready: no scale-down.
    let watch_until = killed + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < watch_until {
        let r = engine_replicas(&env.client, NS, "svc")
            .await
            .map_err(anyhow::Error::msg)?;
        seen.push(r);
        ensure!(r == 2, "replicas went from 2 to {r} without metrics");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ctl.stop().await;
    Ok(format!(
        "MetricsUnavailable reported {:.1}s after the engines died; replicas held at 2 over {} checks in 20 s",
        reported.as_secs_f64(),
        seen.len()
    ))
}
