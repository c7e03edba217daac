//! Scenario and trace inputs: errors, arrival rates, determinism and the warm-replica floor.

use super::*;

#[test]
fn replicas_never_below_one_and_runs_are_deterministic() {
    let s = scenario("cold-start.yaml");
    let (_, policy) = &s.policies[0];
    let trace = built_in(
        Shape::Ramp,
        &ShapeParams {
            duration_s: 1800,
            rps: 0.2,
            peak: 10.0,
            spike_s: 0,
        },
    );
    let a = simulate(&s.service, policy, &trace, &params(300.0));
    let b = simulate(&s.service, policy, &trace, &params(300.0));
    assert_eq!(a, b, "same seed, same run");
    assert!(a.min_replicas_seen >= 1);
    assert!(a.timeline.iter().all(|t| t.desired >= 1));
    let c = simulate(
        &s.service,
        policy,
        &trace,
        &ModelParams {
            seed: 8,
            ..params(300.0)
        },
    );
    assert_ne!(a.outcomes, c.outcomes, "another seed, another run");
}

#[test]
fn bad_scenarios_are_clear_errors() {
    let err = parse_scenario(&[("x.yaml".into(), "kind: Deployment\n".into())]).unwrap_err();
    assert!(
        err.to_string().contains("unexpected document kind"),
        "{err}"
    );
    let err = parse_scenario(&[(
        "x.yaml".into(),
        "apiVersion: spillway.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {name: p}\nspec: {minReplicas: 3, maxReplicas: 1}\n".into(),
    )])
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("maxReplicas (1) must be >= minReplicas (3)"),
        "{err:#}"
    );
    let err = parse_scenario(&[(
        "x.yaml".into(),
        "apiVersion: v1\nkind: ScalingPolicy\nmetadata: {name: p}\nspec: {}\n".into(),
    )])
    .unwrap_err();
    assert!(err.to_string().contains("no InferenceService"), "{err}");
}

#[test]
fn arrivals_follow_the_trace_rate() {
    let s = scenario("quickstart.yaml");
    let trace = crate::sim::trace::Trace {
        name: "flat".into(),
        rps: vec![100.0; 600],
    };
    let r = simulate(&s.service, &s.policies[0].1, &trace, &params(180.0));
    // 60,000 expected; a Poisson count's standard deviation is ~245.
    let n = r.outcomes.total as f64;
    assert!(
        (n - 60_000.0).abs() < 1_500.0,
        "{n} arrivals for 60,000 expected"
    );
}
