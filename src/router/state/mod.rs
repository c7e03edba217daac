//! The router's live state: engines, providers (load, breaker, key), budget and the FIFO
//! queue behind one lock ([`routing`]), with the lock-free fast path in front of it
//! ([`crate::router::fast`]). Requests get a [`Ticket`]: a [`Lease`] on a destination, or a 503.

mod backends;
mod lease;
mod routing;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

pub use backends::{BreakerSettings, Dest, Excluded, Provider};
pub use lease::{Lease, Ticket};

use backends::{
    budget_limits, carry_over_providers, provider_slots, release_provider, replace_backends,
};
use lease::QueueGuard;
use routing::{Ask, Decided, Routing, Waiting};

use super::admission::RejectReason;
use super::breaker::BreakerState;
use super::budget::{BudgetTracker, cost};
use super::classes::{Class, Classes};
use super::config::RouterConfig;
use super::fast::{Backend, LocalPath, Mirror, View};
use super::keys::{KeyState, read_key};
use super::metrics::{
    self, DestMetrics, ProviderLabel, RevisionMetrics, RouterMetrics, TokenLabels,
};
use super::peers::{Ledger, Report};
use super::revisions::{self, Listed, Route};
use super::usage::Usage;
use crate::api::{BurstMode, ProviderEndpoint};
use crate::clock::Millis;

/// A peer's address as the ledger keys it: an IPv4 address that reached an IPv6 socket reads
/// as IPv4, so a listed address and a report's source compare equal.
pub fn peer_key(addr: SocketAddr) -> String {
    SocketAddr::new(addr.ip().to_canonical(), addr.port()).to_string()
}

/// How long a local engine whose connection failed before any answer gets no new requests:
/// least-outstanding would otherwise send it every request first (a dead engine is never busy)
/// until its EndpointSlice drops it.
pub const SET_ASIDE_MS: Millis = 2_000;

/// How often a waiter past `maxQueueWaitMilliseconds` looks again for a provider (a breaker
/// half-opening or the budget window sliding wakes nobody by itself).
const SPILL_RECHECK: Duration = Duration::from_millis(200);

/// Everything the request handlers share.
pub struct RouterState {
    fast: LocalPath,
    epoch: Instant,
    routing: Mutex<Routing>,
    pub metrics: RouterMetrics,
    local_metrics: DestMetrics,
    breaker: BreakerSettings,
    /// False while the engine endpoints have not been listed yet (in a cluster): the router is
    /// not ready, since an empty backend list would send everything to providers or the queue.
    synced: AtomicBool,
    /// False until the service's status (the revisions and their weights) has been read, in a
    /// cluster: before, every engine would look like the first revision's.
    routes_known: AtomicBool,
    /// Shutdown has begun: readiness fails while requests are still served.
    closing: AtomicBool,
    /// Has peers listed: a change of its own counts wakes the exchange.
    peered: AtomicBool,
    /// Wakes the exchange to report (see `router::exchange`).
    report_due: Notify,
}

impl std::fmt::Debug for RouterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterState")
    }
}

impl RouterState {
    pub fn new(config: RouterConfig, backends: Vec<String>, breaker: BreakerSettings) -> Arc<Self> {
        let (rpm, spend) = budget_limits(&config);
        let metrics = RouterMetrics::default();
        let providers = provider_slots(&config, breaker, &metrics);
        let state = Arc::new(Self {
            fast: LocalPath::default(),
            epoch: Instant::now(),
            routing: Mutex::new(Routing::new(
                config,
                providers,
                BudgetTracker::new(rpm, spend),
                metrics.queue_length.clone(),
                metrics.spilled_with_local_room.clone(),
            )),
            local_metrics: metrics.for_destination(metrics::LOCAL),
            metrics,
            breaker,
            synced: AtomicBool::new(true),
            routes_known: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            peered: AtomicBool::new(false),
            report_due: Notify::new(),
        });
        state.set_backends(backends);
        state
    }

    /// A panic elsewhere must not wedge routing; the routing state stays consistent per call.
    fn lock(&self) -> MutexGuard<'_, Routing> {
        self.routing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called under the lock whenever the queue changes.
    fn queue_changed(&self, routing: &Routing) {
        self.fast.queue_changed(routing.queue.len());
    }

