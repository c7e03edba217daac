//! Which revisions exist, and what each pass makes of them.

use super::drive::*;
use super::machine::Rollout;
use super::record::{from_status, to_status};
use crate::api::{
    InferenceServiceStatus, RevisionRole, RevisionStatus, RolloutCommand, RolloutPhase,
    RolloutSpec, RolloutStep, RolloutStrategy,
};
use crate::clock::Millis;

const S: Millis = 1000;

fn status(revs: &[(&str, &str, RevisionRole)]) -> InferenceServiceStatus {
    InferenceServiceStatus {
        revisions: revs
            .iter()
            .map(|(name, hash, role)| RevisionStatus {
                name: name.to_string(),
                hash: hash.to_string(),
                role: *role,
                replicas: 0,
                ready_replicas: 0,
                weight: 0,
                shadow_percent: 0,
            })
            .collect(),
        ..Default::default()
    }
}

fn rev(name: &str, hash: &str) -> Revision {
    Revision {
        name: name.into(),
        hash: hash.into(),
    }
}

#[test]
fn the_first_revision_is_the_engine_deployment_and_a_changed_spec_adds_a_candidate() {
    let p = plan("svc", "svc-engine", "aaaaaaaaaa", None);
    assert_eq!(p.stable, rev("svc-engine", "aaaaaaaaaa"));
    assert_eq!((p.candidate, p.previous), (None, None));

    let st = status(&[("svc-engine", "aaaaaaaaaa", RevisionRole::Stable)]);
    let p = plan("svc", "svc-engine", "bbbbbbbbbb", Some(&st));
    assert_eq!(p.stable, rev("svc-engine", "aaaaaaaaaa"));
    assert_eq!(p.candidate, Some(rev("svc-bbbbbb", "bbbbbbbbbb")));

    // Back at the previous revision's hash: that warm revision is the candidate.
    let st = status(&[
        ("svc-bbbbbb", "bbbbbbbbbb", RevisionRole::Stable),
        ("svc-engine", "aaaaaaaaaa", RevisionRole::Previous),
    ]);
    let p = plan("svc", "svc-engine", "aaaaaaaaaa", Some(&st));
    assert_eq!(p.candidate, Some(rev("svc-engine", "aaaaaaaaaa")));
    assert_eq!(p.previous, None);
}

fn canary() -> RolloutSpec {
    RolloutSpec {
        strategy: RolloutStrategy::Canary,
        steps: vec![RolloutStep {
            weight: 20,
            pause_seconds: 60,
        }],
        keep_previous_seconds: 300,
        ..RolloutSpec::default()
    }
}

fn n(replicas: i32, ready: i32) -> Replicas {
    Replicas { replicas, ready }
}

struct World {
    spec: RolloutSpec,
    plan: Plan,
    rollout: Option<Rollout>,
}

impl World {
    /// One pass, then status as the controller writes it becomes the next pass's plan.
    fn pass(
        &mut self,
        now: Millis,
        ready: (i32, i32, i32),
        command: Option<RolloutCommand>,
    ) -> Pass {
        let p = pass(&Seen {
            spec: Some(&self.spec),
            plan: &self.plan,
            rollout: self.rollout.as_ref(),
            stable: n(ready.0, ready.0),
            candidate: n(ready.1, ready.1),
            previous: n(ready.2, ready.2),
            now,
            windows: None,
            command,
            ready_deadline_ms: 600 * S,
        });
        let st = InferenceServiceStatus {
            revisions: p.revisions.clone(),
            ..Default::default()
        };
        self.plan = plan("svc", "svc-engine", "bbbbbbbbbb", Some(&st));
        // Through status and back, as after a controller restart.
        self.rollout = p
            .rollout
            .as_ref()
            .map(|r| from_status(&to_status(r)).unwrap());
        p
    }
}

/// Each revision's name, role and weight, in status order (stable, candidate, previous).
fn weights(p: &Pass) -> Vec<(&str, RevisionRole, i32)> {
    p.revisions
        .iter()
        .map(|r| (r.name.as_str(), r.role, r.weight))
        .collect()
}

/// A service serving `svc-engine` (hash aaaa...) whose spec now asks for bbbb....
fn upgrading() -> World {
    let st = status(&[("svc-engine", "aaaaaaaaaa", RevisionRole::Stable)]);
    World {
        spec: canary(),
        plan: plan("svc", "svc-engine", "bbbbbbbbbb", Some(&st)),
        rollout: None,
    }
}

use RevisionRole::{Candidate, Previous, Stable};

