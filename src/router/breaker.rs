//! A per-provider circuit breaker: opens after repeated failures (5xx, 429, 401/403, timeouts,
//! connection errors), lets one probe through after a cool-down (half-open), and closes on a
//! success. A result counts only for a request sent since the breaker last opened or
//! half-opened: a long stream that began before an outage says nothing of the provider now.
//! Pure: the clock is an argument.

use crate::clock::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open {
        until: Millis,
    },
    /// One probe is in flight since `since`; everything else waits for its outcome — at most
    /// `open_ms`, so a probe that never reports (client gone, bad body) cannot stall it forever.
    HalfOpen {
        since: Millis,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CircuitBreaker {
    state: BreakerState,
    /// When it last opened or half-opened: results of requests sent before are stale.
    changed: Millis,
    consecutive_failures: u32,
    /// Failures in a row that open the breaker.
    pub failure_threshold: u32,
    /// How long it stays open before a probe.
    pub open_ms: Millis,
}

impl CircuitBreaker {
    pub fn new(failure_threshold: u32, open_ms: Millis) -> Self {
        Self {
            state: BreakerState::Closed,
            changed: 0,
            consecutive_failures: 0,
            failure_threshold: failure_threshold.max(1),
            open_ms,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a request may go now (without taking the half-open probe slot).
    pub fn allows(&self, now: Millis) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until } => now >= until,
            BreakerState::HalfOpen { since } => now >= since + self.open_ms,
        }
    }

    /// Call when a request is actually sent: an expired open breaker becomes half-open, and
    /// this request is its probe.
    pub fn on_send(&mut self, now: Millis) {
        match self.state {
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen { since: now };
                self.changed = now;
            }
            // The previous probe never reported: this request is the new probe.
            BreakerState::HalfOpen { since } if now >= since + self.open_ms => {
                self.state = BreakerState::HalfOpen { since: now };
                self.changed = now;
            }
            _ => {}
        }
    }

    /// A request sent at `sent` succeeded.
    pub fn on_success(&mut self, sent: Millis) {
        if sent < self.changed {
            return;
        }
        self.consecutive_failures = 0;
        self.state = BreakerState::Closed;
    }

    /// A request sent at `sent` failed at `now`.
    pub fn on_failure(&mut self, sent: Millis, now: Millis) {
        if sent < self.changed {
            return;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let reopen = matches!(self.state, BreakerState::HalfOpen { .. });
        if reopen || self.consecutive_failures >= self.failure_threshold {
            self.state = BreakerState::Open {
                until: now + self.open_ms,
            };
            self.changed = now;
        }
    }
}

impl Default for CircuitBreaker {
    /// Five failures in a row open it for 30 s.
    fn default() -> Self {
        Self::new(5, 30_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_after_cool_down_and_closes_on_success() {
        let mut b = CircuitBreaker::new(3, 1000);
        b.on_failure(0, 0);
        b.on_failure(1, 1);
        assert!(b.allows(2));
        b.on_success(2); // a success resets the count
        b.on_failure(3, 3);
        b.on_failure(4, 4);
        b.on_failure(5, 5);
        assert_eq!(b.state(), BreakerState::Open { until: 1005 });
        assert!(!b.allows(1004));
        assert!(b.allows(1005));
        b.on_send(1005);
        assert_eq!(b.state(), BreakerState::HalfOpen { since: 1005 });
        assert!(!b.allows(1006), "only one probe at a time");
        b.on_success(1005);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_probe_that_never_reports_does_not_stall_the_breaker() {
        let mut b = CircuitBreaker::new(1, 1000);
        b.on_failure(0, 0);
        b.on_send(1000); // the probe's client goes away: no success, no failure
        assert!(!b.allows(1999));
        assert!(b.allows(2000), "after open_ms another probe may go");
        b.on_send(2000);
        assert_eq!(b.state(), BreakerState::HalfOpen { since: 2000 });
        b.on_success(1000);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen { since: 2000 },
            "the first probe's late answer is not the current probe's"
        );
        b.on_success(2000);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_at_once() {
        let mut b = CircuitBreaker::new(3, 1000);
        for t in 0..3 {
            b.on_failure(t, t);
        }
        b.on_send(2000);
        b.on_failure(2000, 2001);
        assert_eq!(b.state(), BreakerState::Open { until: 3001 });
    }

    /// Answers that began before the breaker opened end long after (streams): they say nothing
    /// of the provider now, so an open breaker stays open.
    #[test]
    fn results_of_requests_sent_before_it_opened_do_not_count() {
        let mut b = CircuitBreaker::new(2, 1000);
        b.on_failure(10, 10);
        b.on_failure(11, 12);
        assert_eq!(b.state(), BreakerState::Open { until: 1012 });
        b.on_success(5);
        b.on_failure(6, 500);
        assert_eq!(b.state(), BreakerState::Open { until: 1012 });
        b.on_send(1012);
        b.on_success(9);
        assert_eq!(b.state(), BreakerState::HalfOpen { since: 1012 });
        b.on_success(1012);
        assert_eq!(b.state(), BreakerState::Closed);
        // An old stream cut off after the recovery does not count against it either.
        b.on_failure(8, 1500);
        b.on_failure(1013, 1501);
        assert_eq!(b.state(), BreakerState::Closed, "one fresh failure of two");
    }
}
