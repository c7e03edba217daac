//! The router's HTTP side, on hyper directly: per-connection tasks we track for a graceful drain,
//! and a response body that relays upstream frames as they arrive (no buffering; a provider
//! stream whose usage chunk is taken out holds back at most a partial line) while it holds the
//! request's lease, times it, and reads provider usage on the way through.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Value, json};
use std::net::ToSocketAddrs;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::admission::RejectReason;
use super::config::RouterConfig;
use super::metrics;
use super::state::{BreakerSettings, Dest, Excluded, Lease, Shared, Ticket};
use super::timer::{CoarseSleep, CoarseTimer};
use super::upstream::{EngineBody, EnginePool, Outgoing};
use super::usage::{UsageChunkFilter, UsageScanner};

type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;
type PlainClient = Client<HttpConnector, Full<Bytes>>;
type TlsClient = Client<HttpsConnector, Full<Bytes>>;

/// Slow clients may not hold a connection open without sending a request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts per request when connections fail before any response byte.
const MAX_ATTEMPTS: usize = 3;
/// After the drain timeout, how long requests still waiting in the queue have to send their 503.
const LAST_ANSWERS: Duration = Duration::from_secs(1);
/// Outcomes of an answer cut off upstream, and of one its client walked away from.
const ABORTED: &str = "aborted";
const CANCELLED: &str = "cancelled";
const IDLE_POOL_TIMEOUT: Duration = Duration::from_secs(90);
/// Non-streamed answers up to this size are read whole and sent in one write.
const SMALL_BODY_BYTES: u64 = 64 << 10;

/// Headers that belong to one hop, never forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Server settings besides the live config.
#[derive(Clone, Debug)]
pub struct RouterOptions {
    pub config: RouterConfig,
    /// Backends given on the command line, added to the config's.
    pub extra_backends: Vec<String>,
    pub max_body_bytes: usize,
    /// Served model name for `/v1/models` when the config does not name one.
    pub model: Option<String>,
    pub breaker: BreakerSettings,
    /// Longest a shutdown waits for in-flight requests (streams included).
    pub drain_timeout: Duration,
    pub capacity_exhausted: bool,
    /// Longest a local engine may take to send response headers (a hung engine must not hold
    /// its clients and slots forever; past it the client gets 504), or pause mid-answer (past
    /// it the answer is cut off).
    pub engine_timeout: Duration,
    /// The backends will come from EndpointSlices: none until then, and not ready before the
    /// first list (an empty list would send everything to providers or the queue).
    pub in_cluster: bool,
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            config: RouterConfig::from_yaml("{}").unwrap_or_else(|_| unreachable!()),
            extra_backends: Vec::new(),
            max_body_bytes: 16 << 20,
            model: None,
            breaker: BreakerSettings::default(),
            drain_timeout: Duration::from_secs(300),
            capacity_exhausted: false,
            engine_timeout: Duration::from_secs(600),
            in_cluster: false,
        }
    }
}

/// The local backends of a standalone router: the config's plus the command line's.
pub fn standalone_backends(config: &RouterConfig, extra: &[String]) -> Vec<String> {
    let mut all = config.backends.clone();
    all.extend(extra.iter().cloned());
    all
}

struct App {
    shared: Arc<Shared>,
    /// Local engines: connections driven by the requests' own tasks.
    engines: Arc<EnginePool>,
    /// `http` providers when there is no TLS client.
    plain: PlainClient,
    /// `None` when the system has no CA certificates: `https` providers then fail with 502.
    tls: Option<TlsClient>,
    max_body_bytes: usize,
    model: Option<String>,
    engine_timeout: Duration,
    /// Per-request deadlines (header reads, engine and provider answers).
    timer: CoarseTimer,
    /// Open client connections on this thread.
    open: Arc<AtomicUsize>,
}

fn http_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http
}

fn clients() -> (PlainClient, Option<TlsClient>) {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_POOL_TIMEOUT);
    let plain = builder.build(http_connector());
    let tls = match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
        Ok(b) => Some(
            builder.build(
                b.https_or_http()
                    .enable_http1()
                    .wrap_connector(http_connector()),
            ),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "no CA certificates: https providers will fail");
            None
        }
    };
    (plain, tls)
}

impl App {
    fn new(shared: Arc<Shared>, opts: &RouterOptions, open: Arc<AtomicUsize>) -> Arc<Self> {
        let (plain, tls) = clients();
        let timer = CoarseTimer::start();
        Arc::new(App {
            shared,
            engines: EnginePool::start(timer.clone()),
            plain,
            tls,
            max_body_bytes: opts.max_body_bytes,
            model: opts.model.clone(),
            engine_timeout: opts.engine_timeout,
            timer,
            open,
        })
    }
}

fn shared_for(opts: &RouterOptions) -> Arc<Shared> {
    let backends = if opts.in_cluster {
        Vec::new()
    } else {
        standalone_backends(&opts.config, &opts.extra_backends)
    };
    let shared = Shared::new(opts.config.clone(), backends, opts.breaker);
    shared.set_synced(!opts.in_cluster);
    shared.set_capacity_exhausted(opts.capacity_exhausted);
    shared
}

