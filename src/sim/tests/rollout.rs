//! Rollouts replayed (`examples/rollout.yaml`): the rollout core moves traffic, the gate
//! judges the candidate on what its engines answered, and no request is lost on the way.

use super::{assert_nothing_lost, scenario};
use crate::sim::world::{SimResult, simulate};

/// The example, with the candidate `slower` and erring at `errors`; `spec` (YAML) replaces its
/// `spec.rollout` (`Some("")`: none, the default).
fn replay(slower: f64, errors: f64, spec: Option<&str>) -> SimResult {
    let r = replay_with(slower, errors, spec, |_| {});
    assert_eq!(r.outcomes.rejected, 0, "a rollout never drops a request");
    r
}

fn replay_with(
    slower: f64,
    errors: f64,
    spec: Option<&str>,
    tweak: impl FnOnce(&mut crate::api::ScalingPolicySpec),
) -> SimResult {
    let mut s = scenario("rollout.yaml");
    tweak(&mut s.policies[0].1);
    match spec {
        Some("") => s.service.spec.rollout = None,
        Some(y) => s.service.spec.rollout = Some(serde_saphyr::from_str(y).unwrap()),
        None => {}
    }
    let mut args = super::default_args();
    args.candidate_slower = Some(slower);
    args.candidate_errors = Some(errors);
    let (trace, params) = crate::sim::settings(&args, &s.service).unwrap();
    let r = simulate(&s.service, &s.policies[0].1, &trace, &params);
    assert_nothing_lost(&r);
    r
}

#[test]
fn a_candidate_as_good_as_the_stable_is_promoted_step_by_step() {
    let r = replay(1.0, 0.0, None);
    let o = r.rollout.expect("a rollout");
    assert_eq!(o.phase, "Promoted", "{o:?}");
    let course: Vec<&str> = o.course.iter().map(|(_, m)| m.as_str()).collect();
    assert!(
        course.iter().any(|m| m.contains("step 2 of 2 (50%) began")),
        "{course:?}"
    );
    // The previous revision stays warm for keepPreviousSeconds (900), then goes.
    let promoted = o.ended_s.unwrap();
    let (let_go, _) = o
        .course
        .iter()
        .find(|(_, m)| m == "previous revision let go")
        .expect("the previous revision goes");
    assert!(
        (let_go - promoted - 900.0).abs() <= 2.0,
        "{promoted} {let_go}"
    );
    // The candidate answered its share; what its loading replicas could not take went to the
    // stable's free engines, and to providers only while those were full too.
    assert!(o.candidate.requests >= 100, "{o:?}");
    assert!(o.candidate_burst_requests > 0, "{o:?}");
}

/// With the stable's engines far from full, the candidate's share while it loads is served by
/// them: nothing of it goes to a provider (as in the routers, where another revision's engine
/// takes a request whose own revision has no room).
#[test]
fn the_candidates_share_goes_to_free_stable_engines_before_providers() {
    let roomy = |p: &mut crate::api::ScalingPolicySpec| {
        p.min_replicas = 10;
        p.max_replicas = 10;
    };
    let o = replay_with(1.0, 0.0, None, roomy)
        .rollout
        .expect("a rollout");
    assert_eq!(o.phase, "Promoted", "{o:?}");
    assert!(o.candidate.requests >= 100, "{o:?}");
    assert_eq!(o.candidate_burst_requests, 0, "{o:?}");
}

#[test]
fn the_gate_catches_a_slower_candidate_at_the_first_step() {
    let r = replay(2.0, 0.0, None);
    let o = r.rollout.expect("a rollout");
    assert_eq!(o.phase, "RolledBack", "{o:?}");
    assert!(
        o.message.contains("gate failed at step 1 of 2 (10%)"),
        "{}",
        o.message
    );
    assert!(o.gate_ttft_ratio.unwrap() > 1.25, "{o:?}");
    // Clients saw it only on its 10 % share, at its own speed.
    assert!(o.candidate.ttft_p95_ms > o.stable.ttft_p95_ms, "{o:?}");
}

/// The gate's own buckets (10 % apart) tell a candidate 20 % slower (within 1.25x: promoted)
/// from one 40 % slower (rolled back); the routers' 2.5x buckets read both as 2.5x.
#[test]
fn the_gate_tells_a_little_slower_from_too_slow() {
    let a_little = replay(1.2, 0.0, None).rollout.unwrap();
    assert_eq!(a_little.phase, "Promoted", "{a_little:?}");
    let too = replay(1.4, 0.0, None).rollout.unwrap();
    assert_eq!(too.phase, "RolledBack", "{too:?}");
    let ratio = too.gate_ttft_ratio.unwrap();
    assert!((1.3..1.6).contains(&ratio), "{ratio}");
}

