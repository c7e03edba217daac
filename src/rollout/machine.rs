//! A rollout's course (pure): from a candidate's start through shadow and steps (or a
//! blue-green switch) to promotion, or back to the stable revision.

use super::gate::{Figures, Verdict, Window, judge};
use crate::api::{RolloutCommand, RolloutPhase, RolloutSpec, RolloutStrategy};
use crate::clock::Millis;

/// Where traffic stands within a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The candidate gets mirrored requests only.
    Shadow,
    /// Canary step `i` (index into `steps`).
    Step(usize),
    /// Waiting for the candidate to have the stable's ready replicas, then all at once.
    Switch,
}

/// A rollout as status keeps it between passes.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// The revision serving when it began, and the one taking over.
    pub stable: String,
    pub candidate: String,
    pub phase: RolloutPhase,
    pub stage: Stage,
    pub started: Millis,
    /// When the current stage's clock began (moved on by the time spent paused).
    pub since: Millis,
    pub paused_at: Option<Millis>,
    /// Time spent paused so far (the ready deadline does not run while paused).
    pub paused_ms: Millis,
    /// When the current stage began waiting for candidate replicas (moved on by pauses):
    /// `progressDeadlineSeconds` runs from then.
    pub waiting_since: Option<Millis>,
    /// When the candidate first had a ready replica: the ready deadline is over from then.
    pub ready_since: Option<Millis>,
    /// When it was promoted, rolled back or failed.
    pub ended: Option<Millis>,
    pub message: String,
    /// The gate's last figures.
    pub figures: Option<Figures>,
}

/// What one pass saw.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub now: Millis,
    pub stable_ready: i32,
    pub candidate_ready: i32,
    /// The candidate's and the stable's answers since the stage began; `None` when unknown.
    pub windows: Option<(&'a Window, &'a Window)>,
    /// A person's word, acted on in this pass: a driver passes each command once (a standing
    /// annotation read again on every pass would promote or abort the next rollout too).
    pub command: Option<RolloutCommand>,
    /// How long the candidate may take to get its first ready replica.
    pub ready_deadline_ms: Millis,
}

/// What the rollout asks of the routers and the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Traffic {
    /// Percent of requests sent to the candidate.
    pub candidate_weight: u32,
    /// Percent of the stable's requests mirrored to the candidate.
    pub shadow_percent: u32,
    /// Replicas the candidate needs for that (at least; the autoscaler may add).
    pub candidate_replicas: i32,
}

/// A service without `spec.rollout`: all at once, when the candidate is as ready as the
/// stable, and nothing kept.
fn effective(spec: Option<&RolloutSpec>) -> RolloutSpec {
    spec.cloned().unwrap_or(RolloutSpec {
        strategy: RolloutStrategy::BlueGreen,
        keep_previous_seconds: 0,
        ..RolloutSpec::default()
    })
}

fn first_stage(spec: &RolloutSpec) -> Stage {
    if spec.shadow_percent > 0 {
        Stage::Shadow
    } else {
        after_shadow(spec)
    }
}

fn after_shadow(spec: &RolloutSpec) -> Stage {
    match spec.strategy {
        RolloutStrategy::Canary if !spec.steps.is_empty() => Stage::Step(0),
        _ => Stage::Switch,
    }
}

/// A rollout from `stable` to `candidate` beginning at `now`.
pub fn start(spec: Option<&RolloutSpec>, stable: &str, candidate: &str, now: Millis) -> Rollout {
    let spec = effective(spec);
    Rollout {
        stable: stable.to_string(),
        candidate: candidate.to_string(),
        phase: RolloutPhase::Progressing,
        stage: first_stage(&spec),
        started: now,
        since: now,
        paused_at: None,
        paused_ms: 0,
        waiting_since: None,
        ready_since: None,
        ended: None,
        message: format!("rolling out {candidate} (stable {stable})"),
        figures: None,
    }
}

/// The ready replicas the candidate's share at `stage` takes: its weight's share of the
/// stable's, all of them to switch, one to shadow.
fn needed(spec: &RolloutSpec, stage: Stage, stable_ready: i32) -> i32 {
    let base = stable_ready.max(1);
    match stage {
        Stage::Shadow => 1,
        Stage::Step(i) => {
            let w = spec.steps.get(i).map_or(100, |s| s.weight).clamp(0, 100);
            ((base as i64 * w as i64 + 99) / 100).max(1) as i32
        }
        Stage::Switch => base,
    }
}

