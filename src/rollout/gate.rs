//! The gate: what a rollout step must show before traffic moves on.

use crate::api::RolloutGate;
use crate::autoscale::latency::{Buckets, min_samples};
use crate::autoscale::signals::RevisionTotals;

/// The buckets a revision's time to first token is kept in for the gate: 1 ms growing by
/// 10 % to about 85 s. The routers' latency buckets grow 2.5× at a time, too coarse to tell a
/// candidate 20 % slower from one twice as slow.
pub fn buckets() -> Buckets {
    Buckets::exponential(0.001, 1.1, 120)
}

/// What one revision answered in a step's window.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// Requests its engines answered.
    pub requests: f64,
    /// Of them, 5xx answers and answers cut off mid-way.
    pub errors: f64,
    /// Of them, 4xx answers: an error of the candidate's only beyond the stable's rate (a bad
    /// request fails on both; a model name the candidate no longer serves, on it alone).
    pub client_errors: f64,
    /// Time to first token of its streamed answers.
    pub ttft: Buckets,
}

impl Default for Window {
    /// Empty, in the gate's buckets (a bucketless histogram would drop what it is given).
    fn default() -> Self {
        Self {
            requests: 0.0,
            errors: 0.0,
            client_errors: 0.0,
            ttft: buckets(),
        }
    }
}

impl Window {
    /// Empty, in the buckets of whatever is added first.
    pub fn empty() -> Self {
        Self {
            requests: 0.0,
            errors: 0.0,
            client_errors: 0.0,
            ttft: Buckets::default(),
        }
    }

    /// What a router's totals for a revision gained since `prev` (`None`: it had none, so all
    /// of them); `None` when they went down (the router restarted).
    pub fn since(cur: &RevisionTotals, prev: Option<&RevisionTotals>) -> Option<Self> {
        let zero = RevisionTotals::default();
        let p = prev.unwrap_or(&zero);
        if cur.requests < p.requests || cur.errors < p.errors || cur.client_errors < p.client_errors
        {
            return None;
        }
        let ttft = match (&cur.ttft, &p.ttft) {
            (Some(c), Some(b)) => c.since(b)?,
            (Some(c), None) => c.clone(),
            (None, _) => Buckets::default(),
        };
        Some(Self {
            requests: cur.requests - p.requests,
            errors: cur.errors - p.errors,
            client_errors: cur.client_errors - p.client_errors,
            ttft,
        })
    }

    pub fn add(&mut self, other: &Window) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.client_errors += other.client_errors;
        if !other.ttft.bounds().is_empty() {
            self.ttft.add(&other.ttft);
        }
    }

    fn p95_ms(&self) -> Option<f64> {
        (self.ttft.count() >= min_samples(0.95))
            .then(|| self.ttft.quantile(0.95))
            .flatten()
            .map(|s| s * 1000.0)
    }
}

/// The gate's figures, for status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    pub requests: f64,
    pub error_rate: f64,
    pub candidate_ttft_p95_ms: Option<f64>,
    pub stable_ttft_p95_ms: Option<f64>,
}

