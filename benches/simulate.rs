//! Simulator speed: a 24-hour trace at 100 requests/s (8.6 million requests).
//!
//! `cargo bench --bench simulate`

use std::time::Instant;

use spillway::sim::parse_scenario;
use spillway::sim::trace::{Shape, ShapeParams, Trace, built_in};
use spillway::sim::world::{ModelParams, simulate};

fn main() {
    let text = include_str!("../examples/diurnal.yaml");
    let scenario = parse_scenario(&[("diurnal.yaml".into(), text.into())]).unwrap();
    let mut service = scenario.service.clone();
    service.spec.engine.max_concurrency = 64;
    let mut policy = scenario.policies[0].1.clone();
    policy.max_replicas = 64;
    let day = 86_400;
    let traces = [
        Trace {
            name: "flat 100 req/s".into(),
            rps: vec![100.0; day],
        },
        // Mean 100 req/s: the diurnal shape averages 60 % of its peak.
        built_in(
            Shape::Diurnal,
            &ShapeParams {
                duration_s: day,
                rps: 100.0 / 0.6 / 2.0,
                peak: 2.0,
                spike_s: 0,
            },
        ),
    ];
    println!(
        "{:<16} {:>12} {:>10} {:>14}",
        "trace", "requests", "seconds", "requests/s"
    );
    for trace in &traces {
        let mut best = f64::MAX;
        let mut requests = 0;
        for _ in 0..3 {
            let start = Instant::now();
            let r = simulate(&service, &policy, trace, &ModelParams::default());
            best = best.min(start.elapsed().as_secs_f64());
            requests = r.outcomes.total;
        }
        println!(
            "{:<16} {:>12} {:>10.3} {:>14.0}",
            trace.name,
            requests,
            best,
            requests as f64 / best
        );
    }
}
