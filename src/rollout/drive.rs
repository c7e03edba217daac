//! What each revision is and gets (pure): which revisions exist after a spec change, and one
//! pass of a rollout over them — the roles, the routers' weights, the candidate's replicas.
//! The controller's autoscaler loop drives it; reconcile renders what [`plan`] names.

use super::gate::Window;
use super::machine::{Observed, Rollout, advance, start, traffic};
use crate::api::{
    InferenceServiceStatus, RevisionRole, RevisionStatus, RolloutCommand, RolloutPhase,
    RolloutSpec, ScalingPolicySpec,
};
use crate::clock::Millis;

/// A revision by name and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    pub name: String,
    pub hash: String,
}

/// The revisions that exist: what status says serves (and was kept), and a candidate when the
/// spec asks for something else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub stable: Revision,
    pub candidate: Option<Revision>,
    pub previous: Option<Revision>,
    /// Status lists the candidate as such already (it is not one the spec has just asked
    /// for again after it went).
    pub candidate_listed: bool,
}

/// A revision's Deployment and Service name: the service's name and 6 hex digits of its
/// hash (a Service name has at most 63 characters; a service's at most 56).
pub fn revision_name(service: &str, hash: &str) -> String {
    format!("{service}-{}", &hash[..hash.len().min(6)])
}

/// The revisions for spec hash `hash`. Before status lists any, the service's first revision
/// is its `initial` Deployment (`<name>-engine`), serving what the spec says. A spec back at
/// the previous revision's hash makes that warm revision the candidate.
pub fn plan(
    service: &str,
    initial: &str,
    hash: &str,
    status: Option<&InferenceServiceStatus>,
) -> Plan {
    let listed = |role| {
        status.and_then(|s| {
            s.revisions
                .iter()
                .find(|r| r.role == role)
                .map(|r| Revision {
                    name: r.name.clone(),
                    hash: r.hash.clone(),
                })
        })
    };
    let stable = listed(RevisionRole::Stable).unwrap_or_else(|| Revision {
        name: initial.to_string(),
        hash: hash.to_string(),
    });
    let mut previous = listed(RevisionRole::Previous);
    let candidate = (stable.hash != hash).then(|| match previous.take_if(|p| p.hash == hash) {
        Some(p) => p,
        None => listed(RevisionRole::Candidate)
            .filter(|c| c.hash == hash)
            .unwrap_or_else(|| Revision {
                name: revision_name(service, hash),
                hash: hash.to_string(),
            }),
    });
    let candidate_listed = candidate
        .as_ref()
        .is_some_and(|c| listed(RevisionRole::Candidate).is_some_and(|l| l == *c));
    Plan {
        stable,
        candidate,
        previous,
        candidate_listed,
    }
}

/// The policy a candidate scales by on its own engines while traffic moves to it: the
/// service's, with at least what its stage needs (`need`) and room for that.
pub fn candidate_policy(policy: &ScalingPolicySpec, need: i32) -> ScalingPolicySpec {
    ScalingPolicySpec {
        min_replicas: need.max(1),
        max_replicas: policy.max_replicas.max(need),
        ..policy.clone()
    }
}

/// A revision's replicas as its Deployment shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replicas {
    pub replicas: i32,
    pub ready: i32,
}

/// What one pass sees.
#[derive(Clone, Debug)]
pub struct Seen<'a> {
    pub spec: Option<&'a RolloutSpec>,
    pub plan: &'a Plan,
    /// The rollout as last recorded.
    pub rollout: Option<&'a Rollout>,
    pub stable: Replicas,
    pub candidate: Replicas,
    pub previous: Replicas,
    pub now: Millis,
    /// The candidate's and the stable's answers since the stage began.
    pub windows: Option<(&'a Window, &'a Window)>,
    pub command: Option<RolloutCommand>,
    pub ready_deadline_ms: Millis,
}

/// What the pass decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Pass {
    pub rollout: Option<Rollout>,
    /// For status (and the routers, which split by the weights).
    pub revisions: Vec<RevisionStatus>,
    /// The revision serving after this pass (the autoscaler scales it).
    pub stable: Revision,
    /// Replicas the candidate must have now; `None`: no candidate to size.
    pub candidate_replicas: Option<(Revision, i32)>,
    /// Traffic is moving: the stable does not scale down.
    pub hold_stable: bool,
    /// The pass acted on its command.
    pub command_used: bool,
}

/// Whether the pass's command made a difference: the rollout's phase after it is not what the
/// same pass without it gives (a `resume` while not paused, an `abort` too late, any command
/// on a rollout that is over, change nothing).
fn changed_by_command(s: &Seen<'_>, r: &Rollout) -> bool {
    s.command.is_some()
        && advance(s.spec, r, &observed(s, s.command)).phase
            != advance(s.spec, r, &observed(s, None)).phase
}

