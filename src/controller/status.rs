//! Pure status logic: what reconcile observed in, the status fields it owns out.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;

use crate::api::{
    DEGRADED, DesiredCondition, InferenceService, PINNED, READY, VALID, pinning, settle_condition,
};

/// Something wrong with a service that a person should look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The spec fails validation; nothing is applied until it is fixed.
    InvalidSpec(String),
    /// The referenced ScalingPolicy does not exist; defaults apply until it appears.
    PolicyNotFound(String),
    /// The referenced ScalingPolicy is invalid; defaults apply until it is fixed.
    InvalidPolicy(String, String),
    /// An object the service would own exists and belongs to someone else; it is left alone.
    ObjectConflict(String),
    /// Writing an owned object failed.
    ApplyFailed(String),
    /// A burst provider's API key Secret does not exist (provider, Secret).
    SecretNotFound(String, String),
    /// More router replicas than an engine's or a provider's slots (see
    /// `InferenceServiceSpec::over_router_shares`); everything is still applied.
    RouterReplicasOverLimit(String),
}

impl Problem {
    /// The `reason` of the Degraded condition (CamelCase, stable: alerts match on it).
    pub fn reason(&self) -> &'static str {
        match self {
            Problem::InvalidSpec(_) => "InvalidSpec",
            Problem::PolicyNotFound(_) => "PolicyNotFound",
            Problem::InvalidPolicy(..) => "InvalidPolicy",
            Problem::ObjectConflict(_) => "ObjectConflict",
            Problem::ApplyFailed(_) => "ApplyFailed",
            Problem::SecretNotFound(..) => "SecretNotFound",
            Problem::RouterReplicasOverLimit(_) => "RouterReplicasOverLimit",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Problem::InvalidSpec(m) => format!("spec is invalid, nothing was changed: {m}"),
            Problem::PolicyNotFound(p) => {
                format!(
                    "ScalingPolicy {p:?} not found; using the built-in defaults until it exists"
                )
            }
            Problem::InvalidPolicy(p, m) => {
                format!(
                    "ScalingPolicy {p:?} is invalid ({m}); using the built-in defaults until it is fixed"
                )
            }
            Problem::ObjectConflict(m) => {
                format!("{m} exists and is not owned by this InferenceService; left alone")
            }
            Problem::ApplyFailed(m) => format!("applying owned objects failed: {m}"),
            Problem::SecretNotFound(p, s) => format!(
                "burst provider {p:?}: Secret {s:?} not found; the router serves locally and skips this provider until it exists"
            ),
            Problem::RouterReplicasOverLimit(m) => format!(
                "{m}; until it is fixed, the routers together may send more than that limit"
            ),
        }
    }
}

/// The engine Deployment's replica counts, as reconcile saw them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineReplicas {
    pub replicas: i32,
    pub ready: i32,
}

/// The part of `InferenceService.status` that reconcile owns (server-side apply field manager
/// `spillway`); the autoscaler owns the rest. Nothing here changes unless the world does.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileStatus {
    pub observed_generation: Option<i64>,
    pub conditions: Vec<Condition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    pub url: String,
}

/// The conditions reconcile owns, in this order.
const OWN_CONDITIONS: [&str; 3] = [READY, DEGRADED, PINNED];

/// `Pinned`: a warning (not `Degraded`: everything works) when a new replica could serve
/// something other than what the others serve.
pub fn pinned_condition(isvc: &InferenceService) -> DesiredCondition {
    let why = pinning::unpinned(&isvc.spec.engine, &isvc.spec.model);
    let image = !pinning::image_pinned(&isvc.spec.engine.image);
    let model = why.len() > usize::from(image);
    let reason = match (image, model) {
        (false, false) => {
            return DesiredCondition::new(
                PINNED,
                true,
                "Pinned",
                "the engine image has a digest and model.uri a version",
            );
        }
        (true, true) => "NotPinned",
        (true, false) => "ImageNotPinned",
        (false, true) => "ModelNotPinned",
    };
    DesiredCondition::new(PINNED, false, reason, why.join("; "))
}

/// The conditions reconcile owns.
pub fn desired_conditions(
    isvc: &InferenceService,
    engine: Option<EngineReplicas>,
    problems: &[Problem],
) -> [DesiredCondition; 3] {
    let ready = match (engine, problems.first()) {
        (Some(e), _) if e.ready > 0 => DesiredCondition::new(
            READY,
            true,
            "Serving",
            format!("{} of {} engine replicas ready", e.ready, e.replicas),
        ),
        (None, Some(p @ Problem::InvalidSpec(_))) => {
            DesiredCondition::new(READY, false, p.reason(), p.message())
        }
        (Some(e), _) if e.replicas > 0 => DesiredCondition::new(
            READY,
            false,
            "Starting",
            format!(
                "0 of {} engine replicas ready; loading a model can take several minutes",
                e.replicas
            ),
        ),
        _ => DesiredCondition::new(READY, false, "NoReplicas", "no engine replica exists yet"),
    };
    let degraded = match problems.first() {
        Some(p) => {
            let mut msg = p.message();
            for more in &problems[1..] {
                msg.push_str("; ");
                msg.push_str(&more.message());
            }
            DesiredCondition::new(DEGRADED, true, p.reason(), msg)
        }
        None => DesiredCondition::new(
            DEGRADED,
            false,
            "AsExpected",
            "all owned objects are in place",
        ),
    };
    [ready, degraded, pinned_condition(isvc)]
}

