//! `ScalingPolicy`: a reusable, named autoscaling policy (like a StorageClass).

// kube-derive takes one printcolumn(...) per column; clippy reads the repeated keys as duplicates.
#![allow(clippy::duplicated_attributes)]
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions_schema;

/// How a group of engine replicas scales on queue depth and GPU memory (never CPU).
///
/// Services reference a policy by name in `spec.scalingPolicyRef`; a platform team writes a
/// few ("latency-critical", "batch") and application teams pick one.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "spillway.dev",
    version = "v1alpha1",
    kind = "ScalingPolicy",
    namespaced,
    status = "ScalingPolicyStatus",
    derive = "PartialEq",
    shortname = "spol",
    category = "spillway",
    doc = "ScalingPolicy is a reusable autoscaling policy for InferenceServices: queue depth and GPU memory targets, replica bounds, stabilisation, rate limits and burst mode.",
    printcolumn(name = "Min", type_ = "integer", json_path = ".spec.minReplicas"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxReplicas"),
    printcolumn(name = "Burst", type_ = "string", json_path = ".spec.burst.mode"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Services", type_ = "integer", json_path = ".status.services"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas >= 1").message("minReplicas must be at least 1: the warm replica is not optional"))]
#[x_kube(validation = Rule::new("self.maxReplicas >= self.minReplicas").message("maxReplicas must be >= minReplicas"))]
#[x_kube(validation = Rule::new("!has(self.launch) || self.launch.replicas <= self.maxReplicas").message("launch.replicas must be <= maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.cost) || self.cost.mode == 'Disabled' || !has(self.burst) || !has(self.burst.mode) || self.burst.mode == 'Saturated'").message("cost needs burst.mode Saturated: only then do the routers send to providers what the replicas it declines would serve"))]
pub struct ScalingPolicySpec {
    /// Fewest engine replicas, never below 1: one warm replica is always kept.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 10000))]
    pub min_replicas: i32,
    /// Most engine replicas. Above this, overflow is burst to providers (if configured).
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_replicas: i32,
    /// Per-replica targets for each scaling signal.
    #[serde(default)]
    pub targets: Targets,
    /// A signal whose observed/target ratio is within this fraction of 1 causes no change.
    #[serde(default = "default_tolerance")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tolerance: f64,
    /// How often engine metrics are scraped and a decision is made, in seconds.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 300))]
    pub interval_seconds: i32,
    /// Limits on scaling up.
    #[serde(default)]
    pub scale_up: ScaleUpRules,
    /// Limits on scaling down.
    #[serde(default)]
    pub scale_down: ScaleDownRules,
    /// Over-provision a newly created service for a while (model load is slow; traffic often is not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<Launch>,
    /// When overflow traffic may go to the burst providers.
    #[serde(default)]
    pub burst: BurstPolicy,
    /// What to do when metrics cannot be read. Missing metrics are never read as zero.
    #[serde(default)]
    pub metrics_unavailable: MetricsUnavailable,
    /// `Active` patches replicas; `Advisory` only reports decisions in status.
    #[serde(default)]
    pub mode: PolicyMode,
    /// Scale for the demand forecast one horizon ahead (a trend, and a daily season once a
    /// day of history is kept), so replicas load before the demand arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictive: Option<Predictive>,
    /// Run a replica above `minReplicas` only while it would be busy enough that its GPUs cost
    /// less than the providers charge for the requests it would serve; the providers take the
    /// rest. Needs `burst.mode: Saturated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
}

/// Cost-aware scaling: GPUs against the providers' prices.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.gpuHourPrice.matches('[1-9]')").message("cost.gpuHourPrice must be above 0"))]
pub struct Cost {
    /// `Active` caps the occupancy signals and the forecast at the replicas that cost less
    /// than the providers would for the same demand; `Advisory` reports that count without
    /// acting; `Disabled` (default) scales GPUs for all demand. The queue-depth signal and the
    /// latency objective are never capped, nothing is scaled down for cost while requests wait
    /// for a local slot, and the demand of request classes that may not burst (`burst: Never`)
    /// keeps its replicas. Until the providers' price is measured, spilled demand buys no GPU;
    /// with no `pricing` on any provider, cost has no effect.
    #[serde(default)]
    pub mode: SignalMode,
    /// What one GPU costs an hour, in the currency of the providers' `pricing`, as a decimal
    /// string ("2.50").
    #[schemars(length(max = 16), regex(pattern = "^[0-9]{1,9}(\\.[0-9]{1,6})?$"))]
    pub gpu_hour_price: String,
}