/// What the machine sees of this pass, with `command`.
fn observed<'a>(s: &Seen<'a>, command: Option<RolloutCommand>) -> Observed<'a> {
    Observed {
        now: s.now,
        stable_ready: s.stable.ready,
        candidate_ready: s.candidate.ready,
        windows: s.windows,
        command,
        ready_deadline_ms: s.ready_deadline_ms,
    }
}

fn active(r: &Rollout) -> bool {
    matches!(r.phase, RolloutPhase::Progressing | RolloutPhase::Paused)
}

/// One pass of the rollout over the planned revisions.
pub fn pass(s: &Seen<'_>) -> Pass {
    let plan = s.plan;
    let observed = observed(s, s.command);
    let (mut stable, mut candidate, mut previous) = (
        plan.stable.clone(),
        plan.candidate.clone(),
        plan.previous.clone(),
    );
    let (mut stable_n, mut candidate_n, mut previous_n) = (s.stable, s.candidate, s.previous);
    let mut command_used = false;
    // A rollout that ended for a candidate that then went (the spec moved on) is over: the
    // spec asking for that revision again starts a new one.
    let over = |r: &Rollout| {
        matches!(r.phase, RolloutPhase::RolledBack | RolloutPhase::Failed) && !plan.candidate_listed
    };
    let rollout = match (&candidate, s.rollout) {
        (Some(c), Some(r)) if r.candidate == c.name && !over(r) => {
            let next = advance(s.spec, r, &observed);
            command_used = changed_by_command(s, r);
            // Promoted (now, or before a status write that did not land: status still lists
            // the candidate as such): the candidate serves; the stable stays warm as the
            // previous revision.
            if next.phase == RolloutPhase::Promoted {
                previous = Some(std::mem::replace(&mut stable, c.clone()));
                previous_n = std::mem::replace(&mut stable_n, candidate_n);
                candidate = None;
            }
            Some(next)
        }
        (Some(c), _) => Some(start(s.spec, &stable.name, &c.name, s.now)),
        // Promoted: an abort within keepPreviousSeconds switches back to the previous (also
        // when the switch is decided but status does not show it yet).
        (None, Some(r))
            if r.candidate == stable.name
                && matches!(r.phase, RolloutPhase::Promoted | RolloutPhase::RolledBack) =>
        {
            let next = advance(s.spec, r, &observed);
            command_used = changed_by_command(s, r);
            if next.phase == RolloutPhase::RolledBack
                && let Some(p) = previous.take_if(|p| p.name == r.stable)
            {
                candidate = Some(std::mem::replace(&mut stable, p));
                candidate_n = std::mem::replace(&mut stable_n, previous_n);
            }
            Some(next)
        }
        // The spec went back to the stable revision: the candidate goes.
        (None, Some(r)) if active(r) => {
            let mut next = r.clone();
            next.phase = RolloutPhase::RolledBack;
            next.ended = Some(s.now);
            next.paused_at = None;
            next.message = format!("the spec is back at {}; {} goes", stable.name, r.candidate);
            Some(next)
        }
        (None, r) => r.cloned(),
    };
    // The previous revision is kept for keepPreviousSeconds after the promotion, then goes.
    let keep_ms = Millis::from(s.spec.map_or(0, |x| x.keep_previous_seconds.max(0))) * 1000;
    let keep = rollout.as_ref().is_some_and(|r| {
        r.phase == RolloutPhase::Promoted
            && r.ended.is_some_and(|t| s.now - t < keep_ms)
            && previous.as_ref().is_some_and(|p| p.name == r.stable)
    });
    if !keep {
        previous = None;
    }
    let t = rollout
        .as_ref()
        .filter(|r| active(r) && candidate.as_ref().is_some_and(|c| c.name == r.candidate))
        .map(|r| traffic(s.spec, r, stable_n.ready));
    let weight = t.map_or(0, |t| t.candidate_weight as i32);
    let entry = |r: &Revision, role, n: Replicas, weight, shadow| RevisionStatus {
        name: r.name.clone(),
        hash: r.hash.clone(),
        role,
        replicas: n.replicas,
        ready_replicas: n.ready,
        weight,
        shadow_percent: shadow,
    };
    let mut revisions = vec![entry(
        &stable,
        RevisionRole::Stable,
        stable_n,
        100 - weight,
        0,
    )];
    if let Some(c) = &candidate {
        let shadow = t.map_or(0, |t| t.shadow_percent as i32);
        revisions.push(entry(
            c,
            RevisionRole::Candidate,
            candidate_n,
            weight,
            shadow,
        ));
    }
    if let Some(p) = &previous {
        revisions.push(entry(p, RevisionRole::Previous, previous_n, 0, 0));
    }
    let candidate_replicas = candidate
        .clone()
        .map(|c| (c, t.map_or(0, |t| t.candidate_replicas)));
    Pass {
        rollout,
        revisions,
        stable,
        candidate_replicas,
        hold_stable: t.is_some(),
        command_used,
    }
}