/// Builds reconcile's status fields for `isvc`, keeping transition times of unchanged conditions.
pub fn reconcile_status(
    isvc: &InferenceService,
    engine: Option<EngineReplicas>,
    problems: &[Problem],
    url: String,
    now: &Time,
) -> ReconcileStatus {
    let existing = isvc
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = isvc.metadata.generation;
    ReconcileStatus {
        observed_generation: generation,
        conditions: desired_conditions(isvc, engine, problems)
            .iter()
            .map(|d| settle_condition(existing, d, now, generation))
            .collect(),
        replicas: engine.map(|e| e.replicas),
        ready_replicas: engine.map(|e| e.ready),
        url,
    }
}

/// The same fields as currently stored, to decide whether a write is needed at all.
pub fn current_reconcile_status(isvc: &InferenceService) -> Option<ReconcileStatus> {
    let s = isvc.status.as_ref()?;
    let conditions: Vec<Condition> = OWN_CONDITIONS
        .iter()
        .filter_map(|t| s.conditions.iter().find(|c| c.type_ == *t).cloned())
        .collect();
    Some(ReconcileStatus {
        observed_generation: s.observed_generation,
        conditions,
        replicas: s.replicas,
        ready_replicas: s.ready_replicas,
        url: s.url.clone().unwrap_or_default(),
    })
}

/// The conditions that newly turned bad (for Warning events: one per transition, not per pass).
pub fn new_problems<'a>(isvc: &InferenceService, problems: &'a [Problem]) -> Vec<&'a Problem> {
    let previous = isvc
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == DEGRADED))
        .filter(|c| c.status == "True")
        .map(|c| c.reason.clone());
    problems
        .iter()
        .filter(|p| previous.as_deref() != Some(p.reason()))
        .collect()
}

/// ScalingPolicy status: whether it is usable, and how many services use it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    pub observed_generation: Option<i64>,
    pub conditions: Vec<Condition>,
    pub services: i32,
}

pub fn policy_status(
    policy: &crate::api::ScalingPolicy,
    services: i32,
    now: &Time,
) -> PolicyStatus {
    let existing = policy
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = policy.metadata.generation;
    let valid = match policy.spec.validate() {
        Ok(()) => DesiredCondition::new(VALID, true, "Valid", "policy can be used"),
        Err(m) => DesiredCondition::new(VALID, false, "InvalidSpec", m),
    };
    PolicyStatus {
        observed_generation: generation,
        conditions: vec![settle_condition(existing, &valid, now, generation)],
        services,
    }
}

