//! How a new revision of a service (a changed model or engine) takes over from the one that
//! serves: `spec.rollout`, and what status reports of it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How traffic moves to a new revision. Without it, a new revision takes all traffic once it
/// has as many ready replicas as the stable one, and the old one goes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.steps) || self.strategy != 'BlueGreen' || size(self.steps) == 0").message("rollout.steps are for strategy Canary; BlueGreen switches all traffic at once"))]
#[x_kube(validation = Rule::new("!has(self.steps) || self.steps.all(i, s, i == 0 || self.steps[i - 1].weight < s.weight)").message("rollout.steps weights must increase"))]
pub struct RolloutSpec {
    /// `Canary` moves traffic in `steps`; `BlueGreen` brings the candidate up to the stable's
    /// ready replicas and switches all traffic at once.
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// Mirror this percentage of the stable's traffic to the candidate first; its answers are
    /// compared and discarded, clients never see them.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub shadow_percent: i32,
    /// Canary: the weights the candidate gets, each held for `pauseSeconds`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub steps: Vec<RolloutStep>,
    /// Checked at the end of each step (and of the shadow) over that step's requests; a failed
    /// gate sends all traffic back to the stable revision at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<RolloutGate>,
    /// The previous revision stays warm this long after promotion: rolling back within it is a
    /// switch, not a reload.
    #[serde(default = "default_keep_previous")]
    #[schemars(range(min = 0, max = 86400))]
    pub keep_previous_seconds: i32,
    /// The longest a stage waits for the candidate replicas it needs (to take its share, or
    /// the stable's count before the switch), pauses not counted; then the rollout fails and
    /// the candidate's GPUs are given back. It catches a cluster without GPUs for both
    /// revisions; a gate waiting for `minRequests` is not held to it.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 10, max = 86400))]
    pub progress_deadline_seconds: i32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            strategy: RolloutStrategy::default(),
            shadow_percent: 0,
            steps: Vec::new(),
            gate: None,
            keep_previous_seconds: default_keep_previous(),
            progress_deadline_seconds: default_progress_deadline(),
        }
    }
}

fn default_keep_previous() -> i32 {
    900
}

fn default_progress_deadline() -> i32 {
    1800
}

impl RolloutSpec {
    /// The CRD's rules, for objects that did not come through the API server.
    pub fn validate(&self) -> Result<(), String> {
        let mut errs = Vec::new();
        if self.strategy == RolloutStrategy::BlueGreen && !self.steps.is_empty() {
            errs.push(
                "rollout.steps are for strategy Canary; BlueGreen switches all traffic at once",
            );
        }
        if self.steps.windows(2).any(|w| w[0].weight >= w[1].weight) {
            errs.push("rollout.steps weights must increase");
        }
        if self
            .steps
            .iter()
            .any(|s| !(1..=100).contains(&s.weight) || s.pause_seconds < 0)
        {
            errs.push("rollout.steps: weight in [1, 100], pauseSeconds >= 0");
        }
        if !(0..=100).contains(&self.shadow_percent) {
            errs.push("rollout.shadowPercent must be in [0, 100]");
        }
        if self.keep_previous_seconds < 0 {
            errs.push("rollout.keepPreviousSeconds must be >= 0");
        }
        if self.progress_deadline_seconds < 10 {
            errs.push("rollout.progressDeadlineSeconds must be >= 10");
        }
        if let Some(g) = &self.gate
            && (g.min_requests < 1
                || !(0.0..=1.0).contains(&g.max_error_rate)
                || g.max_ttft_p95_ratio.is_nan()
                || g.max_ttft_p95_ratio < 1.0)
        {
            errs.push(
                "rollout.gate: minRequests >= 1, maxErrorRate in [0, 1], maxTtftP95Ratio >= 1",
            );
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RolloutStrategy {
    #[default]
    Canary,
    BlueGreen,
}

/// One canary step.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStep {
    /// Percentage of requests the candidate gets.
    #[schemars(range(min = 1, max = 100))]
    pub weight: i32,
    /// How long the step holds before the gate is checked.
    #[serde(default)]
    #[schemars(range(min = 0, max = 86400))]
    pub pause_seconds: i32,
}

/// What a step must show before traffic moves on.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutGate {
    /// Requests the candidate must have answered in the step before it is judged.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_requests: i64,
    /// The candidate's share of 5xx, 429 and cut-off answers, plus its 4xx answers beyond the
    /// stable's rate of them.
    #[serde(default = "default_max_error_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: f64,
    /// The candidate's p95 time to first token over the stable's, in the same window.
    #[serde(default = "default_max_ttft_ratio")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub max_ttft_p95_ratio: f64,
}

impl Default for RolloutGate {
    fn default() -> Self {
        Self {
            min_requests: default_min_requests(),
            max_error_rate: default_max_error_rate(),
            max_ttft_p95_ratio: default_max_ttft_ratio(),
        }
    }
}

fn default_min_requests() -> i64 {
    100
}

fn default_max_error_rate() -> f64 {
    0.01
}

fn default_max_ttft_ratio() -> f64 {
    1.25
}

/// Where a rollout stands.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutPhase {
    Progressing,
    Paused,
    /// The candidate serves all traffic; the previous revision stays warm for
    /// `keepPreviousSeconds`.
    Promoted,
    /// All traffic went back to the stable revision (a failed gate, or `abort`).
    RolledBack,
    /// The candidate never became ready.
    Failed,
}