enum Worker {
    Task(tokio::task::JoinHandle<()>),
    Thread(std::thread::JoinHandle<()>),
}

/// A running router. Dropping it stops the server.
pub struct RouterServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Open client connections per serving thread.
    open: Vec<Arc<AtomicUsize>>,
    stop: watch::Sender<bool>,
    workers: Vec<Worker>,
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = rx.wait_for(|s| *s).await;
}

/// A non-blocking listener with room for connection bursts (std's default backlog is 128).
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Connections a serving thread takes before others get new ones: a few busy connections
/// keep one event loop awake, and spreading them would wake several loops per request.
const PACK_CONNECTIONS: usize = 8;

/// Where thread 0 sends each accepted connection.
struct Spread {
    /// Open connections per thread.
    open: Vec<Arc<AtomicUsize>>,
    /// To threads 1.., in order.
    handoff: Vec<tokio::sync::mpsc::UnboundedSender<std::net::TcpStream>>,
}

impl Spread {
    /// Thread 0 up to `PACK_CONNECTIONS`, then the thread with the fewest (the lowest first).
    fn pick(&self) -> usize {
        let n = |i: usize| self.open[i].load(Ordering::Relaxed);
        if n(0) < PACK_CONNECTIONS {
            return 0;
        }
        (0..self.open.len()).min_by_key(|&i| n(i)).unwrap_or(0)
    }
}

enum Source {
    Listener(std::net::TcpListener),
    Tokio(TcpListener, Option<Spread>),
    /// Connections thread 0 handed over, already counted in the counter.
    Handoff(
        tokio::sync::mpsc::UnboundedReceiver<std::net::TcpStream>,
        Arc<AtomicUsize>,
    ),
}

impl Source {
    /// The next connection for this thread, and whether it is counted in `open` already;
    /// `None` once the hand-off has stopped.
    async fn next(&mut self) -> Option<(TcpStream, bool)> {
        match self {
            Source::Listener(_) => None,
            Source::Tokio(l, spread) => loop {
                let s = crate::runtime::accept(l).await;
                let Some(spread) = spread.as_ref() else {
                    return Some((s, false));
                };
                let to = spread.pick();
                if to == 0 {
                    return Some((s, false));
                }
                // Counted now, so a burst of connections does not all go to one thread.
                spread.open[to].fetch_add(1, Ordering::Relaxed);
                match s.into_std() {
                    Ok(s) => {
                        // That thread has stopped (a shutdown under way): this one serves it.
                        if let Err(back) = spread.handoff[to - 1].send(s) {
                            spread.open[to].fetch_sub(1, Ordering::Relaxed);
                            match TcpStream::from_std(back.0) {
                                Ok(s) => return Some((s, false)),
                                Err(e) => {
                                    tracing::warn!(error = %e, "could not serve a connection")
                                }
                            }
                        }
                    }
                    Err(e) => {
                        spread.open[to].fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "could not hand a connection over");
                    }
                }
            },
            Source::Handoff(rx, open) => loop {
                let s = rx.recv().await?;
                if let Some(s) = take_over(s, open) {
                    return Some((s, true));
                }
            },
        }
    }

    /// At shutdown: connections handed over but not yet served, to be served like the rest.
    fn leftovers(&mut self) -> Vec<TcpStream> {
        let Source::Handoff(rx, open) = self else {
            return Vec::new();
        };
        rx.close();
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|s| take_over(s, open))
            .collect()
    }
}

fn take_over(s: std::net::TcpStream, open: &AtomicUsize) -> Option<TcpStream> {
    match TcpStream::from_std(s) {
        Ok(s) => Some(s),
        Err(e) => {
            open.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "could not take a connection over");
            None
        }
    }
}

impl RouterServer {
    /// Serves on an already bound listener, in the current runtime.
    pub fn start_on(opts: RouterOptions, listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let shared = shared_for(&opts);
        let open = Arc::new(AtomicUsize::new(0));
        let app = App::new(shared.clone(), &opts, open.clone());
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(serve(
            app,
            Source::Tokio(listener, None),
            opts.drain_timeout,
            stopped(rx),
        ));
        Ok(Self {
            addr,
            shared,
            open: vec![open],
            stop,
            workers: vec![Worker::Task(task)],
        })
    }

