//! The route table: health, readiness, metrics and models are answered here; every inference
//! endpoint (`router::endpoints`) goes to the proxy.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::app::App;
use super::endpoints::route;
use super::outcome::{error, json_response, text};
use super::proxy::proxy;
use super::relay::RouterBody;

pub(super) async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<RouterBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            if app.state.closing() {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else if !app.state.synced() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "waiting for the first list of engine endpoints\n",
                )
            } else if !app.state.peers_settled() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "waiting to hear the peer routers\n",
                )
            } else {
                text(StatusCode::OK, "text/plain", "ok\n")
            }
        }
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            app.state.metrics.render(),
        ),
        (&Method::GET, "/v1/models") => json_response(StatusCode::OK, &models(app)),
        (&Method::POST, path) if let Some(e) = route(path) => proxy(app, req, e).await,
        (_, "/healthz" | "/readyz" | "/metrics" | "/v1/models") => method_not_allowed(),
        (_, path) if route(path).is_some() => method_not_allowed(),
        (_, path) => error(
            StatusCode::NOT_FOUND,
            &format!("no route for {path}"),
            "invalid_request_error",
            "not_found",
        ),
    }
}

fn method_not_allowed() -> Response<RouterBody> {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed",
        "invalid_request_error",
        "method_not_allowed",
    )
}

fn models(app: &App) -> Value {
    let cfg = app.state.config();
    let model = cfg
        .cluster
        .as_ref()
        .map(|c| c.model.clone())
        .or_else(|| app.model.clone());
    let data: Vec<Value> = model
        .into_iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "spillway"}))
        .collect();
    json!({"object": "list", "data": data})
}
