//! `decide()`: the scaling decision, a pure function of the policy, what was observed, the
//! recent history and the clock (DESIGN.md §5). The controller and the simulator both call it.

use std::collections::VecDeque;
use std::fmt;

use crate::api::{BurstMode, MetricsUnavailable, ScalingPolicySpec, ScalingRules, SelectPolicy};

use super::cost::{Prices, ProviderPrice, Worth, worth};
use super::forecast::{KEEP_MS, Samples, forecast};
use super::latency::{Buckets, min_samples};
use crate::api::SignalMode;
use crate::clock::Millis;

/// One ready engine pod's latest numbers; `None` = no fresh value (scrape failed or metric absent).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodSample {
    pub queue_depth: Option<f64>,
    pub in_flight: Option<f64>,
    pub gpu_memory: Option<f64>,
}

/// Which signals the engine's metrics configuration provides at all ("not configured" is
/// different from "missing": TGI has no GPU memory gauge, and that is not an outage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalsConfigured {
    pub queue_depth: bool,
    pub gpu_memory: bool,
    /// Requests one replica serves at once (`engine.maxConcurrency`): the concurrency signal's
    /// target. 0 leaves that signal out.
    pub max_concurrency: u32,
    /// GPUs per replica: what a replica costs (`cost`).
    pub gpus: u32,
}

impl Default for SignalsConfigured {
    fn default() -> Self {
        Self {
            queue_depth: true,
            gpu_memory: true,
            max_concurrency: 0,
            gpus: 1,
        }
    }
}

/// What the autoscaler saw this tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The engine Deployment's `spec.replicas`.
    pub current_replicas: i32,
    /// One entry per ready engine pod.
    pub ready: Vec<PodSample>,
    /// Pods scheduled but not yet ready (loading the model): not capacity, not stale.
    pub starting: i32,
    /// Pods the scheduler cannot place (`PodScheduled=False`, reason `Unschedulable`).
    pub unschedulable: i32,
    /// Requests waiting in the routers' queues for a local slot, summed; `None` when no router
    /// reported.
    pub router_queue: Option<f64>,
    /// The demand the routers sent to providers, in local engine slots (requests spilled per
    /// second × seconds a request holds a local slot); `None` when not measured.
    pub spilled: Option<f64>,
    /// Some ready router's spill could not be measured this tick (its first sample, a failed
    /// scrape, a restart): `spilled` is scaled up from the others, and nothing scales down.
    pub spill_incomplete: bool,
    /// When the service was created, for launch over-provisioning.
    pub created_at: Millis,
    /// How long replicas took to load lately, if known: the forecast's default horizon.
    pub cold_start_ms: Option<Millis>,
    /// Time to first token of the streamed answers local engines gave since the last tick,
    /// over all routers that could be measured; `None` when none could.
    pub ttft: Option<Buckets>,
    /// What the providers charge for the requests that would hold one local engine slot for
    /// a second (`cost`).
    pub provider_price: ProviderPrice,
    /// The demand, in engine slots, that may not go to providers (request classes with
    /// `burst: Never`): running locally and waiting.
    pub local_only: Option<f64>,
}

/// Recent recommendations and scale events (the state `decide()` needs between ticks).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    recommendations: VecDeque<(Millis, i32)>,
    scale_events: VecDeque<(Millis, i32)>,
    /// The count a loop started with: a floor for scale-down for one window, nothing more.
    started_with: Option<(Millis, i32)>,
    /// Demand in engine slots, each tick, for the forecast (kept only with `predictive`).
    demand: Samples,
    /// Each tick's time to first token, for the latency objective's window (kept only with
    /// one).
    latency: LatencySeries,
    /// Occupancy readings, in replicas' worth, for `occupancyWindowSeconds` (kept only with
    /// one).
    occupancy: Occupancy,
}

/// GPU memory and concurrency readings: each tick's per-replica value times the ready
/// replicas (totals do not jump when a replica becomes ready).
#[derive(Clone, Debug, Default, PartialEq)]
struct Occupancy {
    gpu_memory: Samples,
    concurrency: Samples,
}

