//! Keep-alive HTTP/1.1 to local engines, spoken on the socket inside the task of the request
//! that holds the connection, as nginx's upstream module does: hyper's client passes every
//! request, answer and body chunk through channels to a connection dispatcher, a large share of
//! the router's work on a short completion, while an engine's answer needs only a head parser
//! (httparse) and the three HTTP/1.1 framings (RFC 9112 §6.3).
//!
//! - [`framing`]: the pure part: a request encoded once, a response head parsed, bodies framed.
//! - [`conn`]: one connection: a request written while its answer's head is read, and the body
//!   read from it.
//! - [`pool`]: idle connections per serving thread, and the one transparent re-send.

mod conn;
mod framing;
mod pool;

use std::io;

use http::uri::Authority;

pub use conn::EngineBody;
pub use framing::Outgoing;
pub use pool::{CONNECT_TIMEOUT, EnginePool};

/// Why an engine gave no (whole) answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(Authority, String),
    #[error("engine connection: {0}")]
    Io(#[from] io::Error),
    #[error("the engine closed the connection before answering")]
    Closed,
    #[error("the engine closed the connection in the middle of its answer")]
    CutShort,
    #[error("malformed answer from the engine: {0}")]
    Malformed(&'static str),
}

/// An engine that gave no answer, and whether it may have taken the request: every byte of it
/// was written, on this connection or one before it, before the failure. Such an engine may
/// have died of the request itself, so it is retried elsewhere at most once.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct EngineFailure {
    pub error: UpstreamError,
    pub delivered: bool,
}