impl Cost {
    /// `gpuHourPrice` as a number; `None` when it is not a positive decimal as the schema
    /// has it (digits, at most one point).
    pub fn gpu_hour_price(&self) -> Option<f64> {
        let s = &self.gpu_hour_price;
        let decimal = !s.is_empty()
            && s.chars().all(|c| c.is_ascii_digit() || c == '.')
            && s.matches('.').count() <= 1
            && !s.starts_with('.')
            && !s.ends_with('.');
        decimal
            .then(|| s.parse::<f64>().ok())
            .flatten()
            .filter(|v| v.is_finite() && *v > 0.0)
    }
}

/// Forecast scaling.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Predictive {
    /// `Active` scales for the forecast (the reactive signals still apply, and scale-down never
    /// goes below what the forecast needs); `Advisory` reports it and what it would do, without
    /// acting; `Disabled` (default) does neither. (Not `On`/`Off`: YAML 1.1 reads those
    /// unquoted as booleans.)
    #[serde(default)]
    pub mode: SignalMode,
    /// How far ahead to forecast, in seconds (default: the cold start observed, else 240).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 7200))]
    pub horizon_seconds: Option<i32>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SignalMode {
    /// Off.
    #[default]
    Disabled,
    /// Computed and reported with each decision; never acted on.
    Advisory,
    /// Acted on.
    Active,
}

/// Per-replica targets. The autoscaler keeps each signal's per-ready-replica average near its target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.queueDepthPerReplica > 0.0").message("targets.queueDepthPerReplica must be > 0"))]
#[x_kube(validation = Rule::new("self.gpuMemoryUtilization > 0.0 && self.gpuMemoryUtilization <= 1.0").message("targets.gpuMemoryUtilization must be in (0, 1]"))]
pub struct Targets {
    /// Waiting requests per ready replica (engine queue plus the router's queue).
    #[serde(default = "default_queue_target")]
    pub queue_depth_per_replica: f64,
    /// KV-cache / GPU memory fraction per ready replica, in (0, 1].
    #[serde(default = "default_gpu_mem_target")]
    pub gpu_memory_utilization: f64,
    /// A latency objective: time to first token, in milliseconds, at `p50`, `p95` and/or
    /// `p99`, measured by the routers over the last `windowSeconds` on streamed answers from
    /// local engines (answers served by providers do not count). Above a target by more than
    /// `tolerance` it asks for more replicas in proportion; above it at all, for no fewer. It
    /// never asks for fewer replicas by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_milliseconds: Option<LatencyTargets>,
    /// GPU memory and concurrency (requests running plus spilled demand) are read as their
    /// mean over this many seconds: a momentary peak that burst providers absorb buys no GPU,
    /// and the scale-down window does not hold on to one. Queue depth and time to first token
    /// are never averaged: waiting is acted on at once. 0 (the default) reads each tick alone,
    /// as the HorizontalPodAutoscaler does. Suits policies whose requests may burst; where
    /// they may not, a peak waits instead.
    #[serde(default)]
    #[schemars(range(min = 0, max = 600))]
    pub occupancy_window_seconds: i32,
}

