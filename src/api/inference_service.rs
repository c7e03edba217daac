//! `InferenceService`: one model served by autoscaled GPU engine replicas, with burst.

// kube-derive takes one printcolumn(...) per column; clippy reads the repeated keys as duplicates.
#![allow(clippy::duplicated_attributes)]
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    ProviderEndpoint, RequestClasses, RevisionStatus, RolloutSpec, RolloutStatus,
    conditions_schema, default_provider_endpoints, preserve_unknown_object,
};

/// A model served by the organisation's own inference engine on autoscaled GPU replicas,
/// behind one stable OpenAI-compatible endpoint that bursts to external providers when
/// GPU capacity runs out.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "spillway.dev",
    version = "v1alpha1",
    kind = "InferenceService",
    namespaced,
    status = "InferenceServiceStatus",
    derive = "PartialEq",
    shortname = "infsvc",
    category = "spillway",
    doc = "InferenceService runs a model on autoscaled GPU engine replicas behind one OpenAI-compatible endpoint, bursting overflow to external providers when GPU capacity runs out.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    ),
    printcolumn(
        name = "Queue",
        type_ = "integer",
        json_path = ".status.metrics.queueDepth"
    ),
    printcolumn(
        name = "GPU-Mem",
        type_ = "number",
        json_path = ".status.metrics.gpuMemoryUtilization"
    ),
    printcolumn(
        name = "Bursting",
        type_ = "boolean",
        json_path = ".status.burst.active"
    ),
    printcolumn(
        name = "Stable",
        type_ = "string",
        json_path = ".status.stableRevision"
    ),
    printcolumn(
        name = "Candidate",
        type_ = "string",
        json_path = ".status.candidateRevision"
    ),
    printcolumn(
        name = "Rollout",
        type_ = "string",
        priority = 1,
        json_path = ".status.rollout.phase"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[kube(validation = Rule::new("size(self.metadata.name) <= 56").message("name must be at most 56 characters (owned objects append -engine and -router)"))]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.burst) || size(self.burst.providers) == 0 || self.router.enabled").message("burst providers need the router: set router.enabled to true"))]
#[x_kube(validation = Rule::new("!self.router.enabled || self.router.replicas <= self.engine.maxConcurrency").message(ROUTER_SHARE_ENGINE))]
#[x_kube(validation = Rule::new("!has(self.burst) || !self.router.enabled || self.burst.providers.all(p, p.maxConcurrency >= self.router.replicas)").message(ROUTER_SHARE_PROVIDER))]
#[x_kube(validation = Rule::new("!has(self.requestClasses) || self.requestClasses.classes.all(c, !has(c.providers) || c.providers.all(p, has(self.burst) && self.burst.providers.exists(q, q.name == p)))").message("a request class may only name burst providers of this service"))]
pub struct InferenceServiceSpec {
    /// The model clients ask for.
    pub model: ModelSpec,
    /// The inference engine container and its resources.
    pub engine: EngineSpec,
    /// The ScalingPolicy (same namespace) to scale with; built-in defaults apply without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling_policy_ref: Option<PolicyRef>,
    /// The per-service router (data plane) that queues and spills over.
    #[serde(default)]
    pub router: RouterSpec,
    /// External OpenAI-compatible providers that take overflow traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<BurstSpec>,
    /// Request classes, named by clients in the `x-spillway-class` header: which requests may
    /// never leave the cluster, which go first in the queue, and which providers may take them.
    /// Without them every request bursts as the ScalingPolicy says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_classes: Option<RequestClasses>,
    /// How a new revision (a changed model or engine) takes over from the one serving:
    /// canary steps or a blue-green switch, with a gate on errors and time to first token.
    /// Without it, a new revision takes all traffic once it has as many ready replicas as
    /// the stable one, and the old one goes. Never an in-place roll of the serving engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

/// The model to serve.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// The OpenAI `model` name clients send (e.g. meta-llama/Llama-3.1-8B-Instruct).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Where the engine loads weights from, handed to it as SPILLWAY_MODEL_URI; pin a version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub uri: Option<String>,
}

