//! Shutdown: running and queued requests finish.

use super::*;

#[tokio::test]
async fn shutdown_finishes_running_and_queued_requests_then_refuses_connections() {
    bounded(async {
        let cfg = EngineSimConfig {
            max_concurrency: 1,
            tokens_per_second: 20.0,
            ..fast()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(cfg, listener, async move {
            let _ = stop_rx.await;
        }));

        let running = try_open(
            addr,
            Method::POST,
            "/v1/chat/completions",
            &[],
            Some(chat(8, true)),
        )
        .await
        .unwrap();
        let queued =
            tokio::spawn(
                async move { post_json(addr, "/v1/chat/completions", chat(8, false)).await },
            );
        wait_for_metrics(addr, "one waiting", |t| sample(t, WAITING) == 1.0).await;
        stop_tx.send(()).unwrap();

        let events = read_sse(running).await;
        assert_eq!(content_events(&events).len(), 8);
        assert_eq!(events.last().unwrap().1, "[DONE]");
        let q = queued.await.unwrap();
        assert_eq!(q.status, StatusCode::OK);
        assert_eq!(q.json()["usage"]["completion_tokens"], 8);
        server.await.unwrap().unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after shutdown"
        );
    })
    .await
}
