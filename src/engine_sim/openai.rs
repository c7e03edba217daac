//! The OpenAI-compatible wire format: requests in, responses, stream chunks and errors out.

use serde::Deserialize;
use serde_json::{Value, json};

use super::faults::SplitMix64;

/// Which endpoint a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
    /// The Responses API, minimal: text in, one message out, not streamed.
    Responses,
}

/// The fields of either request kind that the simulation uses; others are accepted and ignored.
#[derive(Debug, Deserialize)]
pub struct InferenceRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<Prompt>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// The newer chat name for `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Responses: a string, or input items with content.
    #[serde(default)]
    input: Option<Input>,
    /// Responses: the output cap.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Message>),
}

impl InferenceRequest {
    /// A stream ends with a usage chunk only when asked, as with OpenAI and vLLM.
    pub fn stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

impl InferenceRequest {
    /// Parses and checks the request has what its endpoint needs.
    pub fn parse(kind: Kind, body: &[u8]) -> Result<Self, String> {
        let req: Self =
            serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
        match kind {
            Kind::Chat if req.messages.as_ref().is_none_or(Vec::is_empty) => {
                Err("'messages' must be a non-empty array".into())
            }
            Kind::Completion if req.prompt.is_none() => Err("'prompt' is required".into()),
            Kind::Responses if req.input.is_none() => Err("'input' is required".into()),
            Kind::Responses if req.stream => {
                Err("engine-sim's /v1/responses does not stream".into())
            }
            _ => Ok(req),
        }
    }

    /// Characters of prompt text: message contents (text parts) or the prompt string(s).
    pub fn prompt_chars(&self) -> usize {
        let messages = self
            .messages
            .iter()
            .flatten()
            .filter_map(|m| m.content.as_ref());
        let items = match &self.input {
            Some(Input::Items(items)) => &items[..],
            _ => &[],
        };
        let message_chars: usize = messages
            .chain(items.iter().filter_map(|m| m.content.as_ref()))
            .map(|c| match c {
                Content::Text(t) => t.chars().count(),
                Content::Parts(parts) => parts
                    .iter()
                    .filter_map(|p| p.text.as_ref())
                    .map(|t| t.chars().count())
                    .sum(),
            })
            .sum::<usize>()
            + match &self.input {
                Some(Input::Text(t)) => t.chars().count(),
                _ => 0,
            };
        let prompt_chars = match &self.prompt {
            Some(Prompt::One(p)) => p.chars().count(),
            Some(Prompt::Many(ps)) => ps.iter().map(|p| p.chars().count()).sum(),
            None => 0,
        };
        message_chars + prompt_chars
    }

    /// The requested output length, if any.
    pub fn requested_tokens(&self) -> Option<u64> {
        self.max_completion_tokens
            .or(self.max_tokens)
            .or(self.max_output_tokens)
    }
}

const WORDS: [&str; 16] = [
    "the", "engine", "queue", "token", "spills", "over", "to", "a", "warm", "replica", "while",
    "GPUs", "start", "and", "traffic", "flows",
];

/// Deterministic text for one response: `n` words from a PRNG seeded per request.
pub fn tokens(seed: u64, n: u64) -> Vec<String> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|i| {
            let w = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize];
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

/// Everything a response or chunk needs to say who it is.
#[derive(Clone, Debug)]
pub struct Meta {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub fn usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// A whole (non-streaming) response.
pub fn response(meta: &Meta, text: &str, finish_reason: &str, usage: Value) -> Value {
    match meta.kind {
        Kind::Chat => json!({
            "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }],
            "usage": usage,
        }),
        Kind::Completion => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}],
            "usage": usage,
        }),
        Kind::Responses => json!({
            "id": meta.id, "object": "response", "created_at": meta.created, "model": meta.model,
            "status": "completed",
            "output": [{
                "type": "message", "id": format!("msg_{}", meta.id), "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }],
            "usage": {
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
            },
        }),
    }
}

