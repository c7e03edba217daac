//! The router's live state: config, backends, providers (load, breaker, key), budget and the
//! FIFO queue, behind one lock so every decision sees one consistent picture. Every decision is
//! [`admit`]'s; this module only gathers its input and carries out its answer.
//!
//! A reservation is a [`Lease`]: it holds a backend slot or a provider slot until dropped (the
//! response body ended, or the client went away), and dropping it lets the queue head in.
//!
//! The common case takes no lock: while nobody waits, a request takes a local slot with a
//! compare-and-swap on the engine's count, chosen by [`local_first`] (the same first rule as
//! `admit`) over a per-thread copy of the backend list. Per request, the serving threads then
//! write that count and two reference counts, no longer the lock and the core.
//!
//! No waiter is forgotten: a request that queues publishes the queue length and then decides
//! the head again, and a freed slot is published before the queue length is read (both
//! sequentially consistent), so one of the two always sees the other. An engine coming back
//! from being set aside frees no slot, so its return pumps the queue on a timer.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::admission::{
    Admission, AdmissionInput, BackendLoad, ProviderLoad, RejectReason, admit, local_first,
};
use super::breaker::{BreakerState, CircuitBreaker};
use super::budget::{BudgetTracker, cost, parse_spend};
use super::config::{ProviderConfig, RouterConfig};
use super::keys::{Bearer, KeyState, read_key};
use super::metrics::{self, DestMetrics, ProviderLabel, RouterMetrics, TokenLabels};
use super::queue::Fifo;
use super::usage::Usage;
use crate::api::{BurstMode, Pricing};
use crate::clock::Millis;

/// How long a local engine whose connection failed before any answer gets no new requests:
/// least-outstanding would otherwise send it every request first (a dead engine is never busy)
/// until its EndpointSlice drops it.
pub const SET_ASIDE_MS: Millis = 2_000;

/// How often a waiter past `maxQueueWaitMilliseconds` looks again for a provider (a breaker
/// half-opening or the budget window sliding wakes nobody by itself).
const SPILL_RECHECK: Duration = Duration::from_millis(200);

/// A burst provider as configured; in-flight requests keep the snapshot they started with.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    /// The provider's base URL without a trailing slash (e.g. `https://api.together.xyz/v1`).
    pub base: String,
    pub model: String,
    pub key_file: Option<String>,
    pub max_concurrency: u32,
    pub timeout: Duration,
    pub pricing: Option<Pricing>,
    pub metrics: DestMetrics,
}

impl Provider {
    fn new(p: &ProviderConfig, m: &RouterMetrics) -> Self {
        Self {
            metrics: m.for_destination(&p.name),
            name: p.name.clone(),
            base: p.url.trim_end_matches('/').to_string(),
            model: p.model.clone(),
            key_file: p.api_key_file.clone(),
            max_concurrency: p.max_concurrency,
            timeout: Duration::from_secs(u64::from(p.timeout_seconds)),
            pricing: p.pricing.clone(),
        }
    }
}

/// A local engine.
#[derive(Debug)]
// `outstanding` first: it then shares a cache line with the `Arc`'s own count, which every
// lease touches anyway.
#[repr(C)]
pub struct Backend {
    /// Requests holding a slot on this engine (leases own one each).
    outstanding: AtomicU32,
    /// Set aside until then (ms on the router's clock) after a failed connection; 0 if not.
    aside_until: AtomicI64,
    /// `host:port`.
    pub addr: String,
    /// Parsed once, with the `Host` header it makes; `None` for an address that is no URI
    /// authority (fails like a dead engine).
    pub authority: Option<(http::uri::Authority, http::HeaderValue)>,
}

/// Where a leased request goes.
#[derive(Clone, Debug)]
pub enum Dest {
    Local(Arc<Backend>),
    Provider(Arc<Provider>),
}

impl Backend {
    fn new(addr: String) -> Self {
        Self {
            outstanding: AtomicU32::new(0),
            aside_until: AtomicI64::new(0),
            authority: addr.parse().ok().and_then(|x: http::uri::Authority| {
                Some((x.clone(), http::HeaderValue::from_str(x.as_str()).ok()?))
            }),
            addr,
        }
    }

    fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Whether set aside at `now`; the clock is read only for an engine that was.
    fn aside(&self, now: &impl Fn() -> Millis) -> bool {
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

    /// Takes a slot if the engine is below `limit`; a lost race with another thread reads the
    /// new count and tries again.
    fn try_take(&self, limit: u32) -> bool {
        self.outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }
}

/// Whether every engine is set aside (then none counts as set aside).
fn all_aside(backends: &[Arc<Backend>], now: &impl Fn() -> Millis) -> bool {
    backends.iter().all(|b| b.aside(now))
}

/// The engines' loads as admission sees them: an excluded or set-aside engine looks full, so
/// the pure rules stay the only rules. If every engine is set aside, none is: a failure seen on
/// all of them must not hold every request back.
fn backend_loads(
    backends: &[Arc<Backend>],
    limit: u32,
    now: impl Fn() -> Millis,
    excluded: impl Fn(&Backend) -> bool,
    out: &mut Vec<BackendLoad>,
) {
    let all_aside = all_aside(backends, &now);
    out.extend(backends.iter().map(|b| BackendLoad {
        outstanding: if excluded(b) || (!all_aside && b.aside(&now)) {
            limit
        } else {
            b.outstanding()
        },
        limit,
    }));
}

impl Dest {
    /// The metrics label: `local`, or the provider's name.
    pub fn label(&self) -> &str {
        match self {
            Dest::Local(_) => metrics::LOCAL,
            Dest::Provider(p) => &p.name,
        }
    }
}

/// Circuit breaker settings for every provider.
#[derive(Clone, Copy, Debug)]
pub struct BreakerSettings {
    pub failures: u32,
    pub open: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            open: Duration::from_secs(30),
        }
    }
}

