//! k. Safe upgrades: a changed image makes a candidate revision next to the serving one, which
//! is paused and resumed by annotation. It first gets half the requests mirrored (shadow:
//! answered for nobody), then a canary step sends it its weight of the requests (counted at the
//! engines); the gate passes and promotes it, and the previous revision goes after
//! `keepPreviousSeconds`. Then a slower candidate (prefill 4x) fails the gate in its shadow
//! stage, before any client saw it, and is scaled to 0. Streamed load runs throughout, and
//! every request is answered.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;

use super::{Env, MODEL, policy, service};
use crate::support::eventually;
use crate::support::operator::{InferenceService, isvc};
use crate::support::traffic::{Load, metric};

const NS: &str = "k-rollout";

const ROLLOUT: &str = "  router: {replicas: 1}\n  rollout: {strategy: Canary, shadowPercent: 50, steps: [{weight: 50, pauseSeconds: 30}], gate: {minRequests: 40, maxErrorRate: 0.05, maxTtftP95Ratio: 1.5}, keepPreviousSeconds: 10}\n";

fn spec(prefill_ms: u32, image_suffix: &str) -> String {
    service("svc", NS, "one", 4, ROLLOUT)
        .replace(
            r#""--prefill-ms", "100""#,
            &format!(r#""--prefill-ms", "{prefill_ms}""#),
        )
        .replace(
            &format!("image: {}", crate::support::operator::IMAGE),
            &format!("image: {}{image_suffix}", crate::support::operator::IMAGE),
        )
}

/// Requests each engine pod has answered (by pod name).
async fn served(env: &Env) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for p in env.pods(NS, "engine") {
        let n = metric(&format!("{}:8000", p.ip), "engine_sim_requests_total", &[])
            .await
            .unwrap_or(0.0);
        out.insert(p.name, n);
    }
    out
}

async fn status(env: &Env) -> anyhow::Result<InferenceService> {
    isvc(&env.client, NS, "svc")
        .await
        .map_err(anyhow::Error::msg)
}

