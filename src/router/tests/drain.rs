//! Shutdown: readiness, the delay and the drain.

use super::*;

#[tokio::test]
async fn shutdown_finishes_in_flight_streams() {
    bounded(async {
        let local = engine(1, 50.0).await;
        let r = router("{}", vec![local.addr().to_string()]).await;
        let addr = r.addr();
        let stream = hold_stream(addr, 25).await;
        let stopping = tokio::spawn(r.stop());
        let text = read_all(stream).await;
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        stopping.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
        local.stop().await.unwrap();
    })
    .await;
}

/// A request still waiting for a slot when the drain runs out gets a 503 to retry elsewhere,
/// not a connection closed under it.
#[tokio::test]
async fn a_request_still_queued_when_the_drain_runs_out_is_answered_503() {
    bounded(async {
        let local = engine(1, 5.0).await;
        let r = router_with(
            "maxConcurrencyPerBackend: 1\nqueue: {limit: 10, timeoutSeconds: 60}",
            vec![local.addr().to_string()],
            |o| o.drain_timeout = Duration::from_secs(1),
        )
        .await;
        let addr = r.addr();
        let _held = hold_stream(addr, 100).await;
        let queued = tokio::spawn(async move { post(addr, chat(1, false)).await });
        until_queued(&r, 1.0).await;
        r.stop().await;
        let reply = queued.await.unwrap();
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        assert_eq!(reply.json()["error"]["code"], "shutting_down");
        local.stop().await.unwrap();
    })
    .await;
}

/// At shutdown a pod still gets new connections until its Service's endpoints drop it: they
/// are served through the delay, with readiness failing from the start.
#[tokio::test]
async fn closing_fails_readiness_at_once_and_serves_new_connections_through_the_delay() {
    bounded(async {
        let local = engine(4, 1000.0).await;
        let r = router("{}", vec![local.addr().to_string()]).await;
        let (addr, shared) = (r.addr(), r.state().clone());
        let (cut, cut_rx) = tokio::sync::oneshot::channel::<()>();
        let closing = tokio::spawn(r.close(Duration::from_secs(20), async {
            let _ = cut_rx.await;
        }));
        while !shared.closing() {
            tokio::task::yield_now().await;
        }
        let ready = get(addr, "/readyz").await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ready.text(), "draining\n");
        // A new connection, after readiness failed: still served.
        assert_eq!(served_by(&post(addr, chat(1, false)).await), "local");
        assert!(!closing.is_finished(), "stopped before its delay");
        // A second signal cuts the delay short; then the listener closes.
        cut.send(()).unwrap();
        closing.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
        local.stop().await.unwrap();
    })
    .await;
}
