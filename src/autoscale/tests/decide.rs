//! One table of cases per rule of `decide()`, and property tests for its invariants.

use proptest::prelude::*;

use crate::api::{Launch, MetricsUnavailable, ScalingPolicySpec, SelectPolicy};
use crate::autoscale::decide::*;
use crate::clock::Millis;

const S: Millis = 1000;

fn policy() -> ScalingPolicySpec {
    let mut p = ScalingPolicySpec {
        min_replicas: 1,
        max_replicas: 16,
        ..ScalingPolicySpec::default()
    };
    // Most cases look at one rule; make the others permissive unless a case says otherwise.
    p.scale_up.max_pods = 100;
    p.scale_up.max_percent = 1000;
    p.scale_down.stabilization_window_seconds = 0;
    p.scale_down.max_pods = 100;
    p.scale_down.max_percent = 100;
    p
}

fn pods(queues: &[f64], gpus: &[f64]) -> Vec<PodSample> {
    queues
        .iter()
        .zip(gpus)
        .map(|(&q, &g)| PodSample {
            queue_depth: Some(q),
            in_flight: Some(1.0),
            gpu_memory: Some(g),
        })
        .collect()
}

fn observed(current: i32, ready: Vec<PodSample>) -> Observed {
    Observed {
        current_replicas: current,
        ready,
        created_at: -1_000_000 * S,
        ..Observed::default()
    }
}

fn once(p: &ScalingPolicySpec, o: &Observed) -> Decision {
    decide(p, SignalsConfigured::default(), o, &History::default(), 0)
}

#[test]
fn hpa_formula_per_signal_over_ready_replicas() {
    // (queues, gpus, current, expected desired, driver)
    type Case<'a> = (&'a [f64], &'a [f64], i32, i32, Driver);
    let cases: &[Case] = &[
        // 2 ready × (10/4) → 5
        (&[10.0, 10.0], &[0.5, 0.5], 2, 5, Driver::QueueDepth),
        // GPU memory keeps busy replicas counted when the queue reads 0: 2 × 0.96/0.8 → 3
        (&[0.0, 0.0], &[0.96, 0.96], 2, 3, Driver::GpuMemory),
        // The larger of the two signals wins: queue within tolerance (4), GPU 4 × 1.0/0.8 → 5
        (
            &[4.2, 4.2, 4.2, 4.2],
            &[1.0, 1.0, 1.0, 1.0],
            4,
            5,
            Driver::GpuMemory,
        ),
        // ... and the other way round: queue 4 × 6/4 → 6, GPU → 5
        (
            &[6.0, 6.0, 6.0, 6.0],
            &[1.0, 1.0, 1.0, 1.0],
            4,
            6,
            Driver::QueueDepth,
        ),
        // Within tolerance (4.2/4 and 0.84/0.8): keep the current count.
        (&[4.2, 4.2], &[0.84, 0.84], 2, 2, Driver::Steady),
        // Idle: scale down to ceil(2 × 0/4) = 0 → clamped to minReplicas 1.
        (&[0.0, 0.0], &[0.0, 0.0], 2, 1, Driver::MinReplicas),
    ];
    for (i, (q, g, current, want, driver)) in cases.iter().enumerate() {
        let d = once(&policy(), &observed(*current, pods(q, g)));
        assert_eq!(
            (d.desired, d.driver),
            (*want, *driver),
            "case {i}: {}",
            d.reason
        );
        assert_eq!(d.metrics, MetricsState::Complete);
    }
}

#[test]
fn the_routers_queue_counts_into_queue_depth() {
    let mut o = observed(2, pods(&[0.0, 0.0], &[0.1, 0.1]));
    o.router_queue = Some(16.0);
    let d = once(&policy(), &o);
    // (0 + 16/2) per replica / 4 → 2 × 2 = 4
    assert_eq!(d.desired, 4, "{}", d.reason);
    assert_eq!(d.queue_depth, Some(16.0));
    assert!(
        d.reason.contains("queue depth 8/4 per replica"),
        "{}",
        d.reason
    );
}

#[test]
fn never_below_one_replica() {
    let mut p = policy();
    p.min_replicas = 0; // as if the CRD's CEL rule had been bypassed
    let d = once(&p, &observed(3, pods(&[0.0; 3], &[0.0; 3])));
    assert_eq!(d.desired, 1);
}

