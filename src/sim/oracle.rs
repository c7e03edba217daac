//! The clairvoyant schedules a policy is measured against (pure): knowing the whole trace and
//! the cold start, the fewest GPU-hours that serve every request locally, and the least total
//! cost when providers may take part of it.
//!
//! Demand is fluid (Little's law): at second `s` the engines need `rate(s) × hold` slots, `hold`
//! being a request's mean time on a slot, so replica `k` is needed while that exceeds
//! `(k - 1) × slots`. Each stretch a replica is needed costs its length plus one cold start (it
//! loads, holding its GPUs, before it serves); a gap shorter than a cold start is bridged (it
//! costs less to keep the replica than to load it again). The first `min` replicas run
//! throughout and load before the trace. The cost oracle then takes, stretch by stretch, the
//! cheaper of that replica's GPU time and the provider's price for the requests it would
//! serve. Fluid demand ignores queueing at the margin, so these are lower bounds: a policy
//! that meets them is as good as any schedule can be.

/// What the oracle needs of a simulation.
#[derive(Clone, Copy, Debug)]
pub struct OracleInput<'a> {
    /// Requests per second, each second.
    pub rps: &'a [f64],
    /// A request's mean time on a local slot, seconds.
    pub hold_s: f64,
    /// `maxConcurrency`: slots per replica.
    pub slots: u32,
    /// Replicas always kept (`minReplicas`).
    pub min_replicas: u32,
    /// GPUs per replica.
    pub gpus: f64,
    pub gpu_hour_price: f64,
    /// Mean cold start, seconds.
    pub cold_start_s: f64,
    /// A request's price at the provider (`None`: no provider, no burst).
    pub burst_price_per_request: Option<f64>,
}

/// The two clairvoyant figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Oracle {
    /// The fewest GPU-hours that serve every request locally.
    pub gpu_hours: f64,
    /// The least GPU cost plus provider spend.
    pub total_cost: f64,
}

pub fn oracle(input: &OracleInput<'_>) -> Oracle {
    let slots = f64::from(input.slots.max(1));
    let needed: Vec<u32> = input
        .rps
        .iter()
        .map(|r| (r * input.hold_s / slots).ceil() as u32)
        .collect();
    let top = needed
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(input.min_replicas);
    let per_gpu_second = input.gpu_hour_price * input.gpus / 3600.0;
    let (mut gpu_seconds, mut cost) = (0.0f64, 0.0f64);
    for k in 1..=top {
        if k <= input.min_replicas {
            let s = input.rps.len() as f64;
            gpu_seconds += s;
            cost += s * per_gpu_second;
            continue;
        }
        for (start, end) in stretches(&needed, k, input.cold_start_s) {
            let on = (end - start) as f64 + input.cold_start_s;
            gpu_seconds += on;
            let by_gpu = on * per_gpu_second;
            // The requests replica k would serve: its share of the demand above k - 1 replicas.
            let by_burst = input.burst_price_per_request.map(|price| {
                (start..end)
                    .map(|s| {
                        let demand = input.rps[s] * input.hold_s;
                        let above = (demand - f64::from(k - 1) * slots).clamp(0.0, slots);
                        above / input.hold_s
                    })
                    .sum::<f64>()
                    * price
            });
            cost += by_burst.map_or(by_gpu, |b| b.min(by_gpu));
        }
    }
    Oracle {
        gpu_hours: gpu_seconds / 3600.0 * input.gpus,
        total_cost: cost,
    }
}

/// The stretches `[start, end)` of seconds in which replica `k` is needed, gaps shorter than a
/// cold start bridged.
fn stretches(needed: &[u32], k: u32, cold_start_s: f64) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut s = 0;
    while s < needed.len() {
        if needed[s] < k {
            s += 1;
            continue;
        }
        let start = s;
        while s < needed.len() && needed[s] >= k {
            s += 1;
        }
        match out.last_mut() {
            Some(last) if ((start - last.1) as f64) < cold_start_s => last.1 = s,
            _ => out.push((start, s)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(rps: &[f64]) -> OracleInput<'_> {
        OracleInput {
            rps,
            hold_s: 4.0,
            slots: 4,
            min_replicas: 1,
            gpus: 1.0,
            gpu_hour_price: 3600.0, // a unit per GPU-second
            cold_start_s: 100.0,
            burst_price_per_request: None,
        }
    }

    #[test]
    fn a_steady_load_needs_its_replicas_throughout() {
        // 3 req/s × 4 s = 12 slots = 3 replicas for 1000 s; the two above the minimum load once.
        let rps = vec![3.0; 1000];
        let o = oracle(&input(&rps));
        assert!(
            (o.gpu_hours * 3600.0 - (1000.0 + 2.0 * 1100.0)).abs() < 1e-6,
            "{o:?}"
        );
        assert!((o.total_cost - 3200.0).abs() < 1e-6);
    }

    #[test]
    fn a_short_gap_is_bridged_and_a_long_one_is_not() {
        // Replica 2 is needed twice, 50 s apart (under a cold start): one stretch of 250 s.
        let mut rps = vec![1.0; 1000];
        rps[100..200].fill(2.0);
        rps[250..400].fill(2.0);
        let bridged = oracle(&input(&rps)).gpu_hours * 3600.0;
        assert!(
            (bridged - (1000.0 + 300.0 + 100.0)).abs() < 1e-6,
            "{bridged}"
        );
        // 500 s apart: two loads.
        let mut rps = vec![1.0; 1000];
        rps[100..200].fill(2.0);
        rps[700..800].fill(2.0);
        let apart = oracle(&input(&rps)).gpu_hours * 3600.0;
        assert!((apart - (1000.0 + 2.0 * 200.0)).abs() < 1e-6, "{apart}");
    }

    #[test]
    fn the_cost_oracle_bursts_a_short_peak_and_keeps_gpus_for_a_long_one() {
        // A 20 s peak needing one more replica: 20 s × 1 req/s at 2 a request beats 120 GPU-s.
        let mut rps = vec![1.0; 1000];
        rps[500..520].fill(2.0);
        let mut i = input(&rps);
        i.burst_price_per_request = Some(2.0);
        let o = oracle(&i);
        assert!((o.total_cost - (1000.0 + 40.0)).abs() < 1e-6, "{o:?}");
        // Without a provider the GPU is the only way.
        assert!((oracle(&input(&rps)).total_cost - 1120.0).abs() < 1e-6);
        // A 600 s peak: the GPU (700) is cheaper than 1200 in burst.
        let mut rps = vec![1.0; 1000];
        rps[300..900].fill(2.0);
        let mut i = input(&rps);
        i.burst_price_per_request = Some(2.0);
        assert!((oracle(&i).total_cost - 1700.0).abs() < 1e-6);
    }
}
