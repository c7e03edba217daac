//! d. Two controllers with leader election: the leader is killed; the other takes the Lease
//! within the lease duration, scales nothing down on takeover, and decides within two
//! intervals of taking over.

use std::time::{Duration, Instant};

use anyhow::ensure;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

use super::startup::decided_by;
use super::{Env, policy, service};
use crate::support::eventually;
use crate::support::operator::{SYSTEM_NS, engine_replicas};

const NS: &str = "d-failover";
const INTERVAL: u64 = 2;
/// The controller's lease duration (leader::LeaseConfig).
const LEASE: Duration = Duration::from_secs(15);

async fn holder(env: &Env) -> Result<Option<String>, String> {
    let lease = Api::<Lease>::namespaced(env.client.clone(), SYSTEM_NS)
        .get_opt("spillway-controller")
        .await
        .map_err(|e| e.to_string())?;
    Ok(lease
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

pub async fn run(env: &Env) -> anyhow::Result<String> {
    env.prepare(NS, 4).await?;
    let p = |min: u32| {
        policy(
            "p",
            &format!(
                "minReplicas: {min}, maxReplicas: 4, intervalSeconds: {INTERVAL}, scaleDown: {{stabilizationWindowSeconds: 60}}"
            ),
        )
    };
    env.apply(NS, &p(2)).await?;
    env.apply(NS, &service("svc", NS, "p", 4, "")).await?;
    let mut first = env.controller("ctl-d1").await?;
    eventually("ctl-d1 to lead", Duration::from_secs(30), || async {
        Ok((holder(env).await?.as_deref() == Some("ctl-d1")).then_some(()))
    })
    .await?;
    let mut second = env.controller("ctl-d2").await?;
    env.ready_pods(NS, 2, 2, Duration::from_secs(60)).await?;
    decided_by(&first, NS, "svc", Duration::from_secs(20)).await?;

    // The load is gone (idle engines) and the minimum drops: scaling down is allowed only after
    // the 60 s window, for the old leader and the new one alike.
    env.apply(NS, &p(1)).await?;
    tokio::time::sleep(Duration::from_secs(INTERVAL)).await;
    first.kill().await;
    let killed = Instant::now();
    let took_over = eventually(
        "ctl-d2 to take the Lease",
        LEASE + Duration::from_secs(10),
        || async {
            Ok((holder(env).await?.as_deref() == Some("ctl-d2")).then(|| killed.elapsed()))
        },
    )
    .await?;
    let elected = Instant::now();
    decided_by(&second, NS, "svc", Duration::from_secs(30)).await?;
    let decided = elected.elapsed();
    // No scale-down in the first intervals after the takeover.
    for _ in 0..(3 * INTERVAL * 2) {
        let r = engine_replicas(&env.client, NS, "svc")
            .await
            .map_err(anyhow::Error::msg)?;
        ensure!(r == 2, "the new leader scaled 2 -> {r} on takeover");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    second.stop().await;
    // The lease runs out at most LEASE after the last renewal, which came before the kill; the
    // second allows for polling the Lease here.
    ensure!(
        took_over <= LEASE + Duration::from_secs(1),
        "the standby took the Lease {took_over:?} after the leader died (lease duration {LEASE:?})"
    );
    let bound = Duration::from_secs(2 * INTERVAL + 1);
    ensure!(
        decided <= bound,
        "the new leader decided {decided:?} after taking the Lease (bound {bound:?})"
    );
    Ok(format!(
        "Lease taken {:.1}s after the leader was killed; first decision {:.1}s after; replicas held at 2",
        took_over.as_secs_f64(),
        decided.as_secs_f64()
    ))
}
