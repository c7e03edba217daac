//! b. Scaling up: a queue spike on one ready engine, and a sustained overload the router spills
//! at once to a fast provider, each scale up within two intervals with an Event and a
//! `status.decisions` entry naming the signal. The spike's new pod finds no free GPU:
//! `CapacityExhausted=True/Unschedulable`, and its router (burst mode `CapacityExhausted`)
//! spills; once the node has GPUs the pod runs and the spilling stops. Meanwhile a request of
//! its `restricted` class (burst `Never`, declared in the InferenceService, carried to the
//! router in its ConfigMap) is served by the engine, never the provider.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use super::{Env, MODEL, policy, service, start_provider};
use crate::support::eventually;
use crate::support::operator::{condition, engine_replicas, events, isvc};
use crate::support::traffic::{Load, metric, request_with};

const NS: &str = "b-scale-up";
const OVERLOAD_NODE: &str = "b-overload";
const INTERVAL: u64 = 2;
const KEY: &str = "sk-tier-test-key";
const REQUESTS: &str = "spillway_router_requests_total";

pub async fn run(env: &Env) -> anyhow::Result<String> {
    env.prepare(NS, 1).await?;
    env.plane.node(OVERLOAD_NODE, 4).await?;
    let provider = start_provider(env, NS, KEY).await?;
    let burst = |port: u16| {
        format!(
            "  router: {{enabled: true, replicas: 1, queueLimit: 100, queueTimeoutSeconds: 30}}\n  burst:\n    providers:\n    - {{name: fake, url: \"http://127.0.0.1:{port}/v1\", model: provider-model, apiKeySecretRef: {{name: provider-key, key: api-key}}, maxConcurrency: 32, timeoutSeconds: 30}}\n"
        )
    };
    env.apply(
        NS,
        &policy(
            "spike",
            &format!(
                "minReplicas: 1, maxReplicas: 4, intervalSeconds: {INTERVAL}, targets: {{queueDepthPerReplica: 1}}, scaleDown: {{stabilizationWindowSeconds: 600}}, burst: {{mode: CapacityExhausted}}"
            ),
        ),
    )
    .await?;
    env.apply(
        NS,
        &policy(
            "saturated",
            &format!(
                "minReplicas: 1, maxReplicas: 4, intervalSeconds: {INTERVAL}, scaleDown: {{stabilizationWindowSeconds: 600}}, burst: {{mode: Saturated}}"
            ),
        ),
    )
    .await?;
    let classes = "  requestClasses:\n    defaultClass: standard\n    classes:\n    - {name: restricted, burst: Never, priority: 100}\n    - {name: standard}\n";
    env.apply(
        NS,
        &service(
            "spike",
            NS,
            "spike",
            2,
            &format!("{}{classes}", burst(provider.1)),
        ),
    )
    .await?;
    env.apply(
        NS,
        &service(
            "overload",
            OVERLOAD_NODE,
            "saturated",
            2,
            &burst(provider.1),
        ),
    )
    .await?;
    let mut ctl = env.controller("ctl-b").await?;
    env.ready_pods(NS, 2, 2, Duration::from_secs(60)).await?;
    let spike = spike(env).await;
    let overload = overload(env).await;
    ctl.stop().await;
    let mut provider = provider.0;
    provider.stop(Duration::from_secs(2)).await;
    Ok(format!("{}; {}", spike?, overload?))
}

fn router_addr(env: &Env, service: &str) -> anyhow::Result<String> {
    let r = env
        .pods(NS, "router")
        .into_iter()
        .find(|p| p.name.starts_with(&format!("{service}-router-")))
        .with_context(|| format!("no router pod of {service}"))?;
    Ok(format!("{}:8080", r.ip))
}

/// Waits until the engine Deployment asks for more than `from` replicas; how long it took.
async fn scaled_from(env: &Env, name: &str, from: i32, since: Instant) -> anyhow::Result<Duration> {
    eventually(
        &format!("{name} to scale up from {from}"),
        Duration::from_secs(30),
        || async {
            let r = engine_replicas(&env.client, NS, name).await?;
            Ok((r > from).then(|| since.elapsed()))
        },
    )
    .await
}

/// The decision record and Event of the last scale-up name `signal` (and `words` in its text).
async fn explained(env: &Env, name: &str, signal: &str, words: &str) -> anyhow::Result<()> {
    eventually(
        &format!("{name}'s decision record and Event"),
        Duration::from_secs(10),
        || async {
            let s = isvc(&env.client, NS, name).await?;
            let last = s
                .status
                .as_ref()
                .and_then(|st| st.decisions.last())
                .cloned();
            let Some(d) = last else {
                return Err("no decision recorded".into());
            };
            if d.signal.as_deref() != Some(signal) || !d.reason.contains(words) {
                return Err(format!("last decision: {d:?}"));
            }
            let notes = events(&env.client, NS, name, "Scaled").await?;
            Ok(notes.iter().any(|n| n.contains(words)).then_some(()))
        },
    )
    .await
}

/// Waits until `name` reports `CapacityExhausted=False` and its router has heard so.
async fn capacity_back(env: &Env, name: &str, router: &str) -> anyhow::Result<()> {
    eventually(
        "CapacityExhausted=False",
        Duration::from_secs(30),
        || async {
            let s = isvc(&env.client, NS, name).await?;
            let c = condition(&s, "CapacityExhausted");
            Ok(c.is_some_and(|(st, _)| st == "False").then_some(()))
        },
    )
    .await?;
    eventually(
        "the router to hear capacity is back",
        Duration::from_secs(10),
        || async {
            let g = metric(router, "spillway_router_capacity_exhausted", &[])
                .await
                .map_err(|e| e.to_string())?;
            Ok((g == 0.0).then_some(()))
        },
    )
    .await
}

