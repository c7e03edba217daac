//! a. The autoscaler decides within two policy intervals of the controller's caches being
//! synced: for a service that was there before the controller started (a restart, a failover),
//! and for one created after.

use std::time::{Duration, Instant};

use super::{Env, policy, service};
use crate::support::eventually;
use crate::support::operator::{Controller, SYNCED_LOG, condition, isvc};
use crate::support::traffic::request;

const NS: &str = "a-startup";
const INTERVAL: u64 = 2;

pub async fn run(env: &Env) -> anyhow::Result<String> {
    env.prepare(NS, 4).await?;
    env.apply(
        NS,
        &policy(
            "p",
            &format!("minReplicas: 1, maxReplicas: 4, intervalSeconds: {INTERVAL}"),
        ),
    )
    .await?;
    env.apply(NS, &service("before", NS, "p", 4, "")).await?;

    // A first controller brings the service up and decides once; then it stops.
    let mut first = env.controller("ctl-a1").await?;
    env.ready_pods(NS, 1, 2, Duration::from_secs(60)).await?;
    first_decision(
        env,
        "before",
        jiff::Timestamp::UNIX_EPOCH,
        Duration::from_secs(30),
    )
    .await?;
    first.stop().await;

    // The restart: the decision must follow the sync, not some later wake-up.
    let started = jiff::Timestamp::now();
    let mut second = env.controller("ctl-a2").await?;
    let synced = wait_synced(&second).await?;
    decided_by(&second, NS, "before", Duration::from_secs(60)).await?;
    let restart = synced.elapsed();
    first_decision(env, "before", started, Duration::from_secs(10)).await?;

    // A service created after the sync.
    let created = Instant::now();
    env.apply(NS, &service("after", NS, "p", 4, "")).await?;
    decided_by(&second, NS, "after", Duration::from_secs(60)).await?;
    let new = created.elapsed();
    first_decision(
        env,
        "after",
        jiff::Timestamp::UNIX_EPOCH,
        Duration::from_secs(10),
    )
    .await?;
    second.stop().await;

    let bound = Duration::from_secs(2 * INTERVAL + 1);
    anyhow::ensure!(
        restart <= bound,
        "after a restart the first decision came {restart:?} after the caches synced (bound {bound:?})"
    );
    // A new service first needs its engine Deployment (reconcile) in the autoscaler's cache.
    let bound_new = Duration::from_secs(2 * INTERVAL + 2);
    anyhow::ensure!(
        new <= bound_new,
        "a new service's first decision came {new:?} after it was created (bound {bound_new:?})"
    );
    Ok(format!(
        "first decision {:.1}s after the caches synced on restart; {:.1}s after a new service was created",
        restart.as_secs_f64(),
        new.as_secs_f64()
    ))
}

/// Waits for the controller's log to say its caches are synced; the moment it was seen.
pub async fn wait_synced(c: &Controller) -> anyhow::Result<Instant> {
    eventually(
        "the controller's caches to sync",
        Duration::from_secs(30),
        || async { Ok(c.log().contains(SYNCED_LOG).then(Instant::now)) },
    )
    .await
}

/// Waits until controller `c` has decided for `ns/name` (its decision gauge for the service
/// appears on its /metrics).
pub async fn decided_by(
    c: &Controller,
    ns: &str,
    name: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let series = format!("namespace=\"{ns}\",service=\"{name}\"");
    eventually(
        &format!("{}'s first decision on {name}", c.identity),
        limit,
        || async {
            let (_, page) = request(&c.metrics, "GET", "/metrics", None, Duration::from_secs(2))
                .await
                .map_err(|e| e.to_string())?;
            let decided = page.lines().any(|l| {
                l.starts_with("spillway_controller_autoscaler_desired_replicas")
                    && l.contains(&series)
            });
            Ok(decided.then_some(()))
        },
    )
    .await
}

/// Waits for an autoscaler decision written at or after `since` (seconds precision): status
/// `desiredReplicas`, `ScalingActive`, and `metrics.sampledAt`.
pub async fn first_decision(
    env: &Env,
    name: &str,
    since: jiff::Timestamp,
    limit: Duration,
) -> anyhow::Result<()> {
    let since = since.as_second();
    eventually(
        &format!("an autoscaler decision on {name}"),
        limit,
        || async {
            let s = isvc(&env.client, NS, name).await?;
            let sampled = s
                .status
                .as_ref()
                .and_then(|st| st.metrics.as_ref())
                .and_then(|m| m.sampled_at.as_ref())
                .map(|t| t.0.as_second());
            let decided = s
                .status
                .as_ref()
                .and_then(|st| st.desired_replicas)
                .is_some()
                && condition(&s, "ScalingActive").is_some()
                && sampled.is_some_and(|t| t >= since);
            Ok(decided.then_some(()))
        },
    )
    .await
}
