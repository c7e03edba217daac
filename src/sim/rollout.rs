//! A rollout replayed on a trace: at a given time a candidate revision appears with its own
//! speed and error rate, and the rollout core (`crate::rollout`) moves traffic to it, judges
//! it at each step and promotes or rolls it back, as the controller would.

use serde::Serialize;

use crate::api::{RolloutPhase, RolloutSpec};
use crate::autoscale::latency::Buckets;
use crate::clock::Millis;
use crate::rollout::gate::Window;
use crate::rollout::machine::{self, Observed, Rollout, Traffic};

/// What the candidate is and when it arrives.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    /// When the spec changes, in ms from the start.
    pub at_ms: Millis,
    /// Its prefill and decode take this many times the stable's.
    pub slower: f64,
    /// The share of its answers that are errors.
    pub error_rate: f64,
    /// `spec.rollout`; `None`: the default (all at once when as ready as the stable).
    pub spec: Option<RolloutSpec>,
}

/// Which revision a pod or a request belongs to.
pub const STABLE: u8 = 0;
pub const CANDIDATE: u8 = 1;
/// The stable before a promotion, kept warm for `keepPreviousSeconds`; no request goes to it.
pub const PREVIOUS: u8 = 2;

/// What one revision's clients saw.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Served {
    pub requests: u64,
    pub errors: u64,
    pub ttft_p95_ms: u64,
}

/// What became of the rollout.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutReport {
    pub phase: String,
    pub message: String,
    pub started_s: f64,
    pub ended_s: Option<f64>,
    /// Each change of stage or phase, with its message.
    pub course: Vec<(f64, String)>,
    /// Requests the stable's and the candidate's engines answered while it ran.
    pub stable: Served,
    pub candidate: Served,
    /// Requests routed to the candidate that went to providers (its replicas were loading or
    /// full), and what they cost.
    pub candidate_burst_requests: u64,
    pub candidate_burst_spend: f64,
    /// The gate's last figures: the candidate's p95 time to first token over the stable's.
    pub gate_ttft_ratio: Option<f64>,
    pub gate_error_rate: Option<f64>,
}

/// A rollout in progress in the simulated world.
pub struct Run {
    pub candidate: Candidate,
    state: Option<Rollout>,
    /// The step windows (stable, candidate) since `window_since`.
    windows: [Window; 2],
    window_since: Millis,
    served: [(u64, u64, Buckets); 2],
    burst: (u64, f64),
    course: Vec<(f64, String)>,
    /// The previous revision was let go (once, `keepPreviousSeconds` after promotion).
    previous_dropped: bool,
}

/// What the world must do after a tick of the rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// The candidate serves all traffic: it becomes the stable, the stable the previous.
    Promoted,
    /// All traffic back to the stable: the candidate's pods go; after a promotion, the
    /// previous serves again.
    RolledBack,
    /// `keepPreviousSeconds` are over: the previous revision's pods go.
    DropPrevious,
}

use crate::rollout::gate::buckets;

impl Run {
    pub fn new(candidate: Candidate) -> Self {
        Self {
            candidate,
            state: None,
            windows: Default::default(),
            window_since: 0,
            served: [(0, 0, buckets()), (0, 0, buckets())],
            burst: (0, 0.0),
            course: Vec::new(),
            previous_dropped: false,
        }
    }

