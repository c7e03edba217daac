//! Cost-aware scaling (pure): how many replicas are worth their GPUs when providers could
//! serve the demand above them (`ScalingPolicy.spec.cost`).
//!
//! A replica costs its GPUs' price busy or idle; providers charge per request. A replica busy
//! a fraction `u` of the time serves `u` of what a full replica serves, which the providers
//! would charge `u × provider` for (`provider`: their charge for a full replica's requests,
//! per second). It is worth its GPUs while that is at least their price `gpu` a second:
//! `u ≥ gpu / provider`, the break-even occupancy. Demand fills replicas in turn, so with `D`
//! replicas' worth of demand the `k`-th replica is busy `min(1, D − (k − 1))`, and the
//! replicas worth their GPUs are the largest `k` with that at least the break-even. Demand
//! that may not go to providers (request classes with `burst: Never`) needs its replicas
//! whatever they cost, with half a replica to spare: other requests fill every slot that
//! frees, so those requests wait for releases, and the spare keeps releases well ahead of
//! their arrivals. A replica already running goes only once it falls below the break-even by
//! more than the policy's tolerance, so a demand near a boundary does not flap (where even a
//! full replica does not pay, none is kept).

/// What the providers charge, as far as the autoscaler knows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum ProviderPrice {
    /// No provider has `pricing`: there is nothing to weigh GPUs against.
    #[default]
    Unpriced,
    /// Priced, but no charged answer measured yet.
    Unmeasured,
    /// What they charged for the requests that would hold one local engine slot for a second.
    PerSlotSecond(f64),
}

/// The replicas worth their GPUs, and why.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Worth {
    /// The occupancy at which a replica costs what the providers charge for its requests (above
    /// 1, no replica ever does).
    pub break_even: f64,
    /// Replicas worth adding up to.
    pub replicas: i32,
    /// Replicas worth keeping, once running (at least `replicas`).
    pub keep: i32,
}

/// What [`worth`] weighs, per second and in one currency.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prices {
    /// One replica's GPUs.
    pub replica: f64,
    /// The providers' charge for the requests a full replica serves.
    pub provider: f64,
}

/// The replicas worth their GPUs for `demand` replicas' worth of demand, `local_only` of which
/// may not leave, with `tolerance` (a fraction of the break-even) for those already running;
/// `None` when a price is not positive and finite.
pub fn worth(demand: f64, local_only: f64, prices: Prices, tolerance: f64) -> Option<Worth> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !(positive(prices.replica) && positive(prices.provider)) {
        return None;
    }
    let break_even = prices.replica / prices.provider;
    let for_local = if local_only > 0.0 {
        (local_only + 0.5).ceil()
    } else {
        0.0
    };
    // The most replicas whose last is busy at least `threshold`.
    let at = |threshold: f64| {
        let for_demand = if threshold <= 1.0 {
            (demand.max(0.0) + 1.0 - threshold).floor()
        } else {
            0.0
        };
        for_demand
            .max(for_local)
            .clamp(0.0, f64::from(i32::MAX / 2)) as i32
    };
    Some(Worth {
        break_even,
        replicas: at(break_even),
        // Above 1 no replica ever pays, so none is kept on the margin either.
        keep: if break_even > 1.0 {
            at(break_even)
        } else {
            at(break_even * (1.0 - tolerance.clamp(0.0, 1.0)))
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPUs at 1 a second; the providers charge `provider` for a full replica's requests.
    fn at(provider: f64) -> Prices {
        Prices {
            replica: 1.0,
            provider,
        }
    }

    #[test]
    fn a_replica_is_worth_it_only_busy_beyond_break_even() {
        // A full replica's requests cost 2 at the providers: a replica pays at 50 % busy.
        let w = worth(3.4, 0.0, at(2.0), 0.0).unwrap();
        assert!((w.break_even - 0.5).abs() < 1e-9);
        // Three replicas full, the fourth 40 % busy: below break-even, the providers take it.
        assert_eq!(w.replicas, 3);
        assert_eq!(worth(3.5, 0.0, at(2.0), 0.0).unwrap().replicas, 4);
    }

    #[test]
    fn providers_cheaper_than_a_full_replica_get_all_that_may_leave() {
        let w = worth(9.5, 0.0, at(0.9), 0.0).unwrap();
        assert!(w.break_even > 1.0);
        assert_eq!(w.replicas, 0);
        // What may not leave keeps its replicas, half a replica to spare.
        assert_eq!(worth(9.5, 2.1, at(0.9), 0.0).unwrap().replicas, 3);
        assert_eq!(worth(9.5, 2.6, at(0.9), 0.0).unwrap().replicas, 4);
    }

    #[test]
    fn expensive_providers_leave_the_demand_to_gpus() {
        // 100 for a full replica's requests: a replica pays at 1 % busy.
        assert_eq!(worth(3.4, 0.0, at(100.0), 0.0).unwrap().replicas, 4);
    }

    #[test]
    fn a_running_replica_stays_within_tolerance_of_break_even() {
        // The fourth replica 45 % busy against a 50 % break-even: not worth adding, but within
        // 10 % of it, so one running stays; at 40 % it goes.
        let w = worth(3.45, 0.0, at(2.0), 0.1).unwrap();
        assert_eq!((w.replicas, w.keep), (3, 4));
        assert_eq!(worth(3.4, 0.0, at(2.0), 0.1).unwrap().keep, 3);
        // Providers cheaper than a full replica: none is kept for demand they could take.
        assert_eq!(worth(3.45, 0.0, at(0.97), 0.1).unwrap().keep, 0);
    }

    #[test]
    fn no_price_is_no_opinion() {
        assert_eq!(worth(3.4, 0.0, at(0.0), 0.1), None);
        assert_eq!(worth(3.4, 0.0, at(f64::NAN), 0.1), None);
        let free_gpus = Prices {
            replica: 0.0,
            provider: 1.0,
        };
        assert_eq!(worth(3.4, 0.0, free_gpus, 0.1), None);
    }
}
