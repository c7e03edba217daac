//! Retries after an upstream fails before answering, and set-aside engines.

use super::*;

#[tokio::test]
async fn a_connection_failure_before_any_response_is_retried_elsewhere() {
    bounded(async {
        // A port nobody listens on, first in line (ties go to the lowest index).
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let live = engine(4, 200.0).await;
        let r = router(
            "burst: {mode: Never}\n",
            vec![dead.to_string(), live.addr().to_string()],
        )
        .await;
        for _ in 0..3 {
            assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "local");
        }
        // Only a dead engine left: a 502 with a JSON error, never silence.
        r.state().set_backends(vec![dead.to_string()]);
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

/// An engine that closes each connection at once, counting them, until `serve` is set; then
/// it answers each with a small completion from model `back`.
async fn flaky_engine() -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let serve = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (count, on) = (accepted.clone(), serve.clone());
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, SeqCst);
            if !on.load(SeqCst) {
                continue;
            }
            // The router sends a small request in one write.
            let mut buf = [0u8; 8192];
            let _ = s.read(&mut buf).await;
            let body = r#"{"object":"chat.completion","model":"back","choices":[]}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    (addr, accepted, serve, task)
}

#[tokio::test]
async fn an_engine_whose_connection_failed_gets_no_new_requests_for_a_while() {
    bounded(async {
        // First in line: least-outstanding would pick it for every request, as it is never busy.
        let (bad, accepted, _, task) = flaky_engine().await;
        let live = engine(4, 200.0).await;
        let r = router(
            "burst: {mode: Never}\n",
            vec![bad.to_string(), live.addr().to_string()],
        )
        .await;
        for _ in 0..4 {
            assert_eq!(served_by(&post(r.addr(), chat(1, false)).await), "local");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        let t = get(r.addr(), "/metrics").await.text();
        assert_eq!(
            sample(&t, "spillway_router_engine_set_asides_total"),
            Some(1.0),
            "{t}"
        );
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

/// Engines that each read a whole request and then close without an answer, as an engine the
/// request itself crashes would: a prompt that kills engines must not take down three.
#[tokio::test]
async fn a_request_engines_die_on_is_retried_on_one_more_engine_only() {
    bounded(async {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let read = Arc::new(AtomicUsize::new(0));
        let mut engines = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            engines.push(l.local_addr().unwrap().to_string());
            let read = read.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    // The router sends a small request in one write.
                    let mut buf = [0u8; 8192];
                    if s.read(&mut buf).await.is_ok_and(|n| n > 0) {
                        read.fetch_add(1, SeqCst);
                    }
                }
            }));
        }
        let r = router("burst: {mode: Never}\n", engines).await;
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
        assert_eq!(read.load(SeqCst), 2, "engines that got the request");
        for t in tasks {
            t.abort();
        }
        r.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_lone_failing_engine_is_tried_once_then_answered_502() {
    bounded(async {
        let (bad, accepted, _, task) = flaky_engine().await;
        let r = router("burst: {mode: Never}\n", vec![bad.to_string()]).await;
        // Setting aside the only engine has no effect, so the retry does not queue for it.
        let reply = post(r.addr(), chat(1, false)).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        task.abort();
        r.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_engine_back_from_being_set_aside_takes_the_queue_head() {
    bounded(async {
        let live = engine(1, 50.0).await;
        let (bad, _, serve, task) = flaky_engine().await;
        let r = router_over(&live, bad, "{limit: 5, timeoutSeconds: 25}").await;
        // 20 s on the live engine: longer than the set-aside, shorter than the queue timeout.
        let held = hold_stream(r.addr(), 1000).await;
        let addr = r.addr();
        let waiting = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_queued(&r, 1.0).await;
        serve.store(true, std::sync::atomic::Ordering::SeqCst);
        // Its return frees no slot; the waiter still gets it, not the live engine's slot later.
        assert_eq!(served_by(&waiting.await.unwrap()), "back");
        assert_eq!(engine_running(&live).await, 1.0);
        drop(held);
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_retry_with_no_room_elsewhere_waits_in_the_queue_instead_of_failing() {
    bounded(async {
        let live = engine(1, 50.0).await;
        let (bad, accepted, _, task) = flaky_engine().await;
        let r = router_over(&live, bad, "{limit: 5, timeoutSeconds: 20}").await;
        // Fills the live engine (ties go to the lowest index), so the next request goes to
        // the bad one, fails, and finds no room anywhere.
        let held = hold_stream(r.addr(), 40).await;
        let addr = r.addr();
        let waiting = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_queued(&r, 1.0).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        drop(held);
        let reply = waiting.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

/// An engine that reads a request per connection, says so on `read`, and never answers. When
/// its task is aborted the connections it holds close and new ones are refused.
async fn engine_hanging() -> (
    SocketAddr,
    Arc<tokio::sync::Notify>,
    tokio::task::JoinHandle<()>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let read = Arc::new(tokio::sync::Notify::new());
    let on_read = read.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 8192];
            let _ = s.read(&mut buf).await;
            on_read.notify_one();
            held.push(s);
        }
    });
    (addr, read, task)
}

#[tokio::test]
async fn a_queued_retry_keeps_its_place_by_arrival() {
    bounded(async {
        let live = engine(1, 50.0).await;
        let (bad, read, bad_task) = engine_hanging().await;
        // Room in the queue for one: the retry must not count the request behind it.
        let r = router_over(&live, bad, "{limit: 1, timeoutSeconds: 25}").await;
        // 20 s on the live engine: it frees only when dropped.
        let held = hold_stream(r.addr(), 1000).await;
        let addr = r.addr();
        // `first` goes to the bad engine and hangs there; `second`, arriving later, queues.
        let first = tokio::spawn(async move { post(addr, chat(1, false)).await });
        read.notified().await;
        let second = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_queued(&r, 1.0).await;
        // `first` fails, finds no room and queues too: ahead of `second`, which came later.
        bad_task.abort();
        until_queued(&r, 2.0).await;
        drop(held);
        let (a, b) = (first.await.unwrap(), second.await.unwrap());
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(b.status, StatusCode::OK, "{}", b.text());
        // engine-sim numbers the requests it serves: `first` got the freed slot.
        let n = |r: &Reply| {
            let id = r.json()["id"].as_str().unwrap().to_string();
            id.rsplit('-').next().unwrap().parse::<u64>().unwrap()
        };
        assert!(n(&a) < n(&b), "{} then {}", a.text(), b.text());
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

/// Until `n` connections have been accepted.
async fn until_accepted(accepted: &std::sync::atomic::AtomicUsize, n: usize) {
    while accepted.load(std::sync::atomic::Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A router with one local engine of one slot and provider `p` at `provider`, spilling after
/// 100 ms in the queue.
async fn router_spilling_to(
    live: &EngineSimServer,
    provider: SocketAddr,
    dir: &TempDir,
) -> RouterServer {
    let key = dir.file("p", "sk-p");
    router(
        &format!(
            "maxConcurrencyPerBackend: 1\nqueue: {{limit: 5, timeoutSeconds: 10}}\nburst:\n  maxQueueWaitMilliseconds: 100\n  providers:\n  - {{name: p, url: \"http://{provider}/v1\", model: p-model, apiKeyFile: \"{key}\", exposeModel: true, maxConcurrency: 8}}\n"
        ),
        vec![live.addr().to_string()],
    )
    .await
}

/// A router over a live engine and a bad one, one slot each, queueing as `queue` says and
/// never spilling.
async fn router_over(live: &EngineSimServer, bad: SocketAddr, queue: &str) -> RouterServer {
    router(
        &format!("maxConcurrencyPerBackend: 1\nqueue: {queue}\nburst: {{mode: Never}}\n"),
        vec![live.addr().to_string(), bad.to_string()],
    )
    .await
}

#[tokio::test]
async fn a_request_whose_provider_failed_waits_for_a_local_slot() {
    bounded(async {
        let dir = TempDir::new("requeue");
        let live = engine(1, 50.0).await;
        let (bad, accepted, _, task) = flaky_engine().await;
        let r = router_spilling_to(&live, bad, &dir).await;
        let held = hold_stream(r.addr(), 40).await;
        let addr = r.addr();
        let waiting = tokio::spawn(async move { post(addr, chat(1, false)).await });
        // It spilled and the provider failed it (it left the queue for that): it waits again
        // instead of answering 502.
        until_accepted(&accepted, 1).await;
        until_queued(&r, 1.0).await;
        drop(held);
        assert_eq!(served_by(&waiting.await.unwrap()), "local");
        // The queue kept it from the provider that failed it.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn in_a_cold_start_a_request_whose_provider_failed_waits_for_the_first_engine() {
    bounded(async {
        let dir = TempDir::new("requeue-cold");
        let key = dir.file("p", "sk-p");
        let (bad, accepted, _, task) = flaky_engine().await;
        let r = router(
            &format!(
                "queue: {{limit: 5, timeoutSeconds: 25}}\nburst:\n  providers:\n  - {{name: p, url: \"http://{bad}/v1\", model: p-model, apiKeyFile: \"{key}\", exposeModel: true, maxConcurrency: 8}}\n"
            ),
            vec![],
        )
        .await;
        let addr = r.addr();
        let waiting = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_accepted(&accepted, 1).await;
        until_queued(&r, 1.0).await;
        let live = engine(1, 50.0).await;
        r.state().set_backends(vec![live.addr().to_string()]);
        assert_eq!(served_by(&waiting.await.unwrap()), "local");
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_queued_retry_does_not_hold_back_those_behind_it() {
    bounded(async {
        let dir = TempDir::new("requeue-by");
        let live = engine(1, 10.0).await;
        let (flaky, accepted, serve, task) = flaky_engine().await;
        let r = router_spilling_to(&live, flaky, &dir).await;
        // 100 s on the only local slot: it never frees by itself, nor does the queue time out
        // (10 s) unless the first request holds the second back.
        let held = hold_stream(r.addr(), 1000).await;
        let addr = r.addr();
        let first = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_accepted(&accepted, 1).await;
        until_queued(&r, 1.0).await;
        // The provider is back. The first request stays away from it; the next one queues
        // behind it and is let by to the provider when its own spill wait is over.
        serve.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(served_by(&post(addr, chat(1, false)).await), "back");
        assert!(!first.is_finished());
        assert_eq!(engine_running(&live).await, 1.0);
        drop(held);
        assert_eq!(served_by(&first.await.unwrap()), "local");
        task.abort();
        r.stop().await;
        live.stop().await.unwrap();
    })
    .await;
}