    /// Whether the rollout has begun and not ended (requests may go to the candidate).
    pub fn active(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|r| matches!(r.phase, RolloutPhase::Progressing | RolloutPhase::Paused))
    }

    /// An answer from a revision's engine.
    pub fn answered(&mut self, rev: u8, error: bool, ttft_s: f64) {
        if !self.active() || rev > CANDIDATE {
            return;
        }
        // As the routers measure it: time to first token of successful answers only.
        let w = &mut self.windows[rev as usize];
        w.requests += 1.0;
        w.errors += f64::from(u8::from(error));
        let s = &mut self.served[rev as usize];
        s.0 += 1;
        s.1 += u64::from(error);
        if !error {
            w.ttft.observe(ttft_s);
            s.2.observe(ttft_s);
        }
    }

    /// A request routed to the candidate went to a provider for `cost`.
    pub fn spilled(&mut self, cost: f64) {
        self.burst.0 += 1;
        self.burst.1 += cost;
    }

    /// One autoscaler tick: starts the rollout at its time, advances it, and says what traffic
    /// it asks for and what the world must change.
    pub fn tick(
        &mut self,
        now: Millis,
        stable_ready: i32,
        candidate_ready: i32,
        ready_deadline_ms: Millis,
    ) -> (Traffic, Change) {
        let spec = self.candidate.spec.clone();
        let spec = spec.as_ref();
        if self.state.is_none() {
            if now < self.candidate.at_ms {
                return (machine::traffic(spec, &idle(), 0), Change::None);
            }
            let r = machine::start(spec, "v1", "v2", now);
            self.note(now, &r);
            self.window_since = r.since;
            self.state = Some(r);
        }
        let r = self.state.clone().expect("started above");
        let keep_ms = Millis::from(spec.map_or(0, |s| s.keep_previous_seconds.max(0))) * 1000;
        if r.phase == RolloutPhase::Promoted
            && !self.previous_dropped
            && r.ended.is_some_and(|t| now - t >= keep_ms)
        {
            self.previous_dropped = true;
            self.course
                .push((now as f64 / 1000.0, "previous revision let go".into()));
            return (
                machine::traffic(spec, &r, stable_ready),
                Change::DropPrevious,
            );
        }
        let next = machine::advance(
            spec,
            &r,
            &Observed {
                now,
                stable_ready,
                candidate_ready,
                windows: Some((&self.windows[1], &self.windows[0])),
                command: None,
                ready_deadline_ms,
            },
        );
        if next.since != self.window_since || next.stage != r.stage {
            self.window_since = next.since;
            self.windows = Default::default();
        }
        let change = match (r.phase, next.phase) {
            (a, b) if a == b => Change::None,
            (_, RolloutPhase::Promoted) => Change::Promoted,
            (_, RolloutPhase::RolledBack | RolloutPhase::Failed) => Change::RolledBack,
            _ => Change::None,
        };
        if next.stage != r.stage || next.phase != r.phase {
            self.note(now, &next);
        }
        let t = machine::traffic(spec, &next, stable_ready);
        self.state = Some(next);
        (t, change)
    }

    /// A change of stage or phase (not the waiting messages of every tick).
    fn note(&mut self, now: Millis, r: &Rollout) {
        self.course.push((
            now as f64 / 1000.0,
            format!("{}: {}", r.phase.as_str(), r.message),
        ));
    }

    pub fn report(&self) -> Option<RolloutReport> {
        let r = self.state.as_ref()?;
        let served = |i: usize| {
            let (requests, errors, b) = &self.served[i];
            Served {
                requests: *requests,
                errors: *errors,
                ttft_p95_ms: b.quantile(0.95).map_or(0, |s| (s * 1000.0).round() as u64),
            }
        };
        Some(RolloutReport {
            phase: r.phase.as_str().to_string(),
            message: r.message.clone(),
            started_s: r.started as f64 / 1000.0,
            ended_s: r.ended.map(|t| t as f64 / 1000.0),
            course: self.course.clone(),
            stable: served(0),
            candidate: served(1),
            candidate_burst_requests: self.burst.0,
            candidate_burst_spend: self.burst.1,
            gate_ttft_ratio: r.figures.as_ref().and_then(|f| f.ttft_ratio()),
            gate_error_rate: r.figures.as_ref().map(|f| f.error_rate),
        })
    }
}

/// No rollout: no weight, no candidate.
fn idle() -> Rollout {
    Rollout {
        phase: RolloutPhase::RolledBack,
        ..machine::start(None, "", "", 0)
    }
}
