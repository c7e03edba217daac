//! Completions: streaming and usage.

use super::*;

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
