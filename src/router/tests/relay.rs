//! Answers relayed: streams, the usage filter, stalls and timeouts.

use super::*;

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
        let resp = open(r.addr(), Method::POST, "/v1/chat/completions", &[], body).await;
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
        "burst:\n  providers:\n  - {{name: p, url: \"http://{addr}/v1\", model: p-model, apiKeyFile: \"{key}\", exposeModel: true}}\n"
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
            chat(1, true),
        )
        .await;
        // Trailers are hop-by-hop here (not declared to the client), but must not cost data.
        assert_eq!(read_all(resp).await, format!("{KEPT_EVENT}data: [DONE]"));
        // And the answer counts as complete, not as one the client walked away from.
        wait_metrics(&r, |t| {
            t.contains("spillway_router_requests_total{destination=\"p\",class=\"default\",outcome=\"success\"} 1")
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
                "spillway_router_requests_total{destination=\"local\",class=\"default\",outcome=\"aborted\"} 1",
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
            "burst:\n  providers:\n  - {{name: p, url: \"http://{addr}/v1\", model: p-model, apiKeyFile: \"{key}\", exposeModel: true, maxConcurrency: 1, timeoutSeconds: 1}}\n"
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
            t.contains("spillway_router_requests_total{destination=\"p\",class=\"default\",outcome=\"aborted\"} 2")
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

/// The latency objective's input: streamed answers from local engines, timed from arrival to
/// the first byte; a non-streamed answer (whose first byte is its last token) is left out.
#[tokio::test]
async fn time_to_first_token_counts_local_streams_only() {
    bounded(async {
        let local = EngineSimServer::start(EngineSimConfig {
            model: "local".into(),
            max_concurrency: 4,
            prefill: Duration::from_millis(300),
            tokens_per_second: 1000.0,
            ..Default::default()
        })
        .await
        .unwrap();
        let r = router("burst: {mode: Never}\n", vec![local.addr().to_string()]).await;
        let streamed = read_all(hold_stream(r.addr(), 2).await).await;
        assert!(streamed.contains("data: [DONE]"), "{streamed}");
        assert_eq!(post(r.addr(), chat(2, false)).await.status, StatusCode::OK);
        let t = wait_metrics(&r, |t| {
            sample(
                t,
                "spillway_router_request_duration_seconds_count{destination=\"local\"}",
            ) == Some(2.0)
        })
        .await;
        let ttft = "spillway_router_time_to_first_token_seconds";
        assert_eq!(
            sample(&t, &format!("{ttft}_count{{destination=\"local\"}}")),
            Some(1.0),
            "{t}"
        );
        // The autoscaler reads it: one answer, slower than the engine's prefill.
        let read = crate::autoscale::signals::router_sample(&t)
            .unwrap()
            .unwrap();
        let b = read.local_ttft.expect("local histogram");
        assert_eq!(b.count(), 1.0);
        assert!(b.quantile(1.0).unwrap() >= 0.3, "{t}");
        r.stop().await;
        local.stop().await.unwrap();
    })
    .await;
}