#[test]
fn missing_metrics_never_scale_down_and_are_never_zero() {
    let silent = vec![PodSample::default(); 3];
    let p = policy();
    let d = once(&p, &observed(3, silent.clone()));
    assert_eq!(
        (d.desired, d.driver, d.metrics),
        (3, Driver::MetricsUnavailable, MetricsState::Unavailable)
    );
    assert_eq!(
        d.queue_depth, None,
        "a missing metric must not be reported as 0"
    );

    let mut up = policy();
    up.metrics_unavailable = MetricsUnavailable::ScaleUp;
    let d = once(&up, &observed(3, silent));
    assert_eq!(d.desired, 16, "{}", d.reason);
}

#[test]
fn partial_data_decides_from_responders_and_never_scales_down() {
    let mut ready = pods(&[0.0, 0.0], &[0.1, 0.1]);
    ready.push(PodSample::default());
    // Idle responders would say 1, but one pod is silent: hold.
    let d = once(&policy(), &observed(3, ready.clone()));
    assert_eq!(d.desired, 3, "{}", d.reason);
    assert_eq!(
        d.metrics,
        MetricsState::Partial {
            responding: 2,
            ready: 3
        }
    );
    // Busy responders: scale up from their average over all 3 ready replicas (3 × 12/4 = 9).
    let mut busy = pods(&[12.0, 12.0], &[0.5, 0.5]);
    busy.push(PodSample::default());
    let d = once(&policy(), &observed(3, busy));
    assert_eq!(d.desired, 9, "{}", d.reason);
    assert!(
        d.reason.contains("2 of 3 ready pods reported"),
        "{}",
        d.reason
    );
}

#[test]
fn a_configured_signal_missing_everywhere_blocks_scale_down() {
    let ready: Vec<PodSample> = (0..3)
        .map(|_| PodSample {
            queue_depth: Some(0.0),
            in_flight: Some(0.0),
            gpu_memory: None,
        })
        .collect();
    let d = once(&policy(), &observed(3, ready.clone()));
    assert_eq!(d.desired, 3, "{}", d.reason);
    // An engine without a GPU memory gauge (TGI) is not missing anything: scale down.
    let tgi = SignalsConfigured {
        queue_depth: true,
        gpu_memory: false,
        max_concurrency: 0,
        gpus: 1,
    };
    let d = decide(&policy(), tgi, &observed(3, ready), &History::default(), 0);
    assert_eq!((d.desired, d.metrics), (1, MetricsState::Complete));
}

#[test]
fn starting_pods_are_neither_capacity_nor_stale() {
    let mut o = observed(3, pods(&[2.0], &[0.3]));
    o.starting = 2;
    let d = once(&policy(), &o);
    assert_eq!(
        d.metrics,
        MetricsState::Complete,
        "starting pods' missing metrics are not stale"
    );
    // Low load on the one ready pod would say 1, but pods mid-load are not thrown away.
    assert_eq!(d.desired, 3, "{}", d.reason);
    assert_eq!(d.exhausted, None);
    // Nothing ready at all, but the routers hold 20 requests: ask for 20/4 = 5.
    let mut cold = observed(2, vec![]);
    cold.starting = 2;
    cold.router_queue = Some(20.0);
    let d = once(&policy(), &cold);
    assert_eq!(
        (d.desired, d.metrics),
        (5, MetricsState::NoReadyPods),
        "{}",
        d.reason
    );
    assert_eq!(d.exhausted, Some(ExhaustedReason::ColdStart));
}

#[test]
fn scale_down_stabilisation_takes_the_highest_recent_recommendation() {
    let mut p = policy();
    p.scale_down.stabilization_window_seconds = 300;
    let busy = observed(6, pods(&[12.0, 12.0], &[0.5, 0.5]));
    let first = decide(
        &p,
        SignalsConfigured::default(),
        &busy,
        &History::default(),
        0,
    );
    assert_eq!(first.desired, 6);
    let idle = observed(6, pods(&[0.0; 6], &[0.0; 6]));
    // 100 s later the load is gone, but the 300 s window remembers 6.
    let d = decide(
        &p,
        SignalsConfigured::default(),
        &idle,
        &first.history,
        100 * S,
    );
    assert_eq!(
        (d.desired, d.driver),
        (6, Driver::Stabilized),
        "{}",
        d.reason
    );
    // After the window, it may go down.
    let d = decide(&p, SignalsConfigured::default(), &idle, &d.history, 401 * S);
    assert_eq!(d.desired, 1, "{}", d.reason);
}