/// Time-to-first-token targets, in milliseconds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.p50) || has(self.p95) || has(self.p99)").message("timeToFirstTokenMilliseconds needs at least one of p50, p95, p99"))]
#[x_kube(validation = Rule::new("!has(self.p50) || !has(self.p95) || self.p50 <= self.p95").message("timeToFirstTokenMilliseconds.p50 must be <= p95"))]
#[x_kube(validation = Rule::new("!has(self.p95) || !has(self.p99) || self.p95 <= self.p99").message("timeToFirstTokenMilliseconds.p95 must be <= p99"))]
#[x_kube(validation = Rule::new("!has(self.p50) || !has(self.p99) || self.p50 <= self.p99").message("timeToFirstTokenMilliseconds.p50 must be <= p99"))]
pub struct LatencyTargets {
    /// Median time to first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub p50: Option<i64>,
    /// 95th percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub p95: Option<i64>,
    /// 99th percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub p99: Option<i64>,
    /// The window the quantiles are measured over, in seconds (default 60). A quantile needs
    /// enough answers in it to be read: 20 for p50, 40 for p95, 200 for p99.
    #[serde(default = "default_latency_window")]
    #[schemars(range(min = 10, max = 3600))]
    pub window_seconds: i32,
}

fn default_latency_window() -> i32 {
    60
}

impl LatencyTargets {
    /// The targets set, as (name, quantile, milliseconds), lowest quantile first.
    pub fn targets(&self) -> impl Iterator<Item = (&'static str, f64, i64)> + '_ {
        [
            ("p50", 0.50, self.p50),
            ("p95", 0.95, self.p95),
            ("p99", 0.99, self.p99),
        ]
        .into_iter()
        .filter_map(|(n, q, t)| t.map(|t| (n, q, t)))
    }
}

impl Default for Targets {
    fn default() -> Self {
        Self {
            queue_depth_per_replica: default_queue_target(),
            gpu_memory_utilization: default_gpu_mem_target(),
            time_to_first_token_milliseconds: None,
            occupancy_window_seconds: 0,
        }
    }
}

/// Generates the scale-up and scale-down rule types: the same fields, with per-direction
/// defaults in the schema (so a partial `scaleDown: {maxPods: 2}` keeps its 300 s window).
macro_rules! scaling_rules {
    ($name:ident, $doc:literal, window = $w:literal, pods = $p:literal, percent = $pc:literal, period = $per:literal, select = $sel:expr) => {
        #[doc = $doc]
        #[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            /// Look back this long and act on the most conservative recommendation (prevents flapping).
            #[serde(default = "defaults::window")]
            #[schemars(range(min = 0, max = 3600))]
            pub stabilization_window_seconds: i32,
            /// At most this many pods added/removed per period.
            #[serde(default = "defaults::pods")]
            #[schemars(range(min = 1, max = 1000))]
            pub max_pods: i32,
            /// At most this percentage of current replicas added/removed per period.
            #[serde(default = "defaults::percent")]
            #[schemars(range(min = 1, max = 1000))]
            pub max_percent: i32,
            /// The period the limits above apply to, in seconds.
            #[serde(default = "defaults::period")]
            #[schemars(range(min = 1, max = 1800))]
            pub period_seconds: i32,
            /// Which of the two limits holds when both are set, as the HorizontalPodAutoscaler's
            /// `selectPolicy`: `Max` allows the larger change, `Min` the smaller, `Disabled`
            /// none in this direction.
            #[serde(default = "defaults::select")]
            pub select_policy: SelectPolicy,
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    stabilization_window_seconds: $w,
                    max_pods: $p,
                    max_percent: $pc,
                    period_seconds: $per,
                    select_policy: $sel,
                }
            }
        }

        impl $name {
            /// The direction-independent view the autoscaler works with.
            pub fn rules(&self) -> ScalingRules {
                ScalingRules {
                    stabilization_window_seconds: self.stabilization_window_seconds,
                    max_pods: self.max_pods,
                    max_percent: self.max_percent,
                    period_seconds: self.period_seconds,
                    select_policy: self.select_policy,
                }
            }
        }
    };
}

