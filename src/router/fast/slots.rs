//! Local engine slots taken without the routing lock (invariants 1-4 in [`super`]).

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::api::ProviderEndpoint;
use crate::clock::Millis;
use crate::router::admission::{BackendLoad, local_first};
use crate::router::classes::{Class, Classes};
use crate::router::metrics::RevisionMetrics;
use crate::router::revisions::{Route, choose};
use crate::router::shadow::mirrored;

/// A local engine.
#[derive(Debug)]
// `outstanding` first: it then shares a cache line with the `Arc`'s own count, which every
// lease touches anyway.
#[repr(C)]
pub struct Backend {
    /// Requests holding a slot on this engine (leases own one each).
    outstanding: AtomicU32,
    /// What this router may have on it: `maxConcurrency`, or less while its peers use some
    /// (see `router::peers`). Set under the routing lock.
    cap: AtomicU32,
    /// What the shared view leaves this router (at least `cap`): a slot between the two is
    /// waited for, not spilled past.
    room: AtomicU32,
    /// Set aside until then (ms on the router's clock) after a failed connection; 0 if not.
    aside_until: AtomicI64,
    /// `host:port`.
    pub addr: String,
    /// Parsed once, with the `Host` header it makes; `None` for an address that is no URI
    /// authority (fails like a dead engine).
    pub authority: Option<(http::uri::Authority, http::HeaderValue)>,
    /// The revision it serves, during and after a rollout (see `router::revisions`).
    pub revision: Option<Arc<RevisionMetrics>>,
}

impl Backend {
    pub fn new(addr: String) -> Self {
        Self::of_revision(addr, None)
    }

