//! An inference request's way upstream: its body read, a lease taken (never on a provider that
//! does not serve its endpoint), the request sent to the lease's engine or provider (rewritten
//! for a provider), and on failure the one retry policy.

use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use serde_json::Value;
use std::sync::Arc;

use super::admission::RejectReason;
use super::app::App;
use super::classes::Class;
use super::endpoints::{Endpoint, usage_on_request};
use super::engine::EngineFailure;
use super::engine::Outgoing;
use super::fast::Mirror;
use super::metrics;
use super::metrics::NO_CLASS;
use super::mirror::{self, MirrorPair};
use super::outcome::{Outcome, answer, reject_message};
use super::relay::{HOP_BY_HOP, RouterBody, Stall, Upstream, read_to_end, relay};
use super::state::{Dest, Excluded, Lease, Ticket};
use crate::api::{CLASS_HEADER, ProviderEndpoint};

/// Attempts per request when connections fail before any response.
const MAX_ATTEMPTS: usize = 3;
/// Retries after failures where an engine may have taken the whole request.
const MAX_DELIVERED_RETRIES: usize = 1;

/// Why an upstream attempt produced no response.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// The connection failed before any response. `delivered`: an engine may have taken the
    /// whole request before it failed (see [`EngineFailure`]).
    #[error("{message}")]
    Connection { message: String, delivered: bool },
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
    #[error("request body is not a JSON object: {0}")]
    BadBody(String),
    #[error("https provider but no CA certificates on this system")]
    NoTls,
    /// 401 or 403: the provider will not serve this router's account, whatever the request.
    #[error("the provider refused the router's credentials ({0})")]
    Refused(StatusCode),
}

/// The error chain as one line; upstream errors carry no headers, so no key.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

pub(super) async fn proxy(
    app: &Arc<App>,
    req: Request<Incoming>,
    endpoint: Endpoint,
) -> Response<RouterBody> {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let header = parts.headers.get(CLASS_HEADER).map(HeaderValue::as_bytes);
    let class = match app.state.classify(header) {
        Ok(c) => c,
        Err(msg) => {
            return fail(app, metrics::NONE, NO_CLASS, Outcome::UnknownClass, &msg);
        }
    };
    let body = match read_body(app, &parts, body, &class).await {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let burst = endpoint.burst(&body);
    let kept_from = app.state.kept_from(burst);
    let mut lease = match app.state.acquire(&class, kept_from.clone()).await {
        Ticket::Go(l) => l,
        Ticket::Reject(r) => return rejected(app, r, &class),
    };
    let mut shadow = mirror_of(app, &lease, &parts, &body, burst, arrived);
    let mut tries = Tries::new(arrived, class, kept_from);
    loop {
        let failure = match send(app, &lease, &parts, &body, burst).await {
            // Nothing has reached the client yet, and the provider's body may quote the key.
            Ok(resp) if refused(&lease.dest, resp.status()) => SendError::Refused(resp.status()),
            Ok(resp) => return relay(resp, lease, arrived, shadow).await,
            Err(e) => e,
        };
        lease = match retry(app, lease, failure, &mut tries).await {
            Ok(next) => next,
            Err(answer) => {
                if let Some(s) = shadow.take() {
                    s.deposit(None);
                }
                return answer;
            }
        };
    }
}

/// A copy of the request for a revision in its shadow stage, when this one is to be mirrored:
/// stable traffic (its lease is on a local engine) on an endpoint that keeps no state.
fn mirror_of(
    app: &Arc<App>,
    lease: &Lease,
    parts: &http::request::Parts,
    body: &Bytes,
    burst: Option<ProviderEndpoint>,
    arrived: Instant,
) -> Option<Arc<MirrorPair>> {
    if burst.is_none() || !matches!(lease.dest, Dest::Local(_)) {
        return None;
    }
    match app.state.mirror() {
        Mirror::No => None,
        Mirror::Skipped(m) => {
            if let Some(m) = m {
                m.shadowed("skipped");
            }
            None
        }
        Mirror::Take(b) => mirror::start(app, b, arrived, |host| {
            let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let headers = parts.headers.iter().filter(|(k, _)| forwarded(k, false));
            Outgoing::new(&parts.method, pq, host, headers, body)
        }),
    }
}

/// The request body, whole; a body over the limit or unreadable is answered here.
async fn read_body(
    app: &App,
    parts: &http::request::Parts,
    mut body: Incoming,
    class: &Class,
) -> Result<Bytes, Response<RouterBody>> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_body_bytes as u64) {
        return Err(too_large(app, class));
    }
    match read_to_end(&mut body, app.max_body_bytes, |_| {}).await {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Err(too_large(app, class)),
        Err(e) => Err(fail(
            app,
            metrics::NONE,
            &class.name,
            Outcome::BadRequest,
            &format!("reading request body: {e}"),
        )),
    }
}

