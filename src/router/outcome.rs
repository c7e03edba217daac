//! How a request ended. One [`Outcome`] carries the metric label (`outcome` on
//! `spillway_router_requests_total`) and, for an answer the router gives itself, the OpenAI
//! error's status, type and code.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::Bytes;
use serde_json::{Value, json};

use super::admission::RejectReason;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer, relayed.
    Success,
    /// A 4xx answer other than 429, relayed.
    ClientError,
    /// A 5xx or 429 answer, relayed.
    UpstreamError,
    /// The upstream cut its answer off mid-way (closed, failed, or stalled).
    Aborted,
    /// The client went away before the answer ended.
    Cancelled,
    /// No answer to relay: connections failed before any response, the provider refused the
    /// router's credentials, or an answer was cut short before any of it was sent on.
    UpstreamUnavailable,
    /// No response headers within the upstream's timeout.
    Timeout,
    /// The request body could not be read, or is no JSON object (for a provider).
    BadRequest,
    /// The request body is over `--max-body-bytes`.
    TooLarge,
    /// The `x-spillway-class` header names no class of the service.
    UnknownClass,
    /// Refused before any upstream saw it.
    Rejected(RejectReason),
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::ClientError => "client_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Aborted => "aborted",
            Outcome::Cancelled => "cancelled",
            Outcome::UpstreamUnavailable => "upstream_unavailable",
            Outcome::Timeout => "timeout",
            Outcome::BadRequest => "bad_request",
            Outcome::TooLarge => "too_large",
            Outcome::UnknownClass => "unknown_class",
            Outcome::Rejected(r) => r.as_str(),
        }
    }

    /// The outcome of an upstream answer with this status.
    pub fn of_status(status: StatusCode) -> Self {
        if status.is_success() {
            Outcome::Success
        } else if upstream_failed(status) {
            Outcome::UpstreamError
        } else {
            Outcome::ClientError
        }
    }

    /// The router's own answer for it: status, OpenAI error type and code. `None` for an
    /// answer that is relayed.
    pub fn error(self) -> Option<(StatusCode, &'static str, &'static str)> {
        const SERVER: &str = "server_error";
        const INVALID: &str = "invalid_request_error";
        Some(match self {
            Outcome::Success
            | Outcome::ClientError
            | Outcome::UpstreamError
            | Outcome::Aborted
            | Outcome::Cancelled => return None,
            Outcome::UpstreamUnavailable => {
                (StatusCode::BAD_GATEWAY, SERVER, "upstream_unavailable")
            }
            Outcome::Timeout => (StatusCode::GATEWAY_TIMEOUT, SERVER, "upstream_timeout"),
            Outcome::BadRequest => (StatusCode::BAD_REQUEST, INVALID, "bad_request"),
            Outcome::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, INVALID, "request_too_large"),
            Outcome::UnknownClass => (StatusCode::BAD_REQUEST, INVALID, "unknown_request_class"),
            Outcome::Rejected(r) => (StatusCode::SERVICE_UNAVAILABLE, SERVER, r.as_str()),
        })
    }
}

/// An answer that counts against the upstream (and a provider's breaker) as soon as it comes.
pub fn upstream_failed(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// The router's own answer for `outcome`, with `message` for the client; a rejection says
/// when to retry.
pub fn answer<B: From<Bytes>>(outcome: Outcome, message: &str) -> Response<B> {
    let Some((status, kind, code)) = outcome.error() else {
        // Relayed outcomes are never answered by the router itself; a 502 is the safe reply.
        debug_assert!(false, "{outcome:?} is relayed, not answered");
        return error(
            StatusCode::BAD_GATEWAY,
            message,
            "server_error",
            "upstream_unavailable",
        );
    };
    let mut resp = error(status, message, kind, code);
    if matches!(outcome, Outcome::Rejected(_)) {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// What a rejection tells the client.
pub fn reject_message(r: RejectReason) -> &'static str {
    match r {
        RejectReason::QueueFull => "all engines are busy and the router queue is full",
        RejectReason::QueueTimeout => "all engines stayed busy for the router's queue timeout",
        RejectReason::ShuttingDown => "the router is shutting down; retry",
    }
}

/// An OpenAI-style error.
pub fn error<B: From<Bytes>>(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: &str,
) -> Response<B> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

pub fn json_response<B: From<Bytes>>(status: StatusCode, v: &Value) -> Response<B> {
    text(status, "application/json", v.to_string())
}

pub fn text<B: From<Bytes>>(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<B> {
    let mut resp = Response::new(B::from(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every outcome the router answers itself, with its label, status, type and code, as
    /// clients and dashboards see them.
    #[test]
    fn each_outcome_keeps_its_label_and_error() {
        let table = [
            (
                Outcome::UpstreamUnavailable,
                "upstream_unavailable",
                502,
                "server_error",
                "upstream_unavailable",
            ),
            (
                Outcome::Timeout,
                "timeout",
                504,
                "server_error",
                "upstream_timeout",
            ),
            (
                Outcome::BadRequest,
                "bad_request",
                400,
                "invalid_request_error",
                "bad_request",
            ),
            (
                Outcome::TooLarge,
                "too_large",
                413,
                "invalid_request_error",
                "request_too_large",
            ),
            (
                Outcome::UnknownClass,
                "unknown_class",
                400,
                "invalid_request_error",
                "unknown_request_class",
            ),
            (
                Outcome::Rejected(RejectReason::QueueFull),
                "queue_full",
                503,
                "server_error",
                "queue_full",
            ),
            (
                Outcome::Rejected(RejectReason::QueueTimeout),
                "queue_timeout",
                503,
                "server_error",
                "queue_timeout",
            ),
            (
                Outcome::Rejected(RejectReason::ShuttingDown),
                "shutting_down",
                503,
                "server_error",
                "shutting_down",
            ),
        ];
        for (o, label, status, kind, code) in table {
            assert_eq!(o.label(), label);
            let (s, k, c) = o.error().expect("answered by the router");
            assert_eq!((s.as_u16(), k, c), (status, kind, code), "{o:?}");
            let resp: Response<Bytes> = answer(o, "m");
            assert_eq!(resp.status().as_u16(), status);
            let retry = resp.headers().get(header::RETRY_AFTER);
            assert_eq!(retry.is_some(), matches!(o, Outcome::Rejected(_)), "{o:?}");
            let v: Value = serde_json::from_slice(resp.body()).unwrap();
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["message"], "m");
        }
        for (status, o) in [
            (200, Outcome::Success),
            (404, Outcome::ClientError),
            (429, Outcome::UpstreamError),
            (503, Outcome::UpstreamError),
        ] {
            let o2 = Outcome::of_status(StatusCode::from_u16(status).unwrap());
            assert_eq!(o2, o);
            assert!(o.error().is_none(), "{o:?} is relayed");
        }
        assert_eq!(
            (Outcome::Aborted.label(), Outcome::Cancelled.label()),
            ("aborted", "cancelled")
        );
    }
}
