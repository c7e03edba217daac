//! The queue: FIFO, its limit and its timeout.

use super::*;

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