/// The candidate loads while the stable holds; the step gives it 20 %; promotion makes it
/// the stable and keeps the old one warm for keepPreviousSeconds, then lets it go.
#[test]
fn a_canary_moves_weight_then_promotes_and_keeps_the_previous_for_a_while() {
    let mut w = upgrading();
    let p = w.pass(0, (4, 0, 0), None);
    assert_eq!(p.rollout.as_ref().unwrap().phase, RolloutPhase::Progressing);
    assert!(p.hold_stable);
    // The step's weight from the start: routers send that share to the candidate's ready
    // engines first, to the stable's while it has none.
    let moving = [("svc-engine", Stable, 80), ("svc-bbbbbb", Candidate, 20)];
    assert_eq!(weights(&p), moving);
    // The step needs 1 of 4 ready, and promotion all 4 loaded ahead.
    assert_eq!(p.candidate_replicas.as_ref().unwrap().1, 4);

    let p = w.pass(10 * S, (4, 1, 0), None);
    assert_eq!(weights(&p), moving);

    // The step's time is up with the candidate as ready as the stable: promoted.
    let p = w.pass(71 * S, (4, 4, 0), None);
    assert_eq!(p.rollout.as_ref().unwrap().phase, RolloutPhase::Promoted);
    assert_eq!(p.stable, rev("svc-bbbbbb", "bbbbbbbbbb"));
    let promoted = [("svc-bbbbbb", Stable, 100), ("svc-engine", Previous, 0)];
    assert_eq!(weights(&p), promoted);
    assert!(!p.hold_stable && p.candidate_replicas.is_none());

    let p = w.pass(200 * S, (4, 0, 4), None);
    assert_eq!(weights(&p), promoted);
    let p = w.pass(71 * S + 300 * S, (4, 0, 4), None);
    assert_eq!(weights(&p), [("svc-bbbbbb", Stable, 100)], "let go");
    assert_eq!(w.plan.previous, None);
}

/// Aborted within keepPreviousSeconds of promotion: a switch back to the warm previous
/// revision, and the candidate stays rolled back (at 0 replicas) while the spec asks for it.
#[test]
fn an_abort_after_promotion_switches_back_to_the_warm_previous_revision() {
    let mut w = upgrading();
    w.pass(0, (2, 0, 0), None);
    w.pass(1, (2, 2, 0), Some(RolloutCommand::Promote));
    assert_eq!(w.plan.stable.name, "svc-bbbbbb");
    let p = w.pass(100 * S, (2, 0, 2), Some(RolloutCommand::Abort));
    assert!(p.command_used);
    assert_eq!(p.rollout.as_ref().unwrap().phase, RolloutPhase::RolledBack);
    assert_eq!(p.stable, rev("svc-engine", "aaaaaaaaaa"));
    assert_eq!(
        weights(&p),
        [("svc-engine", Stable, 100), ("svc-bbbbbb", Candidate, 0)]
    );
    let p = w.pass(101 * S, (2, 2, 0), None);
    assert_eq!(p.rollout.as_ref().unwrap().phase, RolloutPhase::RolledBack);
    assert_eq!(
        p.candidate_replicas.as_ref().unwrap().1,
        0,
        "idle candidate"
    );
    assert!(!p.hold_stable);
}

/// Status is where the roles live: a promotion (or a switch back) whose status write did not
/// land is made again on the next pass, not left half done.
#[test]
fn a_turn_that_status_does_not_show_yet_is_made_again() {
    let mut w = upgrading();
    w.pass(0, (2, 0, 0), None);
    let before = w.plan.clone();
    w.pass(1, (2, 2, 0), Some(RolloutCommand::Promote));
    // The write was lost: status still shows the old roles.
    w.plan = before;
    let p = w.pass(2, (2, 2, 0), None);
    assert_eq!(
        weights(&p),
        [("svc-bbbbbb", Stable, 100), ("svc-engine", Previous, 0)]
    );
    let promoted = w.plan.clone();
    w.pass(3, (2, 0, 2), Some(RolloutCommand::Abort));
    w.plan = promoted;
    let p = w.pass(4, (2, 0, 2), None);
    assert_eq!(
        weights(&p),
        [("svc-engine", Stable, 100), ("svc-bbbbbb", Candidate, 0)]
    );
}

/// A spec set back to the stable's revision mid-rollout ends it; the candidate goes.
#[test]
fn a_spec_back_at_the_stable_revision_ends_the_rollout() {
    let mut w = upgrading();
    w.pass(0, (2, 0, 0), None);
    let st = status(&[
        ("svc-engine", "aaaaaaaaaa", RevisionRole::Stable),
        ("svc-bbbbbb", "bbbbbbbbbb", RevisionRole::Candidate),
    ]);
    w.plan = plan("svc", "svc-engine", "aaaaaaaaaa", Some(&st));
    assert_eq!(w.plan.candidate, None);
    let p = w.pass(5 * S, (2, 1, 0), None);
    assert_eq!(p.rollout.as_ref().unwrap().phase, RolloutPhase::RolledBack);
    assert!(
        p.rollout
            .as_ref()
            .unwrap()
            .message
            .contains("back at svc-engine")
    );
    assert_eq!(weights(&p), [("svc-engine", Stable, 100)]);
}

