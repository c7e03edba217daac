//! Several routers in front of the engines: fixed shares against one shared view.

use super::*;
use crate::router::peers::ahead;

fn run(routers: u32, skew: Option<f64>, shared_view: bool) -> SimResult {
    let s = scenario("quickstart.yaml");
    let p = ModelParams {
        routers,
        router_skew: skew,
        shared_view,
        ..params(240.0)
    };
    simulate(&s.service, &s.policies[0].1, &spike(120), &p)
}

#[test]
fn fixed_shares_spill_while_engines_have_room_and_a_shared_view_barely_does() {
    let limit = scenario("quickstart.yaml")
        .service
        .spec
        .engine
        .max_concurrency as u32;
    let fixed = run(2, Some(0.8), false);
    let shared = run(2, Some(0.8), true);
    for r in [&fixed, &shared] {
        assert_nothing_lost(r);
        assert_eq!(r.routers, 2);
    }
    // The busy router's share is used up while the other's sits idle: it pays a provider.
    assert!(
        fixed.spilled_with_local_free > 20 * shared.spilled_with_local_free.max(1),
        "fixed {} vs shared {}",
        fixed.spilled_with_local_free,
        shared.spilled_with_local_free
    );
    assert!(fixed.burst_spend > shared.burst_spend);
    // Fixed shares never overshoot; the shared view by at most the stated bound.
    assert!(fixed.engine_peak_concurrency <= limit);
    assert!(
        shared.engine_peak_concurrency <= limit + ahead(limit),
        "{} over a limit of {limit}",
        shared.engine_peak_concurrency
    );
}

/// The bound holds for more routers and slower reports: `limit + (N - 1) × ahead(limit)`.
#[test]
fn the_shared_view_stays_within_the_stated_bound() {
    let limit = scenario("quickstart.yaml")
        .service
        .spec
        .engine
        .max_concurrency as u32;
    for (routers, exchange_ms) in [(3, 1), (3, 40)] {
        let s = scenario("quickstart.yaml");
        let p = ModelParams {
            routers,
            router_skew: Some(0.6),
            shared_view: true,
            exchange_ms,
            ..params(240.0)
        };
        let r = simulate(&s.service, &s.policies[0].1, &spike(120), &p);
        assert_nothing_lost(&r);
        let bound = limit + (routers - 1) * ahead(limit);
        assert!(
            r.engine_peak_concurrency <= bound,
            "{routers} routers, reports {exchange_ms} ms late: peak {} > {bound}",
            r.engine_peak_concurrency
        );
    }
}

#[test]
fn one_router_is_the_routers_as_one() {
    let one = run(1, None, false);
    assert_eq!(one.routers, 1);
    // With one router, a spill while an engine has room would be an admission bug.
    assert_eq!(one.spilled_with_local_free, 0);
    assert_eq!(
        one,
        run(1, None, true),
        "the view makes no difference to one router"
    );
}

#[test]
fn router_settings_are_checked() {
    let s = scenario("quickstart.yaml");
    let args = |routers: u32, skew: Option<f64>| crate::sim::SimulateArgs {
        routers: Some(routers),
        router_skew: skew,
        ..default_args()
    };
    for (a, want) in [
        (args(0, None), "--routers"),
        (args(2, Some(1.5)), "--router-skew"),
        (args(2, Some(0.0)), "--router-skew"),
    ] {
        let err = crate::sim::settings(&a, &s.service).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
    let (_, p) = crate::sim::settings(&args(3, Some(0.5)), &s.service).unwrap();
    assert_eq!((p.routers, p.router_skew), (3, Some(0.5)));
}
