//! Time to first token, from the routers' histograms (pure): what the latency objective
//! (`targets.timeToFirstTokenMilliseconds`) is measured on.
//!
//! Only streamed answers from local engines count: a provider's answer says nothing about the
//! engines' capacity, and a non-streamed answer's first byte is its last token.

/// The router's histogram of time to first token, by `destination` (`local` or a provider).
pub const ROUTER_TTFT_METRIC: &str = "spillway_router_time_to_first_token_seconds";

/// A latency histogram: counts per bucket (not cumulative), each bucket ending at its bound in
/// seconds, the last at +Inf.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    bounds: Vec<f64>,
    counts: Vec<f64>,
}

impl Buckets {
    /// Empty buckets ending at `start`, `start × factor`, … (`n` of them), then +Inf: the
    /// router's layout, for drivers that observe latencies themselves (the simulator).
    pub fn exponential(start: f64, factor: f64, n: usize) -> Self {
        let mut bounds: Vec<f64> = (0..n).map(|i| start * factor.powi(i as i32)).collect();
        bounds.push(f64::INFINITY);
        Self {
            counts: vec![0.0; bounds.len()],
            bounds,
        }
    }

    /// From a page's cumulative `(le, count)` pairs in any order. `None` unless they end at
    /// +Inf and never decrease.
    pub fn from_cumulative(mut pairs: Vec<(f64, f64)>) -> Option<Self> {
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        if pairs.last().is_none_or(|(le, _)| *le != f64::INFINITY) {
            return None;
        }
        let mut prev = 0.0;
        let mut out = Self::default();
        for (le, c) in pairs {
            if c < prev {
                return None;
            }
            out.bounds.push(le);
            out.counts.push(c - prev);
            prev = c;
        }
        Some(out)
    }

    /// The upper bounds, +Inf last.
    pub fn bounds(&self) -> &[f64] {
        &self.bounds
    }

    pub fn count(&self) -> f64 {
        self.counts.iter().sum()
    }

    /// Counts one latency.
    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.counts[i] += 1.0;
        }
    }

    /// What was added since `prev`; `None` when it cannot be told (the router restarted, or
    /// its buckets changed).
    pub fn since(&self, prev: &Buckets) -> Option<Buckets> {
        if prev.bounds != self.bounds {
            return None;
        }
        let counts: Vec<f64> = self
            .counts
            .iter()
            .zip(&prev.counts)
            .map(|(c, p)| c - p)
            .collect();
        counts.iter().all(|c| *c >= 0.0).then(|| Buckets {
            bounds: self.bounds.clone(),
            counts,
        })
    }

    /// Adds `other`'s counts; false (nothing added) when its buckets differ.
    pub fn add(&mut self, other: &Buckets) -> bool {
        if self.bounds.is_empty() {
            *self = other.clone();
            return true;
        }
        if self.bounds != other.bounds {
            return false;
        }
        for (c, o) in self.counts.iter_mut().zip(&other.counts) {
            *c += o;
        }
        true
    }

    /// The `q` quantile in seconds, interpolated linearly inside its bucket as Prometheus'
    /// `histogram_quantile` does; one in the +Inf bucket reads as the highest finite bound.
    /// `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut seen = 0.0;
        let mut lower = 0.0;
        for (bound, c) in self.bounds.iter().zip(&self.counts) {
            if *c > 0.0 && seen + c >= rank {
                if bound.is_infinite() {
                    return Some(lower);
                }
                return Some(lower + (bound - lower) * ((rank - seen) / c).clamp(0.0, 1.0));
            }
            seen += c;
            if bound.is_finite() {
                lower = *bound;
            }
        }
        Some(lower)
    }
}

/// Observations a window needs before its `q` quantile is trusted: 20, and enough that the
/// quantile is not simply the slowest answer (40 for p95, 200 for p99).
pub fn min_samples(q: f64) -> f64 {
    (2.0 / (1.0 - q).max(1e-3)).max(20.0).round()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(pairs: &[(f64, f64)]) -> Buckets {
        Buckets::from_cumulative(pairs.to_vec()).unwrap()
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_histogram_quantile() {
        // 100 answers: 50 under 0.1 s, 40 in (0.1, 1], 10 in (1, 2].
        let b = page(&[
            (0.1, 50.0),
            (1.0, 90.0),
            (2.0, 100.0),
            (f64::INFINITY, 100.0),
        ]);
        assert_eq!(b.count(), 100.0);
        assert!((b.quantile(0.5).unwrap() - 0.1).abs() < 1e-9);
        // Rank 70 is half-way through (0.1, 1].
        assert!((b.quantile(0.7).unwrap() - 0.55).abs() < 1e-9);
        assert!((b.quantile(0.95).unwrap() - 1.5).abs() < 1e-9);
        // In the +Inf bucket: the highest finite bound.
        let slow = page(&[(0.1, 1.0), (1.0, 1.0), (f64::INFINITY, 10.0)]);
        assert_eq!(slow.quantile(0.95), Some(1.0));
        assert_eq!(Buckets::exponential(0.1, 2.0, 3).quantile(0.5), None);
    }

    #[test]
    fn a_page_that_is_not_a_histogram_is_refused() {
        assert!(Buckets::from_cumulative(vec![(0.1, 1.0), (1.0, 2.0)]).is_none());
        assert!(Buckets::from_cumulative(vec![(0.1, 3.0), (f64::INFINITY, 2.0)]).is_none());
        // Order on the page does not matter.
        let b = Buckets::from_cumulative(vec![(f64::INFINITY, 3.0), (0.1, 1.0)]).unwrap();
        assert_eq!(b.count(), 3.0);
    }

    #[test]
    fn increments_are_what_came_since_and_a_restart_is_unknown() {
        let before = page(&[(0.1, 5.0), (1.0, 8.0), (f64::INFINITY, 8.0)]);
        let after = page(&[(0.1, 5.0), (1.0, 18.0), (f64::INFINITY, 18.0)]);
        let d = after.since(&before).unwrap();
        assert_eq!(d.count(), 10.0);
        // All ten new answers were slower than 0.1 s.
        assert!(d.quantile(0.01).unwrap() > 0.1);
        assert_eq!(before.since(&after), None);
        let other = page(&[(0.2, 5.0), (f64::INFINITY, 8.0)]);
        assert_eq!(after.since(&other), None);
        let mut sum = Buckets::default();
        assert!(sum.add(&d) && sum.add(&d));
        assert_eq!(sum.count(), 20.0);
        assert!(!sum.add(&other));
    }

    #[test]
    fn observing_fills_the_bucket_the_latency_ends_in() {
        let mut b = Buckets::exponential(0.1, 10.0, 2);
        for s in [0.05, 0.5, 0.5, 30.0] {
            b.observe(s);
        }
        assert_eq!(b.count(), 4.0);
        assert_eq!(b.quantile(0.25), Some(0.1));
        assert_eq!(b.quantile(1.0), Some(1.0));
    }

    #[test]
    fn windows_need_more_samples_for_higher_quantiles() {
        assert_eq!(min_samples(0.5), 20.0);
        assert_eq!(min_samples(0.95), 40.0);
        assert_eq!(min_samples(0.99), 200.0);
    }
}
