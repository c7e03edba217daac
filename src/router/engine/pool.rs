//! Idle engine connections per serving thread; a connection goes back once its answer has
//! been read to the end.

use std::future::poll_fn;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use http::Response;
use http::uri::Authority;
use tokio::net::TcpStream;

use super::conn::{Conn, EngineBody, Failed};
use super::framing::Outgoing;
use super::{EngineFailure, UpstreamError};

/// Idle connections kept per engine; more are closed when they come back.
const MAX_IDLE_PER_ENGINE: usize = 512;
/// An idle connection older than this is closed rather than reused: under uvicorn's 5 s
/// keep-alive (vLLM, SGLang), so an engine's close rarely crosses a request on its way.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// A connection attempt to an engine that neither accepts nor refuses fails after this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn within_idle_timeout(i: &Idle, now: Instant) -> bool {
    now.saturating_duration_since(i.since) < IDLE_TIMEOUT
}

struct Idle {
    conn: Conn,
    /// When it came back.
    since: Instant,
}

#[derive(Default)]
struct Idles {
    /// Per engine; a handful of engines per router, so a list beats hashing.
    by_engine: Vec<(Authority, Vec<Idle>)>,
}

/// How often a pool closes its expired idle connections.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

pub struct EnginePool {
    idle: Mutex<Idles>,
}

