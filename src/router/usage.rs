//! Pure token-usage extraction from provider responses as their bytes pass through: SSE lines are
//! scanned one at a time (only a partial line is ever held), a JSON body is collected up to a cap.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// A partial SSE line longer than this is skipped, not buffered.
const MAX_LINE: usize = 1 << 20;
/// A non-streaming body larger than this is passed through without reading its usage.
const MAX_JSON: usize = 4 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Reads `usage` from a value holding one: a whole answer or one stream chunk, as chat,
/// completions and embeddings (`prompt_tokens`, `completion_tokens`) or the Responses API
/// (`input_tokens`, `output_tokens`, also inside a stream event's `response`) give it.
pub fn usage_of(v: &Value) -> Option<Usage> {
    let u = v
        .get("usage")
        .filter(|u| u.is_object())
        .or_else(|| v.get("response")?.get("usage"))?;
    let n = |a: &str, b: &str| u.get(a).or_else(|| u.get(b)).and_then(Value::as_u64);
    Some(Usage {
        prompt_tokens: n("prompt_tokens", "input_tokens")?,
        completion_tokens: n("completion_tokens", "output_tokens").unwrap_or(0),
    })
}

#[derive(Debug)]
enum Mode {
    Sse { line: Vec<u8>, skipping: bool },
    Json { buf: Vec<u8>, overflow: bool },
}

/// Feeds on response chunks; the last usage seen wins (streams carry it in the final chunk).
#[derive(Debug)]
pub struct UsageScanner {
    mode: Mode,
    usage: Option<Usage>,
}

impl UsageScanner {
    pub fn new(sse: bool) -> Self {
        let mode = if sse {
            Mode::Sse {
                line: Vec::new(),
                skipping: false,
            }
        } else {
            Mode::Json {
                buf: Vec::new(),
                overflow: false,
            }
        };
        Self { mode, usage: None }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.mode {
            Mode::Json { buf, overflow } => {
                if buf.len() + chunk.len() > MAX_JSON {
                    *overflow = true;
                    buf.clear();
                } else if !*overflow {
                    buf.extend_from_slice(chunk);
                }
            }
            Mode::Sse { line, skipping } => {
                let mut rest = chunk;
                // A CRLF split between chunks reads as one more, empty, line: no usage in it.
                while let Some((end, next)) = line_end(rest) {
                    let head = &rest[..end];
                    rest = &rest[next..];
                    if *skipping {
                        *skipping = false;
                        line.clear();
                        continue;
                    }
                    let found = if line.is_empty() {
                        sse_line_usage(head)
                    } else {
                        line.extend_from_slice(head);
                        let u = sse_line_usage(line);
                        line.clear();
                        u
                    };
                    if found.is_some() {
                        self.usage = found;
                    }
                }
                if !*skipping && !rest.is_empty() {
                    if line.len() + rest.len() > MAX_LINE {
                        *skipping = true;
                        line.clear();
                    } else {
                        line.extend_from_slice(rest);
                    }
                }
            }
        }
    }

    /// The usage once the body has ended.
    pub fn finish(mut self) -> Option<Usage> {
        match &mut self.mode {
            Mode::Json { buf, overflow } if !*overflow && !buf.is_empty() => {
                serde_json::from_slice::<Value>(buf)
                    .ok()
                    .and_then(|v| usage_of(&v))
            }
            Mode::Sse { line, skipping } if !*skipping && !line.is_empty() => {
                sse_line_usage(line).or(self.usage)
            }
            _ => self.usage,
        }
    }
}

/// Where the first line of `buf` ends: its length without the terminator, and with it. SSE ends
/// lines with LF, CRLF or a lone CR. A CR that ends `buf` ends its line at once; an LF opening
/// the next chunk may then be the rest of a CRLF, which the filter must not take for the blank
/// line ending an event (for the scanner an extra empty line is harmless).
fn line_end(buf: &[u8]) -> Option<(usize, usize)> {
    let i = buf.iter().position(|b| matches!(b, b'\n' | b'\r'))?;
    let crlf = buf[i] == b'\r' && buf.get(i + 1) == Some(&b'\n');
    Some((i, i + 1 + usize::from(crlf)))
}