/// What one stream chunk carries.
pub enum Piece<'a> {
    /// Chat only: the assistant role, sent when prefill ends.
    Role,
    Text(&'a str),
    Finish(&'a str),
    /// The last chunk: no choices, just usage (as OpenAI sends with `include_usage`).
    Usage(Value),
}

pub fn chunk(meta: &Meta, piece: Piece<'_>) -> Value {
    let (object, choice) = match meta.kind {
        Kind::Chat => (
            "chat.completion.chunk",
            match piece {
                Piece::Role => Some(
                    json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}),
                ),
                Piece::Text(t) => {
                    Some(json!({"index": 0, "delta": {"content": t}, "finish_reason": null}))
                }
                Piece::Finish(r) => Some(json!({"index": 0, "delta": {}, "finish_reason": r})),
                Piece::Usage(_) => None,
            },
        ),
        // Not streamed (refused at parse).
        Kind::Completion | Kind::Responses => (
            "text_completion",
            match piece {
                Piece::Role => {
                    Some(json!({"index": 0, "text": "", "logprobs": null, "finish_reason": null}))
                }
                Piece::Text(t) => {
                    Some(json!({"index": 0, "text": t, "logprobs": null, "finish_reason": null}))
                }
                Piece::Finish(r) => {
                    Some(json!({"index": 0, "text": "", "logprobs": null, "finish_reason": r}))
                }
                Piece::Usage(_) => None,
            },
        ),
    };
    let mut v = json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": choice.map_or_else(Vec::new, |c| vec![c]),
    });
    if let Piece::Usage(u) = piece {
        v["usage"] = u;
    }
    v
}

/// One SSE event.
pub fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// An OpenAI-style error body.
pub fn error(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

pub fn models(model: &str) -> Value {
    json!({
        "object": "list",
        "data": [{"id": model, "object": "model", "created": 0, "owned_by": "spillway-engine-sim"}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_prompt_chars_count_string_and_part_contents() {
        let body = br#"{"model":"m","messages":[
            {"role":"system","content":"abcd"},
            {"role":"user","content":[{"type":"text","text":"efgh"},{"type":"image_url","image_url":{}}]},
            {"role":"assistant","content":null}
        ],"max_tokens":3,"stream":true}"#;
        let r = InferenceRequest::parse(Kind::Chat, body).unwrap();
        assert_eq!(r.prompt_chars(), 8);
        assert_eq!(r.requested_tokens(), Some(3));
        assert!(r.stream);
    }

    #[test]
    fn completion_prompt_may_be_a_list_and_max_completion_tokens_wins() {
        let body = br#"{"prompt":["ab","cde"],"max_tokens":3,"max_completion_tokens":9}"#;
        let r = InferenceRequest::parse(Kind::Completion, body).unwrap();
        assert_eq!(r.prompt_chars(), 5);
        assert_eq!(r.requested_tokens(), Some(9));
        assert!(r.model.is_none());
    }

    #[test]
    fn missing_inputs_and_bad_json_are_rejected() {
        assert!(InferenceRequest::parse(Kind::Chat, br#"{"model":"m"}"#).is_err());
        assert!(InferenceRequest::parse(Kind::Chat, br#"{"messages":[]}"#).is_err());
        assert!(
            InferenceRequest::parse(Kind::Completion, br#"{"messages":[{"content":"x"}]}"#)
                .is_err()
        );
        assert!(InferenceRequest::parse(Kind::Chat, b"not json").is_err());
    }

    #[test]
    fn token_text_is_deterministic_per_seed() {
        assert_eq!(tokens(5, 4), tokens(5, 4));
        assert_ne!(tokens(5, 8), tokens(6, 8));
        assert_eq!(tokens(5, 3).len(), 3);
        assert!(!tokens(5, 1)[0].starts_with(' '));
    }

    #[test]
    fn usage_chunk_has_no_choices() {
        let meta = Meta {
            kind: Kind::Chat,
            id: "x".into(),
            created: 0,
            model: "m".into(),
        };
        let c = chunk(&meta, Piece::Usage(usage(2, 3)));
        assert_eq!(c["choices"], json!([]));
        assert_eq!(c["usage"]["total_tokens"], 5);
    }
}
