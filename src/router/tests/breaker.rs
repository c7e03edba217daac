//! Provider circuit breakers.

use super::*;

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
                "spillway_router_requests_total{destination=\"a\",class=\"default\",outcome=\"upstream_error\"}"
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
                "queue: {{timeoutSeconds: 1}}\nburst:\n  providers:\n  - {{name: p, url: \"{url}\", model: p-model, apiKeyFile: \"{key}\", exposeModel: true, maxConcurrency: 8}}\n"
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
            t.contains("spillway_router_requests_total{destination=\"p\",class=\"default\",outcome=\"cancelled\"} 1")
        })
        .await;
        // Closed: the next request goes to it at once, not after another 3 s.
        assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "p-model");
        r.stop().await;
        p.stop().await.unwrap();
    })
    .await;
}