impl Figures {
    pub fn ttft_ratio(&self) -> Option<f64> {
        match (self.candidate_ttft_p95_ms, self.stable_ttft_p95_ms) {
            (Some(c), Some(s)) if s > 0.0 => Some(c / s),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Pass(Figures),
    /// Not enough requests yet: `why`.
    Wait(Figures, String),
    Fail(Figures, String),
}

/// Judges the candidate's window against the stable's. Time to first token is compared only
/// when both had enough streamed answers to read a p95 (40); errors always are: 5xx and
/// cut-off answers, and 4xx answers beyond the stable's rate of them.
pub fn judge(gate: &RolloutGate, candidate: &Window, stable: &Window) -> Verdict {
    let rate = |n: f64, of: f64| if of > 0.0 { n / of } else { 0.0 };
    let excess_4xx = (rate(candidate.client_errors, candidate.requests)
        - rate(stable.client_errors, stable.requests))
    .max(0.0);
    let f = Figures {
        requests: candidate.requests,
        error_rate: rate(candidate.errors, candidate.requests) + excess_4xx,
        candidate_ttft_p95_ms: candidate.p95_ms(),
        stable_ttft_p95_ms: stable.p95_ms(),
    };
    if candidate.requests < gate.min_requests as f64 {
        let why = format!(
            "{} of {} requests answered by the candidate",
            candidate.requests.round(),
            gate.min_requests
        );
        return Verdict::Wait(f, why);
    }
    if f.error_rate > gate.max_error_rate {
        let why = format!(
            "error rate {:.2}% above {:.2}% over {} requests",
            f.error_rate * 100.0,
            gate.max_error_rate * 100.0,
            candidate.requests.round()
        );
        return Verdict::Fail(f, why);
    }
    if let Some(r) = f.ttft_ratio()
        && r > gate.max_ttft_p95_ratio
    {
        let why = format!(
            "p95 time to first token {:.0} ms is {r:.2}x the stable's {:.0} ms (at most {:.2}x)",
            f.candidate_ttft_p95_ms.unwrap_or_default(),
            f.stable_ttft_p95_ms.unwrap_or_default(),
            gate.max_ttft_p95_ratio
        );
        return Verdict::Fail(f, why);
    }
    Verdict::Pass(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(requests: f64, errors: f64, ttft_s: f64) -> Window {
        let mut ttft = buckets();
        for _ in 0..requests as usize {
            ttft.observe(ttft_s);
        }
        Window {
            requests,
            errors,
            client_errors: 0.0,
            ttft,
        }
    }

    /// 4xx answers count against the candidate only beyond the stable's rate of them: a model
    /// name it no longer serves fails it; clients' bad requests, failing on both, do not.
    #[test]
    fn client_errors_count_beyond_the_stables_rate() {
        let gate = RolloutGate::default();
        let with_4xx = |requests: f64, client_errors: f64| Window {
            client_errors,
            ..window(requests, 0.0, 0.2)
        };
        let Verdict::Fail(f, why) = judge(&gate, &with_4xx(200.0, 200.0), &with_4xx(1000.0, 0.0))
        else {
            panic!("a candidate answering 404 to all must fail");
        };
        assert!(
            (f.error_rate - 1.0).abs() < 1e-9 && why.contains("error rate"),
            "{why}"
        );
        assert!(matches!(
            judge(&gate, &with_4xx(200.0, 20.0), &with_4xx(1000.0, 100.0)),
            Verdict::Pass(_)
        ));
    }

    #[test]
    fn the_gate_waits_for_requests_then_checks_errors_and_latency() {
        let gate = RolloutGate::default();
        let stable = window(1000.0, 0.0, 0.2);
        let Verdict::Wait(_, why) = judge(&gate, &window(40.0, 0.0, 0.2), &stable) else {
            panic!("too few requests must wait");
        };
        assert!(why.contains("40 of 100"), "{why}");
        assert!(matches!(
            judge(&gate, &window(200.0, 1.0, 0.2), &stable),
            Verdict::Pass(_)
        ));
        let Verdict::Fail(f, why) = judge(&gate, &window(200.0, 5.0, 0.2), &stable) else {
            panic!("2.5% errors must fail a 1% gate");
        };
        assert!((f.error_rate - 0.025).abs() < 1e-9);
        assert!(why.contains("error rate 2.50% above 1.00%"), "{why}");
        // Twice as slow to the first token: over 1.25x.
        let Verdict::Fail(f, why) = judge(&gate, &window(200.0, 0.0, 0.5), &stable) else {
            panic!("a slower candidate must fail");
        };
        assert!(f.ttft_ratio().unwrap() > 1.25, "{f:?}");
        assert!(why.contains("time to first token"), "{why}");
        // Without streamed answers to compare, errors alone decide.
        let mut quiet = window(200.0, 0.0, 0.5);
        quiet.ttft = buckets();
        assert!(matches!(judge(&gate, &quiet, &stable), Verdict::Pass(_)));
    }
}