/// What `r` asks of the routers and the controller.
pub fn traffic(spec: Option<&RolloutSpec>, r: &Rollout, stable_ready: i32) -> Traffic {
    let spec = effective(spec);
    let none = Traffic {
        candidate_weight: 0,
        shadow_percent: 0,
        candidate_replicas: 0,
    };
    match r.phase {
        RolloutPhase::Promoted => Traffic {
            candidate_weight: 100,
            ..none
        },
        RolloutPhase::RolledBack | RolloutPhase::Failed => none,
        RolloutPhase::Progressing | RolloutPhase::Paused => {
            let replicas = wanted(&spec, r.stage, stable_ready);
            match r.stage {
                Stage::Shadow => Traffic {
                    shadow_percent: spec.shadow_percent.clamp(0, 100) as u32,
                    candidate_replicas: replicas,
                    ..none
                },
                Stage::Step(i) => Traffic {
                    candidate_weight: spec.steps.get(i).map_or(0, |s| s.weight.clamp(0, 100))
                        as u32,
                    candidate_replicas: replicas,
                    ..none
                },
                Stage::Switch => Traffic {
                    candidate_replicas: replicas,
                    ..none
                },
            }
        }
    }
}

/// One pass: commands first, then the candidate's readiness, the step's clock and the gate.
pub fn advance(spec: Option<&RolloutSpec>, r: &Rollout, o: &Observed<'_>) -> Rollout {
    let spec = effective(spec);
    let mut next = r.clone();
    let now = o.now;
    let end = |n: &mut Rollout, phase: RolloutPhase, message: String| {
        n.phase = phase;
        n.ended = Some(now);
        n.paused_at = None;
        n.waiting_since = None;
        n.message = message;
    };
    let keep_ms = Millis::from(spec.keep_previous_seconds.max(0)) * 1000;
    match (r.phase, o.command) {
        // Within `keepPreviousSeconds` of promotion, going back is a switch.
        (RolloutPhase::Promoted, Some(RolloutCommand::Abort))
            if r.ended.is_some_and(|t| now - t <= keep_ms) =>
        {
            end(
                &mut next,
                RolloutPhase::RolledBack,
                format!("aborted after promotion: {} serves again", r.stable),
            );
            return next;
        }
        (RolloutPhase::Promoted | RolloutPhase::RolledBack | RolloutPhase::Failed, _) => {
            return next;
        }
        (_, Some(RolloutCommand::Abort)) => {
            end(
                &mut next,
                RolloutPhase::RolledBack,
                format!("aborted: all traffic back to {}", r.stable),
            );
            return next;
        }
        (_, Some(RolloutCommand::Promote)) => {
            end(
                &mut next,
                RolloutPhase::Promoted,
                format!("promoted by hand: {} serves all traffic", r.candidate),
            );
            return next;
        }
        (RolloutPhase::Progressing, Some(RolloutCommand::Pause)) => {
            next.phase = RolloutPhase::Paused;
            next.paused_at = Some(now);
            next.message = format!("paused at {}", stage_name(r.stage, &spec));
            return next;
        }
        (RolloutPhase::Paused, Some(RolloutCommand::Resume)) => {
            let paused = now - r.paused_at.unwrap_or(now);
            next.phase = RolloutPhase::Progressing;
            next.since += paused;
            next.waiting_since = next.waiting_since.map(|t| t + paused);
            next.paused_ms += paused;
            next.paused_at = None;
        }
        (RolloutPhase::Paused, _) => return next,
        _ => {}
    }
    if o.candidate_ready > 0 && next.ready_since.is_none() {
        next.ready_since = Some(now);
    }
    // Only a candidate that never had a ready replica fails for it (one that had, and lost
    // it, is a restart: its share spills or waits meanwhile).
    if next.ready_since.is_none() && now - next.started - next.paused_ms > o.ready_deadline_ms {
        end(
            &mut next,
            RolloutPhase::Failed,
            format!(
                "{} had no ready replica {}s after the rollout began; {} keeps serving",
                r.candidate,
                (now - r.started) / 1000,
                r.stable
            ),
        );
        return next;
    }
    let elapsed = now - next.since;
    // The stage is judged once its time is up (a shadow: once a replica takes the mirrors).
    let (due, gate) = match next.stage {
        Stage::Shadow => (
            o.candidate_ready >= 1,
            Some(spec.gate.clone().unwrap_or_default()),
        ),
        Stage::Step(i) => {
            let pause = spec.steps.get(i).map_or(0, |s| s.pause_seconds.max(0));
            (elapsed >= Millis::from(pause) * 1000, spec.gate.clone())
        }
        // A shadow before it was judged already; there is no traffic to judge before the switch.
        Stage::Switch => (true, None),
    };
    if !due {
        if next.stage == Stage::Shadow
            && let Some(why) = waited_too_long(&mut next, &spec, o, 1)
        {
            end(&mut next, RolloutPhase::Failed, why);
            return next;
        }
        next.message = format!(
            "{}: candidate {} of {} replicas ready",
            stage_name(next.stage, &spec),
            o.candidate_ready,
            wanted(&spec, next.stage, o.stable_ready)
        );
        return next;
    }
    if let Some(g) = gate {
        let verdict = match o.windows {
            Some((c, s)) => judge(&g, c, s),
            None => Verdict::Wait(Figures::default(), "no measurements yet".into()),
        };
        match verdict {
            Verdict::Wait(f, why) => {
                // A gate waiting for answers is not held to the progress deadline.
                next.waiting_since = None;
                next.figures = Some(f);
                next.message = format!("{}: gate waits, {why}", stage_name(next.stage, &spec));
                return next;
            }
            Verdict::Fail(f, why) => {
                next.figures = Some(f);
                end(
                    &mut next,
                    RolloutPhase::RolledBack,
                    format!(
                        "gate failed at {}: {why}; all traffic back to {}",
                        stage_name(r.stage, &spec),
                        r.stable
                    ),
                );
                return next;
            }
            Verdict::Pass(f) => next.figures = Some(f),
        }
    }
    // Traffic moves on only to replicas that are ready for it: never a drop in capacity. A
    // stage that waits for them longer than the deadline gives their GPUs back.
    let want = wanted(&spec, next.stage, o.stable_ready);
    if o.candidate_ready < want {
        if let Some(why) = waited_too_long(&mut next, &spec, o, want) {
            end(&mut next, RolloutPhase::Failed, why);
            return next;
        }
        next.message = format!(
            "{}: candidate {} of {} replicas ready for what comes next",
            stage_name(next.stage, &spec),
            o.candidate_ready,
            want
        );
        return next;
    }
    next.waiting_since = None;
    match following(&spec, next.stage) {
        Some(s) => {
            next.stage = s;
            next.since = now;
            next.message = format!("{} began", stage_name(s, &spec));
        }
        None => end(
            &mut next,
            RolloutPhase::Promoted,
            format!("promoted: {} serves all traffic", r.candidate),
        ),
    }
    next
}