/// Time to first token per tick, with the replicas ready when it was measured.
type LatencySeries = VecDeque<(Millis, usize, Buckets)>;

/// The forecast horizon without `horizonSeconds` or an observed cold start: a typical load.
const DEFAULT_HORIZON_MS: Millis = 240_000;

impl History {
    /// History for a loop that starts now with `current` replicas: the current count counts as
    /// a recommendation, so a controller restart or failover never scales down at once.
    pub fn starting_at(now: Millis, current: i32) -> Self {
        Self {
            started_with: Some((now, current)),
            ..Self::default()
        }
    }

    /// Records that replicas were changed from `from` to `to` at `now` (after a successful patch).
    pub fn record_scale(&mut self, now: Millis, from: i32, to: i32) {
        if from != to {
            self.scale_events.push_back((now, to - from));
        }
    }

    fn prune(&mut self, now: Millis, keep_recs_ms: Millis, keep_events_ms: Millis) {
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| *t < now - keep_recs_ms)
        {
            self.recommendations.pop_front();
        }
        while self
            .scale_events
            .front()
            .is_some_and(|(t, _)| *t < now - keep_events_ms)
        {
            self.scale_events.pop_front();
        }
    }

    /// Net replicas added (positive) or removed (negative) within `[now - period, now]`.
    fn changed_since(&self, since: Millis, sign: i32) -> i32 {
        self.scale_events
            .iter()
            .filter(|(t, d)| *t > since && d.signum() == sign)
            .map(|(_, d)| d.abs())
            .sum()
    }
}

/// The signal that drove a decision; a small fixed set (it labels metrics and events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Driver {
    QueueDepth,
    GpuMemory,
    /// Requests in flight per replica, spilled demand included, against `maxConcurrency`.
    Concurrency,
    /// Within tolerance, or both signals agree with the current count.
    Steady,
    MetricsUnavailable,
    MinReplicas,
    MaxReplicas,
    Launch,
    /// Held by the scale-down or scale-up stabilisation window.
    Stabilized,
    /// Held by `maxPods`/`maxPercent`.
    RateLimited,
    /// Nothing is ready yet and nothing asks for more.
    ColdStart,
    /// The demand forecast one horizon ahead (`predictive.mode: Active`).
    Forecast,
    /// Time to first token above `targets.timeToFirstTokenMilliseconds`.
    TimeToFirstToken,
    /// Held at the replicas worth their GPUs against the providers' prices (`cost`).
    Cost,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::QueueDepth => "QueueDepth",
            Driver::GpuMemory => "GpuMemory",
            Driver::Concurrency => "Concurrency",
            Driver::Steady => "Steady",
            Driver::MetricsUnavailable => "MetricsUnavailable",
            Driver::MinReplicas => "MinReplicas",
            Driver::MaxReplicas => "MaxReplicas",
            Driver::Launch => "Launch",
            Driver::Stabilized => "Stabilized",
            Driver::RateLimited => "RateLimited",
            Driver::ColdStart => "ColdStart",
            Driver::Forecast => "Forecast",
            Driver::TimeToFirstToken => "TimeToFirstToken",
            Driver::Cost => "Cost",
        }
    }
}

/// How much of the metrics the decision could see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsState {
    /// Every ready pod answered for every configured signal.
    Complete,
    /// Some ready pods (or signals) had no fresh data; decided from the rest, no scale-down.
    Partial { responding: usize, ready: usize },
    /// No data at all from ready pods: `metricsUnavailable` applied.
    Unavailable,
    /// No pod is ready yet: nothing to measure (not an outage).
    NoReadyPods,
}

/// Why in-cluster capacity is exhausted (the router may burst while it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExhaustedReason {
    /// The load wants more than `maxReplicas`.
    MaxReplicas,
    /// A pod cannot be scheduled (e.g. no free GPU).
    Unschedulable,
    /// Replicas are still loading while the ready ones are saturated (or none is ready).
    ColdStart,
}

impl ExhaustedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExhaustedReason::MaxReplicas => "MaxReplicas",
            ExhaustedReason::Unschedulable => "Unschedulable",
            ExhaustedReason::ColdStart => "ColdStart",
        }
    }
}

