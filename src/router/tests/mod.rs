//! The router over real sockets on 127.0.0.1, with engine-sim as local engines and as burst
//! providers. Every server binds port 0, every test is bounded in time, servers are stopped.
//! Local engines run with `max_queue: 0`, so a request beyond an engine's concurrency limit
//! would come back as a 503 instead of waiting: the limit is checked by the engines themselves.
//! Timings are only asserted as orderings.

//!
//! One file per feature; the servers and helpers they share are here, and the HTTP client in
//! `crate::test_support::net`.

mod breaker;
mod budget;
mod classes;
mod drain;
mod endpoints;
mod peers;
mod queue;
mod relay;
mod reload;
mod retry;
mod revisions;
mod spill;
mod surface;
mod threads;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::config::RouterConfig;
use super::server::{RouterOptions, RouterServer};
use super::state::BreakerSettings;
use crate::engine_sim::{ApiKey, EngineSimConfig, EngineSimServer, FaultConfig};
use crate::test_support::net::{
    Reply, TempDir, bounded, call, get, open, post_json, sample, wait_for_metrics,
};

/// A local engine serving model `local`: `limit` slots, no queue, `tokens_per_second`.
async fn engine(limit: usize, tokens_per_second: f64) -> EngineSimServer {
    EngineSimServer::start(EngineSimConfig {
        model: "local".into(),
        max_concurrency: limit,
        max_queue: 0,
        prefill: Duration::ZERO,
        tokens_per_second,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A provider: checks the bearer key and serves model `name-model`.
async fn provider(name: &str, key: &str, faults: FaultConfig) -> EngineSimServer {
    EngineSimServer::start(EngineSimConfig {
        model: format!("{name}-model"),
        prefill: Duration::ZERO,
        tokens_per_second: 1000.0,
        api_key: Some(ApiKey::new(key)),
        faults,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A provider entry for the config, with its key in a file. Its answers keep its model name
/// (`exposeModel`), so a test sees where a request was served.
fn provider_yaml(name: &str, p: &EngineSimServer, key_file: &str, extra: &str) -> String {
    format!(
        "  - {{name: {name}, url: \"{}/v1\", model: {name}-model, apiKeyFile: \"{key_file}\", maxConcurrency: 8, exposeModel: true{extra}}}\n",
        p.base_url()
    )
}

async fn router_with(
    yaml: &str,
    backends: Vec<String>,
    tweak: impl FnOnce(&mut RouterOptions),
) -> RouterServer {
    let mut opts = RouterOptions {
        config: RouterConfig::from_yaml(yaml).unwrap(),
        extra_backends: backends,
        ..Default::default()
    };
    tweak(&mut opts);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    RouterServer::start_on(opts, listener).unwrap()
}

async fn router(yaml: &str, backends: Vec<String>) -> RouterServer {
    router_with(yaml, backends, |_| {}).await
}

/// A router with no engines whose provider breakers open after `failures` in a row, for `open`.
async fn router_with_breaker(yaml: &str, failures: u32, open: Duration) -> RouterServer {
    router_with(yaml, vec![], |o| {
        o.breaker = BreakerSettings { failures, open }
    })
    .await
}

/// A chat completion through the router.
async fn post(addr: SocketAddr, body: Value) -> Reply {
    post_json(addr, "/v1/chat/completions", body).await
}

fn chat(max_tokens: u64, stream: bool) -> Value {
    json!({"model": "local", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens, "stream": stream})
}

/// A stream held open through the router: dropping it is the client going away.
async fn hold_stream(addr: SocketAddr, tokens: u64) -> hyper::Response<Incoming> {
    let r = open(
        addr,
        Method::POST,
        "/v1/chat/completions",
        &[],
        chat(tokens, true),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    r
}

/// The JSON chunks of an SSE body, without `[DONE]`.
fn sse_chunks(s: &str) -> Vec<Value> {
    s.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// Reads a stream to its end.
async fn read_all(resp: hyper::Response<Incoming>) -> String {
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

async fn engine_running(e: &EngineSimServer) -> f64 {
    let t = get(e.addr(), "/metrics").await.text();
    sample(&t, "vllm:num_requests_running").unwrap_or(0.0)
}

/// Polls the router's /metrics until `pred` holds.
async fn wait_metrics(r: &RouterServer, pred: impl Fn(&str) -> bool) -> String {
    wait_for_metrics(r.addr(), "the router's metrics", pred).await
}

fn local_in_flight(t: &str) -> f64 {
    sample(t, "spillway_router_in_flight{destination=\"local\"}").unwrap_or(0.0)
}

fn served_by(r: &Reply) -> String {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["model"].as_str().unwrap_or_default().to_string()
}

/// Until at least `n` requests are in the queue.
async fn until_queued(r: &RouterServer, n: f64) {
    wait_metrics(r, |t| queued(t) >= n).await;
}

/// Requests answered at `destination` (of every class; of `outcome` only, if given).
fn requests(metrics: &str, destination: &str, outcome: Option<&str>) -> f64 {
    let destination = format!("destination=\"{destination}\"");
    let outcome = outcome.map(|o| format!("outcome=\"{o}\""));
    metrics
        .lines()
        .filter(|l| l.starts_with("spillway_router_requests_total") && l.contains(&destination))
        .filter(|l| outcome.as_ref().is_none_or(|o| l.contains(o.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Requests waiting, of every class.
fn queued(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("spillway_router_queue_length"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
