//! Pure admission: where one request goes — a local engine, a burst provider, the queue, or a
//! 503 — given the loads, the burst policy, the budget and the breakers. The router and the
//! simulator both call [`admit`]. The rules for retries live here too: an engine or provider
//! a retry failed on looks unavailable to it ([`BackendLoad::excluded`],
//! [`ProviderLoad::excluded`]), an engine set aside after a failed connection looks full unless
//! every engine is ([`pick_local`]), and [`QueuePass`] says who in the queue may go where.

use crate::api::BurstMode;

/// One local engine's load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendLoad {
    /// Requests this router has outstanding on it.
    pub outstanding: u32,
    /// This router's cap on it: `engine.maxConcurrency`, or what its peers leave it. Never
    /// exceeded.
    pub limit: u32,
    /// What the routers' shared view leaves this router (at least `limit`): a slot between
    /// `limit` and `room` comes with the peers' next acknowledgement (`router::peers`), so a
    /// request waits for it rather than spilling.
    pub room: u32,
    /// Given no new requests for a while after a connection to it failed before any answer:
    /// least-outstanding would otherwise send it every request first (a dead engine is never
    /// busy). Ignored when every engine is set aside: a failure seen on all of them must not
    /// hold every request back.
    pub aside: bool,
    /// Not for this request: a retry that failed on it, or a waiter behind a retry that was let
    /// by (see [`QueuePass`]).
    pub excluded: bool,
    /// Of the revision the request is meant for (during a rollout): such engines go first,
    /// others take it only when none of them has room, so a rollout never costs capacity.
    pub preferred: bool,
}

/// One provider's load and health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProviderLoad {
    pub in_flight: u32,
    pub max_concurrency: u32,
    /// The breaker lets a request through (closed, or a half-open probe).
    pub breaker_allows: bool,
    /// Its API key file is readable and not empty.
    pub has_key: bool,
    /// Not for this request: a retry that failed on it.
    pub excluded: bool,
}

/// Everything admission looks at.
#[derive(Clone, Copy, Debug)]
pub struct AdmissionInput<'a> {
    pub backends: &'a [BackendLoad],
    /// In priority order.
    pub providers: &'a [ProviderLoad],
    pub mode: BurstMode,
    /// The controller's published state (InferenceService status `CapacityExhausted`).
    pub capacity_exhausted: bool,
    /// Both budget caps (requests per minute, spend per hour) have room.
    pub budget_allows: bool,
    /// Requests waiting in this router's queue that go before this one (higher priority, or
    /// the same and earlier): a local slot goes to them first.
    pub queued: u32,
    /// Requests waiting in the queue that count against its limit: all of them for a new
    /// request, whatever their class; for a retry, those ahead of it.
    pub queue_len: u32,
    pub queue_limit: u32,
    /// How long this request has waited so far.
    pub waited_ms: u64,
    /// `burst.maxQueueWaitMilliseconds`: wait this long for a local slot before spilling.
    pub max_queue_wait_ms: u64,
    /// `router.queueTimeoutSeconds` in milliseconds: after this, give up with a 503.
    pub queue_timeout_ms: u64,
    /// Whether this request is already in the queue (re-evaluated) or new.
    pub in_queue: bool,
}

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Forward to local backend `index`.
    Local(usize),
    /// Forward to provider `index`.
    Provider(usize),
    /// Wait (or keep waiting) in the FIFO for a local slot.
    Queue,
    /// Answer 503 with Retry-After.
    Reject(RejectReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    QueueFull,
    QueueTimeout,
    /// The router's drain ran out while the request waited.
    ShuttingDown,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::QueueFull => "queue_full",
            RejectReason::QueueTimeout => "queue_timeout",
            RejectReason::ShuttingDown => "shutting_down",
        }
    }
}

