//! Keep-alive HTTP/1.1 to local engines, spoken on the socket inside the task of the request
//! that holds the connection, as nginx's upstream module does. hyper's client passes every
//! request, answer and body chunk through channels to a connection dispatcher, which was a third
//! of the router's work on a short completion; an engine's answer needs only a head parser
//! (httparse) and the three HTTP/1.1 framings (RFC 9112 §6.3), which are here. One pool per
//! serving thread; a connection goes back to it once its answer has been read to the end.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::timer::{CoarseTimer, every};

/// Idle connections kept per engine; more are closed when they come back.
const MAX_IDLE_PER_ENGINE: usize = 512;
/// An idle connection older than this is closed rather than reused: under uvicorn's 5 s
/// keep-alive (vLLM, SGLang), so an engine's close rarely crosses a request on its way.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// A connection attempt to an engine that neither accepts nor refuses fails after this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Engines send a handful of headers; a head larger than this is refused.
const MAX_HEAD_BYTES: usize = 64 << 10;
const MAX_HEADERS: usize = 100;
/// A chunk-size or trailer line longer than this is refused.
const MAX_LINE_BYTES: usize = 4 << 10;
/// Request bodies up to this size go out in the same write as the head.
const INLINE_BODY_BYTES: usize = 16 << 10;
const READ_BYTES: usize = 16 << 10;

