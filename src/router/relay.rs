//! The answer's way back: a response body that relays upstream frames as they arrive (no
//! buffering; a provider stream whose usage chunk is taken out holds back at most a partial
//! line) while it holds the request's lease, times it, cuts off a stalled upstream, and reads
//! provider usage on the way through.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::Response;
use http::header::{self, HeaderName, HeaderValue};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};

use super::engine::EngineBody;
use super::mirror::MirrorPair;
use super::model_name::rewrite_model;
use super::outcome::{Outcome, answer, upstream_failed};
use super::shadow::Capture;
use super::state::{Dest, Lease};
use super::usage::{StreamFilter, UsageScanner};

/// Non-streamed answers up to this size are read whole and sent in one write.
const SMALL_BODY_BYTES: u64 = 64 << 10;
/// A provider's JSON answer whose model name is written back is read whole, up to this size
/// (a large embeddings answer fits many times over).
const MAX_RENAMED_BODY: usize = 256 << 20;

/// Headers that belong to one hop, never forwarded (RFC 9110 §7.6.1).
pub(super) static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(super) async fn relay(
    resp: Response<Upstream>,
    lease: Lease,
    arrived: Instant,
    shadow: Option<Arc<MirrorPair>>,
) -> Response<RouterBody> {
    let status = resp.status();
    let (mut parts, body) = resp.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut tap = None;
    let mut filter = None;
    // A JSON answer whose model name is written back: read whole first.
    let mut rename: Option<String> = None;
    let mut breaker_pending = false;
    if let Dest::Provider(p) = &lease.dest {
        if upstream_failed(status) {
            lease.state().provider_result(&p.name, false, lease.sent_ms);
        } else {
            // Told when the answer ends: one cut off or stalled mid-way is a failure too.
            breaker_pending = true;
        }
        if status.is_success() {
            let (usage_added, model) = match &body {
                Upstream::Provider {
                    usage_added, model, ..
                } => (*usage_added, model.clone()),
                Upstream::Engine(..) => (false, None),
            };
            if sse && (usage_added || model.is_some()) {
                // Reads the usage too.
                filter = Some(StreamFilter::new(usage_added, model));
                // The answer's length changes.
                parts.headers.remove(header::CONTENT_LENGTH);
            } else {
                rename = model.filter(|_| !sse);
                tap = Some(UsageScanner::new(sse));
            }
        }
    }
    // Engines rarely send any: one pass over the names costs less than a lookup for each.
    if parts.headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        for h in &HOP_BY_HOP {
            parts.headers.remove(h);
        }
    }
    let small = !sse
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= SMALL_BODY_BYTES);
    let mut relay = Relay {
        inner: body,
        lease: Some(lease),
        tap,
        filter,
        trailers: None,
        arrived,
        first_byte: false,
        streamed: sse && status.is_success(),
        outcome: Outcome::of_status(status),
        breaker_pending,
        shadow: shadow.map(|p| Box::new((Capture::default(), p))),
    };
    if small || rename.is_some() {
        // A small sized answer (no stream) goes out with its head in one write, as nginx
        // does; a client cannot use half a JSON document anyway. One whose model name is
        // written back must be whole for that.
        return match relay.read_whole(MAX_RENAMED_BODY).await {
            Ok(Some(b)) => {
                // Only a renamed answer changes length; others keep the upstream's header.
                let b = match rename.and_then(|m| rewrite_model(&b, &m)) {
                    Some(renamed) => {
                        parts
                            .headers
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(renamed.len()));
                        Bytes::from(renamed)
                    }
                    None => b,
                };
                Response::from_parts(parts, RouterBody::Full(Some(b)))
            }
            Ok(None) => {
                tracing::warn!(
                    destination = relay.label(),
                    "provider answer too large to rename"
                );
                relay.finish(Outcome::Aborted);
                answer(
                    Outcome::UpstreamUnavailable,
                    "the provider's answer exceeds the router's limit",
                )
            }
            Err(e) => {
                tracing::warn!(destination = relay.label(), error = %e, "upstream response cut short");
                relay.finish(Outcome::Aborted);
                answer(Outcome::UpstreamUnavailable, "upstream response cut short")
            }
        };
    }
    Response::from_parts(parts, RouterBody::Relay(Box::new(relay)))
}

/// Time to first byte once (and to first token, for a stream), and usage as the bytes pass.
fn observe(
    lease: Option<&Lease>,
    tap: &mut Option<UsageScanner>,
    shadow: &mut Option<Box<(Capture, Arc<MirrorPair>)>>,
    arrived: Instant,
    first_byte: &mut bool,
    streamed: bool,
    d: &Bytes,
) {
    if let Some(s) = shadow {
        s.0.feed(d);
    }
    if !*first_byte {
        *first_byte = true;
        if let Some(l) = lease {
            let s = arrived.elapsed().as_secs_f64();
            l.metrics().ttfb.observe(s);
            if streamed {
                l.metrics().ttft.observe(s);
                if let Dest::Local(b) = &l.dest
                    && let Some(r) = &b.revision
                {
                    r.ttft.observe(s);
                }
            }
        }
    }
    if let Some(t) = tap {
        t.feed(d);
    }
}

