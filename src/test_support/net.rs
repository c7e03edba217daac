//! HTTP helpers for tests that run real servers on 127.0.0.1 (router, engine-sim, controller):
//! one request per new connection, replies read whole, metric samples, bounded waits and
//! scratch directories.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// The longest any one test may take.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `f`, failing the test past [`TEST_TIMEOUT`].
pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound")
}

/// A response read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What a request body may be given as.
pub trait IntoBody {
    fn into_body(self) -> Bytes;
}

impl IntoBody for Bytes {
    fn into_body(self) -> Bytes {
        self
    }
}

impl IntoBody for Value {
    fn into_body(self) -> Bytes {
        self.to_string().into()
    }
}

impl IntoBody for Option<Value> {
    fn into_body(self) -> Bytes {
        self.map(IntoBody::into_body).unwrap_or_default()
    }
}

/// Sends one request on a new connection (JSON content type unless `headers` name one,
/// `headers` added) and returns the
/// response head with its body still streaming; `Err` when no response came (e.g. the server
/// dropped the connection).
pub async fn try_open(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl IntoBody,
) -> Result<hyper::Response<Incoming>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(body.into_body()))
        .map_err(|e| e.to_string())?;
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// [`try_open`] for a server that must answer.
pub async fn open(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl IntoBody,
) -> hyper::Response<Incoming> {
    try_open(addr, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("no response to {path}: {e}"))
}

/// [`try_open`], with the body read whole.
pub async fn try_call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl IntoBody,
) -> Result<Reply, String> {
    let resp = try_open(addr, method, path, headers, body).await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// [`try_call`] for a server that must answer.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl IntoBody,
) -> Reply {
    try_call(addr, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("no response to {path}: {e}"))
}

pub async fn post_json(addr: SocketAddr, path: &str, body: Value) -> Reply {
    call(addr, Method::POST, path, &[], body).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    call(addr, Method::GET, path, &[], Bytes::new()).await
}

/// The value of the first sample whose line starts with `prefix` (name, then labels).
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `addr`'s `/metrics` until `pred` holds (10 s at most); returns the text that did.
pub async fn wait_for_metrics(addr: SocketAddr, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = get(addr, "/metrics").await.text();
        if pred(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last:\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("spillway-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    /// Writes `content` to `name` in it; returns the file's path.
    pub fn file(&self, name: &str, content: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
