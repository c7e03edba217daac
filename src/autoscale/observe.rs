//! Pure: engine Pods as the API server reports them → what `decide()` needs to know of them.

use k8s_openapi::api::core::v1::Pod;

use crate::clock::Millis;

/// One engine pod, classified.
#[derive(Clone, Debug, PartialEq)]
pub struct EnginePod {
    pub name: String,
    /// Pod IP, once it has one.
    pub ip: Option<String>,
    pub state: PodState,
    /// Created → Ready, in milliseconds, for pods that became ready.
    pub cold_start_ms: Option<Millis>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    /// Serving: scraped and counted as capacity.
    Ready,
    /// Scheduled, loading the model: not capacity, and its missing metrics are not stale.
    Starting,
    /// `PodScheduled=False` with reason `Unschedulable` (e.g. `Insufficient nvidia.com/gpu`).
    Unschedulable,
}

fn millis(t: &jiff::Timestamp) -> Millis {
    t.as_millisecond()
}

/// Classifies pods; terminating and finished pods are left out (they are neither capacity nor
/// coming capacity).
pub fn classify<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<EnginePod> {
    pods.into_iter().filter_map(classify_one).collect()
}

/// Classifies one pod (`None` for terminating or finished pods).
pub fn classify_one(pod: &Pod) -> Option<EnginePod> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let conditions = status.and_then(|s| s.conditions.as_ref());
    let cond = |t: &str| conditions.and_then(|cs| cs.iter().find(|c| c.type_ == t));
    let ready = cond("Ready").filter(|c| c.status == "True");
    let unschedulable = cond("PodScheduled")
        .is_some_and(|c| c.status == "False" && c.reason.as_deref() == Some("Unschedulable"));
    let state = if ready.is_some() {
        PodState::Ready
    } else if unschedulable {
        PodState::Unschedulable
    } else {
        PodState::Starting
    };
    let created = pod
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| millis(&t.0));
    let cold_start_ms = match (created, ready.and_then(|c| c.last_transition_time.as_ref())) {
        (Some(c), Some(r)) => Some((millis(&r.0) - c).max(0)),
        _ => None,
    };
    Some(EnginePod {
        name: pod.metadata.name.clone().unwrap_or_default(),
        ip: status
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty()),
        state,
        cold_start_ms,
    })
}

/// Smoothed cold-start time: an exponentially weighted mean over pods as they become ready,
/// each pod counted once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ColdStart {
    mean_ms: Option<f64>,
    seen: std::collections::BTreeSet<String>,
}

impl ColdStart {
    const WEIGHT: f64 = 0.3;

    pub fn observe(&mut self, pods: &[EnginePod]) {
        for p in pods {
            let Some(ms) = p.cold_start_ms else { continue };
            if !self.seen.insert(p.name.clone()) {
                continue;
            }
            self.mean_ms = Some(match self.mean_ms {
                None => ms as f64,
                Some(m) => m + Self::WEIGHT * (ms as f64 - m),
            });
        }
        // Forget pods that are gone so the set stays bounded.
        self.seen.retain(|n| pods.iter().any(|p| &p.name == n));
    }

    pub fn seconds(&self) -> Option<i64> {
        self.mean_ms.map(|m| (m / 1000.0).round() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, extra: serde_json::Value) -> Pod {
        let mut v =
            json!({"metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"}});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, val) in e {
                o.insert(k.clone(), val.clone());
            }
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn classifies_ready_starting_unschedulable_and_skips_terminating() {
        let pods = vec![
            pod(
                "ready",
                json!({"status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:03:30Z"}]}}),
            ),
            pod(
                "loading",
                json!({"status": {"phase": "Running", "podIP": "10.0.0.2", "conditions": [
                {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}]}}),
            ),
            pod(
                "pending",
                json!({"status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}),
            ),
            {
                let mut p = pod("going", json!({"status": {"phase": "Running"}}));
                p.metadata.deletion_timestamp = p.metadata.creation_timestamp.clone();
                p
            },
            pod("done", json!({"status": {"phase": "Failed"}})),
        ];
        let c = classify(&pods);
        let states: Vec<_> = c.iter().map(|p| (p.name.as_str(), p.state)).collect();
        assert_eq!(
            states,
            vec![
                ("ready", PodState::Ready),
                ("loading", PodState::Starting),
                ("pending", PodState::Unschedulable)
            ]
        );
        assert_eq!(c[0].ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(c[0].cold_start_ms, Some(210_000));
        assert_eq!(c[2].ip, None);
    }

    #[test]
    fn cold_start_is_smoothed_and_counts_each_pod_once() {
        let p = |name: &str, ms| EnginePod {
            name: name.into(),
            ip: None,
            state: PodState::Ready,
            cold_start_ms: Some(ms),
        };
        let mut cs = ColdStart::default();
        cs.observe(&[p("a", 200_000)]);
        assert_eq!(cs.seconds(), Some(200));
        cs.observe(&[p("a", 200_000), p("b", 300_000)]);
        assert_eq!(cs.seconds(), Some(230));
        // Seen again: no change.
        cs.observe(&[p("a", 200_000), p("b", 300_000)]);
        assert_eq!(cs.seconds(), Some(230));
    }
}