impl RolloutPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutPhase::Progressing => "Progressing",
            RolloutPhase::Paused => "Paused",
            RolloutPhase::Promoted => "Promoted",
            RolloutPhase::RolledBack => "RolledBack",
            RolloutPhase::Failed => "Failed",
        }
    }
}

/// What a revision is to the service.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevisionRole {
    /// Serving (all traffic outside a rollout).
    Stable,
    /// Rolling out, or rolled back and idle until the spec changes again.
    Candidate,
    /// The stable one before a promotion, kept warm for `keepPreviousSeconds`.
    Previous,
}

/// One engine revision: its Deployment and Service are both named `name`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStatus {
    pub name: String,
    /// Hash of what defines it: model, engine image, args, env, GPUs and resources.
    pub hash: String,
    pub role: RevisionRole,
    /// Replicas the autoscaler set, and of them ready.
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Percent of requests routed to it.
    #[serde(default)]
    pub weight: i32,
    /// Percent of the stable's requests mirrored to it (a candidate in its shadow stage).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shadow_percent: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// A rollout as status reports it (and as the controller resumes it after a restart).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    pub stable: String,
    pub candidate: String,
    pub phase: RolloutPhase,
    /// `Shadow`, `Step` or `Switch`.
    pub stage: String,
    /// The canary step (from 0), during `Step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i32>,
    #[serde(default)]
    pub message: String,
    pub started_at: Time,
    /// When the current stage's clock began.
    pub stage_started_at: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<Time>,
    #[serde(default)]
    pub paused_seconds: i64,
    /// When the current stage began waiting for candidate replicas (`progressDeadlineSeconds`
    /// runs from then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<Time>,
    /// When the candidate first had a ready replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Time>,
    /// When it was promoted, rolled back or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Time>,
    /// The gate's last figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateFigures>,
}

/// What the gate last measured over the candidate's step.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GateFigures {
    /// Requests the candidate answered in the step.
    pub requests: i64,
    pub error_rate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_ttft_p95_milliseconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_ttft_p95_milliseconds: Option<i64>,
}

/// The annotation that pauses, resumes, promotes or aborts a rollout.
pub const ROLLOUT_ANNOTATION: &str = "spillway.dev/rollout";

/// A person's word on a rollout (`kubectl annotate isvc NAME spillway.dev/rollout=pause`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutCommand {
    Pause,
    Resume,
    Promote,
    Abort,
}

impl RolloutCommand {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "pause" => Some(Self::Pause),
            "resume" => Some(Self::Resume),
            "promote" => Some(Self::Promote),
            "abort" => Some(Self::Abort),
            _ => None,
        }
    }
}