/// Destinations a retried request must not go back to.
#[derive(Clone, Debug, Default)]
pub struct Excluded {
    pub locals: Vec<String>,
    pub providers: Vec<String>,
    /// Every local engine: for a waiter behind one that was let by (see `Core::pump`).
    pub all_locals: bool,
}

impl Excluded {
    pub fn is_empty(&self) -> bool {
        self.locals.is_empty() && self.providers.is_empty() && !self.all_locals
    }

    /// What a queued retry stays away from: the providers. A failed engine is set aside for
    /// a while instead, for every request, and may take the retry once it is back.
    pub fn providers_only(&self) -> Self {
        Self {
            providers: self.providers.clone(),
            ..Self::default()
        }
    }

    pub fn add(&mut self, dest: &Dest) {
        match dest {
            Dest::Local(b) => self.locals.push(b.addr.clone()),
            Dest::Provider(p) => self.providers.push(p.name.clone()),
        }
    }
}

/// A request in the queue: where its ticket goes, and where it must not (the providers a
/// retry failed on; never engines, which are set aside instead).
struct Waiting {
    tx: oneshot::Sender<Ticket>,
    excluded: Excluded,
}

/// What a request gets: a lease on a destination, or a 503.
#[derive(Debug)]
pub enum Ticket {
    Go(Lease),
    Reject(RejectReason),
}

enum Decided {
    Go(Dest, Option<Bearer>),
    Reject(RejectReason),
}

struct ProviderSlot {
    p: Arc<Provider>,
    in_flight: u32,
    breaker: CircuitBreaker,
    key: KeyState,
}

struct Core {
    config: Arc<RouterConfig>,
    backends: Vec<Arc<Backend>>,
    /// Removed backends that something still holds (a lease, a thread's copy of the list): not
    /// chosen, but a backend that comes back keeps its count so it is not overloaded.
    draining: Vec<Arc<Backend>>,
    providers: Vec<ProviderSlot>,
    /// Providers a reload removed, by name, with requests still on them: one that comes back
    /// takes up its count again, so it is not sent more than its limit.
    retired: Vec<(String, u32)>,
    budget: BudgetTracker,
    queue: Fifo<Waiting>,
    capacity_exhausted: bool,
    scratch_b: Vec<BackendLoad>,
    scratch_p: Vec<ProviderLoad>,
    /// Queue ids; only requests that wait take one.
    next_id: u64,
    /// The drain has run out: nothing more may wait (see [`Shared::refuse_waiting`]).
    refusing: bool,
}

impl Core {
    fn decide(
        &mut self,
        now: Millis,
        waited_ms: u64,
        in_queue: bool,
        queued: u32,
        ex: Option<&Excluded>,
    ) -> Admission {
        let limit = self.config.max_concurrency_per_backend;
        let mut bl = std::mem::take(&mut self.scratch_b);
        let mut pl = std::mem::take(&mut self.scratch_p);
        bl.clear();
        pl.clear();
        backend_loads(
            &self.backends,
            limit,
            || now,
            |b| ex.is_some_and(|e| e.all_locals || e.locals.contains(&b.addr)),
            &mut bl,
        );
        pl.extend(self.providers.iter().map(|p| ProviderLoad {
            in_flight: p.in_flight,
            max_concurrency: p.p.max_concurrency,
            breaker_allows: p.breaker.allows(now)
                && p.key.usable()
                && !ex.is_some_and(|e| e.providers.contains(&p.p.name)),
        }));
        let cfg = &self.config;
        let a = admit(&AdmissionInput {
            backends: &bl,
            providers: &pl,
            mode: cfg.burst.mode,
            capacity_exhausted: self.capacity_exhausted,
            budget_allows: self.budget.allows(now),
            queued,
            queue_limit: cfg.queue.limit,
            waited_ms,
            max_queue_wait_ms: cfg.burst.max_queue_wait_milliseconds,
            queue_timeout_ms: u64::from(cfg.queue.timeout_seconds) * 1000,
            in_queue,
        });
        self.scratch_b = bl;
        self.scratch_p = pl;
        a
    }

    /// Decides and takes the slot chosen: `None` means the request waits. A local slot taken
    /// meanwhile by a lock-free request only means deciding again on the new counts.
    fn admit(
        &mut self,
        now: Millis,
        waited_ms: u64,
        in_queue: bool,
        queued: u32,
        ex: Option<&Excluded>,
    ) -> Option<Decided> {
        loop {
            return match self.decide(now, waited_ms, in_queue, queued, ex) {
                Admission::Local(i) => {
                    let b = &self.backends[i];
                    if !b.try_take(self.config.max_concurrency_per_backend) {
                        continue;
                    }
                    Some(Decided::Go(Dest::Local(b.clone()), None))
                }
                Admission::Provider(i) => {
                    let p = &mut self.providers[i];
                    p.in_flight += 1;
                    p.breaker.on_send(now);
                    // Requests per minute count at send, so concurrent spills see each other.
                    self.budget.record_request(now);
                    Some(Decided::Go(
                        Dest::Provider(p.p.clone()),
                        p.key.bearer().cloned(),
                    ))
                }
                Admission::Reject(r) => Some(Decided::Reject(r)),
                Admission::Queue => None,
            };
        }
    }