/// One SSE line: only `data:` lines that mention usage are parsed.
fn sse_line_usage(line: &[u8]) -> Option<Usage> {
    usage_chunk(line).and_then(|v| usage_of(&v))
}

/// The chunk of a `data:` line that mentions usage; other lines are not parsed.
fn usage_chunk(line: &[u8]) -> Option<Value> {
    let data = line.strip_prefix(b"data:")?;
    if !data.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    serde_json::from_slice(data.trim_ascii()).ok()
}

/// A provider's SSE stream on its way to the client, line by line: it drops the usage-only
/// chunk (`"choices": []` with a `usage`) and the blank line ending its event when the router
/// asked for it on the client's behalf (a client that did not ask may read `choices[0]` of every
/// chunk), and writes the client's model name into every chunk (see `router::model_name`). A
/// line passes as soon as its newline arrives; only a partial line is held, and one longer than
/// `MAX_LINE` passes unexamined. It reads the usage on the way, as [`UsageScanner`] does for a
/// stream passed whole.
#[derive(Debug, Default)]
pub struct StreamFilter {
    /// Drop the usage-only chunk.
    drop_usage: bool,
    /// The model name to write into each chunk.
    model: Option<String>,
    held: Vec<u8>,
    /// The last usage seen.
    usage: Option<Usage>,
    /// The current line was too long to hold: its bytes pass until its newline.
    passing: bool,
    /// The last line was dropped, so the blank line after it goes too.
    dropped: bool,
    /// The last chunk ended on a CR: whether an LF opening the next one, the rest of that line,
    /// goes on (the line passed) or not (it was dropped).
    after_cr: Option<bool>,
}

impl StreamFilter {
    pub fn new(drop_usage: bool, model: Option<String>) -> Self {
        Self {
            drop_usage,
            model,
            ..Self::default()
        }
    }

    /// The bytes of `chunk` that go on to the client (possibly none yet).
    pub fn pass(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(self.held.len() + chunk.len());
        let mut rest = chunk;
        if let Some(passed) = self.after_cr.take_if(|_| !rest.is_empty())
            && let Some(tail) = rest.strip_prefix(b"\n")
        {
            if passed {
                out.extend_from_slice(b"\n");
            }
            rest = tail;
        }
        while let Some((_, next)) = line_end(rest) {
            let (line, tail) = rest.split_at(next);
            rest = tail;
            let passed = if self.passing {
                self.passing = false;
                out.extend_from_slice(line);
                true
            } else if self.held.is_empty() {
                self.line(line, &mut out)
            } else {
                let mut whole = std::mem::take(&mut self.held);
                whole.extend_from_slice(line);
                let passed = self.line(&whole, &mut out);
                whole.clear();
                self.held = whole;
                passed
            };
            if rest.is_empty() && line.ends_with(b"\r") {
                self.after_cr = Some(passed);
            }
        }
        if self.passing {
            out.extend_from_slice(rest);
        } else if self.held.len() + rest.len() > MAX_LINE {
            out.extend_from_slice(&self.held);
            out.extend_from_slice(rest);
            self.held.clear();
            self.passing = true;
        } else {
            self.held.extend_from_slice(rest);
        }
        out.freeze()
    }

    /// Whether a partial line is held back.
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// The usage read so far (all of it once `finish` has run).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// At the end of the stream: a last line without its newline, unless it is the usage chunk.
    pub fn finish(&mut self) -> Bytes {
        let last = std::mem::take(&mut self.held);
        let mut out = BytesMut::new();
        self.line(&last, &mut out);
        out.freeze()
    }

