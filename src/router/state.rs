//! The router's live state: config, backends, providers (load, breaker, key), budget and the
//! FIFO queue, behind one lock so every decision sees one consistent picture. Every decision is
//! [`admit`]'s; this module only gathers its input and carries out its answer.
//!
//! A reservation is a [`Lease`]: it holds a backend slot or a provider slot until dropped (the
//! response body ended, or the client went away), and dropping it lets the queue head in.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::admission::{Admission, AdmissionInput, BackendLoad, ProviderLoad, RejectReason, admit};
use super::breaker::{BreakerState, CircuitBreaker};
use super::budget::{BudgetTracker, cost, parse_spend};
use super::config::{ProviderConfig, RouterConfig};
use super::keys::{Bearer, KeyState, read_key};
use super::metrics::{self, DestMetrics, ProviderLabel, RouterMetrics, TokenLabels};
use super::queue::Fifo;
use super::usage::Usage;
use crate::api::Pricing;
use crate::autoscale::decide::Millis;

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
pub struct Backend {
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
#[derive(Debug, Default)]
pub struct Excluded {
    pub locals: Vec<String>,
    pub providers: Vec<String>,
}

impl Excluded {
    pub fn add(&mut self, dest: &Dest) {
        match dest {
            Dest::Local(b) => self.locals.push(b.addr.clone()),
            Dest::Provider(p) => self.providers.push(p.name.clone()),
        }
    }
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

struct BackendSlot {
    b: Arc<Backend>,
    outstanding: u32,
}

struct ProviderSlot {
    p: Arc<Provider>,
    in_flight: u32,
    breaker: CircuitBreaker,
    key: KeyState,
}

struct Core {
    config: Arc<RouterConfig>,
    backends: Vec<BackendSlot>,
    /// Removed backends that still have requests in flight: not chosen, but their counts stay
    /// so a backend that comes back is not overloaded.
    draining: Vec<BackendSlot>,
    providers: Vec<ProviderSlot>,
    budget: BudgetTracker,
    queue: Fifo<oneshot::Sender<Ticket>>,
    capacity_exhausted: bool,
    scratch_b: Vec<BackendLoad>,
    scratch_p: Vec<ProviderLoad>,
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
        // An excluded destination looks full to admission, so the pure rules stay the only rules.
        bl.extend(self.backends.iter().map(|b| BackendLoad {
            outstanding: if ex.is_some_and(|e| e.locals.contains(&b.b.addr)) {
                limit
            } else {
                b.outstanding
            },
            limit,
        }));
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

    /// Takes the slot `a` names; the request counts against it from now on.
    fn reserve(&mut self, a: Admission, now: Millis) -> Option<Decided> {
        match a {
            Admission::Local(i) => {
                let b = &mut self.backends[i];
                b.outstanding += 1;
                Some(Decided::Go(Dest::Local(b.b.clone()), None))
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
        }
    }

    fn release(&mut self, dest: &Dest) {
        match dest {
            Dest::Local(backend) => {
                let addr = &backend.addr;
                if let Some(b) = self.backends.iter_mut().find(|b| b.b.addr == *addr) {
                    b.outstanding = b.outstanding.saturating_sub(1);
                } else if let Some(i) = self.draining.iter().position(|b| b.b.addr == *addr) {
                    let b = &mut self.draining[i];
                    b.outstanding = b.outstanding.saturating_sub(1);
                    if b.outstanding == 0 {
                        self.draining.swap_remove(i);
                    }
                }
            }
            Dest::Provider(p) => {
                if let Some(s) = self.providers.iter_mut().find(|s| s.p.name == p.name) {
                    s.in_flight = s.in_flight.saturating_sub(1);
                }
            }
        }
    }

    /// Decides the queue head for as long as it can go somewhere (FIFO: nobody behind it moves
    /// first).
    fn pump(
        &mut self,
        now: Millis,
        at: Instant,
        out: &mut Vec<(oneshot::Sender<Ticket>, Decided)>,
    ) {
        while let Some(head) = self.queue.head() {
            let waited = at.saturating_duration_since(head.since).as_millis() as u64;
            let queued = (self.queue.len() - 1) as u32;
            let a = self.decide(now, waited, true, queued, None);
            let Some(d) = self.reserve(a, now) else {
                break;
            };
            if let Some(w) = self.queue.pop() {
                out.push((w.tx, d));
            }
        }
    }
}

/// Everything the request handlers share.
pub struct Shared {
    epoch: Instant,
    core: Mutex<Core>,
    pub metrics: RouterMetrics,
    local_metrics: DestMetrics,
    breaker: BreakerSettings,
    next_id: AtomicU64,
    /// False while the engine endpoints have not been listed yet (in a cluster): the router is
    /// not ready, since an empty backend list would send everything to providers or the queue.
    synced: AtomicBool,
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
            epoch: Instant::now(),
            core: Mutex::new(Core {
                config: Arc::new(config),
                backends: Vec::new(),
                draining: Vec::new(),
                providers,
                budget: BudgetTracker::new(rpm, spend),
                queue: Fifo::default(),
                capacity_exhausted: false,
                scratch_b: Vec::new(),
                scratch_p: Vec::new(),
            }),
            local_metrics: metrics.for_destination(metrics::LOCAL),
            metrics,
            breaker,
            next_id: AtomicU64::new(0),
            synced: AtomicBool::new(true),
        });
        shared.set_backends(backends);
        shared
    }