    fn release_provider(&mut self, p: &Provider) {
        if let Some(s) = self.providers.iter_mut().find(|s| s.p.name == p.name) {
            s.in_flight = s.in_flight.saturating_sub(1);
        } else if let Some(i) = self.retired.iter().position(|(n, _)| *n == p.name) {
            let n = &mut self.retired[i].1;
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.retired.swap_remove(i);
            }
        }
    }

    /// Decides the queue head for as long as it can go somewhere (FIFO: nobody behind it moves
    /// first), except that a retry kept only from the providers it failed on lets those
    /// behind it by to what it may not take. Once one is let by, those behind it may go only
    /// to a provider: a local slot freed meanwhile (lock-free) is the skipped retry's, at the
    /// next pump that its release brings.
    fn pump(
        &mut self,
        now: Millis,
        at: Instant,
        out: &mut Vec<(oneshot::Sender<Ticket>, Decided)>,
    ) {
        let mut i = 0;
        let mut let_by = false;
        while let Some(w) = self.queue.get_mut(i) {
            let waited = at.saturating_duration_since(w.since).as_millis() as u64;
            // Taken out for the decision and put back if it waits on: no clone under the lock.
            let mut ex = std::mem::take(&mut w.item.excluded);
            let skips = !ex.is_empty();
            ex.all_locals = let_by;
            let queued = (self.queue.len() - 1) as u32;
            match self.admit(now, waited, true, queued, Some(&ex)) {
                Some(d) => {
                    if let Some(w) = self.queue.remove_at(i) {
                        out.push((w.item.tx, d));
                    }
                }
                None if skips => {
                    ex.all_locals = false;
                    if let Some(w) = self.queue.get_mut(i) {
                        w.item.excluded = ex;
                    }
                    let_by = true;
                    i += 1;
                }
                None => break,
            }
        }
    }
}

/// Read on every request and written rarely, so on cache lines of their own (not the `Arc`'s
/// count nor the lock's).
#[repr(align(128))]
struct Published {
    /// The queue's length, kept with it under the lock: a request may take a slot without the
    /// lock only while this is 0, and a freed slot wakes the queue only when it is not.
    queued: AtomicUsize,
    /// Which backend list and limit are current; a thread whose copy is older copies again.
    view: AtomicU64,
}

/// View ids are unique in the process (from 1; a thread starts with none), so a thread's copy
/// never matches another router's.
static NEXT_VIEW: AtomicU64 = AtomicU64::new(1);

/// A serving thread's copy of the backend list, for taking slots without the lock.
struct View {
    id: u64,
    limit: u32,
    backends: Vec<Arc<Backend>>,
    loads: Vec<BackendLoad>,
}

thread_local! {
    static VIEW: RefCell<View> = const {
        RefCell::new(View {
            id: 0,
            limit: 0,
            backends: Vec::new(),
            loads: Vec::new(),
        })
    };
}

/// Everything the request handlers share.
pub struct Shared {
    published: Published,
    epoch: Instant,
    core: Mutex<Core>,
    pub metrics: RouterMetrics,
    local_metrics: DestMetrics,
    breaker: BreakerSettings,
    /// False while the engine endpoints have not been listed yet (in a cluster): the router is
    /// not ready, since an empty backend list would send everything to providers or the queue.
    synced: AtomicBool,
    /// Shutdown has begun: readiness fails while requests are still served.
    closing: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

fn provider_slots(
    cfg: &RouterConfig,
    breaker: BreakerSettings,
    m: &RouterMetrics,
) -> Vec<ProviderSlot> {
    cfg.burst
        .providers
        .iter()
        .map(|p| ProviderSlot {
            key: read_key(p.api_key_file.as_deref()),
            p: Arc::new(Provider::new(p, m)),
            in_flight: 0,
            breaker: CircuitBreaker::new(breaker.failures, breaker.open.as_millis() as Millis),
        })
        .collect()
}

fn budget_limits(cfg: &RouterConfig) -> (Option<u32>, Option<f64>) {
    let b = cfg.burst.budget.as_ref();
    (
        b.and_then(|b| b.max_requests_per_minute),
        b.and_then(|b| b.max_spend_per_hour.as_deref())
            .and_then(|s| parse_spend(s).ok()),
    )
}

impl Shared {
    pub fn new(config: RouterConfig, backends: Vec<String>, breaker: BreakerSettings) -> Arc<Self> {
        let (rpm, spend) = budget_limits(&config);
        let metrics = RouterMetrics::default();
        let providers = provider_slots(&config, breaker, &metrics);
        let shared = Arc::new(Self {
            published: Published {
                queued: AtomicUsize::new(0),
                view: AtomicU64::new(NEXT_VIEW.fetch_add(1, Ordering::Relaxed)),
            },
            epoch: Instant::now(),
            core: Mutex::new(Core {
                config: Arc::new(config),
                backends: Vec::new(),
                draining: Vec::new(),
                providers,
                retired: Vec::new(),
                budget: BudgetTracker::new(rpm, spend),
                queue: Fifo::default(),
                capacity_exhausted: false,
                scratch_b: Vec::new(),
                scratch_p: Vec::new(),
                next_id: 0,
                refusing: false,
            }),
            local_metrics: metrics.for_destination(metrics::LOCAL),
            metrics,
            breaker,
            synced: AtomicBool::new(true),
            closing: AtomicBool::new(false),
        });
        shared.set_backends(backends);
        shared
    }

