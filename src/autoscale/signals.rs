//! Per-pod scaling signals read from an engine's metrics page.
//!
//! Preset metric names, checked against each engine's documentation:
//! - vLLM (docs.vllm.ai "Production Metrics", `docs/design/metrics.md`):
//!   `vllm:num_requests_waiting`, `vllm:num_requests_running`, and the KV-cache fraction
//!   `vllm:kv_cache_usage_perc` (V1) or `vllm:gpu_cache_usage_perc` (V0, later hidden).
//! - SGLang (`docs/references/production_metrics.md`): `sglang:num_queue_reqs`,
//!   `sglang:num_running_reqs`, `sglang:token_usage`.
//! - TGI (huggingface.co/docs/text-generation-inference/reference/metrics): `tgi_queue_size`,
//!   `tgi_batch_current_size`; no GPU memory gauge.
//! - Triton (`docs/user_guide/metrics.md`): `nv_inference_pending_request_count` (per model),
//!   `nv_gpu_memory_used_bytes` / `nv_gpu_memory_total_bytes` (per GPU, `gpu_uuid` label).
//! - DCGM exporter (`etc/default-counters.csv`): `DCGM_FI_DEV_FB_USED`, `DCGM_FI_DEV_FB_FREE`
//!   in MiB, per GPU.
//!
//! Rules, because a wrong number here scales real GPUs:
//! - A metric absent from the page gives `None`, never 0.
//! - Every series matching a selector is summed (several models, engines or GPUs).
//! - If any matching series is NaN, infinite or negative, the signal is `None`: dropping that
//!   series would under-count and could cause a scale-down.
//! - GPU memory is a fraction clamped to [0, 1]; a used/total pair with no positive total is `None`.

use std::collections::BTreeMap;

use super::cost::ProviderPrice;
use super::latency::{Buckets, ROUTER_TTFT_METRIC};
use super::promtext::{ParseError, Sample, for_each_sample};
use crate::api::{EngineMetrics, GpuMemoryMetric, MetricSelector, MetricsPreset};

/// A router's answers by revision and outcome (`ok`, `error`): the rollout gate's input.
pub const REVISION_REQUESTS_METRIC: &str = "spillway_router_revision_requests_total";
/// A router's time to first token by revision, in the gate's buckets (`rollout::gate`).
pub const REVISION_TTFT_METRIC: &str = "spillway_router_revision_time_to_first_token_seconds";
/// The gauge the router exposes for requests queued in it.
pub const ROUTER_QUEUE_METRIC: &str = "spillway_router_queue_length";
/// The router's histogram of how long requests held a slot, by `destination` (`local` or a
/// provider name): its count and sum give the spilled demand ([`spilled_slots`]).
pub const ROUTER_SLOT_METRIC: &str = "spillway_router_slot_duration_seconds";

/// The router's answers by destination, request class and outcome.
pub const ROUTER_REQUESTS_METRIC: &str = "spillway_router_requests_total";
/// What the router's providers charged (usage times the configured pricing).
pub const ROUTER_SPEND_METRIC: &str = "spillway_router_provider_spend_total";

/// The DCGM exporter's framebuffer gauges (MiB).
pub const DCGM_FB_USED: &str = "DCGM_FI_DEV_FB_USED";
/// Free framebuffer; DCGM's default counters have no total, so total = used + free.
pub const DCGM_FB_FREE: &str = "DCGM_FI_DEV_FB_FREE";

/// A metric name plus labels that must all match (values compared unescaped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl Matcher {
    /// Any series of `name`.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            labels: Vec::new(),
        }
    }

    /// Whether `s` is one of the series this matcher selects.
    pub fn matches(&self, s: &Sample<'_>) -> bool {
        s.name == self.name
            && self
                .labels
                .iter()
                .all(|(k, v)| s.label(k).is_some_and(|lv| lv.matches(v)))
    }
}

