//! h. Two routers share one engine's capacity (`router.replicas: 2`, `maxConcurrency: 8`): they
//! find each other through the client Service's EndpointSlices and exchange their counts, so
//! all traffic on one router runs 8 on the engine before anything spills; traffic on both keeps
//! the engine (run to refuse anything past 8 + 1, the stated bound for two routers) within the
//! bound; a router killed leaves the survivor its fixed share (4), and a new router in its place
//! gives it all 8 again.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use futures::future::join_all;

use super::{Env, MODEL, policy, start_provider};
use crate::support::eventually;
use crate::support::kubelet::PodInfo;
use crate::support::operator::{self, delete_pod};
use crate::support::traffic::{Load, metric, request};

const NS: &str = "h-shared";
const KEY: &str = "sk-tier-shared-key";
const PEER_PORT: u16 = 8081;
const AGE: &str = "spillway_router_peer_report_age_seconds";
const IN_FLIGHT: &str = "spillway_router_in_flight";

pub async fn run(env: &Env) -> anyhow::Result<String> {
    env.prepare(NS, 1).await?;
    let (mut provider, port) = start_provider(env, NS, KEY).await?;
    env.apply(
        NS,
        &policy(
            "one",
            "minReplicas: 1, maxReplicas: 1, intervalSeconds: 2, burst: {mode: Saturated}",
        ),
    )
    .await?;
    env.apply(NS, &service(port)).await?;
    let mut ctl = env.controller("ctl-h").await?;
    env.ready_pods(NS, 1, 2, Duration::from_secs(60)).await?;
    let out = shared(env).await;
    ctl.stop().await;
    provider.stop(Duration::from_secs(2)).await;
    out
}

/// Engine-sim runs 9 at once with no queue: a tenth request at once is refused, which the
/// routers would see as a failed request.
fn service(provider_port: u16) -> String {
    format!(
        r#"apiVersion: spillway.dev/v1alpha1
kind: InferenceService
metadata: {{name: svc}}
spec:
  model: {{name: {MODEL}}}
  engine:
    image: {image}
    args: ["engine-sim", "--host", "0.0.0.0", "--port", "8000", "--model", "{MODEL}",
           "--max-concurrency", "9", "--max-queue", "0", "--prefill-ms", "50", "--tokens-per-second", "20"]
    port: 8000
    healthPath: /health
    metrics: {{preset: vllm}}
    maxConcurrency: 8
    gpus: 1
    nodeSelector: {{spillway.test/node: {NS}}}
    startupTimeoutSeconds: 60
    terminationGracePeriodSeconds: 5
  scalingPolicyRef: {{name: one}}
  router: {{enabled: true, replicas: 2, queueLimit: 100, queueTimeoutSeconds: 30}}
  burst:
    providers:
    - {{name: fake, url: "http://127.0.0.1:{provider_port}/v1", model: provider-model, apiKeySecretRef: {{name: provider-key, key: api-key}}, maxConcurrency: 64, timeoutSeconds: 30}}
"#,
        image = operator::IMAGE
    )
}

fn http(p: &PodInfo, port: u16) -> String {
    format!("{}:{port}", p.ip)
}

/// Until router `r` has heard from `peer` within the last 200 ms.
async fn heard(r: &PodInfo, peer: &PodInfo) -> anyhow::Result<()> {
    let (addr, peer) = (http(r, 8080), http(peer, PEER_PORT));
    eventually(
        &format!("{} to hear {peer}", r.name),
        Duration::from_secs(20),
        || async {
            let age = metric(&addr, AGE, &[("peer", &peer)])
                .await
                .map_err(|e| e.to_string())?;
            Ok((age < 0.2).then_some(()))
        },
    )
    .await
}

/// `n` chat completions of `tokens` at once to `addr` (about `tokens / 20` seconds each); their
/// statuses.
async fn burst_of(addr: &str, n: usize, tokens: u32) -> Vec<u16> {
    let body = serde_json::json!({
        "model": MODEL, "max_tokens": tokens,
        "messages": [{"role": "user", "content": "hello"}],
    })
    .to_string();
    join_all((0..n).map(|_| {
        let body = body.clone();
        async move {
            request(
                addr,
                "POST",
                "/v1/chat/completions",
                Some(&body),
                Duration::from_secs(30),
            )
            .await
            .map_or(0, |(s, _)| s)
        }
    }))
    .await
}

