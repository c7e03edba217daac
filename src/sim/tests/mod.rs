//! Scenario tests on fixed seeds: the simulator drives the real `decide()` and `admit()`.

mod classes;
mod cost;
mod inputs;
mod rollout;
mod routers;
mod scenarios;

use crate::api::BurstMode;
use crate::sim::trace::{Shape, ShapeParams, built_in};
use crate::sim::world::{ModelParams, SimResult, simulate};
use crate::sim::{Scenario, parse_scenario};

fn scenario(file: &str) -> Scenario {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    parse_scenario(&[(file.to_string(), text)]).unwrap()
}

fn spike(minutes: usize) -> crate::sim::trace::Trace {
    built_in(
        Shape::Spike,
        &ShapeParams {
            duration_s: minutes * 60,
            rps: 8.0,
            peak: 4.0,
            spike_s: 30 * 60,
        },
    )
}

fn params(cold: f64) -> ModelParams {
    ModelParams {
        cold_start_s: (cold, cold),
        seed: 7,
        ..ModelParams::default()
    }
}

/// Every request has exactly one outcome.
fn assert_nothing_lost(r: &SimResult) {
    let providers: u64 = r.outcomes.by_provider.iter().map(|(_, n)| n).sum();
    assert_eq!(
        r.outcomes.local + providers + r.outcomes.rejected,
        r.outcomes.total
    );
    assert!(r.outcomes.total > 0);
}

/// The simulator's flags as given on a command line with a file and nothing else.
fn default_args() -> crate::sim::SimulateArgs {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: crate::sim::SimulateArgs,
    }
    <Cli as clap::Parser>::parse_from(["simulate", "examples/classes.yaml"]).args
}
