//! The latency objective (`targets.timeToFirstTokenMilliseconds`) in `decide()`.

use crate::api::{LatencyTargets, ScalingPolicySpec};
use crate::autoscale::decide::*;
use crate::autoscale::latency::Buckets;
use crate::clock::Millis;

const S: Millis = 1000;

/// One replica of two busy enough to keep (GPU 0.8 on the target): the demand signals hold 2.
fn policy(p95_ms: i64) -> ScalingPolicySpec {
    let mut p = ScalingPolicySpec {
        min_replicas: 1,
        max_replicas: 16,
        ..ScalingPolicySpec::default()
    };
    p.scale_up.max_pods = 100;
    p.scale_down.stabilization_window_seconds = 0;
    p.scale_down.max_pods = 100;
    p.scale_down.max_percent = 100;
    p.targets.time_to_first_token_milliseconds = Some(LatencyTargets {
        p95: Some(p95_ms),
        window_seconds: 60,
        ..LatencyTargets::default()
    });
    p
}

fn ready(gpu: f64) -> Vec<PodSample> {
    vec![
        PodSample {
            queue_depth: Some(0.0),
            in_flight: Some(1.0),
            gpu_memory: Some(gpu),
        };
        2
    ]
}

/// `n` answers, each `seconds` to its first token, in the routers' buckets.
fn answers(n: usize, seconds: f64) -> Buckets {
    let mut b = Buckets::exponential(0.0001, 2.5, 18);
    for _ in 0..n {
        b.observe(seconds);
    }
    b
}

fn observed(gpu: f64, ttft: Option<Buckets>) -> Observed {
    Observed {
        current_replicas: 2,
        ready: ready(gpu),
        created_at: -1_000_000 * S,
        ttft,
        ..Observed::default()
    }
}

fn once(p: &ScalingPolicySpec, o: &Observed) -> Decision {
    decide(p, SignalsConfigured::default(), o, &History::default(), 0)
}

/// 90 answers at 0.1 s and 10 at 2 s: p95 reads about 1.67 s, half-way through the
/// (0.95 s, 2.4 s] bucket.
fn p95_slow() -> Buckets {
    let mut b = answers(90, 0.1);
    b.add(&answers(10, 2.0));
    b
}

#[test]
fn above_the_target_asks_for_more_replicas_in_proportion() {
    let o = observed(0.8, Some(p95_slow()));
    let measured = p95_slow().quantile(0.95).unwrap() * 1000.0;
    let d = once(&policy(500), &o);
    let want = (2.0 * measured / 500.0).ceil() as i32;
    assert!(want >= 4, "{measured}");
    assert_eq!(
        (d.desired, d.driver, d.signal),
        (
            want,
            Driver::TimeToFirstToken,
            Some(Driver::TimeToFirstToken)
        ),
        "{}",
        d.reason
    );
    assert!(d.reason.contains("time to first token p95"), "{}", d.reason);
    assert_eq!(d.ttft_ms.len(), 1);
    assert_eq!(d.ttft_ms[0].0, "p95");
    assert!((d.ttft_ms[0].1 - measured).abs() < 1e-6);
    // Without the objective the same answers change nothing.
    let mut plain = policy(500);
    plain.targets.time_to_first_token_milliseconds = None;
    let d = once(&plain, &o);
    assert_eq!((d.desired, d.ttft_ms.len()), (2, 0), "{}", d.reason);
}

#[test]
fn it_never_asks_for_fewer_and_holds_while_above_the_target() {
    // Idle replicas (GPU 0.1): the demand signals ask for 1.
    let measured = p95_slow().quantile(0.95).unwrap() * 1000.0;
    // Above the target but within tolerance (10 %): held at 2.
    let held = once(
        &policy((measured / 1.05) as i64),
        &observed(0.1, Some(p95_slow())),
    );
    assert_eq!(held.desired, 2, "{}", held.reason);
    // Below the target: no opinion, demand scales down.
    let below = once(&policy(5000), &observed(0.1, Some(p95_slow())));
    assert_eq!(below.desired, 1, "{}", below.reason);
    assert_eq!(below.ttft_ms.len(), 1, "measured, still reported");
    // Busy replicas the demand wants more of: the latency signal never lowers that.
    let busy = PodSample {
        queue_depth: Some(20.0),
        in_flight: Some(1.0),
        gpu_memory: Some(0.8),
    };
    let o = Observed {
        ready: vec![busy; 2],
        ..observed(0.8, Some(answers(100, 0.01)))
    };
    let d = once(&policy(5000), &o);
    assert_eq!(
        (d.desired, d.driver),
        (10, Driver::QueueDepth),
        "{}",
        d.reason
    );
}

