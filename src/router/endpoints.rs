//! The inference endpoints the router forwards, and where a request on each may go (pure).
//! Every one goes through the same admission, limits, queue and metrics; only stateless JSON
//! endpoints a provider declares may spill to it.

use serde_json::Value;

use crate::api::ProviderEndpoint;

/// An inference endpoint, by what it may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// May spill to a provider that declares it.
    Burstable(ProviderEndpoint),
    /// The engine's own (`/tokenize`, `/detokenize`, audio, Cohere-style `/v2/rerank`): never
    /// spilled.
    EngineOnly,
}

/// The endpoint `POST path` names; `None`: no inference route.
pub fn route(path: &str) -> Option<Endpoint> {
    use ProviderEndpoint::*;
    let burstable = match path {
        "/v1/chat/completions" => Chat,
        "/v1/completions" => Completions,
        "/v1/embeddings" => Embeddings,
        "/v1/responses" => Responses,
        "/v1/rerank" | "/rerank" => Rerank,
        "/v1/score" | "/score" => Score,
        "/v1/audio/transcriptions"
        | "/v1/audio/translations"
        | "/tokenize"
        | "/detokenize"
        | "/v2/rerank" => return Some(Endpoint::EngineOnly),
        _ => return None,
    };
    Some(Endpoint::Burstable(burstable))
}

impl Endpoint {
    /// Where a request with `body` may spill: its endpoint as providers declare it, unless the
    /// request keeps state on the server that served it (see [`keeps_state`]).
    pub fn burst(self, body: &[u8]) -> Option<ProviderEndpoint> {
        match self {
            Endpoint::Burstable(ProviderEndpoint::Responses) if keeps_state(body) => None,
            Endpoint::Burstable(e) => Some(e),
            Endpoint::EngineOnly => None,
        }
    }
}

/// Whether a Responses request depends on, or leaves, state on the server: it continues an
/// earlier response or a conversation, runs in the background to be fetched later, or asks to
/// be stored. Such a request is served where that state is: the service's own engines.
/// Unparseable bodies count as stateful (the engine answers them).
pub fn keeps_state(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return true;
    };
    let set = |k: &str| v.get(k).is_some_and(|x| !x.is_null());
    set("previous_response_id")
        || set("conversation")
        || v.get("background").and_then(Value::as_bool) == Some(true)
        || v.get("store").and_then(Value::as_bool) == Some(true)
}

/// Whether a stream from a provider on `endpoint` carries usage only when asked
/// (`stream_options.include_usage`): chat and completions.
pub fn usage_on_request(endpoint: ProviderEndpoint) -> bool {
    matches!(
        endpoint,
        ProviderEndpoint::Chat | ProviderEndpoint::Completions
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProviderEndpoint::*;

    #[test]
    fn every_inference_path_has_an_endpoint_and_others_none() {
        let b = |e| Some(Endpoint::Burstable(e));
        for (path, want) in [
            ("/v1/chat/completions", b(Chat)),
            ("/v1/completions", b(Completions)),
            ("/v1/embeddings", b(Embeddings)),
            ("/v1/responses", b(Responses)),
            ("/v1/rerank", b(Rerank)),
            ("/rerank", b(Rerank)),
            ("/v1/score", b(Score)),
            ("/score", b(Score)),
            ("/v1/audio/transcriptions", Some(Endpoint::EngineOnly)),
            ("/tokenize", Some(Endpoint::EngineOnly)),
            ("/detokenize", Some(Endpoint::EngineOnly)),
            ("/v2/rerank", Some(Endpoint::EngineOnly)),
            ("/v1/responses/resp_1", None),
            ("/v1/chat", None),
            ("/admin", None),
        ] {
            assert_eq!(route(path), want, "{path}");
        }
    }

    #[test]
    fn stateful_responses_requests_never_spill() {
        let r = Endpoint::Burstable(Responses);
        assert_eq!(r.burst(br#"{"model":"m","input":"hi"}"#), Some(Responses));
        assert_eq!(r.burst(br#"{"input":"hi","store":false}"#), Some(Responses));
        assert_eq!(
            r.burst(br#"{"input":"hi","previous_response_id":null}"#),
            Some(Responses)
        );
        for stateful in [
            br#"{"input":"hi","previous_response_id":"resp_1"}"#.as_slice(),
            br#"{"input":"hi","store":true}"#,
            br#"{"input":"hi","background":true}"#,
            br#"{"input":"hi","conversation":"conv_1"}"#,
            b"not json",
        ] {
            assert_eq!(
                r.burst(stateful),
                None,
                "{}",
                String::from_utf8_lossy(stateful)
            );
        }
        // Other endpoints spill as declared, whatever the body says.
        let e = Endpoint::Burstable(Embeddings);
        assert_eq!(e.burst(br#"{"store":true}"#), Some(Embeddings));
        assert_eq!(Endpoint::EngineOnly.burst(b"{}"), None);
        assert!(usage_on_request(Chat) && !usage_on_request(Embeddings));
    }
}
