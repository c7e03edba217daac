//! The integration tier: spillway on a real control plane (`../shared/kube/cluster`: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler), with this suite playing kubelet for
//! spillway's pods (see `support/kubelet.rs`). Each scenario asserts what a platform engineer
//! would check with kubectl. Run it alone with `cargo test --locked --test cluster`, or some
//! scenarios: `cargo test --locked --test cluster -- startup failover`.
//!
//! It skips (and passes) only where the control plane or network namespaces are unavailable,
//! and never where `CI` is set.

mod scenarios;
mod support;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::FutureExt;

use support::net;
use support::plane;

/// Why the tier cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    let script = plane::script();
    if !script.exists() {
        return Some(format!("no control plane script at {}", script.display()));
    }
    for tool in ["openssl", "xz", "curl", "python3", "ip", "unshare"] {
        if support::run("sh", &["-c", &format!("command -v {tool}")]).is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    net::available().err()
}

fn main() -> ExitCode {
    // Words are scenario filters; libtest's options (and the values of those that take one)
    // are not.
    let mut filters: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        const VALUED: [&str; 6] = [
            "--test-threads",
            "--skip",
            "--color",
            "--format",
            "--logfile",
            "-Z",
        ];
        if VALUED.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            filters.push(a);
        }
    }
    // libtest-style listing (cargo test -- --list) must not start a cluster.
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    if let Some(why) = unavailable() {
        if std::env::var_os("CI").is_some() {
            println!("cluster: FAILED: CI is set and the tier cannot run: {why}");
            return ExitCode::FAILURE;
        }
        println!("cluster: SKIPPED: {why}");
        return ExitCode::SUCCESS;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(filters))
}

async fn run(filters: Vec<String>) -> ExitCode {
    let selected: Vec<&scenarios::Scenario> = scenarios::ALL
        .iter()
        .filter(|s| filters.is_empty() || filters.iter().any(|f| s.0.contains(f.as_str())))
        .collect();
    if selected.is_empty() {
        println!("cluster: no scenario matches {filters:?}");
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let env = match scenarios::Env::up().await {
        Ok(e) => e,
        Err(e) => {
            println!("cluster: FAILED to set up: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "cluster: control plane and spillway installed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let mut failed = 0;
    for s in &selected {
        let t = Instant::now();
        println!("cluster: {} ...", s.0);
        // A panic fails the scenario, not the run: what it started is still stopped below.
        let scenario = std::panic::AssertUnwindSafe((s.1)(&env)).catch_unwind();
        let out = tokio::time::timeout(Duration::from_secs(300), scenario).await;
        let secs = t.elapsed().as_secs_f64();
        let failure = match out {
            Ok(Ok(Ok(summary))) => {
                println!("cluster: ok   {} ({secs:.1}s): {summary}", s.0);
                env.finish(s.0).await;
                continue;
            }
            Ok(Ok(Err(e))) => format!("{e:#}"),
            Ok(Err(_)) => "panicked".to_string(),
            Err(_) => "timed out".to_string(),
        };
        failed += 1;
        println!("cluster: FAIL {} ({secs:.1}s): {failure}", s.0);
        env.diagnostics(s.0).await;
        env.finish(s.0).await;
    }
    env.down().await;
    println!(
        "cluster: {} passed, {failed} failed ({:.1}s in all)",
        selected.len() - failed,
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