/// Reads a body whole; `Ok(None)` when it exceeds `limit` bytes. Stops at the declared length:
/// waiting for the end-of-body signal would cost another wake-up of the connection's task.
pub(super) async fn read_to_end<B: Body<Data = Bytes> + Unpin>(
    body: &mut B,
    limit: usize,
    mut on_data: impl FnMut(&Bytes),
) -> Result<Option<Bytes>, B::Error> {
    let mut single: Option<Bytes> = None;
    let mut buf = bytes::BytesMut::new();
    let mut total = 0usize;
    while !body.is_end_stream() {
        let next = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx));
        let Some(f) = next.await else {
            break;
        };
        let Ok(d) = f?.into_data() else {
            continue;
        };
        total = total.saturating_add(d.len());
        if total > limit {
            return Ok(None);
        }
        on_data(&d);
        // One chunk (the usual case) is passed on without a copy.
        match single.take() {
            None if buf.is_empty() => single = Some(d),
            first => {
                if let Some(f) = first {
                    buf.extend_from_slice(&f);
                }
                buf.extend_from_slice(&d);
            }
        }
    }
    Ok(Some(single.unwrap_or_else(|| buf.freeze())))
}

/// A response body: either the router's own, or an upstream's relayed frame by frame.
pub enum RouterBody {
    Full(Option<Bytes>),
    Relay(Box<Relay>),
}

impl From<Bytes> for RouterBody {
    fn from(b: Bytes) -> Self {
        RouterBody::Full(Some(b))
    }
}

/// An answer's body: an engine's, read on its connection here, or a provider's from hyper.
pub enum Upstream {
    Engine(EngineBody, Stall),
    Provider {
        body: Incoming,
        stall: Stall,
        /// The usage chunk was asked for on the client's behalf: it is taken out again.
        usage_added: bool,
        /// The model the client asked for, written back into the answer (`None`: the
        /// provider's name stays, as `exposeModel` asks).
        model: Option<String>,
    },
}

/// An answer may pause for at most its upstream's timeout between two frames: one that stalls
/// mid-stream (a hung engine or provider) ends the answer instead of holding the client and a
/// slot forever.
pub struct Stall {
    limit: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stall {
    pub(super) fn new(limit: Duration) -> Self {
        Stall { limit, sleep: None }
    }

    fn poll_frame<B>(
        &mut self,
        body: &mut B,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        if let Poll::Ready(f) = Pin::new(body).poll_frame(cx) {
            self.sleep = None;
            return Poll::Ready(f.map(|f| f.map_err(Into::into)));
        }
        let limit = self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(sleep.as_mut().poll(cx));
        self.sleep = None;
        Poll::Ready(Some(Err(format!(
            "the upstream sent nothing for {limit:?} mid-answer"
        )
        .into())))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for Upstream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = match self.get_mut() {
            Upstream::Engine(b, stall) => ready!(stall.poll_frame(b, cx)),
            Upstream::Provider { body, stall, .. } => ready!(stall.poll_frame(body, cx)),
        };
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Upstream::Engine(b, _) => b.is_end_stream(),
            Upstream::Provider { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Upstream::Engine(b, _) => b.size_hint(),
            Upstream::Provider { body, .. } => body.size_hint(),
        }
    }
}

pub struct Relay {
    inner: Upstream,
    /// Held until the body ends or the client goes away.
    lease: Option<Lease>,
    /// Reads usage as the bytes pass, unless `filter` does.
    tap: Option<UsageScanner>,
    /// Takes out the usage chunk the client did not ask for, reading the usage.
    filter: Option<StreamFilter>,
    /// Trailers held back while the filter's last line goes out.
    trailers: Option<Frame<Bytes>>,
    arrived: Instant,
    first_byte: bool,
    /// A successful event stream: its first byte is the first token.
    streamed: bool,
    outcome: Outcome,
    /// The provider's breaker still waits for this answer's outcome.
    breaker_pending: bool,
    /// A mirrored request's: the client's answer as it passes, for the comparison.
    shadow: Option<Box<(Capture, Arc<MirrorPair>)>>,
}

impl Relay {
    fn label(&self) -> String {
        self.lease
            .as_ref()
            .map_or_else(String::new, |l| l.dest.label().to_string())
    }

    /// Reads the whole body (`None`: over `limit` bytes), then finishes: the slot frees as soon
    /// as the upstream is done.
    async fn read_whole(&mut self, limit: usize) -> Result<Option<Bytes>, BoxError> {
        let Relay {
            inner,
            lease,
            tap,
            shadow,
            arrived,
            first_byte,
            streamed,
            ..
        } = self;
        let r = read_to_end(inner, limit, |d| {
            observe(
                lease.as_ref(),
                tap,
                shadow,
                *arrived,
                first_byte,
                *streamed,
                d,
            )
        })
        .await;
        let b = r?;
        if b.is_some() {
            self.ended();
        }
        Ok(b)
    }

