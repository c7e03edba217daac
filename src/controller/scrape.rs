//! Scraping engine and router `/metrics` over HTTP: a shared keep-alive client, a global bound
//! on concurrent scrapes, a per-scrape timeout and a body size limit.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

/// Largest metrics page accepted (a vLLM page is ~50 KiB; anything far larger is not an engine).
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("invalid scrape URL {0}")]
    Url(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("reading the body failed: {0}")]
    Body(String),
    #[error("body is not UTF-8")]
    NotUtf8,
}

impl ScrapeError {
    /// A fixed label value for the scrape error counter.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            ScrapeError::Url(_) => "url",
            ScrapeError::Timeout(_) => "timeout",
            ScrapeError::Connect(_) => "connect",
            ScrapeError::Status(_) => "status",
            ScrapeError::Body(_) | ScrapeError::NotUtf8 => "body",
        }
    }
}

/// Shared by every service's loop.
#[derive(Clone)]
pub struct Scraper {
    client: Client<HttpConnector, Empty<Bytes>>,
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl Scraper {
    /// `max_concurrent` scrapes at once across all services; each bounded by `timeout`.
    pub fn new(max_concurrent: usize, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            // Pages are read in small chunks; a pooled connection must not keep a large buffer
            // (thousands of pods each hold one idle connection between scrapes).
            .http1_max_buf_size(16 * 1024)
            .pool_max_idle_per_host(2)
            .build(connector);
        Self {
            client,
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            timeout,
        }
    }

    /// GETs `url` and returns the body as text. The timeout covers waiting for a permit too, so
    /// a backlog shows up as timeouts rather than as an ever-later tick.
    pub async fn fetch(&self, url: &str) -> Result<String, ScrapeError> {
        let body = self.fetch_bytes(url).await?;
        String::from_utf8(body.to_vec()).map_err(|_| ScrapeError::NotUtf8)
    }

    /// Like [`Scraper::fetch`], without copying the body (check UTF-8 where it is parsed).
    pub async fn fetch_bytes(&self, url: &str) -> Result<Bytes, ScrapeError> {
        let uri: http::Uri = url.parse().map_err(|_| ScrapeError::Url(url.to_string()))?;
        let work = async {
            let _permit = self
                .permits
                .acquire()
                .await
                .expect("the semaphore is never closed");
            let req = http::Request::get(uri)
                .header(http::header::ACCEPT, "text/plain;version=0.0.4")
                .body(Empty::<Bytes>::new())
                .map_err(|_| ScrapeError::Url(url.to_string()))?;
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ScrapeError::Connect(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(ScrapeError::Status(resp.status().as_u16()));
            }
            let body = Limited::new(resp.into_body(), MAX_PAGE_BYTES)
                .collect()
                .await
                .map_err(|e| ScrapeError::Body(e.to_string()))?
                .to_bytes();
            Ok(body)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| ScrapeError::Timeout(self.timeout))?
    }
}

/// `http://<ip>:<port><path>`, bracketing IPv6 addresses.
pub fn metrics_url(ip: &str, port: i32, path: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{port}{path}")
    } else {
        format!("http://{ip}:{port}{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-route server on 127.0.0.1 answering `requests` connections, then stopping.
    async fn serve(
        requests: usize,
        delay: Duration,
        status: &'static str,
        body: &'static str,
    ) -> (u16, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            for _ in 0..requests {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        (port, task)
    }

    #[test]
    fn urls() {
        assert_eq!(
            metrics_url("10.1.2.3", 8000, "/metrics"),
            "http://10.1.2.3:8000/metrics"
        );
        assert_eq!(
            metrics_url("fd00::1", 8000, "/metrics"),
            "http://[fd00::1]:8000/metrics"
        );
    }

    #[tokio::test]
    async fn fetches_pages_and_reports_errors_by_kind() {
        let scraper = Scraper::new(4, Duration::from_millis(500));
        let (ok, t1) = serve(1, Duration::ZERO, "200 OK", "vllm:num_requests_waiting 3\n").await;
        let body = scraper
            .fetch(&format!("http://127.0.0.1:{ok}/metrics"))
            .await
            .unwrap();
        assert!(body.contains("num_requests_waiting 3"));

        let (bad, t2) = serve(1, Duration::ZERO, "500 Internal Server Error", "").await;
        let e = scraper
            .fetch(&format!("http://127.0.0.1:{bad}/metrics"))
            .await
            .unwrap_err();
        assert_eq!(e.metric_reason(), "status");

        let (slow, t3) = serve(1, Duration::from_secs(3), "200 OK", "x 1\n").await;
        let e = scraper
            .fetch(&format!("http://127.0.0.1:{slow}/metrics"))
            .await
            .unwrap_err();
        assert_eq!(e.metric_reason(), "timeout");

        // Nothing listens on the port any more: a connect error, not a hang.
        t1.await.unwrap();
        let e = scraper
            .fetch(&format!("http://127.0.0.1:{ok}/metrics"))
            .await
            .unwrap_err();
        assert!(matches!(e.metric_reason(), "connect" | "timeout"), "{e}");
        t2.abort();
        t3.abort();
    }
}