    /// Serves `config.listen` on `threads` threads, each with its own single-threaded runtime
    /// and its own upstream pools: a request, its engine connection and its response stay on
    /// one thread, with no cross-thread wake-ups (the shape of nginx's workers). Thread 0
    /// accepts and packs connections onto as few threads as the load needs (see `Spread`):
    /// an event loop that is already awake serves a request for less than one woken up for
    /// it. Routing state is shared, so limits and the queue are global.
    pub fn start_threads(opts: RouterOptions, threads: usize) -> std::io::Result<Self> {
        let addr = opts
            .config
            .listen
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| {
                std::io::Error::other(format!("{:?} names no address", opts.config.listen))
            })?;
        let listener = bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = shared_for(&opts);
        let (stop, rx) = watch::channel(false);
        let threads = threads.max(1);
        let open: Vec<Arc<AtomicUsize>> = (0..threads).map(|_| Arc::default()).collect();
        let mut handoff = Vec::new();
        let mut sources = vec![Source::Listener(listener)];
        for counter in &open[1..] {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            handoff.push(tx);
            sources.push(Source::Handoff(rx, counter.clone()));
        }
        let mut spread = Some(Spread {
            open: open.clone(),
            handoff,
        });
        let mut workers = Vec::new();
        for (i, source) in sources.into_iter().enumerate() {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
            let (shared, opts, rx) = (shared.clone(), opts.clone(), rx.clone());
            let (counter, spread) = (open[i].clone(), spread.take());
            let h = std::thread::Builder::new()
                .name(format!("router-{i}"))
                .spawn(move || {
                    super::sharded::use_shard(i);
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let source = match source {
                            Source::Listener(l) => match TcpListener::from_std(l) {
                                Ok(l) => Source::Tokio(l, spread),
                                Err(e) => {
                                    let _ = ready_tx.send(Err(e));
                                    return;
                                }
                            },
                            other => other,
                        };
                        let _ = ready_tx.send(Ok(()));
                        let app = App::new(shared, &opts, counter);
                        serve(app, source, opts.drain_timeout, stopped(rx)).await;
                    });
                })?;
            workers.push(Worker::Thread(h));
            ready_rx
                .recv()
                .map_err(|_| std::io::Error::other("router thread failed to start"))??;
        }
        Ok(Self {
            addr,
            shared,
            open,
            stop,
            workers,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Open client connections on each serving thread.
    pub fn connections(&self) -> Vec<usize> {
        self.open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// The live state: config, backends and capacity setters for sources and tests.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Shuts down as a pod should: readiness fails at once, new connections are still served
    /// for `delay` (Services send them until their endpoints drop the pod) unless `cut_short`
    /// ends first, then [`Self::stop`].
    pub async fn close(self, delay: Duration, cut_short: impl Future<Output = ()>) {
        self.shared.set_closing();
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "shutdown requested: still serving while endpoints update"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cut_short => {}
            }
        }
        tracing::info!("shutdown: finishing in-flight requests");
        self.stop().await;
    }

    /// Stops accepting, lets in-flight requests (streams too) finish, then returns.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for w in std::mem::take(&mut self.workers) {
            let r = match w {
                Worker::Task(t) => t.await.map_err(|e| e.to_string()),
                Worker::Thread(h) => tokio::task::spawn_blocking(move || h.join())
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|_| "router thread panicked".to_string())),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "router worker failed");
            }
        }
    }
}

impl Drop for RouterServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn serve(
    app: Arc<App>,
    mut source: Source,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let drain_signal = Arc::new(Drain::default());
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while tasks.try_join_next().is_some() {}
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            s = source.next() => s,
        };
        let Some((stream, counted)) = stream else {
            // The accepting thread stopped: wait for our own stop.
            shutdown.as_mut().await;
            break;
        };
        if !counted {
            app.open.fetch_add(1, Ordering::Relaxed);
        }
        // Made before the spawn: a task aborted before its first poll still counts out.
        let open = Open(app.open.clone());
        tasks.spawn(connection(app.clone(), stream, drain_signal.clone(), open));
    }
    app.shared.set_closing();
    let leftovers = source.leftovers();
    if !leftovers.is_empty() {
        for stream in leftovers {
            let open = Open(app.open.clone());
            tasks.spawn(connection(app.clone(), stream, drain_signal.clone(), open));
        }
        // Let them read the requests already sent before the drain closes idle connections.
        tokio::task::yield_now().await;
    }
    drop(source);
    drain_signal.start();
    tracing::info!(connections = tasks.len(), "router draining");
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(drain_timeout, drain).await.is_err() {
        // Requests still waiting for a slot get a 503 to retry elsewhere, not a closed
        // connection; a moment to send it, then the rest are cut.
        app.shared.refuse_waiting();
        let answered = async { while tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(LAST_ANSWERS, answered).await;
        tracing::warn!(
            connections = tasks.len(),
            "drain timeout: closing remaining connections"
        );
        tasks.shutdown().await;
    }
}

