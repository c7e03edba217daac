//! The OpenAI-style endpoints a burst provider may be sent (`providers[].endpoints`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A stateless JSON inference endpoint a provider serves, as the router names it.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ProviderEndpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/responses`, for requests that keep no state on the provider (no
    /// `previous_response_id`, `conversation` or `background`, and `store` not true; the router
    /// sends `store: false`).
    Responses,
    /// `POST /v1/rerank`.
    Rerank,
    /// `POST /v1/score`.
    Score,
}

impl ProviderEndpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderEndpoint::Chat => "chat",
            ProviderEndpoint::Completions => "completions",
            ProviderEndpoint::Embeddings => "embeddings",
            ProviderEndpoint::Responses => "responses",
            ProviderEndpoint::Rerank => "rerank",
            ProviderEndpoint::Score => "score",
        }
    }
}

/// What a provider serves when it declares nothing: chat and completions.
pub fn default_provider_endpoints() -> Vec<ProviderEndpoint> {
    vec![ProviderEndpoint::Chat, ProviderEndpoint::Completions]
}
