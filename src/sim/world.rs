//! The simulated world: discrete events, deterministic per seed. Every scaling decision is the real
//! `autoscale::decide::decide()`, every request goes through the real `router::admission::admit()`
//! with the real budget; only the engines, the scheduler, cold starts and providers are modelled.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use serde::Serialize;

use super::oracle::{OracleInput, oracle};
use super::rollout::{
    self as replay, CANDIDATE, Candidate, Change, PREVIOUS, RolloutReport, STABLE,
};
use super::trace::Trace;
use crate::api::BurstMode;
use crate::api::{InferenceService, PolicyMode, ScalingPolicySpec};
use crate::autoscale::cost::ProviderPrice;
use crate::autoscale::decide::{Decision, History, Observed, PodSample, SignalsConfigured, decide};
use crate::autoscale::latency::Buckets;
use crate::clock::Millis;
use crate::engine_sim::faults::SplitMix64;
use crate::router::admission::{
    Admission, AdmissionInput, BackendLoad, ProviderLoad, QueuePass, RejectReason, admit,
};
use crate::router::budget::{BudgetTracker, cost, parse_spend};
use crate::router::classes::{Class, Classes};
use crate::router::metrics::{LATENCY_BUCKET_FACTOR, LATENCY_BUCKET_START, LATENCY_BUCKETS};
use crate::router::peers::wire::engine_key;
use crate::router::peers::{self, Counts, Ledger};

/// The parts of the world the simulator models, with defaults close to a real GPU service.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelParams {
    /// Mean prompt tokens per request (cost only).
    pub prompt_tokens: u32,
    /// Mean output tokens per request (each request draws uniformly from 0.5× to 1.5×).
    pub output_tokens: u32,
    /// Output tokens per second per running sequence on a GPU replica.
    pub tokens_per_second: f64,
    /// Time to first token on a free slot, milliseconds.
    pub prefill_ms: u64,
    /// Cold start (pod scheduled → ready), drawn uniformly from this range, seconds.
    pub cold_start_s: (f64, f64),
    /// Engine replicas the cluster can schedule; more stay Unschedulable.
    pub gpu_quota: Option<u32>,
    /// Provider time to first token, milliseconds.
    pub provider_ttft_ms: u64,
    /// Provider output tokens per second per request.
    pub provider_tokens_per_second: f64,
    /// Price of one GPU for an hour.
    pub gpu_hour_price: f64,
    /// Time-to-first-token objective, milliseconds.
    pub slo_ms: u64,
    pub seed: u64,
    /// The request class mix: each class's share of requests (shares sum to 1); empty: every
    /// request of the service's default class.
    pub classes: Vec<(String, f64)>,
    /// Routers modelled one by one; 1 models the routers as one (the whole limits, the
    /// queue limit times `router.replicas`).
    pub routers: u32,
    /// The share of requests reaching the busiest router (the others split the rest evenly);
    /// `None`: even.
    pub router_skew: Option<f64>,
    /// Whether routers admit against the whole engine limit through their exchange, as the
    /// router does (`router::peers`), rather than each against a fixed share of it.
    pub shared_view: bool,
    /// How long after a change a report reaches the other routers (the exchange's gap plus
    /// the network), in milliseconds.
    pub exchange_ms: u64,
    /// A new revision rolled out during the trace.
    pub rollout: Option<Candidate>,
}

impl Default for ModelParams {
    fn default() -> Self {
        Self {
            prompt_tokens: 512,
            output_tokens: 256,
            tokens_per_second: 40.0,
            prefill_ms: 150,
            cold_start_s: (180.0, 300.0),
            gpu_quota: None,
            provider_ttft_ms: 400,
            provider_tokens_per_second: 120.0,
            gpu_hour_price: 2.5,
            slo_ms: 2000,
            seed: 1,
            classes: Vec::new(),
            routers: 1,
            router_skew: None,
            shared_view: false,
            exchange_ms: 1,
            rollout: None,
        }
    }
}

/// A router's peers count as silent after this long without a report (the router's default).
const STALE_AFTER_MS: Millis = 500;

/// One row of the timeline, per autoscaler tick.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimelinePoint {
    pub t_s: f64,
    pub desired: i32,
    pub ready: u32,
    pub starting: u32,
    pub unschedulable: u32,
    pub queue: u32,
    pub local_in_flight: u32,
    pub burst_rps: f64,
    pub rejected: u64,
    pub offered_rps: f64,
}

/// One request class's requests, by where they went, and their time to first token.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClassOutcome {
    pub class: String,
    pub total: u64,
    pub local: u64,
    pub burst: u64,
    pub rejected: u64,
    pub ttft_p50_ms: u64,
    pub ttft_p95_ms: u64,
}

