//! A reservation: a [`Lease`] holds a backend slot or a provider slot until dropped (the
//! response body ended, or the client went away), and dropping it lets the queue head in.

use std::sync::Arc;

use super::RouterState;
use super::backends::Dest;
use crate::clock::Millis;
use crate::router::admission::RejectReason;
use crate::router::classes::Class;
use crate::router::keys::Bearer;
use crate::router::metrics::DestMetrics;

/// What a request gets: a lease on a destination, or a 503.
#[derive(Debug)]
pub enum Ticket {
    Go(Lease),
    Reject(RejectReason),
}

/// A held backend or provider slot; dropping it frees the slot and lets the queue head in.
pub struct Lease {
    state: Arc<RouterState>,
    pub dest: Dest,
    pub bearer: Option<Bearer>,
    /// The request's class.
    pub class: Class,
    /// When the slot was taken: a provider's breaker judges results by it, and an answered
    /// request's slot duration is measured from it.
    pub sent_ms: Millis,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("dest", &self.dest).finish()
    }
}

impl Lease {
    pub(super) fn new(
        state: Arc<RouterState>,
        dest: Dest,
        bearer: Option<Bearer>,
        class: Class,
    ) -> Self {
        let sent_ms = state.now_ms();
        let lease = Self {
            state,
            dest,
            bearer,
            class,
            sent_ms,
        };
        lease.metrics().in_flight.inc();
        lease.state.counts_changed();
        lease
    }

    /// The destination's metric handles.
    pub fn metrics(&self) -> &DestMetrics {
        match &self.dest {
            Dest::Local(_) => &self.state.local_metrics,
            Dest::Provider(p) => &p.metrics,
        }
    }

    pub fn state(&self) -> &Arc<RouterState> {
        &self.state
    }

    /// Seconds since the slot was taken.
    pub fn held_seconds(&self) -> f64 {
        self.state.now_ms().saturating_sub(self.sent_ms).max(0) as f64 / 1000.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.metrics().in_flight.dec();
        self.state.release(&self.dest);
    }
}

/// A place in the queue, left if the client goes away while waiting.
pub(super) struct QueueGuard<'a> {
    pub state: &'a Arc<RouterState>,
    pub id: u64,
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        let mut routing = self.state.lock();
        if routing.remove(self.id).is_some() {
            self.state.queue_changed(&routing);
        }
    }
}
