//! Injected failures, dropped connections and latency.

use super::*;

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
