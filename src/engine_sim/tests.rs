//! engine-sim over real sockets on 127.0.0.1: every server binds port 0, every test is bounded
//! in time, and servers are stopped at the end. Timings are only asserted as orderings with
//! wide margins.

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

#[tokio::test]
async fn queueing_is_visible_in_metrics_while_requests_wait() {
    bounded(async {
        let cfg = EngineSimConfig {
            max_concurrency: 2,
            tokens_per_second: 20.0,
            kv_capacity_tokens: 1000,
            ..fast()
        };
        let srv = EngineSimServer::start(cfg).await.unwrap();
        let addr = srv.addr();
        let t = metrics_text(addr).await;
        assert_eq!((sample(&t, WAITING), sample(&t, RUNNING)), (0.0, 0.0));

        // Five requests of 10 tokens at 20/s: two run for ~0.5 s while three wait.
        let reqs: Vec<_> = (0..5)
            .map(|_| {
                tokio::spawn(async move {
                    post_json(addr, "/v1/chat/completions", chat(10, false)).await
                })
            })
            .collect();
        let t = wait_for_metrics(addr, "3 waiting, 2 running", |t| {
            sample(t, WAITING) == 3.0 && sample(t, RUNNING) == 2.0
        })
        .await;
        // Two running sequences of 2 prompt tokens each, plus whatever they generated.
        assert!(sample(&t, "vllm:gpu_cache_usage_perc{") >= 0.0039, "{t}");
        for r in reqs {
            assert_eq!(r.await.unwrap().status, StatusCode::OK);
        }
        let t = metrics_text(addr).await;
        assert_eq!((sample(&t, WAITING), sample(&t, RUNNING)), (0.0, 0.0));
        assert_eq!(sample(&t, "vllm:gpu_cache_usage_perc{"), 0.0);
        assert_eq!(
            sample(&t, "engine_sim_requests_total{outcome=\"success\"}"),
            5.0
        );
        assert_eq!(sample(&t, "engine_sim_generation_tokens_total"), 50.0);
        assert_eq!(sample(&t, "engine_sim_prompt_tokens_total"), 10.0);
        srv.stop().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn concurrency_limit_is_exact() {
    bounded(async {
        const LIMIT: usize = 3;
        // A 100 ms prefill separates one sequence's last token from the next one's first chunk,
        // so client-side jitter cannot fake an overlap.
        let cfg = EngineSimConfig {
            max_concurrency: LIMIT,
            prefill: Duration::from_millis(100),
            tokens_per_second: 40.0,
            ..fast()
        };
        let srv = EngineSimServer::start(cfg).await.unwrap();
        let addr = srv.addr();
        let reqs: Vec<_> = (0..12)
            .map(|_| {
                tokio::spawn(async move {
                    let resp = try_open(
                        addr,
                        Method::POST,
                        "/v1/chat/completions",
                        &[],
                        Some(chat(6, true)),
                    )
                    .await
                    .unwrap();
                    let events = read_sse(resp).await;
                    // Running from the role chunk (end of prefill) to the last token.
                    let first = events[0].0;
                    let last = content_events(&events).last().unwrap().0;
                    (first, last)
                })
            })
            .collect();
        let mut edges = Vec::new();
        for r in reqs {
            let (a, b) = r.await.unwrap();
            edges.push((a, 1i32));
            edges.push((b, -1i32));
        }
        // Ends sort before starts at equal times.
        edges.sort();
        let (mut now, mut peak) = (0, 0);
        for (_, d) in edges {
            now += d;
            peak = peak.max(now);
        }
        assert_eq!(peak, LIMIT as i32, "measured peak concurrency");
        srv.stop().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn streamed_chunks_arrive_incrementally_with_usage_last() {
    bounded(async {
        let cfg = EngineSimConfig {
            tokens_per_second: 20.0,
            ..fast()
        };
        let srv = EngineSimServer::start(cfg).await.unwrap();
        let sent = Instant::now();
        let resp = try_open(
            srv.addr(),
            Method::POST,
            "/v1/chat/completions",
            &[],
            Some(
                json!({"model": "m1", "messages": [{"role": "user", "content": "abcdefgh"}],
                "max_tokens": 10, "stream": true, "stream_options": {"include_usage": true}}),
            ),
        )
        .await
        .unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let events = read_sse(resp).await;
        let content = content_events(&events);
        assert_eq!(content.len(), 10);
        let (first, last) = (content[0].0, content[9].0);
        // 10 tokens at 20/s: the first comes ~50 ms in, the last ~500 ms in.
        assert!(
            first - sent < (last - sent) / 2,
            "first {:?}, last {:?}",
            first - sent,
            last - sent
        );
        assert!(
            last - first >= Duration::from_millis(200),
            "tokens arrived in a burst"
        );

        let role: Value = serde_json::from_str(&events[0].1).unwrap();
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        let n = events.len();
        assert_eq!(events[n - 1].1, "[DONE]");
        let usage: Value = serde_json::from_str(&events[n - 2].1).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 2, "completion_tokens": 10, "total_tokens": 12})
        );
        let finish: Value = serde_json::from_str(&events[n - 3].1).unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        srv.stop().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn usage_counts_prompt_chars_and_capped_output() {
    bounded(async {
        let cfg = EngineSimConfig {
            max_output_tokens: 7,
            ..fast()
        };
        let srv = EngineSimServer::start(cfg).await.unwrap();
        let addr = srv.addr();

        // 12 characters of content: 3 prompt tokens.
        let body = json!({"model": "m1", "max_tokens": 5, "messages": [
            {"role": "system", "content": "abcdefgh"},
            {"role": "user", "content": [{"type": "text", "text": "ijkl"}]},
        ]});
        let r = post_json(addr, "/v1/chat/completions", body).await;
        assert_eq!(r.status, StatusCode::OK);
        let v = r.json();
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
        );
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .split(' ')
                .count(),
            5
        );

        // No max_tokens: the default (4) and a natural stop.
        let r = post_json(
            addr,
            "/v1/completions",
            json!({"model": "m1", "prompt": "abcde"}),
        )
        .await;
        let v = r.json();
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6})
        );
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");

        // Above --max-output-tokens: capped.
        let r = post_json(
            addr,
            "/v1/completions",
            json!({"prompt": "abcd", "max_tokens": 100}),
        )
        .await;
        let v = r.json();
        assert_eq!(v["usage"]["completion_tokens"], 7);
        assert_eq!(
            v["choices"][0]["text"].as_str().unwrap().split(' ').count(),
            7
        );
        assert_eq!(v["choices"][0]["finish_reason"], "length");

        // Streaming completions carry usage last too, when asked for.
        let stream = |include_usage: bool| async move {
            let body = json!({"prompt": "abcd", "max_tokens": 3, "stream": true,
                "stream_options": {"include_usage": include_usage}});
            let resp = try_open(addr, Method::POST, "/v1/completions", &[], Some(body));
            read_sse(resp.await.unwrap()).await
        };
        let events = stream(true).await;
        let usage: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4})
        );
        // Not asked for: the finish chunk comes last, and no chunk without choices.
        let events = stream(false).await;
        assert_eq!(events[events.len() - 1].1, "[DONE]");
        for (_, e) in &events[..events.len() - 1] {
            let v: Value = serde_json::from_str(e).unwrap();
            assert_eq!(v["choices"].as_array().map(Vec::len), Some(1), "{e}");
        }
        let last: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");

        let t = metrics_text(addr).await;
        assert_eq!(sample(&t, "vllm:prompt_tokens_total{"), 8.0);
        assert_eq!(sample(&t, "vllm:generation_tokens_total{"), 22.0);
        srv.stop().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn api_key_is_required_and_never_echoed() {
    bounded(async {
        const KEY: &str = "sk-sim-4b1d";
        let cfg = EngineSimConfig {
            api_key: Some(ApiKey::new(KEY)),
            ..fast()
        };
        let srv = EngineSimServer::start(cfg).await.unwrap();
        let addr = srv.addr();
        let good = format!("Bearer {KEY}");
        let chat_path = "/v1/chat/completions";

        let r = try_call(addr, Method::POST, chat_path, &[], Some(chat(1, false)))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        assert!(r.json()["error"]["message"].is_string());

        let r = try_call(
            addr,
            Method::POST,
            chat_path,
            &[("authorization", "Bearer sk-wrong")],
            Some(chat(1, false)),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(!r.text().contains("sk-wrong") && !r.text().contains(KEY));
        // Not a bearer token.
        let r = try_call(
            addr,
            Method::POST,
            chat_path,
            &[("authorization", KEY)],
            Some(chat(1, false)),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);

        let r = try_call(
            addr,
            Method::POST,
            chat_path,
            &[("authorization", &good)],
            Some(chat(1, false)),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::OK);

        assert_eq!(
            get(addr, "/v1/models").await.status,
            StatusCode::UNAUTHORIZED
        );
        let r = try_call(
            addr,
            Method::GET,
            "/v1/models",
            &[("authorization", &good)],
            None,
        )
        .await
        .unwrap();
        assert_eq!(r.json()["data"][0]["id"], "m1");

        // Probes and scrapes need no key, and the key is not in the metrics.
        assert_eq!(get(addr, "/health").await.status, StatusCode::OK);
        let t = metrics_text(addr).await;
        assert!(!t.contains(KEY));
        assert_eq!(
            sample(&t, "engine_sim_requests_total{outcome=\"unauthorized\"}"),
            3.0
        );
        srv.stop().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn other_models_get_404_and_unknown_routes_get_openai_errors() {
    bounded(async {
        let srv = EngineSimServer::start(fast()).await.unwrap();
        let addr = srv.addr();
        let r = post_json(addr, "/v1/chat/completions", json!({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]})).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json()["error"]["code"], "model_not_found");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");

        let r = post_json(addr, "/v1/chat/completions", chat(1, false)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["model"], "m1");

        let r = get(addr, "/v1/models").await;
        assert_eq!(r.json()["data"], json!([{"id": "m1", "object": "model", "created": 0, "owned_by": "spillway-engine-sim"}]));

        let r = get(addr, "/v2/nothing").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(r.json()["error"]["message"].is_string());
        assert_eq!(get(addr, "/v1/chat/completions").await.status, StatusCode::METHOD_NOT_ALLOWED);

        let r = try_call(addr, Method::POST, "/v1/chat/completions", &[], None).await.unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        let r = post_json(addr, "/v1/chat/completions", chat(0, false)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        srv.stop().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    bounded(async {
        let cfg = EngineSimConfig {
            max_body_bytes: 1024,
            ..fast()
        };
        let srv = EngineSimServer::start(cfg).await.unwrap();
        let big =
            json!({"model": "m1", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
        let r = post_json(srv.addr(), "/v1/chat/completions", big).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(r.json()["error"]["code"], "request_too_large");
        assert_eq!(
            post_json(srv.addr(), "/v1/chat/completions", chat(1, false))
                .await
                .status,
            StatusCode::OK
        );
        srv.stop().await.unwrap();
    })
    .await
}

/// Statuses of `n` sequential requests to a fresh server; `None` for no response.
async fn statuses(cfg: EngineSimConfig, n: usize) -> (Vec<Option<Reply>>, String) {
    let srv = EngineSimServer::start(cfg).await.unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            try_call(
                srv.addr(),
                Method::POST,
                "/v1/chat/completions",
                &[],
                Some(chat(1, false)),
            )
            .await
            .ok(),
        );
    }
    let t = metrics_text(srv.addr()).await;
    srv.stop().await.unwrap();
    (out, t)
}

#[tokio::test]
async fn injected_failures_hold_their_rate_and_repeat_per_seed() {
    bounded(async {
        let cfg = EngineSimConfig {
            seed: 42,
            faults: FaultConfig {
                fail_rate: 0.3,
                fail_status: 429,
                ..Default::default()
            },
            ..fast()
        };
        let (a, metrics) = statuses(cfg.clone(), 200).await;
        let failed: Vec<_> = a
            .iter()
            .flatten()
            .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
            .collect();
        let ok = a
            .iter()
            .flatten()
            .filter(|r| r.status == StatusCode::OK)
            .count();
        assert_eq!(failed.len() + ok, 200);
        let rate = failed.len() as f64 / 200.0;
        assert!((0.2..=0.4).contains(&rate), "fail rate {rate}");
        assert_eq!(failed[0].headers["retry-after"], "1");
        assert_eq!(failed[0].json()["error"]["type"], "rate_limit_error");
        assert_eq!(
            sample(&metrics, "engine_sim_requests_total{outcome=\"failed\"}"),
            failed.len() as f64
        );

        // Same seed, same sequence; another seed, another.
        let pattern = |v: &[Option<Reply>]| {
            v.iter()
                .map(|r| r.as_ref().map(|r| r.status))
                .collect::<Vec<_>>()
        };
        let (b, _) = statuses(cfg.clone(), 200).await;
        assert_eq!(pattern(&a), pattern(&b));
        let (c, _) = statuses(EngineSimConfig { seed: 43, ..cfg }, 200).await;
        assert_ne!(pattern(&a), pattern(&c));
    })
    .await
}

#[tokio::test]
async fn dropped_connections_get_no_response_at_the_configured_rate() {
    bounded(async {
        let cfg = EngineSimConfig {
            seed: 7,
            faults: FaultConfig {
                drop_rate: 0.25,
                ..Default::default()
            },
            ..fast()
        };
        let (a, metrics) = statuses(cfg, 200).await;
        let dropped = a.iter().filter(|r| r.is_none()).count();
        let rate = dropped as f64 / 200.0;
        assert!((0.15..=0.35).contains(&rate), "drop rate {rate}");
        assert!(a.iter().flatten().all(|r| r.status == StatusCode::OK));
        assert_eq!(
            sample(&metrics, "engine_sim_requests_total{outcome=\"dropped\"}"),
            dropped as f64
        );
    })
    .await
}

#[tokio::test]
async fn extra_latency_delays_responses() {
    bounded(async {
        let cfg = EngineSimConfig {
            faults: FaultConfig {
                latency: Duration::from_millis(300),
                ..Default::default()
            },
            ..fast()
        };
        let srv = EngineSimServer::start(cfg).await.unwrap();
        let t0 = Instant::now();
        assert_eq!(
            post_json(srv.addr(), "/v1/chat/completions", chat(1, false))
                .await
                .status,
            StatusCode::OK
        );
        assert!(t0.elapsed() >= Duration::from_millis(300));
        srv.stop().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn full_queue_answers_503() {
    bounded(async {
        let cfg = EngineSimConfig {
            max_concurrency: 1,
            max_queue: 2,
            tokens_per_second: 20.0,
            ..fast()
        };
        let srv = EngineSimServer::start(cfg).await.unwrap();
        let addr = srv.addr();
        let reqs: Vec<_> = (0..3)
            .map(|_| {
                tokio::spawn(async move {
                    post_json(addr, "/v1/chat/completions", chat(10, false)).await
                })
            })
            .collect();
        wait_for_metrics(addr, "1 running, 2 waiting", |t| {
            sample(t, RUNNING) == 1.0 && sample(t, WAITING) == 2.0
        })
        .await;
        let r = post_json(addr, "/v1/chat/completions", chat(10, false)).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.json()["error"]["code"], "queue_full");
        assert_eq!(r.headers["retry-after"], "1");
        for r in reqs {
            assert_eq!(r.await.unwrap().status, StatusCode::OK);
        }
        let t = metrics_text(addr).await;
        assert_eq!(
            sample(&t, "engine_sim_requests_total{outcome=\"rejected\"}"),
            1.0
        );
        assert_eq!(
            sample(&t, "engine_sim_requests_total{outcome=\"success\"}"),
            3.0
        );
        srv.stop().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn client_going_away_frees_its_slot() {
    bounded(async {
        let cfg = EngineSimConfig {
            max_concurrency: 1,
            tokens_per_second: 10.0,
            ..fast()
        };
        let srv = EngineSimServer::start(cfg).await.unwrap();
        let addr = srv.addr();
        // 100 tokens at 10/s would hold the only slot for 10 s.
        let resp = try_open(
            addr,
            Method::POST,
            "/v1/chat/completions",
            &[],
            Some(chat(100, true)),
        )
        .await
        .unwrap();
        let mut body = resp.into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        let t = wait_for_metrics(addr, "slot released", |t| sample(t, RUNNING) == 0.0).await;
        assert_eq!(
            sample(&t, "engine_sim_requests_total{outcome=\"cancelled\"}"),
            1.0
        );
        let t0 = Instant::now();
        assert_eq!(
            post_json(addr, "/v1/chat/completions", chat(1, false))
                .await
                .status,
            StatusCode::OK
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
        srv.stop().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn shutdown_finishes_running_and_queued_requests_then_refuses_connections() {
    bounded(async {
        let cfg = EngineSimConfig {
            max_concurrency: 1,
            tokens_per_second: 20.0,
            ..fast()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(cfg, listener, async move {
            let _ = stop_rx.await;
        }));

        let running = try_open(
            addr,
            Method::POST,
            "/v1/chat/completions",
            &[],
            Some(chat(8, true)),
        )
        .await
        .unwrap();
        let queued =
            tokio::spawn(
                async move { post_json(addr, "/v1/chat/completions", chat(8, false)).await },
            );
        wait_for_metrics(addr, "one waiting", |t| sample(t, WAITING) == 1.0).await;
        stop_tx.send(()).unwrap();

        let events = read_sse(running).await;
        assert_eq!(content_events(&events).len(), 8);
        assert_eq!(events.last().unwrap().1, "[DONE]");
        let q = queued.await.unwrap();
        assert_eq!(q.status, StatusCode::OK);
        assert_eq!(q.json()["usage"]["completion_tokens"], 8);
        server.await.unwrap().unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after shutdown"
        );
    })
    .await
}

#[tokio::test]
async fn every_preset_serves_its_metric_names() {
    bounded(async {
        use crate::api::MetricsPreset;
        for (preset, names) in [
            (
                MetricsPreset::Vllm,
                &[
                    "vllm:num_requests_waiting{model_name=\"m1\"}",
                    "vllm:num_requests_running{model_name=\"m1\"}",
                    "vllm:gpu_cache_usage_perc{model_name=\"m1\"}",
                    "vllm:kv_cache_usage_perc{model_name=\"m1\"}",
                ][..],
            ),
            (
                MetricsPreset::Sglang,
                &[
                    "sglang:num_queue_reqs{",
                    "sglang:num_running_reqs{",
                    "sglang:token_usage{",
                ][..],
            ),
            (
                MetricsPreset::Tgi,
                &["tgi_queue_size ", "tgi_batch_current_size "][..],
            ),
            (
                MetricsPreset::Triton,
                &[
                    "nv_inference_pending_request_count{",
                    "nv_gpu_memory_used_bytes{",
                    "nv_gpu_memory_total_bytes{",
                ][..],
            ),
        ] {
            let srv = EngineSimServer::start(EngineSimConfig { preset, ..fast() })
                .await
                .unwrap();
            let r = get(srv.addr(), "/metrics").await;
            assert!(
                r.headers["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("application/openmetrics-text")
            );
            let t = r.text();
            for name in names {
                assert_eq!(
                    sample(&t, name),
                    if name.starts_with("nv_gpu_memory_total") {
                        80.0 * (1u64 << 30) as f64
                    } else {
                        0.0
                    },
                    "{name}"
                );
            }
            srv.stop().await.unwrap();
        }
    })
    .await
}

#[tokio::test]
async fn same_seed_gives_same_text() {
    bounded(async {
        let mut texts = Vec::new();
        for seed in [1, 1, 2] {
            let srv = EngineSimServer::start(EngineSimConfig { seed, ..fast() })
                .await
                .unwrap();
            let r = post_json(srv.addr(), "/v1/chat/completions", chat(8, false)).await;
            texts.push(
                r.json()["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
            srv.stop().await.unwrap();
        }
        assert_eq!(texts[0], texts[1]);
        assert_ne!(texts[0], texts[2]);
    })
    .await
}
