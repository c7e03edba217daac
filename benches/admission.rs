//! The router's admission alone: taking a local slot and giving it back, from 1 and from 2
//! threads at once (each with its own runtime, as the router's serving threads are).
//!
//! `cargo bench --bench admission [-- ROUNDS_PER_THREAD]` (default 2,000,000). Prints the time
//! per request (acquire + release) and the total rate. With more than one thread the figure
//! includes what the threads make each other wait: the cache lines they both write.

use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use spillway::router::config::RouterConfig;
use spillway::router::fast::sharded::use_shard;
use spillway::router::state::{Excluded, RouterState, Ticket};

fn run(threads: usize, per_thread: u64) -> f64 {
    let config = RouterConfig::from_yaml(
        "maxConcurrencyPerBackend: 1000\nqueue: {limit: 1000, timeoutSeconds: 30}\nburst: {mode: Never}",
    )
    .expect("config");
    let state = RouterState::new(
        config,
        vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
        Default::default(),
    );
    let start = Arc::new(std::sync::Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let (state, start) = (state.clone(), start.clone());
            std::thread::spawn(move || {
                // As each serving thread does: its own shard of the per-request metrics.
                use_shard(i);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("runtime");
                let _guard = rt.enter();
                // As the proxy does: the request's class first, then its slot.
                let class = state.classify(None).expect("the implicit class");
                start.wait();
                let t = Instant::now();
                for _ in 0..per_thread {
                    // Far below the limit: every request is admitted at once.
                    match state.acquire(&class, Excluded::default()).now_or_never() {
                        Some(Ticket::Go(lease)) => drop(std::hint::black_box(lease)),
                        _ => panic!("a request was not admitted at once"),
                    }
                }
                t.elapsed()
            })
        })
        .collect();
    let slowest = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .max()
        .unwrap_or_default();
    slowest.as_secs_f64()
}

fn main() {
    let per_thread: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    for threads in [1, 2] {
        run(threads, per_thread / 10); // warm-up
        let secs = run(threads, per_thread);
        let total = per_thread as f64 * threads as f64;
        println!(
            "{threads} thread(s): {:.0} ns per request per thread, {:.1} M requests/s in all",
            secs * 1e9 / per_thread as f64,
            total / secs / 1e6
        );
    }
}