/// The outcome of one tick.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Replicas to run.
    pub desired: i32,
    /// What the signals alone asked for, before stabilisation, rate limits and bounds.
    pub unclamped: i32,
    pub driver: Driver,
    /// The signal that asked for the count before stabilisation, rate limits and bounds
    /// (`QueueDepth`, `GpuMemory` or `Concurrency`); `None` when none asked for a change.
    pub signal: Option<Driver>,
    /// For people: "queue depth 37/4 per replica".
    pub reason: String,
    pub metrics: MetricsState,
    pub exhausted: Option<ExhaustedReason>,
    /// Aggregates for status.
    pub queue_depth: Option<f64>,
    pub in_flight: Option<f64>,
    pub gpu_memory: Option<f64>,
    pub spilled: Option<f64>,
    /// The demand forecast (`predictive` not `Disabled`): replicas it needs, and in how many
    /// seconds.
    pub forecast: Option<(i32, i64)>,
    /// Time to first token over the objective's window, in milliseconds, for each quantile it
    /// names that had enough answers: `("p95", 812.0)`.
    pub ttft_ms: Vec<(&'static str, f64)>,
    /// The replicas worth their GPUs against the providers' prices (`cost` not `Disabled`,
    /// with both prices known), `minReplicas` at least.
    pub cost: Option<Worth>,
    /// The history to keep for the next tick (this tick's recommendation added).
    pub history: History,
}

/// Per-signal reading over the ready pods that reported.
struct SignalReading {
    /// Average per ready replica (the router queue is spread over them).
    per_replica: f64,
    target: f64,
    /// `ceil(ready × per_replica / target)`, or the current count inside the tolerance.
    desired: i32,
    within_tolerance: bool,
}

fn read_signal(
    values: &[f64],
    extra_total: f64,
    ready: usize,
    target: f64,
    tolerance: f64,
    current: i32,
) -> Option<SignalReading> {
    if values.is_empty() || ready == 0 {
        return None;
    }
    let avg = values.iter().sum::<f64>() / values.len() as f64;
    let per_replica = avg + extra_total / ready as f64;
    let ratio = per_replica / target;
    let within = (ratio - 1.0).abs() <= tolerance;
    let desired = if within {
        current
    } else {
        // Guard the float: a huge signal must not wrap the count.
        (ready as f64 * ratio)
            .ceil()
            .clamp(0.0, i32::MAX as f64 / 2.0) as i32
    };
    Some(SignalReading {
        per_replica,
        target,
        desired,
        within_tolerance: within,
    })
}

fn fmt_num(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.2}")
    }
}

/// The most one period may change from `base`: `maxPods`, or `ceil(base × maxPercent / 100)`
/// (at least 1), the larger or the smaller as `selectPolicy` says; none when it is `Disabled`.
fn allowed_change(base: i32, rules: &ScalingRules) -> i32 {
    let by_percent = ((base.max(1) as i64 * rules.max_percent as i64 + 99) / 100).max(1) as i32;
    match rules.select_policy {
        SelectPolicy::Max => by_percent.max(rules.max_pods).max(1),
        SelectPolicy::Min => by_percent.min(rules.max_pods).max(1),
        SelectPolicy::Disabled => 0,
    }
}