impl From<&MetricSelector> for Matcher {
    fn from(m: &MetricSelector) -> Self {
        Self {
            name: m.name.clone(),
            labels: m
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// Where the GPU memory fraction comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuMemorySource {
    /// A gauge already in [0, 1]; if `primary` has no series, `fallback` is read instead
    /// (vLLM renamed its gauge).
    Fraction {
        primary: Matcher,
        fallback: Option<Matcher>,
    },
    /// Σused / Σtotal.
    UsedTotal { used: Matcher, total: Matcher },
    /// Σused / (Σused + Σfree), as the DCGM exporter reports it.
    UsedFree { used: Matcher, free: Matcher },
}

impl GpuMemorySource {
    /// DCGM's framebuffer pair, restricted to series with all of `labels`
    /// (e.g. `pod` and `namespace` when the exporter maps GPUs to pods).
    pub fn dcgm(labels: &[(&str, &str)]) -> Self {
        let with = |name: &str| Matcher {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        Self::UsedFree {
            used: with(DCGM_FB_USED),
            free: with(DCGM_FB_FREE),
        }
    }
}

/// Which series feed each signal; `None` means the signal is not configured at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalSelectors {
    pub queue_depth: Option<Matcher>,
    pub in_flight: Option<Matcher>,
    pub gpu_memory: Option<GpuMemorySource>,
}

impl SignalSelectors {
    /// The metric names of a known engine.
    pub fn preset(preset: MetricsPreset) -> Self {
        let m = Matcher::named;
        match preset {
            MetricsPreset::Vllm => Self {
                queue_depth: Some(m("vllm:num_requests_waiting")),
                in_flight: Some(m("vllm:num_requests_running")),
                gpu_memory: Some(GpuMemorySource::Fraction {
                    primary: m("vllm:kv_cache_usage_perc"),
                    fallback: Some(m("vllm:gpu_cache_usage_perc")),
                }),
            },
            MetricsPreset::Sglang => Self {
                queue_depth: Some(m("sglang:num_queue_reqs")),
                in_flight: Some(m("sglang:num_running_reqs")),
                gpu_memory: Some(GpuMemorySource::Fraction {
                    primary: m("sglang:token_usage"),
                    fallback: None,
                }),
            },
            MetricsPreset::Tgi => Self {
                queue_depth: Some(m("tgi_queue_size")),
                in_flight: Some(m("tgi_batch_current_size")),
                gpu_memory: None,
            },
            MetricsPreset::Triton => Self {
                queue_depth: Some(m("nv_inference_pending_request_count")),
                in_flight: None,
                gpu_memory: Some(GpuMemorySource::UsedTotal {
                    used: m("nv_gpu_memory_used_bytes"),
                    total: m("nv_gpu_memory_total_bytes"),
                }),
            },
        }
    }

    /// Replaces the GPU memory source (e.g. with [`GpuMemorySource::dcgm`]).
    pub fn with_gpu_memory(mut self, source: GpuMemorySource) -> Self {
        self.gpu_memory = Some(source);
        self
    }

    pub fn has_queue_depth(&self) -> bool {
        self.queue_depth.is_some()
    }

    pub fn has_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    pub fn has_gpu_memory(&self) -> bool {
        self.gpu_memory.is_some()
    }
}

/// The selectors for an engine: its preset, with each explicit override taking precedence.
///
/// A `gpuMemory` override with `used` but no `total` (rejected by the CRD's CEL rules) leaves
/// the preset's source in place.
pub fn selectors(m: &EngineMetrics) -> SignalSelectors {
    let mut sel = SignalSelectors::preset(m.preset);
    if let Some(q) = &m.queue_depth {
        sel.queue_depth = Some(q.into());
    }
    if let Some(f) = &m.in_flight {
        sel.in_flight = Some(f.into());
    }
    if let Some(g) = m.gpu_memory.as_ref().and_then(gpu_override) {
        sel.gpu_memory = Some(g);
    }
    sel
}

fn gpu_override(g: &GpuMemoryMetric) -> Option<GpuMemorySource> {
    if let Some(f) = &g.fraction {
        return Some(GpuMemorySource::Fraction {
            primary: f.into(),
            fallback: None,
        });
    }
    match (&g.used, &g.total) {
        (Some(used), Some(total)) => Some(GpuMemorySource::UsedTotal {
            used: used.into(),
            total: total.into(),
        }),
        _ => None,
    }
}

/// The three numbers the autoscaler reads from one pod. `None` = not on the page (or unusable).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PodSignals {
    /// Requests waiting in the engine.
    pub queue_depth: Option<f64>,
    /// Requests being processed.
    pub in_flight: Option<f64>,
    /// GPU (KV-cache) memory in use, in [0, 1].
    pub gpu_memory: Option<f64>,
}

/// Sum of the matching series; remembers whether any was seen and whether any was unusable.
#[derive(Debug, Clone, Copy, Default)]
struct Sum {
    total: f64,
    seen: bool,
    bad: bool,
}

impl Sum {
    fn add(&mut self, v: f64) {
        self.seen = true;
        if v.is_finite() && v >= 0.0 {
            self.total += v;
        } else {
            self.bad = true;
        }
    }