/// A candidate rolled back, then the spec set back to the stable (the candidate goes), then
/// asked for again: a new rollout, not the old verdict.
#[test]
fn a_revision_asked_for_again_after_it_went_gets_a_new_rollout() {
    let mut w = upgrading();
    w.pass(0, (2, 0, 0), None);
    let p = w.pass(1, (2, 0, 0), Some(RolloutCommand::Abort));
    assert_eq!(p.rollout.as_ref().unwrap().phase, RolloutPhase::RolledBack);
    // Idle while the spec still asks for it.
    let p = w.pass(2, (2, 0, 0), None);
    assert_eq!(p.rollout.as_ref().unwrap().phase, RolloutPhase::RolledBack);
    // The spec back at the stable's: the candidate goes.
    let st = InferenceServiceStatus {
        revisions: p.revisions.clone(),
        ..Default::default()
    };
    w.plan = plan("svc", "svc-engine", "aaaaaaaaaa", Some(&st));
    let p = w.pass(3, (2, 0, 0), None);
    assert_eq!(weights(&p), [("svc-engine", Stable, 100)]);
    // And asked for again.
    let st = InferenceServiceStatus {
        revisions: p.revisions.clone(),
        ..Default::default()
    };
    w.plan = plan("svc", "svc-engine", "bbbbbbbbbb", Some(&st));
    let p = w.pass(4, (2, 0, 0), None);
    let r = p.rollout.as_ref().unwrap();
    assert_eq!((r.phase, r.started), (RolloutPhase::Progressing, 4));
}

/// A command that changes nothing is not used (the controller says so): `resume` while not
/// paused, `abort` once keepPreviousSeconds are over.
#[test]
fn a_command_that_changes_nothing_is_not_used() {
    let mut w = upgrading();
    w.pass(0, (2, 0, 0), None);
    assert!(
        !w.pass(1, (2, 0, 0), Some(RolloutCommand::Resume))
            .command_used
    );
    assert!(
        w.pass(2, (2, 0, 0), Some(RolloutCommand::Pause))
            .command_used
    );
    assert!(
        !w.pass(3, (2, 0, 0), Some(RolloutCommand::Pause))
            .command_used
    );
    assert!(
        w.pass(4, (2, 0, 0), Some(RolloutCommand::Resume))
            .command_used
    );
    assert!(
        w.pass(5, (2, 2, 0), Some(RolloutCommand::Promote))
            .command_used
    );
    let late = w.pass(400 * S, (2, 0, 2), Some(RolloutCommand::Abort));
    assert!(!late.command_used, "keepPreviousSeconds (300) are over");
    assert_eq!(late.rollout.unwrap().phase, RolloutPhase::Promoted);
}

/// A command that finds no rollout to act on is not used (the controller says so and removes
/// it).
#[test]
fn a_command_without_a_rollout_is_not_used() {
    let mut w = World {
        spec: canary(),
        plan: plan("svc", "svc-engine", "bbbbbbbbbb", None),
        rollout: None,
    };
    let p = w.pass(0, (2, 0, 0), Some(RolloutCommand::Promote));
    assert!(!p.command_used);
    assert!(p.rollout.is_none());
}

/// The candidate scales on its own engines within the policy, never below its stage's need:
/// a queue on its one replica asks for more; idle, it keeps what the stage needs.
#[test]
fn a_candidate_scales_on_its_own_queue_never_below_its_need() {
    use crate::autoscale::decide::{History, Observed, PodSample, SignalsConfigured, decide};
    let policy = crate::api::ScalingPolicySpec {
        min_replicas: 1,
        max_replicas: 6,
        ..Default::default()
    };
    let within = candidate_policy(&policy, 2);
    assert_eq!((within.min_replicas, within.max_replicas), (2, 6));
    assert_eq!(
        candidate_policy(&policy, 8).max_replicas,
        8,
        "room for its need"
    );
    let configured = SignalsConfigured {
        queue_depth: true,
        gpu_memory: false,
        max_concurrency: 4,
        gpus: 1,
    };
    let observed = |queue: f64| Observed {
        current_replicas: 2,
        ready: vec![
            PodSample {
                queue_depth: Some(queue),
                in_flight: Some(4.0),
                gpu_memory: None,
            };
            2
        ],
        starting: 0,
        unschedulable: 0,
        router_queue: None,
        spilled: None,
        spill_incomplete: false,
        created_at: 0,
        cold_start_ms: None,
        ttft: None,
        provider_price: Default::default(),
        local_only: None,
    };
    let history = History::starting_at(0, 2);
    let busy = decide(&within, configured, &observed(20.0), &history, 60 * S);
    assert!(busy.desired > 2, "{busy:?}");
    let idle = decide(&within, configured, &observed(0.0), &history, 60 * S);
    assert_eq!(idle.desired, 2, "{idle:?}");
}
