//! One engine connection: a request written while its answer's head is read, and the answer's
//! body read straight from the socket.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::uri::Authority;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::UpstreamError::{self, Malformed};
use super::framing::{Chunked, Framing, MAX_HEAD_BYTES, Outgoing, ResponseHead, parse_head};
use super::pool::EnginePool;

const READ_BYTES: usize = 16 << 10;

pub(super) struct Conn {
    io: TcpStream,
    /// Bytes read from the engine and not yet handed on.
    buf: BytesMut,
}

/// An exchange that got no answer head.
pub(super) struct Failed {
    pub error: UpstreamError,
    /// Every byte of the request was written.
    pub written: bool,
    /// Bytes of an answer were read (an informational head counts).
    pub answered: bool,
}

impl Conn {
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_BYTES);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// Whether a pooled connection can take a request: nothing to read, not even its end. No
    /// system call unless the socket has had news since its last read.
    pub fn usable(&mut self, cx: &mut Context<'_>) -> bool {
        self.buf.is_empty() && self.poll_fill(cx).is_pending()
    }

    /// Sends `req` and reads the answer's head. The head is read while the body is written: an
    /// engine may answer before it has read a large body (413, 503) and then stop reading, and
    /// its answer must not wait on, or be lost with, a write that cannot finish. Such an answer
    /// leaves the connection unusable (the engine never got the whole request).
    pub async fn exchange(&mut self, req: &Outgoing) -> Result<ResponseHead, Failed> {
        let mut parts = [&req.wire[..], req.body.as_deref().unwrap_or_default()];
        // Bytes already seen not to hold a line end: a head trickling in is not re-parsed from
        // its start on every read.
        let mut scanned = 0;
        let mut answered = false;
        let mut written = false;
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
            written = parts.iter().all(|p| p.is_empty());
            let failed = |error| Poll::Ready(Err(error));
            loop {
                if self.buf[scanned.min(self.buf.len())..].contains(&b'\n') {
                    match parse_head(&mut self.buf, req.answer_has_no_body) {
                        Ok(Some(mut h)) => {
                            h.keep_alive &= written;
                            return Poll::Ready(Ok(h));
                        }
                        Ok(None) => {}
                        Err(e) => return failed(e),
                    }
                } else if self.buf.len() > MAX_HEAD_BYTES {
                    return failed(Malformed("response head over 64 KiB"));
                }
                scanned = self.buf.len();
                // After a failed write, only what has already arrived can still be an answer.
                let r = match self.poll_fill(cx) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        answered = true;
                        continue;
                    }
                    Poll::Pending if write_error.is_none() => return Poll::Pending,
                    r => r,
                };
                return failed(match (write_error, r) {
                    (Some(e), _) | (None, Poll::Ready(Err(e))) => e.into(),
                    _ if self.buf.is_empty() => UpstreamError::Closed,
                    _ => UpstreamError::CutShort,
                });
            }
        })
        .await
        .map_err(|error| Failed {
            error,
            written,
            answered,
        })
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
    /// The body of the answer whose head `conn` has just read.
    pub(super) fn new(
        conn: Conn,
        framing: Framing,
        keep_alive: bool,
        pool: Arc<EnginePool>,
        key: Authority,
    ) -> Self {
        let mut body = Self {
            conn: Some(conn),
            framing,
            keep_alive,
            ended: false,
            pool,
            key,
        };
        body.end_if_complete();
        body
    }

    /// Notes the end of the body if it is already here, giving the connection back.
    fn end_if_complete(&mut self) {
        let Some(conn) = &mut self.conn else {
            return;
        };
        let done = match &mut self.framing {
            Framing::Length(n) => *n == 0,
            // A decoding error shows on the next poll.
            Framing::Chunked(c) => c.skip_to_data(&mut conn.buf).is_ok() && *c == Chunked::End,
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
                this.end_if_complete();
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
