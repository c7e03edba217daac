//! HTTP for the simulated engine: hyper directly (not axum) because a dropped connection must be
//! closed without any response, and shutdown must drain connections we track ourselves.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::extra;
use super::faults::{self, Fault, SplitMix64};
use super::metrics::{self, Metrics, Outcome};
use super::model::{AdmitError, Engine, Placement, SeqId, estimate_prompt_tokens, token_due};
use super::openai::{self, InferenceRequest, Kind, Meta, Piece};
use super::{EngineSimConfig, EngineSimError};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Slow clients may not hold a connection open without sending a request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

struct Shared {
    config: EngineSimConfig,
    /// The model's time zero; model times are offsets from it.
    epoch: Instant,
    state: Mutex<State>,
    metrics: Metrics,
    fault_rng: Mutex<SplitMix64>,
    next_id: AtomicU64,
}

struct State {
    engine: Engine,
    /// Queued sequences, told their start time when promoted.
    waiters: HashMap<SeqId, oneshot::Sender<Duration>>,
}

impl Shared {
    fn new(config: EngineSimConfig) -> Self {
        Self {
            epoch: Instant::now(),
            state: Mutex::new(State {
                engine: Engine::new(config.engine_params()),
                waiters: HashMap::new(),
            }),
            metrics: Metrics::new(config.preset, &config.model, config.gpu_memory_bytes),
            fault_rng: Mutex::new(SplitMix64::new(config.seed)),
            next_id: AtomicU64::new(0),
            config,
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// A panic elsewhere must not wedge the engine; its state stays consistent per call.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn at(&self, offset: Duration) -> Instant {
        self.epoch + offset
    }
}

/// A sequence's place in the engine; dropping it releases the slot or queue place (also when
/// the client goes away mid-request) and promotes waiters.
struct Slot {
    shared: Arc<Shared>,
    id: SeqId,
    start: Option<Duration>,
    waiter: Option<oneshot::Receiver<Duration>>,
    /// Output tokens delivered, once the request completed normally.
    completed: Option<u64>,
}

impl Slot {
    fn admit(
        shared: &Arc<Shared>,
        prompt_tokens: u64,
        output_tokens: u64,
    ) -> Result<Self, AdmitError> {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let now = shared.now();
        let mut st = shared.lock();
        let (start, waiter) = match st.engine.admit(id, prompt_tokens, output_tokens, now)? {
            Placement::Running { started } => (Some(started), None),
            Placement::Queued { .. } => {
                let (tx, rx) = oneshot::channel();
                st.waiters.insert(id, tx);
                (None, Some(rx))
            }
        };
        drop(st);
        Ok(Slot {
            shared: shared.clone(),
            id,
            start,
            waiter,
            completed: None,
        })
    }

    /// Waits for a free slot (FIFO) and returns the start time.
    async fn started(&mut self) -> Duration {
        if let Some(s) = self.start {
            return s;
        }
        let start = match self.waiter.take() {
            Some(rx) => rx.await.unwrap_or_else(|_| self.shared.now()),
            None => self.shared.now(),
        };
        self.start = Some(start);
        start
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let now = self.shared.now();
        let released = {
            let mut st = self.shared.lock();
            st.waiters.remove(&self.id);
            let r = st.engine.release(self.id, now);
            for (id, at) in &r.promoted {
                if let Some(tx) = st.waiters.remove(id) {
                    // A waiter that went away meanwhile releases itself in its own drop.
                    let _ = tx.send(*at);
                }
            }
            r
        };
        let m = &self.shared.metrics;
        if released.was_running {
            m.add_tokens(
                released.prompt_tokens,
                self.completed.unwrap_or(released.generated),
            );
        }
        m.record(if self.completed.is_some() {
            Outcome::Success
        } else {
            Outcome::Cancelled
        });
    }
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish
/// (up to `drain_timeout`).
pub async fn serve(
    config: EngineSimConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EngineSimError> {
    config.validate()?;
    let shared = Arc::new(Shared::new(config));
    let connections = Arc::new(Semaphore::new(shared.config.max_connections));
    let (stop_tx, stop_rx) = watch::channel(());
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            s = crate::runtime::accept(&listener) => s,
        };
        tasks.spawn(connection(shared.clone(), stream, stop_rx.clone(), permit));
    }
    drop(listener);
    let _ = stop_tx.send(());
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(shared.config.drain_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            connections = tasks.len(),
            "drain timeout: closing remaining connections"
        );
        tasks.shutdown().await;
    }
    Ok(())
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    mut stop: watch::Receiver<()>,
    _permit: OwnedSemaphorePermit,
) {
    let kill = Arc::new(Notify::new());
    let svc = {
        let kill = kill.clone();
        hyper::service::service_fn(move |req| handle(shared.clone(), kill.clone(), req))
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        // Dropping the connection closes the socket without writing a response.
        _ = kill.notified() => return,
        _ = stop.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = kill.notified() => {}
    }
}

