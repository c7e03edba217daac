//! Keys, unknown models and routes, body limits.

use super::*;

#[tokio::test]
async fn api_key_is_required_and_never_echoed() {
    bounded(async {
        const KEY: &str = "sk-sim-4b1d";
        let cfg = EngineSimConfig {
            api_key: Some(ApiKey::new(KEY)),
            ..fast()
        };
        let srv = EngineSimServer::start(cfg).await.unwrap();
        let addr = srv.addr();
        let good = format!("Bearer {KEY}");
        let chat_path = "/v1/chat/completions";

        let r = try_call(addr, Method::POST, chat_path, &[], Some(chat(1, false)))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        assert!(r.json()["error"]["message"].is_string());

        let r = try_call(
            addr,
            Method::POST,
            chat_path,
            &[("authorization", "Bearer sk-wrong")],
            Some(chat(1, false)),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(!r.text().contains("sk-wrong") && !r.text().contains(KEY));
        // Not a bearer token.
        let r = try_call(
            addr,
            Method::POST,
            chat_path,
            &[("authorization", KEY)],
            Some(chat(1, false)),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);

        let r = try_call(
            addr,
            Method::POST,
            chat_path,
            &[("authorization", &good)],
            Some(chat(1, false)),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::OK);

        assert_eq!(
            get(addr, "/v1/models").await.status,
            StatusCode::UNAUTHORIZED
        );
        let r = try_call(
            addr,
            Method::GET,
            "/v1/models",
            &[("authorization", &good)],
            None,
        )
        .await
        .unwrap();
        assert_eq!(r.json()["data"][0]["id"], "m1");

        // Probes and scrapes need no key, and the key is not in the metrics.
        assert_eq!(get(addr, "/health").await.status, StatusCode::OK);
        let t = metrics_text(addr).await;
        assert!(!t.contains(KEY));
        assert_eq!(
            sample(&t, "engine_sim_requests_total{outcome=\"unauthorized\"}"),
            3.0
        );
        srv.stop().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn other_models_get_404_and_unknown_routes_get_openai_errors() {
    bounded(async {
        let srv = EngineSimServer::start(fast()).await.unwrap();
        let addr = srv.addr();
        let r = post_json(addr, "/v1/chat/completions", json!({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]})).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json()["error"]["code"], "model_not_found");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");

        let r = post_json(addr, "/v1/chat/completions", chat(1, false)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["model"], "m1");

        let r = get(addr, "/v1/models").await;
        assert_eq!(r.json()["data"], json!([{"id": "m1", "object": "model", "created": 0, "owned_by": "spillway-engine-sim"}]));

        let r = get(addr, "/v2/nothing").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(r.json()["error"]["message"].is_string());
        assert_eq!(get(addr, "/v1/chat/completions").await.status, StatusCode::METHOD_NOT_ALLOWED);

        let r = try_call(addr, Method::POST, "/v1/chat/completions", &[], None).await.unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        let r = post_json(addr, "/v1/chat/completions", chat(0, false)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        srv.stop().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    bounded(async {
        let cfg = EngineSimConfig {
            max_body_bytes: 1024,
            ..fast()
        };
        let srv = EngineSimServer::start(cfg).await.unwrap();
        let big =
            json!({"model": "m1", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
        let r = post_json(srv.addr(), "/v1/chat/completions", big).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(r.json()["error"]["code"], "request_too_large");
        assert_eq!(
            post_json(srv.addr(), "/v1/chat/completions", chat(1, false))
                .await
                .status,
            StatusCode::OK
        );
        srv.stop().await.unwrap();
    })
    .await
}
