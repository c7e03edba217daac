//! The endpoints beyond completions that engine-sim answers at once, without a slot (pure
//! builders; the server reads the body and writes the answer): embeddings (deterministic
//! vectors), `/tokenize` and `/detokenize`, and audio transcription of a multipart upload.

use serde_json::{Value, json};

use super::faults::SplitMix64;
use super::model::estimate_prompt_tokens as estimate_tokens;

/// Dimensions of an embedding unless the request asks for fewer (`dimensions`).
pub const EMBEDDING_DIMS: usize = 16;

/// The texts of an embeddings request's `input` (a string, or a list of strings or of token
/// lists, whose lengths count).
fn inputs(v: &Value) -> Result<Vec<String>, String> {
    let texts = match v.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Array(tokens) => Ok(" x".repeat(tokens.len())),
                _ => Err("'input' items must be strings or token lists".to_string()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err("'input' must be a string or a non-empty array".into()),
    };
    Ok(texts)
}

/// An embeddings answer: one unit vector per input, the same for the same text and seed.
pub fn embeddings(body: &[u8], model: &str, seed: u64) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let texts = inputs(&v)?;
    let dims = v
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(EMBEDDING_DIMS, |d| (d as usize).clamp(1, 4096));
    let mut prompt_tokens = 0;
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            prompt_tokens += estimate_tokens(t.chars().count());
            json!({"object": "embedding", "index": i, "embedding": vector(t, dims, seed)})
        })
        .collect();
    Ok(json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
}

fn vector(text: &str, dims: usize, seed: u64) -> Vec<f64> {
    // FNV-1a of the text seeds the generator: the same text, the same vector.
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut rng = SplitMix64::new(h ^ seed);
    let raw: Vec<f64> = (0..dims)
        .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    raw.iter().map(|x| (x / norm * 1e6).round() / 1e6).collect()
}

/// `/tokenize`: one token id per estimated token of `prompt` (or of `messages`' contents).
pub fn tokenize(body: &[u8]) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let text = match (v.get("prompt"), v.get("messages")) {
        (Some(Value::String(p)), _) => p.clone(),
        (_, Some(Value::Array(ms))) => ms
            .iter()
            .filter_map(|m| m.get("content")?.as_str())
            .collect(),
        _ => return Err("'prompt' or 'messages' is required".into()),
    };
    let n = estimate_tokens(text.chars().count());
    let tokens: Vec<u64> = (0..n).map(|i| 1000 + i).collect();
    Ok(json!({"count": n, "max_model_len": 8192, "tokens": tokens}))
}

/// `/detokenize`: a word per token.
pub fn detokenize(body: &[u8]) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let n = v
        .get("tokens")
        .and_then(Value::as_array)
        .ok_or("'tokens' must be an array")?
        .len();
    Ok(json!({"prompt": vec!["tok"; n].join(" ")}))
}

/// A transcription of a `multipart/form-data` upload: says how many bytes its `file` part had
/// and which `model` it named.
pub fn transcription(content_type: &str, body: &[u8]) -> Result<Value, String> {
    let boundary = content_type
        .strip_prefix("multipart/form-data")
        .and_then(|rest| {
            rest.split(';')
                .find_map(|p| p.trim().strip_prefix("boundary="))
        })
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or("expected multipart/form-data with a boundary")?;
    let delimiter = format!("--{boundary}");
    let mut file = None;
    let mut model = None;
    for part in split(body, delimiter.as_bytes()).into_iter().skip(1) {
        let Some(at) = find(part, b"\r\n\r\n") else {
            continue;
        };
        let (head, data) = (&part[..at], &part[at + 4..]);
        let data = data.strip_suffix(b"\r\n").unwrap_or(data);
        let head = String::from_utf8_lossy(head);
        if head.contains("name=\"file\"") {
            file = Some(data.len());
        } else if head.contains("name=\"model\"") {
            model = Some(String::from_utf8_lossy(data).into_owned());
        }
    }
    let bytes = file.ok_or("no 'file' part")?;
    Ok(json!({"text": format!("engine-sim heard {bytes} bytes for {}", model.unwrap_or_default())}))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn split<'a>(mut body: &'a [u8], delimiter: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while let Some(at) = find(body, delimiter) {
        out.push(&body[..at]);
        body = &body[at + delimiter.len()..];
    }
    out.push(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_deterministic_unit_vectors_with_usage() {
        let a = embeddings(br#"{"model":"m","input":["hello","world"]}"#, "m", 1).unwrap();
        let b = embeddings(br#"{"input":["hello"],"dimensions":4}"#, "m", 1).unwrap();
        assert_eq!(a["data"].as_array().unwrap().len(), 2);
        assert_eq!(a["model"], "m");
        let v: Vec<f64> = serde_json::from_value(a["data"][0]["embedding"].clone()).unwrap();
        assert_eq!(v.len(), EMBEDDING_DIMS);
        assert!((v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4);
        assert_eq!(b["data"][0]["embedding"].as_array().unwrap().len(), 4);
        assert_eq!(
            a["data"][0]["embedding"],
            embeddings(br#"{"input":"hello"}"#, "m", 1).unwrap()["data"][0]["embedding"]
        );
        assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() >= 2);
        assert!(embeddings(br#"{"input":[]}"#, "m", 1).is_err());
        assert!(embeddings(b"nope", "m", 1).is_err());
    }

    #[test]
    fn a_multipart_upload_is_read_part_by_part() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n\x00\x01--X\r\n--XyZ--\r\n";
        let t = transcription("multipart/form-data; boundary=XyZ", body).unwrap();
        assert_eq!(t["text"], "engine-sim heard 11 bytes for whisper");
        assert!(transcription("application/json", b"{}").is_err());
        assert!(transcription("multipart/form-data; boundary=XyZ", b"--XyZ--").is_err());
    }

    #[test]
    fn tokenize_and_back() {
        let t = tokenize(br#"{"prompt":"abcdefgh"}"#).unwrap();
        assert_eq!(t["count"], t["tokens"].as_array().unwrap().len());
        let d = detokenize(br#"{"tokens":[1,2,3]}"#).unwrap();
        assert_eq!(d["prompt"], "tok tok tok");
        assert!(detokenize(b"{}").is_err());
    }
}