    /// The upstream body is complete (an engine's connection is already back in its pool).
    fn ended(&mut self) {
        let o = self.outcome;
        self.finish(o);
    }

    fn observe_data(&mut self, d: &Bytes) {
        observe(
            self.lease.as_ref(),
            &mut self.tap,
            &mut self.shadow,
            self.arrived,
            &mut self.first_byte,
            self.streamed,
            d,
        );
    }

    /// The relay with the usage chunk taken out: a frame left empty is not sent.
    fn poll_filtered(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(t)));
        }
        loop {
            let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    self.finish(Outcome::Aborted);
                    return Poll::Ready(Some(Err(e)));
                }
                None => return Poll::Ready(self.end_filtered().map(|t| Ok(Frame::data(t)))),
            };
            let d = match frame.into_data() {
                Ok(d) => d,
                Err(trailers) => {
                    return match self.end_filtered() {
                        Some(t) => {
                            self.trailers = Some(trailers);
                            Poll::Ready(Some(Ok(Frame::data(t))))
                        }
                        None => Poll::Ready(Some(Ok(trailers))),
                    };
                }
            };
            self.observe_data(&d);
            let end = self.inner.is_end_stream();
            let Some(filter) = self.filter.as_mut() else {
                return Poll::Ready(Some(Ok(Frame::data(d))));
            };
            let mut out = filter.pass(&d);
            if end && let Some(tail) = self.end_filtered() {
                let mut all = bytes::BytesMut::from(out);
                all.extend_from_slice(&tail);
                out = all.freeze();
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if end {
                return Poll::Ready(None);
            }
        }
    }

    /// At the end of a filtered answer: the filter's held last line, if any is left to send,
    /// and the answer recorded as ended.
    fn end_filtered(&mut self) -> Option<Bytes> {
        let tail = self.filter.as_mut().map(StreamFilter::finish);
        self.ended();
        tail.filter(|t| !t.is_empty())
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(s) = self.shadow.take() {
            let (capture, pair) = *s;
            // Success implies `streamed` is whether it is an event stream.
            pair.deposit(
                (outcome == Outcome::Success)
                    .then(|| capture.digest(self.streamed))
                    .flatten(),
            );
        }
        let Some(lease) = self.lease.take() else {
            return;
        };
        let state = lease.state();
        let dm = lease.metrics();
        state
            .metrics
            .request(lease.dest.label(), &lease.class.name, outcome);
        if let Dest::Local(b) = &lease.dest
            && let Some(r) = &b.revision
        {
            r.answered(outcome);
            r.duration.observe(self.arrived.elapsed().as_secs_f64());
        }
        dm.duration.observe(self.arrived.elapsed().as_secs_f64());
        // Answered requests only: an attempt that failed before any answer held no real slot
        // time, and would count as spilled demand.
        dm.slot.observe(lease.held_seconds());
        let usage = match self.tap.take() {
            Some(tap) => tap.finish(),
            None => self.filter.as_ref().and_then(StreamFilter::usage),
        };
        if let Dest::Provider(p) = &lease.dest {
            if let Some(u) = usage {
                state.record_usage(p, u);
            }
            // A client that went away says the provider was answering if any of it came.
            let ok = match outcome {
                Outcome::Aborted => Some(false),
                Outcome::Cancelled => self.first_byte.then_some(true),
                _ => Some(true),
            };
            if let Some(ok) = ok.filter(|_| self.breaker_pending) {
                state.provider_result(&p.name, ok, lease.sent_ms);
            }
        }
        drop(lease);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // hyper may stop polling once a sized body is complete; otherwise the client left.
        if self.inner.is_end_stream() {
            self.ended();
        } else {
            self.finish(Outcome::Cancelled);
        }
    }
}

impl Body for RouterBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RouterBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RouterBody::Relay(r) if r.filter.is_some() => r.poll_filtered(cx),
            RouterBody::Relay(r) => {
                let res = ready!(Pin::new(&mut r.inner).poll_frame(cx));
                match &res {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            r.observe_data(d);
                        }
                        // Trailers are the last frame, whatever the body says of its end.
                        if f.is_trailers() || r.inner.is_end_stream() {
                            r.ended();
                        }
                    }
                    Some(Err(_)) => r.finish(Outcome::Aborted),
                    None => r.ended(),
                }
                Poll::Ready(res)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RouterBody::Full(b) => b.is_none(),
            RouterBody::Relay(r) => {
                r.inner.is_end_stream()
                    && r.trailers.is_none()
                    && !r.filter.as_ref().is_some_and(StreamFilter::holds)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RouterBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RouterBody::Full(None) => SizeHint::with_exact(0),
            RouterBody::Relay(r) if r.filter.is_some() => SizeHint::default(),
            RouterBody::Relay(r) => r.inner.size_hint(),
        }
    }
}