    pub fn of_revision(addr: String, revision: Option<Arc<RevisionMetrics>>) -> Self {
        Self {
            revision,
            outstanding: AtomicU32::new(0),
            cap: AtomicU32::new(0),
            room: AtomicU32::new(0),
            aside_until: AtomicI64::new(0),
            authority: addr.parse().ok().and_then(|x: http::uri::Authority| {
                Some((x.clone(), http::HeaderValue::from_str(x.as_str()).ok()?))
            }),
            addr,
        }
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Whether set aside at `now`; the clock is read only for an engine that was.
    pub fn aside(&self, now: impl Fn() -> Millis) -> bool {
        let until = self.aside_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if now() < until {
            return true;
        }
        // Back: later requests need not read the clock for it.
        let _ = self
            .aside_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    /// Sets it aside until `until`; returns until when it was set aside before (0: not).
    pub fn set_aside_until(&self, until: Millis) -> Millis {
        self.aside_until.swap(until, Ordering::Relaxed)
    }

    /// Sets what this router may have on it (under the routing lock).
    pub fn set_limits(&self, cap: u32, room: u32) {
        self.room.store(room.max(cap), Ordering::SeqCst);
        self.cap.store(cap, Ordering::SeqCst);
    }

    pub fn cap(&self) -> u32 {
        self.cap.load(Ordering::SeqCst)
    }

    /// Its load as admission sees it; `excluded`: not for this request; `revision`: the one
    /// the request is meant for.
    pub fn load(
        &self,
        now: impl Fn() -> Millis,
        excluded: bool,
        revision: Option<&str>,
    ) -> BackendLoad {
        BackendLoad {
            outstanding: self.outstanding(),
            limit: self.cap(),
            room: self.room.load(Ordering::Relaxed),
            aside: self.aside(now),
            excluded,
            preferred: revision
                .is_some_and(|r| self.revision.as_ref().is_some_and(|m| *m.name == *r)),
        }
    }

    /// Takes a slot if the engine is below its cap; a lost race with another thread reads the
    /// new count and tries again.
    pub fn try_take(&self) -> bool {
        let cap = self.cap();
        self.outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    /// Frees a slot without looking at the queue: only [`LocalPath::release`] and tests.
    pub(crate) fn free_slot(&self) {
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Read on every request and written rarely, so on cache lines of their own (not the `Arc`'s
/// count nor the lock's).
#[repr(align(128))]
#[derive(Debug)]
pub struct LocalPath {
    /// The queue's length, published under the lock with every change to it.
    queued: AtomicUsize,
    /// Which backend list is current; a thread whose copy is older copies again.
    view: AtomicU64,
}

/// Whether a request is mirrored to a revision in its shadow stage.
#[derive(Debug)]
pub enum Mirror {
    No,
    /// A slot taken on this engine: the mirrored request's, freed when it ends.
    Take(Arc<Backend>),
    /// Its turn, but no engine had a free slot (the revision's metrics, to count it).
    Skipped(Option<Arc<RevisionMetrics>>),
}

/// View ids are unique in the process (from 1; a thread starts with none), so a thread's copy
/// never matches another router's.
static NEXT_VIEW: AtomicU64 = AtomicU64::new(1);

/// What a serving thread reads on every request, copied from the routing state when it
/// changes: the backend list, the request classes and the endpoints each provider serves.
pub struct View {
    id: u64,
    pub backends: Vec<Arc<Backend>>,
    pub classes: Option<Arc<Classes>>,
    /// Each provider's name and the endpoints requests may spill to it on.
    pub providers: Vec<(String, Vec<ProviderEndpoint>)>,
    /// The revisions taking requests, by weight (empty outside rollouts).
    pub routes: Vec<Route>,
    /// This thread's requests so far, for [`crate::router::revisions::choose`].
    pub turn: u64,
    /// The engines of a revision in its shadow stage, and the share mirrored to them.
    pub mirrors: Vec<Arc<Backend>>,
    pub shadow_percent: u32,
    /// This thread's mirror decisions so far, for [`crate::router::shadow::mirrored`].
    pub mirror_turn: u64,
    loads: Vec<BackendLoad>,
}

thread_local! {
    static VIEW: RefCell<View> = const {
        RefCell::new(View {
            id: 0,
            backends: Vec::new(),
            classes: None,
            providers: Vec::new(),
            routes: Vec::new(),
            turn: 0,
            mirrors: Vec::new(),
            shadow_percent: 0,
            mirror_turn: 0,
            loads: Vec::new(),
        })
    };
}

impl Default for LocalPath {
    fn default() -> Self {
        Self {
            queued: AtomicUsize::new(0),
            view: AtomicU64::new(NEXT_VIEW.fetch_add(1, Ordering::Relaxed)),
        }
    }
}

impl LocalPath {
    /// Under the routing lock, whenever the backend list changes.
    pub fn backends_changed(&self) {
        let id = NEXT_VIEW.fetch_add(1, Ordering::Relaxed);
        self.view.store(id, Ordering::SeqCst);
    }

    /// Under the routing lock, whenever the queue's length changes.
    pub fn queue_changed(&self, len: usize) {
        self.queued.store(len, Ordering::SeqCst);
    }

    /// Frees `b`'s slot; whether anyone waits, and so the queue must be pumped.
    pub fn release(&self, b: &Backend) -> bool {
        b.free_slot();
        self.queued.load(Ordering::SeqCst) != 0
    }

    /// This thread's view, copied again by `current` (under the lock) when it is stale.
    fn with_view<R>(&self, current: impl FnOnce(&mut View), f: impl FnOnce(&mut View) -> R) -> R {
        VIEW.with(|v| {
            let v = &mut *v.borrow_mut();
            let id = self.view.load(Ordering::SeqCst);
            if v.id != id {
                current(v);
                v.id = id;
            }
            f(v)
        })
    }

    /// The class a request's `x-spillway-class` header names, resolved without the lock (see
    /// `Classes::resolve`).
    pub fn classify(
        &self,
        current: impl FnOnce(&mut View),
        header: Option<&[u8]>,
    ) -> Result<Class, String> {
        self.with_view(current, |v| {
            v.classes
                .get_or_insert_with(Default::default)
                .resolve(header)
        })
    }

    /// Reads this thread's view (copied again by `current` when stale).
    pub fn read<R>(&self, current: impl FnOnce(&mut View), f: impl FnOnce(&View) -> R) -> R {
        self.with_view(current, |v| f(v))
    }

    /// The revision this thread's next request is meant for, by the weights.
    pub fn choose_revision(&self, current: impl FnOnce(&mut View)) -> Option<Arc<str>> {
        self.with_view(current, |v| {
            v.turn = v.turn.wrapping_add(1);
            choose(&v.routes, v.turn).cloned()
        })
    }

    /// Whether this thread's next request is mirrored (see [`Mirror`]). A mirror slot is taken
    /// as any other (invariant 1) but nobody queues for one, so it is freed without a pump.
    pub fn mirror(&self, current: impl FnOnce(&mut View), now: impl Fn() -> Millis) -> Mirror {
        self.with_view(current, |v| {
            if v.shadow_percent == 0 {
                return Mirror::No;
            }
            v.mirror_turn = v.mirror_turn.wrapping_add(1);
            if !mirrored(v.shadow_percent, v.mirror_turn) {
                return Mirror::No;
            }
            let mut free: Vec<&Arc<Backend>> = v
                .mirrors
                .iter()
                .filter(|b| !b.aside(&now) && b.outstanding() < b.cap())
                .collect();
            free.sort_by_key(|b| b.outstanding());
            match free.into_iter().find(|b| b.try_take()) {
                Some(b) => Mirror::Take(b.clone()),
                None => Mirror::Skipped(v.mirrors.first().and_then(|b| b.revision.clone())),
            }
        })
    }

    /// A local slot without the lock, when nobody waits and an engine has room (one of
    /// `revision`'s first).
    pub fn take(
        &self,
        current: impl FnOnce(&mut View),
        now: impl Fn() -> Millis,
        revision: Option<&str>,
    ) -> Option<Arc<Backend>> {
        self.with_view(current, |v| {
            loop {
                // Read again on every try: a request that queued meanwhile goes first.
                let queued = self.queued.load(Ordering::SeqCst);
                let queued = u32::try_from(queued).unwrap_or(u32::MAX);
                v.loads.clear();
                v.loads
                    .extend(v.backends.iter().map(|b| b.load(&now, false, revision)));
                let b = &v.backends[local_first(&v.loads, queued, false)?];
                if b.try_take() {
                    return Some(b.clone());
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_aside_engine_is_back_when_its_time_is_up() {
        let b = Backend::new("a:1".into());
        assert!(!b.aside(|| panic!("the clock is read for an engine never set aside")));
        assert_eq!(b.set_aside_until(1_000), 0);
        assert!(b.aside(|| 999));
        assert!(!b.aside(|| 1_000));
        assert!(
            !b.aside(|| panic!("the clock is read once it is back")),
            "cleared once over"
        );
    }

    #[test]
    fn a_slot_is_never_taken_past_the_limit() {
        let b = Backend::new("a:1".into());
        assert!(!b.try_take(), "no cap set yet");
        b.set_limits(2, 2);
        assert!(b.try_take() && b.try_take());
        assert!(!b.try_take());
        let path = LocalPath::default();
        assert!(!path.release(&b), "nobody waits");
        path.queue_changed(1);
        assert!(path.release(&b), "a waiter is seen");
        assert_eq!(b.outstanding(), 0);
    }

    #[test]
    fn a_stale_copy_is_refreshed_and_a_queue_stops_the_lock_free_path() {
        let path = LocalPath::default();
        let one = |addr: &str| {
            let b = Backend::new(addr.into());
            b.set_limits(1, 1);
            Arc::new(b)
        };
        let list = vec![one("a:1")];
        fn copy(l: &[Arc<Backend>]) -> impl FnOnce(&mut View) + '_ {
            move |v| {
                v.backends.clear();
                v.backends.extend_from_slice(l);
            }
        }
        let got = path.take(copy(&list), || 0, None).expect("room");
        assert_eq!(got.addr, "a:1");
        // The copy is current: not asked for again, and the one slot is taken.
        assert!(path.take(|_| panic!("copied again"), || 0, None).is_none());
        path.release(&got);
        path.queue_changed(1);
        assert!(
            path.take(|_| panic!("copied again"), || 0, None).is_none(),
            "overtook"
        );
        path.queue_changed(0);
        let other = vec![one("b:1")];
        path.backends_changed();
        assert_eq!(
            path.take(copy(&other), || 0, None).expect("room").addr,
            "b:1"
        );
    }
}