/// What a request has been through.
struct Tries {
    arrived: Instant,
    /// Its class, resolved at arrival, for every attempt.
    class: Class,
    /// Attempts so far, this one included.
    attempts: usize,
    /// Failures after an engine may have taken the whole request.
    delivered: usize,
    /// Where it failed, and the providers that do not serve its endpoint.
    excluded: Excluded,
}

impl Tries {
    fn new(arrived: Instant, class: Class, kept_from: Excluded) -> Self {
        Self {
            arrived,
            class,
            attempts: 1,
            delivered: 0,
            excluded: kept_from,
        }
    }

    /// Whether the rules allow another attempt.
    fn may_retry(&self) -> bool {
        self.attempts < MAX_ATTEMPTS && self.delivered <= MAX_DELIVERED_RETRIES
    }
}

/// The retry policy, in one place. After a failed attempt, the next lease or the answer:
///
/// - A connection that failed before any response, or a provider that refused the router's
///   credentials, is retried elsewhere: on another destination with room now, or, when none
///   has room but one could take it later, in the queue by its arrival time. `MAX_ATTEMPTS`
///   attempts at most.
/// - Of those, a failure after an engine may have taken the whole request is retried at most
///   `MAX_DELIVERED_RETRIES` times: a prompt that kills engines must not take down three.
/// - A timeout, a body a provider cannot take, or https without CA certificates is answered
///   at once.
///
/// (Below this, the engine pool re-sends on a new connection only a request whose reused
/// connection failed before any answer byte: see `engine::pool`.)
async fn retry(
    app: &Arc<App>,
    lease: Lease,
    failure: SendError,
    tries: &mut Tries,
) -> Result<Lease, Response<RouterBody>> {
    let dest = &lease.dest;
    match &failure {
        SendError::Connection { .. } | SendError::Refused(_) => {}
        SendError::Timeout(t) => {
            tracing::warn!(destination = dest.label(), timeout = ?t, "upstream did not answer in time");
            if let Dest::Provider(p) = dest {
                app.state.provider_result(&p.name, false, lease.sent_ms);
            }
            let msg = "upstream did not answer in time";
            return Err(fail(
                app,
                dest.label(),
                &tries.class.name,
                Outcome::Timeout,
                msg,
            ));
        }
        SendError::BadBody(_) => {
            let msg = failure.to_string();
            return Err(fail(
                app,
                dest.label(),
                &tries.class.name,
                Outcome::BadRequest,
                &msg,
            ));
        }
        SendError::NoTls => {
            tracing::error!(destination = dest.label(), error = %failure, "cannot reach provider");
            let msg = failure.to_string();
            return Err(fail(
                app,
                dest.label(),
                &tries.class.name,
                Outcome::UpstreamUnavailable,
                &msg,
            ));
        }
    }
    let (dest, sent) = (dest.clone(), lease.sent_ms);
    tracing::warn!(destination = dest.label(), attempt = tries.attempts, error = %failure, "upstream failed before a response");
    // Whether the queue would keep the retry from the failed destination.
    let may_queue = match &dest {
        Dest::Provider(p) => {
            app.state.provider_result(&p.name, false, sent);
            true
        }
        Dest::Local(b) => app.state.set_aside(b),
    };
    tries.excluded.add(&dest);
    if matches!(
        failure,
        SendError::Connection {
            delivered: true,
            ..
        }
    ) {
        tries.delivered += 1;
    }
    drop(lease);
    let next = if tries.may_retry() {
        let queued = tries.excluded.providers_only();
        match app
            .state
            .retry_now(tries.arrived, &tries.excluded, &tries.class)
        {
            Some(l) => Some(l),
            // Nothing else has room now: wait for it in its place by arrival, if anything else
            // could ever take it.
            None if may_queue && app.state.serves_beyond(&queued, &tries.class) => {
                match app.state.requeue(tries.arrived, queued, &tries.class).await {
                    Ticket::Go(l) => Some(l),
                    Ticket::Reject(r) => return Err(rejected(app, r, &tries.class)),
                }
            }
            None => None,
        }
    } else {
        None
    };
    match next {
        Some(l) => {
            tries.attempts += 1;
            Ok(l)
        }
        None => {
            let msg = match failure {
                SendError::Refused(_) => "the provider refused the router's credentials",
                _ => "upstream connection failed before a response",
            };
            Err(fail(
                app,
                dest.label(),
                &tries.class.name,
                Outcome::UpstreamUnavailable,
                msg,
            ))
        }
    }
}

