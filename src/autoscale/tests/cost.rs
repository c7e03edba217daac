//! `cost`: occupancy and the forecast ask for no more replicas than are worth their GPUs
//! against the providers' prices; waiting requests, `burst: Never` demand and missing prices
//! are never capped.

use crate::api::{BurstMode, Cost, Predictive, ScalingPolicySpec, SignalMode};
use crate::autoscale::cost::ProviderPrice;
use crate::autoscale::decide::*;
use crate::clock::Millis;

const S: Millis = 1000;
/// GPUs at 3.60 an hour: 0.001 a second.
const GPU_HOUR: &str = "3.60";

fn policy(mode: Option<SignalMode>) -> ScalingPolicySpec {
    let mut p = ScalingPolicySpec {
        min_replicas: 1,
        max_replicas: 16,
        cost: mode.map(|mode| Cost {
            mode,
            gpu_hour_price: GPU_HOUR.into(),
        }),
        ..ScalingPolicySpec::default()
    };
    p.scale_up.max_pods = 100;
    p.scale_down.stabilization_window_seconds = 0;
    p.scale_down.max_percent = 100;
    p
}

/// What providers charge a slot-second for a replica of 32 slots to pay at `break_even` busy.
fn provider_at(break_even: f64) -> ProviderPrice {
    ProviderPrice::PerSlotSecond(0.001 / (32.0 * break_even))
}

/// Two replicas of 32 slots, both full, 40 slots spilled (104 slots: 3.25 replicas' worth).
fn full_and_spilling(provider_price: ProviderPrice) -> Observed {
    let pod = PodSample {
        queue_depth: Some(0.0),
        in_flight: Some(32.0),
        gpu_memory: Some(0.5),
    };
    Observed {
        current_replicas: 2,
        ready: vec![pod; 2],
        spilled: Some(40.0),
        provider_price,
        created_at: -1_000_000 * S,
        ..Observed::default()
    }
}

fn configured(gpus: u32) -> SignalsConfigured {
    SignalsConfigured {
        max_concurrency: 32,
        gpus,
        ..SignalsConfigured::default()
    }
}

fn once(p: &ScalingPolicySpec, o: &Observed) -> Decision {
    decide(p, configured(1), o, &History::default(), 0)
}

#[test]
fn active_buys_only_the_replicas_that_cost_less_than_the_providers() {
    use SignalMode::*;
    // (mode, break-even, desired, driver)
    let cases = [
        // Without `cost` the spilled demand asks for ceil(3.25) = 4.
        (None, 0.5, 4, Driver::Concurrency),
        // A replica pays at 50 % busy: the fourth would be 25 % busy, the providers keep it.
        (Some(Active), 0.5, 3, Driver::Cost),
        // At 20 % it pays: 4.
        (Some(Active), 0.2, 4, Driver::Concurrency),
        // Providers cheaper than a full replica: none beyond minReplicas, even a full one.
        (Some(Active), 1.5, 1, Driver::Cost),
        // Advisory reports and does not act.
        (Some(Advisory), 0.5, 4, Driver::Concurrency),
        (Some(Disabled), 0.5, 4, Driver::Concurrency),
    ];
    for (mode, break_even, want, driver) in cases {
        let d = once(&policy(mode), &full_and_spilling(provider_at(break_even)));
        assert_eq!(
            (d.desired, d.driver),
            (want, driver),
            "{mode:?} at {break_even}: {}",
            d.reason
        );
        let reported = d.cost.map(|w| w.replicas);
        match mode {
            Some(Active | Advisory) => {
                let worth = ((104.0 / 32.0) + 1.0 - break_even).floor().max(1.0) as i32;
                let worth = if break_even > 1.0 { 1 } else { worth };
                assert_eq!(reported, Some(worth), "{}", d.reason);
                assert!(
                    d.reason
                        .contains(&format!("cost: replicas worth their GPUs {worth} (")),
                    "{}",
                    d.reason
                );
                assert_eq!(d.reason.contains("(advisory)"), mode == Some(Advisory));
            }
            _ => assert_eq!(reported, None),
        }
    }
}

/// A replica of two GPUs costs twice as much: at 30 % per GPU it pays at 60 % busy.
#[test]
fn a_replica_costs_all_its_gpus() {
    let p = policy(Some(SignalMode::Active));
    let o = full_and_spilling(provider_at(0.3));
    let one = decide(&p, configured(1), &o, &History::default(), 0);
    let two = decide(&p, configured(2), &o, &History::default(), 0);
    assert_eq!((one.desired, two.desired), (3, 3), "{}", two.reason);
    let be = |d: &Decision| d.cost.unwrap().break_even;
    assert!((be(&two) - 2.0 * be(&one)).abs() < 1e-9);
    // 3.25 replicas' worth: the fourth is 25 % busy; at 0.2 per GPU one pays at 20 %, with two
    // GPUs at 40 %.
    let o = full_and_spilling(provider_at(0.2));
    assert_eq!(
        decide(&p, configured(1), &o, &History::default(), 0).desired,
        4
    );
    assert_eq!(
        decide(&p, configured(2), &o, &History::default(), 0).desired,
        3
    );
}

