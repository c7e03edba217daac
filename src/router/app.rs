//! One serving thread's means to answer: its engine connection pool, its provider clients, and
//! the request limits.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::engine::EnginePool;
use super::state::RouterState;

type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;
type PlainClient = Client<HttpConnector, Full<Bytes>>;
type TlsClient = Client<HttpsConnector, Full<Bytes>>;

const IDLE_POOL_TIMEOUT: Duration = Duration::from_secs(90);

/// The request limits every thread applies (from `RouterOptions`).
#[derive(Clone, Debug)]
pub(super) struct Limits {
    pub max_body_bytes: usize,
    /// Served model name for `/v1/models` when the config does not name one.
    pub model: Option<String>,
    pub engine_timeout: Duration,
}

pub(super) struct App {
    pub state: Arc<RouterState>,
    /// Local engines: connections driven by the requests' own tasks.
    pub engines: Arc<EnginePool>,
    /// `http` providers when there is no TLS client.
    pub plain: PlainClient,
    /// `None` when the system has no CA certificates: `https` providers then fail with 502.
    pub tls: Option<TlsClient>,
    pub max_body_bytes: usize,
    pub model: Option<String>,
    pub engine_timeout: Duration,
    /// Open client connections on this thread.
    pub open: Arc<AtomicUsize>,
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
    /// Starts the thread's pool and clients (inside its runtime).
    pub fn new(state: Arc<RouterState>, limits: Limits, open: Arc<AtomicUsize>) -> Arc<Self> {
        let (plain, tls) = clients();
        Arc::new(App {
            state,
            engines: EnginePool::start(),
            plain,
            tls,
            max_body_bytes: limits.max_body_bytes,
            model: limits.model,
            engine_timeout: limits.engine_timeout,
            open,
        })
    }
}
