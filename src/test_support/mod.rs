//! What tests across the crate share: API objects from YAML, a scripted mock API server, and
//! HTTP helpers for real servers on 127.0.0.1 ([`net`]).

pub mod net;

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

use crate::api::InferenceService;

/// Parses an InferenceService from YAML, with the API server's schema defaults applied the way
/// serde applies them.
pub fn isvc_from_yaml(yaml: &str) -> InferenceService {
    serde_saphyr::from_str(yaml).expect("test InferenceService parses")
}

/// A valid service named `name` in namespace `ml` with uid `uid-<name>`.
pub fn minimal_isvc_yaml(name: &str) -> String {
    format!(
        r#"
apiVersion: spillway.dev/v1alpha1
kind: InferenceService
metadata: {{name: {name}, namespace: ml, uid: uid-{name}, generation: 1}}
spec:
  model: {{name: m}}
  engine: {{image: "engine:1", gpus: 1}}
  router: {{enabled: false}}
"#
    )
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One request as the controller sent it.
#[derive(Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

/// Plays the API server: answers event writes itself (collecting them), hands every other
/// request to the test in order.
pub struct ApiServer {
    pub handle: Handle,
    pub events: Vec<Value>,
}

impl ApiServer {
    /// The next non-event request and a responder for it; panics if none comes within 5 s.
    pub async fn next(&mut self) -> (Seen, tower_test::mock::SendResponse<Response<Body>>) {
        loop {
            let (req, send) =
                tokio::time::timeout(Duration::from_secs(5), self.handle.next_request())
                    .await
                    .expect("the controller made no further request")
                    .expect("the client was dropped");
            let seen = to_seen(req).await;
            if seen.path.contains("/apis/events.k8s.io/") {
                self.events.push(seen.body.clone());
                send.send_response(json_response(StatusCode::CREATED, seen.body));
                continue;
            }
            return (seen, send);
        }
    }

    /// Asserts the next request's method and path, answers it, and returns what was sent.
    /// A `Value::Null` reply echoes the request body back, as the API server does for a patch.
    pub async fn expect(
        &mut self,
        method: Method,
        path: &str,
        status: StatusCode,
        reply: Value,
    ) -> Seen {
        let (seen, send) = self.next().await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&method, path),
            "unexpected request {seen:#?}"
        );
        let reply = if reply.is_null() { echo(&seen) } else { reply };
        send.send_response(json_response(status, reply));
        seen
    }

    /// Expects a server-side apply of `obj`'s status and answers with `obj` carrying it.
    pub async fn expect_status<T: serde::Serialize>(&mut self, path: &str, obj: &T) -> Seen {
        let (seen, send) = self.next().await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&Method::PATCH, path),
            "unexpected request {seen:#?}"
        );
        let mut reply = serde_json::to_value(obj).unwrap();
        reply["status"] = seen.body["status"].clone();
        send.send_response(json_response(StatusCode::OK, reply));
        seen
    }

    pub async fn not_found(&mut self, path: &str) {
        self.expect(Method::GET, path, StatusCode::NOT_FOUND, not_found_body())
            .await;
    }

    /// After the reconcile has finished: no request is left unanswered.
    pub async fn done(mut self) -> Vec<Value> {
        // Events still in flight are collected; anything else is a failure.
        while let Ok(Some((req, send))) =
            tokio::time::timeout(Duration::from_millis(50), self.handle.next_request()).await
        {
            let seen = to_seen(req).await;
            assert!(
                seen.path.contains("/events"),
                "unexpected extra request {seen:#?}"
            );
            self.events.push(seen.body.clone());
            send.send_response(json_response(StatusCode::CREATED, seen.body));
        }
        self.events
    }
}

/// The written object as the API server would return it (with metadata if the patch had none).
pub fn echo(seen: &Seen) -> Value {
    let mut obj = seen.body.clone();
    if obj.get("metadata").is_none() {
        let mut segments: Vec<&str> = seen.path.split('/').collect();
        if segments.last() == Some(&"status") {
            segments.pop();
        }
        obj["metadata"] = json!({"name": segments.last().unwrap(), "namespace": "ml"});
    }
    obj
}

pub async fn to_seen(req: Request<Body>) -> Seen {
    let (parts, body) = req.into_parts();
    let bytes = http_body_util::BodyExt::collect(body)
        .await
        .unwrap()
        .to_bytes();
    Seen {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        content_type: parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default(),
        body: if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        },
    }
}

pub fn json_response(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

pub fn not_found_body() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

impl ApiServer {
    /// A kube client wired to a new mocked API server.
    pub fn new() -> (kube::Client, ApiServer) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (
            kube::Client::new(svc, "default"),
            ApiServer {
                handle,
                events: Vec::new(),
            },
        )
    }
}