    /// A panic elsewhere must not wedge routing; the core stays consistent per call.
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called under the lock whenever the backend list or the limit changes.
    fn publish_view(&self) {
        let id = NEXT_VIEW.fetch_add(1, Ordering::Relaxed);
        self.published.view.store(id, Ordering::SeqCst);
    }

    /// Called under the lock whenever the queue changes.
    fn queue_changed(&self, core: &Core) {
        let n = core.queue.len();
        self.published.queued.store(n, Ordering::SeqCst);
        self.metrics.queue_length.set(n as i64);
    }

    /// A local slot without the lock, when nobody waits and an engine has room.
    fn take_local(&self) -> Option<Arc<Backend>> {
        VIEW.with(|v| {
            let v = &mut *v.borrow_mut();
            if v.id != self.published.view.load(Ordering::Acquire) {
                let core = self.lock();
                v.backends.clone_from(&core.backends);
                v.limit = core.config.max_concurrency_per_backend;
                v.id = self.published.view.load(Ordering::Relaxed);
            }
            loop {
                // Read again on every try: a request that queued meanwhile goes first.
                let queued = self.published.queued.load(Ordering::SeqCst);
                let queued = u32::try_from(queued).unwrap_or(u32::MAX);
                let limit = v.limit;
                v.loads.clear();
                backend_loads(
                    &v.backends,
                    limit,
                    || self.now_ms(),
                    |_| false,
                    &mut v.loads,
                );
                let b = &v.backends[local_first(&v.loads, queued, false)?];
                if b.try_take(limit) {
                    return Some(b.clone());
                }
            }
        })
    }

    fn now_ms(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    pub fn config(&self) -> Arc<RouterConfig> {
        self.lock().config.clone()
    }

    /// Applies a new config: providers keep their load, breaker and key by name; budget windows
    /// keep their history; requests in flight are untouched.
    pub fn set_config(self: &Arc<Self>, config: RouterConfig) {
        let (rpm, spend) = budget_limits(&config);
        let mut fresh = provider_slots(&config, self.breaker, &self.metrics);
        {
            let mut core = self.lock();
            let core = &mut *core;
            for slot in &mut fresh {
                if let Some(old) = core.providers.iter().find(|o| o.p.name == slot.p.name) {
                    slot.in_flight = old.in_flight;
                    slot.breaker = old.breaker.clone();
                } else if let Some(i) = core.retired.iter().position(|(n, _)| *n == slot.p.name) {
                    slot.in_flight = core.retired.swap_remove(i).1;
                }
            }
            let old = std::mem::replace(&mut core.providers, fresh);
            core.retired.extend(
                old.into_iter()
                    .filter(|o| {
                        o.in_flight > 0 && !core.providers.iter().any(|n| n.p.name == o.p.name)
                    })
                    .map(|o| (o.p.name.clone(), o.in_flight)),
            );
            core.budget.max_requests_per_minute = rpm;
            core.budget.max_spend_per_hour = spend;
            core.config = Arc::new(config);
            self.publish_view();
        }
        self.pump();
    }

    /// Replaces the set of ready local engines (`host:port`), keeping counts of those that stay.
    pub fn set_backends(self: &Arc<Self>, addrs: Vec<String>) {
        {
            let mut core = self.lock();
            let core = &mut *core;
            let mut old = std::mem::take(&mut core.backends);
            old.append(&mut core.draining);
            let mut next: Vec<Arc<Backend>> = Vec::with_capacity(addrs.len());
            for a in addrs {
                if next.iter().any(|b| b.addr == a) {
                    continue;
                }
                let b = match old.iter().position(|b| b.addr == a) {
                    Some(i) => old.swap_remove(i),
                    None => Arc::new(Backend::new(a)),
                };
                next.push(b);
            }
            // Held only here: no lease counts on it and no thread's copy can take a slot on it.
            core.draining = old
                .into_iter()
                .filter(|b| Arc::strong_count(b) > 1)
                .collect();
            self.metrics.backends.set(next.len() as i64);
            core.backends = next;
            self.publish_view();
        }
        self.pump();
    }

    /// Whether the backend list is known (always, standalone; after the first list, in a cluster).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Whether shutdown has begun (see [`Self::set_closing`]).
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Fails readiness from now on: at shutdown, first while the endpoints catch up, then for
    /// the drain.
    pub fn set_closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Relaxed);
    }

    pub fn backends(&self) -> Vec<String> {
        self.lock()
            .backends
            .iter()
            .map(|b| b.addr.clone())
            .collect()
    }

    /// The controller's published capacity state (burst mode `CapacityExhausted` follows it).
    pub fn set_capacity_exhausted(self: &Arc<Self>, exhausted: bool) {
        self.lock().capacity_exhausted = exhausted;
        self.metrics.capacity_exhausted.set(i64::from(exhausted));
        self.pump();
    }

