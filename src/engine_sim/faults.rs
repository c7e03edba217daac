//! Fault injection for playing an unreliable provider, driven by a seeded PRNG so runs repeat.

use std::time::Duration;

/// SplitMix64: tiny, fast and good enough for simulation; no crate needed.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Status codes `--fail-status` accepts: what real providers answer when they shed load.
pub const FAIL_STATUSES: [u16; 3] = [429, 500, 503];

/// Injected faults for inference requests.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultConfig {
    /// Fraction of requests answered with `fail_status`.
    pub fail_rate: f64,
    /// Status of injected failures: 429, 500 or 503.
    pub fail_status: u16,
    /// Fraction of requests whose connection is closed without any response.
    pub drop_rate: f64,
    /// Added before every inference request is admitted (network and provider overhead).
    pub latency: Duration,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            fail_rate: 0.0,
            fail_status: 500,
            drop_rate: 0.0,
            latency: Duration::ZERO,
        }
    }
}

/// What to do with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Close the connection without a response.
    Drop,
    /// Answer with this status and an OpenAI-style error.
    Fail(u16),
}

/// Decides one request's fate. Always draws two numbers, so the sequence of decisions for a
/// given seed does not depend on the configured rates.
pub fn decide(cfg: &FaultConfig, rng: &mut SplitMix64) -> Fault {
    let drop_draw = rng.next_f64();
    let fail_draw = rng.next_f64();
    if drop_draw < cfg.drop_rate {
        Fault::Drop
    } else if fail_draw < cfg.fail_rate {
        Fault::Fail(cfg.fail_status)
    } else {
        Fault::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference_values() {
        // First outputs for seed 0 from the reference implementation (Vigna).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn uniform_draws_stay_in_unit_interval() {
        let mut r = SplitMix64::new(7);
        for _ in 0..10_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn rates_hold_over_many_draws_and_repeat_per_seed() {
        let cfg = FaultConfig {
            fail_rate: 0.25,
            fail_status: 503,
            drop_rate: 0.1,
            latency: Duration::ZERO,
        };
        let run = |seed| {
            let mut r = SplitMix64::new(seed);
            (0..10_000)
                .map(|_| decide(&cfg, &mut r))
                .collect::<Vec<_>>()
        };
        let a = run(3);
        assert_eq!(a, run(3));
        assert_ne!(a, run(4));
        let drops = a.iter().filter(|f| **f == Fault::Drop).count() as f64;
        let fails = a.iter().filter(|f| **f == Fault::Fail(503)).count() as f64;
        assert!((drops / 10_000.0 - 0.1).abs() < 0.02, "drops {drops}");
        // Failures apply to the requests not dropped.
        assert!(
            (fails / 10_000.0 - 0.9 * 0.25).abs() < 0.02,
            "fails {fails}"
        );
    }

    #[test]
    fn zero_rates_never_fault() {
        let mut r = SplitMix64::new(1);
        let cfg = FaultConfig::default();
        assert!((0..1000).all(|_| decide(&cfg, &mut r) == Fault::None));
    }
}
