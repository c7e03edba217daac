//! HTTP as the scenarios need it: probes, metrics pages, and load on a router, each request
//! bounded in time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

/// One request on a new connection; the status and the whole body.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    limit: Duration,
) -> anyhow::Result<(u16, String)> {
    request_with(addr, method, path, &[], body, limit).await
}

/// [`request`] with extra headers.
pub async fn request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    limit: Duration,
) -> anyhow::Result<(u16, String)> {
    let go = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default().to_string())))?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        conn.abort();
        anyhow::Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(limit, go)
        .await
        .with_context(|| format!("{method} http://{addr}{path}: no answer in {limit:?}"))?
}

/// Whether `GET path` answers 2xx within a second (a kubelet's HTTP probe).
pub async fn get_ok(addr: &str, path: &str) -> bool {
    matches!(request(addr, "GET", path, None, Duration::from_secs(1)).await, Ok((s, _)) if (200..300).contains(&s))
}

/// The sum of a metric's samples whose labels contain every `label="value"` given.
pub async fn metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let (_, page) = request(addr, "GET", "/metrics", None, Duration::from_secs(2)).await?;
    Ok(sum_metric(&page, name, labels))
}

pub fn sum_metric(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// Closed-loop load: `workers` clients each sending one chat completion after another to
/// `addr` until stopped. Counts answers by class.
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
}

impl Load {
    pub fn start(addr: String, model: &str, workers: usize, max_tokens: u32) -> Self {
        Self::with_stream(addr, model, workers, max_tokens, false)
    }

    /// [`Load::start`], each answer streamed (what time to first token is measured on).
    pub fn streaming(addr: String, model: &str, workers: usize, max_tokens: u32) -> Self {
        Self::with_stream(addr, model, workers, max_tokens, true)
    }

    fn with_stream(
        addr: String,
        model: &str,
        workers: usize,
        max_tokens: u32,
        stream: bool,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let body = serde_json::json!({
            "model": model,
            "max_tokens": max_tokens,
            "stream": stream,
            "messages": [{"role": "user", "content": "hello"}],
        })
        .to_string();
        let workers = (0..workers)
            .map(|_| {
                let (stop, ok, failed, addr, body) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    addr.clone(),
                    body.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let r = request(
                            &addr,
                            "POST",
                            "/v1/chat/completions",
                            Some(&body),
                            Duration::from_secs(60),
                        )
                        .await;
                        match r {
                            Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                            _ => {
                                // Back off a little so a refusing router is not spun on.
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Self {
            stop,
            workers,
            ok,
            failed,
        }
    }

    /// Stops sending and waits for the requests in flight (each bounded); then `result`, unless
    /// some request failed.
    pub async fn finish(self, result: anyhow::Result<String>) -> anyhow::Result<String> {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            let _ = w.await;
        }
        let ok = self.ok.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Relaxed);
        let summary = result?;
        anyhow::ensure!(failed == 0, "{failed} of {} requests failed", ok + failed);
        Ok(summary)
    }
}
