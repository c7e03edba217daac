//! The router over real sockets on 127.0.0.1, with engine-sim as local engines and as burst
//! providers. Every server binds port 0, every test is bounded in time, servers are stopped.
//! Local engines run with `max_queue: 0`, so a request beyond an engine's concurrency limit
//! would come back as a 503 instead of waiting: the limit is checked by the engines themselves.
//! Timings are only asserted as orderings.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::config::RouterConfig;
use super::server::{RouterOptions, RouterServer};
use super::state::BreakerSettings;
use crate::engine_sim::{ApiKey, EngineSimConfig, EngineSimServer, FaultConfig};

const TEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound")
}

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

/// A scratch directory for key and config files, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("spillway-router-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn file(&self, name: &str, content: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A provider entry for the config, with its key in a file.
fn provider_yaml(name: &str, p: &EngineSimServer, key_file: &str, extra: &str) -> String {
    format!(
        "  - {{name: {name}, url: \"{}/v1\", model: {name}-model, apiKeyFile: \"{key_file}\", maxConcurrency: 8{extra}}}\n",
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

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn open(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> hyper::Response<Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    sender
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap()
}

async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let resp = open(addr, method, path, headers, body).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

async fn post(addr: SocketAddr, body: Value) -> Reply {
    call(
        addr,
        Method::POST,
        "/v1/chat/completions",
        &[],
        body.to_string().into(),
    )
    .await
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    call(addr, Method::GET, path, &[], Bytes::new()).await
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
        chat(tokens, true).to_string().into(),
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

fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn engine_running(e: &EngineSimServer) -> f64 {
    let t = get(e.addr(), "/metrics").await.text();
    sample(&t, "vllm:num_requests_running").unwrap_or(0.0)
}

/// Polls the router's /metrics until `pred` holds.
async fn wait_metrics(r: &RouterServer, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = get(r.addr(), "/metrics").await.text();
        if pred(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "metrics never matched:\n{t}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn local_in_flight(t: &str) -> f64 {
    sample(t, "spillway_router_in_flight{destination=\"local\"}").unwrap_or(0.0)
}

fn served_by(r: &Reply) -> String {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["model"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn load_spreads_by_least_outstanding_requests() {
    bounded(async {
        let engines = [
            engine(4, 20.0).await,
            engine(4, 20.0).await,
            engine(4, 20.0).await,
        ];
        let r = router(
            "maxConcurrencyPerBackend: 4\nburst: {mode: Never}\n",
            engines.iter().map(|e| e.addr().to_string()).collect(),
        )
        .await;
        // Three long streams: one on each engine, not two on the first.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(hold_stream(r.addr(), 200).await);
        }
        for e in &engines {
            assert_eq!(engine_running(e).await, 1.0);
        }
        drop(held);
        r.stop().await;
        for e in engines {
            e.stop().await.unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn a_replica_concurrency_limit_is_never_exceeded() {
    bounded(async {
        let engines = [engine(2, 200.0).await, engine(2, 200.0).await];
        let r = router(
            "maxConcurrencyPerBackend: 2\nqueue: {limit: 100, timeoutSeconds: 20}\nburst: {mode: Never}\n",
            engines.iter().map(|e| e.addr().to_string()).collect(),
        )
        .await;
        // Peak concurrency per engine, sampled from its own gauge while the load runs.
        let peaks = Arc::new(Mutex::new([0.0f64; 2]));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let addrs: Vec<SocketAddr> = engines.iter().map(|e| e.addr()).collect();
            let (peaks, stop) = (peaks.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for (i, a) in addrs.iter().enumerate() {
                        let t = get(*a, "/metrics").await.text();
                        let v = sample(&t, "vllm:num_requests_running").unwrap_or(0.0);
                        let mut p = peaks.lock().unwrap();
                        p[i] = p[i].max(v);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        let mut tasks = Vec::new();
        for _ in 0..24 {
            let a = r.addr();
            tasks.push(tokio::spawn(async move { post(a, chat(10, false)).await }));
        }
        for t in tasks {
            // An engine over its limit (no queue) would have answered 503.
            assert_eq!(served_by(&t.await.unwrap()), "local");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sampler.await.unwrap();
        let peaks = *peaks.lock().unwrap();
        assert!(peaks.iter().all(|p| *p <= 2.0), "{peaks:?}");
        assert!(peaks.contains(&2.0), "the load never reached the limit: {peaks:?}");
        r.stop().await;
        for e in engines {
            e.stop().await.unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn spill_starts_exactly_when_every_engine_is_full_and_stops_when_room_returns() {
    bounded(async {
        let dir = TempDir::new("spill");
        let key = dir.file("p", "sk-p");
        let local = engine(2, 20.0).await;
        let p = provider("p", "sk-p", FaultConfig::default()).await;
        let yaml = format!(
            "maxConcurrencyPerBackend: 2\nburst:\n  mode: Saturated\n  providers:\n{}",
            provider_yaml("p", &p, &key, "")
        );
        let r = router(&yaml, vec![local.addr().to_string()]).await;
        let first = hold_stream(r.addr(), 400).await;
        // One slot still free: local.
        assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "local");
        let second = hold_stream(r.addr(), 400).await;
        // Every engine full: the provider.
        assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "p-model");
        assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "p-model");
        drop(first);
        wait_metrics(&r, |t| local_in_flight(t) == 1.0).await;
        // Room again: back to local.
        assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "local");
        let t = get(r.addr(), "/metrics").await.text();
        assert_eq!(
            sample(
                &t,
                "spillway_router_requests_total{destination=\"p\",outcome=\"success\"}"
            ),
            Some(2.0),
            "{t}"
        );
        drop(second);
        r.stop().await;
        local.stop().await.unwrap();
        p.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn mode_never_never_spills_and_queue_timeout_is_a_503_json_with_retry_after() {
    bounded(async {
        let dir = TempDir::new("never");
        let key = dir.file("p", "sk-p");
        let local = engine(1, 20.0).await;
        let p = provider("p", "sk-p", FaultConfig::default()).await;
        let yaml = format!(
            "maxConcurrencyPerBackend: 1\nqueue: {{limit: 10, timeoutSeconds: 1}}\nburst:\n  mode: Never\n  providers:\n{}",
            provider_yaml("p", &p, &key, "")
        );
        let r = router(&yaml, vec![local.addr().to_string()]).await;
        let held = hold_stream(r.addr(), 400).await;
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.headers["retry-after"], "1");
        let e = reply.json();
        assert_eq!(e["error"]["code"], "queue_timeout");
        assert_eq!(e["error"]["type"], "server_error");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        let pt = get(p.addr(), "/metrics").await.text();
        assert_eq!(sample(&pt, "vllm:request_success_total"), None, "{pt}");
        drop(held);
        r.stop().await;
        local.stop().await.unwrap();
        p.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_full_queue_rejects_at_once_and_queued_requests_get_freed_slots_in_order() {
    bounded(async {
        let local = engine(1, 50.0).await;
        let r = router(
            "maxConcurrencyPerBackend: 1\nqueue: {limit: 2, timeoutSeconds: 20}\nburst: {mode: Never}\n",
            vec![local.addr().to_string()],
        )
        .await;
        let held = hold_stream(r.addr(), 400).await;
        let mut waiting = Vec::new();
        for _ in 0..2 {
            let a = r.addr();
            waiting.push(tokio::spawn(async move { post(a, chat(2, false)).await }));
        }
        wait_metrics(&r, |t| sample(t, "spillway_router_queue_length") == Some(2.0)).await;
        let full = post(r.addr(), chat(1, false)).await;
        assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(full.json()["error"]["code"], "queue_full");
        assert!(full.headers.contains_key("retry-after"));
        drop(held);
        for w in waiting {
            assert_eq!(served_by(&w.await.unwrap()), "local");
        }
        r.stop().await;
        local.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn mode_capacity_exhausted_follows_the_published_state() {
    bounded(async {
        let dir = TempDir::new("capacity");
        let key = dir.file("p", "sk-p");
        let local = engine(1, 20.0).await;
        let p = provider("p", "sk-p", FaultConfig::default()).await;
        let yaml = format!(
            "maxConcurrencyPerBackend: 1\nqueue: {{limit: 10, timeoutSeconds: 1}}\nburst:\n  mode: CapacityExhausted\n  providers:\n{}",
            provider_yaml("p", &p, &key, "")
        );
        let r = router(&yaml, vec![local.addr().to_string()]).await;
        let held = hold_stream(r.addr(), 400).await;
        // Not reported exhausted: no spill, the request times out in the queue.
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
        // A longer timeout; a queued request spills as soon as exhaustion is published.
        let mut cfg = r.state().config().as_ref().clone();
        cfg.queue.timeout_seconds = 20;
        r.state().set_config(cfg);
        let a = r.addr();
        let queued = tokio::spawn(async move { post(a, chat(1, false)).await });
        wait_metrics(&r, |t| sample(t, "spillway_router_queue_length") == Some(1.0)).await;
        r.state().set_capacity_exhausted(true);
        assert_eq!(served_by(&queued.await.unwrap()), "p-model");
        assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "p-model");
        // Withdrawn again: new requests wait for a local slot.
        r.state().set_capacity_exhausted(false);
        let a = r.addr();
        let queued = tokio::spawn(async move { post(a, chat(1, false)).await });
        wait_metrics(&r, |t| sample(t, "spillway_router_queue_length") == Some(1.0)).await;
        drop(held);
        assert_eq!(served_by(&queued.await.unwrap()), "local");
        r.stop().await;
        local.stop().await.unwrap();
        p.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn provider_500s_open_its_breaker_and_the_next_provider_takes_over() {
    bounded(async {
        let dir = TempDir::new("breaker");
        let (ka, kb) = (dir.file("a", "sk-a"), dir.file("b", "sk-b"));
        let a = provider(
            "a",
            "sk-a",
            FaultConfig {
                fail_rate: 1.0,
                fail_status: 500,
                ..Default::default()
            },
        )
        .await;
        let b = provider("b", "sk-b", FaultConfig::default()).await;
        let yaml = format!(
            "burst:\n  providers:\n{}{}",
            provider_yaml("a", &a, &ka, ""),
            provider_yaml("b", &b, &kb, "")
        );
        // No local engines: everything spills, to `a` first while its breaker allows.
        let r = router_with_breaker(&yaml, 3, Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert_eq!(
                post(r.addr(), chat(1, false)).await.status,
                StatusCode::INTERNAL_SERVER_ERROR
            );
        }
        for _ in 0..3 {
            assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "b-model");
        }
        let t = get(r.addr(), "/metrics").await.text();
        assert_eq!(
            sample(&t, "spillway_router_provider_breaker_open{provider=\"a\"}"),
            Some(1.0),
            "{t}"
        );
        assert_eq!(
            sample(
                &t,
                "spillway_router_requests_total{destination=\"a\",outcome=\"upstream_error\"}"
            ),
            Some(3.0)
        );
        r.stop().await;
        a.stop().await.unwrap();
        b.stop().await.unwrap();
    })
    .await;
}

/// A provider that refuses the router's key (401/403) will refuse every request: the request
/// goes elsewhere rather than answering the client as if its own credentials were wrong, and
/// the provider's breaker counts it. Nor do the refused attempts count in the slot histogram
/// the autoscaler turns into spilled demand: only answered requests do.
#[tokio::test]
async fn a_provider_that_refuses_the_key_is_passed_over_and_its_breaker_opens() {
    bounded(async {
        let dir = TempDir::new("refused");
        let (ka, kb) = (dir.file("a", "sk-revoked"), dir.file("b", "sk-b"));
        let a = provider("a", "sk-a", FaultConfig::default()).await;
        let b = provider("b", "sk-b", FaultConfig::default()).await;
        let yaml = format!(
            "burst:\n  providers:\n{}{}",
            provider_yaml("a", &a, &ka, ""),
            provider_yaml("b", &b, &kb, "")
        );
        let r = router_with_breaker(&yaml, 2, Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "b-model");
        }
        let t = get(r.addr(), "/metrics").await.text();
        assert_eq!(
            sample(&t, "spillway_router_provider_breaker_open{provider=\"a\"}"),
            Some(1.0),
            "{t}"
        );
        let slots = |dest: &str| {
            sample(
                &t,
                &format!("spillway_router_slot_duration_seconds_count{{destination=\"{dest}\"}}"),
            )
        };
        assert_eq!(slots("b"), Some(3.0), "{t}");
        assert!(slots("a").is_none_or(|n| n == 0.0), "{t}");
        r.stop().await;
        // With nowhere else to go yet (a cold start), it waits for an engine as any request
        // would, and never gets the provider's 401.
        let only_a = format!(
            "queue: {{timeoutSeconds: 1}}\nburst:\n  providers:\n{}",
            provider_yaml("a", &a, &ka, "")
        );
        let r = router(&only_a, vec![]).await;
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        assert_eq!(reply.json()["error"]["code"], "queue_timeout");
        assert!(!reply.text().contains("sk-revoked"), "{}", reply.text());
        r.stop().await;
        a.stop().await.unwrap();
        b.stop().await.unwrap();
    })
    .await;
}

/// A half-open breaker's probe whose client walks away once the answer is coming still shows
/// the provider is back: the breaker closes rather than waiting out another cool-down.
#[tokio::test]
async fn a_probe_whose_client_leaves_mid_answer_still_closes_the_breaker() {
    bounded(async {
        let dir = TempDir::new("probe");
        let key = dir.file("p", "sk-p");
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let with_url = |url: String| {
            format!(
                "queue: {{timeoutSeconds: 1}}\nburst:\n  providers:\n  - {{name: p, url: \"{url}\", model: p-model, apiKeyFile: \"{key}\", maxConcurrency: 8}}\n"
            )
        };
        let first = with_url(format!("http://{dead}/v1"));
        let r = router_with_breaker(&first, 1, Duration::from_secs(3)).await;
        // Refused: the breaker opens (the request waits for an engine, then times out).
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        // The provider comes back under the same name, keeping its breaker.
        let p = provider("p", "sk-p", FaultConfig::default()).await;
        let cfg = RouterConfig::from_yaml(&with_url(format!("{}/v1", p.base_url()))).unwrap();
        r.state().set_config(cfg);
        tokio::time::sleep(Duration::from_millis(3100)).await;
        // The probe: its client reads the first chunk and goes.
        let mut probe = hold_stream(r.addr(), 2000).await.into_body();
        probe.frame().await.unwrap().unwrap();
        drop(probe);
        wait_metrics(&r, |t| {
            t.contains("spillway_router_requests_total{destination=\"p\",outcome=\"cancelled\"} 1")
        })
        .await;
        // Closed: the next request goes to it at once, not after another 3 s.
        assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "p-model");
        r.stop().await;
        p.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_connection_failure_before_any_response_is_retried_elsewhere() {
    bounded(async {
        // A port nobody listens on, first in line (ties go to the lowest index).
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let live = engine(4, 200.0).await;
        let r = router(
            "burst: {mode: Never}\n",
            vec![dead.to_string(), live.addr().to_string()],
        )
        .await;
        for _ in 0..3 {
            assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "local");
        }
        // Only a dead engine left: a 502 with a JSON error, never silence.
        r.state().set_backends(vec![dead.to_string()]);
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

/// An engine that closes each connection at once, counting them, until `serve` is set; then
/// it answers each with a small completion from model `back`.
async fn flaky_engine() -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let serve = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (count, on) = (accepted.clone(), serve.clone());
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, SeqCst);
            if !on.load(SeqCst) {
                continue;
            }
            // The router sends a small request in one write.
            let mut buf = [0u8; 8192];
            let _ = s.read(&mut buf).await;
            let body = r#"{"object":"chat.completion","model":"back","choices":[]}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    (addr, accepted, serve, task)
}

#[tokio::test]
async fn an_engine_whose_connection_failed_gets_no_new_requests_for_a_while() {
    bounded(async {
        // First in line: least-outstanding would pick it for every request, as it is never busy.
        let (bad, accepted, _, task) = flaky_engine().await;
        let live = engine(4, 200.0).await;
        let r = router(
            "burst: {mode: Never}\n",
            vec![bad.to_string(), live.addr().to_string()],
        )
        .await;
        for _ in 0..4 {
            assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "local");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        let t = get(r.addr(), "/metrics").await.text();
        assert_eq!(
            sample(&t, "spillway_router_engine_set_asides_total"),
            Some(1.0),
            "{t}"
        );
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

/// Engines that each read a whole request and then close without an answer, as an engine the
/// request itself crashes would: a prompt that kills engines must not take down three.
#[tokio::test]
async fn a_request_engines_die_on_is_retried_on_one_more_engine_only() {
    bounded(async {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let read = Arc::new(AtomicUsize::new(0));
        let mut engines = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            engines.push(l.local_addr().unwrap().to_string());
            let read = read.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    // The router sends a small request in one write.
                    let mut buf = [0u8; 8192];
                    if s.read(&mut buf).await.is_ok_and(|n| n > 0) {
                        read.fetch_add(1, SeqCst);
                    }
                }
            }));
        }
        let r = router("burst: {mode: Never}\n", engines).await;
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
        assert_eq!(read.load(SeqCst), 2, "engines that got the request");
        for t in tasks {
            t.abort();
        }
        r.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_lone_failing_engine_is_tried_once_then_answered_502() {
    bounded(async {
        let (bad, accepted, _, task) = flaky_engine().await;
        let r = router("burst: {mode: Never}\n", vec![bad.to_string()]).await;
        // Setting aside the only engine has no effect, so the retry does not queue for it.
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        task.abort();
        r.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_engine_back_from_being_set_aside_takes_the_queue_head() {
    bounded(async {
        let live = engine(1, 50.0).await;
        let (bad, _, serve, task) = flaky_engine().await;
        let r = router_over(&live, bad, "{limit: 5, timeoutSeconds: 25}").await;
        // 20 s on the live engine: longer than the set-aside, shorter than the queue timeout.
        let held = hold_stream(r.addr(), 1000).await;
        let addr = r.addr();
        let waiting = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_queued(&r, 1.0).await;
        serve.store(true, std::sync::atomic::Ordering::SeqCst);
        // Its return frees no slot; the waiter still gets it, not the live engine's slot later.
        assert_eq!(served_by(&waiting.await.unwrap()), "back");
        assert_eq!(engine_running(&live).await, 1.0);
        drop(held);
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_retry_with_no_room_elsewhere_waits_in_the_queue_instead_of_failing() {
    bounded(async {
        let live = engine(1, 50.0).await;
        let (bad, accepted, _, task) = flaky_engine().await;
        let r = router_over(&live, bad, "{limit: 5, timeoutSeconds: 20}").await;
        // Fills the live engine (ties go to the lowest index), so the next request goes to
        // the bad one, fails, and finds no room anywhere.
        let held = hold_stream(r.addr(), 40).await;
        let addr = r.addr();
        let waiting = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_queued(&r, 1.0).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        drop(held);
        let reply = waiting.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

/// An engine that reads a request per connection, says so on `read`, and never answers. When
/// its task is aborted the connections it holds close and new ones are refused.
async fn engine_hanging() -> (
    SocketAddr,
    Arc<tokio::sync::Notify>,
    tokio::task::JoinHandle<()>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let read = Arc::new(tokio::sync::Notify::new());
    let on_read = read.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 8192];
            let _ = s.read(&mut buf).await;
            on_read.notify_one();
            held.push(s);
        }
    });
    (addr, read, task)
}

#[tokio::test]
async fn a_queued_retry_keeps_its_place_by_arrival() {
    bounded(async {
        let live = engine(1, 50.0).await;
        let (bad, read, bad_task) = engine_hanging().await;
        // Room in the queue for one: the retry must not count the request behind it.
        let r = router_over(&live, bad, "{limit: 1, timeoutSeconds: 25}").await;
        // 20 s on the live engine: it frees only when dropped.
        let held = hold_stream(r.addr(), 1000).await;
        let addr = r.addr();
        // `first` goes to the bad engine and hangs there; `second`, arriving later, queues.
        let first = tokio::spawn(async move { post(addr, chat(1, false)).await });
        read.notified().await;
        let second = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_queued(&r, 1.0).await;
        // `first` fails, finds no room and queues too: ahead of `second`, which came later.
        bad_task.abort();
        until_queued(&r, 2.0).await;
        drop(held);
        let (a, b) = (first.await.unwrap(), second.await.unwrap());
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(b.status, StatusCode::OK, "{}", b.text());
        // engine-sim numbers the requests it serves: `first` got the freed slot.
        let n = |r: &Reply| {
            let id = r.json()["id"].as_str().unwrap().to_string();
            id.rsplit('-').next().unwrap().parse::<u64>().unwrap()
        };
        assert!(n(&a) < n(&b), "{} then {}", a.text(), b.text());
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

/// Until `n` connections have been accepted.
async fn until_accepted(accepted: &std::sync::atomic::AtomicUsize, n: usize) {
    while accepted.load(std::sync::atomic::Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A router with one local engine of one slot and provider `p` at `provider`, spilling after
/// 100 ms in the queue.
async fn router_spilling_to(
    live: &EngineSimServer,
    provider: SocketAddr,
    dir: &TempDir,
) -> RouterServer {
    let key = dir.file("p", "sk-p");
    router(
        &format!(
            "maxConcurrencyPerBackend: 1\nqueue: {{limit: 5, timeoutSeconds: 10}}\nburst:\n  maxQueueWaitMilliseconds: 100\n  providers:\n  - {{name: p, url: \"http://{provider}/v1\", model: p-model, apiKeyFile: \"{key}\", maxConcurrency: 8}}\n"
        ),
        vec![live.addr().to_string()],
    )
    .await
}

/// Until at least `n` requests are in the queue.
async fn until_queued(r: &RouterServer, n: f64) {
    wait_metrics(r, |t| {
        sample(t, "spillway_router_queue_length").is_some_and(|v| v >= n)
    })
    .await;
}

/// A router over a live engine and a bad one, one slot each, queueing as `queue` says and
/// never spilling.
async fn router_over(live: &EngineSimServer, bad: SocketAddr, queue: &str) -> RouterServer {
    router(
        &format!("maxConcurrencyPerBackend: 1\nqueue: {queue}\nburst: {{mode: Never}}\n"),
        vec![live.addr().to_string(), bad.to_string()],
    )
    .await
}

#[tokio::test]
async fn a_request_whose_provider_failed_waits_for_a_local_slot() {
    bounded(async {
        let dir = TempDir::new("requeue");
        let live = engine(1, 50.0).await;
        let (bad, accepted, _, task) = flaky_engine().await;
        let r = router_spilling_to(&live, bad, &dir).await;
        let held = hold_stream(r.addr(), 40).await;
        let addr = r.addr();
        let waiting = tokio::spawn(async move { post(addr, chat(1, false)).await });
        // It spilled and the provider failed it (it left the queue for that): it waits again
        // instead of answering 502.
        until_accepted(&accepted, 1).await;
        until_queued(&r, 1.0).await;
        drop(held);
        assert_eq!(served_by(&waiting.await.unwrap()), "local");
        // The queue kept it from the provider that failed it.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn in_a_cold_start_a_request_whose_provider_failed_waits_for_the_first_engine() {
    bounded(async {
        let dir = TempDir::new("requeue-cold");
        let key = dir.file("p", "sk-p");
        let (bad, accepted, _, task) = flaky_engine().await;
        let r = router(
            &format!(
                "queue: {{limit: 5, timeoutSeconds: 25}}\nburst:\n  providers:\n  - {{name: p, url: \"http://{bad}/v1\", model: p-model, apiKeyFile: \"{key}\", maxConcurrency: 8}}\n"
            ),
            vec![],
        )
        .await;
        let addr = r.addr();
        let waiting = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_accepted(&accepted, 1).await;
        until_queued(&r, 1.0).await;
        let live = engine(1, 50.0).await;
        r.state().set_backends(vec![live.addr().to_string()]);
        assert_eq!(served_by(&waiting.await.unwrap()), "local");
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_queued_retry_does_not_hold_back_those_behind_it() {
    bounded(async {
        let dir = TempDir::new("requeue-by");
        let live = engine(1, 10.0).await;
        let (flaky, accepted, serve, task) = flaky_engine().await;
        let r = router_spilling_to(&live, flaky, &dir).await;
        // 100 s on the only local slot: it never frees by itself, nor does the queue time out
        // (10 s) unless the first request holds the second back.
        let held = hold_stream(r.addr(), 1000).await;
        let addr = r.addr();
        let first = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_accepted(&accepted, 1).await;
        until_queued(&r, 1.0).await;
        // The provider is back. The first request stays away from it; the next one queues
        // behind it and is let by to the provider when its own spill wait is over.
        serve.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(served_by(&post(addr, chat(1, false)).await), "back");
        assert!(!first.is_finished());
        assert_eq!(engine_running(&live).await, 1.0);
        drop(held);
        assert_eq!(served_by(&first.await.unwrap()), "local");
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn requests_per_minute_budget_exhausted_means_no_more_spill() {
    bounded(async {
        let dir = TempDir::new("rpm");
        let key = dir.file("p", "sk-p");
        let p = provider("p", "sk-p", FaultConfig::default()).await;
        let yaml = format!(
            "queue: {{limit: 10, timeoutSeconds: 1}}\nburst:\n  providers:\n{}  budget: {{maxRequestsPerMinute: 2}}\n",
            provider_yaml("p", &p, &key, "")
        );
        let r = router(&yaml, vec![]).await;
        for _ in 0..2 {
            assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "p-model");
        }
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.json()["error"]["code"], "queue_timeout");
        r.stop().await;
        p.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn spend_from_stream_usage_exhausts_the_budget() {
    bounded(async {
        let dir = TempDir::new("spend");
        let key = dir.file("p", "sk-p");
        let p = provider("p", "sk-p", FaultConfig::default()).await;
        // A dollar per token: one small request spends more than the hour's budget.
        let yaml = format!(
            "queue: {{limit: 10, timeoutSeconds: 1}}\nburst:\n  providers:\n{}  budget: {{maxSpendPerHour: \"1.00\"}}\n",
            provider_yaml(
                "p",
                &p,
                &key,
                ", pricing: {inputPerMillionTokens: 1000000, outputPerMillionTokens: 1000000}"
            )
        );
        let r = router(&yaml, vec![]).await;
        let s = read_all(hold_stream(r.addr(), 3).await).await;
        assert!(s.contains("[DONE]"), "{s}");
        // The usage chunk was asked for on the client's behalf, so it does not reach the client.
        assert!(
            sse_chunks(&s).iter().all(|c| c["choices"] != json!([])),
            "{s}"
        );
        let t = wait_metrics(&r, |t| {
            sample(t, "spillway_router_provider_spend_total{provider=\"p\"}").is_some_and(|v| v > 1.0)
        })
        .await;
        assert_eq!(
            sample(&t, "spillway_router_provider_tokens_total{provider=\"p\",kind=\"completion\"}"),
            Some(3.0),
            "{t}"
        );
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
        r.stop().await;
        p.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_client_that_asks_for_stream_usage_gets_it_from_the_provider() {
    bounded(async {
        let dir = TempDir::new("usage");
        let key = dir.file("p", "sk-p");
        let p = provider("p", "sk-p", FaultConfig::default()).await;
        let yaml = format!(
            "queue: {{limit: 10, timeoutSeconds: 1}}\nburst:\n  providers:\n{}",
            provider_yaml("p", &p, &key, "")
        );
        let r = router(&yaml, vec![]).await;
        let mut body = chat(3, true);
        body["stream_options"] = json!({"include_usage": true});
        let resp = open(
            r.addr(),
            Method::POST,
            "/v1/chat/completions",
            &[],
            body.to_string().into(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let s = read_all(resp).await;
        let chunks = sse_chunks(&s);
        let last = chunks.last().expect("no chunks");
        assert_eq!(last["choices"], json!([]), "{s}");
        assert_eq!(last["usage"]["completion_tokens"], 3, "{s}");
        assert!(s.trim_end().ends_with("data: [DONE]"), "{s}");
        r.stop().await;
        p.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn the_first_chunk_reaches_the_client_before_the_upstream_finishes() {
    bounded(async {
        let local = engine(1, 10.0).await;
        let r = router("burst: {mode: Never}\n", vec![local.addr().to_string()]).await;
        let resp = hold_stream(r.addr(), 50).await;
        let mut body = resp.into_body();
        let first = loop {
            let f = body.frame().await.expect("stream ended").unwrap();
            if let Ok(d) = f.into_data() {
                break d;
            }
        };
        assert!(first.starts_with(b"data: "), "{first:?}");
        // The engine is still generating: nothing was held back until the end.
        assert_eq!(engine_running(&local).await, 1.0);
        drop(body);
        r.stop().await;
        local.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_config_reload_during_a_stream_does_not_cut_it() {
    bounded(async {
        let dir = TempDir::new("reload");
        let local = engine(2, 50.0).await;
        let backends = format!("backends: [\"{}\"]\n", local.addr());
        let path = dir.file(
            "router.yaml",
            &format!("{backends}maxConcurrencyPerBackend: 2\n"),
        );
        let r = router(&std::fs::read_to_string(&path).unwrap(), vec![]).await;
        let watch = super::sources::spawn_config_watch(
            r.state().clone(),
            path.clone(),
            vec![],
            true,
            Duration::from_millis(20),
        );
        let stream = hold_stream(r.addr(), 40).await;
        // Written while the stream runs; a different size so the change shows at once.
        std::fs::write(
            &path,
            format!(
                "{backends}maxConcurrencyPerBackend: 1\nqueue: {{limit: 5, timeoutSeconds: 7}}\n"
            ),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.state().config().queue.timeout_seconds != 7 {
            assert!(Instant::now() < deadline, "config never reloaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let text = read_all(stream).await;
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        // The role chunk, 40 tokens, the finish chunk and [DONE].
        assert_eq!(text.matches("data: ").count(), 40 + 3, "{text}");
        // An invalid file keeps the previous config.
        std::fs::write(&path, "queue: [").unwrap();
        wait_metrics(&r, |t| {
            sample(
                t,
                "spillway_router_config_reloads_total{outcome=\"invalid\"}",
            ) == Some(1.0)
        })
        .await;
        assert_eq!(r.state().config().max_concurrency_per_backend, 1);
        watch.abort();
        r.stop().await;
        local.stop().await.unwrap();
    })
    .await;
}

/// Collects formatted tracing output of the current thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// One thread, so every task's logs reach the thread-local subscriber.
#[tokio::test(flavor = "current_thread")]
async fn the_provider_key_reaches_the_provider_and_never_the_logs_or_metrics() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let secret = "sk-live-VERY-SECRET-4242";
    bounded(async {
        let dir = TempDir::new("key");
        let key = dir.file("p", &format!("{secret}\n"));
        let dead_key = dir.file("down", secret);
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let p = provider("p", secret, FaultConfig::default()).await;
        // A dead provider first, so failures get logged too.
        let yaml = format!(
            "burst:\n  providers:\n  - {{name: down, url: \"http://{dead}/v1\", model: x, apiKeyFile: \"{dead_key}\"}}\n{}",
            provider_yaml("p", &p, &key, "")
        );
        let r = router(&yaml, vec![]).await;
        // The client's own credentials must not reach the provider (it would answer 401).
        let reply = call(
            r.addr(),
            Method::POST,
            "/v1/chat/completions",
            &[("authorization", "Bearer client-token")],
            chat(2, false).to_string().into(),
        )
        .await;
        assert_eq!(served_by(&reply), "p-model");
        let s = read_all(hold_stream(r.addr(), 2).await).await;
        assert!(s.contains("[DONE]"));
        let metrics = get(r.addr(), "/metrics").await.text();
        assert!(!metrics.contains(secret));
        assert!(!format!("{:?}", r.state().config()).contains(secret));
        r.stop().await;
        p.stop().await.unwrap();
    })
    .await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("upstream failed before a response"),
        "nothing captured:\n{text}"
    );
    assert!(!text.contains(secret), "key in logs:\n{text}");
    assert!(!text.contains("VERY-SECRET"), "key in logs:\n{text}");
}

#[tokio::test]
async fn a_rotated_key_file_applies_without_a_restart() {
    bounded(async {
        let dir = TempDir::new("rotate");
        let key = dir.file("p", "sk-old");
        let p = provider("p", "sk-new", FaultConfig::default()).await;
        let yaml = format!(
            "queue: {{timeoutSeconds: 1}}\nburst:\n  providers:\n{}",
            provider_yaml("p", &p, &key, "")
        );
        let r = router(&yaml, vec![]).await;
        // Refused: it waits for an engine (none yet) rather than passing on the provider's 401.
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        std::fs::write(&key, "sk-new\n").unwrap();
        r.state().refresh_keys();
        assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "p-model");
        r.stop().await;
        p.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn an_oversized_body_is_413_whether_declared_or_streamed() {
    bounded(async {
        let local = engine(1, 200.0).await;
        let r = router_with("{}", vec![local.addr().to_string()], |o| {
            o.max_body_bytes = 1000
        })
        .await;
        let big = json!({"model": "local", "prompt": "x".repeat(2000)});
        let reply = call(
            r.addr(),
            Method::POST,
            "/v1/completions",
            &[],
            big.to_string().into(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(reply.json()["error"]["code"], "request_too_large");
        // Chunked, no Content-Length: caught while reading.
        let stream = TcpStream::connect(r.addr()).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let chunks = futures::stream::iter((0..4).map(|_| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(vec![
                b' ';
                400
            ])))
        }));
        let req = Request::post("/v1/completions")
            .header("host", "x")
            .body(http_body_util::StreamBody::new(chunks))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Small enough passes.
        let ok = call(
            r.addr(),
            Method::POST,
            "/v1/completions",
            &[],
            json!({"model": "local", "prompt": "x", "max_tokens": 1})
                .to_string()
                .into(),
        )
        .await;
        assert_eq!(served_by(&ok), "local");
        r.stop().await;
        local.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_streams() {
    bounded(async {
        let local = engine(1, 50.0).await;
        let r = router("{}", vec![local.addr().to_string()]).await;
        let addr = r.addr();
        let stream = hold_stream(addr, 25).await;
        let stopping = tokio::spawn(r.stop());
        let text = read_all(stream).await;
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        stopping.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
        local.stop().await.unwrap();
    })
    .await;
}

/// A request still waiting for a slot when the drain runs out gets a 503 to retry elsewhere,
/// not a connection closed under it.
#[tokio::test]
async fn a_request_still_queued_when_the_drain_runs_out_is_answered_503() {
    bounded(async {
        let local = engine(1, 5.0).await;
        let r = router_with(
            "maxConcurrencyPerBackend: 1\nqueue: {limit: 10, timeoutSeconds: 60}",
            vec![local.addr().to_string()],
            |o| o.drain_timeout = Duration::from_secs(1),
        )
        .await;
        let addr = r.addr();
        let _held = hold_stream(addr, 100).await;
        let queued = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_queued(&r, 1.0).await;
        r.stop().await;
        let reply = queued.await.unwrap();
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        assert_eq!(reply.json()["error"]["code"], "shutting_down");
        local.stop().await.unwrap();
    })
    .await;
}

/// At shutdown a pod still gets new connections until its Service's endpoints drop it: they
/// are served through the delay, with readiness failing from the start.
#[tokio::test]
async fn closing_fails_readiness_at_once_and_serves_new_connections_through_the_delay() {
    bounded(async {
        let local = engine(4, 1000.0).await;
        let r = router("{}", vec![local.addr().to_string()]).await;
        let (addr, shared) = (r.addr(), r.state().clone());
        let (cut, cut_rx) = tokio::sync::oneshot::channel::<()>();
        let closing = tokio::spawn(r.close(Duration::from_secs(20), async {
            let _ = cut_rx.await;
        }));
        while !shared.closing() {
            tokio::task::yield_now().await;
        }
        let ready = get(addr, "/readyz").await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ready.text(), "draining\n");
        // A new connection, after readiness failed: still served.
        assert_eq!(served_by(&post(addr, chat(1, false)).await), "local");
        assert!(!closing.is_finished(), "stopped before its delay");
        // A second signal cuts the delay short; then the listener closes.
        cut.send(()).unwrap();
        closing.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
        local.stop().await.unwrap();
    })
    .await;
}

/// In a cluster the EndpointSlices are the engines: the router starts with none and unready,
/// whatever static lists it was given, before its watch has even started.
#[tokio::test]
async fn in_a_cluster_it_starts_unready_and_without_engines() {
    bounded(async {
        let r = router_with(
            "backends: [\"127.0.0.1:9\"]",
            vec!["127.0.0.1:10".into()],
            |o| o.in_cluster = true,
        )
        .await;
        let ready = get(r.addr(), "/readyz").await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            ready.text().contains("engine endpoints"),
            "{}",
            ready.text()
        );
        assert!(r.state().backends().is_empty());
        r.stop().await;
    })
    .await;
}

#[tokio::test]
async fn models_health_and_metrics_are_answered_locally() {
    bounded(async {
        let r = router_with("{}", vec![], |o| o.model = Some("llama".into())).await;
        let m = get(r.addr(), "/v1/models").await.json();
        assert_eq!(m["data"][0]["id"], "llama");
        assert_eq!(get(r.addr(), "/healthz").await.status, StatusCode::OK);
        assert_eq!(get(r.addr(), "/readyz").await.status, StatusCode::OK);
        // In a cluster, not ready until the engine endpoints have been listed once.
        r.state().set_synced(false);
        let unready = get(r.addr(), "/readyz").await;
        assert_eq!(unready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(unready.text().contains("engine endpoints"));
        r.state().set_synced(true);
        assert_eq!(get(r.addr(), "/readyz").await.status, StatusCode::OK);
        let t = get(r.addr(), "/metrics").await.text();
        assert!(t.contains("spillway_router_queue_length 0"), "{t}");
        let nf = get(r.addr(), "/v1/embeddings").await;
        assert_eq!(nf.status, StatusCode::NOT_FOUND);
        assert!(nf.json()["error"]["message"].is_string());
        // No engine and no provider: the queue times out rather than dropping the request.
        r.stop().await;
    })
    .await;
}

#[tokio::test]
async fn serving_threads_share_one_port_and_one_routing_state() {
    bounded(async {
        let local = engine(1, 50.0).await;
        let yaml = format!(
            "listen: 127.0.0.1:0\nbackends: [\"{}\"]\nmaxConcurrencyPerBackend: 1\nqueue: {{limit: 0}}\nburst: {{mode: Never}}\n",
            local.addr()
        );
        let opts = RouterOptions {
            config: RouterConfig::from_yaml(&yaml).unwrap(),
            ..Default::default()
        };
        let r = RouterServer::start_threads(opts, 2).unwrap();
        let held = hold_stream(r.addr(), 25).await;
        // Whichever thread takes them, the engine's one slot is taken: no queue, 503 at once.
        for _ in 0..4 {
            let reply = post(r.addr(), chat(1, false)).await;
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(reply.json()["error"]["code"], "queue_full");
        }
        let stopping = tokio::spawn(r.stop());
        let text = read_all(held).await;
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        stopping.await.unwrap();
        local.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn connections_pack_onto_one_thread_then_spread_and_are_counted_out() {
    bounded(async {
        let opts = RouterOptions {
            config: RouterConfig::from_yaml("listen: 127.0.0.1:0\nburst: {mode: Never}\n").unwrap(),
            ..Default::default()
        };
        let r = RouterServer::start_threads(opts, 2).unwrap();
        let mut clients = Vec::new();
        for _ in 0..12 {
            let mut s = TcpStream::connect(r.addr()).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: r\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while !got.ends_with(b"ok\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(
                    n > 0,
                    "closed before an answer: {:?}",
                    String::from_utf8_lossy(&got)
                );
                got.extend_from_slice(&buf[..n]);
            }
            assert!(
                got.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&got)
            );
            clients.push(s);
        }
        // Every connection answered; the first thread holds its 8, the second the rest.
        assert_eq!(r.connections(), vec![8, 4]);
        drop(clients);
        while r.connections() != vec![0, 0] {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        r.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_hung_engine_gets_a_504_and_frees_its_slot() {
    bounded(async {
        // Accepts connections, reads, never answers (a wedged GPU process).
        let hung = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = hung.local_addr().unwrap();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..4 {
                let Ok((s, _)) = hung.accept().await else {
                    return;
                };
                held.push(s);
            }
            std::future::pending::<()>().await;
        });
        let r = router_with(
            "maxConcurrencyPerBackend: 1\nburst: {mode: Never}\n",
            vec![addr.to_string()],
            |o| o.engine_timeout = std::time::Duration::from_millis(300),
        )
        .await;
        for _ in 0..2 {
            // The second request gets the slot the first one freed, then times out too.
            let reply = post(r.addr(), chat(4, false)).await;
            assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
            assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
        }
        holder.abort();
        r.stop().await;
    })
    .await;
}

/// A provider that answers one request with `reply` as written, then waits for the close.
/// Also the config for it, and the directory holding its key.
async fn one_shot_provider(reply: String) -> (String, tokio::task::JoinHandle<()>, TempDir) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 8192];
        let _ = s.read(&mut buf).await;
        s.write_all(reply.as_bytes()).await.unwrap();
        let _ = s.read(&mut buf).await;
    });
    let dir = TempDir::new("one-shot");
    let key = dir.file("p", "sk-p");
    let yaml = format!(
        "burst:\n  providers:\n  - {{name: p, url: \"http://{addr}/v1\", model: p-model, apiKeyFile: \"{key}\"}}\n"
    );
    (yaml, task, dir)
}

const KEPT_EVENT: &str = "data: {\"choices\":[{\"index\":0,\"text\":\"a\"}]}\n\n";
const USAGE_EVENT: &str =
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n";

#[tokio::test]
async fn a_sized_provider_stream_loses_its_usage_chunk_and_its_length_but_nothing_else() {
    bounded(async {
        // A sized SSE answer whose last line has no newline.
        let body = format!("{KEPT_EVENT}{USAGE_EVENT}data: [DONE]");
        let (yaml, server, _dir) = one_shot_provider(format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
        let r = router(&yaml, vec![]).await;
        let resp = hold_stream(r.addr(), 1).await;
        assert!(resp.headers().get(header::CONTENT_LENGTH).is_none());
        assert_eq!(read_all(resp).await, format!("{KEPT_EVENT}data: [DONE]"));
        wait_metrics(&r, |t| {
            sample(t, "spillway_router_provider_tokens_total{provider=\"p\",kind=\"prompt\"}")
                == Some(2.0)
        })
        .await;
        server.abort();
        r.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_last_line_the_usage_filter_held_is_not_lost_to_trailers() {
    bounded(async {
        let body = format!("{KEPT_EVENT}{USAGE_EVENT}data: [DONE]");
        let (yaml, server, _dir) = one_shot_provider(format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\
             trailer: x-end\r\n\r\n{:x}\r\n{body}\r\n0\r\nx-end: yes\r\n\r\n",
            body.len()
        ))
        .await;
        let r = router(&yaml, vec![]).await;
        let resp = open(
            r.addr(),
            Method::POST,
            "/v1/chat/completions",
            &[("te", "trailers")],
            chat(1, true).to_string().into(),
        )
        .await;
        // Trailers are hop-by-hop here (not declared to the client), but must not cost data.
        assert_eq!(read_all(resp).await, format!("{KEPT_EVENT}data: [DONE]"));
        // And the answer counts as complete, not as one the client walked away from.
        wait_metrics(&r, |t| {
            t.contains("spillway_router_requests_total{destination=\"p\",outcome=\"success\"} 1")
        })
        .await;
        server.abort();
        r.stop().await;
    })
    .await;
}

/// A hung engine that stops mid-answer must not hold its client and slot forever.
#[tokio::test]
async fn an_engine_that_stalls_mid_answer_is_cut_off_after_the_engine_timeout() {
    bounded(async {
        let (addr, holder) = stalling_upstream().await;
        let r = router_with("maxConcurrencyPerBackend: 1", vec![addr.to_string()], |o| {
            o.engine_timeout = Duration::from_secs(1)
        })
        .await;
        let started = Instant::now();
        let mut body = hold_stream(r.addr(), 5).await.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "data: {}\n\n");
        assert!(
            body.collect().await.is_err(),
            "a stalled answer ended as if complete"
        );
        assert!(started.elapsed() >= Duration::from_secs(1), "cut off early");
        let m = wait_metrics(&r, |t| {
            t.contains(
                "spillway_router_requests_total{destination=\"local\",outcome=\"aborted\"} 1",
            )
        })
        .await;
        assert!(
            m.contains("spillway_router_in_flight{destination=\"local\"} 0"),
            "{m}"
        );
        holder.abort();
        r.stop().await;
    })
    .await;
}

/// Answers every request with a head and one event, then nothing, holding the connection open.
async fn stalling_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 8192];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                      transfer-encoding: chunked\r\n\r\na\r\ndata: {}\n\n\r\n",
                )
                .await;
            held.push(s);
        }
    });
    (addr, holder)
}

#[tokio::test]
async fn a_provider_that_stalls_mid_answer_is_cut_off_after_its_timeout() {
    bounded(async {
        let (addr, holder) = stalling_upstream().await;
        let dir = TempDir::new("stall");
        let key = dir.file("p", "sk-p");
        let yaml = format!(
            "burst:\n  providers:\n  - {{name: p, url: \"http://{addr}/v1\", model: p-model, apiKeyFile: \"{key}\", maxConcurrency: 1, timeoutSeconds: 1}}\n"
        );
        let r = router_with_breaker(&yaml, 2, Duration::from_secs(60)).await;
        for _ in 0..2 {
            // The second request finds the provider's only slot free again.
            let started = Instant::now();
            let mut body = hold_stream(r.addr(), 5).await.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(first, "data: {}\n\n");
            // Cut off, not ended cleanly: the client must not take it for a whole answer.
            let rest = body.collect().await;
            assert!(rest.is_err(), "a stalled answer ended as if complete");
            assert!(started.elapsed() >= Duration::from_secs(1), "cut off early");
        }
        let m = wait_metrics(&r, |t| {
            t.contains("spillway_router_requests_total{destination=\"p\",outcome=\"aborted\"} 2")
        })
        .await;
        assert!(m.contains("spillway_router_in_flight{destination=\"p\"} 0"), "{m}");
        // A 200 that never finishes is a failure for the breaker, not a success.
        assert_eq!(
            sample(&m, "spillway_router_provider_breaker_open{provider=\"p\"}"),
            Some(1.0),
            "{m}"
        );
        holder.abort();
        r.stop().await;
    })
    .await;
}