/// The backends a request may use: neither excluded nor set aside (unless every one is).
fn usable(backends: &[BackendLoad]) -> impl Iterator<Item = (usize, &BackendLoad)> {
    let all_aside = backends.iter().all(|b| b.aside);
    backends
        .iter()
        .enumerate()
        .filter(move |(_, b)| !b.excluded && (all_aside || !b.aside))
}

/// The local backend with the fewest outstanding requests that is below its limit, neither
/// excluded nor set aside, a preferred one first (ties: the lowest index, so the choice is
/// deterministic).
pub fn pick_local(backends: &[BackendLoad]) -> Option<usize> {
    usable(backends)
        .filter(|(_, b)| b.outstanding < b.limit)
        .min_by_key(|(i, b)| (!b.preferred, b.outstanding, *i))
        .map(|(i, _)| i)
}

/// Whether the routers' shared view shows a slot free on a backend this request may use.
pub fn local_room(backends: &[BackendLoad]) -> bool {
    usable(backends).any(|(_, b)| b.outstanding < b.room.max(b.limit))
}

/// The first provider, in priority order, with room, a key, a breaker that lets it through,
/// and not excluded.
pub fn pick_provider(providers: &[ProviderLoad]) -> Option<usize> {
    providers.iter().position(|p| {
        p.breaker_allows && p.has_key && !p.excluded && p.in_flight < p.max_concurrency
    })
}

/// Whether the burst policy allows spilling at all right now.
pub fn burst_allowed(mode: BurstMode, capacity_exhausted: bool) -> bool {
    match mode {
        BurstMode::Saturated => true,
        BurstMode::CapacityExhausted => capacity_exhausted,
        BurstMode::Never => false,
    }
}

/// The first rule of [`admit`] on its own: a local engine with room, unless the request would
/// overtake requests already waiting (FIFO). The router takes this path without its lock.
pub fn local_first(backends: &[BackendLoad], queued: u32, in_queue: bool) -> Option<usize> {
    if in_queue || queued == 0 {
        pick_local(backends)
    } else {
        None
    }
}

/// Decides for one request. A request only reaches a provider when every local engine is at
/// its limit — spill-over on exhaustion, before anything fails.
pub fn admit(input: &AdmissionInput<'_>) -> Admission {
    if let Some(i) = local_first(input.backends, input.queued, input.in_queue) {
        return Admission::Local(i);
    }
    // A slot the shared view shows free comes with the peers' next acknowledgement: wait.
    if input.waited_ms >= input.max_queue_wait_ms
        && !local_room(input.backends)
        && burst_allowed(input.mode, input.capacity_exhausted)
        && input.budget_allows
        && let Some(p) = pick_provider(input.providers)
    {
        return Admission::Provider(p);
    }
    if input.in_queue {
        if input.waited_ms >= input.queue_timeout_ms {
            return Admission::Reject(RejectReason::QueueTimeout);
        }
        return Admission::Queue;
    }
    if input.queue_len >= input.queue_limit {
        return Admission::Reject(RejectReason::QueueFull);
    }
    Admission::Queue
}

/// One pass over the queue, head first (nobody behind a waiter moves first). The pass stops at
/// the first waiter that must go on waiting, except for one that waits for a reason of its own:
/// a retry kept from the providers it failed on, a request class kept from some providers, or
/// a spill wait not yet over while someone behind it (of a lower priority) has waited longer.
/// It lets those behind it by to what it may not take yet. Once one is let by, those behind it
/// may take only a provider: a local slot freed meanwhile (taken without the lock, see
/// `router::fast`) is the skipped waiter's, at the pass its release brings.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueuePass {
    let_by: bool,
    /// `maxQueueWaitMilliseconds`.
    spill_wait_ms: u64,
    /// Some waiter has waited that long already.
    someone_may_spill: bool,
}

