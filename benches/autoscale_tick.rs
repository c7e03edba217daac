//! One autoscaler tick for many services, against real HTTP servers on 127.0.0.1.
//!
//! `cargo bench --bench autoscale_tick [-- SERVICES PODS TICKS]` (default 1000 × 4, 5 ticks).
//! The engine servers run in a child process so the figures are the autoscaler's alone:
//! wall and CPU time of each tick (scrape every ready pod, parse, decide, patch the services
//! whose load spiked), and the peak RSS. A fake API server on loopback takes the patches.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use spillway::api::{InferenceService, ScalingPolicySpec};
use spillway::autoscale::observe::{EnginePod, PodState};
use spillway::controller::apply::patch_replicas;
use spillway::controller::autoscaler::{ServiceState, TickInput, observe_and_decide};
use spillway::controller::scrape::Scraper;

const PAGE: &str = include_str!("../src/autoscale/testdata/vllm.prom");
/// Every tenth service sees a spike: 40 requests waiting per pod.
const SPIKE_EVERY: usize = 10;

fn page(waiting: u32) -> String {
    // The realistic page, with the waiting gauge set to `waiting`.
    PAGE.lines()
        .map(|l| {
            if l.starts_with("vllm:num_requests_waiting{") {
                let (series, _) = l.rsplit_once(' ').unwrap();
                format!("{series} {waiting}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

/// Serves `body` on every connection of `listener` (HTTP/1.1 keep-alive).
fn serve(listener: tokio::net::TcpListener, body: Bytes, hits: Option<Arc<AtomicUsize>>) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    if let Some(h) = &hits {
                        h.fetch_add(1, Ordering::Relaxed);
                    }
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(body))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// Child process: one engine server per service (its pods share it, as they share a port);
/// prints their ports, serves until stdin closes.
fn engine_servers(count: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let calm = Bytes::from(page(1));
        let spiked = Bytes::from(page(40));
        let mut ports = Vec::with_capacity(count);
        for i in 0..count {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ports.push(l.local_addr().unwrap().port().to_string());
            serve(
                l,
                if i % SPIKE_EVERY == 0 {
                    spiked.clone()
                } else {
                    calm.clone()
                },
                None,
            );
        }
        println!("{}", ports.join(" "));
        std::io::stdout().flush().unwrap();
        // Exit when the parent closes our stdin.
        tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await
        .unwrap();
    });
}

/// Process CPU time (user + system) from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if std::env::var("AUTOSCALE_BENCH_ROLE").as_deref() == Ok("servers") {
        engine_servers(args[0].parse().unwrap());
        return;
    }
    let services: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let pods_per: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4);
    let ticks: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg(services.to_string())
        .env("AUTOSCALE_BENCH_ROLE", "servers")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ports: Vec<i32> = line
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(ports.len(), services);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The fake API server: answers every patch like the API server would.
        let patches = Arc::new(AtomicUsize::new(0));
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_url = format!("http://{}", api.local_addr().unwrap());
        serve(
            api,
            Bytes::from_static(br#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"x","namespace":"bench"}}"#),
            Some(patches.clone()),
        );
        let client = kube::Client::try_from(kube::Config::new(api_url.parse().unwrap())).unwrap();

        let scraper = Scraper::new(256, Duration::from_secs(1));
        let policy = ScalingPolicySpec {
            max_replicas: 16,
            ..ScalingPolicySpec::default()
        };
        let mut fleet: Vec<(InferenceService, Vec<EnginePod>, ServiceState)> = (0..services)
            .map(|s| {
                let isvc: InferenceService = serde_json::from_value(serde_json::json!({
                    "apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceService",
                    "metadata": {"name": format!("svc-{s}"), "namespace": "bench", "creationTimestamp": "2026-01-01T00:00:00Z"},
                    "spec": {"model": {"name": "m"}, "engine": {"image": "e", "port": ports[s]}}
                }))
                .unwrap();
                let pods = (0..pods_per)
                    .map(|p| EnginePod {
                        name: format!("svc-{s}-{p}"),
                        ip: Some("127.0.0.1".into()),
                        state: PodState::Ready,
                        cold_start_ms: None,
                    })
                    .collect();
                (isvc, pods, ServiceState::default())
            })
            .collect();

        println!("autoscaler tick: {services} services × {pods_per} pods, engines and API server on 127.0.0.1");
        println!("{:>5} {:>10} {:>10} {:>8} {:>8}", "tick", "wall ms", "cpu ms", "scaled", "patched");
        let now0 = 1_000_000_000i64;
        for t in 0..ticks {
            let before = patches.load(Ordering::Relaxed);
            let cpu0 = cpu_time();
            let start = Instant::now();
            let results = futures::future::join_all(fleet.iter_mut().map(|(isvc, pods, state)| {
                let scraper = &scraper;
                let policy = &policy;
                let client = &client;
                async move {
                    let input = TickInput {
                        isvc,
                        policy,
                        pods,
                        current_replicas: pods_per as i32,
                        routers: &[],
                        now: now0 + t as i64 * 2000,
                    };
                    let d = observe_and_decide(scraper, &input, state, None).await;
                    if d.desired != pods_per as i32 {
                        patch_replicas(client, "bench", &format!("{}-engine", isvc.metadata.name.as_deref().unwrap()), d.desired)
                            .await
                            .unwrap();
                        state.history.record_scale(now0, pods_per as i32, d.desired);
                        return true;
                    }
                    false
                }
            }))
            .await;
            let wall = start.elapsed();
            let cpu = cpu_time() - cpu0;
            let scaled = results.iter().filter(|r| **r).count();
            println!(
                "{:>5} {:>10.1} {:>10} {:>8} {:>8}",
                t,
                wall.as_secs_f64() * 1000.0,
                cpu.as_millis(),
                scaled,
                patches.load(Ordering::Relaxed) - before
            );
        }
        println!("peak RSS of the autoscaler process: {} MiB", peak_rss_kib() / 1024);
    });
    drop(child.stdin.take());
    let _ = child.wait();
}