    /// Re-reads every provider's key file; a key that appears lets a waiting request spill.
    pub fn refresh_keys(self: &Arc<Self>) {
        let files: Vec<(String, Option<String>)> = self
            .lock()
            .providers
            .iter()
            .map(|s| (s.p.name.clone(), s.p.key_file.clone()))
            .collect();
        let read = files
            .into_iter()
            .map(|(n, f)| {
                let key = read_key(f.as_deref());
                (n, f, key)
            })
            .collect();
        self.apply_keys(read);
    }

    /// Keys read outside the lock, each from the file named then: one whose provider has since
    /// been given another file (a reload meanwhile) is stale and left out.
    fn apply_keys(self: &Arc<Self>, read: Vec<(String, Option<String>, KeyState)>) {
        let mut changed = false;
        {
            let mut core = self.lock();
            for (name, file, key) in read {
                if let Some(s) = core.providers.iter_mut().find(|s| s.p.name == name)
                    && s.p.key_file == file
                    && s.key != key
                {
                    if key.usable() {
                        tracing::info!(provider = %name, "provider API key loaded");
                    } else {
                        tracing::warn!(provider = %name, "provider API key file missing or empty: provider skipped");
                    }
                    s.key = key;
                    changed = true;
                }
            }
        }
        if changed {
            self.pump();
        }
    }

    /// A decision for a request that just arrived: a lease now, a 503 now, or a place in the
    /// queue until a slot frees, its spill wait passes, or it times out.
    pub async fn acquire(self: &Arc<Self>) -> Ticket {
        if let Some(b) = self.take_local() {
            return Ticket::Go(Lease::new(self.clone(), Dest::Local(b), None));
        }
        self.enqueue(Instant::now(), Excluded::default()).await
    }

    /// [`Self::acquire`] for a retry that found no room after its connection failed: it keeps
    /// its arrival time, so it waits in the queue ahead of later requests and its spill wait
    /// and queue timeout count from when it arrived, not from the retry; and it is never
    /// handed a destination in `excluded`.
    pub async fn requeue(self: &Arc<Self>, arrived: Instant, excluded: Excluded) -> Ticket {
        // `Core::pump` lets others by such a waiter only for what it may not take: providers.
        debug_assert!(excluded.locals.is_empty() && !excluded.all_locals);
        self.enqueue(arrived, excluded).await
    }

    /// Whether an engine or a provider outside `excluded` could take a request: otherwise a
    /// retry that queued would only wait for its timeout. With no engine listed yet (a cold
    /// start), one may come, as for a new request.
    pub fn serves_beyond(&self, excluded: &Excluded) -> bool {
        let core = self.lock();
        core.backends.is_empty()
            || core
                .backends
                .iter()
                .any(|b| !excluded.locals.contains(&b.addr))
            || (core.config.burst.mode != BurstMode::Never
                && core
                    .providers
                    .iter()
                    .any(|p| !excluded.providers.contains(&p.p.name)))
    }

    /// Decides under the lock, or queues by `since` until a decision comes.
    async fn enqueue(self: &Arc<Self>, since: Instant, excluded: Excluded) -> Ticket {
        let mut out = Vec::new();
        let decided = {
            let mut core = self.lock();
            let now = self.now_ms();
            // Those that arrived earlier: all of them for a new request. A retry is neither held
            // back nor refused as over the limit for requests that came after it.
            let queued = core.queue.ahead_of(since) as u32;
            let waited = since.elapsed().as_millis() as u64;
            match core.admit(now, waited, false, queued, Some(&excluded)) {
                Some(d) => Ok(d),
                None if core.refusing => Ok(Decided::Reject(RejectReason::ShuttingDown)),
                None => {
                    // Only a request that waits needs an id and a channel.
                    #[cfg(test)]
                    tests::before_queueing();
                    let id = core.next_id;
                    core.next_id += 1;
                    let (tx, rx) = oneshot::channel();
                    core.queue.push(id, since, Waiting { tx, excluded });
                    self.queue_changed(&core);
                    // A slot freed after the decision above, while the queue still looked
                    // empty, woke nobody: decide the head again now that the queue shows.
                    core.pump(now, Instant::now(), &mut out);
                    self.queue_changed(&core);
                    Err((id, rx))
                }
            }
        };
        self.send_all(out);
        match decided {
            Ok(d) => self.ticket(d),
            Err((id, rx)) => self.wait(id, since, rx).await,
        }
    }

    async fn wait(
        self: &Arc<Self>,
        id: u64,
        since: Instant,
        mut rx: oneshot::Receiver<Ticket>,
    ) -> Ticket {
        // Leaves the queue if the client goes away while waiting.
        let _guard = QueueGuard { shared: self, id };
        loop {
            let (spill_wait, timeout, spill_possible) = {
                let core = self.lock();
                (
                    Duration::from_millis(core.config.burst.max_queue_wait_milliseconds),
                    Duration::from_secs(u64::from(core.config.queue.timeout_seconds)),
                    !core.providers.is_empty(),
                )
            };
            let now = Instant::now();
            let mut next = since + timeout;
            if now < since + spill_wait {
                next = next.min(since + spill_wait);
            } else if spill_possible {
                next = next.min(now + SPILL_RECHECK);
            }
            match tokio::time::timeout_at(next.into(), &mut rx).await {
                Ok(Ok(t)) => return t,
                // The sender only goes away with its queue entry, which only we remove.
                Ok(Err(_)) => return Ticket::Reject(RejectReason::QueueTimeout),
                Err(_) => {
                    self.pump();
                    if Instant::now() >= since + timeout {
                        let removed = {
                            let mut core = self.lock();
                            let r = core.queue.remove(id).is_some();
                            self.queue_changed(&core);
                            r
                        };
                        if removed {
                            return Ticket::Reject(RejectReason::QueueTimeout);
                        }
                        // Decided meanwhile: the ticket is on its way.
                        return rx
                            .await
                            .unwrap_or(Ticket::Reject(RejectReason::QueueTimeout));
                    }
                }
            }
        }
    }