/// Tells open client connections to finish the response in progress and close. A connection
/// registers its waker once and checks a flag on each poll: a channel receiver would re-register
/// on every poll, several times per request.
#[derive(Default)]
struct Drain {
    started: AtomicBool,
    wakers: std::sync::Mutex<std::collections::HashMap<u64, std::task::Waker>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Drain {
    fn start(&self) {
        self.started.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.lock());
        for (_, w) in wakers {
            w.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, std::task::Waker>> {
        self.wakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One connection's place in the drain list.
struct DrainSlot {
    drain: Arc<Drain>,
    id: u64,
    waker: Option<std::task::Waker>,
}

impl DrainSlot {
    fn new(drain: Arc<Drain>) -> Self {
        let id = drain.next_id.fetch_add(1, Ordering::Relaxed);
        Self {
            drain,
            id,
            waker: None,
        }
    }

    /// Whether the drain has started; otherwise makes sure it will wake this task.
    fn started(&mut self, cx: &Context<'_>) -> bool {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let w = cx.waker().clone();
            self.drain.lock().insert(self.id, w.clone());
            self.waker = Some(w);
        }
        // Registered before the check: a drain that starts in between still wakes us.
        self.drain.started.load(Ordering::SeqCst)
    }
}

impl Drop for DrainSlot {
    fn drop(&mut self) {
        if self.waker.is_some() {
            self.drain.lock().remove(&self.id);
        }
    }
}

/// Counts a connection out of its thread when it ends.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(app: Arc<App>, stream: TcpStream, drain: Arc<Drain>, _open: Open) {
    let timer = app.timer.clone();
    // Each request holds the connection's own handle: its count stays on this thread, where
    // the shared `App`'s count would bounce between the serving threads on every request.
    let conn_app = Arc::new(app);
    let svc = hyper::service::service_fn(move |req| {
        let app = conn_app.clone();
        async move { Ok::<_, Infallible>(handle(&app, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(timer)
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Answers are mostly small and whole (see `relay`): copying them after the head costs
        // less than handing the kernel a list of buffers.
        .writev(false);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    let mut slot = DrainSlot::new(drain);
    let mut graceful = false;
    let r = std::future::poll_fn(|cx| {
        if !graceful && slot.started(cx) {
            // Finishes the response in progress (a stream runs to its end), then closes.
            conn.as_mut().graceful_shutdown();
            graceful = true;
        }
        conn.as_mut().poll(cx)
    })
    .await;
    if let Err(e) = r {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<RouterBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            if app.shared.closing() {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else if !app.shared.synced() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "waiting for the first list of engine endpoints\n",
                )
            } else {
                text(StatusCode::OK, "text/plain", "ok\n")
            }
        }
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            app.shared.metrics.render(),
        ),
        (&Method::GET, "/v1/models") => json_response(StatusCode::OK, &models(app)),
        (&Method::POST, "/v1/chat/completions" | "/v1/completions") => proxy(app, req).await,
        (_, "/healthz" | "/readyz" | "/metrics" | "/v1/models")
        | (_, "/v1/chat/completions" | "/v1/completions") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
            "invalid_request_error",
            "method_not_allowed",
        ),
        (_, path) => error(
            StatusCode::NOT_FOUND,
            &format!("no route for {path}"),
            "invalid_request_error",
            "not_found",
        ),
    }
}

fn models(app: &App) -> Value {
    let cfg = app.shared.config();
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

/// Why an upstream attempt produced no response.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("{0}")]
    Connection(String),
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

async fn proxy(app: &Arc<App>, req: Request<Incoming>) -> Response<RouterBody> {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let m = &app.shared.metrics;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_body_bytes as u64) {
        return too_large(app);
    }
    let mut body = body;
    let body = match read_to_end(&mut body, app.max_body_bytes, |_| {}).await {
        Ok(Some(b)) => b,
        Ok(None) => return too_large(app),
        Err(e) => {
            m.request(metrics::NONE, "bad_request");
            return error(
                StatusCode::BAD_REQUEST,
                &format!("reading request body: {e}"),
                "invalid_request_error",
                "bad_request",
            );
        }
    };
    let mut lease = match app.shared.acquire().await {
        Ticket::Go(l) => l,
        Ticket::Reject(r) => return reject(app, r),
    };
    let mut excluded = Excluded::default();
    let mut attempt = 1;
    loop {
        let r = match send(app, &lease, &parts, &body).await {
            // Nothing has reached the client yet, and the provider's body may quote the key.
            Ok(resp) if refused(&lease.dest, resp.status()) => {
                Err(SendError::Refused(resp.status()))
            }
            r => r,
        };
        // Cloned only when the lease is let go of below (the common path clones nothing).
        let dest = &lease.dest;
        match r {
            Ok(resp) => return relay(resp, lease, arrived).await,
            Err(e @ (SendError::Connection(_) | SendError::Refused(_))) => {
                let (dest, sent) = (dest.clone(), lease.sent_ms);
                tracing::warn!(destination = dest.label(), attempt, error = %e, "upstream failed before a response");
                // Whether the queue would keep the retry from the failed destination.
                let may_queue = match &dest {
                    Dest::Provider(p) => {
                        app.shared.provider_result(&p.name, false, sent);
                        true
                    }
                    Dest::Local(b) => app.shared.set_aside(b),
                };
                excluded.add(&dest);
                drop(lease);
                let next = if attempt < MAX_ATTEMPTS {
                    let queued = excluded.providers_only();
                    match app.shared.readmit(arrived, &excluded) {
                        Some(l) => Some(l),
                        // Nothing else has room now: wait for it in its place by arrival, if
                        // anything else could ever take it.
                        None if may_queue && app.shared.serves_beyond(&queued) => {
                            match app.shared.requeue(arrived, queued).await {
                                Ticket::Go(l) => Some(l),
                                Ticket::Reject(r) => return reject(app, r),
                            }
                        }
                        None => None,
                    }
                } else {
                    None
                };
                match next {
                    Some(l) => {
                        lease = l;
                        attempt += 1;
                    }
                    None => {
                        m.request(dest.label(), "upstream_unavailable");
                        let msg = match e {
                            SendError::Refused(_) => {
                                "the provider refused the router's credentials"
                            }
                            _ => "upstream connection failed before a response",
                        };
                        return error(
                            StatusCode::BAD_GATEWAY,
                            msg,
                            "server_error",
                            "upstream_unavailable",
                        );
                    }
                }
            }
            Err(SendError::Timeout(t)) => {
                tracing::warn!(destination = dest.label(), timeout = ?t, "upstream did not answer in time");
                if let Dest::Provider(p) = &dest {
                    app.shared.provider_result(&p.name, false, lease.sent_ms);
                }
                m.request(dest.label(), "timeout");
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream did not answer in time",
                    "server_error",
                    "upstream_timeout",
                );
            }
            Err(SendError::BadBody(e)) => {
                m.request(dest.label(), "bad_request");
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("request body is not a JSON object: {e}"),
                    "invalid_request_error",
                    "bad_request",
                );
            }
            Err(e @ SendError::NoTls) => {
                tracing::error!(destination = dest.label(), error = %e, "cannot reach provider");
                m.request(dest.label(), "upstream_unavailable");
                return error(
                    StatusCode::BAD_GATEWAY,
                    &e.to_string(),
                    "server_error",
                    "upstream_unavailable",
                );
            }
        }
    }
}

/// Whether a client's header goes upstream. `Host` and `Content-Length` come from the new
/// request, and `Expect` was answered here (the body is read before anything is sent).
fn forwarded(k: &HeaderName, provider: bool) -> bool {
    if HOP_BY_HOP.contains(k)
        || k == header::HOST
        || k == header::CONTENT_LENGTH
        || k == header::EXPECT
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

/// The provider's model, and usage in streams (the budget needs it); the rest stays as sent.
/// Also whether the usage chunk was asked for on the client's behalf, to be taken out again.
pub fn rewrite_for_provider(body: &[u8], model: &str) -> Result<(Bytes, bool), String> {
    let mut v: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| e.to_string())?;
    v.insert("model".into(), Value::String(model.into()));
    let mut added = false;
    if v.get("stream").and_then(Value::as_bool) == Some(true) {
        let opts = v
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(o) = opts {
            added = o.get("include_usage").and_then(Value::as_bool) != Some(true);
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    serde_json::to_vec(&v)
        .map(|b| (Bytes::from(b), added))
        .map_err(|e| e.to_string())
}

async fn send(
    app: &App,
    lease: &Lease,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Result<Response<Upstream>, SendError> {
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    match &lease.dest {
        Dest::Local(backend) => {
            let (authority, host) = backend.authority.as_ref().ok_or_else(|| {
                SendError::Connection(format!("{:?} is not host:port", backend.addr))
            })?;
            // Origin form, as a client talking to the engine directly would send it.
            let headers = parts.headers.iter().filter(|(k, _)| forwarded(k, false));
            let req = Outgoing::new(&parts.method, pq, host, headers, body);
            match app
                .timer
                .within(app.engine_timeout, app.engines.send(authority, &req))
                .await
            {
                None => Err(SendError::Timeout(app.engine_timeout)),
                Some(Ok(resp)) => {
                    Ok(resp
                        .map(|b| Upstream::Engine(b, Stall::new(&app.timer, app.engine_timeout))))
                }
                Some(Err(e)) => Err(SendError::Connection(chain(&e))),
            }
        }
        Dest::Provider(p) => {
            let rest = pq.strip_prefix("/v1").unwrap_or(pq);
            let (body, added_usage) =
                rewrite_for_provider(body, &p.model).map_err(SendError::BadBody)?;
            let mut req = Request::new(Full::new(body));
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = format!("{}{rest}", p.base)
                .parse()
                .map_err(|e: http::uri::InvalidUri| SendError::Connection(e.to_string()))?;
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
            match app.timer.within(p.timeout, fut).await {
                None => Err(SendError::Timeout(p.timeout)),
                Some(r) => r
                    .map(|r| {
                        r.map(|b| {
                            Upstream::Provider(b, Stall::new(&app.timer, p.timeout), added_usage)
                        })
                    })
                    .map_err(|e| SendError::Connection(chain(&e))),
            }
        }
    }
}

/// A provider's answer that says its account, not the request, is the problem.
fn refused(dest: &Dest, status: StatusCode) -> bool {
    matches!(dest, Dest::Provider(_))
        && matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
}

/// An answer that counts against the upstream (and a provider's breaker) as soon as it comes.
fn upstream_failed(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

fn outcome_of(status: StatusCode) -> &'static str {
    if status.is_success() {
        metrics::SUCCESS
    } else if upstream_failed(status) {
        "upstream_error"
    } else {
        "client_error"
    }
}

async fn relay(resp: Response<Upstream>, lease: Lease, arrived: Instant) -> Response<RouterBody> {
    let status = resp.status();
    let (mut parts, body) = resp.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut tap = None;
    let mut filter = None;
    let mut breaker_pending = false;
    if let Dest::Provider(p) = &lease.dest {
        if upstream_failed(status) {
            lease
                .shared()
                .provider_result(&p.name, false, lease.sent_ms);
        } else {
            // Told when the answer ends: one cut off or stalled mid-way is a failure too.
            breaker_pending = true;
        }
        if status.is_success() {
            if sse && matches!(body, Upstream::Provider(_, _, true)) {
                // Reads the usage too.
                filter = Some(UsageChunkFilter::default());
                // The answer gets shorter than the provider said.
                parts.headers.remove(header::CONTENT_LENGTH);
            } else {
                tap = Some(UsageScanner::new(sse));
            }
        }
    }
    // Engines rarely send any: one pass over the names costs less than a lookup for each.
    if parts.headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        for h in &HOP_BY_HOP {
            parts.headers.remove(h);
        }
    }
    let small = !sse
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= SMALL_BODY_BYTES);
    let mut relay = Relay {
        inner: body,
        lease: Some(lease),
        tap,
        filter,
        trailers: None,
        arrived,
        first_byte: false,
        outcome: outcome_of(status),
        breaker_pending,
    };
    if small {
        // A small sized answer (no stream) goes out with its head in one write, as nginx
        // does; a client cannot use half a JSON document anyway.
        return match relay.read_small().await {
            Ok(b) => Response::from_parts(parts, RouterBody::Full(Some(b))),
            Err(e) => {
                tracing::warn!(destination = relay.label(), error = %e, "upstream response cut short");
                relay.finish(ABORTED);
                error(
                    StatusCode::BAD_GATEWAY,
                    "upstream response cut short",
                    "server_error",
                    "upstream_unavailable",
                )
            }
        };
    }
    Response::from_parts(parts, RouterBody::Relay(Box::new(relay)))
}

/// Time to first byte once, and usage as the bytes pass.
fn observe(
    lease: Option<&Lease>,
    tap: &mut Option<UsageScanner>,
    arrived: Instant,
    first_byte: &mut bool,
    d: &Bytes,
) {
    if !*first_byte {
        *first_byte = true;
        if let Some(l) = lease {
            l.metrics().ttfb.observe(arrived.elapsed().as_secs_f64());
        }
    }
    if let Some(t) = tap {
        t.feed(d);
    }
}

/// Reads a body whole; `Ok(None)` when it exceeds `limit` bytes. Stops at the declared length:
/// waiting for the end-of-body signal would cost another wake-up of the connection's task.
async fn read_to_end<B: Body<Data = Bytes> + Unpin>(
    body: &mut B,
    limit: usize,
    mut on_data: impl FnMut(&Bytes),
) -> Result<Option<Bytes>, B::Error> {
    let mut single: Option<Bytes> = None;
    let mut buf = bytes::BytesMut::new();
    let mut total = 0usize;
    while !body.is_end_stream() {
        let next = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx));
        let Some(f) = next.await else {
            break;
        };
        let Ok(d) = f?.into_data() else {
            continue;
        };
        total = total.saturating_add(d.len());
        if total > limit {
            return Ok(None);
        }
        on_data(&d);
        // One chunk (the usual case) is passed on without a copy.
        match single.take() {
            None if buf.is_empty() => single = Some(d),
            first => {
                if let Some(f) = first {
                    buf.extend_from_slice(&f);
                }
                buf.extend_from_slice(&d);
            }
        }
    }
    Ok(Some(single.unwrap_or_else(|| buf.freeze())))
}