    /// Passes `line` on to `out` unless it is dropped; says which.
    fn line(&mut self, line: &[u8], out: &mut BytesMut) -> bool {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let after_dropped = std::mem::take(&mut self.dropped);
        if after_dropped && text.is_empty() {
            return false;
        }
        if let Some(v) = usage_chunk(text) {
            if let Some(u) = usage_of(&v) {
                self.usage = Some(u);
            }
            // No choices (empty, or none at all), just usage.
            if self.drop_usage
                && v.get("choices")
                    .is_none_or(|c| c.as_array().is_some_and(Vec::is_empty))
                && v.get("usage").is_some_and(Value::is_object)
            {
                self.dropped = true;
                return false;
            }
        }
        let renamed = self.model.as_deref().and_then(|m| {
            let data = line.strip_prefix(b"data:")?;
            super::model_name::rewrite_model(data, m)
        });
        match renamed {
            Some(data) => {
                out.extend_from_slice(b"data:");
                out.extend_from_slice(&data);
            }
            None => out.extend_from_slice(line),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_as_every_endpoint_gives_it() {
        let u = |v: serde_json::Value| usage_of(&v);
        let want = |p, c| {
            Some(Usage {
                prompt_tokens: p,
                completion_tokens: c,
            })
        };
        assert_eq!(
            u(serde_json::json!({"usage": {"prompt_tokens": 8, "total_tokens": 8}})),
            want(8, 0)
        );
        assert_eq!(
            u(
                serde_json::json!({"usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}})
            ),
            want(5, 7)
        );
        assert_eq!(
            u(
                serde_json::json!({"type": "response.completed", "response": {"usage": {"input_tokens": 2, "output_tokens": 3}}})
            ),
            want(2, 3)
        );
        assert_eq!(u(serde_json::json!({"usage": null})), None);
    }

    #[test]
    fn a_stream_gets_the_clients_model_name_in_every_chunk_however_split() {
        let stream = concat!(
            "data: {\"id\":\"a\",\"model\":\"turbo\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "data: {\"id\":\"a\",\"model\":\"turbo\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\r\n\r\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for size in [1, 3, 17, stream.len()] {
            // The usage chunk stays when the client asked for it, renamed too.
            let mut f = StreamFilter::new(false, Some("mine".into()));
            let mut out = Vec::new();
            for c in stream.chunks(size) {
                out.extend_from_slice(&f.pass(c));
            }
            out.extend_from_slice(&f.finish());
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("turbo"), "{text}");
            assert_eq!(text.matches("\"model\":\"mine\"").count(), 2, "{text}");
            assert!(text.ends_with("data: [DONE]\n\n"));
            assert_eq!(
                f.usage(),
                Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 1
                })
            );
        }
    }

    #[test]
    fn json_body_usage_across_chunks() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;
        let mut s = UsageScanner::new(false);
        for c in body.chunks(5) {
            s.feed(c);
        }
        assert_eq!(
            s.finish(),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 34
            })
        );
        let mut s = UsageScanner::new(false);
        s.feed(b"{\"error\":{}}");
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn sse_usage_from_the_chunk_that_carries_it_split_anywhere() {
        let stream = concat!(
            "data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"text\":\"b\"}]}\r\n\r\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for size in [1, 2, 7, 64, stream.len()] {
            let mut s = UsageScanner::new(true);
            for c in stream.chunks(size) {
                s.feed(c);
            }
            assert_eq!(
                s.finish(),
                Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 2
                }),
                "chunk size {size}"
            );
        }
    }

    /// SSE allows a lone CR as a line end: lines are read as they end, not when an LF comes.
    #[test]
    fn sse_lines_may_end_with_a_lone_cr() {
        let mut s = UsageScanner::new(true);
        s.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\r");
        s.feed(b"\rdata: [DONE]\r\r");
        assert_eq!(
            s.usage,
            Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 1
            })
        );
    }

    #[test]
    fn sse_last_line_without_newline_and_oversized_lines() {
        let mut s = UsageScanner::new(true);
        s.feed(b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}");
        assert_eq!(
            s.finish(),
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 1
            })
        );
        // A huge line is skipped without being held, and the scanner recovers after it.
        let mut s = UsageScanner::new(true);
        s.feed(b"data: ");
        s.feed(&vec![b'x'; MAX_LINE + 1]);
        s.feed(b"\"usage\"\ndata: {\"usage\":{\"prompt_tokens\":5}}\n");
        assert_eq!(
            s.finish(),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 0
            })
        );
    }

    const USAGE_LINE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}";

    fn filtered(stream: &[u8], size: usize) -> String {
        let mut f = StreamFilter::new(true, None);
        let mut out = Vec::new();
        for c in stream.chunks(size) {
            out.extend_from_slice(&f.pass(c));
        }
        out.extend_from_slice(&f.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_usage_only_chunk_and_its_blank_line_are_dropped_split_anywhere() {
        let kept = concat!(
            "data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"text\":\"b\"}],\"usage\":{\"prompt_tokens\":1}}\r\n\r\n",
            ": comment\n\n",
        );
        let stream = format!(
            "{kept}{USAGE_LINE}\r\n\r\ndata: {{\"usage\":{{\"prompt_tokens\":3}}}}\n\ndata: [DONE]\n\n"
        );
        for size in [1, 2, 7, 64, stream.len()] {
            assert_eq!(
                filtered(stream.as_bytes(), size),
                format!("{kept}data: [DONE]\n\n"),
                "chunk size {size}"
            );
        }
    }

    #[test]
    fn lines_ending_in_a_lone_cr_pass_at_once_and_the_usage_chunk_is_dropped() {
        let mut f = StreamFilter::new(true, None);
        assert_eq!(
            &f.pass(b"data: {\"choices\":[{\"text\":\"a\"}]}\r\rdata: [DO")[..],
            b"data: {\"choices\":[{\"text\":\"a\"}]}\r\r"
        );
        assert_eq!(&f.pass(b"NE]\r")[..], b"data: [DONE]\r");
        assert!(!f.holds());
        // Split anywhere, CRLF parted between chunks too, lone CRs and CRLFs mixed.
        let kept = "data: {\"choices\":[{\"text\":\"b\"}]}\r\r: c\r\n\r\n";
        let stream = format!("{kept}{USAGE_LINE}\r\rdata: [DONE]\r\n\r\n");
        for size in [1, 2, 3, 7, stream.len()] {
            assert_eq!(
                filtered(stream.as_bytes(), size),
                format!("{kept}data: [DONE]\r\n\r\n"),
                "chunk size {size}"
            );
        }
        let stream = format!("{USAGE_LINE}\r\n\r\ndata: [DONE]\r\n");
        assert_eq!(
            filtered(stream.as_bytes(), USAGE_LINE.len() + 1),
            "data: [DONE]\r\n"
        );
    }

    #[test]
    fn whole_lines_pass_at_once_and_a_last_line_without_newline_is_kept() {
        let mut f = StreamFilter::new(true, None);
        assert_eq!(
            &f.pass(b"data: {\"choices\":[]}\n\ndata: [DO")[..],
            b"data: {\"choices\":[]}\n\n"
        );
        assert!(f.holds());
        assert_eq!(&f.pass(b"NE]")[..], b"");
        assert_eq!(&f.finish()[..], b"data: [DONE]");
        // The usage chunk is dropped even as the stream's unterminated last line.
        assert_eq!(filtered(USAGE_LINE.as_bytes(), 5), "");
    }

    #[test]
    fn an_oversized_line_passes_unexamined_and_filtering_resumes_after_it() {
        let big = format!("data: {}\n", "x".repeat(MAX_LINE + 1));
        let stream = format!("{big}{USAGE_LINE}\n\nend\n");
        let mut f = StreamFilter::new(true, None);
        let mut out = Vec::new();
        for c in stream.as_bytes().chunks(4096) {
            let b = f.pass(c);
            assert!(f.held.len() <= MAX_LINE);
            out.extend_from_slice(&b);
        }
        out.extend_from_slice(&f.finish());
        assert_eq!(String::from_utf8(out).unwrap(), format!("{big}end\n"));
    }
}