    fn get(&self) -> Option<f64> {
        (self.seen && !self.bad).then_some(self.total)
    }
}

fn add_if(m: Option<&Matcher>, s: &Sample<'_>, sum: &mut Sum) {
    if m.is_some_and(|m| m.matches(s)) {
        sum.add(s.value);
    }
}

/// Reads `sel`'s signals from one metrics page in a single pass.
pub fn extract(text: &str, sel: &SignalSelectors) -> Result<PodSignals, ParseError> {
    let (mut queue, mut running, mut a, mut b) = (
        Sum::default(),
        Sum::default(),
        Sum::default(),
        Sum::default(),
    );
    // `a`/`b` hold primary/fallback, used/total or used/free depending on the source.
    let (ma, mb) = match &sel.gpu_memory {
        None => (None, None),
        Some(GpuMemorySource::Fraction { primary, fallback }) => (Some(primary), fallback.as_ref()),
        Some(GpuMemorySource::UsedTotal { used, total }) => (Some(used), Some(total)),
        Some(GpuMemorySource::UsedFree { used, free }) => (Some(used), Some(free)),
    };
    for_each_sample(text, |s| {
        add_if(sel.queue_depth.as_ref(), &s, &mut queue);
        add_if(sel.in_flight.as_ref(), &s, &mut running);
        add_if(ma, &s, &mut a);
        add_if(mb, &s, &mut b);
    })?;
    let gpu_memory = match &sel.gpu_memory {
        None => None,
        Some(GpuMemorySource::Fraction { .. }) => {
            if a.seen {
                a.get()
            } else {
                b.get()
            }
        }
        Some(GpuMemorySource::UsedTotal { .. }) => ratio(a.get(), b.get()),
        Some(GpuMemorySource::UsedFree { .. }) => match (a.get(), b.get()) {
            (Some(used), Some(free)) => ratio(Some(used), Some(used + free)),
            _ => None,
        },
    };
    Ok(PodSignals {
        queue_depth: queue.get(),
        in_flight: running.get(),
        gpu_memory: gpu_memory.map(|f| f.clamp(0.0, 1.0)),
    })
}

fn ratio(used: Option<f64>, total: Option<f64>) -> Option<f64> {
    match (used, total) {
        (Some(u), Some(t)) if t > 0.0 => Some(u / t),
        _ => None,
    }
}

/// What the autoscaler reads from one router's metrics page.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouterSample {
    /// Requests waiting for a local engine slot.
    pub queue: f64,
    /// Slots released since the router started, and the seconds they were held: at local
    /// engines, and at providers (all of them).
    pub local: SlotTotals,
    pub spilled: SlotTotals,
    /// Time to first token of streamed answers from local engines since the router started;
    /// `None` when the page has no usable such histogram (none yet, an older router, or a
    /// malformed one).
    pub local_ttft: Option<Buckets>,
    /// What each revision's engines answered since the router started (during rollouts).
    pub revisions: BTreeMap<String, RevisionTotals>,
    /// What providers charged since the router started, and for how many answers (their
    /// successful ones: errors are not charged).
    pub spend: f64,
    pub provider_answered: f64,
    /// Requests answered by local engines since the router started, by request class.
    pub local_by_class: BTreeMap<String, f64>,
    /// Requests waiting for a local slot now, by request class.
    pub queue_by_class: BTreeMap<String, f64>,
}

