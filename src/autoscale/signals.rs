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

use super::promtext::{ParseError, Sample, for_each_sample};
use crate::api::{EngineMetrics, GpuMemoryMetric, MetricSelector, MetricsPreset};

/// The gauge the router exposes for requests queued in it.
pub const ROUTER_QUEUE_METRIC: &str = "spillway_router_queue_length";
/// The router's in-flight gauge, by `destination` (`local` or a provider name). What is in
/// flight at providers is demand the engines could not take; it counts into queue depth so the
/// autoscaler sees what burst absorbed.
pub const ROUTER_IN_FLIGHT_METRIC: &str = "spillway_router_in_flight";

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

/// The router's overflow: its queue length plus its requests in flight at burst providers
/// (each summed over series). `None` if the queue gauge is absent (not a spillway router); an
/// absent burst gauge (no providers) adds nothing.
pub fn router_queue(text: &str) -> Result<Option<f64>, ParseError> {
    let mut queue = Sum::default();
    let mut burst = Sum::default();
    for_each_sample(text, |s| {
        if s.name == ROUTER_QUEUE_METRIC {
            queue.add(s.value);
        } else if s.name == ROUTER_IN_FLIGHT_METRIC
            && s.label("destination").is_some_and(|d| !d.matches("local"))
        {
            burst.add(s.value);
        }
    })?;
    Ok(queue.get().map(|q| q + burst.get().unwrap_or(0.0)))
}

#[cfg(test)]
mod tests;