/// Per-field default functions for the macro above, one module per direction.
mod up_defaults {
    pub fn window() -> i32 {
        0
    }
    pub fn pods() -> i32 {
        4
    }
    pub fn percent() -> i32 {
        100
    }
    pub fn period() -> i32 {
        15
    }
    /// As the HorizontalPodAutoscaler: the larger change, so a spike on one warm replica is
    /// not held to one more per period.
    pub fn select() -> super::SelectPolicy {
        super::SelectPolicy::Max
    }
}
mod down_defaults {
    pub fn window() -> i32 {
        300
    }
    pub fn pods() -> i32 {
        1
    }
    pub fn percent() -> i32 {
        100
    }
    pub fn period() -> i32 {
        60
    }
    /// The smaller change: GPUs are given back slowly.
    pub fn select() -> super::SelectPolicy {
        super::SelectPolicy::Min
    }
}

mod scale_up {
    use super::up_defaults as defaults;
    use super::*;
    scaling_rules!(
        ScaleUpRules,
        "Stabilisation and rate limits for scaling up.",
        window = 0,
        pods = 4,
        percent = 100,
        period = 15,
        select = SelectPolicy::Max
    );
}
mod scale_down {
    use super::down_defaults as defaults;
    use super::*;
    scaling_rules!(
        ScaleDownRules,
        "Stabilisation and rate limits for scaling down.",
        window = 300,
        pods = 1,
        percent = 100,
        period = 60,
        select = SelectPolicy::Min
    );
}
pub use scale_down::ScaleDownRules;
pub use scale_up::ScaleUpRules;

/// Stabilisation window and rate limits of one direction, as `decide()` uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScalingRules {
    pub stabilization_window_seconds: i32,
    pub max_pods: i32,
    pub max_percent: i32,
    pub period_seconds: i32,
    pub select_policy: SelectPolicy,
}

/// Which per-period limit holds when both are set (the HorizontalPodAutoscaler's
/// `selectPolicy`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectPolicy {
    /// The larger change `maxPods` and `maxPercent` allow.
    Max,
    /// The smaller one.
    Min,
    /// No change in this direction.
    Disabled,
}

/// Launch over-provisioning: for `durationSeconds` after the service is created, keep at least `replicas`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Launch {
    /// Replicas to keep during the launch window.
    #[schemars(range(min = 1, max = 10000))]
    pub replicas: i32,
    /// How long the launch window lasts after the service is created, in seconds.
    #[serde(default = "default_launch_duration")]
    #[schemars(range(min = 0, max = 86400))]
    pub duration_seconds: i32,
}

/// When overflow goes to burst providers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BurstPolicy {
    /// `Saturated`: whenever every local engine is full. `CapacityExhausted`: only while the
    /// controller reports GPU capacity exhausted. `Never`: queue locally, never burst.
    #[serde(default)]
    pub mode: BurstMode,
    /// How long a request may wait in the router's queue for a local slot before it spills.
    #[serde(default)]
    #[schemars(range(min = 0, max = 600000))]
    pub max_queue_wait_milliseconds: i32,
}

impl Default for BurstPolicy {
    fn default() -> Self {
        Self {
            mode: BurstMode::Saturated,
            max_queue_wait_milliseconds: 0,
        }
    }
}

/// When the router may send overflow to burst providers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BurstMode {
    /// Burst whenever every local engine is at its concurrency limit.
    #[default]
    Saturated,
    /// Burst only while the controller reports capacity exhausted.
    CapacityExhausted,
    /// Never burst.
    Never,
}

/// What the autoscaler does when it cannot read metrics.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MetricsUnavailable {
    /// Keep the current replica count.
    #[default]
    Hold,
    /// Scale up to maxReplicas (fail safe towards capacity).
    ScaleUp,
}

/// Whether decisions are acted on.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PolicyMode {
    /// Decide and patch replicas.
    #[default]
    Active,
    /// Decide and report in status and events, never patch replicas.
    Advisory,
}

/// Observed state of a ScalingPolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Valid`: whether the policy can be used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// How many InferenceServices in this namespace reference the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<i32>,
}

impl Default for ScalingPolicySpec {
    /// The policy used by a service that references none.
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: default_max_replicas(),
            targets: Targets::default(),
            tolerance: default_tolerance(),
            interval_seconds: default_interval(),
            scale_up: ScaleUpRules::default(),
            scale_down: ScaleDownRules::default(),
            launch: None,
            burst: BurstPolicy::default(),
            metrics_unavailable: MetricsUnavailable::Hold,
            mode: PolicyMode::Active,
            predictive: None,
            cost: None,
        }
    }
}

