//! Burst budget: requests per minute and spend per hour across all providers, over sliding
//! windows. Pure: the clock is an argument. Spend is counted from the `usage` each provider
//! returns, times its pricing.

use std::collections::VecDeque;

use crate::api::Pricing;
use crate::clock::Millis;

const MINUTE: Millis = 60_000;
const HOUR: Millis = 3_600_000;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct BudgetTracker {
    pub max_requests_per_minute: Option<u32>,
    pub max_spend_per_hour: Option<f64>,
    requests: VecDeque<Millis>,
    spend: VecDeque<(Millis, f64)>,
    /// Sum of `spend`, kept up to date so a check is O(1) however busy the hour was.
    spend_total: f64,
}

/// Cost of one response from its token usage.
pub fn cost(pricing: Option<&Pricing>, prompt_tokens: u64, completion_tokens: u64) -> f64 {
    pricing.map_or(0.0, |p| {
        (prompt_tokens as f64 * p.input_per_million_tokens
            + completion_tokens as f64 * p.output_per_million_tokens)
            / 1_000_000.0
    })
}

/// Parses `maxSpendPerHour` ("5.00"); an unparseable value is a configuration error.
pub fn parse_spend(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| format!("maxSpendPerHour {s:?} is not a non-negative decimal"))
}

impl BudgetTracker {
    pub fn new(max_requests_per_minute: Option<u32>, max_spend_per_hour: Option<f64>) -> Self {
        Self {
            max_requests_per_minute,
            max_spend_per_hour,
            ..Self::default()
        }
    }

    fn prune(&mut self, now: Millis) {
        while self.requests.front().is_some_and(|t| *t <= now - MINUTE) {
            self.requests.pop_front();
        }
        while let Some(&(t, c)) = self.spend.front() {
            if t > now - HOUR {
                break;
            }
            self.spend.pop_front();
            self.spend_total -= c;
        }
        if self.spend.is_empty() {
            self.spend_total = 0.0; // no float drift once the window empties
        }
    }

    pub fn requests_last_minute(&mut self, now: Millis) -> usize {
        self.prune(now);
        self.requests.len()
    }

    pub fn spend_last_hour(&mut self, now: Millis) -> f64 {
        self.prune(now);
        self.spend_total.max(0.0)
    }

    /// Whether one more request may go to a provider now.
    pub fn allows(&mut self, now: Millis) -> bool {
        self.allows_shared(
            now,
            self.max_requests_per_minute,
            self.max_spend_per_hour,
            0.0,
        )
    }

    /// [`Self::allows`] for one of several routers sharing the caps: this one may send
    /// `rpm_cap` a minute, and together they may spend `spend_cap` an hour, of which the others
    /// have spent `others_spend`.
    pub fn allows_shared(
        &mut self,
        now: Millis,
        rpm_cap: Option<u32>,
        spend_cap: Option<f64>,
        others_spend: f64,
    ) -> bool {
        self.prune(now);
        let rpm_ok = rpm_cap.is_none_or(|m| self.requests.len() < m as usize);
        let spend = self.spend_total + others_spend;
        let spend_ok = spend_cap.is_none_or(|m| spend < m);
        rpm_ok && spend_ok
    }

    /// A request was sent to a provider.
    pub fn record_request(&mut self, now: Millis) {
        self.requests.push_back(now);
    }

    /// A provider answered with this much usage cost.
    pub fn record_spend(&mut self, now: Millis, cost: f64) {
        if cost > 0.0 {
            self.spend.push_back((now, cost));
            self.spend_total += cost;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_minute_slide() {
        let mut b = BudgetTracker::new(Some(2), None);
        assert!(b.allows(0));
        b.record_request(0);
        b.record_request(10);
        assert!(!b.allows(59_999));
        // The request at 0 ms has left the minute; the one at 10 ms has not.
        assert!(b.allows(60_000));
        b.record_request(60_000);
        assert!(!b.allows(60_005));
        assert_eq!(b.requests_last_minute(60_011), 1);
    }

    #[test]
    fn spend_per_hour_from_usage_and_pricing() {
        let pricing = Pricing {
            input_per_million_tokens: 0.5,
            output_per_million_tokens: 1.5,
        };
        let c = cost(Some(&pricing), 1_000_000, 2_000_000);
        assert!((c - 3.5).abs() < 1e-9);
        assert_eq!(cost(None, 10, 10), 0.0);
        let mut b = BudgetTracker::new(None, Some(parse_spend("5.00").unwrap()));
        b.record_spend(0, c);
        assert!(b.allows(1));
        b.record_spend(2, 2.0);
        assert!(!b.allows(3), "5.5 spent of 5.00");
        assert!(b.allows(HOUR + 3));
        assert!(parse_spend("five").is_err());
        assert!(parse_spend("-1").is_err());
    }
}