/// Why an engine gave no (whole) answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(Authority, String),
    #[error("engine connection: {0}")]
    Io(#[from] io::Error),
    #[error("the engine closed the connection before answering")]
    Closed,
    #[error("the engine closed the connection in the middle of its answer")]
    CutShort,
    #[error("malformed answer from the engine: {0}")]
    Malformed(&'static str),
}

impl UpstreamError {
    /// Whether a reused connection failed before answering: the engine had most likely closed
    /// it while it sat idle, and never read the request.
    fn stale(&self) -> bool {
        matches!(self, UpstreamError::Closed | UpstreamError::Io(_))
    }
}

use UpstreamError::Malformed;

/// A request for an engine, encoded once: a retry on a fresh connection sends the same bytes.
pub struct Outgoing {
    /// The head, and the body too when it is small.
    wire: Vec<u8>,
    /// A large body, written after the head.
    body: Option<Bytes>,
    /// A HEAD request: the answer has no body whatever its headers say.
    head: bool,
}

impl Outgoing {
    /// `headers` must already be end-to-end only; `Host` and `Content-Length` are set here.
    pub fn new<'a>(
        method: &Method,
        target: &str,
        host: &HeaderValue,
        headers: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
        body: &Bytes,
    ) -> Self {
        let inline = body.len() <= INLINE_BODY_BYTES;
        let mut w = Vec::with_capacity(512 + if inline { body.len() } else { 0 });
        w.extend_from_slice(method.as_str().as_bytes());
        w.push(b' ');
        w.extend_from_slice(target.as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        w.extend_from_slice(host.as_bytes());
        for (k, v) in headers {
            w.extend_from_slice(b"\r\n");
            w.extend_from_slice(k.as_str().as_bytes());
            w.extend_from_slice(b": ");
            w.extend_from_slice(v.as_bytes());
        }
        w.extend_from_slice(b"\r\ncontent-length: ");
        push_decimal(&mut w, body.len());
        w.extend_from_slice(b"\r\n\r\n");
        if inline {
            w.extend_from_slice(body);
        }
        Outgoing {
            wire: w,
            body: (!inline).then(|| body.clone()),
            head: method == Method::HEAD,
        }
    }
}

/// Appends `n` in decimal (the formatting machinery costs more than the request line).
fn push_decimal(w: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    w.extend_from_slice(&digits[i..]);
}

struct Conn {
    io: TcpStream,
    /// Bytes read from the engine and not yet handed on.
    buf: BytesMut,
}

impl Conn {
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_BYTES);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// Whether a pooled connection can take a request: nothing to read, not even its end. No
    /// system call unless the socket has had news since its last read.
    fn usable(&mut self, cx: &mut Context<'_>) -> bool {
        self.buf.is_empty() && self.poll_fill(cx).is_pending()
    }

    /// Sends `req` and reads the answer's head. The head is read while the body is written: an
    /// engine may answer before it has read a large body (413, 503) and then stop reading, and
    /// its answer must not wait on, or be lost with, a write that cannot finish. Such an answer
    /// leaves the connection unusable (the engine never got the whole request).
    async fn exchange(&mut self, req: &Outgoing) -> Result<Head, UpstreamError> {
        let mut parts = [&req.wire[..], req.body.as_deref().unwrap_or_default()];
        // Bytes already seen not to hold a line end: a head trickling in is not re-parsed from
        // its start on every read.
        let mut scanned = 0;
        poll_fn(|cx| {
            let mut write_error = None;
            while let Some(part) = parts.iter_mut().find(|p| !p.is_empty()) {
                match Pin::new(&mut self.io).poll_write(cx, part) {
                    Poll::Ready(Ok(0)) => {
                        write_error = Some(io::ErrorKind::WriteZero.into());
                        break;
                    }
                    Poll::Ready(Ok(n)) => *part = &part[n..],
                    Poll::Ready(Err(e)) => {
                        write_error = Some(e);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            let written = parts.iter().all(|p| p.is_empty());
            loop {
                if self.buf[scanned.min(self.buf.len())..].contains(&b'\n') {
                    if let Some(mut h) = parse_head(&mut self.buf, req.head)? {
                        h.keep_alive &= written;
                        return Poll::Ready(Ok(h));
                    }
                } else if self.buf.len() > MAX_HEAD_BYTES {
                    return Poll::Ready(Err(Malformed("response head over 64 KiB")));
                }
                scanned = self.buf.len();
                // After a failed write, only what has already arrived can still be an answer.
                let r = match self.poll_fill(cx) {
                    Poll::Ready(Ok(n)) if n > 0 => continue,
                    Poll::Pending if write_error.is_none() => return Poll::Pending,
                    r => r,
                };
                return Poll::Ready(Err(match (write_error, r) {
                    (Some(e), _) | (None, Poll::Ready(Err(e))) => e.into(),
                    _ if self.buf.is_empty() => UpstreamError::Closed,
                    _ => UpstreamError::CutShort,
                }));
            }
        })
        .await
    }
}

/// A response head and how its body is framed.
struct Head {
    response: Response<()>,
    framing: Framing,
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the engine closes the connection.
    Eof,
}

/// The fields that decide how an answer is framed and whether its connection is kept, read as
/// the head is parsed (no lookups in the finished map).
#[derive(Default)]
struct FramingFields {
    close: bool,
    keep_alive: bool,
    /// The one length all `Content-Length` fields agree on.
    length: Option<u64>,
    /// Present when there is a `Transfer-Encoding`: whether its final coding is chunked.
    chunked: Option<bool>,
}

impl FramingFields {
    fn see(&mut self, name: &[u8], value: &[u8]) -> Result<(), UpstreamError> {
        let tokens = || value.split(|&b| b == b',').map(<[u8]>::trim_ascii);
        if name.eq_ignore_ascii_case(b"connection") {
            for t in tokens() {
                self.close |= t.eq_ignore_ascii_case(b"close");
                self.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            for t in tokens() {
                if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
                    return Err(Malformed("invalid content-length"));
                }
                let n = t.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                if self.length.is_some_and(|l| l != n) {
                    return Err(Malformed("conflicting content-length values"));
                }
                self.length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = tokens().next_back().unwrap_or_default();
            self.chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
        }
        Ok(())
    }
}

/// Parses the final response head at the start of `buf` (1xx heads before it are skipped) and
/// removes it; `Ok(None)`: more bytes are needed.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, UpstreamError> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        // Uninitialised slots: zeroing 100 of them cost more than parsing an engine's few.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut r, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(Malformed("response head over 64 KiB"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Malformed("over 100 headers")),
            Err(_) => return Err(Malformed("unparsable response head")),
        };
        let status = r
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or(Malformed("invalid status code"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Malformed("101 without an upgrade request"));
            }
            // 100 Continue and friends: the final answer follows.
            buf.advance(len);
            continue;
        }
        // Where each field sits (the slots borrow `buf`, which the head is split off from).
        let base = buf.as_ptr() as usize;
        let mut at = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let mut fields = FramingFields::default();
        for (h, slot) in r.headers.iter().zip(at.iter_mut()) {
            let name = h.name.as_bytes();
            fields.see(name, h.value)?;
            let (n, v) = (
                name.as_ptr() as usize - base,
                h.value.as_ptr() as usize - base,
            );
            // Offsets within a head of at most 64 KiB and a read.
            *slot = (n as u32, name.len() as u32, v as u32, h.value.len() as u32);
        }
        let count = r.headers.len();
        let version = if r.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let bytes = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        for &(n, nl, v, vl) in &at[..count] {
            let (n, v) = (n as usize, v as usize);
            // Engines send these few in lower case; the general parser costs a lookup each.
            let name = match &bytes[n..n + nl as usize] {
                b"content-type" => header::CONTENT_TYPE,
                b"content-length" => header::CONTENT_LENGTH,
                b"date" => header::DATE,
                b"server" => header::SERVER,
                other => {
                    HeaderName::from_bytes(other).map_err(|_| Malformed("invalid header name"))?
                }
            };
            let value = HeaderValue::from_maybe_shared(bytes.slice(v..v + vl as usize))
                .map_err(|_| Malformed("invalid header value"))?;
            headers.append(name, value);
        }
        let mut keep_alive = if version == Version::HTTP_11 {
            !fields.close
        } else {
            fields.keep_alive
        };
        let length = fields.length;
        if version == Version::HTTP_10 && fields.chunked.is_some() {
            // Not an HTTP/1.0 framing (RFC 9112 §6.1): read as sent, then closed.
            keep_alive = false;
        }
        let framing = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            // A 204 announcing a body may send one anyway: it must not meet the next request.
            if status == StatusCode::NO_CONTENT
                && (length.is_some_and(|n| n > 0) || fields.chunked.is_some())
            {
                keep_alive = false;
            }
            Framing::Length(0)
        } else if let Some(chunked) = fields.chunked {
            // Transfer-Encoding wins over Content-Length, which then must not reach the client;
            // a connection that sent both is not trusted again.
            if length.is_some() {
                headers.remove(header::CONTENT_LENGTH);
                keep_alive = false;
            }
            if chunked {
                Framing::Chunked(Chunked::Size)
            } else {
                keep_alive = false;
                Framing::Eof
            }
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            keep_alive = false;
            Framing::Eof
        };
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        return Ok(Some(Head {
            response,
            framing,
            keep_alive,
        }));
    }
}

