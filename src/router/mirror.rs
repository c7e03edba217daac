//! A mirrored request's way to a revision in its shadow stage (I/O): sent beside the client's
//! own, never in its way; its answer read, measured for the rollout gate, compared with the
//! client's answer and dropped. Clients never see it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header;
use hyper::body::Bytes;

use super::app::App;
use super::engine::Outgoing;
use super::fast::Backend;
use super::metrics::RevisionMetrics;
use super::outcome::Outcome;
use super::relay::read_to_end;
use super::shadow::{Capture, Digest, MAX_CAPTURE, Pair};

/// Longest a mirrored answer is read (a stream as long as the client's may take this long).
const MIRROR_LIMIT: Duration = Duration::from_secs(600);

/// Where the client's answer and the mirrored one meet; whichever comes second counts the
/// comparison under the shadowed revision.
#[derive(Debug)]
pub(super) struct MirrorPair {
    pair: Pair,
    metrics: Arc<RevisionMetrics>,
}

impl MirrorPair {
    pub fn deposit(&self, d: Option<Digest>) {
        if let Some(c) = self.pair.deposit(d) {
            self.metrics.shadowed(c.label());
        }
    }
}

/// The mirror's slot on its engine, freed however its task ends. Nobody queues for a mirror
/// slot, so nothing is pumped (see `LocalPath::mirror`).
struct Slot(Arc<Backend>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.free_slot();
    }
}

/// Sends the request `req` makes (given the engine's `Host`) to `backend`, a slot already
/// taken on it, in a task of its own, timed from the client's `arrived`; the returned pair
/// takes the client's answer for the comparison.
pub(super) fn start(
    app: &Arc<App>,
    backend: Arc<Backend>,
    arrived: Instant,
    req: impl FnOnce(&http::HeaderValue) -> Outgoing,
) -> Option<Arc<MirrorPair>> {
    let slot = Slot(backend);
    let metrics = slot.0.revision.clone()?;
    let req = req(&slot.0.authority.as_ref()?.1);
    let pair = Arc::new(MirrorPair {
        pair: Pair::default(),
        metrics: metrics.clone(),
    });
    let (app, p) = (app.clone(), pair.clone());
    tokio::spawn(async move {
        let d = tokio::time::timeout(MIRROR_LIMIT, send(&app, &slot.0, &metrics, &req, arrived))
            .await
            .ok()
            .flatten();
        drop(slot);
        p.deposit(d);
    });
    Some(pair)
}

/// The mirrored answer's digest (`None`: no answer to compare), counted for the gate as the
/// client's answers are.
async fn send(
    app: &App,
    backend: &Backend,
    m: &RevisionMetrics,
    req: &Outgoing,
    arrived: Instant,
) -> Option<Digest> {
    let (authority, _) = backend.authority.as_ref()?;
    // Timed from the client's arrival, as the client's own answer is: its wait for a slot
    // counts on both sides.
    let started = arrived;
    let resp =
        match tokio::time::timeout(app.engine_timeout, app.engines.send(authority, req)).await {
            Ok(Ok(r)) => r,
            _ => {
                m.answered(Outcome::Aborted);
                return None;
            }
        };
    let status = resp.status();
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut body = resp.into_body();
    let mut capture = Capture::default();
    let mut first = true;
    let read = read_to_end(&mut body, usize::MAX, |d: &Bytes| {
        if first && sse && status.is_success() {
            m.ttft.observe(started.elapsed().as_secs_f64());
        }
        first = false;
        if capture.len() < MAX_CAPTURE {
            capture.feed(d);
        }
    })
    .await;
    match read {
        Ok(_) => m.answered(Outcome::of_status(status)),
        Err(_) => m.answered(Outcome::Aborted),
    }
    m.duration.observe(started.elapsed().as_secs_f64());
    (read.is_ok() && status.is_success())
        .then(|| capture.digest(sse))
        .flatten()
}