/// The engine container. Any engine with an OpenAI-compatible API, a health path and Prometheus metrics.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.gpus >= 0").message("engine.gpus must be >= 0 (0 for CPU engines and the simulated engine)"))]
pub struct EngineSpec {
    /// Container image of the engine; pin a tag or digest.
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,
    /// Extra container arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables for the engine container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Port the engine serves its OpenAI-compatible API and metrics on.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// HTTP path that answers 200 when the engine can serve (readiness and startup probes).
    #[serde(default = "default_health_path")]
    #[schemars(length(min = 1, max = 256), regex(pattern = "^/"))]
    pub health_path: String,
    /// Where the engine's queue depth, in-flight and GPU memory metrics are found.
    #[serde(default)]
    pub metrics: EngineMetrics,
    /// Requests one replica serves at once before latency degrades. The routers together never
    /// exceed it by more than 1 slot (or 1/32 of a large limit) per other router replica.
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_concurrency: i32,
    /// GPUs per replica, set as the limit of `gpuResource`. 0 for CPU engines and the simulated engine.
    #[serde(default = "default_gpus")]
    #[schemars(range(min = 0, max = 64))]
    pub gpus: i32,
    /// Extended resource name of the GPU (nvidia.com/gpu, amd.com/gpu, nvidia.com/mig-1g.10gb, ...).
    #[serde(default = "default_gpu_resource")]
    #[schemars(
        length(min = 1, max = 253),
        regex(
            pattern = "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$"
        )
    )]
    pub gpu_resource: String,
    /// CPU and memory besides the GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<EngineResources>,
    /// Node labels the engine pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for the engine pods (GPU nodes are often tainted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity for the engine pods, as in a PodSpec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub affinity: Option<Affinity>,
    /// How long a replica may take to load the model and become healthy, in seconds.
    #[serde(default = "default_startup_timeout")]
    #[schemars(range(min = 10, max = 86400))]
    pub startup_timeout_seconds: i32,
    /// How long a terminating replica may take to finish in-flight requests, in seconds.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: i32,
}

/// CPU and memory for the engine container, besides the GPU.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EngineResources {
    /// CPU request (no limit is set, so the engine is never CPU-throttled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// Where to find the engine's metrics: a preset for a known engine, optionally overridden per signal.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EngineMetrics {
    /// Metric names of a known engine.
    #[serde(default)]
    pub preset: MetricsPreset,
    /// HTTP path of the Prometheus metrics on `engine.port`.
    #[serde(default = "default_metrics_path")]
    #[schemars(length(min = 1, max = 256), regex(pattern = "^/"))]
    pub path: String,
    /// Overrides the preset's queue-depth (waiting requests) gauge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<MetricSelector>,
    /// Overrides the preset's in-flight (running requests) gauge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<MetricSelector>,
    /// Overrides the preset's GPU memory fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory: Option<GpuMemoryMetric>,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            preset: MetricsPreset::default(),
            path: default_metrics_path(),
            queue_depth: None,
            in_flight: None,
            gpu_memory: None,
        }
    }
}

/// Known engines' metric names.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetricsPreset {
    /// vLLM: `vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:gpu_cache_usage_perc`.
    #[default]
    Vllm,
    /// SGLang: `sglang:num_queue_reqs`, `sglang:num_running_reqs`, `sglang:token_usage`.
    Sglang,
    /// Text Generation Inference: `tgi_queue_size`, `tgi_batch_current_size`.
    Tgi,
    /// Triton: `nv_inference_pending_request_count`, GPU memory used/total bytes.
    Triton,
}

