//! Request classes: a `burst: Never` class never reaches a provider on any path, the queue
//! serves higher priorities first, and a class's providers are the only ones it may use.

use super::*;

const CLASS: &str = "x-spillway-class";

/// Classes `restricted` (Never, priority 100), `standard` (the default, 50) and `batch` (0,
/// only provider `p`), after `yaml` (the rest of the config).
fn with_classes(yaml: &str) -> String {
    format!(
        "{yaml}requestClasses:\n  defaultClass: standard\n  classes:\n  \
         - {{name: restricted, burst: Never, priority: 100}}\n  \
         - {{name: standard, burst: Policy, priority: 50}}\n  \
         - {{name: batch, burst: Policy, priority: 0, providers: [p]}}\n"
    )
}

/// A router over `engines` (one slot each) with provider `p`, spilling after `spill_ms` in the
/// queue, queue timeout `timeout_s`, and the classes of [`with_classes`].
async fn router_with_classes(
    engines: Vec<String>,
    p: &EngineSimServer,
    dir: &TempDir,
    spill_ms: u64,
    timeout_s: u32,
    breaker: Option<(u32, Duration)>,
) -> RouterServer {
    let key = dir.file("p", "sk-p");
    let yaml = with_classes(&format!(
        "maxConcurrencyPerBackend: 1\nqueue: {{limit: 10, timeoutSeconds: {timeout_s}}}\n\
         burst:\n  mode: Saturated\n  maxQueueWaitMilliseconds: {spill_ms}\n  providers:\n{}",
        provider_yaml("p", p, &key, "")
    ));
    router_with(&yaml, engines, |o| {
        if let Some((failures, open)) = breaker {
            o.breaker = BreakerSettings { failures, open };
        }
    })
    .await
}

/// A chat completion of `class` through the router.
async fn post_as(addr: SocketAddr, class: &str, body: Value) -> Reply {
    call(
        addr,
        Method::POST,
        "/v1/chat/completions",
        &[(CLASS, class)],
        body,
    )
    .await
}

/// Requests a provider (engine-sim) has answered.
async fn answered_by(p: &EngineSimServer) -> f64 {
    let t = get(p.addr(), "/metrics").await.text();
    sample(&t, "engine_sim_requests_total{outcome=\"success\"}").unwrap_or(0.0)
        + sample(&t, "engine_sim_requests_total{outcome=\"failed\"}").unwrap_or(0.0)
}

/// Until a request of `class` waits in the queue.
async fn until_class_queued(r: &RouterServer, class: &str) {
    let series = format!("spillway_router_queue_length{{class=\"{class}\"}}");
    wait_metrics(r, |t| sample(t, &series).is_some_and(|v| v >= 1.0)).await;
}

/// One engine of one slot (held busy by a stream), provider `p`, and a router with the
/// classes of [`with_classes`] over them.
struct Busy {
    live: EngineSimServer,
    p: EngineSimServer,
    r: RouterServer,
    held: Option<hyper::Response<Incoming>>,
    dir: TempDir,
}

impl Busy {
    async fn new(tag: &str, spill_ms: u64, timeout_s: u32, p: EngineSimServer) -> Self {
        Self::with_breaker(tag, spill_ms, timeout_s, p, None).await
    }

    async fn with_breaker(
        tag: &str,
        spill_ms: u64,
        timeout_s: u32,
        p: EngineSimServer,
        breaker: Option<(u32, Duration)>,
    ) -> Self {
        let dir = TempDir::new(tag);
        let live = engine(1, 50.0).await;
        let engines = vec![live.addr().to_string()];
        let r = router_with_classes(engines, &p, &dir, spill_ms, timeout_s, breaker).await;
        let held = Some(hold_stream(r.addr(), 1000).await);
        Self {
            live,
            p,
            r,
            held,
            dir,
        }
    }

    /// A request of `class`, sent once the engine is busy; wait for it to be queued.
    fn send(&self, class: &'static str) -> tokio::task::JoinHandle<Reply> {
        let addr = self.r.addr();
        tokio::spawn(async move { post_as(addr, class, chat(1, false)).await })
    }

    /// Frees the engine.
    fn free(&mut self) {
        self.held = None;
    }

    async fn stop(mut self) {
        self.free();
        self.r.stop().await;
        self.live.stop().await.unwrap();
        self.p.stop().await.unwrap();
    }
}

/// A provider with no faults.
async fn healthy() -> EngineSimServer {
    provider("p", "sk-p", FaultConfig::default()).await
}

