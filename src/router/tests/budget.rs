//! The burst budget: requests per minute and spend per hour.

use super::*;

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