/// Requests by where they went.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcomes {
    pub total: u64,
    pub local: u64,
    pub by_provider: Vec<(String, u64)>,
    pub rejected: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SimResult {
    pub outcomes: Outcomes,
    /// Per request class, in the mix's order.
    pub classes: Vec<ClassOutcome>,
    /// Time to first token percentiles over served requests, milliseconds.
    pub ttft_p50_ms: u64,
    pub ttft_p95_ms: u64,
    pub ttft_p99_ms: u64,
    /// Share of all requests (rejected count as misses) served within the SLO.
    pub slo_attainment: f64,
    pub peak_replicas: i32,
    pub mean_replicas: f64,
    pub min_replicas_seen: i32,
    pub scale_events: u32,
    pub gpu_hours: f64,
    pub gpu_cost: f64,
    pub burst_spend: f64,
    pub total_cost: f64,
    /// Every request on the first provider, at its pricing (None without a priced provider).
    pub all_managed_cost: Option<f64>,
    /// `maxReplicas` GPUs for the whole run.
    pub all_gpu_at_max_cost: f64,
    /// The fewest GPU-hours any schedule serving every request locally needs (see
    /// `sim::oracle`), and this run's GPU-hours against them.
    pub oracle_gpu_hours: f64,
    pub gpu_hours_vs_oracle: f64,
    /// The least GPU cost plus provider spend any schedule needs, and this run's against it.
    pub oracle_total_cost: f64,
    pub total_cost_vs_oracle: f64,
    /// Ticks during which the decision said capacity was exhausted.
    pub exhausted_ticks: u32,
    /// With `cost`: the busy fraction at which a replica costs what the providers charge for
    /// its requests, as the last decision measured it.
    pub cost_break_even: Option<f64>,
    pub max_requests_per_minute_to_providers: usize,
    pub max_spend_per_hour: f64,
    /// Routers modelled (see [`ModelParams::routers`]).
    pub routers: u32,
    /// Requests sent to a provider while some ready engine had a free slot.
    pub spilled_with_local_free: u64,
    /// The most requests any one engine ran at once (its limit is `engine.maxConcurrency`).
    pub engine_peak_concurrency: u32,
    /// What became of the rollout, when one was replayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutReport>,
    #[serde(skip)]
    pub timeline: Vec<TimelinePoint>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PodState {
    Starting { ready_at: Millis },
    Unschedulable,
    Ready,
    Draining,
    Gone,
}

#[derive(Clone, Copy, Debug)]
struct Pod {
    state: PodState,
    outstanding: u32,
    /// Its role: `sim::rollout::{STABLE, CANDIDATE, PREVIOUS}`.
    rev: u8,
    /// It runs the new version (the candidate's speed and errors), whatever its role.
    v2: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    LocalDone {
        pod: u32,
        router: u32,
    },
    /// `cost` in micro-units of currency (exact arithmetic in the heap key).
    ProviderDone {
        provider: u32,
        cost_micros: u64,
    },
    PodReady {
        pod: u32,
    },
    QueueCheck,
    /// Routers' reports arrive (shared view).
    Exchange,
    /// The exchange's heartbeat: reports go out even with nothing changed.
    Heartbeat,
    Tick,
}

#[derive(Clone, Copy, Debug)]
struct Queued {
    arrival: Millis,
    prompt: u32,
    output: u32,
    /// Index into the class mix.
    class: usize,
    /// The router it reached.
    router: usize,
    /// The revision it was routed to.
    rev: u8,
}

/// One router of several: its queue, its own requests on each pod, and (shared view) its
/// ledger of the others, as the router keeps it.
#[derive(Default)]
struct RouterSim {
    queue: VecDeque<Queued>,
    own: Vec<u32>,
    ledger: Option<Ledger>,
}

/// One class of the mix: its rules, its cumulative share, and what became of its requests.
struct MixClass {
    rule: Class,
    upto: f64,
    outcome: ClassOutcome,
    ttft: Histogram,
}

struct Provider {
    name: String,
    in_flight: u32,
    max: u32,
    served: u64,
    pricing: Option<crate::api::Pricing>,
}

/// Time-to-first-token histogram with 1 ms buckets up to ten minutes (exact percentiles,
/// no per-request storage).
struct Histogram {
    buckets: Vec<u32>,
    count: u64,
}

impl Histogram {
    const MAX_MS: usize = 600_000;
    fn new() -> Self {
        Self {
            buckets: vec![0; Self::MAX_MS + 1],
            count: 0,
        }
    }
    fn record(&mut self, ms: Millis) {
        self.buckets[(ms.max(0) as usize).min(Self::MAX_MS)] += 1;
        self.count += 1;
    }
    fn percentile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (ms, n) in self.buckets.iter().enumerate() {
            seen += *n as u64;
            if seen >= rank {
                return ms as u64;
            }
        }
        Self::MAX_MS as u64
    }
    fn at_most(&self, ms: u64) -> u64 {
        self.buckets
            .iter()
            .take(ms as usize + 1)
            .map(|n| *n as u64)
            .sum()
    }
}

struct Sim<'a> {
    policy: &'a ScalingPolicySpec,
    params: &'a ModelParams,
    now: Millis,
    seq: u64,
    heap: BinaryHeap<Reverse<(Millis, u64, Ev)>>,
    /// Arrivals and request sizes: one stream, so every policy sees the same requests.
    rng: SplitMix64,
    /// Cold starts: a separate stream, so scaling differently never shifts the arrivals.
    cold_rng: SplitMix64,
    /// Classes: a stream of their own, so a different mix never shifts the arrivals.
    class_rng: SplitMix64,
    /// Which router a request reaches: a stream of its own too.
    router_rng: SplitMix64,
    routers: Vec<RouterSim>,
    /// A router's limit on one engine when the routers keep fixed shares.
    share: u32,
    spilled_with_local_free: u64,
    engine_peak: u32,
    /// An exchange is on its way (shared view).
    report_due: bool,
    mix: Vec<MixClass>,
    pods: Vec<Pod>,
    ready: Vec<u32>,
    desired: i32,
    providers: Vec<Provider>,
    budget: BudgetTracker,
    history: History,
    exhausted: bool,
    limit: u32,
    /// GPUs per replica.
    gpus: u32,
    queue_limit: u32,
    queue_timeout_ms: u64,
    max_queue_wait_ms: u64,
    ttft: Histogram,
    /// Local time to first token since the last tick, in the routers' buckets.
    local_ttft: Buckets,
    outcomes: Outcomes,
    burst_since_tick: u64,
    /// Requests of `burst: Never` classes started locally since the last tick.
    local_only_since_tick: u64,
    /// Requests sent to providers and what they will be charged (the price the autoscaler
    /// reads arrives with the first spill it measures, as the routers' counters give both).
    burst_sent: u64,
    burst_charged: f64,
    /// Local service time handed out so far and to how many requests (the routers' slot
    /// histogram: the local hold time that turns spilled requests into engine slots).
    local_hold_ms: f64,
    local_started: u64,
    interval_ms: Millis,
    rejected_total: u64,
    backends_buf: Vec<BackendLoad>,
    providers_buf: Vec<ProviderLoad>,
    burst_spend: f64,
    max_rpm_seen: usize,
    max_spend_hour_seen: f64,
    /// A rollout being replayed; the candidate's weight (percent) and replicas it asks for.
    rollout: Option<replay::Run>,
    weight: u32,
    candidate_desired: i32,
    /// The stable runs the new version (after a promotion): its new pods do too.
    stable_is_v2: bool,
    /// Which revision a request goes to, and the candidate's errors: a stream of their own.
    rev_rng: SplitMix64,
}