/// A response body: either the router's own, or an upstream's relayed frame by frame.
pub enum RouterBody {
    Full(Option<Bytes>),
    Relay(Box<Relay>),
}

/// An answer's body: an engine's, read on its connection here, or a provider's from hyper
/// (and whether its usage chunk was asked for on the client's behalf).
pub enum Upstream {
    Engine(EngineBody, Stall),
    Provider(Incoming, Stall, bool),
}

/// An answer may pause for at most its upstream's timeout between two frames: one that stalls
/// mid-stream (a hung engine or provider) ends the answer instead of holding the client and a
/// slot forever.
pub struct Stall {
    timer: CoarseTimer,
    limit: Duration,
    sleep: Option<CoarseSleep>,
}

impl Stall {
    fn new(timer: &CoarseTimer, limit: Duration) -> Self {
        Stall {
            timer: timer.clone(),
            limit,
            sleep: None,
        }
    }

    fn poll_frame<B>(
        &mut self,
        body: &mut B,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        if let Poll::Ready(f) = Pin::new(body).poll_frame(cx) {
            self.sleep = None;
            return Poll::Ready(f.map(|f| f.map_err(Into::into)));
        }
        let limit = self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| self.timer.sleep_until(Instant::now() + limit));
        ready!(Pin::new(sleep).poll(cx));
        self.sleep = None;
        Poll::Ready(Some(Err(format!(
            "the upstream sent nothing for {limit:?} mid-answer"
        )
        .into())))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for Upstream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = match self.get_mut() {
            Upstream::Engine(b, stall) => ready!(stall.poll_frame(b, cx)),
            Upstream::Provider(b, stall, _) => ready!(stall.poll_frame(b, cx)),
        };
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Upstream::Engine(b, _) => b.is_end_stream(),
            Upstream::Provider(b, ..) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Upstream::Engine(b, _) => b.size_hint(),
            Upstream::Provider(b, ..) => b.size_hint(),
        }
    }
}