/// Where a chunked body's decoder stands (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunked {
    /// A chunk-size line next.
    Size,
    /// This many bytes of chunk data still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines (dropped) up to an empty line.
    Trailers,
    End,
}

fn chunk_size(line: &[u8]) -> Result<u64, UpstreamError> {
    // Extensions after ';' are ignored; whitespace may precede them.
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii_end();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(Malformed("invalid chunk size"));
    }
    Ok(digits.iter().fold(0u64, |n, &d| {
        n * 16 + u64::from((d as char).to_digit(16).unwrap_or_default())
    }))
}

impl Chunked {
    /// The next piece of chunk data in `buf`; `None` when more bytes are needed or the body
    /// has ended (`self` is `End`).
    fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, UpstreamError> {
        self.settle(buf)?;
        let Chunked::Data(rem) = *self else {
            return Ok(None);
        };
        if buf.is_empty() {
            return Ok(None);
        }
        let n = rem.min(buf.len() as u64);
        *self = if n == rem {
            Chunked::DataEnd
        } else {
            Chunked::Data(rem - n)
        };
        Ok(Some(buf.split_to(n as usize).freeze()))
    }

    /// Moves over the sizes, line ends and trailers already in `buf`, up to chunk data or the
    /// end of the body.
    fn settle(&mut self, buf: &mut BytesMut) -> Result<(), UpstreamError> {
        while !matches!(self, Chunked::Data(_) | Chunked::End) {
            let Some(i) = buf.windows(2).position(|w| w == b"\r\n") else {
                if buf.len() > MAX_LINE_BYTES {
                    return Err(Malformed("chunk line over 4 KiB"));
                }
                return Ok(());
            };
            *self = match *self {
                Chunked::DataEnd if i != 0 => {
                    return Err(Malformed("chunk data longer than its size"));
                }
                Chunked::DataEnd => Chunked::Size,
                Chunked::Size => match chunk_size(&buf[..i])? {
                    0 => Chunked::Trailers,
                    n => Chunked::Data(n),
                },
                Chunked::Trailers if i == 0 => Chunked::End,
                other => other,
            };
            buf.advance(i + 2);
        }
        Ok(())
    }
}

/// An engine's answer body, read straight from its connection. The connection goes back to the
/// pool when the body has ended and is closed if it is dropped before (a client that leaves
/// mid-answer closes the engine's connection, which stops the engine's work on it).
pub struct EngineBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    ended: bool,
    pool: Arc<EnginePool>,
    key: Authority,
}

