//! The model name in a provider's JSON answer, rewritten to the one the client asked for
//! (pure). Only the name's bytes change; everything else passes as it came, so a stream chunk
//! or a large embeddings answer needs no parse into a tree.

/// `json` with its model name set to `model`: the top-level `"model"` string, and the one of a
/// top-level `"response"` object (the Responses API's stream events). `None` when there is
/// none, or the text is cut short (it then passes unchanged).
pub fn rewrite_model(json: &[u8], model: &str) -> Option<Vec<u8>> {
    let spans = model_spans(json)?;
    if spans.is_empty() {
        return None;
    }
    let quoted = serde_json::to_string(model).ok()?;
    let mut out = Vec::with_capacity(json.len() + spans.len() * quoted.len());
    let mut at = 0;
    for (start, end) in spans {
        out.extend_from_slice(&json[at..start]);
        out.extend_from_slice(quoted.as_bytes());
        at = end;
    }
    out.extend_from_slice(&json[at..]);
    Some(out)
}

/// Where the model strings are (quotes included), in order.
fn model_spans(json: &[u8]) -> Option<Vec<(usize, usize)>> {
    // Open containers: `true` for an object that is the top-level "response".
    let mut stack: Vec<(u8, bool)> = Vec::new();
    let mut expect_key = false;
    let mut key: Option<(usize, usize)> = None;
    let mut spans = Vec::new();
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                let start = i;
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                if i >= json.len() {
                    return None;
                }
                let end = i + 1;
                if expect_key && stack.last().is_some_and(|(c, _)| *c == b'{') {
                    key = Some((start + 1, i));
                    expect_key = false;
                } else if let Some((ks, ke)) = key.take() {
                    let at_model_level = match stack.as_slice() {
                        [(b'{', _)] => true,
                        [(b'{', _), (b'{', response)] => *response,
                        _ => false,
                    };
                    if at_model_level && &json[ks..ke] == b"model" {
                        spans.push((start, end));
                    }
                }
                i = end;
                continue;
            }
            b'{' => {
                let response =
                    stack.len() == 1 && key.is_some_and(|(s, e)| &json[s..e] == b"response");
                stack.push((b'{', response));
                expect_key = true;
                key = None;
            }
            b'[' => {
                stack.push((b'[', false));
                key = None;
            }
            b'}' | b']' => {
                stack.pop();
                key = None;
            }
            b',' => {
                expect_key = stack.last().is_some_and(|(c, _)| *c == b'{');
                key = None;
            }
            _ => {}
        }
        i += 1;
    }
    Some(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(json: &str) -> Option<String> {
        rewrite_model(json.as_bytes(), "meta-llama/Llama-3.1-8B-Instruct")
            .map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn the_top_level_model_is_rewritten_and_nothing_else() {
        assert_eq!(
            rw(r#"{"id":"x","model":"turbo","choices":[{"model":"inner","text":"\"model\":\"no\""}]}"#)
                .unwrap(),
            r#"{"id":"x","model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"model":"inner","text":"\"model\":\"no\""}]}"#
        );
        // Spacing kept; the model after a large array (as embeddings answers put it).
        assert_eq!(
            rw("{ \"data\" : [ {\"embedding\": [0.1, -2e-3]} ] ,\n \"model\" :  \"e5\" , \"usage\": {}}")
                .unwrap(),
            "{ \"data\" : [ {\"embedding\": [0.1, -2e-3]} ] ,\n \"model\" :  \"meta-llama/Llama-3.1-8B-Instruct\" , \"usage\": {}}"
        );
        // The Responses API's stream events carry it in "response".
        assert_eq!(
            rw(
                r#"{"type":"response.completed","response":{"id":"r","model":"turbo","output":[]}}"#
            )
            .unwrap(),
            r#"{"type":"response.completed","response":{"id":"r","model":"meta-llama/Llama-3.1-8B-Instruct","output":[]}}"#
        );
    }

    #[test]
    fn no_model_a_model_that_is_not_a_string_or_cut_short_json_passes() {
        for json in [
            r#"{"choices":[{"delta":{"content":"model"}}]}"#,
            r#"{"model":null,"x":"model"}"#,
            r#"{"model":{"name":"x"}}"#,
            r#"{"a":{"model":"nested"}}"#,
            r#"["model","x"]"#,
            r#"{"model":"cut"#,
            "[DONE]",
            "",
        ] {
            assert_eq!(rw(json), None, "{json}");
        }
        // A name needing escapes is written as JSON.
        assert_eq!(
            rewrite_model(br#"{"model":"x"}"#, "a\"b").unwrap(),
            br#"{"model":"a\"b"}"#.to_vec()
        );
    }
}
