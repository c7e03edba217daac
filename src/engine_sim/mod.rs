//! `spillway engine-sim`: a simulated inference engine with real queueing.
//!
//! It serves the OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`), `/health` and `/metrics` under a real engine's metric names, and models an
//! engine as concurrency slots, a bounded FIFO queue, per-sequence token timing and KV-cache
//! usage. It can also play an external provider: bearer key, served model name, injected
//! failures, latency and dropped connections.
//!
//! - [`model`]: the pure engine model.
//! - [`server`]: HTTP over hyper, graceful shutdown.
//! - [`metrics`], [`faults`], [`openai`]: metric names, fault injection, the wire format.

pub mod extra;
pub mod faults;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod server;

#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use crate::api::MetricsPreset;
pub use faults::FaultConfig;
pub use server::{EngineSimServer, serve};

/// An API key that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// Whether `candidate` is this key, in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let key = self.0.as_bytes();
        let mut diff = key.len() ^ candidate.len();
        for (i, k) in key.iter().enumerate() {
            diff |= usize::from(k ^ candidate.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl FromStr for ApiKey {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Errors of the simulated engine.
#[derive(thiserror::Error, Debug)]
pub enum EngineSimError {
    #[error("invalid engine-sim setting {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("engine-sim socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("engine-sim server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> EngineSimError {
    EngineSimError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

/// Everything the simulated engine needs; build it from [`EngineSimArgs`] or directly in tests.
#[derive(Clone, Debug)]
pub struct EngineSimConfig {
    /// Served model name: `/v1/models` lists it, requests naming another model get 404.
    pub model: String,
    /// Whose metric names `/metrics` uses.
    pub preset: MetricsPreset,
    pub max_concurrency: usize,
    /// Requests that may wait for a slot; above it requests get 503.
    pub max_queue: usize,
    pub prefill: Duration,
    /// Output tokens per second, per sequence.
    pub tokens_per_second: f64,
    /// Output tokens when a request gives no `max_tokens`.
    pub default_max_tokens: u64,
    /// Cap on any request's output tokens.
    pub max_output_tokens: u64,
    pub kv_capacity_tokens: u64,
    /// Reported as Triton's total GPU memory; used memory is KV usage times this.
    pub gpu_memory_bytes: u64,
    /// Seeds fault decisions and generated text.
    pub seed: u64,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<ApiKey>,
    pub faults: FaultConfig,
    pub max_body_bytes: usize,
    /// Open connections at once; more wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// Longest a shutdown waits for in-flight requests before closing them.
    pub drain_timeout: Duration,
}

impl Default for EngineSimConfig {
    fn default() -> Self {
        Self {
            model: "engine-sim".into(),
            preset: MetricsPreset::Vllm,
            max_concurrency: 64,
            max_queue: 1000,
            prefill: Duration::from_millis(50),
            tokens_per_second: 50.0,
            default_max_tokens: 16,
            max_output_tokens: 1024,
            kv_capacity_tokens: 100_000,
            gpu_memory_bytes: 80 << 30,
            seed: 0,
            api_key: None,
            faults: FaultConfig::default(),
            max_body_bytes: 1 << 20,
            max_connections: 4096,
            drain_timeout: Duration::from_secs(60),
        }
    }
}

impl EngineSimConfig {
    pub fn validate(&self) -> Result<(), EngineSimError> {
        if self.model.is_empty() {
            return Err(invalid("model", "must not be empty"));
        }
        if self.max_concurrency == 0 {
            return Err(invalid("max_concurrency", "must be at least 1"));
        }
        if !(self.tokens_per_second.is_finite() && self.tokens_per_second > 0.0) {
            return Err(invalid("tokens_per_second", "must be a positive number"));
        }
        if self.kv_capacity_tokens == 0 {
            return Err(invalid("kv_capacity_tokens", "must be at least 1"));
        }
        if self.max_output_tokens == 0 || self.default_max_tokens == 0 {
            return Err(invalid(
                "max_output_tokens",
                "output token limits must be at least 1",
            ));
        }
        for (field, rate) in [
            ("fail_rate", self.faults.fail_rate),
            ("drop_rate", self.faults.drop_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(invalid(field, format!("{rate} is not within 0..1")));
            }
        }
        if !faults::FAIL_STATUSES.contains(&self.faults.fail_status) {
            return Err(invalid(
                "fail_status",
                format!("{} is not one of 429, 500, 503", self.faults.fail_status),
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.api_key.as_ref().is_some_and(|k| k.0.is_empty()) {
            return Err(invalid("api_key", "must not be empty when set"));
        }
        Ok(())
    }

    pub(crate) fn engine_params(&self) -> model::EngineParams {
        model::EngineParams {
            max_concurrency: self.max_concurrency,
            max_queue: self.max_queue,
            prefill: self.prefill,
            tokens_per_second: self.tokens_per_second,
            kv_capacity_tokens: self.kv_capacity_tokens,
        }
    }
}

fn parse_preset(s: &str) -> Result<MetricsPreset, String> {
    match s {
        "vllm" => Ok(MetricsPreset::Vllm),
        "sglang" => Ok(MetricsPreset::Sglang),
        "tgi" => Ok(MetricsPreset::Tgi),
        "triton" => Ok(MetricsPreset::Triton),
        other => Err(format!(
            "unknown preset {other:?}: expected vllm, sglang, tgi or triton"
        )),
    }
}

#[derive(Args, Debug, Clone)]
pub struct EngineSimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Served model name; requests for another model get 404.
    #[arg(long, default_value = "engine-sim")]
    pub model: String,
    /// Metric names to export: vllm, sglang, tgi or triton.
    #[arg(long, default_value = "vllm", value_parser = parse_preset)]
    pub preset: MetricsPreset,
    /// Requests running at once; the rest wait in FIFO order.
    #[arg(long, default_value_t = 64)]
    pub max_concurrency: usize,
    /// Requests that may wait; above it requests get 503.
    #[arg(long, default_value_t = 1000)]
    pub max_queue: usize,
    /// Prefill time per request before its first token, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub prefill_ms: u64,
    /// Output tokens per second, per running request.
    #[arg(long, default_value_t = 50.0)]
    pub tokens_per_second: f64,
    /// Output tokens for requests that give no max_tokens.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: u64,
    /// Cap on output tokens per request.
    #[arg(long, default_value_t = 1024)]
    pub max_output_tokens: u64,
    /// KV-cache size in tokens; the GPU memory gauges are running tokens over this.
    #[arg(long, default_value_t = 100_000)]
    pub kv_capacity_tokens: u64,
    /// GPU memory reported by the triton preset, in bytes.
    #[arg(long, default_value_t = 80 << 30)]
    pub gpu_memory_bytes: u64,
    /// Seed for fault decisions and generated text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Require `Authorization: Bearer <key>` on /v1/* (prefer the environment variable).
    #[arg(long, env = "SPILLWAY_ENGINE_SIM_API_KEY", hide_env_values = true)]
    pub api_key: Option<ApiKey>,
    /// Fraction (0..1) of inference requests answered with --fail-status.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Status of injected failures: 429, 500 or 503.
    #[arg(long, default_value_t = 500)]
    pub fail_status: u16,
    /// Fraction (0..1) of inference requests whose connection is closed without a response.
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Extra latency before each inference request is admitted, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Open connections at once.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// On SIGTERM, longest wait for in-flight requests, in seconds.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout_secs: u64,
}

impl TryFrom<EngineSimArgs> for EngineSimConfig {
    type Error = EngineSimError;
    fn try_from(a: EngineSimArgs) -> Result<Self, Self::Error> {
        let config = Self {
            model: a.model,
            preset: a.preset,
            max_concurrency: a.max_concurrency,
            max_queue: a.max_queue,
            prefill: Duration::from_millis(a.prefill_ms),
            tokens_per_second: a.tokens_per_second,
            default_max_tokens: a.default_max_tokens,
            max_output_tokens: a.max_output_tokens,
            kv_capacity_tokens: a.kv_capacity_tokens,
            gpu_memory_bytes: a.gpu_memory_bytes,
            seed: a.seed,
            api_key: a.api_key,
            faults: FaultConfig {
                fail_rate: a.fail_rate,
                fail_status: a.fail_status,
                drop_rate: a.drop_rate,
                latency: Duration::from_millis(a.latency_ms),
            },
            max_body_bytes: a.max_body_bytes,
            max_connections: a.max_connections,
            drain_timeout: Duration::from_secs(a.drain_timeout_secs),
        };
        config.validate()?;
        Ok(config)
    }
}

/// Runs until SIGTERM or ctrl-c, then drains in-flight requests.
pub async fn run(args: EngineSimArgs) -> anyhow::Result<()> {
    let addr = format!("{}:{}", args.host, args.port);
    let config = EngineSimConfig::try_from(args)?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        model = %config.model,
        preset = ?config.preset,
        max_concurrency = config.max_concurrency,
        max_queue = config.max_queue,
        auth = config.api_key.is_some(),
        "engine-sim listening"
    );
    serve(config, listener, shutdown_signal()).await?;
    tracing::info!("engine-sim stopped");
    Ok(())
}

async fn shutdown_signal() {
    crate::runtime::shutdown_signal().await;
    tracing::info!("shutdown requested: draining in-flight requests");
}

#[cfg(test)]
mod config_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EngineSimArgs,
    }

    #[test]
    fn args_convert_into_config() {
        let cli = Cli::try_parse_from([
            "x",
            "--preset",
            "sglang",
            "--model",
            "m",
            "--max-concurrency",
            "3",
            "--prefill-ms",
            "7",
            "--fail-rate",
            "0.5",
            "--fail-status",
            "429",
            "--latency-ms",
            "9",
            "--api-key",
            "k",
        ])
        .unwrap();
        let c = EngineSimConfig::try_from(cli.args).unwrap();
        assert_eq!(c.preset, MetricsPreset::Sglang);
        assert_eq!((c.model.as_str(), c.max_concurrency), ("m", 3));
        assert_eq!(c.prefill, Duration::from_millis(7));
        assert_eq!(c.faults.fail_status, 429);
        assert_eq!(c.faults.latency, Duration::from_millis(9));
        assert_eq!(c.api_key, Some(ApiKey::new("k")));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(Cli::try_parse_from(["x", "--preset", "onnx"]).is_err());
        for bad in [
            EngineSimConfig {
                max_concurrency: 0,
                ..Default::default()
            },
            EngineSimConfig {
                tokens_per_second: 0.0,
                ..Default::default()
            },
            EngineSimConfig {
                faults: FaultConfig {
                    fail_rate: 1.5,
                    ..Default::default()
                },
                ..Default::default()
            },
            EngineSimConfig {
                faults: FaultConfig {
                    fail_status: 404,
                    ..Default::default()
                },
                ..Default::default()
            },
            EngineSimConfig {
                api_key: Some(ApiKey::new("")),
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        EngineSimConfig::default().validate().unwrap();
    }

    #[test]
    fn api_key_never_shows_in_debug_output() {
        let c = EngineSimConfig {
            api_key: Some(ApiKey::new("sk-very-secret")),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("sk-very-secret"));
        let cli = Cli::try_parse_from(["x", "--api-key", "sk-very-secret"]).unwrap();
        assert!(!format!("{:?}", cli.args).contains("sk-very-secret"));
    }

    #[test]
    fn api_key_matches_only_itself() {
        let k = ApiKey::new("abc");
        assert!(k.matches(b"abc"));
        assert!(!k.matches(b"abd"));
        assert!(!k.matches(b"ab"));
        assert!(!k.matches(b"abcd"));
        assert!(!k.matches(b""));
    }
}