pub fn current_policy_status(policy: &crate::api::ScalingPolicy) -> Option<PolicyStatus> {
    let s = policy.status.as_ref()?;
    Some(PolicyStatus {
        observed_generation: s.observed_generation,
        conditions: s
            .conditions
            .iter()
            .filter(|c| c.type_ == VALID)
            .cloned()
            .collect(),
        services: s.services.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::find_condition;
    use crate::test_support::{isvc_from_yaml, minimal_isvc_yaml};

    fn now(s: i64) -> Time {
        Time(jiff::Timestamp::from_second(s).unwrap())
    }

    fn cond<'a>(s: &'a ReconcileStatus, t: &str) -> &'a Condition {
        find_condition(&s.conditions, t).unwrap()
    }

    /// `Pinned` warns, naming what is not pinned and how to pin it; it never marks the
    /// service Degraded.
    #[test]
    fn pinned_says_what_is_not_pinned() {
        let digest = "0".repeat(64);
        let with = |image: &str, uri: Option<&str>| {
            let mut isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
            isvc.spec.engine.image = image.to_string();
            isvc.spec.model.uri = uri.map(str::to_string);
            let s = reconcile_status(&isvc, None, &[], "u".into(), &now(1));
            let c = cond(&s, PINNED).clone();
            assert_eq!(cond(&s, DEGRADED).status, "False");
            (c.status, c.reason, c.message)
        };
        let pinned_image = format!("engine@sha256:{digest}");
        let (status, reason, _) = with(&pinned_image, Some("hf://org/m@0e9e39f"));
        assert_eq!((status.as_str(), reason.as_str()), ("True", "Pinned"));
        let (status, reason, msg) = with("engine:1", Some("hf://org/m@0e9e39f"));
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "ImageNotPinned")
        );
        assert!(
            msg.contains("engine.image \"engine:1\" has no digest"),
            "{msg}"
        );
        let (_, reason, msg) = with(&pinned_image, Some("s3://models/m"));
        assert_eq!(reason, "ModelNotPinned");
        assert!(msg.contains("versionId"), "{msg}");
        let (_, reason, msg) = with("engine:1", None);
        assert_eq!(reason, "NotPinned");
        assert!(msg.contains("model.uri is not set"), "{msg}");
    }

    #[test]
    fn ready_when_one_replica_serves() {
        let isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let s = reconcile_status(
            &isvc,
            Some(EngineReplicas {
                replicas: 2,
                ready: 1,
            }),
            &[],
            "u".into(),
            &now(1),
        );
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(cond(&s, READY).reason, "Serving");
        assert_eq!(cond(&s, DEGRADED).status, "False");
        assert_eq!(s.ready_replicas, Some(1));
        assert_eq!(s.observed_generation, Some(1));
    }

    #[test]
    fn starting_while_no_replica_is_ready() {
        let isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let s = reconcile_status(
            &isvc,
            Some(EngineReplicas {
                replicas: 1,
                ready: 0,
            }),
            &[],
            "u".into(),
            &now(1),
        );
        assert_eq!(cond(&s, READY).reason, "Starting");
        let s = reconcile_status(&isvc, None, &[], "u".into(), &now(1));
        assert_eq!(cond(&s, READY).reason, "NoReplicas");
    }

    #[test]
    fn problems_set_degraded_with_the_first_reason_and_all_messages() {
        let isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let problems = [
            Problem::PolicyNotFound("fast".into()),
            Problem::ObjectConflict("Service ml/a".into()),
        ];
        let s = reconcile_status(
            &isvc,
            Some(EngineReplicas {
                replicas: 1,
                ready: 1,
            }),
            &problems,
            "u".into(),
            &now(1),
        );
        let d = cond(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "PolicyNotFound")
        );
        assert!(d.message.contains("\"fast\"") && d.message.contains("Service ml/a"));
        // Still serving: a missing policy never stops the service.
        assert_eq!(cond(&s, READY).status, "True");
    }

    #[test]
    fn invalid_spec_without_engine_is_not_ready() {
        let isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let s = reconcile_status(
            &isvc,
            None,
            &[Problem::InvalidSpec("bad".into())],
            "u".into(),
            &now(1),
        );
        assert_eq!(cond(&s, READY).reason, "InvalidSpec");
        assert_eq!(cond(&s, DEGRADED).reason, "InvalidSpec");
    }

    #[test]
    fn unchanged_world_means_unchanged_status() {
        let mut isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let e = Some(EngineReplicas {
            replicas: 1,
            ready: 1,
        });
        let first = reconcile_status(&isvc, e, &[], "u".into(), &now(1));
        isvc.status = Some(crate::api::InferenceServiceStatus {
            observed_generation: first.observed_generation,
            conditions: first.conditions.clone(),
            replicas: first.replicas,
            ready_replicas: first.ready_replicas,
            url: Some(first.url.clone()),
            ..Default::default()
        });
        let second = reconcile_status(&isvc, e, &[], "u".into(), &now(999));
        assert_eq!(current_reconcile_status(&isvc), Some(second.clone()));
        assert_eq!(first, second);
    }

    #[test]
    fn events_only_for_newly_degraded_reasons() {
        let mut isvc = isvc_from_yaml(&minimal_isvc_yaml("a"));
        let problems = [Problem::PolicyNotFound("p".into())];
        assert_eq!(new_problems(&isvc, &problems).len(), 1);
        let s = reconcile_status(&isvc, None, &problems, "u".into(), &now(1));
        isvc.status = Some(crate::api::InferenceServiceStatus {
            conditions: s.conditions,
            ..Default::default()
        });
        assert!(new_problems(&isvc, &problems).is_empty());
    }

    #[test]
    fn policy_status_reports_validity_and_count() {
        let mut p: crate::api::ScalingPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "spillway.dev/v1alpha1", "kind": "ScalingPolicy",
            "metadata": {"name": "p", "namespace": "ml", "generation": 3},
            "spec": {"minReplicas": 3, "maxReplicas": 2}
        }))
        .unwrap();
        let s = policy_status(&p, 2, &now(1));
        assert_eq!(s.services, 2);
        assert_eq!(s.conditions[0].status, "False");
        assert!(
            s.conditions[0]
                .message
                .contains("maxReplicas (2) must be >= minReplicas (3)")
        );
        p.spec.max_replicas = 5;
        assert_eq!(policy_status(&p, 0, &now(2)).conditions[0].status, "True");
    }
}
