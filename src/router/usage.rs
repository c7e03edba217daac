//! Pure token-usage extraction from provider responses as their bytes pass through: SSE lines are
//! scanned one at a time (only a partial line is ever held), a JSON body is collected up to a cap.

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

/// Reads `usage` from a value holding one (a whole response, or one stream chunk).
pub fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    Some(Usage {
        prompt_tokens: u.get("prompt_tokens")?.as_u64()?,
        completion_tokens: u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
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
                while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                    let (head, tail) = rest.split_at(nl);
                    rest = &tail[1..];
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

/// One SSE line: only `data:` lines that mention usage are parsed.
fn sse_line_usage(line: &[u8]) -> Option<Usage> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    if !data.windows(7).any(|w| w == b"\"usage\"") {
        return None;
    }
    serde_json::from_slice::<Value>(data.trim_ascii())
        .ok()
        .and_then(|v| usage_of(&v))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
