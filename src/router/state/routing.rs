//! What the routing lock guards: config, engines, providers, budget and the FIFO queue, so
//! every decision sees one consistent picture. Every decision is [`admit`]'s, and who in the
//! queue may go where is [`QueuePass`]'s; this only gathers their input and carries out the
//! answer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::backends::{Dest, Excluded, ProviderSlot};
use super::lease::Ticket;
use crate::api::BurstMode;
use crate::clock::Millis;
use crate::router::admission::{
    Admission, AdmissionInput, BackendLoad, ProviderLoad, QueuePass, RejectReason, admit,
};
use crate::router::budget::{BudgetTracker, parse_spend};
use crate::router::classes::{Class, Classes};
use crate::router::config::{RouterConfig, SharedLimits};
use crate::router::fast::Backend;
use crate::router::keys::Bearer;
use crate::router::metrics::{ClassLabel, RevisionMetrics};
use crate::router::peers::wire::{RPM, engine_key, provider_key};
use crate::router::peers::{Counts, Ledger, Room};
use crate::router::queue::{Fifo, Waiter};
use crate::router::revisions::{Listed, Route};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// A request in the queue: where its ticket goes, and where it must not (the providers a
/// retry failed on; never engines, which are set aside instead).
pub(super) struct Waiting {
    pub tx: oneshot::Sender<Ticket>,
    pub excluded: Excluded,
    pub class: Class,
}

/// Where a granted request goes (with the provider's key), or why it is refused.
pub(super) enum Decided {
    Go(Dest, Option<Bearer>),
    Reject(RejectReason),
}

/// One request being decided.
pub(super) struct Ask<'a> {
    /// How long it has waited since it arrived.
    pub waited_ms: u64,
    /// Already in the queue (or a retry that keeps its place), rather than new.
    pub in_queue: bool,
    /// Requests waiting ahead of it.
    pub queued: u32,
    /// Requests waiting that count against the queue's limit (see `AdmissionInput`).
    pub queue_len: u32,
    pub excluded: &'a Excluded,
    pub class: &'a Class,
    /// It may take a local engine (see [`QueuePass`]).
    pub locals_open: bool,
}

pub(super) struct Routing {
    pub config: Arc<RouterConfig>,
    pub backends: Vec<Arc<Backend>>,
    /// Ready engine addresses by Service (in a cluster: every revision's Service), and the
    /// Service that selects them all (see `router::revisions`).
    pub engine_addrs: Listed,
    pub broad: String,
    /// The revisions taking requests, as the controller last published them.
    pub routes: Vec<Route>,
    /// Each revision's metric handles, made once.
    pub revision_metrics: BTreeMap<Arc<str>, Arc<RevisionMetrics>>,
    /// The engines of a revision in its shadow stage (they take mirrored requests only), and
    /// the share of requests mirrored to them.
    pub mirrors: Vec<Arc<Backend>>,
    pub shadow_percent: u32,
    /// Removed backends that something still holds (a lease, a thread's copy of the list): not
    /// chosen, but a backend that comes back keeps its count so it is not overloaded.
    pub draining: Vec<Arc<Backend>>,
    pub providers: Vec<ProviderSlot>,
    /// Providers a reload removed, by name, with requests still on them: one that comes back
    /// takes up its count again, so it is not sent more than its limit.
    pub retired: Vec<(String, u32)>,
    pub budget: BudgetTracker,
    pub queue: Fifo<Waiting>,
    pub capacity_exhausted: bool,
    /// The config's request classes.
    pub classes: Arc<Classes>,
    /// Requests waiting, by class (the router's `queue_length` metric).
    queued_by_class: Family<ClassLabel, Gauge>,
    /// The router's `spilled_with_local_room` metric.
    spilled_with_room: Counter,
    /// Queue ids; only requests that wait take one.
    pub next_id: u64,
    /// The drain has run out: nothing more may wait (see `RouterState::refuse_waiting`).
    pub refusing: bool,
    /// What this router knows of the service's other routers, when it runs with peers.
    pub peers: Option<Ledger>,
    /// This router's part of the requests-per-minute cap (all of it without peers).
    rpm_cap: Option<u32>,
    /// The spend cap this router counts against: the whole, shared, with peers.
    spend_cap: Option<f64>,
    /// What the other routers spent this hour, as far as this one counts it.
    others_spend: f64,
    scratch_b: Vec<BackendLoad>,
    scratch_p: Vec<ProviderLoad>,
}

