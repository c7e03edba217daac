//! Every inference endpoint through the router: served by the engine, spilled to a provider
//! that declares it (with the client's model name in the answer), or kept on the engines.

use super::*;

/// A router in front of one engine of one slot (model `local`) and provider `burst`, which
/// declares `endpoints` and writes no `exposeModel`; its key file lives in the returned dir.
async fn setup(endpoints: &str) -> (RouterServer, EngineSimServer, EngineSimServer, TempDir) {
    let keys = TempDir::new("endpoints");
    let key = keys.file("key", "k1");
    let e = engine(1, 20.0).await;
    let p = provider("burst", "k1", FaultConfig::default()).await;
    let yaml = format!(
        "maxConcurrencyPerBackend: 1\nqueue: {{limit: 10, timeoutSeconds: 20}}\nburst:\n  providers:\n  - {{name: burst, url: \"{}/v1\", model: burst-model, apiKeyFile: \"{key}\", endpoints: [{endpoints}], pricing: {{inputPerMillionTokens: 1000, outputPerMillionTokens: 1000}}}}\n",
        p.base_url()
    );
    let r = router(&yaml, vec![e.addr().to_string()]).await;
    (r, e, p, keys)
}

async fn stop(r: RouterServer, e: EngineSimServer, p: EngineSimServer) {
    r.stop().await;
    e.stop().await.unwrap();
    p.stop().await.unwrap();
}

/// Requests that succeeded at `destination`.
fn served(t: &str, destination: &str) -> f64 {
    requests(t, destination, Some("success"))
}

async fn embed(r: &RouterServer) -> Reply {
    post_json(
        r.addr(),
        "/v1/embeddings",
        json!({"model": "local", "input": ["hello", "world"]}),
    )
    .await
}

#[tokio::test]
async fn embeddings_and_chat_run_locally_then_spill_with_the_clients_model_name() {
    bounded(async {
        let (r, e, p, _keys) = setup("chat, completions, embeddings").await;
        let local = embed(&r).await;
        assert_eq!(local.status, StatusCode::OK, "{}", local.text());
        assert_eq!(local.json()["data"].as_array().unwrap().len(), 2);
        assert_eq!(
            served(
                &wait_metrics(&r, |t| served(t, "local") == 1.0).await,
                "burst"
            ),
            0.0
        );

        // The engine's one slot held: embeddings and chat spill, and answer as `local`.
        let held = hold_stream(r.addr(), 400).await;
        let spilled = embed(&r).await;
        assert_eq!(spilled.status, StatusCode::OK, "{}", spilled.text());
        assert_eq!(spilled.json()["model"], "local");
        assert_eq!(spilled.json()["data"].as_array().unwrap().len(), 2);
        let whole = post(r.addr(), chat(3, false)).await;
        assert_eq!(whole.json()["model"], "local", "{}", whole.text());
        let s = read_all(hold_stream(r.addr(), 5).await).await;
        let chunks = sse_chunks(&s);
        assert!(chunks.len() >= 5, "{s}");
        assert!(chunks.iter().all(|c| c["model"] == "local"), "{s}");
        assert!(!s.contains("burst-model"), "{s}");
        // All three went to the provider, and the embeddings' usage counts in the spend.
        let t = wait_metrics(&r, |t| served(t, "burst") == 3.0).await;
        assert!(
            sample(
                &t,
                "spillway_router_provider_tokens_total{provider=\"burst\",kind=\"prompt\"}"
            )
            .unwrap_or(0.0)
                >= 2.0,
            "{t}"
        );
        drop(held);
        stop(r, e, p).await;
    })
    .await;
}

/// A provider that does not declare embeddings never gets them: under saturation they wait for
/// the engine while chat spills.
#[tokio::test]
async fn an_endpoint_the_provider_does_not_declare_waits_for_the_engine() {
    bounded(async {
        let (r, e, p, _keys) = setup("chat").await;
        let held = hold_stream(r.addr(), 400).await;
        let addr = r.addr();
        let waiting = tokio::spawn(async move {
            post_json(
                addr,
                "/v1/embeddings",
                json!({"model": "local", "input": "x"}),
            )
            .await
        });
        until_queued(&r, 1.0).await;
        assert_eq!(post(r.addr(), chat(2, false)).await.status, StatusCode::OK);
        assert_eq!(served(&router_text(&r).await, "burst"), 1.0);
        drop(held);
        let reply = waiting.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        // The held stream ended as cancelled; the embeddings request succeeded locally.
        wait_metrics(&r, |t| served(t, "local") == 1.0).await;
        stop(r, e, p).await;
    })
    .await;
}

/// A Responses request that keeps state on the server (here `previous_response_id`) is served
/// by the engine, whatever the wait; a stateless one spills, and is not stored there.
#[tokio::test]
async fn a_stateful_responses_request_stays_local_under_saturation() {
    bounded(async {
        let (r, e, p, _keys) = setup("chat, responses").await;
        let held = hold_stream(r.addr(), 400).await;
        let stateless = post_json(
            r.addr(),
            "/v1/responses",
            json!({"model": "local", "input": "hi", "max_output_tokens": 2}),
        )
        .await;
        assert_eq!(stateless.status, StatusCode::OK, "{}", stateless.text());
        assert_eq!(stateless.json()["model"], "local");
        assert_eq!(stateless.json()["object"], "response");
        assert_eq!(served(&router_text(&r).await, "burst"), 1.0);
        let addr = r.addr();
        let stateful = tokio::spawn(async move {
            let body = json!({"model": "local", "input": "and then?", "max_output_tokens": 2,
                "previous_response_id": "resp-sim-1"});
            post_json(addr, "/v1/responses", body).await
        });
        until_queued(&r, 1.0).await;
        drop(held);
        let reply = stateful.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let t = wait_metrics(&r, |t| served(t, "local") == 1.0).await;
        assert_eq!(served(&t, "burst"), 1.0);
        stop(r, e, p).await;
    })
    .await;
}

/// An audio upload as the OpenAI SDK sends it (multipart), and the engine's tokenizer routes:
/// forwarded whole to the engine.
#[tokio::test]
async fn a_multipart_upload_and_the_tokenizer_go_to_the_engine() {
    bounded(async {
        let (r, e, p, _keys) = setup("chat").await;
        let boundary = "0b8e5fa2d3c94e4f9a7c1d2e3f4a5b6c";
        let audio: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"clip.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(&audio);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let ct = format!("multipart/form-data; boundary={boundary}");
        let reply = call(
            r.addr(),
            Method::POST,
            "/v1/audio/transcriptions",
            &[("content-type", ct.as_str())],
            Bytes::from(body),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(
            reply.json()["text"],
            "engine-sim heard 3000 bytes for whisper-1"
        );
        let tokens = post_json(r.addr(), "/tokenize", json!({"model": "local", "prompt": "abcdefgh"})).await;
        assert_eq!(tokens.json()["count"], 2, "{}", tokens.text());
        let text = post_json(r.addr(), "/detokenize", json!({"model": "local", "tokens": [1, 2]})).await;
        assert_eq!(text.json()["prompt"], "tok tok");
        let t = wait_metrics(&r, |t| served(t, "local") == 3.0).await;
        assert_eq!(served(&t, "burst"), 0.0);
        stop(r, e, p).await;
    })
    .await;
}

async fn router_text(r: &RouterServer) -> String {
    get(r.addr(), "/metrics").await.text()
}