    /// Copies what every request reads into a serving thread's view (see `router::fast`).
    fn copy_view(&self, v: &mut View) {
        let routing = self.lock();
        v.backends.clone_from(&routing.backends);
        v.routes.clone_from(&routing.routes);
        v.mirrors.clone_from(&routing.mirrors);
        v.shadow_percent = routing.shadow_percent;
        v.classes = Some(routing.classes.clone());
        v.providers.clear();
        v.providers.extend(
            routing
                .providers
                .iter()
                .map(|p| (p.p.name.clone(), p.p.endpoints.clone())),
        );
    }

    /// A local slot without the lock, when nobody waits and an engine has room (one of
    /// `revision`'s first).
    fn take_local(&self, revision: Option<&str>) -> Option<Arc<Backend>> {
        self.fast
            .take(|v| self.copy_view(v), || self.now_ms(), revision)
    }

    /// Whether this request is mirrored to a revision in its shadow stage: a slot taken on one
    /// of its engines, or `Skipped` when none has one free (a mirror never waits).
    pub fn mirror(&self) -> Mirror {
        self.fast.mirror(|v| self.copy_view(v), || self.now_ms())
    }

    /// The request class a request's `x-spillway-class` header names (the default class when
    /// it names none), or the message for the client when it names none of them.
    pub fn classify(&self, header: Option<&[u8]>) -> Result<Class, String> {
        self.fast.classify(|v| self.copy_view(v), header)
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
        let configured = provider_slots(&config, self.breaker, &self.metrics);
        {
            let mut routing = self.lock();
            let r = &mut *routing;
            carry_over_providers(&mut r.providers, &mut r.retired, configured);
            r.budget.max_requests_per_minute = rpm;
            r.budget.max_spend_per_hour = spend;
            r.set_classes(Classes::new(config.request_classes.as_ref()));
            if let (Some(l), Some(p)) = (&mut r.peers, &config.peers) {
                l.set_routers(p.replicas, p.stale_after_milliseconds as Millis);
            }
            r.config = Arc::new(config);
            r.refresh_caps(self.now_ms());
            self.fast.backends_changed();
        }
        self.pump();
    }

    /// Replaces the set of ready local engines (`host:port`), keeping counts of those that stay.
    pub fn set_backends(self: &Arc<Self>, addrs: Vec<String>) {
        let listed = Listed {
            by_service: BTreeMap::from([(String::new(), addrs)]),
            pods: BTreeMap::new(),
        };
        self.set_engine_addrs(String::new(), listed);
    }

    /// Replaces the ready engine addresses (`broad`: the Service that selects every engine
    /// pod), keeping counts of those that stay.
    pub fn set_engine_addrs(self: &Arc<Self>, broad: String, listed: Listed) {
        {
            let mut routing = self.lock();
            routing.broad = broad;
            routing.engine_addrs = listed;
            self.engines_changed(&mut routing);
        }
        self.pump();
    }

    /// The revisions taking requests and their weights, as the controller publishes them.
    pub fn set_routes(self: &Arc<Self>, routes: Vec<Route>) {
        {
            let mut routing = self.lock();
            if routing.routes == routes {
                return;
            }
            tracing::info!(?routes, "revision weights changed");
            routing.revision_metrics.retain(|name, _| {
                let listed = routes.iter().any(|r| r.name == *name);
                if !listed {
                    self.metrics.forget_revision(name);
                }
                listed
            });
            routing.routes = routes;
            self.engines_changed(&mut routing);
        }
        self.pump();
    }

    /// A revision's metric handles, made once.
    fn revision_metrics(&self, r: &mut Routing, name: Arc<str>) -> Arc<RevisionMetrics> {
        r.revision_metrics
            .entry(name.clone())
            .or_insert_with(|| Arc::new(self.metrics.for_revision(name)))
            .clone()
    }

    /// Under the lock: the engine list again from the addresses and the revisions.
    fn engines_changed(&self, routing: &mut Routing) {
        let r = routing;
        let listed = revisions::engines(&r.engine_addrs, &r.broad, &r.routes);
        let tagged = listed
            .into_iter()
            .map(|(addr, rev)| (addr, rev.map(|name| self.revision_metrics(r, name))))
            .collect();
        // One pool for every list: an engine that moves between them (a shadowed candidate
        // that starts taking requests) keeps its count, so its cap holds.
        let mut old = std::mem::take(&mut r.backends);
        old.append(&mut r.draining);
        old.append(&mut r.mirrors);
        let (mirrors, percent) = match revisions::mirrors(&r.engine_addrs, &r.broad, &r.routes) {
            Some((name, percent, addrs)) => {
                let m = self.revision_metrics(r, name.clone());
                let list = addrs
                    .into_iter()
                    .map(|a| {
                        let same = |b: &Arc<Backend>| {
                            b.addr == a && b.revision.as_ref().is_some_and(|x| x.name == name)
                        };
                        match old.iter().position(same) {
                            Some(i) => old.swap_remove(i),
                            None => Arc::new(Backend::of_revision(a, Some(m.clone()))),
                        }
                    })
                    .collect();
                (list, percent)
            }
            None => (Vec::new(), 0),
        };
        r.mirrors = mirrors;
        r.shadow_percent = percent;
        let (next, draining) = replace_backends(old, tagged);
        self.metrics.backends.set(next.len() as i64);
        r.backends = next;
        r.draining = draining;
        r.refresh_caps(self.now_ms());
        self.fast.backends_changed();
    }

