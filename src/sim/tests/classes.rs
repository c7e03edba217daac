//! Request classes in the simulator: the mix, and what each class may do.

use super::*;

fn with_mix(shares: &[(&str, f64)], gpu_quota: Option<u32>) -> SimResult {
    let s = scenario("classes.yaml");
    let p = ModelParams {
        classes: shares.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
        gpu_quota,
        ..params(240.0)
    };
    simulate(&s.service, &s.policies[0].1, &spike(120), &p)
}

#[test]
fn a_restricted_share_never_bursts_and_is_counted_per_class() {
    for quota in [None, Some(5)] {
        let r = with_mix(&[("restricted", 0.3), ("standard", 0.7)], quota);
        assert_nothing_lost(&r);
        let (restricted, standard) = (&r.classes[0], &r.classes[1]);
        assert_eq!(restricted.class, "restricted");
        assert_eq!(
            restricted.burst, 0,
            "quota {quota:?}: a restricted request burst"
        );
        assert!(
            standard.burst > 0,
            "quota {quota:?}: the spike spills nothing"
        );
        for c in &r.classes {
            assert_eq!(c.local + c.burst + c.rejected, c.total, "{c:?}");
        }
        let burst: u64 = r.outcomes.by_provider.iter().map(|(_, n)| n).sum();
        assert_eq!(burst, standard.burst);
        assert_eq!(restricted.total + standard.total, r.outcomes.total);
        // Roughly the share asked for (fixed seed, ~100k requests).
        let share = restricted.total as f64 / r.outcomes.total as f64;
        assert!((0.28..0.32).contains(&share), "{share}");
    }
}

#[test]
fn keeping_more_in_the_cluster_costs_its_latency_when_gpus_run_out() {
    let some = with_mix(&[("restricted", 0.3), ("standard", 0.7)], Some(5));
    let most = with_mix(&[("restricted", 0.6), ("standard", 0.4)], Some(5));
    // Restricted requests wait for local slots: at a 60 % share they outgrow 5 GPUs.
    assert!(
        most.classes[0].ttft_p95_ms > some.classes[0].ttft_p95_ms,
        "{:?} vs {:?}",
        most.classes[0],
        some.classes[0]
    );
    assert_eq!(most.classes[0].burst, 0);
}

#[test]
fn a_mix_names_only_the_services_classes() {
    let s = scenario("classes.yaml");
    let args = |mix: &str| crate::sim::SimulateArgs {
        classes: Some(mix.to_string()),
        ..default_args()
    };
    for (mix, want) in [
        (
            "restricted=0.3,standrd=0.7",
            "unknown request class \"standrd\"",
        ),
        ("restricted", "want CLASS=SHARE"),
        ("restricted=0", "share must be positive"),
        ("restricted=1,restricted=2", "twice"),
    ] {
        let err = crate::sim::settings(&args(mix), &s.service).unwrap_err();
        assert!(format!("{err:#}").contains(want), "{mix}: {err:#}");
    }
    let (_, p) = crate::sim::settings(&args("standard=3,restricted=1"), &s.service).unwrap();
    assert_eq!(p.classes.len(), 2);
}
