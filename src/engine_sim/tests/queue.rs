//! Concurrency slots and the queue.

use super::*;

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