#[test]
fn the_gate_catches_a_candidate_that_errs() {
    let o = replay(1.0, 0.05, None).rollout.expect("a rollout");
    assert_eq!(o.phase, "RolledBack", "{o:?}");
    assert!(o.message.contains("error rate"), "{}", o.message);
    assert!(o.candidate.errors > 0);
}

/// Without `spec.rollout`: the stable serves everything until the candidate is as ready, then
/// the candidate serves everything; nothing goes to it (nor to providers for it) before.
#[test]
fn by_default_traffic_switches_at_once_when_the_candidate_is_ready() {
    let o = replay(1.0, 0.0, Some("")).rollout.expect("a rollout");
    assert_eq!(o.phase, "Promoted", "{o:?}");
    assert_eq!(
        (o.candidate.requests, o.candidate_burst_requests),
        (0, 0),
        "{o:?}"
    );
    // It waited for the candidate's cold start (180-300 s); the load doubles as it begins,
    // the stable scales from 2 to 4, and the candidate follows it: a second cold start at most.
    let took = o.ended_s.unwrap() - o.started_s;
    assert!((180.0..=610.0).contains(&took), "{took}");
    // And the slower candidate is not judged: there is no gate.
    let slow = replay(2.0, 0.0, Some("")).rollout.unwrap();
    assert_eq!(slow.phase, "Promoted");
}

/// Requests that may not burst are served by the stable while the candidate has no room (no
/// ready replica yet, or its slots full), and the candidate loads each step's replicas before
/// the step: the rollout refuses nothing more than the load step does without it (the
/// stable's own cold start, with no provider).
#[test]
fn requests_that_may_not_burst_wait_for_a_ready_candidate_only() {
    let never = |p: &mut crate::api::ScalingPolicySpec| p.burst.mode = crate::api::BurstMode::Never;
    let r = replay_with(1.0, 0.0, None, never);
    let mut without = scenario("rollout.yaml");
    let ann = without.service.metadata.annotations.as_mut().unwrap();
    ann.remove("sim.spillway.dev/rollout-at");
    never(&mut without.policies[0].1);
    let (trace, params) = crate::sim::settings(&super::default_args(), &without.service).unwrap();
    let base = simulate(&without.service, &without.policies[0].1, &trace, &params);
    assert!(base.rollout.is_none());
    assert!(
        r.outcomes.rejected <= base.outcomes.rejected,
        "{} > {}",
        r.outcomes.rejected,
        base.outcomes.rejected
    );
    let o = r.rollout.expect("a rollout");
    assert_eq!(o.phase, "Promoted", "{o:?}");
    assert_eq!(o.candidate_burst_requests, 0);
    assert!(o.candidate.requests > 100, "{o:?}");
}

/// A promoted candidate keeps its own speed: it is the version that changed, not its role.
#[test]
fn a_promoted_candidate_serves_at_its_own_speed() {
    let same = replay(1.0, 0.0, None);
    let slower = replay(1.2, 0.0, None);
    assert_eq!(slower.rollout.as_ref().unwrap().phase, "Promoted");
    // Most of the trace comes after the promotion (at 43 of 120 minutes): the median first
    // token is the new version's 180 ms prefill, not the old one's 150.
    assert_eq!((same.ttft_p50_ms, slower.ttft_p50_ms), (150, 180));
}

/// While traffic moves, the stable keeps its replicas: the share it loses to the candidate
/// may come back to it at once (a failed gate), and the candidate is sized from it.
#[test]
fn the_stable_keeps_its_replicas_while_traffic_moves() {
    let r = replay(
        1.0,
        0.0,
        Some("steps: [{weight: 50, pauseSeconds: 900}]\nkeepPreviousSeconds: 0"),
    );
    let o = r.rollout.as_ref().expect("a rollout");
    assert_eq!(o.phase, "Promoted", "{o:?}");
    let during: Vec<i32> = r
        .timeline
        .iter()
        .filter(|p| p.t_s >= o.started_s && p.t_s < o.ended_s.unwrap())
        .map(|p| p.desired)
        .collect();
    assert!(during.len() > 400, "{}", during.len());
    assert!(
        during.windows(2).all(|w| w[1] >= w[0]),
        "the stable scaled down during the rollout: {during:?}"
    );
}