#[test]
fn too_few_answers_are_not_a_measurement() {
    // 39 answers: p95 needs 40.
    let mut few = answers(37, 0.1);
    few.add(&answers(2, 5.0));
    let d = once(&policy(500), &observed(0.8, Some(few.clone())));
    assert_eq!((d.desired, d.ttft_ms.len()), (2, 0), "{}", d.reason);
    few.add(&answers(1, 5.0));
    let d = once(&policy(500), &observed(0.8, Some(few)));
    assert_eq!(d.driver, Driver::TimeToFirstToken, "{}", d.reason);
}

/// Slow answers count for `windowSeconds` across ticks, and then no longer.
#[test]
fn the_window_spans_ticks_and_forgets_what_is_older() {
    let p = policy(500);
    let slow = |n| Some(answers(n, 2.0));
    let fast = |n| Some(answers(n, 0.05));
    // Four ticks of 10 slow answers each: only together are they enough to read p95.
    let mut history = History::default();
    let mut last = None;
    for tick in 0..4 {
        let d = decide(
            &p,
            SignalsConfigured::default(),
            &observed(0.8, slow(10)),
            &history,
            tick * 2 * S,
        );
        history = d.history.clone();
        last = Some(d);
    }
    let d = last.unwrap();
    assert_eq!(d.driver, Driver::TimeToFirstToken, "{}", d.reason);
    // 61 s later the slow answers have left the window; fast ones read below the target.
    let d = decide(
        &p,
        SignalsConfigured::default(),
        &observed(0.8, fast(50)),
        &history,
        67 * S,
    );
    assert_ne!(d.driver, Driver::TimeToFirstToken, "{}", d.reason);
    assert!(d.ttft_ms[0].1 < 500.0, "{:?}", d.ttft_ms);
    // Still inside the window: the slow ones weigh in.
    let d = decide(
        &p,
        SignalsConfigured::default(),
        &observed(0.8, fast(50)),
        &history,
        30 * S,
    );
    assert_eq!(d.driver, Driver::TimeToFirstToken, "{}", d.reason);
}

/// Replicas still loading are on their way: the ask is in proportion to the ready ones, so a
/// latency that stays high through a cold start does not keep adding replicas.
#[test]
fn loading_replicas_are_not_asked_for_again() {
    let p = policy(500);
    let first = once(&p, &observed(0.8, Some(p95_slow())));
    let loading = Observed {
        current_replicas: first.desired,
        starting: first.desired - 2,
        ..observed(0.8, Some(p95_slow()))
    };
    let again = once(&p, &loading);
    assert_eq!(again.desired, first.desired, "{}", again.reason);
}

/// When the replicas asked for become ready, the window still holds answers measured on
/// fewer: the ask stays in proportion to those, and does not compound (7 would become 24).
#[test]
fn new_replicas_do_not_compound_the_same_slow_answers() {
    let p = policy(500);
    let on = |ready: usize, current: i32| Observed {
        current_replicas: current,
        ready: vec![
            PodSample {
                queue_depth: Some(0.0),
                in_flight: Some(1.0),
                gpu_memory: Some(0.8),
            };
            ready
        ],
        created_at: -1_000_000 * S,
        ttft: Some(p95_slow()),
        ..Observed::default()
    };
    let mut history = History::default();
    let first = decide(&p, SignalsConfigured::default(), &on(2, 2), &history, 0);
    history = first.history.clone();
    let asked = first.desired;
    assert!(asked >= 7, "{}", first.reason);
    // They load for 3 minutes while answers stay slow.
    for tick in 1..90 {
        let d = decide(
            &p,
            SignalsConfigured::default(),
            &Observed {
                starting: asked - 2,
                ..on(2, asked)
            },
            &history,
            tick * 2 * S,
        );
        history = d.history.clone();
        assert_eq!(d.desired, asked, "{}", d.reason);
    }
    // Ready now; the 60 s window is still all slow answers from 2 replicas.
    let d = decide(
        &p,
        SignalsConfigured::default(),
        &on(asked as usize, asked),
        &history,
        180 * S,
    );
    assert_eq!(d.desired, asked, "{}", d.reason);
}