/// Requests that wait for a local slot, and demand of classes that may not burst, get their
/// replicas whatever providers charge; so does everything when no provider is priced.
#[test]
fn waiting_local_only_and_unpriced_demand_is_never_capped() {
    let p = policy(Some(SignalMode::Active));
    let cheap = provider_at(1.5);
    // 40 waiting in the routers, target 4 a replica: 2 × (40 / 2) / 4 = 10.
    let waiting = Observed {
        router_queue: Some(40.0),
        ..full_and_spilling(cheap)
    };
    let d = once(&p, &waiting);
    assert_eq!(
        (d.desired, d.driver),
        (10, Driver::QueueDepth),
        "{}",
        d.reason
    );
    // 100 slots of `burst: Never` demand need ceil((100 + 16) / 32) = 4.
    let kept = Observed {
        local_only: Some(100.0),
        ..full_and_spilling(cheap)
    };
    let d = once(&p, &kept);
    assert_eq!(d.desired, 4, "{}", d.reason);
    // No provider has pricing: cost has nothing to weigh, all demand counts.
    let d = once(&p, &full_and_spilling(ProviderPrice::Unpriced));
    assert_eq!((d.desired, d.cost), (4, None), "{}", d.reason);
    assert!(d.reason.contains("no provider has pricing"), "{}", d.reason);
}

/// With nothing ready the spill alone asks for replicas; cost caps that too.
#[test]
fn the_spill_before_any_replica_is_ready_is_capped() {
    let o = Observed {
        current_replicas: 1,
        starting: 1,
        spilled: Some(104.0),
        provider_price: provider_at(0.5),
        created_at: -1_000_000 * S,
        ..Observed::default()
    };
    assert_eq!(once(&policy(None), &o).desired, 4);
    let d = once(&policy(Some(SignalMode::Active)), &o);
    assert_eq!(d.desired, 3, "{}", d.reason);
}

/// The forecast asks for no more than cost allows: a ramp on 4 replicas of 10 slots, 2 slots
/// more every 15 s, forecast at 88 slots (9 replicas); at a break-even of 90 % only 8 are
/// worth it (the ninth would be 80 % busy).
#[test]
fn the_forecast_is_capped_too() {
    let run = |mode: Option<SignalMode>| {
        let mut p = policy(mode);
        p.predictive = Some(Predictive {
            mode: SignalMode::Active,
            horizon_seconds: Some(240),
        });
        let c = SignalsConfigured {
            max_concurrency: 10,
            ..SignalsConfigured::default()
        };
        // 10 slots at 0.001 a second pay at 90 % busy.
        let provider_price = ProviderPrice::PerSlotSecond(0.001 / (10.0 * 0.9));
        let mut history = History::default();
        let mut last = None;
        for tick in 0..=20 {
            let pod = PodSample {
                queue_depth: Some(0.0),
                in_flight: Some(4.0 + 0.5 * tick as f64),
                gpu_memory: Some(0.5),
            };
            let o = Observed {
                current_replicas: 4,
                ready: vec![pod; 4],
                provider_price,
                created_at: -1_000_000 * S,
                ..Observed::default()
            };
            let d = decide(&p, c, &o, &history, tick * 15 * S);
            history = d.history.clone();
            last = Some(d);
        }
        last.unwrap()
    };
    let free = run(None);
    assert_eq!(free.forecast, Some((9, 240)), "{}", free.reason);
    let capped = run(Some(SignalMode::Active));
    assert_eq!(capped.forecast, Some((8, 240)), "{}", capped.reason);
    assert_eq!(capped.desired, 8, "{}", capped.reason);
}

/// Until the providers' price is measured, spilled demand buys no GPU; the demand running
/// locally still counts.
#[test]
fn spilled_demand_waits_for_a_measured_price() {
    let d = once(
        &policy(Some(SignalMode::Active)),
        &full_and_spilling(ProviderPrice::Unmeasured),
    );
    assert_eq!(d.desired, 2, "{}", d.reason);
    assert!(
        d.reason.contains("no provider price measured yet"),
        "{}",
        d.reason
    );
    let d = once(&policy(None), &full_and_spilling(ProviderPrice::Unmeasured));
    assert_eq!(d.desired, 4, "without cost it counts: {}", d.reason);
}

