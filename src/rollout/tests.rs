//! A rollout's course, stage by stage.

use super::gate::Window;
use super::machine::*;
use crate::api::{
    RolloutCommand, RolloutGate, RolloutPhase, RolloutSpec, RolloutStep, RolloutStrategy,
};
use crate::autoscale::latency::Buckets;
use crate::clock::Millis;

const S: Millis = 1000;
const DEADLINE: Millis = 600 * S;

fn at(now: Millis, stable_ready: i32, candidate_ready: i32) -> Observed<'static> {
    Observed {
        now,
        stable_ready,
        candidate_ready,
        windows: None,
        command: None,
        ready_deadline_ms: DEADLINE,
    }
}

fn window(requests: usize, errors: f64, ttft_s: f64) -> Window {
    let mut ttft = Buckets::exponential(0.0001, 2.5, 18);
    for _ in 0..requests {
        ttft.observe(ttft_s);
    }
    Window {
        requests: requests as f64,
        errors,
        client_errors: 0.0,
        ttft,
    }
}

fn canary() -> RolloutSpec {
    RolloutSpec {
        strategy: RolloutStrategy::Canary,
        steps: vec![
            RolloutStep {
                weight: 10,
                pause_seconds: 300,
            },
            RolloutStep {
                weight: 50,
                pause_seconds: 300,
            },
        ],
        gate: Some(RolloutGate::default()),
        ..RolloutSpec::default()
    }
}

/// Without `spec.rollout` the candidate loads to the stable's ready count while the stable
/// serves everything, then takes all traffic at once.
#[test]
fn by_default_the_candidate_takes_over_once_as_ready_as_the_stable() {
    let r = start(None, "old", "new", 0);
    assert_eq!(r.stage, Stage::Switch);
    let t = traffic(None, &r, 3);
    assert_eq!((t.candidate_weight, t.candidate_replicas), (0, 3));
    let r = advance(None, &r, &at(60 * S, 3, 2));
    assert_eq!(r.phase, RolloutPhase::Progressing);
    assert!(
        r.message.contains("candidate 2 of 3 replicas ready"),
        "{}",
        r.message
    );
    let r = advance(None, &r, &at(90 * S, 3, 3));
    assert_eq!(r.phase, RolloutPhase::Promoted, "{}", r.message);
    assert_eq!(r.ended, Some(90 * S));
    assert_eq!(traffic(None, &r, 3).candidate_weight, 100);
}

/// Canary steps hold their weight for their pause, wait for the gate's requests, move on when
/// it passes, and send everything back when it fails.
#[test]
fn canary_steps_move_on_a_passing_gate_and_roll_back_on_a_failing_one() {
    let spec = canary();
    let r = start(Some(&spec), "old", "new", 0);
    assert_eq!(r.stage, Stage::Step(0));
    // The weight applies at once: what the loading candidate cannot take spills or waits. It
    // loads for the next step too (50 % of 4): each move finds its replicas ready.
    let t = traffic(Some(&spec), &r, 4);
    assert_eq!((t.candidate_weight, t.candidate_replicas), (10, 2));
    // Ready, but the step's 300 s are not over.
    let r = advance(Some(&spec), &r, &at(200 * S, 4, 1));
    assert_eq!(r.stage, Stage::Step(0));
    let stable = window(2000, 0.0, 0.2);
    let (few, good, slow) = (
        window(40, 0.0, 0.2),
        window(200, 1.0, 0.2),
        window(200, 0.0, 0.6),
    );
    let with = |now, c| Observed {
        windows: Some((c, &stable)),
        ..at(now, 4, 2)
    };
    let (few, good, slow) = (&few, &good, &slow);
    let r = advance(Some(&spec), &r, &with(301 * S, few));
    assert_eq!(r.stage, Stage::Step(0));
    assert!(r.message.contains("gate waits, 40 of 100"), "{}", r.message);
    let r = advance(Some(&spec), &r, &with(320 * S, good));
    assert_eq!(
        (r.stage, r.since),
        (Stage::Step(1), 320 * S),
        "{}",
        r.message
    );
    // The last step loads for the promotion: as many as the stable.
    let t = traffic(Some(&spec), &r, 4);
    assert_eq!((t.candidate_weight, t.candidate_replicas), (50, 4));
    // The second step's clock started with it.
    assert_eq!(
        advance(Some(&spec), &r, &with(500 * S, good)).stage,
        Stage::Step(1)
    );
    let r = advance(Some(&spec), &r, &with(621 * S, slow));
    assert_eq!(r.phase, RolloutPhase::RolledBack, "{}", r.message);
    assert!(
        r.message.contains("gate failed at step 2 of 2 (50%)"),
        "{}",
        r.message
    );
    assert!(r.message.contains("time to first token"), "{}", r.message);
    assert!(r.figures.as_ref().unwrap().ttft_ratio().unwrap() > 1.25);
    let t = traffic(Some(&spec), &r, 4);
    assert_eq!((t.candidate_weight, t.candidate_replicas), (0, 0));
    // Rolled back stays rolled back.
    assert_eq!(advance(Some(&spec), &r, &with(900 * S, good)), r);
}

