//! The pure HTTP/1.1 of an engine exchange: a request encoded once, the final response head
//! parsed with how its body is framed, and chunked bodies decoded (RFC 9112).

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};

use super::UpstreamError::{self, Malformed};

/// Engines send a handful of headers; a head larger than this is refused.
pub(super) const MAX_HEAD_BYTES: usize = 64 << 10;
const MAX_HEADERS: usize = 100;
/// A chunk-size or trailer line longer than this is refused.
const MAX_LINE_BYTES: usize = 4 << 10;
/// Request bodies up to this size go out in the same write as the head.
pub(super) const INLINE_BODY_BYTES: usize = 16 << 10;

/// A request for an engine, encoded once: a retry on a fresh connection sends the same bytes.
pub struct Outgoing {
    /// The head, and the body too when it is small.
    pub(super) wire: Vec<u8>,
    /// A large body, written after the head.
    pub(super) body: Option<Bytes>,
    /// A HEAD request: the answer has no body whatever its headers say.
    pub(super) answer_has_no_body: bool,
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
            answer_has_no_body: method == Method::HEAD,
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

/// A response head and how its body is framed.
pub(super) struct ResponseHead {
    pub response: Response<()>,
    pub framing: Framing,
    pub keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Framing {
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
pub(super) fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, UpstreamError> {
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
        return Ok(Some(ResponseHead {
            response,
            framing,
            keep_alive,
        }));
    }
}

/// Where a chunked body's decoder stands (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Chunked {
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
    pub(super) fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, UpstreamError> {
        self.skip_to_data(buf)?;
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
    pub(super) fn skip_to_data(&mut self, buf: &mut BytesMut) -> Result<(), UpstreamError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &'static [u8]) -> Result<Option<ResponseHead>, UpstreamError> {
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
}