#[test]
fn scale_up_stabilisation_takes_the_lowest_recent_recommendation() {
    let mut p = policy();
    p.scale_up.stabilization_window_seconds = 60;
    let calm = observed(2, pods(&[4.0, 4.0], &[0.5, 0.5]));
    let first = decide(
        &p,
        SignalsConfigured::default(),
        &calm,
        &History::default(),
        0,
    );
    let spike = observed(2, pods(&[40.0, 40.0], &[0.5, 0.5]));
    let d = decide(
        &p,
        SignalsConfigured::default(),
        &spike,
        &first.history,
        10 * S,
    );
    assert_eq!((d.desired, d.driver), (2, Driver::Stabilized));
}

#[test]
fn rate_limits_per_period() {
    let mut p = policy();
    p.scale_up.max_pods = 4;
    p.scale_up.max_percent = 100;
    p.scale_up.period_seconds = 15;
    p.scale_up.select_policy = SelectPolicy::Min;
    // 2 replicas, the load wants 20: at most +min(4, 100% of 2) = +2.
    let o = observed(2, pods(&[40.0, 40.0], &[0.5, 0.5]));
    let d = decide(&p, SignalsConfigured::default(), &o, &History::default(), 0);
    assert_eq!(
        (d.desired, d.driver),
        (4, Driver::RateLimited),
        "{}",
        d.reason
    );
    assert_eq!(d.unclamped, 20);
    // Applied; 5 s later (same period) nothing more may be added beyond the period's budget.
    let mut h = d.history.clone();
    h.record_scale(0, 2, 4);
    let o = observed(4, pods(&[40.0, 40.0], &[0.5, 0.5]));
    let d = decide(&p, SignalsConfigured::default(), &o, &h, 5 * S);
    assert_eq!(d.desired, 4, "{}", d.reason);
    // Next period: +min(4, 100% of 4) = +4.
    let d = decide(&p, SignalsConfigured::default(), &o, &h, 16 * S);
    assert_eq!(d.desired, 8, "{}", d.reason);

    // Down: the default removes one pod per minute.
    let mut p = policy();
    p.scale_down = crate::api::ScaleDownRules::default();
    p.scale_down.stabilization_window_seconds = 0;
    let idle = observed(6, pods(&[0.0; 6], &[0.0; 6]));
    let d = decide(
        &p,
        SignalsConfigured::default(),
        &idle,
        &History::default(),
        0,
    );
    assert_eq!(d.desired, 5, "{}", d.reason);
}

/// `selectPolicy` as the HorizontalPodAutoscaler has it: by default scale-up takes the larger
/// of `maxPods` and `maxPercent`, so a service resting on one warm replica adds 4 in its first
/// period of a spike, not 1; `Min` takes the smaller, `Disabled` none.
#[test]
fn select_policy_picks_the_larger_limit_by_default_for_scale_up() {
    let spike = observed(1, pods(&[40.0], &[0.5]));
    let up = |select: Option<SelectPolicy>| {
        let mut p = policy();
        p.scale_up = crate::api::ScaleUpRules::default();
        if let Some(s) = select {
            p.scale_up.select_policy = s;
        }
        decide(
            &p,
            SignalsConfigured::default(),
            &spike,
            &History::default(),
            0,
        )
    };
    let d = up(None);
    assert_eq!(
        (d.desired, d.driver),
        (5, Driver::RateLimited),
        "{}",
        d.reason
    );
    assert_eq!(up(Some(SelectPolicy::Min)).desired, 2);
    let d = up(Some(SelectPolicy::Disabled));
    assert_eq!(
        (d.desired, d.driver),
        (1, Driver::RateLimited),
        "{}",
        d.reason
    );

    // Scale-down keeps the smaller by default; Disabled holds.
    let mut p = policy();
    p.scale_down = crate::api::ScaleDownRules::default();
    p.scale_down.stabilization_window_seconds = 0;
    let idle = observed(6, pods(&[0.0; 6], &[0.0; 6]));
    let none = History::default();
    assert_eq!(
        decide(&p, SignalsConfigured::default(), &idle, &none, 0).desired,
        5
    );
    p.scale_down.select_policy = SelectPolicy::Max;
    assert_eq!(
        decide(&p, SignalsConfigured::default(), &idle, &none, 0).desired,
        1
    );
    p.scale_down.select_policy = SelectPolicy::Disabled;
    assert_eq!(
        decide(&p, SignalsConfigured::default(), &idle, &none, 0).desired,
        6
    );
}