/// One revision's answers as a router counts them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RevisionTotals {
    pub requests: f64,
    pub errors: f64,
    pub client_errors: f64,
    /// Time to first token of streamed answers; `None` when unusable or absent.
    pub ttft: Option<Buckets>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SlotTotals {
    pub count: f64,
    pub seconds: f64,
}

/// Reads a router's page. `None` if the queue gauge is absent (not a spillway router) or any
/// value read is NaN, infinite or negative; an absent slot histogram (nothing served yet) reads 0.
pub fn router_sample(text: &str) -> Result<Option<RouterSample>, ParseError> {
    let count = format!("{ROUTER_SLOT_METRIC}_count");
    let sum = format!("{ROUTER_SLOT_METRIC}_sum");
    let ttft = format!("{ROUTER_TTFT_METRIC}_bucket");
    let mut queue = Sum::default();
    let mut bad = false;
    let mut out = RouterSample::default();
    let mut ttft_pairs: Vec<(f64, f64)> = Vec::new();
    let mut ttft_bad = false;
    let rev_ttft = format!("{REVISION_TTFT_METRIC}_bucket");
    // By revision: its bucket pairs, or `None` once one was unusable.
    let mut rev_pairs: BTreeMap<String, Option<Vec<(f64, f64)>>> = BTreeMap::new();
    for_each_sample(text, |s| {
        let class = || s.label("class").map(|c| c.unescaped().into_owned());
        let usable = s.value.is_finite() && s.value >= 0.0;
        if s.name == ROUTER_QUEUE_METRIC {
            queue.add(s.value);
            if let Some(c) = class().filter(|_| usable) {
                *out.queue_by_class.entry(c).or_default() += s.value;
            }
            return;
        }
        if s.name == ROUTER_SPEND_METRIC {
            out.spend += if usable { s.value } else { 0.0 };
            return;
        }
        if s.name == ROUTER_REQUESTS_METRIC && usable {
            let Some(destination) = s.label("destination") else {
                return;
            };
            if destination.matches("local") {
                if let Some(c) = class() {
                    *out.local_by_class.entry(c).or_default() += s.value;
                }
            } else if s.label("outcome").is_some_and(|o| o.matches("success")) {
                out.provider_answered += s.value;
            }
            return;
        }
        if s.name == REVISION_REQUESTS_METRIC || s.name == rev_ttft {
            let Some(rev) = s.label("revision").map(|r| r.unescaped().into_owned()) else {
                return;
            };
            let usable = s.value.is_finite() && s.value >= 0.0;
            if s.name == REVISION_REQUESTS_METRIC {
                let t = out.revisions.entry(rev).or_default();
                let v = if usable { s.value } else { 0.0 };
                t.requests += v;
                if s.label("outcome").is_some_and(|o| o.matches("error")) {
                    t.errors += v;
                }
                if s.label("outcome")
                    .is_some_and(|o| o.matches("client_error"))
                {
                    t.client_errors += v;
                }
            } else {
                let le = s.label("le").and_then(|l| parse_le(&l.unescaped()));
                let pairs = rev_pairs.entry(rev).or_insert_with(|| Some(Vec::new()));
                match (le, pairs.as_mut()) {
                    (Some(le), Some(p)) if usable => p.push((le, s.value)),
                    _ => *pairs = None,
                }
            }
            return;
        }
        if s.name == ttft {
            if s.label("destination").is_some_and(|d| d.matches("local")) {
                let le = s.label("le").and_then(|l| parse_le(&l.unescaped()));
                match le {
                    Some(le) if s.value.is_finite() && s.value >= 0.0 => {
                        ttft_pairs.push((le, s.value))
                    }
                    _ => ttft_bad = true,
                }
            }
            return;
        }
        if s.name != count && s.name != sum {
            return;
        }
        if !(s.value.is_finite() && s.value >= 0.0) {
            bad = true;
            return;
        }
        let totals = if s.label("destination").is_some_and(|d| d.matches("local")) {
            &mut out.local
        } else {
            &mut out.spilled
        };
        if s.name == count {
            totals.count += s.value;
        } else {
            totals.seconds += s.value;
        }
    })?;
    // An unusable histogram is no latency reading; the queue and the spill still count.
    if !ttft_pairs.is_empty() && !ttft_bad {
        out.local_ttft = Buckets::from_cumulative(ttft_pairs);
    }
    for (rev, pairs) in rev_pairs {
        out.revisions.entry(rev).or_default().ttft = pairs.and_then(Buckets::from_cumulative);
    }
    Ok(queue
        .get()
        .filter(|_| !bad)
        .map(|q| RouterSample { queue: q, ..out }))
}