impl Routing {
    pub fn new(
        config: RouterConfig,
        providers: Vec<ProviderSlot>,
        budget: BudgetTracker,
        queued_by_class: Family<ClassLabel, Gauge>,
        spilled_with_room: Counter,
    ) -> Self {
        let classes = Arc::new(Classes::new(config.request_classes.as_ref()));
        let routing = Self {
            queued_by_class,
            spilled_with_room,
            classes,
            config: Arc::new(config),
            backends: Vec::new(),
            engine_addrs: Listed::default(),
            broad: String::new(),
            routes: Vec::new(),
            revision_metrics: BTreeMap::new(),
            mirrors: Vec::new(),
            shadow_percent: 0,
            draining: Vec::new(),
            providers,
            retired: Vec::new(),
            budget,
            queue: Fifo::default(),
            capacity_exhausted: false,
            next_id: 0,
            refusing: false,
            peers: None,
            rpm_cap: None,
            spend_cap: None,
            others_spend: 0.0,
            scratch_b: Vec::new(),
            scratch_p: Vec::new(),
        };
        routing.show_classes();
        routing
    }

    /// Takes up the classes of a (new) config: each has its queue gauge from the start, at 0
    /// while none of its requests waits (the autoscaler reads the gauge as the router's sign of
    /// life).
    pub fn set_classes(&mut self, classes: Classes) {
        self.classes = Arc::new(classes);
        self.show_classes();
    }

    fn show_classes(&self) {
        for name in self.classes.names() {
            let _ = self.queued_by_class.get_or_create(&ClassLabel {
                class: name.to_string(),
            });
        }
    }

    /// What this router may use of a shared limit: all of it, or what its peers leave it.
    fn room(&self, key: &str, limit: u32, now: Millis) -> Room {
        match &self.peers {
            Some(l) => l.room(key, limit, now),
            None => Room {
                cap: limit,
                room: limit,
            },
        }
    }

    /// The whole of the limits the routers share, with peers (`peers.shared`, each defaulting
    /// to the top-level one); `None` alone, keeping to the top-level limits.
    fn shared(&self) -> Option<&SharedLimits> {
        self.peers.as_ref()?;
        self.config.peers.as_ref().map(|p| &p.shared)
    }

    /// An engine's limit as this router counts it: the whole with peers.
    fn engine_limit(&self) -> u32 {
        self.shared()
            .and_then(|s| s.max_concurrency_per_backend)
            .unwrap_or(self.config.max_concurrency_per_backend)
    }

    /// Sets every cap from the config and, with peers, what they leave this router. Called
    /// whenever either changes (and on the exchange's heartbeat, as peers fall silent).
    pub fn refresh_caps(&mut self, now: Millis) {
        let limit = self.engine_limit();
        for b in self
            .backends
            .iter()
            .chain(&self.draining)
            .chain(&self.mirrors)
        {
            let r = self.room(&engine_key(&b.addr), limit, now);
            b.set_limits(r.cap, r.room);
        }
        let shared = self.shared();
        let caps: Vec<u32> = self
            .providers
            .iter()
            .map(|p| {
                let whole = shared
                    .and_then(|s| s.providers.get(&p.p.name).copied())
                    .unwrap_or(p.p.max_concurrency);
                self.room(&provider_key(&p.p.name), whole, now).cap
            })
            .collect();
        let rpm = shared
            .and_then(|s| s.max_requests_per_minute)
            .or(self.budget.max_requests_per_minute);
        let spend = shared
            .and_then(|s| s.max_spend_per_hour.as_deref())
            .and_then(|s| parse_spend(s).ok())
            .or(self.budget.max_spend_per_hour);
        for (p, cap) in self.providers.iter_mut().zip(caps) {
            p.cap = cap;
        }
        self.rpm_cap = rpm.map(|m| self.room(RPM, m, now).cap);
        self.spend_cap = spend;
        self.others_spend = match (&self.peers, spend) {
            (Some(l), Some(cap)) => l.others_spend(cap, now),
            _ => 0.0,
        };
    }

    /// This router's use of every shared limit, for its report to its peers.
    pub fn counts(&mut self, now: Millis) -> Counts {
        let mut c = Counts::default();
        for b in self
            .backends
            .iter()
            .chain(&self.draining)
            .chain(&self.mirrors)
        {
            c.set(engine_key(&b.addr), b.outstanding());
        }
        for p in &self.providers {
            c.set(provider_key(&p.p.name), p.in_flight);
        }
        for (name, n) in &self.retired {
            c.set(provider_key(name), *n);
        }
        c.set(
            RPM.to_string(),
            self.budget.requests_last_minute(now) as u32,
        );
        c.spend = self.budget.spend_last_hour(now);
        c
    }

    /// Whether an engine this request may use had a slot free by the peers' last reports, at
    /// a spill (with fresh reports it waits instead: only silent peers make this happen).
    fn spill_with_room(&self, ex: &Excluded) -> bool {
        let Some(l) = &self.peers else { return false };
        let limit = self.engine_limit();
        self.backends.iter().any(|b| {
            !ex.locals.contains(&b.addr)
                && b.outstanding() + l.reported(&engine_key(&b.addr)) < limit
        })
    }