/// Under a burst mode other than Saturated the routers spill only while capacity is
/// exhausted: what cost declines would wait, not spill, so cost does nothing.
#[test]
fn cost_needs_a_burst_mode_that_spills_when_full() {
    for mode in [BurstMode::CapacityExhausted, BurstMode::Never] {
        let mut p = policy(Some(SignalMode::Active));
        p.burst.mode = mode;
        assert!(p.validate().unwrap_err().contains("burst.mode Saturated"));
        let d = once(&p, &full_and_spilling(provider_at(1.5)));
        assert_eq!((d.desired, d.cost), (4, None), "{mode:?}: {}", d.reason);
    }
}

/// Each occupancy signal is weighed on its own demand: GPU memory above its target keeps its
/// headroom where GPUs are cheap, and loses it where providers are cheaper.
#[test]
fn gpu_memory_headroom_is_weighed_on_its_own_reading() {
    // One replica, 30 of 32 slots busy, nothing spilled; GPU memory 0.95 against 0.8.
    let o = Observed {
        current_replicas: 1,
        ready: vec![PodSample {
            queue_depth: Some(0.0),
            in_flight: Some(30.0),
            gpu_memory: Some(0.95),
        }],
        spilled: Some(0.0),
        created_at: -1_000_000 * S,
        ..Observed::default()
    };
    let with = |provider_price| Observed {
        provider_price,
        ..o.clone()
    };
    let p = policy(Some(SignalMode::Active));
    let cheap_gpus = once(&p, &with(provider_at(0.01)));
    assert_eq!(
        (cheap_gpus.desired, cheap_gpus.driver),
        (2, Driver::GpuMemory),
        "{}",
        cheap_gpus.reason
    );
    let cheap_providers = once(&p, &with(provider_at(1.5)));
    assert_eq!(cheap_providers.desired, 1, "{}", cheap_providers.reason);
}

/// Cost does not scale down while more requests wait for a local slot than the queue target
/// allows (they may be unable to leave: the budget, a breaker, an endpoint providers lack),
/// nor a running replica within tolerance of the break-even.
#[test]
fn no_scale_down_for_cost_while_requests_wait_or_within_tolerance() {
    let p = policy(Some(SignalMode::Active));
    let pods = |third: f64| {
        [32.0, 32.0, third].map(|in_flight| PodSample {
            queue_depth: Some(0.0),
            in_flight: Some(in_flight),
            gpu_memory: Some(0.5),
        })
    };
    let base = |third: f64, queue: f64, break_even: f64| Observed {
        current_replicas: 3,
        ready: pods(third).to_vec(),
        spilled: Some(0.0),
        router_queue: Some(queue),
        provider_price: provider_at(break_even),
        created_at: -1_000_000 * S,
        ..Observed::default()
    };
    // Two replicas full, the third 30 % busy: at a 50 % break-even it goes...
    let d = once(&p, &base(9.6, 0.0, 0.5));
    assert_eq!((d.desired, d.driver), (2, Driver::Cost), "{}", d.reason);
    // ...but not while more wait than the queue target allows (24 on 3 replicas, 4 each),
    let d = once(&p, &base(9.6, 24.0, 0.5));
    assert!(d.desired >= 3, "{}", d.reason);
    // and a few waiting within it change nothing.
    let d = once(&p, &base(9.6, 2.0, 0.5));
    assert_eq!(d.desired, 2, "{}", d.reason);
    // The third 90 % busy against a 95 % break-even: not worth adding, but within the 10 %
    // tolerance of it, so it stays.
    let d = once(&p, &base(28.8, 0.0, 0.95));
    assert_eq!(d.desired, 3, "{}", d.reason);
    // Without the tolerance it goes.
    let mut exact = p.clone();
    exact.tolerance = 0.0;
    let d = once(&exact, &base(28.8, 0.0, 0.95));
    assert_eq!(d.desired, 2, "{}", d.reason);
}

/// `gpuHourPrice` is read as the schema writes it, for objects that bypassed it too.
#[test]
fn the_gpu_price_is_a_plain_positive_decimal() {
    let price = |p: &str| {
        Cost {
            mode: SignalMode::Active,
            gpu_hour_price: p.into(),
        }
        .gpu_hour_price()
    };
    assert_eq!(price("2.50"), Some(2.5));
    assert_eq!(price("1000"), Some(1000.0));
    for bad in [
        "0", "0.00", "1e3", "+2", " 2.5", "2.", ".5", "-1", "", "NaN", "inf",
    ] {
        assert_eq!(price(bad), None, "{bad:?}");
    }
}

/// An engine without GPUs costs nothing to weigh: cost leaves it alone, and its spill counts
/// even before a price is measured.
#[test]
fn an_engine_without_gpus_is_left_alone() {
    let p = policy(Some(SignalMode::Active));
    for price in [ProviderPrice::Unmeasured, provider_at(1.5)] {
        let d = decide(
            &p,
            configured(0),
            &full_and_spilling(price),
            &History::default(),
            0,
        );
        assert_eq!((d.desired, d.cost), (4, None), "{price:?}: {}", d.reason);
    }
}