pub struct Relay {
    inner: Upstream,
    /// Held until the body ends or the client goes away.
    lease: Option<Lease>,
    /// Reads usage as the bytes pass, unless `filter` does.
    tap: Option<UsageScanner>,
    /// Takes out the usage chunk the client did not ask for, reading the usage.
    filter: Option<UsageChunkFilter>,
    /// Trailers held back while the filter's last line goes out.
    trailers: Option<Frame<Bytes>>,
    arrived: Instant,
    first_byte: bool,
    outcome: &'static str,
    /// The provider's breaker still waits for this answer's outcome.
    breaker_pending: bool,
}

impl Relay {
    fn label(&self) -> String {
        self.lease
            .as_ref()
            .map_or_else(String::new, |l| l.dest.label().to_string())
    }

    /// Reads the whole (small, sized) body, then finishes: the slot frees as soon as the
    /// upstream is done.
    async fn read_small(&mut self) -> Result<Bytes, BoxError> {
        let Relay {
            inner,
            lease,
            tap,
            arrived,
            first_byte,
            ..
        } = self;
        let r = read_to_end(inner, usize::MAX, |d| {
            observe(lease.as_ref(), tap, *arrived, first_byte, d)
        })
        .await;
        let b = r?.unwrap_or_default();
        self.ended();
        Ok(b)
    }