/// Decides the replica count for one service. Pure: the same inputs give the same decision.
pub fn decide(
    policy: &ScalingPolicySpec,
    configured: SignalsConfigured,
    observed: &Observed,
    history: &History,
    now: Millis,
) -> Decision {
    let min = policy.min_replicas.max(1);
    let max = policy.max_replicas.max(min);
    let current = observed.current_replicas.max(0);
    let ready = observed.ready.len();
    let router_queue = observed.router_queue.unwrap_or(0.0).max(0.0);
    let spilled = observed.spilled.unwrap_or(0.0).max(0.0);
    let slots = configured.max_concurrency as f64;
    // `cost` (`capped` when it acts). A replica's GPUs a second: cost does nothing without a
    // price for them (`gpus: 0`, a price that does not parse) or a slot count to weigh demand
    // in.
    let replica_price = policy
        .cost
        .as_ref()
        .and_then(|c| c.gpu_hour_price())
        .map(|p| p * f64::from(configured.gpus) / 3600.0)
        .filter(|p| *p > 0.0 && slots > 0.0);
    let cost_mode = policy
        .cost
        .as_ref()
        .filter(|_| policy.burst.mode == BurstMode::Saturated && replica_price.is_some())
        .map_or(SignalMode::Disabled, |c| c.mode);
    let capped = cost_mode == SignalMode::Active;
    // Until the providers' price is known, spilled demand buys no GPU under it.
    let unmeasured = observed.provider_price == ProviderPrice::Unmeasured;
    let spilled = if capped && unmeasured { 0.0 } else { spilled };

    let queues: Vec<f64> = observed
        .ready
        .iter()
        .filter_map(|p| p.queue_depth)
        .collect();
    let gpus: Vec<f64> = observed.ready.iter().filter_map(|p| p.gpu_memory).collect();
    let in_flight: Vec<f64> = observed.ready.iter().filter_map(|p| p.in_flight).collect();

    let queue = configured
        .queue_depth
        .then(|| {
            read_signal(
                &queues,
                router_queue,
                ready,
                policy.targets.queue_depth_per_replica,
                policy.tolerance,
                current,
            )
        })
        .flatten();
    // Occupancy (GPU memory, concurrency) over `occupancyWindowSeconds`.
    let window_ms = Millis::from(policy.targets.occupancy_window_seconds.max(0)) * 1000;
    let mut occupancy = history.occupancy.clone();
    let average = |reading: Option<SignalReading>, series: &mut Samples, target: f64| {
        averaged(
            reading,
            series,
            (now, window_ms),
            ready,
            (target, policy.tolerance, current),
        )
    };
    let gpu = configured
        .gpu_memory
        .then(|| {
            read_signal(
                &gpus,
                0.0,
                ready,
                policy.targets.gpu_memory_utilization,
                policy.tolerance,
                current,
            )
        })
        .flatten();
    let over = |s: &Option<SignalReading>| {
        s.as_ref()
            .is_some_and(|s| s.per_replica > s.target * (1.0 + policy.tolerance))
    };
    // Capacity is exhausted on what is seen now, not on a mean that lags it.
    let gpu_over_now = over(&gpu);
    let gpu = average(
        gpu,
        &mut occupancy.gpu_memory,
        policy.targets.gpu_memory_utilization,
    );

    // Engines full to maxConcurrency, plus what the routers spilled: demand a fast provider
    // hides from the queue. An engine without an in-flight gauge counts as full while requests
    // spill (the routers spill only when every local slot is taken, or capacity is exhausted).
    let concurrency = if slots <= 0.0 {
        None
    } else if !in_flight.is_empty() {
        read_signal(&in_flight, spilled, ready, slots, policy.tolerance, current)
    } else if spilled > 0.0 {
        read_signal(
            &vec![slots; ready],
            spilled,
            ready,
            slots,
            policy.tolerance,
            current,
        )
    } else {
        None
    };
    let concurrency_over_now = over(&concurrency);
    let concurrency = average(concurrency, &mut occupancy.concurrency, slots);

    // The replicas worth their GPUs for `demand` replicas' worth (`cost`), minReplicas at least.
    let worth_for = |demand: f64| {
        let ProviderPrice::PerSlotSecond(per_slot) = observed.provider_price else {
            return None;
        };
        let prices = Prices {
            replica: replica_price?,
            provider: per_slot * slots,
        };
        let local_only = observed.local_only.unwrap_or(0.0) / slots;
        (cost_mode != SignalMode::Disabled)
            .then(|| worth(demand, local_only, prices, policy.tolerance))
            .flatten()
            .map(|w| Worth {
                replicas: w.replicas.max(min),
                keep: w.keep.max(min),
                ..w
            })
    };
    // A signal's reading in replicas' worth of demand.
    let replicas_worth = |s: &SignalReading| s.per_replica * ready as f64 / s.target;
    let cost = concurrency
        .as_ref()
        .and_then(|c| worth_for(replicas_worth(c)));
    // `n` replicas asked for `demand` replicas' worth, no more than are worth their GPUs.
    let within_cost = |n: i32, demand: f64| match worth_for(demand) {
        Some(w) if capped => n.min(w.replicas),
        _ => n,
    };

    // Which data is missing: a configured signal without any value, or a ready pod without one.
    let pod_complete = |p: &PodSample| {
        (!configured.queue_depth || p.queue_depth.is_some())
            && (!configured.gpu_memory || p.gpu_memory.is_some())
    };
    let responding = observed.ready.iter().filter(|p| pod_complete(p)).count();
    let any_signal = configured.queue_depth || configured.gpu_memory;
    let metrics = if ready == 0 {
        MetricsState::NoReadyPods
    } else if queue.is_none() && gpu.is_none() {
        MetricsState::Unavailable
    } else if responding < ready
        || (configured.queue_depth && queue.is_none())
        || (configured.gpu_memory && gpu.is_none())
    {
        MetricsState::Partial { responding, ready }
    } else {
        MetricsState::Complete
    };

    // 1–2. Per-signal desire; the max over signals with data.
    let mut raw = current;
    let mut driver = Driver::Steady;
    let mut signal = None;
    let mut reason = String::new();
    // Each signal's desire, the signal it names (or Steady within tolerance), and why.
    let candidate = |s: &SignalReading, signal: Driver, why: String| {
        let named = if s.within_tolerance {
            Driver::Steady
        } else {
            signal
        };
        (s.desired, named, why)
    };
    let mut candidates: Vec<(i32, Driver, String)> = Vec::new();
    // Occupancy asks for no more replicas than its demand makes worth their GPUs (`cost:
    // Active`), keeps those running within tolerance of it, and, while more requests wait for
    // a local slot than the queue target allows (they may be unable to leave), not fewer
    // than now.
    let queue_over = over(&queue);
    let cost_caps = |s: &SignalReading, (d, named, why): (i32, Driver, String)| {
        let floor = if queue_over { current } else { 0 };
        match worth_for(replicas_worth(s)) {
            Some(w) if capped => {
                let cap = w.replicas.max(current.min(w.keep)).max(floor);
                if d > cap {
                    (cap, Driver::Cost, format!("{why}, held at {cap} by cost"))
                } else {
                    (d, named, why)
                }
            }
            _ => (d, named, why),
        }
    };
    candidates.extend(queue.as_ref().map(|q| {
        let why = format!(
            "queue depth {}/{} per replica",
            fmt_num(q.per_replica),
            fmt_num(q.target)
        );
        candidate(q, Driver::QueueDepth, why)
    }));
    candidates.extend(gpu.as_ref().map(|g| {
        let why = format!(
            "GPU memory {:.0}%/{:.0}% per replica",
            g.per_replica * 100.0,
            g.target * 100.0
        );
        cost_caps(g, candidate(g, Driver::GpuMemory, why))
    }));
    candidates.extend(concurrency.as_ref().map(|c| {
        let of_it = if spilled > 0.0 {
            format!(" ({} spilled to providers)", fmt_num(spilled))
        } else {
            String::new()
        };
        let why = format!(
            "concurrency {}/{} per replica{of_it}",
            fmt_num(c.per_replica),
            fmt_num(c.target)
        );
        cost_caps(c, candidate(c, Driver::Concurrency, why))
    }));
    // The latency objective: more replicas in proportion above a target, none fewer while
    // above it at all; below it, no opinion (demand decides scale-down).
    let (latency_series, ttft_ms) = latency_window(policy, observed, history, now);
    // The window's answers were measured on as few replicas as it saw ready: in proportion to
    // those. Replicas that became ready since have not shown in it yet, and asking again in
    // proportion to them would compound the same slow answers.
    let measured_on = latency_series
        .iter()
        .map(|(_, r, _)| *r)
        .min()
        .unwrap_or(ready)
        .min(ready);
    for &(name, q_ms, target) in &ttft_ms {
        let ratio = q_ms / target;
        if ratio <= 1.0 || ready == 0 {
            continue;
        }
        let why = format!(
            "time to first token {name} {}/{} ms",
            fmt_num(q_ms.round()),
            fmt_num(target)
        );
        if ratio > 1.0 + policy.tolerance {
            // Of the ready replicas: ones still loading are already on their way.
            let d = (measured_on as f64 * ratio)
                .ceil()
                .min(i32::MAX as f64 / 2.0) as i32;
            candidates.push((d.max(current), Driver::TimeToFirstToken, why));
        } else {
            candidates.push((current, Driver::Steady, why));
        }
    }
    if let Some((d, drv, why)) = candidates.iter().max_by_key(|(d, _, _)| *d).cloned() {
        raw = d;
        driver = drv;
        signal = (drv != Driver::Steady && d != current).then_some(drv);
        reason = candidates
            .iter()
            .map(|(_, _, w)| w.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if drv == Driver::Steady {
            reason = format!("steady: {reason}");
        } else {
            reason = format!("{why} ({reason})");
            if let MetricsState::Partial { responding, ready } = metrics {
                reason.push_str(&format!("; {responding} of {ready} ready pods reported"));
            }
        }
    }

    if let Some(w) = cost {
        let acts = if capped { "" } else { " (advisory)" };
        reason = format!(
            "{reason}; cost: replicas worth their GPUs {} (one pays at {:.0}% busy){acts}",
            w.replicas,
            w.break_even * 100.0
        );
    } else if cost_mode != SignalMode::Disabled {
        match observed.provider_price {
            ProviderPrice::Unmeasured if capped => reason.push_str(
                "; cost: no provider price measured yet, spilled demand buys no GPU until one is",
            ),
            ProviderPrice::Unpriced => {
                reason.push_str("; cost: no provider has pricing, so all demand counts")
            }
            _ => {}
        }
    }

    match metrics {
        MetricsState::NoReadyPods => {
            // Nothing to measure; only the routers' queue and spill can ask for more. Never
            // scale down.
            let from_queue = (router_queue / policy.targets.queue_depth_per_replica).ceil() as i32;
            let from_spill = if slots > 0.0 {
                within_cost((spilled / slots).ceil() as i32, spilled / slots)
            } else {
                0
            };
            raw = current.max(from_queue).max(from_spill);
            (driver, reason) = if from_queue > current && from_queue >= from_spill {
                (
                    Driver::QueueDepth,
                    format!(
                        "no replica ready yet; {} requests queued in routers",
                        fmt_num(router_queue)
                    ),
                )
            } else if from_spill > current {
                (
                    Driver::Concurrency,
                    format!(
                        "no replica ready yet; {} slots of demand spilled to providers",
                        fmt_num(spilled)
                    ),
                )
            } else {
                (Driver::ColdStart, "no replica ready yet".into())
            };
            signal = matches!(driver, Driver::QueueDepth | Driver::Concurrency).then_some(driver);
        }
        MetricsState::Unavailable if any_signal => {
            driver = Driver::MetricsUnavailable;
            signal = None;
            match policy.metrics_unavailable {
                MetricsUnavailable::Hold => {
                    raw = current;
                    reason = format!(
                        "metrics unavailable from all {ready} ready pods; holding {current}"
                    );
                }
                MetricsUnavailable::ScaleUp => {
                    raw = max;
                    reason = format!(
                        "metrics unavailable from all {ready} ready pods; scaling up to {max}"
                    );
                }
            }
        }
        _ => {}
    }
    let unclamped = raw;

    // Missing data is never a reason to scale down; starting pods are not thrown away mid-load.
    let no_scale_down = !matches!(metrics, MetricsState::Complete)
        || observed.starting > 0
        || observed.spill_incomplete;
    if no_scale_down && raw < current {
        raw = current;
        if driver != Driver::MetricsUnavailable {
            driver = Driver::Stabilized;
            reason = format!(
                "{reason}; no scale-down while metrics (or a router's spill) are incomplete or replicas are starting"
            );
        }
    }

    // The forecast (`predictive`): the demand one horizon ahead, in replicas. `Active` asks for
    // at least that many (and so never scales down below it); `Advisory` only says so.
    let predictive = policy
        .predictive
        .as_ref()
        .filter(|p| p.mode != SignalMode::Disabled && slots > 0.0);
    // Demand in engine slots: what runs, what spilled, what waits.
    let demand = (!in_flight.is_empty() && ready == in_flight.len())
        .then(|| in_flight.iter().sum::<f64>() + spilled + router_queue);
    let mut demand_series = Samples::new();
    let mut forecast_replicas = None;
    if let Some(p) = predictive {
        demand_series = history.demand.clone();
        if let Some(d) = demand {
            demand_series.push_back((now, d));
        }
        while demand_series
            .front()
            .is_some_and(|(t, _)| *t < now - KEEP_MS)
        {
            demand_series.pop_front();
        }
        let horizon = p
            .horizon_seconds
            .map(|s| Millis::from(s) * 1000)
            .or(observed.cold_start_ms)
            .unwrap_or(DEFAULT_HORIZON_MS);
        if let Some(f) = forecast(&demand_series, now, horizon) {
            let n = within_cost((f / slots).ceil() as i32, f / slots);
            forecast_replicas = Some((n, horizon / 1000));
            let said = format!(
                "forecast {} slots in {}s: {n} replicas",
                fmt_num(f.round()),
                horizon / 1000
            );
            match p.mode {
                SignalMode::Active if n > raw && !matches!(metrics, MetricsState::Unavailable) => {
                    raw = n;
                    driver = Driver::Forecast;
                    signal = (n != current).then_some(Driver::Forecast);
                    reason = format!("{said} ({reason})");
                }
                SignalMode::Advisory => {
                    reason = format!("{reason}; {said} (advisory: would ask for {})", raw.max(n));
                }
                _ => {}
            }
        }
    }

    // 3. Stabilise (HPA's rule): up takes the lowest, down the highest recent recommendation.
    let up = policy.scale_up.rules();
    let down = policy.scale_down.rules();
    let mut hist = history.clone();
    let keep_recs = (up
        .stabilization_window_seconds
        .max(down.stabilization_window_seconds) as i64)
        * 1000;
    let keep_events = (up.period_seconds.max(down.period_seconds) as i64) * 1000;
    hist.prune(now, keep_recs, keep_events);
    let up_cutoff = now - up.stabilization_window_seconds as i64 * 1000;
    let down_cutoff = now - down.stabilization_window_seconds as i64 * 1000;
    let mut up_rec = raw;
    let mut down_rec = raw;
    for &(t, r) in &hist.recommendations {
        if t >= up_cutoff {
            up_rec = up_rec.min(r);
        }
        if t >= down_cutoff {
            down_rec = down_rec.max(r);
        }
    }
    if let Some((t, r)) = hist.started_with
        && t >= down_cutoff
    {
        down_rec = down_rec.max(r);
    }
    hist.recommendations.push_back((now, raw));
    hist.demand = demand_series;
    hist.latency = latency_series;
    hist.occupancy = occupancy;
    let mut desired = current;
    if desired < up_rec {
        desired = up_rec;
    }
    if desired > down_rec {
        desired = down_rec;
    }
    if desired != raw && driver != Driver::MetricsUnavailable {
        driver = Driver::Stabilized;
        reason = format!("{reason}; held at {desired} by the stabilisation window (wanted {raw})");
    }

    // 4. Rate limits per period, relative to the count at the period's start.
    if desired > current {
        let added = hist.changed_since(now - up.period_seconds as i64 * 1000, 1);
        let base = (current - added).max(0);
        let limit = (base + allowed_change(base, &up)).max(current);
        if desired > limit {
            reason = format!(
                "{reason}; limited to +{} per {}s",
                limit - current,
                up.period_seconds
            );
            desired = limit;
            driver = Driver::RateLimited;
        }
    } else if desired < current {
        let removed = hist.changed_since(now - down.period_seconds as i64 * 1000, -1);
        let base = current + removed;
        let limit = (base - allowed_change(base, &down)).min(current);
        if desired < limit {
            reason = format!(
                "{reason}; limited to -{} per {}s",
                current - limit,
                down.period_seconds
            );
            desired = limit;
            driver = Driver::RateLimited;
        }
    }

    // Bounds, then launch over-provisioning.
    if desired < min {
        desired = min;
        driver = Driver::MinReplicas;
        reason = format!("{reason}; at minReplicas {min}");
    }
    if desired > max {
        desired = max;
        driver = Driver::MaxReplicas;
        reason = format!("{reason}; capped at maxReplicas {max}");
    }
    if let Some(l) = &policy.launch
        && now < observed.created_at + l.duration_seconds as i64 * 1000
        && desired < l.replicas.min(max)
    {
        desired = l.replicas.min(max);
        driver = Driver::Launch;
        reason = format!("{reason}; launch window keeps {desired}");
    }
    let reason = reason.trim_start_matches("; ").to_string();

    // 6. Capacity.
    let saturated = over(&queue) || gpu_over_now || concurrency_over_now;
    let exhausted = if observed.unschedulable > 0 {
        Some(ExhaustedReason::Unschedulable)
    } else if unclamped > max {
        Some(ExhaustedReason::MaxReplicas)
    } else if observed.starting > 0 && (saturated || ready == 0) {
        Some(ExhaustedReason::ColdStart)
    } else {
        None
    };

    let sum = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>());
    Decision {
        desired,
        unclamped,
        driver,
        signal,
        reason,
        metrics,
        exhausted,
        queue_depth: sum(&queues)
            .map(|q| q + router_queue)
            .or(observed.router_queue),
        in_flight: sum(&in_flight),
        gpu_memory: (!gpus.is_empty()).then(|| gpus.iter().sum::<f64>() / gpus.len() as f64),
        spilled: observed.spilled,
        forecast: forecast_replicas,
        cost,
        ttft_ms: ttft_ms.iter().map(|&(n, ms, _)| (n, ms)).collect(),
        history: hist,
    }
}