/// One gauge in the engine's metrics, by name and optional labels.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MetricSelector {
    /// Metric name, as exposed (e.g. `vllm:num_requests_waiting`).
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Only series with all these label values count; matching series are summed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// GPU memory as a fraction gauge, or as a used/total pair (e.g. DCGM's framebuffer gauges).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.fraction) != (has(self.used) && has(self.total))").message("gpuMemory takes either fraction, or both used and total"))]
#[x_kube(validation = Rule::new("has(self.used) == has(self.total)").message("gpuMemory.used and gpuMemory.total go together"))]
pub struct GpuMemoryMetric {
    /// A gauge already in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<MetricSelector>,
    /// Memory in use (any unit, same as `total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<MetricSelector>,
    /// Memory in total (same unit as `used`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<MetricSelector>,
}

/// A reference to a ScalingPolicy in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PolicyRef {
    /// Name of the ScalingPolicy.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The router in front of the engines.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Run the router. Without it the client Service points straight at the engines and nothing bursts.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Router replicas. They share every engine's, provider's and budget limit through an
    /// exchange of counts (UDP 8081 between router pods); a router that hears no peer keeps
    /// to an equal share.
    #[serde(default = "default_router_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
    /// Most requests waiting in one router for a local slot; above it the router answers 503.
    #[serde(default = "default_queue_limit")]
    #[schemars(range(min = 0, max = 1000000))]
    pub queue_limit: i32,
    /// Longest a request waits in the queue before the router answers 503, in seconds.
    #[serde(default = "default_queue_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub queue_timeout_seconds: i32,
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            replicas: default_router_replicas(),
            queue_limit: default_queue_limit(),
            queue_timeout_seconds: default_queue_timeout(),
        }
    }
}

/// External OpenAI-compatible providers for overflow, and the budget they may spend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.providers.all(p, self.providers.exists_one(q, q.name == p.name))").message("burst provider names must be unique"))]
pub struct BurstSpec {
    /// Providers, tried in this order.
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub providers: Vec<Provider>,
    /// Caps on burst traffic across all providers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// One external OpenAI-compatible provider.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.url.startsWith('https://') || self.url.startsWith('http://')").message("provider url must start with http:// or https://"))]
pub struct Provider {
    /// A short name for metrics and status (a DNS label).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Base URL of the OpenAI-compatible API, e.g. https://api.together.xyz/v1.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// The provider's name for the model; the router rewrites `model` to it.
    #[schemars(length(min = 1, max = 253))]
    pub model: String,
    /// The Secret key (same namespace) that holds the API key. The key is never copied elsewhere.
    pub api_key_secret_ref: SecretKeyRef,
    /// Most requests in flight to this provider at once, from all router replicas together
    /// (shared; a router that hears no peer keeps to an equal share, at least 1).
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_concurrency: i32,
    /// Time allowed for the provider's response headers, and for any pause in its answer
    /// after them, in seconds.
    #[serde(default = "default_provider_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i32,
    /// Price per million tokens, used for the spend budget and reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    /// The endpoints requests may spill to this provider on (default: chat, completions).
    /// Other endpoints, and requests that keep state on the server, stay on the engines.
    #[serde(default = "default_provider_endpoints")]
    #[schemars(length(min = 1, max = 6))]
    #[x_kube(validation = Rule::new("self.all(e, self.exists_one(f, f == e))").message("providers[].endpoints must not repeat an endpoint"))]
    pub endpoints: Vec<ProviderEndpoint>,
    /// Answers keep the provider's model name. By default the router writes back the model
    /// the client asked for, in JSON answers and in every stream chunk, so clients never see
    /// where a request was served.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expose_model: bool,
}

/// A key in a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.key.matches('^[-._a-zA-Z0-9]+$')").message("a Secret key is made of letters, digits, '-', '_' and '.'"))]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Token prices in the provider's currency (USD assumed in reports).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pricing {
    /// Price per million prompt tokens.
    #[schemars(range(min = 0.0))]
    pub input_per_million_tokens: f64,
    /// Price per million completion tokens.
    #[schemars(range(min = 0.0))]
    pub output_per_million_tokens: f64,
}