impl EnginePool {
    /// A pool whose expired idle connections are closed every `SWEEP_EVERY`, also when no
    /// request comes (an engine scaled away, a thread gone quiet), for as long as it is in use.
    pub fn start() -> Arc<Self> {
        let pool = Arc::new(EnginePool {
            idle: Mutex::default(),
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { break };
                pool.sweep(Instant::now());
            }
        });
        pool
    }

    fn sweep(&self, now: Instant) {
        self.idles().by_engine.retain_mut(|(_, l)| {
            l.retain(|i| within_idle_timeout(i, now));
            !l.is_empty()
        });
    }

    /// Closes every idle connection to `key`: one was found closed, the rest are as old.
    fn forget(&self, key: &Authority) {
        self.idles().by_engine.retain(|(k, _)| k != key);
    }

    fn idles(&self) -> std::sync::MutexGuard<'_, Idles> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self, key: &Authority) -> Option<Conn> {
        let mut idle = self.idles();
        let (_, list) = idle.by_engine.iter_mut().find(|(k, _)| k == key)?;
        // Newest first: the one most likely still open and warm.
        let now = Instant::now();
        while let Some(i) = list.pop() {
            if within_idle_timeout(&i, now) {
                return Some(i.conn);
            }
        }
        None
    }

    pub(super) fn put(&self, key: Authority, conn: Conn) {
        let since = Instant::now();
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
        list.push(Idle { conn, since });
    }

    /// Ages every idle connection by `by`, for tests.
    #[cfg(test)]
    fn backdate(&self, by: Duration) {
        for (_, l) in &mut self.idles().by_engine {
            for i in l {
                i.since = i.since.checked_sub(by).expect("a clock past `by`");
            }
        }
    }

    /// Idle connections, for tests.
    pub fn idle_count(&self) -> usize {
        self.idles().by_engine.iter().map(|(_, l)| l.len()).sum()
    }

    async fn connect(&self, key: &Authority) -> Result<Conn, UpstreamError> {
        let err = |e: String| UpstreamError::Connect(key.clone(), e);
        let io = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(key.as_str())).await
        {
            Err(_) => return Err(err(format!("no answer within {CONNECT_TIMEOUT:?}"))),
            Ok(r) => r.map_err(|e| err(e.to_string()))?,
        };
        io.set_nodelay(true).map_err(|e| err(e.to_string()))?;
        Ok(Conn::new(io))
    }

    /// Sends `req` to the engine at `key`, on an idle connection when one is usable, and reads
    /// the answer's head. A reused connection that fails before any byte of an answer was most
    /// likely closed by the engine while idle (a close that crossed the request on its way):
    /// the request goes out once more, on a new connection. That is the only re-send here;
    /// any other failure is the proxy's to handle.
    pub async fn send(
        self: &Arc<Self>,
        key: &Authority,
        req: &Outgoing,
    ) -> Result<Response<EngineBody>, EngineFailure> {
        let mut pooled = true;
        let mut delivered = false;
        loop {
            let mut reused = None;
            while pooled && let Some(mut c) = self.take(key) {
                if poll_fn(|cx| Poll::Ready(c.usable(cx))).await {
                    reused = Some(c);
                    break;
                }
            }
            let was_idle = reused.is_some();
            let mut conn = match reused {
                Some(c) => c,
                None => self
                    .connect(key)
                    .await
                    .map_err(|error| EngineFailure { error, delivered })?,
            };
            let head = match conn.exchange(req).await {
                Ok(h) => h,
                Err(Failed {
                    error,
                    written,
                    answered,
                }) => {
                    delivered |= written;
                    if was_idle && !answered {
                        tracing::debug!(engine = %key, %error, "idle engine connection was closed; sending on a new one");
                        self.forget(key);
                        pooled = false;
                        continue;
                    }
                    return Err(EngineFailure { error, delivered });
                }
            };
            let (pool, key) = (self.clone(), key.clone());
            return Ok(head
                .response
                .map(|()| EngineBody::new(conn, head.framing, head.keep_alive, pool, key)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::engine::framing::{INLINE_BODY_BYTES, MAX_HEAD_BYTES};
    use bytes::Bytes;
    use http::header::{self, HeaderName, HeaderValue};
    use http::{Method, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::{Body, Frame};
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn pool() -> Arc<EnginePool> {
        EnginePool::start()
    }

    async fn bounded<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("test took over 10 s")
    }

    fn request(method: Method, body: &'static [u8]) -> Outgoing {
        let h = [(
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_static("7"),
        )];
        Outgoing::new(
            &method,
            "/x?y=1",
            &HeaderValue::from_static("engine:8000"),
            h.iter().map(|(k, v)| (k, v)),
            &Bytes::from_static(body),
        )
    }

    fn get() -> Outgoing {
        request(Method::GET, b"")
    }

    async fn read(resp: Response<EngineBody>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    /// One chunk, then nothing: an answer still in progress.
    struct OneThenHang(bool);

    impl Body for OneThenHang {
        type Data = Bytes;
        type Error = Infallible;
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
        /// The last request as it came off the wire.
        seen: Arc<Mutex<Vec<u8>>>,
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
                        Ok::<_, Infallible>(Response::new(body))
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
            seen: Default::default(),
            task,
        }
    }

    /// Reads one request (head and `content-length` body); `None` when the peer closed.
    async fn read_request(s: &mut TcpStream) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    return Some(buf);
                }
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A raw engine on 127.0.0.1 answering every request with `pieces`, written 20 ms apart;
    /// `close` closes the connection after each answer.
    async fn scripted(pieces: &[&'static [u8]], close: bool) -> Engine {
        let (l, key) = listen().await;
        let pieces = pieces.to_vec();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let seen: Arc<Mutex<Vec<u8>>> = Default::default();
        let (a, c, sn) = (accepted.clone(), closed.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (pieces, c, sn) = (pieces.clone(), c.clone(), sn.clone());
                tokio::spawn(async move {
                    while let Some(req) = read_request(&mut s).await {
                        *sn.lock().unwrap() = req;
                        for p in &pieces {
                            if s.write_all(p).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if close {
                            break;
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Engine {
            key,
            accepted,
            closed,
            seen,
            task,
        }
    }

    #[tokio::test]
    async fn sequential_requests_share_one_kept_alive_connection() {
        bounded(async {
            let e = engine(false).await;
            let pool = pool();
            for _ in 0..5 {
                let resp = pool.send(&e.key, &get()).await.unwrap();
                assert_eq!(read(resp).await, "ok");
            }
            assert_eq!(e.accepted.load(Ordering::SeqCst), 1);
            assert_eq!(pool.idle_count(), 1);
        })
        .await
    }

    #[tokio::test]
    async fn requests_go_out_as_sent_with_host_and_length() {
        bounded(async {
            let e = scripted(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"], false).await;
            let pool = pool();
            let resp = pool
                .send(&e.key, &request(Method::POST, b"{\"a\":1}"))
                .await
                .unwrap();
            assert_eq!(read(resp).await, "ok");
            assert_eq!(
                String::from_utf8(e.seen.lock().unwrap().clone()).unwrap(),
                "POST /x?y=1 HTTP/1.1\r\nhost: engine:8000\r\nx-request-id: 7\r\n\
                 content-length: 7\r\n\r\n{\"a\":1}"
            );
            // A body too large to copy after the head goes out in a second write, intact.
            let big: &'static [u8] = Box::leak(vec![b'x'; 3 * INLINE_BODY_BYTES].into());
            let resp = pool
                .send(&e.key, &request(Method::POST, big))
                .await
                .unwrap();
            assert_eq!(read(resp).await, "ok");
            assert!(e.seen.lock().unwrap().ends_with(big));
            assert_eq!(e.accepted.load(Ordering::SeqCst), 1);
        })
        .await
    }

    #[tokio::test]
    async fn chunked_answers_pass_piece_by_piece_and_keep_the_connection() {
        bounded(async {
            let e = scripted(
                &[
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhel",
                    b"lo\r\n6\r\n world\r\n",
                    b"0\r\nx-trailer: y\r\n\r\n",
                ],
                false,
            )
            .await;
            let pool = pool();
            for _ in 0..2 {
                let mut body = pool.send(&e.key, &get()).await.unwrap().into_body();
                let mut frames = Vec::new();
                while let Some(f) = body.frame().await {
                    frames.push(f.unwrap().into_data().unwrap());
                }
                // As they arrive: at least two frames, whatever the reads merged.
                assert!(frames.len() >= 2, "{frames:?}");
                assert_eq!(frames.concat(), b"hello world");
                assert!(body.is_end_stream());
                assert_eq!(pool.idle_count(), 1);
            }
            assert_eq!(e.accepted.load(Ordering::SeqCst), 1);
        })
        .await
    }

    #[tokio::test]
    async fn answers_that_end_the_connection_are_read_to_the_end_and_not_kept() {
        bounded(async {
            let until_close = scripted(&[b"HTTP/1.1 200 OK\r\n\r\nabc", b"def"], true).await;
            let closing = scripted(
                &[b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"],
                true,
            )
            .await;
            let old = scripted(&[b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"], true).await;
            let pool = pool();
            for (e, want) in [(&until_close, "abcdef"), (&closing, "ok"), (&old, "ok")] {
                let resp = pool.send(&e.key, &get()).await.unwrap();
                assert_eq!(read(resp).await, want);
                assert_eq!(pool.idle_count(), 0);
            }
        })
        .await
    }

    #[tokio::test]
    async fn answers_without_a_body_end_at_their_head() {
        bounded(async {
            let no_content = scripted(&[b"HTTP/1.1 204 No Content\r\n\r\n"], false).await;
            let head = scripted(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"], false).await;
            let cont = scripted(
                &[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
                false,
            )
            .await;
            let pool = pool();
            let resp = pool.send(&no_content.key, &get()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::NO_CONTENT);
            assert!(resp.body().is_end_stream());
            assert_eq!(pool.idle_count(), 1);
            let resp = pool
                .send(&head.key, &request(Method::HEAD, b""))
                .await
                .unwrap();
            assert!(resp.body().is_end_stream());
            assert_eq!(resp.headers()[header::CONTENT_LENGTH], "10");
            assert_eq!(pool.idle_count(), 2);
            let resp = pool.send(&cont.key, &get()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(read(resp).await, "ok");
        })
        .await
    }

    #[tokio::test]
    async fn a_request_crossed_by_an_idle_close_goes_out_again_on_a_new_connection() {
        bounded(async {
            // Answers the first request on each connection; reads the second and closes, as an
            // engine whose keep-alive ran out just as the request arrived.
            let (l, key) = listen().await;
            let accepted = Arc::new(AtomicUsize::new(0));
            let a = accepted.clone();
            let server = tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    a.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        if read_request(&mut s).await.is_some() {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            s.write_all(ok).await.unwrap();
                            read_request(&mut s).await;
                        }
                    });
                }
            });
            let pool = pool();
            for i in 1..=3 {
                let resp = pool.send(&key, &get()).await.unwrap();
                assert_eq!(read(resp).await, "ok");
                assert_eq!(accepted.load(Ordering::SeqCst), i);
            }
            server.abort();
        })
        .await
    }

    /// A reused connection that failed after the engine began to answer (here a `100 Continue`
    /// and then a close) is not the idle-close race: the engine read the request and may be
    /// working on it, so the pool does not send it again.
    #[tokio::test]
    async fn a_request_the_engine_began_to_answer_is_not_sent_again() {
        bounded(async {
            let (l, key) = listen().await;
            let (accepted, requests) =
                (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let (a, r) = (accepted.clone(), requests.clone());
            let server = tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    a.fetch_add(1, Ordering::SeqCst);
                    let r = r.clone();
                    tokio::spawn(async move {
                        if read_request(&mut s).await.is_some() {
                            r.fetch_add(1, Ordering::SeqCst);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            s.write_all(ok).await.unwrap();
                        }
                        if read_request(&mut s).await.is_some() {
                            r.fetch_add(1, Ordering::SeqCst);
                            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
                        }
                    });
                }
            });
            let pool = pool();
            assert_eq!(read(pool.send(&key, &get()).await.unwrap()).await, "ok");
            let Err(e) = pool.send(&key, &get()).await else {
                panic!("an engine that closed mid-answer answered");
            };
            assert!(matches!(e.error, UpstreamError::Closed), "{e:?}");
            assert!(e.delivered, "the whole request was written");
            assert_eq!(requests.load(Ordering::SeqCst), 2, "sent again");
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
            server.abort();
        })
        .await
    }

    /// An engine that refuses a large body from its head alone and reads no further; `close`
    /// then closes the connection (with the body unread: a reset), otherwise it holds it open.
    #[tokio::test]
    async fn an_answer_sent_before_the_body_is_read_is_not_lost() {
        for close in [false, true] {
            let (l, key) = listen().await;
            let engine = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.unwrap();
                    head.push(b[0]);
                }
                s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 5\r\n\r\nlarge")
                    .await
                    .unwrap();
                if close {
                    // Let the answer leave before the reset.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    drop(s);
                } else {
                    std::future::pending::<()>().await;
                }
            });
            // Far more than the socket buffers hold: the write cannot finish.
            let body = Bytes::from(vec![b'x'; 64 << 20]);
            let req = Outgoing::new(
                &Method::POST,
                "/v1/completions",
                &HeaderValue::from_static("engine"),
                std::iter::empty(),
                &body,
            );
            let pool = pool();
            let resp = bounded(pool.send(&key, &req)).await.unwrap();
            assert_eq!(
                resp.status(),
                StatusCode::PAYLOAD_TOO_LARGE,
                "close={close}"
            );
            assert_eq!(read(resp).await, "large");
            // The engine did not get the whole request: its connection is not reused.
            assert_eq!(pool.idle_count(), 0, "close={close}");
            engine.abort();
        }
    }

    #[tokio::test]
    async fn a_head_without_end_is_refused_at_64_kib() {
        bounded(async {
            let endless: &'static [u8] = Box::leak(vec![b'a'; MAX_HEAD_BYTES + 8].into());
            let e = scripted(&[b"HTTP/1.1 200 OK\r\nx: ", endless], false).await;
            let pool = pool();
            let Err(err) = pool.send(&e.key, &get()).await else {
                panic!("an endless head was accepted");
            };
            assert!(matches!(err.error, UpstreamError::Malformed(_)), "{err:?}");
        })
        .await
    }

    #[tokio::test]
    async fn expired_idle_connections_are_closed_without_traffic() {
        bounded(async {
            let e = engine(false).await;
            let pool = pool();
            let resp = pool.send(&e.key, &get()).await.unwrap();
            assert_eq!(read(resp).await, "ok");
            assert_eq!(pool.idle_count(), 1);
            pool.sweep(Instant::now());
            assert_eq!(pool.idle_count(), 1, "closed before its time");
            // Too old to be taken for a request, either.
            pool.backdate(IDLE_TIMEOUT + SWEEP_EVERY);
            let resp = pool.send(&e.key, &get()).await.unwrap();
            assert_eq!(read(resp).await, "ok");
            assert_eq!(e.accepted.load(Ordering::SeqCst), 2);
            pool.sweep(Instant::now() + IDLE_TIMEOUT);
            assert_eq!(pool.idle_count(), 0);
            while e.closed.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error() {
        bounded(async {
            let e = scripted(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"], true).await;
            let pool = pool();
            let resp = pool.send(&e.key, &get()).await.unwrap();
            let err = resp.into_body().collect().await.unwrap_err();
            assert!(matches!(err, UpstreamError::CutShort), "{err:?}");
            assert_eq!(pool.idle_count(), 0);
        })
        .await
    }

    #[tokio::test]
    async fn an_idle_connection_the_engine_closed_is_not_used() {
        bounded(async {
            // Answers one request per connection, keep-alive, then closes it while idle.
            let e = scripted(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"], true).await;
            let pool = pool();
            for i in 1..=3 {
                let resp = pool.send(&e.key, &get()).await.unwrap();
                assert_eq!(read(resp).await, "ok");
                // Let the close arrive while the connection sits in the pool.
                while e.closed.load(Ordering::SeqCst) < i {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                assert_eq!(e.accepted.load(Ordering::SeqCst), i);
            }
        })
        .await
    }

    #[tokio::test]
    async fn an_answer_left_unfinished_closes_its_connection() {
        bounded(async {
            let e = engine(true).await;
            let pool = pool();
            let mut body = pool.send(&e.key, &get()).await.unwrap().into_body();
            let f = body.frame().await.unwrap().unwrap();
            assert_eq!(f.into_data().unwrap(), "first");
            // The client went away mid-answer: the engine must see its connection close.
            drop(body);
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
            let pool = pool();
            for _ in 0..3 {
                let started = Instant::now();
                let r = pool.send(&key, &get()).await;
                assert!(r.is_err(), "an engine that closed answered");
                assert!(started.elapsed() < Duration::from_secs(5));
            }
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
            let pool = pool();
            let Err(e) = pool.send(&addr.parse().unwrap(), &get()).await else {
                panic!("a closed port answered");
            };
            assert!(matches!(e.error, UpstreamError::Connect(..)), "{e:?}");
            assert!(!e.delivered, "nothing reached an engine");
            assert!(e.to_string().contains(&addr), "{e}");
        })
        .await
    }
}
