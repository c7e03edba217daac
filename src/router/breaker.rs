//! A per-provider circuit breaker: opens after repeated failures (5xx, 429, 401/403, timeouts,
//! connection errors), lets one probe through after a cool-down (half-open), and closes on a
//! success. Pure: the clock is an argument.

use crate::autoscale::decide::Millis;

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
                self.state = BreakerState::HalfOpen { since: now }
            }
            // The previous probe never reported: this request is the new probe.
            BreakerState::HalfOpen { since } if now >= since + self.open_ms => {
                self.state = BreakerState::HalfOpen { since: now }
            }
            _ => {}
        }
    }

    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.state = BreakerState::Closed;
    }

    pub fn on_failure(&mut self, now: Millis) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let reopen = matches!(self.state, BreakerState::HalfOpen { .. });
        if reopen || self.consecutive_failures >= self.failure_threshold {
            self.state = BreakerState::Open {
                until: now + self.open_ms,
            };
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
        b.on_failure(0);
        b.on_failure(1);
        assert!(b.allows(2));
        b.on_success(); // a success resets the count
        b.on_failure(3);
        b.on_failure(4);
        b.on_failure(5);
        assert_eq!(b.state(), BreakerState::Open { until: 1005 });
        assert!(!b.allows(1004));
        assert!(b.allows(1005));
        b.on_send(1005);
        assert_eq!(b.state(), BreakerState::HalfOpen { since: 1005 });
        assert!(!b.allows(1006), "only one probe at a time");
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_probe_that_never_reports_does_not_stall_the_breaker() {
        let mut b = CircuitBreaker::new(1, 1000);
        b.on_failure(0);
        b.on_send(1000); // the probe's client goes away: no success, no failure
        assert!(!b.allows(1999));
        assert!(b.allows(2000), "after open_ms another probe may go");
        b.on_send(2000);
        assert_eq!(b.state(), BreakerState::HalfOpen { since: 2000 });
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_at_once() {
        let mut b = CircuitBreaker::new(3, 1000);
        for t in 0..3 {
            b.on_failure(t);
        }
        b.on_send(2000);
        b.on_failure(2001);
        assert_eq!(b.state(), BreakerState::Open { until: 3001 });
    }
}