/// First admission and the spill wait: the engine is full and the provider has room, yet the
/// restricted request waits for the engine, while a standard one spills past it at once.
#[tokio::test]
async fn a_restricted_request_waits_for_a_local_slot_while_others_spill() {
    bounded(async {
        let mut b = Busy::new("class-first", 0, 20, healthy().await).await;
        let restricted = b.send("restricted");
        until_class_queued(&b.r, "restricted").await;
        // Past the spill wait (0 ms) and behind the restricted one: spills all the same.
        assert_eq!(served_by(&post(b.r.addr(), chat(1, false)).await), "p-model");
        b.free();
        assert_eq!(served_by(&restricted.await.unwrap()), "local");
        assert_eq!(answered_by(&b.p).await, 1.0, "only the standard request");
        let t = get(b.r.addr(), "/metrics").await.text();
        let local = "spillway_router_requests_total{destination=\"local\",class=\"restricted\",outcome=\"success\"} 1";
        assert!(t.contains(local), "{t}");
        b.stop().await;
    })
    .await;
}

/// With the engine busy for longer than the queue timeout, the restricted request gets the
/// timeout's 503, never the provider.
#[tokio::test]
async fn a_restricted_request_is_answered_503_at_its_queue_timeout() {
    bounded(async {
        let b = Busy::new("class-timeout", 0, 1, healthy().await).await;
        let reply = b.send("restricted").await.unwrap();
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        assert_eq!(reply.json()["error"]["code"], "queue_timeout");
        assert!(reply.headers.contains_key(header::RETRY_AFTER));
        assert_eq!(answered_by(&b.p).await, 0.0);
        b.stop().await;
    })
    .await;
}

/// A cold start (no engine ready yet): the restricted request waits for the first engine.
#[tokio::test]
async fn in_a_cold_start_a_restricted_request_waits_for_the_first_engine() {
    bounded(async {
        let dir = TempDir::new("class-cold");
        let p = provider("p", "sk-p", FaultConfig::default()).await;
        let r = router_with_classes(Vec::new(), &p, &dir, 0, 20, None).await;
        let addr = r.addr();
        let restricted =
            tokio::spawn(async move { post_as(addr, "restricted", chat(1, false)).await });
        until_class_queued(&r, "restricted").await;
        // A standard request in the same cold start spills.
        assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "p-model");
        let live = engine(1, 200.0).await;
        r.state().set_backends(vec![live.addr().to_string()]);
        assert_eq!(served_by(&restricted.await.unwrap()), "local");
        assert_eq!(answered_by(&p).await, 1.0);
        r.stop().await;
        live.stop().await.unwrap();
        p.stop().await.unwrap();
    })
    .await;
}

/// A retry after an engine failed: a standard request would go to the provider; a restricted
/// one waits for the other engine.
#[tokio::test]
async fn a_restricted_request_whose_engine_failed_is_not_retried_at_a_provider() {
    bounded(async {
        let dir = TempDir::new("class-retry");
        let live = engine(1, 50.0).await;
        let p = provider("p", "sk-p", FaultConfig::default()).await;
        // The bad engine closes every connection at once; it is second, so the held stream
        // takes the live one (ties go to the lowest index) and the request goes to the bad.
        let bad = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bad_addr = bad.local_addr().unwrap();
        let bad_task = tokio::spawn(async move {
            while let Ok((s, _)) = bad.accept().await {
                drop(s);
            }
        });
        let engines = vec![live.addr().to_string(), bad_addr.to_string()];
        let r = router_with_classes(engines, &p, &dir, 0, 20, None).await;
        let held = hold_stream(r.addr(), 1000).await;
        let addr = r.addr();
        let restricted =
            tokio::spawn(async move { post_as(addr, "restricted", chat(1, false)).await });
        until_class_queued(&r, "restricted").await;
        assert_eq!(answered_by(&p).await, 0.0);
        drop(held);
        assert_eq!(served_by(&restricted.await.unwrap()), "local");
        assert_eq!(answered_by(&p).await, 0.0);
        bad_task.abort();
        r.stop().await;
        live.stop().await.unwrap();
        p.stop().await.unwrap();
    })
    .await;
}

/// A provider's breaker half-opens while a restricted request waits: the request is not the
/// probe, and the provider sees nothing more.
#[tokio::test]
async fn a_half_open_breaker_never_probes_with_a_restricted_request() {
    bounded(async {
        let faults = FaultConfig {
            fail_rate: 1.0,
            ..Default::default()
        };
        let p = provider("p", "sk-p", faults).await;
        let breaker = Some((1, Duration::from_millis(200)));
        let b = Busy::with_breaker("class-breaker", 0, 2, p, breaker).await;
        // A standard request fails at the provider: its breaker opens for 200 ms.
        let failed = post(b.r.addr(), chat(1, false)).await;
        assert!(failed.status.is_server_error(), "{}", failed.text());
        assert_eq!(answered_by(&b.p).await, 1.0);
        // It waits past the half-opening for its 2 s timeout.
        let reply = b.send("restricted").await.unwrap();
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        assert_eq!(
            answered_by(&b.p).await,
            1.0,
            "a restricted request probed the provider"
        );
        b.stop().await;
    })
    .await;
}