impl Sim<'_> {
    fn push(&mut self, at: Millis, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, ev)));
    }

    fn rebuild_ready(&mut self) {
        self.ready = (0..self.pods.len() as u32)
            .filter(|&i| self.pods[i as usize].state == PodState::Ready)
            .collect();
        // Pods are only ever added: each router counts on every one.
        for r in &mut self.routers {
            r.own.resize(self.pods.len(), 0);
        }
    }

    /// A router's own count changed: its report reaches the others `exchange_ms` later.
    fn report_soon(&mut self) {
        if self.params.shared_view && self.routers.len() > 1 && !self.report_due {
            self.report_due = true;
            self.push(
                self.now + self.params.exchange_ms.max(1) as Millis,
                Ev::Exchange,
            );
        }
    }

    /// Every router reports and hears the others' reports; a report whose counts moved is
    /// answered (its acknowledgement is what the sender waits for to go on).
    fn exchange(&mut self) {
        self.report_due = false;
        let now = self.now;
        let reports: Vec<_> = self
            .routers
            .iter_mut()
            .map(|r| {
                let mut c = Counts::default();
                for (pod, n) in r.own.iter().enumerate() {
                    c.set(engine_key(&pod.to_string()), *n);
                }
                r.ledger.as_mut().map(|l| l.report(c, now))
            })
            .collect();
        let mut moved = false;
        for (me, r) in self.routers.iter_mut().enumerate() {
            let Some(l) = &mut r.ledger else { continue };
            for (from, report) in reports.iter().enumerate() {
                if let (true, Some(report)) = (from != me, report) {
                    moved |= l.hear(&from.to_string(), report.clone(), self.now) == Some(true);
                }
            }
        }
        if moved {
            self.report_soon();
        }
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.rng.next_f64()
    }

    fn draw_tokens(&mut self, mean: u32) -> u32 {
        (self.uniform(0.5, 1.5) * mean as f64).round().max(1.0) as u32
    }

    /// Admission for a request of class `class` (as the router asks it): `queued` waiters go
    /// before it and `queue_len` count against the limit.
    fn admission(&mut self, ask: Ask) -> Admission {
        let rule = self.mix[ask.class].rule.clone();
        self.backends_buf.clear();
        let router = &self.routers[ask.router];
        for &i in &self.ready {
            let i = i as usize;
            // As this router sees the engine.
            let (outstanding, limit) = if self.routers.len() == 1 {
                (self.pods[i].outstanding, (self.limit, self.limit))
            } else if let Some(l) = &router.ledger {
                let r = l.room(&engine_key(&i.to_string()), self.limit, self.now);
                (router.own[i], (r.cap, r.room))
            } else {
                (router.own[i], (self.share, self.share))
            };
            let (limit, room) = limit;
            self.backends_buf.push(BackendLoad {
                outstanding,
                limit,
                room,
                aside: false,
                // As the router: the revision a request is meant for first, any other that
                // takes requests when it has no room.
                preferred: self.pods[i].rev == ask.rev,
                excluded: !ask.locals_open || !self.takes_requests(self.pods[i].rev),
            });
        }
        self.providers_buf.clear();
        for p in &self.providers {
            self.providers_buf.push(ProviderLoad {
                in_flight: p.in_flight,
                max_concurrency: p.max,
                breaker_allows: true,
                has_key: true,
                excluded: !rule.may_use(&p.name),
            });
        }
        let budget_allows = self.budget.allows(self.now);
        let (in_queue, queued, queue_len, waited_ms) =
            (ask.in_queue, ask.queued, ask.queue_len, ask.waited_ms);
        admit(&AdmissionInput {
            backends: &self.backends_buf,
            providers: &self.providers_buf,
            mode: if rule.never_burst {
                BurstMode::Never
            } else {
                self.policy.burst.mode
            },
            capacity_exhausted: self.exhausted,
            budget_allows,
            queued,
            queue_len,
            queue_limit: self.queue_limit,
            waited_ms,
            max_queue_wait_ms: self.max_queue_wait_ms,
            queue_timeout_ms: self.queue_timeout_ms,
            in_queue,
        })
    }

    /// Starts a request where admission sent it; returns false if it must wait.
    fn dispatch(&mut self, a: Admission, req: Queued) -> bool {
        let waited = self.now - req.arrival;
        let class = &mut self.mix[req.class];
        match a {
            Admission::Local(_) => {
                class.outcome.local += 1;
                if class.rule.never_burst {
                    self.local_only_since_tick += 1;
                }
            }
            Admission::Provider(_) => {
                class.outcome.burst += 1;
                class
                    .ttft
                    .record(waited + self.params.provider_ttft_ms as Millis);
            }
            Admission::Reject(_) => class.outcome.rejected += 1,
            Admission::Queue => {}
        }
        match a {
            Admission::Local(i) => {
                let pod = self.ready[i];
                // The candidate answers at its own speed, and some of its answers are errors.
                let (slower, error_rate) = match (&self.rollout, self.pods[pod as usize].v2) {
                    (Some(r), true) => (r.candidate.slower, r.candidate.error_rate),
                    _ => (1.0, 0.0),
                };
                let prefill = (self.params.prefill_ms as f64 * slower).round() as Millis;
                let error = error_rate > 0.0 && self.rev_rng.next_f64() < error_rate;
                self.mix[req.class].ttft.record(waited + prefill);
                if let Some(r) = &mut self.rollout {
                    r.answered(
                        self.pods[pod as usize].rev,
                        error,
                        (waited + prefill) as f64 / 1000.0,
                    );
                }
                self.pods[pod as usize].outstanding += 1;
                self.routers[req.router].own[pod as usize] += 1;
                self.report_soon();
                self.engine_peak = self.engine_peak.max(self.pods[pod as usize].outstanding);
                let service = prefill as f64
                    + req.output as f64 * 1000.0 / self.params.tokens_per_second * slower;
                let router = req.router as u32;
                self.push(
                    self.now + service.round() as Millis,
                    Ev::LocalDone { pod, router },
                );
                self.local_hold_ms += service.round();
                self.local_started += 1;
                self.ttft.record(waited + prefill);
                if self.pods[pod as usize].rev == STABLE {
                    self.local_ttft.observe((waited + prefill) as f64 / 1000.0);
                }
                self.outcomes.local += 1;
                true
            }
            Admission::Provider(i) => {
                let limit = self.limit;
                if self
                    .ready
                    .iter()
                    .any(|&r| self.pods[r as usize].outstanding < limit)
                {
                    self.spilled_with_local_free += 1;
                }
                let p = &mut self.providers[i];
                p.in_flight += 1;
                p.served += 1;
                let c = cost(p.pricing.as_ref(), req.prompt as u64, req.output as u64);
                self.burst_sent += 1;
                self.burst_charged += c;
                if let (Some(r), CANDIDATE) = (&mut self.rollout, req.rev) {
                    r.spilled(c);
                }
                self.budget.record_request(self.now);
                self.max_rpm_seen = self
                    .max_rpm_seen
                    .max(self.budget.requests_last_minute(self.now));
                let service = self.params.provider_ttft_ms as f64
                    + req.output as f64 * 1000.0 / self.params.provider_tokens_per_second;
                self.push(
                    self.now + service.round() as Millis,
                    Ev::ProviderDone {
                        provider: i as u32,
                        cost_micros: (c * 1e6).round() as u64,
                    },
                );
                self.ttft
                    .record(waited + self.params.provider_ttft_ms as Millis);
                self.burst_since_tick += 1;
                true
            }
            Admission::Reject(_) => {
                self.outcomes.rejected += 1;
                self.rejected_total += 1;
                true
            }
            Admission::Queue => false,
        }
    }

    /// Whether `rev`'s engines take requests: the stable's, and the candidate's at a weight.
    fn takes_requests(&self, rev: u8) -> bool {
        rev == STABLE || (rev == CANDIDATE && self.weight > 0)
    }

    fn priority(&self, req: &Queued) -> i32 {
        self.mix[req.class].rule.priority
    }

    fn arrive(&mut self) {
        let u = self.class_rng.next_f64();
        let class = self
            .mix
            .iter()
            .position(|c| u < c.upto)
            .unwrap_or(self.mix.len() - 1);
        let router = self.pick_router();
        // The candidate's share (served by the stable while the candidate has no room).
        let rev = if self.weight > 0 && self.rev_rng.next_f64() * 100.0 < self.weight as f64 {
            CANDIDATE
        } else {
            STABLE
        };
        let req = Queued {
            arrival: self.now,
            prompt: self.draw_tokens(self.params.prompt_tokens),
            output: self.draw_tokens(self.params.output_tokens),
            class,
            router,
            rev,
        };
        self.outcomes.total += 1;
        self.mix[class].outcome.total += 1;
        // Those of its priority or higher go before it: it waits behind them.
        let p = self.priority(&req);
        let queue = &self.routers[router].queue;
        let ahead = queue
            .iter()
            .position(|w| self.priority(w) < p)
            .unwrap_or(queue.len());
        let a = self.admission(Ask {
            class,
            router,
            rev,
            in_queue: false,
            queued: ahead as u32,
            queue_len: queue.len() as u32,
            waited_ms: 0,
            locals_open: true,
        });
        if !self.dispatch(a, req) {
            self.routers[router].queue.insert(ahead, req);
            if self.max_queue_wait_ms > 0 {
                self.push(self.now + self.max_queue_wait_ms as Millis, Ev::QueueCheck);
            }
            self.push(self.now + self.queue_timeout_ms as Millis, Ev::QueueCheck);
        }
    }

    /// The router a new request reaches: the busiest gets `router_skew` of them.
    fn pick_router(&mut self) -> usize {
        let n = self.routers.len();
        if n == 1 {
            return 0;
        }
        let skew = self.params.router_skew.unwrap_or(1.0 / n as f64);
        let u = self.router_rng.next_f64();
        if u < skew {
            return 0;
        }
        let rest = (u - skew) / (1.0 - skew).max(f64::MIN_POSITIVE);
        (1 + (rest * (n - 1) as f64) as usize).min(n - 1)
    }

    /// Every router's queue.
    fn serve_queues(&mut self) {
        for r in 0..self.routers.len() {
            self.serve_queue(r);
        }
    }

    fn queued(&self) -> usize {
        self.routers.iter().map(|r| r.queue.len()).sum()
    }

    /// One `QueuePass` of router `router`, as the router makes it: head first, until one has
    /// to keep waiting (one kept from providers by its class lets those behind it by, to
    /// providers only).
    fn serve_queue(&mut self, router: usize) {
        let oldest_waited = self.routers[router]
            .queue
            .iter()
            .map(|w| (self.now - w.arrival).max(0) as u64)
            .max()
            .unwrap_or(0);
        let mut pass = QueuePass::new(self.max_queue_wait_ms, oldest_waited);
        let mut i = 0;
        while let Some(&w) = self.routers[router].queue.get(i) {
            let waited = (self.now - w.arrival).max(0) as u64;
            let queued = self.routers[router].queue.len() as u32 - 1;
            let a = self.admission(Ask {
                class: w.class,
                router,
                rev: w.rev,
                in_queue: true,
                queued,
                queue_len: queued,
                waited_ms: waited,
                locals_open: pass.locals_open(),
            });
            let kept = self.mix[w.class].rule.kept_from_providers();
            if self.dispatch(a, w) {
                self.routers[router].queue.remove(i);
            } else if pass.waits(waited, kept) {
                i += 1;
            } else {
                break;
            }
        }
        // Each waiter times out on its own, wherever it stands in the queue (as the router's
        // do, after a pass of their own).
        let timeout = self.queue_timeout_ms as Millis;
        let (now, queue) = (self.now, &mut self.routers[router].queue);
        let expired: Vec<Queued> = queue
            .iter()
            .filter(|w| now - w.arrival >= timeout)
            .copied()
            .collect();
        queue.retain(|w| now - w.arrival < timeout);
        for w in expired {
            self.dispatch(Admission::Reject(RejectReason::QueueTimeout), w);
        }
    }

    fn active_pods(&self, rev: u8) -> usize {
        self.pods
            .iter()
            .filter(|p| {
                p.rev == rev
                    && matches!(
                        p.state,
                        PodState::Ready | PodState::Starting { .. } | PodState::Unschedulable
                    )
            })
            .count()
    }

    fn ready_of(&self, rev: u8) -> i32 {
        self.ready
            .iter()
            .filter(|&&i| self.pods[i as usize].rev == rev)
            .count() as i32
    }

    fn scheduled_pods(&self) -> usize {
        self.pods
            .iter()
            .filter(|p| {
                matches!(
                    p.state,
                    PodState::Ready | PodState::Starting { .. } | PodState::Draining
                )
            })
            .count()
    }

    fn schedule_or_park(&mut self, idx: usize) {
        let fits = self
            .params
            .gpu_quota
            .is_none_or(|q| self.scheduled_pods() < q as usize);
        if fits {
            let (lo, hi) = self.params.cold_start_s;
            let draw = lo + (hi - lo) * self.cold_rng.next_f64();
            let ready_at = self.now + (draw * 1000.0).round() as Millis;
            self.pods[idx].state = PodState::Starting { ready_at };
            self.push(ready_at, Ev::PodReady { pod: idx as u32 });
        } else {
            self.pods[idx].state = PodState::Unschedulable;
        }
    }

    /// Moves each revision's pod set towards its count like its Deployment would: the
    /// stable's to `desired`, a candidate's to what the rollout asks.
    fn reconcile_pods(&mut self) {
        self.reconcile_revision(STABLE, self.desired);
        self.reconcile_revision(CANDIDATE, self.candidate_desired);
    }

    fn reconcile_revision(&mut self, rev: u8, desired: i32) {
        let mut active = self.active_pods(rev) as i32;
        while active < desired {
            let v2 = rev == CANDIDATE || (rev == STABLE && self.stable_is_v2);
            self.pods.push(Pod {
                state: PodState::Unschedulable,
                outstanding: 0,
                rev,
                v2,
            });
            let idx = self.pods.len() - 1;
            self.schedule_or_park(idx);
            active += 1;
        }
        // Remove the least useful first: unschedulable, then starting, then the idlest ready.
        let of = |p: &Pod, state: fn(&PodState) -> bool| p.rev == rev && state(&p.state);
        while active > desired {
            let pick = self
                .pods
                .iter()
                .position(|p| of(p, |s| *s == PodState::Unschedulable))
                .or_else(|| {
                    self.pods
                        .iter()
                        .position(|p| of(p, |s| matches!(s, PodState::Starting { .. })))
                })
                .or_else(|| {
                    self.pods
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| of(p, |s| *s == PodState::Ready))
                        .min_by_key(|(_, p)| p.outstanding)
                        .map(|(i, _)| i)
                });
            let Some(i) = pick else { break };
            let p = &mut self.pods[i];
            p.state = if p.state == PodState::Ready && p.outstanding > 0 {
                PodState::Draining
            } else {
                PodState::Gone
            };
            active -= 1;
        }
        // Quota freed by scale-down lets parked pods schedule (not a previous revision's: it
        // only stays warm with what it has).
        for i in 0..self.pods.len() {
            if self.pods[i].state == PodState::Unschedulable
                && self.pods[i].rev != PREVIOUS
                && self
                    .params
                    .gpu_quota
                    .is_none_or(|q| self.scheduled_pods() < q as usize)
            {
                self.schedule_or_park(i);
            }
        }
        self.rebuild_ready();
    }

    fn observe(&self) -> Observed {
        // The autoscaler scales the stable revision on its own pods.
        let ready = self
            .ready
            .iter()
            .filter(|&&i| self.pods[i as usize].rev == STABLE)
            .map(|&i| {
                let o = self.pods[i as usize].outstanding as f64;
                PodSample {
                    // The router never exceeds an engine's limit, so engines hold no queue of their own.
                    queue_depth: Some(0.0),
                    in_flight: Some(o),
                    // KV use grows with running sequences; a full replica sits at 90 %.
                    gpu_memory: Some((o / self.limit as f64 * 0.9).min(1.0)),
                }
            })
            .collect();
        let count = |f: fn(&PodState) -> bool| {
            self.pods
                .iter()
                .filter(|p| p.rev == STABLE && f(&p.state))
                .count() as i32
        };
        // A local request's mean time on a slot, in seconds; requests a second this interval.
        let hold_s = (self.local_started > 0)
            .then(|| self.local_hold_ms / self.local_started as f64 / 1000.0);
        let per_second = |n: u64| n as f64 * 1000.0 / self.interval_ms as f64;
        Observed {
            current_replicas: self.desired,
            ready,
            starting: count(|s| matches!(s, PodState::Starting { .. })),
            unschedulable: count(|s| *s == PodState::Unschedulable),
            router_queue: Some(self.queued() as f64),
            // What went to providers this interval, in local slots (as the driver measures it).
            spilled: hold_s.map(|h| per_second(self.burst_since_tick) * h),
            provider_price: match hold_s {
                _ if self.providers.iter().all(|p| p.pricing.is_none()) => ProviderPrice::Unpriced,
                Some(h) if self.burst_sent > 0 && self.burst_charged > 0.0 => {
                    ProviderPrice::PerSlotSecond(self.burst_charged / self.burst_sent as f64 / h)
                }
                _ => ProviderPrice::Unmeasured,
            },
            // Started locally this interval (as the driver reads the routers' counts), and waiting.
            local_only: hold_s.map(|h| {
                let waiting = self
                    .routers
                    .iter()
                    .flat_map(|r| &r.queue)
                    .filter(|w| self.mix[w.class].rule.never_burst)
                    .count();
                per_second(self.local_only_since_tick) * h + waiting as f64
            }),
            spill_incomplete: false,
            ttft: Some(self.local_ttft.clone()),
            created_at: Millis::MIN / 2,
            cold_start_ms: Some(
                ((self.params.cold_start_s.0 + self.params.cold_start_s.1) * 500.0) as Millis,
            ),
        }
    }

    fn tick(&mut self) -> Decision {
        let observed = self.observe();
        let d = decide(
            self.policy,
            SignalsConfigured {
                max_concurrency: self.limit,
                gpus: self.gpus,
                ..SignalsConfigured::default()
            },
            &observed,
            &self.history,
            self.now,
        );
        self.history = d.history.clone();
        self.local_ttft = empty_ttft();
        self.exhausted = d.exhausted.is_some();
        // While a rollout moves traffic, the stable keeps what it has: the share it loses is
        // the candidate's, which may still go back to it at once.
        let desired = if self.rollout.as_ref().is_some_and(|r| r.active()) {
            d.desired.max(self.desired)
        } else {
            d.desired
        };
        if self.policy.mode == PolicyMode::Active && desired != self.desired {
            self.history.record_scale(self.now, self.desired, desired);
            self.desired = desired;
            self.reconcile_pods();
            // New capacity or a freed quota may let waiting requests in.
            self.serve_queues();
        }
        self.roll();
        d
    }

    /// The rollout's tick: the candidate's weight and replicas, and promotion or rollback.
    fn roll(&mut self) {
        let (stable_ready, candidate_ready) = (self.ready_of(STABLE), self.ready_of(CANDIDATE));
        // Its first replica may take the slowest cold start, and ten minutes more.
        let deadline = ((self.params.cold_start_s.1 + 600.0) * 1000.0) as Millis;
        let Some(run) = &mut self.rollout else { return };
        let (traffic, change) = run.tick(self.now, stable_ready, candidate_ready, deadline);
        // Once it is over, the pods are relabelled instead: nothing is routed to "candidate".
        let active = run.active();
        self.weight = if active { traffic.candidate_weight } else { 0 };
        self.candidate_desired = if active {
            traffic.candidate_replicas
        } else {
            0
        };
        let relabel = |pods: &mut Vec<Pod>, from: u8, to: u8| {
            for p in pods.iter_mut().filter(|p| p.rev == from) {
                p.rev = to;
            }
        };
        if matches!(change, Change::Promoted | Change::RolledBack) {
            // Requests waiting for the candidate: after a promotion they wait for the same
            // engines (now the stable); after a rollback, for the stable's.
            for r in &mut self.routers {
                for w in r.queue.iter_mut().filter(|w| w.rev == CANDIDATE) {
                    w.rev = STABLE;
                }
            }
        }
        match change {
            Change::None => {}
            Change::Promoted => {
                // The candidate is the stable now, with the replicas it has; the old stable
                // stays warm, unrouted, until `keepPreviousSeconds` are over.
                relabel(&mut self.pods, STABLE, PREVIOUS);
                relabel(&mut self.pods, CANDIDATE, STABLE);
                self.stable_is_v2 = true;
                // The previous stays warm with the replicas it has ready; none still loading.
                for p in self.pods.iter_mut().filter(|p| p.rev == PREVIOUS) {
                    if matches!(p.state, PodState::Starting { .. } | PodState::Unschedulable) {
                        p.state = PodState::Gone;
                    }
                }
                self.desired = (self.active_pods(STABLE) as i32).max(self.policy.min_replicas);
                self.history = History::starting_at(self.now, self.desired);
                self.weight = 0;
                self.candidate_desired = 0;
            }
            Change::RolledBack => {
                if self
                    .pods
                    .iter()
                    .any(|p| p.rev == PREVIOUS && p.state != PodState::Gone)
                {
                    // Back within `keepPreviousSeconds`: the previous serves again at once.
                    relabel(&mut self.pods, STABLE, CANDIDATE);
                    relabel(&mut self.pods, PREVIOUS, STABLE);
                    self.stable_is_v2 = false;
                    self.desired = self.active_pods(STABLE) as i32;
                    self.history = History::starting_at(self.now, self.desired);
                }
                self.candidate_desired = 0;
            }
            Change::DropPrevious => self.drop_revision(PREVIOUS),
        }
        self.reconcile_pods();
        self.rebuild_ready();
        self.serve_queues();
    }

    /// Lets a revision's pods go: idle ones at once, busy ones once their requests end.
    fn drop_revision(&mut self, rev: u8) {
        for p in self.pods.iter_mut().filter(|p| p.rev == rev) {
            p.state = match p.state {
                PodState::Ready if p.outstanding > 0 => PodState::Draining,
                PodState::Draining => PodState::Draining,
                _ => PodState::Gone,
            };
        }
    }
}

