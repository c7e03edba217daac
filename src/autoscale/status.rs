//! Pure: a decision → the status fields the autoscaler owns (field manager
//! `spillway-autoscaler`), and whether they are worth a write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;

use super::decide::{Decision, MetricsState};
use crate::api::{
    BURSTING, BurstMode, BurstStatus, CAPACITY_EXHAUSTED, DesiredCondition, InferenceService,
    MeasuredLatency, MetricsSnapshot, PolicyMode, RevisionStatus, RolloutStatus, SCALING_ACTIVE,
    ScaleDecisionRecord, settle_condition,
};

/// Decisions kept in status.
pub const HISTORY_LEN: usize = 10;
/// A metrics-only change is written at most this often (every tick would be a write storm).
pub const METRICS_WRITE_INTERVAL_MS: i64 = 30_000;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerStatus {
    pub desired_replicas: i32,
    pub unschedulable_replicas: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSnapshot>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_start_seconds: Option<i64>,
    pub decisions: Vec<ScaleDecisionRecord>,
    pub burst: BurstStatus,
    pub conditions: Vec<Condition>,
    /// The revisions and the rollout (`rollout::drive`); set by the loop after the decision.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<RevisionStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// What happened this tick besides the decision.
pub struct TickFacts<'a> {
    pub decision: &'a Decision,
    pub current: i32,
    pub unschedulable: i32,
    pub mode: PolicyMode,
    pub burst_mode: BurstMode,
    /// Whether the replicas were changed this tick (always false in Advisory mode).
    pub scaled: bool,
    pub cold_start_seconds: Option<i64>,
    pub now: Time,
}

fn conditions(d: &Decision, mode: PolicyMode) -> [DesiredCondition; 2] {
    let active = match (mode, d.metrics) {
        (PolicyMode::Advisory, _) => DesiredCondition::new(
            SCALING_ACTIVE,
            false,
            "Advisory",
            format!(
                "policy mode is Advisory: would run {} ({})",
                d.desired, d.reason
            ),
        ),
        (_, MetricsState::Unavailable) => DesiredCondition::new(
            SCALING_ACTIVE,
            false,
            "MetricsUnavailable",
            d.reason.clone(),
        ),
        (_, MetricsState::Partial { responding, ready }) => DesiredCondition::new(
            SCALING_ACTIVE,
            true,
            "PartialMetrics",
            format!(
                "{responding} of {ready} ready replicas reported every signal; no scale-down until all do"
            ),
        ),
        (_, MetricsState::NoReadyPods) => DesiredCondition::new(
            SCALING_ACTIVE,
            true,
            "NoReadyReplicas",
            "no engine replica is ready yet",
        ),
        (_, MetricsState::Complete) => {
            DesiredCondition::new(SCALING_ACTIVE, true, "MetricsAvailable", {
                // Shown every tick, acted on or not: what a `predictive` forecast asks for, and
                // what `cost` finds worth its GPUs.
                let mut m = String::from("scaling on queue depth, GPU memory and concurrency");
                if let Some((n, secs)) = d.forecast {
                    m.push_str(&format!("; forecast: {n} replicas in {secs}s"));
                }
                if let Some(w) = d.cost {
                    m.push_str(&format!(
                        "; cost: replicas worth their GPUs {} (one pays at {:.0}% busy)",
                        w.replicas,
                        w.break_even * 100.0
                    ));
                }
                m
            })
        }
    };
    let exhausted = match d.exhausted {
        Some(r) => DesiredCondition::new(
            CAPACITY_EXHAUSTED,
            true,
            r.as_str(),
            match r {
                super::decide::ExhaustedReason::MaxReplicas => {
                    format!(
                        "the load asks for {} replicas, above maxReplicas",
                        d.unclamped
                    )
                }
                super::decide::ExhaustedReason::Unschedulable => {
                    "engine pods cannot be scheduled (no free GPU?)".into()
                }
                super::decide::ExhaustedReason::ColdStart => {
                    "replicas are still starting while the ready ones are saturated".into()
                }
            },
        ),
        None => DesiredCondition::new(
            CAPACITY_EXHAUSTED,
            false,
            "CapacityAvailable",
            "in-cluster capacity covers the load",
        ),
    };
    [active, exhausted]
}

