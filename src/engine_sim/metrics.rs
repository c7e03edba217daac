//! Prometheus metrics under the names of the engine being played (`--preset`).
//!
//! Gauges are set from the model's snapshot at scrape time, so they are exact for that instant.
//! Names follow each engine's documentation: vLLM "Production Metrics", SGLang "Production
//! Metrics", TGI "Metrics" reference, Triton "Metrics" user guide.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::model::Snapshot;
use crate::api::MetricsPreset;

/// OpenMetrics text, which Prometheus scrapes natively.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// One exported series: a family with fixed labels, or a plain metric when there are none
/// (an empty family would render as `name{}`).
enum Series<M> {
    Labelled(Family<Labels, M>, Labels),
    Plain(M),
}

impl<
    M: Default
        + Clone
        + prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
> Series<M>
{
    fn register(registry: &mut Registry, name: &str, help: &str, labels: &Labels) -> Self {
        if labels.is_empty() {
            let m = M::default();
            registry.register(name, help, m.clone());
            Series::Plain(m)
        } else {
            let family = Family::<Labels, M>::default();
            // Create the series now so it is exported (as 0) before the first request.
            let _ = family.get_or_create(labels);
            registry.register(name, help, family.clone());
            Series::Labelled(family, labels.clone())
        }
    }

    fn with(&self, f: impl FnOnce(&M)) {
        match self {
            Series::Labelled(family, labels) => f(&family.get_or_create(labels)),
            Series::Plain(m) => f(m),
        }
    }
}

/// How a request ended, the `outcome` label of `engine_sim_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The client went away before the response finished.
    Cancelled,
    /// Refused because the queue was full.
    Rejected,
    /// Fault injection answered with an error status.
    Failed,
    /// Fault injection closed the connection.
    Dropped,
    Unauthorized,
    /// Bad request: unparsable body, wrong model, body too large.
    Invalid,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Cancelled => "cancelled",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
            Outcome::Dropped => "dropped",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Invalid => "invalid",
        }
    }
}

fn outcome_labels(outcome: Outcome) -> Labels {
    vec![("outcome".to_owned(), outcome.as_str().to_owned())]
}

#[derive(Clone, Copy, Debug)]
enum Signal {
    Waiting,
    Running,
    PeakRunning,
    KvFraction,
    KvUsedBytes,
    KvTotalBytes,
}

pub struct Metrics {
    registry: Registry,
    gauges: Vec<(Signal, Series<FloatGauge>)>,
    requests: Family<Labels, Counter>,
    prompt_tokens: Vec<Series<Counter>>,
    generation_tokens: Vec<Series<Counter>>,
    gpu_memory_bytes: u64,
}

impl Metrics {
    pub fn new(preset: MetricsPreset, model: &str, gpu_memory_bytes: u64) -> Self {
        let mut m = Self {
            registry: Registry::default(),
            gauges: Vec::new(),
            requests: Family::default(),
            prompt_tokens: Vec::new(),
            generation_tokens: Vec::new(),
            gpu_memory_bytes,
        };
        let model_name = vec![("model_name".to_owned(), model.to_owned())];
        match preset {
            MetricsPreset::Vllm => {
                let l = &model_name;
                m.gauge(
                    "vllm:num_requests_waiting",
                    "Number of requests waiting to be processed",
                    Signal::Waiting,
                    l,
                );
                m.gauge(
                    "vllm:num_requests_running",
                    "Number of requests currently running on GPU",
                    Signal::Running,
                    l,
                );
                m.gauge(
                    "vllm:gpu_cache_usage_perc",
                    "GPU KV-cache usage. 1 means 100 percent usage",
                    Signal::KvFraction,
                    l,
                );
                m.gauge(
                    "vllm:kv_cache_usage_perc",
                    "KV-cache usage. 1 means 100 percent usage",
                    Signal::KvFraction,
                    l,
                );
                m.token_counters("vllm:prompt_tokens", "vllm:generation_tokens", l);
            }
            MetricsPreset::Sglang => {
                let l = &model_name;
                m.gauge(
                    "sglang:num_queue_reqs",
                    "The number of requests in the waiting queue",
                    Signal::Waiting,
                    l,
                );
                m.gauge(
                    "sglang:num_running_reqs",
                    "The number of running requests",
                    Signal::Running,
                    l,
                );
                m.gauge(
                    "sglang:token_usage",
                    "The token usage",
                    Signal::KvFraction,
                    l,
                );
                m.token_counters("sglang:prompt_tokens", "sglang:generation_tokens", l);
            }
            MetricsPreset::Tgi => {
                m.gauge(
                    "tgi_queue_size",
                    "Current queue size",
                    Signal::Waiting,
                    &Vec::new(),
                );
                m.gauge(
                    "tgi_batch_current_size",
                    "Current batch size",
                    Signal::Running,
                    &Vec::new(),
                );
            }
            MetricsPreset::Triton => {
                let model_labels = vec![
                    ("model".to_owned(), model.to_owned()),
                    ("version".to_owned(), "1".to_owned()),
                ];
                let gpu = vec![("gpu_uuid".to_owned(), "GPU-engine-sim-0".to_owned())];
                m.gauge(
                    "nv_inference_pending_request_count",
                    "Instantaneous number of pending requests awaiting execution per-model",
                    Signal::Waiting,
                    &model_labels,
                );
                m.gauge(
                    "nv_gpu_memory_used_bytes",
                    "GPU used memory, in bytes",
                    Signal::KvUsedBytes,
                    &gpu,
                );
                m.gauge(
                    "nv_gpu_memory_total_bytes",
                    "GPU total memory, in bytes",
                    Signal::KvTotalBytes,
                    &gpu,
                );
            }
        }
        m.registry.register(
            "engine_sim_requests",
            "Inference requests handled by engine-sim, by outcome",
            m.requests.clone(),
        );
        // Export the success series from the start so rates work before the first request.
        let _ = m.requests.get_or_create(&outcome_labels(Outcome::Success));
        m.gauge(
            "engine_sim_peak_running",
            "The most requests running at once since the start",
            Signal::PeakRunning,
            &Vec::new(),
        );
        // Preset-independent token counters, so tests and dashboards need not know the preset.
        m.token_counters(
            "engine_sim_prompt_tokens",
            "engine_sim_generation_tokens",
            &Vec::new(),
        );
        m
    }

