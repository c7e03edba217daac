//! engine-sim over real sockets on 127.0.0.1: every server binds port 0, every test is bounded
//! in time, and servers are stopped at the end. Timings are only asserted as orderings with
//! wide margins.
//!
//! One file per feature; the helpers they share are here.

mod completions;
mod errors;
mod faults;
mod metrics;
mod queue;
mod shutdown;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use super::*;

use crate::test_support::net::{
    Reply, bounded, get, post_json, try_call, try_open, wait_for_metrics,
};

/// A fast engine: no prefill, 1000 tokens/s.
fn fast() -> EngineSimConfig {
    EngineSimConfig {
        model: "m1".into(),
        prefill: Duration::ZERO,
        tokens_per_second: 1000.0,
        default_max_tokens: 4,
        ..Default::default()
    }
}

fn chat(max_tokens: u64, stream: bool) -> Value {
    json!({"model": "m1", "messages": [{"role": "user", "content": "abcdefgh"}], "max_tokens": max_tokens, "stream": stream})
}

/// The value of the first sample whose line starts with `prefix` (name plus labels).
fn sample(metrics: &str, prefix: &str) -> f64 {
    crate::test_support::net::sample(metrics, prefix)
        .unwrap_or_else(|| panic!("no sample {prefix:?} in:\n{metrics}"))
}

async fn metrics_text(addr: SocketAddr) -> String {
    get(addr, "/metrics").await.text()
}

const WAITING: &str = "vllm:num_requests_waiting{";

const RUNNING: &str = "vllm:num_requests_running{";

/// SSE events (the text after `data: `) with their arrival times.
async fn read_sse(resp: hyper::Response<Incoming>) -> Vec<(Instant, String)> {
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut events = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("stream broke");
        if let Ok(data) = frame.into_data() {
            buf.push_str(std::str::from_utf8(&data).expect("utf-8"));
            while let Some(i) = buf.find("\n\n") {
                let ev: String = buf.drain(..i + 2).collect();
                let payload = ev.trim_end().strip_prefix("data: ").expect("data: prefix");
                events.push((Instant::now(), payload.to_owned()));
            }
        }
    }
    assert!(buf.is_empty(), "trailing bytes: {buf:?}");
    events
}

fn content_events(events: &[(Instant, String)]) -> Vec<(Instant, Value)> {
    events
        .iter()
        .filter(|(_, e)| e != "[DONE]")
        .map(|(t, e)| (*t, serde_json::from_str::<Value>(e).unwrap()))
        .filter(|(_, v)| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .collect()
}