impl QueuePass {
    /// A pass over a queue whose longest waiter has waited `oldest_waited_ms`, with a spill
    /// wait of `spill_wait_ms`.
    pub fn new(spill_wait_ms: u64, oldest_waited_ms: u64) -> Self {
        Self {
            let_by: false,
            spill_wait_ms,
            someone_may_spill: oldest_waited_ms >= spill_wait_ms,
        }
    }

    /// Whether the waiter about to be decided may take a local engine.
    pub fn locals_open(&self) -> bool {
        !self.let_by
    }

    /// The waiter just decided, after `waited_ms`, must go on waiting: whether the pass goes on
    /// to the one behind it. `kept_from_providers`: a retry or its class keeps it from some
    /// provider (see [`QueuePass`]).
    pub fn waits(&mut self, waited_ms: u64, kept_from_providers: bool) -> bool {
        let own_reason =
            kept_from_providers || (self.someone_may_spill && waited_ms < self.spill_wait_ms);
        self.let_by |= own_reason;
        own_reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(outstanding: u32, limit: u32) -> BackendLoad {
        BackendLoad {
            outstanding,
            limit,
            ..Default::default()
        }
    }
    fn p(in_flight: u32, max: u32, ok: bool) -> ProviderLoad {
        ProviderLoad {
            in_flight,
            max_concurrency: max,
            breaker_allows: ok,
            has_key: true,
            excluded: false,
        }
    }

    fn input<'a>(backends: &'a [BackendLoad], providers: &'a [ProviderLoad]) -> AdmissionInput<'a> {
        AdmissionInput {
            backends,
            providers,
            mode: BurstMode::Saturated,
            capacity_exhausted: false,
            budget_allows: true,
            queued: 0,
            queue_len: 0,
            queue_limit: 10,
            waited_ms: 0,
            max_queue_wait_ms: 0,
            queue_timeout_ms: 30_000,
            in_queue: false,
        }
    }

    #[test]
    fn least_outstanding_below_the_limit() {
        assert_eq!(pick_local(&[b(3, 4), b(1, 4), b(1, 4)]), Some(1));
        assert_eq!(pick_local(&[b(4, 4), b(2, 2)]), None);
        assert_eq!(pick_local(&[b(4, 4), b(3, 8)]), Some(1));
        assert_eq!(pick_local(&[]), None);
    }

    #[test]
    fn the_revision_a_request_is_meant_for_goes_first_while_it_has_room() {
        let pref = |outstanding, limit| BackendLoad {
            preferred: true,
            ..b(outstanding, limit)
        };
        // Busier, but of its revision.
        assert_eq!(pick_local(&[b(0, 4), pref(3, 4)]), Some(1));
        // Full: another revision's engine takes it rather than a provider or the queue.
        assert_eq!(pick_local(&[b(2, 4), pref(4, 4)]), Some(0));
    }

    #[test]
    fn local_first_then_spill_only_when_every_engine_is_full() {
        let providers = [p(0, 2, true)];
        assert_eq!(admit(&input(&[b(3, 4)], &providers)), Admission::Local(0));
        assert_eq!(
            admit(&input(&[b(4, 4)], &providers)),
            Admission::Provider(0)
        );
        // No engine at all (cold start): spill.
        assert_eq!(admit(&input(&[], &providers)), Admission::Provider(0));
    }

    #[test]
    fn providers_in_priority_order_skipping_full_and_open_ones() {
        let full = [b(1, 1)];
        assert_eq!(
            admit(&input(&full, &[p(2, 2, true), p(0, 2, true)])),
            Admission::Provider(1)
        );
        assert_eq!(
            admit(&input(&full, &[p(0, 2, false), p(0, 2, true)])),
            Admission::Provider(1)
        );
        assert_eq!(
            admit(&input(&full, &[p(0, 2, false), p(5, 5, true)])),
            Admission::Queue
        );
    }

    #[test]
    fn burst_modes() {
        let full = [b(1, 1)];
        let prov = [p(0, 2, true)];
        let mut i = input(&full, &prov);
        i.mode = BurstMode::Never;
        assert_eq!(admit(&i), Admission::Queue);
        i.mode = BurstMode::CapacityExhausted;
        assert_eq!(admit(&i), Admission::Queue);
        i.capacity_exhausted = true;
        assert_eq!(admit(&i), Admission::Provider(0));
    }

    #[test]
    fn budget_exhausted_means_no_spill() {
        let full = [b(1, 1)];
        let prov = [p(0, 2, true)];
        let mut i = input(&full, &prov);
        i.budget_allows = false;
        assert_eq!(admit(&i), Admission::Queue);
    }

    #[test]
    fn queue_wait_before_spilling_and_timeouts() {
        let full = [b(1, 1)];
        let prov = [p(0, 2, true)];
        let mut i = input(&full, &prov);
        i.max_queue_wait_ms = 500;
        assert_eq!(admit(&i), Admission::Queue);
        i.in_queue = true;
        i.queued = 1;
        i.waited_ms = 499;
        assert_eq!(admit(&i), Admission::Queue);
        i.waited_ms = 500;
        assert_eq!(admit(&i), Admission::Provider(0));
        i.mode = BurstMode::Never;
        i.waited_ms = 30_000;
        assert_eq!(admit(&i), Admission::Reject(RejectReason::QueueTimeout));
    }

    #[test]
    fn full_queue_rejects_new_requests_and_new_requests_do_not_overtake() {
        let room = [b(0, 1)];
        let mut i = input(&room, &[]);
        i.queued = 3;
        // A slot is free but 3 requests wait: the newcomer queues behind them.
        assert_eq!(admit(&i), Admission::Queue);
        i.queued = 10;
        i.queue_len = 10;
        let full = [b(1, 1)];
        i.backends = &full;
        assert_eq!(admit(&i), Admission::Reject(RejectReason::QueueFull));
        // Of a higher priority, nobody is ahead of it; the limit holds all the same.
        i.queued = 0;
        assert_eq!(admit(&i), Admission::Reject(RejectReason::QueueFull));
        i.queue_len = 9;
        assert_eq!(admit(&i), Admission::Queue);
        // The head of the queue takes a freed slot.
        i.backends = &room;
        i.in_queue = true;
        assert_eq!(admit(&i), Admission::Local(0));
    }

    /// A slot the routers' shared view shows free, beyond this router's cap for now, is waited
    /// for: no spill, however long the request has waited already.
    #[test]
    fn a_slot_the_shared_view_shows_free_is_waited_for_not_spilled_past() {
        let providers = [p(0, 2, true)];
        let held = |outstanding, room, excluded| BackendLoad {
            outstanding,
            limit: 2,
            room,
            excluded,
            ..Default::default()
        };
        let cases: &[(BackendLoad, Admission)] = &[
            (held(2, 4, false), Admission::Queue),
            (held(1, 4, false), Admission::Local(0)),
            // The view is full too: spill.
            (held(2, 2, false), Admission::Provider(0)),
            // A retry kept from that engine does not wait for it.
            (held(2, 4, true), Admission::Provider(0)),
        ];
        for (load, want) in cases {
            let loads = [*load];
            let mut i = input(&loads, &providers);
            i.in_queue = true;
            i.waited_ms = 10_000;
            assert_eq!(admit(&i), *want, "{load:?}");
        }
    }

    /// Engines as (outstanding of 4, set aside, excluded), and the one chosen.
    #[test]
    fn set_aside_and_excluded_engines_look_full() {
        let e = |outstanding, aside, excluded| BackendLoad {
            outstanding,
            limit: 4,
            room: 4,
            aside,
            excluded,
            preferred: false,
        };
        let table: &[(&[BackendLoad], Option<usize>)] = &[
            (&[e(0, true, false), e(3, false, false)], Some(1)),
            (&[e(0, false, true), e(3, false, false)], Some(1)),
            (&[e(0, true, false), e(4, false, false)], None),
            // Every engine set aside: none is.
            (&[e(2, true, false), e(1, true, false)], Some(1)),
            // ... but an excluded one stays excluded.
            (&[e(0, true, true), e(1, true, false)], Some(1)),
            (&[e(0, false, true), e(0, false, true)], None),
        ];
        for (loads, want) in table {
            assert_eq!(pick_local(loads), *want, "{loads:?}");
        }
    }

    /// Providers as (breaker allows, has a key, excluded), all with room, and the one chosen.
    #[test]
    fn providers_without_a_key_or_excluded_are_passed_over() {
        let q = |breaker_allows, has_key, excluded| ProviderLoad {
            in_flight: 0,
            max_concurrency: 1,
            breaker_allows,
            has_key,
            excluded,
        };
        let table: &[(&[ProviderLoad], Option<usize>)] = &[
            (&[q(true, true, false)], Some(0)),
            (&[q(true, false, false), q(true, true, false)], Some(1)),
            (&[q(true, true, true), q(true, true, false)], Some(1)),
            (&[q(false, true, false), q(true, true, true)], None),
        ];
        for (loads, want) in table {
            assert_eq!(pick_provider(loads), *want, "{loads:?}");
        }
    }

    /// What a waiter could take if allowed: a local slot, a provider, or nothing.
    #[derive(Clone, Copy, Debug)]
    enum Could {
        Local,
        Provider,
        Nothing,
    }

    /// A waiter: whether it is a retry kept from a provider, and what it could take.
    type Waiter = (bool, Could);

    /// Runs one pass over `waiters`; returns who went, by position.
    fn pass(waiters: &[Waiter]) -> Vec<usize> {
        let mut pass = QueuePass::default();
        let mut went = Vec::new();
        for (i, &(retry, could)) in waiters.iter().enumerate() {
            let goes = match could {
                Could::Local => pass.locals_open(),
                Could::Provider => true,
                Could::Nothing => false,
            };
            if goes {
                went.push(i);
            } else if !pass.waits(0, retry) {
                break;
            }
        }
        went
    }

    #[test]
    fn a_queue_pass_lets_others_by_a_retry_only_to_providers() {
        use Could::*;
        let table: &[(&[Waiter], &[usize])] = &[
            // FIFO: one that waits holds back everyone behind it.
            (&[(false, Local), (false, Local)], &[0, 1]),
            (&[(false, Nothing), (false, Local)], &[]),
            (&[(false, Nothing), (false, Provider)], &[]),
            // A retry that waits lets those behind it by, to providers only.
            (&[(true, Nothing), (false, Provider)], &[1]),
            (&[(true, Nothing), (false, Local), (false, Provider)], &[]),
            (&[(true, Nothing), (true, Local), (false, Provider)], &[2]),
            // A retry that can go goes, and lets nobody by.
            (&[(true, Local), (false, Local)], &[0, 1]),
        ];
        for (waiters, want) in table {
            assert_eq!(pass(waiters), *want, "{waiters:?}");
        }
    }

    /// A waiter still within its spill wait lets those behind it by only while someone has
    /// waited past it (with priorities, the head need not be the longest waiter).
    #[test]
    fn a_waiter_within_its_spill_wait_lets_others_by_only_when_one_may_spill() {
        // (spill wait, longest wait in the queue, this waiter's wait, kept) → goes on.
        let table = [
            (1000, 1500, 200, false, true),
            (1000, 900, 200, false, false),
            (1000, 1500, 1200, false, false),
            (0, 0, 0, false, false),
            (1000, 900, 200, true, true),
        ];
        for (spill, oldest, waited, kept, want) in table {
            let mut pass = QueuePass::new(spill, oldest);
            assert_eq!(
                pass.waits(waited, kept),
                want,
                "{spill} {oldest} {waited} {kept}"
            );
            assert_eq!(pass.locals_open(), !want);
        }
    }
}