fn empty_ttft() -> Buckets {
    Buckets::exponential(LATENCY_BUCKET_START, LATENCY_BUCKET_FACTOR, LATENCY_BUCKETS)
}

/// One request's admission question.
#[derive(Clone, Copy, Debug)]
struct Ask {
    class: usize,
    router: usize,
    /// Only this revision's engines may take it.
    rev: u8,
    in_queue: bool,
    queued: u32,
    queue_len: u32,
    waited_ms: u64,
    locals_open: bool,
}

/// The class mix over the service's classes (unknown names are the caller's to refuse; see
/// `sim::settings`).
fn mix(classes: &Classes, shares: &[(String, f64)]) -> Vec<MixClass> {
    let picked: Vec<(Class, f64)> = if shares.is_empty() {
        vec![(classes.resolve(None).expect("the default class"), 1.0)]
    } else {
        shares
            .iter()
            .filter_map(|(n, s)| Some((classes.resolve(Some(n.as_bytes())).ok()?, *s)))
            .collect()
    };
    let total: f64 = picked.iter().map(|(_, s)| s).sum();
    let mut upto = 0.0;
    picked
        .into_iter()
        .map(|(rule, share)| {
            upto += share / total;
            MixClass {
                outcome: ClassOutcome {
                    class: rule.name.clone(),
                    ..ClassOutcome::default()
                },
                rule,
                upto,
                ttft: Histogram::new(),
            }
        })
        .collect()
}

