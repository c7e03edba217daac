//! Parse throughput on a realistic vLLM metrics page (`cargo bench --bench parse`).
//!
//! Plain std::time, no criterion, to keep the dependency tree lean. Each figure is the
//! median of several rounds, so a noisy neighbour on a shared machine skews it less.

use std::hint::black_box;
use std::time::{Duration, Instant};

use spillway::api::{EngineMetrics, MetricsPreset};
use spillway::autoscale::{promtext, signals};

const PAGE: &str = include_str!("../src/autoscale/testdata/vllm.prom");
const ROUNDS: usize = 7;
const ROUND_TIME: Duration = Duration::from_millis(300);

/// Median nanoseconds per call of `f` over [`ROUNDS`] timed rounds.
fn measure(mut f: impl FnMut()) -> f64 {
    // Calibrate the iteration count so one round lasts about ROUND_TIME.
    let mut iters = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        if t.elapsed() >= ROUND_TIME / 4 {
            break;
        }
        iters *= 2;
    }
    iters *= 4;
    let mut per_call: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    per_call[ROUNDS / 2]
}

fn report(what: &str, ns: f64) {
    let mb_s = PAGE.len() as f64 / ns * 1e9 / 1e6;
    let pages_s = 1e9 / ns;
    println!("{what:<28} {ns:>10.0} ns/page {pages_s:>10.0} pages/s {mb_s:>8.1} MB/s");
}

fn main() {
    let lines = PAGE.lines().count();
    let mut samples = 0usize;
    promtext::for_each_sample(PAGE, |_| samples += 1).expect("bench page parses");
    println!(
        "page: vLLM, {} bytes, {lines} lines, {samples} samples",
        PAGE.len()
    );

    let ns = measure(|| {
        let mut n = 0usize;
        promtext::for_each_sample(black_box(PAGE), |s| {
            n += s.name.len();
        })
        .unwrap();
        black_box(n);
    });
    report("for_each_sample (parse)", ns);

    let sel = signals::selectors(&EngineMetrics {
        preset: MetricsPreset::Vllm,
        ..EngineMetrics::default()
    });
    let ns = measure(|| {
        black_box(signals::extract(black_box(PAGE), &sel).unwrap());
    });
    report("extract (vllm preset)", ns);
}