    fn decide(&mut self, now: Millis, ask: &Ask<'_>) -> Admission {
        let mut bl = std::mem::take(&mut self.scratch_b);
        let mut pl = std::mem::take(&mut self.scratch_p);
        bl.clear();
        pl.clear();
        let (ex, class) = (ask.excluded, ask.class);
        bl.extend(self.backends.iter().map(|b| {
            let excluded = !ask.locals_open || ex.locals.contains(&b.addr);
            b.load(|| now, excluded, ex.revision.as_deref())
        }));
        pl.extend(self.providers.iter().map(|p| ProviderLoad {
            in_flight: p.in_flight,
            max_concurrency: p.cap,
            breaker_allows: p.breaker.allows(now),
            has_key: p.key.usable(),
            excluded: ex.providers.contains(&p.p.name)
                || !self.classes.allows(class, Some(&p.p.name)),
        }));
        let cfg = &self.config;
        let a = admit(&AdmissionInput {
            backends: &bl,
            providers: &pl,
            // Checked here as well as per provider: a class that never bursts never waits to.
            mode: if !self.classes.allows(class, None) {
                BurstMode::Never
            } else {
                cfg.burst.mode
            },
            capacity_exhausted: self.capacity_exhausted,
            budget_allows: self.budget.allows_shared(
                now,
                self.rpm_cap,
                self.spend_cap,
                self.others_spend,
            ),
            queued: ask.queued,
            queue_len: ask.queue_len,
            queue_limit: cfg.queue.limit,
            waited_ms: ask.waited_ms,
            max_queue_wait_ms: cfg.burst.max_queue_wait_milliseconds,
            queue_timeout_ms: u64::from(cfg.queue.timeout_seconds) * 1000,
            in_queue: ask.in_queue,
        });
        self.scratch_b = bl;
        self.scratch_p = pl;
        a
    }

    /// Decides and takes the slot chosen: `None` means the request waits. A local slot taken
    /// meanwhile by a lock-free request only means deciding again on the new counts.
    pub fn grant(&mut self, now: Millis, ask: &Ask<'_>) -> Option<Decided> {
        loop {
            return match self.decide(now, ask) {
                Admission::Local(i) => {
                    let b = &self.backends[i];
                    if !b.try_take() {
                        continue;
                    }
                    Some(Decided::Go(Dest::Local(b.clone()), None))
                }
                Admission::Provider(i) => {
                    if self.spill_with_room(ask.excluded) {
                        self.spilled_with_room.inc();
                    }
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

    /// Decides the waiters in one [`QueuePass`]; those that may go leave the queue for `out`.
    pub fn pump(
        &mut self,
        now: Millis,
        at: Instant,
        out: &mut Vec<(oneshot::Sender<Ticket>, Decided, Class)>,
    ) {
        let mut i = 0;
        let oldest_waited = self
            .queue
            .oldest_since()
            .map_or(0, |s| at.saturating_duration_since(s).as_millis() as u64);
        let mut pass = QueuePass::new(self.config.burst.max_queue_wait_milliseconds, oldest_waited);
        while let Some(w) = self.queue.get_mut(i) {
            let waited_ms = at.saturating_duration_since(w.since).as_millis() as u64;
            // Taken out for the decision and put back if it waits on: no clone under the lock.
            let excluded = std::mem::take(&mut w.item.excluded);
            let class = w.item.class.clone();
            let queued = (self.queue.len() - 1) as u32;
            let ask = Ask {
                waited_ms,
                in_queue: true,
                queued,
                queue_len: queued,
                excluded: &excluded,
                class: &class,
                locals_open: pass.locals_open(),
            };
            match self.grant(now, &ask) {
                Some(d) => {
                    if let Some(w) = self.remove_at(i) {
                        out.push((w.item.tx, d, class));
                    }
                }
                None => {
                    let kept = !excluded.is_empty() || class.kept_from_providers();
                    if let Some(w) = self.queue.get_mut(i) {
                        w.item.excluded = excluded;
                    }
                    if !pass.waits(waited_ms, kept) {
                        break;
                    }
                    i += 1;
                }
            }
        }
    }

    /// Puts a request in the queue, in its place by priority and arrival.
    pub fn push(&mut self, id: u64, since: Instant, w: Waiting) {
        self.gauge(&w.class).inc();
        let priority = w.class.priority;
        self.queue.push(id, since, priority, w);
    }

    /// Takes the `i`-th waiter out of the queue.
    pub fn remove_at(&mut self, i: usize) -> Option<Waiter<Waiting>> {
        let w = self.queue.remove_at(i)?;
        self.metrics_left(&w);
        Some(w)
    }

    /// Takes waiter `id` out of the queue; `None` when it already left.
    pub fn remove(&mut self, id: u64) -> Option<Waiter<Waiting>> {
        let w = self.queue.remove(id)?;
        self.metrics_left(&w);
        Some(w)
    }

    fn metrics_left(&self, w: &Waiter<Waiting>) {
        self.gauge(&w.item.class).dec();
    }

    fn gauge(&self, class: &Class) -> Gauge {
        self.queued_by_class
            .get_or_create(&ClassLabel {
                class: class.name.clone(),
            })
            .clone()
    }
}