/// Runs one simulation.
pub fn simulate(
    isvc: &InferenceService,
    policy: &ScalingPolicySpec,
    trace: &Trace,
    params: &ModelParams,
) -> SimResult {
    let spec = &isvc.spec;
    let burst = spec.burst.as_ref().filter(|_| spec.router.enabled);
    let providers: Vec<Provider> = burst
        .map(|b| {
            b.providers
                .iter()
                .map(|p| Provider {
                    name: p.name.clone(),
                    in_flight: 0,
                    max: p.max_concurrency.max(1) as u32,
                    served: 0,
                    pricing: p.pricing.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    let budget_cfg = burst.and_then(|b| b.budget.as_ref());
    let max_spend = budget_cfg
        .and_then(|b| b.max_spend_per_hour.as_deref())
        .and_then(|s| parse_spend(s).ok());
    let interval_ms = policy.interval_seconds.max(1) as Millis * 1000;
    let start_replicas = policy.min_replicas.max(1);
    let routers = params.routers.max(1) as usize;
    let limit = spec.engine.max_concurrency.max(1) as u32;
    let mut sim = Sim {
        policy,
        params,
        now: 0,
        seq: 0,
        heap: BinaryHeap::new(),
        rng: SplitMix64::new(params.seed),
        cold_rng: SplitMix64::new(params.seed ^ 0x5eed_c01d_5747_7a27),
        class_rng: SplitMix64::new(params.seed ^ 0xc1a5_5e5d_0b5e_ed01),
        mix: mix(
            &Classes::new(spec.request_classes.as_ref()),
            &params.classes,
        ),
        router_rng: SplitMix64::new(params.seed ^ 0x0bad_5eed_0f0f_1e55),
        routers: (0..routers)
            .map(|i| RouterSim {
                ledger: (routers > 1 && params.shared_view).then(|| {
                    let mut l = Ledger::new(i.to_string(), 1, routers as u32, STALE_AFTER_MS);
                    let peers: Vec<String> = (0..routers)
                        .filter(|j| *j != i)
                        .map(|j| j.to_string())
                        .collect();
                    l.set_peers(&peers);
                    l
                }),
                ..RouterSim::default()
            })
            .collect(),
        share: if routers > 1 {
            peers::fixed_share(limit, routers as u32)
        } else {
            limit
        },
        spilled_with_local_free: 0,
        gpus: spec.engine.gpus.max(0) as u32,
        engine_peak: 0,
        report_due: false,
        pods: Vec::new(),
        ready: Vec::new(),
        desired: start_replicas,
        providers,
        budget: BudgetTracker::new(
            budget_cfg
                .and_then(|b| b.max_requests_per_minute)
                .map(|m| m.max(0) as u32),
            max_spend,
        ),
        history: History::default(),
        exhausted: false,
        limit,
        // One logical router stands for all router replicas; or each has its own queue.
        queue_limit: (spec.router.queue_limit.max(0) as u32).saturating_mul(if routers > 1 {
            1
        } else {
            spec.router.replicas.max(1) as u32
        }),
        queue_timeout_ms: spec.router.queue_timeout_seconds.max(1) as u64 * 1000,
        max_queue_wait_ms: policy.burst.max_queue_wait_milliseconds.max(0) as u64,
        ttft: Histogram::new(),
        local_ttft: empty_ttft(),
        outcomes: Outcomes::default(),
        burst_since_tick: 0,
        local_only_since_tick: 0,
        burst_sent: 0,
        burst_charged: 0.0,
        local_hold_ms: 0.0,
        local_started: 0,
        interval_ms,
        rejected_total: 0,
        backends_buf: Vec::new(),
        providers_buf: Vec::new(),
        burst_spend: 0.0,
        max_rpm_seen: 0,
        max_spend_hour_seen: 0.0,
        rollout: params.rollout.clone().map(replay::Run::new),
        weight: 0,
        candidate_desired: 0,
        stable_is_v2: false,
        rev_rng: SplitMix64::new(params.seed ^ 0x7e71_5107_ca2d_1da7),
    };
    // An established service: its minimum is up and warm at the start.
    for _ in 0..start_replicas {
        sim.pods.push(Pod {
            state: PodState::Ready,
            outstanding: 0,
            rev: STABLE,
            v2: false,
        });
    }
    if let Some(q) = params.gpu_quota {
        for p in sim.pods.iter_mut().skip(q as usize) {
            p.state = PodState::Unschedulable;
        }
    }
    sim.rebuild_ready();
    sim.push(0, Ev::Tick);
    let heartbeat = crate::router::exchange::HEARTBEAT.as_millis() as Millis;
    if routers > 1 && params.shared_view {
        sim.push(heartbeat, Ev::Heartbeat);
    }

    let end_ms = trace.duration_s() as Millis * 1000;
    let mut arrival_clock = 0.0f64;
    let mut next_arrival = next_arrival_after(&mut sim.rng, trace, &mut arrival_clock);
    let mut timeline = Vec::with_capacity((end_ms / interval_ms + 1) as usize);
    let (mut pod_ms, mut last_pod_sample) = (0f64, 0 as Millis);
    let mut cost_break_even = None;
    let (mut replica_sum, mut ticks, mut peak, mut min_seen, mut scale_events, mut exhausted_ticks) =
        (0f64, 0u32, start_replicas, start_replicas, 0u32, 0u32);

    loop {
        let heap_next = sim.heap.peek().map(|Reverse((t, _, _))| *t);
        let take_arrival = match (next_arrival, heap_next) {
            (Some(a), Some(h)) => a < h,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_arrival {
            sim.now = next_arrival.expect("checked above");
            sim.arrive();
            next_arrival = next_arrival_after(&mut sim.rng, trace, &mut arrival_clock);
            continue;
        }
        let Reverse((t, _, ev)) = sim.heap.pop().expect("peeked");
        sim.now = t;
        match ev {
            Ev::LocalDone { pod, router } => {
                let p = &mut sim.pods[pod as usize];
                p.outstanding -= 1;
                if p.state == PodState::Draining && p.outstanding == 0 {
                    p.state = PodState::Gone;
                }
                sim.routers[router as usize].own[pod as usize] -= 1;
                sim.report_soon();
                sim.serve_queues();
            }
            Ev::ProviderDone {
                provider,
                cost_micros,
            } => {
                sim.providers[provider as usize].in_flight -= 1;
                let c = cost_micros as f64 / 1e6;
                sim.burst_spend += c;
                sim.budget.record_spend(sim.now, c);
                sim.max_spend_hour_seen = sim
                    .max_spend_hour_seen
                    .max(sim.budget.spend_last_hour(sim.now));
                sim.serve_queues();
            }
            Ev::PodReady { pod } => {
                if sim.pods[pod as usize].state == (PodState::Starting { ready_at: t }) {
                    sim.pods[pod as usize].state = PodState::Ready;
                    sim.rebuild_ready();
                    sim.serve_queues();
                }
            }
            Ev::QueueCheck => sim.serve_queues(),
            Ev::Exchange => {
                sim.exchange();
                sim.serve_queues();
            }
            Ev::Heartbeat => {
                sim.exchange();
                sim.serve_queues();
                if sim.now <= end_ms {
                    sim.push(sim.now + heartbeat, Ev::Heartbeat);
                }
            }
            Ev::Tick => {
                if sim.now > end_ms {
                    continue; // the trace is over: let in-flight work finish, decide no more
                }
                // GPU time: every scheduled pod (starting ones too) holds its GPUs.
                pod_ms += sim.scheduled_pods() as f64 * (sim.now - last_pod_sample) as f64;
                last_pod_sample = sim.now;
                let before = sim.desired;
                let d = sim.tick();
                if sim.desired != before {
                    scale_events += 1;
                }
                if d.exhausted.is_some() {
                    exhausted_ticks += 1;
                }
                cost_break_even = d.cost.map(|w| w.break_even).or(cost_break_even);
                ticks += 1;
                replica_sum += sim.desired as f64;
                peak = peak.max(sim.desired);
                min_seen = min_seen.min(sim.desired);
                let count = |f: fn(&PodState) -> bool| {
                    sim.pods.iter().filter(|p| f(&p.state)).count() as u32
                };
                timeline.push(TimelinePoint {
                    t_s: sim.now as f64 / 1000.0,
                    desired: sim.desired,
                    ready: sim.ready.len() as u32,
                    starting: count(|s| matches!(s, PodState::Starting { .. })),
                    unschedulable: count(|s| *s == PodState::Unschedulable),
                    queue: sim.queued() as u32,
                    local_in_flight: sim.pods.iter().map(|p| p.outstanding).sum(),
                    burst_rps: sim.burst_since_tick as f64 * 1000.0 / interval_ms as f64,
                    rejected: sim.rejected_total,
                    offered_rps: trace.rate_at((sim.now / 1000) as usize),
                });
                sim.burst_since_tick = 0;
                sim.local_only_since_tick = 0;
                sim.push(sim.now + interval_ms, Ev::Tick);
            }
        }
    }

    let served = sim.outcomes.total - sim.outcomes.rejected;
    let gpus = spec.engine.gpus.max(0) as f64;
    let gpu_hours = pod_ms / 3_600_000.0 * gpus;
    let gpu_cost = gpu_hours * params.gpu_hour_price;
    let first_priced = sim.providers.iter().find_map(|p| p.pricing.clone());
    let all_managed_cost = first_priced.as_ref().map(|pr| {
        // Expected tokens per request × requests (draws are symmetric around the means).
        cost(
            Some(pr),
            params.prompt_tokens as u64 * sim.outcomes.total,
            params.output_tokens as u64 * sim.outcomes.total,
        )
    });
    let hold_s = (params.prefill_ms as f64
        + params.output_tokens as f64 * 1000.0 / params.tokens_per_second)
        / 1000.0;
    let best = oracle(&OracleInput {
        rps: &trace.rps,
        hold_s,
        slots: spec.engine.max_concurrency.max(1) as u32,
        min_replicas: policy.min_replicas.max(1) as u32,
        gpus,
        gpu_hour_price: params.gpu_hour_price,
        cold_start_s: (params.cold_start_s.0 + params.cold_start_s.1) / 2.0,
        burst_price_per_request: (policy.burst.mode != BurstMode::Never)
            .then_some(first_priced.as_ref())
            .flatten()
            .map(|pr| {
                cost(
                    Some(pr),
                    params.prompt_tokens as u64,
                    params.output_tokens as u64,
                )
            }),
    });
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 1.0 };
    let mut outcomes = sim.outcomes.clone();
    outcomes.by_provider = sim
        .providers
        .iter()
        .map(|p| (p.name.clone(), p.served))
        .collect();
    let classes = sim
        .mix
        .iter()
        .map(|c| ClassOutcome {
            ttft_p50_ms: c.ttft.percentile(0.50),
            ttft_p95_ms: c.ttft.percentile(0.95),
            ..c.outcome.clone()
        })
        .collect();
    SimResult {
        classes,
        ttft_p50_ms: sim.ttft.percentile(0.50),
        ttft_p95_ms: sim.ttft.percentile(0.95),
        ttft_p99_ms: sim.ttft.percentile(0.99),
        slo_attainment: if outcomes.total == 0 {
            1.0
        } else {
            sim.ttft.at_most(params.slo_ms) as f64 / outcomes.total as f64
        },
        peak_replicas: peak,
        mean_replicas: if ticks == 0 {
            start_replicas as f64
        } else {
            replica_sum / ticks as f64
        },
        min_replicas_seen: min_seen,
        scale_events,
        gpu_hours,
        gpu_cost,
        burst_spend: sim.burst_spend,
        total_cost: gpu_cost + sim.burst_spend,
        all_managed_cost,
        all_gpu_at_max_cost: policy.max_replicas as f64 * gpus * trace.duration_s() as f64 / 3600.0
            * params.gpu_hour_price,
        oracle_gpu_hours: best.gpu_hours,
        gpu_hours_vs_oracle: ratio(gpu_hours, best.gpu_hours),
        oracle_total_cost: best.total_cost,
        total_cost_vs_oracle: ratio(gpu_cost + sim.burst_spend, best.total_cost),
        exhausted_ticks,
        cost_break_even,
        max_requests_per_minute_to_providers: sim.max_rpm_seen,
        max_spend_per_hour: sim.max_spend_hour_seen,
        routers: routers as u32,
        spilled_with_local_free: sim.spilled_with_local_free,
        engine_peak_concurrency: sim.engine_peak,
        rollout: sim.rollout.as_ref().and_then(|r| r.report()),
        timeline,
        outcomes: Outcomes {
            total: served + outcomes.rejected,
            ..outcomes
        },
    }
}

/// The next Poisson arrival after `*t` seconds under the trace's piecewise-constant rate
/// (memoryless: crossing into a new second simply redraws with that second's rate). `*t`
/// carries the exact time forward; only the returned event time is rounded to milliseconds.
fn next_arrival_after(rng: &mut SplitMix64, trace: &Trace, t: &mut f64) -> Option<Millis> {
    loop {
        let s = t.floor() as usize;
        if s >= trace.duration_s() {
            return None;
        }
        let rate = trace.rate_at(s);
        let boundary = (s + 1) as f64;
        if rate <= 0.0 {
            *t = boundary;
            continue;
        }
        let u = rng.next_f64();
        let gap = -(1.0 - u).ln() / rate;
        if *t + gap < boundary {
            *t += gap;
            // Millisecond resolution; ties keep arrival order.
            return Some((*t * 1000.0).ceil() as Millis);
        }
        *t = boundary;
    }
}
