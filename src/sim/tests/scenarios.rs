//! The example scenarios: spikes with and without burst, quotas, oscillation, two policies.

use super::*;

#[test]
fn spike_with_burst_covers_the_cold_start() {
    let s = scenario("quickstart.yaml");
    let (_, policy) = &s.policies[0];
    let r = simulate(&s.service, policy, &spike(120), &params(180.0));
    assert_nothing_lost(&r);
    assert_eq!(
        r.outcomes.rejected, 0,
        "burst covers the cold start: nothing rejected"
    );
    assert!(
        r.ttft_p95_ms <= 2000,
        "p95 TTFT {} ms within the 2 s SLO",
        r.ttft_p95_ms
    );
    let burst: u64 = r.outcomes.by_provider.iter().map(|(_, n)| n).sum();
    assert!(
        burst > 0,
        "the overflow went to the provider while replicas came up"
    );
    assert!(
        r.peak_replicas > 2,
        "the autoscaler scaled up: peak {}",
        r.peak_replicas
    );
    // Replicas came up and then took most of the load.
    assert!(
        r.outcomes.local > burst,
        "local {} vs burst {burst}",
        r.outcomes.local
    );
}

#[test]
fn the_same_spike_without_burst_queues_and_rejects() {
    let s = scenario("quickstart.yaml");
    let mut policy = s.policies[0].1.clone();
    policy.burst.mode = BurstMode::Never;
    let r = simulate(&s.service, &policy, &spike(120), &params(180.0));
    assert_nothing_lost(&r);
    assert!(
        r.outcomes.by_provider.iter().all(|(_, n)| *n == 0),
        "mode Never never spills"
    );
    assert!(
        r.outcomes.rejected > 0,
        "rejections appear while replicas load"
    );
    assert!(
        r.ttft_p99_ms > 2000,
        "queueing shows in the tail: p99 {} ms",
        r.ttft_p99_ms
    );
    assert!(r.timeline.iter().any(|p| p.queue > 0));
}

#[test]
fn gpu_quota_exhausts_capacity_and_the_budget_holds() {
    let s = scenario("gpu-quota.yaml");
    let (_, policy) = &s.policies[0];
    let p = ModelParams {
        gpu_quota: Some(2),
        ..params(200.0)
    };
    let trace = built_in(
        Shape::Step,
        &ShapeParams {
            duration_s: 3600,
            rps: 4.0,
            peak: 5.0,
            spike_s: 0,
        },
    );
    let r = simulate(&s.service, policy, &trace, &p);
    assert_nothing_lost(&r);
    assert!(r.exhausted_ticks > 0, "capacity exhausted");
    assert!(
        r.timeline.iter().any(|t| t.unschedulable > 0),
        "pods beyond the quota are unschedulable"
    );
    assert!(
        r.timeline.iter().all(|t| t.ready + t.starting <= 2),
        "never more than the quota scheduled"
    );
    let burst: u64 = r.outcomes.by_provider.iter().map(|(_, n)| n).sum();
    assert!(burst > 0, "the providers carry the overflow");
    // The budget caps hold: 600 requests per minute, $2.00 per hour.
    assert!(
        r.max_requests_per_minute_to_providers <= 600,
        "{}",
        r.max_requests_per_minute_to_providers
    );
    // Spend is counted on completion, so one in-flight window can overshoot slightly.
    assert!(
        r.max_spend_per_hour <= 2.0 + 0.05,
        "{}",
        r.max_spend_per_hour
    );
}

#[test]
fn stabilisation_bounds_scale_events_on_an_oscillating_trace() {
    let s = scenario("quickstart.yaml");
    let (_, policy) = &s.policies[0];
    // 4x load for one minute, base load for one minute, for an hour.
    let rps: Vec<f64> = (0..3600)
        .map(|t| if (t / 60) % 2 == 0 { 32.0 } else { 8.0 })
        .collect();
    let trace = crate::sim::trace::Trace {
        name: "oscillating".into(),
        rps,
    };
    let r = simulate(&s.service, policy, &trace, &params(180.0));
    assert_nothing_lost(&r);
    // Without the 300 s scale-down window this flaps every minute (~60 events).
    assert!(r.scale_events <= 12, "{} scale events", r.scale_events);
}

#[test]
fn two_policies_are_simulated_side_by_side() {
    let s = scenario("diurnal.yaml");
    assert_eq!(s.policies.len(), 2);
    assert_eq!(
        s.policies[0].0, "latency-critical",
        "the referenced policy comes first"
    );
    let trace = built_in(
        Shape::Diurnal,
        &ShapeParams {
            duration_s: 4 * 3600,
            rps: 10.0,
            peak: 2.0,
            spike_s: 0,
        },
    );
    let runs: Vec<crate::sim::report::Run> = s
        .policies
        .iter()
        .map(|(n, p)| crate::sim::report::Run {
            policy: n.clone(),
            result: simulate(&s.service, p, &trace, &params(200.0)),
        })
        .collect();
    let table = crate::sim::report::table(&runs, 2000);
    assert!(table.lines().next().unwrap().contains("latency-critical") && table.contains("batch"));
    assert!(table.contains("TTFT p50 / p95 / p99") && table.contains("vs all-managed"));
    // Both policies saw exactly the same requests.
    assert_eq!(runs[0].result.outcomes.total, runs[1].result.outcomes.total);
    // "batch" never bursts.
    assert!(
        runs[1]
            .result
            .outcomes
            .by_provider
            .iter()
            .all(|(_, n)| *n == 0)
    );
    let svg = crate::sim::report::plot_svg(&runs[0].result, "t").unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    let csv = crate::sim::report::timeline_csv(&runs[0].result);
    assert_eq!(csv.lines().count(), runs[0].result.timeline.len() + 1);
}

/// Every run is measured against the clairvoyant schedules, for every built-in trace: the
/// oracles are lower bounds no policy beats, reported in the JSON under their documented keys.
#[test]
fn every_built_in_trace_is_measured_against_the_oracle() {
    let s = scenario("quickstart.yaml");
    for shape in [Shape::Step, Shape::Spike, Shape::Diurnal, Shape::Ramp] {
        let trace = built_in(
            shape,
            &ShapeParams {
                duration_s: 40 * 60,
                rps: 8.0,
                peak: 4.0,
                spike_s: 10 * 60,
            },
        );
        let r = simulate(&s.service, &s.policies[0].1, &trace, &params(240.0));
        assert!(
            r.oracle_gpu_hours > 0.0 && r.oracle_total_cost > 0.0,
            "{shape:?}"
        );
        assert!(
            r.total_cost_vs_oracle >= 1.0,
            "{shape:?}: cost {} under the oracle's {}",
            r.total_cost,
            r.oracle_total_cost
        );
        assert!(r.oracle_total_cost <= r.all_gpu_at_max_cost);
        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "oracleGpuHours",
            "gpuHoursVsOracle",
            "oracleTotalCost",
            "totalCostVsOracle",
        ] {
            assert!(json[key].is_number(), "{key} in {shape:?}");
        }
    }
}
