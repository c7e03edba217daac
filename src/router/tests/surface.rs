//! The HTTP surface: body limits, models, health and metrics.

use super::*;
use http::Request;
use hyper_util::rt::TokioIo;

#[tokio::test]
async fn an_oversized_body_is_413_whether_declared_or_streamed() {
    bounded(async {
        let local = engine(1, 200.0).await;
        let r = router_with("{}", vec![local.addr().to_string()], |o| {
            o.max_body_bytes = 1000
        })
        .await;
        let big = json!({"model": "local", "prompt": "x".repeat(2000)});
        let reply = call(r.addr(), Method::POST, "/v1/completions", &[], big).await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(reply.json()["error"]["code"], "request_too_large");
        // Chunked, no Content-Length: caught while reading.
        let stream = TcpStream::connect(r.addr()).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let chunks = futures::stream::iter((0..4).map(|_| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(vec![
                b' ';
                400
            ])))
        }));
        let req = Request::post("/v1/completions")
            .header("host", "x")
            .body(http_body_util::StreamBody::new(chunks))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Small enough passes.
        let ok = call(
            r.addr(),
            Method::POST,
            "/v1/completions",
            &[],
            json!({"model": "local", "prompt": "x", "max_tokens": 1}),
        )
        .await;
        assert_eq!(served_by(&ok), "local");
        r.stop().await;
        local.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn models_health_and_metrics_are_answered_locally() {
    bounded(async {
        let r = router_with("{}", vec![], |o| o.model = Some("llama".into())).await;
        let m = get(r.addr(), "/v1/models").await.json();
        assert_eq!(m["data"][0]["id"], "llama");
        assert_eq!(get(r.addr(), "/healthz").await.status, StatusCode::OK);
        assert_eq!(get(r.addr(), "/readyz").await.status, StatusCode::OK);
        // In a cluster, not ready until the engine endpoints have been listed once.
        r.state().set_synced(false);
        let unready = get(r.addr(), "/readyz").await;
        assert_eq!(unready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(unready.text().contains("engine endpoints"));
        r.state().set_synced(true);
        assert_eq!(get(r.addr(), "/readyz").await.status, StatusCode::OK);
        let t = get(r.addr(), "/metrics").await.text();
        assert!(
            t.contains("spillway_router_queue_length{class=\"default\"} 0"),
            "{t}"
        );
        // Unknown paths are a 404, inference paths take POST only, both as OpenAI errors.
        let nf = get(r.addr(), "/v1/files").await;
        assert_eq!(nf.status, StatusCode::NOT_FOUND);
        assert_eq!(nf.json()["error"]["code"], "not_found");
        let get_embeddings = get(r.addr(), "/v1/embeddings").await;
        assert_eq!(get_embeddings.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(get_embeddings.json()["error"]["message"].is_string());
        // No engine and no provider: the queue times out rather than dropping the request.
        r.stop().await;
    })
    .await;
}
