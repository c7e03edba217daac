//! A rollout as status keeps it, and back (pure): status is where a rollout lives between
//! passes and across controller restarts.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::gate::Figures;
use super::machine::{Rollout, Stage};
use crate::api::{GateFigures, RolloutStatus};
use crate::clock::Millis;

fn time(ms: Millis) -> Time {
    Time(jiff::Timestamp::from_millisecond(ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH))
}

fn millis(t: &Time) -> Millis {
    t.0.as_millisecond()
}

pub fn to_status(r: &Rollout) -> RolloutStatus {
    let (stage, step) = match r.stage {
        Stage::Shadow => ("Shadow", None),
        Stage::Step(i) => ("Step", Some(i as i32)),
        Stage::Switch => ("Switch", None),
    };
    RolloutStatus {
        stable: r.stable.clone(),
        candidate: r.candidate.clone(),
        phase: r.phase,
        stage: stage.to_string(),
        step,
        message: r.message.clone(),
        started_at: time(r.started),
        stage_started_at: time(r.since),
        paused_at: r.paused_at.map(time),
        paused_seconds: r.paused_ms / 1000,
        waiting_since: r.waiting_since.map(time),
        ready_at: r.ready_since.map(time),
        ended_at: r.ended.map(time),
        gate: r.figures.as_ref().map(|f| GateFigures {
            requests: f.requests.round() as i64,
            error_rate: f.error_rate,
            candidate_ttft_p95_milliseconds: f.candidate_ttft_p95_ms.map(|v| v.round() as i64),
            stable_ttft_p95_milliseconds: f.stable_ttft_p95_ms.map(|v| v.round() as i64),
        }),
    }
}

/// The rollout `s` records; `None` for a stage this release does not know.
pub fn from_status(s: &RolloutStatus) -> Option<Rollout> {
    let stage = match (s.stage.as_str(), s.step) {
        ("Shadow", _) => Stage::Shadow,
        ("Step", Some(i)) if i >= 0 => Stage::Step(i as usize),
        ("Switch", _) => Stage::Switch,
        _ => return None,
    };
    Some(Rollout {
        stable: s.stable.clone(),
        candidate: s.candidate.clone(),
        phase: s.phase,
        stage,
        started: millis(&s.started_at),
        since: millis(&s.stage_started_at),
        paused_at: s.paused_at.as_ref().map(millis),
        paused_ms: s.paused_seconds.saturating_mul(1000),
        waiting_since: s.waiting_since.as_ref().map(millis),
        ready_since: s.ready_at.as_ref().map(millis),
        ended: s.ended_at.as_ref().map(millis),
        message: s.message.clone(),
        figures: s.gate.as_ref().map(|g| Figures {
            requests: g.requests as f64,
            error_rate: g.error_rate,
            candidate_ttft_p95_ms: g.candidate_ttft_p95_milliseconds.map(|v| v as f64),
            stable_ttft_p95_ms: g.stable_ttft_p95_milliseconds.map(|v| v as f64),
        }),
    })
}