#[test]
fn the_last_passing_step_promotes() {
    let mut spec = canary();
    spec.gate = None;
    let r = start(Some(&spec), "old", "new", 0);
    let r = advance(Some(&spec), &r, &at(300 * S, 2, 1));
    assert_eq!(r.stage, Stage::Step(1));
    let r = advance(Some(&spec), &r, &at(599 * S, 2, 2));
    assert_eq!(r.stage, Stage::Step(1));
    // Its time is up, but the candidate has 1 of the stable's 2: no promotion yet.
    let waiting = advance(Some(&spec), &r, &at(600 * S, 2, 1));
    assert_eq!(waiting.phase, RolloutPhase::Progressing);
    assert!(
        waiting
            .message
            .contains("1 of 2 replicas ready for what comes next"),
        "{}",
        waiting.message
    );
    let r = advance(Some(&spec), &r, &at(600 * S, 2, 2));
    assert_eq!(r.phase, RolloutPhase::Promoted, "{}", r.message);
}

/// A shadow comes first: the candidate gets mirrored requests only, and the gate judges them
/// before any client is served by it.
#[test]
fn a_shadow_is_judged_before_the_first_step() {
    let mut spec = canary();
    spec.shadow_percent = 10;
    let r = start(Some(&spec), "old", "new", 0);
    assert_eq!(r.stage, Stage::Shadow);
    let t = traffic(Some(&spec), &r, 4);
    assert_eq!(
        (t.candidate_weight, t.shadow_percent, t.candidate_replicas),
        (0, 10, 1)
    );
    let stable = window(2000, 0.0, 0.2);
    let good = window(150, 0.0, 0.2);
    let r = advance(
        Some(&spec),
        &r,
        &Observed {
            windows: Some((&good, &stable)),
            ..at(30 * S, 4, 1)
        },
    );
    assert_eq!(r.stage, Stage::Step(0), "{}", r.message);
    // BlueGreen with a shadow: the shadow, then the switch once as ready as the stable.
    let bg = RolloutSpec {
        strategy: RolloutStrategy::BlueGreen,
        shadow_percent: 5,
        ..RolloutSpec::default()
    };
    let r = start(Some(&bg), "old", "new", 0);
    let r = advance(
        Some(&bg),
        &r,
        &Observed {
            windows: Some((&good, &stable)),
            ..at(30 * S, 4, 1)
        },
    );
    // Judged, but it switches next: it waits for the stable's 4.
    assert_eq!(r.stage, Stage::Shadow, "{}", r.message);
    let r = advance(
        Some(&bg),
        &r,
        &Observed {
            windows: Some((&good, &stable)),
            ..at(40 * S, 4, 4)
        },
    );
    assert_eq!(r.stage, Stage::Switch, "{}", r.message);
    assert_eq!(
        advance(Some(&bg), &r, &at(50 * S, 4, 3)).phase,
        RolloutPhase::Progressing
    );
    assert_eq!(
        advance(Some(&bg), &r, &at(50 * S, 4, 4)).phase,
        RolloutPhase::Promoted
    );
}