async fn spike(env: &Env) -> anyhow::Result<String> {
    let router = router_addr(env, "spike")?;
    // The service's own cold start counted as exhausted capacity; until the router hears it is
    // over, it would spill the spike (burst mode CapacityExhausted) instead of queueing it.
    capacity_back(env, "spike", &router).await?;
    // Two slots on the one engine; five clients of ~2 s requests: three wait in the router.
    let load = Load::start(router.clone(), MODEL, 5, 40);
    let start = Instant::now();
    let result = async {
        let took = scaled_from(env, "spike", 1, start).await?;
        ensure!(
            took <= Duration::from_secs(2 * INTERVAL + 1),
            "the queue spike scaled up {took:?} after it began (bound: two {INTERVAL} s intervals)"
        );
        explained(env, "spike", "QueueDepth", "queue depth").await?;
        // One warm replica and three waiting ask for 3 at once: scale-up's default selectPolicy
        // (Max, the CRD's default) allows +4 in a period, where the smaller limit (100 % of 1)
        // would hold it to +1.
        let first = engine_replicas(&env.client, NS, "spike")
            .await
            .map_err(anyhow::Error::msg)?;
        let s = isvc(&env.client, NS, "spike").await.map_err(anyhow::Error::msg)?;
        let decisions = s.status.as_ref().map(|st| st.decisions.clone()).unwrap_or_default();
        ensure!(
            first >= 3 && !decisions.iter().any(|d| d.reason.contains("limited to +1 per")),
            "the first scale-up went 1 -> {first}: {decisions:?}"
        );
        // The node has one GPU: the new pod is Unschedulable.
        eventually("CapacityExhausted=True/Unschedulable", Duration::from_secs(20), || async {
            let s = isvc(&env.client, NS, "spike").await?;
            let unschedulable = s.status.as_ref().and_then(|st| st.unschedulable_replicas);
            let c = condition(&s, "CapacityExhausted");
            let ok = c == Some(("True".into(), "Unschedulable".into()))
                && unschedulable.is_some_and(|n| n >= 1);
            Ok(ok.then_some(()))
        })
        .await?;
        let spilled = |router: String| async move {
            metric(&router, REQUESTS, &[("destination", "fake")]).await.map_err(|e| e.to_string())
        };
        let first = eventually("the router to spill", Duration::from_secs(20), || async {
            let n = spilled(router.clone()).await?;
            Ok((n > 0.0).then_some(n))
        })
        .await?;
        // While the router spills, a restricted request waits for the engine (ahead of the
        // standard ones waiting) and never reaches the provider.
        let body = format!(
            r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 4}}"#
        );
        let (status, answer) = request_with(
            &router,
            "POST",
            "/v1/chat/completions",
            &[("x-spillway-class", "restricted")],
            Some(&body),
            Duration::from_secs(25),
        )
        .await?;
        ensure!(status == 200, "the restricted request got {status}: {answer}");
        ensure!(
            !answer.contains("provider-model"),
            "the restricted request was served by the provider: {answer}"
        );
        let out = metric(&router, REQUESTS, &[("destination", "fake"), ("class", "restricted")])
            .await?;
        ensure!(out == 0.0, "{out} restricted requests reached the provider");
        // More GPUs: the pods schedule and turn ready, capacity is no longer exhausted.
        env.plane.node(NS, 4).await?;
        capacity_back(env, "spike", &router).await?;
        // Requests already at the provider finish; after that none is sent there.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = spilled(router.clone()).await.map_err(anyhow::Error::msg)?;
        let served_before = load.ok.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let after = spilled(router.clone()).await.map_err(anyhow::Error::msg)?;
        let served = load.ok.load(std::sync::atomic::Ordering::Relaxed) - served_before;
        ensure!(after == before, "still spilling: {before} -> {after} provider requests");
        ensure!(served > 0, "no request was served while checking the spill stopped");
        Ok(format!(
            "spike: scaled up in {:.1}s (QueueDepth), spilled {first}+ while Unschedulable (a restricted request served by the engine meanwhile), none in 4 s once scheduled ({served} served locally)",
            took.as_secs_f64()
        ))
    }
    .await;
    load.finish(result).await
}

async fn overload(env: &Env) -> anyhow::Result<String> {
    let router = router_addr(env, "overload")?;
    // Two slots; six clients: four are spilled at once to the fast provider, nothing waits.
    let load = Load::start(router.clone(), MODEL, 6, 40);
    let start = Instant::now();
    let result = async {
        let took = scaled_from(env, "overload", 1, start).await?;
        ensure!(
            took <= Duration::from_secs(2 * INTERVAL + 1),
            "the spilled overload scaled up {took:?} after it began (bound: two {INTERVAL} s intervals)"
        );
        explained(env, "overload", "Concurrency", "spilled to providers").await?;
        let spilled = metric(&router, REQUESTS, &[("destination", "fake")]).await?;
        ensure!(spilled > 0.0, "nothing was spilled");
        Ok(format!(
            "overload: scaled up in {:.1}s (Concurrency) with {spilled} requests spilled",
            took.as_secs_f64()
        ))
    }
    .await;
    load.finish(result).await
}
