//! Spilling: least-outstanding engines first, providers only when every engine is full.

use super::*;

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
                "spillway_router_requests_total{destination=\"p\",class=\"default\",outcome=\"success\"}"
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