/// Until router `addr` has `n` requests in flight on the engine (and `spilled` at the provider).
async fn in_flight(addr: &str, local: f64, at_provider: f64) -> anyhow::Result<()> {
    eventually(
        &format!("{local} local and {at_provider} spilled in flight at {addr}"),
        Duration::from_secs(10),
        || async {
            let l = metric(addr, IN_FLIGHT, &[("destination", "local")]).await;
            let p = metric(addr, IN_FLIGHT, &[("destination", "fake")]).await;
            match (l, p) {
                (Ok(l), Ok(p)) if l == local && p == at_provider => Ok(Some(())),
                (l, p) => Err(format!("local {l:?}, provider {p:?}")),
            }
        },
    )
    .await
}

async fn shared(env: &Env) -> anyhow::Result<String> {
    let routers = env.pods(NS, "router");
    ensure!(routers.len() == 2, "routers: {routers:?}");
    let engine = env.pods(NS, "engine").pop().context("no engine pod")?;
    let engine_addr = http(&engine, 8000);
    let (a, b) = (&routers[0], &routers[1]);
    heard(a, b).await?;
    heard(b, a).await?;
    let a_addr = http(a, 8080);

    // All traffic on a: eight 3-second requests at once all run on the engine.
    let eight = tokio::spawn({
        let a_addr = a_addr.clone();
        async move { burst_of(&a_addr, 8, 60).await }
    });
    in_flight(&a_addr, 8.0, 0.0).await?;
    let running = metric(&engine_addr, "vllm:num_requests_running", &[]).await?;
    ensure!(running == 8.0, "engine runs {running}");
    let statuses = eight.await?;
    ensure!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    // Traffic on both: 12 clients on each for 6 s, short requests; the engine refuses none.
    let loads = [
        Load::start(a_addr.clone(), MODEL, 12, 4),
        Load::start(http(b, 8080), MODEL, 12, 4),
    ];
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut answered = 0;
    for l in loads {
        answered += l.ok.load(std::sync::atomic::Ordering::Relaxed);
        l.finish(Ok(String::new())).await?;
    }
    let refused = metric(
        &engine_addr,
        "engine_sim_requests_total",
        &[("outcome", "rejected")],
    )
    .await?;
    ensure!(
        refused == 0.0,
        "the engine refused {refused} (more than 9 at once)"
    );
    let peak = metric(&engine_addr, "engine_sim_peak_running", &[]).await?;
    let local_a = metric(
        &a_addr,
        "spillway_router_requests_total",
        &[("destination", "local")],
    )
    .await?;
    let local_b = metric(
        &http(b, 8080),
        "spillway_router_requests_total",
        &[("destination", "local")],
    )
    .await?;
    ensure!(
        local_a > 0.0 && local_b > 0.0,
        "local: a {local_a}, b {local_b}"
    );

    // b dies: a counts it at its fixed share (4) once it has not heard it for 500 ms.
    env.kubelet.kill(NS, &b.name).await?;
    let b_peer = http(b, PEER_PORT);
    eventually("a to find b silent", Duration::from_secs(10), || async {
        let age = metric(&a_addr, AGE, &[("peer", &b_peer)])
            .await
            .map_err(|e| e.to_string())?;
        Ok((age > 0.6).then_some(()))
    })
    .await?;
    let six = tokio::spawn({
        let a_addr = a_addr.clone();
        async move { burst_of(&a_addr, 6, 60).await }
    });
    in_flight(&a_addr, 4.0, 2.0).await?;
    let statuses = six.await?;
    ensure!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    // b's pod goes; the new router in its place is heard, and a has all 8 again.
    delete_pod(&env.client, NS, &b.name).await?;
    env.ready_pods(NS, 1, 2, Duration::from_secs(60)).await?;
    let c = env
        .pods(NS, "router")
        .into_iter()
        .find(|p| p.name != a.name)
        .context("no new router")?;
    heard(a, &c).await?;
    let eight = tokio::spawn({
        let a_addr = a_addr.clone();
        async move { burst_of(&a_addr, 8, 60).await }
    });
    in_flight(&a_addr, 8.0, 0.0).await?;
    let statuses = eight.await?;
    ensure!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    Ok(format!(
        "8 of 8 local on one router; {answered} requests on both, engine peak {peak} of 8 (bound 9), none refused; 4 local + 2 spilled with the peer dead; 8 again with its replacement"
    ))
}