/// The router's own answer for a request that ends here, counted under `destination` and
/// `class`.
fn fail(
    app: &App,
    destination: &str,
    class: &str,
    outcome: Outcome,
    message: &str,
) -> Response<RouterBody> {
    app.state.metrics.request(destination, class, outcome);
    answer(outcome, message)
}

fn too_large(app: &App, class: &Class) -> Response<RouterBody> {
    let msg = format!("request body exceeds {} bytes", app.max_body_bytes);
    fail(app, metrics::NONE, &class.name, Outcome::TooLarge, &msg)
}

fn rejected(app: &App, r: RejectReason, class: &Class) -> Response<RouterBody> {
    let o = Outcome::Rejected(r);
    fail(app, metrics::NONE, &class.name, o, reject_message(r))
}

/// Whether a client's header goes upstream. `Host` and `Content-Length` come from the new
/// request, `Expect` was answered here (the body is read before anything is sent), and the
/// request class is the router's to act on, not an upstream's to see.
fn forwarded(k: &HeaderName, provider: bool) -> bool {
    if HOP_BY_HOP.contains(k)
        || k == header::HOST
        || k == header::CONTENT_LENGTH
        || k == header::EXPECT
        || k.as_str() == CLASS_HEADER
    {
        return false;
    }
    // The client's credentials are for spillway, never for a provider.
    !(provider
        && (k == header::AUTHORIZATION || k == header::COOKIE || k == header::ACCEPT_ENCODING))
}

/// Copies the headers that go upstream.
fn forward_headers(from: &HeaderMap, to: &mut HeaderMap, provider: bool) {
    for (k, v) in from {
        if forwarded(k, provider) {
            to.append(k.clone(), v.clone());
        }
    }
}

/// A request body as a provider gets it.
#[derive(Debug)]
pub struct ForProvider {
    pub body: Bytes,
    /// The usage chunk was asked for on the client's behalf, to be taken out again.
    pub usage_added: bool,
    /// The model the client asked for, to write back into the answer.
    pub client_model: Option<String>,
}