/// A reload while the restricted request waits turns its class into one that may burst (here:
/// no classes at all): the waiting request keeps the class it arrived with.
#[tokio::test]
async fn a_reload_mid_request_does_not_let_a_restricted_request_out() {
    bounded(async {
        let mut b = Busy::new("class-reload", 0, 20, healthy().await).await;
        let restricted = b.send("restricted");
        until_class_queued(&b.r, "restricted").await;
        let key = b.dir.file("p", "sk-p");
        let plain = format!(
            "maxConcurrencyPerBackend: 1\nqueue: {{limit: 10, timeoutSeconds: 20}}\n\
             burst:\n  mode: Saturated\n  maxQueueWaitMilliseconds: 0\n  providers:\n{}",
            provider_yaml("p", &b.p, &key, "")
        );
        b.r.state()
            .set_config(RouterConfig::from_yaml(&plain).unwrap());
        // Long enough for several spill re-checks (every 200 ms).
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(answered_by(&b.p).await, 0.0, "the reload let it burst");
        b.free();
        assert_eq!(served_by(&restricted.await.unwrap()), "local");
        assert_eq!(answered_by(&b.p).await, 0.0);
        b.stop().await;
    })
    .await;
}

/// A class name the service does not have is refused, naming the classes it has: it must not
/// fall back to the default (which may burst).
#[tokio::test]
async fn an_unknown_class_is_a_400_that_lists_the_classes() {
    bounded(async {
        let b = Busy::new("class-unknown", 0, 20, healthy().await).await;
        let reply = post_as(b.r.addr(), "restricetd", chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
        let e = &reply.json()["error"];
        assert_eq!(e["code"], "unknown_request_class");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains("restricted, standard, batch"), "{msg}");
        // The engine runs only the held stream; the provider saw nothing.
        assert_eq!(engine_running(&b.live).await, 1.0);
        assert_eq!(answered_by(&b.p).await, 0.0);
        let t = get(b.r.addr(), "/metrics").await.text();
        let counted = "spillway_router_requests_total{destination=\"none\",class=\"none\",outcome=\"unknown_class\"} 1";
        assert!(t.contains(counted), "{t}");
        b.stop().await;
    })
    .await;
}

/// engine-sim numbers the requests it serves.
fn served_number(r: &Reply) -> u64 {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    id.rsplit('-').next().unwrap().parse().unwrap()
}

/// Waiting requests go highest priority first, by arrival within a priority: a newcomer of a
/// higher priority goes ahead of those already waiting.
#[tokio::test]
async fn the_queue_serves_higher_priorities_first_then_by_arrival() {
    bounded(async {
        // Nobody spills within the test.
        let mut b = Busy::new("class-priority", 60_000, 20, healthy().await).await;
        let mut waiting = Vec::new();
        for (i, class) in ["batch", "batch", "restricted", "standard"]
            .into_iter()
            .enumerate()
        {
            waiting.push(b.send(class));
            until_queued(&b.r, (i + 1) as f64).await;
        }
        b.free();
        let mut order = Vec::new();
        for w in waiting {
            order.push(served_number(&w.await.unwrap()));
        }
        // Served: restricted, standard, then the two batch requests in arrival order.
        let (b1, b2, rs, st) = (order[0], order[1], order[2], order[3]);
        assert!(rs < st && st < b1 && b1 < b2, "served as {order:?}");
        b.stop().await;
    })
    .await;
}

