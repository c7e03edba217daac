//! Status conditions, following the Kubernetes API conventions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// At least one engine replica serves (the endpoint answers).
pub const READY: &str = "Ready";
/// Something needs a person's attention; `reason` says what.
pub const DEGRADED: &str = "Degraded";
/// The autoscaler can read metrics and act on them.
pub const SCALING_ACTIVE: &str = "ScalingActive";
/// In-cluster GPU capacity cannot cover the load.
pub const CAPACITY_EXHAUSTED: &str = "CapacityExhausted";
/// Overflow is going to external providers.
pub const BURSTING: &str = "Bursting";
/// The engine image and the model are pinned to one version (a warning when not).
pub const PINNED: &str = "Pinned";
/// A ScalingPolicy can be used.
pub const VALID: &str = "Valid";

/// A condition as the controller wants it, before `lastTransitionTime` is settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl DesiredCondition {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Builds the condition to store: `lastTransitionTime` moves only when the status flips, so a
/// status that has not changed serialises identically on every pass.
pub fn settle_condition(
    existing: &[Condition],
    desired: &DesiredCondition,
    now: &Time,
    generation: Option<i64>,
) -> Condition {
    let status = if desired.status { "True" } else { "False" };
    let previous = existing.iter().find(|c| c.type_ == desired.type_);
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => now.clone(),
    };
    Condition {
        type_: desired.type_.to_string(),
        status: status.to_string(),
        reason: desired.reason.to_string(),
        message: desired.message.clone(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Time {
        Time(jiff::Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let first = settle_condition(
            &[],
            &DesiredCondition::new(READY, true, "Serving", "1 ready"),
            &t(100),
            Some(1),
        );
        assert_eq!(first.last_transition_time, t(100));
        assert_eq!(first.status, "True");
        // Same status, new message and generation: the time stays.
        let second = settle_condition(
            std::slice::from_ref(&first),
            &DesiredCondition::new(READY, true, "Serving", "2 ready"),
            &t(200),
            Some(2),
        );
        assert_eq!(second.last_transition_time, t(100));
        assert_eq!(second.message, "2 ready");
        assert_eq!(second.observed_generation, Some(2));
        // Flip: the time moves.
        let third = settle_condition(
            std::slice::from_ref(&second),
            &DesiredCondition::new(READY, false, "NoReadyReplicas", "0 ready"),
            &t(300),
            Some(2),
        );
        assert_eq!(third.last_transition_time, t(300));
        assert_eq!(third.status, "False");
    }

    #[test]
    fn other_types_do_not_leak_transition_time() {
        let degraded = settle_condition(
            &[],
            &DesiredCondition::new(DEGRADED, false, "AsExpected", ""),
            &t(5),
            None,
        );
        let ready = settle_condition(
            &[degraded],
            &DesiredCondition::new(READY, false, "Starting", ""),
            &t(9),
            None,
        );
        assert_eq!(ready.last_transition_time, t(9));
    }
}