/// `kubectl annotate infsvc svc spillway.dev/rollout=<command>`.
async fn annotate(env: &Env, command: &str) -> anyhow::Result<()> {
    let api: Api<InferenceService> = Api::namespaced(env.client.clone(), NS);
    let patch = serde_json::json!({"metadata": {"annotations": {spillway::api::ROLLOUT_ANNOTATION: command}}});
    api.patch(
        "svc",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

fn weight_of(s: &InferenceService, name: &str) -> Option<i32> {
    s.status
        .as_ref()?
        .revisions
        .iter()
        .find(|r| r.name == name)
        .map(|r| r.weight)
}

pub async fn run(env: &Env) -> anyhow::Result<String> {
    env.prepare(NS, 3).await?;
    env.apply(
        NS,
        &policy(
            "one",
            "minReplicas: 1, maxReplicas: 1, intervalSeconds: 1, burst: {mode: Never}",
        ),
    )
    .await?;
    env.apply(NS, &spec(100, "")).await?;
    let mut ctl = env.controller("ctl-k").await?;
    env.ready_pods(NS, 1, 1, Duration::from_secs(60)).await?;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
    let stable_pod = env.pods(NS, "engine")[0].name.clone();
    eventually(
        "status to list the first revision",
        Duration::from_secs(30),
        || async {
            let s = status(env).await.map_err(|e| e.to_string())?;
            Ok(s.status
                .and_then(|st| st.stable_revision)
                .filter(|r| r == "svc-engine"))
        },
    )
    .await?;
    let router = env.router_addr(NS)?;
    let load = Load::streaming(router.clone(), MODEL, 3, 5);
    let started = Instant::now();
    let result = async {
        // 1. A new image: a candidate Deployment beside the serving one.
        env.apply(NS, &spec(100, "-v2")).await?;
        let candidate = eventually("a candidate revision", Duration::from_secs(30), || async {
            let s = status(env).await.map_err(|e| e.to_string())?;
            Ok(s.status.and_then(|st| st.candidate_revision))
        })
        .await?;
        ensure!(candidate != "svc-engine" && candidate.starts_with("svc-"), "{candidate}");
        deployments
            .get(&candidate)
            .await
            .context("the candidate's Deployment")?;
        // Paused and resumed by annotation, each acted on once and the annotation removed.
        for (command, phase) in [
            ("pause", spillway::api::RolloutPhase::Paused),
            ("resume", spillway::api::RolloutPhase::Progressing),
        ] {
            annotate(env, command).await?;
            eventually(
                &format!("{command} acted on and removed"),
                Duration::from_secs(20),
                || async {
                    let s = status(env).await.map_err(|e| e.to_string())?;
                    let standing = s.metadata.annotations.as_ref().is_some_and(|a| {
                        a.contains_key(spillway::api::ROLLOUT_ANNOTATION)
                    });
                    let at = s.status.and_then(|st| st.rollout).map(|r| r.phase);
                    Ok((at == Some(phase) && !standing).then_some(()))
                },
            )
            .await?;
        }
        // 2. At its step, with a ready replica: the engines' counts follow the weights.
        eventually("the candidate ready at weight 50", Duration::from_secs(60), || async {
            let s = status(env).await.map_err(|e| e.to_string())?;
            let ready = s.status.as_ref().is_some_and(|st| {
                st.revisions
                    .iter()
                    .any(|r| r.name == candidate && r.ready_replicas >= 1)
            });
            Ok((ready && weight_of(&s, &candidate) == Some(50)).then_some(()))
        })
        .await?;
        let before = served(env).await;
        tokio::time::sleep(Duration::from_secs(8)).await;
        let after = served(env).await;
        let s = status(env).await?;
        let r = s.status.as_ref().and_then(|st| st.rollout.clone()).context("rollout")?;
        ensure!(r.stage == "Step", "the step ended while counting: {r:?}");
        let gained = |pod: &str| after.get(pod).unwrap_or(&0.0) - before.get(pod).unwrap_or(&0.0);
        let stable_n = gained(&stable_pod);
        let cand_n: f64 = after
            .keys()
            .filter(|p| p.starts_with(&format!("{candidate}-")))
            .map(|p| gained(p))
            .sum();
        let share = cand_n / (cand_n + stable_n).max(1.0);
        ensure!(
            (0.35..=0.65).contains(&share),
            "candidate served {cand_n} and stable {stable_n} ({:.0}% for a weight of 50)",
            share * 100.0
        );
        // 3. The gate passes; promoted; the old revision goes after keepPreviousSeconds.
        let promoted = eventually("promotion", Duration::from_secs(90), || async {
            let s = status(env).await.map_err(|e| e.to_string())?;
            let st = s.status.unwrap_or_default();
            Ok(st
                .rollout
                .filter(|r| r.phase == spillway::api::RolloutPhase::Promoted)
                .map(|r| (r.message, r.gate)))
        })
        .await?;
        let promoted_after = started.elapsed().as_secs_f64();
        let promoted_at = Instant::now();
        eventually("the previous revision removed", Duration::from_secs(60), || async {
            let gone = deployments
                .get_opt("svc-engine")
                .await
                .map_err(|e| e.to_string())?
                .is_none();
            Ok(gone.then_some(()))
        })
        .await?;
        let kept = promoted_at.elapsed().as_secs_f64();
        let s = status(env).await?;
        ensure!(
            s.status.as_ref().and_then(|st| st.stable_revision.clone()) == Some(candidate.clone()),
            "stable is not the promoted candidate"
        );
        // 4. A slower candidate fails the gate and traffic returns to the stable.
        env.apply(NS, &spec(400, "-v2")).await?;
        let (why, slow) = eventually("the gate to fail", Duration::from_secs(120), || async {
            let s = status(env).await.map_err(|e| e.to_string())?;
            let st = s.status.unwrap_or_default();
            Ok(st
                .rollout
                .filter(|r| {
                    r.phase == spillway::api::RolloutPhase::RolledBack && r.candidate != candidate
                })
                .map(|r| (r.message, r.candidate)))
        })
        .await?;
        ensure!(why.contains("shadow") && why.contains("time to first token"), "{why}");
        let mirrored = metric(&router, "spillway_router_shadow_requests_total", &[]).await?;
        ensure!(mirrored > 0.0, "no mirrored request was compared");
        let s = status(env).await?;
        ensure!(weight_of(&s, &candidate) == Some(100), "stable weight after rollback");
        ensure!(weight_of(&s, &slow) == Some(0), "candidate weight after rollback");
        let slow_replicas = eventually("the slow candidate at 0", Duration::from_secs(20), || async {
            let d = deployments.get(&slow).await.map_err(|e| e.to_string())?;
            let n = d.spec.and_then(|s| s.replicas).unwrap_or(0);
            Ok((n == 0).then_some(n))
        })
        .await?;
        Ok(format!(
            "candidate {candidate} took {:.0}% of requests at weight 50 ({cand_n} vs {stable_n}); promoted {:.0}s after the change (\"{}\", gate {:?}); previous removed {kept:.0}s later; {mirrored} mirrored pairs compared; slower {slow} rolled back (\"{why}\"), scaled to {slow_replicas}",
            share * 100.0,
            promoted_after,
            promoted.0,
            promoted.1
        ))
    }
    .await;
    let out = load.finish(result).await;
    ctl.stop().await;
    out
}