impl EngineBody {
    /// Notes the end of the body if it is already here, giving the connection back.
    fn settle(&mut self) {
        let Some(conn) = &mut self.conn else {
            return;
        };
        let done = match &mut self.framing {
            Framing::Length(n) => *n == 0,
            // A decoding error shows on the next poll.
            Framing::Chunked(c) => c.settle(&mut conn.buf).is_ok() && *c == Chunked::End,
            Framing::Eof => false,
        };
        if done {
            self.end();
        }
    }

    fn end(&mut self) {
        self.ended = true;
        if let Some(c) = self.conn.take()
            && self.keep_alive
            && c.buf.is_empty()
        {
            self.pool.put(self.key.clone(), c);
        }
    }

    fn fail(&mut self, e: UpstreamError) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for EngineBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = &mut this.conn else {
                return Poll::Ready(None);
            };
            let data = match &mut this.framing {
                Framing::Length(rem) => {
                    let n = (*rem).min(conn.buf.len() as u64);
                    *rem -= n;
                    (n > 0).then(|| conn.buf.split_to(n as usize).freeze())
                }
                Framing::Chunked(c) => match c.next(&mut conn.buf) {
                    Ok(d) => d,
                    Err(e) => return this.fail(e),
                },
                Framing::Eof => (!conn.buf.is_empty()).then(|| conn.buf.split().freeze()),
            };
            if let Some(d) = data {
                this.settle();
                return Poll::Ready(Some(Ok(Frame::data(d))));
            }
            if this.framing == Framing::Chunked(Chunked::End) {
                this.end();
                return Poll::Ready(None);
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.framing == Framing::Eof => {
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(UpstreamError::CutShort),
                Ok(_) => {}
                Err(e) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match (self.ended, self.framing) {
            (true, _) => SizeHint::with_exact(0),
            (false, Framing::Length(n)) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

fn fresh(i: &Idle, now_ms: u64) -> bool {
    now_ms.saturating_sub(i.since_ms) < IDLE_TIMEOUT.as_millis() as u64
}

struct Idle {
    conn: Conn,
    /// The pool's clock when it came back.
    since_ms: u64,
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
    /// The serving thread's coarse clock: idle ages need no clock read per request.
    clock: CoarseTimer,
}

impl EnginePool {
    /// A pool whose expired idle connections are closed every `SWEEP_EVERY`, also when no
    /// request comes (an engine scaled away, a thread gone quiet), for as long as it is in use.
    pub fn start(clock: CoarseTimer) -> Arc<Self> {
        let pool = Arc::new(EnginePool {
            idle: Mutex::default(),
            clock,
        });
        every(SWEEP_EVERY, &pool, |p| p.sweep(p.clock.now_ms()));
        pool
    }

    fn sweep(&self, now_ms: u64) {
        self.idles().by_engine.retain_mut(|(_, l)| {
            l.retain(|i| fresh(i, now_ms));
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
        let now_ms = self.clock.now_ms();
        while let Some(i) = list.pop() {
            if fresh(&i, now_ms) {
                return Some(i.conn);
            }
        }
        None
    }

    fn put(&self, key: Authority, conn: Conn) {
        let since_ms = self.clock.now_ms();
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
        list.push(Idle { conn, since_ms });
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
        Ok(Conn {
            io,
            buf: BytesMut::new(),
        })
    }

    /// Sends `req` to the engine at `key`, on an idle connection when one is usable, and reads
    /// the answer's head. A reused connection that fails before the first byte of an answer
    /// was closed by the engine while idle (a close that crossed the request on its way): the
    /// request goes out once more, on a new connection. Any other failure is the caller's to
    /// handle (it tries another engine).
    pub async fn send(
        self: &Arc<Self>,
        key: &Authority,
        req: &Outgoing,
    ) -> Result<Response<EngineBody>, UpstreamError> {
        let mut pooled = true;
        loop {
            let mut reused = None;
            while pooled && let Some(mut c) = self.take(key) {
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
            let head = match conn.exchange(req).await {
                Ok(h) => h,
                Err(e) if !fresh && e.stale() && conn.buf.is_empty() => {
                    tracing::debug!(engine = %key, error = %e, "idle engine connection was closed; sending on a new one");
                    self.forget(key);
                    pooled = false;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut body = EngineBody {
                conn: Some(conn),
                framing: head.framing,
                keep_alive: head.keep_alive,
                ended: false,
                pool: self.clone(),
                key: key.clone(),
            };
            body.settle();
            return Ok(head.response.map(|()| body));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A pool on its own clock.
    fn pool() -> Arc<EnginePool> {
        EnginePool::start(CoarseTimer::start())
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
            assert!(matches!(err, UpstreamError::Malformed(_)), "{err:?}");
        })
        .await
    }

    #[tokio::test]
    async fn expired_idle_connections_are_closed_without_traffic() {
        bounded(async {
            let e = engine(false).await;
            let clock = CoarseTimer::start();
            let pool = EnginePool::start(clock.clone());
            let resp = pool.send(&e.key, &get()).await.unwrap();
            assert_eq!(read(resp).await, "ok");
            assert_eq!(pool.idle_count(), 1);
            pool.sweep(clock.now_ms());
            assert_eq!(pool.idle_count(), 1, "closed before its time");
            // Too old to be taken for a request, either.
            let later = clock.now_ms() + (IDLE_TIMEOUT + SWEEP_EVERY).as_millis() as u64;
            clock.set_now_ms(later);
            let resp = pool.send(&e.key, &get()).await.unwrap();
            assert_eq!(read(resp).await, "ok");
            assert_eq!(e.accepted.load(Ordering::SeqCst), 2);
            pool.sweep(later + IDLE_TIMEOUT.as_millis() as u64);
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

    fn parse(raw: &'static [u8]) -> Result<Option<Head>, UpstreamError> {
        parse_head(&mut BytesMut::from(raw), false)
    }

    #[test]
    fn header_names_arrive_whatever_their_case() {
        let h = parse(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nDate: today\r\n\
              X-Request-Id: 7\r\nserver: sim\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let got: Vec<(&str, &[u8])> = h
            .response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            got,
            [
                ("content-type", &b"application/json"[..]),
                ("date", b"today"),
                ("x-request-id", b"7"),
                ("server", b"sim"),
                ("content-length", b"0"),
            ]
        );
    }

    #[test]
    fn heads_that_cannot_be_framed_safely_are_refused() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
        ] {
            assert!(
                parse(raw).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let long = [&b"HTTP/1.1 200 OK\r\nx: "[..], &[b'a'; MAX_HEAD_BYTES]].concat();
        assert!(parse_head(&mut BytesMut::from(&long[..]), false).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none());
        // Both framings: the chunked one wins, the length is not passed on, nor the connection kept.
        let h =
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.framing, Framing::Chunked(Chunked::Size));
        assert!(!h.keep_alive);
        assert!(!h.response.headers().contains_key(header::CONTENT_LENGTH));
        let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(2), true));
        // Framings the connection cannot be trusted after.
        let h = parse(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (h.framing, h.keep_alive),
            (Framing::Chunked(Chunked::Size), false)
        );
        let h = parse(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(0), false));
        let h = parse(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Eof, false));
    }

    /// Decodes `raw` fed `step` bytes at a time.
    fn dechunk(raw: &[u8], step: usize) -> Result<(Vec<u8>, Chunked), UpstreamError> {
        let (mut c, mut buf, mut out) = (Chunked::Size, BytesMut::new(), Vec::new());
        for piece in raw.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(d) = c.next(&mut buf)? {
                out.extend_from_slice(&d);
            }
        }
        Ok((out, c))
    }

    #[test]
    fn lengths_are_written_in_decimal() {
        for n in [0, 7, 10, 65_536, usize::MAX] {
            let mut w = Vec::new();
            push_decimal(&mut w, n);
            assert_eq!(w, n.to_string().as_bytes());
        }
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let raw =
            b"4\r\nWiki\r\n5 ; name=\"v\"\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nt: 1\r\n\r\n";
        for step in [1, 2, 3, 7, raw.len()] {
            let (out, state) = dechunk(raw, step).unwrap();
            assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.", "step {step}");
            assert_eq!(state, Chunked::End);
        }
        for bad in [
            &b"x\r\n"[..],
            b"-1\r\n",
            b"+1\r\na\r\n",
            b"3\r\nabcd\r\n",
            b"10000000000000000\r\n",
        ] {
            assert!(
                dechunk(bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let endless = [b'1'; MAX_LINE_BYTES + 8];
        assert!(dechunk(&endless, endless.len()).is_err());
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
            assert!(matches!(e, UpstreamError::Connect(..)), "{e:?}");
            assert!(e.to_string().contains(&addr), "{e}");
        })
        .await
    }
}