/// Caps on burst traffic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// Most requests per minute sent to providers, all router replicas together (shared; a
    /// router that hears no peer keeps to an equal share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_requests_per_minute: Option<i32>,
    /// Most spend per hour on providers, as a decimal string (e.g. "5.00"), all router replicas
    /// together (shared; a router that hears no peer keeps to an equal share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[0-9]{1,9}(\\.[0-9]{1,6})?$"))]
    pub max_spend_per_hour: Option<String>,
}

/// Observed state of an InferenceService.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InferenceServiceStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Degraded, ScalingActive, CapacityExhausted, Bursting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Engine replicas that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Engine replicas that are ready to serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Engine replicas the autoscaler wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Engine pods the scheduler cannot place (e.g. no free GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unschedulable_replicas: Option<i32>,
    /// The latest metrics the autoscaler acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSnapshot>,
    /// Whether overflow is going to providers, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<BurstStatus>,
    /// When replicas were last changed by the autoscaler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Observed pod-created to ready time of engine replicas, smoothed, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_seconds: Option<i64>,
    /// The last scaling decisions, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub decisions: Vec<ScaleDecisionRecord>,
    /// The in-cluster URL clients call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The revision serving (see `revisions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    /// The revision rolling out, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_revision: Option<String>,
    /// The engine revisions that exist: the stable one, a candidate, and the previous one
    /// kept warm after a promotion. Routers split traffic by their weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub revisions: Vec<RevisionStatus>,
    /// The last rollout, or the one in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// Metrics the autoscaler last acted on.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSnapshot {
    /// Waiting requests across engines and routers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<i64>,
    /// Average GPU memory fraction over ready replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_utilization: Option<f64>,
    /// Requests running across engines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<i64>,
    /// Demand the routers sent to burst providers over the last interval, in engine slots:
    /// requests spilled per second times the seconds a request holds a local slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spilled_demand: Option<f64>,
    /// Time to first token the routers measured over the latency objective's window, at the
    /// quantiles it names that had enough answers (streamed answers from local engines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_milliseconds: Option<MeasuredLatency>,
    /// When these were scraped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_at: Option<Time>,
}

/// Measured time-to-first-token quantiles, in milliseconds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct MeasuredLatency {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99: Option<i64>,
}

/// Burst state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BurstStatus {
    /// Whether overflow is currently allowed to providers.
    pub active: bool,
    /// Why (ColdStart, MaxReplicas, Unschedulable, Saturated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Since when `active` has had its value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

/// One scaling decision.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDecisionRecord {
    /// When it was made.
    pub time: Time,
    /// Replicas before.
    pub from: i32,
    /// Replicas after.
    pub to: i32,
    /// Why, e.g. "queue depth 37/4 per replica; limited to +4 per 15s".
    pub reason: String,
    /// The signal that asked for the change: QueueDepth, GpuMemory, Concurrency,
    /// TimeToFirstToken, Forecast or Cost (absent when
    /// a rule alone moved it, e.g. minReplicas or the launch window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_port() -> i32 {
    8000
}
fn default_health_path() -> String {
    "/health".into()
}
fn default_metrics_path() -> String {
    "/metrics".into()
}
fn default_max_concurrency() -> i32 {
    64
}
fn default_gpus() -> i32 {
    1
}
fn default_gpu_resource() -> String {
    "nvidia.com/gpu".into()
}
fn default_startup_timeout() -> i32 {
    1200
}
fn default_grace() -> i32 {
    120
}
fn default_router_replicas() -> i32 {
    2
}
fn default_queue_limit() -> i32 {
    1000
}
fn default_queue_timeout() -> i32 {
    30
}
fn default_provider_timeout() -> i32 {
    120
}

/// A router that hears no peer keeps to an equal share of these limits, at least one slot.
const ROUTER_SHARE_ENGINE: &str = "router.replicas must not exceed engine.maxConcurrency: a router that hears no peer keeps to an equal share of an engine's slots, at least one";
const ROUTER_SHARE_PROVIDER: &str = "each burst provider's maxConcurrency must be at least router.replicas: a router that hears no peer keeps to an equal share of it, at least one";

/// Longest InferenceService name: `<name>-engine` must still be a valid Service name (63).
pub const MAX_NAME_LEN: usize = 56;