/// `spillway.dev/rollout`: pause holds the step's clock, resume continues it, promote and
/// abort end the rollout at once; abort within `keepPreviousSeconds` of promotion switches back.
#[test]
fn commands_pause_resume_promote_and_abort() {
    let spec = RolloutSpec {
        gate: None,
        ..canary()
    };
    let cmd = |now, c| Observed {
        command: Some(c),
        ..at(now, 2, 1)
    };
    let r = start(Some(&spec), "old", "new", 0);
    let r = advance(Some(&spec), &r, &cmd(100 * S, RolloutCommand::Pause));
    assert_eq!(r.phase, RolloutPhase::Paused);
    // 1000 s paused: the step does not end.
    let r = advance(Some(&spec), &r, &at(1100 * S, 2, 1));
    assert_eq!((r.phase, r.stage), (RolloutPhase::Paused, Stage::Step(0)));
    let r = advance(Some(&spec), &r, &cmd(1100 * S, RolloutCommand::Resume));
    assert_eq!(r.phase, RolloutPhase::Progressing);
    // 100 s ran before the pause: 200 s remain.
    assert_eq!(
        advance(Some(&spec), &r, &at(1299 * S, 2, 1)).stage,
        Stage::Step(0)
    );
    assert_eq!(
        advance(Some(&spec), &r, &at(1300 * S, 2, 1)).stage,
        Stage::Step(1)
    );
    let promoted = advance(Some(&spec), &r, &cmd(1200 * S, RolloutCommand::Promote));
    assert_eq!(promoted.phase, RolloutPhase::Promoted);
    // Within 900 s of promotion, abort switches back; later it is too late (the previous
    // revision is gone).
    let back = advance(
        Some(&spec),
        &promoted,
        &cmd(2000 * S, RolloutCommand::Abort),
    );
    assert_eq!(back.phase, RolloutPhase::RolledBack, "{}", back.message);
    assert_eq!(traffic(Some(&spec), &back, 2).candidate_weight, 0);
    let late = advance(
        Some(&spec),
        &promoted,
        &cmd(2200 * S, RolloutCommand::Abort),
    );
    assert_eq!(late.phase, RolloutPhase::Promoted);
    let aborted = advance(Some(&spec), &r, &cmd(1200 * S, RolloutCommand::Abort));
    assert_eq!(aborted.phase, RolloutPhase::RolledBack);
}

#[test]
fn a_candidate_never_ready_fails_and_the_stable_keeps_serving() {
    let r = start(None, "old", "new", 0);
    let r = advance(None, &r, &at(DEADLINE, 2, 0));
    assert_eq!(r.phase, RolloutPhase::Progressing);
    let r = advance(None, &r, &at(DEADLINE + S, 2, 0));
    assert_eq!(r.phase, RolloutPhase::Failed);
    assert!(r.message.contains("old keeps serving"), "{}", r.message);
    assert_eq!(traffic(None, &r, 2).candidate_weight, 0);
}

/// The ready deadline applies before the candidate's first ready replica only, and not while
/// paused.
#[test]
fn the_ready_deadline_counts_until_first_ready_and_not_while_paused() {
    // Ready once, then its one pod restarts after the deadline: not a failure.
    let r = start(None, "old", "new", 0);
    let r = advance(None, &r, &at(60 * S, 2, 1));
    let r = advance(None, &r, &at(DEADLINE + 60 * S, 2, 0));
    assert_eq!(r.phase, RolloutPhase::Progressing, "{}", r.message);
    // Paused for the whole deadline while loading, then resumed: time is left.
    let spec = canary();
    let cmd = |now, c| Observed {
        command: Some(c),
        ..at(now, 2, 0)
    };
    let r = start(Some(&spec), "old", "new", 0);
    let r = advance(Some(&spec), &r, &cmd(10 * S, RolloutCommand::Pause));
    let r = advance(
        Some(&spec),
        &r,
        &cmd(DEADLINE + 10 * S, RolloutCommand::Resume),
    );
    assert_eq!(r.phase, RolloutPhase::Progressing, "{}", r.message);
    let r = advance(Some(&spec), &r, &at(DEADLINE + 20 * S, 2, 0));
    assert_eq!(r.phase, RolloutPhase::Progressing, "{}", r.message);
    assert_eq!(
        advance(Some(&spec), &r, &at(2 * DEADLINE + 20 * S, 2, 0)).phase,
        RolloutPhase::Failed
    );
}