async fn handle(
    shared: Arc<Shared>,
    kill: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/metrics") => {
            let snap = shared.lock().engine.snapshot(shared.now());
            text(
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                shared.metrics.render(&snap),
            )
        }
        (&Method::GET, "/v1/models") => match authorize(&shared, &req) {
            Ok(()) => json(StatusCode::OK, &openai::models(&shared.config.model)),
            Err(failure) => failure.response(),
        },
        (&Method::POST, "/v1/chat/completions") => inference(shared, kill, req, Kind::Chat).await,
        (&Method::POST, "/v1/completions") => inference(shared, kill, req, Kind::Completion).await,
        (&Method::POST, "/v1/responses") => inference(shared, kill, req, Kind::Responses).await,
        (
            &Method::POST,
            "/v1/embeddings" | "/tokenize" | "/detokenize" | "/v1/audio/transcriptions",
        ) => instant(shared, req).await,
        (
            _,
            "/health"
            | "/metrics"
            | "/v1/models"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/responses"
            | "/v1/embeddings"
            | "/tokenize"
            | "/detokenize"
            | "/v1/audio/transcriptions",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
            "invalid_request_error",
            None,
        ),
        (_, path) => error(
            StatusCode::NOT_FOUND,
            &format!("no route for {path}"),
            "invalid_request_error",
            None,
        ),
    };
    Ok(resp)
}

/// Why a request failed the bearer-key check.
#[derive(Clone, Copy, Debug)]
enum AuthFailure {
    Missing,
    Wrong,
}

impl AuthFailure {
    /// The message never echoes what was sent: it may be a real key.
    fn response(self) -> Response<Body> {
        let message = match self {
            AuthFailure::Missing => "Missing bearer authentication in header.",
            AuthFailure::Wrong => "Incorrect API key provided.",
        };
        error(
            StatusCode::UNAUTHORIZED,
            message,
            "invalid_request_error",
            Some("invalid_api_key"),
        )
    }
}

fn authorize(shared: &Shared, req: &Request<Incoming>) -> Result<(), AuthFailure> {
    let Some(key) = &shared.config.api_key else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match given {
        Some(candidate) if key.matches(candidate) => Ok(()),
        Some(_) => Err(AuthFailure::Wrong),
        None => Err(AuthFailure::Missing),
    }
}

/// An endpoint answered at once, without a slot (see `extra`).
async fn instant(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let cfg = &shared.config;
    let m = &shared.metrics;
    if let Err(failure) = authorize(&shared, &req) {
        m.record(Outcome::Unauthorized);
        return failure.response();
    }
    let path = req.uri().path().to_string();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = match Limited::new(req.into_body(), cfg.max_body_bytes)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            m.record(Outcome::Invalid);
            let msg = format!("reading request body: {e}");
            return error(StatusCode::BAD_REQUEST, &msg, "invalid_request_error", None);
        }
    };
    let answer = match path.as_str() {
        "/v1/embeddings" => extra::embeddings(&body, &cfg.model, cfg.seed),
        "/tokenize" => extra::tokenize(&body),
        "/detokenize" => extra::detokenize(&body),
        _ => extra::transcription(&content_type, &body),
    };
    match answer {
        Ok(v) => {
            if let Some(n) = v["usage"]["prompt_tokens"].as_u64() {
                m.add_tokens(n, 0);
            }
            m.record(Outcome::Success);
            json(StatusCode::OK, &v)
        }
        Err(msg) => {
            m.record(Outcome::Invalid);
            error(StatusCode::BAD_REQUEST, &msg, "invalid_request_error", None)
        }
    }
}

