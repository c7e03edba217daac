//! Shadow traffic (pure): which requests are mirrored to a candidate revision, and whether the
//! candidate's answer differs from the one the client got. Answers are compared by the text
//! they generated (its length and its first characters) and never kept past the comparison,
//! logged, or exported: only the counts are.

use std::sync::Mutex;

use serde_json::Value;

/// Whether request number `turn` (of a serving thread's sequence) is mirrored, at `percent`:
/// exactly `percent` of any 100 turns in a row, spread out.
pub fn mirrored(percent: u32, turn: u64) -> bool {
    // 37 is prime to 100: each 100 turns visit every residue once.
    turn.wrapping_mul(37) % 100 < u64::from(percent.min(100))
}

/// Most of an answer read for the comparison; a longer one compares by what fits.
pub const MAX_CAPTURE: usize = 256 << 10;
/// The characters compared besides the length.
const HEAD_CHARS: usize = 64;

/// What an answer said, as far as the comparison goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub chars: usize,
    pub head: String,
}

impl Digest {
    pub fn of(text: &str) -> Self {
        Self {
            chars: text.chars().count(),
            head: text.chars().take(HEAD_CHARS).collect(),
        }
    }
}

/// The text an answer generated: completions' text, chat messages' content, Responses' output
/// text (each also as streamed deltas); for other answers (embeddings, scores), their `data`
/// or `results` with numbers to 3 decimals (engines differ in float noise). `None` for an
/// answer that is neither.
pub fn answer_text(body: &[u8], sse: bool) -> Option<String> {
    if !sse {
        let v: Value = serde_json::from_slice(body).ok()?;
        return json_text(&v);
    }
    let mut out = String::new();
    let mut any = false;
    for line in body.split(|b| *b == b'\n') {
        let Some(data) = line.trim_ascii().strip_prefix(b"data:") else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii()) else {
            continue; // `[DONE]`, or a line cut at the capture's end
        };
        any = true;
        if let Some(d) = v
            .get("delta")
            .and_then(Value::as_str)
            .filter(|_| str_at(&v, "type").is_some_and(|t| t.ends_with("output_text.delta")))
        {
            out.push_str(d);
        }
        for c in v
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for t in [c.get("delta").and_then(|d| d.get("content")), c.get("text")] {
                if let Some(t) = t.and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
        }
    }
    any.then_some(out)
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn json_text(v: &Value) -> Option<String> {
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        let mut out = String::new();
        for c in choices {
            let t = c
                .get("message")
                .and_then(|m| m.get("content"))
                .or_else(|| c.get("text"));
            out.push_str(t.and_then(Value::as_str).unwrap_or_default());
        }
        return Some(out);
    }
    if let Some(output) = v.get("output").and_then(Value::as_array) {
        let mut out = String::new();
        for item in output {
            for part in item
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                out.push_str(str_at(part, "text").unwrap_or_default());
            }
        }
        return Some(out);
    }
    let data = v.get("data").or_else(|| v.get("results"))?;
    Some(rounded(data).to_string())
}

fn rounded(v: &Value) -> Value {
    match v {
        Value::Number(n) => n
            .as_f64()
            .and_then(|f| serde_json::Number::from_f64((f * 1000.0).round() / 1000.0))
            .map_or_else(|| v.clone(), Value::Number),
        Value::Array(a) => Value::Array(a.iter().map(rounded).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, x)| (k.clone(), rounded(x))).collect()),
        _ => v.clone(),
    }
}

/// How a mirrored pair compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compared {
    /// Same length and the same first characters.
    Same,
    Different,
    /// One side had no answer to compare (an error, a cut-off, an unreadable body).
    Unanswered,
}

impl Compared {
    pub fn label(self) -> &'static str {
        match self {
            Compared::Same => "same",
            Compared::Different => "different",
            Compared::Unanswered => "unanswered",
        }
    }
}

/// Where the client's answer and the candidate's meet, whichever ends first.
#[derive(Debug, Default)]
pub struct Pair(Mutex<Option<Option<Digest>>>);

impl Pair {
    /// One side's digest (`None`: no answer); the second side gets the comparison.
    pub fn deposit(&self, d: Option<Digest>) -> Option<Compared> {
        let mut first = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match first.take() {
            None => {
                *first = Some(d);
                None
            }
            Some(other) => Some(match (other, d) {
                (Some(a), Some(b)) if a == b => Compared::Same,
                (Some(_), Some(_)) => Compared::Different,
                _ => Compared::Unanswered,
            }),
        }
    }
}

/// An answer's bytes as they pass, up to [`MAX_CAPTURE`].
#[derive(Debug, Default)]
pub struct Capture {
    buf: Vec<u8>,
}

impl Capture {
    pub fn feed(&mut self, d: &[u8]) {
        let room = MAX_CAPTURE.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&d[..d.len().min(room)]);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn digest(&self, sse: bool) -> Option<Digest> {
        answer_text(&self.buf, sse).map(|t| Digest::of(&t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirrored_share_is_exact_over_any_hundred_requests() {
        for start in [0u64, 13, 999_999] {
            let n = (start..start + 100).filter(|t| mirrored(10, *t)).count();
            assert_eq!(n, 10);
        }
        assert!(!(0..100).any(|t| mirrored(0, t)));
        assert!((0..100).all(|t| mirrored(100, t)));
    }

    #[test]
    fn the_text_of_json_and_streamed_answers() {
        let chat = br#"{"id":"a","created":1,"choices":[{"message":{"role":"assistant","content":"Hello there"}}]}"#;
        assert_eq!(answer_text(chat, false).as_deref(), Some("Hello there"));
        let completion = br#"{"id":"b","choices":[{"text":"Hi"}]}"#;
        assert_eq!(answer_text(completion, false).as_deref(), Some("Hi"));
        let stream = b"data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
            data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
            data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(answer_text(stream, true).as_deref(), Some("Hello"));
        let responses = br#"{"output":[{"content":[{"type":"output_text","text":"Yes"}]}]}"#;
        assert_eq!(answer_text(responses, false).as_deref(), Some("Yes"));
        let deltas = b"data: {\"type\":\"response.output_text.delta\",\"delta\":\"Y\"}\n\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"es\"}\n\n";
        assert_eq!(answer_text(deltas, true).as_deref(), Some("Yes"));
        // Embeddings compare with float noise rounded away.
        let a = br#"{"data":[{"embedding":[0.12341,0.5]}],"usage":{"prompt_tokens":3}}"#;
        let b = br#"{"data":[{"embedding":[0.12339,0.5]}],"usage":{"prompt_tokens":4}}"#;
        assert_eq!(answer_text(a, false), answer_text(b, false));
        assert_eq!(answer_text(b"not json", false), None);
    }

    /// Ids and timestamps differ between engines always; the text decides.
    #[test]
    fn a_pair_compares_once_both_sides_are_in() {
        let text = |s: &str| Some(Digest::of(s));
        let p = Pair::default();
        assert_eq!(p.deposit(text("Hello")), None);
        assert_eq!(p.deposit(text("Hello")), Some(Compared::Same));
        let p = Pair::default();
        p.deposit(text("Hello"));
        assert_eq!(p.deposit(text("Hello!")), Some(Compared::Different));
        let p = Pair::default();
        p.deposit(None);
        assert_eq!(p.deposit(text("Hello")), Some(Compared::Unanswered));
        let mut c = Capture::default();
        c.feed(&vec![b'x'; MAX_CAPTURE + 10]);
        assert_eq!(c.buf.len(), MAX_CAPTURE);
    }
}