/// The queue's limit holds across classes: a full queue of batch requests refuses even a
/// restricted newcomer; and a batch request is not kept past its own timeout by the
/// restricted one waiting ahead of it.
#[tokio::test]
async fn the_queue_limit_and_each_timeout_hold_across_classes() {
    bounded(async {
        let dir = TempDir::new("class-limit");
        let live = engine(1, 50.0).await;
        let p = provider("p", "sk-p", FaultConfig::default()).await;
        let key = dir.file("p", "sk-p");
        let yaml = with_classes(&format!(
            "maxConcurrencyPerBackend: 1\nqueue: {{limit: 2, timeoutSeconds: 1}}\n\
             burst:\n  mode: Never\n  providers:\n{}",
            provider_yaml("p", &p, &key, "")
        ));
        let r = router(&yaml, vec![live.addr().to_string()]).await;
        let held = hold_stream(r.addr(), 1000).await;
        let addr = r.addr();
        let restricted =
            tokio::spawn(async move { post_as(addr, "restricted", chat(1, false)).await });
        until_queued(&r, 1.0).await;
        let batch = tokio::spawn(async move { post_as(addr, "batch", chat(1, false)).await });
        until_queued(&r, 2.0).await;
        let full = post_as(r.addr(), "restricted", chat(1, false)).await;
        assert_eq!(
            full.json()["error"]["code"],
            "queue_full",
            "{}",
            full.text()
        );
        for w in [restricted, batch] {
            let reply = w.await.unwrap();
            assert_eq!(
                reply.json()["error"]["code"],
                "queue_timeout",
                "{}",
                reply.text()
            );
        }
        drop(held);
        r.stop().await;
        live.stop().await.unwrap();
        p.stop().await.unwrap();
    })
    .await;
}

/// A class limited to some providers spills only to those, even when an earlier provider has
/// room.
#[tokio::test]
async fn a_class_spills_only_to_its_providers() {
    bounded(async {
        let dir = TempDir::new("class-providers");
        let live = engine(1, 50.0).await;
        let (first, p) = (
            provider("first", "sk-first", FaultConfig::default()).await,
            provider("p", "sk-p", FaultConfig::default()).await,
        );
        let yaml = with_classes(&format!(
            "maxConcurrencyPerBackend: 1\nburst:\n  mode: Saturated\n  maxQueueWaitMilliseconds: 0\n  providers:\n{}{}",
            provider_yaml("first", &first, &dir.file("first", "sk-first"), ""),
            provider_yaml("p", &p, &dir.file("p", "sk-p"), ""),
        ));
        let r = router(&yaml, vec![live.addr().to_string()]).await;
        let held = hold_stream(r.addr(), 1000).await;
        assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "first-model");
        let batch = post_as(r.addr(), "batch", chat(1, false)).await;
        assert_eq!(served_by(&batch), "p-model");
        drop(held);
        r.stop().await;
        live.stop().await.unwrap();
        first.stop().await.unwrap();
        p.stop().await.unwrap();
    })
    .await;
}

/// A younger request of a higher priority waiting out its spill wait at the head does not
/// hold back an older one behind it whose spill wait is over: that one spills, rather than
/// wait for its timeout while standard requests keep arriving.
#[tokio::test]
async fn an_old_batch_request_spills_past_younger_standard_ones() {
    bounded(async {
        let b = Busy::new("class-starve", 1000, 4, healthy().await).await;
        let batch = b.send("batch");
        until_class_queued(&b.r, "batch").await;
        // A standard request every 250 ms for 5 s (past the batch request's 4 s timeout): one
        // younger than its 1 s spill wait always heads the queue.
        let mut standard = Vec::new();
        for _ in 0..20 {
            standard.push(b.send("standard"));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let reply = batch.await.unwrap();
        assert_eq!(served_by(&reply), "p-model", "{}", reply.text());
        for s in standard {
            assert_eq!(served_by(&s.await.unwrap()), "p-model");
        }
        b.stop().await;
    })
    .await;
}

/// A reload that makes a class stricter holds for its requests already waiting.
#[tokio::test]
async fn a_reload_that_tightens_a_class_holds_for_requests_already_waiting() {
    bounded(async {
        let mut b = Busy::new("class-tighten", 1000, 20, healthy().await).await;
        let standard = b.send("standard");
        until_class_queued(&b.r, "standard").await;
        let key = b.dir.file("p", "sk-p");
        let stricter = with_classes(&format!(
            "maxConcurrencyPerBackend: 1\nqueue: {{limit: 10, timeoutSeconds: 20}}\n\
             burst:\n  mode: Saturated\n  maxQueueWaitMilliseconds: 1000\n  providers:\n{}",
            provider_yaml("p", &b.p, &key, "")
        ))
        .replace(
            "{name: standard, burst: Policy, priority: 50}",
            "{name: standard, burst: Never, priority: 50}",
        );
        b.r.state()
            .set_config(RouterConfig::from_yaml(&stricter).unwrap());
        // Past its 1 s spill wait, with several re-checks.
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert_eq!(
            answered_by(&b.p).await,
            0.0,
            "it burst after its class was tightened"
        );
        b.free();
        assert_eq!(served_by(&standard.await.unwrap()), "local");
        b.stop().await;
    })
    .await;
}
