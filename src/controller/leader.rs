//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Every write to the Lease carries the `resourceVersion` that was read (optimistic
//! concurrency), so two candidates can never both believe they hold it: the slower one
//! gets a 409 Conflict and re-reads. The decision is a pure function of the Lease and the clock.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// Lease timings, client-go's defaults.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// The leader gives up if it could not renew for this long (less than `lease_duration`).
    pub renew_deadline: Duration,
    /// How often candidates retry and the leader renews.
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(name: String, namespace: String, identity: String) -> Self {
        Self {
            name,
            namespace,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What to do with the Lease as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease exists: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Someone else held it and it expired (or was released): take it over.
    Acquire,
    /// Someone else holds a live lease, which expires in `expires_in` unless renewed.
    Follow {
        holder: String,
        expires_in: Duration,
    },
}

/// Decides from the Lease read and the current time. Expiry is judged by our clock against the
/// holder's renewTime; `lease_duration` must exceed any clock skew between candidates.
pub fn decide(
    lease: Option<&LeaseSpec>,
    identity: &str,
    now: jiff::Timestamp,
    lease_duration: Duration,
) -> LeaseAction {
    let Some(spec) = lease else {
        return LeaseAction::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == identity => LeaseAction::Renew,
        None | Some("") => LeaseAction::Acquire,
        Some(holder) => {
            let duration = spec
                .lease_duration_seconds
                .map(|s| Duration::from_secs(s.max(0) as u64))
                .unwrap_or(lease_duration);
            // Skew either way within a lease duration is a live lease; a renewTime further
            // ahead than that is a broken clock, and must not hold the lease forever.
            let age = spec
                .renew_time
                .as_ref()
                .map(|MicroTime(t)| now.duration_since(*t))
                .filter(|age| age.unsigned_abs() <= duration);
            match age {
                None => LeaseAction::Acquire,
                Some(age) => LeaseAction::Follow {
                    holder: holder.to_string(),
                    // A renewTime ahead of our clock counts as just renewed.
                    expires_in: duration
                        .saturating_sub(Duration::try_from(age).unwrap_or_default()),
                },
            }
        }
    }
}

/// The Lease spec to write for `action` (None when following).
pub fn next_spec(
    current: Option<&LeaseSpec>,
    action: &LeaseAction,
    identity: &str,
    now: jiff::Timestamp,
    lease_duration: Duration,
) -> Option<LeaseSpec> {
    let base = LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(lease_duration.as_secs() as i32),
        renew_time: Some(MicroTime(now)),
        ..LeaseSpec::default()
    };
    match action {
        LeaseAction::Follow { .. } => None,
        LeaseAction::Create => Some(LeaseSpec {
            acquire_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..base
        }),
        LeaseAction::Renew => {
            let c = current.cloned().unwrap_or_default();
            Some(LeaseSpec {
                acquire_time: c.acquire_time.or(Some(MicroTime(now))),
                lease_transitions: c.lease_transitions,
                ..base
            })
        }
        LeaseAction::Acquire => {
            let transitions = current.and_then(|c| c.lease_transitions).unwrap_or(0) + 1;
            Some(LeaseSpec {
                acquire_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
                ..base
            })
        }
    }
}

/// What one round found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Round {
    /// Whether we hold the lease now.
    pub held: bool,
    /// When another holder's lease runs out, if it was read: a standby tries again then rather
    /// than up to a retry period later, so it takes over within the lease duration.
    pub expires_in: Option<Duration>,
}

/// One round: read, decide, write. A 409 Conflict (someone wrote in between) counts as not
/// holding the lease.
pub async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
) -> Result<Round, kube::Error> {
    let current = api.get_opt(&cfg.name).await?;
    let now = jiff::Timestamp::now();
    let action = decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &cfg.identity,
        now,
        cfg.lease_duration,
    );
    let Some(spec) = next_spec(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &action,
        &cfg.identity,
        now,
        cfg.lease_duration,
    ) else {
        let expires_in = match action {
            LeaseAction::Follow { expires_in, .. } => Some(expires_in),
            _ => None,
        };
        return Ok(Round {
            held: false,
            expires_in,
        });
    };
    let result = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            // Keeps metadata.resourceVersion: the replace fails if anyone wrote since our read.
            lease.spec = Some(spec);
            api.replace(&cfg.name, &PostParams::default(), &lease).await
        }
    };
    let held = match result {
        Ok(_) => true,
        Err(kube::Error::Api(e)) if e.code == 409 => false,
        Err(e) => return Err(e),
    };
    Ok(Round {
        held,
        expires_in: None,
    })
}