    /// At the end of a shutdown's drain: every waiting request is answered 503 now, and later
    /// ones that would wait too, rather than have their connections closed under them.
    pub fn refuse_waiting(&self) {
        let mut refused = Vec::new();
        {
            let mut core = self.lock();
            core.refusing = true;
            while let Some(w) = core.queue.remove_at(0) {
                refused.push(w.item.tx);
            }
            self.queue_changed(&core);
        }
        for tx in refused {
            let _ = tx.send(Ticket::Reject(RejectReason::ShuttingDown));
        }
    }

    /// Another destination with room now for a request whose connection failed before any
    /// response byte (it keeps its arrival time for the spill wait); `None` when nothing has
    /// room.
    pub fn readmit(self: &Arc<Self>, arrived: Instant, excluded: &Excluded) -> Option<Lease> {
        let d = {
            let mut core = self.lock();
            let now = self.now_ms();
            let queued = core.queue.len() as u32;
            let waited = arrived.elapsed().as_millis() as u64;
            core.admit(now, waited, true, queued, Some(excluded))
        };
        match d {
            Some(Decided::Go(dest, key)) => Some(Lease::new(self.clone(), dest, key)),
            _ => None,
        }
    }

    /// A connection to a local engine failed before any answer: it gets no new requests for
    /// `SET_ASIDE_MS` (requests already on it finish or fail on their own). Whether that takes
    /// effect: not when every engine is set aside.
    pub fn set_aside(self: &Arc<Self>, b: &Backend) -> bool {
        let now = self.now_ms();
        let before = b.aside_until.swap(now + SET_ASIDE_MS, Ordering::Relaxed);
        if before <= now {
            self.metrics.engine_set_asides.inc();
        }
        // Its return frees no slot, so nothing else would hand it to the queue.
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(SET_ASIDE_MS as u64 + 1)).await;
            if let Some(shared) = weak.upgrade() {
                shared.pump();
            }
        });
        !all_aside(&self.lock().backends, &|| now)
    }

    /// Feeds a provider's breaker with the result of a request sent at `sent` (its lease's
    /// `sent_ms`): `ok` is false for 5xx, 429, 401, 403, timeouts, connection errors and
    /// answers cut off mid-way.
    pub fn provider_result(&self, name: &str, ok: bool, sent: Millis) {
        let now = self.now_ms();
        let mut core = self.lock();
        if let Some(s) = core.providers.iter_mut().find(|s| s.p.name == name) {
            if ok {
                s.breaker.on_success(sent);
            } else {
                s.breaker.on_failure(sent, now);
            }
            let open = matches!(s.breaker.state(), BreakerState::Open { .. });
            self.metrics
                .breaker_open
                .get_or_create(&ProviderLabel {
                    provider: name.to_string(),
                })
                .set(i64::from(open));
        }
    }

    /// Counts a provider response's usage into the spend budget and the token metrics.
    pub fn record_usage(&self, p: &Provider, u: Usage) {
        let spent = cost(p.pricing.as_ref(), u.prompt_tokens, u.completion_tokens);
        let now = self.now_ms();
        self.lock().budget.record_spend(now, spent);
        for (kind, n) in [
            ("prompt", u.prompt_tokens),
            ("completion", u.completion_tokens),
        ] {
            self.metrics
                .tokens
                .get_or_create(&TokenLabels {
                    provider: p.name.clone(),
                    kind,
                })
                .inc_by(n);
        }
        self.metrics
            .spend
            .get_or_create(&ProviderLabel {
                provider: p.name.clone(),
            })
            .inc_by(spent);
    }

    fn ticket(self: &Arc<Self>, d: Decided) -> Ticket {
        match d {
            Decided::Go(dest, key) => Ticket::Go(Lease::new(self.clone(), dest, key)),
            Decided::Reject(r) => Ticket::Reject(r),
        }
    }

    /// Lets queued requests go where they now can.
    fn pump(self: &Arc<Self>) {
        let mut out = Vec::new();
        {
            let mut core = self.lock();
            if core.queue.is_empty() {
                return;
            }
            core.pump(self.now_ms(), Instant::now(), &mut out);
            self.queue_changed(&core);
        }
        self.send_all(out);
    }

    /// Outside the lock: a waiter that went away drops its lease here, which takes the lock.
    fn send_all(self: &Arc<Self>, out: Vec<(oneshot::Sender<Ticket>, Decided)>) {
        for (tx, d) in out {
            let _ = tx.send(self.ticket(d));
        }
    }

    fn release(self: &Arc<Self>, dest: &Dest) {
        match dest {
            Dest::Local(b) => {
                b.outstanding.fetch_sub(1, Ordering::SeqCst);
                if self.published.queued.load(Ordering::SeqCst) != 0 {
                    self.pump();
                }
            }
            Dest::Provider(p) => {
                self.lock().release_provider(p);
                self.pump();
            }
        }
    }

    /// Requests waiting in the queue.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }
}