/// Starts or reads the clock of a stage waiting for `want` candidate replicas, and says why
/// the rollout fails once it ran past `progressDeadlineSeconds`. It starts only after the
/// candidate's first ready replica: before that the ready deadline (which allows for the
/// engine's startup timeout) applies.
fn waited_too_long(
    next: &mut Rollout,
    spec: &RolloutSpec,
    o: &Observed<'_>,
    want: i32,
) -> Option<String> {
    next.ready_since?;
    let since = *next.waiting_since.get_or_insert(o.now);
    let deadline = Millis::from(spec.progress_deadline_seconds.max(10)) * 1000;
    (o.now - since > deadline).then(|| {
        format!(
            "{} had {} of {} replicas ready {}s into {}; {} keeps serving",
            next.candidate,
            o.candidate_ready,
            want,
            (o.now - since) / 1000,
            stage_name(next.stage, spec),
            next.stable
        )
    })
}

/// The stage after `stage`; `None`: promotion.
fn following(spec: &RolloutSpec, stage: Stage) -> Option<Stage> {
    match stage {
        Stage::Shadow => Some(after_shadow(spec)),
        Stage::Step(i) if i + 1 < spec.steps.len() => Some(Stage::Step(i + 1)),
        Stage::Step(_) | Stage::Switch => None,
    }
}

/// The ready replicas the candidate needs during `stage`: enough for it and for what follows
/// (promotion: as many as the stable), so each move finds them loaded.
fn wanted(spec: &RolloutSpec, stage: Stage, stable_ready: i32) -> i32 {
    let ahead = following(spec, stage).unwrap_or(Stage::Switch);
    needed(spec, stage, stable_ready).max(needed(spec, ahead, stable_ready))
}

fn stage_name(stage: Stage, spec: &RolloutSpec) -> String {
    match stage {
        Stage::Shadow => format!("shadow ({}%)", spec.shadow_percent),
        Stage::Step(i) => format!(
            "step {} of {} ({}%)",
            i + 1,
            spec.steps.len(),
            spec.steps.get(i).map_or(0, |s| s.weight)
        ),
        Stage::Switch => "switch".to_string(),
    }
}