impl InferenceServiceSpec {
    /// More router replicas than an engine's or a provider's slots: routers that hear no peer
    /// each still take one, so together they may send it more than its limit. The CRD rejects it; an object
    /// that predates the rule is still reconciled, with this reported, not frozen as invalid.
    pub fn over_router_shares(&self) -> Option<String> {
        let routers = self.router.enabled.then_some(self.router.replicas)?;
        let providers = self.burst.as_ref().map_or(&[][..], |b| &b.providers[..]);
        let mut over = Vec::new();
        if routers > self.engine.max_concurrency {
            over.push(ROUTER_SHARE_ENGINE);
        }
        if providers.iter().any(|p| p.max_concurrency < routers) {
            over.push(ROUTER_SHARE_PROVIDER);
        }
        (!over.is_empty()).then(|| over.join("; "))
    }

    /// Checks what the CRD's schema and CEL rules guard (for objects that bypassed them) and
    /// what they cannot express. Returns every problem found, joined.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        let mut errs: Vec<String> = Vec::new();
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if name.len() > MAX_NAME_LEN || !dns_label(name) || !name.as_bytes()[0].is_ascii_lowercase()
        {
            errs.push(format!(
                "metadata.name {name:?} must be a DNS label of at most {MAX_NAME_LEN} characters starting with a letter (owned Services are named after it)"
            ));
        }
        if self.model.name.trim().is_empty() {
            errs.push("model.name must not be empty".into());
        }
        let e = &self.engine;
        if e.image.trim().is_empty() {
            errs.push("engine.image must not be empty".into());
        }
        if !(1..=65535).contains(&e.port) {
            errs.push(format!("engine.port {} must be in 1..65535", e.port));
        }
        if e.gpus < 0 {
            errs.push(format!("engine.gpus {} must be >= 0", e.gpus));
        }
        if e.max_concurrency < 1 {
            errs.push("engine.maxConcurrency must be >= 1".into());
        }
        if e.startup_timeout_seconds < 1 {
            errs.push("engine.startupTimeoutSeconds must be >= 1".into());
        }
        if let Some(g) = &e.metrics.gpu_memory {
            let pair = (g.used.is_some(), g.total.is_some());
            if pair.0 != pair.1 {
                errs.push("gpuMemory.used and gpuMemory.total go together".into());
            } else if g.fraction.is_some() == pair.0 {
                errs.push("gpuMemory takes either fraction, or both used and total".into());
            }
        }
        if let Some(burst) = &self.burst {
            if !burst.providers.is_empty() && !self.router.enabled {
                errs.push("burst providers need the router: set router.enabled to true".into());
            }
            let mut seen = std::collections::BTreeSet::new();
            for p in &burst.providers {
                if !seen.insert(p.name.as_str()) {
                    errs.push(format!("burst provider name {:?} is not unique", p.name));
                }
                let key = &p.api_key_secret_ref.key;
                if key.is_empty()
                    || !key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    errs.push(format!(
                        "burst provider {:?}: apiKeySecretRef.key {key:?} is not a Secret key",
                        p.name
                    ));
                }
                if !(p.url.starts_with("https://") || p.url.starts_with("http://")) {
                    errs.push(format!(
                        "burst provider {:?}: url must start with http:// or https://",
                        p.name
                    ));
                }
                let mut endpoints = std::collections::BTreeSet::new();
                if p.endpoints.is_empty() || !p.endpoints.iter().all(|e| endpoints.insert(*e)) {
                    errs.push(format!(
                        "burst provider {:?}: providers[].endpoints must not repeat an endpoint, nor be empty",
                        p.name
                    ));
                }
            }
        }
        if let Some(Err(m)) = self.rollout.as_ref().map(RolloutSpec::validate) {
            errs.push(m);
        }
        if let Some(classes) = &self.request_classes {
            let providers = self.burst.as_ref().map_or(&[][..], |b| &b.providers[..]);
            let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
            errs.extend(classes.problems(&names));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}