struct QueueGuard<'a> {
    shared: &'a Arc<Shared>,
    id: u64,
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        let mut core = self.shared.lock();
        if core.queue.remove(self.id).is_some() {
            self.shared.queue_changed(&core);
        }
    }
}

/// A held backend or provider slot; dropping it frees the slot and lets the queue head in.
pub struct Lease {
    shared: Arc<Shared>,
    pub dest: Dest,
    pub bearer: Option<Bearer>,
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
    fn new(shared: Arc<Shared>, dest: Dest, bearer: Option<Bearer>) -> Self {
        let sent_ms = shared.now_ms();
        let lease = Self {
            shared,
            dest,
            bearer,
            sent_ms,
        };
        lease.metrics().in_flight.inc();
        lease
    }

    /// The destination's metric handles.
    pub fn metrics(&self) -> &DestMetrics {
        match &self.dest {
            Dest::Local(_) => &self.shared.local_metrics,
            Dest::Provider(p) => &p.metrics,
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Seconds since the slot was taken.
    pub fn held_seconds(&self) -> f64 {
        self.shared.now_ms().saturating_sub(self.sent_ms).max(0) as f64 / 1000.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.metrics().in_flight.dec();
        self.shared.release(&self.dest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn a_set_aside_engine_looks_full_until_its_time_is_up_unless_all_are() {
        let engines: Vec<Arc<Backend>> = ["a:1", "b:1"]
            .into_iter()
            .map(|a| Arc::new(Backend::new(a.into())))
            .collect();
        engines[0].aside_until.store(1_000, Ordering::Relaxed);
        let at = |now: Millis| {
            let mut out = Vec::new();
            backend_loads(&engines, 4, || now, |_| false, &mut out);
            out.iter().map(|l| l.outstanding).collect::<Vec<_>>()
        };
        assert_eq!(at(999), vec![4, 0]);
        engines[1].aside_until.store(1_500, Ordering::Relaxed);
        assert_eq!(at(999), vec![0, 0], "all set aside: none is");
        assert_eq!(at(1_200), vec![0, 4]);
        assert_eq!(
            engines[0].aside_until.load(Ordering::Relaxed),
            0,
            "cleared once over"
        );
        assert_eq!(at(1_500), vec![0, 0]);
    }

    fn shared(limit: u32, backends: &[&str]) -> Arc<Shared> {
        Shared::new(
            config(limit),
            backends.iter().map(|b| b.to_string()).collect(),
            Default::default(),
        )
    }

    fn config(limit: u32) -> RouterConfig {
        RouterConfig::from_yaml(&format!(
            "maxConcurrencyPerBackend: {limit}\nqueue: {{limit: 1000, timeoutSeconds: 60}}\n\
             burst: {{mode: Never, maxQueueWaitMilliseconds: 60000}}"
        ))
        .unwrap()
    }

    thread_local! {
        static BEFORE_QUEUEING: RefCell<Option<Box<dyn FnOnce()>>> = RefCell::new(None);
    }

    /// Runs what a test set up, with the lock held, between the decision to queue and the push.
    /// It must not end a lease while anyone waits: that release would take the lock again.
    pub(super) fn before_queueing() {
        if let Some(f) = BEFORE_QUEUEING.with(|h| h.borrow_mut().take()) {
            f();
        }
    }

    /// A lease granted without waiting, or `None` when the request would wait.
    fn now(s: &Arc<Shared>) -> Option<Lease> {
        match s.acquire().now_or_never()? {
            Ticket::Go(l) => Some(l),
            Ticket::Reject(r) => panic!("rejected: {r:?}"),
        }
    }

    fn addr(l: &Lease) -> &str {
        match &l.dest {
            Dest::Local(b) => &b.addr,
            Dest::Provider(p) => &p.name,
        }
    }

    #[tokio::test]
    async fn a_lowered_limit_applies_to_requests_that_take_no_lock() {
        let s = shared(3, &["a:1"]);
        let _held = now(&s).expect("room");
        s.set_config(config(1));
        assert!(now(&s).is_none(), "a second request over a limit of 1");
    }

    #[tokio::test]
    async fn a_changed_backend_list_applies_to_requests_that_take_no_lock() {
        let s = shared(1, &["a:1"]);
        drop(now(&s).expect("room"));
        s.set_backends(vec!["b:1".into()]);
        assert_eq!(addr(&now(&s).expect("room")), "b:1");
    }

    #[tokio::test]
    async fn a_backend_that_comes_back_keeps_its_count() {
        let s = shared(1, &["a:1"]);
        let held = now(&s).expect("room");
        s.set_backends(vec!["b:1".into()]);
        s.set_backends(vec!["a:1".into(), "b:1".into()]);
        let l = now(&s).expect("room on b");
        assert_eq!(addr(&l), "b:1");
        assert!(now(&s).is_none(), "a:1 taken twice");
        drop(held);
        assert_eq!(addr(&now(&s).expect("a:1 freed")), "a:1");
    }

    /// A provider that a reload removes and a later one brings back while requests are still on
    /// it keeps their count, so it is not sent more than its limit.
    #[tokio::test]
    async fn a_provider_that_comes_back_keeps_its_count() {
        let with = |provider: &str| {
            RouterConfig::from_yaml(&format!(
                "maxConcurrencyPerBackend: 1\nburst:\n  mode: Saturated\n  \
                 maxQueueWaitMilliseconds: 0\n  providers: [{provider}]"
            ))
            .unwrap()
        };
        let p = "{name: p, url: \"http://127.0.0.1:9/v1\", model: m, maxConcurrency: 1}";
        let s = Shared::new(with(p), vec!["a:1".into()], Default::default());
        let _local = now(&s).expect("room");
        let on_p = now(&s).expect("a spill");
        assert_eq!(addr(&on_p), "p");
        s.set_config(with(""));
        s.set_config(with(p));
        assert!(now(&s).is_none(), "p sent more than its limit");
        drop(on_p);
        assert_eq!(addr(&now(&s).expect("p freed")), "p");
        assert!(s.lock().retired.is_empty());
    }

    /// A key read from a provider's old file, applied after a reload gave it a new one, must
    /// not replace the new file's key.
    #[tokio::test]
    async fn a_key_read_from_a_replaced_file_is_not_applied() {
        let dir = std::env::temp_dir().join(format!(
            "spillway-state-replaced-key-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |n: &str, key: &str| {
            let p = dir.join(n);
            std::fs::write(&p, key).unwrap();
            p.display().to_string()
        };
        let (old, new) = (file("old", "sk-old"), file("new", "sk-new"));
        let with = |key_file: &str| {
            RouterConfig::from_yaml(&format!(
                "burst:\n  maxQueueWaitMilliseconds: 0\n  providers: [{{name: p, \
                 url: \"http://127.0.0.1:9/v1\", model: m, apiKeyFile: \"{key_file}\"}}]"
            ))
            .unwrap()
        };
        let s = Shared::new(with(&old), Vec::new(), Default::default());
        let stale = vec![("p".to_string(), Some(old.clone()), read_key(Some(&old)))];
        s.set_config(with(&new));
        s.apply_keys(stale);
        let l = now(&s).expect("a spill");
        let bearer = l.bearer.as_ref().expect("a key").header().clone();
        assert_eq!(bearer, "Bearer sk-new");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Once the drain has run out, a request that would wait is answered at once.
    #[tokio::test]
    async fn after_the_drain_nothing_more_waits() {
        let s = shared(1, &["a:1"]);
        let _held = now(&s).expect("room");
        s.refuse_waiting();
        let t = s.acquire().now_or_never().expect("decided at once");
        assert!(
            matches!(t, Ticket::Reject(RejectReason::ShuttingDown)),
            "{t:?}"
        );
        assert_eq!(s.queued(), 0);
    }

    #[tokio::test]
    async fn a_free_slot_goes_to_the_waiter_not_to_a_newcomer() {
        let s = shared(1, &["a:1"]);
        let held = now(&s).expect("room");
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.acquire().await }
        });
        while s.queued() == 0 {
            tokio::task::yield_now().await;
        }
        // The slot frees but nobody is woken yet (the moment between a release's decrement and
        // its look at the queue): a newcomer must still not take it.
        let Dest::Local(b) = &held.dest else {
            panic!("a local lease")
        };
        b.outstanding.fetch_sub(1, Ordering::SeqCst);
        std::mem::forget(held);
        assert!(now(&s).is_none(), "a newcomer overtook the queue");
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(
            got.expect("the waiter still waits").unwrap(),
            Ticket::Go(_)
        ));
    }

    #[tokio::test]
    async fn a_slot_freed_while_a_request_is_about_to_queue_is_not_lost() {
        let s = shared(1, &["a:1"]);
        let held = now(&s).expect("room");
        // Freed after the request saw every engine full, before it is in the queue: the release
        // sees an empty queue and wakes nobody.
        BEFORE_QUEUEING.with(|h| *h.borrow_mut() = Some(Box::new(move || drop(held))));
        assert!(
            now(&s).is_some(),
            "the request waits for a slot that is free"
        );
        assert_eq!(s.queued(), 0);
    }

    /// Threads taking and freeing slots as fast as they can, most without the lock: no engine
    /// ever holds more than its limit, and no waiter is left behind (a lost wake-up would wait
    /// for the 60 s queue timeout).
    #[test]
    fn concurrent_requests_never_exceed_the_limit_nor_strand_a_waiter() {
        const LIMIT: u32 = 2;
        let s = shared(LIMIT, &["a:1", "b:1"]);
        let held: Arc<[AtomicU32; 2]> = Arc::default();
        let deadline = Instant::now() + Duration::from_secs(30);
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (s, held) = (s.clone(), held.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        for _ in 0..3000 {
                            let t = tokio::time::timeout_at(deadline.into(), s.acquire()).await;
                            let Ticket::Go(l) = t.expect("a waiter was left behind") else {
                                panic!("rejected")
                            };
                            let i = usize::from(addr(&l) == "b:1");
                            let n = held[i].fetch_add(1, Ordering::SeqCst) + 1;
                            assert!(n <= LIMIT, "{n} requests on one engine");
                            tokio::task::yield_now().await;
                            held[i].fetch_sub(1, Ordering::SeqCst);
                        }
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.queued(), 0);
        let core = s.lock();
        assert!(core.backends.iter().all(|b| b.outstanding() == 0));
    }
}
