//! Keep-alive HTTP/1.1 connections to local engines, each driven inside the task of the request
//! that holds it: reading the client, writing the engine, reading its answer and writing it back
//! all happen in one task, as in nginx's event loop, with no hand-off to a connection task.
//! One pool per serving thread; connections go back to it only once their response has ended.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type Io = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// Idle connections kept per engine; more are closed when they come back.
const MAX_IDLE_PER_ENGINE: usize = 512;
/// An idle connection older than this is closed rather than reused: under uvicorn's 5 s
/// keep-alive (vLLM, SGLang), so an engine's close rarely crosses a request on its way.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// A connection attempt to an engine that neither accepts nor refuses fails after this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

struct Conn {
    tx: http1::SendRequest<Full<Bytes>>,
    /// `None` once it ended (the engine closed it, or it failed): dropped at once, so a request
    /// it never took comes back and a body it was feeding ends instead of waiting forever.
    io: Option<Pin<Box<Io>>>,
}

impl Conn {
    /// Lets the connection read and write.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(io) = &mut self.io
            && let Poll::Ready(r) = io.as_mut().poll(cx)
        {
            self.io = None;
            if let Err(e) = r {
                tracing::debug!(error = %e, "engine connection ended with an error");
            }
        }
    }

    /// Sends `req` and waits for the response head, driving the connection meanwhile.
    async fn exchange(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Full<Bytes>>>> {
        let mut fut = std::pin::pin!(self.tx.try_send_request(req));
        poll_fn(|cx| {
            // The connection first, so the request is written in this same poll.
            self.drive(cx);
            fut.as_mut().poll(cx)
        })
        .await
    }

    /// Whether a pooled connection can take a request now: polled once so a close by the engine
    /// while it sat idle is seen before anything is written to it.
    fn usable(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx);
        self.io.is_some() && matches!(self.tx.poll_ready(cx), Poll::Ready(Ok(())))
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Why no response came back.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(Authority, String),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

#[derive(Default)]
struct Idles {
    /// Per engine; a handful of engines per router, so a list beats hashing.
    by_engine: Vec<(Authority, Vec<Idle>)>,
    last_sweep: Option<Instant>,
}

#[derive(Default)]
pub struct EnginePool {
    idle: Mutex<Idles>,
}

impl EnginePool {
    fn idles(&self) -> std::sync::MutexGuard<'_, Idles> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self, key: &Authority) -> Option<Conn> {
        let mut idle = self.idles();
        let (_, list) = idle.by_engine.iter_mut().find(|(k, _)| k == key)?;
        // Newest first: the one most likely still open and warm.
        while let Some(i) = list.pop() {
            if i.since.elapsed() < IDLE_TIMEOUT {
                return Some(i.conn);
            }
        }
        None
    }

    fn put(&self, key: Authority, conn: Conn) {
        let now = Instant::now();
        let mut idle = self.idles();
        let idle = &mut *idle;
        let i = match idle.by_engine.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                idle.by_engine.push((key, Vec::new()));
                idle.by_engine.len() - 1
            }
        };
        let list = &mut idle.by_engine[i].1;
        if list.len() >= MAX_IDLE_PER_ENGINE {
            list.remove(0);
        }
        list.push(Idle { conn, since: now });
        // Engines that went away (or pools that went quiet) do not keep sockets open forever.
        if idle
            .last_sweep
            .is_none_or(|t| now.duration_since(t) >= IDLE_TIMEOUT / 3)
        {
            idle.last_sweep = Some(now);
            idle.by_engine.retain_mut(|(_, l)| {
                l.retain(|i| now.duration_since(i.since) < IDLE_TIMEOUT);
                !l.is_empty()
            });
        }
    }

    /// Idle connections, for tests.
    pub fn idle_count(&self) -> usize {
        self.idles().by_engine.iter().map(|(_, l)| l.len()).sum()
    }

    async fn connect(&self, key: &Authority) -> Result<Conn, UpstreamError> {
        let err = |e: String| UpstreamError::Connect(key.clone(), e);
        let tcp =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(key.as_str())).await {
                Err(_) => return Err(err(format!("no answer within {CONNECT_TIMEOUT:?}"))),
                Ok(r) => r.map_err(|e| err(e.to_string()))?,
            };
        tcp.set_nodelay(true).map_err(|e| err(e.to_string()))?;
        let (tx, io) = http1::Builder::new()
            // Head and small body in one buffer: one plain write, no iovec list to manage.
            .writev(false)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| err(e.to_string()))?;
        Ok(Conn {
            tx,
            io: Some(Box::pin(io)),
        })
    }

    /// Sends `req` to the engine at `key`, on an idle connection when one is usable. A request
    /// that a reused connection never took (it closed first) goes out again on a new one.
    pub async fn send(
        self: &Arc<Self>,
        key: &Authority,
        mut req: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Upstream), UpstreamError> {
        loop {
            let mut reused = None;
            while let Some(mut c) = self.take(key) {
                if poll_fn(|cx| Poll::Ready(c.usable(cx))).await {
                    reused = Some(c);
                    break;
                }
            }
            let fresh = reused.is_none();
            let mut conn = match reused {
                Some(c) => c,
                None => self.connect(key).await?,
            };
            match conn.exchange(req).await {
                Ok(resp) => {
                    let up = Upstream {
                        conn: Some(conn),
                        pool: self.clone(),
                        key: key.clone(),
                    };
                    return Ok((resp, up));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => req = r,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }
}

/// The engine connection behind one response; the response body only moves while this is
/// driven. Back to the pool when the body has ended, closed otherwise (a client that leaves
/// mid-answer closes the engine's connection, which stops the engine's work on it).
pub struct Upstream {
    conn: Option<Conn>,
    pool: Arc<EnginePool>,
    key: Authority,
}

/// A frame of `body`, driving the engine connection that feeds it (`None`: a body something
/// else drives, a client's request or a provider's answer).
pub fn poll_body(
    upstream: Option<&mut Upstream>,
    body: &mut Incoming,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
    let mut body = Pin::new(body);
    if let Poll::Ready(f) = body.as_mut().poll_frame(cx) {
        return Poll::Ready(f);
    }
    match upstream.and_then(|u| u.conn.as_mut()) {
        Some(c) => {
            c.drive(cx);
            body.poll_frame(cx)
        }
        None => Poll::Pending,
    }
}

impl Upstream {
    /// The response body has ended: the connection may serve the next request.
    pub fn release(&mut self) {
        if let Some(c) = self.conn.take()
            && c.io.is_some()
            && !c.tx.is_closed()
        {
            self.pool.put(self.key.clone(), c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::body::{Body, Frame};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn bounded<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("test took over 10 s")
    }

    fn get() -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = "/x".parse().unwrap();
        req
    }

    /// Reads a body whole while driving its connection, then hands the connection back.
    async fn read(resp: Response<Incoming>, mut up: Upstream) -> Bytes {
        let mut body = resp.into_body();
        let mut out = Vec::new();
        loop {
            match poll_fn(|cx| poll_body(Some(&mut up), &mut body, cx)).await {
                Some(f) => out.extend_from_slice(&f.unwrap().into_data().unwrap()),
                None => break,
            }
            if body.is_end_stream() {
                break;
            }
        }
        up.release();
        out.into()
    }

    /// One chunk, then nothing: an answer still in progress.
    struct OneThenHang(bool);

    impl Body for OneThenHang {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0 {
                Poll::Pending
            } else {
                self.0 = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first")))))
            }
        }
    }

    struct Engine {
        key: Authority,
        accepted: Arc<AtomicUsize>,
        closed: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Engine {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A listener on 127.0.0.1 and the authority to reach it.
    async fn listen() -> (TcpListener, Authority) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = l.local_addr().unwrap().to_string().parse().unwrap();
        (l, key)
    }

    /// A hyper server on 127.0.0.1 counting connections; `hang` answers with `OneThenHang`.
    async fn engine(hang: bool) -> Engine {
        let (l, key) = listen().await;
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, c) = (accepted.clone(), closed.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        let body = if hang {
                            OneThenHang(false).boxed()
                        } else {
                            Full::new(Bytes::from_static(b"ok"))
                                .map_err(|e| match e {})
                                .boxed()
                        };
                        Ok::<_, std::convert::Infallible>(Response::new(body))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Engine {
            key,
            accepted,
            closed,
            task,
        }
    }

    #[tokio::test]
    async fn sequential_requests_share_one_kept_alive_connection() {
        bounded(async {
            let e = engine(false).await;
            let pool = Arc::new(EnginePool::default());
            for _ in 0..5 {
                let (resp, up) = pool.send(&e.key, get()).await.unwrap();
                assert_eq!(read(resp, up).await, "ok");
            }
            assert_eq!(e.accepted.load(Ordering::SeqCst), 1);
            assert_eq!(pool.idle_count(), 1);
        })
        .await
    }

    #[tokio::test]
    async fn an_idle_connection_the_engine_closed_is_not_used() {
        bounded(async {
            // Answers one request per connection, keep-alive, then closes it while idle.
            let (l, key) = listen().await;
            let accepted = Arc::new(AtomicUsize::new(0));
            let a = accepted.clone();
            let server = tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    a.fetch_add(1, Ordering::SeqCst);
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut chunk).await.unwrap();
                        assert!(n > 0, "client closed before a whole request");
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .unwrap();
                    drop(s);
                }
            });
            let pool = Arc::new(EnginePool::default());
            for i in 1..=3 {
                let (resp, up) = pool.send(&key, get()).await.unwrap();
                assert_eq!(read(resp, up).await, "ok");
                // Let the close arrive while the connection sits in the pool.
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert_eq!(accepted.load(Ordering::SeqCst), i);
            }
            server.abort();
        })
        .await
    }

    #[tokio::test]
    async fn an_answer_left_unfinished_closes_its_connection() {
        bounded(async {
            let e = engine(true).await;
            let pool = Arc::new(EnginePool::default());
            let (resp, mut up) = pool.send(&e.key, get()).await.unwrap();
            let mut body = resp.into_body();
            let f = poll_fn(|cx| poll_body(Some(&mut up), &mut body, cx)).await;
            assert_eq!(f.unwrap().unwrap().into_data().unwrap(), "first");
            // The client went away mid-answer: the engine must see its connection close.
            drop((body, up));
            while e.closed.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(pool.idle_count(), 0);
        })
        .await
    }

    #[tokio::test]
    async fn an_engine_that_closes_at_once_is_an_error_not_a_wait() {
        bounded(async {
            let (l, key) = listen().await;
            let server = tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    drop(s);
                }
            });
            let pool = Arc::new(EnginePool::default());
            for _ in 0..3 {
                let started = Instant::now();
                let r = pool.send(&key, get()).await;
                assert!(r.is_err(), "an engine that closed answered");
                assert!(started.elapsed() < Duration::from_secs(5));
            }
            // The close already in when the request goes out: it comes back unsent.
            let mut conn = pool.connect(&key).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let Err(mut e) = conn.exchange(get()).await else {
                panic!("an engine that closed answered");
            };
            assert!(e.take_message().is_some(), "{e:?}");
            server.abort();
        })
        .await
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_engine() {
        bounded(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            drop(l);
            let pool = Arc::new(EnginePool::default());
            let Err(e) = pool.send(&addr.parse().unwrap(), get()).await else {
                panic!("a closed port answered");
            };
            assert!(matches!(e, UpstreamError::Connect(..)), "{e:?}");
            assert!(e.to_string().contains(&addr), "{e}");
        })
        .await
    }
}