impl ScalingPolicySpec {
    /// Semantic checks for what the CRD's CEL rules guard, for objects that reached the
    /// controller without them (an old CRD, or a client that skipped validation).
    pub fn validate(&self) -> Result<(), String> {
        let mut errs = Vec::new();
        if self.min_replicas < 1 {
            errs.push("minReplicas must be at least 1".to_string());
        }
        if self.max_replicas < self.min_replicas {
            errs.push(format!(
                "maxReplicas ({}) must be >= minReplicas ({})",
                self.max_replicas, self.min_replicas
            ));
        }
        let t = &self.targets;
        if !(t.queue_depth_per_replica > 0.0 && t.queue_depth_per_replica.is_finite()) {
            errs.push("targets.queueDepthPerReplica must be > 0".into());
        }
        if !(t.gpu_memory_utilization > 0.0 && t.gpu_memory_utilization <= 1.0) {
            errs.push("targets.gpuMemoryUtilization must be in (0, 1]".into());
        }
        if let Some(l) = &t.time_to_first_token_milliseconds {
            let set: Vec<_> = l.targets().collect();
            if set.is_empty() {
                errs.push(
                    "targets.timeToFirstTokenMilliseconds needs at least one of p50, p95, p99"
                        .into(),
                );
            }
            if set.iter().any(|(_, _, ms)| !(1..=600_000).contains(ms)) {
                errs.push("targets.timeToFirstTokenMilliseconds must be in [1, 600000]".into());
            }
            if set.windows(2).any(|w| w[0].2 > w[1].2) {
                errs.push("targets.timeToFirstTokenMilliseconds: p50 <= p95 <= p99".into());
            }
            if !(10..=3600).contains(&l.window_seconds) {
                errs.push(
                    "targets.timeToFirstTokenMilliseconds.windowSeconds must be in [10, 3600]"
                        .into(),
                );
            }
        }
        if !(0..=600).contains(&t.occupancy_window_seconds) {
            errs.push("targets.occupancyWindowSeconds must be in [0, 600]".into());
        }
        if !(0.0..=1.0).contains(&self.tolerance) {
            errs.push("tolerance must be in [0, 1]".into());
        }
        if self.interval_seconds < 1 {
            errs.push("intervalSeconds must be >= 1".into());
        }
        if self
            .cost
            .as_ref()
            .is_some_and(|c| c.mode != SignalMode::Disabled)
            && self.burst.mode != BurstMode::Saturated
        {
            errs.push("cost needs burst.mode Saturated".into());
        }
        if let Some(c) = &self.cost
            && c.gpu_hour_price().is_none()
        {
            errs.push(format!(
                "cost.gpuHourPrice {:?} must be a positive decimal such as \"2.50\"",
                c.gpu_hour_price
            ));
        }
        if let Some(l) = &self.launch
            && l.replicas > self.max_replicas
        {
            errs.push("launch.replicas must be <= maxReplicas".into());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }

    /// What a service runs under while the policy it names is missing or invalid: the
    /// defaults, but no bursting, since that policy may have forbidden it (fail closed).
    pub fn unknown() -> Self {
        Self {
            burst: BurstPolicy {
                mode: BurstMode::Never,
                ..BurstPolicy::default()
            },
            ..Self::default()
        }
    }

    /// Replicas a new engine Deployment starts with: the launch over-provisioning if any, else min.
    pub fn initial_replicas(&self) -> i32 {
        let launch = self.launch.as_ref().map_or(0, |l| l.replicas);
        launch.max(self.min_replicas).max(1)
    }
}

fn one() -> i32 {
    1
}
fn default_max_replicas() -> i32 {
    4
}
fn default_tolerance() -> f64 {
    0.1
}
fn default_interval() -> i32 {
    2
}
fn default_launch_duration() -> i32 {
    600
}
fn default_queue_target() -> f64 {
    4.0
}
fn default_gpu_mem_target() -> f64 {
    0.8
}