    fn gauge(&mut self, name: &str, help: &str, signal: Signal, labels: &Labels) {
        let series = Series::register(&mut self.registry, name, help, labels);
        self.gauges.push((signal, series));
    }

    fn token_counters(&mut self, prompt: &str, generation: &str, labels: &Labels) {
        let help = "Number of prefill tokens processed";
        let series = Series::register(&mut self.registry, prompt, help, labels);
        self.prompt_tokens.push(series);
        let help = "Number of generation tokens processed";
        let series = Series::register(&mut self.registry, generation, help, labels);
        self.generation_tokens.push(series);
    }

    pub fn record(&self, outcome: Outcome) {
        self.requests.get_or_create(&outcome_labels(outcome)).inc();
    }

    pub fn add_tokens(&self, prompt: u64, generated: u64) {
        for s in &self.prompt_tokens {
            s.with(|c| {
                c.inc_by(prompt);
            });
        }
        for s in &self.generation_tokens {
            s.with(|c| {
                c.inc_by(generated);
            });
        }
    }

    /// Sets the gauges from `snap` and renders everything.
    pub fn render(&self, snap: &Snapshot) -> String {
        let total = self.gpu_memory_bytes as f64;
        for (signal, series) in &self.gauges {
            let v = match signal {
                Signal::Waiting => snap.waiting as f64,
                Signal::Running => snap.running as f64,
                Signal::PeakRunning => snap.peak_running as f64,
                Signal::KvFraction => snap.kv_usage,
                Signal::KvUsedBytes => (snap.kv_usage * total).round(),
                Signal::KvTotalBytes => total,
            };
            series.with(|g| {
                g.set(v);
            });
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        Snapshot {
            waiting: 3,
            running: 2,
            peak_running: 4,
            kv_tokens: 250,
            kv_usage: 0.25,
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"))
    }

    #[test]
    fn vllm_preset_exports_labelled_gauges_and_counters() {
        let m = Metrics::new(MetricsPreset::Vllm, "m1", 1000);
        m.add_tokens(7, 5);
        m.record(Outcome::Success);
        let t = m.render(&snap());
        assert!(line(&t, "vllm:num_requests_waiting{model_name=\"m1\"}").ends_with(" 3.0"));
        assert!(line(&t, "vllm:num_requests_running{model_name=\"m1\"}").ends_with(" 2.0"));
        assert!(line(&t, "vllm:gpu_cache_usage_perc{model_name=\"m1\"}").ends_with(" 0.25"));
        assert!(line(&t, "vllm:kv_cache_usage_perc{model_name=\"m1\"}").ends_with(" 0.25"));
        assert!(line(&t, "vllm:prompt_tokens_total{model_name=\"m1\"}").ends_with(" 7"));
        assert!(line(&t, "vllm:generation_tokens_total{model_name=\"m1\"}").ends_with(" 5"));
        assert!(line(&t, "engine_sim_requests_total{outcome=\"success\"}").ends_with(" 1"));
        assert!(line(&t, "engine_sim_generation_tokens_total").ends_with(" 5"));
        assert!(line(&t, "engine_sim_peak_running").ends_with(" 4.0"));
        assert!(!t.contains("sglang:"));
    }

    #[test]
    fn sglang_tgi_and_triton_presets_use_their_names() {
        let t = Metrics::new(MetricsPreset::Sglang, "m", 1).render(&snap());
        assert!(line(&t, "sglang:num_queue_reqs{model_name=\"m\"}").ends_with(" 3.0"));
        assert!(line(&t, "sglang:num_running_reqs{model_name=\"m\"}").ends_with(" 2.0"));
        assert!(line(&t, "sglang:token_usage{model_name=\"m\"}").ends_with(" 0.25"));
        assert!(!t.contains("vllm:"));

        let t = Metrics::new(MetricsPreset::Tgi, "m", 1).render(&snap());
        assert!(line(&t, "tgi_queue_size ").ends_with(" 3.0"));
        assert!(line(&t, "tgi_batch_current_size ").ends_with(" 2.0"));

        let t = Metrics::new(MetricsPreset::Triton, "m", 1000).render(&snap());
        assert!(
            line(
                &t,
                "nv_inference_pending_request_count{model=\"m\",version=\"1\"}"
            )
            .ends_with(" 3.0")
        );
        assert!(line(&t, "nv_gpu_memory_used_bytes{").ends_with(" 250.0"));
        assert!(line(&t, "nv_gpu_memory_total_bytes{").ends_with(" 1000.0"));
    }
}