/// Whether overflow may go to providers now, in the controller's view: providers exist, the
/// router runs, and the burst mode allows it while capacity is exhausted. (Under `Saturated`
/// the routers may also spill briefly whenever every engine is momentarily full.)
fn bursting(isvc: &InferenceService, d: &Decision, mode: BurstMode) -> DesiredCondition {
    let has_providers = isvc.spec.router.enabled
        && isvc
            .spec
            .burst
            .as_ref()
            .is_some_and(|b| !b.providers.is_empty());
    match d.exhausted {
        _ if !has_providers => DesiredCondition::new(
            BURSTING,
            false,
            "NoProviders",
            "no burst providers configured",
        ),
        _ if mode == BurstMode::Never => DesiredCondition::new(
            BURSTING,
            false,
            "BurstDisabled",
            "the policy's burst mode is Never",
        ),
        Some(r) => DesiredCondition::new(
            BURSTING,
            true,
            r.as_str(),
            "in-cluster capacity is exhausted: overflow goes to the burst providers",
        ),
        None if d.driver == super::decide::Driver::Cost => DesiredCondition::new(
            BURSTING,
            true,
            "CheaperThanGpus",
            "the providers serve the demand above these replicas for less than GPUs would (cost)",
        ),
        None => DesiredCondition::new(
            BURSTING,
            false,
            "CapacityAvailable",
            "local engines have room",
        ),
    }
}

/// Builds the autoscaler's status for `isvc` after a tick.
pub fn autoscaler_status(isvc: &InferenceService, facts: &TickFacts<'_>) -> AutoscalerStatus {
    let prev = isvc.status.clone().unwrap_or_default();
    let d = facts.decision;
    let mut decisions = prev.decisions.clone();
    let changed = d.desired != facts.current;
    // In Advisory mode a recommendation is recorded once, not on every tick it repeats.
    let record = changed
        && (facts.scaled
            || (facts.mode == PolicyMode::Advisory && prev.desired_replicas != Some(d.desired)));
    if record {
        decisions.push(ScaleDecisionRecord {
            time: facts.now.clone(),
            from: facts.current,
            to: d.desired,
            reason: d.reason.clone(),
            signal: d.signal.map(|s| s.as_str().to_string()),
        });
    }
    let overflow = decisions.len().saturating_sub(HISTORY_LEN);
    decisions.drain(..overflow);
    let generation = isvc.metadata.generation;
    let mut conditions: Vec<Condition> = conditions(d, facts.mode)
        .iter()
        .chain(std::iter::once(&bursting(isvc, d, facts.burst_mode)))
        .map(|c| settle_condition(&prev.conditions, c, &facts.now, generation))
        .collect();
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    let burst_cond = conditions
        .iter()
        .find(|c| c.type_ == BURSTING)
        .expect("just added");
    let burst = BurstStatus {
        active: burst_cond.status == "True",
        reason: Some(burst_cond.reason.clone()),
        since: Some(burst_cond.last_transition_time.clone()),
    };
    AutoscalerStatus {
        desired_replicas: d.desired,
        unschedulable_replicas: facts.unschedulable,
        metrics: (d.queue_depth.is_some()
            || d.gpu_memory.is_some()
            || d.in_flight.is_some()
            || d.spilled.is_some()
            || !d.ttft_ms.is_empty())
        .then(|| MetricsSnapshot {
            queue_depth: d.queue_depth.map(|q| q.round() as i64),
            gpu_memory_utilization: d.gpu_memory.map(|g| (g * 1000.0).round() / 1000.0),
            in_flight: d.in_flight.map(|f| f.round() as i64),
            spilled_demand: d.spilled.map(|s| (s * 100.0).round() / 100.0),
            time_to_first_token_milliseconds: measured_latency(&d.ttft_ms),
            sampled_at: Some(facts.now.clone()),
        }),
        last_scale_time: if facts.scaled {
            Some(facts.now.clone())
        } else {
            prev.last_scale_time
        },
        cold_start_seconds: facts.cold_start_seconds.or(prev.cold_start_seconds),
        decisions,
        burst,
        conditions,
        revisions: Vec::new(),
        stable_revision: None,
        candidate_revision: None,
        rollout: None,
    }
}