fn parse_le(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        _ => s.parse::<f64>().ok().filter(|v| v.is_finite()),
    }
}

impl SlotTotals {
    /// The mean time a slot was held, in seconds; `None` before one was released.
    fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.seconds / self.count)
    }
}

/// What providers charged for the requests that would hold one local engine slot for a
/// second, over all the routers measured since they started: their spend per answer over a
/// local request's hold time. `None` before a provider and a local engine each answered, or
/// while nothing was charged.
pub fn provider_per_slot<'a>(samples: impl IntoIterator<Item = &'a RouterSample>) -> Option<f64> {
    let (mut spend, mut sent, mut local) = (0.0, 0.0, SlotTotals::default());
    for s in samples {
        spend += s.spend;
        sent += s.provider_answered;
        local.count += s.local.count;
        local.seconds += s.local.seconds;
    }
    let hold = local.mean()?;
    (spend > 0.0 && sent > 0.0 && hold > 0.0).then(|| spend / sent / hold)
}

/// What the providers charge, as the routers' pages tell (`priced`: some provider of the
/// service has `pricing`). Providers that answered without anything charged are unpriced,
/// whatever the configuration says: their spill would otherwise wait for a price forever.
pub fn provider_price(samples: &[&RouterSample], priced: bool) -> ProviderPrice {
    let charged_nothing =
        samples.iter().all(|s| s.spend == 0.0) && samples.iter().any(|s| s.provider_answered > 0.0);
    match provider_per_slot(samples.iter().copied()) {
        _ if !priced || charged_nothing => ProviderPrice::Unpriced,
        Some(p) => ProviderPrice::PerSlotSecond(p),
        None => ProviderPrice::Unmeasured,
    }
}

/// The demand of `classes` (those that may not burst) at one router, in local engine slots:
/// what they had answered locally per second between two samples times a local request's hold
/// time, plus what of theirs waits now. `None` when the samples cannot be compared.
pub fn local_only_slots(
    prev: &RouterSample,
    prev_ms: i64,
    cur: &RouterSample,
    now_ms: i64,
    classes: &[&str],
) -> Option<f64> {
    let seconds = (now_ms - prev_ms) as f64 / 1000.0;
    if seconds <= 0.0 || cur.local.count < prev.local.count {
        return None;
    }
    let of = |m: &BTreeMap<String, f64>| classes.iter().filter_map(|c| m.get(*c)).sum::<f64>();
    let answered = of(&cur.local_by_class) - of(&prev.local_by_class);
    if answered < 0.0 {
        return None;
    }
    let running = cur.local.mean().map_or(0.0, |h| answered / seconds * h);
    Some(running + of(&cur.queue_by_class))
}

/// The demand one router spilled between two of its samples, in local engine slots: requests
/// sent to providers per second times the seconds a request holds a local engine slot (Little's
/// law: the slots those requests would have kept busy here). The local hold time is the
/// router's mean since it started; before any local request ended, the providers' mean stands in.
/// `None` when the samples cannot be compared (the router restarted, or no time passed).
pub fn spilled_slots(
    prev: &RouterSample,
    prev_ms: i64,
    cur: &RouterSample,
    now_ms: i64,
) -> Option<f64> {
    let seconds = (now_ms - prev_ms) as f64 / 1000.0;
    let sent = cur.spilled.count - prev.spilled.count;
    if seconds <= 0.0 || sent < 0.0 || cur.local.count < prev.local.count {
        return None;
    }
    if sent == 0.0 {
        return Some(0.0);
    }
    let hold = cur
        .local
        .mean()
        .unwrap_or((cur.spilled.seconds - prev.spilled.seconds).max(0.0) / sent);
    Some(sent / seconds * hold)
}