    /// The upstream body is complete (an engine's connection is already back in its pool).
    fn ended(&mut self) {
        let o = self.outcome;
        self.finish(o);
    }

    fn observe_data(&mut self, d: &Bytes) {
        observe(
            self.lease.as_ref(),
            &mut self.tap,
            self.arrived,
            &mut self.first_byte,
            d,
        );
    }

    /// The relay with the usage chunk taken out: a frame left empty is not sent.
    fn poll_filtered(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(t)));
        }
        loop {
            let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    self.finish(ABORTED);
                    return Poll::Ready(Some(Err(e)));
                }
                None => return Poll::Ready(self.end_filtered().map(|t| Ok(Frame::data(t)))),
            };
            let d = match frame.into_data() {
                Ok(d) => d,
                Err(trailers) => {
                    return match self.end_filtered() {
                        Some(t) => {
                            self.trailers = Some(trailers);
                            Poll::Ready(Some(Ok(Frame::data(t))))
                        }
                        None => Poll::Ready(Some(Ok(trailers))),
                    };
                }
            };
            self.observe_data(&d);
            let end = self.inner.is_end_stream();
            let Some(filter) = self.filter.as_mut() else {
                return Poll::Ready(Some(Ok(Frame::data(d))));
            };
            let mut out = filter.pass(&d);
            if end && let Some(tail) = self.end_filtered() {
                let mut all = bytes::BytesMut::from(out);
                all.extend_from_slice(&tail);
                out = all.freeze();
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if end {
                return Poll::Ready(None);
            }
        }
    }

    /// At the end of a filtered answer: the filter's held last line, if any is left to send,
    /// and the answer recorded as ended.
    fn end_filtered(&mut self) -> Option<Bytes> {
        let tail = self.filter.as_mut().map(UsageChunkFilter::finish);
        self.ended();
        tail.filter(|t| !t.is_empty())
    }

    fn finish(&mut self, outcome: &'static str) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let shared = lease.shared();
        let dm = lease.metrics();
        if outcome == metrics::SUCCESS {
            dm.success.inc();
        } else {
            shared.metrics.request(lease.dest.label(), outcome);
        }
        dm.duration.observe(self.arrived.elapsed().as_secs_f64());
        // Answered requests only: an attempt that failed before any answer held no real slot
        // time, and would count as spilled demand.
        dm.slot.observe(lease.held_seconds());
        let usage = match self.tap.take() {
            Some(tap) => tap.finish(),
            None => self.filter.as_ref().and_then(UsageChunkFilter::usage),
        };
        if let Dest::Provider(p) = &lease.dest {
            if let Some(u) = usage {
                shared.record_usage(p, u);
            }
            // A client that went away says the provider was answering if any of it came.
            let ok = match outcome {
                ABORTED => Some(false),
                CANCELLED => self.first_byte.then_some(true),
                _ => Some(true),
            };
            if let Some(ok) = ok.filter(|_| self.breaker_pending) {
                shared.provider_result(&p.name, ok, lease.sent_ms);
            }
        }
        drop(lease);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // hyper may stop polling once a sized body is complete; otherwise the client left.
        if self.inner.is_end_stream() {
            self.ended();
        } else {
            self.finish(CANCELLED);
        }
    }
}