fn measured_latency(ms: &[(&str, f64)]) -> Option<MeasuredLatency> {
    let at = |name: &str| {
        ms.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.round() as i64)
    };
    (!ms.is_empty()).then(|| MeasuredLatency {
        p50: at("p50"),
        p95: at("p95"),
        p99: at("p99"),
    })
}

/// Whether `new` must be written, given what was last written `since_ms` ago: anything but the
/// metrics snapshot at once; a metrics-only change at most every `METRICS_WRITE_INTERVAL_MS`.
pub fn needs_write(last: Option<&AutoscalerStatus>, new: &AutoscalerStatus, since_ms: i64) -> bool {
    let Some(last) = last else { return true };
    let strip = |s: &AutoscalerStatus| AutoscalerStatus {
        metrics: None,
        ..s.clone()
    };
    if strip(last) != strip(new) {
        return true;
    }
    let values = |s: &AutoscalerStatus| {
        s.metrics.as_ref().map(|m| {
            (
                m.queue_depth,
                m.gpu_memory_utilization.map(f64::to_bits),
                m.in_flight,
                m.time_to_first_token_milliseconds.clone(),
            )
        })
    };
    values(last) != values(new) && since_ms >= METRICS_WRITE_INTERVAL_MS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::find_condition;
    use crate::autoscale::decide::{
        ExhaustedReason, History, Observed, PodSample, SignalsConfigured, decide,
    };
    use crate::test_support::{isvc_from_yaml, minimal_isvc_yaml};

    fn t(s: i64) -> Time {
        Time(jiff::Timestamp::from_second(s).unwrap())
    }

    fn decision(queues: &[Option<f64>], current: i32) -> Decision {
        let o = Observed {
            current_replicas: current,
            ready: queues
                .iter()
                .map(|q| PodSample {
                    queue_depth: *q,
                    in_flight: q.map(|_| 2.0),
                    gpu_memory: q.map(|_| 0.5),
                })
                .collect(),
            created_at: -10_000_000,
            ..Default::default()
        };
        let mut p = crate::api::ScalingPolicySpec::default();
        p.scale_up.max_pods = 100;
        decide(&p, SignalsConfigured::default(), &o, &History::default(), 0)
    }

    fn facts(d: &Decision, current: i32, scaled: bool, now: i64) -> TickFacts<'_> {
        TickFacts {
            decision: d,
            current,
            unschedulable: 0,
            mode: PolicyMode::Active,
            burst_mode: BurstMode::Saturated,
            scaled,
            cold_start_seconds: Some(200),
            now: t(now),
        }
    }

    /// A forecast (`predictive` Advisory or Active) and what `cost` finds worth its GPUs show
    /// in `ScalingActive` every tick, scaled or not.
    #[test]
    fn the_forecast_and_cost_show_in_status_every_tick() {
        let isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let mut d = decision(&[Some(4.0), Some(4.0)], 2);
        let plain = autoscaler_status(&isvc, &facts(&d, 2, false, 100));
        let c = find_condition(&plain.conditions, SCALING_ACTIVE).unwrap();
        assert!(!c.message.contains("forecast"), "{}", c.message);
        d.forecast = Some((5, 240));
        let s = autoscaler_status(&isvc, &facts(&d, 2, false, 100));
        let c = find_condition(&s.conditions, SCALING_ACTIVE).unwrap();
        assert!(
            c.message.ends_with("; forecast: 5 replicas in 240s"),
            "{}",
            c.message
        );
        d.cost = Some(crate::autoscale::cost::Worth {
            break_even: 0.62,
            replicas: 3,
            keep: 3,
        });
        let s = autoscaler_status(&isvc, &facts(&d, 2, false, 100));
        let c = find_condition(&s.conditions, SCALING_ACTIVE).unwrap();
        assert!(
            c.message.ends_with(
                "; forecast: 5 replicas in 240s; cost: replicas worth their GPUs 3 (one pays at 62% busy)"
            ),
            "{}",
            c.message
        );
        assert!(s.decisions.is_empty(), "nothing scaled");
    }

    /// The latency objective's measurement shows in status with the other metrics, and a
    /// decision it drove names it.
    #[test]
    fn measured_time_to_first_token_shows_in_status() {
        let isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let mut d = decision(&[Some(4.0), Some(4.0)], 2);
        d.ttft_ms = vec![("p95", 1234.4)];
        d.desired = 5;
        d.signal = Some(crate::autoscale::decide::Driver::TimeToFirstToken);
        let s = autoscaler_status(&isvc, &facts(&d, 2, true, 100));
        let m = s.metrics.unwrap().time_to_first_token_milliseconds.unwrap();
        assert_eq!((m.p50, m.p95, m.p99), (None, Some(1234), None));
        assert_eq!(
            s.decisions.last().and_then(|r| r.signal.as_deref()),
            Some("TimeToFirstToken")
        );
    }

    #[test]
    fn scale_is_recorded_with_reason_and_time() {
        let isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let d = decision(&[Some(16.0), Some(16.0)], 2);
        assert_eq!(d.desired, 4, "{}", d.reason);
        let s = autoscaler_status(&isvc, &facts(&d, 2, true, 100));
        assert_eq!(s.desired_replicas, 4);
        assert_eq!(s.decisions.len(), 1);
        assert_eq!((s.decisions[0].from, s.decisions[0].to), (2, 4));
        assert!(
            s.decisions[0]
                .reason
                .contains("queue depth 16/4 per replica")
        );
        assert_eq!(s.last_scale_time, Some(t(100)));
        let active = find_condition(&s.conditions, SCALING_ACTIVE).unwrap();
        assert_eq!(
            (active.status.as_str(), active.reason.as_str()),
            ("True", "MetricsAvailable")
        );
        assert_eq!(s.metrics.as_ref().unwrap().queue_depth, Some(32));
    }

    #[test]
    fn history_keeps_the_last_ten() {
        let mut isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let d = decision(&[Some(16.0), Some(16.0)], 2);
        for i in 0..15 {
            let s = autoscaler_status(&isvc, &facts(&d, 2, true, i));
            isvc.status = Some(crate::api::InferenceServiceStatus {
                decisions: s.decisions,
                ..Default::default()
            });
        }
        let kept = &isvc.status.as_ref().unwrap().decisions;
        assert_eq!(kept.len(), HISTORY_LEN);
        assert_eq!(kept.last().unwrap().time, t(14));
        assert_eq!(kept[0].time, t(5));
    }

    #[test]
    fn metrics_unavailable_sets_scaling_active_false() {
        let isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let d = decision(&[None, None], 2);
        let s = autoscaler_status(&isvc, &facts(&d, 2, false, 1));
        let c = find_condition(&s.conditions, SCALING_ACTIVE).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "MetricsUnavailable")
        );
        assert!(
            s.metrics.is_none(),
            "no numbers are invented when none were read"
        );
    }

    #[test]
    fn advisory_records_a_recommendation_once() {
        let mut isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let d = decision(&[Some(16.0), Some(16.0)], 2);
        let mut f = facts(&d, 2, false, 1);
        f.mode = PolicyMode::Advisory;
        let s = autoscaler_status(&isvc, &f);
        assert_eq!(s.decisions.len(), 1);
        assert_eq!(
            find_condition(&s.conditions, SCALING_ACTIVE)
                .unwrap()
                .reason,
            "Advisory"
        );
        isvc.status = Some(crate::api::InferenceServiceStatus {
            desired_replicas: Some(s.desired_replicas),
            decisions: s.decisions.clone(),
            ..Default::default()
        });
        assert_eq!(autoscaler_status(&isvc, &f).decisions.len(), 1);
    }

    #[test]
    fn bursting_follows_exhaustion_mode_and_providers() {
        let mut isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let mut d = decision(&[Some(1.0)], 1);
        d.exhausted = Some(ExhaustedReason::MaxReplicas);
        let s = autoscaler_status(&isvc, &facts(&d, 1, false, 1));
        assert!(!s.burst.active, "no providers, no burst");
        assert_eq!(s.burst.reason.as_deref(), Some("NoProviders"));
        isvc.spec.router.enabled = true;
        isvc.spec.burst = Some(serde_json::from_value(serde_json::json!({"providers": [
            {"name": "p", "url": "https://x/v1", "model": "m", "apiKeySecretRef": {"name": "s", "key": "k"}}]})).unwrap());
        let s = autoscaler_status(&isvc, &facts(&d, 1, false, 5));
        assert!(s.burst.active);
        assert_eq!(s.burst.reason.as_deref(), Some("MaxReplicas"));
        assert_eq!(s.burst.since, Some(t(5)));
        let c = find_condition(&s.conditions, BURSTING).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "MaxReplicas")
        );
        let mut never = facts(&d, 1, false, 6);
        never.burst_mode = BurstMode::Never;
        assert!(!autoscaler_status(&isvc, &never).burst.active);
        d.exhausted = None;
        let s = autoscaler_status(&isvc, &facts(&d, 1, false, 7));
        assert_eq!(
            (s.burst.active, s.burst.reason.as_deref()),
            (false, Some("CapacityAvailable"))
        );
        // Held back by cost: the providers take the rest on purpose.
        d.driver = crate::autoscale::decide::Driver::Cost;
        let s = autoscaler_status(&isvc, &facts(&d, 1, false, 8));
        assert_eq!(
            (s.burst.active, s.burst.reason.as_deref()),
            (true, Some("CheaperThanGpus"))
        );
    }

    #[test]
    fn capacity_exhausted_condition() {
        let isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let mut d = decision(&[Some(1.0)], 1);
        d.exhausted = Some(ExhaustedReason::Unschedulable);
        let s = autoscaler_status(&isvc, &facts(&d, 1, false, 1));
        let c = find_condition(&s.conditions, CAPACITY_EXHAUSTED).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "Unschedulable")
        );
    }

    #[test]
    fn writes_are_throttled_to_real_changes() {
        let isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let d1 = decision(&[Some(4.0), Some(4.0)], 2);
        let d2 = decision(&[Some(4.3), Some(4.3)], 2); // same desired, other numbers
        let a = autoscaler_status(&isvc, &facts(&d1, 2, false, 1));
        // Conditions keep their times, so an identical tick is no write.
        let mut with_status = isvc.clone();
        with_status.status = Some(crate::api::InferenceServiceStatus {
            conditions: a.conditions.clone(),
            ..Default::default()
        });
        let a2 = autoscaler_status(&with_status, &facts(&d1, 2, false, 2));
        let b = autoscaler_status(&with_status, &facts(&d2, 2, false, 3));
        assert!(needs_write(None, &a, 0));
        let same_numbers = AutoscalerStatus {
            metrics: a.metrics.clone(),
            ..a2.clone()
        };
        assert!(!needs_write(Some(&a), &same_numbers, 60_000));
        assert!(
            !needs_write(Some(&a), &b, 1_000),
            "metrics-only change within 30 s"
        );
        assert!(needs_write(Some(&a), &b, 30_000));
        let scaled = autoscaler_status(
            &with_status,
            &facts(&decision(&[Some(16.0), Some(16.0)], 2), 2, true, 4),
        );
        assert!(needs_write(Some(&a), &scaled, 1));
    }
}