    /// Whether the backend list is known (always, standalone; after the first list, in a cluster).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed) && self.routes_known.load(Ordering::Relaxed)
    }

    /// Whether the engine endpoints have been listed (see [`Self::synced`]).
    pub fn endpoints_listed(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Whether the service's revisions have been read (see [`Self::synced`]).
    pub fn set_routes_known(&self, known: bool) {
        self.routes_known.store(known, Ordering::Relaxed);
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
            let mut routing = self.lock();
            for (name, file, key) in read {
                if let Some(s) = routing.providers.iter_mut().find(|s| s.p.name == name)
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

    /// The providers a request that may spill as `burst` (`None`: not at all) must not go to:
    /// those that do not declare its endpoint. Read without the lock.
    pub fn kept_from(&self, burst: Option<ProviderEndpoint>) -> Excluded {
        let kept = self.fast.read(
            |v| self.copy_view(v),
            |v| Excluded {
                providers: v
                    .providers
                    .iter()
                    .filter(|(_, served)| burst.is_none_or(|e| !served.contains(&e)))
                    .map(|(name, _)| name.clone())
                    .collect(),
                ..Excluded::default()
            },
        );
        Excluded {
            revision: self.fast.choose_revision(|v| self.copy_view(v)),
            ..kept
        }
    }

    /// A decision for a request that just arrived: a lease now, a 503 now, or a place in the
    /// queue until a slot frees, its spill wait passes, or it times out. It never goes to a
    /// provider in `kept_from` (see [`Self::kept_from`]).
    pub async fn acquire(self: &Arc<Self>, class: &Class, kept_from: Excluded) -> Ticket {
        if let Some(b) = self.take_local(kept_from.revision.as_deref()) {
            return Ticket::Go(Lease::new(
                self.clone(),
                Dest::Local(b),
                None,
                class.clone(),
            ));
        }
        self.enqueue(Instant::now(), kept_from, class, false).await
    }

    /// [`Self::acquire`] for a retry that found no room after its connection failed: it keeps
    /// its arrival time, so it waits in the queue ahead of later requests and its spill wait
    /// and queue timeout count from when it arrived, not from the retry; and it is never
    /// handed a destination in `excluded`.
    pub async fn requeue(
        self: &Arc<Self>,
        arrived: Instant,
        excluded: Excluded,
        class: &Class,
    ) -> Ticket {
        // A `QueuePass` lets others by such a waiter only for what it may not take: providers.
        debug_assert!(excluded.locals.is_empty());
        self.enqueue(arrived, excluded, class, true).await
    }

    /// Whether an engine or a provider outside `excluded` could take a request: otherwise a
    /// retry that queued would only wait for its timeout. With no engine listed yet (a cold
    /// start), one may come, as for a new request.
    pub fn serves_beyond(&self, excluded: &Excluded, class: &Class) -> bool {
        let routing = self.lock();
        routing.backends.is_empty()
            || routing
                .backends
                .iter()
                .any(|b| !excluded.locals.contains(&b.addr))
            || (routing.config.burst.mode != BurstMode::Never
                && routing.providers.iter().any(|p| {
                    !excluded.providers.contains(&p.p.name)
                        && routing.classes.allows(class, Some(&p.p.name))
                }))
    }

    /// Decides under the lock, or queues by `since` until a decision comes; `retry`: a request
    /// that already arrived once (see [`Self::requeue`]).
    async fn enqueue(
        self: &Arc<Self>,
        since: Instant,
        excluded: Excluded,
        class: &Class,
        retry: bool,
    ) -> Ticket {
        let mut out = Vec::new();
        let decided = {
            let mut routing = self.lock();
            let now = self.now_ms();
            // Those that go first: of a higher priority, or of its own and arrived earlier. A
            // new request counts every waiter against the queue's limit; a retry is neither
            // held back nor refused as over the limit for requests that came after it.
            let queued = routing.queue.ahead_of(since, class.priority) as u32;
            let queue_len = if retry {
                queued
            } else {
                routing.queue.len() as u32
            };
            let waited = since.elapsed().as_millis() as u64;
            let ask = Ask {
                waited_ms: waited,
                in_queue: false,
                queued,
                queue_len,
                excluded: &excluded,
                class,
                locals_open: true,
            };
            match routing.grant(now, &ask) {
                Some(d) => Ok(d),
                None if routing.refusing => Ok(Decided::Reject(RejectReason::ShuttingDown)),
                None => {
                    // Only a request that waits needs an id and a channel.
                    #[cfg(test)]
                    tests::before_queueing();
                    let id = routing.next_id;
                    routing.next_id += 1;
                    let (tx, rx) = oneshot::channel();
                    let class = class.clone();
                    routing.push(
                        id,
                        since,
                        Waiting {
                            tx,
                            excluded,
                            class,
                        },
                    );
                    self.queue_changed(&routing);
                    // A slot freed after the decision above, while the queue still looked
                    // empty, woke nobody: decide the head again now that the queue shows.
                    routing.pump(now, Instant::now(), &mut out);
                    self.queue_changed(&routing);
                    Err((id, rx))
                }
            }
        };
        self.send_all(out);
        match decided {
            Ok(d) => self.ticket(d, class.clone()),
            Err((id, rx)) => self.wait(id, since, rx, class).await,
        }
    }

    async fn wait(
        self: &Arc<Self>,
        id: u64,
        since: Instant,
        mut rx: oneshot::Receiver<Ticket>,
        class: &Class,
    ) -> Ticket {
        // Leaves the queue if the client goes away while waiting.
        let _guard = QueueGuard { state: self, id };
        loop {
            let (spill_wait, timeout, spill_possible) = {
                let routing = self.lock();
                (
                    Duration::from_millis(routing.config.burst.max_queue_wait_milliseconds),
                    Duration::from_secs(u64::from(routing.config.queue.timeout_seconds)),
                    !routing.providers.is_empty() && !class.never_burst,
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
                            let mut routing = self.lock();
                            let r = routing.remove(id).is_some();
                            self.queue_changed(&routing);
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
            let mut routing = self.lock();
            routing.refusing = true;
            while let Some(w) = routing.remove_at(0) {
                refused.push(w.item.tx);
            }
            self.queue_changed(&routing);
        }
        for tx in refused {
            let _ = tx.send(Ticket::Reject(RejectReason::ShuttingDown));
        }
    }

    /// Another destination with room now for a retry (it keeps its arrival time for the spill
    /// wait, and is not held back by later requests); `None` when nothing has room.
    pub fn retry_now(
        self: &Arc<Self>,
        arrived: Instant,
        excluded: &Excluded,
        class: &Class,
    ) -> Option<Lease> {
        let d = {
            let mut routing = self.lock();
            let queued = routing.queue.len() as u32;
            let ask = Ask {
                waited_ms: arrived.elapsed().as_millis() as u64,
                in_queue: true,
                queued,
                queue_len: queued,
                excluded,
                class,
                locals_open: true,
            };
            routing.grant(self.now_ms(), &ask)
        };
        match d {
            Some(Decided::Go(dest, key)) => {
                Some(Lease::new(self.clone(), dest, key, class.clone()))
            }
            _ => None,
        }
    }

    /// A connection to a local engine failed before any answer: it gets no new requests for
    /// `SET_ASIDE_MS` (requests already on it finish or fail on their own). Whether that takes
    /// effect: not when every engine is set aside.
    pub fn set_aside(self: &Arc<Self>, b: &Backend) -> bool {
        let now = self.now_ms();
        let before = b.set_aside_until(now + SET_ASIDE_MS);
        if before <= now {
            self.metrics.engine_set_asides.inc();
        }
        // Its return frees no slot, so nothing else would hand it to the queue.
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(SET_ASIDE_MS as u64 + 1)).await;
            if let Some(state) = weak.upgrade() {
                state.pump();
            }
        });
        !self.lock().backends.iter().all(|b| b.aside(|| now))
    }

    /// Feeds a provider's breaker with the result of a request sent at `sent` (its lease's
    /// `sent_ms`): `ok` is false for 5xx, 429, 401, 403, timeouts, connection errors and
    /// answers cut off mid-way.
    pub fn provider_result(&self, name: &str, ok: bool, sent: Millis) {
        let now = self.now_ms();
        let mut routing = self.lock();
        if let Some(s) = routing.providers.iter_mut().find(|s| s.p.name == name) {
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
        self.counts_changed();
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

    fn ticket(self: &Arc<Self>, d: Decided, class: Class) -> Ticket {
        match d {
            Decided::Go(dest, key) => Ticket::Go(Lease::new(self.clone(), dest, key, class)),
            Decided::Reject(r) => Ticket::Reject(r),
        }
    }

    /// Lets queued requests go where they now can.
    fn pump(self: &Arc<Self>) {
        let mut out = Vec::new();
        {
            let mut routing = self.lock();
            if routing.queue.is_empty() {
                return;
            }
            routing.pump(self.now_ms(), Instant::now(), &mut out);
            self.queue_changed(&routing);
        }
        self.send_all(out);
    }

    /// Outside the lock: a waiter that went away drops its lease here, which takes the lock.
    fn send_all(self: &Arc<Self>, out: Vec<(oneshot::Sender<Ticket>, Decided, Class)>) {
        for (tx, d, class) in out {
            let _ = tx.send(self.ticket(d, class));
        }
    }

    fn release(self: &Arc<Self>, dest: &Dest) {
        match dest {
            Dest::Local(b) => {
                let waiting = self.fast.release(b);
                // After the count went down, so the report the exchange makes shows it.
                self.counts_changed();
                if waiting {
                    self.pump();
                }
            }
            Dest::Provider(p) => {
                let mut routing = self.lock();
                let r = &mut *routing;
                release_provider(&mut r.providers, &mut r.retired, &p.name);
                drop(routing);
                self.counts_changed();
                self.pump();
            }
        }
    }

    /// Shares every limit with the service's other routers from now on (see
    /// `router::exchange`); until it hears them, each counts as using its even share.
    pub fn join_peers(self: &Arc<Self>, ledger: Ledger) {
        {
            let mut routing = self.lock();
            routing.peers = Some(ledger);
            routing.refresh_caps(self.now_ms());
        }
        self.pump();
    }

    /// The peers' addresses now (`ip:port`; written as reports' sources read, see
    /// [`peer_key`]).
    pub fn set_peers(self: &Arc<Self>, addrs: &[String]) {
        let addrs: Vec<String> = addrs
            .iter()
            .filter_map(|a| a.parse().ok().map(peer_key))
            .collect();
        {
            let mut routing = self.lock();
            let now = self.now_ms();
            let r = &mut *routing;
            let Some(l) = &mut r.peers else { return };
            l.set_peers(&addrs);
            r.refresh_caps(now);
            // Alone, a request need not wake the exchange.
            self.peered.store(!addrs.is_empty(), Ordering::Relaxed);
        }
        self.pump();
    }

    /// This router's report to its peers now, and where it goes.
    pub fn peer_report(&self) -> Option<(Report, Vec<String>)> {
        let mut routing = self.lock();
        let now = self.now_ms();
        let counts = routing.counts(now);
        let r = &mut *routing;
        let l = r.peers.as_mut()?;
        let report = l.report(counts, now);
        let to = l.peer_addrs().map(str::to_string).collect();
        // A lower count sent lowers what acknowledgements vouch for: the caps follow at once.
        r.refresh_caps(now);
        // A slot taken without the lock since the counts were read goes out next time.
        if r.counts(now) != report.counts {
            self.report_due.notify_one();
        }
        Some((report, to))
    }

    /// Takes in a report from `from` (see `Ledger::hear`): whether to answer it soon.
    pub fn peer_heard(self: &Arc<Self>, from: SocketAddr, report: Report) -> bool {
        let moved = {
            let mut routing = self.lock();
            let now = self.now_ms();
            let r = &mut *routing;
            let Some(l) = &mut r.peers else { return false };
            let moved = l.hear(&peer_key(from), report, now);
            if moved.is_some() {
                r.refresh_caps(now);
            }
            moved == Some(true)
        };
        self.pump();
        moved
    }

    /// On the exchange's heartbeat: caps follow peers falling silent, and their report ages
    /// are published.
    pub fn peer_tick(self: &Arc<Self>) {
        let ages = {
            let mut routing = self.lock();
            let now = self.now_ms();
            routing.refresh_caps(now);
            routing.peers.as_ref().map(|l| l.ages(now))
        };
        if let Some(ages) = ages {
            self.metrics.set_peer_ages(&ages);
        }
        self.pump();
    }

    /// Whether this router knows its listed peers count it (see `Ledger::settled`): until
    /// then it is not ready.
    pub fn peers_settled(&self) -> bool {
        let now = self.now_ms();
        self.lock().peers.as_ref().is_none_or(|l| l.settled(now))
    }

    /// What the exchange waits on between reports.
    pub fn report_due(&self) -> &Notify {
        &self.report_due
    }

    /// This router's counts changed: its peers are told soon.
    fn counts_changed(&self) {
        if self.peered.load(Ordering::Relaxed) {
            self.report_due.notify_one();
        }
    }

    /// Requests waiting in the queue.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::cell::RefCell;
    use std::sync::atomic::AtomicU32;

    /// The one class of a service that declares none.
    fn any() -> Class {
        Classes::default().resolve(None).unwrap()
    }

    fn state(limit: u32, backends: &[&str]) -> Arc<RouterState> {
        RouterState::new(
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
    fn now(s: &Arc<RouterState>) -> Option<Lease> {
        match s.acquire(&any(), Excluded::default()).now_or_never()? {
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
        let s = state(3, &["a:1"]);
        let _held = now(&s).expect("room");
        s.set_config(config(1));
        assert!(now(&s).is_none(), "a second request over a limit of 1");
    }

    #[tokio::test]
    async fn a_changed_backend_list_applies_to_requests_that_take_no_lock() {
        let s = state(1, &["a:1"]);
        drop(now(&s).expect("room"));
        s.set_backends(vec!["b:1".into()]);
        assert_eq!(addr(&now(&s).expect("room")), "b:1");
    }

    #[tokio::test]
    async fn a_backend_that_comes_back_keeps_its_count() {
        let s = state(1, &["a:1"]);
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
        let s = RouterState::new(with(p), vec!["a:1".into()], Default::default());
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
        let dir = crate::test_support::net::TempDir::new("replaced-key");
        let (old, new) = (dir.file("old", "sk-old"), dir.file("new", "sk-new"));
        let with = |key_file: &str| {
            RouterConfig::from_yaml(&format!(
                "burst:\n  maxQueueWaitMilliseconds: 0\n  providers: [{{name: p, \
                 url: \"http://127.0.0.1:9/v1\", model: m, apiKeyFile: \"{key_file}\"}}]"
            ))
            .unwrap()
        };
        let s = RouterState::new(with(&old), Vec::new(), Default::default());
        let stale = vec![("p".to_string(), Some(old.clone()), read_key(Some(&old)))];
        s.set_config(with(&new));
        s.apply_keys(stale);
        let l = now(&s).expect("a spill");
        let bearer = l.bearer.as_ref().expect("a key").header().clone();
        assert_eq!(bearer, "Bearer sk-new");
    }

    /// Once the drain has run out, a request that would wait is answered at once.
    #[tokio::test]
    async fn after_the_drain_nothing_more_waits() {
        let s = state(1, &["a:1"]);
        let _held = now(&s).expect("room");
        s.refuse_waiting();
        let t = s
            .acquire(&any(), Excluded::default())
            .now_or_never()
            .expect("decided at once");
        assert!(
            matches!(t, Ticket::Reject(RejectReason::ShuttingDown)),
            "{t:?}"
        );
        assert_eq!(s.queued(), 0);
    }

    #[tokio::test]
    async fn a_free_slot_goes_to_the_waiter_not_to_a_newcomer() {
        let s = state(1, &["a:1"]);
        let held = now(&s).expect("room");
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.acquire(&any(), Excluded::default()).await }
        });
        while s.queued() == 0 {
            tokio::task::yield_now().await;
        }
        // The slot frees but nobody is woken yet (the moment between a release's decrement and
        // its look at the queue): a newcomer must still not take it.
        let Dest::Local(b) = &held.dest else {
            panic!("a local lease")
        };
        b.free_slot();
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
        let s = state(1, &["a:1"]);
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
        let s = state(LIMIT, &["a:1", "b:1"]);
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
                            let t = tokio::time::timeout_at(
                                deadline.into(),
                                s.acquire(&any(), Excluded::default()),
                            )
                            .await;
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
        let routing = s.lock();
        assert!(routing.backends.iter().all(|b| b.outstanding() == 0));
    }
}