/// `reading` as the mean of its totals over the last `window_ms` (this tick's added to
/// `series`); as it is without a window. `(target, tolerance, current)` as for [`read_signal`].
fn averaged(
    reading: Option<SignalReading>,
    series: &mut Samples,
    (now, window_ms): (Millis, Millis),
    ready: usize,
    (target, tolerance, current): (f64, f64, i32),
) -> Option<SignalReading> {
    if window_ms <= 0 {
        series.clear();
        return reading;
    }
    let r = reading?;
    series.push_back((now, r.per_replica * ready as f64));
    while series.front().is_some_and(|(t, _)| *t <= now - window_ms) {
        series.pop_front();
    }
    let mean = series.iter().map(|(_, v)| v).sum::<f64>() / series.len() as f64;
    read_signal(
        &[mean / ready as f64],
        0.0,
        ready,
        target,
        tolerance,
        current,
    )
}

/// The objective's window with this tick's answers added, and each quantile it names that
/// had enough answers: (name, measured, target), in milliseconds. Empty without an objective.
fn latency_window(
    policy: &ScalingPolicySpec,
    observed: &Observed,
    history: &History,
    now: Millis,
) -> (LatencySeries, Vec<(&'static str, f64, f64)>) {
    let Some(o) = policy.targets.time_to_first_token_milliseconds.as_ref() else {
        return Default::default();
    };
    let mut series = history.latency.clone();
    if let Some(b) = &observed.ttft {
        series.push_back((now, observed.ready.len(), b.clone()));
    }
    let from = now - Millis::from(o.window_seconds.max(1)) * 1000;
    while series.front().is_some_and(|(t, _, _)| *t <= from) {
        series.pop_front();
    }
    let mut window = Buckets::default();
    for (_, _, b) in &series {
        window.add(b);
    }
    let measured = o
        .targets()
        .filter(|(_, q, _)| window.count() >= min_samples(*q))
        .filter_map(|(name, q, target)| {
            window
                .quantile(q)
                .map(|s| (name, s * 1000.0, target as f64))
        })
        .collect();
    (series, measured)
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.desired, self.reason)
    }
}