#[test]
fn bounds_and_launch_over_provisioning() {
    let mut p = policy();
    p.max_replicas = 4;
    let d = once(&p, &observed(2, pods(&[40.0, 40.0], &[0.5, 0.5])));
    assert_eq!((d.desired, d.driver), (4, Driver::MaxReplicas));
    assert_eq!(d.exhausted, Some(ExhaustedReason::MaxReplicas));

    p.launch = Some(Launch {
        replicas: 3,
        duration_seconds: 600,
    });
    let mut idle = observed(3, pods(&[0.0; 3], &[0.0; 3]));
    idle.created_at = 0;
    let d = decide(
        &p,
        SignalsConfigured::default(),
        &idle,
        &History::default(),
        599 * S,
    );
    assert_eq!((d.desired, d.driver), (3, Driver::Launch));
    let d = decide(
        &p,
        SignalsConfigured::default(),
        &idle,
        &History::default(),
        601 * S,
    );
    assert_eq!(d.desired, 1);
}

#[test]
fn capacity_exhausted_states() {
    let p = policy();
    let mut o = observed(3, pods(&[1.0, 1.0], &[0.2, 0.2]));
    o.unschedulable = 1;
    assert_eq!(once(&p, &o).exhausted, Some(ExhaustedReason::Unschedulable));
    // Cold-starting while the ready replicas are saturated.
    let mut o = observed(4, pods(&[9.0, 9.0], &[0.5, 0.5]));
    o.starting = 2;
    assert_eq!(once(&p, &o).exhausted, Some(ExhaustedReason::ColdStart));
    // Cold-starting with room on the ready ones is not exhausted.
    let mut o = observed(4, pods(&[1.0, 1.0], &[0.5, 0.5]));
    o.starting = 2;
    assert_eq!(once(&p, &o).exhausted, None);
}

#[test]
fn stabilisation_prevents_flapping_on_an_oscillating_signal() {
    let p = ScalingPolicySpec::default(); // 300 s down window, 1 pod per 60 s down
    let mut history = History::default();
    let mut current = 2;
    let mut changes = 0;
    // Alternate busy/idle every 10 s for 30 minutes, ticking every 2 s.
    for tick in 0..900 {
        let now = tick * 2 * S;
        let busy = (now / (10 * S)) % 2 == 0;
        let q = if busy { 8.0 } else { 0.0 };
        let o = observed(
            current,
            pods(&vec![q; current as usize], &vec![0.5; current as usize]),
        );
        let d = decide(&p, SignalsConfigured::default(), &o, &history, now);
        history = d.history.clone();
        if d.desired != current {
            history.record_scale(now, current, d.desired);
            current = d.desired;
            changes += 1;
        }
    }
    // Up once to cover the peaks, then held: the down window always sees a busy recommendation.
    assert!(
        changes <= 2,
        "{changes} scale events on an oscillating signal"
    );
}

prop_compose! {
    fn arb_policy()(min in 1..4i32, extra in 0..12i32, tol in 0.0..0.3f64, down_win in 0..400i32,
                    up_pods in 1..8i32, down_pods in 1..4i32, pct in 10..300i32,
                    unavailable in prop::bool::ANY, launch in prop::option::of(1..6i32)) -> ScalingPolicySpec {
        let mut p = ScalingPolicySpec { min_replicas: min, max_replicas: min + extra, tolerance: tol, ..Default::default() };
        p.scale_down.stabilization_window_seconds = down_win;
        p.scale_up.max_pods = up_pods;
        p.scale_up.max_percent = pct;
        p.scale_down.max_pods = down_pods;
        if unavailable { p.metrics_unavailable = MetricsUnavailable::ScaleUp; }
        p.launch = launch.map(|r| Launch { replicas: r.min(min + extra), duration_seconds: 60 });
        p
    }
}