/// A stage that waits for candidate replicas longer than `progressDeadlineSeconds` (pauses
/// not counted) fails and gives their GPUs back; one that gets them in time moves on, and the
/// clock starts again at the next wait.
#[test]
fn a_stage_waiting_past_the_progress_deadline_fails() {
    let spec = RolloutSpec {
        progress_deadline_seconds: 300,
        ..RolloutSpec::default()
    };
    // Blue-green: the stable has 2 ready, only 1 candidate replica finds a GPU.
    let r = start(Some(&spec), "old", "new", 0);
    let r = advance(Some(&spec), &r, &at(60 * S, 2, 1));
    assert_eq!(r.waiting_since, Some(60 * S));
    let r = advance(Some(&spec), &r, &at(360 * S, 2, 1));
    assert_eq!(r.phase, RolloutPhase::Progressing, "{}", r.message);
    let failed = advance(Some(&spec), &r, &at(361 * S, 2, 1));
    assert_eq!(failed.phase, RolloutPhase::Failed);
    assert_eq!(
        failed.message,
        "new had 1 of 2 replicas ready 301s into switch; old keeps serving"
    );
    let t = traffic(Some(&spec), &failed, 2);
    assert_eq!((t.candidate_weight, t.candidate_replicas), (0, 0));
    // It survives status, as a restarted controller reads it.
    let back = super::record::from_status(&super::record::to_status(&r)).unwrap();
    assert_eq!(back.waiting_since, r.waiting_since);
    // Paused for 10 minutes of the wait: the deadline moves on by as much.
    let cmd = |now, c| Observed {
        command: Some(c),
        ..at(now, 2, 1)
    };
    let p = advance(Some(&spec), &r, &cmd(100 * S, RolloutCommand::Pause));
    let p = advance(Some(&spec), &p, &cmd(700 * S, RolloutCommand::Resume));
    let p = advance(Some(&spec), &p, &at(900 * S, 2, 1));
    assert_eq!(p.phase, RolloutPhase::Progressing, "{}", p.message);
    // Ready in time: promoted.
    let done = advance(Some(&spec), &r, &at(300 * S, 2, 2));
    assert_eq!(done.phase, RolloutPhase::Promoted);
    assert_eq!(done.waiting_since, None);
}

/// The progress clock starts only after the candidate's first ready replica (before it, the
/// ready deadline, which allows for the engine's startup, rules), stops while a gate waits for
/// answers, and also holds a shadow whose one replica went away.
#[test]
fn the_progress_deadline_leaves_loading_and_gate_waits_alone() {
    let spec = RolloutSpec {
        progress_deadline_seconds: 300,
        ..RolloutSpec::default()
    };
    // Nothing ready yet, 500 s in: the ready deadline (600 s here) still runs.
    let r = start(Some(&spec), "old", "new", 0);
    let r = advance(Some(&spec), &r, &at(500 * S, 2, 0));
    assert_eq!(
        (r.phase, r.waiting_since),
        (RolloutPhase::Progressing, None)
    );
    // A gate waiting for answers stops the clock.
    let canary = RolloutSpec {
        progress_deadline_seconds: 300,
        ..canary()
    };
    let r = start(Some(&canary), "old", "new", 0);
    let mut r = advance(Some(&canary), &r, &at(10 * S, 2, 1));
    // (As after a pass that waited for replicas, before a resume emptied the gate's window.)
    r.waiting_since = Some(20 * S);
    let r = advance(Some(&canary), &r, &at(400 * S, 2, 1));
    assert_eq!(r.waiting_since, None, "{}", r.message);
    assert!(r.message.contains("gate waits"), "{}", r.message);
    // A shadow whose only replica went away waits for it at most the deadline.
    let shadow = RolloutSpec {
        shadow_percent: 50,
        progress_deadline_seconds: 300,
        ..RolloutSpec::default()
    };
    let r = start(Some(&shadow), "old", "new", 0);
    let r = advance(Some(&shadow), &r, &at(60 * S, 2, 1));
    let r = advance(Some(&shadow), &r, &at(70 * S, 2, 0));
    let r = advance(Some(&shadow), &r, &at(370 * S, 2, 0));
    assert_eq!(r.phase, RolloutPhase::Progressing, "{}", r.message);
    let failed = advance(Some(&shadow), &r, &at(371 * S, 2, 0));
    assert_eq!(failed.phase, RolloutPhase::Failed);
    assert!(
        failed
            .message
            .contains("had 0 of 1 replicas ready 301s into shadow"),
        "{}",
        failed.message
    );
    assert_eq!(failed.waiting_since, None);
}