/// The provider's model; usage in chat and completions streams (the budget needs it); and a
/// Responses request the client did not ask to store is not stored (a provider keeps nothing
/// the client did not ask it to keep). The rest stays as sent.
pub fn rewrite_for_provider(
    body: &[u8],
    model: &str,
    endpoint: ProviderEndpoint,
) -> Result<ForProvider, String> {
    let mut v: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let client_model = match v.insert("model".into(), Value::String(model.into())) {
        Some(Value::String(m)) => Some(m),
        _ => None,
    };
    let mut added = false;
    if usage_on_request(endpoint) && v.get("stream").and_then(Value::as_bool) == Some(true) {
        let opts = v
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(o) = opts {
            added = o.get("include_usage").and_then(Value::as_bool) != Some(true);
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    if endpoint == ProviderEndpoint::Responses {
        v.entry("store").or_insert(Value::Bool(false));
    }
    serde_json::to_vec(&v)
        .map(|b| ForProvider {
            body: Bytes::from(b),
            usage_added: added,
            client_model,
        })
        .map_err(|e| e.to_string())
}

async fn send(
    app: &App,
    lease: &Lease,
    parts: &http::request::Parts,
    body: &Bytes,
    burst: Option<ProviderEndpoint>,
) -> Result<Response<Upstream>, SendError> {
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    match &lease.dest {
        Dest::Local(backend) => {
            let (authority, host) =
                backend
                    .authority
                    .as_ref()
                    .ok_or_else(|| SendError::Connection {
                        message: format!("{:?} is not host:port", backend.addr),
                        delivered: false,
                    })?;
            // Origin form, as a client talking to the engine directly would send it.
            let headers = parts.headers.iter().filter(|(k, _)| forwarded(k, false));
            let req = Outgoing::new(&parts.method, pq, host, headers, body);
            match tokio::time::timeout(app.engine_timeout, app.engines.send(authority, &req)).await
            {
                Err(_) => Err(SendError::Timeout(app.engine_timeout)),
                Ok(Ok(resp)) => {
                    Ok(resp.map(|b| Upstream::Engine(b, Stall::new(app.engine_timeout))))
                }
                Ok(Err(EngineFailure { error, delivered })) => Err(SendError::Connection {
                    message: chain(&error),
                    delivered,
                }),
            }
        }
        Dest::Provider(p) => {
            let rest = pq.strip_prefix("/v1").unwrap_or(pq);
            // Admission never hands a provider a request that may not spill.
            let endpoint = burst.ok_or_else(|| SendError::BadBody("not for providers".into()))?;
            let sent =
                rewrite_for_provider(body, &p.model, endpoint).map_err(SendError::BadBody)?;
            let usage_added = sent.usage_added;
            let model = sent.client_model.filter(|_| !p.expose_model);
            let mut req = Request::new(Full::new(sent.body));
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() =
                format!("{}{rest}", p.base)
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| SendError::Connection {
                        message: e.to_string(),
                        delivered: false,
                    })?;
            let h = req.headers_mut();
            forward_headers(&parts.headers, h, true);
            // Usage has to be readable as it passes.
            h.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
            if let Some(b) = &lease.bearer {
                h.insert(header::AUTHORIZATION, b.header().clone());
            }
            let fut = if req.uri().scheme_str() == Some("https") {
                let Some(tls) = &app.tls else {
                    return Err(SendError::NoTls);
                };
                tls.request(req)
            } else {
                match &app.tls {
                    Some(c) => c.request(req),
                    None => app.plain.request(req),
                }
            };
            match tokio::time::timeout(p.timeout, fut).await {
                Err(_) => Err(SendError::Timeout(p.timeout)),
                Ok(r) => r
                    .map(|r| {
                        r.map(|body| Upstream::Provider {
                            body,
                            stall: Stall::new(p.timeout),
                            usage_added,
                            model,
                        })
                    })
                    // A provider's failure never counts as delivered: a provider is not an
                    // engine of ours a prompt could take down.
                    .map_err(|e| SendError::Connection {
                        message: chain(&e),
                        delivered: false,
                    }),
            }
        }
    }
}

/// A provider's answer that says its account, not the request, is the problem.
fn refused(dest: &Dest, status: StatusCode) -> bool {
    matches!(dest, Dest::Provider(_))
        && matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn provider_body_gets_the_provider_model_and_stream_usage() {
        let chat = |body: &[u8]| rewrite_for_provider(body, "theirs", ProviderEndpoint::Chat);
        let sent =
            chat(br#"{"model":"mine","stream":true,"stream_options":{"x":1},"messages":[]}"#)
                .unwrap();
        let v: Value = serde_json::from_slice(&sent.body).unwrap();
        assert_eq!(v["model"], "theirs");
        assert_eq!(v["stream_options"], json!({"x": 1, "include_usage": true}));
        assert_eq!(v["messages"], json!([]));
        assert!(sent.usage_added);
        assert_eq!(sent.client_model.as_deref(), Some("mine"));
        let sent = chat(br#"{"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(!sent.usage_added, "the client asked for usage itself");
        assert_eq!(sent.client_model, None);
        let v: Value = serde_json::from_slice(&sent.body).unwrap();
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
        let sent = chat(br#"{"prompt":"p"}"#).unwrap();
        assert!(!sent.usage_added);
        let v: Value = serde_json::from_slice(&sent.body).unwrap();
        assert_eq!(v, json!({"prompt": "p", "model": "theirs"}));
        assert!(chat(b"[1]").is_err());
    }

    /// Only chat and completions streams are asked for usage (others give it anyway, or would
    /// refuse `stream_options`), and a Responses request is not stored unless the client asked.
    #[test]
    fn other_endpoints_get_what_they_take() {
        let body = br#"{"model":"mine","input":"hi","stream":true}"#;
        let sent = rewrite_for_provider(body, "theirs", ProviderEndpoint::Responses).unwrap();
        let v: Value = serde_json::from_slice(&sent.body).unwrap();
        assert_eq!(v["store"], false);
        assert!(v.get("stream_options").is_none() && !sent.usage_added);
        let sent = rewrite_for_provider(
            br#"{"model":"mine","input":["a"]}"#,
            "theirs",
            ProviderEndpoint::Embeddings,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&sent.body).unwrap();
        assert_eq!(v, json!({"model": "theirs", "input": ["a"]}));
    }

    #[test]
    fn client_credentials_hop_headers_and_the_class_stay_behind() {
        let mut from = HeaderMap::new();
        from.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        from.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        from.insert(header::HOST, HeaderValue::from_static("router"));
        from.insert("x-request-id", HeaderValue::from_static("r1"));
        from.insert(CLASS_HEADER, HeaderValue::from_static("restricted"));
        let mut local = HeaderMap::new();
        forward_headers(&from, &mut local, false);
        assert_eq!(local.len(), 2, "{local:?}");
        assert!(local.contains_key(header::AUTHORIZATION));
        let mut prov = HeaderMap::new();
        forward_headers(&from, &mut prov, true);
        assert_eq!(prov.len(), 1, "{prov:?}");
        assert!(prov.contains_key("x-request-id"));
    }
}