fn arb_pod() -> impl Strategy<Value = PodSample> {
    (
        prop::option::of(0.0..200.0f64),
        prop::option::of(0.0..100.0f64),
        prop::option::of(0.0..1.0f64),
    )
        .prop_map(|(q, f, g)| PodSample {
            queue_depth: q,
            in_flight: f,
            gpu_memory: g,
        })
}

prop_compose! {
    fn arb_observed()(current in 0..25i32, ready in prop::collection::vec(arb_pod(), 0..12),
                      starting in 0..4i32, unschedulable in 0..3i32,
                      router in prop::option::of(0.0..500.0f64),
                      spilled in prop::option::of(0.0..500.0f64)) -> Observed {
        Observed { current_replicas: current, ready, starting, unschedulable, router_queue: router, spilled, spill_incomplete: false, cold_start_ms: None, ttft: None, created_at: 0, provider_price: Default::default(), local_only: None }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// min ≤ desired ≤ max, never below 1, and no scale-down while any data is missing,
    /// over sequences of ticks that carry history forward.
    #[test]
    fn invariants_hold_over_tick_sequences(p in arb_policy(), obs in prop::collection::vec(arb_observed(), 1..20)) {
        let mut history = History::default();
        for (i, o) in obs.iter().enumerate() {
            let now = i as Millis * 2 * S;
            let d = decide(&p, slots(8), o, &history, now);
            prop_assert!(d.desired >= 1);
            prop_assert!(d.desired >= p.min_replicas && d.desired <= p.max_replicas, "{} not in [{}, {}]", d.desired, p.min_replicas, p.max_replicas);
            if !matches!(d.metrics, MetricsState::Complete) && o.current_replicas <= p.max_replicas {
                prop_assert!(d.desired >= o.current_replicas, "scaled down {} → {} with {:?}", o.current_replicas, d.desired, d.metrics);
            }
            history = d.history.clone();
            history.record_scale(now, o.current_replicas, d.desired);
        }
    }

    /// Same inputs, same decision.
    #[test]
    fn decide_is_deterministic(p in arb_policy(), o in arb_observed()) {
        let a = decide(&p, SignalsConfigured::default(), &o, &History::default(), 7);
        let b = decide(&p, SignalsConfigured::default(), &o, &History::default(), 7);
        prop_assert_eq!(a, b);
    }
}

fn slots(max_concurrency: u32) -> SignalsConfigured {
    SignalsConfigured {
        max_concurrency,
        ..SignalsConfigured::default()
    }
}

/// Engines full to maxConcurrency with nothing waiting, while the routers spill to a fast
/// provider: the spilled demand (in engine slots) asks for the replicas that would carry it.
#[test]
fn spilled_demand_counts_as_concurrency_in_engine_slots() {
    let full = |n: usize, in_flight: Option<f64>| -> Vec<PodSample> {
        (0..n)
            .map(|_| PodSample {
                queue_depth: Some(0.0),
                in_flight,
                gpu_memory: Some(0.3),
            })
            .collect()
    };
    let with = |ready: Vec<PodSample>, current: i32, spilled: Option<f64>| Observed {
        spilled,
        ..observed(current, ready)
    };
    // (observed, max_concurrency, desired, signal)
    let cases: Vec<(Observed, u32, i32, Option<Driver>)> = vec![
        // 1 replica with 4 of 4 busy and 36 slots spilled: (4 + 36) / 4 → 10.
        (
            with(full(1, Some(4.0)), 1, Some(36.0)),
            4,
            10,
            Some(Driver::Concurrency),
        ),
        // Full, nothing spilled: steady (a full replica is what maxConcurrency asks for).
        (with(full(1, Some(4.0)), 1, Some(0.0)), 4, 1, None),
        // A spill within tolerance of the full count does not move it.
        (with(full(2, Some(4.0)), 2, Some(0.5)), 4, 2, None),
        // An engine without an in-flight gauge counts as full while requests spill.
        (
            with(full(2, None), 2, Some(8.0)),
            4,
            4,
            Some(Driver::Concurrency),
        ),
        // Without maxConcurrency configured the signal is left out.
        (with(full(1, Some(4.0)), 1, Some(36.0)), 0, 1, None),
        // Nothing ready yet: the spill alone asks ceil(12 / 4) = 3.
        (with(vec![], 1, Some(12.0)), 4, 3, Some(Driver::Concurrency)),
    ];
    for (o, max_concurrency, want, signal) in cases {
        let d = decide(
            &policy(),
            slots(max_concurrency),
            &o,
            &History::default(),
            0,
        );
        assert_eq!((d.desired, d.signal), (want, signal), "{o:?}: {}", d.reason);
        if signal.is_some() {
            assert!(d.reason.contains("spilled to providers"), "{}", d.reason);
        }
    }
}

/// A router whose spill could not be measured (its first sample, a failed scrape) is never
/// read as having spilled nothing: no scale-down until every router is measured.
#[test]
fn an_unmeasured_router_spill_holds_replicas() {
    let idle = || PodSample {
        queue_depth: Some(0.0),
        in_flight: Some(0.0),
        gpu_memory: Some(0.1),
    };
    let mut o = observed(3, vec![idle(); 3]);
    let d = decide(&policy(), slots(8), &o, &History::default(), 0);
    assert_eq!(d.desired, 1, "all measured and idle: {}", d.reason);
    o.spill_incomplete = true;
    let d = decide(&policy(), slots(8), &o, &History::default(), 0);
    assert_eq!(
        (d.desired, d.driver),
        (3, Driver::Stabilized),
        "{}",
        d.reason
    );
    assert!(d.reason.contains("spill"), "{}", d.reason);
}

/// Half-empty engines ask for fewer replicas, but never below what the queue or GPU memory
/// want; saturation by concurrency with replicas starting is a cold start.
#[test]
fn concurrency_joins_the_other_signals() {
    let pod = |in_flight: f64, gpu: f64| PodSample {
        queue_depth: Some(0.0),
        in_flight: Some(in_flight),
        gpu_memory: Some(gpu),
    };
    let d = decide(
        &policy(),
        slots(8),
        &observed(4, vec![pod(2.0, 0.1); 4]),
        &History::default(),
        0,
    );
    assert_eq!(d.desired, 1, "{}", d.reason);
    let d = decide(
        &policy(),
        slots(8),
        &observed(4, vec![pod(6.0, 0.1); 4]),
        &History::default(),
        0,
    );
    assert_eq!(d.desired, 3, "4 × 6 / 8: {}", d.reason);
    let mut o = observed(2, vec![pod(8.0, 0.1)]);
    o.starting = 1;
    o.spilled = Some(8.0);
    let d = decide(&policy(), slots(8), &o, &History::default(), 0);
    assert_eq!(
        d.exhausted,
        Some(ExhaustedReason::ColdStart),
        "{}",
        d.reason
    );
}

#[test]
fn a_restarted_loop_waits_a_full_window_before_scaling_down() {
    let p = ScalingPolicySpec::default(); // 300 s scale-down window
    let idle = observed(4, pods(&[0.0; 4], &[0.0; 4]));
    let fresh = decide(
        &p,
        SignalsConfigured::default(),
        &idle,
        &History::default(),
        0,
    );
    assert_eq!(fresh.desired, 3, "without history the window is empty");
    let seeded = History::starting_at(0, 4);
    let d = decide(&p, SignalsConfigured::default(), &idle, &seeded, 10 * S);
    assert_eq!(
        (d.desired, d.driver),
        (4, Driver::Stabilized),
        "{}",
        d.reason
    );
    let d = decide(&p, SignalsConfigured::default(), &idle, &d.history, 301 * S);
    assert_eq!(d.desired, 3, "{}", d.reason);
}

/// A ramp of demand on 4 replicas of 10 slots, 2 slots more every 15 s, run through `decide()`
/// tick by tick under `predictive` in `mode`: the last decision.
fn ramp_under(mode: Option<crate::api::SignalMode>) -> Decision {
    let mut p = policy();
    p.predictive = mode.map(|mode| crate::api::Predictive {
        mode,
        horizon_seconds: Some(240),
    });
    let configured = SignalsConfigured {
        max_concurrency: 10,
        ..SignalsConfigured::default()
    };
    let mut history = History::default();
    let mut last = None;
    for tick in 0..=20 {
        let in_flight = 4.0 + 0.5 * tick as f64; // per replica; 4 replicas
        let ready = vec![
            PodSample {
                queue_depth: Some(0.0),
                in_flight: Some(in_flight),
                gpu_memory: Some(0.5),
            };
            4
        ];
        let d = decide(&p, configured, &observed(4, ready), &history, tick * 15 * S);
        history = d.history.clone();
        last = Some(d);
    }
    last.unwrap()
}

/// `Active` scales for the demand one horizon ahead: a ramp now at 56 slots, rising 8 a minute,
/// needs 88 in 4 minutes, 9 replicas of 10, where the reactive signals see 6. `Advisory` says
/// so and changes nothing; `Disabled` is silent.
#[test]
fn the_forecast_scales_ahead_of_a_ramp_only_when_on() {
    use crate::api::SignalMode::*;
    let off = ramp_under(None);
    assert_eq!(off.desired, 6, "{}", off.reason);
    assert!(!off.reason.contains("forecast") && off.forecast.is_none());
    let on = ramp_under(Some(Active));
    assert_eq!(
        (on.desired, on.driver),
        (9, Driver::Forecast),
        "{}",
        on.reason
    );
    assert_eq!(on.signal, Some(Driver::Forecast));
    assert_eq!(on.forecast, Some((9, 240)));
    assert!(
        on.reason.contains("forecast 88 slots in 240s: 9 replicas"),
        "{}",
        on.reason
    );
    let advisory = ramp_under(Some(Advisory));
    assert_eq!(
        (advisory.desired, advisory.driver),
        (off.desired, off.driver),
        "advisory never changes the decision"
    );
    assert!(
        advisory.reason.contains("(advisory: would ask for 9)"),
        "{}",
        advisory.reason
    );
    assert_eq!(ramp_under(Some(Disabled)).desired, off.desired);
}

/// Two ready replicas, each running `in_flight`, with `spilled` slots of demand at providers.
fn two_replicas(in_flight: f64, spilled: f64) -> Observed {
    let pod = PodSample {
        queue_depth: Some(0.0),
        in_flight: Some(in_flight),
        gpu_memory: Some(0.5),
    };
    Observed {
        spilled: Some(spilled),
        ..observed(2, vec![pod; 2])
    }
}

/// 2 replicas of 32 slots carry 50 requests on average; one tick in ten reads full plus 12
/// slots spilled (a momentary peak a provider absorbed). Run tick by tick: the replicas the
/// last ten ticks asked for.
fn peaks_under(window_seconds: i32) -> Vec<i32> {
    let mut p = policy();
    p.targets.occupancy_window_seconds = window_seconds;
    p.scale_down.stabilization_window_seconds = 300;
    let mut history = History::starting_at(0, 2);
    let mut asked = Vec::new();
    for tick in 0..60i64 {
        let peak = tick % 10 == 9;
        let (in_flight, spilled) = if peak { (32.0, 12.0) } else { (25.0, 0.0) };
        let o = two_replicas(in_flight, spilled);
        let d = decide(&p, slots(32), &o, &history, tick * 2 * S);
        history = d.history.clone();
        asked.push(d.desired);
    }
    asked.split_off(50)
}

/// `occupancyWindowSeconds` reads concurrency (and GPU memory) as a mean: a peak the provider
/// absorbed asks for no third replica, where read tick by tick it does.
#[test]
fn an_occupancy_window_ignores_momentary_peaks() {
    let each_tick = peaks_under(0);
    assert!(each_tick.contains(&3), "{each_tick:?}");
    assert_eq!(peaks_under(30), vec![2; 10]);
}

/// A sustained rise still scales up well within the window: the mean follows it.
#[test]
fn an_occupancy_window_follows_a_sustained_rise() {
    let mut p = policy();
    p.targets.occupancy_window_seconds = 30;
    let mut history = History::default();
    let mut first_up = None;
    for tick in 0..20i64 {
        // From tick 5 on, both replicas full and 40 slots spilled each tick.
        let (in_flight, spilled) = if tick < 5 { (20.0, 0.0) } else { (32.0, 40.0) };
        let o = two_replicas(in_flight, spilled);
        let d = decide(&p, slots(32), &o, &history, tick * 2 * S);
        history = d.history.clone();
        if d.desired > 2 && first_up.is_none() {
            first_up = Some((tick, d.desired, d.signal));
        }
    }
    let (tick, _, signal) = first_up.expect("never scaled up");
    // Demand rose 2.6×: the mean crosses the tolerance 8 s into the rise (4 ticks), well
    // inside the 30 s window.
    assert_eq!(tick, 9, "four ticks into the rise");
    assert_eq!(signal, Some(Driver::Concurrency));
}