impl Body for RouterBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RouterBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RouterBody::Relay(r) if r.filter.is_some() => r.poll_filtered(cx),
            RouterBody::Relay(r) => {
                let res = ready!(Pin::new(&mut r.inner).poll_frame(cx));
                match &res {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            r.observe_data(d);
                        }
                        // Trailers are the last frame, whatever the body says of its end.
                        if f.is_trailers() || r.inner.is_end_stream() {
                            r.ended();
                        }
                    }
                    Some(Err(_)) => r.finish(ABORTED),
                    None => r.ended(),
                }
                Poll::Ready(res)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RouterBody::Full(b) => b.is_none(),
            RouterBody::Relay(r) => {
                r.inner.is_end_stream()
                    && r.trailers.is_none()
                    && !r.filter.as_ref().is_some_and(UsageChunkFilter::holds)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RouterBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RouterBody::Full(None) => SizeHint::with_exact(0),
            RouterBody::Relay(r) if r.filter.is_some() => SizeHint::default(),
            RouterBody::Relay(r) => r.inner.size_hint(),
        }
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<RouterBody> {
    let mut resp = Response::new(RouterBody::Full(Some(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json_response(status: StatusCode, v: &Value) -> Response<RouterBody> {
    text(status, "application/json", v.to_string())
}

/// An OpenAI-style error.
fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response<RouterBody> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

fn too_large(app: &App) -> Response<RouterBody> {
    app.shared.metrics.request(metrics::NONE, "too_large");
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body exceeds {} bytes", app.max_body_bytes),
        "invalid_request_error",
        "request_too_large",
    )
}

fn reject(app: &App, r: RejectReason) -> Response<RouterBody> {
    app.shared.metrics.request(metrics::NONE, r.as_str());
    let message = match r {
        RejectReason::QueueFull => "all engines are busy and the router queue is full",
        RejectReason::QueueTimeout => "all engines stayed busy for the router's queue timeout",
        RejectReason::ShuttingDown => "the router is shutting down; retry",
    };
    let mut resp = error(
        StatusCode::SERVICE_UNAVAILABLE,
        message,
        "server_error",
        r.as_str(),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn connections_pack_onto_the_first_thread_then_go_to_the_least_busy() {
        let spread = |counts: &[usize]| Spread {
            open: counts
                .iter()
                .map(|&n| Arc::new(AtomicUsize::new(n)))
                .collect(),
            handoff: Vec::new(),
        };
        assert_eq!(spread(&[0, 0, 0]).pick(), 0);
        assert_eq!(spread(&[PACK_CONNECTIONS - 1, 0, 0]).pick(), 0);
        assert_eq!(spread(&[PACK_CONNECTIONS, 0, 0]).pick(), 1);
        assert_eq!(spread(&[PACK_CONNECTIONS, 3, 2]).pick(), 2);
        assert_eq!(spread(&[PACK_CONNECTIONS, 9, 9]).pick(), 0);
        assert_eq!(spread(&[20, 20, 20]).pick(), 0, "ties go to the lowest");
    }

    /// At shutdown the other threads stop taking connections before the first stops
    /// accepting: one accepted for them meanwhile is served, not closed unanswered.
    #[tokio::test]
    async fn a_connection_for_a_thread_that_has_stopped_is_served_by_the_first() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        drop(rx);
        let open = vec![
            Arc::new(AtomicUsize::new(PACK_CONNECTIONS)),
            Arc::new(AtomicUsize::new(0)),
        ];
        let mut source = Source::Tokio(
            l,
            Some(Spread {
                open: open.clone(),
                handoff: vec![tx],
            }),
        );
        let _client = TcpStream::connect(addr).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), source.next()).await;
        let (_, counted) = next.expect("the connection was dropped").unwrap();
        assert!(!counted, "the serving thread counts it");
        assert_eq!(open[1].load(Ordering::Relaxed), 0);
    }

    #[test]
    fn provider_body_gets_the_provider_model_and_stream_usage() {
        let (b, added) = rewrite_for_provider(
            br#"{"model":"mine","stream":true,"stream_options":{"x":1},"messages":[]}"#,
            "theirs",
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model"], "theirs");
        assert_eq!(v["stream_options"], json!({"x": 1, "include_usage": true}));
        assert_eq!(v["messages"], json!([]));
        assert!(added);
        let asked = br#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        let (b, added) = rewrite_for_provider(asked, "theirs").unwrap();
        assert!(!added, "the client asked for usage itself");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
        let (b, added) = rewrite_for_provider(br#"{"prompt":"p"}"#, "theirs").unwrap();
        assert!(!added);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v, json!({"prompt": "p", "model": "theirs"}));
        assert!(rewrite_for_provider(b"[1]", "m").is_err());
    }

    #[test]
    fn client_credentials_and_hop_headers_stay_behind() {
        let mut from = HeaderMap::new();
        from.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        from.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        from.insert(header::HOST, HeaderValue::from_static("router"));
        from.insert("x-request-id", HeaderValue::from_static("r1"));
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