/// Gives the lease up on shutdown so a standby takes over at once instead of after expiry.
pub async fn release(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    api.replace(&cfg.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

/// Runs the election until `shutdown`; publishes leadership on `tx`. Leadership that could not
/// be renewed within `renew_deadline` is given up (the caller stops writing).
pub async fn run(
    api: Api<Lease>,
    cfg: LeaseConfig,
    tx: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_renew: Option<tokio::time::Instant> = None;
    loop {
        // A hung call (a half-open connection) must not keep a stale leader acting: each round
        // is bounded, and leadership lapses on our own clock after the renew deadline.
        let round =
            tokio::time::timeout(cfg.renew_deadline, try_acquire_or_renew(&api, &cfg)).await;
        let round = round.unwrap_or_else(|_| {
            Err(kube::Error::Service(
                "leader election round timed out".into(),
            ))
        });
        let mut wait = cfg.retry_period;
        match round {
            Ok(Round { held: true, .. }) => {
                if !*tx.borrow() {
                    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
                }
                last_renew = Some(tokio::time::Instant::now());
                tx.send_replace(true);
            }
            Ok(Round {
                held: false,
                expires_in,
            }) => {
                // Just after the holder's lease runs out, if that comes before the next retry.
                if let Some(left) = expires_in {
                    wait = wait.min(left + Duration::from_millis(50));
                }
                if *tx.borrow() {
                    tracing::warn!(lease = %cfg.name, "lost the leader lease");
                }
                last_renew = None;
                tx.send_replace(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election round failed");
            }
        }
        if last_renew.is_some_and(|t| t.elapsed() > cfg.renew_deadline) {
            tracing::warn!(
                "could not renew the leader lease within the renew deadline; stepping down"
            );
            last_renew = None;
            tx.send_replace(false);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => break,
        }
    }
    if *tx.borrow() {
        tx.send_replace(false);
        if let Err(e) = release(&api, &cfg).await {
            tracing::warn!(error = %e, "releasing the leader lease failed; a standby takes over after it expires");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn ts(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).unwrap()
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(ts(renewed))),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "a", ts(100), D), LeaseAction::Create);
        assert_eq!(
            decide(Some(&held_by("a", 99)), "a", ts(100), D),
            LeaseAction::Renew
        );
        // Renewed 10 s ago: a standby looks again when the 15 s run out, 5 s from now.
        assert_eq!(
            decide(Some(&held_by("b", 90)), "a", ts(100), D),
            LeaseAction::Follow {
                holder: "b".into(),
                expires_in: Duration::from_secs(5)
            }
        );
        // Expired: 16 s since renewal with a 15 s lease.
        assert_eq!(
            decide(Some(&held_by("b", 84)), "a", ts(100), D),
            LeaseAction::Acquire
        );
        // Released.
        let mut released = held_by("b", 99);
        released.holder_identity = None;
        assert_eq!(
            decide(Some(&released), "a", ts(100), D),
            LeaseAction::Acquire
        );
        // A renewTime slightly ahead of our clock (skew) is a live lease...
        assert_eq!(
            decide(Some(&held_by("b", 101)), "a", ts(100), D),
            LeaseAction::Follow {
                holder: "b".into(),
                expires_in: D
            }
        );
        // ...but one far in the future (a broken clock) does not hold the lease forever.
        assert_eq!(
            decide(Some(&held_by("b", 200)), "a", ts(100), D),
            LeaseAction::Acquire
        );
    }

    #[test]
    fn acquiring_counts_a_transition_renewing_does_not() {
        let cur = held_by("b", 50);
        let acq = next_spec(Some(&cur), &LeaseAction::Acquire, "a", ts(100), D).unwrap();
        assert_eq!(acq.lease_transitions, Some(4));
        assert_eq!(acq.holder_identity.as_deref(), Some("a"));
        assert_eq!(acq.acquire_time, Some(MicroTime(ts(100))));
        let mine = held_by("a", 99);
        let ren = next_spec(Some(&mine), &LeaseAction::Renew, "a", ts(100), D).unwrap();
        assert_eq!(ren.lease_transitions, Some(3));
        assert_eq!(ren.renew_time, Some(MicroTime(ts(100))));
        assert!(
            next_spec(
                Some(&cur),
                &LeaseAction::Follow {
                    holder: "b".into(),
                    expires_in: D
                },
                "a",
                ts(100),
                D
            )
            .is_none()
        );
    }
}