async fn inference(
    shared: Arc<Shared>,
    kill: Arc<Notify>,
    req: Request<Incoming>,
    kind: Kind,
) -> Response<Body> {
    let cfg = &shared.config;
    let m = &shared.metrics;
    if let Err(failure) = authorize(&shared, &req) {
        m.record(Outcome::Unauthorized);
        return failure.response();
    }
    let body = match Limited::new(req.into_body(), cfg.max_body_bytes)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            m.record(Outcome::Invalid);
            let msg = format!("request body exceeds {} bytes", cfg.max_body_bytes);
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &msg,
                "invalid_request_error",
                Some("request_too_large"),
            );
        }
        Err(e) => {
            m.record(Outcome::Invalid);
            let msg = format!("reading request body: {e}");
            return error(StatusCode::BAD_REQUEST, &msg, "invalid_request_error", None);
        }
    };
    let parsed = match InferenceRequest::parse(kind, &body) {
        Ok(p) => p,
        Err(msg) => {
            m.record(Outcome::Invalid);
            return error(StatusCode::BAD_REQUEST, &msg, "invalid_request_error", None);
        }
    };
    if let Some(model) = parsed.model.as_deref().filter(|m| *m != cfg.model) {
        m.record(Outcome::Invalid);
        let msg = format!("The model `{model}` does not exist.");
        return error(
            StatusCode::NOT_FOUND,
            &msg,
            "invalid_request_error",
            Some("model_not_found"),
        );
    }
    if parsed.requested_tokens() == Some(0) {
        m.record(Outcome::Invalid);
        return error(
            StatusCode::BAD_REQUEST,
            "max_tokens must be at least 1",
            "invalid_request_error",
            None,
        );
    }

    // Drawn in arrival order, before any await, so a seed gives one sequence of faults.
    let fault = {
        let mut rng = shared
            .fault_rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        faults::decide(&cfg.faults, &mut rng)
    };
    if !cfg.faults.latency.is_zero() {
        tokio::time::sleep(cfg.faults.latency).await;
    }
    match fault {
        Fault::None => {}
        Fault::Drop => {
            m.record(Outcome::Dropped);
            kill.notify_one();
            // The connection task drops this future with the connection.
            return std::future::pending().await;
        }
        Fault::Fail(status) => {
            m.record(Outcome::Failed);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let (kind, code) = match status {
                StatusCode::TOO_MANY_REQUESTS => ("rate_limit_error", "rate_limit_exceeded"),
                StatusCode::SERVICE_UNAVAILABLE => ("server_error", "overloaded"),
                _ => ("server_error", "internal_error"),
            };
            let mut resp = error(
                status,
                "injected failure (engine-sim --fail-rate)",
                kind,
                Some(code),
            );
            if status != StatusCode::INTERNAL_SERVER_ERROR {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            return resp;
        }
    }

    let prompt_tokens = estimate_prompt_tokens(parsed.prompt_chars());
    let requested = parsed.requested_tokens();
    let output_tokens = requested
        .unwrap_or(cfg.default_max_tokens)
        .min(cfg.max_output_tokens);
    // Generation always runs to the token budget: "length" when the client or the cap set it.
    let finish = if requested.is_some() || output_tokens < cfg.default_max_tokens {
        "length"
    } else {
        "stop"
    };
    let slot = match Slot::admit(&shared, prompt_tokens, output_tokens) {
        Ok(s) => s,
        Err(e) => {
            m.record(Outcome::Rejected);
            let mut resp = error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("engine overloaded: {e}"),
                "server_error",
                Some("queue_full"),
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return resp;
        }
    };
    let meta = Meta {
        kind,
        id: format!(
            "{}-sim-{}",
            match kind {
                Kind::Chat => "chatcmpl",
                Kind::Completion => "cmpl",
                Kind::Responses => "resp",
            },
            slot.id
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: cfg.model.clone(),
    };
    let words = openai::tokens(
        cfg.seed ^ SplitMix64::new(slot.id).next_u64(),
        output_tokens,
    );
    let generation = Generation {
        shared: shared.clone(),
        slot: Some(slot),
        meta,
        words,
        prompt_tokens,
        finish,
        stream_usage: parsed.stream_usage(),
    };
    if parsed.stream {
        generation.stream()
    } else {
        generation.whole().await
    }
}

/// One admitted request's output.
struct Generation {
    shared: Arc<Shared>,
    slot: Option<Slot>,
    meta: Meta,
    words: Vec<String>,
    prompt_tokens: u64,
    finish: &'static str,
    /// `stream_options.include_usage`: a usage chunk before `[DONE]`.
    stream_usage: bool,
}

enum Step {
    Start,
    Token(u64),
    Finish,
    Usage,
    Done,
    End,
}

impl Generation {
    fn n(&self) -> u64 {
        self.words.len() as u64
    }

    async fn start(&mut self) -> Duration {
        match self.slot.as_mut() {
            Some(slot) => slot.started().await,
            None => self.shared.now(),
        }
    }

    async fn until_token(&self, start: Duration, k: u64) {
        let params = &self.shared.config.engine_params();
        let due = self.shared.at(start + token_due(params, k));
        // tokio rounds a timer up to the next millisecond even when it is already due, which
        // would add up to 1 ms to every request of a "no delay" engine.
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
    }

    /// Marks the request done and frees its slot at once, before the last bytes go out.
    fn complete(&mut self) {
        if let Some(mut slot) = self.slot.take() {
            slot.completed = Some(self.n());
        }
    }

    async fn whole(mut self) -> Response<Body> {
        let start = self.start().await;
        self.until_token(start, self.n()).await;
        self.complete();
        let usage = openai::usage(self.prompt_tokens, self.n());
        let v = openai::response(&self.meta, &self.words.concat(), self.finish, usage);
        json(StatusCode::OK, &v)
    }

    /// SSE: the role chunk when prefill ends (chat), one chunk per token on the token clock,
    /// the finish chunk, a usage chunk if asked for, then `[DONE]`. Dropping the body (client gone) drops
    /// the slot.
    fn stream(self) -> Response<Body> {
        let stream = futures::stream::unfold(
            (self, Step::Start, Duration::ZERO),
            |(mut g, step, start)| async move {
                let (event, next, start) = match step {
                    Step::Start => {
                        let start = g.start().await;
                        if g.meta.kind == Kind::Chat {
                            let prefill = g.shared.config.prefill;
                            tokio::time::sleep_until(g.shared.at(start + prefill)).await;
                            (
                                openai::sse(&openai::chunk(&g.meta, Piece::Role)),
                                Step::Token(1),
                                start,
                            )
                        } else {
                            g.until_token(start, 1).await;
                            (
                                openai::sse(&openai::chunk(&g.meta, Piece::Text(&g.words[0]))),
                                g.after(1),
                                start,
                            )
                        }
                    }
                    Step::Token(k) => {
                        g.until_token(start, k).await;
                        let idx = usize::try_from(k - 1).unwrap_or(0);
                        (
                            openai::sse(&openai::chunk(&g.meta, Piece::Text(&g.words[idx]))),
                            g.after(k),
                            start,
                        )
                    }
                    Step::Finish => {
                        g.complete();
                        (
                            openai::sse(&openai::chunk(&g.meta, Piece::Finish(g.finish))),
                            if g.stream_usage {
                                Step::Usage
                            } else {
                                Step::Done
                            },
                            start,
                        )
                    }
                    Step::Usage => {
                        let usage = openai::usage(g.prompt_tokens, g.n());
                        (
                            openai::sse(&openai::chunk(&g.meta, Piece::Usage(usage))),
                            Step::Done,
                            start,
                        )
                    }
                    Step::Done => (openai::SSE_DONE.to_owned(), Step::End, start),
                    Step::End => return None,
                };
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(event))),
                    (g, next, start),
                ))
            },
        );
        let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }

    fn after(&self, k: u64) -> Step {
        if k < self.n() {
            Step::Token(k + 1)
        } else {
            Step::Finish
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json(status: StatusCode, v: &Value) -> Response<Body> {
    text(status, "application/json", v.to_string())
}

fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response<Body> {
    json(status, &openai::error(message, kind, code))
}

/// A running engine-sim in a background task, for tests and benchmarks. Dropping it stops the
/// server (in-flight requests still finish).
pub struct EngineSimServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), EngineSimError>>,
}

impl EngineSimServer {
    /// Binds 127.0.0.1 on a free port and serves there.
    pub async fn start(config: EngineSimConfig) -> Result<Self, EngineSimError> {
        config.validate()?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Self::start_on(config, listener)
    }

    /// Serves on an already bound listener.
    pub fn start_on(
        config: EngineSimConfig,
        listener: TcpListener,
    ) -> Result<Self, EngineSimError> {
        config.validate()?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(config, listener, async move {
            // A dropped sender also means stop.
            let _ = rx.await;
        }));
        Ok(Self {
            addr,
            stop: Some(tx),
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, waits for in-flight requests, and returns the server's result.
    pub async fn stop(self) -> Result<(), EngineSimError> {
        let Self { stop, task, .. } = self;
        drop(stop);
        task.await?
    }
}