    /// A panic elsewhere must not wedge routing; the core stays consistent per call.
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
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
            for slot in &mut fresh {
                if let Some(old) = core.providers.iter().find(|o| o.p.name == slot.p.name) {
                    slot.in_flight = old.in_flight;
                    slot.breaker = old.breaker.clone();
                }
            }
            core.providers = fresh;
            core.budget.max_requests_per_minute = rpm;
            core.budget.max_spend_per_hour = spend;
            core.config = Arc::new(config);
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
            let mut next: Vec<BackendSlot> = Vec::with_capacity(addrs.len());
            for a in addrs {
                if next.iter().any(|b| b.b.addr == a) {
                    continue;
                }
                let slot = match old.iter().position(|b| b.b.addr == a) {
                    Some(i) => old.swap_remove(i),
                    None => BackendSlot {
                        b: Arc::new(Backend {
                            authority: a.parse().ok().and_then(|x: http::uri::Authority| {
                                Some((x.clone(), http::HeaderValue::from_str(x.as_str()).ok()?))
                            }),
                            addr: a,
                        }),
                        outstanding: 0,
                    },
                };
                next.push(slot);
            }
            core.draining = old.into_iter().filter(|b| b.outstanding > 0).collect();
            self.metrics.backends.set(next.len() as i64);
            core.backends = next;
        }
        self.pump();
    }

    /// Whether the backend list is known (always, standalone; after the first list, in a cluster).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Relaxed);
    }

    pub fn backends(&self) -> Vec<String> {
        self.lock()
            .backends
            .iter()
            .map(|b| b.b.addr.clone())
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
        let read: Vec<(String, KeyState)> = files
            .into_iter()
            .map(|(n, f)| (n, read_key(f.as_deref())))
            .collect();
        let mut changed = false;
        {
            let mut core = self.lock();
            for (name, key) in read {
                if let Some(s) = core.providers.iter_mut().find(|s| s.p.name == name)
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
        let decided = {
            let mut core = self.lock();
            let now = self.now_ms();
            let queued = core.queue.len() as u32;
            let a = core.decide(now, 0, false, queued, None);
            match core.reserve(a, now) {
                Some(d) => Ok(d),
                None => {
                    // Only a request that waits needs an id and a channel: the shared counter
                    // and the allocation stay off the common path.
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = oneshot::channel();
                    core.queue.push(id, Instant::now(), tx);
                    self.metrics.queue_length.set(core.queue.len() as i64);
                    Err((id, rx))
                }
            }
        };
        match decided {
            Ok(d) => self.ticket(d),
            Err((id, rx)) => self.wait(id, rx).await,
        }
    }

    async fn wait(self: &Arc<Self>, id: u64, mut rx: oneshot::Receiver<Ticket>) -> Ticket {
        // Leaves the queue if the client goes away while waiting.
        let _guard = QueueGuard { shared: self, id };
        let since = Instant::now();
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
                            self.metrics.queue_length.set(core.queue.len() as i64);
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

    /// Another destination for a request whose connection failed before any response byte.
    /// It was admitted already, so it does not queue again: `None` when nothing has room.
    pub fn readmit(self: &Arc<Self>, arrived: Instant, excluded: &Excluded) -> Option<Lease> {
        let d = {
            let mut core = self.lock();
            let now = self.now_ms();
            let queued = core.queue.len() as u32;
            let waited = arrived.elapsed().as_millis() as u64;
            let a = core.decide(now, waited, true, queued, Some(excluded));
            match a {
                Admission::Local(_) | Admission::Provider(_) => core.reserve(a, now),
                _ => None,
            }
        };
        match d {
            Some(Decided::Go(dest, key)) => Some(Lease::new(self.clone(), dest, key)),
            _ => None,
        }
    }

    /// Feeds a provider's breaker: `ok` is false for 5xx, 429, timeouts and connection errors.
    pub fn provider_result(&self, name: &str, ok: bool) {
        let now = self.now_ms();
        let mut core = self.lock();
        if let Some(s) = core.providers.iter_mut().find(|s| s.p.name == name) {
            if ok {
                s.breaker.on_success();
            } else {
                s.breaker.on_failure(now);
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
            self.metrics.queue_length.set(core.queue.len() as i64);
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
        let mut out = Vec::new();
        {
            let mut core = self.lock();
            core.release(dest);
            if !core.queue.is_empty() {
                core.pump(self.now_ms(), Instant::now(), &mut out);
                self.metrics.queue_length.set(core.queue.len() as i64);
            }
        }
        self.send_all(out);
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
            self.shared
                .metrics
                .queue_length
                .set(core.queue.len() as i64);
        }
    }
}

/// A held backend or provider slot; dropping it frees the slot and lets the queue head in.
pub struct Lease {
    shared: Arc<Shared>,
    pub dest: Dest,
    pub bearer: Option<Bearer>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("dest", &self.dest).finish()
    }
}

impl Lease {
    fn new(shared: Arc<Shared>, dest: Dest, bearer: Option<Bearer>) -> Self {
        let lease = Self {
            shared,
            dest,
            bearer,
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
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.metrics().in_flight.dec();
        self.shared.release(&self.dest);
    }
}
